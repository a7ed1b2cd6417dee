"""``ds.data_parallel``: a module with replicated parameters run on each rank's rows as
dense code. Every test compares with the dense module on the whole batch."""

from __future__ import annotations

import contextlib
import copy
import gc

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from layouts import cols, rows
from torch import nn

import dispatch_shard as ds
from dispatch_shard.testing import multi_rank


class _Net(nn.Module):
    """Rows independent: Linear, LayerNorm, GELU, and a branch some steps skip."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(width, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, width)
        self.extra = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, *, skip: bool = False) -> torch.Tensor:
        h = self.out(F.gelu(self.norm(self.inp(x))))
        return h if skip else self.extra(h)


def _replicated(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for name, param in list(twin.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(owner), attr, nn.Parameter(
            ds.ShardedTensor.from_replicated(param.detach(), ds.Replicate())))
    return twin


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, ds.ShardedTensor) else value


def _data(n: int, seed: int, width: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, generator=generator),
            torch.randn(n, width, generator=generator))


@multi_rank(world_size=[1, 3])
def test_training_matches_dense_against_float64(rank: int, world_size: int) -> None:
    """AdamW, 10 rows over the ranks (4, 4, 2 at three), a branch skipped on odd steps:
    the data-parallel module and dense float32 both stay within float32 noise of a
    float64 copy, and the losses agree."""
    torch.manual_seed(0)
    dense = _Net()
    exact = copy.deepcopy(dense).double()
    ours = ds.data_parallel(_replicated(dense))
    assert isinstance(ours, _Net) and ours.state_dict().keys() == dense.state_dict().keys()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (dense, exact, ours)]
    for step in range(5):
        x, y = _data(10, seed=step)
        skip = step % 2 == 1
        losses = []
        for model, opt, xs, ys in ((dense, opts[0], x, y),
                                   (exact, opts[1], x.double(), y.double()),
                                   (ours, opts[2], ds.ShardedTensor.from_replicated(
                                       x, rows(world_size)),
                                    ds.ShardedTensor.from_replicated(y, rows(world_size)))):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(xs, skip=skip), ys)
            loss.backward()
            opt.step()
            losses.append(_full(loss.detach()).item())
        assert abs(losses[2] - losses[1]) < 1e-5, losses
        assert (ours.extra.weight.grad is None) == skip  # (no gradient: not used)
    for mine, theirs, reference in zip(ours.parameters(), dense.parameters(),
                                       exact.parameters(), strict=True):
        assert (_full(mine.detach()).double() - reference.detach()).abs().max() < 2e-4
        assert (theirs.detach().double() - reference.detach()).abs().max() < 2e-4


class _Sum(nn.Module):
    """Two parameters summed: autograd hands both the same gradient tensor."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.c = nn.Parameter(torch.randn(width, generator=torch.Generator().manual_seed(3)))
        self.d = nn.Parameter(torch.randn(width, generator=torch.Generator().manual_seed(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * (self.c + self.d)


@multi_rank(world_size=[1, 3])
def test_parameters_given_one_gradient_tensor_keep_their_own(rank: int,
                                                             world_size: int) -> None:
    """NOTE [one gradient tensor for two parameters] in data_parallel: ``c + d`` gives both
    parameters the same gradient tensor; accumulated over micro-batches (with and without
    ``no_sync``, fresh and kept gradients), each gradient equals dense's."""
    torch.manual_seed(0)
    dense = _Sum()
    ours = ds.data_parallel(_replicated(dense))
    for step in range(3):
        for model in (dense, ours):
            model.zero_grad(set_to_none=step == 0)
        for i in range(2):
            x, y = _data(4 * world_size, seed=50 + 2 * step + i)
            F.mse_loss(dense(x), y).backward()
            with ds.no_sync() if step == 2 and i == 0 else contextlib.nullcontext():
                F.mse_loss(ours(ds.ShardedTensor.from_replicated(x, rows(world_size))),
                           ds.ShardedTensor.from_replicated(y, rows(world_size))).backward()
        for (name, mine), theirs in zip(ours.named_parameters(), dense.parameters(),
                                        strict=True):
            torch.testing.assert_close(_full(mine.grad), theirs.grad, msg=name)


@multi_rank(world_size=[2])
def test_the_step_communicates_only_its_gradient_bucket(rank: int, world_size: int) -> None:
    """The first call with new sizes checks the ranks agree (one 16-byte all-gather per
    rank); later steps issue only the gradients' bucket, in backward. Each rank wraps
    its own rows of the step's batch with from_local_tensor inside unchecked_creation:
    no communication."""
    torch.manual_seed(0)
    dense = _Net()
    ours = ds.data_parallel(_replicated(dense))
    mine = slice(3 * rank, 3 * rank + 3)
    for step in range(2):
        ours.zero_grad(set_to_none=True)
        with ds.count_collectives() as counted:
            with ds.unchecked_creation():
                x, y = (ds.ShardedTensor.from_local_tensor(t[mine], rows(world_size), 6, 8)
                        for t in _data(6, seed=1))
            loss = F.mse_loss(ours(x), y)
            forward = [e.kind for e in counted.events]
            loss.backward()
        assert forward == (["all_gather"] if step == 0 else []), counted.events
        buckets = [e for e in counted.events if e.op.startswith("gradient bucket")]
        assert len(buckets) == 1 and buckets[0].kind == "all_reduce", counted.events
        assert len(counted.events) == len(forward) + 1, counted.events
    grads = [_full(p.grad) for p in ours.parameters()]
    xd, yd = _data(6, seed=1)
    F.mse_loss(dense(xd), yd).backward()
    for mine, param in zip(grads, dense.parameters(), strict=True):
        torch.testing.assert_close(mine, param.grad)


@multi_rank(world_size=[2])
def test_accumulation_with_no_sync_and_clipping(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    dense = _Net()
    ours = ds.data_parallel(_replicated(dense))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (dense, ours)]
    batches = [_data(8, seed=20 + i) for i in range(3)]
    with ds.count_collectives() as counted:
        with ds.no_sync():
            for x, y in batches[:2]:
                F.mse_loss(ours(ds.ShardedTensor.from_replicated(x, rows(world_size))),
                           ds.ShardedTensor.from_replicated(y, rows(world_size))).backward()
    assert not [e for e in counted.events if e.op.startswith("gradient bucket")]
    x, y = batches[2]
    F.mse_loss(ours(ds.ShardedTensor.from_replicated(x, rows(world_size))),
               ds.ShardedTensor.from_replicated(y, rows(world_size))).backward()
    for x, y in batches:
        F.mse_loss(dense(x), y).backward()
    norms = [_full(nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.1)) for m in (dense, ours)]
    torch.testing.assert_close(norms[1], norms[0])
    assert norms[0] > 0.1  # (clipping scaled the gradients)
    for opt in opts:
        opt.step()
    for mine, param in zip(ours.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(_full(mine.detach()), param.detach())


class _TwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, scale: float = 1.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.lin(x) * mask * scale
        return h, {"sq": h * h, "tag": torch.tensor(0)[None].expand(x.shape[0])}


@multi_rank(world_size=[3])
def test_inputs_outputs_and_their_gradients(rank: int, world_size: int) -> None:
    """A split input that requires grad gets its gradient in its own layout; a plain
    tensor argument passes through; outputs in a tuple and a dict come back split; under
    no_grad nothing is recorded."""
    torch.manual_seed(3)
    dense = _TwoOut()
    ours = ds.data_parallel(_replicated(dense))
    x = torch.randn(7, 4)
    mask = torch.tensor([1.0, 0.0, 1.0, 2.0])
    xs = ds.ShardedTensor.from_replicated(x, rows(world_size)).requires_grad_()
    xd = x.clone().requires_grad_()
    h, extra = ours(xs, mask, scale=0.5)
    hd, extra_d = dense(xd, mask, scale=0.5)
    assert h.sharding_spec() == rows(world_size) and list(h.shape) == [7, 4]
    torch.testing.assert_close(h.full_tensor(), hd)
    torch.testing.assert_close(extra["sq"].full_tensor(), extra_d["sq"])
    assert extra["tag"].full_tensor().tolist() == [0] * 7
    (h.sum() + extra["sq"].sum()).backward()
    (hd.sum() + extra_d["sq"].sum()).backward()
    assert xs.grad.sharding_spec() == rows(world_size)
    torch.testing.assert_close(xs.grad.full_tensor(), xd.grad)
    torch.testing.assert_close(ours.lin.weight.grad.full_tensor(), dense.lin.weight.grad)
    with torch.no_grad():
        out, _ = ours(xs, mask)
    assert not out.requires_grad
    torch.testing.assert_close(out.full_tensor(), dense(x, mask)[0].detach())


class _Mean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).mean(0, keepdim=True)


class _Flatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).view(x.shape[0], -1)


@multi_rank(world_size=[3])
def test_bad_modules_raise_on_every_rank(rank: int, world_size: int) -> None:
    """7 rows over 3 ranks (3, 3, 1): a mean over the batch keeps one row, which only the
    last rank holds, yet every rank raises; so does an error of the last rank's empty
    block (2 rows over 3 ranks); the parameters are put back either way."""
    torch.manual_seed(0)
    mean = ds.data_parallel(_replicated(_Mean()))
    x = ds.ShardedTensor.from_replicated(torch.randn(7, 4), rows(world_size))
    with pytest.raises(ValueError, match="every output must keep the batch"):
        mean(x)
    assert isinstance(mean.lin.weight, ds.ShardedTensor)
    flatten = ds.data_parallel(_replicated(_Flatten()))
    empty_on_last = ds.ShardedTensor.from_replicated(torch.randn(2, 4), rows(world_size))
    with pytest.raises(RuntimeError, match="0 elements"):
        flatten(empty_on_last)
    assert isinstance(flatten.lin.weight, ds.ShardedTensor)
    # The same module, sizes it runs with: right.
    out = flatten(x)
    weight, bias = flatten.lin.weight.full_tensor(), flatten.lin.bias.full_tensor()
    torch.testing.assert_close(out.full_tensor(), x.full_tensor() @ weight.T + bias)


class _Routed(nn.Module):
    """Rows independent, but a layer runs only when some row of the batch needs it: under
    data_parallel, only on the ranks holding such a row."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.e = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x)
        needed = x[:, 0] > 10
        if needed.any():
            out = out + self.e(x) * needed[:, None]
        return out


def _routed_setup() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense and data-parallel _Routed, a batch no row of which runs ``e``, the same
    batch where only rank 0's first row does, and the target."""
    torch.manual_seed(0)
    dense = _Routed()
    ours = ds.data_parallel(_replicated(dense))
    x, y = _data(6, seed=30, width=4)
    x[:, 0] = 0.0
    skewed = x.clone()
    skewed[0, 0] = 20.0  # rank 0's row: only rank 0 runs self.e
    return dense, ours, x, skewed, y[:, :3]


def _routed_step(ours: nn.Module, dense: nn.Module, x: torch.Tensor, target: torch.Tensor,
                 world_size: int) -> None:
    """One backward of ``ours`` on ``x`` split by rows, and of ``dense`` on the whole."""
    F.mse_loss(ours(ds.ShardedTensor.from_replicated(x, rows(world_size))),
               ds.ShardedTensor.from_replicated(target, rows(world_size))).backward()
    F.mse_loss(dense(x), target).backward()


def _same_grads(ours: nn.Module, dense: nn.Module) -> None:
    for mine, theirs in zip(ours.parameters(), dense.parameters(), strict=True):
        if theirs.grad is None:
            assert mine.grad is None
        else:
            torch.testing.assert_close(_full(mine.grad), theirs.grad)


@multi_rank(world_size=[2, 3])
def test_a_layer_some_ranks_skip_gets_dense_s_gradient(rank: int, world_size: int) -> None:
    """NOTE [every rank reduces the same parameters]: a layer that only rank 0 runs (its
    row needs it) gives it gradients the others lack. In buckets, each rank reduces every
    expected parameter in a fixed bucket (zeros where it has none, a count riding along):
    gloo used to abort the process on the size mismatch. The gradients equal dense's,
    None where no rank ran the layer; with fresh, kept (set_to_none=False) and
    no_sync-accumulated gradients; one all-reduce per step, as before."""
    dense, ours, x, skewed, target = _routed_setup()
    everywhere = x.clone()
    everywhere[[0, 2, 4], 0] = 20.0
    for batch in (skewed, x, everywhere, skewed):
        ours.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        with ds.count_collectives() as counted:
            _routed_step(ours, dense, batch, target, world_size)
        _same_grads(ours, dense)
        reductions = [e for e in counted.events if e.kind != "all_gather"]  # (checks)
        assert len(reductions) == 1 and reductions[0].op.startswith("gradient bucket"), \
            counted.events
    # Kept gradients: zero_grad(set_to_none=False) keeps .grad, also e's where it ran.
    for batch in (everywhere, skewed, x, skewed):
        ours.zero_grad(set_to_none=False)
        dense.zero_grad(set_to_none=False)
        _routed_step(ours, dense, batch, target, world_size)
        _same_grads(ours, dense)
    # Micro-batches under no_sync, the skew in the first or only in the last.
    for batches in ((skewed, x), (x, skewed), (skewed, skewed)):
        ours.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        with ds.no_sync():
            _routed_step(ours, dense, batches[0], target, world_size)
        _routed_step(ours, dense, batches[1], target, world_size)
        _same_grads(ours, dense)
    dist.barrier()


class _MixedRouted(_Routed):
    """_Routed with a float64 expert: two fixed buckets, one per dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x)
        needed = x[:, 0] > 10
        if needed.any():
            out = out + (self.e(x.double()) * needed[:, None]).float()
        return out


class _Before(nn.Module):
    """A plain (sharded-ops) layer, then a data-parallel _Routed."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        with torch.no_grad():
            self.pre.weight.copy_(torch.eye(4))
            self.pre.bias.zero_()
        self.body = _Routed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.pre(x))


