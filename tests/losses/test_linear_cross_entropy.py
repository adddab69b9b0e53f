"""Chunked output projection plus cross entropy, against the unfused reference."""

import pytest
import torch
import torch.nn.functional as F

import lit_tune.losses.linear_cross_entropy as linear_ce
from lit_tune.losses import IGNORE_INDEX, linear_cross_entropy_sum


def _reference(hidden, weight, targets, label_smoothing):
    logits = (hidden @ weight.t()).flatten(0, 1)
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_elements", [2**24, 40])  # one chunk; chunks of 3 tokens
def test_matches_unfused_loss_and_gradients(monkeypatch, label_smoothing, chunk_elements):
    monkeypatch.setattr(linear_ce, "_CHUNK_ELEMENTS", chunk_elements)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 11, (2, 7))
    targets[0, :3] = IGNORE_INDEX
    targets[1, -1] = IGNORE_INDEX

    expected = _reference(hidden, weight, targets, label_smoothing)
    expected_grads = torch.autograd.grad(expected * 0.5, (hidden, weight))
    loss = linear_cross_entropy_sum(hidden, weight, targets, label_smoothing=label_smoothing)
    grads = torch.autograd.grad(loss * 0.5, (hidden, weight))

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], expected_grads[1], rtol=1e-5, atol=1e-5)


def test_all_masked_gives_zero_loss_and_gradients():
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    targets = torch.full((1, 5), IGNORE_INDEX)

    loss = linear_cross_entropy_sum(hidden, weight, targets)
    loss.backward()

    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0
    assert torch.count_nonzero(weight.grad) == 0


def test_frozen_weight_gets_no_gradient():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    weight = torch.randn(10, 8)
    loss = linear_cross_entropy_sum(hidden, weight, torch.randint(0, 10, (1, 4)))
    loss.backward()
    assert weight.grad is None
    assert hidden.grad is not None
