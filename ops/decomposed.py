"""Ops served by torch's own decompositions (``torch._decomp.decomposition_table``).

An op that no other family serves, and that torch can decompose, runs its
decomposition on the ShardedTensor arguments: every op the decomposition
calls re-enters the dispatch loop and is served by its own family, with its
own collectives. Losses, layer norm, dropout and many backward formulas come
this way.

NOTE [why decompositions are safe here]
A decomposition is written for dense tensors. It stays correct on sharded
ones because every primitive it calls is correct on any mix of ShardedTensors
and plain tensors (a plain tensor is a replicated value), and because a
primitive we do not serve raises ``NotImplementedError`` instead of computing
something else. What a decomposition cannot promise is speed: a decomposition
that materializes a whole tensor does so here too.

Three sources, in order of preference:

1. CompositeImplicitAutograd ops (``aten.to.dtype``, ``aten.log_sigmoid``...).
   Above autograd torch decomposes them itself; below it, inside our dispatch,
   they can still arrive, and ``OpOverload.decompose`` runs the same kernel.
2. ``torch._decomp.decomposition_table``: Python decompositions of the rest.
   Some are references built on ``prims.*`` ops, which we refuse (they raise).
3. ``out=`` overloads (``aten.mm.out``...) of served functional ops: the functional op,
   then ``copy_`` into each ``out`` (resized first where its size differs, as dense
   does). An ``out`` may be a ShardedTensor (the result moves to its layout) or a plain
   tensor, a replicated value (it receives the whole result on every rank).

This module is imported last: it only fills in ops no other family registered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._decomp import decomposition_table

from dispatch_shard.layout import layout_of
from dispatch_shard.registry import OVERLOADS, PACKETS, custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import Replicate

__all__ = ["decomposed_overloads"]

_DECOMPOSED: list[torch._ops.OpOverload] = []


def decomposed_overloads() -> list[torch._ops.OpOverload]:
    """The overloads this module registered (those no other family serves)."""
    return list(_DECOMPOSED)


def _as_replicated(out: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Plain tensors a decomposition made (not its plain arguments) as replicated values.

    Such a tensor was computed from plain values only (an empty ``reserve`` buffer, a
    count), so it is the same on every rank: a replicated ShardedTensor, like every
    other output of an op on ShardedTensors.
    """
    inputs = [*args, *kwargs.values()]
    flat = [x for a in inputs for x in (a if isinstance(a, (list, tuple)) else (a,))]
    anchor = next((x for x in flat if isinstance(x, ShardedTensor)), None)
    if anchor is None:
        return out
    plain_inputs = {id(x) for x in flat if isinstance(x, torch.Tensor)}

    def wrap(value: Any) -> Any:
        if (type(value) is torch.Tensor and id(value) not in plain_inputs
                and not value.requires_grad):
            layout = layout_of(Replicate(), value.shape, anchor._layout.group_ranks,
                               anchor._layout.device or str(anchor.device))
            blocks = [value] if layout.local_indices(anchor._rank) else []
            return anchor._like(blocks, layout, value.dtype)
        return value

    if isinstance(out, tuple):
        return tuple(wrap(v) for v in out)
    if isinstance(out, list):
        return [wrap(v) for v in out]
    return wrap(out)


def _decomposed(func: torch._ops.OpOverload, out: Any) -> Any:
    """``out`` of ``func``'s decomposition, which returns ``NotImplemented`` for the cases it
    leaves to the kernel (``adaptive_max_pool2d`` with uneven windows): we have no kernel."""
    if out is NotImplemented:
        raise NotImplementedError(
            f"{func} (this case of its decomposition) not supported for ShardedTensor!")
    return out


