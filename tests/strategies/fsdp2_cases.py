"""FSDP2Strategy cases run under ``torch.distributed.run``; results are written for pytest.

Usage: ``python -m torch.distributed.run --nproc_per_node N fsdp2_cases.py OUT CASE [CASE ...]``.
Each case trains with a real Lightning ``Trainer`` and writes ``OUT/<case>.pt`` from rank 0.
Starting processes costs far more than these tiny runs, so one launch runs several cases.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from fsdp2_harness import (
    HFLossModule,
    LitLossModule,
    LossRecorder,
    build_model,
    sft_data,
    sft_module,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from lit_tune.models.export import export_hf
from lit_tune.strategies import FSDP2Strategy


def _trainer(out: Path, strategy: FSDP2Strategy, max_steps: int = -1, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=int(os.environ["WORLD_SIZE"]),
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks", [])),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        limit_val_batches=kwargs.pop("limit_val_batches", 0),
        default_root_dir=out,
        **kwargs,
    )


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _mean_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def _fit(
    out: Path, module: L.LightningModule, strategy: FSDP2Strategy, steps: int = -1, **kw: Any
) -> L.Trainer:
    ckpt_path = kw.pop("ckpt_path", None)
    trainer = _trainer(out, strategy, steps, **kw)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


# ----------------------------------------------------------------------------- cases


def case_dp2(out: Path) -> dict[str, Any]:
    module = HFLossModule(batch_size=2)
    _fit(out, module, FSDP2Strategy(), steps=3)
    export_hf(module.model, None, out / "export_dp2")
    return {"losses": _mean_over_ranks(module.losses), "state_dict": _full_state(module.model)}


def case_hybrid(out: Path) -> dict[str, Any]:
    module = HFLossModule(batch_size=2)
    strategy = FSDP2Strategy(data_parallel_replicate_size=2)
    _fit(out, module, strategy, steps=3)
    return {
        "losses": _mean_over_ranks(module.losses),
        "state_dict": _full_state(module.model),
        "mesh_dim_names": list(strategy.device_mesh.mesh_dim_names),
        "mesh_shape": list(strategy.device_mesh.shape),
        "sampler_kwargs": strategy.distributed_sampler_kwargs,
        "param_mesh_ndim": next(iter(module.model.parameters())).device_mesh.ndim,
    }


def _tp2_run(out: Path, module: LitLossModule, steps: int) -> dict[str, Any]:
    strategy = FSDP2Strategy(tensor_parallel_size=2)
    trainer = _fit(out, module, strategy, steps=steps, limit_val_batches=1)
    trainer.validate(module, verbose=False)
    head = module.model.lm_head.weight
    return {
        "losses": module.losses,
        "first_grads": module.first_grads,
        "loss_parallel": strategy.loss_parallel,
        "logits_sharded": module.logits_info["sharded"],
        "head_placements": [str(p) for p in head.placements],
    }


def case_tp2(out: Path) -> dict[str, Any]:
    return _tp2_run(out, LitLossModule(masking="prompt", capture_grads=True), steps=2)


def case_tp2_masked(out: Path) -> dict[str, Any]:
    return _tp2_run(out, LitLossModule(masking="all", capture_grads=True), steps=1)


def case_tp2_smoothing(out: Path) -> dict[str, Any]:
    module = LitLossModule(masking="prompt", label_smoothing=0.1, capture_grads=True)
    return _tp2_run(out, module, steps=1)


def case_plain_tp2(out: Path) -> dict[str, Any]:
    module = HFLossModule(masking="prompt")
    _fit(out, module, FSDP2Strategy(tensor_parallel_size=2), steps=2)
    return {"losses": module.losses}


def _checkpoint_every_2_steps(folder: Path) -> ModelCheckpoint:
    # Saved from inside the loop. A run resumed from a checkpoint that `trainer.save_checkpoint`
    # wrote after `fit` returned trains on one batch twice (Lightning 2.6, also under DDP).
    return ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=2, save_top_k=-1)


def case_resume(out: Path) -> dict[str, Any]:
    whole = LitLossModule(batch_size=2)
    callbacks = [_checkpoint_every_2_steps(out / "resume")]
    _fit(out, whole, FSDP2Strategy(), steps=4, callbacks=callbacks)
    resumed = LitLossModule(batch_size=2)
    _fit(out, resumed, FSDP2Strategy(), steps=4, ckpt_path=out / "resume" / "step=2.ckpt")
    return {
        "whole_losses": _mean_over_ranks(whole.losses),
        "whole_state": _full_state(whole.model),
        "resumed_losses": _mean_over_ranks(resumed.losses),
        "resumed_state": _full_state(resumed.model),
        "checkpoint_is_folder": (out / "resume" / "step=2.ckpt").is_dir(),
    }


def case_resume_full(out: Path) -> dict[str, Any]:
    # save_distributed_checkpoint=False: one file with full weights, written by rank 0.
    whole = LitLossModule(batch_size=2)
    callbacks = [_checkpoint_every_2_steps(out / "resume_full")]
    _fit(out, whole, FSDP2Strategy(save_distributed_checkpoint=False), steps=4, callbacks=callbacks)
    resumed = LitLossModule(batch_size=2)
    ckpt_path = out / "resume_full" / "step=2.ckpt"
    _fit(out, resumed, FSDP2Strategy(save_distributed_checkpoint=False), steps=4, ckpt_path=ckpt_path)
    return {
        "whole_losses": _mean_over_ranks(whole.losses),
        "resumed_losses": _mean_over_ranks(resumed.losses),
        "resumed_state": _full_state(resumed.model),
        "checkpoint_is_file": ckpt_path.is_file(),
    }


class _SelfShardingModule(HFLossModule):
    """Shards its own model in configure_model, as a ModelParallelStrategy user would."""

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def case_self_parallelized(out: Path) -> dict[str, Any]:
    module = _SelfShardingModule(batch_size=2)
    _fit(out, module, FSDP2Strategy(), steps=3)
    return {
        "losses": _mean_over_ranks(module.losses),
        "state_dict": _full_state(module.model),
        "root_is_lightning_module": isinstance(module, FSDPModule),
    }


class _BuiltInInitModule(HFLossModule):
    """Builds its model in __init__ and does not override configure_model."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = build_model(self.config)

    configure_model = L.LightningModule.configure_model


