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
  dtypes, from a run on meta tensors of the global sizes: no data, no collective, the
  same on every rank (ranks without blocks agree with those that have some), and
  dense's errors for bad arguments, raised on every rank alike.

Per rank: :func:`whole` and :func:`reduced` are collectives (every rank of the operand's
group must call them); the others communicate nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import Replicate

__all__ = ["bind_arguments", "meta_call", "meta_results", "reduced", "whole"]


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


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, list | tuple):
        return type(value)(_to_meta(v) for v in value)
    return value


def meta_call(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """``func``'s results (a tuple) on meta tensors of its tensor arguments' sizes and dtypes
    (global sizes for a ShardedTensor, a block's for a block): the one stand-in run of the
    op families, for result shapes and dtypes and for dense's errors, raised on every rank
    alike."""
    result = func(*_to_meta(list(args)), **{k: _to_meta(v) for k, v in kwargs.items()})
    return tuple(result) if isinstance(result, tuple | list) else (result,)


def meta_results(func: Any, args: Sequence[Any],
                 kwargs: dict[str, Any]) -> list[tuple[torch.Size, torch.dtype]]:
    """Sizes and dtypes of ``func``'s results (:func:`meta_call`)."""
    return [(r.shape, r.dtype) for r in meta_call(func, args, kwargs)]
