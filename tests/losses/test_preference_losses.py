"""Each preference loss against its formula, written out with `math`, on fixed log-probabilities."""

import math

import pytest
import torch

from lit_tune.losses.conservative_dpo import ConservativeDPOLoss
from lit_tune.losses.dpo_sigmoid import SigmoidDPOLoss
from lit_tune.losses.hinge import HingeLoss
from lit_tune.losses.ipo import IPOLoss
from lit_tune.losses.orpo import ORPOLoss
from lit_tune.losses.preference import PairLogps, log1m_exp
from lit_tune.losses.preference_registry import PREFERENCE_LOSSES, build_preference_loss
from lit_tune.losses.simpo import SimPOLoss

# Three pairs: summed log-probabilities, response lengths and reference log-probabilities.
CHOSEN = [-11.0, -20.0, -3.5]
REJECTED = [-11.0, -18.0, -9.0]
CHOSEN_TOKENS = [5.0, 10.0, 2.0]
REJECTED_TOKENS = [4.0, 6.0, 3.0]
REF_CHOSEN = [-10.0, -21.0, -4.0]
REF_REJECTED = [-12.0, -17.5, -8.0]


def _logps(reference=True, requires_grad=False):
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=requires_grad)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=requires_grad)
    return PairLogps(
        chosen=chosen,
        rejected=rejected,
        chosen_tokens=torch.tensor(CHOSEN_TOKENS, dtype=torch.float64),
        rejected_tokens=torch.tensor(REJECTED_TOKENS, dtype=torch.float64),
        reference_chosen=torch.tensor(REF_CHOSEN, dtype=torch.float64) if reference else None,
        reference_rejected=torch.tensor(REF_REJECTED, dtype=torch.float64) if reference else None,
    )


def _margin(i):
    """DPO's h: policy-minus-reference log-ratio of chosen minus that of rejected."""
    return (CHOSEN[i] - REF_CHOSEN[i]) - (REJECTED[i] - REF_REJECTED[i])


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def _assert_values(tensor, expected, tol=1e-12):
    assert tensor.shape == (len(expected),)
    for got, want in zip(tensor.tolist(), expected):
        assert got == pytest.approx(want, abs=tol, rel=tol)


def test_sigmoid_dpo_one_pair_values():
    # One pair: reference -10 / -12, policy -11 / -11, beta 0.1.
    logps = PairLogps(
        chosen=torch.tensor([-11.0]),
        rejected=torch.tensor([-11.0]),
        chosen_tokens=torch.tensor([3.0]),
        rejected_tokens=torch.tensor([7.0]),
        reference_chosen=torch.tensor([-10.0]),
        reference_rejected=torch.tensor([-12.0]),
    )
    output = SigmoidDPOLoss(beta=0.1)(logps)
    assert output.losses.item() == pytest.approx(math.log(1 + math.exp(0.2)), abs=1e-6)
    assert output.losses.item() == pytest.approx(0.7981, abs=1e-4)
    assert output.chosen_rewards.item() == pytest.approx(-0.1, abs=1e-6)
    assert output.rejected_rewards.item() == pytest.approx(0.1, abs=1e-6)


def test_sigmoid_dpo_formula_and_rewards():
    beta = 0.1
    output = SigmoidDPOLoss(beta=beta)(_logps())
    _assert_values(output.losses, [-_log_sigmoid(beta * _margin(i)) for i in range(3)])
    _assert_values(output.chosen_rewards, [beta * (CHOSEN[i] - REF_CHOSEN[i]) for i in range(3)])
    _assert_values(
        output.rejected_rewards, [beta * (REJECTED[i] - REF_REJECTED[i]) for i in range(3)]
    )


def test_sigmoid_dpo_gradient():
    # d/d(pi_c) of -log sigmoid(beta h) is -beta * sigmoid(-beta h); d/d(pi_r) is the opposite.
    beta = 0.5
    logps = _logps(requires_grad=True)
    SigmoidDPOLoss(beta=beta)(logps).losses.sum().backward()
    expected = [-beta / (1 + math.exp(beta * _margin(i))) for i in range(3)]
    _assert_values(logps.chosen.grad, expected)
    _assert_values(logps.rejected.grad, [-g for g in expected])


def test_conservative_dpo_formula():
    beta, eps = 0.2, 0.15
    output = ConservativeDPOLoss(beta=beta, label_smoothing=eps)(_logps())
    expected = [
        -(1 - eps) * _log_sigmoid(beta * _margin(i)) - eps * _log_sigmoid(-beta * _margin(i))
        for i in range(3)
    ]
    _assert_values(output.losses, expected)
    _assert_values(output.chosen_rewards, [beta * (CHOSEN[i] - REF_CHOSEN[i]) for i in range(3)])


