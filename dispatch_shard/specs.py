"""Sharding specs: how a global tensor is laid out over the ranks of a process group.

Every spec is a frozen, hashable, picklable value with one method that the
rest of the library uses, :meth:`ShardingSpec.build_metadata`, which turns a
global size, tensor properties and the global ranks of a process group into a
:class:`~dispatch_shard.metadata.ShardedTensorMetadata`.

* :class:`ChunkShardingSpec` -- ``torch.chunk`` along one dim, one block per placement.
* :class:`EnumerableShardingSpec` -- arbitrary rectangular blocks that tile the tensor.
* :class:`Replicate` -- every rank of the group holds the whole tensor.
* :class:`Partial` -- every rank holds a full-size summand; the value is their reduction.
* :class:`MeshShardingSpec` -- per-mesh-dim placements over an N-D device mesh that
  mix sharding with replication or pending reductions: blocks with several holders.

# NOTE [Sharding metadata is cached]
``build_metadata`` is called every time a ShardedTensor is made, so its result
is cached on ``(spec, size, tensor_properties, group_ranks, device)`` and a
repeated call returns the *same* :class:`ShardedTensorMetadata` object. That is
why specs are frozen and hashable, and why the returned metadata (and the
:class:`ShardMetadata` objects in it) must never be mutated. Errors are not
cached: an invalid call raises every time.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import functools
import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Final

import torch

from dispatch_shard.metadata import (
    Placement,
    ShardedTensorMetadata,
    ShardMetadata,
    TensorProperties,
)

__all__ = [
    "ChunkShardingSpec",
    "EnumerableShardingSpec",
    "MeshShardingSpec",
    "Partial",
    "Replicate",
    "ShardingSpec",
]


class ShardingSpec(abc.ABC):
    """Base class of the sharding specs: :class:`ChunkShardingSpec`,
    :class:`EnumerableShardingSpec`, :class:`Replicate`, :class:`Partial` and
    :class:`MeshShardingSpec`.

    A spec says how a tensor of any size is laid out on a process group; it is a
    frozen, hashable value, equal on every rank that was given equal arguments, so
    it can key caches and be compared without communicating.
    :meth:`~dispatch_shard.ShardedTensor.sharding_spec` returns a tensor's.
    :meth:`build_metadata` gives the blocks it makes of one size on one group.

    Subclasses implement :meth:`_build_metadata`; callers use
    :meth:`build_metadata`, which validates the tensor properties and caches
    the result (see NOTE [Sharding metadata is cached]).
    """

    __slots__ = ()

    # Whether the result depends on the ``device`` argument of build_metadata
    # (only for specs whose placements are derived from the group's ranks).
    _uses_device: ClassVar[bool] = False

    def build_metadata(
        self,
        size: Sequence[int],
        tensor_properties: TensorProperties,
        group_ranks: Sequence[int],
        *,
        device: str | torch.device | None = None,
    ) -> ShardedTensorMetadata:
        """The metadata of a tensor of ``size`` laid out by this spec.

        Args:
            size: the global size of the tensor (a ``torch.Size`` or ints).
            tensor_properties: the global tensor's properties.
            group_ranks: the *global* ranks of the process group, in group-rank order.
            device: the device of the shards, for :class:`Replicate` and
                :class:`Partial` (default ``"cpu"``); ignored by specs whose
                placements name their devices.

        Returns:
            The metadata, shared with every other call with equal arguments:
            never mutate it.

        Raises:
            ValueError: the layout is not ``torch.strided``, the memory format
                is not ``torch.contiguous_format``, ``group_ranks`` is empty,
                or the spec does not fit ``size`` / ``group_ranks`` (invalid
                dim, unknown rank, shards not covering the tensor, ...).
        """
        torch_size = size if isinstance(size, torch.Size) else torch.Size(size)
        ranks = tuple(group_ranks)
        if self._uses_device:
            device_text = "cpu" if device is None else str(device)
        else:
            device_text = None
        return _build_metadata_cached(self, torch_size, tensor_properties, ranks, device_text)

    @abc.abstractmethod
    def _build_metadata(
        self,
        size: torch.Size,
        tensor_properties: TensorProperties,
        group_ranks: tuple[int, ...],
        device: str | None,
    ) -> ShardedTensorMetadata:
        """Compute the metadata (uncached; properties and ranks already checked)."""


@functools.lru_cache(maxsize=1024)
def _build_metadata_cached(
    spec: ShardingSpec,
    size: torch.Size,
    tensor_properties: TensorProperties,
    group_ranks: tuple[int, ...],
    device: str | None,
) -> ShardedTensorMetadata:
    """:meth:`ShardingSpec.build_metadata`, cached on all of its arguments."""
    if tensor_properties.layout != torch.strided:
        raise ValueError("Only torch.strided layout is currently supported")
    if tensor_properties.memory_format != torch.contiguous_format:
        raise ValueError("Only torch.contiguous_format memory_format is currently supported")
    if not group_ranks:
        raise ValueError("group_ranks must name at least one rank")
    return spec._build_metadata(size, tensor_properties, group_ranks, device)


def _check_placement_ranks(
    placements: Sequence[Placement | None], group_ranks: tuple[int, ...]
) -> None:
    """Raise ``ValueError`` unless every placement's rank is one of ``group_ranks``."""
    known = frozenset(group_ranks)
    for placement in placements:
        if placement is None:
            raise ValueError("Every shard of a sharding spec needs a placement, found None")
        if placement.rank() not in known:
            raise ValueError(
                f"Global rank {placement.rank()} does not exist in input process group: "
                f"{list(group_ranks)}"
            )


