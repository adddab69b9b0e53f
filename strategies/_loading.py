"""Materialise a sharded module built on the meta device and load its weights shard by shard.

After ``fully_shard`` every parameter is a DTensor whose local part is this rank's shard, still
on the meta device. Materialising allocates only those shards. Loading then reads just each
shard's slice of the Hugging Face safetensors files, through ``torch.distributed.checkpoint`` and
its Hugging Face storage reader, so no rank ever allocates the full model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from transformers import PreTrainedModel

log = logging.getLogger(__name__)
_log_info = rank_zero_only(log.info)


def has_meta_tensors(module: nn.Module) -> bool:
    """Return whether any parameter or buffer of ``module`` is on the meta device."""
    tensors = [*module.parameters(), *module.buffers()]
    return any(t.device.type == "meta" for t in tensors)


def materialize(
    module: nn.Module,
    device: torch.device,
    hf_model: PreTrainedModel | None,
    checkpoint: str | None,
) -> None:
    """Allocate the meta tensors of ``module`` on ``device`` and fill them.

    Tensors not on the meta device keep their values. With ``checkpoint``, the transformers model
    is loaded from that local Hugging Face folder and only its non-persistent buffers (such as
    the rotary ``inv_freq``, which ``to_empty`` leaves as garbage) are recomputed by its
    ``_init_weights``. Without it, the model is initialised as transformers would. Other modules
    with meta tensors are reset with their ``reset_parameters()``.

    Args:
        module: The sharded root module.
        device: Where the shards go.
        hf_model: The transformers model inside ``module``, if any.
        checkpoint: A local Hugging Face folder with ``*.safetensors`` files, or None.

    Raises:
        ValueError: If a module with meta tensors cannot be initialised, or the checkpoint lacks
            a tensor of the model.
    """
    on_meta = _modules_with_meta_tensors(module)
    _to_empty_meta_only(module, device)
    hf_modules = set(hf_model.modules()) if hf_model is not None else set()
    if hf_model is not None and checkpoint is not None:
        load_hf_checkpoint(hf_model, checkpoint)
        for sub in hf_model.modules():
            # NOTE: a non-persistent buffer that `_init_weights` does not recompute, or that sits
            # in a module with parameters of its own (which `_init_weights` would overwrite),
            # keeps uninitialised memory. transformers 5.25 recomputes the rotary embeddings.
            own_params = any(True for _ in sub.parameters(recurse=False))
            if sub in on_meta and sub._non_persistent_buffers_set and not own_params:
                hf_model._init_weights(sub)
    elif hf_model is not None:
        for sub in hf_model.modules():
            if sub in on_meta:
                hf_model._init_weights(sub)
    _reset_other_modules([m for m in on_meta if m not in hf_modules])


def _modules_with_meta_tensors(module: nn.Module) -> set[nn.Module]:
    found = set()
    for sub in module.modules():
        tensors = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
        if any(t.device.type == "meta" for t in tensors):
            found.add(sub)
    return found


def _to_empty_meta_only(module: nn.Module, device: torch.device) -> None:
    # Like `module.to_empty(device=device)`, which FSDP2 supports through its `_apply` override,
    # but tensors already holding values (for example metrics built outside the meta context)
    # are kept instead of being replaced by uninitialised memory.
    def allocate(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta":
            return tensor
        return torch.empty_like(tensor, device=device)

    module._apply(allocate)


def _reset_other_modules(modules: list[nn.Module]) -> None:
    missing = sorted({type(m).__name__ for m in modules if not callable(getattr(m, "reset_parameters", None))})
    if missing:
        raise ValueError(
            f"Modules of class {missing} were built on the meta device but have no "
            "reset_parameters() method, so their parameters or buffers cannot be initialised "
            "after sharding. Add reset_parameters() to them, build them outside the meta device, "
            "or set meta_init=False."
        )
    with torch.no_grad():
        for sub in modules:
            sub.reset_parameters()


def load_hf_checkpoint(hf_model: PreTrainedModel, folder: str) -> None:
    """Load this rank's shards of ``hf_model``'s tensors from a Hugging Face safetensors folder.

    Tied parameters are loaded once, under whichever of their names the checkpoint contains
    (``save_pretrained`` stores a tied output head only as the input embedding).

    Args:
        hf_model: A transformers model whose parameters may be DTensors.
        folder: Local folder with ``*.safetensors`` files, keyed by ``hf_model``'s state-dict
            names.

    Raises:
        FileNotFoundError: If ``folder`` has no ``*.safetensors`` file.
        ValueError: If the checkpoint lacks a parameter or persistent buffer of the model.
    """
    path = Path(folder)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"checkpoint_to_load={folder!r} has no *.safetensors file, so the meta-built model "
            "cannot be loaded. Point it at a folder written by save_pretrained."
        )
    available = set(HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata)
    targets, missing = _checkpoint_targets(hf_model, available)
    if missing:
        raise ValueError(
            f"{folder!r} lacks {len(missing)} tensors of {type(hf_model).__name__}, for example "
            f"{missing[:5]}. The safetensors keys must equal the model's state-dict names; "
            "export the checkpoint with save_pretrained from the same model class."
        )
    # The tensors are the parameters themselves: DCP copies each slice into the local shard.
    dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path)))
    _log_info(f"FSDP2Strategy: loaded {len(targets)} tensors shard by shard from {folder}.")


def _checkpoint_targets(
    hf_model: PreTrainedModel, available: set[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in _persistent_tensors(hf_model):
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    targets: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for names, tensor in groups.values():
        present = [n for n in names if n in available]
        if present:
            targets[present[0]] = tensor
        else:
            missing.append(names[0])
    return targets, missing


def _persistent_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    tensors: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
    for module_name, sub in model.named_modules(remove_duplicate=False):
        for buffer_name, buffer in sub.named_buffers(recurse=False):
            if buffer_name in sub._non_persistent_buffers_set:
                continue
            full_name = f"{module_name}.{buffer_name}" if module_name else buffer_name
            tensors.append((full_name, buffer))
    return tensors
