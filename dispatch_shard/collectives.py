"""Every collective dispatch_shard issues goes through this module.

The process group decides the transport: gloo for CPU shards, NCCL for CUDA
shards (a ``"cpu:gloo,cuda:nccl"`` group picks by device). Data-movement
collectives ship raw bytes (any dtype viewed as ``uint8``), so bool, complex
and low-precision tensors move the same way on every backend.

Ranks outside a tensor's process group hold none of its blocks and never issue
its collectives.

NOTE [rank-consistent errors]
Validation that can fail on some ranks only (a local tensor of the wrong
shape, a different global size...) must not raise there while the other ranks
enter a collective and wait forever. :func:`raise_if_any` exchanges each
rank's verdict first and raises the same error on every rank.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from dispatch_shard.layout import Layout, redistribute_plan

__all__ = [
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "group_ranks",
    "is_member",
    "raise_if_any",
    "redistribute",
    "reduce_scatter",
    "resolve_group",
]

ProcessGroup = dist.ProcessGroup

# Observers of every collective issued: called with (kind, bytes, group).
_observers: list[Callable[[str, int, ProcessGroup], None]] = []
# The ops being dispatched, outermost first; kept only while an observer is active.
_op_stack: list[Any] = []


def _record(kind: str, nbytes: int, group: ProcessGroup) -> None:
    for observer in _observers:
        observer(kind, nbytes, group)


def resolve_group(process_group: ProcessGroup | None) -> ProcessGroup:
    """``process_group`` or the default group; a clear error when none exists."""
    if process_group is not None:
        return process_group
    if not dist.is_initialized():
        raise RuntimeError(
            "Need to initialize default process group using dist.init_process_group() first"
        )
    group = dist.distributed_c10d._get_default_group()
    return group


@functools.lru_cache(maxsize=256)
def _ranks_of(group: ProcessGroup) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


# NOTE [ranks outside a subgroup]
# On a rank outside it, ``dist.new_group`` returns the sentinel
# ``GroupMember.NON_GROUP_MEMBER`` (an int), the same for every such group;
# torch maps it to the ranks of the latest group created without this rank.
# So it is never cached, and is never a member.

def group_ranks(group: ProcessGroup) -> tuple[int, ...]:
    """The global ranks of ``group``, in group-rank order (cached for real groups)."""
    if not isinstance(group, ProcessGroup):
        return tuple(dist.get_process_group_ranks(group))
    return _ranks_of(group)


def is_member(group: ProcessGroup, rank: int) -> bool:
    return isinstance(group, ProcessGroup) and rank in _ranks_of(group)


# -- agreement ---------------------------------------------------------------

_ERROR_TYPES: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (ValueError, TypeError, RuntimeError, NotImplementedError, IndexError, KeyError,
                AttributeError)
}


def all_gather_object(obj: Any, group: ProcessGroup) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    _record("all_gather_object", 0, group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def raise_if_any(error: Exception | None, group: ProcessGroup) -> None:
    """Raise on every rank of ``group`` if ``error`` is set on any (see NOTE above).

    The first failing rank's error is raised everywhere, with its type and a
    note of which rank found it.
    """
    if dist.get_world_size(group) == 1:
        if error is not None:
            raise error
        return
    reports = all_gather_object(
        None if error is None else (type(error).__name__, str(error)), group
    )
    for group_rank, report in enumerate(reports):
        if report is not None:
            kind, message = report
            exc_type = _ERROR_TYPES.get(kind, RuntimeError)
            rank = _ranks_of(group)[group_rank]
            if error is not None and group_rank == dist.get_rank(group):
                raise error
            raise exc_type(f"{message} (raised on rank {rank})")


# -- reductions ----------------------------------------------------------------

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.SUM,  # gloo has no AVG: divide afterwards
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}


def _divide(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """``tensor /= count`` in place; integer tensors keep their dtype (floor division)."""
    if tensor.is_floating_point() or tensor.is_complex():
        return tensor.div_(count)
    return tensor.div_(count, rounding_mode="floor")


def all_reduce(tensor: torch.Tensor, op: str, group: ProcessGroup) -> torch.Tensor:
    """Reduce ``tensor`` in place across ``group`` (``op`` in sum/avg/max/min/product).

    Floating ``max``/``min`` propagate NaN like ``torch.maximum`` (see NOTE [NaN in max/min]).
    """
    if op in ("max", "min") and tensor.is_floating_point():
        return _all_reduce_nan_aware(tensor, op, group)
    _record("all_reduce", tensor.numel() * tensor.element_size(), group)
    dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group)
    if op == "avg":
        _divide(tensor, dist.get_world_size(group))
    return tensor


# NOTE [NaN in max/min]
# gloo's MAX/MIN keep a NaN only when it is already in the receiving buffer
# (``a < b ? b : a``), so whether a NaN survives depends on which rank held it.
# A float max/min all-reduce therefore ships a NaN flag per element beside the
# values, in the same buffer (one collective, twice the bytes): +1 for max,
# -1 for min, so the same reduction op finds whether any rank had a NaN.

def _all_reduce_nan_aware(tensor: torch.Tensor, op: str, group: ProcessGroup) -> torch.Tensor:
    flat = tensor.reshape(-1)
    flags = flat.isnan().to(tensor.dtype)
    buffer = torch.cat([flat, flags if op == "max" else flags.neg_()])
    _record("all_reduce", buffer.numel() * buffer.element_size(), group)
    dist.all_reduce(buffer, op=_REDUCE_OPS[op], group=group)
    values, flags = buffer[:flat.numel()], buffer[flat.numel():]
    values.masked_fill_(flags != 0, float("nan"))
    tensor.copy_(values.view(tensor.shape))
    return tensor


def reduce_scatter(
    output: torch.Tensor, inputs: list[torch.Tensor], op: str, group: ProcessGroup
) -> torch.Tensor:
    """``output`` on group rank r receives the reduction of every rank's ``inputs[r]``."""
    _record("reduce_scatter", sum(t.numel() * t.element_size() for t in inputs), group)
    dist.reduce_scatter(output, inputs, op=_REDUCE_OPS[op], group=group)
    if op == "avg":
        _divide(output, dist.get_world_size(group))
    return output


