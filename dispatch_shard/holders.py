"""Ops on N-D layouts: how an op written for 1-D layouts serves blocks with several holders.

An N-D layout (:class:`~dispatch_shard.specs.MeshShardingSpec`) has boxes held by
several ranks: copies along replicated mesh dims, terms of a pending reduction along
partial mesh dims (NOTE [N-D layouts: blocks with several holders]). The op families
are written for the 1-D layouts, where a sharded box has one holder and a replicated
or partial value spans the whole group.

NOTE [serving N-D operands]
The dispatch loop hands such a call to :func:`serve`:

* An implementation registered with ``handles_mesh=True`` gets the N-D operands as they
  are (the pointwise and foreach families: when operands share one layout, the work is
  block by block whatever the holders), pending ones reduced first.
* Any other implementation gets each N-D operand *flattened* (:func:`flattened_layout`):
  the holders of a box split it among themselves along one dim, each keeping a view of
  its piece. That is a 1-D sharded layout over the same ranks, reached with no
  communication; a pending reduction is summed into it on the way (one all-to-all in
  which each rank receives only its piece's terms, as a reduce-scatter does). The
  implementation then runs as on any 1-D layout, so every op serves N-D layouts with the
  guarantees it has on 1-D ones, and its results come back in 1-D layouts.
* An argument the op writes (in-place ops, ``out=``) is written in its flattened form,
  then moved back into the original N-D blocks (an all-to-all that gives every holder
  of a box the written pieces), so copies stay equal. Into a pending N-D value, the
  ops linear in it run term by term (``+=`` a value of its layout, ``*=`` a number,
  ``neg_``, ``copy_`` of a value of its layout and dtype); any other write raises, as
  writing into a Partial does.
* Out of place, the same linear ops of a pending sum run term by term too: the result
  stays pending (no collective), as a 1-D Partial's does. ``Σa += b`` with ``b`` in
  another layout (a gradient accumulated into a pending leaf's) adds ``b``'s value to
  one term of each box: ``b`` moves (is reduced) once.

Per rank: flattening keeps one view per operand; the write-back and a pending operand's
sum are one all-to-all each on the layout's group.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from typing import Any

import torch

from dispatch_shard.layout import _mesh_layouts_made, flattened_layout
from dispatch_shard.registry import (
    MESH_AWARE,
    MESH_PENDING_AWARE,
    _op_name,
    _written_arguments,
    lookup,
)
from dispatch_shard.sharded_tensor import ShardedTensor

__all__ = ["flatten", "flattened_layout", "has_mesh", "serve"]

# How many calls of each op were served flattened (for tests and debugging).
flattened: collections.Counter[str] = collections.Counter()

Dispatch = Callable[[Any, Any, tuple[Any, ...], dict[str, Any]], Any]


def _is_mesh(value: Any) -> bool:
    return isinstance(value, ShardedTensor) and value._layout.is_mesh


def has_mesh(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> bool:
    """Whether an argument (also inside a list) is a ShardedTensor of an N-D layout."""
    if not _mesh_layouts_made[0]:
        return False
    for value in (*args, *(kwargs or {}).values()):
        if _is_mesh(value):
            return True
        if isinstance(value, list | tuple) and any(_is_mesh(v) for v in value):
            return True
    return False


def flatten(tensor: ShardedTensor) -> ShardedTensor:
    """``tensor`` in a 1-D layout: its flattened layout (views of its blocks, no
    communication), or for a pending N-D value the sum moved into one."""
    layout = tensor._layout
    if not layout.is_mesh:
        return tensor
    value = layout.value_layout()
    target = flattened_layout(value) if value.is_mesh else value
    if layout.pending:
        return tensor._like(tensor._moved_to(target), target)
    rank = tensor._rank
    views: dict[int, torch.Tensor] = {}  # target piece -> the view of the block holding it
    for index, block in zip(layout.local_indices(rank), tensor._local_tensors, strict=True):
        origin, extent = layout.shards[index].shard_offsets, layout.shards[index].shard_sizes
        for piece in target.local_indices(rank):
            shard = target.shards[piece]
            if piece in views or not all(
                    b <= o and o + n <= b + e for o, n, b, e in
                    zip(shard.shard_offsets, shard.shard_sizes, origin, extent, strict=True)):
                continue  # (several blocks per rank: a piece of another of them)
            views[piece] = block[tuple(
                slice(o - b, o - b + n) for o, n, b in
                zip(shard.shard_offsets, shard.shard_sizes, origin, strict=True))]
    return tensor._like([views[piece] for piece in target.local_indices(rank)], target)


def _map(value: Any, one: Callable[[ShardedTensor], Any]) -> Any:
    if _is_mesh(value):
        return one(value)
    if isinstance(value, list | tuple) and any(_is_mesh(v) for v in value):
        return type(value)(one(v) if _is_mesh(v) else v for v in value)
    return value


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The arguments ``func`` writes (in place, ``out=``)."""
    names = _written_arguments(func)
    if not names:
        return []
    schema = func._schema.arguments
    found = [args[i] for i, a in enumerate(schema[:len(args)]) if a.name in names]
    return found + [kwargs[n] for n in names if n in kwargs]


