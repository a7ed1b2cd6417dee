"""``*_like`` factories: the result keeps the input's layout.

Per rank: each block ``[b_i]`` -> ``like(block)``; collectives: none. Random
blocks come from the rank's generator, in block order.
"""

from __future__ import annotations

from typing import Any

import torch

from dispatch_shard.ops._common import map_blocks
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

aten = torch.ops.aten

_LIKE_OPS = (aten.empty_like, aten.zeros_like, aten.ones_like, aten.rand_like,
             aten.randn_like, aten.full_like)


def _register(packet: Any) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             process_group: Any) -> ShardedTensor:
        tensor: ShardedTensor = args[0]
        kwargs = {k: v for k, v in kwargs.items() if k != "memory_format"}
        return map_blocks(tensor, lambda block: packet(block, *args[1:], **kwargs))

    impl.__name__ = impl.__qualname__ = f"sharded_{packet.__name__}"
    impl.__doc__ = f"``{packet.__name__}``: per-block, same layout; collectives: none."
    custom_sharded_op_impl(packet)(impl)


for _packet in _LIKE_OPS:
    _register(_packet)
