"""Runner for lit_tune: ``SFTModule`` and a plain ``lightning.Trainer``, as a user script would.

The shared sequences become lit_tune ``Row`` objects (labels equal to the tokens) served by
lit_tune's ``ResumableBatchLoader`` without shuffling, which is how pre-tokenized data enters
lit_tune. The module uses its defaults apart from the spec's AdamW settings, a constant learning
rate and no export. The Trainer keeps its default logger and logs every step, like the peers;
checkpointing and the progress bar are off because the peers run without them. A callback
timestamps ``on_train_batch_end``, which Lightning calls after the optimizer step.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim.lr_scheduler import LambdaLR

from lit_tune import SFTModule
from lit_tune.data import ResumableBatchLoader, Row

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepClock, load_sequences, parse_spec, write_result  # noqa: E402


class _Timing(Callback):
    def __init__(self, clock: StepClock, losses: list[float]) -> None:
        self.clock = clock
        self.losses = losses

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.tick()
        self.losses.append(float(outputs["loss"]))


def _constant_schedule(optimizer: torch.optim.Optimizer) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: 1.0)


def main() -> None:
    """Train lit_tune's SFTModule on the spec's model and sequences and write the timings."""
    spec = parse_spec(__doc__.splitlines()[0])
    L.seed_everything(spec.seed, verbose=False)
    sequences = load_sequences(spec)
    module = SFTModule(
        model=spec.model_dir,
        optimizer=partial(torch.optim.AdamW, lr=spec.lr, weight_decay=0.0),
        lr_scheduler=_constant_schedule,
        export=False,
    )
    rows = [Row(list(ids), list(ids)) for ids in sequences]
    loader = ResumableBatchLoader(rows, spec.batch_size, module.tokenizer.pad_token_id, shuffle=False)
    clock, losses = StepClock(), []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=spec.steps,
        log_every_n_steps=1,
        default_root_dir=str(Path(spec.work_dir) / "lit_tune"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_Timing(clock, losses)],
    )
    trainer.fit(module, train_dataloaders=loader)
    optimizer = trainer.optimizers[0]
    notes = {
        "optimizer": type(optimizer).__name__,
        "fused": optimizer.defaults.get("fused"),
        "foreach": optimizer.defaults.get("foreach"),
    }
    write_result(spec, clock, losses, notes)


if __name__ == "__main__":
    main()