def _whole_sums(value: Any) -> Any:
    """A Partial ShardedTensor reduced (cached: once), in lists too; others as they are.

    NOTE [decompositions get reduced inputs]
    A decomposition is many ops. Fed a partial value, its linear steps would keep it
    partial (NOTE [linear ops of partial values] in ops/pointwise.py) and each
    non-linear one would reduce its own intermediate: several all-reduces where
    reducing the input once does (``native_layer_norm_backward`` of a partial
    gradient: one all-reduce of the gradient, not three of its row sums and products).
    """
    if type(value) is ShardedTensor and value._layout.is_partial:
        return value._reduced()
    if isinstance(value, list | tuple) and any(
            type(v) is ShardedTensor and v._layout.is_partial for v in value):
        return type(value)(_whole_sums(v) for v in value)
    return value


# NOTE [replicated operands skip the decomposition]
# When every ShardedTensor operand is replicated (after reducing partial ones) and
# this rank holds its copy, the op's own kernel runs on the local copies: the same
# whole value on every rank, as plain tensors are. The result is replicated. A
# deterministic, functional op only (no random numbers, no in-place or out=, no
# views). ``mse_loss`` of a row-parallel output, or ``layer_norm`` of a replicated
# activation, is then one kernel instead of a dozen dispatched ops.

