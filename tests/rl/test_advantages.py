"""Group-relative advantages on fixed numbers, including groups without reward spread."""

import math

import pytest
import torch

from lit_tune.rl.advantages import group_advantages


def test_equal_rewards_give_exactly_zero():
    advantages = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), group_size=4)
    assert torch.equal(advantages, torch.zeros(4))


def test_group_of_one_gives_exactly_zero():
    advantages = group_advantages(torch.tensor([0.3, 5.0, -2.0]), group_size=1)
    assert torch.equal(advantages, torch.zeros(3))


def test_rounding_residue_gives_exactly_zero():
    # 0.1 has no exact binary form, so the mean of three of them differs from 0.1 in the last bit.
    advantages = group_advantages(torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), group_size=3)
    assert torch.equal(advantages, torch.zeros(3))


def test_one_outlier_is_finite_and_hand_checked():
    # Mean 0.30625; centred 0.04375 (x7) and -0.30625; population std 0.30625 / sqrt(7).
    advantages = group_advantages(torch.tensor([0.35] * 7 + [0.0]), group_size=8)
    assert torch.isfinite(advantages).all()
    torch.testing.assert_close(advantages[:7], torch.full((7,), math.sqrt(1 / 7)), rtol=0, atol=1e-6)
    torch.testing.assert_close(advantages[7], torch.tensor(-math.sqrt(7)), rtol=0, atol=1e-6)


def test_groups_are_normalised_separately():
    rewards = torch.tensor([0.0, 1.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0])
    advantages = group_advantages(rewards, group_size=4)
    # Group 1: mean 1.25, centred [-1.25, -0.25, 0.75, 0.75], std sqrt(2.75 / 4).
    expected = torch.tensor([-1.25, -0.25, 0.75, 0.75]) / math.sqrt(2.75 / 4)
    torch.testing.assert_close(advantages[:4], expected, rtol=0, atol=1e-6)
    assert torch.equal(advantages[4:], torch.zeros(4))


def test_without_std_scaling_rewards_are_only_centred():
    advantages = group_advantages(torch.tensor([0.0, 1.0, 0.0, 3.0]), group_size=2, scale_by_std=False)
    torch.testing.assert_close(advantages, torch.tensor([-0.5, 0.5, -1.5, 1.5]), rtol=0, atol=1e-7)


def test_std_floor_bounds_tiny_spreads():
    # A spread of 2e-9 would be scaled to +-1 without the floor; with it, +-1e-9 / 1e-4.
    rewards = torch.tensor([1.0, 1.0 + 2e-9], dtype=torch.float64)
    advantages = group_advantages(rewards, group_size=2, std_floor=1e-4)
    torch.testing.assert_close(advantages, torch.tensor([-1e-5, 1e-5]), rtol=1e-3, atol=0)


def test_rewards_not_a_multiple_of_group_size():
    with pytest.raises(ValueError, match="Got 5 rewards for groups of 2"):
        group_advantages(torch.ones(5), group_size=2)
    with pytest.raises(ValueError, match="groups of 0"):
        group_advantages(torch.ones(4), group_size=0)
