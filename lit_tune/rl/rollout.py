"""Rollouts: sampling completions, completion masks, scoring, and collation into training batches.

A *rollout* is one prompt with a group of completions sampled from the policy, the log-probability
of every sampled token under the sampling policy, the rewards and the group-relative advantages.
Masks come from the position of the first EOS in each completion (or from the generation length),
never from comparing token ids with the pad id, so a pad id equal to the EOS id is harmless.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import DynamicCache, PreTrainedTokenizerBase

from lit_tune.data.collate import TokenBatch
from lit_tune.losses import IGNORE_INDEX
from lit_tune.rl.advantages import group_advantages
from lit_tune.rl.rewards import RewardSet


@dataclass
class PromptRow:
    """One prompt of the training data.

    Attributes:
        prompt_ids: Token ids of the rendered prompt, ending where the answer starts.
        prompt: The prompt as the data gave it (text or chat messages), passed to reward functions.
        fields: The data row's other columns (for example ``answer``), passed to reward functions.
        masked: A filler that keeps ranks in step at the end of an epoch; it is generated for but
            carries no loss.
    """

    prompt_ids: list[int]
    prompt: Any
    fields: dict[str, Any] = field(default_factory=dict)
    masked: bool = False


@dataclass
class PromptBatch:
    """A micro-batch of prompts, as :class:`~lit_tune.data.prompts.PromptLoader` yields it."""

    rows: list[PromptRow]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class GenerationConfig:
    """Sampling settings.

    Attributes:
        group_size: Completions per prompt.
        max_new_tokens: Generation stops after this many tokens when no EOS came first.
        temperature: Softmax temperature of the sampling; the training loss uses the same one.
        eos_token_id: Token that ends a completion.
        pad_token_id: Token written after a completion's end (ignored by masks).
    """

    group_size: int
    max_new_tokens: int
    temperature: float
    eos_token_id: int
    pad_token_id: int


@dataclass
class Completions:
    """Sampled completions of a batch of prompts.

    Attributes:
        token_ids: ``[num_sequences, max_new_tokens_used]`` sampled ids, ``pad_token_id`` after EOS.
        log_probs: ``[num_sequences, max_new_tokens_used]`` log-probability of each sampled token
            under the sampling policy at the sampling temperature; 0 after the end.
        lengths: ``[num_sequences]`` tokens up to and including the first EOS.
        seconds: Wall-clock time of the sampling.
    """

    token_ids: Tensor
    log_probs: Tensor
    lengths: Tensor
    seconds: float


@dataclass
class Rollouts:
    """Scored groups of completions, ready to collate; plain lists, so they pickle cheaply.

    Sequence ``i`` belongs to prompt ``i // group_size``.

    Attributes:
        prompt_ids: Prompt token ids of each sequence.
        completion_ids: Completion token ids of each sequence, up to and including EOS.
        old_log_probs: Sampling-policy log-probability of each completion token.
        rewards: Weighted total reward of each sequence.
        reward_components: Unweighted reward of each sequence, by reward function.
        advantages: Group-relative advantage of each sequence.
        truncated: Whether a completion stopped at ``max_new_tokens`` without EOS.
        masked: Whether a sequence comes from a filler prompt and carries no loss.
        group_size: Completions per prompt.
        policy_version: Optimizer steps the sampling policy had taken.
        generation_seconds: Time spent sampling.
        stale_discarded: Rollout batches the worker discarded as too old since its last queued
            one (asynchronous mode).
        prompt_state: The prompt loader's ``state_dict()`` right after the prompts of this batch
            (asynchronous mode), or None when the loader has no state.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    old_log_probs: list[list[float]]
    rewards: list[float]
    reward_components: dict[str, list[float]]
    advantages: list[float]
    truncated: list[bool]
    masked: list[bool]
    group_size: int
    policy_version: int = 0
    generation_seconds: float = 0.0
    stale_discarded: int = 0
    prompt_state: dict | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)


@dataclass
class RolloutBatch(TokenBatch):
    """A collated batch of rollouts; a :class:`~lit_tune.data.collate.TokenBatch` with RL fields.

    ``labels`` hold the completion tokens and ``IGNORE_INDEX`` elsewhere (prompt, tokens after EOS,
    padding), so ``shift_labels(labels) != IGNORE_INDEX`` is the loss mask.

    Attributes:
        old_log_probs: ``[batch, seq_len]`` sampling-policy log-probabilities aligned with the
            shifted labels: position ``t`` contains the log-probability of token ``t + 1``.
        advantages: ``[batch]`` advantage of each sequence.
        policy_version: Optimizer steps the sampling policy had taken.
        stats: Reward and generation statistics of the batch, for logging.
    """

    old_log_probs: Tensor | None = None
    advantages: Tensor | None = None
    policy_version: int = 0
    stats: dict[str, float] = field(default_factory=dict)


