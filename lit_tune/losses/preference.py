"""Shared pieces of the preference (DPO-family) losses: inputs, outputs and the base class.

A preference loss takes, for each pair, the policy's log-probability of the chosen and of the
rejected response (summed over response tokens) and the number of response tokens of each. Losses
that need a reference also take the same sums under the frozen reference model. A loss returns
one loss per pair and the implicit rewards that the DPO metrics report (``rewards/chosen``,
``rewards/rejected``). Each objective is its own class in its own file; choose one by name with
:func:`lit_tune.losses.preference_registry.build_preference_loss`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class PairLogps:
    """Log-probabilities of a batch of preference pairs, one entry per pair.

    Attributes:
        chosen: ``[pairs]`` policy log-probability of the chosen response, summed over its tokens.
        rejected: ``[pairs]`` the same for the rejected response.
        chosen_tokens: ``[pairs]`` number of chosen response tokens (float).
        rejected_tokens: ``[pairs]`` number of rejected response tokens (float).
        reference_chosen: ``[pairs]`` reference-model log-probability of the chosen response, or
            None for reference-free losses.
        reference_rejected: ``[pairs]`` the same for the rejected response, or None.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    reference_chosen: Tensor | None = None
    reference_rejected: Tensor | None = None

    def average_chosen(self) -> Tensor:
        """Return the per-token mean log-probability of the chosen responses, ``[pairs]``."""
        return self.chosen / self.chosen_tokens.clamp(min=1)

    def average_rejected(self) -> Tensor:
        """Return the per-token mean log-probability of the rejected responses, ``[pairs]``."""
        return self.rejected / self.rejected_tokens.clamp(min=1)

    def log_ratios(self) -> tuple[Tensor, Tensor]:
        """Return ``(chosen, rejected)`` policy-minus-reference log-ratios, each ``[pairs]``.

        Raises:
            ValueError: If the reference log-probabilities are missing.
        """
        if self.reference_chosen is None or self.reference_rejected is None:
            raise ValueError(
                "This loss compares the policy with a reference model, but no reference "
                "log-probabilities were given. Set reference='live' or 'precomputed' on DPOModule, "
                "or pick a reference-free loss ('simpo', 'orpo')."
            )
        return self.chosen - self.reference_chosen, self.rejected - self.reference_rejected


@dataclass
class PreferenceLossOutput:
    """Per-pair losses and rewards that a preference loss returns for a batch of pairs.

    Attributes:
        losses: ``[pairs]`` loss of each pair; the module averages them over the optimizer step.
        chosen_rewards: ``[pairs]`` implicit reward of each chosen response (no gradient).
        rejected_rewards: ``[pairs]`` implicit reward of each rejected response (no gradient).
        extras: Further per-pair values the loss wants logged (e.g. ORPO's ``nll_loss``), each
            ``[pairs]`` and without gradient; logged as ``<stage>/<name>``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


class PreferenceLoss(ABC):
    """Base class of the preference losses.

    Subclasses set ``name`` (the string used in configs), ``needs_reference`` and
    ``extra_metrics`` (the keys of :attr:`PreferenceLossOutput.extras` they return, which the
    module logs), and implement :meth:`__call__`.

    Args:
        beta: Scale of the implicit reward (the KL-penalty strength for DPO-style losses). Must be
            positive.

    Raises:
        ValueError: If ``beta`` is not positive.
    """

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = True
    extra_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, beta: float) -> None:
        if not beta > 0:
            raise ValueError(f"{type(self).__name__}: beta={beta} must be positive.")
        self.beta = float(beta)

    @abstractmethod
    def __call__(self, logps: PairLogps) -> PreferenceLossOutput:
        """Compute per-pair losses and rewards.

        Args:
            logps: Policy (and, where needed, reference) log-probabilities of each pair.

        Returns:
            Per-pair losses with gradient, and detached rewards.
        """

    def reference_rewards(self, logps: PairLogps) -> tuple[Tensor, Tensor]:
        """Return the DPO implicit rewards ``beta * (policy - reference)`` of chosen and rejected.

        Args:
            logps: Pair log-probabilities including the reference ones.

        Returns:
            ``(chosen_rewards, rejected_rewards)``, each ``[pairs]`` and detached.
        """
        chosen_ratio, rejected_ratio = logps.log_ratios()
        return self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"


def log1m_exp(x: Tensor) -> Tensor:
    """Compute ``log(1 - exp(x))`` for ``x < 0`` without cancellation.

    Uses ``log(-expm1(x))`` near 0 and ``log1p(-exp(x))`` far from it, the split at ``-log 2``
    that keeps both branches accurate.

    Args:
        x: Tensor of negative values (log-probabilities).

    Returns:
        Tensor of the same shape; ``-inf`` where ``x == 0``.
    """
    near_zero = x > -0.6931471805599453
    # Evaluate each branch only on inputs where it is finite, so neither leaks NaN gradients.
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, x, -1.0))),
        torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x))),
    )


__all__ = ["PairLogps", "PreferenceLoss", "PreferenceLossOutput", "log1m_exp"]
