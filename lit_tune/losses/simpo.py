"""SimPO: a reference-free preference loss on length-normalised log-probabilities."""

from __future__ import annotations

import torch.nn.functional as F

from lit_tune.losses.preference import PairLogps, PreferenceLoss, PreferenceLossOutput


class SimPOLoss(PreferenceLoss):
    """SimPO: ``-log sigmoid(beta * (avg_c - avg_r) - gamma)``, with no reference model.

    ``avg`` is the policy's per-token mean log-probability of a response and ``gamma`` a target
    reward margin. Rewards are ``beta * avg``. Meng et al., "SimPO: Simple Preference Optimization
    with a Reference-Free Reward" (2024).

    Args:
        beta: Scale of the length-normalised reward.
        gamma: Target reward margin, at least 0.

    Raises:
        ValueError: If ``gamma`` is negative.
    """

    name = "simpo"
    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 1.0) -> None:
        super().__init__(beta)
        if gamma < 0:
            raise ValueError(f"SimPOLoss: gamma={gamma} is a target margin and must be at least 0.")
        self.gamma = float(gamma)

    def __call__(self, logps: PairLogps) -> PreferenceLossOutput:
        """See :meth:`PreferenceLoss.__call__`."""
        chosen_rewards = self.beta * logps.average_chosen()
        rejected_rewards = self.beta * logps.average_rejected()
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - self.gamma)
        return PreferenceLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


__all__ = ["SimPOLoss"]
