"""Reductions that return indices: ``max``/``min`` along a dim (values and indices) and
``argmax``/``argmin`` (along a dim, or over all dims as a row-major flat index).

Per rank, with ``D`` the reduced dim (or every dim, for a flat ``argmax``) and ``R`` the
size of the process group (the scheme of :mod:`dispatch_shard.ops.reduction`):

* Blockwise: ``dim`` is given and no block splits it (``x [M/R, N] .max(1)``). Each
  block ``[m_i, N] -> (values, indices) [m_i]``: a block spans ``dim``, so its indices
  are global. The result's layout is the input's with ``dim`` removed (size 1 with
  ``keepdim``). Collectives: none. A replicated input: the op on the block, replicated.
* Across ranks: ``dim`` is split (``x [M/R, N] .argmax(0)``), or a flat ``argmax`` of a
  sharded ``x`` with more than one dim (never blockwise). Two all-reduces of the
  keepdim-shaped full-size result: the NaN-aware extreme of the values, then the
  ``min`` of the first global index that holds it (NOTE [NaN and ties across ranks]) ->
  replicated values and int64 indices.

A ``Partial`` input is reduced first (one all-reduce of the whole tensor). Errors and
result dtypes are dense torch's, from size-<=2 stand-ins, on every rank alike.

NOTE [NaN and ties across ranks]
Float max/min all-reduces propagate NaN (NOTE [NaN in max/min] in
:mod:`dispatch_shard.collectives`). ``max.dim``/``argmax`` first all-reduce the
extreme value, then each rank offers the smallest global index at which its
blocks hold that value (or a NaN, when the value is NaN) and a ``min``
all-reduce picks the first one: torch's tie-breaking, whatever the layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dispatch_shard.layout import Box
from dispatch_shard.ops._common import bind_arguments, in_group
from dispatch_shard.ops.reduction import (
    all_reduced,
    begin_dim_reduction,
    extreme,
    implements,
    keep_box,
    probe,
    reduced_dims,
    reduced_result,
    reduced_size,
    served_without_communication,
)
from dispatch_shard.sharded_tensor import ShardedTensor

__all__: list[str] = []

aten = torch.ops.aten


def _positions(size: torch.Size, box: Box, dims: tuple[int, ...], flat: bool,
               device: torch.device) -> torch.Tensor:
    """Global indices of a block's elements: along ``dims[0]``, or row-major flat indices."""
    ndim = len(size)
    if not flat:
        d = dims[0]
        shape = [-1 if e == d else 1 for e in range(ndim)]
        return torch.arange(box[d].start, box[d].stop, device=device).reshape(shape)
    index = torch.zeros([], dtype=torch.int64, device=device)
    for e in range(ndim):
        shape = [-1 if f == e else 1 for f in range(ndim)]
        stride = math.prod(size[e + 1:])
        index = index + (torch.arange(box[e].start, box[e].stop, device=device)
                         * stride).reshape(shape)
    return index


def _arg_extreme(x: ShardedTensor, dims: tuple[int, ...], op: str,
                 flat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The extreme value over ``dims`` and the first global index holding it (NOTE [NaN and
    ties across ranks]); both keepdim-shaped and full-size. Two all-reduces."""
    values = all_reduced(x, dims, x.dtype, op, lambda block, _: extreme(block, dims, op))
    floating = x.dtype.is_floating_point

    def first(block: torch.Tensor, box: Box) -> torch.Tensor:
        target = values[keep_box(box, dims)]
        hit = block == target
        if floating:
            hit |= block.isnan() & target.isnan()
        positions = _positions(x.shape, box, dims, flat, block.device)
        return torch.where(hit, positions, x.numel()).amin(dims, keepdim=True)

    return values, all_reduced(x, dims, torch.int64, "min", first)


@implements(aten.max.dim, op="max")
@implements(aten.min.dim, op="min")
def _max_dim(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
             op: str) -> Any:
    """``x.max(dim, keepdim) -> (values, indices)`` / ``min``: blockwise when no block splits
    ``dim`` (a block spans it, so its indices are global; collectives: none); else two
    all-reduces (NaN-aware extreme of the values, then min of the first global index that
    holds it) -> both replicated."""
    begun = begin_dim_reduction(func, args, kwargs)
    if begun.served is not None:
        return begun.served
    _, dtypes, x, _, dims, keepdim, _ = begun
    size = reduced_size(x.shape, dims, keepdim)
    values, indices = _arg_extreme(x, dims, op, flat=False)
    return reduced_result(x, values, size, dtypes[0]), reduced_result(x, indices, size, dtypes[1])


@implements(aten.argmax.default, op="max")
@implements(aten.argmin.default, op="min")
def _argmax(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
            op: str) -> Any:
    """``x.argmax(dim, keepdim)`` / ``argmin``: blockwise when ``dim`` is given and no block
    splits it (collectives: none); else two all-reduces (the NaN-aware extreme, then min of
    the first global index holding it; row-major over all dims without ``dim``) ->
    replicated int64."""
    bound = bind_arguments(func, args, kwargs)
    dtypes = probe(func, args, kwargs)
    x: ShardedTensor = args[0]._reduced()
    args = (x, *args[1:])
    flat = bound["dim"] is None
    dims, keepdim = reduced_dims(x.dim(), bound["dim"]), bound["keepdim"]
    size = reduced_size(x.shape, dims, keepdim)
    if flat and x.numel() and x._layout.is_sharded and x.dim() > 1:
        served = None  # a flat index: never blockwise
        if not in_group(x):
            return reduced_result(x, None, size, dtypes[0])
    else:
        served = served_without_communication(func, args, kwargs, dims, keepdim, dtypes)
    if served is not None:
        return served
    _, indices = _arg_extreme(x, dims, op, flat)
    return reduced_result(x, indices, size, dtypes[0])
