"""Importing lit_tune does not import ``datasets``, which adds about 65 MB to every process."""

import subprocess
import sys


def test_import_lit_tune_leaves_datasets_unloaded():
    code = "import sys, lit_tune, lit_tune.data; print('datasets' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"
