"""FSDP2Strategy arguments, mesh sizes and tensor-parallel plans, checked without processes."""

from __future__ import annotations

import pytest
import torch
from fsdp2_harness import LitLossModule, tiny_config
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from transformers import LlamaForCausalLM

from lit_tune.strategies import FSDP2Strategy
from lit_tune.strategies._mesh import MeshShape, resolve_mesh_shape
from lit_tune.strategies._parallelize import (
    find_layers,
    resolve_layer_classes,
    transformers_plan,
    translate_style,
)


class _Wrapper(nn.Module):
    """Stands for a LightningModule that keeps its transformers model at ``.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _wrapped_llama(**overrides: object) -> _Wrapper:
    config = tiny_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        return _Wrapper(LlamaForCausalLM(config))


def test_loss_parallel_true_needs_tensor_parallel() -> None:
    with pytest.raises(ValueError, match=r"loss_parallel=True .* tensor_parallel_size=1"):
        FSDP2Strategy(loss_parallel=True)


def test_loss_parallel_defaults_to_tensor_parallel() -> None:
    assert FSDP2Strategy().loss_parallel is False
    assert FSDP2Strategy(tensor_parallel_size=2).loss_parallel is True
    assert FSDP2Strategy(tensor_parallel_size=2, loss_parallel=False).loss_parallel is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size=0"),
        ({"data_parallel_size": "all"}, "data_parallel_size='all'"),
        ({"data_parallel_replicate_size": True}, "data_parallel_replicate_size=True"),
    ],
)
def test_invalid_sizes_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FSDP2Strategy(**kwargs)


def test_mesh_shape_auto_fills_shard() -> None:
    assert resolve_mesh_shape(8, "auto", 2, 2) == MeshShape(replicate=2, shard=2, tensor=2)
    assert resolve_mesh_shape(2, "auto", 1, 2) == MeshShape(replicate=2, shard=1, tensor=1)


@pytest.mark.parametrize(("sizes", "message"), [(("auto", 3, 1), "does not divide"), ((2, 2, 1), "world size is 2")])
def test_mesh_shape_mismatch_raises(sizes: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_mesh_shape(2, *sizes)


def test_transformers_plan_with_loss_parallel() -> None:
    plan = transformers_plan(_wrapped_llama(), loss_parallel=True, tensor_parallel_size=2)
    head = plan["model.lm_head"]
    assert isinstance(head, ColwiseParallel)
    assert head.output_layouts == (Shard(-1),)
    assert head.use_local_output is False
    assert isinstance(plan["model.model.embed_tokens"], RowwiseParallel)
    assert isinstance(plan["model.model.layers.*.self_attn.q_proj"], ColwiseParallel)
    assert isinstance(plan["model.model.layers.*.mlp.down_proj"], RowwiseParallel)


def test_transformers_plan_without_loss_parallel_gathers_logits() -> None:
    plan = transformers_plan(_wrapped_llama(), loss_parallel=False, tensor_parallel_size=2)
    head = plan["model.lm_head"]
    assert head.output_layouts == (Replicate(),)
    assert head.use_local_output is True


def test_model_without_plan_raises_with_help() -> None:
    module = _Wrapper(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="tensor_parallel_plan") as error:
        transformers_plan(module, loss_parallel=True, tensor_parallel_size=2)
    assert "tensor_parallel_size=2" in str(error.value)


def test_unknown_style_string_raises() -> None:
    with pytest.raises(ValueError, match="'sideways'"):
        translate_style("sideways", "model.lm_head")


def test_head_count_not_divisible_raises() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        transformers_plan(_wrapped_llama(), loss_parallel=True, tensor_parallel_size=4)


def test_layer_classes_default_to_no_split_modules() -> None:
    module = _wrapped_llama()
    names = resolve_layer_classes(module, None)
    assert names == {"LlamaDecoderLayer"}
    assert len(find_layers(module, names, explicit=False)) == 2


def test_layer_classes_without_match_raise() -> None:
    module = _wrapped_llama()
    names = resolve_layer_classes(module, [nn.GRU])
    with pytest.raises(ValueError, match=r"layer_classes=\['GRU'\] matches no submodule"):
        find_layers(module, names, explicit=True)


def test_lightning_cli_parses_strategy_options(tmp_path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        """\
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  strategy:
    class_path: lit_tune.strategies.FSDP2Strategy
    init_args:
      tensor_parallel_size: 1
      layer_classes: [LlamaDecoderLayer]
      tensor_parallel_plan:
        model.lm_head: colwise
      cpu_offload: true
      save_distributed_checkpoint: false
model:
  batch_size: 4
"""
    )
    cli = LightningCLI(LitLossModule, args=["--config", str(config)], run=False, save_config_callback=None)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy._layer_classes == ["LlamaDecoderLayer"]
    assert strategy._tensor_parallel_plan == {"model.lm_head": "colwise"}
    assert strategy._cpu_offload is True
