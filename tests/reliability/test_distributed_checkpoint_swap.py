"""Distributed-checkpoint folders are replaced only once complete, so a kill keeps the previous one."""

import os
import subprocess
import sys
from pathlib import Path

from lit_tune.strategies._checkpoint import partial_path, recover, swap_into_place
from tests.conftest import free_port

SCRIPT = Path(__file__).with_name("dcp_kill_script.py")


def _folder(path: Path, step: int) -> Path:
    path.mkdir()
    (path / "step.txt").write_text(str(step))
    return path


def test_swap_replaces_the_folder_and_leaves_nothing_behind(tmp_path):
    target = _folder(tmp_path / "last.ckpt", 1)
    swap_into_place(_folder(partial_path(target), 2), target)
    assert (target / "step.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_recover_after_kill_between_renames(tmp_path, caplog):
    target = tmp_path / "last.ckpt"
    old = _folder(tmp_path / "last.ckpt.old", 1)  # the state right after the first rename
    assert recover(target) == old
    assert "a save was interrupted" in caplog.text
    _folder(target, 2)
    assert recover(target) == target


def _torchrun(out: Path, mode: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), str(out), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=out)


def test_sigkill_mid_save_keeps_the_previous_checkpoint_loadable(tmp_path):
    killed = _torchrun(tmp_path, "kill")
    assert killed.returncode != 0, "the watcher should have killed the run during its third save"
    assert (tmp_path / "last.ckpt.partial").is_dir(), "the kill should land while the shards are written"
    resumed = _torchrun(tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert int((tmp_path / "resumed_at.txt").read_text()) == 2  # the second save, intact
    assert not (tmp_path / "last.ckpt.partial").exists()  # the resumed run's saves replaced it
