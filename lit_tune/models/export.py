"""Export a trained model as a Hugging Face folder (config, ``model.safetensors``, tokenizer)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def find_pretrained_model(module: nn.Module) -> PreTrainedModel:
    """Return ``module`` itself or its first submodule that is a ``transformers.PreTrainedModel``.

    Raises:
        TypeError: If there is none.
    """
    for candidate in module.modules():
        if isinstance(candidate, PreTrainedModel):
            return candidate
    raise TypeError(
        f"{type(module).__name__} contains no transformers PreTrainedModel, so it cannot be "
        "exported as a Hugging Face folder."
    )


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather a full, unsharded CPU state dict; works for plain, FSDP2 and tensor-parallel models.

    Every rank must call this (sharded parameters are all-gathered); only rank 0 gets tensors back
    when the model is sharded.
    """
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if not sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def export_hf(
    module: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    path: str | os.PathLike,
) -> Path | None:
    """Write ``module``'s causal LM as a Hugging Face folder that ``from_pretrained`` loads.

    Call it on every rank: parameters are gathered collectively, and rank 0 writes. The folder
    is written under a temporary name and renamed, so a crash never leaves a half-written export.
    With tied embeddings the output head is left out of the file, as transformers itself saves it,
    and the config's ``tie_word_embeddings`` ties it again on load.

    Args:
        module: A ``PreTrainedModel`` or any module containing one.
        tokenizer: Saved beside the weights when given.
        path: Destination folder; replaced if it exists.

    Returns:
        The folder on rank 0, None on other ranks.
    """
    model = find_pretrained_model(module)
    state = _drop_tied_copies(model, full_state_dict(model))
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    # Gathered tensors are plain CPU tensors, so save_pretrained never touches DTensors.
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    log.info("Exported Hugging Face model to %s", path)
    return path


def _drop_tied_copies(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A gathered state dict holds separate copies of tied tensors; keep only the source of each tie.
    if not getattr(model.config, "tie_word_embeddings", False):
        return state
    tied = getattr(model, "_tied_weights_keys", None) or {}
    for target in tied if isinstance(tied, dict) else ():
        state.pop(target, None)
    return state


__all__ = ["export_hf", "find_pretrained_model", "full_state_dict"]
