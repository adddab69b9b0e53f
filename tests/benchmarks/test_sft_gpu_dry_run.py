"""The GPU benchmark script, run end to end on the CPU with tiny shapes (``--dry-run``)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.benchmarks._scripts import load_script

sft_gpu = load_script("gpu/sft_gpu.py")


def test_dry_run_measures_every_model_and_variant(tmp_path):
    output = tmp_path / "results.json"
    results = sft_gpu.main(["--dry-run", "--steps", "3", "--peak-tflops", "1", "--output", str(output)])

    expected = {(model, variant) for model in sft_gpu.SHAPES for variant in sft_gpu.VARIANTS}
    assert {(r.model, r.variant) for r in results} == expected
    for result in results:
        where = f"{result.model}/{result.variant}"
        assert result.note is None, where
        assert result.source == "random init from config", where
        assert result.tokens_per_sec is not None and result.tokens_per_sec > 0, where
        assert len(result.step_times) == 1, where  # 3 steps give 2 intervals, 1 left after warm-up
        assert result.mfu is not None and 0 < result.mfu < 1, where
        assert result.peak_memory_gib > 0, where
    report = json.loads(output.read_text())
    assert report["dry_run"] is True
    assert report["hardware"] == "cpu"
    assert len(report["results"]) == len(expected)


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_counts_matrix_parameters(tied):
    shape = sft_gpu.SHAPES["llama-1b"].shrunk()
    config = dataclasses.replace(shape, tied=tied).config()
    model = AutoModelForCausalLM.from_config(config)
    seq_len = 32

    # Per layer, q and o are hidden x hidden and k and v are hidden x (kv_heads * head_dim). The
    # MLP has three hidden x intermediate matrices, and there are two norms. The model adds the
    # final norm and the head (vocab x hidden).
    head_dim = shape.hidden // shape.heads
    attention = 2 * shape.hidden**2 + 2 * shape.hidden * shape.kv_heads * head_dim
    per_layer = attention + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden
    matrix_params = shape.layers * per_layer + shape.hidden + shape.vocab * shape.hidden
    expected = 6 * matrix_params + 12 * shape.layers * shape.hidden * seq_len

    flops = sft_gpu.model_flops_per_token(model, config, seq_len)
    assert math.isclose(flops, expected, rel_tol=1e-12)
    total = sum(p.numel() for p in model.parameters())
    assert total == matrix_params + (0 if tied else shape.vocab * shape.hidden)


def test_real_run_needs_a_gpu_or_dry_run():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        sft_gpu.parse_args([])
