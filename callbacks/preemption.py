"""Save a checkpoint and exit cleanly when the process receives SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """Write a resumable checkpoint when SIGTERM arrives, then stop ``fit`` with exit status 0.

    Schedulers (SLURM, Kubernetes, ``torchrun``) send SIGTERM some seconds before they kill a job.
    While training runs, this callback's SIGTERM handler only records the signal. At the end of
    every training batch the ranks agree, with one all-reduce, whether any of them received it.
    If one did, all of them save the checkpoint together (as sharded checkpoints require) and
    raise Lightning's ``SIGTERMException``, a ``SystemExit`` that ends the process with status 0.
    The checkpoint contains a consistent model, optimizer, scheduler, RNG and data position, so
    ``fit(ckpt_path=...)`` continues as if nothing happened.

    The handler replaces Lightning's own while ``fit`` runs, because Lightning's handler runs a
    broadcast. That broadcast can pair with a different collective on a rank that has not
    received the signal yet, which corrupts the other collective's data or hangs the run.

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
        self._received = False
        self._previous_handler: Any = None

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        """Where the checkpoint is written."""
        if self.dirpath:
            return Path(self.dirpath) / self.filename
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / "checkpoints" / self.filename

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: no I/O or collectives inside a signal handler.
        self._received = True

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received = False
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: fit runs outside the main thread, so SIGTERM cannot be handled")
            return
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        log.info("SIGTERM received: saved a checkpoint at step %d to %s", trainer.global_step, path)
        raise SIGTERMException()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


__all__ = ["PreemptionCheckpoint"]
