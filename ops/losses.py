"""Losses: ``mse_loss`` and its backward, block by block.

Per rank, when the input and the target share one layout (any 1-D split, one or
several blocks per rank, or replicated), each block's squared error is computed on its
own:

- ``reduction="none"``: the errors, in the operands' layout;
- ``"sum"`` and ``"mean"``: each rank sums its blocks' errors into a Partial scalar (a
  pending sum over the ranks). The mean divides that sum by the global element count,
  so it weighs every element alike, never averaging per-rank means. Replicated operands
  give a replicated scalar.
- Backward: ``2 (x - y) grad`` per block, divided by the global element count for the
  mean; the incoming gradient is a replicated (or plain) scalar, or the errors' layout
  for ``"none"``.

Collectives: none here (the Partial loss is reduced where its value is read). Other
operands (broadcasting, mixed layouts, pending inputs, integer dtypes) take torch's
decomposition (ops/decomposed.py); N-D layouts are served per mesh dim
(:mod:`dispatch_shard.mesh_rules`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._decomp import decomposition_table

from dispatch_shard.layout import layout_of
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import Partial

__all__: list[str] = []

aten = torch.ops.aten
_NONE, _MEAN, _SUM = 0, 1, 2
_fallbacks: dict[Any, Any] = {}


def _decomposed(func: torch._ops.OpOverload, types: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any], pg: Any) -> Any:
    impl = _fallbacks.get(func)
    if impl is None:
        from dispatch_shard.ops.decomposed import decomposed_impl

        impl = _fallbacks[func] = decomposed_impl(func, decomposition_table[func])
    return impl(types, args, kwargs, pg)


def _same_layout(*values: Any) -> bool:
    """Whether every value is a ShardedTensor of the first one's layout (not pending)
    and floating dtype."""
    first = values[0]
    if type(first) is not ShardedTensor or first._layout.pending:
        return False
    return all(type(v) is ShardedTensor and v._layout is first._layout
               and v.dtype == first.dtype and v.is_floating_point() for v in values)


def _scalar_grad(grad: Any) -> torch.Tensor | None:
    """A 0-dim gradient as a dense tensor on this rank (None if it is not one)."""
    if type(grad) is ShardedTensor:
        if grad.dim() != 0 or not grad._layout.is_replicate or len(grad._local_tensors) != 1:
            return None
        return grad._local_tensors[0]
    if isinstance(grad, torch.Tensor) and grad.dim() == 0:
        return grad
    return None


@custom_sharded_op_impl(aten.mse_loss.default, handles_partial=True)
def mse_loss(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``mean((x - y)^2)`` (or its sum, or the errors): per block, no collective; the
    sum and mean are Partial scalars (see the module docstring)."""
    x, target = args[0], args[1]
    reduction = args[2] if len(args) > 2 else kwargs.get("reduction", _MEAN)
    if not _same_layout(x, target) or x.shape != target.shape:
        return _decomposed(aten.mse_loss.default, types, args, kwargs, pg)
    blocks = [aten.mse_loss.default(a, b, _NONE if reduction == _NONE else _SUM)
              for a, b in zip(x._local_tensors, target._local_tensors, strict=True)]
    if reduction == _NONE:
        return x._like(blocks)
    layout = x._layout
    if layout.is_replicate:
        total = blocks[0] if blocks else None
    else:
        total = torch.stack(blocks).sum() if len(blocks) > 1 else (
            blocks[0] if blocks else torch.zeros((), dtype=x.dtype, device=x.device))
        layout = layout_of(Partial(), torch.Size([]), layout.group_ranks,
                           layout.device or str(x.device))
    if total is not None and reduction == _MEAN:
        total = total / x.numel()
    return x._like([] if total is None else [total], layout)


@custom_sharded_op_impl(aten.mse_loss_backward.default, handles_partial=True)
def mse_loss_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                      pg: Any) -> Any:
    """``2 (x - y) grad`` per block (over the global element count for the mean); no
    collective."""
    grad, x, target = args[0], args[1], args[2]
    reduction = args[3] if len(args) > 3 else kwargs.get("reduction", _MEAN)
    if not _same_layout(x, target) or x.shape != target.shape:
        return _decomposed(aten.mse_loss_backward.default, types, args, kwargs, pg)
    if reduction == _NONE:
        if not _same_layout(x, grad):
            return _decomposed(aten.mse_loss_backward.default, types, args, kwargs, pg)
        pieces = grad._local_tensors
    else:
        scalar = _scalar_grad(grad)
        if scalar is None:
            return _decomposed(aten.mse_loss_backward.default, types, args, kwargs, pg)
        if reduction == _MEAN:
            scalar = scalar / x.numel()
        pieces = [scalar] * len(x._local_tensors)
    blocks = [aten.mse_loss_backward.default(g, a, b, _SUM if reduction != _NONE else _NONE)
              for g, a, b in zip(pieces, x._local_tensors, target._local_tensors,
                                 strict=True)]
    return x._like(blocks)