def broadcast(tensor: torch.Tensor, src: int, group: ProcessGroup) -> torch.Tensor:
    """``tensor`` from global rank ``src`` to every rank of ``group``, in place."""
    _record("broadcast", tensor.numel() * tensor.element_size(), group)
    dist.broadcast(tensor, src=src, group=group)
    return tensor


# -- data movement ---------------------------------------------------------------

def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    if flat.dim() and flat.stride(0) != 1:
        # A "contiguous" tensor of one element may keep any stride; bytes need stride 1.
        flat = flat.new_empty(flat.shape).copy_(flat)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def redistribute(
    local_tensors: Sequence[torch.Tensor],
    src: Layout,
    dst: Layout,
    group: ProcessGroup,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """The blocks of ``dst`` on ``rank``, filled from the blocks of ``src`` (same group).

    Both layouts are sharded or replicated. One ``all_to_all_single`` of the
    intersecting pieces when any piece crosses ranks; none otherwise (see NOTE
    [redistribution plans] in :mod:`dispatch_shard.layout`).
    """
    if not is_member(group, rank):
        return []
    plan = redistribute_plan(src, dst, rank)
    out = [
        torch.empty(dst.shards[j].shard_sizes, dtype=dtype, device=device)
        for j in dst.local_indices(rank)
    ]
    for src_pos, src_box, dst_pos, dst_box in plan.local:
        out[dst_pos][dst_box].copy_(local_tensors[src_pos][src_box])
    if not plan.needs_communication:
        return out
    itemsize = torch.empty((), dtype=dtype).element_size()
    pieces = [
        _as_bytes(local_tensors[src_pos][src_box].contiguous())
        for per_peer in plan.send for src_pos, src_box in per_peer
    ]
    send_splits = [
        sum(local_tensors[p][b].numel() for p, b in per_peer) * itemsize
        for per_peer in plan.send
    ]
    recv_splits = [sum(n for _, _, n in per_peer) * itemsize for per_peer in plan.recv]
    send = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8, device=device)
    recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=device)
    _record("all_to_all", sum(send_splits), group)
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    offset = 0
    for per_peer in plan.recv:
        for dst_pos, dst_box, numel in per_peer:
            nbytes = numel * itemsize
            target = out[dst_pos][dst_box]
            target.copy_(recv[offset:offset + nbytes].view(dtype).view(target.shape))
            offset += nbytes
    return out
