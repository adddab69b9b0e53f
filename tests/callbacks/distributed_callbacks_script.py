"""Two-process CPU (gloo) runs of the callbacks, launched by test_callbacks_distributed.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 --master_port PORT
       distributed_callbacks_script.py OUT_DIR

Each run writes full (gathered) tensors to OUT_DIR; the test compares them with one-process
references. Runs: DDP with OptimizerInBackward, DDP with ActivationCheckpointing,
ModelParallelStrategy (FSDP2) with both callbacks through a checkpoint save and resume, and plain
``fully_shard`` with activation checkpointing applied before and after sharding.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from callback_helpers import (
    Block,
    Net,
    RegressionModule,
    ShardedRegressionModule,
    cloned_state,
    regression_loader,
    sgd_momentum_with_epoch_decay,
    two_group_adamw_with_warmup,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lit_tune.callbacks import ActivationCheckpointing, OptimizerInBackward

# 8 samples, 2 per rank and step: the global batch of step k is samples 4k to 4k+3, and an
# epoch is 2 steps, so the checkpoint at step 2 falls on an epoch boundary.
NUM_SAMPLES = 8
LOCAL_BATCH = 2


def _trainer(root: Path, strategy, callbacks: list, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        # Each rank gets its share from regression_loader; Lightning's sampler would shuffle.
        use_distributed_sampler=False,
        **kwargs,
    )


def _local_loader():
    return regression_loader(LOCAL_BATCH, NUM_SAMPLES, rank=dist.get_rank(), world_size=2)


def _save(obj: object, path: Path) -> None:
    if dist.get_rank() == 0:
        torch.save(obj, path)


def run_ddp(out: Path) -> None:
    torch.manual_seed(0)
    module = RegressionModule(two_group_adamw_with_warmup)
    trainer = _trainer(
        out / "ddp_oib", "ddp", [OptimizerInBackward()], max_steps=3, enable_checkpointing=False
    )
    trainer.fit(module, _local_loader())
    _save(cloned_state(module), out / "ddp_oib.pt")

    torch.manual_seed(0)
    module = RegressionModule(sgd_momentum_with_epoch_decay)
    callbacks = [ActivationCheckpointing(layer_classes=[Block])]
    trainer = _trainer(out / "ddp_ac", "ddp", callbacks, max_steps=3, enable_checkpointing=False)
    trainer.fit(module, _local_loader())
    _save(cloned_state(module), out / "ddp_ac.pt")


class _LocalStateProbe(L.Callback):
    """Records this rank's shard of each parameter's optimizer state, by parameter name.

    ``at_step`` set: after that training step (the state a checkpoint at that step saves).
    ``at_step`` None: at ``on_train_start``, after a checkpoint was restored.
    """

    def __init__(self, callback: OptimizerInBackward, at_step: int | None) -> None:
        self.callback = callback
        self.at_step = at_step
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_step is None:
            self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            self._record(pl_module)

    def _record(self, pl_module) -> None:
        optimizers = self.callback.parameter_optimizers
        for name, param in pl_module.named_parameters():
            state = optimizers[param].state[param]
            self.states[name] = {key: _local(value) for key, value in state.items()}


def _local(value: torch.Tensor) -> torch.Tensor:
    return (value.to_local() if hasattr(value, "to_local") else value).detach().clone()


def run_fsdp2(out: Path) -> None:
    def fit(root: Path, callbacks: list, ckpt_path: Path | None = None) -> ShardedRegressionModule:
        torch.manual_seed(0 if ckpt_path is None else 1)
        module = ShardedRegressionModule(two_group_adamw_with_warmup)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        trainer = _trainer(root, strategy, callbacks, max_steps=4, enable_checkpointing=True)
        trainer.fit(module, _local_loader(), ckpt_path=ckpt_path)
        return module

    callback = OptimizerInBackward()
    before_save = _LocalStateProbe(callback, at_step=2)
    saver = ModelCheckpoint(
        dirpath=out / "fsdp_ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}"
    )
    callbacks = [callback, ActivationCheckpointing(layer_classes=[Block]), before_save, saver]
    module = fit(out / "fsdp", callbacks)
    _save(cloned_state(module), out / "fsdp_uninterrupted.pt")

    callback = OptimizerInBackward()
    after_load = _LocalStateProbe(callback, at_step=None)
    callbacks = [callback, ActivationCheckpointing(layer_classes=[Block]), after_load]
    module = fit(out / "fsdp_resume", callbacks, ckpt_path=out / "fsdp_ckpt" / "step=2.ckpt")
    _save(cloned_state(module), out / "fsdp_resumed.pt")
    rank = dist.get_rank()
    torch.save(
        {"before_save": before_save.states, "after_load": after_load.states},
        out / f"fsdp_states_rank{rank}.pt",
    )


def run_fully_shard_checkpointing(out: Path) -> None:
    torch.manual_seed(0)
    reference = Net()
    generator = torch.Generator().manual_seed(7)
    x, y = torch.randn(4, 4, generator=generator), torch.randn(4, 1, generator=generator)
    rank = dist.get_rank()
    local = slice(2 * rank, 2 * rank + 2)
    gradients, counts = {}, {}
    for order in ("before", "after"):
        model = copy.deepcopy(reference)
        callback = ActivationCheckpointing(layer_classes=[Block])
        if order == "before":
            callback.apply(model)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        if order == "after":
            callback.apply(model)
        F.mse_loss(model(x[local]), y[local]).backward()
        gradients[order] = {
            name: param.grad.full_tensor() for name, param in model.named_parameters()
        }
        counts[order] = callback.apply(model)
    _save({"gradients": gradients, "counts": counts}, out / "fully_shard_gradients.pt")


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    run_fully_shard_checkpointing(out)
    run_ddp(out)
    run_fsdp2(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
