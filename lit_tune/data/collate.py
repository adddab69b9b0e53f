"""Batches of token ids: the typed batch, right-padding collation and packing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_tune.losses import IGNORE_INDEX


@dataclass
class Row:
    """One training row: a single example, or several packed ones.

    Attributes:
        input_ids: Token ids.
        labels: Same length as ``input_ids``; ``IGNORE_INDEX`` where no loss is taken.
        position_ids: Restart at 0 at each packed document; None for an unpacked row.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    @property
    def num_targets(self) -> int:
        """Positions that carry a loss once labels are shifted (position 0 never does)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class TokenBatch:
    """A collated batch for causal-LM losses.

    Attributes:
        input_ids: ``[batch, seq_len]`` token ids, right-padded.
        labels: ``[batch, seq_len]``; ``IGNORE_INDEX`` on prompts, padding and position 0.
        attention_mask: ``[batch, seq_len]``, 1 on real tokens; None for packed batches, whose
            document boundaries come from ``position_ids``.
        position_ids: ``[batch, seq_len]`` for packed batches, else None.
        num_tokens: Non-padding tokens in this micro-batch.
        num_targets: Positions with a loss in this micro-batch.
        window_targets: Positions with a loss in the whole optimizer step: every micro-batch
            accumulated into it on every data-parallel rank. 0 when unknown.
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor | None = None
    position_ids: Tensor | None = None
    num_tokens: int = 0
    num_targets: int = 0
    window_targets: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate_rows(rows: Sequence[Row], pad_id: int, window_targets: int = 0) -> TokenBatch:
    """Right-pad ``rows`` to the longest one.

    Padding gets ``pad_id`` as input, ``IGNORE_INDEX`` as label and 0 in the attention mask, so a
    pad id equal to the EOS id never hides a real EOS.

    Args:
        rows: Rows of one micro-batch.
        pad_id: Token id written into padded positions.
        window_targets: See :class:`TokenBatch`.
    """
    seq_len = max(len(row.input_ids) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq_len), dtype=torch.long)
    packed = any(row.position_ids is not None for row in rows)
    position_ids = torch.zeros((batch, seq_len), dtype=torch.long) if packed else None
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
        if position_ids is not None:
            positions = row.position_ids or list(range(n))
            position_ids[i, :n] = torch.tensor(positions)
            # Padding continues as one more document, so it never attends to a real one.
            position_ids[i, n:] = torch.arange(seq_len - n)
    return TokenBatch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=None if packed else attention_mask,
        position_ids=position_ids,
        num_tokens=sum(len(row.input_ids) for row in rows),
        num_targets=sum(row.num_targets for row in rows),
        window_targets=window_targets,
    )


def pack_rows(rows: Sequence[Row], max_seq_len: int) -> list[Row]:
    """Concatenate rows, in order, into packed rows of at most ``max_seq_len`` tokens.

    Each packed document keeps its own positions (restarting at 0), which transformers turns into
    a block-diagonal causal mask, so no token attends across documents. Labels at each document's
    position 0 are already ``IGNORE_INDEX`` (see ``build_example``), so no document learns to
    predict the next one.

    Raises:
        ValueError: If a row is longer than ``max_seq_len``.
    """
    packed: list[Row] = []
    current = Row([], [], [])
    for row in rows:
        if len(row.input_ids) > max_seq_len:
            raise ValueError(f"A row of {len(row.input_ids)} tokens cannot be packed into max_seq_len={max_seq_len}.")
        if len(current.input_ids) + len(row.input_ids) > max_seq_len:
            packed.append(current)
            current = Row([], [], [])
        current.input_ids += row.input_ids
        current.labels += row.labels
        current.position_ids += list(range(len(row.input_ids)))
    if current.input_ids:
        packed.append(current)
    return packed


__all__ = ["Row", "TokenBatch", "collate_rows", "pack_rows"]
