"""``PromptDataModule``: prompts with reference answers, for RL with verifiable rewards (GRPO)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_tune.data.formatting import KNOWN_ROLES, FormatStats, encode_prompt
from lit_tune.data.loader import ResumableBatchLoader
from lit_tune.data.sft import train_placement
from lit_tune.data.sources import DataFormatError, load_rows
from lit_tune.models.loading import load_tokenizer
from lit_tune.rl.rollout import PromptBatch, PromptRow

log = logging.getLogger(__name__)

# Prompt columns detected when none is given, in order of preference.
_PROMPT_COLUMNS = ("prompt", "question", "messages")


class PromptLoader(ResumableBatchLoader):
    """Micro-batches of prompts: shuffled per epoch by seed, split over data-parallel ranks, resumable.

    The last incomplete global batch is filled with masked copies of earlier prompts (unless
    ``drop_last``), whose completions carry no loss, so that every rank runs the same number of
    steps. See :class:`~lit_tune.data.loader.ResumableBatchLoader` for the arguments.
    """

    @override
    def _masked_copy(self, row: PromptRow) -> PromptRow:
        return PromptRow(row.prompt_ids, row.prompt, row.fields, masked=True)

    @override
    def _weight(self, row: PromptRow) -> int:
        return 0 if row.masked else 1

    @override
    def _collate(self, rows: list[PromptRow], window_targets: int = 0) -> PromptBatch:
        return PromptBatch(rows)


class PromptDataModule(L.LightningDataModule):
    """Prompts and the data-row fields that reward functions check completions against.

    Each row gives a prompt (a text column, or a ``messages`` column with the chat so far) and any
    other columns, such as a reference ``answer``. Those columns reach the reward functions as
    keyword arguments. Prompts are rendered with the tokenizer's chat template and its generation
    prompt. Prompts longer than ``max_prompt_len`` tokens are dropped and counted.

    When the attached LightningModule has a ``rollout_loader(prompt_loader)`` method (as
    :class:`~lit_tune.modules.grpo.GRPOModule` does), ``train_dataloader`` returns what it makes of
    the prompt loader: the loader itself for synchronous generation, or a loader of rollouts fed by
    a generation worker for asynchronous generation.

    Args:
        path: Data source: JSONL/JSON/CSV/Parquet file, hub name, or ``"builtin:<name>"``.
        rows: In-memory rows; used instead of ``path`` when given.
        tokenizer: Tokenizer source: ``"tiny"``, a local folder or ``.gguf`` file, or a hub name.
        prompt_column: Column with the prompt; None detects ``prompt``, ``question`` or
            ``messages``.
        system_prompt: System message added to every prompt that has none.
        use_chat_template: Render prompts with the chat template; False uses the plain text and a
            newline.
        max_prompt_len: Longest prompt kept, in tokens.
        max_rows: Use only the first this many rows of the data; None uses all.
        batch_size: Prompts per micro-batch on each rank; each gets a group of completions.
        seed: Seed of the per-epoch shuffle.
        drop_last: Drop the last incomplete global batch instead of filling it with masked prompts.
        trust_remote_code: Allow tokenizer code from the tokenizer source to run.

    Example::

        data = PromptDataModule(path="data/gsm8k/train.jsonl", batch_size=8)
        trainer.fit(GRPOModule(model="out/sft"), datamodule=data)
    """

    def __init__(
        self,
        path: str = "builtin:fixed_answer",
        rows: Sequence[Mapping[str, Any]] | None = None,
        tokenizer: str = "tiny",
        prompt_column: str | None = None,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        max_prompt_len: int = 512,
        max_rows: int | None = None,
        batch_size: int = 8,
        seed: int = 0,
        drop_last: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["rows"])
        _check_args(max_prompt_len, max_rows, batch_size)
        self.rows = rows
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.train_prompts: list[PromptRow] = []
        self.stats = FormatStats()
        self._loader: Any = None

    @override
    def setup(self, stage: str) -> None:
        if self.train_prompts:
            return
        rows, source = load_rows(self.rows if self.rows is not None else self.hparams.path)
        if self.hparams.max_rows is not None:
            rows = rows[: self.hparams.max_rows]
        self.train_prompts = self.encode_rows(rows, source)
        if not self.train_prompts:
            raise DataFormatError(
                f"{source}: no prompt is left after filtering ({self.stats.summary()}). "
                f"Raise max_prompt_len (now {self.hparams.max_prompt_len}) or check the data."
            )

    def encode_rows(self, rows: Iterable[Mapping[str, Any]], source: str) -> list[PromptRow]:
        """Tokenize rows into prompts, dropping (and counting) those longer than ``max_prompt_len``.

        Args:
            rows: Raw data rows.
            source: Where they came from, used in messages.

        Raises:
            DataFormatError: A row without a prompt column, or with a malformed prompt.
        """
        hp = self.hparams
        stats = FormatStats()
        prompts = []
        for index, row in enumerate(rows):
            stats.rows += 1
            prompt = self.encode_row(row, f"{source}, row {index + 1}")
            if len(prompt.prompt_ids) > hp.max_prompt_len:
                stats.dropped_too_long += 1
                continue
            prompts.append(prompt)
        stats.kept = len(prompts)
        self.stats = stats
        rank_zero_info(f"{source}: {stats.summary()}.")
        return prompts

    def encode_row(self, row: Mapping[str, Any], where: str) -> PromptRow:
        """Tokenize one row into a :class:`~lit_tune.rl.rollout.PromptRow`.

        Args:
            row: The raw row.
            where: Its location, used in error messages.

        Raises:
            DataFormatError: A missing prompt column or a malformed prompt.
        """
        column = self._prompt_column(row, where)
        messages = _prompt_messages(row[column], column, where)
        if self.hparams.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.hparams.system_prompt}, *messages]
        prompt_ids = encode_prompt(self.tokenizer, messages, self.hparams.use_chat_template)
        fields = {name: value for name, value in row.items() if name != column}
        return PromptRow(prompt_ids=prompt_ids, prompt=row[column], fields=fields)

    def _prompt_column(self, row: Mapping[str, Any], where: str) -> str:
        configured = self.hparams.prompt_column
        candidates = [configured] if configured else [c for c in _PROMPT_COLUMNS if c in row]
        if not candidates or candidates[0] not in row:
            raise DataFormatError(
                f"{where}: no prompt column {configured or list(_PROMPT_COLUMNS)!r}; found {sorted(row)}. "
                "Set prompt_column to the column that holds the prompt."
            )
        return candidates[0]

    @override
    def train_dataloader(self) -> Any:
        loader = PromptLoader(
            self.train_prompts,
            self.hparams.batch_size,
            self.tokenizer.pad_token_id,
            shuffle=True,
            seed=self.hparams.seed,
            drop_last=self.hparams.drop_last,
            **train_placement(self.trainer),
        )
        module = self.trainer.lightning_module if self.trainer is not None else None
        wrap = getattr(module, "rollout_loader", None)
        self._loader = wrap(loader) if callable(wrap) else loader
        return self._loader

    @override
    def on_exception(self, exception: BaseException) -> None:
        self.close()

    @override
    def teardown(self, stage: str) -> None:
        self.close()

    def close(self) -> None:
        """Stop the generation worker behind the training loader, if there is one."""
        close = getattr(self._loader, "close", None)
        if callable(close):
            close()


def _prompt_messages(value: Any, column: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataFormatError(
            f"{where}: column {column!r} must be a string or a non-empty list of messages, "
            f"got {type(value).__name__} ({value!r:.60})."
        )
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or message.get("role") not in KNOWN_ROLES or not isinstance(message.get("content"), str):
            raise DataFormatError(
                f"{where}: message {index} of column {column!r} must be an object with a 'role' in "
                f"{list(KNOWN_ROLES)} and a string 'content', got {message!r:.80}."
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_args(max_prompt_len: int, max_rows: int | None, batch_size: int) -> None:
    problems = []
    if max_prompt_len < 1:
        problems.append(f"max_prompt_len={max_prompt_len} must be at least 1.")
    if max_rows is not None and max_rows < 1:
        problems.append(f"max_rows={max_rows} must be at least 1, or None for all rows.")
    if batch_size < 1:
        problems.append(f"batch_size={batch_size} must be at least 1.")
    if problems:
        raise ValueError("Invalid PromptDataModule arguments: " + " ".join(problems))


__all__ = ["PromptDataModule", "PromptLoader"]
