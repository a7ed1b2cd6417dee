"""Optimizer kernels: the ``_foreach_*`` family and the fused Adam/AdamW/SGD/Adagrad kernels.

Per rank: ONE call of the same kernel on the flat list of every operand's
local blocks (tensor ``i`` contributes its ``k_i`` blocks; its scalars and step
tensors are repeated ``k_i`` times). Collectives: none when the lists' tensors
share layouts element by element (parameters, their grads and their optimizer
state always do); an element of another layout is moved first.

Tensors at one index of the lists must live on one group's ranks; tensors at
different indices may live on different groups (one optimizer over 2-D-parallel
parameters), since nothing communicates between indices. The hot path, where every
list's element shares the layout of the first list's element, calls torch's
binding of the kernel once (see ``dispatch_shard.registry._binding``). Elements of
N-D layouts (on a device mesh) are served alike: every holder of a box updates its copy.

``_foreach_norm``: per-block norms, then one all-reduce for the whole list (one group).

NOTE [plain tensors in foreach lists]
``torch.optim`` groups tensors by device and dtype, not by type, so a list may
mix ShardedTensors and plain (replicated) tensors. A plain element is its own
single block; a plain element paired with a sharded ``self`` element is sliced
per block like any replicated operand.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from dispatch_shard import collectives
from dispatch_shard.ops._common import whole
from dispatch_shard.registry import _binding, _group_free, custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor, _check_same_ranks
from dispatch_shard.specs import Replicate

__all__ = ["foreach_overloads"]

aten = torch.ops.aten

_FUSED = ("_fused_adam", "_fused_adamw", "_fused_sgd", "_fused_adagrad")
# Results that are not elementwise: served separately or not at all.
_NOT_ELEMENTWISE = ("_foreach_norm", "_foreach_max")


def foreach_overloads() -> list[torch._ops.OpOverload]:
    """Every ``_foreach_*`` overload with elementwise results and the fused optimizer kernels."""
    found: list[torch._ops.OpOverload] = []
    names = sorted({
        name.split("::", 1)[1].split(".", 1)[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith(("aten::_foreach_", "aten::_fused_"))
    })
    for name in names:
        base = name.rstrip("_")
        if name.startswith("_fused_") and base not in _FUSED:
            continue
        if base in _NOT_ELEMENTWISE:
            continue
        packet = getattr(aten, name)
        found.extend(getattr(packet, overload) for overload in packet.overloads())
    return found


def _pieces(value: Any, base: Any) -> list[torch.Tensor]:
    """``value`` cut into the blocks of list element ``base`` (NOTE above)."""
    if not isinstance(base, ShardedTensor):
        return [whole(value)]
    if isinstance(value, ShardedTensor):
        if value._layout is base._layout:
            return value._local_tensors
        if value.shape == base.shape and not base._layout.is_replicate:
            return value._redistributed(base._layout.spec)._local_tensors
        value = whole(value)
    if value.dim() == 0:
        return [value] * len(base._local_tensors)
    layout = base._layout
    lead = base.dim() - value.dim()
    pieces = []
    for index in layout.local_indices(base._rank):
        box = layout.shard_box(index)
        pieces.append(value[tuple(slice(None) if value.shape[d] == 1 else box[lead + d]
                                  for d in range(value.dim()))])
    return pieces


def _contiguous_blocks(blocks: list[torch.Tensor],
                       written_back: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    result = []
    for block in blocks:
        if block.is_contiguous():
            result.append(block)
        else:
            copy = block.contiguous()
            written_back.append((block, copy))
            result.append(copy)
    return result


# The fast path of every optimizer step: the tensor lists flattened to blocks when
# every element is a ShardedTensor with the layout (the same object) of the first
# list's element at its index, and none is partial; else None (the general path).
# One flattener per number of lists (no pytree, no per-call tables).

def _flat_one(args: tuple[Any, ...]) -> list[list[Any]] | None:
    base = args[0]
    if len(base) == 1:  # (the lists of one-block tensors are not copied)
        element = base[0]
        if type(element) is not ShardedTensor or element._layout.is_partial:
            return None
        return [element._local_tensors]
    blocks: list[Any] = []
    for element in base:
        if type(element) is not ShardedTensor or element._layout.is_partial:
            return None
        blocks += element._local_tensors
    return [blocks]


def _flat_two(args: tuple[Any, ...]) -> list[list[Any]] | None:
    base, other = args[0], args[1]
    if len(other) != len(base):
        return None
    if len(base) == 1:
        element, second = base[0], other[0]
        if type(element) is not ShardedTensor or type(second) is not ShardedTensor \
                or second._layout is not element._layout or element._layout.is_partial:
            return None
        return [element._local_tensors, second._local_tensors]
    blocks: list[Any] = []
    other_blocks: list[Any] = []
    for element, second in zip(base, other, strict=True):
        if type(element) is not ShardedTensor or type(second) is not ShardedTensor:
            return None
        layout = element._layout
        if second._layout is not layout or layout.is_partial:
            return None
        blocks += element._local_tensors
        other_blocks += second._local_tensors
    return [blocks, other_blocks]


def _flat_many(args: tuple[Any, ...], lists: int) -> list[list[Any]] | None:
    base, others = args[0], args[1:lists]
    for column in others:
        if len(column) != len(base):
            return None
    flat: list[list[Any]] = [[] for _ in range(len(others) + 1)]
    for i, element in enumerate(base):
        if type(element) is not ShardedTensor:
            return None
        layout = element._layout
        if layout.is_partial:
            return None
        flat[0] += element._local_tensors
        for column, out in zip(others, flat[1:], strict=True):
            other = column[i]
            if type(other) is not ShardedTensor or other._layout is not layout:
                return None
            out += other._local_tensors
    return flat


def _flat_three(args: tuple[Any, ...]) -> list[list[Any]] | None:
    base, second, third = args[0], args[1], args[2]
    if len(second) != len(base) or len(third) != len(base):
        return None
    blocks: list[Any] = []
    second_blocks: list[Any] = []
    third_blocks: list[Any] = []
    for element, other, last in zip(base, second, third, strict=True):
        if type(element) is not ShardedTensor or type(other) is not ShardedTensor \
                or type(last) is not ShardedTensor:
            return None
        layout = element._layout
        if other._layout is not layout or last._layout is not layout or layout.is_partial:
            return None
        blocks += element._local_tensors
        second_blocks += other._local_tensors
        third_blocks += last._local_tensors
    return [blocks, second_blocks, third_blocks]


_FLATTENERS: dict[int, Any] = {1: _flat_one, 2: _flat_two, 3: _flat_three}
_NOT_SCALAR = (torch.Tensor, list, tuple)


def _scalars(kwargs: dict[str, Any]) -> bool:
    """Whether no keyword argument is a tensor or a list (``alpha=``, ``value=``: yes)."""
    if kwargs:
        for value in kwargs.values():
            if isinstance(value, _NOT_SCALAR):
                return False
    return True


def _fused_blocks(args: tuple[Any, ...]) -> list[list[Any]] | None:
    """The fast path of a fused optimizer step (``_fused_adamw_``...): its tensor lists
    as blocks, where every parameter is a ShardedTensor with one contiguous block here
    and every other list's element at its index has the same layout (the same object)
    or is a plain 0-dim tensor (a step count); else None (the general path, which also
    copies strided blocks: the CPU fused kernels miscompute on them)."""
    base = args[0]
    if type(base) is not list or not base:
        return None
    layouts = []
    first: list[Any] = []
    for element in base:
        if type(element) is not ShardedTensor or element._layout.is_partial:
            return None
        found = element._local_tensors
        if len(found) != 1 or not found[0].is_contiguous():
            return None
        layouts.append(element._layout)
        first.append(found[0])
    blocks = [first]
    for value in args[1:]:
        if type(value) is not list:
            return None
        if not value:
            blocks.append(value)
            continue
        if len(value) != len(base):
            return None
        pieces = []
        for element, layout in zip(value, layouts, strict=True):
            if type(element) is ShardedTensor:
                found = element._local_tensors
                if element._layout is not layout or not found[0].is_contiguous():
                    return None
                pieces.append(found[0])
            elif isinstance(element, torch.Tensor) and element.dim() == 0:
                pieces.append(element)
            else:
                return None
        blocks.append(pieces)
    return blocks


def _check_index_groups(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Elements at one index of the tensor lists live on the same ranks (NOTE [operands
    share a process group]); elements at different indices may not: nothing
    communicates between them (NOTE [implementations that find their own group])."""
    base = args[0]
    for value in (*args[1:], *kwargs.values()):
        if isinstance(value, list | tuple) and len(value) == len(base):
            for element, anchor in zip(value, base, strict=True):
                if isinstance(element, ShardedTensor) and isinstance(anchor, ShardedTensor) \
                        and element._layout.group_ranks is not anchor._layout.group_ranks:
                    _check_same_ranks(anchor, element, func)


