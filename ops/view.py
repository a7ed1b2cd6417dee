"""Views: transpose/permute, (un)squeeze (and the in-place views), expand, slice/select
(and a slice's backward, ``slice_backward`` / ``slice_scatter``), split/unbind,
diagonal. (``view``/``reshape`` live in :mod:`dispatch_shard.ops.reshape`; ``cat``,
``flip``, dtype conversion and ``copy_``, which copy, in :mod:`dispatch_shard.ops.copies`.)

Per rank: each block is viewed the same way as the whole (``block.t()``...), so
the result's blocks alias the input's and in-place ops on a view reach the
base. The result's layout is the input's, transformed: a chunk spec keeps its
placements and follows its dim; other blocks are mapped one by one into an
enumerable spec. Collectives: none.

NOTE [replicated fallback]
A view that cuts across blocks (merging a sharded dim with an earlier dim, a
strided slice of a sharded dim, ...) cannot be served block by block. Such
calls gather the operand (all-to-all to replicated), run the op on the whole
value and return a replicated ShardedTensor: correct, never silently partial,
but it moves data and the result no longer aliases the input.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils._mode_utils import no_dispatch

from dispatch_shard.layout import Layout, layout_of
from dispatch_shard.metadata import ShardMetadata
from dispatch_shard.ops._common import (
    bind_arguments,
    by_decomposition,
    replicated_fallback,
    view_blocks,
)
from dispatch_shard.ops.layouts import relayout, resized_layout, sliced_layout, split_dims
from dispatch_shard.registry import _group_free, custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import ChunkShardingSpec, EnumerableShardingSpec

aten = torch.ops.aten

__all__ = ["replicated_fallback"]


# -- permutations ------------------------------------------------------------------

def _permuted(layout: Layout, perm: tuple[int, ...]) -> Layout:
    """``layout`` seen through ``permute(perm)`` (cached per layout by ``_permute_to``)."""
    size = [layout.size[p] for p in perm]
    chunk_dim = None
    if isinstance(layout.spec, ChunkShardingSpec):
        chunk_dim = perm.index(layout.spec.dim % len(layout.size))
    return relayout(layout, size, chunk_dim,
                     lambda o, s: ([o[p] for p in perm], [s[p] for p in perm]))


def _permute_to(x: ShardedTensor, perm: tuple[int, ...]) -> ShardedTensor:
    key = ("permute", perm)
    layout = x._layout._derived.get(key)
    if layout is None:
        layout = x._layout._derived[key] = _permuted(x._layout, perm)
    if perm == (1, 0):
        return x._like([t.t() for t in x._local_tensors], layout)
    return x._like([t.permute(perm) for t in x._local_tensors], layout)


@custom_sharded_op_impl(aten.permute.default, handles_partial=True)
@_group_free  # one operand: NOTE [implementations that find their own group]
def permute(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.permute(dims)``: each block permuted; the layout's dims follow; no collectives."""
    x, dims = args[0], args[1]
    return _permute_to(x, tuple(d % max(x.dim(), 1) for d in dims))