def completion_mask(completion_ids: Tensor, eos_token_id: int) -> Tensor:
    """Mask of the tokens of each completion up to and including its first EOS.

    Only the first EOS matters: what follows it is padding even when the pad id equals the EOS id,
    so ``[11, 12, 2, 2, 2]`` with EOS 2 gives ``[1, 1, 1, 0, 0]``. A completion without EOS is kept
    whole (it stopped at the token limit).

    Args:
        completion_ids: ``[batch, length]`` generated token ids.
        eos_token_id: The EOS id.

    Returns:
        ``[batch, length]`` long tensor of 0 and 1.
    """
    is_eos = completion_ids == eos_token_id
    # Count the EOS tokens strictly before each position: a position is kept while that count is 0.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()


def lengths_to_mask(lengths: Tensor, width: int) -> Tensor:
    """Return ``[batch, width]`` with 1 on the first ``lengths[i]`` positions of row ``i``."""
    positions = torch.arange(width, device=lengths.device)
    return (positions.unsqueeze(0) < lengths.unsqueeze(1)).long()


def _left_pad(prompts: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, device=device)
        attention_mask[i, width - len(prompt) :] = 1
    return input_ids, attention_mask


def _is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _all_finished(finished: Tensor, synchronise: bool) -> bool:
    """Return whether every sequence has ended, on every rank when ``synchronise`` is set.

    Under sharding each forward pass is a collective, so all ranks must stop at the same step.
    """
    done = finished.all().to(torch.int32)
    if synchronise:
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done.item())


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompts: Sequence[list[int]],
    config: GenerationConfig,
    generator: torch.Generator | None = None,
) -> Completions:
    """Sample ``config.group_size`` completions per prompt, with a KV cache.

    Prompts are left-padded, each repeated ``group_size`` times, and position ids count real
    tokens only, so every sequence gets the same positions as it would alone. Sampling stops at
    EOS or after ``max_new_tokens``. Under a sharding strategy every rank keeps calling the model
    until all ranks are done, because each forward pass is a collective.

    Args:
        model: A causal LM whose forward takes ``input_ids``, ``attention_mask``,
            ``position_ids`` and ``past_key_values`` and returns ``.logits``.
        prompts: Prompt token ids.
        config: Sampling settings.
        generator: Random generator on the model's device, for reproducible samples.

    Returns:
        The sampled completions, sequence ``i`` from prompt ``i // group_size``.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    repeated = [prompt for prompt in prompts for _ in range(config.group_size)]
    input_ids, attention_mask = _left_pad(repeated, config.pad_token_id, device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    forward_kwargs = _forward_kwargs(model, DynamicCache())
    synchronise = dist.is_available() and dist.is_initialized() and _is_sharded(model)

    num_sequences = len(repeated)
    finished = torch.zeros(num_sequences, dtype=torch.bool, device=device)
    lengths = torch.zeros(num_sequences, dtype=torch.long, device=device)
    tokens, log_probs = [], []
    for _ in range(config.max_new_tokens):
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **forward_kwargs)
        logits = _full(output.logits[:, -1]).float() / config.temperature  # [num_sequences, vocab]
        step_log_probs = torch.log_softmax(logits, dim=-1)
        sampled = torch.multinomial(step_log_probs.exp(), 1, generator=generator).squeeze(1)
        sampled_log_prob = step_log_probs.gather(1, sampled.unsqueeze(1)).squeeze(1)

        # Sequences that already ended get padding and log-probability 0.
        sampled = torch.where(finished, torch.full_like(sampled, config.pad_token_id), sampled)
        tokens.append(sampled)
        log_probs.append(torch.where(finished, torch.zeros_like(sampled_log_prob), sampled_log_prob))
        lengths += (~finished).long()
        finished |= sampled == config.eos_token_id
        if _all_finished(finished, synchronise):
            break

        input_ids = sampled.unsqueeze(1)  # [num_sequences, 1]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(num_sequences, 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return Completions(
        token_ids=torch.stack(tokens, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        lengths=lengths,
        seconds=time.perf_counter() - start,
    )


def _forward_kwargs(model: nn.Module, cache: DynamicCache) -> dict[str, Any]:
    """Return the keyword arguments that pass the KV cache and keep only the last logits.

    transformers 5.25 takes ``cache`` and warns that ``past_key_values`` goes away in 5.40, while
    4.x takes only ``past_key_values``, so the forward signature picks the name.
    ``logits_to_keep=1`` skips the output projection of all prompt positions.
    """
    parameters = inspect.signature(type(model).forward).parameters
    kwargs: dict[str, Any] = {"use_cache": True}
    kwargs["cache" if "cache" in parameters else "past_key_values"] = cache
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


def _full(logits: Tensor) -> Tensor:
    # Vocabulary-sharded logits (tensor parallel) are gathered: sampling needs the whole row.
    # NOTE: untested. The ranks of a tensor-parallel group must also sample the same tokens,
    # which needs the same generator state on each of them.
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def score_completions(
    rows: Sequence[PromptRow],
    completions: Completions,
    tokenizer: PreTrainedTokenizerBase,
    rewards: RewardSet,
    config: GenerationConfig,
    *,
    scale_by_std: bool = True,
    std_floor: float = 1e-4,
) -> Rollouts:
    """Decode completions, score them and compute group-relative advantages.

    Args:
        rows: The prompts that ``completions`` were sampled for.
        completions: Output of :func:`sample_completions`.
        tokenizer: Decodes completions (special tokens are dropped from the text).
        rewards: The reward functions.
        config: The sampling settings used.
        scale_by_std: See :func:`~lit_tune.rl.advantages.group_advantages`.
        std_floor: See :func:`~lit_tune.rl.advantages.group_advantages`.
    """
    group = config.group_size
    lengths = completions.lengths.tolist()
    token_ids = completions.token_ids.cpu().tolist()
    log_probs = completions.log_probs.float().cpu().tolist()
    completion_ids = [ids[:n] for ids, n in zip(token_ids, lengths)]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    sequence_rows = [row for row in rows for _ in range(group)]
    scores = rewards([row.prompt for row in sequence_rows], texts, [row.fields for row in sequence_rows])
    advantages = group_advantages(torch.tensor(scores.total), group, scale_by_std=scale_by_std, std_floor=std_floor)
    return Rollouts(
        prompt_ids=[row.prompt_ids for row in sequence_rows],
        completion_ids=completion_ids,
        old_log_probs=[lp[:n] for lp, n in zip(log_probs, lengths)],
        rewards=scores.total,
        reward_components=scores.components,
        advantages=advantages.tolist(),
        truncated=[ids[-1] != config.eos_token_id for ids in completion_ids],
        masked=[row.masked for row in sequence_rows],
        group_size=group,
        generation_seconds=completions.seconds,
    )


def collate_rollouts(rollouts: Rollouts, pad_token_id: int, *, current_version: int | None = None) -> RolloutBatch:
    """Right-pad rollouts into a :class:`RolloutBatch` of ``prompt + completion`` sequences.

    Args:
        rollouts: Scored rollouts.
        pad_token_id: Token id written into padding (never used to build a mask).
        current_version: The trainer's policy version, for the lag statistic; None gives lag 0.
    """
    rows = len(rollouts)
    seq_len = max(len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids))
    input_ids = torch.full((rows, seq_len), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, seq_len), dtype=torch.long)
    old_log_probs = torch.zeros((rows, seq_len), dtype=torch.float32)
    for i, (prompt, completion) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids)):
        start, end = len(prompt), len(prompt) + len(completion)
        input_ids[i, :end] = torch.tensor(prompt + completion)
        attention_mask[i, :end] = 1
        if not rollouts.masked[i]:
            labels[i, start:end] = torch.tensor(completion)
        # Shifted by one: the logits at position t - 1 predict the token at position t.
        old_log_probs[i, start - 1 : end - 1] = torch.tensor(rollouts.old_log_probs[i])
    num_targets = int((labels != IGNORE_INDEX).sum())
    return RolloutBatch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        num_tokens=int(attention_mask.sum()),
        num_targets=num_targets,
        old_log_probs=old_log_probs,
        advantages=torch.tensor(rollouts.advantages, dtype=torch.float32),
        policy_version=rollouts.policy_version,
        stats=rollout_stats(rollouts, current_version),
    )


def rollout_stats(rollouts: Rollouts, current_version: int | None = None) -> dict[str, float]:
    """Reward, length and generation statistics of the rollouts that carry a loss.

    Returns:
        ``reward_mean``, ``reward_std``, ``<name>_mean`` and ``<name>_std`` per reward function,
        ``completion_length``, ``truncated_fraction``, ``zero_spread_groups`` (fraction of groups
        whose rewards are all equal), ``generation_tokens_per_sec`` and ``policy_lag``.
    """
    keep = [i for i, masked in enumerate(rollouts.masked) if not masked] or list(range(len(rollouts)))
    rewards = torch.tensor([rollouts.rewards[i] for i in keep], dtype=torch.float64)
    stats = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item()}
    for name, values in rollouts.reward_components.items():
        component = torch.tensor([values[i] for i in keep], dtype=torch.float64)
        stats[f"rewards/{name}_mean"] = component.mean().item()
        stats[f"rewards/{name}_std"] = component.std(unbiased=False).item()
    lengths = [len(rollouts.completion_ids[i]) for i in keep]
    stats["completion_length"] = sum(lengths) / len(lengths)
    stats["truncated_fraction"] = sum(rollouts.truncated[i] for i in keep) / len(keep)
    grouped = torch.tensor(rollouts.rewards).view(-1, rollouts.group_size)
    stats["zero_spread_groups"] = (grouped == grouped[:, :1]).all(dim=1).double().mean().item()
    generated = sum(len(ids) for ids in rollouts.completion_ids)
    stats["generation_tokens_per_sec"] = generated / max(rollouts.generation_seconds, 1e-9)
    stats["policy_lag"] = float(0 if current_version is None else current_version - rollouts.policy_version)
    return stats


__all__ = [
    "Completions",
    "GenerationConfig",
    "PromptBatch",
    "PromptRow",
    "RolloutBatch",
    "Rollouts",
    "collate_rollouts",
    "completion_mask",
    "lengths_to_mask",
    "rollout_stats",
    "sample_completions",
    "score_completions",
]
