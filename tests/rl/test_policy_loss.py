"""Clipped policy-gradient loss and the k3 KL estimator on fixed numbers."""

import math

import pytest
import torch

from lit_tune.losses.policy import ClippedPolicyLoss, k3_kl

# Two sequences of three positions; the last position of sequence 2 is not a completion token.
RATIOS = torch.tensor([[1.0, 1.5, 0.7], [0.5, 1.1, 1.0]], dtype=torch.float64)
ADVANTAGES = torch.tensor([2.0, -1.0], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _inputs():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.9]], dtype=torch.float64, requires_grad=True)
    old_log_probs = log_probs.detach() - RATIOS.log()
    return log_probs, old_log_probs


def _naive_token_losses(ratios, advantages, mask, eps_low=0.2, eps_high=0.2):
    """Per-token clipped surrogate, one position at a time."""
    losses = {}
    for i in range(ratios.shape[0]):
        for t in range(ratios.shape[1]):
            if mask[i, t]:
                r, a = ratios[i, t].item(), advantages[i].item()
                clipped = min(max(r, 1 - eps_low), 1 + eps_high)
                losses[(i, t)] = -min(r * a, clipped * a)
    return losses


def test_token_average_on_fixed_numbers():
    log_probs, old = _inputs()
    terms = ClippedPolicyLoss(clip_eps=0.2)(log_probs, old, ADVANTAGES, MASK)
    # By hand: -2, -2.4 (clipped above), -1.4 (below 0.8 but A > 0, so not clipped), 0.8 (clipped), 1.1.
    naive = _naive_token_losses(RATIOS, ADVANTAGES, MASK)
    assert sorted(round(v, 9) for v in naive.values()) == [-2.4, -2.0, -1.4, 0.8, 1.1]
    torch.testing.assert_close(terms.loss_sum, torch.tensor(-3.9, dtype=torch.float64), rtol=0, atol=1e-9)
    assert terms.count.item() == 5
    assert terms.num_tokens.item() == 5
    assert terms.clipped_tokens.item() == 2
    assert terms.ratio_max.item() == pytest.approx(1.5)


def test_token_average_gradient():
    log_probs, old = _inputs()
    terms = ClippedPolicyLoss(clip_eps=0.2)(log_probs, old, ADVANTAGES, MASK)
    (terms.loss_sum / terms.count).backward()
    # d(-r * A)/d logp = -r * A on unclipped tokens; clipped tokens and masked positions give 0.
    expected = torch.tensor([[-2.0 * 1.0, 0.0, -2.0 * 0.7], [0.0, 1.1, 0.0]], dtype=torch.float64) / 5
    torch.testing.assert_close(log_probs.grad, expected, rtol=0, atol=1e-9)


def test_sequence_average_on_fixed_numbers():
    log_probs, old = _inputs()
    terms = ClippedPolicyLoss(clip_eps=0.2, average="sequence")(log_probs, old, ADVANTAGES, MASK)
    expected = (-2.0 - 2.4 - 1.4) / 3 + (0.8 + 1.1) / 2
    torch.testing.assert_close(terms.loss_sum, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)
    assert terms.count.item() == 2


def test_asymmetric_clip_range():
    log_probs, old = _inputs()
    terms = ClippedPolicyLoss(clip_eps=0.2, clip_eps_high=0.28)(log_probs, old, ADVANTAGES, MASK)
    naive = _naive_token_losses(RATIOS, ADVANTAGES, MASK, eps_high=0.28)
    torch.testing.assert_close(terms.loss_sum.item(), sum(naive.values()), rtol=0, atol=1e-9)
    assert naive[(0, 1)] == pytest.approx(-1.28 * 2.0)


def test_ratio_one_gives_plain_policy_gradient():
    log_probs = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    advantages = torch.tensor([0.5, -1.5])
    mask = torch.ones(2, 2)
    terms = ClippedPolicyLoss()(log_probs, log_probs.detach(), advantages, mask)
    torch.testing.assert_close(terms.loss_sum, torch.tensor(-(0.5 * 2) + 1.5 * 2), rtol=0, atol=1e-6)
    terms.loss_sum.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([[-0.5, -0.5], [1.5, 1.5]]), rtol=0, atol=1e-6)
    assert terms.clipped_tokens.item() == 0


def test_kl_penalty_is_added_per_token():
    log_probs, old = _inputs()
    ref = log_probs.detach() + torch.tensor([[0.1, -0.2, 0.0], [0.3, 0.5, 9.0]], dtype=torch.float64)
    plain = ClippedPolicyLoss(clip_eps=0.2)(log_probs, old, ADVANTAGES, MASK)
    with_kl = ClippedPolicyLoss(clip_eps=0.2, kl_coef=0.5)(log_probs, old, ADVANTAGES, MASK, ref)
    x = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.5], dtype=torch.float64)  # the masked 9.0 is left out
    k3 = (x.exp() - x - 1).sum()
    torch.testing.assert_close(with_kl.kl_sum, k3, rtol=0, atol=1e-9)
    torch.testing.assert_close(with_kl.loss_sum, plain.loss_sum + 0.5 * k3, rtol=0, atol=1e-9)


def test_k3_is_non_negative_and_exact():
    torch.manual_seed(0)
    log_probs = torch.randn(1000) * 3
    ref = log_probs + torch.randn(1000) * 1e-4 * torch.randint(0, 2, (1000,))  # many exact zeros
    assert (k3_kl(log_probs, ref) >= 0).all()
    assert (k3_kl(log_probs, log_probs) == 0).all()
    value = k3_kl(torch.tensor([-1.0]), torch.tensor([-2.0]))
    torch.testing.assert_close(value, torch.tensor([math.exp(-1.0) + 1.0 - 1.0]), rtol=0, atol=1e-7)


def test_masked_positions_never_produce_nan():
    log_probs = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -math.inf]])
    ref = torch.tensor([[-1.0, math.inf]])
    mask = torch.tensor([[1, 0]])
    terms = ClippedPolicyLoss(kl_coef=0.1)(log_probs, old, torch.tensor([1.0]), mask, ref)
    terms.loss_sum.backward()
    assert torch.isfinite(terms.loss_sum)
    assert torch.isfinite(log_probs.grad).all()
    assert log_probs.grad[0, 1] == 0


def test_no_completion_token_gives_zero():
    log_probs = torch.zeros(2, 3, requires_grad=True)
    for average in ("token", "sequence"):
        terms = ClippedPolicyLoss(average=average)(log_probs, log_probs.detach(), torch.ones(2), torch.zeros(2, 3))
        assert terms.loss_sum.item() == 0.0
        assert terms.count.item() == 0


def test_invalid_arguments_are_listed_together():
    with pytest.raises(ValueError) as error:
        ClippedPolicyLoss(clip_eps=1.5, clip_eps_high=0.0, kl_coef=-1.0, average="batch")
    message = str(error.value)
    for part in ("clip_eps=1.5", "clip_eps_high=0.0", "kl_coef=-1.0", "average='batch'"):
        assert part in message


def test_kl_needs_reference():
    log_probs = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="needs ref_log_probs"):
        ClippedPolicyLoss(kl_coef=0.1)(log_probs, log_probs, torch.ones(1), torch.ones(1, 2))
