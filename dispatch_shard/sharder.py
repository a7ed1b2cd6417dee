"""How to shard a module: :class:`ShardingPlan` and the :class:`Sharder` interface.

A plan maps paths in a module tree to what :func:`dispatch_shard.shard_module`
does there: a :class:`~dispatch_shard.ShardingSpec` for a parameter path
(``"fc1.weight"``), or a :class:`Sharder` for a submodule path (``"ebc"``),
which returns the sharded module that replaces it.
"""

from __future__ import annotations

import abc
import dataclasses

import torch.nn as nn

from dispatch_shard.specs import ShardingSpec

__all__ = ["Sharder", "ShardingPlan"]


class Sharder(abc.ABC):
    """A sharding strategy for a whole submodule, beyond what per-parameter specs express.

    :func:`dispatch_shard.shard_module` calls :meth:`shard` with the submodule at
    the sharder's path in the plan, and puts the returned module in its place.
    Like everything in a plan, it runs on every rank of the process group.
    """

    @abc.abstractmethod
    def shard(self, module: nn.Module) -> nn.Module:
        """The sharded version of ``module`` (may be ``module`` itself, sharded in place)."""


@dataclasses.dataclass
class ShardingPlan:
    """How :func:`dispatch_shard.shard_module` shards a module.

    Args:
        plan: path -> what to do there. A parameter (or buffer) path such as
            ``"fc1.weight"`` maps to a :class:`~dispatch_shard.ShardingSpec`; a
            submodule path such as ``"ebc"`` maps to a :class:`Sharder`. A
            parameter path must not lie inside a sharder's submodule.
        output_plan: submodule path -> spec that module's ShardedTensor output is
            redistributed to (``""`` is the root module); see
            :func:`dispatch_shard.reshard_output`.
        return_local_tensor: submodule paths whose ShardedTensor output is
            replaced by this rank's local block, to continue data-parallel; see
            :func:`dispatch_shard.collect_local_shard`.

    Example, on every rank of a 2-rank job (``fc1``'s weight split by rows, ``fc2``'s by
    columns, and ``fc2``'s output handed back as this rank's rows of it)::

        import torch.distributed as dist
        from dispatch_shard import ChunkShardingSpec, ShardingPlan, shard_module
        from dispatch_shard.examples import MLP

        dist.init_process_group("gloo")
        placements = ["rank:0/cpu", "rank:1/cpu"]
        colwise = ChunkShardingSpec(0, placements)   # a weight's rows: output features
        rowwise = ChunkShardingSpec(1, placements)   # a weight's columns: input features
        model = MLP(d_model=8, hidden=16)            # rank 0's weights are scattered
        plan = ShardingPlan(
            plan={"fc1.weight": colwise, "fc2.weight": rowwise},
            output_plan={"fc2": ChunkShardingSpec(0, placements)},
            return_local_tensor=["fc2"],
        )
        shard_module(model, plan)
    """

    plan: dict[str, ShardingSpec | Sharder]
    output_plan: dict[str, ShardingSpec] | None = None
    return_local_tensor: list[str] | None = None
