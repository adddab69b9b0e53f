"""Reinforcement learning with verifiable rewards: rewards, advantages, rollouts, async generation."""

from lit_tune.rl.advantages import group_advantages
from lit_tune.rl.async_worker import AsyncRolloutLoader, SharedWeights, WorkerSpec, full_state_items
from lit_tune.rl.rewards import (
    BUILTIN_REWARDS,
    RewardFunction,
    RewardScores,
    RewardSet,
    extract_final_number,
    final_answer_format,
    numeric_match,
    resolve_reward,
    starts_with_number,
)
from lit_tune.rl.rollout import (
    Completions,
    GenerationConfig,
    PromptBatch,
    PromptRow,
    RolloutBatch,
    Rollouts,
    collate_rollouts,
    completion_mask,
    lengths_to_mask,
    sample_completions,
    score_completions,
)

__all__ = [
    "AsyncRolloutLoader",
    "BUILTIN_REWARDS",
    "Completions",
    "GenerationConfig",
    "PromptBatch",
    "PromptRow",
    "RewardFunction",
    "RewardScores",
    "RewardSet",
    "RolloutBatch",
    "Rollouts",
    "SharedWeights",
    "WorkerSpec",
    "collate_rollouts",
    "completion_mask",
    "extract_final_number",
    "final_answer_format",
    "full_state_items",
    "group_advantages",
    "lengths_to_mask",
    "numeric_match",
    "resolve_reward",
    "sample_completions",
    "score_completions",
    "starts_with_number",
]
