"""Activation checkpointing of chosen layers, applied without changing parameter names."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torch.distributed._composable import checkpoint
from torch.distributed.tensor import DTensor
from typing_extensions import override

log = logging.getLogger(__name__)


class ActivationCheckpointing(Callback):
    """Recompute the forward pass of chosen layers during backward instead of storing activations.

    Use it when activations dominate training memory (long sequences, large batches). A
    checkpointed layer keeps only its inputs from the forward pass and runs its forward again in
    backward, which costs about one extra forward pass of those layers.

    The callback uses PyTorch's composable ``checkpoint`` (non-reentrant), which installs forward
    hooks instead of wrapping modules, so parameter names and state-dict keys stay the same: a
    checkpoint saved with the callback loads without it, and the other way round. It applies
    itself at ``on_fit_start``, when the model exists, including a model built in
    ``configure_model``. ``FSDP2Strategy`` calls :meth:`apply` itself before sharding, after which
    ``on_fit_start`` changes nothing. It works with a single device, DDP and FSDP2, and together
    with ``OptimizerInBackward``.

    While training, checkpointed layers run without a KV cache (their ``use_cache`` argument
    becomes ``False`` and their cache arguments ``None``), because the recomputation in backward
    would append to the cache a second time. Hugging Face's own gradient checkpointing does the
    same.

    Args:
        layer_classes: Layers to checkpoint, as classes or class names. ``None`` takes the class
            names listed in ``_no_split_modules`` by the model's modules, which for Hugging Face
            models are the decoder layers. A matching module inside another matching module is
            not counted.
        every_n_layers: Checkpoint one in every ``every_n_layers`` matching layers, counting from
            the first: 1 checkpoints all of them, 2 checkpoints layers 0, 2, 4 and so on, which
            saves less memory and recomputes less.
        offload_activations: Move the tensors that the matching layers save for backward to CPU
            memory, and back when backward needs them. For a checkpointed layer these are its
            inputs, and for a layer skipped by ``every_n_layers`` all its saved activations.
            Parameters stay in place. It saves nothing when the model is on CPU.

    Raises:
        TypeError: If ``layer_classes`` contains something other than ``nn.Module`` subclasses and
            class names.
        ValueError: If ``every_n_layers`` is not a positive integer.

    Example::

        from lightning import Trainer
        from lit_tune.callbacks import ActivationCheckpointing

        trainer = Trainer(callbacks=[ActivationCheckpointing(every_n_layers=2)])
        trainer.fit(model)
    """

    def __init__(
        self,
        layer_classes: Sequence[type[nn.Module] | str] | None = None,
        every_n_layers: int = 1,
        offload_activations: bool = False,
    ) -> None:
        super().__init__()
        self.layer_classes = _check_layer_classes(layer_classes)
        if (
            isinstance(every_n_layers, bool)
            or not isinstance(every_n_layers, int)
            or every_n_layers < 1
        ):
            raise ValueError(
                f"every_n_layers must be a positive integer, got {every_n_layers!r}. Use 1 to"
                " checkpoint every matching layer."
            )
        self.every_n_layers = every_n_layers
        self.offload_activations = bool(offload_activations)
        self._checkpointed: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._offloaded: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    @property
    def checkpointed_layers(self) -> list[nn.Module]:
        """Layers that this callback checkpointed, in every model it was applied to."""
        return list(self._checkpointed)

    def apply(self, model: nn.Module) -> int:
        """Checkpoint the chosen layers of ``model``; a second call changes nothing.

        Call it once the model exists. It works before or after ``fully_shard``, and
        ``FSDP2Strategy`` calls it before.

        Args:
            model: The model, or the ``LightningModule`` that contains it.

        Returns:
            The number of layers of ``model`` that this callback checkpoints.

        Raises:
            ValueError: If no layer of ``model`` matches, if ``layer_classes`` is ``None`` and no
                module defines ``_no_split_modules``, or if the model already has Hugging Face
                gradient checkpointing turned on.
        """
        _reject_hf_gradient_checkpointing(model)
        layers = self._find_layers(model)
        selected = layers[:: self.every_n_layers]
        added = 0
        for layer in selected:
            if layer not in self._checkpointed:
                checkpoint(layer)
                # Registered after the checkpoint and prepended, so it runs first and the
                # checkpoint records the arguments without a cache.
                layer.register_forward_pre_hook(
                    _drop_cache_arguments, prepend=True, with_kwargs=True
                )
                self._checkpointed.add(layer)
                added += 1
        if self.offload_activations:
            for layer in layers:
                if layer not in self._offloaded:
                    _register_offload_hooks(layer, checkpointed=layer in self._checkpointed)
                    self._offloaded.add(layer)
        if added:
            _log_info(
                "ActivationCheckpointing: checkpointing %d of %d %s layers, offload to CPU %s.",
                len(selected),
                len(layers),
                type(layers[0]).__name__,
                "on" if self.offload_activations else "off",
            )
        return len(selected)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.apply(pl_module)

    def _find_layers(self, model: nn.Module) -> list[nn.Module]:
        classes, names = self._layer_match(model)
        layers: list[nn.Module] = []
        prefixes: list[str] = []
        for name, module in model.named_modules():
            if any(name.startswith(prefix) for prefix in prefixes):
                continue
            if isinstance(module, classes) or any(
                cls.__name__ in names for cls in type(module).__mro__
            ):
                layers.append(module)
                prefixes.append(f"{name}." if name else "")
        if not layers:
            expected_names = sorted(names | {cls.__name__ for cls in classes})
            raise ValueError(
                f"ActivationCheckpointing found no layer of class {expected_names} in"
                f" {type(model).__name__}. Pass layer_classes with the class of the model's blocks."
            )
        return layers

    def _layer_match(self, model: nn.Module) -> tuple[tuple[type[nn.Module], ...], set[str]]:
        if self.layer_classes is not None:
            classes = tuple(item for item in self.layer_classes if isinstance(item, type))
            return classes, {item for item in self.layer_classes if isinstance(item, str)}
        names: set[str] = set()
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or ())
        if not names:
            raise ValueError(
                "ActivationCheckpointing(layer_classes=None) takes the layer classes from"
                f" `_no_split_modules`, but no module of {type(model).__name__} defines it. Pass"
                " layer_classes=[YourBlockClass]."
            )
        return (), names


def _check_layer_classes(
    layer_classes: Sequence[type[nn.Module] | str] | None,
) -> tuple[type[nn.Module] | str, ...] | None:
    if layer_classes is None:
        return None
    if isinstance(layer_classes, (str, type)):
        layer_classes = [layer_classes]
    items = tuple(layer_classes)
    for item in items:
        if not isinstance(item, str) and not (
            isinstance(item, type) and issubclass(item, nn.Module)
        ):
            raise TypeError(
                f"layer_classes must contain nn.Module subclasses or class names, got {item!r}."
            )
    if not items:
        raise ValueError(
            "layer_classes is empty. Pass None to use `_no_split_modules`, or name the layers."
        )
    return items


def _reject_hf_gradient_checkpointing(model: nn.Module) -> None:
    # Hugging Face layers carry a `gradient_checkpointing` flag that its own checkpointing sets.
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            raise ValueError(
                f"Module {name or type(module).__name__!r} already has Hugging Face gradient"
                " checkpointing turned on, so its layers would be recomputed twice. Turn it off"
                " (gradient_checkpointing_disable()) or remove ActivationCheckpointing."
            )


# Keyword arguments through which Hugging Face decoder layers (transformers 4.x and 5.x) receive
# a KV cache that they update in place.
_CACHE_ARGUMENTS = ("cache", "past_key_value", "past_key_values", "layer_past")


def _drop_cache_arguments(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    # A layer that appends to a KV cache in forward would append again when backward recomputes
    # it, so while training it runs without one, as Hugging Face's own checkpointing does.
    if not (module.training and torch.is_grad_enabled()):
        return None
    changes: dict[str, Any] = {
        name: None for name in _CACHE_ARGUMENTS if kwargs.get(name) is not None
    }
    if kwargs.get("use_cache"):
        changes["use_cache"] = False
    if not changes:
        return None
    return args, {**kwargs, **changes}


def _register_offload_hooks(layer: nn.Module, checkpointed: bool) -> None:
    # The pre-hook runs before the checkpoint pre-hook, so the layer inputs that checkpointing
    # saves pass through the offload hooks. Inside the layer the checkpoint's own saved-tensor
    # hooks take precedence, because they are entered later.
    active: list[torch.autograd.graph.saved_tensors_hooks | None] = []

    def enter(module: nn.Module, args: Any) -> None:
        if checkpointed and not checkpoint.state(module).enable_hook:
            # The composable checkpoint turns its hooks off while it reruns the forward in
            # backward, and the recomputed tensors must then reach the checkpoint's own hooks.
            active.append(None)
            return
        context = torch.autograd.graph.saved_tensors_hooks(_pack_to_cpu, _unpack_to_device)
        context.__enter__()
        active.append(context)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        context = active.pop() if active else None
        if context is not None:
            context.__exit__(None, None, None)

    layer.register_forward_pre_hook(enter, prepend=True)
    layer.register_forward_hook(leave, always_call=True)


def _pack_to_cpu(tensor: Tensor) -> Tensor | tuple[torch.device, Tensor]:
    base = tensor._base if tensor._base is not None else tensor
    # NOTE: DTensor activations (tensor parallel) stay on their device.
    if tensor.device.type == "cpu" or isinstance(base, nn.Parameter) or isinstance(tensor, DTensor):
        return tensor
    packed = torch.empty_like(tensor, device="cpu", pin_memory=torch.cuda.is_available())
    packed.copy_(tensor)
    return tensor.device, packed


def _unpack_to_device(packed: Tensor | tuple[torch.device, Tensor]) -> Tensor:
    if isinstance(packed, Tensor):
        return packed
    device, tensor = packed
    return tensor.to(device, non_blocking=True)


@rank_zero_only
def _log_info(message: str, *args: Any) -> None:
    log.info(message, *args)
