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

NOTE [collective timeouts]
No collective here waits forever: each runs under its process group's
timeout (``timeout=`` of ``init_process_group`` / ``new_group``; torch's
default is 30 minutes), which gloo and NCCL enforce. When a collective times
out (a rank skipped it, issued another one, or is stuck) or a peer's
connection drops (a rank died), the backend's error becomes a
:class:`CollectiveError`: a ``RuntimeError`` naming the collective, the
group's global ranks, this rank and what dispatch_shard was running. The
dispatch loop adds the aten op(s) as the error passes through it (a
``try``/``except`` costs nothing until something is raised); a call outside
any op (``full_tensor``, ``reshard``, ``shard_tensor``...) is named from the
call stack, walked only when the error is built. After such an error the
group's state is unknown: do not issue more collectives on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import pickle
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dispatch_shard.layout import Layout, redistribute_plan

__all__ = [
    "CollectiveError",
    "agree",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "group_ranks",
    "is_member",
    "raise_if_any",
    "redistribute",
    "reduce_scatter",
    "resolve_group",
    "unchecked_creation",
]

ProcessGroup = dist.ProcessGroup
T = TypeVar("T")

# Observers of every collective issued: called with (kind, bytes, group).
_observers: list[Callable[[str, int, ProcessGroup], None]] = []
# The ops being dispatched, outermost first; kept only while an observer is active.
_op_stack: list[Any] = []
# Called with (op, args, kwargs) before an outermost op runs, while an observer is active
# (dispatch_shard.debug installs both).
_op_checks: list[Callable[[Any, tuple[Any, ...], dict[str, Any]], None]] = []


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


# NOTE [caches never keep a process group alive]
# A cache that held a ProcessGroup would keep it (and gloo's worker threads) alive
# after ``destroy_process_group``, until the interpreter tore the cache down at exit,
# where destroying a backend with threads can abort the process ("terminate called
# without an active exception", about one run in 15-20 of the demo). So per-group
# facts are keyed by ``id(group)`` with a weak reference whose callback drops the
# entry when the group dies: the group is released when torch releases it.

_group_ranks: dict[int, tuple[weakref.ref[ProcessGroup], tuple[int, ...]]] = {}


def _ranks_of(group: ProcessGroup) -> tuple[int, ...]:
    entry = _group_ranks.get(id(group))
    if entry is not None and entry[0]() is group:
        return entry[1]
    ranks = tuple(dist.get_process_group_ranks(group))
    key = id(group)

    def forget(_: object, key: int = key) -> None:
        _group_ranks.pop(key, None)

    _group_ranks[key] = (weakref.ref(group, forget), ranks)
    return ranks


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


# -- failures ------------------------------------------------------------------