def _refuse_pending_writes(func: Any, written: list[Any]) -> None:
    for value in written:
        for item in value if isinstance(value, list | tuple) else [value]:
            if _is_mesh(item) and item._layout.pending:
                raise NotImplementedError(
                    f"{_op_name(func)} would write into a ShardedTensor with a reduction "
                    "pending over a mesh dim (its blocks hold terms, not the value); "
                    "redistribute it to Replicate on that dim first")


def flattened_call(func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   call: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]) -> Any:
    """``call(types, args, kwargs)`` with every N-D operand flattened, and the written
    ones moved back into their N-D blocks (NOTE [serving N-D operands])."""
    written = _written(func, args, kwargs)
    _refuse_pending_writes(func, written)
    originals: dict[int, ShardedTensor] = {}

    def one(value: ShardedTensor) -> ShardedTensor:
        flat = flatten(value)
        originals[id(flat)] = value
        return flat

    flattened[_op_name(func)] += 1
    flat_args = tuple(_map(a, one) for a in args)
    flat_kwargs = {k: _map(v, one) for k, v in kwargs.items()}
    result = call(types, flat_args, flat_kwargs)
    restored: dict[int, ShardedTensor] = {}
    for value in _written(func, flat_args, flat_kwargs):
        for item in value if isinstance(value, list | tuple) else [value]:
            original = originals.get(id(item))
            if original is None:
                continue
            with torch.no_grad():
                moved = item._moved_to(original._layout)
                for block, new in zip(original._local_tensors, moved, strict=True):
                    block.copy_(new)
            restored[id(item)] = original

    def back(value: Any) -> Any:
        if isinstance(value, ShardedTensor) and id(value) in restored:
            return restored[id(value)]
        if isinstance(value, list | tuple):
            return type(value)(back(v) for v in value)
        return value

    return back(result)


_aten = torch.ops.aten
# Ops linear in a pending sum (or mean) run term by term and keep it pending, with no
# collective: ``Σa + Σb`` with the same layout, ``Σa * r`` and ``Σa / r`` for a number
# ``r``, ``-Σa``; in place too (``Σa += Σb``, ``Σa *= r``, ``neg_``), and ``Σa := Σb``
# (``copy_`` with the same layout and dtype, which also serves max/min terms).
_LINEAR = {_aten.add_.Tensor: "same", _aten.sub_.Tensor: "same",
           _aten.mul_.Scalar: "number", _aten.div_.Scalar: "number",
           _aten.mul_.Tensor: "number", _aten.div_.Tensor: "number",
           _aten.neg_.default: "alone", _aten.copy_.default: "copy",
           _aten.add.Tensor: "same", _aten.sub.Tensor: "same",
           _aten.mul.Scalar: "number", _aten.div.Scalar: "number",
           _aten.mul.Tensor: "number", _aten.div.Tensor: "number",
           _aten.neg.default: "alone"}


