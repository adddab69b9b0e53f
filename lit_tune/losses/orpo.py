"""ORPO: supervised loss on the chosen response plus an odds-ratio preference term."""

from __future__ import annotations

import torch.nn.functional as F

from lit_tune.losses.preference import PairLogps, PreferenceLoss, PreferenceLossOutput, log1m_exp

# A response whose every token has probability 1 has mean log-probability 0 and infinite odds;
# capping it just below 0 keeps the odds finite.
_MAX_AVERAGE_LOGP = -1e-6


class ORPOLoss(PreferenceLoss):
    """ORPO: ``-avg_c - beta * log sigmoid(log odds_c - log odds_r)``, with no reference model.

    ``avg`` is the per-token mean log-probability of a response, so ``-avg_c`` is the chosen
    response's mean token NLL (the SFT term), and ``log odds = avg - log(1 - exp(avg))``. Rewards
    are ``beta * avg``. Hong et al., "ORPO: Monolithic Preference Optimization without Reference
    Model" (2024), where ``beta`` is written lambda.

    Args:
        beta: Weight of the odds-ratio term relative to the SFT term.
    """

    name = "orpo"
    needs_reference = False
    extra_metrics = ("nll_loss", "log_odds_ratio")

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__(beta)

    def __call__(self, logps: PairLogps) -> PreferenceLossOutput:
        """See :meth:`PreferenceLoss.__call__`.

        Also returns ``nll_loss`` (the SFT term) and ``log_odds_ratio`` as extras.
        """
        average_chosen = logps.average_chosen().clamp(max=_MAX_AVERAGE_LOGP)
        average_rejected = logps.average_rejected().clamp(max=_MAX_AVERAGE_LOGP)
        log_odds_chosen = average_chosen - log1m_exp(average_chosen)
        log_odds_rejected = average_rejected - log1m_exp(average_rejected)
        log_odds_ratio = log_odds_chosen - log_odds_rejected
        nll = -average_chosen
        losses = nll - self.beta * F.logsigmoid(log_odds_ratio)
        return PreferenceLossOutput(
            losses,
            self.beta * average_chosen.detach(),
            self.beta * average_rejected.detach(),
            extras={"nll_loss": nll.detach(), "log_odds_ratio": log_odds_ratio.detach()},
        )


__all__ = ["ORPOLoss"]