class CollectiveError(RuntimeError):
    """A collective timed out or lost a peer (see NOTE [collective timeouts]).

    Attributes: ``collective`` (``"all_to_all"``, ...), ``group_ranks`` (global
    ranks), ``rank`` (this global rank), ``ops`` (the aten ops being dispatched,
    innermost first), ``entry`` (the dispatch_shard function called outside any
    op, or None) and ``cause`` (the backend's message).
    """

    def __init__(self, collective: str, group_ranks: Sequence[int], rank: int, cause: str,
                 entry: str | None = None, timeout_s: float | None = None,
                 ops: Sequence[str] = ()) -> None:
        super().__init__(collective, tuple(group_ranks), rank, cause, entry, timeout_s,
                         tuple(ops))
        self.collective = collective
        self.group_ranks = tuple(group_ranks)
        self.rank = rank
        self.cause = cause
        self.entry = entry
        self.timeout_s = timeout_s
        self.ops: list[str] = list(ops)

    def add_op(self, op: object) -> None:
        """Record that the error passed through the dispatch of ``op``."""
        name = str(op)
        if not self.ops or self.ops[-1] != name:
            self.ops.append(name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (CollectiveError, (self.collective, self.group_ranks, self.rank, self.cause,
                                  self.entry, self.timeout_s, tuple(self.ops)))

    def __str__(self) -> str:
        where = [*self.ops]
        if self.entry is not None:
            where.append(self.entry)
        running = (f" while running {where[0]}"
                   + "".join(f" (inside {outer})" for outer in where[1:])) if where else ""
        lowered = self.cause.lower()
        if "timed out" in lowered or "timeout" in lowered:
            after = "" if self.timeout_s is None else f" after {self.timeout_s:g}s"
            what = (f"timed out{after}: a rank of the group skipped this collective, issued "
                    "a different one, or is stuck")
        elif any(text in lowered for text in _PEER_LOST):
            what = "lost a peer: a rank of the group died or closed its connection"
        else:
            what = "failed"
        return (f"dispatch_shard: collective {self.collective}{running} on rank {self.rank} "
                f"of the process group with global ranks {list(self.group_ranks)} {what}. "
                f"The group may be unusable now. Cause: {self.cause}")


_PEER_LOST = ("connection closed", "connection reset", "closed by peer", "broken pipe",
              "connection refused", "end of file", "socket closed")


def _group_timeout_s(group: ProcessGroup) -> float | None:
    try:
        options = group._get_backend(torch.device("cpu")).options
        return float(options._timeout.total_seconds())
    except Exception:  # not every backend exposes its options
        return None


def _entry_point() -> str | None:
    """The outermost dispatch_shard function on the stack, looking through torch's frames
    and stopping at the caller's code (dispatch_shard.testing counts as the caller's)."""
    package = os.path.dirname(os.path.abspath(__file__))
    ops = sys.modules.get("dispatch_shard.ops")
    roots = tuple({package, os.path.dirname(os.path.abspath(getattr(ops, "__file__", "") or
                                                             __file__))})
    outside = (os.path.join(package, "testing"),)
    torch_root = os.path.dirname(os.path.abspath(torch.__file__))
    entry = None
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename.startswith(roots) and not filename.startswith(outside):
            code = frame.f_code
            entry = getattr(code, "co_qualname", code.co_name)
        elif not filename.startswith(torch_root):
            break
        frame = frame.f_back  # type: ignore[assignment]
    return None if entry is None or entry.endswith("__torch_dispatch__") else entry


def _failed(collective: str, group: ProcessGroup, error: RuntimeError) -> CollectiveError:
    """The :class:`CollectiveError` for a backend error raised by ``collective``."""
    if isinstance(error, CollectiveError):
        return error
    return CollectiveError(collective, group_ranks(group), dist.get_rank(), str(error),
                           _entry_point(), _group_timeout_s(group))


# -- agreement ---------------------------------------------------------------

_ERROR_TYPES: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (ValueError, TypeError, RuntimeError, NotImplementedError, IndexError, KeyError,
                AttributeError)
}


# NOTE [object exchange without numpy]
# torch's ``all_gather_object`` decodes bytes through ``Tensor.numpy()``, so it fails
# where numpy is absent, and it always issues two collectives (sizes, then data).
# Ours pickles into a fixed-size uint8 slot: one ``all_gather`` when every rank's
# pickle fits (the case of every check on a creation path), a second one for the
# tails of longer pickles only. Bytes are read back with ``ctypes``, not numpy.

_OBJECT_SLOT = 256  # bytes per rank in the first round, the 8-byte length included