@custom_sharded_op_impl(aten.transpose.int, handles_partial=True)
@_group_free  # one operand: NOTE [implementations that find their own group]
def transpose(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.transpose(a, b)``: each block transposed; no collectives."""
    x, a, b = args
    perm = list(range(x.dim()))
    if perm:
        a, b = a % x.dim(), b % x.dim()
        perm[a], perm[b] = perm[b], perm[a]
    return _permute_to(x, tuple(perm))


@custom_sharded_op_impl(aten.t.default, handles_partial=True)
@_group_free  # one operand: NOTE [implementations that find their own group]
def t(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.t()`` of a matrix: each block transposed; no collectives."""
    x = args[0]
    return _permute_to(x, (1, 0) if x.dim() == 2 else tuple(range(x.dim())))


# -- adding and removing size-1 dims -------------------------------------------------

@custom_sharded_op_impl(aten.unsqueeze.default, handles_partial=True)
def unsqueeze(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.unsqueeze(dim)``: each block unsqueezed; no collectives."""
    x, dim = args
    dim = dim % (x.dim() + 1)
    layout = _unsqueezed(x._layout, dim)
    return x._like([t.unsqueeze(dim) for t in x._local_tensors], layout)


@functools.lru_cache(maxsize=1024)
def _unsqueezed(layout: Layout, dim: int) -> Layout:
    size = list(layout.size)
    size.insert(dim, 1)
    chunk_dim = None
    if isinstance(layout.spec, ChunkShardingSpec):
        old = layout.spec.dim % len(layout.size)
        chunk_dim = old + 1 if old >= dim else old

    def block_map(o: list[int], s: list[int]) -> tuple[list[int], list[int]]:
        return [*o[:dim], 0, *o[dim:]], [*s[:dim], 1, *s[dim:]]

    return relayout(layout, size, chunk_dim, block_map)


def _squeeze(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.squeeze(dims)``: removes size-1 dims that no block splits; no collectives."""
    x = args[0]
    if len(args) > 1:
        dims = args[1] if isinstance(args[1], list | tuple) else [args[1]]
        dims = [d % max(x.dim(), 1) for d in dims]
    else:
        dims = list(range(x.dim()))
    dims = sorted(d for d in set(dims) if x.dim() and x.shape[d] == 1)
    if not dims:
        return x._like(list(x._local_tensors))
    layout = x._layout
    if layout.is_sharded and any(
        s.shard_sizes[d] == 0 for s in layout.shards for d in dims
    ):
        # A chunk spec over a size-1 dim leaves empty blocks that cannot lose the dim.
        return replicated_fallback(aten.squeeze.dims, (x, dims), {})
    layout = _squeezed(layout, tuple(dims))
    return x._like([t.squeeze(dims) for t in x._local_tensors], layout)


for _overload in (aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims):
    custom_sharded_op_impl(_overload, handles_partial=True)(_squeeze)


@functools.lru_cache(maxsize=1024)
def _squeezed(layout: Layout, dims: tuple[int, ...]) -> Layout:
    keep = [d for d in range(len(layout.size)) if d not in dims]
    chunk_dim = None
    if isinstance(layout.spec, ChunkShardingSpec):
        old = layout.spec.dim % len(layout.size)
        chunk_dim = keep.index(old) if old in keep else None
    return relayout(layout, [layout.size[d] for d in keep], chunk_dim,
                     lambda o, s: ([o[d] for d in keep], [s[d] for d in keep]))


# -- in-place views ------------------------------------------------------------------------

# NOTE [in-place views]
# ``x.squeeze_()``, ``x.t_()``... change ``x``'s shape, not its data. ``x`` takes the blocks
# and layout of the out-of-place view (its blocks alias the old ones, as the view's do;
# the old block tensors are left alone: another wrapper, a ``detach``, may share them),
# then the wrapper's own sizes are changed with dispatch off (as torch's
# ``return_and_correct_aliasing`` does for DTensor's ``squeeze_``), keeping the contiguous
# strides every ShardedTensor has.
_INPLACE_VIEWS = {
    aten.squeeze_.default: aten.squeeze.default,
    aten.squeeze_.dim: aten.squeeze.dim,
    aten.squeeze_.dims: aten.squeeze.dims,
    aten.unsqueeze_.default: aten.unsqueeze.default,
    aten.transpose_.default: aten.transpose.int,
    aten.t_.default: aten.t.default,
    aten.detach_.default: aten.detach.default,
}


def _set_wrapper_size(x: ShardedTensor, size: torch.Size) -> None:
    """``x``'s own (wrapper) sizes become ``size``, with contiguous strides like every
    ShardedTensor's; only metadata changes (the wrapper has no data)."""
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    with no_dispatch():
        meta_in_tls = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            aten.as_strided_.default(x, list(size), strides[::-1])
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta_in_tls)


def _register_inplace_view(func: torch._ops.OpOverload, view: torch._ops.OpOverload) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        x = args[0]
        result = view(*args, **kwargs)
        x._local_tensors = list(result._local_tensors)
        x._layout = result._layout
        _set_wrapper_size(x, result.shape)
        return x

    impl.__name__ = impl.__qualname__ = f"inplace_view_{func.name().split('::')[1]}"
    impl.__doc__ = (f"``{func}``: ``x`` becomes its ``{view}`` (blocks and layout), see NOTE "
                    "[in-place views]; no collectives.")
    # An N-D ``x`` is handed over as it is: the out-of-place view serves it (flattened),
    # and ``x`` takes the view's layout (a write-back into the N-D blocks would not fit
    # the new shape).
    custom_sharded_op_impl(func, handles_partial=True, handles_mesh="pending")(impl)


for _func, _view_op in _INPLACE_VIEWS.items():
    _register_inplace_view(_func, _view_op)


# -- expand ----------------------------------------------------------------------------

@custom_sharded_op_impl(aten.expand.default, handles_partial=True)
def expand(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.expand(size)``: expands unsplit size-1 dims of each block; no collectives."""
    x, size = args[0], list(args[1])
    lead = len(size) - x.dim()
    full = [x.shape[d - lead] if s == -1 else s for d, s in enumerate(size)]
    split = split_dims(x._layout)
    if any(full[d + lead] != x.shape[d] for d in split):
        return replicated_fallback(aten.expand.default, (x, full), {})
    layout = _expanded(x._layout, tuple(full))

    def view(t: torch.Tensor, _: ShardMetadata, out: ShardMetadata) -> torch.Tensor:
        return t.expand(out.shard_sizes)

    return view_blocks(x, layout, view)


@functools.lru_cache(maxsize=1024)
def _expanded(layout: Layout, size: tuple[int, ...]) -> Layout:
    lead = len(size) - len(layout.size)
    chunk_dim = None
    if isinstance(layout.spec, ChunkShardingSpec):
        chunk_dim = layout.spec.dim % len(layout.size) + lead
        if size[chunk_dim] != layout.size[chunk_dim - lead]:
            # An expanded chunk dim (size 1: one block of 1, the others empty) is no
            # chunk of the new size: the block of 1 grows, the empty ones stay empty.
            chunk_dim = None

    def block_map(o: list[int], s: list[int]) -> tuple[list[int], list[int]]:
        new_sizes = [size[d] if d < lead or (s[d - lead] == layout.size[d - lead]
                     and layout.size[d - lead] == 1) else s[d - lead] for d in range(len(size))]
        return [0] * lead + o, new_sizes

    return relayout(layout, size, chunk_dim, block_map)


# -- slicing ---------------------------------------------------------------------------

def _normalize_slice(length: int, start: int | None, stop: int | None) -> tuple[int, int]:
    start = 0 if start is None else start
    stop = length if stop is None else stop
    start = max(0, start + length) if start < 0 else min(start, length)
    stop = max(0, stop + length) if stop < 0 else min(stop, length)
    return start, max(start, stop)


@custom_sharded_op_impl(aten.slice.Tensor, handles_partial=True)
def slice_(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x[start:stop:step]`` along ``dim``: each block sliced by its own part of the range
    (a view); a step > 1 along a split dim falls back (NOTE [replicated fallback])."""
    x = args[0]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % x.dim()
    start = args[2] if len(args) > 2 else kwargs.get("start")
    stop = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    layout = x._layout
    if dim not in split_dims(layout):
        length = len(range(*slice(start, stop, step).indices(x.shape[dim])))
        index = (slice(None),) * dim + (slice(start, stop, step),)
        return x._like([b[index] for b in x._local_tensors], resized_layout(layout, dim, length))
    if step != 1:
        return replicated_fallback(aten.slice.Tensor, (x, dim, start, stop, step), {})
    lo, hi = _normalize_slice(x.shape[dim], start, stop)
    new_layout = sliced_layout(layout, dim, lo, hi)

    def view(t: torch.Tensor, old: ShardMetadata, new: ShardMetadata) -> torch.Tensor:
        begin = min(max(lo - old.shard_offsets[dim], 0), t.shape[dim])
        return t.narrow(dim, begin, new.shard_sizes[dim])

    return view_blocks(x, new_layout, view)


# NOTE [a slice's gradient, block by block]
# ``x[:, :-1]`` of a batch-split tensor (a language model's shifted logits) has, in
# backward, ``slice_backward``: zeros of ``x``'s size with the gradient in the slice.
# Along a dim no block splits, every block of the gradient spans the slice and is
# padded alike, so each rank pads its own blocks (the result: the gradient's layout,
# ``dim`` resized; a pending gradient stays pending, the op being linear). Torch's
# decomposition instead built it from an index, a mask and a where over the whole
# size (about 1.3 ms a step for 1 MB of logits, against 0.2 dense). ``slice_scatter``
# likewise, when the source has the input's blocks cut to the slice. Other cases (a
# split ``dim``, an empty slice, operands laid out apart) take the decomposition.

def _slice_bounds(bound: Any) -> tuple[int, int | None, int | None, int]:
    return bound["dim"], bound["start"], bound["end"], bound["step"]


@custom_sharded_op_impl(aten.slice_backward.default, handles_partial=True)
def slice_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``slice_backward(grad, input_sizes, dim, start, end, step)``: per rank, each block
    of ``grad`` padded with zeros along ``dim`` (unsplit) to ``input_sizes[dim]``; the
    result has ``grad``'s layout with ``dim`` resized. No collectives. (NOTE [a slice's
    gradient, block by block])"""
    func = aten.slice_backward.default
    bound = bind_arguments(func, args, kwargs)
    grad, sizes = bound["grad_output"], list(bound["input_sizes"])
    dim, start, end, step = _slice_bounds(bound)
    if type(grad) is not ShardedTensor or not -len(sizes) <= dim < len(sizes) \
            or grad.dim() != len(sizes):
        return by_decomposition(func, types, args, kwargs, pg)  # (dense's errors too)
    dim %= len(sizes)
    if grad.shape[dim] == 0 or dim in split_dims(grad._layout):
        return by_decomposition(func, types, args, kwargs, pg)
    layout = resized_layout(grad._layout, dim, sizes[dim])
    # A block empty along ``dim`` (the slice missed it: ``split_dims`` skips empty
    # blocks) stays empty; the others span ``dim`` and are padded.
    blocks = [func(b, list(layout.shards[i].shard_sizes), dim, start, end, step)
              if b.shape[dim] else b.new_zeros(layout.shards[i].shard_sizes)
              for b, i in zip(grad._local_tensors, layout.local_indices(grad._rank),
                              strict=True)]
    return grad._like(blocks, layout)


@custom_sharded_op_impl(aten.slice_scatter.default, handles_partial=True)
def slice_scatter(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``slice_scatter(x, src, dim, start, end, step)``: per rank, each block of ``x``
    with its block of ``src`` written into the slice along ``dim`` (unsplit), when
    ``src`` has ``x``'s blocks cut to the slice; ``x``'s layout. No collectives. (NOTE [a
    slice's gradient, block by block])"""
    func = aten.slice_scatter.default
    bound = bind_arguments(func, args, kwargs)
    x, src = bound["self"], bound["src"]
    dim, start, end, step = _slice_bounds(bound)
    if type(x) is ShardedTensor and type(src) is ShardedTensor and x.dim() == src.dim() \
            and -x.dim() <= dim < x.dim():
        dim %= x.dim()
        if src.shape[dim] and dim not in split_dims(x._layout) and src.dtype == x.dtype \
                and resized_layout(x._layout, dim, src.shape[dim]) is src._layout:
            return x._like([func(a, b, dim, start, end, step) for a, b in
                            zip(x._local_tensors, src._local_tensors, strict=True)], x._layout)
    return by_decomposition(func, types, args, kwargs, pg)


