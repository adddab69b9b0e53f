"""SFTModule trained with real Lightning Trainers on the tiny model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_tune.data import SFTDataModule
from lit_tune.losses import shift_labels
from lit_tune.modules import SFTModule
from tests.conftest import cpu_trainer


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _module(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", _sgd)
    kwargs.setdefault("lr_scheduler", _constant)
    module = SFTModule(model="tiny", export=False, **kwargs)
    module.configure_model()
    return module


def _weights(module):
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _assert_weights_close(a, b, atol):
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def _fit(rows, batch_size, accumulate, steps=1, module=None, seed=0):
    module = module or _module()
    data = SFTDataModule(rows=rows, batch_size=batch_size, val_fraction=0.0, seed=seed)
    cpu_trainer(max_steps=steps, accumulate_grad_batches=accumulate).fit(module, datamodule=data)
    return module


def test_accumulation_weighs_every_token_equally():
    # Two samples with 10 and 100 trained tokens (9 or 99 characters plus EOS).
    rows = [{"prompt": "a", "response": "x" * 9}, {"prompt": "b", "response": "y" * 99}]
    initial = _module()
    start = _weights(initial)
    accumulated = _fit(rows, batch_size=1, accumulate=2, module=copy.deepcopy(initial))
    whole = _fit(rows, batch_size=2, accumulate=1, module=copy.deepcopy(initial))
    _assert_weights_close(_weights(accumulated), _weights(whole), atol=1e-6)

    # Reference: one SGD step on the sum of all 110 token losses divided by 110.
    reference = copy.deepcopy(initial)
    data = SFTDataModule(rows=rows, val_fraction=0.0)
    data.setup("fit")
    total = 0.0
    for row in data.train_rows:
        ids = torch.tensor([row.input_ids])
        targets = shift_labels(torch.tensor([row.labels]))
        logits = reference.model(input_ids=ids).logits
        total = total + F.cross_entropy(logits[0], targets[0], ignore_index=-100, reduction="sum")
    assert sum(r.num_targets for r in data.train_rows) == 110
    (total / 110).backward()
    with torch.no_grad():
        for p in reference.model.parameters():
            p -= 0.1 * p.grad
    _assert_weights_close(_weights(accumulated), _weights(reference), atol=1e-6)
    assert any(not torch.equal(start[k], _weights(accumulated)[k]) for k in start)


def test_accumulation_invariance_uneven_lengths():
    rows = [{"prompt": f"q{i}", "response": "z" * (3 + 7 * i)} for i in range(8)]
    initial = _module()
    one_batch = _fit(rows, batch_size=8, accumulate=1, module=copy.deepcopy(initial))
    four_micro = _fit(rows, batch_size=2, accumulate=4, module=copy.deepcopy(initial))
    _assert_weights_close(_weights(one_batch), _weights(four_micro), atol=1e-5)


def test_all_masked_batch_gives_zero_loss_and_zero_grad():
    module = _module()
    logits = torch.randn(1, 5, 10, requires_grad=True)
    targets = torch.full((1, 5), -100)
    from lit_tune.data import TokenBatch

    batch = TokenBatch(input_ids=torch.zeros(1, 5, dtype=torch.long), labels=targets)
    loss = module.normalise(module.compute_loss(logits, targets, batch), batch)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_all_masked_batch_in_training_is_counted():
    rows = [{"prompt": "p", "response": "r"}]
    module = _module()
    data = SFTDataModule(rows=rows, val_fraction=0.0)
    data.setup("fit")
    # Mask every label by hand: the step must run with zero loss.
    data.train_rows[0].labels = [-100] * len(data.train_rows[0].labels)
    before = _weights(module)
    cpu_trainer(max_steps=1).fit(module, datamodule=data)
    assert module.empty_batches == 1
    _assert_weights_close(_weights(module), before, atol=0)


def _resume_rows():
    return [{"prompt": f"q{i}", "response": "ab" * (1 + i % 5)} for i in range(16)]


def test_resume_equals_uninterrupted(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, ckpt_path=None, root=None, module=None):
        module = module or _module(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        losses = []
        data = SFTDataModule(rows=_resume_rows(), batch_size=3, val_fraction=0.0, seed=7)
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True) if root else None
        trainer = cpu_trainer(
            max_steps=steps,
            enable_checkpointing=root is not None,
            callbacks=[checkpoint] if checkpoint else [],
            default_root_dir=tmp_path,
        )
        module.on_train_batch_end = lambda outputs, batch, batch_idx: losses.append(float(outputs["loss"]))
        # weights_only=True: a checkpoint must load without unpickling arbitrary objects.
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        return module, losses

    # 16 rows in batches of 3 give 6 batches an epoch, so step 10 stops in the middle of epoch 2.
    full, full_losses = run(20)
    _, first_losses = run(10, root=tmp_path / "ckpt")
    resumed, resumed_losses = run(20, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert len(full_losses) == 20
    assert len(resumed_losses) == 10
    torch.testing.assert_close(torch.tensor(first_losses + resumed_losses), torch.tensor(full_losses), atol=1e-6, rtol=0)
    _assert_weights_close(_weights(resumed), _weights(full), atol=1e-6)


def test_export_round_trip_identical_logits(tmp_path):
    module = _module()
    rows = [{"prompt": "a", "response": "b"}] * 4
    trainer = cpu_trainer(max_steps=2)
    module.hparams.export = True
    module.hparams.export_dir = str(tmp_path / "export")
    trainer.fit(module, datamodule=SFTDataModule(rows=rows, val_fraction=0.0))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    ids = torch.tensor([tokenizer("<s>hello world").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits, atol=0, rtol=0)
    assert tokenizer.chat_template == module.tokenizer.chat_template


def test_loss_falls_on_builtin_data():
    module = _module(optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3))
    losses = []
    module.on_train_batch_end = lambda outputs, batch, batch_idx: losses.append(float(outputs["loss"]))
    data = SFTDataModule(batch_size=16, max_seq_len=64, val_fraction=0.0)
    cpu_trainer(max_steps=40).fit(module, datamodule=data)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_nonfinite_loss_stops_with_step_and_batch():
    module = _module(optimizer=lambda p: torch.optim.SGD(p, lr=1e30))
    data = SFTDataModule(rows=[{"prompt": "a", "response": "bcd"}] * 8, batch_size=2, val_fraction=0.0)
    with pytest.raises(FloatingPointError, match=r"at step \d+, batch \d+"):
        cpu_trainer(max_steps=20).fit(module, datamodule=data)


def test_nonfinite_loss_skipped_when_opted_in():
    module = _module(optimizer=lambda p: torch.optim.SGD(p, lr=1e30), skip_nonfinite=True)
    data = SFTDataModule(rows=[{"prompt": "a", "response": "bcd"}] * 8, batch_size=2, val_fraction=0.0)
    cpu_trainer(max_steps=6).fit(module, datamodule=data)
    assert module.nonfinite_steps > 0


def test_predict_writes_completions(tmp_path):
    import json

    from lit_tune.generation import JsonlPredictionWriter

    module = SFTModule(model="tiny", export=False, max_new_tokens=5)
    data = SFTDataModule(rows=[{"prompt": f"q{i}", "response": "answer"} for i in range(6)], val_fraction=0.5, batch_size=2)
    writer = JsonlPredictionWriter(str(tmp_path / "predictions.jsonl"))
    cpu_trainer(callbacks=[writer]).predict(module, datamodule=data)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert all(r["reference"] == "answer" for r in records)
    assert all(r["prompt"].endswith("<|assistant|>\n") for r in records)
    assert all(len(module.tokenizer(r["completion"], add_special_tokens=False).input_ids) <= 5 for r in records)
