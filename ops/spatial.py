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

from dispatch_shard.layout import layout_of
from dispatch_shard.ops._common import replicated_fallback
from dispatch_shard.ops.layouts import leading_boxes, like_leading, split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import Partial

aten = torch.ops.aten

__all__: list[str] = []


def _replicated_value(value: Any) -> Any:
    """A replicated or plain tensor as a plain tensor; None for anything else."""
    if isinstance(value, ShardedTensor):
        if not value._layout.is_replicate:
            return None
        return value._local_tensors[0] if value._local_tensors else torch.empty(
            value.shape, dtype=value.dtype, device=value.device)
    return value


def _blockwise(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
               split: tuple[int, ...], lead: int, whole: tuple[int, ...],
               outputs: tuple[int | str, ...]) -> Any:
    """``func`` per block: the arguments at ``split`` share their blocks along their first
    ``lead`` dims and are whole after them; those at ``whole`` are plain or replicated.
    Output ``k`` takes the blocks of argument ``outputs[k]``, or is a ``Partial("sum")``
    (``"sum"``: a sum over the batch, like a weight's gradient). Else the fallback."""
    operands = [args[i] for i in split]
    first = operands[0]
    if not all(type(t) is ShardedTensor and not t._layout.is_partial for t in operands) \
            or not first._layout.is_sharded or first.dim() <= lead:
        return replicated_fallback(func, args, kwargs)
    boxes = leading_boxes(first._layout, lead)
    if any(split_dims(t._layout) - set(range(lead)) or leading_boxes(t._layout, lead) != boxes
           or t._layout.group_ranks != first._layout.group_ranks for t in operands):
        return replicated_fallback(func, args, kwargs)
    plain = list(args)
    for i in whole:
        if args[i] is not None:
            plain[i] = _replicated_value(args[i])
            if plain[i] is None:
                return replicated_fallback(func, args, kwargs)
    # Dense's errors on every rank, and the results' trailing sizes and dtypes: the op on
    # one sample (leading dims of size <= 1).
    sample = list(plain)
    for i in split:
        t = args[i]
        sample[i] = torch.zeros([min(n, 1) if d < lead else n for d, n in enumerate(t.shape)],
                                dtype=t.dtype, device=t.device)
    probe = func(*sample, **kwargs)
    probes = probe if isinstance(probe, tuple | list) else (probe,)
    results: list[Any] = []
    for b in range(len(first._local_tensors)):
        block_args = list(plain)
        for i in split:
            block_args[i] = args[i]._local_tensors[b]
        if first._local_tensors[b].numel() == 0:
            results.append(None)
            continue
        out = func(*block_args, **kwargs)
        results.append(out if isinstance(out, tuple | list) else (out,))
    outs: list[Any] = []
    for k, source in enumerate(outputs):
        p = probes[k]
        if p is None:
            outs.append(None)
            continue
        if source == "sum":
            share = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            for r in results:
                if r is not None and r[k] is not None:
                    share += r[k]
            layout = layout_of(Partial(), p.shape, first._layout.group_ranks,
                               first._layout.device or str(first.device))
            member = bool(layout.local_indices(first._rank))
            outs.append(first._like([share] if member else [], layout, p.dtype))
            continue
        anchor: ShardedTensor = args[source]  # type: ignore[index]
        size = torch.Size([*anchor.shape[:lead], *p.shape[lead:]])
        layout = like_leading(anchor._layout, lead, size)
        blocks = []
        for r, j in zip(results, layout.local_indices(first._rank), strict=True):
            if r is None:
                blocks.append(torch.empty(layout.shards[j].shard_sizes, dtype=p.dtype,
                                          device=p.device))
            else:
                blocks.append(r[k])
        outs.append(anchor._like(blocks, layout, p.dtype))
    return tuple(outs) if isinstance(probe, tuple | list) else outs[0]


def _pool(func: torch._ops.OpOverload, spatial: int, backward: bool, indices: bool) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        x = args[1] if backward else args[0]
        if not isinstance(x, ShardedTensor):
            return replicated_fallback(func, args, kwargs)
        lead = x.dim() - spatial
        if backward:  # (grad_output, self, ..., [indices]): the gradient takes self's blocks
            split = (0, 1, len(args) - 1) if indices else (0, 1)
            return _blockwise(func, args, kwargs, split, lead, (), (1,))
        return _blockwise(func, args, kwargs, (0,), lead, (), (0, 0) if indices else (0,))

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
    return _blockwise(aten.convolution.default, args, kwargs, (0,), 1, (1, 2), (0,))


@custom_sharded_op_impl(aten.convolution_backward.default, handles_partial=True)
def convolution_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                         pg: Any) -> Any:
    """``(grad_input, grad_weight, grad_bias)`` per batch block of ``grad_output`` and
    ``input``: ``grad_input`` takes the input's blocks; the weight's and bias's gradients
    are this rank's shares of ``Partial("sum")`` (collectives: none)."""
    x = args[1]
    if not isinstance(x, ShardedTensor) or x.dim() < 3:
        return replicated_fallback(aten.convolution_backward.default, args, kwargs)
    return _blockwise(aten.convolution_backward.default, args, kwargs, (0, 1), 1, (2,),
                      (1, "sum", "sum"))