def _object_device(group: ProcessGroup) -> torch.device:
    """CPU for gloo (and mixed) groups; the current CUDA device for an NCCL-only group."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_bytes(tensor: torch.Tensor, length: int) -> bytes:
    host = tensor.cpu().contiguous()
    return ctypes.string_at(host.data_ptr(), length) if length else b""


def _gather_bytes(payload: bytes, group: ProcessGroup, observed: bool) -> list[bytes]:
    """Every rank's ``payload``, in group-rank order (one all_gather when all are short)."""
    collective = "all_gather_object"
    world = dist.get_world_size(group)
    device = _object_device(group)
    body = _OBJECT_SLOT - 8
    slot = torch.zeros(_OBJECT_SLOT, dtype=torch.uint8)
    slot[:8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
    head = payload[:body]
    if head:
        slot[8:8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    slot = slot.to(device)
    slots = [slot.clone() for _ in range(world)]  # see agree(): a fake group moves nothing
    if observed:
        _record(collective, _OBJECT_SLOT * world, group)
    try:
        dist.all_gather(slots, slot, group=group)
        lengths = [int(s[:8].cpu().view(torch.int64)) for s in slots]
        heads = [_to_bytes(s[8:], min(n, body)) for s, n in zip(slots, lengths, strict=True)]
        longest = max(lengths)
        if longest <= body:
            return heads
        # Some pickle is longer than a slot: gather the tails, padded to the longest.
        tail_size = longest - body
        tail = torch.zeros(tail_size, dtype=torch.uint8)
        rest = payload[body:]
        if rest:
            tail[:len(rest)] = torch.frombuffer(bytearray(rest), dtype=torch.uint8)
        tail = tail.to(device)
        tails = [tail.clone() for _ in range(world)]
        if observed:
            _record(collective, tail_size * world, group)
        dist.all_gather(tails, tail, group=group)
    except RuntimeError as error:
        raise _failed(collective, group, error) from error
    return [h + _to_bytes(t, max(n - body, 0))
            for h, t, n in zip(heads, tails, lengths, strict=True)]


def all_gather_object(obj: Any, group: ProcessGroup) -> list[Any]:
    """Every rank's picklable ``obj``, in group-rank order (see NOTE [object exchange
    without numpy])."""
    return [pickle.loads(p) for p in _gather_bytes(pickle.dumps(obj), group, observed=True)]


def _exchange(obj: Any, group: ProcessGroup) -> list[Any]:
    """:func:`all_gather_object` unseen by observers (for dispatch_shard.debug's checks)."""
    return [pickle.loads(p) for p in _gather_bytes(pickle.dumps(obj), group, observed=False)]


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
    _raise_first(reports, error, group)


def _raise_first(reports: Sequence[tuple[str, str] | None], error: Exception | None,
                 group: ProcessGroup) -> None:
    """Raise the first reported error on every rank: this rank's own object where it is
    the first reporter, else the reported type and message naming the rank."""
    for group_rank, report in enumerate(reports):
        if report is not None:
            if error is not None and group_rank == dist.get_rank(group):
                raise error
            kind, message = report
            raise _ERROR_TYPES.get(kind, RuntimeError)(
                f"{message} (raised on rank {_ranks_of(group)[group_rank]})")


# NOTE [rank-consistent creation]
# Creation functions, shard_tensor, from_local_* and from_replicated build the
# whole layout from their arguments on every rank. Arguments that differ between
# ranks (a spec, a size, a dtype) would give each rank a different idea of the
# tensor, and the first op would compute a wrong number without any error. So
# each creation path calls :func:`agree`: one all_gather of 16 bytes per rank (an
# error flag and a 64-bit digest of the arguments). When every digest matches and
# no rank failed, that is all. Otherwise a second exchange brings every rank's
# arguments (or error) and every rank raises the same error. Paths that have no
# other reason to communicate (creation functions, from_replicated) skip the
# check inside :func:`unchecked_creation`, for code that creates in a hot loop.

_unchecked_depth = 0


@contextlib.contextmanager
def unchecked_creation() -> Iterator[None]:
    """Inside this block, creation functions (``ds.zeros``, ``ds.rand``...),
    ``ShardedTensor.from_replicated`` and ``ShardedTensor.from_local_tensor`` skip the
    cross-rank check of their arguments and communicate nothing (a data-parallel loop
    wraps each step's batch this way). Every rank must then pass the same spec, size and
    dtype: no one checks, and an error one rank finds in its own block is raised there
    only. Paths that communicate anyway (``shard_tensor``, ``from_local_shards``) keep it.
    """
    global _unchecked_depth
    _unchecked_depth += 1
    try:
        yield
    finally:
        _unchecked_depth -= 1


def creation_unchecked() -> bool:
    """Whether :func:`unchecked_creation` is in force."""
    return _unchecked_depth > 0


def checked_creation(what: str, facts: Sequence[tuple[str, Any]], group: ProcessGroup,
                     build: Callable[[], T]) -> T:
    """``build()``, checked against the other ranks by :func:`agree` (its error, if any,
    raised on every rank) unless inside :func:`unchecked_creation` or outside ``group``."""
    if _unchecked_depth or not is_member(group, dist.get_rank()):
        return build()
    error: Exception | None = None
    try:
        result = build()
    except Exception as exc:
        error = exc
    agree(what, facts, error, group)
    return result


def agree(what: str, facts: Sequence[tuple[str, Any]], error: Exception | None,
          group: ProcessGroup) -> None:
    """Raise the same error on every rank of ``group`` if any rank has ``error`` set or
    the ranks' ``facts`` (``(name, value)`` pairs) differ (see NOTE [rank-consistent
    creation]). A group of one communicates nothing."""
    if dist.get_world_size(group) == 1:
        if error is not None:
            raise error
        return
    digest = hashlib.blake2b(pickle.dumps(tuple(facts), protocol=4), digest_size=8).digest()
    word = torch.tensor([int(error is not None), int.from_bytes(digest, "little", signed=True)],
                        dtype=torch.int64)
    device = _object_device(group)
    word = word.to(device)
    # Outputs start as this rank's word: a backend that moves no data (torch's "fake"
    # group, used to model 1024 ranks in one process) then reports agreement.
    words = [word.clone() for _ in range(dist.get_world_size(group))]
    _record("all_gather", 16 * len(words), group)
    try:
        dist.all_gather(words, word, group=group)
    except RuntimeError as failure:
        raise _failed("all_gather", group, failure) from failure
    seen = torch.stack(words).cpu()
    if not bool(seen[:, 0].any()) and bool((seen[:, 1] == seen[0, 1]).all()):
        return
    report = None if error is None else (type(error).__name__, str(error))
    everyone = all_gather_object((report, tuple(facts)), group)
    _raise_first([theirs for theirs, _ in everyone], error, group)
    ranks = _ranks_of(group)
    first = everyone[0][1]
    for group_rank, (_, theirs) in enumerate(everyone):
        for (name, value), (_, other) in zip(first, theirs, strict=True):
            if value != other:
                raise ValueError(
                    f"ShardedTensor {name} property does not match from different ranks! "
                    f"Found {name}={value} on rank:{ranks[0]}, and {name}={other} on "
                    f"rank:{ranks[group_rank]}. Every rank must pass the same arguments "
                    f"to {what}."
                )
    # Equal values whose pickles differ (e.g. a set's order): nothing to raise.


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


# NOTE [collectives under torch.compile]
# While torch.compile traces an op (AOTAutograd runs ``__torch_dispatch__`` on fake,
# functionalized blocks), a collective must enter the graph as a functional collective
# (``_c10d_functional``: a new tensor, the group by name), which the graph can hold and
# inductor can schedule; the in-place ``dist`` calls would capture the process group
# object. Each collective below takes that path when its tensor is such a stand-in, and
# copies the result back where the eager call works in place. A traced functional
# collective already comes waited on (``funcol`` puts the ``wait_tensor`` in the graph);
# :func:`_waited` adds a wait only where it did not (an ``AsyncCollectiveTensor``), so
# the graph holds one ``wait_tensor`` per collective, not two.

def traced(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a stand-in of a compiler's trace (fake or functionalized)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(tensor, FakeTensor | FunctionalTensor)


def _waited(result: torch.Tensor) -> torch.Tensor:
    """A functional collective's result, waited on once (NOTE [collectives under
    torch.compile])."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return result.wait() if isinstance(result, AsyncCollectiveTensor) else result


def _traced_all_reduce(tensor: torch.Tensor, op: str, group: ProcessGroup) -> None:
    import torch.distributed._functional_collectives as funcol

    tensor.copy_(_waited(funcol.all_reduce(tensor, op, group)))


def _all_reduce_in_place(tensor: torch.Tensor, op: str, group: ProcessGroup) -> None:
    if traced(tensor):
        _traced_all_reduce(tensor, "sum" if op == "avg" else op, group)
    else:
        dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group)


# NOTE [collectives send memory order]
# gloo and NCCL read and write a tensor's storage in memory order, whatever its strides:
# a transposed block on one rank and a row-major one on another would be summed element
# by element in different orders (a wrong value, no error). Blocks are any strided
# views (a transposed weight's, a column-major product's), so the collectives below take
# a contiguous copy of a tensor that is not contiguous and write the result back.

def all_reduce(tensor: torch.Tensor, op: str, group: ProcessGroup) -> torch.Tensor:
    """Reduce ``tensor`` in place across ``group`` (``op`` in sum/avg/max/min/product).

    Floating ``max``/``min`` propagate NaN like ``torch.maximum`` (see NOTE [NaN in max/min]).
    """
    if isinstance(group, ProcessGroup) and len(_ranks_of(group)) == 1:
        return tensor  # a group of one: every op is the identity; nothing to send
    if not tensor.is_contiguous():  # NOTE [collectives send memory order]
        return tensor.copy_(all_reduce(tensor.contiguous(), op, group))
    if op in ("max", "min") and tensor.is_floating_point():
        return _all_reduce_nan_aware(tensor, op, group)
    _record("all_reduce", tensor.numel() * tensor.element_size(), group)
    try:
        _all_reduce_in_place(tensor, op, group)
    except RuntimeError as error:
        raise _failed("all_reduce", group, error) from error
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
    try:
        _all_reduce_in_place(buffer, op, group)
    except RuntimeError as error:
        raise _failed("all_reduce", group, error) from error
    values, flags = buffer[:flat.numel()], buffer[flat.numel():]
    values.masked_fill_(flags != 0, float("nan"))
    tensor.copy_(values.view(tensor.shape))
    return tensor


def reduce_scatter(
    output: torch.Tensor, inputs: list[torch.Tensor], op: str, group: ProcessGroup
) -> torch.Tensor:
    """``output`` on group rank r receives the reduction of every rank's ``inputs[r]``."""
    if not output.is_contiguous():  # NOTE [collectives send memory order]
        return output.copy_(reduce_scatter(output.contiguous(), inputs, op, group))
    inputs = [t if t.is_contiguous() else t.contiguous() for t in inputs]
    _record("reduce_scatter", sum(t.numel() * t.element_size() for t in inputs), group)
    try:
        if traced(output):
            import torch.distributed._functional_collectives as funcol

            flat = torch.cat([t.reshape(-1) for t in inputs])
            output.copy_(_waited(funcol.reduce_scatter_tensor(
                flat, "sum" if op == "avg" else op, 0, group)).view(output.shape))
        else:
            dist.reduce_scatter(output, inputs, op=_REDUCE_OPS[op], group=group)
    except RuntimeError as error:
        raise _failed("reduce_scatter", group, error) from error
    if op == "avg":
        _divide(output, dist.get_world_size(group))
    return output


def broadcast(tensor: torch.Tensor, src: int, group: ProcessGroup) -> torch.Tensor:
    """``tensor`` from global rank ``src`` to every rank of ``group``, in place."""
    if not tensor.is_contiguous():  # NOTE [collectives send memory order]
        return tensor.copy_(broadcast(tensor.contiguous(), src, group))
    _record("broadcast", tensor.numel() * tensor.element_size(), group)
    try:
        if traced(tensor):
            import torch.distributed._functional_collectives as funcol

            tensor.copy_(_waited(funcol.broadcast(tensor, src, group)))
        else:
            dist.broadcast(tensor, src=src, group=group)
    except RuntimeError as error:
        raise _failed("broadcast", group, error) from error
    return tensor


# -- data movement ---------------------------------------------------------------

# NOTE [sub-groups of a mesh]
# A move between N-D layouts whose pieces all travel along one mesh dim (an all-gather
# over tp, a reduce over dp) runs on the process group of this rank's peers along that
# dim, not on the whole mesh's group. The group comes from:
# - the torch DeviceMesh the layout was made on: its per-dim groups (``get_group``),
#   which every DeviceMesh makes when it is built, are remembered by their lines of
#   ranks (``remember_subgroups``), so a mesh that spans only some of the world's ranks
#   moves on its own sub-groups too;
# - else, when the mesh spans the whole world, groups made here on first use, by every
#   rank (new_group is a collective of the world, and every rank runs the same move);
# - else the mesh's group (a mesh over some of the ranks laid out by a bare
#   MeshShardingSpec, with no DeviceMesh: only the ranks outside the mesh could make
#   its sub-groups with it, and they take no part in the move).
# Groups that a destroy_process_group took are made or looked up again.
_subgroups: dict[tuple[tuple[int, ...], ...], dict[tuple[int, ...], ProcessGroup]] = {}
_given_subgroups: dict[tuple[tuple[int, ...], ...], ProcessGroup] = {}


def remember_subgroups(lines: tuple[tuple[int, ...], ...], group: ProcessGroup) -> None:
    """``group`` is this rank's process group among the sub-groups ``lines`` (sorted
    tuples of global ranks, one per line of a mesh dim)."""
    _given_subgroups[lines] = group


def _alive(group: ProcessGroup) -> bool:
    try:
        dist.get_process_group_ranks(group)
    except (KeyError, RuntimeError, ValueError):
        return False
    return True


def subgroup(lines: Sequence[Sequence[int]], mine: Sequence[int],
             spans_world: bool) -> ProcessGroup | None:
    """The process group of ``mine``, one of the sub-groups ``lines``; None when there is
    none to use (NOTE [sub-groups of a mesh])."""
    key = tuple(sorted(tuple(sorted(line)) for line in lines))
    own = tuple(sorted(mine))
    given = _given_subgroups.get(key)
    if given is not None and _alive(given):
        return given
    if not spans_world:
        return None
    made = _subgroups.get(key)
    if made is not None and not _alive(made[own]):
        made = None
    if made is None:
        made = {}
        for line in key:
            group = dist.new_group(list(line))
            if group is not None and dist.get_rank() in line:
                made[line] = group
        _subgroups[key] = made
    return made[own]


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    # A lazy conjugate or negative view (``x.conj()``'s blocks) ships its values.
    flat = tensor.resolve_conj().resolve_neg().reshape(-1)
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

    ``dst`` holds no pending reduction; ``src`` may hold one over a sub-group of an N-D
    layout (its terms are summed where they meet). One ``all_to_all_single`` of the
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
    op = src.reduce_op if src.is_mesh else None
    recv = None
    if plan.needs_communication:
        itemsize = dtype.itemsize
        pieces = [
            _as_bytes(local_tensors[src_pos][src_box].contiguous())
            for per_peer in plan.send for src_pos, src_box in per_peer
        ]
        send_splits = [
            sum(local_tensors[p][b].numel() for p, b in per_peer) * itemsize
            for per_peer in plan.send
        ]
        recv_splits = [n * itemsize for n in plan.recv]
        send = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8, device=device)
        received = torch.empty(sum(recv_splits), dtype=torch.uint8, device=device)
        on = group
        if plan.peers is not None:
            # Only peers along one mesh dim exchange (NOTE [sub-groups of a mesh]).
            mine = next(line for line in plan.peers if rank in line)
            sub = None
            if len(mine) < len(src.group_ranks):
                sub = subgroup(plan.peers, mine,
                               len(src.group_ranks) == dist.get_world_size())
            if sub is not None:
                index = {r: g for g, r in enumerate(src.group_ranks)}
                on = sub
                order = group_ranks(sub)
                send_splits = [send_splits[index[r]] for r in order]
                recv_splits = [recv_splits[index[r]] for r in order]
        _record("all_to_all", sum(send_splits), on)
        try:
            if traced(send):
                import torch.distributed._functional_collectives as funcol

                received = _waited(funcol.all_to_all_single(
                    send, recv_splits, send_splits, on))
            else:
                dist.all_to_all_single(received, send, recv_splits, send_splits, group=on)
        except RuntimeError as error:
            raise _failed("all_to_all", on, error) from error
        # (the byte count is known here: no look at the received tensor's size, which a
        # trace may hold as a data-dependent symbol)
        recv = received.view(dtype) if sum(recv_splits) else received.new_empty(0, dtype=dtype)
    for dst_pos, dst_box, src_pos, source, add in plan.steps:
        target = out[dst_pos][dst_box]
        if src_pos >= 0:
            piece = local_tensors[src_pos][source]
        else:
            assert recv is not None and isinstance(source, int)
            piece = recv[source:source + target.numel()].view(target.shape)
        if not add:
            target.copy_(piece)
        elif op in ("sum", "avg"):
            target.add_(piece)
        elif op == "max":
            torch.maximum(target, piece, out=target)
        else:
            torch.minimum(target, piece, out=target)
    if op == "avg":
        terms = len(set(src.summand_classes()))
        for block in out:
            _divide(block, terms)
    return out
