"""Device meshes for FSDP2Strategy: data-parallel shard × tensor, or replicate × shard × tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.fabric.strategies.model_parallel import _setup_device_mesh
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DATA_PARALLEL = "data_parallel"
REPLICATE = "data_parallel_replicate"
SHARD = "data_parallel_shard"
TENSOR_PARALLEL = "tensor_parallel"


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the parallel dimensions, whose product is the world size.

    Attributes:
        replicate: Data-parallel groups that hold full replicas of the sharded model (HSDP).
        shard: Ranks that shard the model between them within one replica (FSDP).
        tensor: Ranks that split each layer (tensor parallel).
    """

    replicate: int
    shard: int
    tensor: int


def resolve_mesh_shape(
    world_size: int, data_parallel_size: int | str, tensor_parallel_size: int, replicate_size: int
) -> MeshShape:
    """Resolve ``"auto"`` and check that the sizes multiply to the world size.

    Args:
        world_size: Number of processes.
        data_parallel_size: FSDP shard-group size, or ``"auto"`` for what the other sizes leave.
        tensor_parallel_size: Tensor-parallel group size.
        replicate_size: Number of replicas (HSDP).

    Raises:
        ValueError: If the sizes do not multiply to ``world_size``.
    """
    others = tensor_parallel_size * replicate_size
    if data_parallel_size == "auto":
        if world_size % others:
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size} × data_parallel_replicate_size="
                f"{replicate_size} = {others} does not divide the world size {world_size}. "
                "Choose sizes whose product divides the number of processes."
            )
        data_parallel_size = world_size // others
    shape = MeshShape(replicate_size, int(data_parallel_size), tensor_parallel_size)
    if shape.replicate * shape.shard * shape.tensor != world_size:
        raise ValueError(
            f"data_parallel_replicate_size={shape.replicate} × data_parallel_size={shape.shard} × "
            f"tensor_parallel_size={shape.tensor} = {shape.replicate * shape.shard * shape.tensor}, "
            f"but the world size is {world_size}. Make the product equal the number of processes "
            "(devices × num_nodes), or set data_parallel_size='auto'."
        )
    return shape


def build_device_mesh(shape: MeshShape, world_size: int, device: torch.device) -> DeviceMesh:
    """Build the device mesh, which always has ``"data_parallel"`` and ``"tensor_parallel"`` dims.

    Without replication it is Lightning's 2-D ``("data_parallel", "tensor_parallel")`` mesh, so
    modules written for ``ModelParallelStrategy`` keep working. With replication it is 3-D
    ``("data_parallel_replicate", "data_parallel_shard", "tensor_parallel")``, and
    ``"data_parallel"`` is the flattened replicate × shard dim.
    """
    if shape.replicate == 1:
        return _setup_device_mesh(shape.shard, shape.tensor, world_size, device)
    mesh = init_device_mesh(
        device.type,
        (shape.replicate, shape.shard, shape.tensor),
        mesh_dim_names=(REPLICATE, SHARD, TENSOR_PARALLEL),
    )
    mesh[(REPLICATE, SHARD)]._flatten(DATA_PARALLEL)
    return mesh


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """Return the mesh ``fully_shard`` gets: 1-D (FSDP) or 2-D replicate × shard (HSDP)."""
    names = mesh.mesh_dim_names or ()
    if REPLICATE in names:
        return mesh[(REPLICATE, SHARD)]
    return mesh[DATA_PARALLEL]
