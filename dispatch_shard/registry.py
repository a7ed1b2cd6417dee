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

import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal

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
# The implementations registered with ``handles_mesh=True`` (NOTE [serving N-D
# operands] in dispatch_shard.holders).
MESH_AWARE: set[ShardedOpImpl] = set()
MESH_PENDING_AWARE: set[ShardedOpImpl] = set()  # ``handles_mesh="pending"``
GROUP_FREE_OVERLOADS: dict[torch._ops.OpOverload, ShardedOpImpl] = {}

# NOTE [the dispatch loop's table is keyed by id]
# An OpOverload hashes in Python (``OpOverload.__hash__`` is a Python function, 0.2 us, and
# several times that on a loaded machine), and the dispatch loop looked each op up two or
# three times. ``DISPATCH_TABLE`` mirrors OVERLOADS for the loop, keyed by ``id(op)``:
# ``(implementation, group-free)``. Overloads compare by identity (OpOverload defines no
# ``__eq__``) and the ones registered are held by OVERLOADS, so an id names one op for as
# long as its entry exists. Registration and removal keep both tables in step.
DISPATCH_TABLE: dict[int, tuple[ShardedOpImpl, bool]] = {}


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


def resolve_op(op: object) -> object:
    """``op``, or for what ``@torch.library.custom_op`` returns (a ``CustomOpDef``, which
    is also callable), its overload: registering the ``CustomOpDef`` itself filed it as
    a torch-level function that no call ever reaches."""
    from torch._library.custom_ops import CustomOpDef

    return op._opoverload if isinstance(op, CustomOpDef) else op


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
    op: object, *, override: bool = False, handles_partial: bool = False,
    handles_mesh: bool | Literal["pending"] = False,
) -> Callable[[ShardedOpImpl], ShardedOpImpl]:
    """Register the decorated function as the sharded implementation of ``op``.

    The implementation is called as ``fn(types, args, kwargs, process_group)``
    with the op's arguments (ShardedTensors among them) and the process group
    of the first ShardedTensor argument; it returns what the op returns.

    Safe by default (NOTE [implementations never see a pending sum unasked]):
    unless ``handles_partial=True``, every :class:`~dispatch_shard.Partial`
    ShardedTensor argument is reduced first, so the implementation receives the
    value, never summands. A torch-level registration (``torch.asin``) runs above
    autograd: where a gradient is needed and its result has no autograd history,
    the gradient is that of the function itself, recomputed through the built-in
    path in backward (NOTE [a torch-level registration keeps autograd]).

    N-D operands (blocks with several holders, on a device mesh) are flattened to a
    1-D layout first unless ``handles_mesh=True`` (NOTE [serving N-D operands] in
    :mod:`dispatch_shard.holders`), so an implementation written for 1-D layouts
    serves them too. With ``handles_mesh=True`` an N-D operand whose reduction is
    pending over a mesh dim is reduced first; ``handles_mesh="pending"`` hands it over
    as it is (an op that works term by term: ``clone``, ``detach``).

    Raises:
        TypeError: ``op`` is not an op, or the function cannot take the four
            arguments (checked now, not at call time).
        ValueError: ``op`` already has an implementation and ``override`` is
            False; the message names where the existing one is defined.
    """
    op = resolve_op(op)
    table = _table_for(op)

    def decorator(fn: ShardedOpImpl) -> ShardedOpImpl:
        _check_signature(op, fn)
        existing = table.get(op)
        if existing is not None and not override:
            raise ValueError(
                f"{_op_name(op)} already has a sharded implementation "
                f"({_where(_user_fn(existing))}); pass override=True to replace it with "
                f"{_where(fn)}"
            )
        served = fn
        if table is TORCH_FUNCTIONS:
            served = _guarded_torch_function(op, fn, handles_partial)
        elif not handles_partial:
            served = _reducing_partials(op, fn)
        if table is not TORCH_FUNCTIONS and not _built_in(fn):
            served = _checking_results(op, fn, served)
        table[op] = served
        for found, wanted in ((MESH_AWARE, bool(handles_mesh)),
                              (MESH_PENDING_AWARE, handles_mesh == "pending")):
            if wanted:
                found.add(served)
            else:
                found.discard(served)
        if table is OVERLOADS:
            if served in GROUP_FREE:
                GROUP_FREE_OVERLOADS[op] = fn  # type: ignore[index]
            else:
                GROUP_FREE_OVERLOADS.pop(op, None)  # type: ignore[call-overload]
            DISPATCH_TABLE[id(op)] = (served, served in GROUP_FREE)
        if table is TORCH_FUNCTIONS:
            for listener in _listeners:
                listener(True)
        return fn

    return decorator


