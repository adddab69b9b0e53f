"""Save a checkpoint and exit cleanly when the process receives SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """Write a resumable checkpoint when SIGTERM arrives, then stop ``fit`` with exit status 0.

    Schedulers (SLURM, Kubernetes) send SIGTERM some seconds before they kill a job. Lightning
    records the signal; this callback saves at the next batch boundary, so the checkpoint holds a
    consistent model, optimizer, scheduler and data position, and ``fit(ckpt_path=...)`` continues
    as if nothing happened.

    - One process: saves in ``on_train_batch_end`` and raises Lightning's ``SIGTERMException`` (a
      ``SystemExit``), which ends the process with status 0.
    - Several processes: Lightning broadcasts rank 0's signal at the start of the next batch and
      raises ``SIGTERMException`` on every rank; the checkpoint is saved from ``on_exception``, where
      all ranks take part, as sharded strategies require.

    Args:
        dirpath: Folder of the checkpoint; defaults to ``<log_dir>/checkpoints`` like
            ``ModelCheckpoint``.
        filename: File name of the checkpoint. The default starts with ``last`` so that
            ``fit(ckpt_path="last")`` finds it beside ``ModelCheckpoint``'s ``last.ckpt`` and takes
            the newer of the two.

    Example::

        trainer = Trainer(callbacks=[PreemptionCheckpoint()], plugins=[AtomicCheckpointIO()])
        trainer.fit(module, ckpt_path="last")  # the newer of last.ckpt and last-preempted.ckpt
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last-preempted.ckpt") -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.saved_path: Path | None = None

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        """Where the checkpoint is written."""
        if self.dirpath:
            return Path(self.dirpath) / self.filename
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / "checkpoints" / self.filename

    def _save(self, trainer: L.Trainer) -> None:
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        log.info("SIGTERM received: saved a checkpoint at step %d to %s", trainer.global_step, path)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.received_sigterm and trainer.world_size == 1:
            self._save(trainer)
            raise SIGTERMException()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and self.saved_path is None:
            self._save(trainer)


__all__ = ["PreemptionCheckpoint"]
