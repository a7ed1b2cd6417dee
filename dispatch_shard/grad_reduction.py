"""Gradients of data-parallel parameters, reduced during backward in buckets.

A parameter replicated over data-parallel ranks, used on a batch split over them, gets
from backward a pending gradient: on each rank a full-size summand, the gradient of its
slice of the batch (a ``Partial``; on a device mesh, pending over the data-parallel mesh
dims). Its leaf keeps its own layout (NOTE [a leaf's grad keeps the leaf's layout] in
:mod:`dispatch_shard.sharded_tensor`), so each such gradient needs a reduction. Issued one
per parameter, in the hook that sees it, they cost a collective and a wait each, and
nothing else runs meanwhile. Here, as in ``DistributedDataParallel``, they are gathered
into buckets and reduced asynchronously while backward goes on.

Per rank, for one backward pass:

- The post-accumulate-grad hook of a leaf offers its pending gradient (:func:`offer`).
  If the move to the leaf's layout is a reduction over one set of ranks, the gradient
  joins the open bucket of that kind, group and dtype, and the leaf gets its ``.grad``
  at once: a ShardedTensor with the leaf's layout that is *awaiting* the bucket.
- A bucket is launched when it holds ``bucket_cap_mb`` (the first one of a pass:
  ``first_bucket_cap_mb``; NOTE [the first bucket on CPU]): its
  summands are copied into one flat buffer, and one asynchronous collective reduces it
  in place (``all_reduce``; ``reduce_scatter_tensor`` when the leaf is chunked along dim
  0 over the same ranks, FSDP-style, each rank receiving only its chunk). The awaiting
  gradients' blocks become views of the buffer.
- At the end of the backward pass (an autograd engine callback, queued by the pass's
  first offer) the open buckets are launched, in the order they were opened.
- An awaiting gradient is waited for when something reads it: any op that takes it
  (``__torch_dispatch__`` checks while any gradient awaits), and the public accessors
  (``local_shards``, ``local_blocks``, ``full_tensor``, ...). The optimizer therefore
  waits for each bucket only when it reaches the first parameter in it.

Every rank runs the same backward (same graph, same order of leaf hooks), so every
rank opens, fills and launches the same buckets in the same order: the collectives
match. A move that is not one reduction over one rank set (a max, a reduction into a
different split) is not offered to a bucket; the hook moves it at once, as before.

``no_sync()`` leaves pending gradients pending (gradient accumulation: the next
backward adds into the summands, with no communication), like DDP's ``no_sync``;
the first backward outside it reduces the accumulated sums. A pending gradient is a
correct value whenever it is read, so a step taken inside ``no_sync`` is still right
(each read reduces it then).

``count_collectives`` reports how much of the bucketed reduction time was hidden
behind backward (:attr:`~dispatch_shard.count_collectives.reduction_hidden_s`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from dispatch_shard import collectives
from dispatch_shard.layout import Layout
from dispatch_shard.specs import ChunkShardingSpec, MeshShardingSpec, Partial

__all__ = ["no_sync", "set_gradient_bucketing"]

# Buckets not yet waited for: while any exists, dispatch checks operands.
AWAITING = [0]


@dataclass
class _Settings:
    enabled: bool = True
    cap_bytes: int = 25 * 2**20  # DDP's bucket_cap_mb
    first_cap_bytes: int | None = None  # None: by device (NOTE [the first bucket on CPU])
    no_sync_depth: int = 0


_settings = _Settings()


def set_gradient_bucketing(enabled: bool = True, *, bucket_cap_mb: float = 25.0,
                           first_bucket_cap_mb: float | None = None) -> None:
    """Configure the bucketed reduction of data-parallel gradients (on by default).

    ``bucket_cap_mb`` is DDP's argument of that name, with its default: a bucket is
    launched once it holds that many MiB of gradients. ``first_bucket_cap_mb`` is the
    size of each backward pass's first bucket. By default it is DDP's 1 MiB for CUDA
    gradients, so that communication starts early, and ``bucket_cap_mb`` for CPU
    gradients, whose gloo reductions share backward's cores (NOTE [the first bucket on
    CPU]). ``enabled=False`` reduces each gradient on its own, synchronously, in its
    leaf's hook. Every rank must make the same call.
    """
    if bucket_cap_mb <= 0 or (first_bucket_cap_mb is not None and first_bucket_cap_mb <= 0):
        raise ValueError(f"bucket sizes must be positive, got bucket_cap_mb={bucket_cap_mb}, "
                         f"first_bucket_cap_mb={first_bucket_cap_mb}")
    _settings.enabled = enabled
    _settings.cap_bytes = int(bucket_cap_mb * 2**20)
    _settings.first_cap_bytes = (None if first_bucket_cap_mb is None
                                 else int(first_bucket_cap_mb * 2**20))


@contextlib.contextmanager
def no_sync() -> Iterator[None]:
    """Inside, backward leaves data-parallel gradients pending (no communication), as
    DDP's ``no_sync`` does: for gradient accumulation over micro-batches. The first
    backward after it reduces what accumulated. Every rank must use it alike."""
    _settings.no_sync_depth += 1
    try:
        yield
    finally:
        _settings.no_sync_depth -= 1


# -- buckets ------------------------------------------------------------------------------

@dataclass(eq=False)
class _Bucket:
    kind: str  # "all_reduce" | "reduce_scatter"
    group: Any
    op: str  # "sum" | "avg"
    size: int  # ranks in the group
    grads: list[Any] = field(default_factory=list)  # awaiting ShardedTensors
    kept: bool = False  # holds a kept gradient (NOTE [a kept gradient takes the pending one])
    summands: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0
    work: Any = None
    flat: torch.Tensor | None = None
    launched_at: float = 0.0
    done_at: float | None = None
    # A fixed bucket (NOTE [every rank reduces the same parameters]): its data-parallel
    # parameters by their index, each with its awaiting gradient here (None: none yet)
    fixed: dict[int, tuple[Any, Any]] | None = None
    missing: list[tuple[int, Any, torch.Tensor]] = field(default_factory=list)


@dataclass
class _Pass:
    open: dict[tuple[Any, ...], _Bucket] = field(default_factory=dict)
    launched: int = 0  # buckets launched in this pass
    task: int = -1  # the autograd graph task of the pass (its end callback is queued)


_pass = _Pass()
_in_flight: list[_Bucket] = []
# Observers of each waited bucket: called with (seconds from launch to done, seconds
# spent blocked waiting) (count_collectives).
wait_observers: list[Any] = []


# NOTE [every rank reduces the same parameters]
# Inside ``data_parallel`` each rank runs the module as dense code on its own rows, so a
# branch on the data (an expert run only when some row of this rank needs it) can give
# the ranks gradients of different parameters in one backward pass. (Outside it, a
# branch on a ShardedTensor is decided over the whole batch, the same on every rank.)
# Buckets filled in the order gradients arrive then differ across ranks: gloo aborted
# the process on a size mismatch ("Received data size doesn't match expected size"), and
# equal sizes added unrelated gradients. So, as DDP's ``find_unused_parameters`` does,
# data-parallel parameters go to fixed buckets: when backward reaches a data-parallel
# module's output (``_FromLocal``), its parameters are expected in this pass, on every
# rank alike. Their gradients wait in one bucket per group and dtype, launched when
# backward ends, after the other buckets and in an order every rank shares; it holds
# every expected parameter by its index (the order ``data_parallel`` first named them,
# from a counter, the same on every rank): a count (1 where this rank has the gradient)
# and the summand, zeros where this rank has none. A bucket with a parameter this rank
# had no gradient for is waited for before backward returns (an optimizer lists its
# parameters by ``.grad is not None``, before any dispatch could wait). A parameter
# that some rank had gets the reduced value, as dense does (the other ranks' rows
# contribute nothing to it); one that no rank had keeps no gradient. A kept gradient
# (``zero_grad(set_to_none=False)``) this rank did not add to joins through the group's
# first rank, and one left pending by micro-batches under ``no_sync`` joins with its
# summand. No collective is added: the counts ride the all-reduce. These buckets are not
# launched before backward ends (on CPU the first bucket is that large anyway: NOTE [the
# first bucket on CPU]; on CUDA they give up DDP's overlap, unmeasured here).
# Unbucketed (``set_gradient_bucketing(False)``) each gradient is reduced alone as it
# arrives: there the ranks first agree on its parameter's name (one all-gather of 16
# bytes, data-parallel parameters only), and a mismatch raises on every rank, naming
# the parameters.
_NAMES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> (index, name)
_INDICES = itertools.count()  # (never reused: a freed parameter's index stays gone)
# id -> (a data-parallel parameter whose forward this backward pass reaches, the pass;
# -2: a pass under no_sync, whose gradients the next reducing pass reduces)
_expected: dict[int, tuple[Any, int]] = {}


def name_parameter(parameter: Any, name: str) -> None:
    """Record ``parameter``'s name in a data-parallel module, and its index (the order of
    the first records, the same on every rank) (NOTE [every rank reduces the same
    parameters])."""
    if _NAMES.get(parameter) is None:
        _NAMES[parameter] = (next(_INDICES), name)


def expect(parameters: list[Any]) -> None:
    """Backward reaches a data-parallel forward with these parameters (on every rank, by
    the contract): this pass (or, under no_sync, the next reducing one) reduces each of
    them in a fixed bucket, and this pass's end is queued."""
    if not _settings.enabled:
        return
    task = -2 if _settings.no_sync_depth else torch._C._current_graph_task_id()
    if task >= 0:
        _begin_pass()  # (first: a failed pass's expectations go with its buckets)
    for parameter in parameters:
        _expected[id(parameter)] = (parameter, task)


