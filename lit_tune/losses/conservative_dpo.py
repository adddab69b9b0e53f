"""Conservative DPO: DPO with label smoothing, for preference labels that are sometimes wrong."""

from __future__ import annotations

import torch.nn.functional as F

from lit_tune.losses.preference import PairLogps, PreferenceLoss, PreferenceLossOutput


class ConservativeDPOLoss(PreferenceLoss):
    """cDPO: ``-(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)``.

    ``h`` is the DPO log-ratio difference ``(pi_c - ref_c) - (pi_r - ref_r)`` of summed
    log-probabilities, and ``eps`` is the assumed probability that a pair's label is flipped. The
    loss is smallest at a finite margin instead of pushing ``h`` to infinity. Mitchell, "A note on
    DPO with noisy preferences and relationship to IPO" (2023).

    Args:
        beta: Strength of the implicit KL penalty; rewards are ``beta * (pi - ref)``.
        label_smoothing: ``eps``, in ``(0, 0.5)``.

    Raises:
        ValueError: If ``label_smoothing`` is outside ``(0, 0.5)``.
    """

    name = "cdpo"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__(beta)
        if not 0.0 < label_smoothing < 0.5:
            raise ValueError(
                f"ConservativeDPOLoss: label_smoothing={label_smoothing} must be in (0, 0.5): it is "
                "the probability that a label is flipped. Use the 'sigmoid' loss for no smoothing."
            )
        self.label_smoothing = float(label_smoothing)

    def __call__(self, logps: PairLogps) -> PreferenceLossOutput:
        """See :meth:`PreferenceLoss.__call__`."""
        chosen_ratio, rejected_ratio = logps.log_ratios()
        logits = self.beta * (chosen_ratio - rejected_ratio)
        eps = self.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return PreferenceLossOutput(losses, *self.reference_rewards(logps))


__all__ = ["ConservativeDPOLoss"]
