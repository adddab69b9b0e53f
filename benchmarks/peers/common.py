"""Helpers shared by every benchmark runner; standard library only, so each peer environment can
import it without installing lit_tune.

A runner reads one run description (``RunSpec``), trains for ``spec.steps`` optimizer steps on
the sequences of ``spec.tokens``, calls :meth:`StepClock.tick` once at the end of every optimizer
step, and writes the result with :func:`write_result`. Throughput is computed by the harness from
those timestamps, the same way for every system.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RunSpec:
    """One benchmark run, as the harness hands it to a runner.

    Attributes:
        system: Name of the system under test, e.g. ``"lit_tune"``.
        model_dir: Hugging Face folder (``config.json``, ``model.safetensors``, ``tokenizer.json``).
        tokens: JSON file with ``{"seq_len": L, "sequences": [[id, ...], ...]}``; every sequence
            has exactly ``L`` tokens, so no system pads.
        batch_size: Sequences per optimizer step (no gradient accumulation).
        steps: Optimizer steps to run.
        lr: AdamW learning rate (constant, no warm-up, weight decay 0, no gradient clipping).
        output: JSON file the runner writes its result to.
        work_dir: Scratch folder for the runner (converted checkpoints, peer output folders).
        seed: Seed for the model's random parts (none here: weights come from ``model_dir``).
    """

    system: str
    model_dir: str
    tokens: str
    batch_size: int
    steps: int
    lr: float
    output: str
    work_dir: str
    seed: int = 0


@dataclass
class StepClock:
    """Wall-clock timestamps taken at the end of each optimizer step."""

    start: float = field(default_factory=time.perf_counter)
    step_ends: list[float] = field(default_factory=list)

    def tick(self) -> None:
        """Record the end of one optimizer step."""
        self.step_ends.append(time.perf_counter())


def parse_spec(description: str) -> RunSpec:
    """Read the run description from ``--spec FILE`` on the command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--spec", type=Path, required=True, help="JSON file with the RunSpec fields")
    args = parser.parse_args()
    return RunSpec(**json.loads(args.spec.read_text()))


def load_sequences(spec: RunSpec) -> list[list[int]]:
    """Return the first ``batch_size * steps`` sequences of ``spec.tokens``.

    Raises:
        ValueError: If the file holds fewer sequences than the run needs.
    """
    data = json.loads(Path(spec.tokens).read_text())
    needed = spec.batch_size * spec.steps
    sequences = data["sequences"]
    if len(sequences) < needed:
        raise ValueError(
            f"{spec.tokens} holds {len(sequences)} sequences but {spec.steps} steps of "
            f"{spec.batch_size} need {needed}. Prepare the data with more rows."
        )
    return sequences[:needed]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(spec: RunSpec, clock: StepClock, losses: list[float], notes: dict | None = None) -> None:
    """Write the run's timestamps, losses and settings to ``spec.output``.

    Args:
        spec: The run description.
        clock: Timestamps of the optimizer steps.
        losses: Training loss of each step, where the system reports it (may be empty).
        notes: Facts about the run worth recording, such as the optimizer implementation.
    """
    result = {
        "spec": asdict(spec),
        "start": clock.start,
        "step_ends": clock.step_ends,
        "losses": losses,
        "peak_rss_mib_self": peak_rss_mib(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "notes": notes or {},
    }
    Path(spec.output).write_text(json.dumps(result, indent=1))