def _count(element: Any) -> int:
    return len(element._local_tensors) if isinstance(element, ShardedTensor) else 1


def _regroup(base_list: list[Any], flat: list[torch.Tensor],
             dtypes: list[torch.dtype] | None = None) -> list[Any]:
    """Per-block results back into one result per tensor of ``base_list`` (``dtypes``:
    the results' dtypes, needed where a tensor has no block here)."""
    results: list[Any] = []
    position = 0
    for i, element in enumerate(base_list):
        n = _count(element)
        blocks = flat[position:position + n]
        position += n
        if isinstance(element, ShardedTensor):
            dtype = dtypes[i] if dtypes is not None else blocks[0].dtype
            results.append(element._like(list(blocks), dtype=dtype))
        else:
            results.append(blocks[0])
    return results


def _register(func: torch._ops.OpOverload) -> None:
    arguments = func._schema.arguments
    returns_list = any(str(r.type) == "List[Tensor]" for r in func._schema.returns)
    fused = func.name().startswith("aten::_fused_")
    positional = [a for a in arguments if not a.kwarg_only]
    kinds = [str(a.type) for a in positional]
    # The fast path: positional tensor lists first, then numbers (no scalar tensor);
    # scalar keywords. A per-tensor scalar list (``_foreach_div_.ScalarList`` of an Adam
    # step) goes as it is where every tensor has one block (else its entries would
    # repeat per block: the general path).
    lists = sum(kind == "List[Tensor]" for kind in kinds)
    simple = not fused and lists > 0 and all(kind == "List[Tensor]" for kind in kinds[:lists]) \
        and all("Tensor" not in kind and (kind == "List[number]" or "List" not in kind)
                for kind in kinds[lists:])
    per_tensor_scalars = any(kind == "List[number]" for kind in kinds[lists:])
    flatten = _FLATTENERS.get(lists) or functools.partial(_flat_many, lists=lists)
    call = _binding(func)
    arity = len(positional)

    trailing = lists < arity  # numbers after the lists (``_foreach_lerp_``'s weight)

    pair = simple and lists == arity == 2 and not returns_list  # _foreach_add_.List ...

    @_group_free
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        if pair and len(args) == 2:
            # The in-place step on one tensor, inline (a quarter of this function's
            # time otherwise goes to the generic flattening below).
            base, other = args
            if type(base) is list and len(base) == 1 and len(other) == 1:
                element, second = base[0], other[0]
                if type(element) is ShardedTensor and type(second) is ShardedTensor:
                    layout, blocks = element._layout, element._local_tensors
                    if second._layout is layout and not layout.is_partial and blocks \
                            and _scalars(kwargs):
                        call(blocks, second._local_tensors, **kwargs)
                        return None
        if simple and len(args) == arity and type(args[0]) is list:
            fast: list[Any] | None = flatten(args) if _scalars(kwargs) else None
            if fast is not None and fast[0] and (
                    not per_tensor_scalars or len(fast[0]) == len(args[0])):
                # (no block here, uneven, scalars per tensor of several blocks: general)
                if trailing:
                    fast += args[lists:]
                if not returns_list:
                    call(*fast, **kwargs)
                    return None
                base = args[0]
                if len(fast[0]) == len(base):  # one block per tensor
                    return [e._like([r], dtype=r.dtype)
                            for e, r in zip(base, call(*fast, **kwargs), strict=True)]
        if fused and not returns_list and _scalars(kwargs):
            fused_lists = _fused_blocks(args)
            if fused_lists is not None:
                call(*fused_lists, **kwargs)
                return None
        _check_index_groups(func, args, kwargs)
        named = [(a, v) for a, v in zip(arguments, args, strict=False)]
        named += [(a, kwargs[a.name]) for a in arguments[len(args):] if a.name in kwargs]
        base_list = args[0]
        flat: list[Any] = []
        for argument, value in named:
            kind = str(argument.type)
            if kind == "List[Tensor]" and isinstance(value, list | tuple):
                if value is base_list:
                    flat.append([b for e in value for b in _pieces(e, e)])
                else:
                    flat.append([b for e, s in zip(value, base_list, strict=True)
                                 for b in _pieces(e, s)] if value else [])
            elif kind == "List[number]" and isinstance(value, list | tuple):
                flat.append([v for v, s in zip(value, base_list, strict=True)
                             for _ in range(_count(s))])
            else:
                flat.append(whole(value))
        counts = [_count(e) for e in base_list]
        dtypes = None
        if not fused and (not flat[0] or (returns_list and 0 in counts)):
            # A tensor (or all) without a block here: dense's errors and result dtypes
            # from empty stand-ins, one per tensor, alike on every rank.
            stand_ins = [[torch.empty(0, dtype=e.dtype, device=e.device) for e in value]
                         if str(a.type) == "List[Tensor]" and isinstance(value, list | tuple)
                         else value if str(a.type) == "List[number]" else f
                         for (a, value), f in zip(named, flat, strict=True)]
            outputs = func(*stand_ins[: len(args)],
                           **{a.name: v for (a, _), v in zip(named[len(args):],
                                                             stand_ins[len(args):], strict=True)})
            dtypes = [o.dtype for o in outputs] if returns_list else None
        if not flat[0]:  # nothing to compute here
            return _regroup(list(base_list), [], dtypes) if returns_list else None
        written_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        if fused:
            # NOTE: the CPU fused kernels miscompute on strided tensors (seen with
            # _fused_sgd_ in torch 2.13); give them contiguous blocks and copy back.
            flat = [_contiguous_blocks(v, written_back) if isinstance(v, list) else v
                    for v in flat]
        call_kwargs = {a.name: v for (a, _), v in zip(named[len(args):], flat[len(args):],
                                                        strict=True)}
        result = func(*flat[: len(args)], **call_kwargs)
        for original, copy in written_back:
            original.copy_(copy)
        if returns_list:
            return _regroup(list(base_list), result, dtypes)
        return result

    impl.__name__ = impl.__qualname__ = f"foreach_{func.name().replace('::', '_')}"
    impl.__doc__ = f"``{func}`` as one call on every local block; see the module docstring."
    custom_sharded_op_impl(func, handles_partial=True, handles_mesh=True)(impl)


