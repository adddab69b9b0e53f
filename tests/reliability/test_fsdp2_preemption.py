"""SIGTERM to one rank of a 2-process FSDP2 fit: a checkpoint, a clean exit, an exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port

SCRIPT = Path(__file__).with_name("fsdp2_preemption_script.py")
STEPS, STOP_AT = 8, 4


def _launch(out: Path, mode: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), str(out), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=out)


def _read(out: Path, run: str, rank: int) -> tuple[dict[int, dict], dict]:
    entries = [json.loads(line) for line in (out / f"{run}-rank{rank}.jsonl").read_text().splitlines()]
    steps = {entry["step"]: entry for entry in entries if "step" in entry}
    params = next((entry["params"] for entry in entries if "params" in entry), {})
    return steps, params


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2_preemption")
    first = _launch(out, "straight_then_preempt")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    (out / "preempted_exit.txt").write_text(first.stderr)
    second = _launch(out, "resume")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    return out


def test_sigterm_one_rank_checkpoints_and_exits(runs: Path) -> None:
    checkpoint = runs / "ckpt" / "last-preempted.ckpt"
    assert checkpoint.is_dir(), "expected a distributed checkpoint folder"
    assert not (runs / "ckpt" / "last-preempted.ckpt.partial").exists()
    meta = torch.load(checkpoint / "meta.pt", weights_only=True)
    assert meta["global_step"] == STOP_AT
    assert meta["lit_tune_rng"]["torch"].shape[0] == 2  # both ranks' generator states
    for rank in (0, 1):
        steps, params = _read(runs, "preempted", rank)
        assert sorted(steps) == list(range(1, STOP_AT + 1))
        assert params == {}  # training did not reach its end


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_after_sigterm_equals_uninterrupted(runs: Path, rank: int) -> None:
    straight, straight_params = _read(runs, "straight", rank)
    preempted, _ = _read(runs, "preempted", rank)
    resumed, resumed_params = _read(runs, "resumed", rank)
    assert sorted(straight) == list(range(1, STEPS + 1))
    assert sorted(resumed) == list(range(STOP_AT + 1, STEPS + 1))
    for step, entry in {**preempted, **resumed}.items():
        assert entry["loss"] == pytest.approx(straight[step]["loss"], abs=1e-6), f"loss at step {step}"
        assert entry["lr"] == pytest.approx(straight[step]["lr"], abs=1e-12), f"lr at step {step}"
    assert straight_params
    assert straight_params.keys() == resumed_params.keys()
    for name, values in straight_params.items():
        assert resumed_params[name] == pytest.approx(values, abs=1e-6), name
