"""SFTModule's chunked head-and-loss path gives the same training step as the logits path."""

import torch

from lit_tune import SFTModule
from lit_tune.data import ResumableBatchLoader, Row
from tests.conftest import cpu_trainer


def _rows():
    return [Row(list(range(5, 25)), [-100] * 8 + list(range(13, 25))), Row(list(range(30, 42)), [-100] * 3 + list(range(33, 42)))]


def _train_one_step(linear_cross_entropy: bool) -> tuple[SFTModule, float]:
    torch.manual_seed(0)
    module = SFTModule(
        model="tiny",
        linear_cross_entropy=linear_cross_entropy,
        label_smoothing=0.1,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        export=False,
    )
    losses = []

    trainer = cpu_trainer(max_steps=1)
    loader = ResumableBatchLoader(_rows(), 2, module.tokenizer.pad_token_id, shuffle=False)
    original = module.training_step

    def training_step(batch, batch_idx):
        loss = original(batch, batch_idx)
        losses.append(loss.detach().item())
        return loss

    module.training_step = training_step
    trainer.fit(module, train_dataloaders=loader)
    return module, losses[0]


def test_linear_loss_matches_logits_path():
    fused, fused_loss = _train_one_step(True)
    plain, plain_loss = _train_one_step(False)

    assert fused._uses_linear_loss()
    assert not plain._uses_linear_loss()
    assert abs(fused_loss - plain_loss) < 1e-5
    for (name, a), b in zip(fused.model.state_dict().items(), plain.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_overridden_compute_loss_keeps_logits_path():
    class ZLoss(SFTModule):
        def compute_loss(self, logits, targets, batch):
            return super().compute_loss(logits, targets, batch) + 0.0 * logits.sum()

    module = ZLoss(model="tiny", export=False)
    module.configure_model()
    assert not module._uses_linear_loss()


def test_model_trains_in_train_mode():
    module = SFTModule(model="tiny", export=False)
    module.configure_model()
    assert all(submodule.training for submodule in module.model.modules())
