"""FSDP2Strategy: FSDP2 sharding with optional tensor parallel, loss parallel and HSDP."""

from __future__ import annotations

import logging
from collections.abc import Generator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel as _loss_parallel_context
from typing_extensions import override

from ._checkpoint import partial_path, recover, remove, swap_into_place
from ._loading import has_meta_tensors, materialize
from ._mesh import (
    TENSOR_PARALLEL,
    MeshShape,
    build_device_mesh,
    fsdp_mesh,
    resolve_mesh_shape,
)
from ._parallelize import (
    LayerClasses,
    TensorParallelPlan,
    apply_activation_checkpointing,
    apply_fully_shard,
    apply_tensor_parallel,
    find_layers,
    find_pretrained_model,
    is_parallelized,
    resolve_layer_classes,
    transformers_plan,
)
from ._precision import adopt_precision_plugin, mixed_precision_policy, offload_policy

log = logging.getLogger(__name__)
_log_info = rank_zero_only(log.info)


class FSDP2Strategy(ModelParallelStrategy):
    """Shard any LightningModule with FSDP2, with optional tensor parallel and loss parallel.

    Unless ``configure_model`` already parallelized the module (it contains DTensor parameters or
    FSDP2 modules), the strategy applies, in this order: the tensor-parallel plan (when
    ``tensor_parallel_size > 1``), every ``lit_tune.callbacks.ActivationCheckpointing`` callback,
    ``fully_shard`` on each decoder layer, then ``fully_shard`` on the LightningModule itself as
    the root. Modules built on the meta device are then materialised shard by shard and loaded
    from ``module.checkpoint_to_load`` (a local Hugging Face folder) when the module sets it.

    With loss parallel, the output projection returns vocabulary-sharded DTensor logits, and
    the training, validation and test steps and the backward run inside
    ``torch.distributed.tensor.parallel.loss_parallel()``. Compute the loss with
    ``lit_tune.losses.token_cross_entropy``, or ``F.cross_entropy`` with class-index targets, and
    the full logits never exist on one rank. A training step that returns a DTensor loss gets it
    back as a plain tensor.

    Mixed precision follows ``Trainer(precision=...)``. ``"32-true"`` trains in fp32.
    ``"bf16-mixed"`` becomes an FSDP2 ``MixedPrecisionPolicy`` with bf16 parameters and fp32
    gradient reduction, without autocast. ``"bf16-true"`` converts the module to bf16 before
    sharding.

    Args:
        data_parallel_size: Ranks that shard the model between them (the FSDP group). Default
            ``"auto"``: the world size divided by ``tensor_parallel_size`` and
            ``data_parallel_replicate_size``.
        tensor_parallel_size: Ranks that split each layer. Default 1 (no tensor parallel).
        data_parallel_replicate_size: Replicas of the sharded model (hybrid sharding, HSDP): the
            mesh becomes replicate × shard × tensor, gradients are reduce-scattered within a
            replica and all-reduced across replicas. Default 1.
        loss_parallel: Compute the loss on vocabulary-sharded logits. Default None: on when
            ``tensor_parallel_size > 1``. True with ``tensor_parallel_size == 1`` is an error.
        layer_classes: Decoder-layer classes (or class names) to shard one by one. Default None:
            the ``_no_split_modules`` of the transformers model inside the module. A module
            without one gets only the root shard.
        tensor_parallel_plan: Replaces the transformers plan: module names relative to the
            LightningModule (``*`` matches one name) mapped to a ``ParallelStyle`` or a
            transformers style string (``"colwise"``, ``"rowwise"``, ...). Default None. With
            loss parallel, the output projection must return ``Shard(-1)`` DTensor logits.
        reshard_after_forward: Free the gathered parameters after each layer's forward and
            gather them again in backward (less memory, more communication). Default True.
        cpu_offload: Keep the sharded parameters, gradients and optimizer state in CPU memory
            (FSDP2 ``CPUOffloadPolicy``). Default False.
        meta_init: Run ``configure_model`` (and ``Trainer.init_module()``) on the meta device, so
            nothing is allocated before sharding. Default False.
        save_distributed_checkpoint: Save one shard per rank (a distributed checkpoint folder)
            instead of full weights gathered on rank 0. Default True.
        process_group_backend: ``torch.distributed`` backend. Default None: NCCL on CUDA, gloo
            on CPU.
        timeout: Timeout of collective operations. Default 30 minutes.

    Raises:
        ValueError: If a size is not a positive integer, or ``loss_parallel=True`` with
            ``tensor_parallel_size == 1``.

    Example::

        trainer = Trainer(
            devices=8,
            precision="bf16-mixed",
            strategy=FSDP2Strategy(tensor_parallel_size=2, meta_init=True),
        )
    """

    def __init__(
        self,
        data_parallel_size: int | Literal["auto"] = "auto",
        tensor_parallel_size: int = 1,
        data_parallel_replicate_size: int = 1,
        loss_parallel: bool | None = None,
        layer_classes: LayerClasses | None = None,
        tensor_parallel_plan: TensorParallelPlan | None = None,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        meta_init: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        _check_arguments(
            data_parallel_size, tensor_parallel_size, data_parallel_replicate_size, loss_parallel
        )
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._replicate_size = data_parallel_replicate_size
        self._loss_parallel = tensor_parallel_size > 1 if loss_parallel is None else loss_parallel
        self._layer_classes = list(layer_classes) if layer_classes is not None else None
        self._tensor_parallel_plan = dict(tensor_parallel_plan) if tensor_parallel_plan else None
        self._reshard_after_forward = reshard_after_forward
        self._cpu_offload = cpu_offload
        self._meta_init = meta_init
        self.mesh_shape: MeshShape | None = None

    @property
    def loss_parallel(self) -> bool:
        """Whether steps and backward run inside ``loss_parallel()``."""
        return self._loss_parallel

    # ------------------------------------------------------------------ setup

    @override
    def setup_environment(self) -> None:
        self._setup_distributed()
        self.mesh_shape = resolve_mesh_shape(
            self.world_size, self._data_parallel_size, self._tensor_parallel_size, self._replicate_size
        )
        self._data_parallel_size = self.mesh_shape.shard
        self._device_mesh = build_device_mesh(self.mesh_shape, self.world_size, self.root_device)
        # Modules read the mesh in configure_model, as under ModelParallelStrategy.
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh
        self.precision_plugin = adopt_precision_plugin(self.precision_plugin)
        _log_info(
            f"FSDP2Strategy: replicate={self.mesh_shape.replicate} × shard={self.mesh_shape.shard}"
            f" × tensor={self.mesh_shape.tensor}, loss_parallel={self._loss_parallel}."
        )

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        on_meta = self._meta_init if empty_init is None else empty_init
        with torch.device("meta") if on_meta else nullcontext(), self.precision_plugin.tensor_init_context():
            yield

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        _reject_fsdp1(self.model)

        # NOTE: the dtype is converted before sharding, so the shards are created in the final dtype.
        self.model = self.precision_plugin.convert_module(self.model)
        module = self.lightning_module
        if is_parallelized(module):
            _log_info("FSDP2Strategy: the module is already parallelized, so no plan is applied.")
        else:
            self._parallelize(trainer, module)
        self._materialize(module)
        if not self._cpu_offload:
            self.model_to_device()
        self.barrier()

        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting and not self._cpu_offload:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _parallelize(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self._tensor_parallel_size > 1:
            plan = self._tensor_parallel_plan or transformers_plan(
                module,
                loss_parallel=self._loss_parallel,
                tensor_parallel_size=self._tensor_parallel_size,
            )
            apply_tensor_parallel(module, self.device_mesh[TENSOR_PARALLEL], plan)
        apply_activation_checkpointing(trainer, module)
        class_names = resolve_layer_classes(module, self._layer_classes)
        explicit = self._layer_classes is not None
        layers = find_layers(module, class_names, explicit) if class_names else []
        apply_fully_shard(
            module,
            layers,
            mesh=fsdp_mesh(self.device_mesh),
            reshard_after_forward=self._reshard_after_forward,
            mp_policy=mixed_precision_policy(self.precision_plugin),
            offload_policy=offload_policy(self._cpu_offload, self.root_device),
        )

    def _materialize(self, module: pl.LightningModule) -> None:
        if not has_meta_tensors(module):
            return
        found = find_pretrained_model(module)
        checkpoint = getattr(module, "checkpoint_to_load", None)
        if checkpoint is not None and found is None:
            raise ValueError(
                f"{type(module).__name__}.checkpoint_to_load={checkpoint!r}, but the module "
                "contains no transformers PreTrainedModel to load it into. Set it to None and "
                "load the weights yourself."
            )
        device = torch.device("cpu") if self._cpu_offload else self.root_device
        materialize(module, device, found[1] if found else None, checkpoint)
        if checkpoint is not None:
            module.checkpoint_to_load = None

    # ------------------------------------------------------------------ checkpoints

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Save as Lightning does, but write a distributed checkpoint beside the old one first.

        The shards go to ``<filepath>.partial``; rank 0 renames it to ``filepath`` once every rank
        has finished, so a job killed mid-save keeps its previous checkpoint. Consolidated
        (single-file) checkpoints go through the ``CheckpointIO`` plugin, for example
        ``lit_tune.AtomicCheckpointIO``.
        """
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(filepath))
        partial = partial_path(path)
        if self.global_rank == 0:
            remove(partial)
        self.barrier("save_checkpoint_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("save_checkpoint_written")
        if self.global_rank == 0:
            swap_into_place(partial, path)
        self.barrier("save_checkpoint_done")

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(recover(Path(self.broadcast(checkpoint_path))), weights_only)

    # ------------------------------------------------------------------ steps

    def _loss_parallel_scope(self) -> Any:
        return _loss_parallel_context() if self._loss_parallel else nullcontext()

    def _run_step(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # The root FSDP2 module gathers the root group's parameters (embedding, final norm,
        # output head) in its forward pre-hook, so the step goes through forward.
        assert self.model is not None
        assert self.lightning_module is not None
        if isinstance(self.model, FSDPModule):
            return self._forward_redirection(self.model, self.lightning_module, method, *args, **kwargs)
        return getattr(self.lightning_module, method)(*args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_parallel_scope(), self.precision_plugin.train_step_context():
            return _plain_loss(self._run_step("training_step", *args, **kwargs))

    @override
    def backward(
        self, closure_loss: Tensor, optimizer: torch.optim.Optimizer | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        with self._loss_parallel_scope():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_parallel_scope(), self.precision_plugin.val_step_context():
            return self._run_step("validation_step", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_parallel_scope(), self.precision_plugin.test_step_context():
            return self._run_step("test_step", *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._run_step("predict_step", *args, **kwargs)


def _check_arguments(
    data_parallel_size: Any, tensor_parallel_size: Any, replicate_size: Any, loss_parallel: Any
) -> None:
    problems = []
    if data_parallel_size != "auto" and not _is_positive_int(data_parallel_size):
        problems.append(f"data_parallel_size={data_parallel_size!r} must be 'auto' or a positive int.")
    if not _is_positive_int(tensor_parallel_size):
        problems.append(f"tensor_parallel_size={tensor_parallel_size!r} must be a positive int.")
    if not _is_positive_int(replicate_size):
        problems.append(f"data_parallel_replicate_size={replicate_size!r} must be a positive int.")
    if loss_parallel is True and tensor_parallel_size == 1:
        problems.append(
            "loss_parallel=True needs vocabulary-sharded logits, which only exist with "
            "tensor_parallel_size > 1, but tensor_parallel_size=1. Set tensor_parallel_size > 1 "
            "or leave loss_parallel unset."
        )
    if problems:
        raise ValueError("Invalid FSDP2Strategy arguments: " + " ".join(problems))


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _reject_fsdp1(model: nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(
            "The module contains torch.distributed.fsdp.FullyShardedDataParallel (FSDP1) "
            "wrappers, which FSDP2Strategy cannot shard. Remove them, or apply "
            "torch.distributed.fsdp.fully_shard in configure_model instead."
        )


def _plain_loss(output: Any) -> Any:
    # Under loss parallel, a loss taken straight from F.cross_entropy is a replicated DTensor,
    # but Lightning's loop and loggers expect a plain tensor.
    if isinstance(output, DTensor):
        return output.full_tensor()
    if isinstance(output, dict) and isinstance(output.get("loss"), DTensor):
        return {**output, "loss": output["loss"].full_tensor()}
    return output
