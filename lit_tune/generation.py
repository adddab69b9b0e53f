"""Greedy generation for ``predict``: prompts cut from batches, completions written as JSONL."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from lit_tune.data.collate import TokenBatch
from lit_tune.losses import IGNORE_INDEX

log = logging.getLogger(__name__)


def split_prompts(batch: TokenBatch) -> list[tuple[list[int], list[int]]]:
    """Split each row of an unpacked batch into ``(prompt_ids, reference_ids)``.

    The prompt ends where the first trained label starts; the reference is the rest of the row
    without padding. Rows without any trained label are left out: they are the masked repeats
    that fill the last batch of an epoch.

    Raises:
        ValueError: For packed batches, whose rows hold several documents.
    """
    if batch.position_ids is not None:
        raise ValueError("predict needs unpacked rows; set packing=False on the data module.")
    rows = []
    for ids, labels, mask in zip(batch.input_ids.tolist(), batch.labels.tolist(), batch.attention_mask.tolist()):
        length = sum(mask)
        trained = [i for i in range(length) if labels[i] != IGNORE_INDEX]
        if trained:
            rows.append((ids[: trained[0]], ids[trained[0] : length]))
    return rows


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Generate greedily from each prompt until EOS or ``max_new_tokens``; return the new ids."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    # Left padding keeps every prompt's last token at the same position.
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    output: Tensor = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1,
    )
    completions = []
    for row in output[:, width:].tolist():
        end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        completions.append(row[:end])
    return completions


class JsonlPredictionWriter(BasePredictionWriter):
    """Write what ``predict_step`` returns (a list of dicts per batch) to JSON Lines.

    Each rank writes its own file, ``<stem>.rank<N>.jsonl`` when there are several ranks.

    Args:
        output_path: The JSONL file to write; None for ``<log_dir>/predictions.jsonl``.

    Example::

        trainer = Trainer(callbacks=[JsonlPredictionWriter("predictions.jsonl")])
        trainer.predict(module, datamodule=data)
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path

    def _path(self, trainer: L.Trainer) -> Path:
        path = Path(self.output_path or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl")
        if trainer.world_size == 1:
            return path
        return path.with_suffix(f".rank{trainer.global_rank}.jsonl")

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        with self._path(trainer).open("a") as handle:
            for record in prediction:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log.info("Wrote predictions to %s", self._path(trainer))


__all__ = ["JsonlPredictionWriter", "greedy_generate", "split_prompts"]
