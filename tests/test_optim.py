"""WarmupCosine: the schedule's values and its state round trip."""

import math

import pytest
import torch

from lit_tune.optim import WarmupCosine


def _scheduler(**kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return optimizer, WarmupCosine(optimizer, **kwargs)


def test_warmup_starts_at_zero_then_decays_to_min():
    optimizer, scheduler = _scheduler(warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    lrs = []
    for _ in range(13):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[12] == pytest.approx(0.1)


def test_state_round_trip_restores_position_and_length():
    optimizer, scheduler = _scheduler(warmup_steps=2, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    torch.save(state, "/dev/null")  # must be serialisable
    optimizer2, restored = _scheduler(warmup_steps=0)
    restored.load_state_dict(state)
    assert restored.total_steps == 10
    assert restored.warmup_steps == 2
    assert restored.last_epoch == 5
    restored.step()
    scheduler.step()
    assert restored.get_last_lr() == scheduler.get_last_lr()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        _scheduler(warmup_steps=-1)
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        _scheduler(min_lr_ratio=2.0)
