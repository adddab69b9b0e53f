"""Cross entropy on causal-LM logits, with ignored positions and vocabulary-sharded logits.

Every function here takes logits of shape ``[batch, seq_len, vocab]`` and *targets* already
aligned with them (``targets[:, t]`` is the token that ``logits[:, t]`` predicts). Build targets
from ``labels`` with :func:`shift_labels`, which shifts the labels rather than slicing the logits,
so a vocabulary-sharded DTensor is never resliced.

Logits may also be a DTensor sharded on the vocabulary dimension on a 1-D mesh, as
``FSDP2Strategy``'s loss parallel produces them. Cross entropy then runs on each rank's slice of
the vocabulary and combines per-token maxima, sums and target logits across the shards, so the full
logits never exist on one rank. This is done here rather than by ``F.cross_entropy`` under
``torch.distributed.tensor.parallel.loss_parallel()``, because in torch 2.13 that path raises on
label smoothing and keeps about twice as many vocabulary-sized buffers per rank (measured with
``benchmarks/bench_loss_parallel.py``). The helpers work inside or outside ``loss_parallel()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
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
            dimension on a 1-D mesh.
        targets: ``[batch, seq_len]`` class indices aligned with ``logits``.
        ignore_index: Target value that contributes no loss and no gradient.
        label_smoothing: Weight of the uniform distribution mixed into the target, as in
            ``F.cross_entropy``; also supported on vocabulary-sharded logits.

    Returns:
        Plain tensor ``[batch, seq_len]`` of losses in fp32, equal on every tensor-parallel rank.

    Raises:
        ValueError: If ``logits`` is a DTensor with any other layout.
    """
    batch, seq_len = targets.shape
    # fp32 for the log-softmax: bf16 log-probabilities lose about two decimal digits.
    flat_logits = logits.flatten(0, 1).float()  # [batch * seq_len, vocab]
    flat_targets = targets.flatten()  # [batch * seq_len]
    if isinstance(flat_logits, DTensor):
        losses = _vocab_parallel_cross_entropy(flat_logits, flat_targets, ignore_index, label_smoothing)
    else:
        losses = F.cross_entropy(
            flat_logits,
            flat_targets,
            ignore_index=ignore_index,
            reduction="none",
            label_smoothing=label_smoothing,
        )  # [batch * seq_len]
    return losses.view(batch, seq_len)


def _vocab_parallel_cross_entropy(
    logits: DTensor, targets: Tensor, ignore_index: int, label_smoothing: float
) -> Tensor:
    """Per-token cross entropy of logits ``[tokens, vocab]`` sharded on the vocabulary."""
    mesh = logits.device_mesh
    vocab_dim = logits.ndim - 1
    if mesh.ndim != 1 or not logits.placements[0].is_shard(vocab_dim):
        raise ValueError(
            f"Vocabulary-parallel cross entropy received a DTensor with placements "
            f"{tuple(logits.placements)} on a {mesh.ndim}-D mesh, but it needs logits sharded on "
            "the vocabulary (last) dimension of a 1-D tensor-parallel mesh. Give the output "
            "projection ColwiseParallel(output_layouts=Shard(-1), use_local_output=False) on the "
            "tensor-parallel sub-mesh, or pass plain logits."
        )
    group = mesh.get_group()
    local = logits.to_local()  # [tokens, local_vocab]; its gradient flows back as a DTensor
    vocab_start = _shard_offset(logits.shape[-1], local.shape[-1], dist.get_rank(group), mesh.size())
    return _VocabParallelCrossEntropy.apply(
        local, targets.to(local.device), vocab_start, logits.shape[-1], ignore_index, label_smoothing, group
    )


def _shard_offset(vocab: int, local_vocab: int, rank: int, world: int) -> int:
    # DTensor's Shard splits a dimension like torch.chunk: ceil(vocab / world) per rank, the last
    # ranks getting less (or nothing).
    chunk = -(-vocab // world)
    offset = min(rank * chunk, vocab)
    assert local_vocab == min(chunk, vocab - offset), (vocab, local_vocab, rank, world)
    return offset


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy over a vocabulary split across the ranks of ``group``.

    Each rank has logits ``[tokens, local_vocab]`` for vocabulary ids
    ``[vocab_start, vocab_start + local_vocab)`` and gets the full per-token loss. Per token,
    ``loss = logsumexp(x) - (1 - e) * x[target] - e * mean(x)`` with smoothing ``e``. Three
    all-reduces assemble it: the max (for a stable logsumexp), the sum of exponentials and the
    target logit. Label smoothing adds a fourth, for the mean. The gradient on each shard is
    ``softmax(x) - (1 - e) * onehot(target) - e / vocab``, local to the rank. Every rank computes
    the same loss, so the backward pass needs no communication.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        targets: Tensor,
        vocab_start: int,
        vocab: int,
        ignore_index: int,
        label_smoothing: float,
        group: dist.ProcessGroup,
    ) -> Tensor:
        local_vocab = logits.shape[-1]
        row_max = logits.amax(dim=-1)  # [tokens]
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = (logits - row_max.unsqueeze(-1)).exp_().sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        log_sum_exp = sum_exp.log_() + row_max

        # The rank owning a target's vocabulary id contributes its logit; the others add 0.
        valid = targets != ignore_index
        local_targets = targets - vocab_start
        owned = valid & (local_targets >= 0) & (local_targets < local_vocab)
        local_targets = torch.where(owned, local_targets, 0)
        target_logit = logits.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(owned, target_logit, 0.0)
        dist.all_reduce(target_logit, group=group)

        losses = log_sum_exp - target_logit
        if label_smoothing:
            logit_mean = logits.sum(dim=-1)
            dist.all_reduce(logit_mean, group=group)
            logit_mean /= vocab
            losses = (1.0 - label_smoothing) * losses + label_smoothing * (log_sum_exp - logit_mean)
        ctx.save_for_backward(logits, log_sum_exp, local_targets, owned, valid)
        ctx.label_smoothing = label_smoothing
        ctx.vocab = vocab
        return torch.where(valid, losses, 0.0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        logits, log_sum_exp, local_targets, owned, valid = ctx.saved_tensors
        smoothing = ctx.label_smoothing
        grad = (logits - log_sum_exp.unsqueeze(-1)).exp_()  # this shard of softmax(x)
        if smoothing:
            grad -= smoothing / ctx.vocab
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_targets] -= owned.to(grad.dtype) * (1.0 - smoothing)
        grad *= torch.where(valid, grad_losses, 0.0).unsqueeze(-1)
        return grad, None, None, None, None, None, None


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
