"""Reductions over dims whose across-rank step is one collective or none: sum, mean,
nansum, count_nonzero, prod, amax/amin, max/min of the whole tensor, all/any; and the
machinery the other reduction modules build on (:mod:`dispatch_shard.ops.arg_reduction`:
max/min with indices, argmax/argmin; :mod:`dispatch_shard.ops.norms`: var/std, vector
norms; :mod:`dispatch_shard.ops.softmax`: logsumexp, softmax/log_softmax).

Per rank, with ``D`` the reduced dims and ``R`` the size of the process group:

* Blockwise: no block splits a dim of ``D`` (``x [M/R, N] .sum(1)``, a replicated
  input). Each block ``[m_i, N] -> op(block) [m_i]``; the result's layout is the
  input's with ``D`` removed (size 1 with ``keepdim``). Collectives: none.
* Across ranks: a dim of ``D`` is split (``x [M/R, N] .sum(0)``). Each rank reduces
  its blocks and places the results at their positions in a full-size *summand*
  of the output (keepdim shape ``[1, N]``; the op's identity where the rank holds
  nothing; several local blocks meeting the same positions are combined). The
  summand is then either this rank's share of a ``Partial`` result (sum, mean,
  nansum, count_nonzero -> ``Partial("sum")``; amax -> ``Partial("max")``; amin ->
  ``Partial("min")``: no collective, the next op decides) or all-reduced into a
  replicated result (everything that needs the final value). See each op for its
  collectives.
* A 0-dim result (a full reduction) follows the same rules: ``x.sum()`` is a
  ``Partial("sum")`` scalar, all-reduced once where its value is needed (``item()``,
  a non-linear op; the reduction is cached). ``loss.backward()`` on a partial loss is
  right: ``ones_like`` of a Partial is a replicated one, so each rank's share of the
  gradient is counted once.

Errors and result dtypes are dense torch's: every op first runs on size-<=2
stand-ins of its operands (same dtypes, same dims, same emptiness), then on meta
tensors of the global sizes (:func:`probe`), so a bad dim, ``mean`` of integers or
``max()`` of an empty tensor raise on every rank alike.

NOTE [partial inputs]
A reduction that commutes with a partial input's reduction runs on the summand
and stays partial: ``sum``/``mean`` of ``Partial("sum"|"avg")``, ``amax``/``max`` of
``Partial("max")``, ``amin``/``min`` of ``Partial("min")``. Every other reduction of
a partial input reduces it first (one all-reduce of the whole tensor).

NOTE [means weight by element counts]
A mean over split dims is ``sum(block) / N`` per rank with ``N`` the *global*
number of reduced elements, summed across ranks: never a mean of per-block means,
which is wrong on uneven blocks. ``var``/``std`` use the global mean (two passes:
one all-reduce for the mean, one for the squared deviations).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from dispatch_shard import collectives
from dispatch_shard.layout import Box, Layout, layout_of
from dispatch_shard.metadata import ShardMetadata
from dispatch_shard.ops._common import (
    bind_arguments,
    in_group,
    meta_results,
    reduction_identity,
)
from dispatch_shard.ops.layouts import reduced_layout, split_dims
from dispatch_shard.registry import _group_free, custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor, _first_group
from dispatch_shard.specs import EnumerableShardingSpec, Partial, Replicate

# The vocabulary ops/arg_reduction.py, ops/norms.py and ops/softmax.py build on.
__all__ = [
    "DimReduction", "Local", "all_reduced", "begin_dim_reduction", "extreme", "implements",
    "keep_box", "layout_for", "probe", "reduced_dims", "reduced_result", "reduced_size",
    "served_without_communication",
]

aten = torch.ops.aten

Impl = Callable[[Any, tuple[Any, ...], dict[str, Any], Any], Any]
# An op implementation here also receives the overload it serves, and fixed parameters.
OpImpl = Callable[..., Any]
# local(block, box) -> the block reduced over the reduced dims (keepdim shape)
Local = Callable[[torch.Tensor, Box], torch.Tensor]


def implements(*overloads: torch._ops.OpOverload, **fixed: Any) -> Callable[[OpImpl], OpImpl]:
    """Register ``fn(func, args, kwargs, **fixed)`` for each overload ``func`` (as
    ``sharded_<op>``, with ``handles_partial=True``, in ``fn``'s module)."""

    def decorate(fn: OpImpl) -> OpImpl:
        for overload in overloads:
            custom_sharded_op_impl(overload, handles_partial=True)(_serving(fn, overload, fixed))
        return fn

    return decorate


def _serving(fn: OpImpl, func: torch._ops.OpOverload, fixed: dict[str, Any]) -> Impl:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], process_group: Any) -> Any:
        if several:  # NOTE [implementations that find their own group]
            _first_group(args, func)
        return fn(func, args, kwargs, **fixed)

    # The group is not used here; operands are checked only where there are several.
    several = sum("Tensor" in str(a.type) for a in func._schema.arguments) > 1
    _group_free(impl)

    impl.__name__ = impl.__qualname__ = f"sharded_{func.name().split('::')[1]}"
    impl.__doc__ = fn.__doc__
    impl.__module__ = fn.__module__  # the family is the module that defines ``fn``
    impl.__defined_by__ = fn  # type: ignore[attr-defined]  # debug.where names ``fn``
    return impl


