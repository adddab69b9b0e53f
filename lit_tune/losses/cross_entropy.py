"""Cross entropy on causal-LM logits, with ignored positions and vocabulary-sharded logits.

Every function here takes logits of shape ``[batch, seq_len, vocab]`` and *targets* already
aligned with them (``targets[:, t]`` is the token that ``logits[:, t]`` predicts). Build targets
from ``labels`` with :func:`shift_labels`, which shifts the labels rather than slicing the logits,
so a vocabulary-sharded DTensor is never resliced.

Under ``torch.distributed.tensor.parallel.loss_parallel()`` the logits may be a DTensor sharded on
the vocabulary dimension; ``F.cross_entropy`` with class-index targets then runs on the shards and
the full logits never exist on one rank. Anything that needs the whole distribution (label
smoothing, entropy) is rejected on sharded logits instead of computed wrongly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Shift ``labels`` left by one so that they line up with the logits that predict them.

    Args:
        labels: Token ids ``[batch, seq_len]`` with ``ignore_index`` where no loss is taken.
        ignore_index: Value marking positions without a target.

    Returns:
        Targets ``[batch, seq_len]``; the last position is always ``ignore_index``.
    """
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def token_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Compute per-token cross entropy, exactly 0 at ignored positions.

    Args:
        logits: ``[batch, seq_len, vocab]``, a plain tensor or a DTensor sharded on the vocabulary
            (inside ``loss_parallel()``).
        targets: ``[batch, seq_len]`` class indices aligned with ``logits``.
        ignore_index: Target value that contributes no loss and no gradient.
        label_smoothing: Passed to ``F.cross_entropy``; only for plain (unsharded) logits.

    Returns:
        Plain tensor ``[batch, seq_len]`` of losses in fp32.

    Raises:
        ValueError: If ``label_smoothing`` is set for vocabulary-sharded logits.
    """
    batch, seq_len = targets.shape
    sharded = isinstance(logits, DTensor)
    if sharded and label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing={label_smoothing} is not supported on vocabulary-sharded logits "
            "(loss parallel): PyTorch's loss_parallel() computes it incorrectly on shards. "
            "Set label_smoothing=0.0 or turn loss parallel off."
        )
    # fp32 for the log-softmax: bf16 log-probabilities lose about two decimal digits.
    flat_logits = logits.flatten(0, 1).float()  # [batch * seq_len, vocab]
    losses = F.cross_entropy(
        flat_logits,
        targets.flatten(),
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )  # [batch * seq_len]
    if isinstance(losses, DTensor):
        # Per-token losses come back replicated on every tensor-parallel rank.
        losses = losses.full_tensor()
    return losses.view(batch, seq_len)


def cross_entropy_sum(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Sum cross entropy over the positions whose target is not ``ignore_index``.

    A sum, not a mean, so that the caller can normalise by a token count taken over the whole
    effective batch; a batch with no valid target gives exactly 0 with zero gradients.

    Args:
        logits: ``[batch, seq_len, vocab]``, plain or vocabulary-sharded DTensor.
        targets: ``[batch, seq_len]`` class indices aligned with ``logits``.
        ignore_index: Target value that contributes nothing.
        label_smoothing: See :func:`token_cross_entropy`.

    Returns:
        Scalar fp32 tensor.
    """
    return token_cross_entropy(logits, targets, ignore_index, label_smoothing).sum()


def token_log_probs(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Return the log-probability of each target token, 0 at ignored positions.

    Works on vocabulary-sharded logits because it is ``-cross_entropy(reduction="none")``.

    Args:
        logits: ``[batch, seq_len, vocab]``, plain or vocabulary-sharded DTensor.
        targets: ``[batch, seq_len]`` class indices aligned with ``logits``.
        ignore_index: Target value whose position gets 0.

    Returns:
        Plain fp32 tensor ``[batch, seq_len]``.
    """
    return -token_cross_entropy(logits, targets, ignore_index)


def count_targets(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Count the positions of ``targets`` that carry a loss."""
    return (targets != ignore_index).sum()


__all__ = [
    "IGNORE_INDEX",
    "count_targets",
    "cross_entropy_sum",
    "shift_labels",
    "token_cross_entropy",
    "token_log_probs",
]