@custom_sharded_op_impl(aten.select.int, handles_partial=True)
def select(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.select(dim, i)``: the slice ``i:i+1``, then the dim dropped; blocks that miss ``i``
    become empty; no collectives."""
    x, dim, index = args
    dim %= x.dim()
    if index < 0:
        index += x.shape[dim]
    if not 0 <= index < x.shape[dim]:
        raise IndexError(f"select(): index {args[2]} out of range for dim {dim} of size "
                         f"{x.shape[dim]}")
    if x.dim() == 1 and x._layout.is_sharded:
        return _select_element(x, index)
    narrowed = slice_(types, (x, dim, index, index + 1, 1), {}, pg)
    layout = _selected(narrowed._layout, dim)
    return view_blocks(narrowed, layout,
                        lambda t, _, new: t.narrow(dim, 0, min(1, t.shape[dim])).reshape(
                            new.shard_sizes) if t.shape[dim] != 1 else t.squeeze(dim))


def _select_element(x: ShardedTensor, index: int) -> ShardedTensor:
    """``x[index]`` of a sharded vector: a 0-dim block on the rank holding the element (a
    0-dim block cannot be empty, so the other ranks hold none); no collectives."""
    layout = x._layout
    owner = next(i for i, s in enumerate(layout.shards)
                 if s.shard_offsets[0] <= index < s.shard_offsets[0] + s.shard_sizes[0])
    shard = layout.shards[owner]
    new_layout = layout_of(EnumerableShardingSpec([ShardMetadata([], [], shard.placement)]),
                           torch.Size([]), layout.group_ranks)
    local = layout.local_indices(x._rank)
    blocks = [x._local_tensors[local.index(owner)][index - shard.shard_offsets[0]]] \
        if owner in local else []
    return x._like(blocks, new_layout)


@functools.lru_cache(maxsize=1024)
def _selected(layout: Layout, dim: int) -> Layout:
    """``layout`` (size 1 along ``dim``) without ``dim``; blocks empty along it stay empty."""
    keep = [d for d in range(len(layout.size)) if d != dim]
    chunk_dim = None
    if isinstance(layout.spec, ChunkShardingSpec) and layout.spec.dim % len(layout.size) != dim:
        chunk_dim = keep.index(layout.spec.dim % len(layout.size))

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        new_sizes = [sizes[d] for d in keep]
        if sizes[dim] == 0 and new_sizes and 0 not in new_sizes:
            new_sizes[0] = 0
        return [offsets[d] for d in keep], new_sizes

    return relayout(layout, [layout.size[d] for d in keep], chunk_dim, block_map)


@custom_sharded_op_impl(aten.split.Tensor, handles_partial=True)
def split(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.split(size, dim)``: one slice per piece (views); no collectives."""
    x, size = args[0], args[1]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.dim()
    length = x.shape[dim]
    starts = range(0, length, size) if length else [0]
    return [slice_(types, (x, dim, s, min(s + size, length), 1), {}, pg) for s in starts]


@custom_sharded_op_impl(aten.split_with_sizes.default, handles_partial=True)
def split_with_sizes(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     pg: Any) -> Any:
    """``x.split([sizes], dim)``: one slice per piece (views); no collectives."""
    x, sizes = args[0], args[1]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.dim()
    pieces, start = [], 0
    for n in sizes:
        pieces.append(slice_(types, (x, dim, start, start + n, 1), {}, pg))
        start += n
    return pieces


@custom_sharded_op_impl(aten.unbind.int, handles_partial=True)
def unbind(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.unbind(dim)``: one ``select`` per index (views); no collectives."""
    x = args[0]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % x.dim()
    return [select(types, (x, dim, i), {}, pg) for i in range(x.shape[dim])]


# -- diagonal ---------------------------------------------------------------------------

def _diagonal_parts(layout: Layout, offset: int, dim1: int, dim2: int
                    ) -> tuple[torch.Size, list[tuple[list[int], list[int], int, int]]]:
    """The size of ``x.diagonal(offset, dim1, dim2)`` and, per block of ``layout``, its
    output box (offsets, sizes) and the slice ``[lo, hi)`` of the block's own diagonal (at
    its local offset) that the box holds."""
    size = layout.size
    row, col = max(-offset, 0), max(offset, 0)
    length = max(min(size[dim1] - row, size[dim2] - col), 0)
    others = [d for d in range(len(size)) if d not in (dim1, dim2)]
    out_size = torch.Size([*(size[d] for d in others), length])
    parts = []
    for shard in layout.shards:
        o, s = shard.shard_offsets, shard.shard_sizes
        # Diagonal element k sits at (k + row, k + col): inside the block for k in [lo, hi).
        lo = max(o[dim1] - row, o[dim2] - col, 0)
        hi = min(o[dim1] + s[dim1] - row, o[dim2] + s[dim2] - col, length)
        empty = hi <= lo or any(s[d] == 0 for d in others)
        lo = min(lo, length)
        hi = lo if empty else hi
        local_offset = offset + o[dim1] - o[dim2]
        start = lo + row - o[dim1] - max(-local_offset, 0)
        parts.append(([*(o[d] for d in others), lo],
                      [*(s[d] for d in others), hi - lo] if not empty
                      else [*(0 if i == 0 else s[d] for i, d in enumerate(others)), 0],
                      start, start + hi - lo))
    return out_size, parts


@functools.lru_cache(maxsize=1024)
def _diagonal_layout(layout: Layout, offset: int, dim1: int, dim2: int
                     ) -> tuple[Layout, tuple[tuple[int, int], ...]]:
    out_size, parts = _diagonal_parts(layout, offset, dim1, dim2)
    blocks = [ShardMetadata(offsets, sizes, shard.placement)
              for (offsets, sizes, _, _), shard in zip(parts, layout.shards, strict=True)]
    new_layout = layout_of(EnumerableShardingSpec(blocks), out_size, layout.group_ranks)
    return new_layout, tuple((start, stop) for _, _, start, stop in parts)


@custom_sharded_op_impl(aten.diagonal.default, handles_partial=True)
def diagonal(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.diagonal(offset, dim1, dim2)``: a view. Each block's share of the diagonal is a
    piece of its own diagonal, so the result has one block per input block (most of them
    empty on a grid); no collectives. Replicated and partial inputs: per block."""
    x = args[0]
    names = ("offset", "dim1", "dim2")
    defaults = (0, 0, 1)
    offset, dim1, dim2 = (args[i + 1] if len(args) > i + 1 else kwargs.get(n, defaults[i])
                          for i, n in enumerate(names))
    if x.dim() < 2:
        torch.empty((0,) * x.dim(), device="meta").diagonal(offset, dim1, dim2)  # dense error
    dim1, dim2 = dim1 % x.dim(), dim2 % x.dim()
    if dim1 == dim2:
        raise RuntimeError(f"diagonal dimensions cannot be identical {dim1}, {dim2}")
    layout = x._layout
    if not layout.is_sharded:
        blocks = [t.diagonal(offset, dim1, dim2) for t in x._local_tensors]
        size = torch.empty(x.shape, device="meta").diagonal(offset, dim1, dim2).shape
        return x._like(blocks, layout_of(layout.spec, size, layout.group_ranks,
                                         layout.device or str(x.device)))
    new_layout, slices = _diagonal_layout(layout, offset, dim1, dim2)
    blocks = []
    for t, i in zip(x._local_tensors, layout.local_indices(x._rank), strict=True):
        s = layout.shards[i]
        start, stop = slices[i]
        local_offset = offset + s.shard_offsets[dim1] - s.shard_offsets[dim2]
        piece = t.diagonal(local_offset, dim1, dim2)[..., start:stop]
        blocks.append(piece.reshape(new_layout.shards[i].shard_sizes)
                      if 0 in new_layout.shards[i].shard_sizes else piece)
    return x._like(blocks, new_layout)


@custom_sharded_op_impl(aten.diagonal_scatter.default, handles_partial=True)
def diagonal_scatter(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     pg: Any) -> Any:
    """``x`` with ``src`` written on its diagonal: a clone, then ``copy_`` into the clone's
    :func:`diagonal` view (``diagonal``'s backward); collectives: those of moving ``src``
    to the diagonal's blocks."""
    x, src = args[0], args[1]
    rest = args[2:]
    out = aten.clone.default(x) if isinstance(x, ShardedTensor) else x.clone()
    if not isinstance(out, ShardedTensor):
        return replicated_fallback(aten.diagonal_scatter.default, args, kwargs)
    view = aten.diagonal.default(out, *rest, **kwargs)
    aten.copy_.default(view, src)
    return out
