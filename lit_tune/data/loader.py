"""Batch loaders that know the optimizer step each micro-batch belongs to, and resume exactly.

Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` and data-parallel
gradients are averaged over ranks, so a per-micro-batch mean weighs a token in a short batch more
than one in a long batch. To weigh every trained token of an optimizer step equally, each batch
carries ``window_targets``: the number of trained tokens in the whole step, over all micro-batches
and all data-parallel ranks. Every rank computes the same permutation from the seed, so this count
needs no communication.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lit_tune.data.collate import Row, TokenBatch, collate_rows
from lit_tune.losses import IGNORE_INDEX


class BatchLoader:
    """Deterministic batches for evaluation: every row once, in order, split over ranks.

    Args:
        rows: Tokenized rows.
        batch_size: Rows per micro-batch on each rank.
        pad_id: Padding token id.
        num_replicas: Data-parallel world size.
        rank: Data-parallel rank.
    """

    def __init__(self, rows: Sequence[Row], batch_size: int, pad_id: int, *, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.rows = list(rows)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = False

    def _global_batch(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.rows) // self._global_batch()
        return math.ceil(len(self.rows) / self._global_batch())

    def _order(self) -> list[int]:
        return list(range(len(self.rows)))

    def _global_batches(self) -> list[list[Row]]:
        """Split the epoch's order into global batches, filling the last one with masked repeats.

        A repeat keeps every rank stepping through the same number of batches (sharded models need
        every rank in every forward); its labels are all ``IGNORE_INDEX``, so it adds no loss.
        """
        order, size = self._order(), self._global_batch()
        batches = []
        for start in range(0, len(self) * size, size):
            indices = order[start : start + size]
            batch = [self.rows[i] for i in indices]
            for j in range(size - len(batch)):
                batch.append(self._masked_copy(self.rows[order[j % len(order)]]))
            batches.append(batch)
        return batches

    # Hooks for loaders of other row types (preference pairs, rollouts).

    def _masked_copy(self, row: Row) -> Row:
        """Return a copy of ``row`` that carries no loss, used to fill the last batch."""
        return Row(row.input_ids, [IGNORE_INDEX] * len(row.labels), row.position_ids)

    def _weight(self, row: Row) -> int:
        """Return how much ``row`` counts towards the normaliser of its optimizer step."""
        return row.num_targets

    def _collate(self, rows: list[Row], window_targets: int = 0) -> TokenBatch:
        return collate_rows(rows, self.pad_id, window_targets)

    def _local(self, global_batch: list[Row]) -> list[Row]:
        return global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[TokenBatch]:
        for global_batch in self._global_batches():
            yield self._collate(self._local(global_batch))


class ResumableBatchLoader(BatchLoader):
    """Training batches: shuffled per epoch by seed, tagged with their step's token count, resumable.

    Lightning saves ``state_dict()`` in checkpoints and restores it before iterating, so a resumed
    run sees the same batches in the same order as an uninterrupted one.

    Args:
        rows: Tokenized rows.
        batch_size: Rows per micro-batch on each rank.
        pad_id: Padding token id.
        shuffle: Shuffle the rows each epoch.
        seed: Seed of the shuffle; epoch ``e`` uses ``seed + e``.
        drop_last: Drop the last incomplete global batch instead of filling it with masked repeats.
        accumulate_grad_batches: Micro-batches per optimizer step, as set on the Trainer.
        num_replicas: Data-parallel world size.
        rank: Data-parallel rank.
    """

    def __init__(
        self,
        rows: Sequence[Row],
        batch_size: int,
        pad_id: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        accumulate_grad_batches: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__(rows, batch_size, pad_id, num_replicas=num_replicas, rank=rank)
        if len(self.rows) < self._global_batch() and drop_last:
            raise ValueError(
                f"{len(self.rows)} training rows are fewer than one global batch "
                f"({batch_size} per rank x {num_replicas} ranks) with drop_last=True."
            )
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.accumulate_grad_batches = accumulate_grad_batches
        self.epoch = 0
        self.batches_yielded = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return super()._order()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def _window_targets(self, global_batches: list[list[Row]]) -> list[int]:
        """Weight (trained tokens by default) per optimizer step, repeated for each micro-batch of that step."""
        counts = [sum(self._weight(row) for row in batch) for batch in global_batches]
        k = self.accumulate_grad_batches
        windows = []
        for start in range(0, len(counts), k):
            window = counts[start : start + k]
            windows += [sum(window)] * len(window)
        return windows

    def __iter__(self) -> Iterator[TokenBatch]:
        global_batches = self._global_batches()
        windows = self._window_targets(global_batches)
        for index in range(self.batches_yielded, len(global_batches)):
            batch = self._collate(self._local(global_batches[index]), windows[index])
            # Advance the position before yielding: Lightning stops calling next() after len(self)
            # batches, so code after the last yield would never run.
            self.batches_yielded = index + 1
            if self.batches_yielded == len(global_batches):
                self.epoch, self.batches_yielded = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position within it."""
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position.

        Raises:
            ValueError: If the checkpoint was written with another shuffle seed.
        """
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"The checkpoint's data order used seed={state['seed']}, but this run uses seed={self.seed}. "
                "Resume with the same data seed, or start a new run."
            )
        self.epoch = state["epoch"]
        self.batches_yielded = state["batches_yielded"]


__all__ = ["BatchLoader", "ResumableBatchLoader"]