@dataclasses.dataclass(frozen=True, slots=True, init=False)
class ChunkShardingSpec(ShardingSpec):
    """Shard along ``dim`` like ``torch.chunk``, one block per placement.

    With ``n`` placements and ``dim`` of size ``L``, every block but the last
    non-empty one has ``ceil(L / n)`` elements along ``dim``; trailing blocks
    may be empty (10 over 4 -> 3, 3, 3, 1; 9 over 4 -> 3, 3, 3, 0; 2 over 4 ->
    1, 1, 0, 0). Block ``i`` starts at ``min(i * ceil(L / n), L)``, so even an
    empty block lies inside the tensor. A rank may appear several times
    (several local shards, in placement order), and the placements need not
    cover every rank of the group.

    Args:
        dim: the dim to shard; negative values count from the end.
        placements: ``"rank:N/device"`` texts or :class:`Placement` objects, in
            block order; stored as a tuple of :class:`Placement`.

    Raises:
        NotImplementedError: ``dim`` is a name.
        ValueError: ``dim`` is not an int, or there are no placements.
    """

    dim: int
    placements: tuple[Placement, ...]

    def __init__(self, dim: int | str, placements: Sequence[str | Placement]) -> None:
        if isinstance(dim, str):
            raise NotImplementedError("ChunkShardingSpec does not support named dimension yet!")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"Sharding dim needs to be an integer, found: {dim!r}")
        if isinstance(placements, str):
            raise TypeError(
                f"placements must be a sequence of placements, found the string {placements!r}"
            )
        parsed = tuple(Placement.parse(placement) for placement in placements)
        if not parsed:
            raise ValueError("ChunkShardingSpec needs at least one placement")
        object.__setattr__(self, "dim", dim)
        object.__setattr__(self, "placements", parsed)

    def __reduce__(self) -> tuple[type[ChunkShardingSpec], tuple[int, tuple[Placement, ...]]]:
        return (ChunkShardingSpec, (self.dim, self.placements))

    def _build_metadata(
        self,
        size: torch.Size,
        tensor_properties: TensorProperties,
        group_ranks: tuple[int, ...],
        device: str | None,
    ) -> ShardedTensorMetadata:
        ndim = len(size)
        if not -ndim <= self.dim < ndim:
            raise ValueError(
                f"Invalid sharding dim: {self.dim} for a tensor of {ndim} dims (size {list(size)})"
            )
        _check_placement_ranks(self.placements, group_ranks)
        dim = self.dim % ndim
        dim_size = size[dim]
        split_size = -(-dim_size // len(self.placements))  # ceil, as torch.chunk
        shards_metadata: list[ShardMetadata] = []
        for index, placement in enumerate(self.placements):
            # Legacy offsets: trailing empty blocks sit at index * split_size,
            # which may lie past the end of the dim (2 rows over 4 -> 0, 1, 2, 3).
            start = index * split_size
            offsets = [0] * ndim
            offsets[dim] = start
            sizes = list(size)
            sizes[dim] = max(0, min(split_size, dim_size - start))
            shards_metadata.append(ShardMetadata(offsets, sizes, placement))
        return ShardedTensorMetadata(shards_metadata, size, tensor_properties)


def _boxes_overlap(first: ShardMetadata, second: ShardMetadata, dims: Sequence[int]) -> bool:
    """Whether two non-empty blocks intersect along every dim in ``dims``."""
    for dim in dims:
        first_start, second_start = first.shard_offsets[dim], second.shard_offsets[dim]
        if first_start >= second_start + second.shard_sizes[dim]:
            return False
        if second_start >= first_start + first.shard_sizes[dim]:
            return False
    return True


def _find_overlap(
    shards: Sequence[ShardMetadata], dims: Sequence[int]
) -> tuple[ShardMetadata, ShardMetadata] | None:
    """Two overlapping blocks among the non-empty ``shards``, or ``None``.

    Only ``dims`` are compared (every block spans the others entirely).
    Sweep along the dim with the most distinct offsets, keeping the blocks
    that are still open in a heap keyed by their end; a new block is compared
    with the open ones only.
    """
    if len(shards) < 2:
        return None
    if not dims:
        return (shards[0], shards[1])
    sweep_dim = max(dims, key=lambda dim: len({shard.shard_offsets[dim] for shard in shards}))
    other_dims = [dim for dim in dims if dim != sweep_dim]
    order = sorted(range(len(shards)), key=lambda index: shards[index].shard_offsets[sweep_dim])
    open_blocks: list[tuple[int, int]] = []  # (end along sweep_dim, index into shards)
    for index in order:
        shard = shards[index]
        start = shard.shard_offsets[sweep_dim]
        while open_blocks and open_blocks[0][0] <= start:
            heapq.heappop(open_blocks)
        for _, other_index in open_blocks:
            if _boxes_overlap(shards[other_index], shard, other_dims):
                return (shards[other_index], shard)
        heapq.heappush(open_blocks, (start + shard.shard_sizes[sweep_dim], index))
    return None


def _tiling_bounds(shards: Sequence[ShardMetadata]) -> tuple[int, ...]:
    """The end of the bounding box ``[0, end)`` that ``shards`` tile exactly.

    # NOTE [Corner parity tiling check]
    Let ``f(x)`` count the blocks covering index ``x``. The blocks tile their
    bounding box ``B`` iff ``f == 1`` on ``B``. The mixed finite difference of
    a block's indicator function is ``+-1`` exactly at its ``2^d`` corners,
    and the difference operator is invertible, so "the corners of all blocks,
    counted mod 2, are exactly the corners of ``B``" means ``f`` is odd on
    ``B`` (every block lies in ``B``, which starts at 0), hence ``f >= 1``
    there; with ``sum(volumes) == volume(B)``, ``f == 1``. Empty blocks have
    coinciding corners that cancel, so they are skipped. This costs
    ``O(n * 2^d)``; dims that every block spans entirely are left out of
    ``d``. Only when the check fails does :func:`_find_overlap` search for a
    pair to name.

    Raises:
        ValueError: two blocks overlap, or part of the bounding box is uncovered.
    """
    ndim = len(shards[0].shard_offsets)
    end = [0] * ndim
    # Empty blocks may sit anywhere, even past the end (legacy chunk offsets):
    # only non-empty blocks define the bounding box, unless all are empty.
    non_empty = [shard for shard in shards if 0 not in shard.shard_sizes]
    for shard in non_empty or shards:
        end = [
            max(current, offset + length)
            for current, offset, length in zip(
                end, shard.shard_offsets, shard.shard_sizes, strict=True
            )
        ]
    bounds = tuple(end)
    bounding_volume = math.prod(bounds)
    if bounding_volume == 0:
        return bounds  # no block can be non-empty: nothing to cover, nothing overlaps
    blocks = [shard for shard in shards if 0 not in shard.shard_sizes]
    dims = [
        dim
        for dim in range(ndim)
        if any(
            block.shard_offsets[dim] != 0 or block.shard_sizes[dim] != bounds[dim]
            for block in blocks
        )
    ]
    corners: set[tuple[int, ...]] = set()
    volume = 0
    for block in blocks:
        volume += math.prod(block.shard_sizes)
        for corner in itertools.product(
            *(
                (block.shard_offsets[dim], block.shard_offsets[dim] + block.shard_sizes[dim])
                for dim in dims
            )
        ):
            if corner in corners:
                corners.remove(corner)
            else:
                corners.add(corner)
    expected = set(itertools.product(*((0, bounds[dim]) for dim in dims)))
    if volume == bounding_volume and corners == expected:
        return bounds

    pair = _find_overlap(blocks, dims)
    if pair is not None:
        raise ValueError(f"Shards {pair[0]} and {pair[1]} overlap")
    message = (
        f"Shards do not tile their bounding box (offsets 0, size {list(bounds)}): "
        f"they cover {volume} of its {bounding_volume} elements"
    )
    mismatched = corners ^ expected
    if mismatched:
        corner_in_dims = dict(zip(dims, min(mismatched), strict=True))
        point = [corner_in_dims.get(dim, 0) for dim in range(ndim)]
        message += f"; the uncovered region has a corner at index {point}"
    raise ValueError(message)


@dataclasses.dataclass(frozen=True, slots=True, init=False)
class EnumerableShardingSpec(ShardingSpec):
    """Arbitrary rectangular blocks, enumerated one by one, that tile the tensor.

    The blocks must tile their bounding box ``[0, max(offset + size))``
    exactly: no overlap and no gap (empty blocks are allowed anywhere inside
    it). This is checked at construction in ``O(n * 2^d)`` for ``n`` blocks of
    ``d`` dims (see NOTE [Corner parity tiling check]); ``build_metadata``
    then requires the tensor size to equal the bounding box.

    Args:
        shards: the blocks, in order; stored as a tuple. Treat them as
            immutable from now on.

    Raises:
        ValueError: no shards, shards with different numbers of dims, or
            shards that overlap or leave a gap.
        TypeError: an element is not a :class:`ShardMetadata`.
    """

    shards: tuple[ShardMetadata, ...]
    _bounds: tuple[int, ...] = dataclasses.field(repr=False, compare=False)
    _hash: int = dataclasses.field(repr=False, compare=False)

    def __init__(self, shards: Sequence[ShardMetadata]) -> None:
        stored = tuple(shards)
        if not stored:
            raise ValueError(f"Empty shard list provided: {list(stored)}")
        for shard in stored:
            if not isinstance(shard, ShardMetadata):
                raise TypeError(
                    f"EnumerableShardingSpec takes ShardMetadata objects, found {shard!r}"
                )
        first = stored[0]
        for shard in stored:
            if len(shard.shard_offsets) != len(first.shard_offsets):
                raise ValueError(
                    f"Found inconsistent number of dims for shards: {first} has "
                    f"{len(first.shard_offsets)} dims and {shard} has {len(shard.shard_offsets)}"
                )
        object.__setattr__(self, "shards", stored)
        object.__setattr__(self, "_bounds", _tiling_bounds(stored))
        object.__setattr__(self, "_hash", hash(stored))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(
        self,
    ) -> tuple[type[EnumerableShardingSpec], tuple[tuple[ShardMetadata, ...]]]:
        return (EnumerableShardingSpec, (self.shards,))

    def _build_metadata(
        self,
        size: torch.Size,
        tensor_properties: TensorProperties,
        group_ranks: tuple[int, ...],
        device: str | None,
    ) -> ShardedTensorMetadata:
        bounds = self._bounds
        if len(size) != len(bounds):
            raise ValueError(
                f"Tensor has {len(size)} dims (size {list(size)}), "
                f"but the shards have {len(bounds)} dims"
            )
        all_empty = all(0 in shard.shard_sizes for shard in self.shards)
        if tuple(size) != bounds and not (all_empty and size.numel() == 0):
            if any(end > length for end, length in zip(bounds, size, strict=True)):
                raise ValueError(
                    f"Shards extend beyond the tensor: they span {list(bounds)}, "
                    f"but the tensor size is {list(size)}"
                )
            raise ValueError(
                f"Shards do not cover the tensor: they span {list(bounds)}, but the tensor "
                f"size is {list(size)}; all the individual shards do not cover the entire tensor"
            )
        _check_placement_ranks([shard.placement for shard in self.shards], group_ranks)
        return ShardedTensorMetadata(list(self.shards), size, tensor_properties)


def _full_size_shards(
    size: torch.Size, group_ranks: tuple[int, ...], device: str | None
) -> list[ShardMetadata]:
    """One block covering all of ``size`` on every rank of the group."""
    device_text = "cpu" if device is None else device
    return [
        ShardMetadata([0] * len(size), list(size), Placement(rank, device_text))
        for rank in group_ranks
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class Replicate(ShardingSpec):
    """Every rank of the group holds the whole tensor.

    The metadata has one full-size block (offsets all 0) per group rank, in
    group-rank order, placed on ``f"rank:{rank}/{device}"`` where ``device``
    is the ``build_metadata`` argument (default ``"cpu"``; the same text for
    every rank, so pass the device as the ranks name it, e.g. ``"cuda:0"`` on
    one GPU per node, or compare device types only).
    """

    _uses_device: ClassVar[bool] = True

    def __reduce__(self) -> tuple[type[Replicate], tuple[()]]:
        return (Replicate, ())

    def _build_metadata(
        self,
        size: torch.Size,
        tensor_properties: TensorProperties,
        group_ranks: tuple[int, ...],
        device: str | None,
    ) -> ShardedTensorMetadata:
        return ShardedTensorMetadata(
            _full_size_shards(size, group_ranks, device), size, tensor_properties
        )


_REDUCE_OPS: Final = ("sum", "avg", "max", "min")


@dataclasses.dataclass(frozen=True, slots=True)
class Partial(ShardingSpec):
    """Every rank of the group holds a full-size tensor; the value is their reduction.

    The metadata is that of :class:`Replicate`: one full-size block per group
    rank. The local tensors are summands (``"sum"``), terms of a mean
    (``"avg"``) or candidates of an elementwise ``"max"`` / ``"min"``.

    Args:
        reduce_op: one of ``"sum"``, ``"avg"``, ``"max"``, ``"min"``.

    Raises:
        ValueError: any other ``reduce_op``.
    """

    _uses_device: ClassVar[bool] = True

    reduce_op: str = "sum"

    def __post_init__(self) -> None:
        if self.reduce_op not in _REDUCE_OPS:
            raise ValueError(
                f"Unsupported reduce_op {self.reduce_op!r} for Partial; "
                f"expected one of {', '.join(_REDUCE_OPS)}"
            )

    def __reduce__(self) -> tuple[type[Partial], tuple[str]]:
        return (Partial, (self.reduce_op,))

    def _build_metadata(
        self,
        size: torch.Size,
        tensor_properties: TensorProperties,
        group_ranks: tuple[int, ...],
        device: str | None,
    ) -> ShardedTensorMetadata:
        return ShardedTensorMetadata(
            _full_size_shards(size, group_ranks, device), size, tensor_properties
        )


# NOTE [N-D layouts: blocks with several holders]
# On an N-D device mesh, each mesh dim has a placement: shard a tensor dim, replicate,
# or hold a pending reduction. The ranks that differ only along replicated mesh dims
# hold copies of one block; those that differ only along partial mesh dims hold terms
# of one block's reduction. Placement lists that need neither (Shard everywhere,
# Replicate everywhere, Partial everywhere) are the 1-D specs above; the rest are
# this spec: one block per mesh position, so one per rank, and several ranks per box.
# The 1-D specs are its special cases, kept as their own classes because they are
# what the op families read (see dispatch_shard.holders for how an op that knows
# only them serves a MeshShardingSpec operand).
# A 1-D spec may also be the placement of one mesh dim ("spec"), its "rank:k" naming
# position k along that dim, with Replicate or Partial on the others: the ranks at
# position k hold the spec's blocks of rank k (several per rank, a grid, any order),
# as copies or terms. Then a mesh position may hold several blocks, or none.

# ("shard", dim), ("replicate", 0), ("partial", op), ("spec", a chunk or enumerable spec)
MeshPlacement = tuple[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class MeshShardingSpec(ShardingSpec):
    """Per-mesh-dim placements over a device mesh of ``mesh_shape`` whose positions, in
    row-major order, are the global ``mesh_ranks``.

    ``placements`` has one entry per mesh dim: ``("shard", d)`` cuts tensor dim ``d``
    like ``torch.chunk`` (nested in mesh-dim order when several mesh dims cut one
    tensor dim), ``("replicate", 0)`` copies, ``("partial", op)`` holds terms of a
    pending ``op`` reduction (one ``op`` for all partial mesh dims). Build one with
    :func:`mesh_sharding_spec`, which returns a 1-D spec where the placements need no
    block with several holders.

    The metadata has one block per mesh position, placed on that position's rank.
    """

    _uses_device: ClassVar[bool] = True

    mesh_shape: tuple[int, ...]
    mesh_ranks: tuple[int, ...]
    placements: tuple[MeshPlacement, ...]

    def __post_init__(self) -> None:
        if math.prod(self.mesh_shape) != len(self.mesh_ranks):
            raise ValueError(f"a mesh of shape {self.mesh_shape} has {math.prod(self.mesh_shape)} "
                             f"positions, but {len(self.mesh_ranks)} ranks were given")
        if len(self.placements) != len(self.mesh_shape):
            raise ValueError(f"{len(self.placements)} placements for a {len(self.mesh_shape)}-D "
                             "mesh: give one per mesh dim")
        ops = {arg for kind, arg in self.placements if kind == "partial"}
        if len(ops) > 1:
            raise NotImplementedError(f"Partial with different reductions per mesh dim "
                                      f"({sorted(map(str, ops))}) is not supported")
        for kind, arg in self.placements:
            if kind == "partial" and arg not in _REDUCE_OPS:
                raise ValueError(f"Unsupported reduce_op {arg!r} for Partial; "
                                 f"expected one of {', '.join(_REDUCE_OPS)}")
            if kind == "spec" and not isinstance(arg, ChunkShardingSpec | EnumerableShardingSpec):
                raise TypeError(f"the sharding spec of a mesh dim must be a ChunkShardingSpec or "
                                f"an EnumerableShardingSpec, got {arg!r}")
            if kind not in ("shard", "replicate", "partial", "spec"):
                raise ValueError(f"unknown mesh placement {kind!r}")
        kinds = [kind for kind, _ in self.placements]
        if "spec" in kinds and (kinds.count("spec") > 1 or "shard" in kinds):
            raise NotImplementedError(
                "a sharding spec as the placement of one mesh dim composes with Replicate and "
                "Partial on the other mesh dims; with Shard or a second spec it is not "
                "supported (use Shard placements, or one spec)")

    @property
    def partial_op(self) -> str | None:
        """The pending reduction, or None when no mesh dim is partial."""
        return next((str(arg) for kind, arg in self.placements if kind == "partial"), None)

    def coordinates(self) -> list[tuple[int, ...]]:
        """Every mesh position, in row-major order (the order of :attr:`mesh_ranks`)."""
        return list(itertools.product(*[range(n) for n in self.mesh_shape]))

    def box(self, size: Sequence[int], coordinate: Sequence[int]) -> tuple[list[int], list[int]]:
        """Offsets and sizes of the block at mesh ``coordinate`` of a ``size`` tensor."""
        lows, highs = [0] * len(size), list(size)
        for mesh_dim, (kind, arg) in enumerate(self.placements):
            if kind != "shard":
                continue
            dim = int(arg) % len(size)
            length, parts = highs[dim] - lows[dim], self.mesh_shape[mesh_dim]
            step = -(-length // parts) if length else 0
            start = min(coordinate[mesh_dim] * step, length)
            stop = min(start + step, length)
            lows[dim], highs[dim] = lows[dim] + start, lows[dim] + stop
        return lows, [h - lo for lo, h in zip(lows, highs, strict=True)]

    def _spec_dim(self) -> tuple[int, ChunkShardingSpec | EnumerableShardingSpec] | None:
        """The mesh dim placed by a 1-D spec, and that spec; None when none is."""
        return next(((d, arg) for d, (kind, arg) in enumerate(self.placements)
                     if kind == "spec"), None)

    def blocks_per_position(self) -> tuple[int, ...]:
        """How many blocks each mesh position holds (1 unless a mesh dim has a spec)."""
        found = self._spec_dim()
        if found is None:
            return (1,) * len(self.mesh_ranks)
        mesh_dim, inner = found
        counts = collections.Counter(block_ranks(inner))
        return tuple(counts[c[mesh_dim]] for c in self.coordinates())

    def summand_classes(self) -> tuple[int, ...]:
        """Per block: which term of the pending reduction it holds (its position's
        coordinates along the partial mesh dims, numbered); all 0 when none is partial."""
        partial = [d for d, (kind, _) in enumerate(self.placements) if kind == "partial"]
        strides = [math.prod(self.mesh_shape[e] for e in partial[i + 1:])
                   for i in range(len(partial))]
        return tuple(sum(c[d] * s for d, s in zip(partial, strides, strict=True))
                     for c, n in zip(self.coordinates(), self.blocks_per_position(),
                                     strict=True) for _ in range(n))

    def _build_metadata(
        self,
        size: torch.Size,
        tensor_properties: TensorProperties,
        group_ranks: tuple[int, ...],
        device: str | None,
    ) -> ShardedTensorMetadata:
        if sorted(self.mesh_ranks) != sorted(group_ranks):
            raise ValueError(f"the mesh's ranks {sorted(self.mesh_ranks)} are not the process "
                             f"group's ranks {list(group_ranks)}")
        for kind, arg in self.placements:
            if kind == "shard" and not -len(size) <= int(arg) < len(size):
                raise ValueError(f"Shard dim {arg} is out of range for a tensor of "
                                 f"{len(size)} dims")
        device_text = "cpu" if device is None else device
        shards: list[ShardMetadata] = []
        found = self._spec_dim()
        if found is not None:  # the spec's blocks of "rank" k, at position k along its dim
            mesh_dim, inner = found
            inner_shards = inner.build_metadata(
                size, tensor_properties, tuple(range(self.mesh_shape[mesh_dim])),
                device=device).shards_metadata
            for rank, coordinate in zip(self.mesh_ranks, self.coordinates(), strict=True):
                shards.extend(ShardMetadata(list(s.shard_offsets), list(s.shard_sizes),
                                            Placement(rank, device_text))
                              for s in inner_shards
                              if s.placement.rank() == coordinate[mesh_dim])  # type: ignore[union-attr]
            return ShardedTensorMetadata(shards, size, tensor_properties)
        for rank, coordinate in zip(self.mesh_ranks, self.coordinates(), strict=True):
            offsets, sizes = self.box(size, coordinate)
            shards.append(ShardMetadata(offsets, sizes, Placement(rank, device_text)))
        return ShardedTensorMetadata(shards, size, tensor_properties)


def block_ranks(spec: ChunkShardingSpec | EnumerableShardingSpec) -> list[int]:
    """The rank of each of ``spec``'s blocks, in block order."""
    placed = spec.placements if isinstance(spec, ChunkShardingSpec) else [
        s.placement for s in spec.shards]
    return [p.rank() for p in placed]  # type: ignore[union-attr]


def mesh_sharding_spec(mesh_shape: Sequence[int], mesh_ranks: Sequence[int],
                       placements: Sequence[MeshPlacement], size: Sequence[int],
                       device: str = "cpu") -> ShardingSpec:
    """The spec of ``placements`` over the mesh: a 1-D spec where one expresses it
    (NOTE [N-D layouts: blocks with several holders]), else a :class:`MeshShardingSpec`.

    Mesh dims of size 1 place nothing and are dropped first. Replicate everywhere is
    :class:`Replicate`, Partial everywhere :class:`Partial`. Shard on the one
    remaining dim is a :class:`ChunkShardingSpec` where its boxes are ``torch.chunk``'s
    in some rank order, else an :class:`EnumerableShardingSpec`. Anything else, Shard
    on several mesh dims included, stays a :class:`MeshShardingSpec`: ops then see the
    mesh and serve it per mesh dim (dispatch_shard.mesh_rules).
    """
    spec = MeshShardingSpec(tuple(mesh_shape), tuple(mesh_ranks), tuple(placements))
    kept = [d for d, n in enumerate(spec.mesh_shape) if n != 1 or spec.placements[d][0] == "spec"]
    kinds = {spec.placements[d][0] for d in kept}
    if kinds == {"spec"} and len(kept) == 1:  # the spec alone, on the ranks along its dim
        (mesh_dim,) = kept
        inner = spec.placements[mesh_dim][1]
        grid = torch.tensor(spec.mesh_ranks).reshape(spec.mesh_shape).movedim(mesh_dim, 0)
        line = grid.reshape(spec.mesh_shape[mesh_dim], -1)[:, 0].tolist()
        return _on_ranks(inner, line)
    if kinds <= {"replicate"}:
        return Replicate()
    if kinds == {"partial"}:
        return Partial(str(spec.placements[kept[0]][1]))
    if kinds == {"shard"} and len(kept) == 1:
        metadata = spec.build_metadata(size, TensorProperties(), sorted(spec.mesh_ranks),
                                       device=device)
        return _as_chunk(list(metadata.shards_metadata), torch.Size(size), device)
    if len(kept) != len(spec.mesh_shape):
        spec = MeshShardingSpec(tuple(spec.mesh_shape[d] for d in kept), spec.mesh_ranks,
                                tuple(spec.placements[d] for d in kept))
    return spec


def _on_ranks(spec: ChunkShardingSpec | EnumerableShardingSpec, ranks: Sequence[int]
              ) -> ShardingSpec:
    """``spec`` with each placement's rank ``k`` made ``ranks[k]``."""
    def moved(placement: Placement | None) -> Placement:
        assert placement is not None
        return Placement(ranks[placement.rank()], str(placement.device()))

    if isinstance(spec, ChunkShardingSpec):
        return ChunkShardingSpec(spec.dim, [moved(p) for p in spec.placements])
    return EnumerableShardingSpec([
        ShardMetadata(list(s.shard_offsets), list(s.shard_sizes), moved(s.placement))
        for s in spec.shards])


def _as_chunk(shards: list[ShardMetadata], size: torch.Size, device: str) -> ShardingSpec:
    """A chunk spec with exactly ``shards``' boxes and placements, if there is one; else
    the enumerable spec of ``shards``."""
    cut = [d for d in range(len(size)) if any(s.shard_sizes[d] != size[d] for s in shards)]
    if len(cut) <= 1 and shards:
        dim = cut[0] if cut else 0
        order = sorted(shards, key=lambda s: (s.shard_offsets[dim], s.shard_sizes[dim] != 0))
        chunk = ChunkShardingSpec(dim, [s.placement for s in order])  # type: ignore[misc]
        ranks = tuple(sorted({s.placement.rank() for s in shards}))  # type: ignore[union-attr]
        built = chunk.build_metadata(size, TensorProperties(), ranks, device=device)
        if [_box(s) for s in built.shards_metadata] == [_box(s) for s in order]:
            return chunk
    return EnumerableShardingSpec(shards)


def _box(shard: ShardMetadata) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    return tuple(shard.shard_offsets), tuple(shard.shard_sizes), str(shard.placement)