@multi_rank(world_size=[2])
def test_skipped_layers_through_whole_steps(rank: int, world_size: int) -> None:
    """NOTE [every rank reduces the same parameters], the steps around it (found by
    review): the gradient of a layer this rank skipped is in place when backward returns
    (clip_grad_norm_ and the optimizer list parameters by ``.grad is not None``); fixed
    buckets of two dtypes go in one order on every rank; indices of freed modules'
    parameters are not reused; a backward that raises midway leaves the next step
    right, and a reduced gradient nobody read leaves nothing behind after zero_grad."""
    dense, ours, x, skewed, target = _routed_setup()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, dense)]
    for _ in range(2):
        for optimizer in optimizers:
            optimizer.zero_grad()
        F.mse_loss(ours(ds.ShardedTensor.from_replicated(skewed, rows(world_size))),
                   ds.ShardedTensor.from_replicated(target, rows(world_size))).backward()
        assert ours.e.weight.grad is not None  # (read first: nothing else waited yet)
        F.mse_loss(dense(skewed), target).backward()
        norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0) for m in (ours, dense)]
        torch.testing.assert_close(_full(norms[0]), norms[1])
        for optimizer in optimizers:
            optimizer.step()
    for mine, theirs in zip(ours.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(_full(mine.detach()), theirs.detach())
    # Two dtypes: two fixed buckets.
    torch.manual_seed(1)
    dense = _MixedRouted()
    ours = ds.data_parallel(_replicated(dense))
    _routed_step(ours, dense, skewed, target, world_size)
    _same_grads(ours, dense)
    # Two data-parallel modules, the second wrapped after another one was freed: their
    # parameters' indices must differ (they share a fixed bucket).
    ours = dense = None  # (the modules above: freed now, not at the collection below)
    gc.collect()
    freed = ds.data_parallel(_replicated(nn.Linear(4, 4)))
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    ours = _replicated(dense)
    ds.data_parallel(ours[0])
    del freed
    gc.collect()
    ds.data_parallel(ours[1])
    _routed_step(ours, dense, x, target, world_size)
    _same_grads(ours, dense)
    # A backward that raises on every rank midway (a hook outside the module), then steps.
    torch.manual_seed(2)
    dense = _Before()
    ours = _replicated(dense)
    ds.data_parallel(ours.body)
    failing = [True]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if failing[0]:
            raise RuntimeError("raised in a hook")
        return grad

    ours.pre.weight.register_hook(hook)
    with pytest.raises(RuntimeError, match="raised in a hook"):
        F.mse_loss(ours(ds.ShardedTensor.from_replicated(skewed, rows(world_size))),
                   ds.ShardedTensor.from_replicated(target, rows(world_size))).backward()
    failing[0] = False
    for batch in (x, skewed, x):
        ours.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        _routed_step(ours, dense, batch, target, world_size)
        _same_grads(ours, dense)
    dist.barrier()


@multi_rank(world_size=[2, 3])
def test_unbucketed_ranks_that_compute_different_parameters_raise(rank: int,
                                                                  world_size: int) -> None:
    """NOTE [every rank reduces the same parameters]: unbucketed, each gradient reduced
    alone, such ranks added unrelated gradients; now every rank raises, naming the
    parameters (one 16-byte all-gather before each such reduction). Steps that run the
    same layers on every rank train as dense."""
    dense, ours, x, skewed, target = _routed_setup()
    ds.set_gradient_bucketing(False)
    try:
        with pytest.raises(RuntimeError, match="gradients of different parameters") as info:
            F.mse_loss(ours(ds.ShardedTensor.from_replicated(skewed, rows(world_size))),
                       ds.ShardedTensor.from_replicated(target, rows(world_size))).backward()
        assert "e.weight" in str(info.value) or "e.bias" in str(info.value)
        for trigger in ((), (0, 2, 4)):
            xs = x.clone()
            xs[list(trigger), 0] = 20.0  # (nowhere, or on every rank)
            ours.zero_grad(set_to_none=True)
            dense.zero_grad(set_to_none=True)
            _routed_step(ours, dense, xs, target, world_size)
            _same_grads(ours, dense)
    finally:
        ds.set_gradient_bucketing(True)
    dist.barrier()


@multi_rank(world_size=[2])
def test_what_data_parallel_refuses(rank: int, world_size: int) -> None:
    with pytest.raises(TypeError, match="parameter 'weight' is a plain tensor"):
        ds.data_parallel(nn.Linear(4, 4))
    chunked = nn.Linear(4, 4)
    chunked.weight = nn.Parameter(ds.ShardedTensor.from_replicated(
        chunked.weight.detach(), rows(world_size)))
    chunked.bias = nn.Parameter(ds.ShardedTensor.from_replicated(
        chunked.bias.detach(), ds.Replicate()))
    with pytest.raises(TypeError, match="replicated parameters only"):
        ds.data_parallel(chunked)
    model = ds.data_parallel(_replicated(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="already data-parallel"):
        ds.data_parallel(model)
    with pytest.raises(TypeError, match="called with plain tensors only"):
        model(torch.randn(3, 4))  # (each rank's own rows, as under DDP)
    with torch.no_grad():  # (values only: computed as given)
        torch.testing.assert_close(model(torch.ones(3, 4)).full_tensor(),
                                   torch.ones(3, 4) @ model.weight.full_tensor().T
                                   + model.bias.full_tensor())
    with ds.unchecked_creation(), pytest.raises(ValueError, match="places a block of size"):
        ds.ShardedTensor.from_local_tensor(torch.randn(5, 4), rows(world_size), 6, 4)
    by_cols = ds.ShardedTensor.from_replicated(torch.randn(4, 4), cols(world_size))
    with pytest.raises(ValueError, match="must be split along dim 0"):
        model(by_cols)
    norm = ds.data_parallel(_replicated(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))))
    x = ds.ShardedTensor.from_replicated(torch.randn(6, 4), rows(world_size))
    with pytest.raises(ValueError, match="uses batch statistics"):
        norm(x)
    norm.eval()  # running statistics: row by row
    twin = copy.deepcopy(norm)
    assert type(twin) is type(norm)
    dense = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    dense.load_state_dict({k: _full(v) for k, v in norm.state_dict().items()})
    torch.testing.assert_close(twin(x).full_tensor(), dense(x.full_tensor()))


