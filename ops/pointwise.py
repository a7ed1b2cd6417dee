"""Pointwise ops: every aten overload tagged ``torch.Tag.pointwise``, and the few
elementwise ones torch leaves untagged (``hardshrink_backward``, ``softshrink_backward``).

Per rank: ``out[block] = op(x[block], y[block], ...)`` for each block of the
result's layout. Collectives: none when the operands share a layout or are
plain tensors / scalars; otherwise operands are first moved to the result's
layout (one all-to-all each), or all-gathered when they broadcast. Operands of
one N-D layout (on a device mesh) are served block by block too; other calls
with N-D operands are flattened (NOTE [serving N-D operands] in
dispatch_shard.holders).

NOTE [the result's layout]
The result takes the layout of an operand whose shape is the broadcast shape:
the destination for in-place and ``out=`` forms, else the first sharded such
operand, else the first replicated one. Partial operands are reduced first
(a pointwise op of summands is not the op of the sum), except in the linear ops
of NOTE [linear ops of partial values]. An operand that broadcasts (smaller shape),
and every plain tensor (treated as replicated), is sliced per block where it
is not broadcast. When no ShardedTensor has the broadcast shape, the result is
computed replicated.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from dispatch_shard import grad_reduction
from dispatch_shard.holders import by_mesh_rule, flattened_call, has_mesh
from dispatch_shard.layout import Layout
from dispatch_shard.ops._common import replicated_value, whole
from dispatch_shard.registry import LATE_FAMILIES, _binding, _group_free, custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor, _first_group
from dispatch_shard.specs import Replicate

__all__ = ["pointwise_overloads"]

aten = torch.ops.aten


# Tagged pointwise, but served by another family (tensor_basics).
_OWNED_ELSEWHERE = frozenset({aten.clone.default})
# Elementwise (each output element from the same element of every operand) but not tagged
# pointwise in torch: the backward formulas of tagged activations.
_UNTAGGED = (aten.hardshrink_backward.default, aten.softshrink_backward.default)


def pointwise_overloads() -> list[torch._ops.OpOverload]:
    """Every aten overload tagged pointwise that returns tensors (in-place and out= forms
    included), except the few that another op family serves, and ``_UNTAGGED``."""
    found = []
    packets = sorted({
        name.split("::", 1)[1].split(".", 1)[0]
        for name in torch._C._dispatch_get_all_op_names() if name.startswith("aten::")
    })
    for name in packets:
        packet = getattr(aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if (torch.Tag.pointwise in op.tags and op not in _OWNED_ELSEWHERE
                    and all(isinstance(r.type, torch._C.TensorType)
                            for r in op._schema.returns)):
                found.append(op)
    return found + [op for op in _UNTAGGED if op not in found]


def _block_slice(operand: torch.Tensor, box: tuple[slice, ...], ndim: int) -> torch.Tensor:
    """The part of a (broadcasting) dense ``operand`` that meets the result block ``box``."""
    lead = ndim - operand.dim()
    index = tuple(
        slice(None) if operand.shape[i] == 1 else box[lead + i] for i in range(operand.dim())
    )
    return operand[index]


def _stand_in(value: Any) -> Any:
    """An empty tensor of ``value``'s dtype and dims, to learn a result's dtype without data."""
    if isinstance(value, torch.Tensor):
        return torch.empty((0,) * value.dim(), dtype=value.dtype)
    return value


def _result_dtype(func: torch._ops.OpOverload, args: list[Any], kwargs: dict[str, Any]) -> Any:
    result = func(*[_stand_in(a) for a in args], **{k: _stand_in(v) for k, v in kwargs.items()})
    if isinstance(result, tuple | list):
        return tuple(r.dtype for r in result)
    return result.dtype


class _Schema:
    __slots__ = ("inplace", "multi", "out_names")

    def __init__(self, func: torch._ops.OpOverload) -> None:
        self.inplace = torch.Tag.inplace in func.tags
        self.out_names = tuple(a.name for a in func._schema.arguments if a.is_out)
        # Several outputs (``frexp``). Read here once: ``func._schema`` builds a schema
        # object per call, and hashing an OpOverload runs Python code.
        self.multi = len(func._schema.returns) > 1


def _pick_base(candidates: list[ShardedTensor]) -> ShardedTensor | None:
    for wanted in ("is_sharded", "is_replicate"):
        for tensor in candidates:
            if getattr(tensor._layout, wanted):
                return tensor
    return None


def _pointwise(func: torch._ops.OpOverload, schema: _Schema, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    names = [k for k, v in kwargs.items()
             if isinstance(v, torch.Tensor) and k not in schema.out_names]
    # Reduce each Partial operand once, here, not again per use (the destination of an
    # in-place op stays: into a Partial is refused below).
    args = tuple(_reduced(a) if i in positions and not (schema.inplace and i == 0) else a
                 for i, a in enumerate(args))
    kwargs = {k: _reduced(v) if k in names else v for k, v in kwargs.items()}
    operands = [args[i] for i in positions] + [kwargs[k] for k in names]
    shape = _broadcast_shapes(*(t.shape for t in operands))
    if schema.inplace:
        destination = args[0]
    elif schema.out_names:
        destination = kwargs[schema.out_names[0]]
    else:
        destination = None

    if destination is not None and not isinstance(destination, ShardedTensor):
        # A plain destination is a replicated value: compute with whole operands.
        return func(*[whole(a) for a in args], **{k: whole(v) for k, v in kwargs.items()})

    if destination is not None:
        if destination.shape != shape:
            raise RuntimeError(
                f"{func}: the result of size {tuple(shape)} does not fit the destination "
                f"of size {tuple(destination.shape)}"
            )
        base = destination._reduced() if destination._layout.is_partial else destination
        if base is not destination:
            raise NotImplementedError(f"{func} into a Partial ShardedTensor is not supported")
    else:
        candidates = [t._reduced() for t in operands
                      if isinstance(t, ShardedTensor) and t.shape == shape]
        base = _pick_base(candidates)  # type: ignore[assignment]

    if base is None:
        # No ShardedTensor has the broadcast shape: compute the replicated result.
        anchor = next(t for t in operands if isinstance(t, ShardedTensor))
        layout = anchor._layout.with_spec(Replicate())
        layout = layout if layout.size == shape else _replicated(anchor, shape)
        blocks = [((slice(None),) * len(shape))] if layout.local_indices(anchor._rank) else []
        return _run_blocks(func, schema, args, kwargs, anchor, layout, blocks, positions,
                           names, shape, destination)
    layout = base._layout
    boxes = [layout.shard_box(i) for i in layout.local_indices(base._rank)]
    return _run_blocks(func, schema, args, kwargs, base, layout, boxes, positions, names,
                       shape, destination)


def _reduced(value: Any) -> Any:
    return value._reduced() if isinstance(value, ShardedTensor) else value


def _replicated(anchor: ShardedTensor, shape: torch.Size) -> Layout:
    from dispatch_shard.layout import layout_of

    return layout_of(Replicate(), shape, anchor._layout.group_ranks,
                     anchor._layout.device or str(anchor.device))


def _run_blocks(
    func: torch._ops.OpOverload,
    schema: _Schema,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    base: ShardedTensor,
    layout: Layout,
    boxes: list[tuple[slice, ...]],
    positions: list[int],
    names: list[str],
    shape: torch.Size,
    destination: ShardedTensor | None,
) -> Any:
    ndim = len(shape)

    def per_block(value: Any) -> list[Any] | None:
        """The operand's piece for each block, or None to pass it through unchanged."""
        if isinstance(value, ShardedTensor):
            if value._layout is layout:
                return list(value._local_tensors)
            if value.shape == shape and not layout.is_replicate:
                return list(value._redistributed(layout.spec)._local_tensors)
            value = whole(value)
        if value.dim() == 0:
            return [value] * len(boxes)  # (a 0-dim ShardedTensor, too, is now whole)
        return [_block_slice(value, box, ndim) for box in boxes]

    arg_pieces = {i: per_block(args[i]) for i in positions}
    kwarg_pieces = {k: per_block(kwargs[k]) for k in names}
    if destination is not None:
        outs = [kwargs[n] for n in schema.out_names] if schema.out_names else [destination]
        out_pieces = {n: list(kwargs[n]._local_tensors) for n in schema.out_names}
    results = []
    for b in range(len(boxes)):
        block_args = [
            arg_pieces[i][b] if arg_pieces.get(i) is not None else a  # type: ignore[index]
            for i, a in enumerate(args)
        ]
        block_kwargs = {
            k: (kwarg_pieces[k][b] if kwarg_pieces.get(k) is not None  # type: ignore[index]
                else out_pieces[k][b] if destination is not None and k in schema.out_names
                else v)
            for k, v in kwargs.items()
        }
        results.append(func(*block_args, **block_kwargs))
    if destination is not None:
        return tuple(outs) if len(outs) > 1 else outs[0]
    if results:
        first = results[0]
        dtypes = tuple(r.dtype for r in first) if isinstance(first, tuple) else first.dtype
    else:
        dtypes = _result_dtype(func, list(args), dict(kwargs))
    if isinstance(dtypes, tuple):
        return tuple(
            base._like([r[k] for r in results], layout, dtype) for k, dtype in enumerate(dtypes)
        )
    return base._like(results, layout, dtypes)


