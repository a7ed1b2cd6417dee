"""The sharded op registry: one table, one public decorator.

Built-in implementations (``dispatch_shard.ops``) register exactly as users do::

    @custom_sharded_op_impl(torch.ops.aten.mm.default)
    def my_mm(types, args, kwargs, process_group):
        ...

Keys are aten overloads (``torch.ops.aten.mm.default``), aten overload packets
(``torch.ops.aten.mm``: every overload of the op) or torch-level functions
(``torch.asin``, ``torch.nn.functional.linear``). An overload entry wins over a
packet entry. Torch-level entries are looked up in ``__torch_function__``,
before autograd and decomposition, so they take precedence over the built-in
aten path for that call.

NOTE [torch function is off unless needed]
``ShardedTensor.__torch_function__`` is torch's disabled implementation (no
Python work per call) while no torch-level function is registered. The first
torch-level registration switches the class to a handler that looks the
function up; removing the last switches it back. Listeners set with
:func:`_on_torch_function_table_change` do the switch, so this module does
not import the tensor class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ShardedOpImpl", "custom_sharded_op_impl", "remove_sharded_op_impl"]

ShardedOpImpl = Callable[[Any, tuple[Any, ...], dict[str, Any], Any], Any]

# The tables read on the dispatch hot path.
OVERLOADS: dict[torch._ops.OpOverload, ShardedOpImpl] = {}
PACKETS: dict[torch._ops.OpOverloadPacket, ShardedOpImpl] = {}
TORCH_FUNCTIONS: dict[Callable[..., Any], ShardedOpImpl] = {}

_listeners: list[Callable[[bool], None]] = []

# NOTE [implementations that find their own group]
# The dispatch loop hands an implementation the process group of the first
# ShardedTensor argument, after checking that every operand lives on the same
# ranks: about 0.3-0.6 us per call. The built-in pointwise and foreach
# implementations do not need it on their fast paths (operands share one layout
# object, hence one group; a foreach list may even mix groups, element by
# element, since nothing there communicates). They are listed here and called
# with ``process_group=None``; their general paths run the check themselves. A
# user's override is not listed, so it gets the group as documented.
# ``GROUP_FREE_OVERLOADS`` mirrors the OVERLOADS entries whose implementation is
# listed, so the dispatch loop finds them with one lookup.
GROUP_FREE: set[ShardedOpImpl] = set()
GROUP_FREE_OVERLOADS: dict[torch._ops.OpOverload, ShardedOpImpl] = {}


def _group_free(fn: ShardedOpImpl) -> ShardedOpImpl:
    GROUP_FREE.add(fn)
    return fn


def _binding(func: torch._ops.OpOverload) -> Callable[..., Any]:
    """The fastest way to call ``func`` on plain tensors.

    Calling an OpOverload parses its arguments against the schema in Python and
    pybind (1.6-2.0 us for ``add``); torch's generated binding of the same name
    (``torch.add``, ``Tensor.add_``) parses them in C++ (1.2 us). The binding
    picks the overload from the argument types, so it is used only by fast paths
    that pass the arguments the overload was called with (positional tensors and
    numbers, scalar keywords), where it resolves to the same kernel. Falls back
    to ``func`` where torch has no binding of that name.
    """
    name = func._schema.name.split("::", 1)[1]
    for namespace in (torch._C._VariableFunctions, torch._C.TensorBase):
        binding = getattr(namespace, name, None)
        if binding is not None:
            return binding  # type: ignore[no-any-return]
    return func


def _on_torch_function_table_change(listener: Callable[[bool], None]) -> None:
    """Call ``listener(table_is_non_empty)`` now and on every change."""
    _listeners.append(listener)
    listener(bool(TORCH_FUNCTIONS))


def _where(fn: Callable[..., Any]) -> str:
    code = getattr(fn, "__code__", None)
    if code is None:
        return repr(fn)
    return f"{getattr(fn, '__qualname__', fn)} at {code.co_filename}:{code.co_firstlineno}"


def _op_name(op: object) -> str:
    """``aten.mm.default``, ``torch.asin``: how an error names ``op``."""
    if isinstance(op, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(op)
    return torch.overrides.resolve_name(op) or repr(op)


def _table_for(op: object) -> dict[Any, ShardedOpImpl]:
    if isinstance(op, torch._ops.OpOverload):
        return OVERLOADS
    if isinstance(op, torch._ops.OpOverloadPacket):
        return PACKETS
    if callable(op):
        return TORCH_FUNCTIONS
    raise TypeError(
        f"custom_sharded_op_impl expects an aten overload, an aten overload packet or a "
        f"torch function, got {op!r} of type {type(op).__name__}"
    )


def _check_signature(op: object, fn: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"sharded implementation of {_op_name(op)} ({_where(fn)}): {exc}"
        ) from exc
    try:
        signature.bind(None, (), {}, None)
    except TypeError as exc:
        raise TypeError(
            f"sharded implementation of {_op_name(op)} ({_where(fn)}) expects signature "
            f"(types, args, kwargs, process_group), but it is {signature}: {exc}"
        ) from None


def custom_sharded_op_impl(
    op: object, *, override: bool = False
) -> Callable[[ShardedOpImpl], ShardedOpImpl]:
    """Register the decorated function as the sharded implementation of ``op``.

    The implementation is called as ``fn(types, args, kwargs, process_group)``
    with the op's arguments (ShardedTensors among them) and the process group
    of the first ShardedTensor argument; it returns what the op returns.

    Raises:
        TypeError: ``op`` is not an op, or the function cannot take the four
            arguments (checked now, not at call time).
        ValueError: ``op`` already has an implementation and ``override`` is
            False; the message names where the existing one is defined.
    """
    table = _table_for(op)

    def decorator(fn: ShardedOpImpl) -> ShardedOpImpl:
        _check_signature(op, fn)
        existing = table.get(op)
        if existing is not None and not override:
            raise ValueError(
                f"{_op_name(op)} already has a sharded implementation ({_where(existing)}); "
                f"pass override=True to replace it with {_where(fn)}"
            )
        table[op] = fn
        if table is OVERLOADS:
            if fn in GROUP_FREE:
                GROUP_FREE_OVERLOADS[op] = fn  # type: ignore[index]
            else:
                GROUP_FREE_OVERLOADS.pop(op, None)  # type: ignore[call-overload]
        if table is TORCH_FUNCTIONS:
            for listener in _listeners:
                listener(True)
        return fn

    return decorator


def remove_sharded_op_impl(op: object) -> ShardedOpImpl:
    """Unregister and return the implementation of ``op`` (``KeyError`` if none)."""
    table = _table_for(op)
    fn = table.pop(op)
    GROUP_FREE_OVERLOADS.pop(op, None)  # type: ignore[call-overload]
    if table is TORCH_FUNCTIONS:
        for listener in _listeners:
            listener(bool(TORCH_FUNCTIONS))
    return fn


def lookup(func: torch._ops.OpOverload) -> ShardedOpImpl:
    """The implementation for an aten overload, or ``NotImplementedError``."""
    impl = OVERLOADS.get(func)
    if impl is None:
        impl = PACKETS.get(func.overloadpacket)
        if impl is None:
            raise NotImplementedError(f"{func} not supported for ShardedTensor!")
    return impl
