"""Data parallel: gradients reduced in buckets during backward, against DDP and dense.

Every test trains replicated (or dim-0 chunked, FSDP-style) parameters on a batch split
over the ranks and compares with the dense model on the whole batch, or with
``DistributedDataParallel`` on the same data.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from layouts import rows
from torch import nn

import dispatch_shard as ds
from dispatch_shard import grad_reduction
from dispatch_shard.testing import multi_rank

BATCH = 6  # rows per rank


def _model(seed: int = 0, width: int = 8, layers: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*mods)


def _sharded(model: nn.Module, spec: ds.ShardingSpec | None = None) -> nn.Module:
    """A copy of ``model`` with every parameter a replicated (or ``spec``) ShardedTensor."""
    twin = copy.deepcopy(model)
    for name, param in list(twin.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(owner), attr, nn.Parameter(
            ds.ShardedTensor.from_replicated(param.detach(), spec or ds.Replicate())))
    return twin


def _batch(world_size: int, seed: int, width: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH * world_size, width, generator=generator),
            torch.randn(BATCH * world_size, width, generator=generator))


def _split(value: torch.Tensor, world_size: int) -> ds.ShardedTensor:
    return ds.ShardedTensor.from_replicated(value, rows(world_size))


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, ds.ShardedTensor) else value


def _bucket_events(counted: ds.count_collectives) -> list[ds.observe.CollectiveEvent]:
    return [e for e in counted.events if e.op.startswith("gradient bucket")]


@contextmanager
def _bucketing(**options: float) -> Iterator[None]:
    ds.set_gradient_bucketing(True, **options)
    try:
        yield
    finally:
        ds.set_gradient_bucketing(True)


@multi_rank(world_size=[2, 4])
def test_training_matches_ddp_with_one_bucketed_reduction_per_bucket(rank: int,
                                                                     world_size: int) -> None:
    dense = _model()
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(dense))
    sharded = _sharded(dense)
    ours_opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    for step in range(3):
        x, y = _batch(world_size, seed=step)
        ddp_opt.zero_grad()
        F.mse_loss(ddp(x[mine]), y[mine]).backward()
        ddp_opt.step()
        ours_opt.zero_grad()
        xs, ys = _split(x, world_size), _split(y, world_size)
        with ds.count_collectives() as counted:
            F.mse_loss(sharded(xs), ys).backward()
        buckets = _bucket_events(counted)
        # 6 small gradients fit one bucket: one all_reduce in backward, nothing else.
        assert len(buckets) == 1 and buckets[0].kind == "all_reduce", counted.events
        assert buckets[0].nbytes == sum(p.numel() for p in dense.parameters()) * 4
        assert len(counted.events) <= 2, counted.events  # + the loss's sum
        ours_opt.step()
    for ours, theirs in zip(sharded.parameters(), ddp.module.parameters(), strict=True):
        assert (_full(ours.detach()) - theirs.detach()).abs().max() < 1e-6


@multi_rank(world_size=[2])
def test_cpu_gradients_fill_a_full_first_bucket_unless_told_ddps(rank: int,
                                                                 world_size: int) -> None:
    """NOTE [the first bucket on CPU] in grad_reduction: 2.1 MB of CPU gradients make one
    bucket by default (gloo shares backward's cores), and DDP's two (a first bucket of at
    least 1 MiB, then the rest) with ``first_bucket_cap_mb=1``; dense's values either way."""
    dense = _model(width=512, layers=2)
    x, y = _batch(world_size, seed=4, width=512)
    F.mse_loss(dense(x), y).backward()
    total = sum(p.numel() for p in dense.parameters()) * 4
    for options, sizes in (({}, [total]), ({"first_bucket_cap_mb": 1.0}, None)):
        sharded = _sharded(dense)
        with _bucketing(**options), ds.count_collectives() as counted:
            F.mse_loss(sharded(_split(x, world_size)), _split(y, world_size)).backward()
            grads = [_full(p.grad) for p in sharded.parameters()]
        got = [e.nbytes for e in _bucket_events(counted)]
        if sizes is None:  # DDP's: the last layer's weight and bias, then the rest
            assert len(got) == 2 and got[0] >= 2**20 and sum(got) == total, got
        else:
            assert got == sizes, got
        for ours, theirs in zip(grads, dense.parameters(), strict=True):
            assert theirs.grad is not None
            torch.testing.assert_close(ours, theirs.grad)


@multi_rank(world_size=[1, 2])
def test_weight_gradients_come_out_of_backward_contiguous(rank: int, world_size: int) -> None:
    """NOTE [a product of a transposed block is column-major] in ops/matmul.py: a linear
    layer's weight gradient has the weight's memory order as backward makes it (read
    with ``autograd.grad``: no leaf hook), so neither the leaf hook nor a bucket copies a
    transposed block; the values are dense's."""
    dense = _model()
    sharded = _sharded(dense)
    x, y = _batch(world_size, seed=3)
    weights = [p for name, p in sharded.named_parameters() if name.endswith("weight")]
    grads = torch.autograd.grad(F.mse_loss(sharded(_split(x, world_size)),
                                           _split(y, world_size)), weights)
    expected = torch.autograd.grad(
        F.mse_loss(dense(x), y), [p for n, p in dense.named_parameters() if n.endswith("weight")])
    for grad, dense_grad in zip(grads, expected, strict=True):
        assert all(block.is_contiguous() for block in grad._local_tensors), \
            [block.stride() for block in grad._local_tensors]
        torch.testing.assert_close(_full(grad), dense_grad, atol=1e-6, rtol=1e-5)


@multi_rank(world_size=[1])
def test_a_whole_block_on_one_rank_is_replicated_without_a_copy(rank: int,
                                                               world_size: int) -> None:
    """On one rank, a sum over the split dim is a single whole block (not Partial): laid
    out as the replicated parameter's gradient, the block is reused, not copied."""
    g = _split(torch.randn(BATCH, 8), world_size)
    summed = g.sum(0)
    assert not summed._layout.pending and summed._layout.spec != ds.Replicate()
    replicated = summed._redistributed(ds.Replicate())
    assert replicated._layout.is_replicate
    assert replicated._local_tensors[0] is summed._local_tensors[0]
    torch.testing.assert_close(replicated.full_tensor(), g.full_tensor().sum(0))


@multi_rank(world_size=[2])
def test_buckets_launch_during_backward_and_overlap_it(rank: int, world_size: int) -> None:
    """With 256 and 600 byte caps, the gradients of six 8x8 layers (a 32-byte bias, then
    a 256-byte weight, each) fill three buckets: a bucket is launched by the gradient
    hook that takes it past its cap, during backward; the last one when backward ends."""
    dense = _model(layers=6)
    sharded = _sharded(dense)
    x, y = _batch(world_size, seed=1)
    xs, ys = _split(x, world_size), _split(y, world_size)
    with _bucketing(bucket_cap_mb=600 / 2**20, first_bucket_cap_mb=256 / 2**20):
        with ds.count_collectives() as counted:
            F.mse_loss(sharded(xs), ys).backward()
            grads = [_full(p.grad) for p in sharded.parameters()]
    buckets = _bucket_events(counted)
    assert [e.nbytes for e in buckets] == [288, 608, 832], counted.events
    # Each bucket is waited for once (by the full_tensor reads above), and is timed.
    assert len(counted.reductions) == len(buckets)
    assert counted.reduction_s >= counted.reduction_exposed_s >= 0
    assert counted.reduction_hidden_s == counted.reduction_s - counted.reduction_exposed_s
    dense_x, dense_y = x.clone(), y.clone()
    F.mse_loss(dense(dense_x), dense_y).backward()
    for ours, param in zip(grads, dense.parameters(), strict=True):
        torch.testing.assert_close(ours, param.grad)


@multi_rank(world_size=[2])
def test_no_sync_accumulates_without_communication(rank: int, world_size: int) -> None:
    dense = _model(seed=3)
    sharded = _sharded(dense)
    batches = [_batch(world_size, seed=10 + i) for i in range(3)]
    with ds.count_collectives() as counted:
        with ds.no_sync():
            for x, y in batches[:2]:
                F.mse_loss(sharded(_split(x, world_size)), _split(y, world_size)).backward()
    assert not _bucket_events(counted), counted.events
    assert all(p.grad._layout.pending for p in sharded.parameters())  # still summands
    x, y = batches[2]
    with ds.count_collectives() as counted:
        F.mse_loss(sharded(_split(x, world_size)), _split(y, world_size)).backward()
    assert len(_bucket_events(counted)) == 1, counted.events
    for x, y in batches:
        F.mse_loss(dense(x), y).backward()
    for ours, param in zip(sharded.parameters(), dense.parameters(), strict=True):
        assert ours.grad.sharding_spec() == ds.Replicate()
        torch.testing.assert_close(_full(ours.grad), param.grad)


@multi_rank(world_size=[1, 3])
def test_kept_gradients_are_reduced_in_the_buckets(rank: int, world_size: int) -> None:
    """NOTE [a kept gradient takes the pending one] in grad_reduction: with gradients kept
    between backward passes (``zero_grad(set_to_none=False)``; accumulation over
    micro-batches without ``no_sync``; and inside ``no_sync``) each backward issues only
    its bucket (none inside ``no_sync``), each ``.grad`` stays the same object, and
    gradients and AdamW steps equal dense's."""
    dense = _model(seed=6, layers=4)
    sharded = _sharded(dense)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (dense, sharded)]
    one = 1 if world_size > 1 else 0
    kept: list[torch.Tensor] = []
    views: list[torch.Tensor] = []
    for step in range(4):
        micro = [_batch(world_size, seed=40 + 3 * step + i) for i in range(2)]
        for opt in opts:
            opt.zero_grad(set_to_none=step == 0)
        for i, (x, y) in enumerate(micro):
            F.mse_loss(dense(x), y).backward()
            quiet = step == 3 and i == 0  # the last step accumulates inside no_sync
            xs, ys = _split(x, world_size), _split(y, world_size)
            with ds.count_collectives() as counted, \
                    (ds.no_sync() if quiet else contextlib.nullcontext()):
                F.mse_loss(sharded(xs), ys).backward()
            assert len(counted.events) == (0 if quiet else one), (step, i, counted.events)
            if kept:
                assert all(p.grad is g for p, g in zip(sharded.parameters(), kept, strict=True))
            if kept and not quiet:  # (inside no_sync the gradients are pending summands)
                # the same storage: a view of a block taken a step ago sees the new value
                for p, view in zip(sharded.parameters(), views, strict=True):
                    assert view.data_ptr() == p.grad._local_tensors[0].data_ptr()
                    torch.testing.assert_close(view, _full(p.grad).view(-1))
        kept = [p.grad for p in sharded.parameters()]
        views = [p.grad._local_tensors[0].view(-1) for p in sharded.parameters()]
        for ours, param in zip(sharded.parameters(), dense.parameters(), strict=True):
            assert ours.grad.sharding_spec() == ds.Replicate()
            torch.testing.assert_close(_full(ours.grad), param.grad)
        for opt in opts:
            opt.step()
        for ours, param in zip(sharded.parameters(), dense.parameters(), strict=True):
            torch.testing.assert_close(_full(ours.detach()), param.detach())
    # Outside backward, a user's ``+=`` of a pending gradient into ``.grad`` is served as
    # any other add: the gradient stays replicated, its blocks the value.
    loss = F.mse_loss(sharded(_split(x, world_size)), _split(y, world_size))
    weight = next(iter(sharded.parameters()))
    (pending,) = torch.autograd.grad(loss, [weight])
    before = _full(weight.grad).clone()
    with torch.no_grad():
        weight.grad += pending
    assert weight.grad.sharding_spec() == ds.Replicate()
    torch.testing.assert_close(weight.grad.local_shards()[0].tensor, before + _full(pending))