def _agree_on_members(members: list[str | None], group: Any) -> None:
    """Raise on every rank of ``group`` if the ranks' ``members`` differ."""
    try:
        collectives.agree("data_parallel", [("gradients", tuple(members))], None, group)
    except ValueError as error:
        # (agree's message: "... ranks! Found gradients=... on rank:i, and ... on rank:j.
        # Every rank must ...": the middle names the parameters)
        found = str(error).partition("! ")[2].partition(" Every rank")[0]
        raise RuntimeError(
            "data_parallel: the ranks' backward passes computed gradients of different "
            f"parameters (in one bucket: {found}); reducing them would add unrelated "
            "gradients. A forward that skips a layer on some ranks, branching on its own "
            "rows' data, does this: run the same layers on every rank (mask a layer's "
            "effect rather than skip it), or call the module without data_parallel, where "
            "a branch on a ShardedTensor is decided over the whole batch") from None


def agree_alone(leaf: Any, grad: Any) -> None:
    """Before ``grad`` (pending) is reduced alone: the agreement of NOTE [every rank
    reduces the same parameters] for a data-parallel parameter."""
    found = _NAMES.get(leaf)
    if found is not None:
        _agree_on_members([found[1]], grad._process_group)


def _reduction(grad: Any, leaf: Any) -> tuple[str, Any, str, int] | None:
    """``(kind, group, op, group size)`` when moving ``grad`` (pending) to ``leaf``'s
    layout is one reduction over one set of ranks that this rank belongs to; else None."""
    src: Layout = grad._layout
    dst: Layout = leaf._layout
    op = src.reduce_op
    if op not in ("sum", "avg") or grad.dtype != leaf.dtype or not grad._local_tensors:
        return None
    spec = src.spec
    group = grad._process_group
    if isinstance(spec, Partial):
        ranks = src.group_ranks
        if src.value_layout() is dst:
            return "all_reduce", group, op, len(ranks)
        dst_spec = dst.spec
        if (isinstance(dst_spec, ChunkShardingSpec) and len(ranks) > 1 and len(dst.size) >= 1
                and dst_spec.dim % len(dst.size) == 0
                and [p.rank() for p in dst_spec.placements] == list(ranks)
                and list(collectives.group_ranks(group)) == list(ranks)
                and len(grad._local_tensors) == 1):
            return "reduce_scatter", group, op, len(ranks)
        return None
    if isinstance(spec, MeshShardingSpec) and src.value_layout() is dst:
        coordinates = spec.coordinates()
        kept = [d for d, (kind, _) in enumerate(spec.placements) if kind != "partial"]
        lines: dict[tuple[int, ...], list[int]] = {}
        for coordinate, rank in zip(coordinates, spec.mesh_ranks, strict=True):
            lines.setdefault(tuple(coordinate[d] for d in kept), []).append(rank)
        all_lines = tuple(tuple(line) for line in lines.values())
        mine = next(line for line in all_lines if grad._rank in line)
        if len(mine) == 1:
            return "all_reduce", None, op, 1
        sub = collectives.subgroup(all_lines, mine,
                                   len(spec.mesh_ranks) == dist.get_world_size())
        # (none: a mesh over some of the ranks without a DeviceMesh's groups for these lines,
        # NOTE [sub-groups of a mesh]; the gradient is then reduced when read, unbucketed)
        return None if sub is None else ("all_reduce", sub, op, len(mine))
    return None