def _local_copies(values: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The arguments with each replicated ShardedTensor replaced by this rank's copy; None
    when one is not replicated, this rank holds no copy, or a plain argument requires
    grad."""

    def local(value: Any) -> Any:
        if type(value) is ShardedTensor:
            if not value._layout.is_replicate or len(value._local_tensors) != 1:
                raise LookupError
            return value._local_tensors[0]
        if type(value) is torch.Tensor and value.requires_grad:
            raise LookupError  # (the kernel would record it for autograd here)
        if isinstance(value, list | tuple):
            return type(value)(local(v) for v in value)
        return value

    try:
        return tuple(local(a) for a in values), {k: local(v) for k, v in kwargs.items()}
    except LookupError:
        return None


# NOTE [an in-place op on a partial tensor]
# A decomposition runs on whole values: a partial operand is reduced first, into a new
# tensor. For the operand an in-place op writes (``fill_``), the decomposition then
# wrote into that new tensor and the operand kept its old value. So a partial operand
# that is written is reduced in place first (one all-reduce; it becomes the replicated
# tensor it stands for), and the decomposition writes into it.

def _reduced_in_place(value: Any) -> None:
    if type(value) is ShardedTensor and value._layout.is_partial:
        reduced = value._reduced()
        value._local_tensors, value._layout = reduced._local_tensors, reduced._layout


def _register(func: torch._ops.OpOverload, decomposition: Callable[..., Any]) -> None:
    custom_sharded_op_impl(func, handles_partial=True)(decomposed_impl(func, decomposition))
    _DECOMPOSED.append(func)


def decomposed_impl(func: torch._ops.OpOverload, decomposition: Callable[..., Any]
                    ) -> Callable[..., Any]:
    """The implementation of ``func`` by ``decomposition`` (what this module registers for
    ops no family serves; a family's fallback for the cases it does not serve itself)."""
    functional = not func._schema.is_mutable and all(
        r.alias_info is None for r in func._schema.returns)
    written = [i for i, a in enumerate(func._schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]
    if torch.Tag.nondeterministic_seeded in func.tags:
        def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
            args = tuple(_whole_sums(a) for a in args)
            kwargs = {k: _whole_sums(v) for k, v in kwargs.items()}
            return _decomposed(func, decomposition(*args, **kwargs))
    else:
        def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
            for i in written:  # NOTE [an in-place op on a partial tensor]
                if i < len(args):
                    _reduced_in_place(args[i])
            args = tuple(_whole_sums(a) for a in args)
            kwargs = {k: _whole_sums(v) for k, v in kwargs.items()}
            copies = _local_copies(args, kwargs) if functional else None
            if copies is not None:  # NOTE [replicated operands skip the decomposition]
                return _as_replicated(func(*copies[0], **copies[1]), args, kwargs)
            return _as_replicated(_decomposed(func, decomposition(*args, **kwargs)), args,
                                  kwargs)

    impl.__name__ = impl.__qualname__ = f"decomposed_{func.name().replace('::', '_')}"
    impl.__doc__ = (f"``{func}`` through torch's decomposition; the collectives are those of "
                    "the ops it calls.")
    return impl


def _served(func: torch._ops.OpOverload) -> bool:
    return func in OVERLOADS or func.overloadpacket in PACKETS


def _aten_overloads() -> list[torch._ops.OpOverload]:
    """Every registered ``aten`` overload, by name."""
    found = []
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if not name.startswith("aten::"):
            continue
        packet_name, _, overload = name[len("aten::"):].partition(".")
        packet = getattr(torch.ops.aten, packet_name, None)
        func = getattr(packet, overload or "default", None) if packet is not None else None
        if isinstance(func, torch._ops.OpOverload):
            found.append(func)
    return found


_ATEN_OVERLOADS = _aten_overloads()


for _func in _ATEN_OVERLOADS:
    if not _served(_func) and torch._C._dispatch_has_kernel_for_dispatch_key(
            _func.name(), "CompositeImplicitAutograd"):
        _register(_func, _func.decompose)

def _functional_of(func: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The functional overload of an ``out=`` overload (``mm.out`` -> ``mm.default``,
    ``add.out`` -> ``add.Tensor``...): the same arguments less the ``out`` ones."""
    wanted = [(a.name, str(a.type)) for a in func._schema.arguments if not a.is_out]
    packet = func.overloadpacket
    for name in packet.overloads():
        candidate = getattr(packet, name)
        schema = candidate._schema
        if (not any(a.is_out for a in schema.arguments) and not schema.is_mutable
                and [(a.name, str(a.type)) for a in schema.arguments] == wanted):
            return candidate  # type: ignore[no-any-return]
    return None


def out_variant_impl(func: torch._ops.OpOverload, functional: torch._ops.OpOverload
                     ) -> Callable[..., Any]:
    """``func`` (an ``out=`` overload) as ``functional`` followed by ``copy_`` into its
    outs: source 3 of this module."""
    out_names = [a.name for a in func._schema.arguments if a.is_out]

    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        named = dict(kwargs)
        outs = [named.pop(name) for name in out_names]
        result = functional(*args, **named)
        results = result if isinstance(result, tuple | list) else (result,)
        for out, value in zip(outs, results, strict=True):
            if out.shape != value.shape:
                out.resize_(value.shape)
            out.copy_(value)
        return outs[0] if len(outs) == 1 else tuple(outs)

    impl.__name__ = impl.__qualname__ = f"out_{func.name().replace('::', '_')}"
    impl.__doc__ = (f"``{func}``: ``{functional}``, then ``copy_`` into the outs; the "
                    "collectives are those of the two.")
    return impl


# (``out=`` overload, its functional overload) pairs, for source 3
_OUT_VARIANTS = [(func, functional) for func in _ATEN_OVERLOADS
                 if any(a.is_out for a in func._schema.arguments)
                 and (functional := _functional_of(func)) is not None]


def _register_out_variants() -> None:
    for func, functional in _OUT_VARIANTS:
        if not _served(func) and _served(functional):
            custom_sharded_op_impl(func, handles_partial=True)(
                out_variant_impl(func, functional))
            _DECOMPOSED.append(func)


# Source 3 before source 2 where it can: torch's decompositions of ``out=`` overloads are
# references built on ``prims`` ops (``amax.out``), which we refuse; and after it, for the
# functional ops only source 2 serves.
_register_out_variants()
for _op, _decomposition in sorted(decomposition_table.items(), key=lambda kv: str(kv[0])):
    if isinstance(_op, torch._ops.OpOverload) and not _served(_op):
        _register(_op, _decomposition)
_register_out_variants()