def _wrap_blocks(func: torch._ops.OpOverload, schema: _Schema, first: ShardedTensor,
                 args: tuple[Any, ...], blocks: list[Any],
                 kwargs: dict[str, Any] | None = None) -> Any:
    """``first``'s layout around per-block results: one ShardedTensor, or a tuple of them for
    an op with several outputs (``frexp``: mantissa and exponent)."""
    if schema.multi:
        dtypes = (tuple(r.dtype for r in blocks[0]) if blocks
                  else _result_dtype(func, list(args), kwargs or {}))
        return tuple(first._like([b[k] for b in blocks], dtype=dtype)
                     for k, dtype in enumerate(dtypes))
    # (A rank without blocks learns the dtype from stand-ins, with the same kwargs: a
    # 0-dim ShardedTensor has its one block on one rank.)
    dtype = blocks[0].dtype if blocks else _result_dtype(func, list(args), kwargs or {})
    return first._like(blocks, dtype=dtype)


def _same_layout(func: torch._ops.OpOverload, call: Any, schema: _Schema,
                 first: ShardedTensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The result block by block (``call``: ``func``'s binding) when every tensor operand
    has ``first``'s layout; else None."""
    layout = first._layout
    columns: list[Any] = []
    for a in args:
        if type(a) is ShardedTensor:
            if a._layout is not layout:
                return None
            columns.append(a._local_tensors)
        elif isinstance(a, torch.Tensor | list | tuple):
            return None
        else:
            columns.append(None)
    for v in kwargs.values():
        if isinstance(v, torch.Tensor | list | tuple):
            return None
    blocks = [call(*[a if c is None else c[b] for a, c in zip(args, columns, strict=True)],
                   **kwargs)
              for b in range(len(first._local_tensors))]
    if schema.inplace:
        if not blocks:  # dense's errors (a float into an int tensor) on this rank too
            func(*[_stand_in(a) for a in args], **kwargs)
        return first
    return _wrap_blocks(func, schema, first, args, blocks, kwargs)


# NOTE [linear ops of partial values]
# A sum of summands goes through linear ops: ``Σa + Σb = Σ(a + b)`` (same layout, so
# the same group), ``(Σa) * r = Σ(a * r)`` and ``(Σa) / r`` for a replicated ``r`` (a
# Python number, a plain tensor, a replicated ShardedTensor) that does not broadcast
# the partial value, ``-Σa = Σ(-a)`` and ``conj(Σa) = Σconj(a)``. These keep
# ``Partial("sum"|"avg")``: no collective. Autograd meets them where gradients
# accumulate (``dq + dk`` into the input of column-parallel Q/K/V projections), and one
# all-reduce then serves the sum.
_LINEAR = {
    aten.add.Tensor: "sum", aten.sub.Tensor: "sum",
    aten.mul.Tensor: "scale", aten.div.Tensor: "scale",
    aten.neg.default: "negate", aten.conj_physical.default: "negate",
}


# NOTE [linear in-place ops into partial values]
# The in-place forms write into the summands: ``Σa += Σb`` summand by summand (same
# layout), ``Σa *= r`` and ``Σa /= r`` on every summand, ``Σa += r`` (a replicated
# ``r``) on one summand, the group's first rank's (every summand for ``Partial("avg")``,
# whose value is the mean). The views of the partial alias the summands, so they follow.
# Its cached reduction is keyed by the summand's version counter (NOTE [a Partial is
# reduced at most once] in dispatch_shard/sharded_tensor.py), which an in-place kernel
# below autograd does not move: every rank moves it, those whose summand the op leaves
# alone too, so all drop the cache together and a later reduction is issued on all.
_LINEAR_INPLACE = {
    aten.add_.Tensor: "sum", aten.sub_.Tensor: "sum",
    aten.mul_.Tensor: "scale", aten.div_.Tensor: "scale",
    aten.neg_.default: "negate",
}


def _linear_into_partial(call: Any, kind: str, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> Any:
    """NOTE [linear in-place ops into partial values]; None where it does not apply."""
    destination = args[0]
    if not _summable(destination) or any(
            not isinstance(v, int | float | bool) for v in kwargs.values()):
        return None
    layout = destination._layout
    reduce_op = layout.spec.reduce_op
    summands = destination._local_tensors
    if kind == "negate":
        if len(args) != 1:
            return None
        for summand in summands:
            call(summand)
        return _written(destination)
    if len(args) != 2:
        return None
    other = args[1]
    if kind == "sum" and type(other) is ShardedTensor and other._layout is layout:
        for summand, addend in zip(summands, other._local_tensors, strict=True):
            call(summand, addend, **kwargs)
        return _written(destination)
    if kind == "sum" and type(other) is ShardedTensor and other.shape == destination.shape \
            and not other._layout.is_mesh:
        # Another layout (a gradient accumulated into a Partial leaf's): its value, once.
        other = other._reduced() if other._layout.is_partial else \
            other._redistributed(Replicate())
    value = _factor(other, destination)
    if value is None:
        return None
    if kind == "scale" or reduce_op == "avg" or destination._rank == layout.group_ranks[0]:
        for summand in summands:
            call(summand, value, **kwargs)
    else:
        stand_in = value.new_empty((0,)) if isinstance(value, torch.Tensor) else value
        for summand in summands:  # dense's dtype errors here too
            call(summand.new_empty((0,)), stand_in, **kwargs)
    return _written(destination)


def _written(destination: ShardedTensor) -> ShardedTensor:
    """``destination`` after a write into its summands, with their version counters moved
    on every rank (below autograd, an in-place kernel does not move them)."""
    for summand in destination._local_tensors:
        torch.autograd.graph.increment_version(summand)
    return destination


def _summable(value: Any) -> bool:
    """Whether ``value`` is a ``Partial("sum"|"avg")`` ShardedTensor (linear ops keep it)."""
    return (type(value) is ShardedTensor and value._layout.is_partial
            and value._layout.spec.reduce_op in ("sum", "avg"))  # type: ignore[attr-defined]


def _factor(value: Any, partial: ShardedTensor) -> Any:
    """``value`` as a plain value (a number, a plain tensor, a replicated ShardedTensor)
    that does not broadcast ``partial``; else None."""
    if type(value) is ShardedTensor:
        value = replicated_value(value)
    elif not isinstance(value, int | float | bool) and type(value) is not torch.Tensor:
        return None
    if isinstance(value, torch.Tensor) and _broadcast_shapes(
            value.shape, partial.shape) != partial.shape:
        return None
    return value


def _linear_on_partial(func: torch._ops.OpOverload, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
    """NOTE [linear ops of partial values]; None where it does not apply."""
    kind = _LINEAR[func]
    partial = args[0]
    if not _summable(partial):
        if kind != "scale" or func is aten.div.Tensor or len(args) != 2:
            return None
        partial, args = args[1], (args[1], args[0])  # r * Σa: the same as (Σa) * r
        if not _summable(partial):
            return None
    layout = partial._layout
    if kind == "negate":
        if kwargs or len(args) != 1:
            return None
        blocks = [func(t) for t in partial._local_tensors]
    elif kind == "sum":
        other = args[1]
        if type(other) is not ShardedTensor or other._layout is not layout or len(args) != 2 \
                or any(not isinstance(v, int | float | bool) for v in kwargs.values()):
            return None
        blocks = [func(a, b, **kwargs) for a, b in
                  zip(partial._local_tensors, other._local_tensors, strict=True)]
    else:
        factor = _factor(args[1], partial) if len(args) == 2 and not kwargs else None
        if factor is None:
            return None
        blocks = [func(t, factor) for t in partial._local_tensors]
    if blocks:
        dtype = blocks[0].dtype
    else:
        dtype = _result_dtype(func, list(args), dict(kwargs))
    return partial._like(blocks, layout, dtype)


@functools.lru_cache(maxsize=4096)
def _broadcast_shapes(*shapes: torch.Size) -> torch.Size:
    shape: torch.Size = torch.broadcast_shapes(*shapes)
    return shape


def _register(func: torch._ops.OpOverload) -> None:
    schema = _Schema(func)
    linear = func in _LINEAR  # decided once: hashing an OpOverload per call runs Python
    linear_inplace = _LINEAR_INPLACE.get(func)
    adds = func is aten.add_.Tensor

    call = _binding(func)

    @_group_free
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             process_group: Any) -> Any:
        # Fast path: one operand, or two with one layout or a Python scalar; nothing
        # partial, no keyword arguments, not in place, no out=.
        first = args[0]
        if schema.inplace and not kwargs and len(args) == 2 and type(first) is ShardedTensor:
            # In place with a same-layout operand or a Python scalar: block by block.
            second = args[1]
            if not first._layout.is_partial and (
                    isinstance(second, int | float | bool)
                    or (type(second) is ShardedTensor and second._layout is first._layout)):
                if isinstance(second, ShardedTensor):
                    for a, b in zip(first._local_tensors, second._local_tensors, strict=True):
                        call(a, b)
                else:
                    for a in first._local_tensors:
                        call(a, second)
                return first
        if (type(first) is ShardedTensor and not kwargs and not schema.inplace
                and not first._layout.is_partial):
            if len(args) == 1:
                return _wrap_blocks(func, schema, first, args,
                                    [call(t) for t in first._local_tensors])
            if len(args) == 2:
                second = args[1]
                if type(second) is ShardedTensor and second._layout is first._layout:
                    blocks = [call(a, b) for a, b in
                              zip(first._local_tensors, second._local_tensors, strict=True)]
                    return _wrap_blocks(func, schema, first, args, blocks)
                if isinstance(second, int | float | bool):
                    return _wrap_blocks(func, schema, first, args,
                                        [call(a, second) for a in first._local_tensors])
        _first_group(args, func)  # NOTE [implementations that find their own group]
        if linear_inplace is not None:
            served = _linear_into_partial(call, linear_inplace, args, kwargs)
            if served is None and adds and len(args) == 2:
                # AccumulateGrad's ``grad += new`` of a pending gradient into a kept one
                served = grad_reduction.fold_into_kept_grad(first, args[1], kwargs)
            if served is not None:
                return served
        if linear:
            served = _linear_on_partial(func, args, kwargs)
            if served is not None:
                return served
        if (type(first) is ShardedTensor and not schema.out_names
                and not first._layout.is_partial):
            # Every tensor operand has ``first``'s layout (so its shape: no broadcasting),
            # keyword arguments are scalars: ``lerp_``, ``addcmul_(.., value=)`` of an
            # optimizer step. Block by block.
            served = _same_layout(func, call, schema, first, args, kwargs)
            if served is not None:
                return served
        if has_mesh(args, kwargs):  # NOTE [serving N-D operands]: not one layout
            if not schema.inplace and not schema.out_names:  # per mesh dim, broadcasting
                served = by_mesh_rule(func, args, kwargs, "pointwise")
                if served is not None:
                    return served
            return flattened_call(func, types, args, kwargs,
                                  lambda t, a, k: impl(t, a, k, process_group))
        return _pointwise(func, schema, args, kwargs)

    impl.__name__ = impl.__qualname__ = f"pointwise_{func.name().replace('::', '_')}"
    impl.__doc__ = f"``{func}`` per block of the result's layout; see the module docstring."
    custom_sharded_op_impl(func, handles_partial=True, handles_mesh=True)(impl)


for _func in pointwise_overloads():
    _register(_func)


def _register_late(func: torch._ops.OpOverload) -> bool:
    """Serve a pointwise-tagged overload of a namespace loaded after this module
    (``prims.fma``, which torch.compile's optimizer steps call)."""
    if (torch.Tag.pointwise in func.tags and func not in _OWNED_ELSEWHERE
            and all(isinstance(r.type, torch._C.TensorType) for r in func._schema.returns)):
        _register(func)
        return True
    return False


LATE_FAMILIES.append(_register_late)