def case_built_in_init(out: Path) -> dict[str, Any]:
    module = _BuiltInInitModule(batch_size=2)
    _fit(out, module, FSDP2Strategy(), steps=3)
    return {"losses": _mean_over_ranks(module.losses), "state_dict": _full_state(module.model)}


def case_resume_1proc(out: Path) -> dict[str, Any]:
    # Global batch 4 on one process equals 2 ranks × 2 of the checkpointed run.
    resumed = LitLossModule(batch_size=4)
    _fit(out, resumed, FSDP2Strategy(), steps=4, ckpt_path=out / "resume" / "step=2.ckpt")
    return {"losses": resumed.losses, "state_dict": _full_state(resumed.model)}


def _meta_load(out: Path, strategy: FSDP2Strategy) -> dict[str, Any]:
    module = LitLossModule(checkpoint=str(out / "hf_tiny"))
    trainer = _trainer(out, strategy, max_steps=1, limit_val_batches=1)
    trainer.validate(module, verbose=False)
    local = sum(p.to_local().numel() for p in module.model.parameters())
    total = sum(p.numel() for p in module.model.parameters())
    return {
        "logits": module.logits_info["logits"],
        "input_ids": _val_input_ids(module, trainer),
        "checkpoint_to_load": module.checkpoint_to_load,
        "all_dtensor": all(isinstance(p, DTensor) for p in module.model.parameters()),
        "local_fraction": local / total,
        "inv_freq": module.model.model.rotary_emb.inv_freq.clone(),
    }


def _val_input_ids(module: LitLossModule, trainer: L.Trainer) -> torch.Tensor:
    loader = trainer.val_dataloaders
    return next(iter(loader))["input_ids"]


def case_meta_dp2(out: Path) -> dict[str, Any]:
    return _meta_load(out, FSDP2Strategy(meta_init=True))


def case_meta_tp2(out: Path) -> dict[str, Any]:
    return _meta_load(out, FSDP2Strategy(tensor_parallel_size=2, meta_init=True))


def case_meta_random(out: Path) -> dict[str, Any]:
    # meta_init without checkpoint_to_load: transformers' own initialisation on the shards.
    module = LitLossModule()
    trainer = _trainer(out, FSDP2Strategy(meta_init=True), max_steps=1, limit_val_batches=1)
    trainer.validate(module, verbose=False)
    model = module.model
    return {
        "embedding_std": model.model.embed_tokens.weight.full_tensor().std().item(),
        "q_proj_std": model.model.layers[0].self_attn.q_proj.weight.full_tensor().std().item(),
        "norm_weight": model.model.norm.weight.full_tensor(),
        "inv_freq": model.model.rotary_emb.inv_freq.clone(),
        "logits_finite": bool(torch.isfinite(module.logits_info["logits"]).all()),
    }


def _tied_module(out: Path, batch_size: int = 2) -> LitLossModule:
    return LitLossModule(
        tied=True, checkpoint=str(out / "hf_tied"), batch_size=batch_size, capture_grads=True, lr=0.5
    )


