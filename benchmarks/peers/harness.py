"""Side-by-side CPU benchmark of full-finetune SFT: lit_tune against torchtune, TRL, the
transformers ``Trainer`` and litgpt, on the same model, token stream and settings, in one run.

Run it from the repository root with lit_tune's environment::

    python benchmarks/peers/harness.py --data ../shared/data/gsm8k/train.jsonl \\
        --envs /work/peer-envs --work-dir /work/bench-work --repeats 3

It creates the peer environments (``envs.py``), writes the model folders and token files
(``prepare.py``) and converts the litgpt checkpoints. Then it runs every system once per round,
each in its own process, in the same order every round (A B C D, A B C D, ...). Per run it takes the median
step time over the steps after ``--warmup``, and per system the median over rounds; peak resident
memory is the process's ``ru_maxrss`` as the kernel reports it to the harness (import, load and
training included). It prints the table and writes ``results.json``, a Markdown table and a bar
chart into ``--report-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RunSpec  # noqa: E402
from envs import ensure_env  # noqa: E402

# System name -> (environment name or "lit_tune" for this interpreter, runner script).
SYSTEMS = {
    "lit_tune": ("lit_tune", "run_lit_tune.py"),
    "transformers": ("hf", "run_hf.py"),
    "trl": ("hf", "run_hf.py"),
    "torchtune": ("torchtune", "run_torchtune.py"),
    "litgpt": ("litgpt", "run_litgpt.py"),
}
_VERSION_OF = {"lit_tune": "lit-tune", "transformers": "transformers", "trl": "trl", "torchtune": "torchtune", "litgpt": "litgpt"}


@dataclass
class RunRecord:
    """One process: a system on a model in one round."""

    system: str
    model: str
    round: int
    tokens_per_sec: float | None
    peak_rss_mib: float
    wall_s: float
    step_times: list[float] = field(default_factory=list)
    first_loss: float | None = None
    notes: dict = field(default_factory=dict)
    error: str | None = None


def _python_of(system: str, envs: Path) -> str:
    env = SYSTEMS[system][0]
    return sys.executable if env == "lit_tune" else str(envs / env / "bin" / "python")


def _run_process(command: list[str], log_path: Path, env: dict) -> tuple[int, float, float]:
    """Run ``command``, returning its exit code, peak RSS in MiB and wall time in seconds."""
    start = time.perf_counter()
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        # wait4 returns the child's own resource usage, so each run's peak RSS is its own.
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start


def _spec(system: str, model: str, args, round_index: int) -> RunSpec:
    root = args.work_dir / model
    run_dir = root / "runs" / f"{system}-{round_index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunSpec(
        system=system,
        model_dir=str(root / "model"),
        tokens=str(root / "tokens.json"),
        batch_size=args.batch_size[model],
        steps=args.steps[model],
        lr=args.lr,
        output=str(run_dir / "result.json"),
        work_dir=str(root / "scratch"),
    )


def run_once(system: str, model: str, args, round_index: int, extra_env: dict) -> RunRecord:
    """Run one system on one model and read back its timings."""
    spec = _spec(system, model, args, round_index)
    spec_path = Path(spec.output).with_name("spec.json")
    spec_path.write_text(json.dumps(asdict(spec)))
    script = HERE / SYSTEMS[system][1]
    command = [_python_of(system, args.envs), str(script), "--spec", str(spec_path)]
    env = {**os.environ, **extra_env}
    code, peak, wall = _run_process(command, spec_path.with_name("log.txt"), env)
    record = RunRecord(system, model, round_index, None, peak, wall)
    if code != 0:
        record.error = f"exit code {code}; see {spec_path.with_name('log.txt')}"
        return record
    result = json.loads(Path(spec.output).read_text())
    ends = result["step_ends"]
    intervals = [b - a for a, b in zip(ends, ends[1:])][args.warmup :]
    record.step_times = intervals
    record.notes = result["notes"]
    record.first_loss = result["losses"][0] if result["losses"] else None
    if intervals:
        record.tokens_per_sec = args.batch_size[model] * args.seq_len / statistics.median(intervals)
    return record


def _prepare(args) -> None:
    for env in sorted({SYSTEMS[s][0] for s in args.systems} - {"lit_tune"}):
        ensure_env(args.envs, env)
    command = [sys.executable, str(HERE / "prepare.py"), "--work-dir", str(args.work_dir), "--data", args.data,
               "--seq-len", str(args.seq_len),
               "--num-sequences", str(max(args.batch_size[m] * args.steps[m] for m in args.models)),
               *args.models]
    subprocess.run(command, check=True)
    if "litgpt" in args.systems:
        for model in args.models:
            spec = _spec("litgpt", model, args, 0)
            spec_path = Path(spec.output).with_name("spec.json")
            spec_path.write_text(json.dumps(asdict(spec)))
            command = [_python_of("litgpt", args.envs), str(HERE / "run_litgpt.py"), "--convert", "--spec", str(spec_path)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def summarize(records: list[RunRecord], systems: list[str], models: list[str]) -> list[dict]:
    """Median tokens/s and peak RSS per system and model, with spreads and ratios to lit_tune."""
    rows = []
    for model in models:
        base = None
        for system in systems:
            runs = [r for r in records if r.system == system and r.model == model and r.tokens_per_sec]
            if not runs:
                rows.append({"model": model, "system": system, "runs": 0})
                continue
            speeds = [r.tokens_per_sec for r in runs]
            peaks = [r.peak_rss_mib for r in runs]
            row = {
                "model": model,
                "system": system,
                "runs": len(runs),
                "tokens_per_sec": statistics.median(speeds),
                "tokens_per_sec_min": min(speeds),
                "tokens_per_sec_max": max(speeds),
                "peak_rss_mib": statistics.median(peaks),
                "first_loss": runs[0].first_loss,
                "notes": runs[0].notes,
            }
            if system == "lit_tune":
                base = row
            rows.append(row)
        for row in rows:
            if row["model"] == model and row.get("runs") and base:
                row["speed_vs_lit_tune"] = row["tokens_per_sec"] / base["tokens_per_sec"]
                row["memory_vs_lit_tune"] = row["peak_rss_mib"] / base["peak_rss_mib"]
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Render the summary as a Markdown table."""
    lines = [
        "| model | system | median tokens/s | range over rounds | vs lit_tune | peak RSS (MiB) | vs lit_tune | first loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if not row.get("runs"):
            lines.append(f"| {row['model']} | {row['system']} | failed | | | | | |")
            continue
        loss = f"{row['first_loss']:.4f}" if row["first_loss"] is not None else ""
        lines.append(
            f"| {row['model']} | {row['system']} | {row['tokens_per_sec']:.0f} | "
            f"{row['tokens_per_sec_min']:.0f}–{row['tokens_per_sec_max']:.0f} | "
            f"{row.get('speed_vs_lit_tune', float('nan')):.2f}× | {row['peak_rss_mib']:.0f} | "
            f"{row.get('memory_vs_lit_tune', float('nan')):.2f}× | {loss} |"
        )
    return "\n".join(lines)


def bar_chart(rows: list[dict], models: list[str], path: Path) -> None:
    """Draw median tokens/s (with the range over rounds) and peak RSS per system, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        done = [r for r in rows if r["model"] == model and r.get("runs")]
        names = [r["system"] for r in done]
        colors = ["tab:orange" if n.startswith("lit_tune") else "tab:blue" for n in names]
        speeds = [r["tokens_per_sec"] for r in done]
        errors = [[s - r["tokens_per_sec_min"] for s, r in zip(speeds, done)],
                  [r["tokens_per_sec_max"] - s for s, r in zip(speeds, done)]]
        axes[0][column].bar(names, speeds, yerr=errors, color=colors, capsize=4)
        axes[0][column].set_title(f"{model}: median tokens/s (higher is better)")
        axes[1][column].bar(names, [r["peak_rss_mib"] for r in done], color=colors)
        axes[1][column].set_title(f"{model}: peak RSS, MiB (lower is better)")
        for axis in (axes[0][column], axes[1][column]):
            axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _versions(args) -> dict:
    versions = {}
    for system in args.systems:
        code = f"import importlib.metadata as m; print(m.version({_VERSION_OF.get(system, 'lit-tune')!r}))"
        result = subprocess.run([_python_of(system, args.envs), "-c", code], capture_output=True, text=True)
        versions[system] = result.stdout.strip() or result.stderr.strip()[-200:]
    return versions


def _per_model(option: str, values: list[str], models: list[str]) -> dict[str, int]:
    """Read ``N`` (every model) or ``MODEL=N`` values of a per-model option."""
    counts = {}
    for value in values:
        name, _, count = value.rpartition("=")
        for model in [name] if name else models:
            counts[model] = int(count)
    missing = [m for m in models if m not in counts]
    if missing:
        raise SystemExit(f"{option} gives no value for {missing}; pass e.g. {option} 4 or {option} tiny=4 smollm2=1.")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="GSM8K-format training JSONL (question/answer)")
    parser.add_argument("--envs", type=Path, default=Path("/work/peer-envs"), help="folder of the peer environments")
    parser.add_argument("--work-dir", type=Path, default=Path("/work/bench-work"), help="models, tokens and run logs")
    parser.add_argument("--report-dir", type=Path, default=None, help="where results.json, table.md and chart.png go")
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), help=f"any of {list(SYSTEMS)}")
    parser.add_argument("--steps", nargs="+", default=["30"], help="optimizer steps per run: N or MODEL=N")
    parser.add_argument("--warmup", type=int, default=3, help="step intervals left out of the median")
    parser.add_argument("--repeats", nargs="+", default=["3"], help="rounds, each running every system once: N or MODEL=N")
    parser.add_argument("--batch-size", nargs="+", default=["4"], help="sequences per step: N or MODEL=N")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: all cores)")
    parser.add_argument(
        "--lit-tune-variant",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also run lit_tune from a source tree at PATH (put first on PYTHONPATH) as system NAME",
    )
    args = parser.parse_args(argv)
    args.steps = _per_model("--steps", args.steps, args.models)
    args.batch_size = _per_model("--batch-size", args.batch_size, args.models)
    args.repeats = _per_model("--repeats", args.repeats, args.models)
    args.report_dir = args.report_dir or args.work_dir / "report"
    args.variants = dict(v.split("=", 1) for v in args.lit_tune_variant)
    for name in args.variants:
        SYSTEMS[name] = SYSTEMS["lit_tune"]
        args.systems.append(name)
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"Unknown system(s) {unknown}; choose from {list(SYSTEMS)}.")
    return args


def main(argv: list[str] | None = None) -> None:
    """Prepare, run every round, and write the report."""
    args = parse_args(argv)
    _prepare(args)
    threads = str(args.threads or os.cpu_count())
    base_env = {"OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    records: list[RunRecord] = []
    load_before = os.getloadavg()
    for round_index in range(max(args.repeats.values())):
        for model in [m for m in args.models if round_index < args.repeats[m]]:
            for system in args.systems:
                extra = dict(base_env)
                if system in args.variants:
                    extra["PYTHONPATH"] = args.variants[system]
                record = run_once(system, model, args, round_index, extra)
                records.append(record)
                speed = f"{record.tokens_per_sec:.0f} tokens/s" if record.tokens_per_sec else record.error
                print(f"round {round_index} {model:8s} {system:14s} {speed}, peak {record.peak_rss_mib:.0f} MiB, "
                      f"{record.wall_s:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = summarize(records, args.systems, args.models)
    table = markdown_table(rows)
    print(table)
    args.report_dir.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
               "load_before": load_before, "load_after": os.getloadavg(), "python": platform.python_version()}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"settings": settings, "machine": machine, "versions": _versions(args), "summary": rows,
              "runs": [asdict(r) for r in records]}
    (args.report_dir / "results.json").write_text(json.dumps(report, indent=1))
    (args.report_dir / "table.md").write_text(table + "\n")
    bar_chart(rows, args.models, args.report_dir / "chart.png")


if __name__ == "__main__":
    main()
