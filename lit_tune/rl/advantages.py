"""Group-relative advantages: each completion's reward compared with the others of its prompt."""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor, group_size: int, *, scale_by_std: bool = True, std_floor: float = 1e-4
) -> Tensor:
    """Normalise rewards within each group of completions of the same prompt.

    The advantage of completion ``i`` of a group is ``(r_i - mean) / max(std, std_floor)``, with
    the population standard deviation of the group (divisor ``group_size``), or ``r_i - mean``
    when ``scale_by_std`` is False. A group whose rewards are all equal, and so any group of size
    1, gets advantages of exactly 0. The floor keeps rounding noise in nearly equal rewards from
    being blown up to advantages of order 1. With the population deviation, one outlier among
    ``n`` equal rewards gets ``-sqrt(n - 1)`` and the others ``1 / sqrt(n - 1)`` (for example
    ``[0.35] * 7 + [0.0]`` gives ``sqrt(1/7)`` and ``-sqrt(7)``).

    Args:
        rewards: ``[num_groups * group_size]`` rewards, group by group.
        group_size: Completions per prompt.
        scale_by_std: Divide by the group's standard deviation.
        std_floor: Smallest standard deviation divided by, in reward units.

    Returns:
        ``[num_groups * group_size]`` fp32 advantages.

    Raises:
        ValueError: If the number of rewards is not a multiple of ``group_size``.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"Got {rewards.numel()} rewards for groups of {group_size}; the number of rewards must be "
            "a positive multiple of group_size."
        )
    grouped = rewards.detach().double().view(-1, group_size)  # [num_groups, group_size]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    # Rewards that are all equal can still leave a rounding residue after the mean is subtracted.
    no_spread = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    centred = torch.where(no_spread, torch.zeros_like(centred), centred)
    if scale_by_std:
        std = centred.pow(2).mean(dim=1, keepdim=True).sqrt()  # [num_groups, 1]
        centred = centred / std.clamp(min=std_floor)
    return centred.flatten().float()


__all__ = ["group_advantages"]
