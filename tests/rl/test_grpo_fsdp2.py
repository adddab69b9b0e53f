"""GRPOModule under FSDP2Strategy, 2 CPU processes (gloo): one launch runs every case."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from grpo_fsdp2_data import constant, fixed_rollout_batch, sgd

from lit_tune.models.loading import load_model
from lit_tune.models.tiny import build_tiny_tokenizer
from lit_tune.modules.grpo import GRPOModule
from tests.conftest import free_port

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("grpo_fsdp2")
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    load_model("tiny", vocab_size=len(tokenizer)).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(HERE / "grpo_fsdp2_script.py"), str(out), str(out / "model"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=out)
    if proc.returncode != 0:
        # Progress bars end in carriage returns, which hide the text before them in a terminal.
        stderr = proc.stderr.replace("\r", "\n")
        raise AssertionError(f"2-process GRPO launch failed:\n{proc.stdout[-3000:]}\n{stderr[-8000:]}")
    return out


def _load(out: Path, case: str) -> dict:
    return torch.load(out / f"{case}.pt", weights_only=False)


def test_fixed_rollouts_match_one_process(results: Path) -> None:
    # Reference: the same SGD step on all four sequences in one process.
    module = GRPOModule(model=str(results / "model"), mode="sync", optimizer=sgd, lr_scheduler=constant, export=False)
    module.configure_model()
    optimizer = sgd(module.model.parameters())
    module.normalise(module.compute_loss(fixed_rollout_batch(ranks=(0, 1)))).backward()
    optimizer.step()

    sharded = _load(results, "fixed")["state_dict"]
    for name, tensor in module.model.state_dict().items():
        torch.testing.assert_close(sharded[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_sampling_stops_only_when_every_rank_is_done(results: Path) -> None:
    stop = _load(results, "stop")
    assert stop == {"one_rank_done": False, "all_done": True}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_generation_trains_and_stops_workers(results: Path, mode: str) -> None:
    result = _load(results, mode)
    steps = result["steps"]
    assert len(steps) == (2 if mode == "sync" else 3)
    for step in steps:
        assert torch.isfinite(torch.tensor(step["train/loss"]))
        assert step["train/policy_lag"] <= 1
    # The reference starts as a copy of the sharded policy, so the first KL is 0, and the worker
    # received the gathered weights, so its log-probabilities give ratio 1 at the first step.
    assert steps[0]["train/kl"] == pytest.approx(0.0, abs=1e-5)
    assert steps[0]["train/ratio_max"] == pytest.approx(1.0, abs=1e-3)
    assert result["children_left"] == 0
