"""Load causal LMs and tokenizers from the ``tiny`` preset, a local folder, a GGUF file or the hub.

A *source* string is resolved in this order:

1. ``"tiny"``: the built-in preset (:mod:`lit_tune.models.tiny`), randomly initialised.
2. An existing local path: a Hugging Face folder (``config.json`` plus safetensors weights), or a
   ``.gguf`` file, which transformers dequantises into an ordinary fp32 model (needs the ``gguf``
   package).
3. Anything that looks like a path (starts with ``.``, ``/`` or ``~``, or ends with ``.gguf``)
   but does not exist is an error, never a hub lookup.
4. Otherwise a hub name such as ``org/model``, which needs network access.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_tune.models.tiny import build_tiny_tokenizer, default_chat_template, tiny_llama_config

log = logging.getLogger(__name__)

TINY = "tiny"
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source.

    Attributes:
        kind: ``"tiny"``, ``"folder"``, ``"gguf"`` or ``"hub"``.
        location: Folder path, hub name, or ``"tiny"``.
        gguf_file: File name inside ``location`` for ``kind == "gguf"``.
    """

    kind: str
    location: str
    gguf_file: str | None = None


def resolve_source(source: str) -> ModelSource:
    """Resolve a model or tokenizer source string (see the module docstring).

    Args:
        source: ``"tiny"``, a local folder, a local ``.gguf`` file, or a hub name.

    Raises:
        FileNotFoundError: If ``source`` looks like a local path that does not exist.
    """
    if source == TINY:
        return ModelSource(TINY, TINY)
    path = Path(source).expanduser()
    if path.is_dir():
        return ModelSource("folder", str(path))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent), path.name)
    if path.exists():
        raise FileNotFoundError(
            f"Model source {source!r} is a file but not a .gguf file. Pass a Hugging Face folder "
            "(config.json and *.safetensors), a .gguf file, 'tiny', or a hub name."
        )
    if source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") > 1:
        raise FileNotFoundError(
            f"Local model path {source!r} does not exist (resolved to {path.resolve()}). "
            "Check the path, or pass 'tiny' for the built-in preset."
        )
    return ModelSource("hub", source)


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make it ready for training.

    A tokenizer with no pad token gets its EOS token as pad token (labels never depend on the pad
    id, so this is safe); one with no chat template gets
    :func:`~lit_tune.models.tiny.default_chat_template`. Both choices are logged.

    Args:
        source: See :func:`resolve_source`.
        trust_remote_code: Allow tokenizer code from the source folder or repository to run.

    Raises:
        ValueError: If the tokenizer has neither a pad nor an EOS token.
    """
    resolved = resolve_source(source)
    if resolved.kind == TINY:
        return build_tiny_tokenizer()
    kwargs = {"trust_remote_code": trust_remote_code}
    if resolved.kind == "gguf":
        kwargs["gguf_file"] = resolved.gguf_file
    with _hub_errors(resolved):
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
    _complete_tokenizer(tokenizer, source)
    return tokenizer


def _complete_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"Tokenizer from {source!r} has no EOS token, so responses cannot be terminated. "
            "Set `eos_token` in its tokenizer_config.json."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("Tokenizer from %r has no pad token; using EOS %r as pad.", source, tokenizer.eos_token)
    if not tokenizer.chat_template:
        tokenizer.chat_template = default_chat_template()
        log.info("Tokenizer from %r has no chat template; using lit_tune's default.", source)
    tokenizer.padding_side = "right"


def load_config(
    source: str, *, vocab_size: int | None = None, trust_remote_code: bool = False
) -> PretrainedConfig:
    """Load the model configuration of ``source``.

    Args:
        source: See :func:`resolve_source`.
        vocab_size: Vocabulary for the ``tiny`` preset; ignored for other sources.
        trust_remote_code: Allow configuration code from the source to run.
    """
    resolved = resolve_source(source)
    if resolved.kind == TINY:
        return tiny_llama_config(vocab_size or len(build_tiny_tokenizer()))
    kwargs = {"trust_remote_code": trust_remote_code}
    if resolved.kind == "gguf":
        kwargs["gguf_file"] = resolved.gguf_file
    with _hub_errors(resolved):
        return AutoConfig.from_pretrained(resolved.location, **kwargs)


def check_weight_files(folder: str, *, allow_pickle: bool) -> None:
    """Raise if ``folder`` holds only pickle weights and ``allow_pickle`` is off.

    Args:
        folder: A local Hugging Face model folder.
        allow_pickle: Whether ``pytorch_model.bin`` files may be loaded (they can run code).

    Raises:
        FileNotFoundError: If the folder has no ``config.json`` or no weights at all.
        ValueError: If only pickle weights exist and ``allow_pickle`` is False.
    """
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder!r} has no config.json, so it is not a Hugging Face model folder. "
            "Export one with `save_pretrained`, or pass a .gguf file."
        )
    names = {p.name for p in path.iterdir()}
    has_safetensors = any(n in names for n in _SAFETENSORS_WEIGHTS) or any(
        n.endswith(".safetensors") for n in names
    )
    if has_safetensors:
        return
    if any(n in names for n in _PICKLE_WEIGHTS):
        if allow_pickle:
            log.warning("Loading pickle weights from %r because allow_pickle=True.", folder)
            return
        raise ValueError(
            f"{folder!r} holds only pickle weights (pytorch_model.bin), which can run arbitrary "
            "code when loaded. Convert them to safetensors, or set allow_pickle=True if you "
            "trust the source."
        )
    raise FileNotFoundError(f"{folder!r} has no model weights (*.safetensors or pytorch_model.bin).")


def load_model(
    source: str,
    *,
    vocab_size: int | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    weights: bool = True,
) -> PreTrainedModel:
    """Build a causal LM from ``source``.

    Args:
        source: See :func:`resolve_source`.
        vocab_size: Vocabulary for the ``tiny`` preset.
        allow_pickle: Allow ``pytorch_model.bin`` weights from a local folder.
        trust_remote_code: Allow modelling code from the source to run.
        attn_implementation: Attention kernel, e.g. ``"sdpa"`` or ``"eager"``.
        dtype: Parameter dtype.
        weights: If False, build the architecture from the config only (random or meta init);
            the caller loads weights later (used for meta-device init under a sharding strategy).

    Returns:
        A ``PreTrainedModel`` whose forward returns ``.logits`` of shape ``[batch, seq, vocab]``.
    """
    resolved = resolve_source(source)
    if resolved.kind == TINY or not weights:
        config = load_config(source, vocab_size=vocab_size, trust_remote_code=trust_remote_code)
        return AutoModelForCausalLM.from_config(
            config,
            attn_implementation=attn_implementation,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    kwargs = {
        "attn_implementation": attn_implementation,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
    }
    if resolved.kind == "folder":
        check_weight_files(resolved.location, allow_pickle=allow_pickle)
        kwargs["use_safetensors"] = None if allow_pickle else True
    elif resolved.kind == "gguf":
        kwargs["gguf_file"] = resolved.gguf_file
    else:
        kwargs["use_safetensors"] = None if allow_pickle else True
    with _hub_errors(resolved):
        model = AutoModelForCausalLM.from_pretrained(resolved.location, **kwargs)
    if resolved.kind == "gguf":
        _drop_gguf_quantizer(model)
    return model


@contextmanager
def _hub_errors(resolved: ModelSource) -> Iterator[None]:
    """Say, when loading a hub name fails, that no local path of that name exists."""
    try:
        yield
    except OSError as err:
        if resolved.kind != "hub":
            raise
        raise OSError(
            f"{resolved.location!r} is not a local folder, a .gguf file or 'tiny', so it was loaded as "
            f"a hub name, which failed: {err} For a local folder, pass a path that exists (./{resolved.location}); "
            "for a hub model, check the network, or run it once online to fill the local cache."
        ) from err


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make a model loaded from GGUF an ordinary one, so that ``save_pretrained`` accepts it.

    transformers (checked with 5.25) dequantises the GGUF tensors into ``dtype`` on load but keeps
    its GGUF quantizer on the model, and ``save_pretrained`` refuses to save a model that has one,
    so every export of a fine-tuned GGUF model would fail.

    Raises:
        ValueError: If some layers were left in packed GGUF blocks, which cannot be trained.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if getattr(quantizer, "packed_modules", None):
        raise ValueError(
            f"{len(quantizer.packed_modules)} layers of the GGUF model stayed in packed GGUF blocks, "
            "which cannot be trained. Load the file with dequantisation, as load_model does by default."
        )
    quantizer.remove_quantization_config(model)


__all__ = [
    "TINY",
    "ModelSource",
    "check_weight_files",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve_source",
]
