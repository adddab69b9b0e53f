"""Plain Lightning modules, data and trainers for the callback tests.

The modules know nothing of lit_tune, so the tests show the callbacks dropping into any project.
The distributed script in this folder imports this file too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lit_tune.models.tiny import tiny_llama_config

WIDTH = 8


class Block(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    """Regression network: input projection, ``depth`` blocks and a scalar head."""

    def __init__(self, depth: int = 3, width: int = WIDTH) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


OptimizerFactory = Callable[[nn.Module], Any]


class RegressionModule(L.LightningModule):
    """Mean-squared-error regression on ``Net``; ``optimizer_factory`` builds configure_optimizers' result."""

    def __init__(self, optimizer_factory: OptimizerFactory, depth: int = 3) -> None:
        super().__init__()
        self.optimizer_factory = optimizer_factory
        self.net = Net(depth)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return self.optimizer_factory(self)


class ShardedRegressionModule(RegressionModule):
    """``RegressionModule`` that shards itself with ``fully_shard`` in ``configure_model``."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class TinyLlamaModule(L.LightningModule):
    """Next-token loss on the ``tiny`` Llama, built in ``configure_model``."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.model: nn.Module | None = None

    def configure_model(self) -> None:
        from transformers import LlamaForCausalLM

        if self.model is None:
            torch.manual_seed(0)
            self.model = LlamaForCausalLM(tiny_llama_eager_config())

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


def tiny_llama_eager_config():
    """The ``tiny`` Llama config with eager attention and the KV cache on (the defaults of many
    models), so a layer recomputed with a filled cache fails on the mask shape."""
    config = tiny_llama_config(263)
    config._attn_implementation = "eager"
    config.use_cache = True
    return config


def two_group_adamw_with_warmup(module: nn.Module) -> dict[str, Any]:
    """AdamW with weights and other parameters in separate groups, and a linear warm-up from 0."""
    weights = [
        p for name, p in module.named_parameters() if name.endswith("weight") and p.dim() > 1
    ]
    others = [
        p for name, p in module.named_parameters() if not (name.endswith("weight") and p.dim() > 1)
    ]
    optimizer = torch.optim.AdamW(
        [
            {"params": weights, "lr": 2e-2, "weight_decay": 0.1},
            {"params": others, "lr": 5e-3, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        ]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_factor(step: int) -> float:
    """Linear warm-up over 3 steps, 0 at step 0."""
    return min(1.0, step / 3)


def sgd_momentum_with_epoch_decay(module: nn.Module) -> dict[str, Any]:
    """SGD with momentum and weight decay, halving the learning rate every epoch."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def regression_loader(
    batch_size: int, num_samples: int = 8, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Fixed random regression data, in order; with ``world_size`` > 1, this rank's share.

    Rank ``r`` takes samples ``r``, ``r + world_size``, ..., so step ``k`` of all ranks together
    covers the same samples as step ``k`` of one process with ``batch_size * world_size``.
    """
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(num_samples, 4, generator=generator)
    y = torch.randn(num_samples, 1, generator=generator)
    dataset = Subset(TensorDataset(x, y), range(rank, num_samples, world_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def token_loader(batch_size: int = 2, num_samples: int = 6, length: int = 16) -> DataLoader:
    """Fixed random token ids for the ``tiny`` Llama."""
    generator = torch.Generator().manual_seed(99)
    ids = torch.randint(7, 263, (num_samples, length), generator=generator)
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


def cpu_trainer(root_dir: Any, **kwargs: Any) -> L.Trainer:
    """A quiet single-process CPU trainer; ``kwargs`` override the defaults."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(root_dir),
    }
    settings.update(kwargs)
    return L.Trainer(**settings)


def cloned_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict, with DTensors gathered to full tensors."""
    state = {}
    for name, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        state[name] = value.detach().clone()
    return state


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """Largest absolute element difference between two state dicts with the same keys."""
    assert first.keys() == second.keys()
    return max((first[key].float() - second[key].float()).abs().max().item() for key in first)
