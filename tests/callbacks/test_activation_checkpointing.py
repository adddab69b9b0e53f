"""ActivationCheckpointing on one CPU process: recomputation, unchanged state-dict keys, equal
gradients, Lightning checkpoints and argument errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from callback_helpers import (
    Block,
    RegressionModule,
    TinyLlamaModule,
    cloned_state,
    cpu_trainer,
    max_difference,
    regression_loader,
    sgd_momentum_with_epoch_decay,
    tiny_llama_eager_config,
    token_loader,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from transformers import LlamaForCausalLM

from lit_tune.callbacks import ActivationCheckpointing, OptimizerInBackward


class _CountingLinear(nn.Linear):
    """Linear layer that counts its forward calls, recomputation included."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


class _TwoLinearBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = _CountingLinear(4, 4)
        self.second = _CountingLinear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


class _BlockModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _TwoLinearBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Run one forward, backward and AdamW step; return the gradients."""
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    model(x).pow(2).sum().backward()
    gradients = {name: param.grad.clone() for name, param in model.named_parameters()}
    optimizer.step()
    return gradients


@pytest.mark.parametrize(
    ("layer_classes", "every_n_layers", "expected_calls"),
    [([nn.Linear], 2, (2, 1)), ([_TwoLinearBlock], 1, (2, 2))],
    ids=["one-child", "whole-block"],
)
def test_state_dict_keys_unchanged(layer_classes, every_n_layers, expected_calls):
    torch.manual_seed(0)
    plain = _BlockModel()
    checkpointed = copy.deepcopy(plain)
    callback = ActivationCheckpointing(layer_classes=layer_classes, every_n_layers=every_n_layers)
    assert callback.apply(checkpointed) == 1
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=0.1)
    checkpointed_optimizer = torch.optim.AdamW(checkpointed.parameters(), lr=0.1)

    plain_gradients = _step(plain, plain_optimizer)
    checkpointed_gradients = _step(checkpointed, checkpointed_optimizer)

    block = checkpointed.block
    assert (block.first.calls, block.second.calls) == expected_calls
    assert max_difference(checkpointed_gradients, plain_gradients) <= 1e-6
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert [name for name, _ in checkpointed.named_parameters()] == [
        name for name, _ in plain.named_parameters()
    ]
    plain_optimizer_state = get_optimizer_state_dict(plain, plain_optimizer)
    checkpointed_optimizer_state = get_optimizer_state_dict(checkpointed, checkpointed_optimizer)
    assert list(checkpointed_optimizer_state["state"]) == list(plain_optimizer_state["state"])
    assert list(plain_optimizer_state["state"]) == [
        "block.first.weight",
        "block.first.bias",
        "block.second.weight",
        "block.second.bias",
    ]

    # Each model loads the other's checkpoint strictly.
    plain.load_state_dict(checkpointed.state_dict(), strict=True)
    checkpointed.load_state_dict(plain.state_dict(), strict=True)
    set_optimizer_state_dict(plain, plain_optimizer, checkpointed_optimizer_state)
    set_optimizer_state_dict(checkpointed, checkpointed_optimizer, plain_optimizer_state)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_eager_config())


def _llama_gradients(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def _saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the non-parameter tensors that the forward pass saves for backward."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = tensor._base if tensor._base is not None else tensor
        if not isinstance(base, nn.Parameter):
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return total


@pytest.mark.parametrize(
    ("kwargs", "expected_count"),
    [({}, 4), ({"every_n_layers": 2}, 2), ({"offload_activations": True}, 4)],
    ids=["all", "every-2", "offload"],
)
def test_llama_gradients_match_without_checkpointing(kwargs, expected_count):
    plain = _tiny_llama()
    checkpointed = copy.deepcopy(plain)
    ids = torch.randint(7, 263, (2, 16), generator=torch.Generator().manual_seed(5))

    assert ActivationCheckpointing(**kwargs).apply(checkpointed) == expected_count
    assert max_difference(_llama_gradients(checkpointed, ids), _llama_gradients(plain, ids)) <= 1e-6
    assert list(checkpointed.state_dict()) == list(plain.state_dict())


def test_saved_activations_shrink():
    plain = _tiny_llama()
    every_second = copy.deepcopy(plain)
    every_layer = copy.deepcopy(plain)
    ActivationCheckpointing(every_n_layers=2).apply(every_second)
    ActivationCheckpointing().apply(every_layer)
    ids = torch.randint(7, 263, (2, 16), generator=torch.Generator().manual_seed(5))

    plain_bytes = _saved_activation_bytes(plain, ids)
    # Checkpointing all 4 layers keeps only their inputs and the head's activations.
    assert _saved_activation_bytes(every_layer, ids) < 0.15 * plain_bytes
    # Checkpointing 2 of 4 layers keeps a little over half.
    assert 0.45 * plain_bytes < _saved_activation_bytes(every_second, ids) < 0.65 * plain_bytes


def test_apply_twice_changes_nothing():
    model = _tiny_llama()
    callback = ActivationCheckpointing(offload_activations=True)
    assert callback.apply(model) == 4
    hooks = [
        (len(layer._forward_pre_hooks), len(layer._forward_hooks)) for layer in model.model.layers
    ]

    assert callback.apply(model) == 4
    assert [
        (len(layer._forward_pre_hooks), len(layer._forward_hooks)) for layer in model.model.layers
    ] == hooks
    assert len(callback.checkpointed_layers) == 4


@pytest.mark.parametrize("every_n_layers", [0, -1, True, 1.5])
def test_invalid_every_n_layers(every_n_layers):
    with pytest.raises(
        ValueError, match=f"every_n_layers must be a positive integer, got {every_n_layers!r}"
    ):
        ActivationCheckpointing(every_n_layers=every_n_layers)


def test_invalid_layer_classes():
    with pytest.raises(
        TypeError,
        match="layer_classes must contain nn.Module subclasses or class names, got <class 'int'>",
    ):
        ActivationCheckpointing(layer_classes=[int])
    with pytest.raises(ValueError, match="layer_classes is empty"):
        ActivationCheckpointing(layer_classes=[])


def test_model_without_layers_raises():
    model = _BlockModel()
    with pytest.raises(ValueError, match="no module of _BlockModel defines it"):
        ActivationCheckpointing().apply(model)
    with pytest.raises(
        ValueError, match=r"found no layer of class \['MissingLayer'\] in _BlockModel"
    ):
        ActivationCheckpointing(layer_classes=["MissingLayer"]).apply(model)


def test_hf_gradient_checkpointing_raises():
    model = _tiny_llama()
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
    with pytest.raises(
        ValueError, match="already has Hugging Face gradient checkpointing turned on"
    ):
        ActivationCheckpointing().apply(model)


def _fit_regression(
    root: Path, callbacks: list, max_steps: int, ckpt_path: Path | None = None
) -> RegressionModule:
    torch.manual_seed(0)
    module = RegressionModule(sgd_momentum_with_epoch_decay)
    trainer = cpu_trainer(root, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, regression_loader(4), ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize(
    ("saved_with", "resumed_with"),
    [(True, False), (False, True)],
    ids=["saved-with", "resumed-with"],
)
def test_lightning_checkpoint_loads_either_way(tmp_path, saved_with, resumed_with):
    def callbacks(with_checkpointing: bool) -> list:
        return [ActivationCheckpointing(layer_classes=[Block])] if with_checkpointing else []

    saver = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}"
    )
    uninterrupted = _fit_regression(tmp_path, [saver, *callbacks(saved_with)], max_steps=4)
    checkpoint = torch.load(tmp_path / "step=2.ckpt", weights_only=False)
    RegressionModule(sgd_momentum_with_epoch_decay).load_state_dict(
        checkpoint["state_dict"], strict=True
    )

    resumed = _fit_regression(
        tmp_path / "resume", callbacks(resumed_with), 4, ckpt_path=tmp_path / "step=2.ckpt"
    )

    assert max_difference(cloned_state(resumed), cloned_state(uninterrupted)) <= 1e-6


def _mlp_forward_calls(module: TinyLlamaModule) -> int:
    """Forward calls of the first layer's MLP in one training forward and backward pass."""
    mlp = module.model.model.layers[0].mlp
    calls = 0
    original_forward = mlp.forward

    def counting_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original_forward(*args, **kwargs)

    mlp.forward = counting_forward
    module.train()
    (ids,) = next(iter(token_loader()))
    module.training_step((ids,), 0).backward()
    del mlp.forward
    return calls


def test_both_callbacks_on_tiny_llama(tmp_path):
    plain = TinyLlamaModule()
    cpu_trainer(tmp_path, max_steps=3).fit(plain, token_loader())
    both = TinyLlamaModule()
    callbacks = [OptimizerInBackward(), ActivationCheckpointing()]
    cpu_trainer(tmp_path, max_steps=3, callbacks=callbacks).fit(both, token_loader())

    assert max_difference(cloned_state(both), cloned_state(plain)) <= 1e-6
    # The layers built in configure_model were checkpointed during fit: backward reruns them.
    assert _mlp_forward_calls(plain) == 1
    assert _mlp_forward_calls(both) == 2
