"""Shape ops that copy: ``cat``/``stack``, ``flip``, ``repeat``, dtype conversion
(``_to_copy``, what ``x.to(dtype)`` reaches) and ``copy_`` (and ``prims.copy_to``). Unlike
the views of :mod:`dispatch_shard.ops.view`, their results own their blocks.

Per rank (``R`` ranks):

* ``cat``/``stack``: when every operand is chunk-sharded along a dim other than the
  joined one, each rank joins its blocks, ``[M/R, N1] + [M/R, N2] -> [M/R, N1 + N2]``, in
  the first operand's spec (an operand in another spec is moved there first: one
  all-to-all). Otherwise on the whole values, a replicated result (NOTE [replicated
  fallback] in :mod:`dispatch_shard.ops.view`).
* ``flip``: each block flipped and mirrored to the other end of each flipped dim (a chunk
  spec along a flipped dim becomes the mirrored blocks). Collectives: none.
* ``_to_copy``: each block converted, same layout. Collectives: none. (Moving to another
  device is refused.)
* ``x.copy_(src)``: ``src`` of ``x``'s size is moved to ``x``'s layout (one all-to-all when
  its layout differs); a plain or broadcasting ``src`` is sliced per block (gathered whole
  first when sharded). Then block by block. Into a ``Partial``: refused, but for a source
  of the same layout and dtype (its terms, copied term by term).
* ``repeat``: on the whole value, a replicated result (NOTE [replicated fallback] in
  :mod:`dispatch_shard.ops.view`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from dispatch_shard.layout import Layout, layout_of
from dispatch_shard.ops._common import meta_call, replicated_fallback, whole
from dispatch_shard.ops.layouts import relayout
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import ChunkShardingSpec

__all__: list[str] = []

aten = torch.ops.aten


@custom_sharded_op_impl(aten.cat.default, handles_partial=True)
def cat(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``torch.cat(tensors, dim)``: blockwise when all operands are chunk-sharded along another
    dim (operands are moved to the first one's spec); else NOTE [replicated fallback] in
    :mod:`dispatch_shard.ops.view`."""
    tensors = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    first = next(t for t in tensors if isinstance(t, ShardedTensor))
    ndim = first.dim()
    dim %= max(ndim, 1)
    spec = first._layout.spec
    if (isinstance(spec, ChunkShardingSpec) and spec.dim % ndim != dim
            and all(isinstance(t, ShardedTensor) and t.dim() == ndim for t in tensors)):
        moved = [t if t._layout.spec == spec else t._redistributed(spec) for t in tensors]
        size = list(first.shape)
        size[dim] = sum(t.shape[dim] for t in moved)
        layout = layout_of(spec, torch.Size(size), first._layout.group_ranks)
        blocks = [torch.cat(parts, dim) for parts in
                  zip(*(t._local_tensors for t in moved), strict=True)]
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in moved])
        return first._like(blocks, layout, dtype)
    return replicated_fallback(aten.cat.default, (tensors, dim), {})


@custom_sharded_op_impl(aten._to_copy.default, handles_partial=True, handles_mesh="pending")
def to_copy(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.to(dtype)`` and friends: each block converted (a copy); same layout; no collectives.
    Moving to another device would leave the placements behind: not supported."""
    x = args[0]
    if kwargs.get("device") is not None and torch.device(kwargs["device"]) != x.device:
        raise NotImplementedError(
            f"aten._to_copy to device {kwargs['device']} not supported for ShardedTensor!")
    options = {k: v for k, v in kwargs.items() if k not in ("device", "layout")}
    blocks = [aten._to_copy.default(t, **options) for t in x._local_tensors]
    return x._like(blocks, dtype=options.get("dtype") or x.dtype)


@custom_sharded_op_impl(aten.copy_.default, handles_partial=True, handles_mesh=True)
def copy_(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.copy_(src)``: ``src`` moved to ``x``'s layout (one all-to-all when they differ; a
    plain or broadcasting ``src`` is sliced per block), then copied block by block."""
    x, src = args[0], args[1]
    if not isinstance(x, ShardedTensor):
        return x.copy_(whole(src))
    layout = x._layout
    if isinstance(src, ShardedTensor) and src.shape == x.shape and not layout.is_partial:
        if src._layout is not layout:
            src = src._redistributed(layout.spec)
        for target, block in zip(x._local_tensors, src._local_tensors, strict=True):
            target.copy_(block)
        return x
    if layout.is_partial:
        if (isinstance(src, ShardedTensor) and src._layout is layout
                and src.dtype == x.dtype):
            # The same terms of the same pending reduction: a copy of each term is a
            # copy of the value (autograd's gradient accumulation does this).
            for target, block in zip(x._local_tensors, src._local_tensors, strict=True):
                target.copy_(block)
            return x
        raise NotImplementedError("aten.copy_ into a Partial not supported for ShardedTensor!")
    dense = whole(src)
    lead = x.dim() - dense.dim()
    for target, i in zip(x._local_tensors, layout.local_indices(x._rank), strict=True):
        box = layout.shard_box(i)
        index = tuple(slice(None) if dense.shape[d] == 1 else box[lead + d]
                      for d in range(dense.dim()))
        target.copy_(dense[index])
    return x


@custom_sharded_op_impl(torch.ops.prims.copy_to.default, handles_partial=True)
def prims_copy_to(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``prims.copy_to(a, b)``, the copy into ``a`` of torch's references (``constant_pad_nd``
    writes its input into a slice of a new plain tensor): ``a.copy_(b)``, see ``copy_``."""
    return copy_(types, args, {}, pg)


@custom_sharded_op_impl(aten.stack.default, handles_partial=True)
def stack(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``torch.stack(tensors, dim)``: ``unsqueeze`` each (a view) then ``cat``; collectives as
    ``cat``."""
    tensors = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    dim %= tensors[0].dim() + 1
    return cat(types, ([t.unsqueeze(dim) for t in tensors], dim), {}, pg)


@custom_sharded_op_impl(aten.flip.default, handles_partial=True)
def flip(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.flip(dims)``: each block flipped (a copy, as dense), and mirrored to the other end
    of each flipped dim (``offset -> length - offset - size``); no collectives. A chunk spec
    along a flipped dim becomes the mirrored blocks (an enumerable spec)."""
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs["dims"]
    meta_call(torch.flip, (x, dims), {})  # dense's errors, on every rank
    dims = tuple(sorted({d % max(x.dim(), 1) for d in dims}))
    layout = _flipped(x._layout, dims) if x.dim() else x._layout
    return x._like([t.flip(dims) for t in x._local_tensors], layout)


@functools.lru_cache(maxsize=1024)
def _flipped(layout: Layout, dims: tuple[int, ...]) -> Layout:
    chunk_dim = None
    if isinstance(layout.spec, ChunkShardingSpec):
        chunk_dim = layout.spec.dim % len(layout.size)
        chunk_dim = None if chunk_dim in dims else chunk_dim

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        # (An empty block may sit past the end: it stays empty, at an offset inside.)
        return ([max(layout.size[d] - o - sizes[d], 0) if d in dims else o
                 for d, o in enumerate(offsets)], list(sizes))

    return relayout(layout, layout.size, chunk_dim, block_map)


@custom_sharded_op_impl(aten.repeat.default, handles_partial=True)
def repeat(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.repeat(counts)``: NOTE [replicated fallback] in :mod:`dispatch_shard.ops.view`
    (its decomposition returned a plain tensor for zero counts: a result must always be a
    ShardedTensor)."""
    return replicated_fallback(aten.repeat.default, args, kwargs)