@multi_rank(world_size=[2])
def test_a_step_inside_no_sync_is_still_right(rank: int, world_size: int) -> None:
    """A pending gradient is a correct value: an optimizer reading it reduces it."""
    dense = _model(seed=4)
    sharded = _sharded(dense)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (dense, sharded)]
    x, y = _batch(world_size, seed=20)
    with ds.no_sync():
        F.mse_loss(sharded(_split(x, world_size)), _split(y, world_size)).backward()
        opts[1].step()
    F.mse_loss(dense(x), y).backward()
    opts[0].step()
    for ours, param in zip(sharded.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(_full(ours.detach()), param.detach())


@multi_rank(world_size=[3])
def test_clip_zero_grad_and_unused_parameters(rank: int, world_size: int) -> None:
    dense = _model(seed=5, layers=4)
    sharded = _sharded(dense)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (dense, sharded)]
    for step in range(4):
        x, y = _batch(world_size, seed=30 + step)
        norms = []
        for model, opt, xs, ys in ((dense, opts[0], x, y),
                                   (sharded, opts[1], _split(x, world_size),
                                    _split(y, world_size))):
            opt.zero_grad(set_to_none=step != 1)
            # Layer 2 (the third Linear) is skipped on odd steps: no gradient there.
            h = xs
            for i, layer in enumerate(model):
                if step % 2 == 1 and i in (4, 5):
                    continue
                h = layer(h)
            F.mse_loss(h, ys).backward()
            norms.append(_full(nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)))
            opt.step()
        torch.testing.assert_close(norms[1], norms[0])
        assert norms[0] > 0.05  # (the clipping scaled the gradients)
        for ours, param in zip(sharded.parameters(), dense.parameters(), strict=True):
            assert (ours.grad is None) == (param.grad is None)
            if param.grad is not None:
                torch.testing.assert_close(_full(ours.grad), param.grad)
            torch.testing.assert_close(_full(ours.detach()), param.detach())