def remove_sharded_op_impl(op: object) -> ShardedOpImpl:
    """Unregister and return the implementation of ``op`` (``KeyError`` if none)."""
    op = resolve_op(op)
    table = _table_for(op)
    fn = _user_fn(table.pop(op))
    GROUP_FREE_OVERLOADS.pop(op, None)  # type: ignore[call-overload]
    if table is OVERLOADS:
        DISPATCH_TABLE.pop(id(op), None)
    if table is TORCH_FUNCTIONS:
        for listener in _listeners:
            listener(bool(TORCH_FUNCTIONS))
    return fn


# NOTE [implementations never see a pending sum unasked]
# A Partial ShardedTensor holds summands; an implementation written block by block
# (``f(block)`` for each block) computes f of each summand, which is f of the value
# only for linear f. So by default an implementation is handed the value: every
# Partial argument (also inside lists) is reduced first, below autograd for aten
# ops (a copy: the implementation may keep or change it) and differentiably above
# it for torch-level functions. A registration that handles summands itself says
# ``handles_partial=True`` (the built-in ops do). An op that writes into a Partial
# argument cannot be served on a reduced copy (the write would be lost): it raises.
#
# A torch-level registration runs instead of the function, above autograd; NOTE [a
# torch-level registration keeps autograd] says how its gradient is kept.

def _user_fn(served: ShardedOpImpl) -> ShardedOpImpl:
    """The function the user registered (``served`` may be a wrapper around it)."""
    return getattr(served, "__sharded_impl__", served)


def _is_partial(value: Any) -> bool:
    layout = getattr(value, "_layout", None)
    return layout is not None and layout.is_partial is True


