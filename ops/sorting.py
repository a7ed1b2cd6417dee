"""Ops that work along one dim, each slice on its own: sort, topk, kthvalue, median and
nanmedian along a dim, mode, cummax and cummin (``argsort`` and ``msort`` are torch
compositions of ``sort``; the median of all elements is in :mod:`dispatch_shard.ops.whole`).

Per rank: when no block splits the op's dim, every slice along it lies in one block,
so each block runs the op (values and int64 indices within the slice are the global
ones): the results take the input's blocks, resized along the dim (``topk``'s ``k``) or
without it (``median(dim)``). Collectives: none. When a block splits the dim, the op
runs on the whole value (NOTE [replicated fallback] in :mod:`dispatch_shard.ops.view`):
correct, replicated, one gather.

Errors are dense torch's, from the op on a small CPU stand-in first (so a bad ``k``
or dim raises on every rank alike); result shapes come from a meta stand-in.
"""

from __future__ import annotations

from typing import Any

import torch

from dispatch_shard.layout import Layout
from dispatch_shard.ops._common import empty_results, meta_call, replicated_fallback
from dispatch_shard.ops.layouts import reduced_layout, resized_layout, split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

aten = torch.ops.aten

__all__: list[str] = []


def _check_like_dense(func: torch._ops.OpOverload, x: ShardedTensor, dim: Any,
                      args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Dense's errors (a bad dim, ``k`` out of range), raised on every rank alike: the op
    on a small CPU stand-in, whole along the op's dim and of size <= 1 elsewhere."""
    ndim = x.dim()
    along = dim % ndim if ndim and isinstance(dim, int) and -ndim <= dim < ndim else None
    shape = [n if d == along else min(n, 1) for d, n in enumerate(x.shape)]
    func(torch.zeros(shape, dtype=x.dtype), *args[1:], **kwargs)


def _out_layout(layout: Layout, dim: int, size: torch.Size) -> Layout:
    if len(size) < len(layout.size):
        return reduced_layout(layout, (dim,), False)
    if size[dim] != layout.size[dim]:
        return resized_layout(layout, dim, size[dim])
    return layout


def _along_dim(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
               dim: int) -> Any:
    x: ShardedTensor = args[0]
    if x._layout.is_partial:
        x = x._reduced()
        args = (x, *args[1:])
    _check_like_dense(func, x, dim, args, kwargs)
    metas = meta_call(func, args, kwargs)
    layout = x._layout
    if x.dim() == 0 or not layout.is_sharded:
        return replicated_fallback(func, args, kwargs)
    d = dim % x.dim()
    if d in split_dims(layout):
        return replicated_fallback(func, args, kwargs)
    results = []
    for block in x._local_tensors:
        if block.numel() == 0:  # kernels differ on empty inputs: shapes from meta
            results.append(empty_results(func, (block, *args[1:]), kwargs, block.device))
        else:
            results.append(tuple(func(block, *args[1:], **kwargs)))
    out_layout = _out_layout(layout, d, metas[0].shape)
    return tuple(x._like([r[k] for r in results], out_layout, m.dtype)
                 for k, m in enumerate(metas))


def _register(func: torch._ops.OpOverload, dim_position: int, dim_default: int | None) -> None:
    """``func`` along the dim at ``dim_position`` (or keyword ``dim``; default
    ``dim_default``)."""

    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        if len(args) > dim_position:
            dim = args[dim_position]
        else:
            dim = kwargs.get("dim", dim_default)
        if not isinstance(args[0], ShardedTensor):
            return replicated_fallback(func, args, kwargs)
        return _along_dim(func, args, kwargs, dim)

    impl.__name__ = impl.__qualname__ = f"along_dim_{func.name().split('::')[1]}"
    impl.__doc__ = (f"``{func}`` per block when no block splits its dim (collectives: none), "
                    "else on the whole value (replicated); see the module docstring.")
    custom_sharded_op_impl(func, handles_partial=True)(impl)


for _func, _position, _default in (
    (aten.sort.default, 1, -1),
    (aten.sort.stable, 99, -1),  # dim is keyword-only
    (aten.topk.default, 2, -1),
    (aten.kthvalue.default, 2, -1),
    (aten.median.dim, 1, None),
    (aten.nanmedian.dim, 1, None),
    (aten.mode.default, 1, -1),
    (aten.cummax.default, 1, None),
    (aten.cummin.default, 1, None),
):
    _register(_func, _position, _default)


