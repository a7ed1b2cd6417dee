"""Scans along a dim: ``cumsum``, ``cumprod`` (and their in-place forms), ``logcumsumexp``.

Per rank: each block is scanned locally along ``dim``; the result keeps the
input's layout.

* ``dim`` unsplit (every block spans it): nothing else; collectives: none.
* ``dim`` split: a block must also fold in everything before it along ``dim``
  (the *carry*). Each rank writes the total of each of its blocks (its last
  scanned row, ``[..., 1, ...]``) into a small tensor with one slot per block
  start along ``dim``; one sum all-reduce (each element of a slot has at most one
  writer and the others hold 0, so the sum is exact, for any dtype, complex included;
  elements no block writes, in irregular tilings, then take the scan's identity)
  gives every rank all totals, and an exclusive scan
  of them over the slots is each block's carry, combined into the block (``+``,
  ``*``, ``logaddexp``). Collectives: one all-reduce of ``numel / dim_length *
  number_of_block_starts`` elements.

A ``Partial("sum"/"avg")`` input stays partial for ``cumsum`` (a scan of
summands sums to the scan of the sum); other partials are reduced first.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dispatch_shard import collectives
from dispatch_shard.ops.layouts import split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

__all__: list[str] = []

aten = torch.ops.aten

# op -> (the scan of a block, its identity, how a carry joins a block)
_SCANS: dict[str, tuple[Any, float, Any]] = {
    "cumsum": (torch.cumsum, 0, torch.add),
    "cumprod": (torch.cumprod, 1, torch.mul),
    "logcumsumexp": (torch.logcumsumexp, -math.inf, torch.logaddexp),
}


def _scan(name: str, x: ShardedTensor, dim: int, dtype: torch.dtype | None) -> ShardedTensor:
    scan, identity, combine = _SCANS[name]

    def local_scan(t: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> Any:
        return scan(t, dim) if dtype is None else scan(t, dim, dtype=dtype)

    dim = dim % max(x.dim(), 1)
    if x._layout.is_partial and not (name == "cumsum"
                                     and x._layout.spec.reduce_op in ("sum", "avg")):  # type: ignore[attr-defined]
        x = x._reduced()
    layout = x._layout
    blocks = [local_scan(block, dim, dtype=dtype) for block in x._local_tensors]
    result_dtype = blocks[0].dtype if blocks else local_scan(
        torch.empty((0,) * x.dim(), dtype=x.dtype), dim, dtype=dtype).dtype
    if dim not in split_dims(layout):
        return x._like(blocks, layout, result_dtype)
    if not collectives.is_member(x._process_group, x._rank):
        return x._like(blocks, layout, result_dtype)

    # Carries: one slot per block start along dim (every rank derives the same starts).
    starts = sorted({s.shard_offsets[dim] for s in layout.shards if 0 not in s.shard_sizes})
    slot_size = list(x.shape)
    slot_size[dim] = len(starts)
    totals = torch.zeros(slot_size, dtype=result_dtype, device=x.device)
    # Each non-empty local block's box, with dim narrowed to its slot.
    slots: list[tuple[slice, ...] | None] = []
    for block, i in zip(blocks, layout.local_indices(x._rank), strict=True):
        box = None
        if block.numel():
            slot = starts.index(layout.shards[i].shard_offsets[dim])
            box = (*layout.shard_box(i)[:dim], slice(slot, slot + 1),
                   *layout.shard_box(i)[dim + 1:])
            totals[box] = block.narrow(dim, block.shape[dim] - 1, 1)
        slots.append(box)
    collectives.all_reduce(totals, "sum", x._process_group)  # one writer per element
    # An irregular tiling leaves elements no block writes (a block spanning that slot's
    # start began earlier): they hold the identity (every rank derives the same mask).
    written = torch.zeros(slot_size, dtype=torch.bool, device=x.device)
    for i, shard in enumerate(layout.shards):
        if 0 not in shard.shard_sizes:
            slot = starts.index(shard.shard_offsets[dim])
            written[(*layout.shard_box(i)[:dim], slice(slot, slot + 1),
                     *layout.shard_box(i)[dim + 1:])] = True
    if not bool(written.all()):
        totals.masked_fill_(~written, identity)
    # Exclusive scan over the slots: the carry into the block starting at starts[k].
    first = torch.full_like(totals.narrow(dim, 0, 1), identity)
    carries = torch.cat([first, local_scan(totals.narrow(dim, 0, len(starts) - 1), dim)], dim)
    results = [block if box is None else combine(block, carries[box])
               for block, box in zip(blocks, slots, strict=True)]
    return x._like(results, layout, result_dtype)


def _register(name: str) -> None:
    def out_of_place(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     pg: Any) -> Any:
        return _scan(name, args[0], args[1], kwargs.get("dtype"))

    def in_place(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        x = args[0]
        if x._layout.is_partial:
            raise NotImplementedError(f"aten.{name}_ into a Partial ShardedTensor not "
                                      "supported for ShardedTensor!")
        result = _scan(name, x, args[1], kwargs.get("dtype"))
        for target, block in zip(x._local_tensors, result._local_tensors, strict=True):
            target.copy_(block)
        return x

    out_of_place.__name__ = out_of_place.__qualname__ = f"sharded_{name}"
    in_place.__name__ = in_place.__qualname__ = f"sharded_{name}_"
    out_of_place.__doc__ = in_place.__doc__ = f"``{name}`` along a dim; see the module docstring."
    custom_sharded_op_impl(getattr(aten, name).default, handles_partial=True)(out_of_place)
    if hasattr(aten, f"{name}_"):
        custom_sharded_op_impl(getattr(aten, f"{name}_").default, handles_partial=True)(in_place)


for _name in _SCANS:
    _register(_name)
