"""SIGTERM, SIGKILL during checkpoint writes, and the fault-injection script."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fault_injection.py"


def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path):
    command = [sys.executable, str(SCRIPT), "--child", "--root", str(tmp_path), "--max-steps", "20",
               "--every", "100", "--losses", str(tmp_path / "losses.jsonl"), "--sigterm-at", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "last-preempted.ckpt", map_location="cpu", weights_only=True)
    # The signal is sent at the end of step 4, before PreemptionCheckpoint runs for that step.
    assert checkpoint["global_step"] == 4
    assert not (tmp_path / "final.safetensors").exists()


def test_fault_injection_resumes_to_identical_weights(tmp_path):
    command = [sys.executable, str(SCRIPT), "--faults", "2", "--max-steps", "12", "--every", "3", "--workdir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "faults injected and survived: 2" in result.stdout


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    # A child writes a small good checkpoint, then large ones in a loop; it is killed mid-write.
    child = textwrap.dedent(f"""
        import torch
        from lit_tune.checkpoint_io import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        path = {str(tmp_path / "last.ckpt")!r}
        io.save_checkpoint({{"step": 1, "w": torch.ones(4)}}, path)
        print("ready", flush=True)
        step = 2
        while True:
            io.save_checkpoint({{"step": step, "w": torch.randn(64_000_000)}}, path)
            step += 1
    """)
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["step"] >= 1
    assert state["w"].numel() in (4, 64_000_000)
