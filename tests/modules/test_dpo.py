"""DPOModule trained with real Lightning Trainers on the tiny model and short preference pairs."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import LlamaForCausalLM

from lit_tune.cli import LitTuneCLI
from lit_tune.data.collate import Row, collate_rows
from lit_tune.data.preference import PreferenceDataModule, collate_pairs
from lit_tune.losses.dpo_sigmoid import SigmoidDPOLoss
from lit_tune.models.tiny import tiny_llama_config
from lit_tune.modules.dpo import REFERENCE_CHECKPOINT_KEY, DPOModule
from tests.conftest import cpu_trainer, free_port
from tests.modules.dpo_fsdp2_cases import run_case

ROWS = [
    {"prompt": "1+1", "chosen": "2", "rejected": "3"},
    {"prompt": "2+5", "chosen": "7", "rejected": "8 or 9"},
    {"prompt": "a longer prompt", "chosen": "a longer answer", "rejected": "no"},
    {"prompt": "4+4", "chosen": "8", "rejected": "44"},
]
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class SmallDPOModule(DPOModule):
    """DPOModule on a 2-layer, 32-wide Llama with the tiny tokenizer, to keep CPU tests fast."""

    def build_model(self):
        config = tiny_llama_config(len(self.tokenizer))
        config.update(
            {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            }
        )
        return LlamaForCausalLM(config)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def _constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _module(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", _sgd)
    kwargs.setdefault("lr_scheduler", _constant)
    module = SmallDPOModule(model="tiny", export=False, **kwargs)
    module.configure_model()
    return module


def _data(rows=ROWS, **kwargs):
    kwargs.setdefault("val_fraction", 0.0)
    data = PreferenceDataModule(rows=rows, **kwargs)
    data.setup("fit")
    return data


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_weights_close(a, b, atol):
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def _manual_logps(model, prompt_ids, response_ids):
    """Sum of log p(response token) from one unpadded forward pass of prompt + response."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        log_probs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(prompt_ids)
    return sum(log_probs[start - 1 + i, token].item() for i, token in enumerate(response_ids))


def test_precomputed_reference_loss_values():
    # Reference log-probs set to policy + 1 (chosen) and policy - 1 (rejected) make policy minus
    # reference -1 and +1, as with policy -11/-11 and reference -10/-12. With beta 0.1 the loss
    # is log(1 + e^0.2) and the rewards are -0.1 and +0.1, whatever the other options.
    data = _data()
    pad = data.tokenizer.pad_token_id
    expected_loss = math.log(1 + math.exp(0.2))
    for options in (
        {},
        {"beta": 0.1},
        {"loss": SigmoidDPOLoss(beta=0.1)},
        {"reference_batch_size": 1},
    ):
        module = _module(**options)
        row = copy.deepcopy(data.train_rows[2])
        with torch.no_grad():
            policy, _ = module.sequence_logps(collate_pairs([row], pad))
        row.reference_chosen = policy[0].item() + 1.0
        row.reference_rejected = policy[1].item() - 1.0
        # Alone, beside a longer pair (more padding), and beside a filler pair.
        others = [[], [copy.deepcopy(data.train_rows[0])], [copy.deepcopy(data.train_rows[0])]]
        others[1][0].reference_chosen = others[1][0].reference_rejected = -1.0
        others[2][0].is_filler = True
        others[2][0].reference_chosen = others[2][0].reference_rejected = 0.0
        for extra in others:
            with torch.no_grad():
                logps, _ = module.pair_logps(collate_pairs([row, *extra], pad))
                output = module.compute_loss(logps)
            assert output.losses[0].item() == pytest.approx(expected_loss, abs=1e-6), options
            assert output.losses[0].item() == pytest.approx(0.7981, abs=1e-4)
            assert output.chosen_rewards[0].item() == pytest.approx(-0.1, abs=1e-6)
            assert output.rejected_rewards[0].item() == pytest.approx(0.1, abs=1e-6)


