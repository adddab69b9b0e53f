"""Time forward and backward of one Llama decoder layer with each candidate fused replacement.

Builds one transformers ``LlamaDecoderLayer`` (random weights, fp32, SDPA attention) at the
``tiny`` shape and at the SmolLM2-135M shape, and times forward plus backward on a
``[batch, seq_len, hidden]`` input for:

- ``plain``: the transformers modules;
- ``swiglu``: lit_tune's :class:`~lit_tune.models.fused.FusedSwiGLUMLP`;
- ``rms_norm``, ``gate_up``, ``rope``, ``qkv``: candidates that lit_tune did not keep, defined
  here so that the measurement can be repeated;
- ``compile``: the plain layer through ``torch.compile`` (with ``--compile``; needs a C++
  compiler, and the first call's compile time is printed).

The variants take turns within each round, so a change in machine load hits all of them alike.
Each figure is the median over rounds of wall time and of process CPU time (user plus system, all
threads), next to the bytes of activations the layer saves for backward.

    python benchmarks/bench_fused_kernels.py --threads 1 2 --rounds 15
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from lit_tune.models.fused import fuse_llama_modules

SHAPES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 2},
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3},
}


class _RMSNormFunctional(LlamaRMSNorm):
    def forward(self, hidden_states: Tensor) -> Tensor:
        return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


class _GateUpMLP(LlamaMLP):
    def forward(self, x: Tensor) -> Tensor:
        # Autograd saves the concatenated weight for backward, so each layer keeps one more weight copy.
        gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _rotate(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    # x * cos + rotate_half(x) * sin, because rotate_half(x) * sin == roll(x, d / 2) * sin_signed.
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), sin_signed)


class _RopeAttention(LlamaAttention):
    def _project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        return query, key, value

    def forward(self, hidden_states: Tensor, position_embeddings: tuple, attention_mask=None, **kwargs):
        batch, seq_len, _ = hidden_states.shape
        query, key, value = self._project(hidden_states)  # [batch, heads, seq_len, head_dim] each
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        half = self.head_dim // 2
        sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        query, key = _rotate(query, cos, sin_signed), _rotate(key, cos, sin_signed)
        output, _ = sdpa_attention_forward(self, query, key, value, attention_mask, scaling=self.scaling)
        return self.o_proj(output.reshape(batch, seq_len, -1)), None


class _QKVAttention(_RopeAttention):
    def _project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq_len, _ = hidden_states.shape
        heads, kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        qkv = F.linear(hidden_states, weight).view(batch, seq_len, heads + 2 * kv_heads, self.head_dim)
        return qkv.transpose(1, 2).split((heads, kv_heads, kv_heads), dim=1)


_CANDIDATES = {
    "rms_norm": (LlamaRMSNorm, _RMSNormFunctional),
    "gate_up": (LlamaMLP, _GateUpMLP),
    "rope": (LlamaAttention, _RopeAttention),
    "qkv": (LlamaAttention, _QKVAttention),
}


def _swap(layer: LlamaDecoderLayer, plain: type, replacement: type) -> LlamaDecoderLayer:
    for module in layer.modules():
        if type(module) is plain:
            module.__class__ = replacement
    return layer


def _layer_config(shape: str) -> LlamaConfig:
    config = LlamaConfig(vocab_size=320, num_hidden_layers=1, max_position_embeddings=2048, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    return config


def _variants(config: LlamaConfig, with_compile: bool) -> dict[str, LlamaDecoderLayer]:
    torch.manual_seed(0)
    plain = LlamaDecoderLayer(config, layer_idx=0)
    swiglu = copy.deepcopy(plain)
    fuse_llama_modules(swiglu)
    variants = {"plain": plain, "swiglu": swiglu}
    for name, (base, replacement) in _CANDIDATES.items():
        variants[name] = _swap(copy.deepcopy(plain), base, replacement)
    if with_compile:
        variants["compile"] = copy.deepcopy(plain)
        variants["compile"].compile()
    return variants


def _step_seconds(layer: LlamaDecoderLayer, hidden: Tensor, position_embeddings: tuple) -> tuple[float, float]:
    # Process CPU time next to wall time, because on a shared machine the wall time also counts
    # the time other processes held the core.
    wall, cpu = time.perf_counter(), time.process_time()
    output = layer(hidden, position_embeddings=position_embeddings)
    output.sum().backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    layer.zero_grad(set_to_none=True)
    hidden.grad = None
    return wall, cpu


def _saved_bytes(layer: LlamaDecoderLayer, hidden: Tensor, position_embeddings: tuple) -> int:
    """Bytes of the distinct tensors that autograd saves for backward in one forward pass."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = layer(hidden, position_embeddings=position_embeddings)
    output.sum().backward()
    layer.zero_grad(set_to_none=True)
    hidden.grad = None
    return sum(storages.values())


def bench_shape(shape: str, batch: int, seq_len: int, rounds: int, with_compile: bool) -> dict[str, dict[str, float]]:
    """Return median wall and CPU milliseconds and saved bytes of each variant at ``shape``."""
    config = _layer_config(shape)
    variants = _variants(config, with_compile)
    hidden = torch.randn(batch, seq_len, config.hidden_size, requires_grad=True)
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(batch, -1)
    position_embeddings = LlamaRotaryEmbedding(config)(hidden, position_ids)
    if with_compile:
        start = time.perf_counter()
        _step_seconds(variants["compile"], hidden, position_embeddings)
        print(f"  {shape}: first compiled forward and backward took {time.perf_counter() - start:.1f} s")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for round_index in range(rounds + 2):
        for name, layer in variants.items():
            seconds = _step_seconds(layer, hidden, position_embeddings)
            if round_index >= 2:  # the first two rounds warm up the allocator and kernels
                times[name].append(seconds)
    return {
        name: {
            "wall_ms": 1000 * statistics.median(wall for wall, _ in values),
            "cpu_ms": 1000 * statistics.median(cpu for _, cpu in values),
            "saved_mib": _saved_bytes(variants[name], hidden, position_embeddings) / 2**20,
        }
        for name, values in times.items()
    }


def main() -> None:
    """Run every shape and thread count, and print a JSON line and a table for each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per input")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds after two warm-up rounds")
    parser.add_argument("--compile", action="store_true", help="also time the plain layer under torch.compile")
    args = parser.parse_args()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape in args.shapes:
            result = bench_shape(shape, args.batch_size, args.seq_len, args.rounds, args.compile)
            setting = {"shape": shape, "threads": threads, "batch_size": args.batch_size, "seq_len": args.seq_len}
            print(json.dumps({**setting, "result": result}))
            plain = result["plain"]
            for name, figures in result.items():
                print(
                    f"  {shape:8s} threads={threads} {name:9s} "
                    f"wall {figures['wall_ms']:8.2f} ms ({plain['wall_ms'] / figures['wall_ms']:5.3f}x)  "
                    f"CPU {figures['cpu_ms']:8.2f} ms ({plain['cpu_ms'] / figures['cpu_ms']:5.3f}x)  "
                    f"saved {figures['saved_mib']:6.1f} MiB"
                )


if __name__ == "__main__":
    main()
