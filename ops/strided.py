"""Strided views by address: ``as_strided`` and its scatter (``as_strided``'s backward).

A ShardedTensor's wrapper is contiguous with storage offset 0, so
``x.as_strided(size, stride, offset)`` reads the element at flat position
``offset + sum(i[k] * stride[k])`` of ``x``'s row-major value. ``unfold``, ``stft``'s
frames and ``as_strided_copy`` reach it through their decompositions.

NOTE [strided views that stay inside blocks]
Let ``D`` be the last dim that some block splits and ``S`` the contiguous strides of
``x``. When every dim ``j <= D`` reappears as an output dim of the same size with
stride ``S[j]``, and the other output dims (with ``offset``) reach less than ``S[D]``
(one "row" of the dims after ``D``, which every block holds whole), then each output
element reads dims ``0..D`` from those output dims alone: the output is blocked like
``x`` along them, and each block is its block's own ``as_strided`` (same strides after
``D``, the block's strides along the mapped dims). Per rank: ``block [..., b_j, ...]
-> block [..., b_j, ...]`` (a view that aliases the block); collectives: none.
Replicated and partial inputs are served the same way (a selection is linear).

Any other striding reads across blocks (an ``unfold`` along a split dim, overlapping
windows at a block edge): the value is gathered (one all-to-all), viewed whole and
returned replicated (NOTE [replicated fallback] in :mod:`dispatch_shard.ops.view`):
correct, but the result aliases the gathered copy, not ``x``.

``as_strided_scatter(x, src, size, stride, offset)``: a contiguous clone of ``x``'s
blocks, then ``copy_`` of ``src`` into the clone's view above (collectives: those of
moving ``src`` into the view's layout); across blocks, the whole values are scattered
on every rank and each rank keeps its blocks of ``x``'s layout (one all-to-all per
sharded operand, no further communication).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from dispatch_shard.layout import Layout
from dispatch_shard.ops._common import bind_arguments, dense_value, meta_results, replicated_result
from dispatch_shard.ops.layouts import chunk_dim_of, derived_layout, split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["block_plan"]


def _contiguous_strides(size: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return strides[::-1]


def _check_bounds(x: ShardedTensor, size: Sequence[int], stride: Sequence[int],
                  offset: int) -> None:
    """Dense's bounds check (a meta tensor has no storage to check against); the same on
    every rank: it reads sizes only."""
    if 0 in size:
        return
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if needed > x.numel():
        raise RuntimeError(
            f"setStorage: sizes {list(size)}, strides {list(stride)}, storage offset {offset}, "
            f"and itemsize {x.element_size()} requiring a storage size of "
            f"{needed * x.element_size()} are out of bounds for storage of size "
            f"{x.numel() * x.element_size()}")


@functools.lru_cache(maxsize=1024)
def block_plan(layout: Layout, size: tuple[int, ...], stride: tuple[int, ...],
               offset: int) -> tuple[Layout, tuple[tuple[int, int], ...]] | None:
    """The output layout and the pairs ``(input dim, output dim)`` where the view stays
    inside ``layout``'s blocks (NOTE [strided views that stay inside blocks]); None where
    it does not. Cached per layout and view, like the layouts of ops/layouts.py."""
    shape = list(layout.size)
    if math.prod(shape) == 0 or 0 in size or (layout.is_sharded and not size):
        return None  # (a 0-dim view of a sharded tensor has no blocks to keep)
    split = split_dims(layout)
    last = max(split) if split else -1
    strides_in = _contiguous_strides(shape)
    row = strides_in[last] if last >= 0 else math.prod(shape)
    mapped: dict[int, int] = {}
    for j in range(last + 1):
        if shape[j] == 1:
            continue  # nothing to map: a block holds the one index or is empty
        match = next((e for e, (n, s) in enumerate(zip(size, stride, strict=True))
                      if e not in mapped.values() and n == shape[j] and s == strides_in[j]),
                     None)
        if match is None:
            return None
        mapped[j] = match
    reach = offset + sum((n - 1) * s for e, (n, s) in enumerate(zip(size, stride, strict=True))
                         if e not in mapped.values())
    if reach >= row:
        return None
    chunk_dim = chunk_dim_of(layout)
    out_chunk_dim = mapped.get(chunk_dim) if chunk_dim is not None else None

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        new_offsets, new_sizes = [0] * len(size), list(size)
        for j, e in mapped.items():
            new_offsets[e], new_sizes[e] = offsets[j], sizes[j]
        return new_offsets, new_sizes

    return derived_layout(layout, size, out_chunk_dim, block_map), tuple(mapped.items())


def _view_block(block: torch.Tensor, out_sizes: Sequence[int], stride: Sequence[int],
                mapped: tuple[tuple[int, int], ...], offset: int) -> torch.Tensor:
    if 0 in out_sizes:
        return block.new_empty(out_sizes)
    if not block.is_contiguous():
        block = block.contiguous()  # a copy, as reshape makes of a strided tensor
    block_stride = list(stride)
    for j, e in mapped:
        block_stride[e] = block.stride(j)
    return block.as_strided(out_sizes, block_stride, block.storage_offset() + offset)


def _strided(x: ShardedTensor, size: tuple[int, ...], stride: tuple[int, ...],
             offset: int) -> ShardedTensor | None:
    """The per-block view, or None where it would cross blocks."""
    plan = block_plan(x._layout, size, stride, offset)
    if plan is None:
        return None
    layout, mapped = plan
    outs = layout.local_indices(x._rank)  # the input's blocks' images, in order
    blocks = [_view_block(t, layout.shards[o].shard_sizes, stride, mapped, offset)
              for t, o in zip(x._local_tensors, outs, strict=True)]
    return x._like(blocks, layout)


def _arguments(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    bound = bind_arguments(func, args, kwargs)
    offset = bound["storage_offset"]
    return (tuple(int(n) for n in bound["size"]), tuple(int(s) for s in bound["stride"]),
            0 if offset is None else int(offset))


@custom_sharded_op_impl(aten.as_strided.default, handles_partial=True)
def as_strided(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.as_strided(size, stride, storage_offset)``: per block where the view stays inside
    the blocks (``[..., b_j, ...] -> [..., b_j, ...]``, no collectives, NOTE [strided views
    that stay inside blocks]); else the gathered value's view, replicated (one
    all-to-all)."""
    x = args[0]
    size, stride, offset = _arguments(aten.as_strided.default, args, kwargs)
    meta_results(aten.as_strided.default, (x, size, stride, offset), {})  # dense's errors
    _check_bounds(x, size, stride, offset)
    if offset == 0 and math.prod(size) == x.numel() and all(
            s == c for n, s, c in zip(size, stride, _contiguous_strides(size), strict=True)
            if n > 1):
        return aten.view.default(x, list(size))  # a reshape (group norm's decomposition)
    result = _strided(x, size, stride, offset)
    if result is not None:
        return result
    value = dense_value(x).contiguous()
    if value.storage_offset():
        value = value.clone()
    return replicated_result(x, value.as_strided(size, stride, offset), size, x.dtype)


