"""Preference pairs for DPO-family training: row formats, tokenization, batches and loaders.

A row becomes a *prompt* (chat messages) and two responses, *chosen* and *rejected*. Three row
formats are read:

- ``prompt``/``chosen``/``rejected`` columns. The prompt is a string (one user message) or a list
  of messages. Each response is a string or a list with one assistant message.
- ``chosen``/``rejected`` only, each a full chat transcript (a list of messages): the messages the
  two share are the prompt and the final assistant message of each is the response.
- ``chosen``/``rejected`` only, each a plain-text transcript of ``\\n\\nHuman: ...`` and
  ``\\n\\nAssistant: ...`` turns, as in Anthropic's hh-rlhf: parsed into messages, then split as
  above.

The prompt is tokenized once and shared by both responses. A batch of ``B`` pairs holds ``2B``
sequences, the ``B`` chosen ones then the ``B`` rejected ones, so one forward pass scores both.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lit_tune.data.collate import Row, TokenBatch, collate_rows
from lit_tune.data.formatting import (
    KNOWN_ROLES,
    FormatStats,
    build_example,
    encode_prompt,
    encode_response,
)
from lit_tune.data.loader import BatchLoader, ResumableBatchLoader
from lit_tune.data.sft import data_parallel_info, train_placement
from lit_tune.data.sources import DataFormatError, NumberedRows, load_rows, split_train_val
from lit_tune.losses import IGNORE_INDEX
from lit_tune.models.loading import load_tokenizer

log = logging.getLogger(__name__)

Message = dict[str, str]

# Keys of FormatStats.extra counted by this module.
DROPPED_IDENTICAL = "dropped as chosen == rejected"
DROPPED_IDENTICAL_AFTER_TRUNCATION = "dropped as chosen == rejected after truncation"
DROPPED_NO_SHARED_PROMPT = "dropped as chosen and rejected differ before the final assistant turn"
PROMPTS_TRUNCATED = "prompts truncated"

# A turn marker of a plain-text transcript: "Human:" or "Assistant:" at the start of the text or
# after a blank line.
_TURN_MARKER = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
_TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


# --------------------------------------------------------------------------- rows and batches


@dataclass
class PreferenceRow:
    """One tokenized preference pair.

    Attributes:
        prompt_ids: Prompt token ids, shared by both responses.
        chosen_ids: Token ids of the preferred response.
        rejected_ids: Token ids of the other response.
        reference_chosen: Reference-model log-probability of the chosen response (summed over
            its tokens), once precomputed; None before.
        reference_rejected: The same for the rejected response.
        is_filler: True for a repeat that only fills the last batch; it carries no loss.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    reference_chosen: float | None = None
    reference_rejected: float | None = None
    is_filler: bool = False

    @property
    def input_ids(self) -> list[int]:
        """Every token id of the pair (prompt, chosen, rejected), for vocabulary checks."""
        return self.prompt_ids + self.chosen_ids + self.rejected_ids

    @property
    def num_targets(self) -> int:
        """Response tokens of both sequences, the positions that carry log-probabilities."""
        return 0 if self.is_filler else len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PreferenceBatch(TokenBatch):
    """A collated batch of ``B`` preference pairs as ``2B`` sequences: chosen ones, then rejected.

    The :class:`~lit_tune.data.collate.TokenBatch` fields (``input_ids``, ``labels``,
    ``attention_mask``: ``[2B, seq_len]``) hold the sequences; labels are ``IGNORE_INDEX`` on the
    prompt, padding and filler pairs.

    Attributes:
        pair_mask: ``[B]`` bool, True for real pairs and False for fillers.
        reference_chosen: ``[B]`` precomputed reference log-probabilities of the chosen
            responses, or None when they are not precomputed.
        reference_rejected: ``[B]`` the same for the rejected responses, or None.
        num_pairs: Real pairs in this micro-batch.
        window_pairs: Real pairs in the whole optimizer step, over every accumulated micro-batch
            and data-parallel rank; 0 when unknown (evaluation).
    """

    pair_mask: Tensor | None = None
    reference_chosen: Tensor | None = None
    reference_rejected: Tensor | None = None
    num_pairs: int = 0
    window_pairs: int = 0

    @property
    def batch_pairs(self) -> int:
        """Pairs in the batch, fillers included (half the number of sequences)."""
        return self.input_ids.shape[0] // 2


