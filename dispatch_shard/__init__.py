"""dispatch_shard: sharded tensors as first-class PyTorch tensors.

A :class:`ShardedTensor` is a ``torch.Tensor`` whose blocks live on the ranks of
a process group; aten ops on it are served shard by shard by the op registry
(:func:`custom_sharded_op_impl`), below autograd, so models and plain
``torch.optim`` optimizers use it like a dense tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# NOTE [torch.distributed.nn is imported with the package]
# torch.distributed.nn.functional binds ``group.WORLD`` as a default argument when it
# is imported. torch imports it lazily (through torch._dynamo, which the meta runs
# of some decompositions load): imported after init_process_group, it keeps the
# default group, with gloo's threads, alive after destroy_process_group until the
# interpreter tears modules down at exit, where destroying it can abort the process
# ("terminate called without an active exception"). Imported here, before a program
# usually initializes its process group, the default it binds is None.
import torch.distributed.nn  # noqa: F401

# The built-in op implementations register themselves on import.
from dispatch_shard import authoring, debug, grad_reduction, holders, mesh_rules, ops, random
from dispatch_shard.api import (
    collect_local_shard,
    reshard_output,
    shard_module,
    shard_parameter,
    shard_tensor,
)
from dispatch_shard.creation import empty, full, ones, rand, randn, unchecked_creation, zeros
from dispatch_shard.data_parallel import data_parallel
from dispatch_shard.grad_reduction import no_sync, set_gradient_bucketing
from dispatch_shard.mesh import distribute_tensor, from_dtensor, to_dtensor
from dispatch_shard.metadata import (
    Placement,
    Shard,
    ShardedTensorMetadata,
    ShardMetadata,
    TensorProperties,
)
from dispatch_shard.named_optimizer import NamedOptimizer
from dispatch_shard.observe import count_collectives, sharding_svg, visualize_sharding
from dispatch_shard.registry import custom_sharded_op_impl, remove_sharded_op_impl
from dispatch_shard.rules import ShardingRule, register_sharding_rule
from dispatch_shard.sharded_tensor import ShardedTensor, load_with_process_group
from dispatch_shard.sharder import Sharder, ShardingPlan
from dispatch_shard.specs import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    MeshShardingSpec,
    Partial,
    Replicate,
    ShardingSpec,
)
from dispatch_shard.state_dict import pre_load_state_dict_hook, state_dict_hook

if TYPE_CHECKING:
    from dispatch_shard import checkpoint

__all__ = [
    "ChunkShardingSpec",
    "EnumerableShardingSpec",
    "MeshShardingSpec",
    "NamedOptimizer",
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
    "ShardMetadata",
    "ShardedTensor",
    "ShardedTensorMetadata",
    "Sharder",
    "ShardingPlan",
    "ShardingRule",
    "ShardingSpec",
    "TensorProperties",
    "authoring",
    "checkpoint",
    "collect_local_shard",
    "count_collectives",
    "custom_sharded_op_impl",
    "data_parallel",
    "debug",
    "distribute_tensor",
    "empty",
    "from_dtensor",
    "full",
    "grad_reduction",
    "holders",
    "load_with_process_group",
    "mesh_rules",
    "no_sync",
    "ones",
    "ops",
    "pre_load_state_dict_hook",
    "rand",
    "randn",
    "random",
    "register_sharding_rule",
    "remove_sharded_op_impl",
    "reshard_output",
    "set_gradient_bucketing",
    "shard_module",
    "shard_parameter",
    "shard_tensor",
    "sharding_svg",
    "state_dict_hook",
    "to_dtensor",
    "unchecked_creation",
    "visualize_sharding",
    "zeros",
]


def __getattr__(name: str) -> Any:
    # dispatch_shard.checkpoint imports torch.distributed.checkpoint (and DTensor),
    # about a second: it is imported on first use, not with the package.
    if name == "checkpoint":
        import importlib

        return importlib.import_module("dispatch_shard.checkpoint")
    raise AttributeError(f"module 'dispatch_shard' has no attribute {name!r}")
