"""``*_like`` factories: the result keeps the input's layout (N-D ones too).

Per rank: each block ``[b_i]`` -> ``like(block)``; collectives: none. Random
blocks come from the rank's generator, in block order; inside
``dispatch_shard.random.dense_equivalent()`` every rank draws the whole tensor as
the dense op does and keeps its blocks (a probability tensor argument is gathered).
"""

from __future__ import annotations

from typing import Any

import torch

from dispatch_shard import collectives
from dispatch_shard.layout import layout_of
from dispatch_shard.ops._common import map_blocks
from dispatch_shard.random import is_dense_equivalent
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import Replicate

aten = torch.ops.aten

_LIKE_OPS = (aten.empty_like, aten.zeros_like, aten.ones_like, aten.rand_like,
             aten.randn_like, aten.full_like)


_RANDOM_LIKE = {aten.rand_like: aten.uniform_, aten.randn_like: aten.normal_}


def _register(packet: Any) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             process_group: Any) -> ShardedTensor:
        tensor: ShardedTensor = args[0]
        kwargs = {k: v for k, v in kwargs.items() if k != "memory_format"}
        if packet in _RANDOM_LIKE and (is_dense_equivalent() or tensor._layout.is_mesh):
            # The dense op's draw: an empty tensor of the same layout, filled in place
            # (also for an N-D layout, whose copies of a block must draw alike).
            result = map_blocks(tensor, lambda b: torch.empty_like(b, **kwargs))
            if tensor._layout.is_partial:
                result = result._like(list(result._local_tensors),
                                      result._layout.with_spec(Replicate()))
            return _RANDOM_LIKE[packet](result)  # type: ignore[no-any-return]
        if tensor._layout.is_partial:
            # A new value, not a summand: the result is replicated (ones_like of a
            # Partial kept as Partial would sum to world_size ones).
            tensor = tensor._like(list(tensor._local_tensors),
                                  tensor._layout.with_spec(Replicate()))
            if packet in _RANDOM_LIKE:  # one draw, broadcast (see _random_fill)
                result = map_blocks(tensor, lambda b: torch.empty_like(b, **kwargs))
                return _RANDOM_LIKE[packet](result)  # type: ignore[no-any-return]
        return map_blocks(tensor, lambda block: packet(block, *args[1:], **kwargs))

    impl.__name__ = impl.__qualname__ = f"sharded_{packet.__name__}"
    impl.__doc__ = (f"``{packet.__name__}``: per-block, same layout (a Partial input gives a "
                    "replicated result); collectives: none (a random fill of a replicated "
                    "result: one broadcast).")
    custom_sharded_op_impl(packet, handles_partial=True, handles_mesh=True)(impl)


for _packet in _LIKE_OPS:
    _register(_packet)


def _new_factory(packet: Any, fill: Any) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             process_group: Any) -> ShardedTensor:
        tensor: ShardedTensor = args[0]
        size = torch.Size(args[1])
        options = {k: v for k, v in kwargs.items() if k in ("dtype",)}
        dtype = options.get("dtype") or tensor.dtype
        extra = args[2:]
        if size == tensor.shape:
            return map_blocks(tensor, lambda block: fill(block, *extra, dtype=dtype), dtype)
        # Another size: a replicated tensor (every rank makes the same one).
        layout = layout_of(Replicate(), size, tensor._layout.group_ranks,
                           tensor._layout.device or str(tensor.device))
        member = bool(layout.local_indices(tensor._rank))
        block = packet(torch.empty(0, dtype=tensor.dtype, device=tensor.device), size, *extra,
                       dtype=dtype)
        return tensor._like([block] if member else [], layout, dtype)

    impl.__name__ = impl.__qualname__ = f"sharded_{packet.__name__}"
    impl.__doc__ = (f"``x.{packet.__name__}(size)``: of ``x``'s size, ``x``'s layout; of another "
                    "size, replicated. Collectives: none.")
    custom_sharded_op_impl(packet, handles_partial=True, handles_mesh=True)(impl)


