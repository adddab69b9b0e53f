"""The ``lit-tune`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

Model and data are given by class path, so any LightningModule or LightningDataModule works, not
only lit_tune's::

    lit-tune fit --config configs/sft_tiny.yaml
    lit-tune fit --config configs/sft_tiny.yaml --print_config > my_run.yaml
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    BasePredictionWriter,
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_tune.callbacks.preemption import PreemptionCheckpoint
from lit_tune.checkpoint_io import AtomicCheckpointIO
from lit_tune.generation import JsonlPredictionWriter

log = logging.getLogger(__name__)


class LitTuneCLI(LightningCLI):
    """LightningCLI with lit_tune's trainer defaults.

    Unless the config already has a callback of the same kind, or turned the feature off, the
    trainer gets a Rich progress bar, ``LearningRateMonitor``, ``ModelCheckpoint(save_last=True)``
    and :class:`~lit_tune.callbacks.preemption.PreemptionCheckpoint`, and ``predict`` writes
    ``<log_dir>/predictions.jsonl`` with :class:`~lit_tune.generation.JsonlPredictionWriter`. Checkpoint writes are made
    atomic unless a config sets its own checkpoint plugin.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as LightningCLI does, and keep ``args`` for :meth:`_parse_ckpt_path`."""
        self._args = args
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # `--ckpt_path last` would make Lightning look in this run's new version_N folder, which is
        # empty, so it would warn and train from step 0. Resolve it to the newest last*.ckpt of
        # earlier runs under default_root_dir instead.
        resolved = self._resolve_last_checkpoint()
        # LightningCLI (2.6) applies the hyperparameters saved in a --ckpt_path checkpoint over the
        # whole parsed config, so a model value from a config file or the command line was silently
        # replaced. The checkpoint now fills the model arguments first, and the config files and
        # command line are parsed again on top: command line > config file > checkpoint > defaults.
        parsed = self.config
        super()._parse_ckpt_path()
        if self.config is not parsed and not isinstance(self._args, dict):
            self.config = self.parser.parse_args(self._args, namespace=self.config.clone())
        if resolved is not None:
            self.config[f"{self.config.subcommand}.ckpt_path"] = resolved

    def _resolve_last_checkpoint(self) -> str | None:
        subcommand = self.config.get("subcommand")
        if not subcommand or self.config[subcommand].get("ckpt_path") != "last":
            return None
        root = Path(self.config[subcommand].trainer.get("default_root_dir") or ".")
        candidates = [path for path in root.glob("**/checkpoints/last*.ckpt") if path.exists()]
        if not candidates:
            log.warning("--ckpt_path last: no last*.ckpt under %s, so training starts from scratch.", root)
            return None
        newest = str(max(candidates, key=lambda path: path.stat().st_mtime))
        log.info("--ckpt_path last: resuming from %s, the newest last*.ckpt under %s.", newest, root)
        self.config[f"{subcommand}.ckpt_path"] = newest
        return newest

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Instantiate the trainer with the default callbacks that do not clash with the config."""
        config = self._get(self.config_init, "trainer", default={})
        self.trainer_defaults["callbacks"] = _default_callbacks(config, self.subcommand)
        trainer = super().instantiate_trainer(**kwargs)
        # Set here rather than through `trainer.plugins` so that printed configs stay plain.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def _default_callbacks(trainer_config: dict[str, Any], subcommand: str | None) -> list[Callback]:
    given = trainer_config.get("callbacks") or []
    given = given if isinstance(given, list) else [given]

    def has(kind: type) -> bool:
        return any(isinstance(callback, kind) for callback in given)

    defaults: list[Callback] = []
    if trainer_config.get("enable_progress_bar", True) is not False and not has(ProgressBar):
        defaults.append(RichProgressBar())
    if trainer_config.get("logger", True) is not False and not has(LearningRateMonitor):
        defaults.append(LearningRateMonitor(logging_interval="step"))
    if trainer_config.get("enable_checkpointing", True) is not False and not has(ModelCheckpoint):
        defaults.append(ModelCheckpoint(save_last=True))
    if not has(PreemptionCheckpoint):
        defaults.append(PreemptionCheckpoint())
    if subcommand == "predict" and not has(BasePredictionWriter):
        defaults.append(JsonlPredictionWriter())
    return defaults


def main(args: list[str] | None = None) -> None:
    """Run the ``lit-tune`` command line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        LitTuneCLI(args=args)
    finally:
        # Under torchrun, exiting with the gloo or NCCL process group alive can abort the process
        # at interpreter shutdown ("terminate called without an active exception") after a
        # successful run, and the launcher then reports a failure.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
