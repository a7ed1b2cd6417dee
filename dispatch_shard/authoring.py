"""Helpers for writing a sharded op implementation (the op-author API).

An implementation registered with :func:`~dispatch_shard.custom_sharded_op_impl`
reads its operands' blocks (:meth:`ShardedTensor.local_blocks`), computes, and wraps
its results (:meth:`ShardedTensor.with_blocks`, no communication). Besides those,
implementations need a few things that the built-in ops in ``ops/`` use too:

- :func:`bind_arguments`: an op's arguments by name, defaults filled in;
- :func:`whole`: the whole value of an operand as a plain tensor, the same on every
  rank (one all-gather, or an all-reduce for a pending value; lists too);
- :func:`reduced`: a pending (Partial) value reduced, still sharded like its value
  (only a registration with ``handles_partial=True`` receives pending values);
- :func:`meta_call` and :func:`meta_results`: an op's results, or their sizes and
  dtypes (cached), from a run on meta tensors of the global sizes: no data, no
  collective, the same on every rank (ranks without blocks agree with those that have
  some), and dense's errors for bad arguments, raised on every rank alike (with
  ``dense_kernels=True``, also those only dense kernels give). The one stand-in run of
  the built-in op families;
- :func:`small_dense_call`: an op run on small dense zeros of its arguments' dtypes and
  dims, for result dtypes where an op has no meta kernel (a ``torch.library`` op
  without ``register_fake``; the declarative rules use it).

Per rank: :func:`whole` and :func:`reduced` are collectives (every rank of the operand's
group must call them); the others communicate nothing.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import Replicate

__all__ = ["bind_arguments", "meta_call", "meta_results", "reduced", "small_dense_call", "whole"]


def whole(value: Any) -> Any:
    """``value``'s whole value as a plain tensor on every rank of its group (an empty
    tensor of its size outside it); lists and tuples element by element; anything else
    as it is."""
    if isinstance(value, ShardedTensor):
        moved = value._redistributed(Replicate())
        return moved._local_tensors[0] if moved._local_tensors else torch.empty(
            value.shape, dtype=value.dtype)
    if isinstance(value, list | tuple):
        return type(value)(whole(v) for v in value)
    return value


def reduced(value: Any) -> Any:
    """A pending value (Partial, or partial over a mesh dim) with its reduction done:
    replicated where it was pending, split where it was split; anything else as it is.
    Not differentiable (implementations run below autograd)."""
    if isinstance(value, ShardedTensor) and value._layout.pending:
        return value._reduced()
    return value


_REQUIRED = object()


@functools.cache
def _parameters(func: torch._ops.OpOverload) -> tuple[tuple[str, Any], ...]:
    return tuple((a.name, a.default_value if a.has_default_value() else _REQUIRED)
                 for a in func._schema.arguments)


def bind_arguments(func: torch._ops.OpOverload, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> dict[str, Any]:
    """``func``'s arguments by their schema names, defaults filled in (an aten overload
    or an op of a ``torch.library`` namespace), e.g. ``bound["dim"]``."""
    bound = {}
    for position, (name, default) in enumerate(_parameters(func)):
        if position < len(args):
            bound[name] = args[position]
        elif name in kwargs:
            bound[name] = kwargs[name]
        else:
            bound[name] = default
    return bound


# NOTE [stand-in runs outside a trace]
# The op families run dense ops on stand-ins (meta tensors, small zeros) to learn a
# result's size and dtype, or to raise dense's error. While torch.compile traces our
# dispatch (fake blocks; AOTAutograd's proxy and functionalization modes), such a run
# would go through every mode: fake-tensor dispatch of each stand-in op, factory and op
# nodes that the graph records and later drops. A stand-in depends on sizes and dtypes
# only, never on a block, so it runs with the modes set aside: a plain meta run, as in
# eager (the cached ones are cache misses only the first time a size is seen).

def _outside_trace() -> contextlib.AbstractContextManager[Any]:
    """The compiler's dispatch modes set aside, for a stand-in run (NOTE [stand-in runs
    outside a trace]); nothing to do in eager."""
    return _disable_current_modes()


def _stand_ins(value: Any, make: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return make(value)
    if isinstance(value, list | tuple):
        return type(value)(_stand_ins(v, make) for v in value)
    return value


def _meta(value: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``value``'s size and dtype (global sizes for a ShardedTensor)."""
    return torch.empty(value.shape, dtype=value.dtype, device="meta")


def _zero_stride(value: torch.Tensor) -> torch.Tensor:
    """A dense tensor of ``value``'s size and dtype, one element expanded (no data)."""
    return torch.zeros((), dtype=value.dtype).expand(value.shape)


