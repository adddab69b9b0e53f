"""Apply tensor parallelism, activation checkpointing and FSDP2 to a LightningModule.

The order is fixed: tensor-parallel plan, then activation checkpointing, then ``fully_shard`` on
each decoder layer, then on the root. ``fully_shard`` must come last because it turns every
parameter into a DTensor on the data-parallel mesh, and both the tensor-parallel plan and the
checkpoint wrappers expect to see the modules as they were built.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)
from transformers import PreTrainedModel

log = logging.getLogger(__name__)
_log_info = rank_zero_only(log.info)

LayerClasses = Sequence[type[nn.Module] | str]
TensorParallelPlan = Mapping[str, ParallelStyle | str]

# transformers' plan strings (``config.base_model_tp_plan`` and ``PreTrainedModel._tp_plan``)
# translated to torch.distributed.tensor.parallel styles. "replicate" leaves the module as it is.
_STYLE_BUILDERS = {
    "colwise": lambda: ColwiseParallel(),
    "rowwise": lambda: RowwiseParallel(),
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
}
_SKIPPED_STYLES = ("replicate",)

_PLAN_HELP = (
    "Pass tensor_parallel_plan to FSDP2Strategy: a dict from module names relative to the "
    "LightningModule ('*' matches one name, e.g. 'model.model.layers.*.mlp.up_proj') to a "
    "torch.distributed.tensor.parallel style such as ColwiseParallel() or to one of the strings "
    f"{sorted(_STYLE_BUILDERS)}. Or parallelize the model yourself in configure_model with "
    "self.device_mesh['tensor_parallel']."
)


def find_pretrained_model(module: nn.Module) -> tuple[str, PreTrainedModel] | None:
    """Find the outermost ``transformers.PreTrainedModel`` inside ``module``.

    Args:
        module: Usually the LightningModule.

    Returns:
        The model's name relative to ``module`` (``""`` for ``module`` itself) and the model, or
        None if ``module`` contains none.
    """
    for name, candidate in module.named_modules():
        if isinstance(candidate, PreTrainedModel):
            return name, candidate
    return None


def is_parallelized(module: nn.Module) -> bool:
    """Return whether ``module`` already contains DTensor parameters or FSDP2 modules."""
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return True
    return any(isinstance(p, DTensor) for p in module.parameters())


def loss_parallel_output_style() -> ColwiseParallel:
    """Build the output-projection style for loss parallel: vocabulary-sharded DTensor logits."""
    return ColwiseParallel(
        input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
    )


def translate_style(style: ParallelStyle | str, name: str) -> ParallelStyle | None:
    """Turn a plan entry into a ParallelStyle, or None for an entry that leaves the module replicated.

    Raises:
        ValueError: If ``style`` is a string that is not a supported transformers style.
    """
    if isinstance(style, ParallelStyle):
        return style
    if style in _SKIPPED_STYLES:
        return None
    if style not in _STYLE_BUILDERS:
        raise ValueError(
            f"Tensor-parallel plan entry {name!r} has style {style!r}, which FSDP2Strategy cannot "
            f"translate. Supported strings: {sorted(_STYLE_BUILDERS)}. {_PLAN_HELP}"
        )
    return _STYLE_BUILDERS[style]()


def transformers_plan(
    module: nn.Module, *, loss_parallel: bool, tensor_parallel_size: int
) -> dict[str, ParallelStyle]:
    """Build the tensor-parallel plan of the transformers model inside ``module``.

    Keys are relative to ``module``. With ``loss_parallel``, the output projection keeps its
    ``Shard(-1)`` output as a DTensor, so the logits stay sharded on the vocabulary.

    Raises:
        ValueError: If ``module`` has no transformers model with a plan, or the model's head
            counts do not divide by ``tensor_parallel_size``.
    """
    found = find_pretrained_model(module)
    hf_plan = _hf_plan(found[1]) if found else {}
    if not hf_plan:
        model_name = type(found[1]).__name__ if found else f"{type(module).__name__} (no transformers model)"
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} needs a tensor-parallel plan, but "
            f"{model_name} ships none (transformers provides one for the Llama, Qwen2 and Mistral "
            f"families, among others). {_PLAN_HELP}"
        )
    prefix, hf_model = found
    _check_head_counts(hf_model, tensor_parallel_size)
    output = hf_model.get_output_embeddings()
    plan: dict[str, ParallelStyle] = {}
    for key, style in hf_plan.items():
        name = f"{prefix}.{key}" if prefix else key
        if loss_parallel and output is not None and _names_module(hf_model, key, output):
            plan[name] = loss_parallel_output_style()
            continue
        translated = translate_style(style, name)
        if translated is not None:
            plan[name] = translated
    return plan


def _hf_plan(hf_model: PreTrainedModel) -> dict[str, str]:
    # In transformers 5.25 the `tp_plan` property returns `_tp_plan`, the merged plan stored on
    # the instance, which is read directly where the property is missing.
    plan = getattr(hf_model, "tp_plan", None) or getattr(hf_model, "_tp_plan", None)
    return dict(plan or {})


def _names_module(root: nn.Module, key: str, target: nn.Module) -> bool:
    if "*" in key:
        return False
    try:
        return root.get_submodule(key) is target
    except AttributeError:
        return False


def _check_head_counts(hf_model: PreTrainedModel, tensor_parallel_size: int) -> None:
    config = hf_model.config.get_text_config()
    for field in ("num_attention_heads", "num_key_value_heads"):
        count = getattr(config, field, None)
        if isinstance(count, int) and count % tensor_parallel_size:
            raise ValueError(
                f"{type(hf_model).__name__} has {field}={count}, which does not divide by "
                f"tensor_parallel_size={tensor_parallel_size}, so the attention heads cannot be "
                "split evenly. Choose a tensor_parallel_size that divides it."
            )


def apply_tensor_parallel(
    module: nn.Module, mesh: DeviceMesh, plan: Mapping[str, ParallelStyle | str]
) -> None:
    """Apply ``plan`` on ``mesh`` and restore parameters that were tied before.

    ``parallelize_module`` gives each module its own DTensor parameter, which would untie an
    output head from its input embedding. Both are sharded on the vocabulary (``Shard(0)``), so
    the first DTensor is put back in every place that shared the original parameter.

    Raises:
        ValueError: If a plan entry is invalid, or tied parameters end up with different layouts.
    """
    tied_groups = _tied_parameter_names(module)
    styles = {name: translate_style(style, name) for name, style in plan.items()}
    parallelize_module(module, mesh, {k: v for k, v in styles.items() if v is not None})
    for names in tied_groups:
        _retie(module, names)


def _tied_parameter_names(module: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(module: nn.Module, names: list[str]) -> None:
    first = module.get_parameter(names[0])
    for name in names[1:]:
        other = module.get_parameter(name)
        if other is first:
            continue
        if _layout(other) != _layout(first):
            raise ValueError(
                f"Parameters {names[0]!r} and {name!r} are tied, but the tensor-parallel plan "
                f"shards them differently ({_layout(first)} against {_layout(other)}). Give both "
                "modules styles that shard the shared weight on the same dimension, or untie them."
            )
        owner_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner_name), attr, first)


def _layout(param: nn.Parameter) -> tuple[Any, ...]:
    if isinstance(param, DTensor):
        return tuple(param.placements)
    return ("plain tensor",)


def apply_activation_checkpointing(trainer: pl.Trainer, module: nn.Module) -> int:
    """Let every ``ActivationCheckpointing`` callback wrap ``module`` before it is sharded.

    Returns:
        How many modules the callbacks checkpointed.
    """
    try:
        from lit_tune.callbacks import ActivationCheckpointing
    except ImportError:
        return 0
    count = 0
    for callback in trainer.callbacks:
        if isinstance(callback, ActivationCheckpointing):
            count += callback.apply(module)
    return count


def resolve_layer_classes(module: nn.Module, layer_classes: LayerClasses | None) -> set[str] | None:
    """Return the class names of the layers to shard one by one.

    Args:
        module: The LightningModule.
        layer_classes: Classes or class names. None takes ``_no_split_modules`` from the
            transformers model in ``module``.

    Returns:
        Class names, or None when there are none to shard separately.
    """
    if layer_classes is not None:
        return {c if isinstance(c, str) else c.__name__ for c in layer_classes}
    found = find_pretrained_model(module)
    names = getattr(found[1], "_no_split_modules", None) if found else None
    return set(names) if names else None


def find_layers(module: nn.Module, class_names: Iterable[str], explicit: bool) -> list[nn.Module]:
    """Return the submodules of ``module`` whose class name is in ``class_names``.

    Raises:
        ValueError: If ``explicit`` and no submodule matches.
    """
    wanted = set(class_names)
    layers = [m for m in module.modules() if m is not module and type(m).__name__ in wanted]
    if explicit and not layers:
        present = sorted({type(m).__name__ for m in module.modules()})
        raise ValueError(
            f"layer_classes={sorted(wanted)} matches no submodule of {type(module).__name__}. "
            f"Classes present: {present}. Pass the class of the decoder layer."
        )
    return layers


def apply_fully_shard(
    module: nn.Module, layers: Sequence[nn.Module], **fsdp_kwargs: Any
) -> None:
    """Shard each of ``layers``, then ``module`` as the root with the remaining parameters.

    The root group contains every parameter outside the layers (embedding, final norm, output head),
    so an output head tied to the input embedding stays one parameter in one group.
    """
    for layer in layers:
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(module, **fsdp_kwargs)
    _log_info(f"FSDP2Strategy: sharded {len(layers)} layers and the root module.")