@multi_rank(world_size=[4])
def test_fsdp_style_gradients_are_reduce_scattered_in_one_bucket(rank: int,
                                                                 world_size: int) -> None:
    """Parameters chunked along dim 0 over the ranks (uneven: 9 and 5 rows over 4) get
    their gradients by one reduce-scatter: each rank receives only its rows."""
    torch.manual_seed(6)
    dense = nn.Sequential(nn.Linear(8, 9), nn.GELU(), nn.Linear(9, 5))
    sharded = _sharded(dense, rows(world_size))
    x, y = _batch(world_size, seed=40)
    y = y[:, :5]
    xs, ys = _split(x, world_size), _split(y, world_size)
    with ds.count_collectives() as counted:
        F.mse_loss(sharded(xs), ys).backward()
        grads = [_full(p.grad) for p in sharded.parameters()]
    kinds = [e.kind for e in _bucket_events(counted)]
    assert kinds == ["reduce_scatter"], counted.events
    for param in sharded.parameters():
        assert param.grad.sharding_spec() == param.sharding_spec()
    F.mse_loss(dense(x), y).backward()
    for ours, param in zip(grads, dense.parameters(), strict=True):
        torch.testing.assert_close(ours, param.grad)


@multi_rank(world_size=[2])
def test_awaiting_gradients_are_waited_for_by_every_reader(rank: int,
                                                           world_size: int) -> None:
    """Each parameter's gradient is read a different way, first thing after backward
    (a bucket per gradient, so each read is the one that waits)."""
    dense = _model(seed=7, layers=3)
    sharded = _sharded(dense)
    x, y = _batch(world_size, seed=50)
    with _bucketing(bucket_cap_mb=1e-6, first_bucket_cap_mb=1e-6):
        F.mse_loss(sharded(_split(x, world_size)), _split(y, world_size)).backward()
    F.mse_loss(dense(x), y).backward()
    assert grad_reduction.AWAITING[0] == 6
    readers = [lambda g: g.local_shards()[0].tensor, lambda g: g.local_tensor(),
               lambda g: g.local_blocks()[0], lambda g: g.full_tensor(),
               lambda g: (g * 1).full_tensor(), lambda g: copy.deepcopy(g).full_tensor()]
    for reader, ours, param in zip(readers, sharded.parameters(), dense.parameters(),
                                   strict=True):
        torch.testing.assert_close(reader(ours.grad), param.grad)
    assert grad_reduction.AWAITING[0] == 0


