"""Wall-clock time of asynchronous against synchronous GRPO for the same number of optimizer steps.

Both modes train the built-in ``tiny`` model on ``builtin:fixed_answer`` on the CPU with the same
settings. Synchronous mode generates and trains in one process pinned to one core. Asynchronous
mode pins the trainer to that core and the generation worker to a second one, each with one
intra-op thread, so generation and training each get one core. The script prints the whole
``fit`` time (worker start included) and the mean time per step after the first few steps, and
the ratio asynchronous / synchronous of both::

    python benchmarks/bench_async_grpo.py --steps 30 --max-new-tokens 16

Needs at least 2 CPU cores; other load on those cores makes the timings noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
import warnings

import lightning as L
import torch

from lit_tune.data.prompts import PromptDataModule
from lit_tune.modules.grpo import GRPOModule

log = logging.getLogger(__name__)


class StepTimer(L.Callback):
    """Records the time at the end of every training step and pins the worker to its core."""

    def __init__(self, worker_core: int | None) -> None:
        self.worker_core = worker_core
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.fit_start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The worker starts when Lightning first iterates the loader, before this hook.
        rollouts = getattr(pl_module, "rollouts", None)
        if rollouts is not None and rollouts.process is not None and self.worker_core is not None:
            _pin_process(rollouts.process.pid, self.worker_core)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def _pin_process(pid: int, core: int) -> None:
    """Pin every thread of process ``pid`` to ``core`` (``sched_setaffinity`` sets one thread)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {core})


def _spin(core: int, seconds: float) -> None:
    """Keep ``core`` busy with matrix products for ``seconds`` (runs in a separate process)."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    matrix = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        matrix = torch.tanh(matrix @ matrix)


def _matmul_seconds(repeats: int = 300) -> float:
    matrix = torch.randn(256, 256)
    start = time.perf_counter()
    for _ in range(repeats):
        matrix = torch.tanh(matrix @ matrix)
    return time.perf_counter() - start


def core_interference(cores: list[int]) -> float:
    """Return how much slower a matrix loop on ``cores[0]`` runs while ``cores[1]`` is busy.

    1.0 means the two cores are independent. Virtual machines whose vCPUs share a physical core,
    or a host under load, give more; asynchronous generation can then gain less.
    """
    _pin_process(os.getpid(), cores[0])
    torch.set_num_threads(1)
    _matmul_seconds(50)
    alone = _matmul_seconds()
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, args=(cores[1], 30.0))
    spinner.start()
    try:
        time.sleep(5.0)  # the spawned process imports torch first
        together = _matmul_seconds()
    finally:
        spinner.terminate()
        spinner.join()
    return together / alone


def _adamw(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)


def _module(mode: str, args: argparse.Namespace) -> GRPOModule:
    return GRPOModule(
        model="tiny",
        rewards=["numeric_match"],
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        mode=mode,
        max_staleness=args.max_staleness,
        queue_size=args.queue_size,
        worker_threads=1,
        optimizer=_adamw,
        export=False,
    )


def _timings(timer: StepTimer, warmup: int) -> dict[str, float]:
    """Mean times after the first ``warmup`` steps, in seconds."""
    ends, starts = timer.ends[warmup - 1 :], timer.starts[warmup:]
    # The time from one step's end to the next step's start is spent fetching the batch: waiting
    # for the worker in async mode, nearly nothing in sync mode (generation runs inside the step).
    fetches = [started - ended for started, ended in zip(starts, ends)]
    steps = [ended - started for started, ended in zip(starts, ends[1:])]
    return {
        "seconds_per_step": (ends[-1] - ends[0]) / (len(ends) - 1),
        "step_seconds": sum(steps) / len(steps),
        "fetch_seconds": sum(fetches) / len(fetches),
    }


def run(mode: str, args: argparse.Namespace, cores: list[int]) -> dict[str, float]:
    """Train ``args.steps`` steps in ``mode`` and return its timings in seconds."""
    _pin_process(os.getpid(), cores[0])
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = _module(mode, args)
    data = PromptDataModule(path="builtin:fixed_answer", batch_size=args.batch_size)
    timer = StepTimer(worker_core=cores[1] if mode == "async" else None)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )

    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - timer.fit_start
    return {
        "fit_seconds": fit_seconds,
        **_timings(timer, args.warmup),
        "final_reward_mean": float(trainer.callback_metrics["train/reward_mean"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per mode.")
    parser.add_argument("--warmup", type=int, default=5, help="Steps left out of the per-step mean.")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="Tokens generated per completion.")
    parser.add_argument("--group-size", type=int, default=8, help="Completions per prompt.")
    parser.add_argument("--batch-size", type=int, default=4, help="Prompts per step.")
    parser.add_argument("--max-staleness", type=int, default=1, help="Async: largest accepted policy lag.")
    parser.add_argument("--queue-size", type=int, default=1, help="Async: rollout batches queued.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < args.warmup + 2:
        parser.error(f"--steps={args.steps} must exceed --warmup={args.warmup} by at least 2, and --warmup must be >= 1.")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        parser.error(f"This process may run on {len(cores)} core(s); the benchmark needs 2.")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    interference = core_interference(cores)
    results = {mode: run(mode, args, cores) for mode in ("sync", "async")}
    results["ratio"] = {
        key: results["async"][key] / results["sync"][key] for key in ("fit_seconds", "seconds_per_step")
    }
    results["core_interference"] = interference
    results["settings"] = {**vars(args), "cores": cores[:2], "torch": torch.__version__, "cpu_count": os.cpu_count()}
    header = f"{'mode':<10} {'fit s':>7} {'s/step':>7} {'in step':>8} {'fetch':>7} {'reward':>7}"
    lines = [header]
    for mode in ("sync", "async"):
        r = results[mode]
        lines.append(
            f"{mode:<10} {r['fit_seconds']:7.1f} {r['seconds_per_step']:7.3f} {r['step_seconds']:8.3f} "
            f"{r['fetch_seconds']:7.3f} {r['final_reward_mean']:7.2f}"
        )
    ratio = results["ratio"]
    lines.append(f"{'async/sync':<10} {ratio['fit_seconds']:7.2f} {ratio['seconds_per_step']:7.2f}")
    lines.append(f"A matrix loop on core {cores[0]} runs {interference:.2f}x slower while core {cores[1]} is busy.")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
