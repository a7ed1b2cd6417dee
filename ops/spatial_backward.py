"""Backward kernels of the resampling ops, and the forwards they pair with: upsampling
(nearest, nearest-exact, linear, bilinear, bicubic, trilinear, the anti-aliased 2-D
forms), adaptive average / max pooling, fractional max pooling, replication and
reflection padding and grid sampling.

Like :mod:`dispatch_shard.ops.spatial`, these ops mix values within one sample's
trailing (spatial) dims only: pooling, upsampling and padding act on each ``[N, C]``
plane alone, grid sampling on each sample alone. So when the blocks split only the
dims before those (batch and channels for pooling, upsampling and padding; the batch
for grid sampling), each rank runs the op on its blocks. Per rank, with ``b`` a block's
leading extent:

- ``upsample_*_backward(grad [b..., *out], input_size)`` -> ``grad_input [b..., *in]``
  (the block's ``input_size`` has the block's leading sizes);
- ``_adaptive_avg_pool{2,3}d_backward``, ``adaptive_max_pool{2,3}d_backward``,
  ``fractional_max_pool{2,3}d_backward``, ``replication_pad{1,2,3}d_backward``,
  ``reflection_pad{1,2,3}d_backward``:
  ``(grad [b..., *out], self [b..., *in], [indices [b..., *out]])`` -> ``[b..., *in]``;
- forwards: ``adaptive_max_pool{2,3}d(self [b..., *in])`` -> ``(out, indices) [b...,
  *out]`` (indices are within a plane, so per block is dense's), ``_adaptive_avg_pool3d``
  and ``_upsample_bilinear2d_aa`` likewise, ``grid_sampler_3d(input [b, C, *in], grid
  [b, *out, 3])`` -> ``[b, C, *out]``;
- ``grid_sampler_{2,3}d_backward(grad [b, C, *out], input [b, C, *in], grid [b, *out,
  d])`` -> ``(grad_input [b, C, *in], grad_grid [b, *out, d])``.

Results take the blocks of the input (or ``self``). Collectives: none. Any other layout
(a split spatial dim, channels split for grid sampling, operands in different blocks,
pending sums) computes on the whole value (NOTE [replicated fallback] in
:mod:`dispatch_shard.ops.view`): correct, one gather per operand, a replicated result.
Dense's errors first, on every rank (a one-sample stand-in, or meta tensors).
"""

from __future__ import annotations

from typing import Any

import torch

from dispatch_shard.ops._common import (
    bind_arguments,
    blockwise,
    meta_results,
    replicated_fallback,
)
from dispatch_shard.ops.layouts import like_leading, split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

aten = torch.ops.aten

__all__: list[str] = []


# -- upsampling: only the gradient is a tensor; the input's size is an argument ---------

def _upsample_backward(func: torch._ops.OpOverload, spatial: int) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        bound = bind_arguments(func, args, kwargs)
        grad, input_size = bound["grad_output"], [int(n) for n in bound["input_size"]]
        lead = len(input_size) - spatial
        if (type(grad) is not ShardedTensor or not grad._layout.is_sharded
                or grad.dim() != len(input_size) or split_dims(grad._layout) - set(range(lead))):
            return replicated_fallback(func, args, kwargs)
        ((_, dtype),) = meta_results(func, args, kwargs)  # dense's errors, every rank
        layout = like_leading(grad._layout, lead, torch.Size(input_size))
        rest = {k: v for k, v in bound.items() if k not in ("grad_output", "input_size")}
        blocks = []
        for block, j in zip(grad._local_tensors, layout.local_indices(grad._rank), strict=True):
            sizes = layout.shards[j].shard_sizes
            if block.numel() == 0:
                blocks.append(torch.zeros(sizes, dtype=dtype, device=block.device))
            else:
                blocks.append(func(block, input_size=[*block.shape[:lead], *input_size[lead:]],
                                   **rest))
        return grad._like(blocks, layout, dtype)

    impl.__name__ = impl.__qualname__ = f"resample_{func.name().split('::')[1]}"
    impl.__doc__ = (f"``{func}`` per block when no block splits the resampled dims "
                    "(collectives: none), else on the whole value; see the module docstring.")
    custom_sharded_op_impl(func, handles_partial=True)(impl)


