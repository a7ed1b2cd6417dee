"""Losses and activations used in training, forward and backward, against dense.

Most of them reach us as torch decompositions (ops/decomposed.py) whose pieces
are served by the pointwise, reduction and view families.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from layouts import several, shard, specs_2d

import dispatch_shard as ds
from dispatch_shard.testing import multi_rank

SIZE = (10, 7)
BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse_mean": lambda a, b: F.mse_loss(a, b),
    "mse_sum": lambda a, b: F.mse_loss(a, b, reduction="sum"),
    "mse_none": lambda a, b: F.mse_loss(a, b, reduction="none"),
    "l1_mean": lambda a, b: F.l1_loss(a, b),
    "l1_none": lambda a, b: F.l1_loss(a, b, reduction="none"),
    "smooth_l1": lambda a, b: F.smooth_l1_loss(a, b, beta=0.5),
    "smooth_l1_sum": lambda a, b: F.smooth_l1_loss(a, b, beta=0.5, reduction="sum"),
    "huber": lambda a, b: F.huber_loss(a, b, delta=0.7),
    "huber_none": lambda a, b: F.huber_loss(a, b, delta=0.7, reduction="none"),
    "bce_with_logits": lambda a, b: F.binary_cross_entropy_with_logits(a, b.sigmoid()),
}
UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "layer_norm": lambda a: F.layer_norm(a, (7,)),
    "log_sigmoid": F.logsigmoid,
}


def _check(fn: Callable[..., torch.Tensor], sharded_args: list[torch.Tensor],
           dense_args: list[torch.Tensor]) -> None:
    leaf = sharded_args[0].detach().requires_grad_(True)
    dense_leaf = dense_args[0].clone().requires_grad_(True)
    out = fn(leaf, *sharded_args[1:])
    want = fn(dense_leaf, *dense_args[1:])
    assert isinstance(out, ds.ShardedTensor)
    torch.testing.assert_close(out.full_tensor(), want)
    weight = torch.linspace(0.5, 1.5, want.numel()).reshape(want.shape)
    (out * weight).sum().backward()
    (want * weight).sum().backward()
    assert leaf.grad is not None and leaf.grad._layout is leaf._layout
    torch.testing.assert_close(leaf.grad.full_tensor(), dense_leaf.grad)


@multi_rank(world_size=[1, 3, 4])
@pytest.mark.parametrize("layout", ["rows", "cols", "several", "grid", "replicate"])
def test_losses_match_dense(rank: int, world_size: int, layout: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(*SIZE, generator=generator), torch.randn(*SIZE, generator=generator)
    spec = specs_2d(SIZE, world_size)[layout]
    for fn in BINARY.values():
        _check(fn, [shard(x, spec), shard(y, spec)], [x, y])
        _check(fn, [shard(x, spec), y], [x, y])  # a plain target


@multi_rank(world_size=[1, 3])
@pytest.mark.parametrize("layout", ["rows", "cols", "several", "grid", "replicate"])
def test_activations_and_layer_norm_match_dense(rank: int, world_size: int, layout: str) -> None:
    x = torch.randn(*SIZE, generator=torch.Generator().manual_seed(1))
    spec = specs_2d(SIZE, world_size)[layout]
    for fn in UNARY.values():
        _check(fn, [shard(x, spec)], [x])
    generator = torch.Generator().manual_seed(2)  # plain tensors must agree on every rank
    weight, bias = torch.randn(7, generator=generator), torch.randn(7, generator=generator)
    _check(lambda a: F.layer_norm(a, (7,), weight, bias), [shard(x, spec)], [x])


@multi_rank(world_size=[2])
def test_dropout_draws_per_shard_and_keeps_scale(rank: int, world_size: int) -> None:
    x = torch.ones(200, 50)
    spec = specs_2d((200, 50), world_size)["rows"]
    torch.manual_seed(1234 + rank)
    out = F.dropout(shard(x, spec), p=0.25, training=True).full_tensor()
    kept = out != 0
    assert torch.all(out[kept] == 1 / 0.75)  # survivors are scaled like dense
    assert 0.6 < kept.float().mean().item() < 0.9
    top, bottom = kept[:100], kept[100:]
    assert not torch.equal(top, bottom)  # each rank drew its own mask
    assert torch.equal(F.dropout(shard(x, spec), p=0.25, training=False).full_tensor(), x)


@multi_rank(world_size=[3])
def test_random_fill_of_a_replicated_tensor_stays_replicated(rank: int, world_size: int) -> None:
    torch.manual_seed(rank)  # different generators on purpose
    replicated = shard(torch.zeros(4, 5), ds.Replicate())
    replicated.uniform_()
    local = replicated.local_tensor()
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, local)
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    assert bool((local > 0).all()) and bool((local < 1).all())
    probabilities = torch.full((10, 7), 0.5)
    sharded = shard(torch.zeros(10, 7), specs_2d((10, 7), world_size)["rows"])
    sharded.bernoulli_(shard(probabilities, specs_2d((10, 7), world_size)["cols"]))
    assert set(sharded.full_tensor().unique().tolist()) <= {0.0, 1.0}


@multi_rank(world_size=[3])
def test_like_factories_of_a_partial_are_new_replicated_values(rank: int, world_size: int) -> None:
    x = torch.randn(*SIZE, generator=torch.Generator().manual_seed(4))
    partial = shard(x, specs_2d(SIZE, world_size)["rows"]).redistribute(ds.Partial())
    assert torch.equal(torch.ones_like(partial).full_tensor(), torch.ones(SIZE))
    assert torch.equal(torch.full_like(partial, 2.5).full_tensor(), torch.full(SIZE, 2.5))
    assert torch.equal(torch.zeros_like(partial).full_tensor(), torch.zeros(SIZE))
    torch.manual_seed(rank)  # different generators: the draw must still be replicated
    drawn = torch.rand_like(partial)
    assert isinstance(drawn.sharding_spec(), ds.Replicate)
    gathered = [torch.empty(SIZE) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, drawn.local_tensor())
    assert all(torch.equal(g, gathered[0]) for g in gathered)


@multi_rank(world_size=[3])
def test_item_and_allclose_give_python_values_on_every_rank(rank: int, world_size: int) -> None:
    x = torch.randn(*SIZE, generator=torch.Generator().manual_seed(5))
    for spec in specs_2d(SIZE, world_size).values():
        sx = shard(x, spec)
        assert sx.sum().item() == pytest.approx(x.sum().item(), rel=1e-5)
        assert sx[9, 6].item() == x[9, 6].item()  # one element, held by one rank
        assert torch.allclose(sx, shard(x.clone(), spec)) is True
        assert torch.allclose(sx, shard(x + 1, spec)) is False
    with pytest.raises(RuntimeError, match="cannot be converted to Scalar"):
        shard(x, specs_2d(SIZE, world_size)["rows"]).item()


@multi_rank(world_size=[2, 3])
def test_replicated_operands_run_the_kernel_once(rank: int, world_size: int) -> None:
    """A partial input (a row-parallel output) is reduced once, then the loss and its
    backward run as single kernels on the replicated value (NOTE [replicated operands
    skip the decomposition] in ops/decomposed.py): one all-reduce, replicated results
    that match dense; a plain target that requires grad takes the decomposition."""
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(*SIZE, generator=generator), torch.randn(*SIZE, generator=generator)
    partial = shard(x, specs_2d(SIZE, world_size)["rows"]).redistribute(ds.Partial())
    leaf = partial.detach().requires_grad_(True)
    with ds.count_collectives() as counted:
        loss = F.mse_loss(leaf, y)
        norm = F.layer_norm(leaf, (7,))
    assert counted.counts == {"all_reduce": 1}  # the partial input, reduced once (cached)
    for out in (loss, norm):
        assert isinstance(out, ds.ShardedTensor) and out.sharding_spec() == ds.Replicate()
    torch.testing.assert_close(loss.full_tensor(), F.mse_loss(x, y))
    torch.testing.assert_close(norm.full_tensor(), F.layer_norm(x, (7,)))
    (loss + norm.sum()).backward()
    dense = x.clone().requires_grad_(True)
    (F.mse_loss(dense, y) + F.layer_norm(dense, (7,)).sum()).backward()
    torch.testing.assert_close(leaf.grad.full_tensor(), dense.grad)
    target = y.clone().requires_grad_(True)
    replicated = shard(x, ds.Replicate())
    both = F.mse_loss(replicated, target)
    both.backward()
    dense_target = y.clone().requires_grad_(True)
    F.mse_loss(x, dense_target).backward()
    torch.testing.assert_close(both.full_tensor(), F.mse_loss(x, y))
    torch.testing.assert_close(target.grad, dense_target.grad)


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("layout", ["batch", "time", "several", "replicate", "partial"])
def test_ctc_loss_matches_dense(rank: int, world_size: int, layout: str) -> None:
    """``ctc_loss`` runs on the whole value (ops/whole.py): log-probs ``[T, N, C]`` in any
    layout, forward and backward equal dense; the gradient keeps the input's layout."""
    generator = torch.Generator().manual_seed(4)
    steps, batch, classes = 12, 5, 6
    dense = torch.randn(steps, batch, classes, generator=generator).log_softmax(2)
    targets = torch.randint(1, classes, (batch, 4), generator=generator)
    input_lengths, target_lengths = [12, 11, 12, 9, 10], [4, 3, 2, 4, 1]
    placements = [f"rank:{r}/cpu" for r in range(world_size)]
    specs: dict[str, ds.ShardingSpec] = {
        "batch": ds.ChunkShardingSpec(1, placements),
        "time": ds.ChunkShardingSpec(0, placements),
        "several": ds.ChunkShardingSpec(1, placements + placements[::-1]),
        "replicate": ds.Replicate(), "partial": ds.Replicate(),
    }
    for reduction in ("mean", "sum", "none"):
        for lengths in ("lists", "tensors"):
            lengths_args = (input_lengths, target_lengths) if lengths == "lists" else (
                torch.tensor(input_lengths), torch.tensor(target_lengths))
            sharded = shard(dense, specs[layout])
            if layout == "partial":
                sharded = sharded.redistribute(ds.Partial())
            leaf = sharded.detach().requires_grad_(True)
            dense_leaf = dense.clone().requires_grad_(True)
            got = F.ctc_loss(leaf, targets, *lengths_args, reduction=reduction)
            want = F.ctc_loss(dense_leaf, targets, *lengths_args, reduction=reduction)
            assert isinstance(got, ds.ShardedTensor)
            torch.testing.assert_close(got.full_tensor(), want)
            weight = torch.linspace(0.5, 1.5, want.numel()).reshape(want.shape)
            (got * weight).sum().backward()
            (want * weight).sum().backward()
            assert isinstance(leaf.grad, ds.ShardedTensor)
            torch.testing.assert_close(leaf.grad.full_tensor(), dense_leaf.grad)
            if layout != "partial":
                assert leaf.grad.sharding_spec() == leaf.sharding_spec()


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("layout", ["classes", "several_classes", "batch", "features",
                                    "replicate"])
