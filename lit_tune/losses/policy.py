"""Clipped policy-gradient loss (PPO/GRPO) with a k3 KL penalty to a frozen reference.

All inputs are per-token tensors ``[batch, seq_len]`` aligned with the targets (see
:func:`~lit_tune.losses.cross_entropy.shift_labels`), so they can come from vocabulary-sharded
logits through :func:`~lit_tune.losses.cross_entropy.token_log_probs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossAverage = Literal["token", "sequence"]


def k3_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Estimate ``KL(policy || reference)`` per token with the k3 estimator.

    With ``x = ref_log_probs - log_probs`` on tokens sampled from the policy, k3 is
    ``exp(x) - x - 1``: an unbiased estimate of the KL divergence that is never negative, because
    ``exp(x) >= 1 + x``. It is computed as ``expm1(x) - x`` for accuracy near ``x = 0`` and clamped
    at 0 against rounding. Source: J. Schulman, "Approximating KL Divergence" (2020).

    Args:
        log_probs: ``[batch, seq_len]`` log-probabilities of the sampled tokens under the policy.
        ref_log_probs: ``[batch, seq_len]`` the same under the reference model.

    Returns:
        ``[batch, seq_len]`` non-negative estimates.
    """
    return _k3(ref_log_probs - log_probs)


def _k3(log_ratio: Tensor) -> Tensor:
    return (torch.expm1(log_ratio) - log_ratio).clamp(min=0.0)


@dataclass
class PolicyLossTerms:
    """Summed loss of a micro-batch and the statistics logged with it.

    Attributes:
        loss_sum: Sum of per-token losses (``average="token"``) or of per-sequence mean losses
            (``average="sequence"``); the caller divides by :attr:`count` taken over the step.
        count: Completion tokens or sequences that ``loss_sum`` sums over.
        num_tokens: Completion tokens in the micro-batch.
        kl_sum: Summed k3 KL over completion tokens (0 without a reference).
        clipped_tokens: Completion tokens whose ratio was clipped, so they give no gradient.
        ratio_max: Largest importance ratio on a completion token.
    """

    loss_sum: Tensor
    count: Tensor
    num_tokens: Tensor
    kl_sum: Tensor
    clipped_tokens: Tensor
    ratio_max: Tensor


class ClippedPolicyLoss:
    """Clipped surrogate objective with importance ratios against the sampling policy.

    For a completion token with log-probability ``logp`` under the current policy, ``old`` under
    the policy that sampled it, advantage ``A`` of its sequence, and ``ratio = exp(logp - old)``::

        loss = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A) + kl_coef * k3

    ``average`` sets how tokens are weighed. ``"token"``: every completion token weighs the same,
    so long completions count more. ``"sequence"``: each sequence's tokens are averaged first,
    then sequences weigh the same.

    Args:
        clip_eps: Lower clip range: the ratio is clipped at ``1 - clip_eps``.
        clip_eps_high: Upper clip range; equal to ``clip_eps`` when None.
        kl_coef: Weight of the k3 KL penalty; 0 disables it.
        average: ``"token"`` or ``"sequence"``.

    Raises:
        ValueError: On a clip range outside ``(0, 1)`` (lower) or ``(0, inf)`` (upper), a negative
            ``kl_coef`` or an unknown ``average``.

    Example::

        loss_fn = ClippedPolicyLoss(clip_eps=0.2, kl_coef=0.04)
        terms = loss_fn(log_probs, old_log_probs, advantages, mask, ref_log_probs)
        loss = terms.loss_sum / terms.count
    """

    def __init__(
        self,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        kl_coef: float = 0.0,
        average: LossAverage = "token",
    ) -> None:
        clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        problems = []
        if not 0.0 < clip_eps < 1.0:
            problems.append(f"clip_eps={clip_eps} must be in (0, 1).")
        if not clip_eps_high > 0.0:
            problems.append(f"clip_eps_high={clip_eps_high} must be positive.")
        if kl_coef < 0.0:
            problems.append(f"kl_coef={kl_coef} must be >= 0.")
        if average not in ("token", "sequence"):
            problems.append(f"average={average!r} must be 'token' or 'sequence'.")
        if problems:
            raise ValueError("Invalid ClippedPolicyLoss arguments: " + " ".join(problems))
        self.clip_eps = clip_eps
        self.clip_eps_high = clip_eps_high
        self.kl_coef = kl_coef
        self.average = average

    def __call__(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        ref_log_probs: Tensor | None = None,
    ) -> PolicyLossTerms:
        """Compute the summed loss of a micro-batch.

        Args:
            log_probs: ``[batch, seq_len]`` log-probabilities under the current policy (with grad).
            old_log_probs: ``[batch, seq_len]`` log-probabilities under the sampling policy.
            advantages: ``[batch]`` advantage of each sequence.
            mask: ``[batch, seq_len]`` 1 on completion tokens, 0 elsewhere.
            ref_log_probs: ``[batch, seq_len]`` reference log-probabilities; required when
                ``kl_coef > 0``.

        Raises:
            ValueError: If ``kl_coef > 0`` and ``ref_log_probs`` is None.
        """
        keep = mask.bool()
        mask = mask.to(log_probs.dtype)
        advantage = advantages.to(log_probs.dtype).unsqueeze(1)  # [batch, 1]
        # Masked positions get ratio 1 (and KL 0) through torch.where, not a product with the mask,
        # so that whatever values they hold can never turn into inf * 0 = nan, forward or backward.
        ratio = torch.exp(torch.where(keep, log_probs - old_log_probs, 0.0))
        clipped_ratio = ratio.clamp(1.0 - self.clip_eps, 1.0 + self.clip_eps_high)
        per_token = -torch.minimum(ratio * advantage, clipped_ratio * advantage)
        kl = self._kl(log_probs, ref_log_probs, keep)
        per_token = per_token + self.kl_coef * kl
        loss_sum, count = self._reduce(per_token, mask)

        # A clipped token is one where the clipped term is the smaller one and differs.
        clipped = ((ratio < 1.0 - self.clip_eps) & (advantage < 0)) | ((ratio > 1.0 + self.clip_eps_high) & (advantage > 0))
        return PolicyLossTerms(
            loss_sum=loss_sum,
            count=count,
            num_tokens=mask.sum().detach(),
            kl_sum=(kl * mask).sum().detach(),
            clipped_tokens=(clipped.to(mask.dtype) * mask).sum().detach(),
            ratio_max=(ratio.detach() * mask).max() if mask.numel() else ratio.new_zeros(()),
        )

    def _kl(self, log_probs: Tensor, ref_log_probs: Tensor | None, keep: Tensor) -> Tensor:
        if ref_log_probs is None:
            if self.kl_coef > 0:
                raise ValueError(f"kl_coef={self.kl_coef} needs ref_log_probs; pass the reference model's log-probabilities.")
            return torch.zeros_like(log_probs)
        return _k3(torch.where(keep, ref_log_probs - log_probs, 0.0))

    def _reduce(self, per_token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        masked = torch.where(mask.bool(), per_token, 0.0)
        if self.average == "token":
            return masked.sum(), mask.sum().detach()
        tokens = mask.sum(dim=1)  # [batch]
        has_tokens = tokens > 0
        per_sequence = masked.sum(dim=1) / tokens.clamp(min=1.0)
        return per_sequence.sum(), has_tokens.sum().to(per_token.dtype)


__all__ = ["ClippedPolicyLoss", "LossAverage", "PolicyLossTerms", "k3_kl"]