def _small(value: torch.Tensor) -> torch.Tensor:
    """Dense zeros of ``value``'s dtype and dims, at most 2 per dim (empty stays empty)."""
    return torch.zeros([min(n, 2) for n in value.shape], dtype=value.dtype)


def _mutates(func: Any) -> bool:
    schema = getattr(func, "_schema", None)
    return schema is not None and bool(schema.is_mutable)


def _dense_run(func: Any, args: Sequence[Any], kwargs: dict[str, Any],
               make: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. var's "degrees of freedom" on a stand-in
        return func(*_stand_ins(list(args), make),
                    **{k: _stand_ins(v, make) for k, v in kwargs.items()})


def small_dense_call(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``func`` run on small dense CPU stand-ins of its tensor arguments (zeros of the
    same dtypes and dims, at most 2 per dim, empty where empty), outside a compiler's
    trace and with no warnings: the results' dtypes and dense's dtype checks, for an op
    whose meta run cannot tell (no meta kernel, or one laxer than the CPU kernel)."""
    with _outside_trace():
        return _dense_run(func, args, kwargs, _small)


def meta_call(func: Any, args: Sequence[Any], kwargs: dict[str, Any], *,
              dense_kernels: bool = False) -> tuple[Any, ...]:
    """``func``'s results (a tuple) on meta tensors of its tensor arguments' sizes and dtypes
    (global sizes for a ShardedTensor, a block's for a block): the one stand-in run of the
    op families, for result shapes and dtypes and for dense's errors, raised on every rank
    alike (sizes and dtypes decide, never values or ranks).

    Errors are dense's own: a meta run that fails is rerun on dense stand-ins of the same
    sizes (one element each, expanded; not for an op that writes to an argument), whose
    checks run before any arithmetic, so the error raised is dense's when dense rejects the
    call too (the meta error otherwise). An
    op without a meta kernel raises ``NotImplementedError`` as it is. Meta kernels accept
    some calls that dense kernels reject (a dtype a CPU kernel lacks, ``max()`` of an empty
    tensor); ``dense_kernels=True`` first runs the op on small dense CPU stand-ins (at most
    2 per dim; same dtypes, dims and emptiness) so that those raise too. Stand-in runs
    warn nothing (the op's real run warns) and run outside a compiler's trace (NOTE
    [stand-in runs outside a trace])."""
    if dense_kernels:
        small_dense_call(func, args, kwargs)
    with _outside_trace():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = func(*_stand_ins(list(args), _meta),
                              **{k: _stand_ins(v, _meta) for k, v in kwargs.items()})
        except NotImplementedError:  # no meta kernel: the caller decides
            raise
        except (RuntimeError, TypeError, ValueError, IndexError):
            if not _mutates(func):  # (a stand-in that is written to must not be expanded)
                _dense_run(func, args, kwargs, _zero_stride)  # dense's own message
            raise
    return tuple(result) if isinstance(result, tuple | list) else (result,)


def _facts(value: Any) -> Any:
    """What a stand-in run reads of an argument, hashable (for a tensor: size and dtype;
    a scalar with its type, as ``1``, ``1.0`` and ``True`` differ)."""
    kind = type(value)
    if kind is list or kind is tuple or (
            not isinstance(value, torch.Tensor) and isinstance(value, list | tuple)):
        return (kind, *[_facts(v) for v in value])
    if isinstance(value, torch.Tensor):
        return (torch.Tensor, value.shape, value.dtype)
    return (kind, value)


# meta_results' answers by the op and its arguments' facts; errors are never stored (they
# raise again). Bounded: the oldest answer goes first.
_RESULTS: dict[Any, tuple[tuple[torch.Size, torch.dtype], ...]] = {}
_RESULTS_BOUND = 4096


def meta_results(func: Any, args: Sequence[Any], kwargs: dict[str, Any], *,
                 dense_kernels: bool = False) -> list[tuple[torch.Size, torch.dtype]]:
    """Sizes and dtypes of ``func``'s results (:func:`meta_call`, with its errors and its
    ``dense_kernels``), cached by the arguments' sizes, dtypes and other values."""
    key: Any = (func, dense_kernels, _facts(tuple(args)),
                *[(k, _facts(v)) for k, v in kwargs.items()])
    try:
        found = _RESULTS.get(key)
    except TypeError:  # an unhashable argument (or a symbolic size)
        key, found = None, None
    if found is not None:
        return list(found)
    results = tuple((r.shape, r.dtype)
                    for r in meta_call(func, args, kwargs, dense_kernels=dense_kernels))
    if key is not None:
        if len(_RESULTS) >= _RESULTS_BOUND:
            del _RESULTS[next(iter(_RESULTS))]
        _RESULTS[key] = results
    return list(results)