def test_conservative_dpo_rejects_bad_smoothing():
    for eps in (0.0, 0.5, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            ConservativeDPOLoss(label_smoothing=eps)


def test_ipo_formula_averaged():
    beta = 0.1
    output = IPOLoss(beta=beta)(_logps())
    expected = []
    for i in range(3):
        h = (CHOSEN[i] - REF_CHOSEN[i]) / CHOSEN_TOKENS[i] - (
            REJECTED[i] - REF_REJECTED[i]
        ) / REJECTED_TOKENS[i]
        expected.append((h - 1 / (2 * beta)) ** 2)
    _assert_values(output.losses, expected)
    # Rewards stay on summed log-probabilities, like the other DPO losses.
    _assert_values(output.chosen_rewards, [beta * (CHOSEN[i] - REF_CHOSEN[i]) for i in range(3)])


def test_ipo_formula_summed():
    beta = 0.25
    output = IPOLoss(beta=beta, average_log_probs=False)(_logps())
    _assert_values(output.losses, [(_margin(i) - 1 / (2 * beta)) ** 2 for i in range(3)])


def test_hinge_formula():
    beta = 0.7
    output = HingeLoss(beta=beta)(_logps())
    expected = [max(0.0, 1 - beta * _margin(i)) for i in range(3)]
    _assert_values(output.losses, expected)
    # Pair 0 has h = -2, inside the margin; pair 2 has h = 1.5, so beta * h = 1.05 >= 1 and the
    # hinge is flat there.
    assert expected[0] == pytest.approx(2.4)
    assert expected[2] == 0.0


def test_simpo_formula():
    beta, gamma = 2.0, 0.7
    output = SimPOLoss(beta=beta, gamma=gamma)(_logps(reference=False))
    expected, chosen_rewards = [], []
    for i in range(3):
        chosen = beta * CHOSEN[i] / CHOSEN_TOKENS[i]
        rejected = beta * REJECTED[i] / REJECTED_TOKENS[i]
        expected.append(-_log_sigmoid(chosen - rejected - gamma))
        chosen_rewards.append(chosen)
    _assert_values(output.losses, expected)
    _assert_values(output.chosen_rewards, chosen_rewards)


def test_orpo_formula():
    beta = 0.1
    output = ORPOLoss(beta=beta)(_logps(reference=False))
    expected, ratios = [], []
    for i in range(3):
        chosen = CHOSEN[i] / CHOSEN_TOKENS[i]
        rejected = REJECTED[i] / REJECTED_TOKENS[i]
        log_odds = (chosen - math.log1p(-math.exp(chosen))) - (
            rejected - math.log1p(-math.exp(rejected))
        )
        ratios.append(log_odds)
        expected.append(-chosen - beta * _log_sigmoid(log_odds))
    _assert_values(output.losses, expected, tol=1e-10)
    _assert_values(output.extras["log_odds_ratio"], ratios, tol=1e-10)
    _assert_values(output.extras["nll_loss"], [-CHOSEN[i] / CHOSEN_TOKENS[i] for i in range(3)])
    _assert_values(output.chosen_rewards, [beta * CHOSEN[i] / CHOSEN_TOKENS[i] for i in range(3)])
    assert set(output.extras) == set(ORPOLoss.extra_metrics)


def test_orpo_finite_at_probability_one():
    logps = PairLogps(
        chosen=torch.zeros(1, requires_grad=True),
        rejected=torch.tensor([-2.0]),
        chosen_tokens=torch.ones(1),
        rejected_tokens=torch.ones(1),
    )
    output = ORPOLoss()(logps)
    output.losses.sum().backward()
    assert torch.isfinite(output.losses).all()
    assert torch.isfinite(logps.chosen.grad).all()


def test_log1m_exp_matches_naive_and_is_accurate():
    x = torch.tensor(
        [-1e-8, -1e-3, -0.5, -0.7, -2.0, -30.0], dtype=torch.float64, requires_grad=True
    )
    got = log1m_exp(x)
    for value, result in zip(x.tolist(), got.tolist()):
        assert result == pytest.approx(math.log(-math.expm1(value)), rel=1e-12)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_reference_losses_need_reference():
    for cls in (SigmoidDPOLoss, IPOLoss, HingeLoss, ConservativeDPOLoss):
        assert cls.needs_reference
        with pytest.raises(ValueError, match="reference"):
            cls()(_logps(reference=False))
    assert not SimPOLoss.needs_reference
    assert not ORPOLoss.needs_reference


def test_registry_builds_by_name():
    assert sorted(PREFERENCE_LOSSES) == ["cdpo", "hinge", "ipo", "orpo", "sigmoid", "simpo"]
    loss = build_preference_loss("cdpo", beta=0.3, label_smoothing=0.2)
    assert isinstance(loss, ConservativeDPOLoss)
    assert (loss.beta, loss.label_smoothing) == (0.3, 0.2)
    assert build_preference_loss("simpo").beta == 2.0


def test_registry_rejects_unknown_name_and_option():
    with pytest.raises(ValueError, match="Unknown preference loss 'dpo'"):
        build_preference_loss("dpo")
    with pytest.raises(ValueError, match="gamma"):
        build_preference_loss("sigmoid", gamma=1.0)
    with pytest.raises(ValueError, match="beta=0"):
        build_preference_loss("hinge", beta=0)
