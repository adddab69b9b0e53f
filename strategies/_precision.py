"""Mixed precision and CPU offload for FSDP2Strategy, from the Trainer's ``precision`` flag."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy


class FSDP2MixedPrecision(Precision):
    """``precision="bf16-mixed"`` under FSDP2Strategy.

    FSDP2's ``MixedPrecisionPolicy`` casts the parameters to bf16 for forward and backward and
    reduces gradients in fp32, so this plugin adds no ``torch.autocast`` on top.
    """

    precision: Literal["bf16-mixed"] = "bf16-mixed"


def adopt_precision_plugin(plugin: Precision) -> Precision:
    """Return the plugin FSDP2Strategy uses in place of ``plugin``.

    Lightning's autocast plugin for ``"bf16-mixed"`` becomes :class:`FSDP2MixedPrecision`. The
    plugins for ``"32-true"`` and ``"bf16-true"`` are kept.

    Raises:
        ValueError: If ``plugin`` is an autocast plugin for a dtype other than bf16.
    """
    if not isinstance(plugin, MixedPrecision):
        return plugin
    if plugin.precision != "bf16-mixed":
        raise ValueError(
            f"FSDP2Strategy received precision={plugin.precision!r}, but its mixed precision "
            "supports only bf16. Use '32-true', 'bf16-mixed' or 'bf16-true'."
        )
    return FSDP2MixedPrecision()


def mixed_precision_policy(plugin: Precision) -> MixedPrecisionPolicy:
    """Return the FSDP2 policy: bf16 parameters with fp32 reduction for ``"bf16-mixed"``."""
    if isinstance(plugin, FSDP2MixedPrecision):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def offload_policy(cpu_offload: bool, device: torch.device) -> OffloadPolicy:
    """Return FSDP2's offload policy for ``cpu_offload`` when training on ``device``."""
    if not cpu_offload:
        return OffloadPolicy()
    # Pinned memory needs an accelerator. On a CPU-only run the shards are in CPU memory anyway,
    # so they stay unpinned.
    return CPUOffloadPolicy(pin_memory=device.type != "cpu")
