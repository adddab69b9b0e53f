"""Memory and time of OptimizerInBackward and ActivationCheckpointing on a 125M-parameter Llama on CPU.

One run starts four fresh processes on the same model and batch. Three train a few steps with a
real ``lightning.Trainer`` and measure memory: ordinary fp32 AdamW, AdamW with
``OptimizerInBackward``, and AdamW with ``ActivationCheckpointing`` on every decoder layer. The
fourth times forward and backward passes of the model with and without checkpointing, in
alternating pairs so that a change in machine load hits both alike. It prints the measured
ratios next to the expected ones::

    python benchmarks/bench_callbacks.py              # defaults: 12 layers, batch 2 x 256 tokens
    python benchmarks/bench_callbacks.py --layers 4   # quicker, about 68M parameters

Memory is the resident set size (RSS) of the process, read from ``/proc/self/status``. Before
each step the peak (VmHWM) is reset through ``/proc/self/clear_refs``, so the peak of every step
is read on its own. glibc's mmap threshold is fixed at 64 KiB, so freed tensors go back to the
operating system at once. Linux only.

Memory figures, from the last training step (the first step creates the optimizer state):

- training memory: the step's peak RSS minus the RSS before the model was built.
- activations: RSS right after the forward pass minus RSS at the start of the step.
- step peak above start: the step's peak RSS minus the RSS at the start of the step.

Expected values: fp32 AdamW holds parameters P, gradients G = P and state S = 2P. Lightning keeps
the previous step's gradients until the next backward pass, so the ordinary step peaks near
P + G + S + A, with A the activations, and the step in backward near P + S + A. Checkpointing
keeps only the tensors saved outside the recomputed layers, counted here with saved-tensor hooks.
Its extra work is one more forward pass of the decoder layers, estimated from their share of the
forward FLOPs, with a backward pass costing about two forward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MEMORY_CONFIGS = ("ordinary", "in_backward", "checkpointing")
VOCAB, HIDDEN = 32000, 768


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _build_llama(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2048,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def _memory_worker(args: argparse.Namespace) -> dict:
    """Train ``args.steps`` steps with one configuration and return the measurements."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lit_tune.callbacks import ActivationCheckpointing, OptimizerInBackward

    torch.manual_seed(0)
    baseline_kib = _rss_kib("VmRSS")
    records: list[dict[str, float]] = []

    class Measured(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _build_llama(args)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            loss = self.model(input_ids=ids, labels=ids).loss
            records[-1]["after_forward_kib"] = _rss_kib("VmRSS")
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4, weight_decay=0.1)

    class StepMemory(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _reset_peak()
            records.append({"start_kib": _rss_kib("VmRSS"), "start_time": time.perf_counter()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            records[-1]["peak_kib"] = _rss_kib("VmHWM")
            records[-1]["seconds"] = time.perf_counter() - records[-1].pop("start_time")

    module = Measured()
    callbacks: list[L.Callback] = [StepMemory()]
    if args.worker == "in_backward":
        callbacks.append(OptimizerInBackward())
    if args.worker == "checkpointing":
        callbacks.append(ActivationCheckpointing())
    ids = torch.randint(0, VOCAB, (args.batch_size * args.steps, args.seq_len))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=args.batch_size))

    sizes = [p.numel() * p.element_size() for p in module.parameters()]
    return {
        "baseline_kib": baseline_kib,
        "param_bytes": sum(sizes),
        "largest_param_bytes": max(sizes),
        "saved_bytes": _saved_bytes(module.model, ids[: args.batch_size]),
        "steps": records,
        "threads": torch.get_num_threads(),
    }


def _saved_bytes(model, ids) -> int:
    """Bytes of non-parameter tensors that one forward pass saves for backward (counted once)."""
    import torch

    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = tensor._base if tensor._base is not None else tensor
        storage = tensor.untyped_storage()
        if not isinstance(base, torch.nn.Parameter) and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return total


def _timing_worker(args: argparse.Namespace) -> dict:
    """Time forward and backward with and without checkpointing, alternating which goes first."""
    import copy

    import torch

    from lit_tune.callbacks import ActivationCheckpointing

    torch.manual_seed(0)
    plain = _build_llama(args)
    checkpointed = copy.deepcopy(plain)
    ActivationCheckpointing().apply(checkpointed)
    ids = torch.randint(0, VOCAB, (args.batch_size, args.seq_len))

    def seconds(model) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        return time.perf_counter() - start

    seconds(plain), seconds(checkpointed)  # warm-up
    pairs = []
    for round_index in range(args.time_pairs):
        if round_index % 2 == 0:
            plain_s, checkpointed_s = seconds(plain), seconds(checkpointed)
        else:
            checkpointed_s, plain_s = seconds(checkpointed), seconds(plain)
        pairs.append({"plain": plain_s, "checkpointed": checkpointed_s})
    return {"pairs": pairs}


def _run_worker(config: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", config, "--layers", str(args.layers)]
    command += ["--steps", str(args.steps), "--time-pairs", str(args.time_pairs)]
    command += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    # A fixed mmap threshold makes glibc return every freed tensor of 64 KiB or more at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _decoder_flop_share(args: argparse.Namespace, param_bytes: int) -> float:
    """Share of the forward FLOPs spent in the decoder layers (matmuls and attention scores)."""
    head_params = 2 * VOCAB * HIDDEN  # embedding (no FLOPs) and output head
    layer_params = param_bytes // 4 - head_params
    layer_flops = 2 * layer_params + args.layers * 4 * args.seq_len * HIDDEN
    head_flops = 2 * VOCAB * HIDDEN
    return layer_flops / (layer_flops + head_flops)


def _summarise(
    results: dict[str, dict], args: argparse.Namespace
) -> list[tuple[str, float, float]]:
    """Return (label, measured, expected) rows; expected is NaN where there is no estimate."""
    last = {name: results[name]["steps"][-1] for name in MEMORY_CONFIGS}
    ordinary = results["ordinary"]

    def training_kib(name: str) -> float:
        return last[name]["peak_kib"] - results[name]["baseline_kib"]

    def activation_kib(name: str) -> float:
        return last[name]["after_forward_kib"] - last[name]["start_kib"]

    def step_increase_kib(name: str) -> float:
        return last[name]["peak_kib"] - last[name]["start_kib"]

    params_kib = ordinary["param_bytes"] / 1024
    largest_kib = ordinary["largest_param_bytes"] / 1024
    activations = activation_kib("ordinary")
    expected_memory = (3 * params_kib + activations) / (4 * params_kib + activations)
    # The output head, the largest parameter, steps first in backward, while the activations are
    # still held: its gradient and the two temporaries of a single-tensor AdamW step (sqrt, then
    # division) are alive together. The ordinary step makes them after backward, when the
    # activations are gone.
    in_flight_kib = 3 * params_kib + activations + 3 * largest_kib
    saved_ratio = results["checkpointing"]["saved_bytes"] / ordinary["saved_bytes"]
    time_ratios = [pair["checkpointed"] / pair["plain"] for pair in results["timing"]["pairs"]]
    expected_time = 1 + _decoder_flop_share(args, ordinary["param_bytes"]) / 3
    mib = 1024
    return [
        ("ordinary: training memory (P+G+S+A), MiB", training_kib("ordinary") / mib, (4 * params_kib + activations) / mib),
        ("in backward: training memory (P+S+A), MiB", training_kib("in_backward") / mib, (3 * params_kib + activations) / mib),
        ("in backward: same, plus head gradient and 2 temporaries", training_kib("in_backward") / mib, in_flight_kib / mib),
        ("in backward / ordinary: training memory", training_kib("in_backward") / training_kib("ordinary"), expected_memory),
        ("checkpointing / ordinary: activations after forward", activation_kib("checkpointing") / activations, saved_ratio),
        ("checkpointing / ordinary: step peak above start", step_increase_kib("checkpointing") / step_increase_kib("ordinary"), float("nan")),
        ("checkpointing / plain: forward+backward time (median)", statistics.median(time_ratios), expected_time),
    ]  # fmt: skip


def _print_report(results: dict[str, dict], args: argparse.Namespace, load: list[float]) -> None:
    ordinary = results["ordinary"]
    print(
        f"parameters: {ordinary['param_bytes'] / 4 / 1e6:.1f}M fp32 (largest"
        f" {ordinary['largest_param_bytes'] / 2**20:.0f} MiB), batch {args.batch_size} x"
        f" {args.seq_len} tokens, {ordinary['threads']} threads, 1-minute load average"
        f" {load[0]:.1f} at start and {load[1]:.1f} at end on {os.cpu_count()} CPUs"
    )
    header = f"{'config':<14}{'training MiB':>14}{'activations MiB':>17}"
    print(header + f"{'step peak above start MiB':>27}{'last step s':>13}")
    for name in MEMORY_CONFIGS:
        step = results[name]["steps"][-1]
        training = (step["peak_kib"] - results[name]["baseline_kib"]) / 1024
        activations = (step["after_forward_kib"] - step["start_kib"]) / 1024
        increase = (step["peak_kib"] - step["start_kib"]) / 1024
        print(
            f"{name:<14}{training:>14.0f}{activations:>17.0f}{increase:>27.0f}{step['seconds']:>13.1f}"
        )
    pairs = results["timing"]["pairs"]
    print("forward+backward seconds, plain / checkpointed:", ", ".join(f"{p['plain']:.1f}/{p['checkpointed']:.1f}" for p in pairs))  # fmt: skip
    print(f"\n{'figure':<58}{'measured':>10}{'expected':>10}")
    for label, measured, expected in _summarise(results, args):
        expected_text = "n/a" if expected != expected else f"{expected:.3f}"
        print(f"{label:<58}{measured:>10.3f}{expected_text:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers", type=int, default=12, help="decoder layers (12 gives 125M parameters)"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="training steps per memory run (at least 2)"
    )
    parser.add_argument(
        "--time-pairs", type=int, default=3, help="timed pairs of forward+backward passes"
    )
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument(
        "--worker",
        choices=(*MEMORY_CONFIGS, "timing"),
        help="internal: run one measurement in this process",
    )
    args = parser.parse_args()

    if args.steps < 2:
        parser.error(f"--steps must be at least 2, got {args.steps}: the first step creates the optimizer state.")  # fmt: skip

    # In a worker process: measure one configuration and print it for the parent.
    if args.worker == "timing":
        print("RESULT " + json.dumps(_timing_worker(args)))
        return
    if args.worker:
        print("RESULT " + json.dumps(_memory_worker(args)))
        return

    load_start = os.getloadavg()[0]
    results = {config: _run_worker(config, args) for config in (*MEMORY_CONFIGS, "timing")}
    _print_report(results, args, [load_start, os.getloadavg()[0]])
    if os.environ.get("BENCH_CALLBACKS_JSON"):
        Path(os.environ["BENCH_CALLBACKS_JSON"]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
