"""Hinge preference loss (SLiC-style calibration against a reference model)."""

from __future__ import annotations

import torch

from lit_tune.losses.preference import PairLogps, PreferenceLoss, PreferenceLossOutput


class HingeLoss(PreferenceLoss):
    """Hinge: ``max(0, 1 - beta * h)`` with ``h = (pi_c - ref_c) - (pi_r - ref_r)``.

    ``pi`` and ``ref`` are summed log-probabilities of each response. A pair stops contributing
    once its reward margin ``beta * h`` reaches 1. Zhao et al., "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback" (2023), with the reference log-ratio as in DPO.

    Args:
        beta: Scale of the margin; the hinge is flat once ``h >= 1 / beta``.
    """

    name = "hinge"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__(beta)

    def __call__(self, logps: PairLogps) -> PreferenceLossOutput:
        """See :meth:`PreferenceLoss.__call__`."""
        chosen_ratio, rejected_ratio = logps.log_ratios()
        losses = torch.relu(1.0 - self.beta * (chosen_ratio - rejected_ratio))
        return PreferenceLossOutput(losses, *self.reference_rewards(logps))


__all__ = ["HingeLoss"]
