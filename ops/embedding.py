"""Embedding ops, TorchRec-style: ``embedding`` and ``embedding_dense_backward``; ``_embedding_bag``
(sum / mean / max, offsets, ``per_sample_weights``, ``padding_idx``), its forward-only form,
``_embedding_bag_backward`` and ``_embedding_bag_per_sample_weights_backward``.

Per rank, for a table ``weight [V, D]`` over ``R`` ranks and ids that are plain int tensors
(replicated: every rank sees every id; a sharded id tensor is gathered whole, except that
a replicated table looks up sharded ids block by block):

* Row-wise (vocabulary blocks, ``weight [V/R, D]``; any layout that splits dim 0, grids
  included): each rank looks up the ids it owns and leaves zeros for the others ->
  ``Partial("sum") [*ids, D]``; collectives: none (the consumer reduces). Bags: the sum of
  the rows it owns (``mean``: divided by the global bag size, which every rank knows from
  the ids) -> ``Partial("sum") [B, D]``; ``max``: two all-reduces of ``[B, D]`` (the
  maximum, then the row that won) -> replicated (NOTE [max bags across ranks]).
* Column-wise (``weight [V, D/R]``): every rank looks up every id in its column block ->
  ``[*ids, D/R]`` sharded on the last dim; collectives: none.
* Replicated table: the dense op, replicated result; collectives: none.
* ``Partial("sum"|"avg")`` table: looked up summand by summand -> the same Partial.

Backward (the table's gradient ``[V, D]``):

* a gradient sharded on the last dim only (the column-wise forward's) -> ``[V, D/R]``
  block by block, sharded like the table; collectives: none.
* a replicated gradient, when the table's layout is known (NOTE [the table's layout in
  backward]) -> each rank builds the rows of its own blocks from the ids it owns ->
  laid out like the table; collectives: none. A partial gradient is all-reduced first
  (``[*ids, D]``: batch-sized, never table-sized).
* otherwise the dense op on whole operands -> replicated (the leaf's grad hook then slices
  it to the table's layout; NOTE [a leaf's grad keeps the leaf's layout]).

NOTE [the table's layout in backward]
``embedding_dense_backward(grad, ids, V, ...)`` is not told the table's layout: after a
row-wise lookup the gradient reaching it is usually replicated, exactly as after a
replicated lookup. The forward therefore remembers, per id tensor and table size (weakly:
the entry dies with the ids), the table's layout; autograd hands the backward the very same
id tensor, so the backward builds its result in that layout directly. This is a hint, never
a source of truth: the gradient's value is the same in any layout, and when the hint is
missing, not sharded or does not fit (another group), the result is replicated. One id
tensor looking up two tables of the same size in different layouts: the latest lookup wins,
and the other table's gradient is moved to its layout by the leaf's grad hook.

NOTE [max bags across ranks]
A ``max`` bag must also return, per bag and column, the row that won (``max_indices``,
which the backward routes the gradient to; on ties dense keeps the first position in the
bag). With the rows of a bag spread over ranks that needs the global maximum, so the
row-wise ``max`` issues two all-reduces of ``[B, D]``: the NaN-aware maximum, then the
smallest position in the bag holding it -> replicated output and ``max_indices``. Bags
that are empty (or all padding) are 0, as dense. Column-wise ``max`` needs none. A NaN in
a bag propagates (dense keeps a NaN only when it comes first in the bag).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from dispatch_shard import collectives
from dispatch_shard.layout import Layout
from dispatch_shard.ops._common import (
    bind_arguments,
    dense_value,
    first_sharded,
    in_group,
    is_block_sharded,
    meta_results,
    outside_result,
    partial_result,
    pieces_of,
    reduction_identity,
    replicated_result,
)
from dispatch_shard.ops.layouts import chunk_dim_of, derived_layout, split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

__all__: list[str] = []

aten = torch.ops.aten

_SUM, _MEAN, _MAX = 0, 1, 2


# -- NOTE [the table's layout in backward] ---------------------------------------------------

_TABLE_LAYOUTS: dict[tuple[int, torch.Size], tuple[weakref.ref[torch.Tensor], Layout]] = {}


def _remember(ids: Any, table: Any) -> None:
    """Remember the layout of the table ``ids`` looked up (the latest lookup of a table of
    that size wins)."""
    if not isinstance(ids, torch.Tensor) or not isinstance(table, ShardedTensor):
        return
    key = (id(ids), table.shape)

    def forget(_: Any, key: tuple[int, torch.Size] = key) -> None:
        _TABLE_LAYOUTS.pop(key, None)

    _TABLE_LAYOUTS[key] = (weakref.ref(ids, forget), table._layout)


def _table_layout(ids: Any, anchor: ShardedTensor, size: torch.Size) -> Layout | None:
    """The layout of the ``size`` table that ``ids`` looked up, when it is sharded and on
    ``anchor``'s group."""
    entry = _TABLE_LAYOUTS.get((id(ids), size))
    if entry is None or entry[0]() is not ids:
        return None
    layout = entry[1]
    if not layout.is_sharded or layout.group_ranks != anchor._layout.group_ranks:
        return None
    return layout