def _sequence(row: PreferenceRow, response_ids: list[int]) -> Row:
    input_ids, labels = build_example(row.prompt_ids, response_ids, mask_prompt=True)
    if row.is_filler:
        labels = [IGNORE_INDEX] * len(labels)
    return Row(input_ids, labels)


def _reference_tensor(values: list[float | None]) -> Tensor | None:
    if all(value is None for value in values):
        return None
    if any(value is None for value in values):
        raise ValueError(
            "Some rows of the batch have precomputed reference log-probabilities and some do not; "
            "precompute them for every row (DPOModule does this at the start of fit)."
        )
    return torch.tensor(values, dtype=torch.float32)


def collate_pairs(
    rows: Sequence[PreferenceRow], pad_id: int, window_pairs: int = 0
) -> PreferenceBatch:
    """Collate ``B`` pairs into one right-padded batch of ``2B`` sequences, chosen ones first.

    Args:
        rows: Pairs of one micro-batch.
        pad_id: Token id written into padded positions.
        window_pairs: See :class:`PreferenceBatch`.

    Returns:
        The batch; both halves are padded to the same length so one forward pass scores both.
    """
    sequences = [_sequence(row, row.chosen_ids) for row in rows]
    sequences += [_sequence(row, row.rejected_ids) for row in rows]
    tokens = collate_rows(sequences, pad_id)
    fields = {f.name: getattr(tokens, f.name) for f in dataclasses.fields(TokenBatch)}
    return PreferenceBatch(
        **fields,
        pair_mask=torch.tensor([not row.is_filler for row in rows], dtype=torch.bool),
        reference_chosen=_reference_tensor([row.reference_chosen for row in rows]),
        reference_rejected=_reference_tensor([row.reference_rejected for row in rows]),
        num_pairs=sum(not row.is_filler for row in rows),
        window_pairs=window_pairs,
    )


class _PairHooks:
    """Loader hooks for :class:`PreferenceRow`: fillers, weights and collation of pairs."""

    pad_id: int

    def _masked_copy(self, row: PreferenceRow) -> PreferenceRow:
        return dataclasses.replace(row, is_filler=True)

    def _weight(self, row: PreferenceRow) -> int:
        # The loss is a mean over pairs, so each real pair weighs 1 in its optimizer step.
        return 0 if row.is_filler else 1

    def _collate(self, rows: list[PreferenceRow], window_targets: int = 0) -> PreferenceBatch:
        return collate_pairs(rows, self.pad_id, window_pairs=window_targets)


class PreferenceBatchLoader(_PairHooks, BatchLoader):
    """Evaluation batches of preference pairs: every pair once, in order, split over ranks.

    Args:
        rows: Tokenized pairs.
        batch_size: Pairs per micro-batch on each rank (twice as many sequences).
        pad_id: Padding token id.
        num_replicas: Data-parallel world size.
        rank: Data-parallel rank.
    """


class ResumablePreferenceLoader(_PairHooks, ResumableBatchLoader):
    """Training batches of preference pairs: shuffled per epoch, resumable.

    Each batch carries ``window_pairs``, the number of real pairs in its optimizer step, so that
    the loss of every pair weighs the same whatever the accumulation and number of ranks.
    Arguments are those of :class:`~lit_tune.data.loader.ResumableBatchLoader`, with
    ``batch_size`` counted in pairs.
    """


# --------------------------------------------------------------------------- row formats


def parse_transcript(text: str, where: str) -> list[Message]:
    """Parse a ``\\n\\nHuman: ...\\n\\nAssistant: ...`` transcript into chat messages.

    Turns alternate, so a marker of the same role as the turn before it is kept as text of that
    turn: a response that quotes ``\\n\\nAssistant:`` stays one message, marker included. One space
    after each marker is removed.

    Args:
        text: The transcript.
        where: ``"file, row N, column"`` for error messages.

    Returns:
        Messages with roles ``"user"`` and ``"assistant"``.

    Raises:
        DataFormatError: If the text does not start with a turn marker.
    """
    markers = list(_TURN_MARKER.finditer(text))
    if not markers or text[: markers[0].start()].strip():
        raise DataFormatError(
            f"{where}: expected a transcript of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns, "
            f"got {text[:60]!r}. Give a 'prompt' column, or chat messages as lists."
        )
    messages: list[Message] = []
    for index, marker in enumerate(markers):
        end = markers[index + 1].start() if index + 1 < len(markers) else len(text)
        role = _TRANSCRIPT_ROLES[marker.group(1)]
        content = text[marker.end() : end]
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += marker.group(0) + content
        else:
            messages.append({"role": role, "content": content.removeprefix(" ")})
    return messages