# NOTE [a kept gradient takes the pending one]
# A leaf whose ``.grad`` is kept between backward passes (``zero_grad(set_to_none=False)``,
# or gradient accumulation without ``no_sync``) gets each new pending gradient through
# AccumulateGrad's in-place ``grad += new``. Reduced there, that add cost one
# synchronous all-reduce per parameter, outside the buckets (and inside ``no_sync`` it
# reduced every micro-batch). Instead, inside a backward pass, ``+=`` of a pending sum
# into a leaf's gradient (marked ``_leaf_grad`` by the leaf hook) makes the kept gradient
# itself pending, with no collective: its summands are new tensors (on the group's first
# rank the kept block plus the new summand, elsewhere the new summand: the kept value
# is counted once), and its own blocks are set aside (``_kept_blocks``) unchanged. The
# leaf hook offers it to a bucket like a fresh gradient; when the bucket completes, the
# reduced values are copied into the kept blocks and the gradient points at them again,
# so ``.grad`` stays the same tensor with the same storage (views of it, a contiguous
# buffer it lives in, see the new value, as in dense). Buckets holding kept gradients
# are waited for when backward ends, so that is true when ``backward()`` returns. After
# ``zero_grad(set_to_none=False)`` the kept value is zero and the sum is the fresh
# gradient's, bit for bit. Outside a backward pass (a user's ``p.grad += g``) the add
# is served as any other.
def fold_into_kept_grad(dest: Any, other: Any, kwargs: dict[str, Any]) -> Any:
    """NOTE [a kept gradient takes the pending one]: ``dest += other`` served without a
    collective, or None where it does not apply."""
    if kwargs or not getattr(dest, "_leaf_grad", False) or torch.is_grad_enabled() \
            or torch._C._current_graph_task_id() == -1 \
            or getattr(dest, "_kept_blocks", None) is not None:
        return None
    if not (_settings.enabled or _settings.no_sync_depth):
        return None
    src: Layout = getattr(other, "_layout", None)  # type: ignore[assignment]
    if src is None or not src.is_partial or src.reduce_op != "sum" \
            or src.value_layout() is not dest._layout or other.dtype != dest.dtype \
            or len(other._local_tensors) != len(dest._local_tensors):
        return None
    first = dest._rank == src.group_ranks[0]
    dest._kept_blocks = dest._local_tensors
    dest._local_tensors = [block + summand if first else summand for block, summand
                           in zip(dest._local_tensors, other._local_tensors, strict=True)]
    dest._layout = src
    return dest


