"""GRPOModule under FSDP2Strategy on 2 CPU processes; run by ``test_grpo_fsdp2.py``.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 grpo_fsdp2_script.py OUT MODEL_DIR``.
Rank 0 writes ``OUT/<case>.pt`` for each case.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lit_tune.data.prompts import PromptDataModule
from lit_tune.modules.grpo import GRPOModule
from lit_tune.rl.rollout import _all_finished
from lit_tune.strategies import FSDP2Strategy

sys.path.insert(0, str(Path(__file__).parent))
from grpo_fsdp2_data import constant, fixed_rollout_batch, sgd  # noqa: E402


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


class _Single:
    """A loader of one batch (a plain list would be read as a list of loaders)."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        yield self.batch


def _trainer(out: Path, steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=int(os.environ["WORLD_SIZE"]),
        strategy=FSDP2Strategy(),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out,
        callbacks=callbacks,
        log_every_n_steps=1,
    )


def _data() -> PromptDataModule:
    rows = [{"prompt": f"Say {i}.", "answer": str(i)} for i in range(16)]
    return PromptDataModule(rows=rows, batch_size=2, use_chat_template=False)


def case_fixed(out: Path, model_dir: str) -> dict[str, Any]:
    """One SGD step on fixed rollouts, each rank holding half of them."""
    module = GRPOModule(model=model_dir, mode="sync", optimizer=sgd, lr_scheduler=constant, export=False)
    batch = fixed_rollout_batch(ranks=(int(os.environ["RANK"]),))
    _trainer(out, 1, []).fit(module, train_dataloaders=_Single(batch))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"state_dict": get_model_state_dict(module.model, options=options)}


def _generation_case(out: Path, model_dir: str, mode: str, steps: int) -> dict[str, Any]:
    recorder = Recorder()
    module = GRPOModule(
        model=model_dir, mode=mode, kl_coef=0.05, group_size=4, max_new_tokens=6, max_staleness=1, export=False
    )
    _trainer(out, steps, [recorder]).fit(module, datamodule=_data())
    # Every rank reports whether a worker process or its own rollouts loader is left running.
    left = torch.tensor([len(multiprocessing.active_children())], dtype=torch.long)
    dist.all_reduce(left)
    return {"steps": recorder.steps, "children_left": int(left.item())}


def case_sync(out: Path, model_dir: str) -> dict[str, Any]:
    return _generation_case(out, model_dir, "sync", steps=2)


def case_async(out: Path, model_dir: str) -> dict[str, Any]:
    return _generation_case(out, model_dir, "async", steps=3)


def case_stop(out: Path, model_dir: str) -> dict[str, Any]:
    """Sampling stops only when every rank is done, because each forward is a collective."""
    done_here = torch.tensor([dist.get_rank() == 0, dist.get_rank() == 0])
    return {"one_rank_done": _all_finished(done_here, synchronise=True), "all_done": _all_finished(torch.ones(2, dtype=torch.bool), synchronise=True)}


def main() -> None:
    out, model_dir = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    for name in ("fixed", "stop", "sync", "async"):
        L.seed_everything(0)
        result = globals()[f"case_{name}"](out, model_dir)
        if dist.get_rank() == 0:
            torch.save(result, out / f"{name}.pt")
        print(f"rank {dist.get_rank()}: case {name} done", flush=True)
    # Leaving with the process group still open can abort the interpreter at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
