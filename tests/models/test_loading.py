"""Model and tokenizer sources, and the errors for bad ones."""

import pytest
import torch
from transformers import LlamaForCausalLM

from lit_tune.models import (
    build_tiny_tokenizer,
    load_model,
    load_tokenizer,
    resolve_source,
    tiny_llama_config,
)
from lit_tune.modules import SFTModule


@pytest.fixture
def saved_folder(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model", model


def test_missing_local_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Local model path .*does not exist"):
        SFTModule(model=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source("./no/such/model")


def test_hub_names_resolve_as_hub():
    assert resolve_source("org/model").kind == "hub"
    assert resolve_source("tiny").kind == "tiny"


def test_local_folder_loads_same_weights(saved_folder):
    folder, model = saved_folder
    loaded = load_model(str(folder))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_pickle_only_folder_refused_unless_allowed(saved_folder):
    folder, model = saved_folder
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickle weights .* set allow_pickle=True"):
        load_model(str(folder))
    loaded = load_model(str(folder), allow_pickle=True)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_folder_without_config_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))


def test_tokenizer_larger_than_embedding_is_an_error(saved_folder, tmp_path):
    folder, _ = saved_folder
    small = LlamaForCausalLM(tiny_llama_config(64))
    small.save_pretrained(tmp_path / "small")
    module = SFTModule(model=str(tmp_path / "small"), tokenizer=str(folder))
    with pytest.raises(ValueError, match=r"tokenizer has 263 tokens but the model's embedding has only 64 rows"):
        module.configure_model()


def test_missing_pad_token_uses_eos(saved_folder):
    folder, _ = saved_folder
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    loaded = load_tokenizer(str(folder))
    assert loaded.pad_token_id == loaded.eos_token_id
    assert loaded.chat_template  # lit_tune's default template