def _restore_kept(grad: Any) -> None:
    """Copy a kept gradient's value (its blocks now) into its own blocks, and point it at
    them again (NOTE [a kept gradient takes the pending one])."""
    kept = getattr(grad, "_kept_blocks", None)
    if kept is not None:
        for block, value in zip(kept, grad._local_tensors, strict=True):
            block.copy_(value)
        grad._local_tensors, grad._kept_blocks = kept, None


def offer(leaf: Any, grad: Any) -> bool:
    """Take ``grad``, the pending gradient just accumulated into ``leaf``, for a bucketed
    reduction; True if taken (``leaf.grad`` is then set, awaiting its bucket; a kept
    gradient, NOTE [a kept gradient takes the pending one], is itself set awaiting)."""
    if _settings.no_sync_depth:  # stays pending (see the module docstring), its blocks
        # contiguous as the leaf hook makes them (an expanded one, the gradient of
        # ``w.sum()``, could not take the next micro-batch's in-place add)
        if not all(b.is_contiguous() for b in grad._local_tensors):
            grad._local_tensors = [b.contiguous() for b in grad._local_tensors]
        return True
    if not _settings.enabled or (torch.is_grad_enabled() and grad.requires_grad):
        return False
    plan = _reduction(grad, leaf)
    if plan is None:
        return False
    kind, group, op, size = plan
    summands = grad._local_tensors
    if size == 1:  # a group of one: the summand is the value (relaid out in place)
        if not all(b.is_contiguous() for b in summands):
            grad._local_tensors = [b.contiguous() for b in summands]
        grad._layout = leaf._layout
        if grad._leaf_grad:
            _restore_kept(grad)
        return True
    _poll()
    _begin_pass()
    index = _fixed_index(leaf, kind, op)
    key = (kind, id(group), op, grad.dtype, grad.device, index is not None)
    bucket = _pass.open.get(key)
    if bucket is None:
        bucket = _pass.open[key] = _Bucket(kind, group, op, size)
        if index is not None:
            bucket.fixed = {}
        AWAITING[0] += 1
    # The leaf's gradient, awaiting the bucket; its blocks are the summands until launch.
    blocks = summands if kind == "all_reduce" else []
    if getattr(grad, "_leaf_grad", False):  # a kept gradient stays the same object
        awaiting = grad
        bucket.kept |= getattr(grad, "_kept_blocks", None) is not None
        awaiting._local_tensors, awaiting._layout = blocks, leaf._layout
    else:
        awaiting = grad._like(blocks, leaf._layout)
        awaiting._leaf_grad = True
    awaiting._awaiting = bucket
    bucket.grads.append(awaiting)
    bucket.summands.extend(summands)
    bucket.nbytes += sum(s.numel() for s in summands) * grad.element_size()
    leaf.grad = awaiting
    if bucket.fixed is not None:  # launched when backward ends
        bucket.fixed[index] = (leaf, awaiting)  # type: ignore[index]
        return True
    cap = _settings.cap_bytes
    if _pass.launched == 0:
        cap = _first_cap_bytes(grad.device)
    if bucket.nbytes >= cap:
        del _pass.open[key]
        _launch(bucket)
    return True


