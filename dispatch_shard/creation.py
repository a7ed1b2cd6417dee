"""Creation functions: ``empty, zeros, ones, full, rand, randn`` of a sharding spec.

Every rank derives the whole layout from the spec and allocates its own blocks;
one small all_gather checks that the ranks passed the same spec, size and dtype
(NOTE [rank-consistent creation] in :mod:`dispatch_shard.collectives`; skipped
inside :func:`unchecked_creation`), and random blocks come from that rank's
default generator, in the order of the rank's blocks (so with the same seed a
rank's first block equals ``torch.rand`` of that block's size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from dispatch_shard import collectives
from dispatch_shard.collectives import ProcessGroup
from dispatch_shard.layout import Layout, layout_of
from dispatch_shard.metadata import TensorProperties
from dispatch_shard.sharded_tensor import ShardedTensor, _placement_device
from dispatch_shard.specs import ShardingSpec

__all__ = [
    "empty", "full", "ones", "parse_size", "rand", "randn", "unchecked_creation", "zeros",
]

unchecked_creation = collectives.unchecked_creation


def parse_size(size: Sequence[Any]) -> torch.Size:
    """Sizes given as varargs ints, or as one list / tuple / ``torch.Size``."""
    if len(size) == 1 and isinstance(size[0], Sequence) and not isinstance(size[0], str | bytes):
        size = tuple(size[0])
    dims = []
    for dim in size:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(
                f"size must be ints, or one list/tuple of ints, but got {type(dim).__name__}: "
                f"{dim!r}"
            )
        if dim < 0:
            raise ValueError(f"size must be non-negative, got {list(size)}")
        dims.append(dim)
    return torch.Size(dims)


def _default_device(group: ProcessGroup) -> str:
    if not dist.is_initialized() or not collectives.is_member(group, dist.get_rank()):
        return "cpu"  # a rank outside the group holds no blocks (and has no backend for it)
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def _create(
    spec: ShardingSpec,
    size: Sequence[Any],
    fill: Callable[..., torch.Tensor],
    *,
    dtype: torch.dtype | None,
    layout: torch.layout,
    requires_grad: bool,
    pin_memory: bool,
    memory_format: torch.memory_format,
    process_group: ProcessGroup | None,
) -> ShardedTensor:
    group = collectives.resolve_group(process_group)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    rank = dist.get_rank()
    try:
        size_fact: object = tuple(parse_size(size))
    except (TypeError, ValueError):
        size_fact = tuple(size)  # parse_size raises again below, on the checked path

    def build() -> Layout:
        properties = TensorProperties(dtype, layout, requires_grad, memory_format, pin_memory)
        return layout_of(spec, parse_size(size), collectives.group_ranks(group),
                         _default_device(group), properties)

    # NOTE [rank-consistent creation] in dispatch_shard.collectives
    blocks = collectives.checked_creation(
        "creation", (("sharding_spec", spec), ("size", size_fact), ("dtype", dtype),
                     ("requires_grad", requires_grad)), group, build)
    local = []
    for index in blocks.local_indices(rank):
        placement = blocks.shards[index].placement
        device = placement.device() if placement is not None else torch.device(blocks.device)
        local.append(fill(blocks.shards[index].shard_sizes, dtype=dtype, device=device,
                          pin_memory=pin_memory))
    device = local[0].device if local else _placement_device(blocks)
    result = ShardedTensor._wrap(local, blocks, group, rank, dtype, device)
    if requires_grad:
        result.requires_grad_(True)
    return result


def _factory(fill: Callable[..., torch.Tensor], name: str) -> Callable[..., ShardedTensor]:
    def create(
        spec: ShardingSpec,
        *size: Any,
        dtype: torch.dtype | None = None,
        layout: torch.layout = torch.strided,
        requires_grad: bool = False,
        pin_memory: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
        process_group: ProcessGroup | None = None,
        init_rrefs: bool = False,
    ) -> ShardedTensor:
        if init_rrefs:
            raise NotImplementedError("init_rrefs: RPC-based remote shards are not supported")
        return _create(spec, size, fill, dtype=dtype, layout=layout,
                       requires_grad=requires_grad, pin_memory=pin_memory,
                       memory_format=memory_format, process_group=process_group)

    create.__name__ = create.__qualname__ = name
    create.__doc__ = (
        f"A ShardedTensor of ``size`` laid out by ``spec``, each block filled like "
        f"``torch.{name}``.\n\n``size`` is varargs ints or one list/tuple. Placement ranks "
        "are global ranks of ``process_group`` (default: the default group)."
    )
    return create


empty = _factory(torch.empty, "empty")
zeros = _factory(torch.zeros, "zeros")
ones = _factory(torch.ones, "ones")
rand = _factory(torch.rand, "rand")
randn = _factory(torch.randn, "randn")


def full(
    spec: ShardingSpec,
    size: Sequence[int],
    fill_value: float | int | bool | complex,
    *,
    dtype: torch.dtype | None = None,
    layout: torch.layout = torch.strided,
    requires_grad: bool = False,
    pin_memory: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
    process_group: ProcessGroup | None = None,
) -> ShardedTensor:
    """A ShardedTensor of ``size`` laid out by ``spec``, filled with ``fill_value``."""
    def fill(shape: list[int], **kwargs: Any) -> torch.Tensor:
        return torch.full(shape, fill_value, **kwargs)

    if dtype is None:
        dtype = torch.full((), fill_value).dtype
    return _create(spec, (size,), fill, dtype=dtype, layout=layout,
                   requires_grad=requires_grad, pin_memory=pin_memory,
                   memory_format=memory_format, process_group=process_group)
