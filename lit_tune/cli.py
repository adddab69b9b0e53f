"""The ``lit-tune`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

Model and data are given by class path, so any LightningModule or LightningDataModule works, not
only lit_tune's::

    lit-tune fit --config configs/sft_tiny.yaml
    lit-tune fit --config configs/sft_tiny.yaml --print_config > my_run.yaml
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_tune.callbacks.preemption import PreemptionCheckpoint
from lit_tune.checkpoint_io import AtomicCheckpointIO


class LitTuneCLI(LightningCLI):
    """LightningCLI with lit_tune's trainer defaults.

    The defaults are a Rich progress bar, ``LearningRateMonitor``, ``ModelCheckpoint(save_last=True)`` and
    :class:`~lit_tune.callbacks.preemption.PreemptionCheckpoint`; they apply only when a config does
    not set ``trainer.callbacks`` itself. Checkpoint writes are made atomic unless a config sets its
    own checkpoint plugin.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", _trainer_defaults())
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Instantiate the trainer, then make its checkpoint writes atomic.

        Done here rather than through ``trainer.plugins`` so that printed configs stay plain.
        """
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def _trainer_defaults() -> dict:
    return {
        "callbacks": [
            RichProgressBar(),
            LearningRateMonitor(logging_interval="step"),
            ModelCheckpoint(save_last=True),
            PreemptionCheckpoint(),
        ],
    }


def main(args: list[str] | None = None) -> None:
    """Run the ``lit-tune`` command line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    LitTuneCLI(args=args)


if __name__ == "__main__":
    main()
