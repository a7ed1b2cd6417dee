"""Attention: ``F.scaled_dot_product_attention`` on heads (or batches) split across ranks.

On CPU, ``scaled_dot_product_attention`` reaches the dispatch as
``_scaled_dot_product_flash_attention_for_cpu`` (and its ``_backward``). Attention
mixes positions within one (batch, head) pair only, so when ``query``, ``key``,
``value`` (and the backward's ``grad_out``, ``out``, ``logsumexp``) are split along
the batch and head dims alone (dims 0 and 1), in the same blocks, each rank runs the
kernel on its blocks: tensor parallelism's column-parallel Q/K/V projections, viewed
as heads, give exactly this. Collectives: none. Results take the query's blocks
(``out [B, H, L, Ev]``, ``logsumexp [B, H, L]``) and each gradient its input's.

Any other layout (a split sequence or feature dim, blocks that differ between the
operands, a sharded mask) computes on whole operands (NOTE [replicated fallback] in
:mod:`dispatch_shard.ops.view`): correct, but it gathers.
"""

from __future__ import annotations

from typing import Any

import torch

from dispatch_shard.layout import Layout
from dispatch_shard.ops._common import empty_results, meta_call, replicated_fallback
from dispatch_shard.ops.layouts import leading_boxes, like_leading, split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

aten = torch.ops.aten

__all__: list[str] = []


def _heads(layout: Layout) -> tuple[Any, ...] | None:
    """The blocks' (batch, head) extents and placements, when nothing else is split."""
    if layout.is_partial or len(layout.size) < 3 or split_dims(layout) - {0, 1}:
        return None
    return leading_boxes(layout, 2)


def _blockwise(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
               tensors: tuple[int, ...], outputs: tuple[int, ...]) -> Any:
    """``func`` per block when the tensor arguments at ``tensors`` share their (batch, head)
    blocks and nothing else is split; else the replicated fallback. Output ``k`` takes the
    blocks of argument ``outputs[k]``."""
    operands = [args[i] for i in tensors]
    if any(kwargs.get(k) is not None for k in ("attn_mask",)) or not all(
            type(t) is ShardedTensor for t in operands):
        return replicated_fallback(func, args, kwargs)
    first = operands[0]
    heads = _heads(first._layout)
    if heads is None or not first._layout.is_sharded or any(
            t._layout.group_ranks != first._layout.group_ranks
            or _heads(t._layout) != heads for t in operands[1:]):
        return replicated_fallback(func, args, kwargs)
    count = len(first._local_tensors)
    results = []
    for b in range(count):
        block_args = list(args)
        for i in tensors:
            block_args[i] = args[i]._local_tensors[b]
        if first._local_tensors[b].numel() == 0:
            # No (batch, head) pair here: empty results of the right shapes (the CPU
            # kernel divides by the head count: SIGFPE on an empty block).
            results.append(empty_results(func, block_args, kwargs, first.device))
            continue
        results.append(func(*block_args, **kwargs))
    if not results:  # this rank holds no block: shapes and dtypes from meta stand-ins
        shapes = meta_call(func, args, kwargs)
    else:
        shapes = results[0]
    outs = []
    for k, source in enumerate(outputs):
        anchor: ShardedTensor = args[source]
        size = torch.Size(_global_size(anchor, shapes[k]))
        layout = like_leading(anchor._layout, 2, size)
        outs.append(anchor._like([r[k] for r in results], layout, shapes[k].dtype))
    return tuple(outs)


def _global_size(anchor: ShardedTensor, local: torch.Tensor) -> list[int]:
    """A result's global size: the anchor's (batch, head) dims, the local result's others."""
    return [*anchor.shape[:2], *local.shape[2:]]


@custom_sharded_op_impl(aten._scaled_dot_product_flash_attention_for_cpu.default,
                        handles_partial=True)
def flash_attention(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``(out, logsumexp)`` of ``scaled_dot_product_attention``, per (batch, head) block of
    ``query``/``key``/``value``; no collectives (other layouts: the replicated fallback)."""
    return _blockwise(aten._scaled_dot_product_flash_attention_for_cpu.default, args, kwargs,
                      tensors=(0, 1, 2), outputs=(0, 0))


@custom_sharded_op_impl(aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                        handles_partial=True)
def flash_attention_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                             pg: Any) -> Any:
    """``(grad_query, grad_key, grad_value)`` per (batch, head) block of ``grad_out``,
    ``query``, ``key``, ``value``, ``out`` and ``logsumexp``; no collectives."""
    return _blockwise(aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                      args, kwargs, tensors=(0, 1, 2, 3, 4, 5), outputs=(1, 2, 3))