def test_fused_linear_cross_entropy_matches_dense_and_the_unfused_collectives(
        rank: int, world_size: int, layout: str) -> None:
    """``F.linear_cross_entropy(..., options=...)`` (torch's chunked custom ops, served in
    ops/linear_cross_entropy.py): loss and gradients equal dense, and forward + backward
    issue exactly the collectives of ``F.cross_entropy(F.linear(...))``."""
    generator = torch.Generator().manual_seed(5)
    batch, features, classes = 7, 5, 11  # uneven over 2 and 3 ranks
    x = torch.randn(batch, features, generator=generator)
    matrix = torch.randn(classes, features, generator=generator)
    bias = torch.randn(classes, generator=generator)
    target = torch.randint(0, classes, (batch,), generator=generator)
    target[2] = -100  # ignored
    class_weight = torch.rand(classes, generator=generator) + 0.5
    placements = [f"rank:{r}/cpu" for r in range(world_size)]
    rows_, cols_ = ds.ChunkShardingSpec(0, placements), ds.ChunkShardingSpec(1, placements)
    replicate = ds.Replicate()
    specs = {"classes": (replicate, rows_, rows_),
             "several_classes": (replicate, several(world_size), several(world_size)),
             "batch": (rows_, replicate, replicate), "features": (cols_, cols_, replicate),
             "replicate": (replicate, replicate, replicate)}[layout]
    options = torch.nn.LinearCrossEntropyOptions()
    for reduction in ("mean", "sum"):
        for weight in (None, class_weight):
            results = {}
            for fused in (False, True):
                leaves = [shard(value, spec, requires_grad=True)
                          for value, spec in zip((x, matrix, bias), specs, strict=True)]
                with ds.count_collectives() as counted:
                    if fused:
                        loss = F.linear_cross_entropy(
                            leaves[0], leaves[1], target, linear_bias=leaves[2],
                            weight=weight, reduction=reduction, options=options)
                    else:
                        loss = F.cross_entropy(F.linear(*leaves), target, weight=weight,
                                               reduction=reduction)
                    loss.backward()
                results[fused] = (counted.counts, loss, leaves)
            assert results[True][0] == results[False][0], (results[True][0], results[False][0])
            dense = [value.clone().requires_grad_(True) for value in (x, matrix, bias)]
            want = F.cross_entropy(F.linear(*dense), target, weight=weight, reduction=reduction)
            want.backward()
            _, loss, leaves = results[True]
            assert isinstance(loss, ds.ShardedTensor)
            torch.testing.assert_close(loss.full_tensor(), want)
            for leaf, reference in zip(leaves, dense, strict=True):
                assert leaf.grad is not None and leaf.grad._layout is leaf._layout
                torch.testing.assert_close(leaf.grad.full_tensor(), reference.grad)
    # reduction="none": the losses, and torch's chunked backward (its out= ops write into
    # plain buffers: replicated values)
    leaves = [shard(value, spec, requires_grad=True)
              for value, spec in zip((x, matrix, bias), specs, strict=True)]
    got = F.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2],
                                 reduction="none", options=options)
    dense = [value.clone().requires_grad_(True) for value in (x, matrix, bias)]
    want = F.cross_entropy(F.linear(*dense), target, reduction="none")
    torch.testing.assert_close(got.full_tensor(), want)
    scale = torch.linspace(0.5, 1.5, batch)
    (got * scale).sum().backward()
    (want * scale).sum().backward()
    for leaf, reference in zip(leaves, dense, strict=True):
        assert isinstance(leaf.grad, ds.ShardedTensor)
        torch.testing.assert_close(leaf.grad.full_tensor(), reference.grad)