class _Checkpointed(nn.Module):
    """A block recomputed in backward (activation checkpointing inside the module)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 8), nn.GELU())
        self.b = nn.Linear(8, 4)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.a, x, use_reentrant=self.reentrant)
        return self.b(h)


@multi_rank(world_size=[2])
def test_checkpointed_submodules_and_second_derivatives(rank: int, world_size: int) -> None:
    """A submodule recomputed in backward gets its local copies again (its gradients are
    pending and reduced, equal to dense); a second derivative through the module raises
    rather than dropping a term."""
    x, _ = _data(6, seed=5, width=4)
    for reentrant in (False, True):
        # (the input requires grad: the reentrant form computes no parameter gradients
        # otherwise, dense or not)
        xs = ds.ShardedTensor.from_replicated(x, rows(world_size)).requires_grad_()
        xd = x.clone().requires_grad_()
        torch.manual_seed(0)
        dense = _Checkpointed(reentrant)
        ours = ds.data_parallel(_replicated(dense))
        (ours(xs) ** 2).sum().backward()
        (dense(xd) ** 2).sum().backward()
        for (name, mine), param in zip(ours.named_parameters(), dense.parameters(),
                                       strict=True):
            assert mine.grad.sharding_spec() == ds.Replicate(), name
            torch.testing.assert_close(mine.grad.full_tensor(), param.grad, msg=name)
        torch.testing.assert_close(xs.grad.full_tensor(), xd.grad)
        assert all(isinstance(p, ds.ShardedTensor) for p in ours.parameters())
    smooth = ds.data_parallel(_replicated(nn.Sequential(nn.Linear(4, 4), nn.Tanh())))
    inputs = ds.ShardedTensor.from_replicated(x, rows(world_size)).requires_grad_()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(smooth(inputs).sum(), inputs, create_graph=True)
    (grad,) = torch.autograd.grad(smooth(inputs).sum(), inputs)  # (first order: fine)
    expected = 1 - torch.tanh(x @ smooth[0].weight.full_tensor().T
                              + smooth[0].bias.full_tensor()) ** 2
    torch.testing.assert_close(grad.full_tensor(), expected @ smooth[0].weight.full_tensor())


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor, *, reassign: bool = False) -> torch.Tensor:
        if reassign:
            self.calls = self.calls + 1
        else:
            self.calls.add_(1)  # (in place: fine)
            if x.shape[0] == 0:
                raise RuntimeError("this branch fails on an empty block")
        return self.lin(x)


@multi_rank(world_size=[3])
def test_what_is_checked_at_every_call(rank: int, world_size: int) -> None:
    """A buffer assigned anew in forward, a flag that takes another branch on a rank's
    empty block, BatchNorm modes, parameters added after the first call, parameters
    replicated over other ranks than the batch's: each raises on every rank (or, where
    right, runs as dense)."""
    torch.manual_seed(0)
    counter = _Counter()
    counter.calls = ds.ShardedTensor.from_replicated(counter.calls, ds.Replicate())
    ours = ds.data_parallel(_replicated(counter))
    two = ds.ShardedTensor.from_replicated(torch.randn(2, 4), rows(world_size))  # 1, 1, 0
    for _ in range(2):  # (the second call: no first-call check, the same verdict)
        with pytest.raises(TypeError, match=r"assigned a new value to \['calls'\]"):
            ours(two, reassign=True)
    assert isinstance(ours.calls, ds.ShardedTensor) and ours.calls.full_tensor().item() == 0
    with pytest.raises(RuntimeError, match="fails on an empty block"):
        ours(two)  # (rank 2 raised; ranks 0 and 1 raise it too)
    # BatchNorm: frozen in eval inside a training model is fine; batch statistics are not.
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    dense[1].running_mean.uniform_()
    ours_bn = ds.data_parallel(_replicated(dense))
    six = ds.ShardedTensor.from_replicated(torch.randn(6, 4), rows(world_size))
    ours_bn[1].eval()
    dense[1].eval()
    torch.testing.assert_close(ours_bn(six).full_tensor(), dense(six.full_tensor()))
    ours_bn.eval()
    ours_bn[1].train()  # (the root in eval mode, the BatchNorm in training mode)
    with pytest.raises(ValueError, match="uses batch statistics"):
        ours_bn(six)
    no_stats = ds.data_parallel(_replicated(
        nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False)).eval()))
    with pytest.raises(ValueError, match="uses batch statistics"):
        no_stats(six)
    # A parameter added after the first call is checked like the others.
    grown = ds.data_parallel(_replicated(nn.Sequential(nn.Linear(4, 4))))
    grown(six)
    grown.append(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="is a plain tensor"):
        grown(six)
    # Parameters replicated over ranks 0 and 1, the batch over 0, 1 and 2.
    pair = dist.new_group([0, 1])
    lin = nn.Linear(4, 4)
    for name in ("weight", "bias"):
        setattr(lin, name, nn.Parameter(ds.ShardedTensor.from_replicated(
            getattr(lin, name).detach(), ds.Replicate(), process_group=pair)))
    with pytest.raises(ValueError, match="replicated over ranks \\[0, 1\\]"):
        ds.data_parallel(lin)(six)


@multi_rank(world_size=[2], timeout_s=240.0)
def test_hugging_face_gpt2_with_gradient_checkpointing(rank: int, world_size: int) -> None:
    """A ``transformers`` GPT2LMHeadModel (tiny random config; tied embedding and head,
    dropout off) under data_parallel with its own gradient checkpointing on (each block
    recomputed in backward); the loss computed outside from the split logits. Every
    step's gradients equal dense's, and so do the parameters after SGD steps (SGD: no
    Adam amplification of rounding noise to hide a wrong gradient)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(config)
    ours = copy.deepcopy(dense)
    for model in (dense, ours):
        model.gradient_checkpointing_enable()
    for name, param in list(ours.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(ours.get_submodule(owner), attr, nn.Parameter(
            ds.ShardedTensor.from_replicated(param.detach(), ds.Replicate())))
    ours.lm_head.weight = ours.transformer.wte.weight  # (tied again, as in dense)
    ours = ds.data_parallel(ours)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (dense, ours)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 64, (5, 8), generator=generator)
        losses = []
        for model, optimizer in zip((dense, ours), optimizers, strict=True):
            optimizer.zero_grad()
            inputs = ds.ShardedTensor.from_replicated(ids, rows(world_size)) \
                if model is ours else ids
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 64), inputs[:, 1:].reshape(-1))
            loss.backward()
            losses.append(float(_full(loss.detach())))
        assert abs(losses[1] - losses[0]) < 1e-5, losses
        for (name, mine), plain in zip(ours.named_parameters(), dense.parameters(),
                                       strict=True):
            assert mine.grad.sharding_spec() == ds.Replicate(), name
            torch.testing.assert_close(mine.grad.full_tensor(), plain.grad, atol=1e-5,
                                       rtol=1e-4, msg=name)
        for optimizer in optimizers:
            optimizer.step()
    for mine, plain in zip(ours.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(_full(mine.detach()), plain.detach(), atol=1e-5, rtol=1e-4)


@multi_rank(world_size=[2])
def test_compiled_from_outside_it_runs_as_eagerly(rank: int, world_size: int) -> None:
    """``torch.compile`` of a data-parallel module (aot_eager): the data-parallel forward
    runs eagerly inside the compiled call; outputs and gradients equal dense's."""
    torch.manual_seed(0)
    dense = _Net()
    compiled = torch.compile(ds.data_parallel(_replicated(dense)), backend="aot_eager")
    x, y = _data(6, seed=7)
    for _ in range(2):
        compiled.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        out = compiled(ds.ShardedTensor.from_replicated(x, rows(world_size)))
        F.mse_loss(out, ds.ShardedTensor.from_replicated(y, rows(world_size))).backward()
        F.mse_loss(dense(x), y).backward()
        torch.testing.assert_close(out.full_tensor(), dense(x).detach())
        for mine, plain in zip(compiled.parameters(), dense.parameters(), strict=True):
            torch.testing.assert_close(mine.grad.full_tensor(), plain.grad)


@multi_rank(world_size=[2])
def test_saved_whole_and_loaded_it_is_still_data_parallel(rank: int, world_size: int) -> None:
    """``torch.save`` of the module object (its class is made at run time: the pickle
    names the module's own class) and ``torch.load`` give a data-parallel module again,
    with the same values; so does ``copy.deepcopy``."""
    import io

    torch.manual_seed(0)
    ours = ds.data_parallel(_replicated(_Net()))
    x = ds.ShardedTensor.from_replicated(_data(6, seed=8)[0], rows(world_size))
    expected = ours(x).full_tensor()
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    with ds.load_with_process_group(dist.group.WORLD):
        loaded = torch.load(buffer, weights_only=False)
    for twin in (loaded, copy.deepcopy(ours)):
        assert type(twin) is type(ours) and isinstance(twin, _Net)
        assert twin.inp.weight is not ours.inp.weight
        with ds.count_collectives() as counted:
            out = twin(x)
        assert not counted.events  # (the first-call check of x came with the copy)
        torch.testing.assert_close(out.full_tensor(), expected)


@multi_rank(world_size=[4])
def test_batches_it_cannot_take_raise_on_every_rank(rank: int, world_size: int) -> None:
    """Two blocks per rank (an uneven 9-row batch), and a batch on a 2x2 mesh split over
    "dp": data_parallel takes one block per rank of a 1-D split only, and says so on
    every rank; the same batches run right without it."""
    from layouts import several
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    torch.manual_seed(0)
    dense = nn.Linear(4, 4)
    ours = ds.data_parallel(_replicated(dense))
    plain = _replicated(dense)
    x = torch.randn(9, 4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for batch in (ds.ShardedTensor.from_replicated(x, several(world_size)),
                  ds.distribute_tensor(x, mesh, [Shard(0), Replicate()])):
        with pytest.raises(ValueError, match="one block per rank of the group"):
            ours(batch)
        assert isinstance(ours.weight, ds.ShardedTensor)
        torch.testing.assert_close(plain(batch).full_tensor(), dense(x).detach())
