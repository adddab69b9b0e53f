"""OptimizerInBackward on one CPU process: equivalence with the ordinary step, schedules,
checkpoints and the settings it rejects."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from callback_helpers import (
    RegressionModule,
    cloned_state,
    cpu_trainer,
    max_difference,
    regression_loader,
    sgd_momentum_with_epoch_decay,
    two_group_adamw_with_warmup,
    warmup_factor,
)
from lightning.pytorch.callbacks import (
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_tune.callbacks import OptimizerInBackward

BASE_LRS = (2e-2, 5e-3)  # the two groups of two_group_adamw_with_warmup


def _train(tmp_path: Path, factory, callbacks: list, max_steps: int = 5) -> RegressionModule:
    torch.manual_seed(0)
    module = RegressionModule(factory)
    cpu_trainer(tmp_path, max_steps=max_steps, callbacks=callbacks).fit(
        module, regression_loader(4)
    )
    return module


@pytest.mark.parametrize(
    "factory", [two_group_adamw_with_warmup, sgd_momentum_with_epoch_decay], ids=["adamw", "sgd"]
)
def test_weights_match_ordinary_step(tmp_path, factory):
    torch.manual_seed(0)
    initial = cloned_state(RegressionModule(factory))
    ordinary = _train(tmp_path, factory, callbacks=[])
    in_backward = _train(tmp_path, factory, callbacks=[OptimizerInBackward()])

    assert max_difference(cloned_state(ordinary), initial) > 1e-3
    assert max_difference(cloned_state(in_backward), cloned_state(ordinary)) <= 1e-6
    for param in in_backward.parameters():
        assert not param._post_accumulate_grad_hooks


class _GradientProbe(L.Callback):
    def __init__(self) -> None:
        self.gradients_left: list[int] = []
        self.optimizer_types: list[str] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.gradients_left.append(sum(p.grad is not None for p in pl_module.parameters()))
        self.optimizer_types.append(type(optimizer).__name__)


def test_gradients_freed_before_loop_step(tmp_path):
    probe = _GradientProbe()
    _train(
        tmp_path, two_group_adamw_with_warmup, callbacks=[OptimizerInBackward(), probe], max_steps=2
    )

    assert probe.gradients_left == [0, 0]
    assert probe.optimizer_types == ["_InBackwardOptimizer"] * 2


class _LearningRateProbe(L.Callback):
    """Records, after each step, the lr each per-parameter optimizer used and the weights."""

    def __init__(self, callback: OptimizerInBackward) -> None:
        self.callback = callback
        self.lr_errors: list[float] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1
        groups = trainer.optimizers[0].param_groups
        errors = []
        for param, optimizer in self.callback.parameter_optimizers.items():
            group = next(i for i, g in enumerate(groups) if any(p is param for p in g["params"]))
            expected = BASE_LRS[group] * warmup_factor(step)
            errors.append(abs(optimizer.param_groups[0]["lr"] - expected))
        self.lr_errors.append(max(errors))
        self.states.append(cloned_state(pl_module))


def test_warmup_first_step_and_group_lrs(tmp_path):
    torch.manual_seed(0)
    initial = cloned_state(RegressionModule(two_group_adamw_with_warmup))
    callback = OptimizerInBackward()
    probe = _LearningRateProbe(callback)
    _train(tmp_path, two_group_adamw_with_warmup, callbacks=[callback, probe], max_steps=4)

    assert max_difference(probe.states[0], initial) == 0.0
    assert max_difference(probe.states[1], initial) > 0.0
    assert len(probe.lr_errors) == 4
    assert max(probe.lr_errors) <= 1e-12


def test_learning_rate_monitor_logs_schedule(tmp_path):
    torch.manual_seed(0)
    module = RegressionModule(two_group_adamw_with_warmup)
    logger = CSVLogger(tmp_path, name="lr")
    trainer = cpu_trainer(
        tmp_path,
        max_steps=4,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[OptimizerInBackward(), LearningRateMonitor(logging_interval="step")],
    )
    trainer.fit(module, regression_loader(4))

    with open(Path(logger.log_dir) / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("lr-AdamW/pg1")]
    logged = {
        int(row["step"]): (float(row["lr-AdamW/pg1"]), float(row["lr-AdamW/pg2"])) for row in rows
    }
    assert sorted(logged) == [0, 1, 2, 3]
    for step, (lr_weights, lr_others) in logged.items():
        assert lr_weights == pytest.approx(BASE_LRS[0] * warmup_factor(step), abs=1e-12)
        assert lr_others == pytest.approx(BASE_LRS[1] * warmup_factor(step), abs=1e-12)


class _RestoredStateProbe(L.Callback):
    """Records, once the checkpoint is restored, each parameter's optimizer state and the scheduler step."""

    def __init__(self, callback: OptimizerInBackward) -> None:
        self.callback = callback
        self.states: list[dict[str, torch.Tensor]] = []
        self.scheduler_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0].optimizer
        optimizers = self.callback.parameter_optimizers
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = optimizers[param].state[param]
                self.states.append({key: value.clone() for key, value in state.items()})
        self.scheduler_step = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def _train_with_checkpoint(tmp_path: Path, factory, with_callback: bool) -> dict[str, torch.Tensor]:
    """Train 4 steps, saving at step 2; return the final weights."""
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}"
    )
    callbacks = [checkpoint] + ([OptimizerInBackward()] if with_callback else [])
    torch.manual_seed(0)
    module = RegressionModule(factory)
    trainer = cpu_trainer(tmp_path, max_steps=4, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, regression_loader(4))
    return cloned_state(module)


