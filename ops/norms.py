"""Spreads and norms: ``var``/``std`` (and their ``_mean`` forms) and
``linalg.vector_norm``, over dims.

Per rank, with ``D`` the reduced dims and ``R`` the size of the process group (the
scheme of :mod:`dispatch_shard.ops.reduction`):

* Blockwise: no block splits a dim of ``D`` (``x [M/R, N] .var(1)``, a replicated
  input). Each block ``[m_i, N] -> op(block) [m_i]``; the result's layout is the
  input's with ``D`` removed (size 1 with ``keepdim``). Collectives: none.
* Across ranks: a dim of ``D`` is split (``x [M/R, N] .std(0)``). The result needs the
  whole of each reduced slice, so it is replicated, from all-reduces of keepdim-shaped
  full-size summands (``[1, N]``):

  - ``var``/``std``: two sum all-reduces, the global mean first, then the squared
    deviations from it (NOTE [means weight by element counts] in
    :mod:`dispatch_shard.ops.reduction`); the ``_mean`` forms return that mean too.
  - ``vector_norm``: one sum all-reduce of ``|x|^ord`` (then the ``1/ord`` power); ``ord``
    = +-inf: one NaN-aware max/min all-reduce; ``ord`` = 0: a count.

A ``Partial`` input is reduced first (one all-reduce of the whole tensor). Errors and
result dtypes are dense torch's, from size-<=2 stand-ins, on every rank alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dispatch_shard.layout import Box
from dispatch_shard.ops.reduction import (
    all_reduced,
    begin_dim_reduction,
    implements,
    keep_box,
    reduced_result,
    reduced_size,
)
from dispatch_shard.sharded_tensor import ShardedTensor

__all__: list[str] = []

aten = torch.ops.aten


def _moments(x: ShardedTensor, dims: tuple[int, ...], correction: float,
             var_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Global variance and mean over ``dims`` (keepdim, full size); two sum all-reduces."""
    count = math.prod(x.shape[d] for d in dims)
    mean = all_reduced(x, dims, x.dtype, "sum",
                       lambda block, _: block.sum(dims, keepdim=True)).div_(count)

    def squares(block: torch.Tensor, box: Box) -> torch.Tensor:
        deviation = block - mean[keep_box(box, dims)]
        if deviation.is_complex():
            deviation = deviation.abs()
        return deviation.square().sum(dims, keepdim=True)

    m2 = all_reduced(x, dims, var_dtype, "sum", squares)
    return m2.div_(max(0, count - correction)), mean


@implements(aten.var.correction, aten.var_mean.correction, root=False)
@implements(aten.std.correction, aten.std_mean.correction, root=True)
def _var(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
         root: bool) -> Any:
    """``x.var(dims, correction, keepdim)``, ``std``, ``var_mean``, ``std_mean``: blockwise
    when no block splits a reduced dim (collectives: none); else two passes with the global
    mean (NOTE [means weight by element counts] in :mod:`dispatch_shard.ops.reduction`):
    one sum all-reduce for the mean, one for the squared deviations -> replicated."""
    begun = begin_dim_reduction(func, args, kwargs)
    if begun.served is not None:
        return begun.served
    bound, dtypes, x, _, dims, keepdim, _ = begun
    size = reduced_size(x.shape, dims, keepdim)
    correction = 1 if bound["correction"] is None else bound["correction"]
    var, mean = _moments(x, dims, correction, dtypes[0])
    spread = reduced_result(x, var.sqrt_() if root else var, size, dtypes[0])
    return (spread, reduced_result(x, mean, size, dtypes[1])) if len(dtypes) > 1 else spread


@implements(aten.linalg_vector_norm.default)
def _vector_norm(func: torch._ops.OpOverload, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    """``torch.linalg.vector_norm(x, ord, dims, keepdim, dtype)``: blockwise when no block
    splits a reduced dim (collectives: none); else per-rank ``sum |x|^ord``, one sum
    all-reduce and the ``1/ord`` power (``ord`` = +-inf: one NaN-aware max/min all-reduce;
    0: a count) -> replicated."""
    begun = begin_dim_reduction(func, args, kwargs)
    if begun.served is not None:
        return begun.served
    bound, dtypes, x, _, dims, keepdim, _ = begun
    size, (dtype,) = reduced_size(x.shape, dims, keepdim), dtypes
    order, cast = bound["ord"], bound["dtype"]
    if order in (math.inf, -math.inf, 0):
        op = "max" if order == math.inf else "min" if order == -math.inf else "sum"
        total = all_reduced(x, dims, dtype, op, lambda block, _: torch.linalg.vector_norm(
            block, order, dims, keepdim=True, dtype=cast))
        return reduced_result(x, total, size, dtype)

    def powers(block: torch.Tensor, _: Box) -> torch.Tensor:
        value = block if cast is None else block.to(cast)
        return value.abs().to(dtype).pow(order).sum(dims, keepdim=True)

    total = all_reduced(x, dims, dtype, "sum", powers)
    norm = total if order == 1 else total.sqrt_() if order == 2 else total.pow_(1 / order)
    return reduced_result(x, norm, size, dtype)
