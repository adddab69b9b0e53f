"""FSDP2Strategy trained with real Lightning Trainers on 2 CPU processes (gloo), against references.

One 2-process launch runs every 2-process case and one 1-process launch resumes the 2-process
checkpoint (see ``fsdp2_cases.py``); the tests below only read their results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from fsdp2_harness import (
    LossRecorder,
    build_model,
    hf_loss,
    lit_loss,
    reference_run,
    save_sft_model,
    sft_data,
    sft_module,
    tiny_config,
)
from safetensors import safe_open
from transformers import LlamaForCausalLM

from tests.conftest import free_port

HERE = Path(__file__).parent
TOL = {"atol": 1e-5, "rtol": 0.0}
TWO_PROCESS_CASES = [
    "dp2",
    "hybrid",
    "tp2",
    "tp2_masked",
    "tp2_smoothing",
    "plain_tp2",
    "resume",
    "resume_full",
    "self_parallelized",
    "built_in_init",
    "meta_dp2",
    "meta_tp2",
    "meta_random",
    "tied",
    "tied_tp2",
    "precision",
    "cpu_offload",
    "sft_tp2",
]
ONE_PROCESS_CASES = ["resume_1proc", "cli"]

CLI_CONFIG = """\
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  use_distributed_sampler: false
  limit_val_batches: 0
  default_root_dir: {out}
  strategy:
    class_path: lit_tune.strategies.FSDP2Strategy
    init_args:
      layer_classes: [LlamaDecoderLayer]
      reshard_after_forward: false
model:
  class_path: fsdp2_harness.LitLossModule
  init_args:
    batch_size: 4
