"""Loss functions: cross entropy (plain and vocabulary-sharded), preference and policy losses."""

from lit_tune.losses.conservative_dpo import ConservativeDPOLoss
from lit_tune.losses.cross_entropy import (
    IGNORE_INDEX,
    count_targets,
    cross_entropy_sum,
    shift_labels,
    token_cross_entropy,
    token_log_probs,
)
from lit_tune.losses.dpo_sigmoid import SigmoidDPOLoss
from lit_tune.losses.hinge import HingeLoss
from lit_tune.losses.ipo import IPOLoss
from lit_tune.losses.linear_cross_entropy import linear_cross_entropy_sum
from lit_tune.losses.orpo import ORPOLoss
from lit_tune.losses.policy import ClippedPolicyLoss, PolicyLossTerms, k3_kl
from lit_tune.losses.preference import PairLogps, PreferenceLoss, PreferenceLossOutput
from lit_tune.losses.preference_registry import PREFERENCE_LOSSES, build_preference_loss
from lit_tune.losses.simpo import SimPOLoss

__all__ = [
    "ClippedPolicyLoss",
    "ConservativeDPOLoss",
    "HingeLoss",
    "IGNORE_INDEX",
    "IPOLoss",
    "ORPOLoss",
    "PREFERENCE_LOSSES",
    "PairLogps",
    "PolicyLossTerms",
    "PreferenceLoss",
    "PreferenceLossOutput",
    "SigmoidDPOLoss",
    "SimPOLoss",
    "build_preference_loss",
    "count_targets",
    "cross_entropy_sum",
    "k3_kl",
    "linear_cross_entropy_sum",
    "shift_labels",
    "token_cross_entropy",
    "token_log_probs",
]
