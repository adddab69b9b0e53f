"""Hub names load from a local Hugging Face cache with the network off (``HF_HUB_OFFLINE=1``).

huggingface_hub reads its cache location when it is imported, so each load runs in a fresh
interpreter with ``HF_HUB_CACHE`` pointing at a cache laid out in ``tmp_path``.
"""

import os
import subprocess
import sys
import textwrap

import torch
from transformers import LlamaForCausalLM

from lit_tune.models import build_tiny_tokenizer, tiny_llama_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo_id, *, pickle_only=False):
    """Lay out ``repo_id`` in a hub cache as a download would, and return the saved model."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    model.save_pretrained(snapshot)
    if pickle_only:  # transformers 5 always writes safetensors, so convert by hand
        (snapshot / "model.safetensors").unlink()
        torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return model


def _load_offline(cache, repo_id, out):
    code = textwrap.dedent(f"""
        import torch
        from lit_tune.models import load_model, load_tokenizer
        tokenizer = load_tokenizer({repo_id!r})
        model = load_model({repo_id!r})
        ids = torch.tensor([tokenizer.encode("2+2=4")])
        torch.save(model(input_ids=ids).logits, {str(out)!r})
        print("pad", tokenizer.pad_token_id, "eos", tokenizer.eos_token_id)
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_name_loads_from_cache_offline(tmp_path):
    model = _cache_repo(tmp_path / "hub", "org/tiny-chat")
    result = _load_offline(tmp_path / "hub", "org/tiny-chat", tmp_path / "logits.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    ids = torch.tensor([build_tiny_tokenizer().encode("2+2=4")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)


def test_hub_repo_with_only_pickle_weights_is_rejected(tmp_path):
    _cache_repo(tmp_path / "hub", "org/pickled", pickle_only=True)
    result = _load_offline(tmp_path / "hub", "org/pickled", tmp_path / "logits.pt")
    assert result.returncode != 0
    assert "safetensors" in result.stderr
    assert not (tmp_path / "logits.pt").exists()


def test_unknown_hub_name_offline_says_no_local_path(tmp_path):
    (tmp_path / "hub").mkdir()
    result = _load_offline(tmp_path / "hub", "no_such_model", tmp_path / "logits.pt")
    assert result.returncode != 0
    assert "'no_such_model' is not a local folder, a .gguf file or 'tiny'" in result.stderr
    assert "./no_such_model" in result.stderr
