"""Debug mode: check, op by op, that every rank runs the same program on the same data.

A sharded program is SPMD: every rank of a process group must dispatch the same
ops, with ShardedTensors of the same layouts, and with plain tensors that hold
the same values (a plain tensor mixed with ShardedTensors is a replicated
value). When that breaks, the ranks compute garbage or wait for each other
until a collective times out. In debug mode, before each op reaches its
implementation and before each collective, the ranks of the group exchange a
description of it and raise :class:`RankDivergenceError` on every rank at the
first difference, naming the op and which ranks differ::

    with dispatch_shard.debug.check_consistency():
        loss = model(x).sum()  # raises on every rank if, say, x differs across ranks

or for a whole run: ``DISPATCH_SHARD_DEBUG=1 python train.py``.

What is compared, for an op (the outermost op only: what runs inside an
implementation follows from it): the op's name; each ShardedTensor operand's
size, dtype and spec; each plain tensor operand's size, dtype, device type and
a fingerprint of its bytes (CRC-32, so any difference counts, even -0.0 vs 0.0
or two NaN payloads); every other argument's ``repr`` (numbers, dims, dtypes).
For a collective: its kind, the op being run (or the dispatch_shard function
called outside any op) and, for reductions and broadcasts, the bytes sent.

NOTE [debug mode costs nothing when off]
Debug mode registers an observer of collectives and an op check in
:mod:`dispatch_shard.collectives`. The dispatch loop already tests whether any
observer is active to keep the op stack for ``count_collectives``; only then
does it run the op checks. So when debug mode is off, the hot path is
unchanged: one truthiness test of a list. When on, every op and collective adds
one object all-gather (two gloo collectives) on its group, and every plain
tensor operand is copied to the CPU to be hashed: slow, for debugging only. Its
own exchanges are not reported to observers, so ``count_collectives`` counts
the same inside and outside debug mode.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from dispatch_shard import collectives
from dispatch_shard.collectives import ProcessGroup

__all__ = ["RankDivergenceError", "check_consistency", "enabled", "where"]

ENV_VAR = "DISPATCH_SHARD_DEBUG"


class RankDivergenceError(RuntimeError):
    """The ranks of a process group dispatched different ops, or the same op with
    different arguments; raised on every rank of the group."""


_depth = 0


def where(op: object) -> str:
    """Which registered implementation serves ``op`` (an aten overload or packet, a
    ``torch.library`` op of your own, or a torch-level function), and where it is
    defined; ``"not supported for ShardedTensor"`` when none does.

    >>> where(torch.ops.aten.mm.default)  # doctest: +SKIP
    'aten.mm.default: mm at .../dispatch_shard/ops/matmul.py:312 (by its overload)'
    """
    from dispatch_shard import registry

    op = registry.resolve_op(op)
    name = registry._op_name(op)
    found: tuple[Any, str] | None = None
    if isinstance(op, torch._ops.OpOverload):
        if op in registry.OVERLOADS:
            found = (registry.OVERLOADS[op], "by its overload")
        elif op.overloadpacket in registry.PACKETS:
            found = (registry.PACKETS[op.overloadpacket], "by its overload packet")
    elif isinstance(op, torch._ops.OpOverloadPacket):
        if op in registry.PACKETS:
            found = (registry.PACKETS[op], "by the packet")
    elif op in registry.TORCH_FUNCTIONS:
        found = (registry.TORCH_FUNCTIONS[op], "at the torch level, above autograd")
    if found is None:
        return f"{name}: not supported for ShardedTensor"
    served, how = found
    fn = registry._user_fn(served)
    reduces = served is not fn and op not in registry.TORCH_FUNCTIONS
    partial = "; Partial arguments are reduced before it runs" if reduces else ""
    # (a family's registration helper may wrap the function that does the work, and say
    # so with ``__defined_by__``: name that function)
    fn = getattr(fn, "__defined_by__", fn)
    return f"{name}: {registry._where(fn)} ({how}{partial})"


def enabled() -> bool:
    """Whether debug mode is on (the environment variable or an open context)."""
    return _depth > 0


def _enable() -> None:
    global _depth
    if _depth == 0:
        collectives._observers.append(_check_collective)
        collectives._op_checks.append(_check_op)
    _depth += 1


def _disable() -> None:
    global _depth
    _depth -= 1
    if _depth == 0:
        collectives._observers.remove(_check_collective)
        collectives._op_checks.remove(_check_op)


@contextlib.contextmanager
def check_consistency() -> Iterator[None]:
    """Debug mode inside the ``with`` block (see the module docstring); blocks may nest.

    Every rank of a group must be in debug mode alike: its checks are collectives.
    """
    _enable()
    try:
        yield
    finally:
        _disable()


# -- describing ops and collectives ---------------------------------------------------

def _fingerprint(tensor: torch.Tensor) -> tuple[int, str]:
    """(CRC-32 of the bytes, a short summary for messages)."""
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        return 0, f"{tensor.layout} on {tensor.device.type}, not hashed"
    data = tensor.detach()
    if data.is_conj():
        data = data.resolve_conj()
    if data.is_neg():
        data = data.resolve_neg()
    flat = data.reshape(-1).contiguous().cpu()
    raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    crc = zlib.crc32(raw.numpy().tobytes()) if raw.numel() else 0
    if flat.numel() == 0:
        summary = "empty"
    elif flat.dtype == torch.bool:
        summary = f"{int(flat.sum())} true"
    elif flat.is_complex():
        summary = f"sum {complex(flat.to(torch.complex128).sum()):.6g}"
    elif flat.is_floating_point():
        summary = f"sum {float(flat.to(torch.float64).sum()):.6g}"
    else:
        summary = f"sum {int(flat.to(torch.int64).sum())}"
    return crc, summary


_PLAIN = (int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout,
          torch.memory_format)


def _describe(value: Any) -> Any:
    """A picklable, comparable description of one argument (lists described item by item)."""
    from dispatch_shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return ("ShardedTensor", tuple(value.shape), str(value.dtype), value._layout.spec)
    if isinstance(value, torch.Tensor):
        crc, summary = _fingerprint(value)
        return ("tensor", tuple(value.shape), str(value.dtype), value.device.type, crc, summary)
    if isinstance(value, list | tuple):
        return tuple(_describe(item) for item in value)
    if isinstance(value, _PLAIN):
        return repr(value)
    return type(value).__name__


def _show(description: Any) -> str:
    if isinstance(description, tuple) and description and description[0] == "ShardedTensor":
        _, size, dtype, spec = description
        return f"a ShardedTensor {list(size)} {dtype} laid out by {spec!r}"
    if isinstance(description, tuple) and description and description[0] == "tensor":
        _, size, dtype, device, crc, summary = description
        return f"a {device} tensor {list(size)} {dtype} ({summary}, crc32 {crc:08x})"
    if isinstance(description, tuple):
        return "[" + ", ".join(_show(item) for item in description) + "]"
    return str(description)


def _group_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ProcessGroup | None:
    from dispatch_shard.sharded_tensor import ShardedTensor

    for value in (*args, *kwargs.values()):
        items = value if isinstance(value, list | tuple) else (value,)
        for item in items:
            if isinstance(item, ShardedTensor):
                return item._process_group
    return None


def _participates(group: ProcessGroup | None) -> bool:
    return (group is not None and collectives.is_member(group, dist.get_rank())
            and dist.get_world_size(group) > 1)


def _check_op(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    group = _group_of(args, kwargs)
    if not _participates(group):
        return
    assert group is not None
    arguments = [(f"argument {i}", _describe(a)) for i, a in enumerate(args)]
    arguments += [(f"argument {name}=", _describe(v)) for name, v in sorted(kwargs.items())]
    _compare(("op", str(func), tuple(arguments)), group)


# Collectives whose bytes every rank sends alike (an all-to-all's differ by design).
_SAME_BYTES = ("all_reduce", "broadcast", "reduce_scatter")


def _check_collective(kind: str, nbytes: int, group: ProcessGroup) -> None:
    if not _participates(group):
        return
    stack = collectives._op_stack
    where = str(stack[0]) if stack else collectives._entry_point()
    _compare(("collective", kind, where, nbytes if kind in _SAME_BYTES else None), group)


def _ranks_text(ranks: list[int], verb: str) -> str:
    """``rank 1 passes`` / ``ranks [0, 2] pass``."""
    if len(ranks) == 1:
        ending = "es" if verb.endswith(("ss", "ch")) else "s"
        return f"rank {ranks[0]} {verb}{ending}"
    return f"ranks {ranks} {verb}"


def _compare(event: tuple[Any, ...], group: ProcessGroup) -> None:
    """Exchange ``event`` over ``group``; raise on every rank if any rank's differs."""
    events = collectives._exchange(event, group)
    first = events[0]
    if all(other == first for other in events[1:]):
        return
    ranks = collectives.group_ranks(group)
    raise RankDivergenceError(_divergence_message(events, ranks))


