"""Compile a transformers model's decoder layers with ``torch.compile``, one layer at a time."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

_CXX_COMPILERS = ("g++", "c++", "clang++")


def find_cxx_compiler() -> str | None:
    """Return the path of the C++ compiler TorchInductor can use (``$CXX`` first), or None."""
    for name in (os.environ.get("CXX"), *_CXX_COMPILERS):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def compile_decoder_layers(model: nn.Module, strategy: Any = None) -> int:
    """Compile each decoder layer of ``model`` in place with ``nn.Module.compile``.

    Decoder layers are the modules whose class is named in the model's ``_no_split_modules``, as
    for FSDP wrapping. Compiling per layer keeps the graphs small, and identical layers share one
    compiled graph. The first forward and backward pay the compile time (measured on a 2-core
    CPU in ``docs/benchmarks.md``).

    NOTE: an ``ActivationCheckpointing`` callback applied later wraps the compiled layers, so
    recomputation in backward runs the compiled forward. No test covers this combination.

    Args:
        model: A transformers ``PreTrainedModel``, or any module with ``_no_split_modules``.
        strategy: The trainer's strategy, or None when there is no trainer.

    Returns:
        The number of layers compiled.

    Raises:
        ValueError: Under ``ModelParallelStrategy`` (and so ``FSDP2Strategy``) or ``FSDPStrategy``,
            because they shard the layers after ``configure_model``. Also when the model names no
            decoder layer class, or none of its modules has one.
        RuntimeError: When no C++ compiler is found.
    """
    if isinstance(strategy, (ModelParallelStrategy, FSDPStrategy)):
        raise ValueError(
            f"compile=True is not supported under {type(strategy).__name__}: the strategy shards the "
            "decoder layers after configure_model, and compiling before sharding is the wrong order. "
            "Set compile=False, or train on a single device or with DDP."
        )
    if find_cxx_compiler() is None:
        raise RuntimeError(
            f"compile=True needs a C++ compiler for TorchInductor, but none of $CXX or {list(_CXX_COMPILERS)} "
            "was found on PATH. Install one (for example g++), or set compile=False."
        )
    class_names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in class_names]
    if not layers:
        raise ValueError(
            f"compile=True found no decoder layer in {type(model).__name__}: its _no_split_modules is "
            f"{sorted(class_names)}. Compile the model yourself in build_model, or set compile=False."
        )
    start = time.perf_counter()
    for layer in layers:
        layer.compile()
    rank_zero_info(
        f"Compiling {len(layers)} decoder layers with torch.compile ({time.perf_counter() - start:.1f} s to wrap; "
        "the first training step compiles them)."
    )
    return len(layers)


__all__ = ["compile_decoder_layers", "find_cxx_compiler"]
