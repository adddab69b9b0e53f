"""A failing rank ends the whole distributed run with its error, never a hang."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

SCRIPT = Path(__file__).with_name("rank_failure_script.py")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_rank_failure_ends_run_with_original_error(tmp_path, strategy):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(SCRIPT), strategy], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1 failed on purpose" in result.stderr
    assert elapsed < 200
