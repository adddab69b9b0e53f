"""Model and tokenizer loading, the built-in ``tiny`` preset, and Hugging Face export."""

from lit_tune.models.compile_layers import compile_decoder_layers, find_cxx_compiler
from lit_tune.models.export import export_hf, find_pretrained_model, full_state_dict
from lit_tune.models.fused import FusedSwiGLUMLP, fuse_llama_modules
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
    "FusedSwiGLUMLP",
    "ModelSource",
    "TINY",
    "build_tiny_tokenizer",
    "check_weight_files",
    "compile_decoder_layers",
    "default_chat_template",
    "export_hf",
    "find_cxx_compiler",
    "find_pretrained_model",
    "full_state_dict",
    "fuse_llama_modules",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve_source",
    "tiny_llama_config",
]
