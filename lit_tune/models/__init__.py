"""Model and tokenizer loading, the built-in ``tiny`` preset, and Hugging Face export."""

from lit_tune.models.export import export_hf, find_pretrained_model, full_state_dict
from lit_tune.models.loading import (
    TINY,
    ModelSource,
    check_weight_files,
    load_config,
    load_model,
    load_tokenizer,
    resolve_source,
)
from lit_tune.models.tiny import build_tiny_tokenizer, default_chat_template, tiny_llama_config

__all__ = [
    "ModelSource",
    "TINY",
    "build_tiny_tokenizer",
    "check_weight_files",
    "default_chat_template",
    "export_hf",
    "find_pretrained_model",
    "full_state_dict",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve_source",
    "tiny_llama_config",
]