_new_factory(aten.new_zeros, lambda block, dtype: torch.zeros_like(block, dtype=dtype))
_new_factory(aten.new_ones, lambda block, dtype: torch.ones_like(block, dtype=dtype))
_new_factory(aten.new_empty, lambda block, dtype: torch.empty_like(block, dtype=dtype))
_new_factory(aten.new_full,
             lambda block, value, dtype: torch.full_like(block, value, dtype=dtype))
# Autograd's grad accumulation calls it (blocks are contiguous: the strides are moot).
_new_factory(aten.new_empty_strided,
             lambda block, stride, dtype: torch.empty_like(block, dtype=dtype))


# -- in-place random fills ------------------------------------------------------------

def _random_fill(packet: Any) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             process_group: Any) -> ShardedTensor:
        tensor: ShardedTensor = args[0]
        layout = tensor._layout
        if is_dense_equivalent():
            return _dense_fill(packet, tensor, args, kwargs)
        if tensor._layout.is_sharded:
            indices = layout.local_indices(tensor._rank)
            for position, block in enumerate(tensor._local_tensors):  # the rank's generator
                extra = [_piece(a, tensor, position, layout.shard_box(indices[position]))
                         for a in args[1:]]
                packet(block, *extra, **kwargs)
            return tensor
        extra = [_piece(a, tensor, 0, (slice(None),) * tensor.dim()) for a in args[1:]]
        # Replicated or partial: one draw, the same on every rank (or on one summand).
        group = tensor._process_group
        if not collectives.is_member(group, tensor._rank):
            return tensor
        block = tensor._local_tensors[0]
        first = tensor._layout.group_ranks[0]
        if tensor._rank == first:
            packet(block, *extra, **kwargs)
        if tensor._layout.is_partial:
            if tensor._rank != first:
                block.zero_()
        else:
            collectives.broadcast(block, first, group)
        return tensor

    impl.__name__ = impl.__qualname__ = f"sharded_{packet.__name__}"
    impl.__doc__ = (f"``x.{packet.__name__}(...)``: sharded blocks drawn from each rank's "
                    "generator in block order (no collectives); a replicated tensor drawn on "
                    "its first rank and broadcast (one broadcast).")
    custom_sharded_op_impl(packet, handles_partial=True)(impl)


def _dense_fill(packet: Any, tensor: ShardedTensor, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> ShardedTensor:
    """NOTE in dispatch_shard.random: the whole tensor drawn on every rank, blocks kept."""
    extra = [a._redistributed(Replicate())._local_tensors[0]
             if isinstance(a, ShardedTensor) else a for a in args[1:]]
    whole = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    packet(whole, *extra, **kwargs)  # every rank: the dense op's draw, the same stream
    layout = tensor._layout
    if layout.is_partial:
        keep = tensor._rank == layout.group_ranks[0]
        for block in tensor._local_tensors:
            if keep:
                block.copy_(whole)
            else:
                block.zero_()
        return tensor
    for index, block in zip(layout.local_indices(tensor._rank), tensor._local_tensors,
                            strict=True):
        block.copy_(whole[layout.shard_box(index)])
    return tensor


def _piece(value: Any, tensor: ShardedTensor, position: int, box: tuple[slice, ...]) -> Any:
    """An argument's part for one block (e.g. a probability tensor of ``bernoulli_``)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value._reduced()._local_tensors[0] if isinstance(value, ShardedTensor) else value
    if isinstance(value, ShardedTensor):
        if value._layout is tensor._layout:
            return value._local_tensors[position]
        value = value._redistributed(Replicate())._local_tensors[0]
    lead = tensor.dim() - value.dim()
    return value[tuple(slice(None) if value.shape[d] == 1 else box[lead + d]
                       for d in range(value.dim()))]


for _packet in (aten.bernoulli_, aten.uniform_, aten.normal_, aten.random_, aten.exponential_,
                aten.geometric_, aten.cauchy_, aten.log_normal_):
    _random_fill(_packet)
