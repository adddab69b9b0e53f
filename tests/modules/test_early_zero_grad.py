"""Gradients are freed right after each optimizer step, and kept while accumulating."""

from lightning.pytorch.callbacks import Callback

from lit_tune import SFTModule
from lit_tune.data import ResumableBatchLoader, Row
from tests.conftest import cpu_trainer


class _CountGradients(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def _count(self, module) -> int:
        return sum(p.grad is not None for p in module.parameters())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.seen.append(("before step", self._count(pl_module)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(("batch end", self._count(pl_module)))


def test_gradients_freed_after_step_not_between_accumulated_batches():
    module = SFTModule(model="tiny", export=False)
    rows = [Row(list(range(5, 40)), list(range(5, 40))) for _ in range(4)]
    loader = ResumableBatchLoader(rows, 1, 0, shuffle=False, accumulate_grad_batches=2)
    counter = _CountGradients()
    trainer = cpu_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[counter])

    trainer.fit(module, train_dataloaders=loader)

    total = sum(1 for _ in module.parameters())
    assert counter.seen == [
        ("batch end", total),  # first micro-batch: gradients accumulate
        ("before step", total),
        ("batch end", 0),  # freed by the optimizer step
    ] * 2
