"""Embedding tables against the dense computation, TorchRec-style: row-wise, column-wise,
grid and replicated tables, ``F.embedding`` and ``F.embedding_bag`` (sum / mean / max,
offsets, per_sample_weights, padding), forward and backward, the collectives a row-wise
lookup issues, and an embedding-bag collection trained one step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from layouts import cols, rows, shard, specs_2d

import dispatch_shard as ds
from dispatch_shard import collectives
from dispatch_shard.testing import multi_rank

V, D = 11, 5  # uneven over 3 and 4 ranks, both ways
LAYOUTS = ["rows", "cols", "several", "grid", "replicate"]

IDS = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(0))
FLAT = torch.tensor([1, 3, 3, 7, 0, 9, 3, 1, 10, 10])
OFFSETS = torch.tensor([0, 2, 2, 3, 8])  # an empty bag
LAST_OFFSETS = torch.tensor([0, 2, 2, 3, 10])
SAMPLE_WEIGHTS = torch.rand(10, generator=torch.Generator().manual_seed(1))

Lookup = Callable[[torch.Tensor], torch.Tensor]


def _lookups() -> dict[str, Lookup]:
    cases: dict[str, Lookup] = {
        "embedding": lambda w: F.embedding(IDS, w),
        "embedding_padding": lambda w: F.embedding(IDS, w, padding_idx=3),
        "embedding_by_freq": lambda w: F.embedding(IDS, w, scale_grad_by_freq=True),
        "bag_weights": lambda w: F.embedding_bag(FLAT, w, OFFSETS, mode="sum",
                                                 per_sample_weights=SAMPLE_WEIGHTS),
        "bag_by_freq": lambda w: F.embedding_bag(FLAT, w, OFFSETS, scale_grad_by_freq=True,
                                                 mode="sum"),
    }
    for mode in ("sum", "mean", "max"):
        for padding in (None, 3):
            cases[f"bag_{mode}_{padding}"] = (
                lambda w, m=mode, p=padding: F.embedding_bag(FLAT, w, OFFSETS, mode=m,
                                                             padding_idx=p))
        cases[f"bag_{mode}_last"] = (lambda w, m=mode: F.embedding_bag(
            FLAT, w, LAST_OFFSETS, mode=m, include_last_offset=True))
        cases[f"bag_{mode}_2d"] = lambda w, m=mode: F.embedding_bag(IDS, w, mode=m)
    return cases


def _table(seed: int = 2, rows_: int = V, dim: int = D) -> torch.Tensor:
    return torch.randn(rows_, dim, generator=torch.Generator().manual_seed(seed))


def _check(name: str, got: Any, want: torch.Tensor) -> None:
    assert isinstance(got, ds.ShardedTensor), (name, type(got))
    assert tuple(got.shape) == tuple(want.shape) and got.dtype == want.dtype, name
    torch.testing.assert_close(got.full_tensor(), want, msg=lambda m: f"{name}: {m}")


@contextlib.contextmanager
def _collectives() -> Iterator[list[str]]:
    """The kinds of collectives this rank issues inside the block."""
    kinds: list[str] = []

    def observer(kind: str, nbytes: int, group: Any) -> None:
        kinds.append(kind)

    collectives._observers.append(observer)
    try:
        yield kinds
    finally:
        collectives._observers.remove(observer)


@multi_rank(world_size=[1, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lookups_match_dense(rank: int, world_size: int, layout: str) -> None:
    spec = specs_2d((V, D), world_size)[layout]
    table = _table()
    for name, lookup in _lookups().items():
        leaf = shard(table, spec, requires_grad=True)
        out = lookup(leaf)
        reference = table.clone().requires_grad_(True)
        want = lookup(reference)
        _check(name, out, want)
        weight = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
        (out * weight).sum().backward()
        (want * weight).sum().backward()
        _check(f"{name} grad", leaf.grad, reference.grad)
        assert leaf.grad.sharding_spec() == leaf.sharding_spec(), name


@multi_rank(world_size=[3])
def test_all_embedding_bag_outputs_match_dense(rank: int, world_size: int) -> None:
    table = _table(seed=4)
    table[2] = table[7] = table[9]  # ties across ranks: dense keeps the first position
    offsets = torch.tensor([0, 3, 3, 6, 7])  # an empty bag, and a bag of padding only
    ids = torch.tensor([9, 2, 7, 1, 5, 4, 3, 7, 9, 2])
    bag = torch.ops.aten._embedding_bag.default
    forward_only = torch.ops.aten._embedding_bag_forward_only.default
    for spec in specs_2d((V, D), world_size).values():
        for mode in (0, 1, 2):
            for padding in (-1, 3):
                args = (ids, offsets, False, mode, False, None, False, padding)
                for op in (bag, forward_only):
                    got, want = op(shard(table, spec), *args), op(table, *args)
                    for index, (g, w) in enumerate(zip(got, want, strict=True)):
                        _check(f"{op}_{mode}_{padding}_{index}", g, w)


@multi_rank(world_size=[3])
def test_rowwise_lookups_communicate_only_when_consumed(rank: int, world_size: int) -> None:
    table = _table(seed=5)
    for spec in (rows(world_size), specs_2d((V, D), world_size)["grid"]):
        leaf = shard(table, spec, requires_grad=True)
        with _collectives() as issued:
            looked_up = F.embedding(IDS, leaf)
            pooled = F.embedding_bag(FLAT, leaf, OFFSETS, mode="mean")
            weighted = F.embedding_bag(FLAT, leaf, OFFSETS, per_sample_weights=SAMPLE_WEIGHTS,
                                       mode="sum")
        assert issued == [], issued  # each rank looks up the ids it owns
        for out in (looked_up, pooled, weighted):
            assert out.sharding_spec() == ds.Partial("sum")
        with _collectives() as issued:
            value = looked_up.full_tensor()
        assert issued == ["all_reduce"]
        torch.testing.assert_close(value, F.embedding(IDS, table))
        grad = shard(torch.ones(*IDS.shape, D), ds.Replicate())
        pooled_grad = shard(torch.ones(pooled.shape), ds.Replicate())
        with _collectives() as issued:
            looked_up.backward(grad)
            pooled.backward(pooled_grad)
        assert issued == [], issued  # each rank builds the grad rows of its vocabulary block
        assert leaf.grad.sharding_spec() == leaf.sharding_spec()
        dense = table.clone().requires_grad_(True)
        F.embedding(IDS, dense).sum().backward()
        F.embedding_bag(FLAT, dense, OFFSETS, mode="mean").sum().backward()
        _check("rowwise_grad", leaf.grad, dense.grad)
    # Column-wise: every rank looks up every id in its column block.
    leaf = shard(table, cols(world_size), requires_grad=True)
    with _collectives() as issued:
        out = F.embedding(IDS, leaf)
        out.backward(torch.ones_like(out))
        pooled = F.embedding_bag(FLAT, leaf, OFFSETS, mode="max")
        pooled.backward(torch.ones_like(pooled))
    assert issued == [], issued
    spec = out.sharding_spec()
    assert isinstance(spec, ds.ChunkShardingSpec) and spec.dim == 2
    assert leaf.grad.sharding_spec() == cols(world_size)
    # A partial table is looked up summand by summand; sharded ids are looked up in blocks.
    partial = shard(table, rows(world_size)).redistribute(ds.Partial())
    with _collectives() as issued:
        out = F.embedding(IDS, partial)
    assert issued == [] and out.sharding_spec() == ds.Partial()
    _check("partial_table", out, F.embedding(IDS, table))
    sharded_ids = shard(IDS, rows(world_size))
    with _collectives() as issued:
        out = F.embedding(sharded_ids, shard(table, ds.Replicate()))
    out_spec = out.sharding_spec()
    assert isinstance(out_spec, ds.ChunkShardingSpec) and out_spec.dim == 0
    _check("sharded_ids", out, F.embedding(IDS, table))


@multi_rank(world_size=[3, 4])
def test_embedding_bag_collection_trains_like_dense(rank: int, world_size: int) -> None:
    """Two tables, TorchRec-style: one row-wise, one column-wise; pooled features feed a
    dense over-arch; one SGD step matches dense."""
    specs = {"user": rows(world_size), "item": cols(world_size)}
    tables = {"user": _table(seed=6, rows_=13, dim=4), "item": _table(seed=7, rows_=9, dim=6)}
    features = {"user": (torch.tensor([0, 12, 5, 5, 7, 1, 3]), torch.tensor([0, 3, 3, 5])),
                "item": (torch.tensor([8, 0, 2, 2, 4, 6]), torch.tensor([0, 1, 4, 4]))}
    sample_weights = torch.rand(7, generator=torch.Generator().manual_seed(8))
    over = torch.randn(10, 2, generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([1, 0, 1, 1])
    for mode in ("sum", "mean", "max"):
        sharded = {n: ds.shard_tensor(t, specs[n]).requires_grad_(True) for n, t in
                   tables.items()}
        dense = {n: t.clone().requires_grad_(True) for n, t in tables.items()}
        sharded_weights = shard(sample_weights, ds.Replicate(), requires_grad=True)
        dense_weights = sample_weights.clone().requires_grad_(True)

        def forward(weights: dict[str, torch.Tensor], user_weights: torch.Tensor,
                    mode: str = mode) -> torch.Tensor:
            user_ids, user_offsets = features["user"]
            item_ids, item_offsets = features["item"]
            user = F.embedding_bag(user_ids, weights["user"], user_offsets, mode=mode,
                                   per_sample_weights=user_weights if mode == "sum" else None)
            item = F.embedding_bag(item_ids, weights["item"], item_offsets, mode=mode)
            return F.cross_entropy(torch.cat([user, item], 1) @ over, labels)

        loss = forward(sharded, sharded_weights)
        want = forward(dense, dense_weights)
        _check(f"{mode}_loss", loss, want)
        loss.backward()
        want.backward()
        optimizer = torch.optim.SGD(list(sharded.values()), lr=0.5)
        optimizer.step()
        with torch.no_grad():
            for name, table in dense.items():
                assert sharded[name].grad.sharding_spec() == specs[name], (mode, name)
                _check(f"{mode}_{name}_grad", sharded[name].grad, table.grad)
                _check(f"{mode}_{name}_step", sharded[name], table - 0.5 * table.grad)
        if mode == "sum":
            _check("per_sample_weights_grad", sharded_weights.grad, dense_weights.grad)


@multi_rank(world_size=[3])
def test_errors_raise_on_every_rank(rank: int, world_size: int) -> None:
    table = shard(_table(seed=10), rows(world_size))
    with pytest.raises(IndexError, match="index out of range in self"):
        F.embedding(torch.tensor([[V]]), table)
    with pytest.raises(RuntimeError, match="not in the valid range"):
        F.embedding_bag(torch.tensor([1, V]), table, torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="not supported for ShardedTensor!"):
        F.embedding_bag(torch.tensor([1, 2, 3]), table, torch.tensor([0, 1]),
                        include_last_offset=True)
    with pytest.raises(RuntimeError):  # dense's own check of the offsets, on every rank
        F.embedding_bag(torch.tensor([1, 2]), table, torch.tensor([1, 0]))
    dist.barrier()
