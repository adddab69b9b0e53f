"""Create one virtual environment per peer system, outside the repository.

Each peer gets its own environment so that no peer is ever a dependency of lit_tune and peers
with conflicting pins (litgpt needs an older ``huggingface_hub``) do not meet. Every environment
installs with ``constraints.txt``, which pins torch to the release lit_tune is tested with.

    python benchmarks/peers/envs.py --root /work/peer-envs            # create or update all
    python benchmarks/peers/envs.py --root /work/peer-envs hf litgpt  # only these

An environment whose requirements file has not changed since its last successful install is
left as it is (the file's hash is stored in the environment).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements"
CONSTRAINTS = HERE / "constraints.txt"
# Environment name -> requirements file; the transformers Trainer and TRL share "hf".
ENVIRONMENTS = {name: REQUIREMENTS / f"{name}.txt" for name in ("hf", "torchtune", "litgpt")}
_STAMP = "lit_tune_bench_requirements.sha256"


def env_python(root: Path, name: str) -> Path:
    """Return the Python interpreter of environment ``name`` under ``root``."""
    return root / name / "bin" / "python"


def _digest(requirements: Path) -> str:
    data = requirements.read_bytes() + CONSTRAINTS.read_bytes()
    return hashlib.sha256(data).hexdigest()


def ensure_env(root: Path, name: str) -> Path:
    """Create environment ``name`` under ``root`` and install its requirements, unless current.

    Args:
        root: Folder holding the environments; must be outside the repository.
        name: One of :data:`ENVIRONMENTS`.

    Returns:
        The environment's Python interpreter.

    Raises:
        ValueError: If ``name`` is unknown or ``root`` lies inside the repository.
        subprocess.CalledProcessError: If pip fails.
    """
    if name not in ENVIRONMENTS:
        raise ValueError(f"Unknown peer environment {name!r}; expected one of {sorted(ENVIRONMENTS)}.")
    repo = HERE.parents[1]
    if root.resolve().is_relative_to(repo):
        raise ValueError(
            f"Peer environments must live outside the repository, got root={root}. "
            "Pass a folder such as /work/peer-envs."
        )
    requirements = ENVIRONMENTS[name]
    python = env_python(root, name)
    stamp = root / name / _STAMP
    if python.exists() and stamp.exists() and stamp.read_text() == _digest(requirements):
        return python
    if not python.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(root / name)
    pip = [str(python), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS)]
    subprocess.run([*pip, "-r", str(requirements)], check=True)
    stamp.write_text(_digest(requirements))
    return python


def main(argv: list[str] | None = None) -> None:
    """Create or update the peer environments named on the command line (all by default)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/work/peer-envs"), help="folder for the environments")
    parser.add_argument("names", nargs="*", default=sorted(ENVIRONMENTS), help="environments to build")
    args = parser.parse_args(argv)
    for name in args.names:
        python = ensure_env(args.root, name)
        version = subprocess.run(
            [str(python), "-c", "import torch; print(torch.__version__)"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(f"{name}: {python} (torch {version})", file=sys.stderr)


if __name__ == "__main__":
    main()