@multi_rank(world_size=[2, 3])
def test_fused_linear_cross_entropy_accumulates_in_acc_dtype(rank: int, world_size: int) -> None:
    """bfloat16 inputs with ``acc_dtype=torch.float32`` compute in float32 as dense does
    (per-sample losses equal the float32 computation rounded once), results come back in
    bfloat16; an acc_dtype dense refuses raises dense's error on every rank."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(9, 48, generator=generator).bfloat16()
    matrix = torch.randn(300, 48, generator=generator).bfloat16()
    target = torch.randint(0, 300, (9,), generator=generator)
    options = torch.nn.LinearCrossEntropyOptions(acc_dtype=torch.float32)
    rows_ = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])
    sharded_x, replicated = shard(x, rows_), shard(matrix, ds.Replicate())
    losses = F.linear_cross_entropy(sharded_x, replicated, target, reduction="none",
                                    options=options)
    in_float32 = F.cross_entropy(F.linear(x.float(), matrix.float()), target, reduction="none")
    assert losses.dtype == torch.bfloat16
    assert torch.equal(losses.full_tensor(), in_float32.bfloat16())
    leaf = shard(x, rows_, requires_grad=True)
    loss = F.linear_cross_entropy(leaf, replicated, target, options=options)
    loss.backward()
    dense_leaf = x.float().requires_grad_(True)
    F.cross_entropy(F.linear(dense_leaf, matrix.float()), target).backward()
    assert loss.dtype == leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.full_tensor().float(),
                               F.cross_entropy(F.linear(x.float(), matrix.float()), target),
                               atol=0, rtol=2**-8)
    torch.testing.assert_close(leaf.grad.full_tensor(), dense_leaf.grad.bfloat16())
    wrong = torch.nn.LinearCrossEntropyOptions(acc_dtype=torch.float64)
    with pytest.raises(RuntimeError, match="supports float32 acc_dtype with float16/bfloat16"):
        F.linear_cross_entropy(shard(x.float(), rows_), shard(matrix.float(), ds.Replicate()),
                               target, options=wrong)