def _map_partials(args: tuple[Any, ...], kwargs: dict[str, Any], reduce: Callable[[Any], Any]
                  ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with every Partial argument (also inside lists) reduced."""
    def one(value: Any) -> Any:
        if _is_partial(value):
            return reduce(value)
        if isinstance(value, list | tuple) and any(_is_partial(v) for v in value):
            return type(value)(reduce(v) if _is_partial(v) else v for v in value)
        return value

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _serving(fn: ShardedOpImpl, served: Callable[..., Any]) -> ShardedOpImpl:
    """``served``, a wrapper around the user's ``fn``, named like it (see _user_fn)."""
    functools.update_wrapper(served, fn)  # name, module, docstring: the user's
    served.__sharded_impl__ = fn  # type: ignore[attr-defined]
    return served


def _built_in(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is one of dispatch_shard's own (ops/, the declarative rules)."""
    return getattr(fn, "__module__", "").startswith("dispatch_shard.")


def _tensor_returns(op: object) -> int | None:
    """How many results ``op``'s schema declares (None for a packet or a list result)."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    returns = op._schema.returns
    if any(str(r.type) != "Tensor" for r in returns):
        return None
    return len(returns)


# NOTE [what a user's implementation returns is checked]
# A user's aten-level implementation must return ShardedTensors for the op's tensor
# results, as many as the op's schema declares. Returning this rank's block as a plain
# tensor, or one result of two, was accepted and gave a wrong value (a plain tensor of
# a block's size, different on each rank) or torch's unhelpful redispatch error. The
# check reads types and counts only (no collective, the same on every rank that runs
# the same code); the built-in ops and the declarative rules are not wrapped.

def _checking_results(op: object, fn: ShardedOpImpl, inner: ShardedOpImpl) -> ShardedOpImpl:
    """``inner`` (serving the user's ``fn``), whose results are checked (NOTE above)."""
    from dispatch_shard.sharded_tensor import ShardedTensor

    expected = _tensor_returns(op)

    def served(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               process_group: Any) -> Any:
        result = inner(types, args, kwargs, process_group)
        results = result if isinstance(result, tuple | list) else (result,)
        if expected is not None and expected > 0 and len(results) != expected:
            raise TypeError(
                f"{_op_name(op)}: its sharded implementation ({_where(fn)}) returned "
                f"{len(results)} value(s), but the op returns {expected}: return a tuple "
                "of one ShardedTensor per result")
        for k, value in enumerate(results):
            if isinstance(value, torch.Tensor) and not isinstance(value, ShardedTensor):
                raise TypeError(
                    f"{_op_name(op)}: its sharded implementation ({_where(fn)}) returned a "
                    f"plain torch.Tensor of size {list(value.shape)} as result {k}; return "
                    "a ShardedTensor (x.with_blocks(blocks, size=..., layout=...) wraps "
                    "this rank's blocks without communication)")
        return result

    return _serving(fn, served)


def _written_arguments(op: object) -> set[str]:
    if not isinstance(op, torch._ops.OpOverload):
        return set()
    return {a.name for a in op._schema.arguments
            if a.alias_info is not None and a.alias_info.is_write}


def _reducing_partials(op: object, fn: ShardedOpImpl) -> ShardedOpImpl:
    """``fn`` behind NOTE [implementations never see a pending sum unasked] (aten level)."""
    from dispatch_shard.specs import Replicate

    written = _written_arguments(op)
    positions = (
        {i for i, a in enumerate(op._schema.arguments) if a.name in written}
        if isinstance(op, torch._ops.OpOverload) else set()
    )

    def reduce(value: Any) -> Any:
        return value._redistributed(Replicate())

    def served(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               process_group: Any) -> Any:
        if any(_is_partial(args[i]) for i in positions if i < len(args)) or any(
                _is_partial(kwargs.get(name)) for name in written):
            raise NotImplementedError(
                f"{_op_name(op)}: its sharded implementation ({_where(fn)}) would write "
                "into a Partial ShardedTensor, which holds summands, not the value; "
                "reduce it first (x.redistribute(dispatch_shard.Replicate())), or register "
                "the implementation with handles_partial=True"
            )
        args, kwargs = _map_partials(args, kwargs, reduce)
        return fn(types, args, kwargs, process_group)

    return _serving(fn, served)


def _guarded_torch_function(op: object, fn: ShardedOpImpl,
                            handles_partial: bool) -> ShardedOpImpl:
    """A torch-level ``fn`` behind NOTE [implementations never see a pending sum unasked]."""
    from dispatch_shard.specs import Replicate

    def reduce(value: Any) -> Any:
        return value.redistribute(Replicate())  # differentiable: we are above autograd

    def served(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               process_group: Any) -> Any:
        if not handles_partial:
            args, kwargs = _map_partials(args, kwargs, reduce)
        result = fn(types, args, kwargs, process_group)
        if not (torch.is_grad_enabled() and _needs_grad(args, kwargs)):
            return result
        outputs = result if isinstance(result, list | tuple) else (result,)
        if all(out.requires_grad for out in outputs if _differentiable(out)):
            return result  # the implementation kept autograd itself
        return _with_dense_gradient(op, args, kwargs, result)

    return _serving(fn, served)


def _differentiable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


# NOTE [a torch-level registration keeps autograd]
# A torch-level implementation that computes on blocks returns a result with no
# autograd history. Its gradient is then the gradient of the function itself: the
# result is attached to the inputs by an autograd Function whose backward runs the
# function again through the built-in path (below autograd, with its own derivative
# formula) and differentiates that: recomputation, as activation checkpointing does,
# so gradients equal dense. Where no built-in path serves the function's ops, the
# backward raises that op's "not supported for ShardedTensor!" error, when the
# gradient is needed and not before.

def _with_dense_gradient(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                         result: Any) -> Any:
    flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    positions = [i for i, v in enumerate(flat)
                 if isinstance(v, torch.Tensor) and v.requires_grad]
    single = not isinstance(result, list | tuple)
    outputs = (result,) if single else tuple(result)

    class _Recomputed(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *inputs: torch.Tensor) -> Any:
            ctx.save_for_backward(*inputs)
            # Fresh aliases of the results: autograd attaches its history to them.
            return tuple(out.detach() if isinstance(out, torch.Tensor) else out
                         for out in outputs)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            saved = ctx.saved_tensors
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(True) for t in saved]
                replaced = list(flat)
                for i, leaf in zip(positions, leaves, strict=True):
                    replaced[i] = leaf
                call_args, call_kwargs = torch.utils._pytree.tree_unflatten(replaced, spec)
                with torch._C.DisableTorchFunctionSubclass():  # the built-in path
                    again = op(*call_args, **call_kwargs)
                again = (again,) if single else tuple(again)
                pairs = [(out, grad) for out, grad in zip(again, grads, strict=True)
                         if isinstance(out, torch.Tensor) and out.requires_grad
                         and grad is not None]
                found = torch.autograd.grad([o for o, _ in pairs], leaves,
                                            [g for _, g in pairs], allow_unused=True)
            return found

    attached = _Recomputed.apply(*(flat[i] for i in positions))  # type: ignore[no-untyped-call]
    return attached[0] if single else type(result)(attached)


def _needs_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    def wants(value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return value.requires_grad
        if isinstance(value, list | tuple):
            return any(wants(v) for v in value)
        return False

    return any(wants(a) for a in args) or any(wants(v) for v in kwargs.values())


# Called with an overload no table holds (an op of a namespace loaded later, such as
# inductor's prims.fma, which the compiled optimizer step calls): a family that serves
# it by its tags registers it and returns True (ops/pointwise.py adds one).
LATE_FAMILIES: list[Callable[[torch._ops.OpOverload], bool]] = []


def lookup(func: torch._ops.OpOverload) -> ShardedOpImpl:
    """The implementation for an aten overload, or ``NotImplementedError``."""
    impl = OVERLOADS.get(func)
    if impl is None:
        impl = PACKETS.get(func.overloadpacket)
        if impl is None:
            if any(family(func) for family in LATE_FAMILIES):
                return OVERLOADS[func]
            hint = "" if func.namespace in ("aten", "prims") else (
                f" (an op of your own: register it with dispatch_shard.register_sharding_rule"
                f"(torch.ops.{func}, ...) or "
                "dispatch_shard.custom_sharded_op_impl)")
            raise NotImplementedError(f"{func} not supported for ShardedTensor!{hint}")
    return impl
