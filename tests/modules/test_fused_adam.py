"""lit_tune picks the fused Adam/AdamW kernel when the optimizer leaves the implementation unset."""

import torch
from torch import nn

from lit_tune import SFTModule
from lit_tune.modules.base import prefer_fused_adam


def test_unset_adamw_becomes_fused_with_same_groups():
    model = nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(
        [{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "weight_decay": 0.5}],
        lr=1e-3,
        betas=(0.8, 0.9),
    )

    fused = prefer_fused_adam(optimizer)

    assert type(fused) is torch.optim.AdamW
    assert fused.defaults["fused"] is True
    assert fused.defaults["betas"] == (0.8, 0.9)
    assert [(g["lr"], g["weight_decay"]) for g in fused.param_groups] == [(0.1, 0.01), (1e-3, 0.5)]
    assert fused.param_groups[0]["params"][0] is model.weight


def test_explicit_choices_and_other_optimizers_are_kept():
    params = list(nn.Linear(3, 3).parameters())
    for optimizer in (
        torch.optim.AdamW(params, fused=False),
        torch.optim.AdamW(params, foreach=False),
        torch.optim.SGD(params, lr=0.1),
    ):
        assert prefer_fused_adam(optimizer) is optimizer


def test_fused_step_matches_default_step():
    torch.manual_seed(0)
    reference = nn.Linear(8, 4)
    fused_model = nn.Linear(8, 4)
    fused_model.load_state_dict(reference.state_dict())
    plain = torch.optim.AdamW(reference.parameters(), lr=0.1)
    fused = prefer_fused_adam(torch.optim.AdamW(fused_model.parameters(), lr=0.1))
    x = torch.randn(5, 8)
    for model, optimizer in ((reference, plain), (fused_model, fused)):
        for _ in range(3):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    for a, b in zip(reference.parameters(), fused_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sft_module_optimizer_is_fused():
    module = SFTModule(model="tiny", export=False, lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True