for _func, _spatial in (
    (aten.upsample_nearest1d_backward.default, 1),
    (aten._upsample_nearest_exact1d_backward.default, 1),
    (aten.upsample_linear1d_backward.default, 1),
    (aten.upsample_nearest2d_backward.default, 2),
    (aten._upsample_nearest_exact2d_backward.default, 2),
    (aten.upsample_bilinear2d_backward.default, 2),
    (aten.upsample_bicubic2d_backward.default, 2),
    (aten._upsample_bilinear2d_aa_backward.default, 2),
    (aten._upsample_bicubic2d_aa_backward.default, 2),
    (aten.upsample_nearest3d_backward.default, 3),
    (aten._upsample_nearest_exact3d_backward.default, 3),
    (aten.upsample_trilinear3d_backward.default, 3),
):
    _upsample_backward(_func, _spatial)


# -- pooling, padding, grid sampling: tensors in the same blocks --------------------------

def _per_block(func: torch._ops.OpOverload, spatial: int | None, split: tuple[int, ...],
               outputs: tuple[int, ...]) -> None:
    """``func`` per block: the arguments at ``split`` are cut alike along their dims before
    the last ``spatial`` ones of argument ``split[1]`` (``None``: along the batch dim
    only); output ``k`` takes the blocks of argument ``outputs[k]``."""
    anchor = split[1] if len(split) > 1 else split[0]

    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        if kwargs or len(args) <= max(split) or not isinstance(args[anchor], ShardedTensor):
            return replicated_fallback(func, args, kwargs)
        lead = 1 if spatial is None else args[anchor].dim() - spatial
        return blockwise(func, args, kwargs, split, lead, (), outputs)

    impl.__name__ = impl.__qualname__ = f"resample_{func.name().split('::')[1]}"
    impl.__doc__ = (f"``{func}`` per block when no block splits the dims it mixes "
                    "(collectives: none), else on the whole value; see the module docstring.")
    custom_sharded_op_impl(func, handles_partial=True)(impl)


_PER_BLOCK: tuple[tuple[torch._ops.OpOverload, int | None, tuple[int, ...], tuple[int, ...]],
                  ...] = (
    # forwards whose per-block results their backward reads in the same blocks
    (aten._adaptive_avg_pool3d.default, 3, (0,), (0,)),
    (aten._upsample_bilinear2d_aa.default, 2, (0,), (0,)),
    (aten.grid_sampler_3d.default, None, (0, 1), (0,)),
    (aten.adaptive_max_pool2d.default, 2, (0,), (0, 0)),
    (aten.adaptive_max_pool3d.default, 3, (0,), (0, 0)),
    # (grad_output, self, ...): the gradient takes self's blocks
    (aten._adaptive_avg_pool2d_backward.default, 2, (0, 1), (1,)),
    (aten._adaptive_avg_pool3d_backward.default, 3, (0, 1), (1,)),
    (aten.adaptive_max_pool2d_backward.default, 2, (0, 1, 2), (1,)),
    (aten.adaptive_max_pool3d_backward.default, 3, (0, 1, 2), (1,)),
    (aten.fractional_max_pool2d_backward.default, 2, (0, 1, 4), (1,)),
    (aten.fractional_max_pool3d_backward.default, 3, (0, 1, 4), (1,)),
    (aten.replication_pad1d_backward.default, 1, (0, 1), (1,)),
    (aten.replication_pad2d_backward.default, 2, (0, 1), (1,)),
    (aten.replication_pad3d_backward.default, 3, (0, 1), (1,)),
    (aten.reflection_pad1d_backward.default, 1, (0, 1), (1,)),
    (aten.reflection_pad2d_backward.default, 2, (0, 1), (1,)),
    (aten.reflection_pad3d_backward.default, 3, (0, 1), (1,)),
    # (grad_output, input, grid, ...): per sample
    (aten.grid_sampler_2d_backward.default, None, (0, 1, 2), (1, 2)),
    (aten.grid_sampler_3d_backward.default, None, (0, 1, 2), (1, 2)),
)

for _func, _mixed, _split, _outputs in _PER_BLOCK:
    _per_block(_func, _mixed, _split, _outputs)