def test_precomputed_reference_equals_live():
    data_args = {"batch_size": 2, "seed": 3}
    runs = {}
    for reference in ("precomputed", "live"):
        module, data = _module(reference=reference), _data(**data_args)
        cpu_trainer(max_steps=3).fit(module, datamodule=data)
        runs[reference] = (module, data)
    precomputed, live = runs["precomputed"], runs["live"]
    _assert_weights_close(_weights(precomputed[0].model), _weights(live[0].model), atol=1e-6)

    # The rows' stored values equal what the live (frozen) reference computes now.
    rows = precomputed[1].train_rows
    with torch.no_grad():
        sums, _ = live[0].sequence_logps(collate_pairs(rows, 0), model=live[0].reference_model)
    stored = [row.reference_chosen for row in rows] + [row.reference_rejected for row in rows]
    torch.testing.assert_close(sums, torch.tensor(stored), atol=1e-5, rtol=0)

    # And the loss on one batch is the same either way (1e-6) once the policy has moved.
    batch = collate_pairs(rows, 0)
    losses = []
    for module, _ in (precomputed, live):
        with torch.no_grad():
            losses.append(module.compute_loss(module.pair_logps(batch)[0]).losses)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    assert live[0].reference_model is not None
    assert precomputed[0].reference_model is None


