"""Both callbacks under DDP and FSDP2 on 2 CPU processes (gloo), against one-process runs.

One launch of distributed_callbacks_script.py runs every distributed case; each test checks one
of its outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from callback_helpers import (
    Net,
    RegressionModule,
    cloned_state,
    cpu_trainer,
    max_difference,
    regression_loader,
    sgd_momentum_with_epoch_decay,
    two_group_adamw_with_warmup,
)

from tests.conftest import free_port

SCRIPT = Path(__file__).with_name("distributed_callbacks_script.py")


@pytest.fixture(scope="module")
def distributed_outputs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed_callbacks")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def _one_process_run(tmp_path: Path, factory, max_steps: int) -> dict[str, torch.Tensor]:
    """Ordinary training (no callback) on the global batch of 4 samples."""
    torch.manual_seed(0)
    module = RegressionModule(factory)
    cpu_trainer(tmp_path, max_steps=max_steps).fit(module, regression_loader(4))
    return cloned_state(module)


def test_ddp_in_backward_matches_global_batch(distributed_outputs, tmp_path):
    reference = _one_process_run(tmp_path, two_group_adamw_with_warmup, max_steps=3)
    ddp = torch.load(distributed_outputs / "ddp_oib.pt")

    assert max_difference(ddp, reference) <= 1e-6


def test_ddp_checkpointing_matches_global_batch(distributed_outputs, tmp_path):
    reference = _one_process_run(tmp_path, sgd_momentum_with_epoch_decay, max_steps=3)
    ddp = torch.load(distributed_outputs / "ddp_ac.pt")

    assert max_difference(ddp, reference) <= 1e-6


def test_fsdp2_matches_global_batch(distributed_outputs, tmp_path):
    reference = _one_process_run(tmp_path, two_group_adamw_with_warmup, max_steps=4)
    uninterrupted = torch.load(distributed_outputs / "fsdp_uninterrupted.pt")

    assert max_difference(uninterrupted, reference) <= 1e-6


def test_fsdp2_resume_matches_uninterrupted(distributed_outputs):
    uninterrupted = torch.load(distributed_outputs / "fsdp_uninterrupted.pt")
    resumed = torch.load(distributed_outputs / "fsdp_resumed.pt")

    assert max_difference(resumed, uninterrupted) <= 1e-6


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp2_optimizer_state_restored(distributed_outputs, rank):
    states = torch.load(distributed_outputs / f"fsdp_states_rank{rank}.pt")
    before, after = states["before_save"], states["after_load"]

    assert len(before) == 22
    assert before.keys() == after.keys()
    for name, state in before.items():
        assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
        assert state["step"].item() == 2
        for key, value in state.items():
            assert torch.equal(after[name][key], value), (name, key)


@pytest.mark.parametrize("order", ["before", "after"])
def test_fully_shard_checkpointing_gradients(distributed_outputs, order):
    outputs = torch.load(distributed_outputs / "fully_shard_gradients.pt")
    torch.manual_seed(0)
    net = Net()
    generator = torch.Generator().manual_seed(7)
    x, y = torch.randn(4, 4, generator=generator), torch.randn(4, 1, generator=generator)
    F.mse_loss(net(x), y).backward()
    reference = {name: param.grad for name, param in net.named_parameters()}

    assert outputs["counts"][order] == 3
    assert max_difference(outputs["gradients"][order], reference) <= 1e-6
