"""Fused replacements for transformers' Llama modules, swapped in after loading.

:func:`fuse_llama_modules` changes the class of each ``LlamaMLP`` in place to
:class:`FusedSwiGLUMLP`, which computes the same function with less memory. Parameters, buffers
and state-dict keys stay as they are, so checkpoints, exports, optimizers and sharding see the
plain model.

Only the SwiGLU activation is replaced, because it was the only candidate with a measured gain
on the CPU: less activation memory at the same speed. ``benchmarks/bench_fused_kernels.py`` times the others (RMSNorm through
``torch.nn.functional.rms_norm``, one matrix multiplication for gate and up or for query, key and
value, a rotary embedding in fewer operations), and ``docs/benchmarks.md`` gives the figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaMLP


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up`` that saves only its two inputs and recomputes the SiLU in backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        # silu_backward is the kernel autograd uses for F.silu. The recomputed SiLU
        # buffer then becomes the gradient of up, in place.
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        grad_up = F.silu(gate).mul_(grad)
        return grad_gate, grad_up


class FusedSwiGLUMLP(LlamaMLP):
    """``LlamaMLP`` whose ``silu(gate) * up`` is one autograd node.

    The plain module keeps four ``[tokens, intermediate_size]`` activations for backward: the gate
    projection, its SiLU, the up projection and their product. This one keeps three, because
    backward recomputes the SiLU from the gate projection. Loss and gradients match the plain
    module to 1e-5 in fp32 (``tests/models/test_fused.py``). Inputs of other dtypes, and models
    whose ``hidden_act`` is not ``"silu"``, run the plain module's forward unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Apply ``down(silu(gate(x)) * up(x))`` to ``x`` ``[..., hidden_size]``."""
        if x.dtype != torch.float32 or self.config.hidden_act != "silu":
            return super().forward(x)
        return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_llama_modules(model: nn.Module) -> int:
    """Swap :class:`FusedSwiGLUMLP` into every ``LlamaMLP`` of ``model``, in place.

    Only modules whose class is exactly transformers' ``LlamaMLP`` change, so other architectures,
    subclasses with their own forward and already fused modules are left alone.

    Args:
        model: Any module, typically a ``LlamaForCausalLM``; it may be on the meta device.

    Returns:
        The number of modules replaced.
    """
    replaced = 0
    for module in model.modules():
        if type(module) is LlamaMLP:
            module.__class__ = FusedSwiGLUMLP
            replaced += 1
    return replaced


__all__ = ["FusedSwiGLUMLP", "fuse_llama_modules"]