def split_shared_prompt(
    chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], str, str] | None:
    """Split two transcripts into their shared prompt and their final assistant responses.

    Args:
        chosen: Messages of the preferred transcript.
        rejected: Messages of the other transcript.

    Returns:
        ``(prompt_messages, chosen_response, rejected_response)``, or None when the transcripts
        differ anywhere but in their final message or do not end with an assistant message.
        Identical transcripts are split too (the caller drops them).
    """
    shared = 0
    for first, second in zip(chosen, rejected):
        if first != second:
            break
        shared += 1
    if shared == len(chosen) == len(rejected):
        shared -= 1
    if not len(chosen) == len(rejected) == shared + 1:
        return None
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return None
    return chosen[:shared], chosen[-1]["content"], rejected[-1]["content"]


def _check_messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(
            f"{where}: expected a non-empty list of messages, got {type(value).__name__}."
        )
    checked = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise DataFormatError(
                f"{where}: message {index} must be an object with a string 'content'."
            )
        if message.get("role") not in KNOWN_ROLES:
            raise DataFormatError(
                f"{where}: message {index} has role {message.get('role')!r}; expected one of {list(KNOWN_ROLES)}."
            )
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def _response_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    messages = _check_messages(value, where)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataFormatError(
            f"{where}: with a prompt column, a response given as messages must be one assistant "
            f"message; got roles {[m['role'] for m in messages]}."
        )
    return messages[0]["content"]


def _transcript_messages(value: Any, where: str) -> list[Message]:
    if isinstance(value, str):
        return parse_transcript(value, where)
    return _check_messages(value, where)


@dataclass(frozen=True)
class PairColumns:
    """Column names of the prompt and the two responses.

    Attributes:
        prompt: Column with the prompt (text or messages); rows without it are split transcripts.
        chosen: Column with the preferred response or transcript.
        rejected: Column with the other response or transcript.
    """

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


def row_to_pair(
    row: Mapping[str, Any], columns: PairColumns, where: str
) -> tuple[list[Message], str, str] | None:
    """Turn one row of any supported format into ``(prompt_messages, chosen, rejected)``.

    Args:
        row: The raw row.
        columns: Column names.
        where: ``"file, row N"`` for error messages.

    Returns:
        The pair, or None when chosen and rejected transcripts share no prompt (see
        :func:`split_shared_prompt`).

    Raises:
        DataFormatError: Missing columns or malformed values.
    """
    missing = [name for name in (columns.chosen, columns.rejected) if row.get(name) is None]
    if missing:
        hint = (
            " These look like GSM8K model solutions: set row_format='gsm8k_solutions'."
            if "ground_truth" in row
            else ""
        )
        raise DataFormatError(f"{where}: missing column(s) {missing}; found {sorted(row)}.{hint}")
    chosen, rejected = row[columns.chosen], row[columns.rejected]
    prompt = row.get(columns.prompt)
    if prompt is None:
        return split_shared_prompt(
            _transcript_messages(chosen, f"{where}, column {columns.chosen!r}"),
            _transcript_messages(rejected, f"{where}, column {columns.rejected!r}"),
        )
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _check_messages(prompt, f"{where}, column {columns.prompt!r}")
    return (
        prompt_messages,
        _response_text(chosen, f"{where}, column {columns.chosen!r}"),
        _response_text(rejected, f"{where}, column {columns.rejected!r}"),
    )


def gsm8k_solution_pairs(
    rows: Sequence[Mapping[str, Any]], max_pairs_per_question: int | None = 1, source: str = "rows"
) -> tuple[list[dict[str, str]], int]:
    """Build preference pairs from GSM8K model solutions: ground truth over incorrect solutions.

    Each row has ``question``, ``ground_truth`` and, under any other keys, model solutions as
    ``{"solution": str, "is_correct": bool}`` (the layout of OpenAI's grade-school-math
    ``example_model_solutions.jsonl``). Every incorrect solution, in sorted key order, pairs with
    the ground truth until ``max_pairs_per_question`` pairs are made.

    Args:
        rows: The raw rows.
        max_pairs_per_question: Pairs per question at most; None for one per incorrect solution.
        source: Where the rows came from, for error messages.

    Returns:
        Rows with ``prompt``/``chosen``/``rejected``, and the number of questions that had no
        incorrect solution and gave no pair.

    Raises:
        DataFormatError: If a row lacks ``question``/``ground_truth`` or a solution is malformed.
    """
    pairs, without_incorrect = [], 0
    for index, row in enumerate(rows):
        where = f"{source}, row {index + 1}"
        if not isinstance(row.get("question"), str) or not isinstance(row.get("ground_truth"), str):
            raise DataFormatError(
                f"{where}: GSM8K model-solution rows need string 'question' and 'ground_truth' "
                f"fields; found {sorted(row)}."
            )
        incorrect = [
            solution
            for _, solution in sorted(_solutions(row, where).items())
            if not solution["is_correct"]
        ]
        if max_pairs_per_question is not None:
            incorrect = incorrect[:max_pairs_per_question]
        without_incorrect += not incorrect
        for solution in incorrect:
            pairs.append(
                {
                    "prompt": row["question"],
                    "chosen": row["ground_truth"],
                    "rejected": solution["solution"],
                }
            )
    return pairs, without_incorrect


