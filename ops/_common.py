"""Helpers shared by the op families."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dispatch_shard.sharded_tensor import ShardedTensor

__all__ = ["map_blocks"]


def map_blocks(
    tensor: ShardedTensor, fn: Callable[[torch.Tensor], torch.Tensor], dtype: Any = None
) -> ShardedTensor:
    """``fn`` applied to each local block; same layout. ``dtype`` defaults to the result's."""
    blocks = [fn(t) for t in tensor._local_tensors]
    if dtype is None:
        dtype = blocks[0].dtype if blocks else tensor.dtype
    return tensor._like(blocks, dtype=dtype)