def _register_scatter(func: torch._ops.OpOverload) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        bound = bind_arguments(func, args, kwargs)
        x, src = bound["self"], bound["src"]
        size, stride, offset = _arguments(func, args, kwargs)
        meta_results(func, args, kwargs)  # dense's errors (src's size and dtype)
        if not isinstance(x, ShardedTensor):  # only src is sharded
            return replicated_result(src, func(x, dense_value(src), size, stride, offset),
                                     x.shape, x.dtype)
        _check_bounds(x, size, stride, offset)
        out = x._like([t.clone(memory_format=torch.contiguous_format)
                       for t in x._local_tensors])
        view = _strided(out, size, stride, offset)
        if view is not None:
            aten.copy_.default(view, src)
            return out
        value = dense_value(x).clone(memory_format=torch.contiguous_format)
        value.as_strided(size, stride, offset).copy_(dense_value(src))
        if not x._layout.is_sharded:
            return replicated_result(x, value, x.shape, x.dtype)
        layout = x._layout
        return x._like([value[layout.shard_box(i)].clone()
                        for i in layout.local_indices(x._rank)])

    name = f"{func.namespace}_{func.name().split('::')[1]}"
    impl.__name__ = impl.__qualname__ = name.replace(".", "_")
    impl.__doc__ = (f"``{func}(x, src, size, stride, offset)``: ``x`` with ``src`` written "
                    "into its strided view (see the module docstring for the per-rank "
                    "shapes and collectives).")
    custom_sharded_op_impl(func)(impl)


for _func in (aten.as_strided_scatter.default, prims.as_strided_scatter.default):
    _register_scatter(_func)
