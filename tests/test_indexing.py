"""Indexing ops against the dense computation: gather, scatter*, index_select, advanced
indexing and boolean masks, index_put, index_add, and cross_entropy / nll_loss, forward and
backward, on every layout, with the collectives they issue."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from layouts import cols, rows, several, shard, specs_2d

import dispatch_shard as ds
from dispatch_shard import collectives
from dispatch_shard.testing import multi_rank

SIZE = (10, 7)  # uneven over 3 and 4 ranks
LAYOUTS = ["rows", "cols", "several", "grid", "replicate"]

Case = Callable[[torch.Tensor], torch.Tensor]


def _dense(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _ints(high: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


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


def _forward_and_backward(name: str, op: Case, dense: torch.Tensor,
                          spec: ds.ShardingSpec) -> tuple[ds.ShardedTensor, ds.ShardedTensor]:
    """``op`` on a sharded leaf and on the dense one: values, and the leaf's grad (value and
    layout) after a weighted sum."""
    leaf = shard(dense, spec, requires_grad=True)
    out = op(leaf)
    reference = dense.clone().requires_grad_(True)
    want = op(reference)
    _check(name, out, want)
    weight = _dense(*want.shape, seed=99)
    (out * weight).sum().backward()
    (want * weight).sum().backward()
    assert isinstance(leaf.grad, ds.ShardedTensor), name
    _check(f"{name} grad", leaf.grad, reference.grad)
    assert leaf.grad.sharding_spec() == leaf.sharding_spec(), name
    return out, leaf


# -- reads: gather, index_select, index ---------------------------------------------------

ROWS = torch.tensor([4, 0, 9, 2, 2])
COLUMNS = torch.tensor([6, 0, 3])
READS: dict[str, Case] = {
    "gather_1": lambda a: torch.gather(a, 1, _ints(7, 10, 3, seed=1)),
    "gather_0": lambda a: torch.gather(a, 0, _ints(10, 4, 7, seed=2)),
    "gather_clipped": lambda a: torch.gather(a, 1, _ints(7, 6, 2, seed=3)),
    "take_along_dim": lambda a: torch.take_along_dim(a, _ints(7, 10, 2, seed=4), 1),
    "index_select_0": lambda a: a.index_select(0, ROWS),
    "index_select_1": lambda a: a.index_select(-1, COLUMNS),
    "index_rows": lambda a: a[ROWS],
    "index_columns": lambda a: a[:, COLUMNS],
    "index_both": lambda a: a[ROWS[:3], COLUMNS],
    "index_negative": lambda a: a[:, torch.tensor([-1, 2, -7])],
    "index_2d": lambda a: a[ROWS.reshape(1, 5)],
    "index_broadcast": lambda a: a[ROWS[:3, None], COLUMNS[None, :2]],
    "mask": lambda a: a[a.detach() > 0.3],
    "row_mask": lambda a: a[torch.tensor([True, False] * 5)],
    "column_mask": lambda a: a[:, torch.tensor([True, False, True, True, False, False, True])],
}


@multi_rank(world_size=[1, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reads_match_dense(rank: int, world_size: int, layout: str) -> None:
    spec = specs_2d(SIZE, world_size)[layout]
    x = _dense(*SIZE, seed=5)
    for name, op in READS.items():
        _forward_and_backward(name, op, x, spec)


# -- writes: scatter*, index_put, index_add -------------------------------------------------

INDEX = _ints(7, 10, 3, seed=6)
SOURCE = _dense(10, 3, seed=7)
WRITES: dict[str, Case] = {
    "scatter_value": lambda a: a.scatter(1, INDEX, 2.0),
    "scatter_src": lambda a: a.scatter(1, INDEX[:, :1], a[:, 3:4] * 2),
    "scatter_add_0": lambda a: a.scatter_add(0, INDEX % 4, a[:, :3] * 3),
    "scatter_add_1": lambda a: a.scatter_add(1, INDEX, a[:, 4:]),
    "index_add_0": lambda a: a.index_add(0, ROWS, a[:5] * 2),
    "index_add_1": lambda a: a.index_add(1, COLUMNS, a[:, :3], alpha=2),
    "index_put": lambda a: a.index_put((ROWS[:3], COLUMNS), torch.tensor(5.0)),
    "index_put_accumulate": lambda a: a.index_put((ROWS,), a[:5] * 2, accumulate=True),
    "index_put_columns": lambda a: a.index_put((torch.arange(10)[:, None], COLUMNS),
                                               a[:, :3] * 3),
}

NO_GRAD_WRITES: dict[str, Case] = {
    "scatter_reduce_amax": lambda a: a.scatter_reduce(1, INDEX, SOURCE, "amax"),
    "scatter_reduce_mean": lambda a: a.scatter_reduce(0, INDEX % 5, SOURCE, "mean",
                                                      include_self=False),
    "scatter_reduce_sum_0": lambda a: a.scatter_reduce(0, INDEX, SOURCE, "sum"),
    "scatter_reduce_prod_0": lambda a: a.scatter_reduce(0, INDEX, SOURCE, "prod",
                                                        include_self=False),
    "scatter_reduce_amin_0": lambda a: a.scatter_reduce(0, INDEX % 5, SOURCE, "amin"),
    "scatter_reduce_amax_0": lambda a: a.scatter_reduce(0, INDEX, SOURCE, "amax",
                                                        include_self=False),
    "scatter_reduce_mean_1": lambda a: a.scatter_reduce(1, INDEX, SOURCE, "mean"),
    # scatter.reduce / scatter.value_reduce (no derivative in dense either)
    "scatter_add_reduce_0": lambda a: a.scatter(0, INDEX, SOURCE, reduce="add"),
    "scatter_multiply_reduce_1": lambda a: a.scatter(1, INDEX, SOURCE, reduce="multiply"),
    "scatter_value_add_0": lambda a: a.scatter(0, INDEX % 4, 1.5, reduce="add"),
    "scatter_value_multiply_1": lambda a: a.scatter(1, INDEX, -2.0, reduce="multiply"),
    "masked_fill_tensor": lambda a: a.masked_fill(a > 0, torch.tensor(2.0)),
}

IN_PLACE: dict[str, Callable[[torch.Tensor], Any]] = {
    "scatter_": lambda a: a.scatter_(1, INDEX, 3.0),
    "scatter_src_": lambda a: a.scatter_(1, INDEX, SOURCE),
    "scatter_add_": lambda a: a.scatter_add_(0, INDEX % 4, SOURCE),
    "scatter_reduce_": lambda a: a.scatter_reduce_(1, INDEX, SOURCE, "prod"),
    "scatter_reduce_0_": lambda a: a.scatter_reduce_(0, INDEX, SOURCE, "amin",
                                                     include_self=False),
    "scatter_add_reduce_": lambda a: a.scatter_(0, INDEX, SOURCE, reduce="add"),
    "scatter_value_multiply_": lambda a: a.scatter_(1, INDEX, 3.0, reduce="multiply"),
    "index_put_": lambda a: a.index_put_((ROWS[:4], torch.tensor([1, 2, 3, 6])),
                                         torch.tensor([1.0, 2, 3, 4])),
    "index_add_": lambda a: a.index_add_(1, torch.tensor([0, 6, 0]), SOURCE),
    "masked_fill_": lambda a: a.masked_fill_(a > 0, torch.tensor(2.0)),
    "setitem_mask": lambda a: a.__setitem__(a > 0.5, 0.0),
    "setitem_columns": lambda a: a.__setitem__((slice(None), torch.tensor([0, 5])), 7.0),
    "setitem_rows": lambda a: a.__setitem__(ROWS[:4], torch.arange(7.0)),
}


@multi_rank(world_size=[1, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_writes_match_dense(rank: int, world_size: int, layout: str) -> None:
    spec = specs_2d(SIZE, world_size)[layout]
    x = _dense(*SIZE, seed=8)
    for name, op in WRITES.items():
        out, leaf = _forward_and_backward(name, op, x, spec)
        assert out.sharding_spec() == leaf.sharding_spec(), name
    for name, op in NO_GRAD_WRITES.items():
        _check(name, op(shard(x, spec)), op(x))
    for name, in_place in IN_PLACE.items():
        sharded, dense = shard(x, spec), x.clone()
        before = sharded.sharding_spec()
        returned = in_place(sharded)
        in_place(dense)
        assert returned is None or returned is sharded, name
        assert sharded.sharding_spec() == before, name
        _check(name, sharded, dense)


# -- operands in other layouts ----------------------------------------------------------------

@multi_rank(world_size=[3])
def test_partial_sharded_and_plain_operands(rank: int, world_size: int) -> None:
    x = _dense(*SIZE, seed=9)
    index = _ints(7, 10, 3, seed=10)
    chunk = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])
    for spec in specs_2d(SIZE, world_size).values():
        # Selections commute with a partial input's reduction: no collective, same Partial.
        for op in ("sum", "max"):
            # (sharded -> Partial("max") is not a core move: start from replicated for max)
            partial = shard(x, spec if op == "sum" else ds.Replicate()).redistribute(
                ds.Partial(op))
            with _collectives() as issued:
                results = {"gather": torch.gather(partial, 1, index),
                           "index_select": partial.index_select(0, ROWS),
                           "index": partial[:, COLUMNS]}
            assert issued == [], issued
            for name, got in results.items():
                assert got.sharding_spec() == ds.Partial(op), name
            _check("gather_partial", results["gather"], torch.gather(x, 1, index))
            _check("index_select_partial", results["index_select"], x.index_select(0, ROWS))
            _check("index_partial", results["index"], x[:, COLUMNS])
        # Sharded indices, sources and values; plain destinations.
        sharded_index = shard(index, rows(world_size))
        _check("sharded_index", torch.gather(shard(x, spec), 1, sharded_index),
               torch.gather(x, 1, index))
        _check("plain_x_sharded_index", torch.gather(x, 1, sharded_index),
               torch.gather(x, 1, index))
        _check("index_select_sharded_index",
               shard(x, spec).index_select(0, shard(ROWS, chunk)), x.index_select(0, ROWS))
        _check("sharded_mask", shard(x, spec)[shard(x > 0, cols(world_size))], x[x > 0])
        source = _dense(10, 3, seed=11)
        for source_spec in (rows(world_size), ds.Replicate()):
            _check("plain_scatter_add",
                   torch.zeros(SIZE).scatter_add(1, index, shard(source, source_spec)),
                   torch.zeros(SIZE).scatter_add(1, index, source))
            index_put = torch.ops.aten.index_put.default  # x[:, COLUMNS] = source
            _check("plain_index_put",
                   index_put(torch.zeros(SIZE), [None, COLUMNS], shard(source, source_spec)),
                   index_put(torch.zeros(SIZE), [None, COLUMNS], source))
            _check("plain_index_add",
                   torch.zeros(SIZE).index_add(1, COLUMNS, shard(source, source_spec)),
                   torch.zeros(SIZE).index_add(1, COLUMNS, source))
            _check("plain_scatter_multiply",
                   torch.ones(SIZE).scatter(0, index, shard(source, source_spec),
                                            reduce="multiply"),
                   torch.ones(SIZE).scatter(0, index, source, reduce="multiply"))
        # A Partial destination of scatter(reduce=) is reduced first (out of place).
        partial = shard(x, spec).redistribute(ds.Partial())
        _check("partial_scatter_add_reduce", partial.scatter(0, index, source, reduce="add"),
               x.scatter(0, index, source, reduce="add"))
        _check("partial_scatter_reduce_amax",
               partial.scatter_reduce(1, index, source, "amax", include_self=False),
               x.scatter_reduce(1, index, source, "amax", include_self=False))
        plain = torch.zeros(SIZE)
        plain.scatter_add_(1, index, shard(source, rows(world_size)))  # in place: stays plain
        torch.testing.assert_close(plain, torch.zeros(SIZE).scatter_add(1, index, source))


# -- cross entropy and nll_loss --------------------------------------------------------------

TARGET = torch.tensor([0, 6, 3, 3, 1, 2, 5, 6, 0, 4])
CLASS_WEIGHT = torch.rand(7, generator=torch.Generator().manual_seed(12)) + 0.1
LOSS_OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "weight": {"weight": CLASS_WEIGHT},
    "ignore": {"ignore_index": 3},
    "weight_ignore": {"weight": CLASS_WEIGHT, "ignore_index": 6},
    "label_smoothing": {"label_smoothing": 0.1},
}


@multi_rank(world_size=[1, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cross_entropy_and_nll_match_dense(rank: int, world_size: int, layout: str) -> None:
    spec = specs_2d(SIZE, world_size)[layout]
    logits = _dense(*SIZE, seed=13)
    for reduction in ("mean", "sum", "none"):
        for name, options in LOSS_OPTIONS.items():
            label = f"cross_entropy_{reduction}_{name}"
            _forward_and_backward(label, lambda a, r=reduction, o=options: F.cross_entropy(
                a, TARGET, reduction=r, **o), logits, spec)
            if name != "label_smoothing":
                _forward_and_backward(f"nll_{reduction}_{name}", lambda a, r=reduction, o=options:
                                      F.nll_loss(F.log_softmax(a, 1), TARGET, reduction=r, **o),
                                      logits, spec)
    # One sample of C classes: a 1-D input and a 0-dim target.
    vector = _dense(7, seed=14)
    vector_spec = ds.Replicate() if layout == "replicate" else ds.ChunkShardingSpec(
        0, [f"rank:{r}/cpu" for r in range(world_size)])
    for reduction in ("mean", "sum", "none"):
        _forward_and_backward(f"nll_1d_{reduction}", lambda a, r=reduction: F.nll_loss(
            a, torch.tensor(4), reduction=r), vector, vector_spec)


@multi_rank(world_size=[3])
def test_collectives(rank: int, world_size: int) -> None:
    logits = _dense(*SIZE, seed=15)
    leaf = shard(logits, rows(world_size), requires_grad=True)
    with _collectives() as issued:
        loss = F.cross_entropy(leaf, TARGET)
    assert issued == ["all_reduce"]  # the scalar loss; log_softmax is blockwise
    with _collectives() as issued:
        loss.backward()
    assert issued == []
    assert leaf.grad.sharding_spec() == rows(world_size)
    with _collectives() as issued:
        per_sample = F.cross_entropy(leaf, TARGET, reduction="none")
    assert issued == [] and per_sample.sharding_spec() == rows(world_size)
    # Blockwise reads and their backward: no collectives; the grad is sharded like the leaf.
    # (index_select's backward is an in-place index_add_ into a replicated new_zeros: a
    # gradient sharded like the output is gathered there, one all-to-all.)
    for spec, op in ((rows(world_size), lambda a: torch.gather(a, 1, TARGET[:, None] % 7)),
                     (cols(world_size), lambda a: torch.gather(a, 0, _ints(10, 4, 7, seed=1))),
                     (cols(world_size), lambda a: a[ROWS])):
        leaf = shard(logits, spec, requires_grad=True)
        with _collectives() as issued:
            out = op(leaf)
            out.backward(torch.ones_like(out))
        assert issued == [], issued
        assert out.sharding_spec() == spec
        assert leaf.grad.sharding_spec() == spec
    # Reads along a split dim are partial: no collective until consumed.
    sharded = shard(logits, rows(world_size))
    with _collectives() as issued:
        picked = torch.gather(sharded, 0, _ints(10, 3, 7, seed=16))
        selected = sharded[ROWS]
    assert issued == []
    assert picked.sharding_spec() == ds.Partial() and selected.sharding_spec() == ds.Partial()
    with _collectives() as issued:
        _check("consumed", selected * 2, logits[ROWS] * 2)
    assert issued[0] == "all_reduce"


@multi_rank(world_size=[1, 3, 4])
def test_cross_entropy_of_a_batch_split_target_reads_its_own_rows(rank: int,
                                                                  world_size: int) -> None:
    """NOTE [a batch-split target stays split] in ops/losses.py: logits and target split
    by rows alike (one uneven block per rank; two per rank): values and gradients equal
    dense's for every reduction and option; forward issues one all-reduce and backward
    none (the target is never gathered). A target split otherwise is moved to the rows."""
    logits = _dense(*SIZE, seed=21)
    one = ["all_reduce"] if world_size > 1 else []
    for logits_spec, target_spec in ((rows(world_size), rows(world_size)),
                                     (several(world_size), several(world_size)),
                                     (rows(world_size), several(world_size))):
        target = shard(TARGET, target_spec)
        for reduction in ("mean", "sum", "none"):
            for name, options in LOSS_OPTIONS.items():
                _forward_and_backward(
                    f"cross_entropy_{reduction}_{name}",
                    lambda a, r=reduction, o=options, t=target: F.cross_entropy(
                        a, t if isinstance(a, ds.ShardedTensor) else TARGET,
                        reduction=r, **o), logits, logits_spec)
                if name == "label_smoothing" or logits_spec != target_spec:
                    continue
                leaf = shard(logits, logits_spec, requires_grad=True)
                with _collectives() as forward:
                    loss = F.cross_entropy(leaf, target, reduction=reduction, **options)
                with _collectives() as backward:
                    loss.backward(torch.ones_like(loss))
                assert forward == one and backward == [], (reduction, name, forward, backward)


@multi_rank(world_size=[1, 3])
def test_nll_target_dtypes_are_dense_s(rank: int, world_size: int) -> None:
    """A Byte target holds classes, as dense reads it (not a mask), whole or split by rows
    like the logits; an Int, Short or Float target raises dense's error on every rank
    (the meta kernel takes them)."""
    logits = _dense(*SIZE, seed=23)
    byte = TARGET.to(torch.uint8)
    for layout, spec in specs_2d(SIZE, world_size).items():
        for reduction in ("mean", "none"):
            _forward_and_backward(
                f"byte_{layout}_{reduction}", lambda a, r=reduction: F.cross_entropy(
                    a, byte, reduction=r, ignore_index=3), logits, spec)
    split = shard(byte, rows(world_size))
    for reduction in ("mean", "sum", "none"):
        _forward_and_backward(
            f"byte_batch_split_{reduction}", lambda a, r=reduction: F.cross_entropy(
                a, split if isinstance(a, ds.ShardedTensor) else byte, reduction=r,
                weight=CLASS_WEIGHT), logits, rows(world_size))
    x = shard(logits, rows(world_size))
    for dtype, name in ((torch.int32, "Int"), (torch.int16, "Short"), (torch.float32, "Float")):
        for target in (TARGET.to(dtype), shard(TARGET.to(dtype), rows(world_size))):
            with pytest.raises(RuntimeError, match=f"Long or Byte, but got {name}"):
                F.nll_loss(x, target)
    dist.barrier()


@multi_rank(world_size=[3])
def test_errors_raise_on_every_rank(rank: int, world_size: int) -> None:
    x = shard(_dense(*SIZE, seed=17), rows(world_size))
    with pytest.raises(RuntimeError, match="out of bounds for dimension 1 with size 7"):
        torch.gather(x, 1, torch.tensor([[7]]))
    with pytest.raises(RuntimeError, match="out of bounds"):
        x.index_select(0, torch.tensor([10]))
    with pytest.raises(RuntimeError, match="out of bounds"):
        x.scatter(0, torch.tensor([[10]]), 1.0)
    with pytest.raises(IndexError, match="out of bounds"):
        x[torch.tensor([-11])]
    with pytest.raises(IndexError, match="The shape of the mask"):
        x[torch.ones(3, dtype=torch.bool)]
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        F.cross_entropy(x, torch.full((10,), 7))
    with pytest.raises(RuntimeError):  # dense's shape check, on meta tensors
        torch.gather(x, 1, torch.zeros(11, 1, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="not supported for ShardedTensor!"):
        x.redistribute(ds.Partial()).scatter_(1, torch.zeros(10, 1, dtype=torch.int64), 1.0)
    # A sharded index is checked block by block; the verdict reaches every rank.
    bad = torch.zeros(10, 2, dtype=torch.int64)
    bad[9, 1] = 7  # on the last rank only
    with pytest.raises(RuntimeError, match="out of bounds"):
        torch.gather(x, 1, shard(bad, rows(world_size)))
    # A batch-split target (NOTE [a batch-split target stays split]): the rank that holds
    # the bad target is not alone in raising, and the message names it.
    target = TARGET.clone()
    target[8] = 9  # on the last rank only
    for reduction in ("mean", "none"):
        with pytest.raises(IndexError, match="Target 9 is out of bounds"):
            F.cross_entropy(x, shard(target, rows(world_size)), reduction=reduction)
    dist.barrier()


@multi_rank(world_size=[3])
def test_empty_blocks_and_ranks_outside_the_group(rank: int, world_size: int) -> None:
    two_rows = _dense(2, 7, seed=18)  # 2 rows over 3 ranks: an empty block
    pick = torch.tensor([1, 0, 1])
    cases: dict[str, Case] = {
        "gather_1": lambda a: torch.gather(a, 1, _ints(7, 2, 3, seed=1)),
        "gather_0": lambda a: torch.gather(a, 0, _ints(2, 3, 7, seed=2)),
        "index_select_0": lambda a: a.index_select(0, pick),
        "index_select_1": READS["index_select_1"],
        "index_rows": lambda a: a[pick],
        "index_columns": READS["index_columns"],
        "mask": READS["mask"],
        "scatter_add": lambda a: a.scatter_add(1, _ints(7, 2, 3, seed=3), a[:, :3]),
        "index_add": lambda a: a.index_add(0, pick, a[pick] * 2),
        "cross_entropy": lambda a: F.cross_entropy(a, TARGET[:2]),
    }
    for name, op in cases.items():
        _forward_and_backward(name, op, two_rows, rows(world_size))
    group = dist.new_group(ranks=[1, 2])
    x = _dense(*SIZE, seed=19)
    spec = ds.ChunkShardingSpec(0, ["rank:2/cpu", "rank:1/cpu", "rank:2/cpu"])
    sharded = ds.zeros(spec, *SIZE, process_group=group)
    for block in sharded.local_shards():
        block.tensor.copy_(x[block.metadata.shard_offsets[0]:][:block.metadata.shard_sizes[0]])
    results = {"gather": (torch.gather(sharded, 1, INDEX), torch.gather(x, 1, INDEX)),
               "index": (sharded[ROWS], x[ROWS]),
               "scatter": (sharded.scatter(1, INDEX, 1.0), x.scatter(1, INDEX, 1.0)),
               "nll": (F.nll_loss(sharded, TARGET), F.nll_loss(x, TARGET))}
    for name, (got, want) in results.items():
        assert tuple(got.shape) == tuple(want.shape), name
        if rank != 0:  # rank 0 holds nothing and issues no collective
            _check(name, got, want)
