"""The original DPO loss: a logistic loss on the difference of policy-to-reference log-ratios."""

from __future__ import annotations

import torch.nn.functional as F

from lit_tune.losses.preference import PairLogps, PreferenceLoss, PreferenceLossOutput


class SigmoidDPOLoss(PreferenceLoss):
    """DPO: ``-log sigmoid(beta * h)`` with ``h = (pi_c - ref_c) - (pi_r - ref_r)``.

    ``pi`` and ``ref`` are log-probabilities of the whole response (summed over its tokens) under
    the policy and the frozen reference. Rafailov et al., "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model" (2023).

    Args:
        beta: Strength of the implicit KL penalty; rewards are ``beta * (pi - ref)``.

    Example::

        loss = SigmoidDPOLoss(beta=0.1)
        output = loss(PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, ref_c, ref_r))
    """

    name = "sigmoid"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__(beta)

    def __call__(self, logps: PairLogps) -> PreferenceLossOutput:
        """See :meth:`PreferenceLoss.__call__`."""
        chosen_ratio, rejected_ratio = logps.log_ratios()
        losses = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))
        return PreferenceLossOutput(losses, *self.reference_rewards(logps))


__all__ = ["SigmoidDPOLoss"]
