"""SIGTERM under 2-process FSDP2, launched by ``torch.distributed.run`` from test_fsdp2_preemption.py.

Usage: ``fsdp2_preemption_script.py OUT straight_then_preempt`` trains ``STEPS`` steps without
interruption, then trains again and sends SIGTERM to rank 1 only, at the end of step ``STOP_AT``;
the second fit ends the process. ``fsdp2_preemption_script.py OUT resume`` resumes the second run
from its checkpoint. Every rank writes its per-step losses and, at the end of training, the sum
and norm of every full parameter, to ``OUT/<run>-rank<r>.jsonl``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from transformers import LlamaForCausalLM

from lit_tune.callbacks import PreemptionCheckpoint
from lit_tune.data.sft import SFTDataModule
from lit_tune.models.tiny import tiny_llama_config
from lit_tune.modules.sft import SFTModule
from lit_tune.strategies import FSDP2Strategy

SEED = 7
STEPS = 8
STOP_AT = 4
ROWS = [{"prompt": f"{a}*{b}=", "response": str(a * b)} for a in range(1, 7) for b in range(2, 6)]


class DropoutSFTModule(SFTModule):
    """A 2-layer Llama with attention dropout, so that the losses depend on each rank's RNG."""

    def build_model(self) -> LlamaForCausalLM:
        config = tiny_llama_config(len(self.tokenizer))
        config.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "num_key_value_heads": 2, "attention_dropout": 0.2})
        torch.manual_seed(SEED)
        return LlamaForCausalLM(config)


class Record(Callback):
    """Append each step's loss, and the final parameters' sums and norms, to a per-rank file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, entry: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(entry) + "\n")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self._write({"step": trainer.global_step, "loss": float(outputs["loss"]), "lr": lr})

    def on_train_end(self, trainer, module) -> None:
        params = {}
        for name, param in module.named_parameters():
            full = param.full_tensor().double()  # a collective: every rank calls it
            params[name] = [float(full.sum()), float(full.norm())]
        self._write({"params": params})


class SigtermAt(Callback):
    """Send SIGTERM to this process on one rank only, at the end of one step."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def fit(out: Path, run: str, extra: list[Callback], ckpt_path: str | None = None) -> None:
    """Train the module for ``STEPS`` steps on 2 ranks; a SIGTERM stops it early."""
    module = DropoutSFTModule(model="tiny", export=False)
    data = SFTDataModule(rows=ROWS, batch_size=2, val_fraction=0.0, seed=SEED)
    rank = int(os.environ["RANK"])
    callbacks = [*extra, Record(out / f"{run}-rank{rank}.jsonl"), PreemptionCheckpoint(dirpath=str(out / "ckpt"))]
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, default_root_dir=out,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)


def main(out: Path, mode: str) -> None:
    """Run ``mode`` (see the module docstring)."""
    if mode == "straight_then_preempt":
        fit(out, "straight", [])
        L.seed_everything(SEED, verbose=False)
        fit(out, "preempted", [SigtermAt(STOP_AT, rank=1)])
        raise AssertionError("the preempted fit returned instead of ending the process")
    fit(out, "resumed", [], ckpt_path=str(out / "ckpt" / "last-preempted.ckpt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    L.seed_everything(SEED, verbose=False)
    try:
        main(Path(sys.argv[1]), sys.argv[2])
    finally:
        # Exiting with gloo's threads still running can abort the process at shutdown.
        if dist.is_initialized():
            dist.destroy_process_group()
