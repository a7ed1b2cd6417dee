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
``Shard`` on every mesh dim        one block per rank: on one (non-trivial) mesh
                                   dim a chunk spec where the boxes are
                                   ``torch.chunk``'s, else a grid
                                   (:class:`~dispatch_shard.EnumerableShardingSpec`);
                                   on several, a MeshShardingSpec (so ops see
                                   the mesh)
``Replicate`` on every mesh dim    :class:`~dispatch_shard.Replicate`
``Partial(op)`` on every mesh dim  :class:`~dispatch_shard.Partial` ``(op)``
a mix of them                      :class:`~dispatch_shard.MeshShardingSpec`: blocks
                                   with several holders (copies along Replicate
                                   dims, terms of the reduction along Partial ones)
a chunk or enumerable spec on one  a MeshShardingSpec of the spec's blocks: its
mesh dim, Replicate or Partial on  ``rank:k`` is position ``k`` along that dim (so
the others                         several blocks per rank, or none, and grids)
================================== ===========================================

Mesh dims of size 1 place nothing: ``[Shard(0), Replicate()]`` on a 4x1 mesh is a
chunk spec. Ops serve every layout: per mesh dim where they have a rule
(:mod:`dispatch_shard.mesh_rules`), else flattened (NOTE [serving N-D operands] in
:mod:`dispatch_shard.holders`).

Creating, redistributing and converting communicate as their 1-D counterparts do:
:func:`distribute_tensor` is ``ShardedTensor.from_replicated`` of the mapped spec
(no data moves; one small check that the ranks agree), ``redistribute`` one
all-to-all or all-reduce on the mesh's group, in which each rank sends only the
pieces that other ranks lack (between N-D layouts: an all-gather, a reduce-scatter
or an all-to-all over the right ranks, in bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dispatch_shard import collectives
from dispatch_shard.layout import Layout
from dispatch_shard.metadata import TensorProperties
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    MeshPlacement,
    MeshShardingSpec,
    Partial,
    Replicate,
    ShardingSpec,
    block_ranks,
    mesh_sharding_spec,
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
    """The process group of all of ``mesh``'s ranks. Also remembers the mesh's per-dim
    groups, on which moves along one mesh dim run (NOTE [sub-groups of a mesh] in
    :mod:`dispatch_shard.collectives`)."""
    _remember_dim_groups(mesh)
    if mesh.ndim == 1:
        return mesh.get_group()
    ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
    if ranks == list(range(dist.get_world_size())):
        return collectives.resolve_group(None)
    return mesh._flatten().get_group()



def _remember_dim_groups(mesh: DeviceMesh) -> None:
    grid = mesh.mesh
    if mesh.ndim < 2 or mesh.get_coordinate() is None:
        return  # a 1-D mesh's moves run on its group; a rank outside the mesh moves nothing
    for mesh_dim in range(mesh.ndim):
        if grid.shape[mesh_dim] < 2:
            continue
        lines = grid.movedim(mesh_dim, -1).reshape(-1, grid.shape[mesh_dim]).tolist()
        try:
            group = mesh.get_group(mesh_dim)
        except (RuntimeError, ValueError, AttributeError):
            return  # a mesh made without process groups (``_init_backend=False``)
        collectives.remember_subgroups(
            tuple(sorted(tuple(sorted(int(r) for r in line)) for line in lines)), group)


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
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, TorchShard):
            if type(placement) is not TorchShard:
                raise NotImplementedError(f"{placement!r}: strided shards are not supported")
            if not -len(size) <= placement.dim < len(size):
                raise ValueError(f"{placement!r}: Shard dim {placement.dim} is out of range "
                                 f"for a tensor of {len(size)} dims")
        elif isinstance(placement, ShardingSpec):
            if mesh.ndim != 1 and not isinstance(placement, ChunkShardingSpec |
                                                 EnumerableShardingSpec):
                raise TypeError(
                    f"{placement!r} as the placement of one dim of a {mesh.ndim}-D mesh: "
                    "use torch's Replicate() or Partial(), or a ChunkShardingSpec or "
                    "EnumerableShardingSpec (whose rank k is position k along that dim)")
            if mesh.ndim != 1:
                beyond = sorted(set(block_ranks(placement))  # type: ignore[arg-type]
                                - set(range(mesh.shape[mesh_dim])))
                if beyond:
                    raise ValueError(
                        f"{placement!r} places blocks on rank {beyond[0]}, but on mesh dim "
                        f"{mesh_dim} of a {tuple(mesh.shape)} mesh its rank k is position k "
                        f"along that dim: give ranks 0 to {mesh.shape[mesh_dim] - 1}")
        elif not isinstance(placement, TorchReplicate | TorchPartial):
            raise TypeError(f"unknown placement {placement!r}: use Shard(dim), Replicate(), "
                            "Partial() from torch.distributed.tensor, or a sharding spec")
    return placements


def mesh_spec(mesh: DeviceMesh, placements: MeshPlacements, size: Sequence[int],
              device: str = "cpu") -> ShardingSpec:
    """The sharding spec over ``mesh``'s ranks that lays out a ``size`` tensor by
    ``placements`` (see the module docstring's table)."""
    TorchShard, TorchReplicate, _ = _torch_placements()
    placements = _check(mesh, placements, size)
    if len(placements) == 1 and isinstance(placements[0], ShardingSpec):
        return placements[0]
    ours: list[MeshPlacement] = []
    for placement in placements:
        if isinstance(placement, TorchShard):
            ours.append(("shard", placement.dim % len(size)))
        elif isinstance(placement, TorchReplicate):
            ours.append(("replicate", 0))
        elif isinstance(placement, ShardingSpec):
            ours.append(("spec", placement))
        else:
            ours.append(("partial", placement.reduce_op))
    grid = mesh.mesh
    return mesh_sharding_spec(tuple(grid.shape), tuple(int(r) for r in grid.flatten().tolist()),
                              ours, size, device)


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
    if isinstance(spec, MeshShardingSpec):
        # Laid out by a spec, not over a DeviceMesh object: a mesh of its ranks that
        # makes no process group (its collectives are this library's, on the group).
        grid = torch.tensor(spec.mesh_ranks, dtype=torch.int).reshape(spec.mesh_shape)
        mesh = DeviceMesh(torch.device(device).type, grid, _init_backend=False)
        return mesh, tuple(
            TorchShard(int(arg)) if kind == "shard" else TorchReplicate() if kind == "replicate"
            else arg if kind == "spec" else TorchPartial(str(arg))
            for kind, arg in spec.placements)
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
        NotImplementedError: Partial placements with different reductions.
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
        if any(isinstance(p, ShardingSpec) for p in placements):
            raise ValueError("from_local with a sharding spec placement needs shape=: the "
                             "global size cannot be told from one block")
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