# NOTE [the first bucket on CPU]
# DDP makes each backward pass's first bucket small (1 MiB) so that its all-reduce
# starts early and runs beside the rest of backward: on CUDA, NCCL works on its own
# stream while the cores and the GPU go on. Gloo's CPU all-reduce instead runs on the
# same cores as backward. Measured on the 2-core machine (8 x Linear(256), 2.1 MB of
# gradients, 60 alternating rounds), the extra all-reduce the small bucket costs did
# not pay: one bucket took 0.85-0.90 of DDP's step at world 4, the small first bucket
# 0.95-0.98; 0.84-0.99 against 0.88-1.01 at world 2; equal at 33 MB of gradients. So
# CPU gradients get a first bucket of ``bucket_cap_mb``; CUDA ones DDP's 1 MiB. On a
# CPU machine with cores to spare, ``first_bucket_cap_mb=1`` restores DDP's choice.
def _first_cap_bytes(device: torch.device) -> int:
    if _settings.first_cap_bytes is not None:
        return _settings.first_cap_bytes
    return _settings.cap_bytes if device.type == "cpu" else 2**20


def _begin_pass() -> None:
    """At a backward pass's first offer (or first data-parallel gradient): its end callback
    is queued."""
    task = torch._C._current_graph_task_id()
    if task != _pass.task:
        # Buckets a failed pass left open, with its expectations (not those of passes
        # under no_sync, which wait for this one): launched now, in order.
        _end_of_backward(carried=False, failed=True)
        for stale in list(_in_flight):  # the last pass's buckets nobody read (long done)
            _complete(stale)
        _pass.task = task
        torch.autograd.Variable._execution_engine.queue_callback(_end_of_backward)