@pytest.mark.parametrize(
    ("saved_with", "resumed_with"),
    [(True, True), (True, False), (False, True)],
    ids=["both", "saved-only", "resumed-only"],
)
def test_resume_matches_uninterrupted(tmp_path, saved_with, resumed_with):
    uninterrupted = _train_with_checkpoint(tmp_path, two_group_adamw_with_warmup, saved_with)
    checkpoint_path = tmp_path / "step=2.ckpt"

    callbacks: list = []
    if resumed_with:
        callback = OptimizerInBackward()
        probe = _RestoredStateProbe(callback)
        callbacks = [callback, probe]
    torch.manual_seed(1)
    module = RegressionModule(two_group_adamw_with_warmup)
    trainer = cpu_trainer(tmp_path / "resume", max_steps=4, callbacks=callbacks)
    trainer.fit(module, regression_loader(4), ckpt_path=checkpoint_path)

    assert max_difference(cloned_state(module), uninterrupted) <= 1e-6
    if resumed_with:
        saved = torch.load(checkpoint_path, weights_only=False)["optimizer_states"][0]["state"]
        assert probe.scheduler_step == 2
        assert len(probe.states) == len(saved) == len(list(module.parameters()))
        for index, state in enumerate(probe.states):
            assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(state[key], saved[index][key]), (index, key)