# -- layouts ------------------------------------------------------------------------------

def _chunk_on(layout: Layout, dim: int) -> bool:
    return chunk_dim_of(layout) == dim


@functools.lru_cache(maxsize=1024)
def _looked_up_layout(layout: Layout, lead: tuple[int, ...]) -> Layout:
    """Blocks of ``[*lead, D]`` from the column blocks of a table ``[V, D]`` (dim 0 unsplit)."""
    size = (*lead, layout.size[1])

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        return [0] * len(lead) + [offsets[1]], [*lead, sizes[1]]

    return derived_layout(layout, size, len(lead) if _chunk_on(layout, 1) else None, block_map)


@functools.lru_cache(maxsize=1024)
def _table_from_columns(layout: Layout, rows: int) -> Layout:
    """Blocks of a table ``[rows, D]`` from the column blocks of ``[*lead, D]`` (the other
    dims unsplit)."""
    last = len(layout.size) - 1
    size = (rows, layout.size[last])

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        return [0, offsets[last]], [rows, sizes[last]]

    return derived_layout(layout, size, 1 if _chunk_on(layout, last) else None, block_map)


def _columns_only(layout: Layout) -> bool:
    """Whether no block splits a dim other than the last."""
    return not split_dims(layout) - {len(layout.size) - 1}


def _check_ids(ids: torch.Tensor, rows: int, bag: bool = False) -> None:
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= rows)
    if bool(bad.any()):
        if bag:
            position = int(bad.reshape(-1).nonzero()[0])
            raise RuntimeError(f"Index {position} of input takes value "
                               f"{int(ids.reshape(-1)[position])} which is not in the valid "
                               f"range [0, {rows})")
        raise IndexError("index out of range in self")


def _box_ranges(layout: Layout, index: int) -> tuple[int, int, int, int]:
    """A table block's rows ``[r0, r1)`` and columns ``[c0, c1)``."""
    box = layout.shard_box(index)
    return box[0].start, box[0].stop, box[1].start, box[1].stop


# -- embedding ----------------------------------------------------------------------------