def _term_by_term(kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``args[0]`` (a pending N-D value) goes term by term through an op of this
    ``_LINEAR`` kind."""
    if kind != "copy" and (args[0]._layout.reduce_op not in ("sum", "avg") or any(
            k != "alpha" or not isinstance(v, int | float) for k, v in kwargs.items())):
        return False  # max(a) + max(b) is not max(a + b)
    if kind == "alone":
        return len(args) == 1
    other = args[1] if len(args) == 2 else None
    if kind in ("same", "copy"):
        return (isinstance(other, ShardedTensor) and other._layout is args[0]._layout
                and (kind == "same" or other.dtype == args[0].dtype))
    return isinstance(other, int | float) and not isinstance(other, bool)


def _adds_a_value(func: Any, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``Σa += b`` (or ``-=``) with ``b`` of ``Σa``'s shape in another layout (gradient
    accumulation into a pending leaf's gradient): ``b``'s value, laid out as ``Σa``'s
    value, is added to one term of each box (to every term of a mean)."""
    if kind != "same" or not func._schema.is_mutable or len(args) != 2:
        return False
    destination, other = args
    return (destination._layout.reduce_op in ("sum", "avg")
            and isinstance(other, torch.Tensor) and other.shape == destination.shape
            and all(k == "alpha" and isinstance(v, int | float) for k, v in kwargs.items()))


def _add_a_value(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    destination, other = args
    layout = destination._layout
    value = layout.value_layout()
    rank = destination._rank
    if isinstance(other, ShardedTensor):
        if other._layout.is_partial:
            other = other._reduced()
        addends = list(other._local_tensors) if other._layout is value else \
            other._moved_to(value)
    else:
        addends = [other[value.shard_box(i)] for i in value.local_indices(rank)]
    classes = layout.summand_classes()
    for index, block, addend in zip(layout.local_indices(rank), destination._local_tensors,
                                    addends, strict=True):
        if layout.reduce_op == "avg" or classes[index] == 0:
            func(block, addend, **kwargs)
        else:
            torch.autograd.graph.increment_version(block)  # (moved on every holder alike)
    with contextlib.suppress(AttributeError):  # its cached reduction is stale now
        del destination._reduced_cache
    return destination


def _run_term_by_term(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    first = args[0]
    others = [a._local_tensors if isinstance(a, ShardedTensor) else None for a in args]
    results = [func(*[block if i == 0 else a if o is None else o[b]
                      for i, (a, o) in enumerate(zip(args, others, strict=True))], **kwargs)
               for b, block in enumerate(first._local_tensors)]
    if func._schema.is_mutable:
        with contextlib.suppress(AttributeError):  # its cached reduction is stale now
            del first._reduced_cache
        return first
    dtype = results[0].dtype if results else first.dtype
    return first._like(results, first._layout, dtype)


def by_mesh_rule(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 rule: Any = None) -> Any:
    """The call served by ``rule`` or ``func``'s N-D rule or handler, mesh dim by mesh dim
    (dispatch_shard.mesh_rules); None where there is none or it cannot serve."""
    from dispatch_shard import mesh_rules
    from dispatch_shard.rules import ShardingRule, result_letters, result_metas
    from dispatch_shard.rules import _letters as rule_letters

    if rule == "pointwise":
        rule = mesh_rules.POINTWISE
    else:
        handler = mesh_rules.current(mesh_rules.MESH_HANDLERS, func)
        if handler is not None:
            return handler(args, kwargs)
    rule = rule if rule is not None else mesh_rules.current(mesh_rules.MESH_RULES, func)
    if rule is None:
        return None
    if not isinstance(rule, ShardingRule):
        rule = rule(args, kwargs)
        if rule is None:
            return None
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    try:
        letters = rule_letters(rule, args, positions, func)
        metas = result_metas(func, args, kwargs, positions, letters,
                             result_letters(rule, letters))
    except (RuntimeError, ValueError):
        return None  # (served flattened, which raises dense's errors)
    return mesh_rules.run(func, rule, args, kwargs, metas)


def serve(func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
          dispatch: Dispatch) -> Any:
    """A call with N-D operands (NOTE [serving N-D operands]); ``dispatch`` runs the
    registered implementation as the dispatch loop does."""
    if args and _is_mesh(args[0]) and args[0]._layout.pending:  # (no op hash otherwise)
        kind = _LINEAR.get(func)
        if kind is not None and _term_by_term(kind, args, kwargs):
            return _run_term_by_term(func, args, kwargs)
        if kind is not None and _adds_a_value(func, kind, args, kwargs):
            return _add_a_value(func, args, kwargs)
    served = by_mesh_rule(func, args, kwargs)
    if served is not None:
        return served
    impl = lookup(func)
    if impl in MESH_PENDING_AWARE:
        return dispatch(func, types, args, kwargs)
    if impl in MESH_AWARE:
        _refuse_pending_writes(func, _written(func, args, kwargs))

        def reduced(value: ShardedTensor) -> ShardedTensor:
            return value._reduced() if value._layout.pending else value

        args = tuple(_map(a, reduced) for a in args)
        kwargs = {k: _map(v, reduced) for k, v in kwargs.items()}
        return dispatch(func, types, args, kwargs)
    return flattened_call(func, types, args, kwargs,
                          lambda t, a, k: dispatch(func, t, a, k))
