"""A 2-process fit on CPU in which rank 1 raises at step 2 (used by test_rank_failure.py).

Usage: ``rank_failure_script.py [ddp|fsdp2]``; Lightning launches the second process.
"""

import sys

import lightning as L
import torch

from lit_tune import SFTDataModule, SFTModule
from lit_tune.strategies import FSDP2Strategy


class FailingModule(SFTModule):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 2:
            raise RuntimeError("rank 1 failed on purpose")
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    torch.set_num_threads(1)
    strategy = FSDP2Strategy() if sys.argv[1:] == ["fsdp2"] else "ddp"
    module = FailingModule(model="tiny", export=False)
    data = SFTDataModule(rows=[{"prompt": "a", "response": "bc"}] * 16, batch_size=2, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=10, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
