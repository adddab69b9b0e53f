"""DPOModule under FSDP2Strategy, launched by ``torch.distributed.run``; results go to JSON files.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 dpo_fsdp2_cases.py OUT CASE [CASE ...]``.
Each case trains a few steps with a real Lightning ``Trainer`` and rank 0 writes
``OUT/<case>.json``. ``run_case`` also runs in a single process, which gives the reference values.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.distributed.fsdp import FSDPModule
from transformers import LlamaForCausalLM

from lit_tune.data.preference import PreferenceDataModule
from lit_tune.models.tiny import tiny_llama_config
from lit_tune.modules.dpo import DPOModule
from lit_tune.strategies import FSDP2Strategy

SEED = 1234
STEPS = 3
GLOBAL_BATCH = 4
ROWS = [
    {"prompt": f"{a}+{b}", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 3)}
    for a, b in [
        (1, 2),
        (3, 4),
        (5, 6),
        (7, 8),
        (2, 9),
        (4, 4),
        (6, 1),
        (8, 3),
        (9, 9),
        (1, 7),
        (3, 3),
        (5, 2),
    ]
]
# case: (tensor-parallel size, data-parallel size, reference mode); None sizes mean one process.
CASES = {
    "single": (None, None, "precomputed"),
    "tp2": (2, 1, "precomputed"),
    "tp2_live": (2, 1, "live"),
    "dp2": (1, 2, "precomputed"),
    "dp2_live": (1, 2, "live"),
}


class ShardableDPOModule(DPOModule):
    """DPOModule on a 2-layer Llama whose 2 attention and 2 key-value heads split over 2 ranks."""

    def build_model(self) -> LlamaForCausalLM:
        config = tiny_llama_config(len(self.tokenizer))
        config.update(
            {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            }
        )
        torch.manual_seed(SEED)  # the same initial weights on every rank
        return LlamaForCausalLM(config)


class LossRecorder(Callback):
    """Record the loss each training step returns (the normalised loss of the micro-batch)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, index: int
    ) -> None:
        self.losses.append(float(outputs["loss"].detach()))


def _mean_over_ranks(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def run_case(case: str, out: Path) -> dict[str, Any]:
    """Train ``case`` for ``STEPS`` optimizer steps and return its losses and metrics.

    Every optimizer step trains on the same ``GLOBAL_BATCH`` pairs whatever the layout, so the
    per-step losses (averaged over ranks) are comparable across cases.
    """
    tensor_parallel, data_parallel, reference = CASES[case]
    strategy: Any = "auto"
    if tensor_parallel is not None:
        strategy = FSDP2Strategy(
            tensor_parallel_size=tensor_parallel, data_parallel_size=data_parallel
        )
    optimizer = lambda params: torch.optim.SGD(params, lr=0.5)  # noqa: E731
    module = ShardableDPOModule(
        model="tiny", export=False, reference=reference, optimizer=optimizer
    )
    data = PreferenceDataModule(
        rows=ROWS, val_fraction=0.34, batch_size=GLOBAL_BATCH // (data_parallel or 1), seed=SEED
    )
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("WORLD_SIZE", "1")) if tensor_parallel is not None else 1,
        strategy=strategy,
        max_steps=STEPS,
        val_check_interval=STEPS,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    reference = module.reference_model
    reference_layers = reference.model.layers if reference is not None else []
    reference_weight = reference_layers[0].mlp.up_proj.weight if reference is not None else None
    return {
        "losses": _mean_over_ranks(recorder.losses),
        "reference": [[row.reference_chosen, row.reference_rejected] for row in data.train_rows],
        "val": metrics,
        "head_placements": str(getattr(module.model.lm_head.weight, "placements", None)),
        "reference_layers_sharded": [isinstance(layer, FSDPModule) for layer in reference_layers],
        "reference_placements": str(getattr(reference_weight, "placements", None)),
    }


def main() -> None:
    out = Path(sys.argv[1])
    for case in sys.argv[2:]:
        result = run_case(case, out / case)
        if dist.get_rank() == 0:
            (out / f"{case}.json").write_text(json.dumps(result))
        dist.barrier()
    # Leaving with the gloo process group alive can abort the process at exit.
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