def _fixed_index(leaf: Any, kind: str, op: str) -> int | None:
    """The index of a data-parallel parameter reduced in a fixed bucket, or None."""
    found = _NAMES.get(leaf) if kind == "all_reduce" and op == "sum" else None
    return None if found is None or id(leaf) not in _expected else found[0]


def _fill_fixed(carried: bool) -> None:
    """Give every expected parameter a place in its fixed bucket, whether or not this rank
    has its gradient (NOTE [every rank reduces the same parameters]); ``carried``: also
    those expected by passes under no_sync."""
    expected = [leaf for leaf, tag in _expected.values() if carried or tag != -2]
    for ident in [i for i, (_, tag) in _expected.items() if carried or tag != -2]:
        del _expected[ident]
    for leaf in expected:
        found = _NAMES.get(leaf)
        ranks = leaf._layout.group_ranks
        if found is None or len(ranks) == 1 or leaf._rank not in ranks \
                or not leaf._local_tensors:
            continue
        group = leaf._process_group
        key = ("all_reduce", id(group), "sum", leaf.dtype, leaf.device, True)
        bucket = _pass.open.get(key)
        if bucket is None:
            bucket = _pass.open[key] = _Bucket("all_reduce", group, "sum", len(ranks))
            bucket.fixed = {}
            AWAITING[0] += 1
        assert bucket.fixed is not None
        bucket.fixed.setdefault(found[0], (leaf, None))


def _end_of_backward(carried: bool = True, failed: bool = False) -> None:
    """Launch the pass's open buckets: those in arrival order first, then the fixed ones
    in an order every rank shares (NOTE [every rank reduces the same parameters]); wait
    for those whose gradients must be in place when backward returns. ``failed``: the
    buckets a failed pass left (its gradients are reduced, none is given to a parameter
    that had none)."""
    if _expected:
        _fill_fixed(carried)
    opened = list(_pass.open.values())
    _pass.open.clear()
    fixed = sorted((b for b in opened if b.fixed is not None), key=_fixed_order)
    for bucket in [b for b in opened if b.fixed is None] + fixed:
        _launch(bucket)
        if failed:
            bucket.missing = []
    _pass.launched = 0
    _pass.task = -1
    # A kept gradient's storage (NOTE [a kept gradient takes the pending one]), and a
    # parameter this rank had no gradient for (its .grad is read before any dispatch,
    # by an optimizer or clip_grad_norm_), take their values before backward returns.
    for bucket in [b for b in _in_flight if b.kept or b.missing]:
        _complete(bucket)


def _fixed_order(bucket: _Bucket) -> tuple[str, str, tuple[int, ...]]:
    leaf = next(iter(bucket.fixed.values()))[0]  # type: ignore[union-attr]
    return str(leaf.dtype), str(leaf.device), tuple(leaf._layout.group_ranks)


