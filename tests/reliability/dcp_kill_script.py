"""A 1-process FSDP2 fit that saves a distributed checkpoint every step and is killed mid-save.

Usage: ``dcp_kill_script.py OUT kill`` trains with ``ModelCheckpoint(save_last=True)`` every step;
a watcher thread sends SIGKILL to the process as soon as the third save has written a shard into
``last.ckpt.partial``. ``dcp_kill_script.py OUT resume`` resumes from ``last.ckpt`` and writes
the step it resumed at to ``OUT/resumed_at.txt``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_tune.data.sft import SFTDataModule
from lit_tune.modules.sft import SFTModule
from lit_tune.strategies import FSDP2Strategy

ROWS = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(8) for b in range(4)]


def _kill_on_third_save(partial: Path, saves: list[int]) -> None:
    while True:
        if len(saves) >= 3 and any(partial.glob("*.distcp")):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.0005)


class CountSaves(Callback):
    """Count checkpoint saves as they start (``on_save_checkpoint`` runs before the write)."""

    def __init__(self, saves: list[int]) -> None:
        self.saves = saves

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.saves.append(trainer.global_step)


class RecordStart(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer, module) -> None:
        self.path.write_text(str(trainer.global_step))


def main(out: Path, mode: str) -> None:
    """Train or resume; see the module docstring."""
    torch.set_num_threads(1)
    saves: list[int] = []
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=out, save_last=True, every_n_train_steps=1, save_top_k=0)]
    if mode == "kill":
        callbacks.append(CountSaves(saves))
        threading.Thread(target=_kill_on_third_save, args=(out / "last.ckpt.partial", saves), daemon=True).start()
    else:
        callbacks.append(RecordStart(out / "resumed_at.txt"))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=FSDP2Strategy(), max_steps=6, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=out,
    )
    module = SFTModule(model="tiny", export=False)
    data = SFTDataModule(rows=ROWS, batch_size=4, val_fraction=0.0)
    trainer.fit(module, datamodule=data, ckpt_path=str(out / "last.ckpt") if mode == "resume" else None)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    if torch.distributed.is_initialized():  # an exit with gloo's threads alive can abort
        torch.distributed.destroy_process_group()
