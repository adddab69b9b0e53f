"""``SFTDataModule``: rows to tokenized, masked, optionally packed training batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_tune.data.collate import Row, pack_rows
from lit_tune.data.formatting import (
    ColumnMap,
    FormatStats,
    build_example,
    encode_prompt,
    encode_response,
    row_to_messages,
)
from lit_tune.data.loader import BatchLoader, ResumableBatchLoader
from lit_tune.data.sources import DataFormatError, NumberedRows, load_rows, split_train_val
from lit_tune.models.loading import load_tokenizer

log = logging.getLogger(__name__)


def data_parallel_info(trainer: L.Trainer | None) -> tuple[int, int]:
    """Return ``(num_replicas, rank)`` of the data-parallel group; ``(1, 0)`` without a trainer."""
    if trainer is None:
        return 1, 0
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return kwargs.get("num_replicas", 1), kwargs.get("rank", 0)


def train_placement(trainer: L.Trainer | None) -> dict[str, int]:
    """Return the ``accumulate_grad_batches``, ``num_replicas`` and ``rank`` a training loader needs."""
    num_replicas, rank = data_parallel_info(trainer)
    accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
    return {"accumulate_grad_batches": accumulate, "num_replicas": num_replicas, "rank": rank}


class SFTDataModule(L.LightningDataModule):
    """Supervised fine-tuning data: prompt/response pairs or chat transcripts, prompt-masked.

    Rows come from a local JSONL/JSON/CSV/Parquet file (``.gz`` too), a hub data set, in-memory
    rows, or ``"builtin:arithmetic"``. Columns are detected (``messages``; ``prompt``/``response``;
    ``question``/``answer``; ``prompt``/``completion``) unless mapped explicitly. Rows with an
    empty response are dropped, rows longer than ``max_seq_len`` are truncated (or dropped), and
    the counts are logged.

    Args:
        path: Data source: file path, hub name, or ``"builtin:<name>"``.
        rows: In-memory rows; used instead of ``path`` when given.
        tokenizer: Tokenizer source: ``"tiny"``, a local folder or ``.gguf`` file, or a hub name.
        val_path: Separate validation data; when None, ``val_fraction`` of the rows is held out.
        val_fraction: Share of rows held out for validation when ``val_path`` is None (0 for none).
        prompt_column: Column holding the prompt; None to detect.
        response_column: Column holding the response; None to detect.
        messages_column: Column holding a chat transcript; None to detect.
        system_prompt: System message added to every prompt that has none.
        use_chat_template: Render with the tokenizer's chat template (lit_tune's default template
            when it has none); False joins prompt and response as plain text.
        mask_prompt: Take no loss on prompt tokens.
        max_seq_len: Maximum tokens per example (and per packed row).
        overlong: ``"truncate"`` cuts the end of the response; ``"drop"`` drops the row.
        packing: Concatenate examples into rows of ``max_seq_len`` with per-document attention.
        batch_size: Rows per micro-batch on each rank.
        val_batch_size: Rows per validation batch; defaults to ``batch_size``.
        seed: Seed for the validation split and the per-epoch shuffle.
        drop_last: Drop the last incomplete training batch.
        trust_remote_code: Allow tokenizer code from the tokenizer source to run.
    """

    def __init__(
        self,
        path: str = "builtin:arithmetic",
        rows: Sequence[Mapping[str, Any]] | None = None,
        tokenizer: str = "tiny",
        val_path: str | None = None,
        val_fraction: float = 0.05,
        prompt_column: str | None = None,
        response_column: str | None = None,
        messages_column: str | None = None,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        mask_prompt: bool = True,
        max_seq_len: int = 512,
        overlong: Literal["truncate", "drop"] = "truncate",
        packing: bool = False,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["rows"])
        _check_args(val_fraction, max_seq_len, overlong, batch_size)
        self.rows = rows
        self.columns = ColumnMap(prompt_column, response_column, messages_column)
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.train_rows: list[Row] = []
        self.val_rows: list[Row] = []

    @override
    def setup(self, stage: str) -> None:
        if self.train_rows or self.val_rows:
            return
        train, val, source = self._split_rows()
        self.train_rows = self._tokenize(train, f"{source} (train)")
        self.val_rows = self._tokenize(val, f"{source} (validation)") if val else []
        if self.hparams.packing:
            self.train_rows = pack_rows(self.train_rows, self.hparams.max_seq_len)
            self.val_rows = pack_rows(self.val_rows, self.hparams.max_seq_len)
            rank_zero_info(f"Packed into {len(self.train_rows)} train and {len(self.val_rows)} validation rows.")
        if not self.train_rows:
            raise DataFormatError(f"{source}: no training rows are left after filtering; see the counts above.")

    def _split_rows(self) -> tuple[NumberedRows, NumberedRows, str]:
        hp = self.hparams
        rows, source = load_rows(self.rows if self.rows is not None else hp.path)
        if hp.val_path:
            val, _ = load_rows(hp.val_path)
            return list(enumerate(rows, start=1)), list(enumerate(val, start=1)), source
        train, val = split_train_val(rows, hp.val_fraction, hp.seed)
        return train, val, source

    def _tokenize(self, rows: NumberedRows, source: str) -> list[Row]:
        stats = FormatStats(rows=len(rows))
        examples = [ex for number, row in rows if (ex := self.encode_row(row, f"{source}, row {number}", stats))]
        stats.kept = len(examples)
        rank_zero_info(f"{source}: {stats.summary()}.")
        self.last_stats = stats
        return examples

    def encode_row(self, row: Mapping[str, Any], where: str, stats: FormatStats) -> Row | None:
        """Tokenize one row into a training :class:`Row`, or None when it is dropped (counted in ``stats``).

        Args:
            row: The raw row.
            where: Its location, used in error messages.
            stats: Counters updated for dropped and truncated rows.

        Raises:
            DataFormatError: Missing columns or malformed values.
        """
        hp = self.hparams
        columns = self.columns.resolve(row, where)
        prompt, response = row_to_messages(row, columns, where, hp.system_prompt)
        if not response.strip():
            stats.dropped_empty_response += 1
            return None
        prompt_ids = encode_prompt(self.tokenizer, prompt, hp.use_chat_template)
        response_ids = encode_response(self.tokenizer, prompt, response, hp.use_chat_template)
        overflow = len(prompt_ids) + len(response_ids) - hp.max_seq_len
        if overflow > 0:
            if hp.overlong == "drop" or overflow >= len(response_ids):
                stats.dropped_too_long += 1
                return None
            stats.truncated += 1
            response_ids = response_ids[:-overflow]
        input_ids, labels = build_example(prompt_ids, response_ids, mask_prompt=hp.mask_prompt)
        return Row(input_ids, labels)

    @override
    def train_dataloader(self) -> ResumableBatchLoader:
        return ResumableBatchLoader(
            self.train_rows,
            self.hparams.batch_size,
            self.tokenizer.pad_token_id,
            shuffle=True,
            seed=self.hparams.seed,
            drop_last=self.hparams.drop_last,
            **train_placement(self.trainer),
        )

    @override
    def val_dataloader(self) -> BatchLoader | list:
        if not self.val_rows:
            return []
        num_replicas, rank = data_parallel_info(self.trainer)
        batch_size = self.hparams.val_batch_size or self.hparams.batch_size
        return BatchLoader(self.val_rows, batch_size, self.tokenizer.pad_token_id, num_replicas=num_replicas, rank=rank)

    @override
    def test_dataloader(self) -> BatchLoader | list:
        return self.val_dataloader()

    @override
    def predict_dataloader(self) -> BatchLoader | list:
        """The validation rows: ``predict`` generates from their prompts."""
        return self.val_dataloader()


def _check_args(val_fraction: float, max_seq_len: int, overlong: str, batch_size: int) -> None:
    problems = []
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction={val_fraction} must be in [0, 1).")
    if max_seq_len < 2:
        problems.append(f"max_seq_len={max_seq_len} must be at least 2.")
    if overlong not in ("truncate", "drop"):
        problems.append(f"overlong={overlong!r} must be 'truncate' or 'drop'.")
    if batch_size < 1:
        problems.append(f"batch_size={batch_size} must be at least 1.")
    if problems:
        raise ValueError("Invalid SFTDataModule arguments: " + " ".join(problems))


__all__ = ["SFTDataModule", "data_parallel_info", "train_placement"]
