"""Spatial ops on batches split across ranks: convolution and average / max pooling,
forward and backward (the 1-D forms reach the dispatch as their 2-D ops).

These ops mix values within one sample's spatial dims (and, for convolution, its
channels) only. So when the blocks split the batch dim alone (for pooling: any dims
before the pooled ones), each rank runs the op on its blocks, with the weight whole:
data-parallel CNNs. Results take the input's blocks; the gradients of a
convolution's weight and bias are sums over the batch, so each rank's is its share of
a ``Partial("sum")`` (no collective until the value is needed; a parameter's
gradient hook reduces it to the parameter's layout). Collectives: none, but a
sharded weight is gathered.

Any other layout (split spatial dims or channels) computes on the whole value (NOTE
[replicated fallback] in :mod:`dispatch_shard.ops.view`): correct, one gather.

Dense's errors first, on every rank: the op runs on a CPU stand-in of one sample.
"""

from __future__ import annotations

from typing import Any

import torch

from dispatch_shard.ops._common import blockwise, replicated_fallback
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

aten = torch.ops.aten

__all__: list[str] = []


def _pool(func: torch._ops.OpOverload, spatial: int, backward: bool, indices: bool) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        x = args[1] if backward else args[0]
        if not isinstance(x, ShardedTensor):
            return replicated_fallback(func, args, kwargs)
        lead = x.dim() - spatial
        if backward:  # (grad_output, self, ..., [indices]): the gradient takes self's blocks
            split = (0, 1, len(args) - 1) if indices else (0, 1)
            return blockwise(func, args, kwargs, split, lead, (), (1,))
        return blockwise(func, args, kwargs, (0,), lead, (), (0, 0) if indices else (0,))

    impl.__name__ = impl.__qualname__ = f"pool_{func.name().split('::')[1]}"
    impl.__doc__ = (f"``{func}`` per block when no block splits the pooled dims (collectives: "
                    "none), else on the whole value; see the module docstring.")
    custom_sharded_op_impl(func, handles_partial=True)(impl)


for _func, _spatial, _backward, _indices in (
    (aten.avg_pool2d.default, 2, False, False),
    (aten.avg_pool3d.default, 3, False, False),
    (aten.avg_pool2d_backward.default, 2, True, False),
    (aten.avg_pool3d_backward.default, 3, True, False),
    (aten.max_pool2d_with_indices.default, 2, False, True),
    (aten.max_pool3d_with_indices.default, 3, False, True),
    (aten.max_pool2d_with_indices_backward.default, 2, True, True),
    (aten.max_pool3d_with_indices_backward.default, 3, True, True),
):
    _pool(_func, _spatial, _backward, _indices)


@custom_sharded_op_impl(aten.convolution.default, handles_partial=True)
def convolution(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``convolution(input, weight, bias, ...)`` per batch block of ``input`` with the weight
    and bias whole (collectives: none; a sharded weight: the fallback)."""
    if not isinstance(args[0], ShardedTensor) or args[0].dim() < 3:
        return replicated_fallback(aten.convolution.default, args, kwargs)
    return blockwise(aten.convolution.default, args, kwargs, (0,), 1, (1, 2), (0,))


@custom_sharded_op_impl(aten.convolution_backward.default, handles_partial=True)
def convolution_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                         pg: Any) -> Any:
    """``(grad_input, grad_weight, grad_bias)`` per batch block of ``grad_output`` and
    ``input``: ``grad_input`` takes the input's blocks; the weight's and bias's gradients
    are this rank's shares of ``Partial("sum")`` (collectives: none)."""
    x = args[1]
    if not isinstance(x, ShardedTensor) or x.dim() < 3:
        return replicated_fallback(aten.convolution_backward.default, args, kwargs)
    return blockwise(aten.convolution_backward.default, args, kwargs, (0, 1), 1, (2,),
                      (1, "sum", "sum"))