for _func in foreach_overloads():
    _register(_func)


@custom_sharded_op_impl(aten._foreach_norm.Scalar, handles_partial=True)
def foreach_norm(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``_foreach_norm(tensors, ord, dtype)``: per-block norms combined per tensor; one
    all-reduce (sum of ``|x|^p``, or max for ``inf``) for all sharded tensors of the list.

    Replicated tensors are not all-reduced (each rank holds the whole); Partial ones are
    reduced first. Returns 0-dim replicated ShardedTensors (plain tensors for plain inputs).
    """
    tensors = list(args[0])
    order = float(args[1] if len(args) > 1 else kwargs.get("ord", 2))
    dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
    if order not in (1.0, 2.0, float("inf")) and order <= 0:
        raise NotImplementedError(f"_foreach_norm with ord={order} not supported for "
                                  "ShardedTensor!")
    anchor = next(t for t in tensors if isinstance(t, ShardedTensor))
    values = [t._reduced() if isinstance(t, ShardedTensor) else t for t in tensors]
    infinite = order == float("inf")
    if infinite and any(v.numel() == 0 for v in values):  # global sizes: every rank agrees
        raise RuntimeError("_foreach_norm cannot compute the infinity norm on an empty tensor "
                           "because the operation does not have an identity")
    partial_values = []
    for value in values:
        blocks = value._local_tensors if isinstance(value, ShardedTensor) else [value]
        blocks = [b for b in blocks if b.numel()]  # empty blocks add nothing to any norm
        norms = list(torch._foreach_norm(blocks, order, dtype=dtype)) if blocks else []
        result_dtype = norms[0].dtype if norms else (dtype or value.dtype)
        stacked = torch.stack(norms) if norms else torch.zeros(0, dtype=result_dtype)
        if infinite:
            combined = stacked.max() if len(norms) else torch.zeros((), dtype=result_dtype)
        else:
            combined = stacked.pow(order).sum()
        partial_values.append(combined)
    local = torch.stack(partial_values)
    sharded = torch.tensor([isinstance(v, ShardedTensor) and v._layout.is_sharded
                            for v in values])
    group = anchor._process_group
    if bool(sharded.any()) and collectives.is_member(group, anchor._rank):
        reduced = local.clone()
        reduced[~sharded] = 0
        collectives.all_reduce(reduced, "max" if infinite else "sum", group)
        local = torch.where(sharded, reduced, local)
    if not infinite:
        local = local.pow(1.0 / order)
    results: list[Any] = []
    for value, norm in zip(values, local.unbind(), strict=True):
        if isinstance(value, ShardedTensor):
            layout = value._layout.with_spec(Replicate())
            from dispatch_shard.layout import layout_of

            scalar_layout = layout_of(Replicate(), torch.Size([]), layout.group_ranks,
                                      layout.device)
            member = bool(scalar_layout.local_indices(value._rank))
            results.append(value._like([norm.clone()] if member else [], scalar_layout,
                                       norm.dtype))
        else:
            results.append(norm.clone())
    return results