class _TwoScalarModule(L.LightningModule):
    """Two scalar parameters at 0 with loss 60*a + 80*b (gradient norm 100), SGD lr 0.01."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return 60 * self.a + 80 * self.b

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _one_batch() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def _train_two_scalars(tmp_path: Path, callbacks: list, **trainer_kwargs) -> tuple[float, float]:
    module = _TwoScalarModule()
    cpu_trainer(tmp_path, max_steps=1, callbacks=callbacks, **trainer_kwargs).fit(
        module, _one_batch()
    )
    return module.a.item(), module.b.item()


@pytest.mark.parametrize("clip_val", [None, 0], ids=["none", "zero"])
def test_no_clipping_values_accepted(tmp_path, clip_val):
    a, b = _train_two_scalars(tmp_path, [OptimizerInBackward()], gradient_clip_val=clip_val)

    assert a == pytest.approx(-0.6, abs=1e-6)
    assert b == pytest.approx(-0.8, abs=1e-6)


def test_clip_by_value_matches_ordinary(tmp_path):
    clip = {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}
    in_backward = _train_two_scalars(tmp_path, [OptimizerInBackward()], **clip)
    ordinary = _train_two_scalars(tmp_path, [], **clip)

    assert in_backward == pytest.approx((-0.005, -0.005), abs=1e-7)
    assert in_backward == pytest.approx(ordinary, abs=1e-7)


class _ClippingHookModule(_TwoScalarModule):
    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")


@pytest.mark.parametrize(
    ("trainer_kwargs", "callbacks", "module_class", "message"),
    [
        (
            {"gradient_clip_val": 1.0},
            [],
            _TwoScalarModule,
            r"gradient_clip_val=1.0 with gradient_clip_algorithm='norm'",
        ),
        (
            {"gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm"},
            [],
            _TwoScalarModule,
            r"gradient_clip_val=1.0",
        ),
        ({"accumulate_grad_batches": 2}, [], _TwoScalarModule, r"accumulate_grad_batches=2"),
        (
            {},
            [GradientAccumulationScheduler({1: 2})],
            _TwoScalarModule,
            r"GradientAccumulationScheduler",
        ),
        (
            {},
            [],
            _ClippingHookModule,
            r"_ClippingHookModule.configure_gradient_clipping is overridden",
        ),
    ],
    ids=[
        "clip-norm-default",
        "clip-norm",
        "accumulation",
        "accumulation-scheduler",
        "clipping-hook",
    ],
)
def test_unsupported_setting_raises_at_setup(
    tmp_path, trainer_kwargs, callbacks, module_class, message
):
    module = module_class()
    trainer = cpu_trainer(
        tmp_path, max_steps=1, callbacks=[OptimizerInBackward(), *callbacks], **trainer_kwargs
    )

    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(module, _one_batch())
    assert trainer.global_step == 0
    assert module.a.item() == 0.0


class _NoOptimizerModule(_TwoScalarModule):
    def configure_optimizers(self):
        return None


class _ManualModule(RegressionModule):
    """Manual optimization with ``num_optimizers`` optimizers; the first one steps."""

    def __init__(self, num_optimizers: int) -> None:
        super().__init__(
            lambda module: [
                torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
                for _ in range(num_optimizers)
            ]
        )
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_missing_optimizer_raises(tmp_path):
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[OptimizerInBackward()])
    with pytest.raises(MisconfigurationException, match="configure_optimizers returned None"):
        trainer.fit(_NoOptimizerModule(), _one_batch())


def test_manual_two_optimizers_raises(tmp_path):
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[OptimizerInBackward()])
    with pytest.raises(MisconfigurationException, match=r"returned 2 \(SGD, SGD\)"):
        trainer.fit(_ManualModule(num_optimizers=2), regression_loader(4))
    assert trainer.global_step == 0


def test_manual_one_optimizer_matches_ordinary(tmp_path):
    states = []
    for callbacks in ([], [OptimizerInBackward()]):
        torch.manual_seed(0)
        module = _ManualModule(num_optimizers=1)
        cpu_trainer(tmp_path, max_steps=3, callbacks=callbacks).fit(module, regression_loader(4))
        states.append(cloned_state(module))

    assert max_difference(*states) <= 1e-6


class _HeadLaterModule(RegressionModule):
    """Trains everything but the head, which ``_UnfreezeHead`` adds as a param group later."""

    def __init__(self) -> None:
        super().__init__(sgd_momentum_with_epoch_decay)
        self.net.head.requires_grad_(False)

    def configure_optimizers(self):
        params = [p for name, p in self.named_parameters() if not name.startswith("net.head")]
        return torch.optim.AdamW(params, lr=1e-2)


class _UnfreezeHead(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            pl_module.net.head.requires_grad_(True)
            group = {"params": list(pl_module.net.head.parameters()), "lr": 5e-2}
            trainer.optimizers[0].add_param_group(group)


def test_param_group_added_during_fit(tmp_path):
    states = []
    for callbacks in ([_UnfreezeHead()], [OptimizerInBackward(), _UnfreezeHead()]):
        torch.manual_seed(0)
        module = _HeadLaterModule()
        initial_head = module.net.head.weight.detach().clone()
        cpu_trainer(tmp_path, max_steps=4, callbacks=callbacks).fit(module, regression_loader(4))
        assert not torch.equal(module.net.head.weight, initial_head)
        states.append(cloned_state(module))

    assert max_difference(*states) <= 1e-6