def _launch(bucket: _Bucket) -> None:
    _pass.launched += 1
    if bucket.fixed is not None:
        send = recv = flat = _fixed_buffer(bucket)
    elif bucket.kind == "all_reduce":
        summands = bucket.summands
        flat = summands[0].new_empty(sum(s.numel() for s in summands))
        offset = 0
        for grad in bucket.grads:
            blocks = []
            for block in grad._local_tensors:  # (the summands: one copy into the buffer)
                view = flat[offset:offset + block.numel()].view(block.shape)
                blocks.append(view.copy_(block))
                offset += block.numel()
            grad._local_tensors = blocks
        send = recv = flat
    else:
        send, recv = _scatter_buffers(bucket)
        flat = recv
    bucket.flat = flat
    stack = collectives._op_stack  # what count_collectives names as the op
    stack.append(f"gradient bucket ({len(bucket.grads)} gradients)")
    try:
        collectives._record(bucket.kind, send.numel() * send.element_size(), bucket.group)
    finally:
        stack.pop()
    bucket.launched_at = time.perf_counter()
    try:
        if bucket.kind == "all_reduce":
            bucket.work = dist.all_reduce(send, op=dist.ReduceOp.SUM, group=bucket.group,
                                          async_op=True)
        else:
            bucket.work = dist.reduce_scatter_tensor(recv, send, op=dist.ReduceOp.SUM,
                                                     group=bucket.group, async_op=True)
    except RuntimeError as error:
        raise collectives._failed(bucket.kind, bucket.group, error) from error
    bucket.summands = []
    _in_flight.append(bucket)


def _fixed_buffer(bucket: _Bucket) -> torch.Tensor:
    """A fixed bucket's buffer: one count per parameter (1 where this rank has its
    gradient), then each parameter's summand, by index: zeros where this rank has none,
    or, for a kept gradient on the group's first rank, its value (the others' kept
    gradients join through their summands: NOTE [a kept gradient takes the pending
    one])."""
    assert bucket.fixed is not None
    order = sorted(bucket.fixed)
    leaves = [bucket.fixed[i][0] for i in order]
    sizes = [leaf._local_tensors[0].numel() for leaf in leaves]
    anchor: torch.Tensor = leaves[0]._local_tensors[0]
    flat = anchor.new_zeros(len(order) + sum(sizes))
    offset = len(order)
    first = leaves[0]._rank == leaves[0]._layout.group_ranks[0]
    bucket.missing = []
    for position, (index, leaf, numel) in enumerate(zip(order, leaves, sizes, strict=True)):
        awaiting = bucket.fixed[index][1]
        view = flat[offset:offset + numel].view(leaf._local_tensors[0].shape)
        offset += numel
        if awaiting is not None:
            flat[position] = 1
            view.copy_(awaiting._local_tensors[0])
            awaiting._local_tensors = [view]
            continue
        grad = leaf.grad
        layout = getattr(grad, "_layout", None)
        if layout is not None and layout.is_partial and layout.value_layout() is leaf._layout \
                and len(grad._local_tensors) == 1:
            # pending from micro-batches under no_sync: its summand, as if offered now
            flat[position] = 1
            view.copy_(grad._local_tensors[0])
            grad._local_tensors, grad._layout, grad._awaiting = [view], leaf._layout, bucket
            bucket.grads.append(grad)
            continue
        if layout is leaf._layout and first:
            view.copy_(grad._local_tensors[0])  # a kept gradient (counted on its own)
        bucket.missing.append((position, leaf, view))
    return flat


def _fixed_done(bucket: _Bucket) -> None:
    """A fixed bucket's parameters that had no gradient here: where some rank had one,
    the reduced value becomes the gradient (into a kept one's own storage)."""
    assert bucket.flat is not None
    counts = bucket.flat[:len(bucket.fixed or ())].tolist()
    for position, leaf, view in bucket.missing:
        if counts[position] == 0:
            continue  # no rank's gradient: as dense, nothing changes
        grad = leaf.grad
        if getattr(grad, "_layout", None) is leaf._layout:
            grad._local_tensors[0].copy_(view)
        else:
            value = leaf._like([view], leaf._layout)
            value._leaf_grad = True
            leaf.grad = value
    bucket.missing = []


