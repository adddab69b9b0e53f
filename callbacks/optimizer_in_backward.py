"""Optimizer steps inside the backward pass, one parameter at a time."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

log = logging.getLogger(__name__)

_SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)


class OptimizerInBackward(Callback):
    """Step each parameter inside the backward pass as soon as its gradient is ready, then free it.

    Use it to save gradient memory: the gradients of the whole model never exist at once, which
    saves one parameter-sized buffer (a quarter of the parameter, gradient and state memory of fp32
    AdamW). It works with any ``LightningModule``, which is left unchanged.

    At the start of ``fit`` the callback takes the optimizer that ``configure_optimizers``
    returned and builds one optimizer of the same class per parameter. Each one steps in a
    ``register_post_accumulate_grad_hook`` (under DDP, right after its bucket's all-reduce) and
    copies its param group's options (lr, weight decay, betas and the rest) from the returned
    optimizer just before it steps. LR schedulers keep updating the returned optimizer, so
    schedules, per-group learning rates and ``LearningRateMonitor`` work as usual, and a warm-up
    that starts at 0 leaves the weights unchanged on the first step. Lightning's loop gets a
    stand-in optimizer whose ``step(closure)`` runs the closure only. All per-parameter optimizers
    write into the returned optimizer's ``state``, so checkpoints hold the ordinary optimizer state
    dict and resume with or without this callback.

    Constraints, checked before the first training step, each with an error that names the
    setting:

    - Strategy: single device, ``"ddp"`` (also spawn and fork) or ``ModelParallelStrategy`` and its
      subclasses (FSDP2). FSDP1 and DeepSpeed are rejected, and so is a DDP communication hook.
      Under DDP the steps use the averaged gradients, but DDP's all-reduce buckets keep a
      gradient-sized buffer of their own, so the memory saving is small there.
    - ``accumulate_grad_batches`` must be 1, with no ``GradientAccumulationScheduler``.
    - ``gradient_clip_val``: ``None`` or 0 means no clipping. Clipping by value is applied to each
      parameter before its step, which equals clipping all at once. Clipping by norm needs every
      gradient before any step, so it is rejected, and so is an overridden
      ``configure_gradient_clipping``.
    - ``precision="16-mixed"`` is rejected, because its gradient scaler checks all gradients for
      infinities before one step. ``"bf16-mixed"`` and the ``-true`` precisions work.
    - One optimizer, whose update of a parameter depends on that parameter only (every
      ``torch.optim`` optimizer except ``LBFGS``). Manual optimization works with one optimizer,
      and each ``manual_backward`` steps the parameters.

    Code that reads gradients between backward and the optimizer step (``on_before_optimizer_step``,
    gradient-norm logging) gets ``None``, because each gradient is freed once its parameter stepped.

    Example::

        from lightning import Trainer
        from lit_tune.callbacks import OptimizerInBackward

        trainer = Trainer(callbacks=[OptimizerInBackward()])
        trainer.fit(model)
    """

    def __init__(self) -> None:
        super().__init__()
        self._stepper: _ParameterStepper | None = None
        self._trainer_clip_val: float | None = None

    @property
    def parameter_optimizers(self) -> dict[Tensor, Optimizer]:
        """Optimizer of each parameter, keyed by the parameter; empty outside ``fit``."""
        if self._stepper is None:
            return {}
        return self._stepper.optimizers_by_parameter()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        problems = _find_unsupported_settings(trainer, pl_module)
        if problems:
            raise MisconfigurationException(
                "OptimizerInBackward cannot run with these settings:\n- " + "\n- ".join(problems)
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizer = _single_optimizer(trainer)
        stepper = _ParameterStepper(optimizer, clip_value=_clip_value(trainer))
        # Clipping by value now happens per parameter, before its step. Lightning's own clipping
        # after the closure would find no gradient left, so it is off until fit ends.
        self._trainer_clip_val = trainer.gradient_clip_val
        if stepper.clip_value is not None:
            trainer.gradient_clip_val = None
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            # A parameter's post-accumulate-grad hook fires before DDP all-reduces its bucket, so
            # under DDP the step runs in a communication hook, after the all-reduce.
            _register_step_after_allreduce(model, stepper)
        else:
            # FSDP2 runs these hooks on the sharded parameters after its reduce-scatter.
            stepper.register_gradient_hooks()
        trainer.strategy.optimizers = [_InBackwardOptimizer(optimizer, stepper)]
        self._stepper = stepper
        _log_info(
            "OptimizerInBackward: %d parameters step in backward with their own %s.",
            stepper.num_parameters,
            type(optimizer).__name__,
        )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore(trainer)

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._restore(trainer)

    def _restore(self, trainer: Trainer) -> None:
        if self._stepper is None:
            return
        self._stepper.remove_gradient_hooks()
        self._stepper = None
        trainer.gradient_clip_val = self._trainer_clip_val


class _ParameterStepper:
    """Steps one optimizer per parameter of ``optimizer``, with that parameter's group options.

    Args:
        optimizer: The optimizer returned by ``configure_optimizers``. Its ``param_groups`` supply
            the options and its ``state`` stores every parameter's state.
        clip_value: Clip each gradient element to ``[-clip_value, clip_value]`` before the step;
            ``None`` for no clipping.
    """

    def __init__(self, optimizer: Optimizer, clip_value: float | None) -> None:
        self.optimizer = optimizer
        self.clip_value = clip_value
        self._entries: dict[Tensor, tuple[int, Optimizer]] = {}
        self._hook_handles: dict[Tensor, Any] = {}
        self._use_gradient_hooks = False
        # Parameters stepped by the DDP communication hook in the current backward pass.
        self._stepped_after_allreduce: set[Tensor] = set()
        for index in range(len(optimizer.param_groups)):
            self.add_group(index)

    @property
    def num_parameters(self) -> int:
        return len(self._entries)

    def optimizers_by_parameter(self) -> dict[Tensor, Optimizer]:
        return {param: optimizer for param, (_, optimizer) in self._entries.items()}

    def add_group(self, index: int) -> None:
        group = self.optimizer.param_groups[index]
        for param in group["params"]:
            self._entries[param] = (index, _build_parameter_optimizer(self.optimizer, group, param))
            if self._use_gradient_hooks:
                self._register_hook(param)

    def share_state(self) -> None:
        """Point every per-parameter optimizer at ``optimizer.state``, which a load replaces."""
        for _, parameter_optimizer in self._entries.values():
            parameter_optimizer.state = self.optimizer.state

    def register_gradient_hooks(self) -> None:
        self._use_gradient_hooks = True
        for param in self._entries:
            self._register_hook(param)

    def remove_gradient_hooks(self) -> None:
        for handle in self._hook_handles.values():
            handle.remove()
        self._hook_handles.clear()
        self._use_gradient_hooks = False

    def step_parameter(self, param: Tensor, free_gradient: bool) -> None:
        index, parameter_optimizer = self._entries[param]
        target = parameter_optimizer.param_groups[0]
        for key, value in self.optimizer.param_groups[index].items():
            if key != "params":
                target[key] = value
        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(param, self.clip_value)
        parameter_optimizer.step()
        if free_gradient:
            param.grad = None

    def step_reduced(self, param: Tensor, gradient: Tensor) -> None:
        """Step ``param`` with its all-reduced ``gradient``, which ``finish_step`` frees."""
        if param not in self._entries:
            return
        param.grad = gradient
        self.step_parameter(param, free_gradient=False)
        self._stepped_after_allreduce.add(param)

    def finish_step(self) -> None:
        """Free gradients stepped under DDP and step any parameter whose gradient is still set.

        After a normal backward pass no gradient is left here. One is left when no hook covered its
        parameter (trainable only since the hooks were registered) or when the gradient was set
        outside backward, as distributed checkpointing does to initialise the optimizer state.
        """
        for param in self._entries:
            if param.grad is None:
                continue
            if param in self._stepped_after_allreduce:
                param.grad = None
                continue
            self.step_parameter(param, free_gradient=True)
            if self._use_gradient_hooks:
                self._register_hook(param)
        self._stepped_after_allreduce.clear()

    def _register_hook(self, param: Tensor) -> None:
        if param in self._hook_handles or not param.requires_grad:
            return
        self._hook_handles[param] = param.register_post_accumulate_grad_hook(
            self._on_gradient_ready
        )

    def _on_gradient_ready(self, param: Tensor) -> None:
        self.step_parameter(param, free_gradient=True)


class _InBackwardOptimizer(Optimizer):
    """Stand-in optimizer for Lightning's loop; the updates happen in the backward pass.

    ``param_groups``, ``state`` and ``defaults`` are those of ``optimizer``, the optimizer returned
    by ``configure_optimizers``, so LR schedulers, ``LearningRateMonitor`` (which unwraps the
    ``optimizer`` attribute) and checkpoints read and write it as usual.

    Args:
        optimizer: The optimizer returned by ``configure_optimizers``.
        stepper: The per-parameter optimizers built from ``optimizer``.
    """

    def __init__(self, optimizer: Optimizer, stepper: _ParameterStepper) -> None:
        # Optimizer.__init__ is not called: this object has no parameters or state of its own.
        self.optimizer = optimizer
        self._stepper = stepper

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @override
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._stepper.finish_step()
        # LR schedulers warn when the step() of their optimizer never ran; this step stands for it.
        self.optimizer._opt_called = True  # type: ignore[attr-defined]
        return loss

    @override
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._stepper.share_state()

    @override
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._stepper.add_group(len(self.optimizer.param_groups) - 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


def _find_unsupported_settings(trainer: Trainer, pl_module: LightningModule) -> list[str]:
    problems = _strategy_problems(trainer.strategy)
    if trainer.accumulate_grad_batches > 1:
        problems.append(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches}: each parameter steps as"
            " soon as its gradient is ready, so gradients cannot add up over batches. Set"
            " accumulate_grad_batches=1 and raise the batch size instead."
        )
    for callback in trainer.callbacks:
        if (
            isinstance(callback, GradientAccumulationScheduler)
            and max(callback.scheduling.values()) > 1
        ):
            problems.append(
                f"GradientAccumulationScheduler(scheduling={callback.scheduling}) accumulates"
                " gradients over batches. Remove it."
            )
    problems.extend(_clipping_problems(trainer, pl_module))
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        problems.append(
            f"precision={trainer.precision!r} uses a gradient scaler, which checks all gradients for"
            " infinities before one step. Use precision='bf16-mixed' or '32-true'."
        )
    return problems


def _strategy_problems(strategy: Strategy) -> list[str]:
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, _SUPPORTED_STRATEGIES):
        return [
            f"strategy {name} is not supported. Use a single device, strategy='ddp' or"
            " ModelParallelStrategy (FSDP2), or remove OptimizerInBackward."
        ]
    if isinstance(strategy, DDPStrategy) and getattr(strategy, "_ddp_comm_hook", None) is not None:
        return [
            f"{name}(ddp_comm_hook=...) is set, but DDP takes one communication hook and"
            " OptimizerInBackward registers its own to step after the all-reduce. Remove"
            " ddp_comm_hook."
        ]
    return []


def _clipping_problems(trainer: Trainer, pl_module: LightningModule) -> list[str]:
    problems = []
    clip_val = trainer.gradient_clip_val
    algorithm = trainer.gradient_clip_algorithm
    if clip_val and algorithm != GradClipAlgorithmType.VALUE:
        problems.append(
            f"gradient_clip_val={clip_val} with gradient_clip_algorithm='norm': the global norm"
            " needs every gradient before any step. Set gradient_clip_val=None, or clip by value"
            " with gradient_clip_algorithm='value'."
        )
    if is_overridden("configure_gradient_clipping", pl_module):
        problems.append(
            f"{type(pl_module).__name__}.configure_gradient_clipping is overridden, but it would run"
            " after the gradients were used and freed. Remove the override and use"
            " Trainer(gradient_clip_val=..., gradient_clip_algorithm='value')."
        )
    return problems


def _clip_value(trainer: Trainer) -> float | None:
    if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
        return float(trainer.gradient_clip_val)
    return None


def _single_optimizer(trainer: Trainer) -> Optimizer:
    optimizers = trainer.optimizers
    if len(optimizers) != 1:
        names = ", ".join(type(optimizer).__name__ for optimizer in optimizers)
        raise MisconfigurationException(
            f"OptimizerInBackward supports one optimizer, but configure_optimizers returned"
            f" {len(optimizers)} ({names}). Return one optimizer, with one param group per part of"
            " the model that needs its own options, or remove OptimizerInBackward."
        )
    optimizer = optimizers[0]
    if isinstance(optimizer, _MockOptimizer):
        raise MisconfigurationException(
            "OptimizerInBackward needs an optimizer, but configure_optimizers returned None."
            " Return an optimizer or remove OptimizerInBackward."
        )
    if isinstance(optimizer, _InBackwardOptimizer):
        raise MisconfigurationException(
            "OptimizerInBackward was added twice to Trainer(callbacks=...). Keep one."
        )
    if isinstance(optimizer, torch.optim.LBFGS) or hasattr(optimizer, "consolidate_state_dict"):
        raise MisconfigurationException(
            f"OptimizerInBackward cannot split {type(optimizer).__name__} into one optimizer per"
            " parameter, because its update needs all parameters at once. Use another optimizer"
            " or remove OptimizerInBackward."
        )
    return optimizer


def _build_parameter_optimizer(
    optimizer: Optimizer, group: dict[str, Any], param: Tensor
) -> Optimizer:
    options = {key: value for key, value in group.items() if key != "params"}
    optimizer_class = type(optimizer)
    try:
        parameter_optimizer = optimizer_class(
            [{"params": [param], **options}], **_constructor_defaults(optimizer)
        )
    except (TypeError, ValueError) as error:
        raise MisconfigurationException(
            f"OptimizerInBackward could not build a {optimizer_class.__name__} for one parameter"
            f" from the options {sorted(options)}: {error}. Its constructor must accept a list of"
            " param groups and the keyword arguments stored in its `defaults`."
        ) from error
    # Every per-parameter optimizer writes into the returned optimizer's state, so that
    # optimizer's state_dict() contains the state of all parameters in the usual format.
    parameter_optimizer.state = optimizer.state
    return parameter_optimizer


def _constructor_defaults(optimizer: Optimizer) -> dict[str, Any]:
    # Constructors such as AdamW's take fewer keywords than `defaults` contains, so pass only those
    # the constructor accepts. The group options set every value anyway.
    parameters = inspect.signature(type(optimizer).__init__).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return dict(optimizer.defaults)
    names = {parameter.name for parameter in parameters} - {"self", "params"}
    return {key: value for key, value in optimizer.defaults.items() if key in names}


def _register_step_after_allreduce(
    model: DistributedDataParallel, stepper: _ParameterStepper
) -> None:
    # NOTE: with find_unused_parameters=True, a parameter that no rank used gets a zero gradient
    # in its bucket and is stepped with it, where a plain DDP step would skip it.

    # No annotations: DDP checks them against the classes, and this module's are strings.
    def allreduce_then_step(process_group, bucket):  # type: ignore[no-untyped-def]
        def step_bucket(future: torch.futures.Future) -> Tensor:
            reduced = future.value()
            for param, gradient in zip(bucket.parameters(), bucket.gradients()):
                stepper.step_reduced(param, gradient)
            return reduced

        return default_hooks.allreduce_hook(process_group, bucket).then(step_bucket)

    model.register_comm_hook(model.process_group, allreduce_then_step)


@rank_zero_only
def _log_info(message: str, *args: Any) -> None:
    log.info(message, *args)
