"""IPO: a squared loss that pulls the log-ratio margin to a fixed target instead of infinity."""

from __future__ import annotations

from lit_tune.losses.preference import PairLogps, PreferenceLoss, PreferenceLossOutput


class IPOLoss(PreferenceLoss):
    """IPO: ``(h - 1 / (2 * beta)) ** 2`` with ``h = (pi_c - ref_c) - (pi_r - ref_r)``.

    ``beta`` is the regularisation strength, written tau in Azar et al., "A General Theoretical
    Paradigm to Understand Learning from Human Preferences" (2023). By default ``pi`` and ``ref``
    are per-token mean log-probabilities of each response, as TRL's ``DPOTrainer`` computes them
    for ``loss_type="ipo"``, so the target margin does not depend on response length. With
    ``average_log_probs=False`` they are the summed log-probabilities of the paper's equation. The
    logged rewards are always ``beta * (pi - ref)`` of the summed log-probabilities, like the
    other DPO losses.

    Args:
        beta: Regularisation strength; the target margin is ``1 / (2 * beta)``.
        average_log_probs: Use per-token means (True) or sums (False) of the log-probabilities.
    """

    name = "ipo"

    def __init__(self, beta: float = 0.1, average_log_probs: bool = True) -> None:
        super().__init__(beta)
        self.average_log_probs = bool(average_log_probs)

    def __call__(self, logps: PairLogps) -> PreferenceLossOutput:
        """See :meth:`PreferenceLoss.__call__`."""
        chosen_ratio, rejected_ratio = logps.log_ratios()
        if self.average_log_probs:
            chosen_ratio = chosen_ratio / logps.chosen_tokens.clamp(min=1)
            rejected_ratio = rejected_ratio / logps.rejected_tokens.clamp(min=1)
        losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * self.beta)) ** 2
        return PreferenceLossOutput(losses, *self.reference_rewards(logps))


__all__ = ["IPOLoss"]