@multi_rank(world_size=[2])
def test_bucketing_off_reduces_each_gradient_in_its_hook(rank: int, world_size: int) -> None:
    dense = _model(seed=8)
    sharded = _sharded(dense)
    x, y = _batch(world_size, seed=60)
    ds.set_gradient_bucketing(False)
    try:
        with ds.count_collectives() as counted:
            F.mse_loss(sharded(_split(x, world_size)), _split(y, world_size)).backward()
    finally:
        ds.set_gradient_bucketing(True)
    assert not _bucket_events(counted)
    grad_reductions = [e for e in counted.events if e.op == "_grad_to_leaf_layout"]
    assert len(grad_reductions) == len(list(dense.parameters())), counted.events
    F.mse_loss(dense(x), y).backward()
    for ours, param in zip(sharded.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(_full(ours.grad), param.grad)


def test_bucket_sizes_must_be_positive() -> None:
    import pytest

    with pytest.raises(ValueError, match="bucket sizes must be positive"):
        ds.set_gradient_bucketing(True, bucket_cap_mb=0)
    assert dist.is_available()


@multi_rank(world_size=[1, 3])
def test_a_pending_gradient_zeroed_in_place_is_zero(rank: int, world_size: int) -> None:
    """zero_grad(set_to_none=False) of a gradient still pending (micro-batches under
    no_sync, then a synced backward that did not reach that parameter) zeroed a reduced
    copy (the decomposition of zero_ ran on the whole value), so the next step added the
    old gradient into the new one. zero_ is blockwise on any layout (no collective);
    other in-place ops the decompositions serve (fill_) reduce the operand in place
    first (NOTE [an in-place op on a partial tensor] in ops/decomposed.py)."""
    value = torch.arange(6.0).reshape(2, 3)
    for op in ("sum", "max"):
        pending = ds.ShardedTensor.from_replicated(value, ds.Replicate()).redistribute(
            ds.Partial(op))
        with ds.count_collectives() as counted:
            assert pending.zero_() is pending
        assert counted.events == [] and pending._layout.is_partial
        torch.testing.assert_close(pending.full_tensor(), torch.zeros(2, 3))
        filled = ds.ShardedTensor.from_replicated(value, ds.Replicate()).redistribute(
            ds.Partial(op))
        assert filled.fill_(5.0) is filled
        torch.testing.assert_close(filled.full_tensor(), torch.full((2, 3), 5.0))
    # The training sequence that found it: the second layer runs in the first micro-batch
    # of a step only, then in the last micro-batch of the next step only.
    torch.manual_seed(0)
    dense = _model(seed=3)
    ours = ds.data_parallel(_sharded(dense))
    x, y = _batch(world_size, seed=5)
    for uses in ((True, False), (False, True)):
        ours.zero_grad(set_to_none=False)
        dense.zero_grad(set_to_none=False)
        for i, use in enumerate(uses):
            synced = contextlib.nullcontext() if i == len(uses) - 1 else ds.no_sync()
            with synced:
                out = ours(_split(x, world_size))
                F.mse_loss(out if use else out.detach() * 0 + ours[0].weight.sum() * 0,
                           _split(y, world_size)).backward()
            ref = dense(x)
            F.mse_loss(ref if use else ref.detach() * 0 + dense[0].weight.sum() * 0,
                       y).backward()
        for mine, theirs in zip(ours.parameters(), dense.parameters(), strict=True):
            torch.testing.assert_close(_full(mine.grad), theirs.grad)
    dist.barrier()
