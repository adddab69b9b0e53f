"""Output projection and cross entropy computed together, a chunk of tokens at a time.

A causal LM's last step turns hidden states ``[tokens, hidden]`` into logits ``[tokens, vocab]``
and the loss takes a log-softmax over them. With a large vocabulary these tensors dominate
activation memory: SmolLM2's 49,152-token vocabulary makes them 201 MB per 1,024 tokens in fp32,
and autograd keeps the logits, the log-probabilities and their gradients alive around the loss.
:func:`linear_cross_entropy_sum` instead projects one chunk of tokens at a time, computes its
loss and, in the same pass, the gradients of the hidden states and of the projection weight, so
at most one chunk of logits exists at once. The floating-point work is the same as the unfused
forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_tune.losses.cross_entropy import IGNORE_INDEX

# Logit elements per chunk: 2**24 fp32 values are 64 MiB, large enough that the matrix products
# stay efficient and small enough to be negligible next to the model.
_CHUNK_ELEMENTS = 2**24


class _LinearCrossEntropySum(torch.autograd.Function):
    """Summed cross entropy of ``hidden @ weight.T``; gradients are computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, label_smoothing: float):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, chunk):
            part = hidden[start : start + chunk]  # [n, hidden]
            part_targets = targets[start : start + chunk]  # [n]
            valid = part_targets != ignore_index  # [n]
            safe_targets = torch.where(valid, part_targets, 0)[:, None]  # [n, 1]
            logits = (part @ weight.t()).float()  # [n, vocab]
            log_probs = torch.log_softmax(logits, dim=-1)  # [n, vocab]
            losses = -log_probs.gather(1, safe_targets).squeeze(1)  # [n]
            if label_smoothing:
                # F.cross_entropy's smoothing: (1 - e) * nll + e * mean_v(-log p_v).
                losses = (1 - label_smoothing) * losses - label_smoothing * log_probs.mean(dim=-1)
            del log_probs
            total += torch.where(valid, losses, 0.0).sum()
            if not (needs_hidden or needs_weight):
                continue

            # d(loss)/d(logits) = softmax - (1 - e) * one_hot(target) - e / vocab, 0 on ignored rows.
            # softmax and log_softmax have fused CPU kernels; exp() of the log-probabilities was
            # several times slower in torch 2.13.
            grad_logits = torch.softmax(logits, dim=-1)
            del logits
            if label_smoothing:
                grad_logits.sub_(label_smoothing / vocab)
            grad_logits.scatter_add_(1, safe_targets, torch.full_like(losses[:, None], label_smoothing - 1.0))
            if not bool(valid.all()):
                grad_logits.mul_(valid[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if needs_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk])  # [n, hidden]
            if needs_weight:
                # [vocab, hidden]; the first chunk allocates it, later ones accumulate into it.
                if grad_weight is None:
                    grad_weight = grad_logits.t() @ part
                else:
                    grad_weight.addmm_(grad_logits.t(), part)
        if needs_weight and grad_weight is None:  # no tokens at all
            grad_weight = torch.zeros_like(weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: these buffers exist only for this backward, which runs once.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy_sum(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Sum the cross entropy of the logits ``hidden @ weight.T`` without materialising them.

    Equal to ``cross_entropy_sum(hidden @ weight.T, targets)`` in value and gradients (up to
    floating-point summation order), with the logits computed in fp32 as there.

    Args:
        hidden: ``[batch, seq_len, hidden]`` final hidden states (after the last norm).
        weight: ``[vocab, hidden]`` output projection weight (an untied or tied head); plain
            tensors only, not vocabulary-sharded DTensors.
        targets: ``[batch, seq_len]`` class indices aligned with ``hidden``.
        ignore_index: Target value that contributes no loss and no gradient.
        label_smoothing: Weight of the uniform distribution mixed into the target, as in
            ``F.cross_entropy``.

    Returns:
        Scalar fp32 tensor.

    Note:
        The gradients are computed in the forward pass and kept until backward, so calling
        backward twice through the result, or differentiating it twice, is not supported.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [batch * seq_len, hidden]
    flat_targets = targets.reshape(-1)  # [batch * seq_len]
    return _LinearCrossEntropySum.apply(flat_hidden, weight, flat_targets, ignore_index, float(label_smoothing))


__all__ = ["linear_cross_entropy_sum"]
