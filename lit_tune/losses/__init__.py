"""Loss functions: cross entropy (plain and vocabulary-sharded), preference and policy losses."""

from lit_tune.losses.cross_entropy import (
    IGNORE_INDEX,
    count_targets,
    cross_entropy_sum,
    shift_labels,
    token_cross_entropy,
    token_log_probs,
)

__all__ = [
    "IGNORE_INDEX",
    "count_targets",
    "cross_entropy_sum",
    "shift_labels",
    "token_cross_entropy",
    "token_log_probs",
]