def _root_holds_head(module: L.LightningModule) -> bool:
    head = module.model.lm_head.weight
    inner = [m for m in module.modules() if isinstance(m, FSDPModule) and m is not module]
    in_inner = any(any(p is head for p in m.parameters()) for m in inner)
    return isinstance(module, FSDPModule) and not in_inner


def case_tied(out: Path) -> dict[str, Any]:
    whole = _tied_module(out)
    callbacks = [_checkpoint_every_2_steps(out / "tied")]
    _fit(out, whole, FSDP2Strategy(meta_init=True), steps=3, callbacks=callbacks)
    resumed = _tied_module(out)
    ckpt_path = out / "tied" / "step=2.ckpt"
    _fit(out, resumed, FSDP2Strategy(meta_init=True), steps=3, ckpt_path=ckpt_path)
    export_hf(resumed.model, None, out / "export_tied")
    return {
        "whole_losses": _mean_over_ranks(whole.losses),
        "resumed_losses": _mean_over_ranks(resumed.losses),
        "first_grads": whole.first_grads,
        "tie_checks": whole.tie_checks + resumed.tie_checks,
        "tied_after_fit": all(
            m.model.lm_head.weight is m.model.model.embed_tokens.weight for m in (whole, resumed)
        ),
        "root_holds_head": _root_holds_head(whole),
        "resumed_state": _full_state(resumed.model),
    }


def case_tied_tp2(out: Path) -> dict[str, Any]:
    module = _tied_module(out, batch_size=4)
    _fit(out, module, FSDP2Strategy(tensor_parallel_size=2, meta_init=True), steps=1)
    return {
        "losses": module.losses,
        "first_grads": module.first_grads,
        "tie_checks": module.tie_checks,
    }


class _DtypeProbeModule(LitLossModule):
    """Record the dtype the forward computes in, as seen inside the training step."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            self.logits_info["dtype"] = str(self.model(input_ids=batch["input_ids"]).logits.dtype)
        return super().training_step(batch, batch_idx)


def case_precision(out: Path) -> dict[str, Any]:
    result = {}
    for precision in ("bf16-mixed", "bf16-true"):
        module = _DtypeProbeModule(batch_size=2, capture_grads=True)
        trainer = _trainer(out, FSDP2Strategy(), max_steps=1, precision=precision)
        trainer.fit(module)
        param = next(iter(module.model.parameters()))
        result[precision] = {
            "plugin": type(trainer.precision_plugin).__name__,
            "trainer_precision": trainer.precision,
            "param_dtype": str(param.dtype),
            "grad_dtype": str(next(iter(module.first_grads.values())).dtype),
            "forward_dtype": module.logits_info["dtype"],
            "losses": module.losses,
        }
    return result


def case_cpu_offload(out: Path) -> dict[str, Any]:
    module = HFLossModule(batch_size=2)
    _fit(out, module, FSDP2Strategy(cpu_offload=True, reshard_after_forward=False), steps=3)
    return {"losses": _mean_over_ranks(module.losses), "state_dict": _full_state(module.model)}


def case_sft_tp2(out: Path) -> dict[str, Any]:
    # lit_tune's SFTModule on the meta device with tensor parallel and activation checkpointing.
    from lit_tune.callbacks import ActivationCheckpointing

    checkpointing = ActivationCheckpointing()
    module = sft_module(out / "hf_sft", out / "sft_export_tp2")
    strategy = FSDP2Strategy(tensor_parallel_size=2, meta_init=True)
    trainer = _trainer(out, strategy, max_steps=2, callbacks=[checkpointing, LossRecorder()])
    trainer.fit(module, datamodule=sft_data(out / "hf_sft"))
    return {
        "losses": trainer.callbacks[-1].losses,
        "checkpointed_layers": len(checkpointing._checkpointed),
        "checkpoint_to_load": module.checkpoint_to_load,
    }


def case_cli(out: Path) -> dict[str, Any]:
    from lightning.pytorch.cli import LightningCLI

    config = out / "cli.yaml"
    cli = LightningCLI(args=["fit", "--config", str(config)], save_config_callback=None)
    strategy = cli.trainer.strategy
    return {
        "strategy": type(strategy).__name__,
        "losses": cli.model.losses,
        "layer_classes": strategy._layer_classes,
        "steps": cli.trainer.global_step,
    }


def main() -> None:
    out = Path(sys.argv[1])
    for name in sys.argv[2:]:
        start = time.perf_counter()
        result = globals()[f"case_{name}"](out)
        if dist.get_rank() == 0:
            print(f"case {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
            torch.save(result, out / f"{name}.pt")
        dist.barrier()
    # Exiting with gloo's threads still running can abort the process at shutdown.
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
