"""Random-number state of every rank, saved in checkpoints and restored on resume.

Lightning does not save random-number state, and a checkpoint's metadata comes from rank 0 only.
Dropout and sampling draw from each rank's own generators, so every rank's state is gathered into
the checkpoint and each rank takes its own back. Everything is stored as tensors, so that
``weights_only=True`` loading accepts it.
"""

from __future__ import annotations

import logging
import random

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

log = logging.getLogger(__name__)


def _local_state() -> dict[str, Tensor]:
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_state(strategy: Strategy) -> dict[str, Tensor]:
    """Return each generator's state on every rank, stacked along a first dimension of ranks.

    A collective when ``strategy`` runs several processes: every rank must call it, as every rank
    calls ``on_save_checkpoint``.
    """
    local = _local_state()
    if strategy.world_size == 1:
        return {name: value.unsqueeze(0) for name, value in local.items()}
    device = strategy.root_device
    return {name: strategy.all_gather(value.to(device)).cpu() for name, value in local.items()}


def restore_rng_state(state: dict[str, Tensor], rank: int, world_size: int) -> None:
    """Set this process's generators to ``rank``'s saved state.

    A checkpoint from another number of ranks gives rank ``r`` the state of saved rank
    ``r % saved_ranks``, with a warning, because the streams cannot match the original run then.
    """
    saved_ranks = state["torch"].shape[0]
    if saved_ranks != world_size:
        log.warning(
            "The checkpoint contains random-number state for %d rank(s), but this run has %d. "
            "Rank r resumes with saved rank r %% %d, so dropout and sampling will differ.",
            saved_ranks, world_size, saved_ranks,
        )
    index = rank % saved_ranks
    # clone(): torch 2.13's set_rng_state crashes on a view with a storage offset.
    torch.set_rng_state(state["torch"][index].clone())
    random.setstate((3, tuple(state["python"][index].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][index].clone())
