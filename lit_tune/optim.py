"""Learning-rate schedules."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warm-up from 0 to the base learning rate, then cosine decay to ``min_lr_ratio`` of it.

    The factor at step ``s`` is ``s / warmup_steps`` during warm-up, so step 0 has learning rate 0
    when ``warmup_steps > 0``. ``total_steps`` may be left None and set later with
    :meth:`set_total_steps` (lit_tune's modules set it from ``trainer.estimated_stepping_batches``);
    until then the schedule stays flat after warm-up.

    Args:
        optimizer: The optimizer whose groups are scheduled.
        warmup_steps: Steps of linear warm-up.
        total_steps: Steps until the end of the cosine decay.
        min_lr_ratio: Final learning rate as a fraction of the base one.

    Example::

        scheduler = WarmupCosine(optimizer, warmup_steps=100, total_steps=1000)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self._factor)

    def set_total_steps(self, total_steps: int) -> None:
        """Set the length of the schedule (warm-up included)."""
        self.total_steps = int(total_steps)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if not self.total_steps or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def state_dict(self) -> dict:
        """Return the scheduler state; the schedule itself is rebuilt from the saved attributes."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        # LambdaLR.load_state_dict expects one entry per group; None means nothing to restore.
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)
        return state


__all__ = ["WarmupCosine"]
