"""Device meshes: lay a tensor out by torch's ``DeviceMesh`` and per-mesh-dim placements.

The vocabulary is DTensor's: a placement per mesh dim, ``Shard(d)`` (``torch.chunk``
of tensor dim ``d`` over that mesh dim, uneven allowed, nested when several mesh
dims shard the same tensor dim, in mesh-dim order), ``Replicate()`` and
``Partial(op)`` from ``torch.distributed.tensor``. A 1-D spec of this library
(chunks in any rank order, several blocks per rank, an enumerable grid) stands for
itself on a 1-D mesh.

Per rank: the block of rank ``r`` at mesh coordinate ``c`` is the box that the
Shard placements cut for ``c``. Placement lists map onto the library's layouts:

================================== ===========================================
placements                         layout (one model: specs over the mesh's ranks)
================================== ===========================================
``Shard`` on every mesh dim        one block per rank: a chunk spec where the
                                   boxes are ``torch.chunk``'s, else a grid
                                   (:class:`~dispatch_shard.EnumerableShardingSpec`)
``Replicate`` on every mesh dim    :class:`~dispatch_shard.Replicate`
``Partial(op)`` on every mesh dim  :class:`~dispatch_shard.Partial` ``(op)``
a mix of them                      blocks with several holders, or a sum pending
                                   over a sub-group: not yet (it raises
                                   ``NotImplementedError``; the N-D layout model
                                   of issue #14 is the next step)
================================== ===========================================

Creating, redistributing and converting communicate as their 1-D counterparts do:
:func:`distribute_tensor` is ``ShardedTensor.from_replicated`` of the mapped spec
(no data moves; one small check that the ranks agree), ``redistribute`` one
all-to-all or all-reduce on the mesh's group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dispatch_shard import collectives
from dispatch_shard.layout import Layout
from dispatch_shard.metadata import ShardMetadata, TensorProperties
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    Partial,
    Replicate,
    ShardingSpec,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.placement_types import Placement as TorchPlacement

__all__ = ["distribute_tensor", "from_dtensor", "mesh_spec", "to_dtensor"]

# torch's DTensor package (its placements, DeviceMesh) costs about 0.8 s to import:
# it is imported on first use, not with dispatch_shard (as dispatch_shard.checkpoint is).
MeshPlacements = Sequence["TorchPlacement | ShardingSpec"]
_PROPERTIES = TensorProperties()

_MESH_KEY = ("device mesh",)  # where a layout keeps the mesh view it was made with


def mesh_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The process group of all of ``mesh``'s ranks."""
    if mesh.ndim == 1:
        return mesh.get_group()
    ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
    if ranks == list(range(dist.get_world_size())):
        return collectives.resolve_group(None)
    return mesh._flatten().get_group()


