"""Helpers shared by the op families: operands and results.

- From the public op-author module :mod:`dispatch_shard.authoring`, which the op
  families use as users do: :func:`whole`, :func:`bind_arguments`, :func:`meta_call`,
  :func:`meta_results`.
- Operands: :func:`dense_value` (the whole value of a ShardedTensor
  as a plain tensor: one all-gather, or all-reduce for a Partial),
  :func:`replicated_value` (a replicated one as a plain tensor, no collective),
  :func:`pieces_of` (an operand cut into a layout's local blocks),
  :func:`first_sharded`,
  :func:`in_group`, :func:`is_block_sharded`.
- Results: :func:`replicated_result`, :func:`partial_result`, :func:`outside_result`
  (what a rank outside the group returns), :func:`empty_results` (an empty block's
  results, from a meta run), :func:`map_blocks`,
  :func:`view_blocks` (each block through a view, into the view's layout).
- :func:`replicated_fallback`: an op on the whole values (NOTE [replicated fallback]),
  run under :func:`conjugate_views_resolved`.
- :func:`blockwise`: an op run on each block, for ops that mix values only after their
  leading dims (convolution, pooling, resampling, per-row losses); no collective.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from dispatch_shard import collectives
from dispatch_shard.authoring import bind_arguments, meta_call, meta_results, whole
from dispatch_shard.layout import Layout, layout_of
from dispatch_shard.ops.layouts import leading_boxes, like_leading, split_dims
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import Partial, Replicate

__all__ = [
    "bind_arguments", "blockwise", "by_decomposition", "conjugate_views_resolved",
    "dense_value", "empty_results",
    "first_sharded", "in_group", "is_block_sharded", "map_blocks", "meta_call", "meta_results",
    "outside_result",
    "partial_result", "pieces_of", "reduction_identity", "replicated_fallback",
    "replicated_result", "replicated_value", "view_blocks", "whole",
]


_decomposed_impls: dict[Any, Any] = {}


def by_decomposition(func: torch._ops.OpOverload, types: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any], pg: Any) -> Any:
    """``func`` served through torch's decomposition of it, as ops/decomposed.py serves
    the ops that have no implementation of their own: for the cases an implementation
    leaves to it."""
    impl = _decomposed_impls.get(func)
    if impl is None:
        from torch._decomp import decomposition_table

        from dispatch_shard.ops.decomposed import decomposed_impl

        impl = _decomposed_impls[func] = decomposed_impl(func, decomposition_table[func])
    return impl(types, args, kwargs, pg)


def map_blocks(
    tensor: ShardedTensor, fn: Callable[[torch.Tensor], torch.Tensor], dtype: Any = None
) -> ShardedTensor:
    """``fn`` applied to each local block; same layout. ``dtype`` defaults to the result's."""
    blocks = [fn(t) for t in tensor._local_tensors]
    if dtype is None:
        dtype = blocks[0].dtype if blocks else tensor.dtype
    return tensor._like(blocks, dtype=dtype)


def view_blocks(x: ShardedTensor, layout: Layout, view: Callable[..., torch.Tensor]) -> Any:
    """``x`` in ``layout``, a view's layout with one block per block of ``x`` (on the same
    rank): ``view(block, block_metadata_in, block_metadata_out)`` applied to each local
    block; no collective."""
    rank = x._rank
    ins = x._layout.local_indices(rank)
    outs = layout.local_indices(rank)
    blocks = [view(t, x._layout.shards[i], layout.shards[j])
              for t, i, j in zip(x._local_tensors, ins, outs, strict=True)]
    return x._like(blocks, layout)


def first_sharded(args: Sequence[Any], kwargs: dict[str, Any]) -> ShardedTensor:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, ShardedTensor):
            return value
        if isinstance(value, list | tuple):
            for item in value:
                if isinstance(item, ShardedTensor):
                    return item
    raise TypeError("no ShardedTensor among the arguments")


# NOTE [dense kernels see lazy conjugates]
# Inside ``__torch_dispatch__`` torch excludes every dispatch key above Python, the
# Conjugate and Negative keys included, for the plain tensors too. A dense kernel that is
# itself composite (``linalg_pinv`` builds ``A.mH`` and multiplies by it) would then read
# its own lazy conjugate views as their stored values: ``pinv`` of a complex matrix came
# out wrong. The whole-value path therefore runs the dense op with those two keys
# re-enabled (the TLS exclude set, less them); the per-block kernels of the op families
# are leaf kernels and need nothing.

_LAZY_VIEW_KEYS = (torch._C.DispatchKey.Conjugate, torch._C.DispatchKey.Negative)