def _solutions(row: Mapping[str, Any], where: str) -> dict[str, Mapping[str, Any]]:
    solutions = {key: value for key, value in row.items() if isinstance(value, Mapping)}
    for key, value in solutions.items():
        if not isinstance(value.get("solution"), str) or not isinstance(
            value.get("is_correct"), bool
        ):
            raise DataFormatError(
                f"{where}: model solution {key!r} must have a string 'solution' and a boolean "
                f"'is_correct'; got {dict(value)!r:.120}."
            )
    return solutions


# --------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class PairEncoder:
    """Tokenize ``(prompt, chosen, rejected)`` with a shared prompt, truncating and counting.

    Attributes:
        tokenizer: The tokenizer.
        max_seq_len: Maximum tokens of prompt plus one response.
        max_prompt_len: Maximum prompt tokens; a longer prompt keeps its end (and its BOS).
            None keeps whole prompts.
        overlong: ``"truncate"`` cuts the end of a response; ``"drop"`` drops the pair.
        use_chat_template: Render with the tokenizer's chat template.
    """

    tokenizer: PreTrainedTokenizerBase
    max_seq_len: int
    max_prompt_len: int | None = None
    overlong: str = "truncate"
    use_chat_template: bool = True

    def encode(
        self, prompt: list[Message], chosen: str, rejected: str, stats: FormatStats
    ) -> PreferenceRow | None:
        """Tokenize one pair, or return None when it is dropped (counted in ``stats``).

        Args:
            prompt: Prompt messages.
            chosen: Preferred response text.
            rejected: Other response text.
            stats: Counters of dropped and truncated rows.
        """
        if not chosen.strip() or not rejected.strip():
            stats.dropped_empty_response += 1
            return None
        if chosen == rejected:
            _count(stats, DROPPED_IDENTICAL)
            return None
        prompt_ids = self._prompt_ids(prompt, stats)
        chosen_ids = encode_response(self.tokenizer, prompt, chosen, self.use_chat_template)
        rejected_ids = encode_response(self.tokenizer, prompt, rejected, self.use_chat_template)
        room = self.max_seq_len - len(prompt_ids)
        longest = max(len(chosen_ids), len(rejected_ids))
        if room < 1 or (longest > room and self.overlong == "drop"):
            stats.dropped_too_long += 1
            return None
        if longest > room:
            # Keep the start of each response: the tokens that follow the prompt directly.
            stats.truncated += 1
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            if chosen_ids == rejected_ids:
                _count(stats, DROPPED_IDENTICAL_AFTER_TRUNCATION)
                return None
        return PreferenceRow(prompt_ids, chosen_ids, rejected_ids)

    def _prompt_ids(self, prompt: list[Message], stats: FormatStats) -> list[int]:
        ids = encode_prompt(self.tokenizer, prompt, self.use_chat_template)
        limit = self.max_prompt_len
        if limit is None or len(ids) <= limit:
            return ids
        _count(stats, PROMPTS_TRUNCATED)
        # Keep the end of the prompt, next to the response, and the BOS token that opens it.
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[0] == bos:
            return [bos, *ids[len(ids) - limit + 1 :]]
        return ids[len(ids) - limit :]


def _count(stats: FormatStats, key: str) -> None:
    stats.extra[key] = stats.extra.get(key, 0) + 1