def _chunk_bounds(length: int, parts: int, index: int) -> tuple[int, int]:
    """``torch.chunk``'s piece ``index`` of ``length`` in ``parts`` (empty past the end)."""
    step = -(-length // parts) if length else 0
    start = min(index * step, length)
    return start, min(start + step, length)


def _torch_placements() -> tuple[Any, Any, Any]:
    """torch's Shard, Replicate and Partial classes (imported on first use)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Shard, Replicate, Partial


def _check(mesh: Any, given: MeshPlacements, size: Sequence[int]) -> list[Any]:
    from torch.distributed.device_mesh import DeviceMesh

    TorchShard, TorchReplicate, TorchPartial = _torch_placements()
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"device_mesh must be a torch DeviceMesh, got {type(mesh).__name__}")
    placements: list[Any] = list(given)
    if len(placements) != mesh.ndim:
        raise ValueError(
            f"placements has {len(placements)} entries but the device mesh has {mesh.ndim} "
            f"dims ({tuple(mesh.shape)}): give one placement per mesh dim")
    for placement in placements:
        if isinstance(placement, TorchShard):
            if type(placement) is not TorchShard:
                raise NotImplementedError(f"{placement!r}: strided shards are not supported")
            if not -len(size) <= placement.dim < len(size):
                raise ValueError(f"{placement!r}: Shard dim {placement.dim} is out of range "
                                 f"for a tensor of {len(size)} dims")
        elif isinstance(placement, ShardingSpec):
            if mesh.ndim != 1:
                raise NotImplementedError(
                    f"a sharding spec ({placement!r}) as the placement of one dim of a "
                    f"{mesh.ndim}-D mesh needs the N-D layout model (issue #14)")
        elif not isinstance(placement, TorchReplicate | TorchPartial):
            raise TypeError(f"unknown placement {placement!r}: use Shard(dim), Replicate(), "
                            "Partial() from torch.distributed.tensor, or a sharding spec")
    return placements


def mesh_spec(mesh: DeviceMesh, placements: MeshPlacements, size: Sequence[int],
              device: str = "cpu") -> ShardingSpec:
    """The sharding spec over ``mesh``'s ranks that lays out a ``size`` tensor by
    ``placements`` (see the module docstring's table)."""
    TorchShard, TorchReplicate, TorchPartial = _torch_placements()
    placements = _check(mesh, placements, size)
    if len(placements) == 1 and isinstance(placements[0], ShardingSpec):
        return placements[0]
    if all(isinstance(p, TorchReplicate) for p in placements):
        return Replicate()
    if all(isinstance(p, TorchPartial) for p in placements):
        ops = {p.reduce_op for p in placements}
        if len(ops) != 1:
            raise NotImplementedError(f"Partial with different reductions per mesh dim "
                                      f"({sorted(ops)}) is not supported")
        return Partial(ops.pop())
    if not all(isinstance(p, TorchShard) for p in placements):
        raise NotImplementedError(
            f"placements {list(placements)} mix Shard with Replicate or Partial: blocks with "
            "several holders (or a sum pending over a sub-group) need the N-D layout model, "
            "which is not built yet (issue #14). Shard on every mesh dim, Replicate on every "
            "mesh dim, or Partial on every mesh dim work today")
    grid = mesh.mesh
    shards = []
    for coordinate in torch.cartesian_prod(*[torch.arange(n) for n in grid.shape]).reshape(
            -1, grid.dim()).tolist():
        lows, highs = [0] * len(size), list(size)
        for mesh_dim, placement in enumerate(placements):
            dim = placement.dim % len(size)
            start, stop = _chunk_bounds(highs[dim] - lows[dim], grid.shape[mesh_dim],
                                        coordinate[mesh_dim])
            lows[dim], highs[dim] = lows[dim] + start, lows[dim] + stop
        rank = int(grid[tuple(coordinate)])
        shards.append(ShardMetadata(lows, [h - lo for lo, h in zip(lows, highs, strict=True)],
                                    f"rank:{rank}/{device}"))
    # One tensor dim cut into consecutive chunks in rank order is a chunk spec (the
    # layout with the most native op paths); anything else is a grid.
    cut = {p.dim % len(size) for p in placements}
    if len(cut) == 1:
        dim = cut.pop()
        order = sorted(shards, key=lambda s: s.shard_offsets[dim])
        chunk = ChunkShardingSpec(dim, [str(s.placement) for s in order])
        built = chunk.build_metadata(torch.Size(size), _PROPERTIES, _ranks(mesh),
                                     device=device).shards_metadata
        if [_box(s) for s in built] == [_box(s) for s in order]:
            return chunk
    return EnumerableShardingSpec(shards)


def _box(shard: ShardMetadata) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    return tuple(shard.shard_offsets), tuple(shard.shard_sizes), str(shard.placement)


def _ranks(mesh: DeviceMesh) -> tuple[int, ...]:
    return collectives.group_ranks(mesh_group(mesh))


def _remember(layout: Layout, mesh: DeviceMesh, placements: MeshPlacements) -> None:
    layout._derived[_MESH_KEY] = (mesh, tuple(placements))  # type: ignore[assignment]


def remembered_mesh(layout: Layout) -> tuple[DeviceMesh, tuple[Any, ...]] | None:
    """The mesh and placements ``layout`` was made with, if it was made over a mesh."""
    return layout._derived.get(_MESH_KEY)  # type: ignore[return-value]


def mesh_view(tensor: ShardedTensor) -> tuple[DeviceMesh, tuple[Any, ...]]:
    """The mesh and placements ``tensor``'s layout was made with, or its 1-D equivalent:
    a 1-D mesh of its group's ranks (in the chunk order for a chunk spec)."""
    from torch.distributed.device_mesh import DeviceMesh

    TorchShard, TorchReplicate, TorchPartial = _torch_placements()
    layout = tensor._layout
    found = remembered_mesh(layout)
    if found is not None:
        return found
    spec = layout.spec
    ranks = list(layout.group_ranks)
    device = layout.device or (str(layout.shards[0].placement.device())  # type: ignore[union-attr]
                               if layout.shards else "cpu")
    placement: Any
    if isinstance(spec, Replicate):
        placement = TorchReplicate()
    elif isinstance(spec, Partial):
        placement = TorchPartial(spec.reduce_op)
    elif isinstance(spec, ChunkShardingSpec) and len({p.rank() for p in spec.placements}) \
            == len(spec.placements):
        ranks = [p.rank() for p in spec.placements]
        placement = TorchShard(spec.dim)
    else:
        placement = spec  # a 1-D spec stands for itself on a 1-D mesh
    mesh = DeviceMesh.from_group(tensor.process_group, torch.device(device).type,
                                 mesh=torch.tensor(ranks, dtype=torch.int))
    return mesh, (placement,)


def distribute_tensor(tensor: torch.Tensor, device_mesh: DeviceMesh,
                      placements: MeshPlacements) -> ShardedTensor:
    """``tensor`` (the same on every rank) laid out over ``device_mesh`` by ``placements``,
    like DTensor's ``distribute_tensor``: each rank keeps its own block (no data moves;
    the ranks check that they agree on the arguments). ``requires_grad`` carries over;
    wrap it in ``nn.Parameter`` to train it.

    Raises (on every rank):
        ValueError: ``placements`` has the wrong length, or a Shard dim is out of range.
        NotImplementedError: placements that need blocks with several holders.
    """
    device = str(tensor.device)
    spec = mesh_spec(device_mesh, placements, tensor.shape, device)
    result = ShardedTensor.from_replicated(tensor.detach(), spec, mesh_group(device_mesh))
    _remember(result._layout, device_mesh, placements)
    if tensor.requires_grad:
        result.requires_grad_(True)
    return result


def redistribute_to_mesh(tensor: ShardedTensor, device_mesh: DeviceMesh | None,
                         placements: MeshPlacements) -> ShardedTensor:
    """``tensor.redistribute(device_mesh, placements)`` (differentiable)."""
    mesh = device_mesh if device_mesh is not None else mesh_view(tensor)[0]
    if collectives.group_ranks(mesh_group(mesh)) != tensor._layout.group_ranks:
        raise ValueError(
            f"redistribute: the mesh's ranks {list(_ranks(mesh))} are not this tensor's "
            f"ranks {list(tensor._layout.group_ranks)}; moving to other ranks is not supported")
    spec = mesh_spec(mesh, placements, tensor.shape, str(tensor.device))
    result = tensor.redistribute(spec)
    _remember(result._layout, mesh, placements)
    return result


def from_local(local_tensor: torch.Tensor, device_mesh: DeviceMesh,
               placements: MeshPlacements, *, shape: Sequence[int] | None = None
               ) -> ShardedTensor:
    """A ShardedTensor from each rank's block, like ``DTensor.from_local``.

    ``shape`` is the global size; by default each Shard placement multiplies the local
    size of its dim by its mesh dim's size (even sharding, DTensor's assumption). The
    ranks check that their blocks fit (an error on every rank otherwise).
    """
    placements = _check(device_mesh, placements, local_tensor.shape)
    TorchShard = _torch_placements()[0]
    if shape is None:
        size = list(local_tensor.shape)
        for mesh_dim, placement in enumerate(placements):
            if isinstance(placement, TorchShard):
                size[placement.dim % len(size)] *= device_mesh.shape[mesh_dim]
        shape = size
    spec = mesh_spec(device_mesh, placements, shape, str(local_tensor.device))
    result = ShardedTensor.from_local_tensor(local_tensor.detach(), spec, list(shape),
                                             process_group=mesh_group(device_mesh))
    _remember(result._layout, device_mesh, placements)
    if local_tensor.requires_grad:
        result.requires_grad_(True)
    return result


def from_dtensor(dtensor: Any) -> ShardedTensor:
    """The ShardedTensor with ``dtensor``'s mesh, placements and blocks (its local tensor is
    used as this rank's block, not copied); no data moves."""
    return from_local(dtensor.to_local(), dtensor.device_mesh, dtensor.placements,
                      shape=dtensor.shape)


def to_dtensor(tensor: ShardedTensor) -> Any:
    """The DTensor with ``tensor``'s mesh, placements and blocks (no data moves)."""
    from torch.distributed.tensor import DTensor

    mesh, placements = mesh_view(tensor)
    if any(isinstance(p, ShardingSpec) for p in placements):
        raise NotImplementedError(
            f"a tensor laid out by {tensor._layout.spec!r} has no DTensor placements")
    local = tensor.local_tensor() if tensor._local_tensors else torch.empty(0)
    return DTensor.from_local(local, mesh, list(placements), run_check=False,
                              shape=tensor.shape, stride=_contiguous(tensor.shape))


def _contiguous(shape: Sequence[int]) -> tuple[int, ...]:
    strides, running = [], 1
    for n in reversed(list(shape)):
        strides.append(running)
        running *= max(n, 1)
    return tuple(reversed(strides))