# -- dims, sizes and result dtypes ---------------------------------------------------

def reduced_dims(ndim: int, dim: Any, empty_means_all: bool = True) -> tuple[int, ...]:
    """The reduced dims, non-negative and sorted (``None``: all dims)."""
    if dim is None:
        return tuple(range(ndim))
    listed = [dim] if isinstance(dim, int) else list(dim)
    if not listed:
        return tuple(range(ndim)) if empty_means_all else ()
    if ndim == 0:
        return ()
    return tuple(sorted({d % ndim for d in listed}))


def reduced_size(size: Sequence[int], dims: tuple[int, ...], keepdim: bool) -> torch.Size:
    """``size`` with ``dims`` reduced: dropped, or of size 1 with ``keepdim``."""
    return torch.Size([1 if d in dims else n for d, n in enumerate(size)
                       if keepdim or d not in dims])


def keep_box(box: Box, dims: tuple[int, ...]) -> Box:
    """The part of a keepdim-shaped full-size output that a block's ``box`` reduces into."""
    return tuple(slice(None) if d in dims else s for d, s in enumerate(box))


def probe(func: torch._ops.OpOverload, args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> tuple[torch.dtype, ...]:
    """The dtypes of ``func``'s results, and dense's errors raised on every rank alike,
    including those only dense kernels give (a dtype they lack, ``max()`` of an empty
    tensor): :func:`~dispatch_shard.authoring.meta_results` with ``dense_kernels``
    (cached; errors raise again)."""
    return tuple(dtype for _, dtype in meta_results(func, args, kwargs, dense_kernels=True))


def _pack(outs: Sequence[ShardedTensor]) -> Any:
    return tuple(outs) if len(outs) > 1 else outs[0]


# -- layouts and results -----------------------------------------------------------------

def layout_for(x: ShardedTensor, spec: Replicate | Partial, size: torch.Size) -> Layout:
    """The ``Replicate`` or ``Partial`` layout of ``size`` over ``x``'s group."""
    return layout_of(spec, size, x._layout.group_ranks, x._layout.device or str(x.device))


def reduced_result(x: ShardedTensor, value: torch.Tensor | None, size: torch.Size,
                   dtype: torch.dtype) -> ShardedTensor:
    """A replicated result of ``size``: ``value`` (keepdim-shaped) reshaped to it; ``value``
    is None on ranks outside the group."""
    layout = layout_for(x, Replicate(), size)
    return x._like([] if value is None else [value.reshape(size)], layout, dtype)


def _blockwise(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
               x: ShardedTensor, dims: tuple[int, ...], keepdim: bool,
               dtypes: tuple[torch.dtype, ...]) -> Any:
    """``func`` on each block of a sharded ``x`` whose reduced ``dims`` no block splits."""
    layout = reduced_layout(x._layout, dims, keepdim)
    results: list[tuple[torch.Tensor, ...]] = []
    for block, j in zip(x._local_tensors, layout.local_indices(x._rank), strict=True):
        if block.numel() == 0:
            sizes = layout.shards[j].shard_sizes
            results.append(tuple(torch.empty(sizes, dtype=d, device=block.device)
                                 for d in dtypes))
        else:
            value = func(block, *args[1:], **kwargs)
            results.append(tuple(value) if isinstance(value, tuple) else (value,))
    return _pack([x._like([r[k] for r in results], layout, dtype)
                  for k, dtype in enumerate(dtypes)])


def _on_replicated(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
                   x: ShardedTensor, size: torch.Size, dtypes: tuple[torch.dtype, ...],
                   value: torch.Tensor | None = None) -> Any:
    """``func`` on the whole value (``value``, or the block of a replicated ``x``): replicated
    results; no collectives."""
    if value is None and x._local_tensors:
        value = x._local_tensors[0]
    if value is None:
        return _pack([reduced_result(x, None, size, dtype) for dtype in dtypes])
    result = func(value, *args[1:], **kwargs)
    results = tuple(result) if isinstance(result, tuple) else (result,)
    return _pack([reduced_result(x, r, size, dtype)
                  for r, dtype in zip(results, dtypes, strict=True)])


def served_without_communication(
    func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
    dims: tuple[int, ...], keepdim: bool, dtypes: tuple[torch.dtype, ...],
) -> Any | None:
    """The result when the (non-partial) input needs no across-rank step: an empty tensor
    (dense on the empty value), a replicated one, or blockwise; else None."""
    x: ShardedTensor = args[0]
    size = reduced_size(x.shape, dims, keepdim)
    if x.numel() == 0:
        empty = torch.empty(x.shape, dtype=x.dtype, device=x.device) if in_group(x) else None
        return _on_replicated(func, args, kwargs, x, size, dtypes, empty)
    if x._layout.is_replicate:
        return _on_replicated(func, args, kwargs, x, size, dtypes)
    if size and not set(dims) & split_dims(x._layout):
        return _blockwise(func, args, kwargs, x, dims, keepdim, dtypes)
    if not in_group(x):
        return _pack([reduced_result(x, None, size, dtype) for dtype in dtypes])
    return None


class DimReduction(NamedTuple):
    """What :func:`begin_dim_reduction` found: the op's arguments by name, dense's result
    dtypes, the (reduced) input and arguments, the reduced dims, and the result when no
    across-rank step is needed (else None)."""

    bound: dict[str, Any]
    dtypes: tuple[torch.dtype, ...]
    x: ShardedTensor
    args: tuple[Any, ...]
    dims: tuple[int, ...]
    keepdim: bool
    served: Any


def begin_dim_reduction(func: torch._ops.OpOverload, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> DimReduction:
    """The first steps of a reduction over ``dim``/``keepdim`` that does not commute with
    sums (var, norms, logsumexp, max.dim...): dense's dtypes and errors (:func:`probe`), a
    Partial input reduced, then :func:`served_without_communication`."""
    bound = bind_arguments(func, args, kwargs)
    dtypes = probe(func, args, kwargs)
    x: ShardedTensor = args[0]._reduced()
    args = (x, *args[1:])
    dims, keepdim = reduced_dims(x.dim(), bound["dim"]), bound["keepdim"]
    served = served_without_communication(func, args, kwargs, dims, keepdim, dtypes)
    return DimReduction(bound, dtypes, x, args, dims, keepdim, served)


# -- summands -------------------------------------------------------------------------------

def _combine(target: torch.Tensor, value: torch.Tensor, op: str) -> None:
    if op == "sum":
        target.add_(value)
    elif op == "product":
        target.mul_(value)
    elif op == "max":
        target.copy_(torch.maximum(target, value))
    else:
        target.copy_(torch.minimum(target, value))


def _summand(x: ShardedTensor, dims: tuple[int, ...], dtype: torch.dtype, op: str,
             local: Local, blocks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """This rank's full-size share (keepdim shape) of reducing ``dims`` with ``op``.

    ``local(block, box)`` reduces one non-empty block (of ``blocks``, default ``x``'s)
    over ``dims`` with ``keepdim=True``; blocks meeting the same output positions are
    combined with ``op``; positions this rank holds nothing of keep ``op``'s identity.
    """
    layout = x._layout
    size = [1 if d in dims else n for d, n in enumerate(x.shape)]
    summand = torch.full(size, reduction_identity(op, dtype), dtype=dtype, device=x.device)
    blocks = x._local_tensors if blocks is None else blocks
    for block, index in zip(blocks, layout.local_indices(x._rank), strict=True):
        if block.numel() == 0:
            continue
        box = layout.shard_box(index)
        _combine(summand[keep_box(box, dims)], local(block, box), op)
    return summand


def all_reduced(x: ShardedTensor, dims: tuple[int, ...], dtype: torch.dtype, op: str,
                local: Local, blocks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`_summand` all-reduced with ``op``: the whole keepdim-shaped result (one
    all-reduce; members of the group only)."""
    return collectives.all_reduce(_summand(x, dims, dtype, op, local, blocks), op,
                                  x._process_group)


# NOTE [reductions combined within a rank]
# A reduced dim split into blocks needs no collective when every block meeting the
# same output positions is on one rank: a rank holding every batch entry of some
# columns as several blocks (the pieces of NOTE [views that cut blocks into pieces]
# in ops/reshape.py) sums its columns alone. The blocks are grouped by their extent
# along the kept dims; when groups are disjoint and each lies on one rank, each group
# becomes one block of the result, on that rank, combining its blocks with the op.

@functools.lru_cache(maxsize=1024)
def _combined_layout(layout: Layout, dims: tuple[int, ...], size: torch.Size
                     ) -> tuple[Layout, tuple[tuple[int, ...], ...]] | None:
    """The result layout and, per result block, the input blocks it combines; None when
    some output position needs blocks of two ranks."""
    groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for i, shard in enumerate(layout.shards):
        if 0 in shard.shard_sizes:
            continue
        kept = tuple((o, n) for d, (o, n) in enumerate(zip(shard.shard_offsets,
                                                           shard.shard_sizes, strict=True))
                     if d not in dims)
        groups.setdefault(kept, []).append(i)
    keys = list(groups)
    for members in groups.values():
        if len({layout.shards[i].placement for i in members}) != 1:
            return None
    for a in range(len(keys)):  # disjoint extents (else two groups meet one position)
        for b in range(a + 1, len(keys)):
            if all(min(oa + na, ob + nb) > max(oa, ob)
                   for (oa, na), (ob, nb) in zip(keys[a], keys[b], strict=True)):
                return None
    keepdim = len(size) == len(layout.size)
    blocks = []
    for kept, members in groups.items():
        extent = iter(kept)
        offsets, sizes = [], []
        for d in range(len(layout.size)):
            if d in dims:
                if keepdim:
                    offsets.append(0)
                    sizes.append(1)
            else:
                o, n = next(extent)
                offsets.append(o)
                sizes.append(n)
        blocks.append(ShardMetadata(offsets, sizes, layout.shards[members[0]].placement))
    out = layout_of(EnumerableShardingSpec(blocks), size, layout.group_ranks)
    return out, tuple(tuple(m) for m in groups.values())


def _combined_within_ranks(x: ShardedTensor, dims: tuple[int, ...], size: torch.Size,
                           dtype: torch.dtype, op: str, local: Local) -> ShardedTensor | None:
    """NOTE [reductions combined within a rank]; None where it does not apply."""
    if not size or not x._layout.is_sharded:
        return None
    plan = _combined_layout(x._layout, dims, size)
    if plan is None:
        return None
    out, groups = plan
    position = {i: p for p, i in enumerate(x._layout.local_indices(x._rank))}
    blocks = []
    for index in out.local_indices(x._rank):
        value: torch.Tensor | None = None
        for i in groups[index]:
            part = local(x._local_tensors[position[i]], x._layout.shard_box(i))
            if value is None:
                value = part
            else:
                _combine(value, part, op)
        assert value is not None
        blocks.append(value.reshape(out.shards[index].shard_sizes))
    return x._like(blocks, out, dtype)


def _reduction(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
               dims: tuple[int, ...], keepdim: bool, op: str, local: Local, *,
               dtype: torch.dtype, stays_partial: bool,
               commutes_with: tuple[str, ...] = ()) -> ShardedTensor:
    """A reduction whose across-rank step is one ``op`` all-reduce, or a ``Partial(op)``.

    ``stays_partial``: across ranks, return ``Partial(op)`` instead of all-reducing
    (0-dim results too). ``commutes_with``: the partial inputs this
    reduction runs on directly (NOTE [partial inputs]).
    """
    x: ShardedTensor = args[0]
    size = reduced_size(x.shape, dims, keepdim)
    if x._layout.is_partial:
        reduce_op = x._layout.spec.reduce_op  # type: ignore[attr-defined]
        if reduce_op in commutes_with:
            return _on_summand(func, args, kwargs, x, reduce_op, size, dtype)
        x = x._reduced()
        args = (x, *args[1:])
    served = served_without_communication(func, args, kwargs, dims, keepdim, (dtype,))
    if served is not None:
        return served  # type: ignore[no-any-return]
    combined = _combined_within_ranks(x, dims, size, dtype, op, local)
    if combined is not None:
        return combined
    summand = _summand(x, dims, dtype, op, local).reshape(size)
    if stays_partial:
        return x._like([summand], layout_for(x, Partial(op), size), dtype)
    if op == "product" and dtype.is_complex:
        summand = _product_of_gathered(x, summand)
    else:
        collectives.all_reduce(summand, op, x._process_group)
    return reduced_result(x, summand, size, dtype)


def _product_of_gathered(x: ShardedTensor, summand: torch.Tensor) -> torch.Tensor:
    """The product of every rank's ``summand``: collectives have no complex product, so the
    summands are gathered (one sum all-reduce of ``R`` summands, zero but for one's own) and
    multiplied locally."""
    ranks = x._layout.group_ranks
    stacked = summand.new_zeros((len(ranks), *summand.shape))
    stacked[ranks.index(x._rank)] = summand
    return collectives.all_reduce(stacked, "sum", x._process_group).prod(0)


def _on_summand(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
                x: ShardedTensor, reduce_op: str, size: torch.Size,
                dtype: torch.dtype) -> ShardedTensor:
    """``func`` on each rank's summand of a partial ``x``: partial again (no collective)."""
    value = func(x._local_tensors[0], *args[1:], **kwargs) if x._local_tensors else None
    blocks = [] if value is None else [value]
    return x._like(blocks, layout_for(x, Partial(reduce_op), size), dtype)


# -- sum, mean, nansum, count_nonzero, prod --------------------------------------------------

@implements(aten.sum.default, aten.sum.dim_IntList)
def _sum(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``x.sum(dims, keepdim, dtype)``. Blockwise ``[m_i, N] -> [m_i]`` when no block splits a
    reduced dim (collectives: none); else each rank's blocks summed into a full-size summand
    -> ``Partial("sum")`` (collectives: none, 0-dim results too). A ``Partial("sum"|"avg")``
    input is summed per summand and stays partial."""
    if func is aten.sum.default and len(args) == 1 and not kwargs:
        served = _full_sum(args[0])
        if served is not None:
            return served
    x = args[0]
    try:
        key: Any = (id(func), x._layout, x.dtype, *[tuple(a) if type(a) is list else a
                                                 for a in args[1:]], *kwargs.items())
        plan = _SUM_PLANS.get(key)
    except TypeError:  # an unhashable argument
        key = plan = None
    if plan is not None:
        return plan(x, args, kwargs)
    bound = bind_arguments(func, args, kwargs)
    dims = reduced_dims(args[0].dim(), bound.get("dim"))
    (dtype,) = probe(func, args, kwargs)
    keepdim = bound.get("keepdim", False)
    result = _reduction(func, args, kwargs, dims, keepdim, "sum",
                        lambda block, _: block.sum(dims, keepdim=True, dtype=dtype),
                        dtype=dtype, stays_partial=True, commutes_with=("sum", "avg"))
    if key is not None and len(_SUM_PLANS) < 4096 and func is aten.sum.dim_IntList:
        plan = _sum_plan(x, dims, keepdim, dtype)
        if plan is not None:
            _SUM_PLANS[key] = plan
    return result


# NOTE [sum plans]
# Backward sums each bias gradient over the batch dim, every step with the same layouts.
# What ``sum.dim_IntList`` does depends only on the input's layout and dtype and the
# arguments (dense's dtype and errors, which path, the result's layout), so after a first
# call has taken the general path (and raised dense's errors, if any) the decision is kept
# per such key, and later calls only sum blocks and wrap. Two cases are planned: blockwise,
# and a split dim summed where this rank holds one block spanning every kept position
# (its sum is the whole summand: no identity-filled buffer to add it into). Other cases
# keep the general path.
Plan = Callable[[ShardedTensor, tuple[Any, ...], dict[str, Any]], ShardedTensor]
_SUM_PLANS: dict[Any, Plan] = {}  # bounded, like probe's cache


def _sum_plan(x: ShardedTensor, dims: tuple[int, ...], keepdim: bool,
              dtype: torch.dtype) -> Plan | None:
    """The plan of NOTE [sum plans] for a (non-partial) ``x``, or None."""
    layout = x._layout
    if not layout.is_sharded or x.numel() == 0 or not in_group(x):
        return None
    local = [layout.shards[i].shard_sizes for i in layout.local_indices(x._rank)]
    if not local or any(0 in sizes for sizes in local):
        return None
    size = reduced_size(x.shape, dims, keepdim)
    if size and not set(dims) & split_dims(layout):  # blockwise
        out = reduced_layout(layout, dims, keepdim)

        def blockwise(x: ShardedTensor, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> ShardedTensor:
            return x._like([aten.sum.dim_IntList(block, *args[1:], **kwargs)
                            for block in x._local_tensors], out, dtype)

        return blockwise
    kept = [n for d, n in enumerate(x.shape) if d not in dims]
    if len(local) != 1 or [n for d, n in enumerate(local[0]) if d not in dims] != kept \
            or (size and _combined_layout(layout, dims, size) is not None):
        return None
    partial = layout_for(x, Partial("sum"), size)

    def summand(x: ShardedTensor, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> ShardedTensor:
        block = x._local_tensors[0].sum(dims, keepdim=True, dtype=dtype)
        return x._like([block.reshape(size)], partial, dtype)

    return summand


def _full_sum(x: ShardedTensor) -> ShardedTensor | None:
    """``x.sum()`` of a sharded, non-empty ``x``: this rank's blocks summed, a 0-dim
    ``Partial("sum")`` (the general path's result, without its bookkeeping); else None."""
    layout = x._layout
    share = layout._derived.get("sum")
    if share is None:
        if not layout.is_sharded or 0 in layout.size:
            return None
        # (the per-rank shares: a 0-dim ``Partial("sum")``, decided once per layout)
        share = layout._derived["sum"] = layout_of(Partial("sum"), torch.Size(()),
                                                   layout.group_ranks,
                                                   layout.device or str(x.device))
    blocks = x._local_tensors
    if blocks:
        total = blocks[0].sum()
        for block in blocks[1:]:
            total = total + block.sum()
        return x._like([total], share, total.dtype)
    (dtype,) = probe(aten.sum.default, (x,), {})
    if not in_group(x):
        return x._like([], share, dtype)
    return x._like([torch.zeros((), dtype=dtype, device=x.device)], share, dtype)


@implements(aten.mean.default, aten.mean.dim)
def _mean(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``x.mean(dims, keepdim, dtype)``. Blockwise when no block splits a reduced dim
    (collectives: none); else each rank's ``sum(blocks) / N``, ``N`` the global count (NOTE
    [means weight by element counts]) -> ``Partial("sum")`` (collectives: none, 0-dim results
    too). ``Partial("sum"|"avg")`` inputs stay partial."""
    bound = bind_arguments(func, args, kwargs)
    x = args[0]
    dims = reduced_dims(x.dim(), bound.get("dim"))
    (dtype,) = probe(func, args, kwargs)
    count = math.prod(x.shape[d] for d in dims)
    return _reduction(func, args, kwargs, dims, bound.get("keepdim", False), "sum",
                      lambda block, _: block.sum(dims, keepdim=True, dtype=dtype).div_(count),
                      dtype=dtype, stays_partial=True, commutes_with=("sum", "avg"))


@implements(aten.nansum.default)
def _nansum(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``x.nansum(dims, keepdim, dtype)``: as ``sum`` (blockwise, or ``Partial("sum")`` across
    ranks; collectives: none); a partial input is reduced first (its summands may be NaN)."""
    bound = bind_arguments(func, args, kwargs)
    dims = reduced_dims(args[0].dim(), bound["dim"])
    (dtype,) = probe(func, args, kwargs)
    return _reduction(func, args, kwargs, dims, bound["keepdim"], "sum",
                      lambda block, _: block.nansum(dims, keepdim=True, dtype=dtype),
                      dtype=dtype, stays_partial=True)


@implements(aten.count_nonzero.default, aten.count_nonzero.dim_IntList)
def _count_nonzero(func: torch._ops.OpOverload, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    """``torch.count_nonzero(x, dims)``: blockwise when no block splits a reduced dim; else
    per-rank counts -> ``Partial("sum")`` int64 (collectives: none, 0-dim results too)."""
    dims = reduced_dims(args[0].dim(), bind_arguments(func, args, kwargs)["dim"])
    (dtype,) = probe(func, args, kwargs)

    def local(block: torch.Tensor, _: Box) -> torch.Tensor:
        keep = [1 if d in dims else n for d, n in enumerate(block.shape)]
        return torch.count_nonzero(block, dims).reshape(keep)

    return _reduction(func, args, kwargs, dims, False, "sum", local, dtype=dtype,
                      stays_partial=True)


@implements(aten.prod.default, aten.prod.dim_int)
def _prod(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``x.prod(dim, keepdim, dtype)``: blockwise when no block splits ``dim`` (collectives:
    none); else per-rank products (identity 1) and one product all-reduce -> replicated
    (complex: one sum all-reduce gathering the ``R`` per-rank products)."""
    bound = bind_arguments(func, args, kwargs)
    dims = reduced_dims(args[0].dim(), bound.get("dim"))
    (dtype,) = probe(func, args, kwargs)

    def local(block: torch.Tensor, _: Box) -> torch.Tensor:
        if len(dims) == 1:
            return block.prod(dims[0], keepdim=True, dtype=dtype)
        return block.prod(dtype=dtype).reshape([1] * block.dim())

    return _reduction(func, args, kwargs, dims, bound.get("keepdim", False), "product", local,
                      dtype=dtype, stays_partial=False)


# -- amax, amin, max, min, all, any ---------------------------------------------------------

def extreme(block: torch.Tensor, dims: tuple[int, ...], op: str) -> torch.Tensor:
    """``block``'s ``amax`` (``op="max"``) or ``amin`` over ``dims``, keepdim."""
    return block.amax(dims, keepdim=True) if op == "max" else block.amin(dims, keepdim=True)


@implements(aten.amax.default, op="max")
@implements(aten.amin.default, op="min")
def _amax(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
          op: str) -> Any:
    """``x.amax(dims, keepdim)`` / ``amin``: blockwise when no block splits a reduced dim
    (collectives: none); else per-rank extremes in a full-size summand (the identity, -inf or
    +inf, where the rank holds nothing) -> ``Partial("max"|"min")`` (collectives: none, 0-dim
    results too; reducing it is NaN-aware). A partial input of the same op stays partial."""
    bound = bind_arguments(func, args, kwargs)
    dims = reduced_dims(args[0].dim(), bound["dim"])
    (dtype,) = probe(func, args, kwargs)
    return _reduction(func, args, kwargs, dims, bound["keepdim"], op,
                      lambda block, _: extreme(block, dims, op),
                      dtype=dtype, stays_partial=True, commutes_with=(op,))


@implements(aten.max.default, op="max")
@implements(aten.min.default, op="min")
def _max(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
         op: str) -> Any:
    """``x.max()`` / ``x.min()``: per-rank extremes and one NaN-aware scalar all-reduce ->
    replicated 0-dim (a replicated input: none; a ``Partial`` of the same op: partial, none)."""
    dims = tuple(range(args[0].dim()))
    (dtype,) = probe(func, args, kwargs)
    return _reduction(func, args, kwargs, dims, False, op,
                      lambda block, _: extreme(block, dims, op),
                      dtype=dtype, stays_partial=False, commutes_with=(op,))


@implements(aten.all.default, aten.all.dim, aten.all.dims, op="all")
@implements(aten.any.default, aten.any.dim, aten.any.dims, op="any")
def _all(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
         op: str) -> Any:
    """``x.all(dims, keepdim)`` / ``any``: blockwise when no block splits a reduced dim
    (collectives: none); else per-rank verdicts and one min (all) / max (any) all-reduce ->
    replicated bool (uint8 for uint8 input)."""
    bound = bind_arguments(func, args, kwargs)
    dims = reduced_dims(args[0].dim(), bound.get("dim"), empty_means_all=False)  # default: all
    (dtype,) = probe(func, args, kwargs)
    reduce = torch.all if op == "all" else torch.any
    return _reduction(func, args, kwargs, dims, bound.get("keepdim", False),
                      "min" if op == "all" else "max",
                      lambda block, _: reduce(block, dims, keepdim=True),
                      dtype=dtype, stays_partial=False)
