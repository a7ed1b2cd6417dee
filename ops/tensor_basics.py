"""Aliasing, copying and whole-tensor queries.

``detach``/``alias``: new wrapper, the same blocks; collectives: none.
``clone``: copies each block; collectives: none.
These three keep any layout, N-D ones (and their pending terms) included.
``is_pinned``: every local block pinned; collectives: none.
``equal``: local ``torch.equal`` per block, then an all-reduce(min) of the verdict.
"""

from __future__ import annotations

from typing import Any

import torch

from dispatch_shard import collectives
from dispatch_shard.ops._common import map_blocks
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

aten = torch.ops.aten


@custom_sharded_op_impl(aten.detach.default, handles_partial=True, handles_mesh="pending")
def detach(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], process_group: Any) -> Any:
    """``x -> x``: a new ShardedTensor on the same blocks (detached); no collectives."""
    tensor: ShardedTensor = args[0]
    return tensor._like(list(tensor._local_tensors))


custom_sharded_op_impl(aten.alias.default, handles_partial=True, handles_mesh="pending")(detach)


@custom_sharded_op_impl(aten.clone.default, handles_partial=True, handles_mesh="pending")
def clone(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], process_group: Any) -> Any:
    """``x -> copy of x``, each block cloned contiguous; no collectives."""
    return map_blocks(args[0], lambda block: block.clone())


@custom_sharded_op_impl(aten.is_pinned.default, handles_partial=True, handles_mesh="pending")
def is_pinned(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
              process_group: Any) -> bool:
    """True when this rank holds blocks and all are pinned; no collectives."""
    blocks = args[0]._local_tensors
    return bool(blocks) and all(b.is_pinned() for b in blocks)


@custom_sharded_op_impl(aten.equal.default, handles_partial=True)
def equal(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], process_group: Any) -> bool:
    """Same size and values on every rank; one all-reduce(min) of the local verdict.

    Operands with different layouts are compared after moving the second to
    the first's layout; a plain operand is a replicated value, compared block by block.
    """
    first, second = args
    if not isinstance(first, ShardedTensor):
        first, second = second, first
    if first.shape != second.shape:
        return False
    first = first._reduced()
    layout = first._layout
    if isinstance(second, ShardedTensor):
        second = second._reduced()
        if second._layout is not layout:
            second = second._redistributed(layout.spec)
        others = list(second._local_tensors)
    else:
        # A plain tensor is a replicated value: each block meets its own part of it.
        others = [second[layout.shard_box(i)] for i in layout.local_indices(first._rank)]
    verdict = all(
        torch.equal(a, b) for a, b in zip(first._local_tensors, others, strict=True)
    )
    group = first._process_group
    if not collectives.is_member(group, first._rank):
        return verdict
    flag = torch.tensor([1 if verdict else 0], dtype=torch.int32, device=first.device)
    return bool(collectives.all_reduce(flag, "min", group).item())


@custom_sharded_op_impl(aten._local_scalar_dense.default, handles_partial=True)
def local_scalar_dense(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                       process_group: Any) -> Any:
    """``x.item()`` of a one-element tensor: the Python number on every rank. Replicated:
    local; sharded or partial: whichever collective ``full_tensor`` needs (every rank of the
    group calls ``item()``, as with any collective)."""
    tensor: ShardedTensor = args[0]
    if tensor.numel() != 1:
        raise RuntimeError(
            f"a Tensor with {tensor.numel()} elements cannot be converted to Scalar")
    if tensor._layout.is_replicate and tensor._local_tensors:
        return tensor._local_tensors[0].item()
    return tensor.full_tensor().item()


@custom_sharded_op_impl(aten.allclose.default, handles_partial=True)
def allclose(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             process_group: Any) -> bool:
    """``torch.allclose(a, b, rtol, atol, equal_nan)``: ``isclose`` (pointwise, operands
    moved to one layout) then ``all()`` (one all-reduce); a Python bool on every rank."""
    first, second = args[0], args[1]
    options = dict(zip(("rtol", "atol", "equal_nan"), args[2:], strict=False))
    options.update(kwargs)
    return bool(torch.isclose(first, second, **options).all().item())