@contextlib.contextmanager
def conjugate_views_resolved() -> Iterator[None]:
    """Dense ops in this block see lazy conjugate/negative views as torch does outside
    the dispatch (NOTE [dense kernels see lazy conjugates])."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _LAZY_VIEW_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


def replicated_fallback(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``func`` on whole (replicated) operands; tensor results come back replicated.

    See NOTE [replicated fallback].
    """
    anchor = first_sharded(args, kwargs)
    operands = whole(args), {k: whole(v) for k, v in kwargs.items()}
    with conjugate_views_resolved():
        result = func(*operands[0], **operands[1])
        # (a lazy conjugate in a result would be misread by every later op)
        result = pytree.tree_map_only(torch.Tensor,
                                      lambda t: t.resolve_conj().resolve_neg(), result)

    def wrap(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            layout = layout_of(Replicate(), value.shape, anchor._layout.group_ranks,
                               anchor._layout.device or str(anchor.device))
            member = bool(layout.local_indices(anchor._rank))
            return anchor._like([value] if member else [], layout, value.dtype)
        if isinstance(value, list | tuple):
            return type(value)(wrap(v) for v in value)
        return value

    return wrap(result)


def reduction_identity(op: str, dtype: torch.dtype) -> bool | int | float:
    if op == "sum":
        return 0
    if op == "product":
        return 1
    if dtype == torch.bool:
        return op == "min"
    if dtype.is_floating_point:
        return -math.inf if op == "max" else math.inf
    info = torch.iinfo(dtype)
    return info.min if op == "max" else info.max


def in_group(tensor: ShardedTensor) -> bool:
    return collectives.is_member(tensor._process_group, tensor._rank)


def dense_value(value: Any) -> Any:
    """A ShardedTensor's whole value (a partial one reduced); anything else as it is.

    Ranks outside the group get zeros of the right size (they compute nothing with it).
    """
    if isinstance(value, ShardedTensor):
        whole = value._redistributed(Replicate())
        if whole._local_tensors:
            return whole._local_tensors[0]
        return torch.zeros(value.shape, dtype=value.dtype, device=value.device)
    return value


def replicated_value(value: Any) -> Any:
    """A replicated ShardedTensor as a plain tensor (its block; an empty tensor of its size
    on a rank outside the group); None for a ShardedTensor laid out otherwise; anything
    else as it is. No collective."""
    if isinstance(value, ShardedTensor):
        if not value._layout.is_replicate:
            return None
        return value._local_tensors[0] if value._local_tensors else torch.empty(
            value.shape, dtype=value.dtype, device=value.device)
    return value


def is_block_sharded(value: Any) -> bool:
    """Whether ``value`` is a ShardedTensor laid out in blocks (not replicated or partial)."""
    return isinstance(value, ShardedTensor) and value._layout.is_sharded


def pieces_of(value: Any, layout: Layout, rank: int) -> list[torch.Tensor]:
    """``value``'s part for each of this rank's blocks of ``layout`` (``value.shape`` is
    ``layout.size``): its own blocks, moved there (one all-to-all) when sharded otherwise,
    or sliced locally from a replicated or plain value."""
    if isinstance(value, ShardedTensor):
        if value._layout is layout:
            return list(value._local_tensors)
        if value._layout.is_sharded and layout.is_sharded:
            return list(value._redistributed(layout.spec)._local_tensors)
        value = dense_value(value)
    return [value[layout.shard_box(i)] for i in layout.local_indices(rank)]


def empty_results(func: Any, args: Sequence[Any], kwargs: dict[str, Any],
                  device: torch.device) -> tuple[torch.Tensor, ...]:
    """Empty tensors of ``func``'s result sizes and dtypes (:func:`meta_call`): the results
    for an empty block, where CPU kernels differ from dense (or divide by zero)."""
    return tuple(torch.empty(m.shape, dtype=m.dtype, device=device)
                 for m in meta_call(func, args, kwargs))


def _whole_layout(anchor: ShardedTensor, spec: Replicate | Partial, size: Sequence[int]
                  ) -> Layout:
    return layout_of(spec, torch.Size(size), anchor._layout.group_ranks,
                     anchor._layout.device or str(anchor.device))


def replicated_result(anchor: ShardedTensor, value: torch.Tensor | None, size: Sequence[int],
                      dtype: torch.dtype) -> ShardedTensor:
    """A replicated result (``value`` is ignored on ranks outside the group)."""
    layout = _whole_layout(anchor, Replicate(), size)
    blocks = [value] if value is not None and layout.local_indices(anchor._rank) else []
    return anchor._like(blocks, layout, dtype)


def partial_result(anchor: ShardedTensor, summand: torch.Tensor, dtype: torch.dtype,
                   op: str = "sum") -> ShardedTensor:
    """This rank's ``summand`` of a ``Partial(op)`` result; no collective."""
    layout = _whole_layout(anchor, Partial(op), summand.shape)
    return anchor._like([summand] if layout.local_indices(anchor._rank) else [], layout, dtype)


def outside_result(anchor: ShardedTensor, results: list[tuple[torch.Size, torch.dtype]]) -> Any:
    """What a rank outside the group returns: the sizes, no blocks."""
    outs = [replicated_result(anchor, None, size, dtype) for size, dtype in results]
    return tuple(outs) if len(outs) > 1 else outs[0]


# -- ops per block along leading dims (convolution, pooling, resampling, per-row losses) --

def blockwise(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
              split: tuple[int, ...], lead: int, whole: tuple[int, ...],
              outputs: tuple[int | str, ...]) -> Any:
    """``func`` on each block, for an op that mixes values only after its first ``lead``
    dims (one sample of a convolution or pooling, one row of a loss).

    The arguments at ``split`` are ShardedTensors in the same blocks along their first
    ``lead`` dims (on the same ranks) and whole after them; those at ``whole`` are plain
    or replicated (or None) and go to every block as they are. Output ``k`` takes the
    leading blocks of argument ``outputs[k]`` (``x [b_i..., *rest] -> [b_i..., *out]``
    per block), or for ``"sum"`` is this rank's share of a ``Partial("sum")`` (its blocks'
    results summed: a weight's gradient over the batch). Collectives: none. Dense's
    errors, and the outputs' trailing sizes, come from ``func`` on a one-sample stand-in
    (leading dims of size <= 1), on every rank alike. Any other layout (a pending sum, a
    split trailing dim, operands in other blocks, a ``whole`` argument that is sharded):
    :func:`replicated_fallback`.
    """
    operands = [args[i] for i in split]
    first = operands[0]
    if not all(type(t) is ShardedTensor and not t._layout.is_partial for t in operands) \
            or not first._layout.is_sharded or first.dim() <= lead:
        return replicated_fallback(func, args, kwargs)
    boxes = leading_boxes(first._layout, lead)
    if any(split_dims(t._layout) - set(range(lead)) or leading_boxes(t._layout, lead) != boxes
           or t._layout.group_ranks != first._layout.group_ranks for t in operands):
        return replicated_fallback(func, args, kwargs)
    plain = list(args)
    for i in whole:
        if args[i] is not None:
            plain[i] = replicated_value(args[i])
            if plain[i] is None:
                return replicated_fallback(func, args, kwargs)
    # Dense's errors on every rank, and the results' trailing sizes and dtypes: the op on
    # one sample (leading dims of size <= 1).
    sample = list(plain)
    for i in split:
        t = args[i]
        sample[i] = torch.zeros([min(n, 1) if d < lead else n for d, n in enumerate(t.shape)],
                                dtype=t.dtype, device=t.device)
    probe = func(*sample, **kwargs)
    probes = probe if isinstance(probe, tuple | list) else (probe,)
    results: list[Any] = []
    for b in range(len(first._local_tensors)):
        block_args = list(plain)
        for i in split:
            block_args[i] = args[i]._local_tensors[b]
        if first._local_tensors[b].numel() == 0:
            results.append(None)
            continue
        out = func(*block_args, **kwargs)
        results.append(out if isinstance(out, tuple | list) else (out,))
    outs: list[Any] = []
    for k, source in enumerate(outputs):
        p = probes[k]
        if p is None:
            outs.append(None)
            continue
        if source == "sum":
            share = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            for r in results:
                if r is not None and r[k] is not None:
                    share += r[k]
            layout = layout_of(Partial(), p.shape, first._layout.group_ranks,
                               first._layout.device or str(first.device))
            member = bool(layout.local_indices(first._rank))
            outs.append(first._like([share] if member else [], layout, p.dtype))
            continue
        anchor: ShardedTensor = args[source]  # type: ignore[index]
        size = torch.Size([*anchor.shape[:lead], *p.shape[lead:]])
        layout = like_leading(anchor._layout, lead, size)
        blocks = []
        for r, j in zip(results, layout.local_indices(first._rank), strict=True):
            if r is None:
                blocks.append(torch.empty(layout.shards[j].shard_sizes, dtype=p.dtype,
                                          device=p.device))
            else:
                blocks.append(r[k])
        outs.append(anchor._like(blocks, layout, p.dtype))
    return tuple(outs) if isinstance(probe, tuple | list) else outs[0]
