"""Fixed rollouts and optimizer settings shared by the FSDP2 script and its test."""

from __future__ import annotations

import torch

from lit_tune.rl.rollout import RolloutBatch, Rollouts, collate_rollouts

# (prompt, completion, advantage): completions of 3, 6, 2 and 4 tokens, so that the two ranks
# hold different token counts (9 and 6) and only a normaliser over both gives the right step.
SEQUENCES = [
    ([1, 40, 41], [50, 51, 2], 1.5),
    ([1, 43], [60, 61, 62, 63, 64, 2], -0.5),
    ([1, 44, 45, 46], [70, 2], 0.7),
    ([1, 47], [80, 81, 82, 2], -1.2),
]


def fixed_rollout_batch(ranks: tuple[int, ...]) -> RolloutBatch:
    """Collate the sequences of the given ranks (rank ``r`` gets sequences ``2r`` and ``2r + 1``)."""
    chosen = [SEQUENCES[i] for r in ranks for i in (2 * r, 2 * r + 1)]
    rollouts = Rollouts(
        prompt_ids=[p for p, _, _ in chosen],
        completion_ids=[c for _, c, _ in chosen],
        old_log_probs=[[0.0] * len(c) for _, c, _ in chosen],
        rewards=[a for _, _, a in chosen],
        reward_components={},
        advantages=[a for _, _, a in chosen],
        truncated=[False] * len(chosen),
        masked=[False] * len(chosen),
        group_size=1,
    )
    return collate_rollouts(rollouts, pad_token_id=0)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