@custom_sharded_op_impl(aten.embedding.default, handles_partial=True)
def embedding(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``F.embedding(ids, weight)``: ``weight [V, D]``, ``ids [*]`` -> ``[*, D]``.

    * row-wise ``weight [V/R, D]`` (or a grid) -> ``Partial("sum") [*, D]``, zeros for ids
      other ranks own; collectives: none.
    * column-wise ``weight [V, D/R]`` -> ``[*, D/R]`` sharded on the last dim; none.
    * replicated ``weight`` -> replicated (sharded ``ids``: sharded like them, plus ``D``);
      ``Partial`` ``weight`` -> the same Partial; none.
    """
    func = aten.embedding.default
    bound = bind_arguments(func, args, kwargs)
    weight, ids_arg = bound["weight"], bound["indices"]
    results = meta_results(func, args, kwargs)
    ((size, dtype),) = results
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return outside_result(anchor, results)
    rows = weight.shape[0]
    if not is_block_sharded(weight) and is_block_sharded(ids_arg):
        if isinstance(weight, ShardedTensor) and weight._layout.is_partial:
            weight = weight._reduced()
        table = dense_value(weight)
        error: Exception | None = None
        try:
            for block in ids_arg._local_tensors:
                _check_ids(block, rows)
        except IndexError as exc:
            error = exc
        collectives.raise_if_any(error, anchor._process_group)
        layout = derived_layout(ids_arg._layout, size, chunk_dim_of(ids_arg._layout),
                          lambda offsets, sizes: ([*offsets, 0], [*sizes, size[-1]]))
        blocks = [torch.nn.functional.embedding(block, table) for block in ids_arg._local_tensors]
        return ids_arg._like(blocks, layout, dtype)
    ids = dense_value(ids_arg)
    _check_ids(ids, rows)
    _remember(ids_arg, weight)
    if not isinstance(weight, ShardedTensor) or weight._layout.is_replicate:
        return replicated_result(anchor, func(dense_value(weight), ids), size, dtype)
    if weight._layout.is_partial:
        return partial_result(anchor, func(weight._local_tensors[0], ids), dtype,
                        weight._layout.spec.reduce_op)  # type: ignore[attr-defined]
    layout, rank = weight._layout, weight._rank
    if 0 not in split_dims(layout):
        out_layout = _looked_up_layout(layout, tuple(ids.shape))
        blocks = [func(block, ids) if block.numel()
                  else block.new_empty(out_layout.shards[j].shard_sizes)
                  for block, j in zip(weight._local_tensors, out_layout.local_indices(rank),
                                      strict=True)]
        return weight._like(blocks, out_layout, dtype)
    summand = torch.zeros(size, dtype=dtype, device=weight.device)
    for block, i in zip(weight._local_tensors, layout.local_indices(rank), strict=True):
        first, stop, left, right = _box_ranges(layout, i)
        hit = (ids >= first) & (ids < stop)
        if block.numel() and bool(hit.any()):
            summand[..., left:right][hit] = block[ids[hit] - first]
    return partial_result(anchor, summand, dtype)


@custom_sharded_op_impl(aten.embedding_dense_backward.default, handles_partial=True)
def embedding_dense_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                             pg: Any) -> Any:
    """``embedding_dense_backward(grad [*, D], ids, V, padding_idx, scale_grad_by_freq)``
    -> the table's gradient ``[V, D]``.

    * ``grad [*, D/R]`` sharded on the last dim -> ``[V, D/R]`` per block; none.
    * replicated (or partial: one all-reduce of ``[*, D]``) ``grad`` and a known table
      layout (NOTE [the table's layout in backward]) -> each block ``[v_i, d_i]`` built from
      the ids it owns, in the table's layout; collectives: none.
    * otherwise dense on whole operands -> replicated.
    """
    func = aten.embedding_dense_backward.default
    bound = bind_arguments(func, args, kwargs)
    grad, ids_arg = bound["grad_output"], bound["indices"]
    rows, padding, by_freq = bound["num_weights"], bound["padding_idx"], bound["scale_grad_by_freq"]
    results = meta_results(func, args, kwargs)
    ((size, dtype),) = results
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return outside_result(anchor, results)
    ids = dense_value(ids_arg)
    rank = anchor._rank
    if is_block_sharded(grad) and _columns_only(grad._layout) and not is_block_sharded(ids_arg):
        out_layout = _table_from_columns(grad._layout, rows)
        blocks = [func(block, ids, rows, padding, by_freq) if block.numel()
                  else block.new_zeros(out_layout.shards[j].shard_sizes)
                  for block, j in zip(grad._local_tensors, out_layout.local_indices(rank),
                                      strict=True)]
        return grad._like(blocks, out_layout, dtype)
    whole = dense_value(grad)
    layout = _table_layout(ids_arg, anchor, size)
    if layout is None:
        return replicated_result(anchor, func(whole, ids, rows, padding, by_freq), size, dtype)
    flat_ids, flat_grad = ids.reshape(-1), whole.reshape(-1, size[1])
    blocks = []
    for i in layout.local_indices(rank):
        first, stop, left, right = _box_ranges(layout, i)
        block = torch.zeros(stop - first, right - left, dtype=dtype, device=whole.device)
        hit = (flat_ids >= first) & (flat_ids < stop)
        if block.numel() and bool(hit.any()):
            local_padding = padding - first if first <= padding < stop else -1
            block = func(flat_grad[hit][:, left:right], flat_ids[hit] - first, stop - first,
                         local_padding, by_freq)
        blocks.append(block)
    return anchor._like(blocks, layout, dtype)


# -- embedding_bag ---------------------------------------------------------------------------

class _Bags:
    """Which bag each id belongs to and which ids count (not padding), from the whole ids
    and offsets: the same on every rank."""

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, bags: int,
                 padding_idx: int) -> None:
        positions = torch.arange(ids.numel(), dtype=offsets.dtype, device=ids.device)
        self.bag_of = torch.searchsorted(offsets[:bags].contiguous(), positions, right=True) - 1
        self.valid = self.bag_of >= 0
        if padding_idx >= 0:
            self.valid &= ids != padding_idx
        self.ids = ids
        self.bags = bags
        self.counts = torch.zeros(bags, dtype=torch.int64, device=ids.device).index_add_(
            0, self.bag_of[self.valid], torch.ones_like(ids[self.valid]))

    def owned(self, first: int, stop: int) -> torch.Tensor:
        """Positions of the counted ids in rows ``[first, stop)``."""
        hit = self.valid & (self.ids >= first) & (self.ids < stop)
        return hit.nonzero().reshape(-1)


def _bag_facts(bound: dict[str, Any], weight: Any, ids: torch.Tensor, offsets: torch.Tensor,
               weights: Any) -> tuple[torch.Tensor, ...]:
    """``offset2bag``, ``bag_size`` and ``max_indices`` as dense returns them, from a dense
    call on a two-row stand-in table (they depend on the ids only through padding): dense's
    own argument checks, raised on every rank alike."""
    padding = bound["padding_idx"]
    stand_in_ids = (ids == padding).to(ids.dtype) if padding >= 0 else torch.zeros_like(ids)
    table = torch.zeros(2, 1, dtype=weight.dtype, device=ids.device)
    _, offset2bag, bag_size, max_indices = aten._embedding_bag.default(
        table, stand_in_ids, offsets, bound["scale_grad_by_freq"], bound["mode"],
        bound["sparse"], weights, bound["include_last_offset"], 1 if padding >= 0 else -1)
    return offset2bag, bag_size, max_indices


def _embedding_bag(func: torch._ops.OpOverload, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    """``_embedding_bag(weight [V, D], ids [n], offsets, ..., mode, per_sample_weights,
    include_last_offset, padding_idx) -> (out [B, D], offset2bag, bag_size, max_indices)``
    (``F.embedding_bag``); ids, offsets and weights whole (gathered when sharded).

    * row-wise ``weight``: sum / mean -> ``Partial("sum") [B, D]`` (each rank sums the rows
      it owns; mean divides by the global bag size); collectives: none. max: two
      all-reduces of ``[B, D]`` -> replicated (NOTE [max bags across ranks]).
    * column-wise ``weight [V, D/R]``: the dense op per block -> ``[B, D/R]`` (max:
      ``max_indices`` too) sharded on dim 1; collectives: none.
    * replicated ``weight``: dense; ``Partial("sum"|"avg")`` weight, sum / mean: summand by
      summand -> the same Partial; none.
    ``offset2bag``, ``bag_size`` (and ``max_indices`` of sum / mean) are replicated.
    """
    bound = bind_arguments(func, args, kwargs)
    weight = bound["weight"]
    results = meta_results(func, args, kwargs)
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return outside_result(anchor, results)
    ids, offsets = dense_value(bound["indices"]), dense_value(bound["offsets"])
    weights = dense_value(bound["per_sample_weights"])
    mode, padding = bound["mode"], bound["padding_idx"]
    dtype = results[0][1]
    facts = _bag_facts(bound, weight, ids, offsets, weights)
    _check_ids(ids, weight.shape[0], bag=True)
    bags = facts[1].shape[0]
    size = torch.Size([bags, weight.shape[1]])
    rest = (bound["scale_grad_by_freq"], mode, bound["sparse"], weights,
            bound["include_last_offset"], padding)

    def replicated_facts(*values: torch.Tensor) -> list[ShardedTensor]:
        return [replicated_result(anchor, v, v.shape, v.dtype) for v in values]

    _remember(bound["indices"], weight)

    if isinstance(weight, ShardedTensor) and weight._layout.is_partial:
        op = weight._layout.spec.reduce_op  # type: ignore[attr-defined]
        if mode != _MAX and op in ("sum", "avg"):
            out = func(weight._local_tensors[0], ids, offsets, *rest)[0]
            return (partial_result(anchor, out, dtype, op), *replicated_facts(*facts))
        weight = weight._reduced()
    if not isinstance(weight, ShardedTensor) or weight._layout.is_replicate:
        out, *others = func(dense_value(weight), ids, offsets, *rest)
        return (replicated_result(anchor, out, out.shape, dtype), *replicated_facts(*others))
    layout, rank = weight._layout, weight._rank
    if 0 not in split_dims(layout):
        out_layout = _looked_up_layout(layout, (bags,))
        outs, maxima = [], []
        for block, j in zip(weight._local_tensors, out_layout.local_indices(rank), strict=True):
            sizes = out_layout.shards[j].shard_sizes
            if block.numel():
                out, _, _, max_indices = func(block, ids, offsets, *rest)
            else:
                out, max_indices = block.new_zeros(sizes), ids.new_zeros(sizes)
            outs.append(out)
            maxima.append(max_indices)
        result = weight._like(outs, out_layout, dtype)
        offset2bag, bag_size, max_indices = replicated_facts(*facts)
        if mode == _MAX:
            max_indices = weight._like(maxima, out_layout, ids.dtype)
        return result, offset2bag, bag_size, max_indices
    if bound["include_last_offset"] and offsets.numel() and int(offsets[-1]) != ids.numel():
        raise NotImplementedError(
            f"{func} with include_last_offset and a last offset other than the number of "
            "indices not supported for ShardedTensor!")
    plan = _Bags(ids, offsets, bags, padding)
    if mode == _MAX:
        return _max_bags(weight, plan, facts, size, dtype, replicated_facts)
    summand = torch.zeros(size, dtype=dtype, device=weight.device)
    for block, i in zip(weight._local_tensors, layout.local_indices(rank), strict=True):
        first, stop, left, right = _box_ranges(layout, i)
        owned = plan.owned(first, stop)
        if owned.numel() == 0 or block.numel() == 0:
            continue
        rows = block[ids[owned] - first]
        if weights is not None:
            rows = rows * weights[owned].unsqueeze(1)
        summand[:, left:right].index_add_(0, plan.bag_of[owned], rows)
    if mode == _MEAN:
        summand /= plan.counts.clamp(min=1).unsqueeze(1).to(dtype)
    return (partial_result(anchor, summand, dtype), *replicated_facts(*facts))


def _max_bags(weight: ShardedTensor, plan: _Bags, facts: tuple[torch.Tensor, ...],
              size: torch.Size, dtype: torch.dtype,
              replicated_facts: Callable[..., list[ShardedTensor]]) -> Any:
    """NOTE [max bags across ranks]: two all-reduces of ``[B, D]``."""
    layout, rank, group = weight._layout, weight._rank, weight._process_group
    found: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
    best = torch.full(size, reduction_identity("max", dtype), dtype=dtype, device=weight.device)
    for block, i in zip(weight._local_tensors, layout.local_indices(rank), strict=True):
        first, stop, left, right = _box_ranges(layout, i)
        owned = plan.owned(first, stop)
        if owned.numel() == 0 or block.numel() == 0:
            continue
        rows = block[plan.ids[owned] - first]
        bag = plan.bag_of[owned].unsqueeze(1).expand(-1, right - left)
        best[:, left:right].scatter_reduce_(0, bag, rows, "amax")
        found.append((owned, rows, left, right))
    collectives.all_reduce(best, "max", group)
    count = plan.ids.numel()
    first_hit = torch.full(size, count, dtype=torch.int64, device=weight.device)
    for owned, rows, left, right in found:
        bag = plan.bag_of[owned].unsqueeze(1).expand(-1, right - left)
        target = best[:, left:right].gather(0, bag)
        hit = (rows == target) | (rows.isnan() & target.isnan())
        positions = torch.where(hit, owned.unsqueeze(1), count)
        first_hit[:, left:right].scatter_reduce_(0, bag, positions, "amin")
    collectives.all_reduce(first_hit, "min", group)
    empty = (plan.counts == 0).unsqueeze(1)
    best.masked_fill_(empty, 0)
    offset2bag, bag_size, stand_in_max = facts
    winners = plan.ids[first_hit.clamp(max=max(count - 1, 0))] if count else first_hit
    max_indices = torch.where(empty, stand_in_max.reshape(-1, 1)[:, :1].expand(size), winners)
    return (replicated_result(weight, best, size, dtype), *replicated_facts(offset2bag, bag_size),
            replicated_result(weight, max_indices, size, max_indices.dtype))


def _register_bag(func: torch._ops.OpOverload) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        return _embedding_bag(func, args, kwargs)

    impl.__name__ = impl.__qualname__ = f"sharded_{func.name().split('::')[1]}"
    impl.__doc__ = _embedding_bag.__doc__
    custom_sharded_op_impl(func, handles_partial=True)(impl)


for _func in (aten._embedding_bag.default, aten._embedding_bag_forward_only.default):
    _register_bag(_func)


@custom_sharded_op_impl(aten._embedding_bag_backward.default, handles_partial=True)
def embedding_bag_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                           pg: Any) -> Any:
    """``_embedding_bag_backward(grad [B, D], ids, offsets, offset2bag, bag_size,
    max_indices, V, scale_grad_by_freq, mode, sparse, per_sample_weights, padding_idx)`` ->
    the table's gradient ``[V, D]`` (dense only: ``sparse=True`` is not supported).

    * ``grad [B, D/R]`` sharded on dim 1 -> the dense backward per block ``[V, D/R]``; none.
    * replicated (or partial: one all-reduce of ``[B, D]``) ``grad`` and a known table
      layout (NOTE [the table's layout in backward]) -> each block built from the ids it
      owns (sum / mean: ``grad[bag] * weight`` / ``bag_size``; max: the winners it owns),
      in the table's layout; collectives: none.
    * otherwise, and with ``scale_grad_by_freq`` (dense's own frequency rule), dense on
      whole operands -> replicated.
    """
    func = aten._embedding_bag_backward.default
    bound = bind_arguments(func, args, kwargs)
    if bound["sparse"]:
        raise NotImplementedError(f"{func} with sparse=True not supported for ShardedTensor!")
    results = meta_results(func, args, kwargs)
    ((size, dtype),) = results
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return outside_result(anchor, results)
    grad, ids_arg = bound["grad"], bound["indices"]
    names = ("indices", "offsets", "offset2bag", "bag_size")
    ids, offsets, offset2bag, bag_size = (dense_value(bound[n]) for n in names)
    weights = dense_value(bound["per_sample_weights"])
    rows, mode, padding = bound["num_weights"], bound["mode"], bound["padding_idx"]
    by_freq = bound["scale_grad_by_freq"]
    rank = anchor._rank

    def dense(grad_piece: torch.Tensor, max_piece: torch.Tensor) -> Any:
        return func(grad_piece, ids, offsets, offset2bag, bag_size, max_piece, rows, by_freq,
                    mode, False, weights, padding)

    if is_block_sharded(grad) and _columns_only(grad._layout):
        out_layout = _table_from_columns(grad._layout, rows)
        count = len(grad._local_tensors)
        maxima = (pieces_of(bound["maximum_indices"], grad._layout, rank) if mode == _MAX
                  else [dense_value(bound["maximum_indices"])] * count)
        blocks = [dense(block, piece) if block.numel()
                  else block.new_zeros(out_layout.shards[j].shard_sizes)
                  for block, piece, j in zip(grad._local_tensors, maxima,
                                             out_layout.local_indices(rank), strict=True)]
        return grad._like(blocks, out_layout, dtype)
    whole = dense_value(grad)
    layout = None if by_freq else _table_layout(ids_arg, anchor, size)
    if layout is None:
        return replicated_result(anchor, dense(whole, dense_value(bound["maximum_indices"])),
                                 size, dtype)
    plan = _Bags(ids, offsets, whole.shape[0], padding)
    if mode == _MAX and 0 not in split_dims(layout):
        # Column blocks: the forward's max_indices is laid out like them.
        maxima = pieces_of(bound["maximum_indices"], _looked_up_layout(layout, (plan.bags,)),
                         rank)
    elif mode == _MAX:
        max_indices = dense_value(bound["maximum_indices"])
        maxima = [max_indices[:, layout.shard_box(i)[1]] for i in layout.local_indices(rank)]
    blocks = []
    for position, i in enumerate(layout.local_indices(rank)):
        first, stop, left, right = _box_ranges(layout, i)
        block = torch.zeros(stop - first, right - left, dtype=dtype, device=whole.device)
        if block.numel() == 0:
            blocks.append(block)
            continue
        if mode == _MAX:
            winners = maxima[position]
            hit = (bag_size > 0).unsqueeze(1) & (winners >= first) & (winners < stop)
            columns = torch.arange(right - left, device=whole.device).expand_as(winners)
            block.index_put_((winners[hit] - first, columns[hit]), whole[:, left:right][hit],
                             accumulate=True)
        else:
            owned = plan.owned(first, stop)
            values = whole[plan.bag_of[owned], left:right]
            if weights is not None:
                values = values * weights[owned].unsqueeze(1)
            if mode == _MEAN:
                values = values / bag_size[plan.bag_of[owned]].unsqueeze(1).to(dtype)
            block.index_add_(0, ids[owned] - first, values)
        blocks.append(block)
    return anchor._like(blocks, layout, dtype)


@custom_sharded_op_impl(aten._embedding_bag_per_sample_weights_backward.default,
                        handles_partial=True)
def embedding_bag_per_sample_weights_backward(types: Any, args: tuple[Any, ...],
                                              kwargs: dict[str, Any], pg: Any) -> Any:
    """``_embedding_bag_per_sample_weights_backward(grad [B, D], weight [V, D], ids, offsets,
    offset2bag, mode, padding_idx) -> [n]``: ``grad[bag(i)] . weight[ids[i]]``.

    * sharded ``weight``: each rank sums the products over its blocks' rows and columns ->
      ``Partial("sum") [n]``; collectives: none (a column-wise ``grad`` laid out like the
      forward's output is used block by block; otherwise it is gathered whole).
    * replicated ``weight``: dense -> replicated; none.
    """
    func = aten._embedding_bag_per_sample_weights_backward.default
    bound = bind_arguments(func, args, kwargs)
    results = meta_results(func, args, kwargs)
    ((size, dtype),) = results
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return outside_result(anchor, results)
    grad, weight = bound["grad"], bound["weight"]
    ids, offsets = dense_value(bound["indices"]), dense_value(bound["offsets"])
    if not is_block_sharded(weight):
        value = func(dense_value(grad), dense_value(weight), ids, offsets,
                     dense_value(bound["offset2bag"]), bound["mode"], bound["padding_idx"])
        return replicated_result(anchor, value, size, dtype)
    layout, rank = weight._layout, weight._rank
    bags = grad.shape[0]
    if 0 not in split_dims(layout):
        grads = pieces_of(grad, _looked_up_layout(layout, (bags,)), rank)
    else:
        whole = dense_value(grad)
        grads = [whole[:, layout.shard_box(i)[1]] for i in layout.local_indices(rank)]
    plan = _Bags(ids, offsets, bags, bound["padding_idx"])
    summand = torch.zeros(size, dtype=dtype, device=weight.device)
    for block, piece, i in zip(weight._local_tensors, grads, layout.local_indices(rank),
                               strict=True):
        first, stop, _, _ = _box_ranges(layout, i)
        owned = plan.owned(first, stop)
        if owned.numel() and block.numel():
            products = piece[plan.bag_of[owned]] * block[ids[owned] - first]
            summand.index_add_(0, owned, products.sum(1).to(dtype))
    return partial_result(anchor, summand, dtype)
