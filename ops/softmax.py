"""``logsumexp`` and ``softmax``/``log_softmax`` with their backward: the exponentials of
a dim, normalized by their sum.

Per rank, with ``D`` the reduced dims (softmax: its ``dim``) and ``R`` the size of the
process group (the scheme of :mod:`dispatch_shard.ops.reduction`):

* Blockwise: no block splits a dim of ``D`` (``x [M/R, N] .softmax(1)``, a replicated
  input): each block on its own. ``logsumexp``: ``[m_i, N] -> [m_i]`` in the input's
  layout with ``D`` removed; softmax and its backward: ``x``'s layout. Collectives: none.
* Across ranks: a dim of ``D`` is split (``x [M/R, N] .softmax(0)``). Two all-reduces of
  the keepdim-shaped full-size ``[1, N]``: a NaN-aware max (the shift), then the sum of
  ``exp(x - shift)``. ``logsumexp`` -> replicated; ``softmax``/``log_softmax`` normalize
  each block locally -> ``x``'s layout. The backward: one sum all-reduce of
  ``grad_output * output`` (log: of ``grad_output``), then each block locally, in
  ``output``'s layout (``grad_output`` is moved there: local slicing when replicated, an
  all-to-all when sharded differently).

A ``Partial`` input is reduced first (one all-reduce of the whole tensor). Errors and
result dtypes are dense torch's, from size-<=2 stand-ins, on every rank alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dispatch_shard.ops._common import bind_arguments, in_group
from dispatch_shard.ops.layouts import split_dims
from dispatch_shard.ops.reduction import (
    all_reduced,
    begin_dim_reduction,
    implements,
    keep_box,
    layout_for,
    probe,
    reduced_dims,
    reduced_result,
    reduced_size,
)
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import Replicate

__all__: list[str] = []

aten = torch.ops.aten


# -- logsumexp -------------------------------------------------------------------------

def _shift_and_total(x: ShardedTensor, dims: tuple[int, ...], dtype: torch.dtype,
                     mask_infinite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``max`` over ``dims`` and ``sum(exp(x - max))`` (keepdim, full size): two all-reduces.
    With ``mask_infinite`` an infinite max shifts by 0 (as dense ``logsumexp``). A complex
    ``x`` shifts by the max of its real parts, as dense ``logsumexp`` does."""
    real = dtype.to_real() if dtype.is_complex else dtype
    shift = all_reduced(x, dims, real, "max", lambda block, _: (
        block.real if block.is_complex() else block).to(real).amax(dims, keepdim=True))
    if mask_infinite:
        shift.masked_fill_(shift.abs() == math.inf, 0)
    total = all_reduced(x, dims, dtype, "sum", lambda block, box: (
        block.to(dtype) - shift[keep_box(box, dims)]).exp().sum(dims, keepdim=True))
    return shift, total


@implements(aten.logsumexp.default)
def _logsumexp(func: torch._ops.OpOverload, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
    """``x.logsumexp(dims, keepdim)``: blockwise when no block splits a reduced dim
    (collectives: none); else two all-reduces (a NaN-aware max for the shift, then the sum of
    ``exp(x - shift)``) -> replicated."""
    begun = begin_dim_reduction(func, args, kwargs)
    if begun.served is not None:
        return begun.served
    _, dtypes, x, _, dims, keepdim, _ = begun
    shift, total = _shift_and_total(x, dims, dtypes[0], mask_infinite=True)
    return reduced_result(x, total.log_().add_(shift), reduced_size(x.shape, dims, keepdim),
                          dtypes[0])


# -- softmax, log_softmax and their backward ------------------------------------------

@implements(aten._softmax.default, log=False)
@implements(aten._log_softmax.default, log=True)
def _softmax(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
             log: bool) -> Any:
    """``x.softmax(dim)`` / ``log_softmax``, in ``x``'s layout: blockwise when no block splits
    ``dim`` (collectives: none); else two all-reduces of the ``dim``-reduced size (a
    NaN-aware max, then the sum of ``exp(x - max)``), then each block normalized locally."""
    bound = bind_arguments(func, args, kwargs)
    (dtype,) = probe(func, args, kwargs)
    x: ShardedTensor = args[0]._reduced()
    dims = reduced_dims(x.dim(), bound["dim"])
    if x._layout.is_replicate or not set(dims) & split_dims(x._layout):
        return x._like([func(block, *args[1:], **kwargs) for block in x._local_tensors],
                       dtype=dtype)
    if not in_group(x):
        return x._like([], dtype=dtype)
    shift, total = _shift_and_total(x, dims, dtype, mask_infinite=False)
    if log:
        total.log_()
    layout = x._layout
    blocks = []
    for block, index in zip(x._local_tensors, layout.local_indices(x._rank), strict=True):
        keep = keep_box(layout.shard_box(index), dims)
        shifted = block.to(dtype) - shift[keep]
        blocks.append(shifted - total[keep] if log else shifted.exp_().div_(total[keep]))
    return x._like(blocks, dtype=dtype)


def _operand(value: Any, anchor: ShardedTensor) -> ShardedTensor:
    """``value`` as a non-partial ShardedTensor (a plain tensor is a replicated value)."""
    if isinstance(value, ShardedTensor):
        return value._reduced()
    blocks = [value] if in_group(anchor) else []
    return anchor._like(blocks, layout_for(anchor, Replicate(), value.shape), value.dtype)


@implements(aten._softmax_backward_data.default, log=False)
@implements(aten._log_softmax_backward_data.default, log=True)
def _softmax_backward(func: torch._ops.OpOverload, args: tuple[Any, ...],
                      kwargs: dict[str, Any], log: bool) -> Any:
    """``_softmax_backward_data(grad_output, output, dim, input_dtype)`` / the log form, in
    ``output``'s layout (``grad_output`` is moved there: local slicing when replicated, an
    all-to-all when sharded differently): blockwise when no block splits ``dim``
    (collectives: none); else one sum all-reduce of the ``dim``-reduced size of
    ``grad_output * output`` (log: of ``grad_output``), then locally per block."""
    bound = bind_arguments(func, args, kwargs)
    (dtype,) = probe(func, args, kwargs)
    anchor = next(a for a in args if isinstance(a, ShardedTensor))
    grad, output = _operand(bound["grad_output"], anchor), _operand(bound["output"], anchor)
    base = grad if grad._layout.is_sharded and not output._layout.is_sharded else output
    grad, output = (t if t._layout is base._layout else t._redistributed(base._layout.spec)
                    for t in (grad, output))
    dims = reduced_dims(base.dim(), bound["dim"])
    pairs = list(zip(grad._local_tensors, output._local_tensors, strict=True))
    if base._layout.is_replicate or not set(dims) & split_dims(base._layout):
        rest = (bound["dim"], bound["input_dtype"])
        return base._like([func(g, o, *rest) for g, o in pairs], dtype=dtype)
    if not in_group(base):
        return base._like([], dtype=dtype)
    terms = [g if log else g * o for g, o in pairs]
    term_dtype = grad.dtype if log else torch.promote_types(grad.dtype, output.dtype)
    total = all_reduced(base, dims, term_dtype, "sum",
                        lambda block, _: block.sum(dims, keepdim=True), terms)
    layout = base._layout
    blocks = []
    for (g, o), index in zip(pairs, layout.local_indices(base._rank), strict=True):
        part = total[keep_box(layout.shard_box(index), dims)]
        blocks.append((g - o.exp() * part if log else o * (g - part)).to(dtype))
    return base._like(blocks, dtype=dtype)