def _scatter_buffers(bucket: _Bucket) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduce-scatter's input (one row per rank: each gradient's rows for that rank,
    zero-padded to the longest ``torch.chunk`` piece) and output (this rank's row); the
    awaiting gradients' blocks become views of the output."""
    world = bucket.size
    pieces, widths = [], []
    for summand in bucket.summands:
        rows = summand.shape[0]
        chunk = -(-rows // world) if rows else 0
        inner = math.prod(summand.shape[1:])  # (a gradient of 0 rows has no summand[0])
        padded = summand.reshape(rows, inner).contiguous()  # (a transposed one: a copy)
        if chunk * world != rows:
            padded = torch.cat([padded, padded.new_zeros(chunk * world - rows, inner)])
        pieces.append(padded.view(world, chunk * inner))
        widths.append(chunk * inner)
    send = (torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0].contiguous()).view(-1)
    recv = send.new_empty(sum(widths))
    offset = 0
    for grad, width in zip(bucket.grads, widths, strict=True):
        block = grad._layout.shards[grad._layout.local_indices(grad._rank)[0]]
        shape = list(block.shard_sizes)
        grad._local_tensors = [recv[offset:offset + math.prod(shape)].view(shape)]
        offset += width
    return send, recv


def _poll() -> None:
    """Stamp the completion time of in-flight buckets found done (for the report of
    hidden time)."""
    now = None
    for bucket in _in_flight:
        if bucket.done_at is None and bucket.work is not None and bucket.work.is_completed():
            now = now or time.perf_counter()
            bucket.done_at = now


def wait(tensor: Any) -> None:
    """Wait for the bucket ``tensor`` (an awaiting gradient) is in; its blocks then hold
    the reduced value."""
    bucket = getattr(tensor, "_awaiting", None)
    if bucket is None:
        return
    if bucket.work is None and bucket.fixed is not None \
            and torch._C._current_graph_task_id() != _pass.task:
        # a failed pass's fixed bucket, read after it (zero_grad): launched as at the next
        # pass's start, with that pass's expectations and in every rank's order
        _end_of_backward(carried=False, failed=True)
    elif bucket.work is None:  # read before its pass ended (a hook reading .grad)
        for key, candidate in list(_pass.open.items()):
            if candidate is bucket:
                del _pass.open[key]
        _launch(bucket)
    _complete(bucket)


def _complete(bucket: _Bucket) -> None:
    if bucket in _in_flight:
        _poll()
        start = time.perf_counter()
        try:
            bucket.work.wait()
        except RuntimeError as error:
            raise collectives._failed(bucket.kind, bucket.group, error) from error
        end = time.perf_counter()
        done = bucket.done_at if bucket.done_at is not None else end
        for observer in wait_observers:
            observer(done - bucket.launched_at, end - start)
        _in_flight.remove(bucket)
        if bucket.op == "avg":
            assert bucket.flat is not None
            collectives._divide(bucket.flat, bucket.size)
        AWAITING[0] -= 1
        if bucket.missing:
            _fixed_done(bucket)
    for grad in bucket.grads:
        if getattr(grad, "_awaiting", None) is bucket:
            grad._awaiting = None
            if bucket.kept:
                _restore_kept(grad)
    bucket.grads = []


def wait_operands(args: Any, kwargs: Any) -> None:
    """Wait for every awaiting gradient among an op's operands (and in lists there)."""
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, list | tuple):
            for item in arg:
                if getattr(item, "_awaiting", None) is not None:
                    wait(item)
        elif getattr(arg, "_awaiting", None) is not None:
            wait(arg)


def wait_all() -> None:
    """Wait for every launched bucket (and launch the open ones)."""
    _end_of_backward()
    for bucket in list(_in_flight):
        _complete(bucket)


def release() -> None:
    """Forget every bucket (at exit: they hold their process groups)."""
    _pass.open.clear()
    _in_flight.clear()
    AWAITING[0] = 0
