"""dispatch_shard: sharded tensors as first-class PyTorch tensors.

A :class:`ShardedTensor` is a ``torch.Tensor`` whose blocks live on the ranks of
a process group; aten ops on it are served shard by shard by the op registry
(:func:`custom_sharded_op_impl`), below autograd, so models and plain
``torch.optim`` optimizers use it like a dense tensor.
"""

from __future__ import annotations

# The built-in op implementations register themselves on import.
from dispatch_shard import ops
from dispatch_shard.creation import empty, full, ones, rand, randn, zeros
from dispatch_shard.metadata import (
    Placement,
    Shard,
    ShardedTensorMetadata,
    ShardMetadata,
    TensorProperties,
)
from dispatch_shard.registry import custom_sharded_op_impl, remove_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor, load_with_process_group
from dispatch_shard.specs import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    Partial,
    Replicate,
    ShardingSpec,
)

__all__ = [
    "ChunkShardingSpec",
    "EnumerableShardingSpec",
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
    "ShardMetadata",
    "ShardedTensor",
    "ShardedTensorMetadata",
    "ShardingSpec",
    "TensorProperties",
    "custom_sharded_op_impl",
    "empty",
    "full",
    "load_with_process_group",
    "ones",
    "ops",
    "rand",
    "randn",
    "remove_sharded_op_impl",
    "zeros",
]