"""


def _launch(out: Path, nproc: int, cases: list[str], timeout: float = 300) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(HERE / "fsdp2_cases.py"),
        str(out),
        *cases,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=out)
    if proc.returncode != 0:
        raise AssertionError(f"{nproc}-process launch of {cases} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    build_model(tiny_config()).save_pretrained(out / "hf_tiny")
    build_model(tiny_config(tied=True)).save_pretrained(out / "hf_tied")
    save_sft_model(out / "hf_sft")
    (out / "cli.yaml").write_text(CLI_CONFIG.format(out=out))
    _launch(out, 2, TWO_PROCESS_CASES)
    _launch(out, 1, ONE_PROCESS_CASES)
    return out


def _load(out: Path, case: str) -> dict[str, Any]:
    return torch.load(out / f"{case}.pt", weights_only=False)


def _assert_states_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, grad in actual.items():
        torch.testing.assert_close(grad, expected[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_dp2_matches_single_process(results: Path) -> None:
    result = _load(results, "dp2")
    reference = reference_run(hf_loss, steps=3)
    torch.testing.assert_close(result["losses"], reference["losses"], **TOL)
    _assert_states_close(result["state_dict"], reference["state_dict"])


def test_hybrid_replicate2_shard1_matches_dp2(results: Path) -> None:
    result = _load(results, "hybrid")
    assert result["mesh_dim_names"] == ["data_parallel_replicate", "data_parallel_shard", "tensor_parallel"]
    assert result["mesh_shape"] == [2, 1, 1]
    assert result["param_mesh_ndim"] == 2  # HSDP: replicate × shard
    assert result["sampler_kwargs"] == {"num_replicas": 2, "rank": 0}
    _assert_states_close(result["state_dict"], _load(results, "dp2")["state_dict"])


def test_tp2_loss_parallel_matches_unsharded(results: Path) -> None:
    result = _load(results, "tp2")
    assert result["loss_parallel"] is True
    assert result["logits_sharded"] is True
    assert result["head_placements"][-1] == "S(0)"  # output head sharded on the vocabulary
    reference = reference_run(lit_loss, masking="prompt", steps=2)
    torch.testing.assert_close(result["losses"], reference["losses"], **TOL)
    _assert_grads_close(result["first_grads"], reference["first_grads"])


def test_tp2_fully_masked_batch_gives_zero(results: Path) -> None:
    result = _load(results, "tp2_masked")
    assert result["losses"] == [0.0]
    for name, grad in result["first_grads"].items():
        assert torch.isfinite(grad).all(), name
        assert torch.count_nonzero(grad) == 0, name


def test_tp2_label_smoothing_matches_unsharded(results: Path) -> None:
    result = _load(results, "tp2_smoothing")
    reference = reference_run(lit_loss, masking="prompt", steps=1, label_smoothing=0.1)
    torch.testing.assert_close(result["losses"], reference["losses"], **TOL)
    _assert_grads_close(result["first_grads"], reference["first_grads"])


def test_plain_module_trains_with_tp2(results: Path) -> None:
    # transformers' own loss (F.cross_entropy, mean) on the sharded logits.
    result = _load(results, "plain_tp2")
    reference = reference_run(hf_loss, masking="prompt", steps=2)
    torch.testing.assert_close(result["losses"], reference["losses"], **TOL)


def test_resume_equals_uninterrupted(results: Path) -> None:
    result = _load(results, "resume")
    assert result["checkpoint_is_folder"]  # a sharded distributed checkpoint
    torch.testing.assert_close(result["resumed_losses"], result["whole_losses"][2:], atol=1e-6, rtol=0)
    _assert_states_close(result["resumed_state"], result["whole_state"])


def test_resume_from_full_checkpoint(results: Path) -> None:
    result = _load(results, "resume_full")
    assert result["checkpoint_is_file"]  # save_distributed_checkpoint=False
    whole = _load(results, "resume")
    torch.testing.assert_close(result["whole_losses"], whole["whole_losses"], atol=1e-6, rtol=0)
    torch.testing.assert_close(result["resumed_losses"], whole["whole_losses"][2:], atol=1e-6, rtol=0)
    _assert_states_close(result["resumed_state"], whole["whole_state"])


def test_module_that_shards_itself_is_left_alone(results: Path) -> None:
    result = _load(results, "self_parallelized")
    assert result["root_is_lightning_module"] is False
    reference = reference_run(hf_loss, steps=3)
    torch.testing.assert_close(result["losses"], reference["losses"], **TOL)
    _assert_states_close(result["state_dict"], reference["state_dict"])


def test_module_built_in_init_is_sharded(results: Path) -> None:
    result = _load(results, "built_in_init")
    reference = reference_run(hf_loss, steps=3)
    torch.testing.assert_close(result["losses"], reference["losses"], **TOL)
    _assert_states_close(result["state_dict"], reference["state_dict"])


def test_resume_on_one_process(results: Path) -> None:
    whole = _load(results, "resume")
    result = _load(results, "resume_1proc")
    torch.testing.assert_close(result["losses"], whole["whole_losses"][2:], **TOL)
    _assert_states_close(result["state_dict"], whole["whole_state"])


@pytest.mark.parametrize("case", ["meta_dp2", "meta_tp2"])
def test_meta_init_loads_rank_shards(results: Path, case: str) -> None:
    result = _load(results, case)
    reference = build_model(tiny_config())
    expected = reference(input_ids=result["input_ids"]).logits
    torch.testing.assert_close(result["logits"], expected, **TOL)
    assert result["checkpoint_to_load"] is None
    assert result["all_dtensor"]
    # Rank 0 has about half the parameters, because tensor parallel replicates the norm weights.
    assert result["local_fraction"] < 0.6
    torch.testing.assert_close(result["inv_freq"], reference.model.rotary_emb.inv_freq, atol=0, rtol=0)


def test_meta_init_without_checkpoint_initialises(results: Path) -> None:
    result = _load(results, "meta_random")
    std = tiny_config().initializer_range
    assert abs(result["embedding_std"] - std) < 0.2 * std
    assert abs(result["q_proj_std"] - std) < 0.2 * std
    torch.testing.assert_close(result["norm_weight"], torch.ones(16), atol=0, rtol=0)
    reference = build_model(tiny_config())
    torch.testing.assert_close(result["inv_freq"], reference.model.rotary_emb.inv_freq, atol=0, rtol=0)
    assert result["logits_finite"]


def test_tied_embeddings_survive_sharding_and_resume(results: Path) -> None:
    result = _load(results, "tied")
    assert all(result["tie_checks"])
    assert result["tied_after_fit"]
    assert result["root_holds_head"]
    reference = reference_run(lit_loss, tied=True, steps=3, lr=0.5)
    torch.testing.assert_close(result["whole_losses"], reference["losses"], **TOL)
    _assert_grads_close(result["first_grads"], reference["first_grads"])
    # The first loss after resuming at step 2 equals step 3 of the uninterrupted run.
    torch.testing.assert_close(result["resumed_losses"][0], result["whole_losses"][2], atol=1e-6, rtol=0)


def test_tied_export_reloads_tied(results: Path) -> None:
    folder = results / "export_tied"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
        # NOTE: the gathered state dict has the tied head as a separate copy, so the export may
        # store it twice. Both copies must have the same values.
        if "lm_head.weight" in f.keys():
            torch.testing.assert_close(f.get_tensor("lm_head.weight"), embedding, atol=0, rtol=0)
    model = LlamaForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = _load(results, "tied")["resumed_state"]
    torch.testing.assert_close(model.model.embed_tokens.weight, state["model.embed_tokens.weight"], atol=0, rtol=0)


def test_tied_tp2_keeps_tie(results: Path) -> None:
    result = _load(results, "tied_tp2")
    assert result["tie_checks"] == [True]
    reference = reference_run(lit_loss, tied=True, steps=1, lr=0.5)
    torch.testing.assert_close(result["losses"], reference["losses"], **TOL)
    _assert_grads_close(result["first_grads"], reference["first_grads"])


def test_export_loads_with_identical_logits(results: Path) -> None:
    exported = LlamaForCausalLM.from_pretrained(results / "export_dp2")
    trained = build_model(tiny_config())
    trained.load_state_dict(_load(results, "dp2")["state_dict"])
    input_ids = torch.arange(16).view(2, 8)
    torch.testing.assert_close(exported(input_ids=input_ids).logits, trained(input_ids=input_ids).logits, atol=0, rtol=0)


def test_precision_policies(results: Path) -> None:
    result = _load(results, "precision")
    mixed = result["bf16-mixed"]
    assert mixed["plugin"] == "FSDP2MixedPrecision"
    assert mixed["trainer_precision"] == "bf16-mixed"
    assert mixed["param_dtype"] == "torch.float32"  # fp32 shards, bf16 compute
    assert mixed["forward_dtype"] == "torch.bfloat16"
    assert mixed["grad_dtype"] == "torch.float32"
    true = result["bf16-true"]
    assert true["param_dtype"] == "torch.bfloat16"
    assert true["forward_dtype"] == "torch.bfloat16"


def test_cpu_offload_matches_single_process(results: Path) -> None:
    result = _load(results, "cpu_offload")
    reference = reference_run(hf_loss, steps=3)
    torch.testing.assert_close(result["losses"], reference["losses"], **TOL)
    _assert_states_close(result["state_dict"], reference["state_dict"])


def test_lightning_cli_yaml_trains(results: Path) -> None:
    result = _load(results, "cli")
    assert result["strategy"] == "FSDP2Strategy"
    assert result["layer_classes"] == ["LlamaDecoderLayer"]
    assert result["steps"] == 2
    reference = reference_run(lit_loss, steps=2)
    torch.testing.assert_close(result["losses"], reference["losses"], **TOL)


def test_sft_module_with_tp2_and_checkpointing(results: Path, tmp_path: Path) -> None:
    result = _load(results, "sft_tp2")
    assert result["checkpointed_layers"] == 4  # applied by the strategy before sharding
    assert result["checkpoint_to_load"] is None

    # The same module and data on one process without FSDP2Strategy.
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    reference = sft_module(results / "hf_sft", tmp_path / "export")
    trainer.fit(reference, datamodule=sft_data(results / "hf_sft"))
    torch.testing.assert_close(result["losses"], recorder.losses, **TOL)
    exported = LlamaForCausalLM.from_pretrained(results / "sft_export_tp2")
    _assert_states_close(exported.state_dict(), reference.model.state_dict())