# --------------------------------------------------------------------------- data module


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs for :class:`~lit_tune.modules.dpo.DPOModule`.

    Rows come from a local JSONL/JSON/CSV/Parquet file (``.gz`` too), a hub data set, in-memory
    rows, or ``"builtin:preferences"``, in any format of this module's docstring, or as GSM8K
    model solutions with ``row_format="gsm8k_solutions"``. Pairs with an empty response, or whose
    chosen and rejected responses are identical (before or after truncation), are dropped.
    Responses longer than the room left by the prompt are truncated at the end, or the pair is
    dropped with ``overlong="drop"``. Every count is logged.

    Args:
        path: Data source: file path, hub name, or ``"builtin:<name>"``.
        rows: In-memory rows; used instead of ``path`` when given.
        tokenizer: Tokenizer source: ``"tiny"``, a local folder or ``.gguf`` file, or a hub name.
        val_path: Separate validation data; when None, ``val_fraction`` of the pairs is held out.
        val_fraction: Share of pairs held out for validation when ``val_path`` is None.
        row_format: ``"auto"`` detects the formats of the module docstring;
            ``"gsm8k_solutions"`` converts GSM8K model solutions with :func:`gsm8k_solution_pairs`.
        max_pairs_per_question: For ``"gsm8k_solutions"``: pairs per question at most (None for
            all incorrect solutions).
        max_rows: Read only the first ``max_rows`` rows of each source (None for all).
        prompt_column: Column holding the prompt; rows without it are read as transcripts.
        chosen_column: Column holding the preferred response or transcript.
        rejected_column: Column holding the other response or transcript.
        system_prompt: System message added to every prompt that has none.
        use_chat_template: Render with the tokenizer's chat template; False joins the prompt
            messages as plain text.
        max_seq_len: Maximum tokens of the prompt plus one response.
        max_prompt_len: Maximum prompt tokens (the end is kept); None keeps whole prompts and drops
            pairs whose prompt leaves no room for a response.
        overlong: ``"truncate"`` cuts the end of the responses; ``"drop"`` drops the pair.
        batch_size: Pairs per micro-batch on each rank (each pair is two sequences).
        val_batch_size: Pairs per validation batch; defaults to ``batch_size``.
        seed: Seed of the validation split and the per-epoch shuffle.
        drop_last: Drop the last incomplete training batch.
        trust_remote_code: Allow tokenizer code from the tokenizer source to run.

    Example::

        data = PreferenceDataModule(path="pairs.jsonl", max_seq_len=1024, batch_size=4)
        trainer.fit(DPOModule(model="my-sft-model"), datamodule=data)
    """

    def __init__(
        self,
        path: str = "builtin:preferences",
        rows: Sequence[Mapping[str, Any]] | None = None,
        tokenizer: str = "tiny",
        val_path: str | None = None,
        val_fraction: float = 0.05,
        row_format: Literal["auto", "gsm8k_solutions"] = "auto",
        max_pairs_per_question: int | None = 1,
        max_rows: int | None = None,
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        max_seq_len: int = 512,
        max_prompt_len: int | None = None,
        overlong: Literal["truncate", "drop"] = "truncate",
        batch_size: int = 4,
        val_batch_size: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["rows"])
        _check_args(self.hparams)
        self.rows = rows
        self.columns = PairColumns(prompt_column, chosen_column, rejected_column)
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.encoder = PairEncoder(
            self.tokenizer, max_seq_len, max_prompt_len, overlong, use_chat_template
        )
        self.train_rows: list[PreferenceRow] = []
        self.val_rows: list[PreferenceRow] = []
        self.stats: dict[str, FormatStats] = {}

    @override
    def setup(self, stage: str) -> None:
        if self.train_rows or self.val_rows:
            return
        train, val, source = self._split_rows()
        self.train_rows = self._tokenize(train, f"{source} (train)")
        self.val_rows = self._tokenize(val, f"{source} (validation)") if val else []
        if not self.train_rows:
            raise DataFormatError(
                f"{source}: no training pairs are left after filtering; see the counts above."
            )

    def _load(self, source: str | Sequence[Mapping[str, Any]]) -> tuple[list[dict], str]:
        rows, description = load_rows(source)
        if self.hparams.max_rows is not None:
            rows = rows[: self.hparams.max_rows]
        if self.hparams.row_format == "gsm8k_solutions":
            rows, without_incorrect = gsm8k_solution_pairs(
                rows, self.hparams.max_pairs_per_question, description
            )
            rank_zero_info(
                f"{description}: {len(rows)} pairs from GSM8K model solutions; {without_incorrect} "
                "questions had no incorrect solution and gave no pair."
            )
        return rows, description

    def _split_rows(self) -> tuple[NumberedRows, NumberedRows, str]:
        hp = self.hparams
        rows, source = self._load(self.rows if self.rows is not None else hp.path)
        if hp.val_path:
            val, _ = self._load(hp.val_path)
            return list(enumerate(rows, start=1)), list(enumerate(val, start=1)), source
        train, val = split_train_val(rows, hp.val_fraction, hp.seed)
        return train, val, source

    def _tokenize(self, rows: NumberedRows, source: str) -> list[PreferenceRow]:
        stats = FormatStats(rows=len(rows))
        pairs = [
            pair
            for number, row in rows
            if (pair := self.encode_row(row, f"{source}, row {number}", stats))
        ]
        stats.kept = len(pairs)
        rank_zero_info(f"{source}: {stats.summary()}.")
        self.stats[source] = stats
        return pairs

    def encode_row(
        self, row: Mapping[str, Any], where: str, stats: FormatStats
    ) -> PreferenceRow | None:
        """Tokenize one row into a :class:`PreferenceRow`, or None when it is dropped.

        Args:
            row: The raw row.
            where: Its location, used in error messages.
            stats: Counters updated for dropped and truncated rows.

        Raises:
            DataFormatError: Missing columns or malformed values.
        """
        pair = row_to_pair(row, self.columns, where)
        if pair is None:
            _count(stats, DROPPED_NO_SHARED_PROMPT)
            return None
        prompt, chosen, rejected = pair
        system_prompt = self.hparams.system_prompt
        if system_prompt and (not prompt or prompt[0]["role"] != "system"):
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        return self.encoder.encode(prompt, chosen, rejected, stats)

    @override
    def train_dataloader(self) -> ResumablePreferenceLoader:
        return ResumablePreferenceLoader(
            self.train_rows,
            self.hparams.batch_size,
            self.tokenizer.pad_token_id,
            shuffle=True,
            seed=self.hparams.seed,
            drop_last=self.hparams.drop_last,
            **train_placement(self.trainer),
        )

    @override
    def val_dataloader(self) -> PreferenceBatchLoader | list:
        if not self.val_rows:
            return []
        return self.eval_loader(self.val_rows)

    @override
    def test_dataloader(self) -> PreferenceBatchLoader | list:
        return self.val_dataloader()

    def eval_loader(self, rows: Sequence[PreferenceRow]) -> PreferenceBatchLoader:
        """Return an evaluation loader over ``rows`` (e.g. the training pairs), split over ranks.

        Args:
            rows: Tokenized pairs.
        """
        num_replicas, rank = data_parallel_info(self.trainer)
        batch_size = self.hparams.val_batch_size or self.hparams.batch_size
        return PreferenceBatchLoader(
            rows, batch_size, self.tokenizer.pad_token_id, num_replicas=num_replicas, rank=rank
        )


def _check_args(hp: Mapping[str, Any]) -> None:
    problems = []
    if not 0.0 <= hp["val_fraction"] < 1.0:
        problems.append(f"val_fraction={hp['val_fraction']} must be in [0, 1).")
    if hp["max_seq_len"] < 2:
        problems.append(f"max_seq_len={hp['max_seq_len']} must be at least 2.")
    prompt_limit = hp["max_prompt_len"]
    if prompt_limit is not None and not 1 <= prompt_limit < hp["max_seq_len"]:
        problems.append(
            f"max_prompt_len={prompt_limit} must be at least 1 and below max_seq_len={hp['max_seq_len']}."
        )
    if hp["overlong"] not in ("truncate", "drop"):
        problems.append(f"overlong={hp['overlong']!r} must be 'truncate' or 'drop'.")
    if hp["row_format"] not in ("auto", "gsm8k_solutions"):
        problems.append(f"row_format={hp['row_format']!r} must be 'auto' or 'gsm8k_solutions'.")
    for name in ("batch_size", "max_pairs_per_question", "max_rows"):
        if hp[name] is not None and hp[name] < 1:
            problems.append(f"{name}={hp[name]} must be at least 1.")
    if problems:
        raise ValueError("Invalid PreferenceDataModule arguments: " + " ".join(problems))


__all__ = [
    "PairColumns",
    "PairEncoder",
    "PreferenceBatch",
    "PreferenceBatchLoader",
    "PreferenceDataModule",
    "PreferenceRow",
    "ResumablePreferenceLoader",
    "collate_pairs",
    "gsm8k_solution_pairs",
    "parse_transcript",
    "row_to_pair",
    "split_shared_prompt",
]