def test_concatenated_forward_equals_separate_forwards():
    module, data = _module(), _data()
    rows = data.train_rows
    pad = data.tokenizer.pad_token_id
    with torch.no_grad():
        joint, tokens = module.sequence_logps(collate_pairs(rows, pad))
        separate = []
        for responses in ([r.chosen_ids for r in rows], [r.rejected_ids for r in rows]):
            sequences = [
                Row(r.prompt_ids + resp, [-100] * len(r.prompt_ids) + resp)
                for r, resp in zip(rows, responses)
            ]
            batch = collate_rows(sequences, pad)
            log_probs = F.log_softmax(
                module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                dim=-1,
            )
            targets = batch.labels[:, 1:]
            picked = log_probs[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            separate.append((picked * (targets != -100)).sum(-1))
    torch.testing.assert_close(joint, torch.cat(separate), atol=1e-5, rtol=0)
    assert tokens.tolist() == [len(r.chosen_ids) for r in rows] + [
        len(r.rejected_ids) for r in rows
    ]


def test_logps_cover_response_tokens_only():
    # Each padded sequence's score equals the unpadded sum over its response tokens alone.
    module, data = _module(), _data()
    rows = data.train_rows
    with torch.no_grad():
        sums, _ = module.sequence_logps(collate_pairs(rows, data.tokenizer.pad_token_id))
    expected = [_manual_logps(module.model, r.prompt_ids, r.chosen_ids) for r in rows]
    expected += [_manual_logps(module.model, r.prompt_ids, r.rejected_ids) for r in rows]
    torch.testing.assert_close(sums, torch.tensor(expected), atol=1e-5, rtol=0)


def test_step_weighs_every_pair_equally():
    # Three pairs in one optimizer step: one batch of 3, three micro-batches of 1, or two
    # micro-batches of 2 whose second one has a filler pair. Same update each way.
    rows = ROWS[:3]
    initial = _module()
    results = []
    for batch_size, accumulate in ((3, 1), (1, 3), (2, 2)):
        module = copy.deepcopy(initial)
        cpu_trainer(max_steps=1, accumulate_grad_batches=accumulate).fit(
            module, datamodule=_data(rows, batch_size=batch_size)
        )
        results.append(_weights(module.model))
    _assert_weights_close(results[0], results[1], atol=1e-6)
    _assert_weights_close(results[0], results[2], atol=1e-6)
    assert any(not torch.equal(results[0][k], _weights(initial.model)[k]) for k in results[0])


def test_fit_logs_metrics_and_learns():
    module = _module()
    data = _data(ROWS * 2, val_fraction=0.25, batch_size=3)
    trainer = cpu_trainer(
        max_steps=6, limit_val_batches=None, val_check_interval=2, log_every_n_steps=1
    )
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for name in METRICS:
        assert f"train/{name}" in metrics, name
        assert f"val/{name}" in metrics, name
    assert metrics["train/rewards/margins"] > 0
    assert metrics["train/rewards/accuracies"] > 0.5
    assert metrics["val/rewards/margins"] > 0


def test_validate_before_training_gives_zero_rewards():
    module, data = _module(), _data(val_fraction=0.5)
    (metrics,) = cpu_trainer(limit_val_batches=None).validate(module, datamodule=data)
    assert metrics["val/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["val/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["val/logps/chosen"] < 0
    assert all(row.reference_chosen is not None for row in data.val_rows)
    assert all(row.reference_chosen is None for row in data.train_rows)  # validation scores no train pairs
    (test_metrics,) = cpu_trainer().test(module, datamodule=data)
    assert test_metrics["test/loss"] == pytest.approx(metrics["val/loss"], abs=1e-6)


def test_resume_keeps_precomputed_reference(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first, data = _module(), _data(batch_size=2)
    cpu_trainer(max_steps=2, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        first, datamodule=data
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)[REFERENCE_CHECKPOINT_KEY][
        "train"
    ]
    assert saved.tolist() == [[r.reference_chosen, r.reference_rejected] for r in data.train_rows]

    # Resuming a fresh module restores the initial policy's values instead of rescoring.
    resumed, resumed_data = _module(), _data(batch_size=2)
    cpu_trainer(max_steps=3).fit(resumed, datamodule=resumed_data, ckpt_path=tmp_path / "last.ckpt")
    assert [
        [r.reference_chosen, r.reference_rejected] for r in resumed_data.train_rows
    ] == saved.tolist()

    uninterrupted = _module()
    cpu_trainer(max_steps=3).fit(uninterrupted, datamodule=_data(batch_size=2))
    _assert_weights_close(_weights(resumed.model), _weights(uninterrupted.model), atol=1e-6)


def test_live_reference_stays_frozen():
    module = _module(reference="live")
    before = _weights(module.reference_model)
    start = _weights(module.model)
    cpu_trainer(max_steps=2).fit(module, datamodule=_data(batch_size=2))
    _assert_weights_close(_weights(module.reference_model), before, atol=0)
    assert any(not torch.equal(start[k], _weights(module.model)[k]) for k in start)
    assert all(p.grad is None for p in module.reference_model.parameters())
    assert any(key.startswith("reference_model.") for key in module.state_dict())


@pytest.mark.parametrize("loss", ["simpo", "orpo", "ipo", "hinge", "cdpo"])
def test_other_losses_train(loss):
    module = _module(loss=loss)
    data = _data(ROWS[:2], batch_size=2)
    trainer = cpu_trainer(max_steps=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    reference_free = loss in ("simpo", "orpo")
    assert module.reference == ("none" if reference_free else "precomputed")
    assert (data.train_rows[0].reference_chosen is None) == reference_free
    if loss == "orpo":
        assert "train/nll_loss" in trainer.callback_metrics


def test_invalid_options():
    with pytest.raises(ValueError, match="reference='none' cannot work"):
        DPOModule(model="tiny", loss="sigmoid", reference="none")
    with pytest.raises(ValueError, match="reference-free"):
        DPOModule(model="tiny", loss="simpo", reference="live")
    with pytest.raises(ValueError, match="not one of"):
        DPOModule(model="tiny", reference="frozen")
    with pytest.raises(ValueError, match="Set them on the loss object"):
        DPOModule(model="tiny", loss=SigmoidDPOLoss(), beta=0.2)
    with pytest.raises(ValueError, match="Unknown preference loss"):
        DPOModule(model="tiny", loss="kto")


def test_precomputed_reference_needs_data_module():
    module, data = _module(), _data()
    with pytest.raises(ValueError, match="PreferenceDataModule"):
        cpu_trainer(max_steps=1).fit(module, train_dataloaders=data.train_dataloader())


def test_dpo_tiny_config_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    args = [
        "fit",
        "--config",
        "configs/dpo_tiny.yaml",
        "--data.max_rows",
        "12",
        "--data.batch_size",
        "3",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    cli = LitTuneCLI(args=args)
    assert "val/rewards/accuracies" in cli.trainer.callback_metrics
    assert (tmp_path / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors").is_file()


# ----------------------------------------------------------------- FSDP2, two processes


FSDP2_CASES = ["tp2", "tp2_live", "dp2", "dp2_live"]


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_fsdp2")
    script = Path(__file__).with_name("dpo_fsdp2_cases.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    command += ["--master_port", str(free_port()), str(script), str(out), *FSDP2_CASES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=out)
    assert proc.returncode == 0, (
        f"2-process launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    )
    results = {case: json.loads((out / f"{case}.json").read_text()) for case in FSDP2_CASES}
    results["single"] = run_case("single", out / "single")
    return results


@pytest.mark.parametrize("case", FSDP2_CASES)
def test_fsdp2_loss_equals_single_process(fsdp2_results, case):
    single, sharded = fsdp2_results["single"], fsdp2_results[case]
    assert len(sharded["losses"]) == len(single["losses"]) == 3
    for step, (got, want) in enumerate(zip(sharded["losses"], single["losses"])):
        assert got == pytest.approx(want, abs=1e-5), f"step {step}"
    assert sorted(sharded["val"]) == sorted(single["val"])
    for name, value in single["val"].items():
        assert sharded["val"][name] == pytest.approx(value, abs=1e-5), name


def test_fsdp2_precomputed_reference_matches(fsdp2_results):
    single = fsdp2_results["single"]["reference"]
    for case in ("tp2", "dp2"):
        torch.testing.assert_close(
            torch.tensor(fsdp2_results[case]["reference"]), torch.tensor(single), atol=1e-5, rtol=0
        )


def test_fsdp2_shards_policy_and_live_reference(fsdp2_results):
    # Loss parallel: the output head is column-parallel, its weight sharded over the 2 ranks.
    assert "Shard(dim=0)" in fsdp2_results["tp2"]["head_placements"]
    # The frozen reference's decoder layers are FSDP units, sharded over the data-parallel ranks.
    assert fsdp2_results["tp2_live"]["reference_layers_sharded"] == [True, True]
    assert fsdp2_results["dp2_live"]["reference_layers_sharded"] == [True, True]
    assert fsdp2_results["dp2_live"]["reference_placements"] == "(Shard(dim=0),)"


def test_checkpoint_of_another_module_is_rejected(tmp_path):
    from lit_tune.data.sft import SFTDataModule
    from lit_tune.modules.sft import SFTModule

    dpo = _module()
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(dpo, datamodule=_data(batch_size=2))
    trainer.save_checkpoint(tmp_path / "dpo.ckpt")
    saved = torch.load(tmp_path / "dpo.ckpt", weights_only=True)
    assert saved["lit_tune_module"] == "DPOModule"  # SmallDPOModule is a DPOModule
    assert "lit_tune_rng" in saved  # DPO keeps the base module's random-number state

    sft = SFTModule(model="tiny", export=False)
    sft_data = SFTDataModule(rows=[{"prompt": "1+1=", "response": "2"}] * 8, batch_size=2, val_fraction=0.0)
    with pytest.raises(ValueError, match="written by DPOModule, so it cannot resume SFTModule"):
        cpu_trainer(max_steps=2).fit(sft, datamodule=sft_data, ckpt_path=tmp_path / "dpo.ckpt")