def _divergence_message(events: list[tuple[Any, ...]], ranks: tuple[int, ...]) -> str:
    # Ranks grouped by what they did, in order of first appearance.
    kinds: list[tuple[Any, list[int]]] = []
    for rank, event in zip(ranks, events, strict=True):
        for seen, members in kinds:
            if seen == event:
                members.append(rank)
                break
        else:
            kinds.append((event, [rank]))
    head = f"dispatch_shard debug: the ranks {list(ranks)} of a process group diverge"

    def doing(event: tuple[Any, ...], ranks: list[int]) -> str:
        if event[0] == "op":
            return f"{_ranks_text(ranks, 'dispatch')} {event[1]}"
        where = f" in {event[2]}" if event[2] else ""
        size = f" of {event[3]} bytes" if event[3] is not None else ""
        return f"{_ranks_text(ranks, 'issue')} the collective {event[1]}{size}{where}"

    labels = {doing(event, [0]) for event, _ in kinds}
    if len(labels) > 1 or any(event[0] != "op" for event, _ in kinds):
        parts = [doing(event, members) for event, members in kinds]
        return f"{head}: {'; '.join(parts)}. Every rank must run the same ops in the same order."
    # The same op with different arguments: name the first argument that differs.
    op = kinds[0][0][1]
    arguments = [event[2] for event, _ in kinds]
    if len({len(a) for a in arguments}) > 1:
        parts = [f"{_ranks_text(m, 'pass')} {len(e[2])} arguments" for e, m in kinds]
        return f"{head} at {op}: {'; '.join(parts)}."
    for position in range(len(arguments[0])):
        values = [a[position] for a in arguments]
        if all(v == values[0] for v in values[1:]):
            continue
        name = values[0][0]
        groups: list[tuple[Any, list[int]]] = []
        for (_event, members), (_, value) in zip(kinds, values, strict=True):
            for seen, owners in groups:
                if seen == value:
                    owners.extend(members)
                    break
            else:
                groups.append((value, list(members)))
        parts = [f"{_ranks_text(sorted(owners), 'pass')} {_show(value)}"
                 for value, owners in groups]
        hint = ""
        if any(isinstance(v, tuple) and v and v[0] == "tensor" for v, _ in groups):
            hint = (" A plain tensor mixed with ShardedTensors is a replicated value: it must "
                    "be identical on every rank (seed the generator alike on every rank, or "
                    "make it a ShardedTensor).")
        return f"{head} at {op}: {name} differs: {'; '.join(parts)}.{hint}"
    return f"{head} at {op}."  # unreachable: the events differ somewhere


def _from_environment() -> None:
    if os.environ.get(ENV_VAR, "").strip() not in ("", "0"):
        _enable()


_from_environment()
