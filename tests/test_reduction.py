"""Reductions against the dense computation: every layout, every dim, keepdim, dtypes, NaN,
ties, partial results, uneven and empty blocks, and the backward of a loss and of softmax."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from layouts import cols, grid, rows, several, shard, specs_2d

import dispatch_shard as ds
from dispatch_shard import collectives
from dispatch_shard.testing import multi_rank

SIZE = (10, 7)
LAYOUTS = ["rows", "cols", "several", "grid", "replicate"]

Case = Callable[[torch.Tensor], Any]

FLOAT_CASES: dict[str, Case] = {
    "sum": lambda a: a.sum(),
    "sum_0": lambda a: a.sum(0),
    "sum_1": lambda a: a.sum(1),
    "sum_neg_keepdim": lambda a: a.sum(-1, keepdim=True),
    "sum_0_keepdim": lambda a: a.sum(0, keepdim=True),
    "sum_both": lambda a: a.sum((0, 1)),
    "sum_both_keepdim": lambda a: a.sum((1, 0), keepdim=True),
    "sum_dtype": lambda a: a.sum(dtype=torch.float64),
    "sum_0_dtype": lambda a: a.sum(0, dtype=torch.float64),
    "mean": lambda a: a.mean(),
    "mean_0": lambda a: a.mean(0),
    "mean_1_keepdim": lambda a: a.mean(1, keepdim=True),
    "mean_both": lambda a: a.mean((0, -1)),
    "nansum_0": lambda a: a.nansum(0),
    "count_nonzero": lambda a: torch.count_nonzero(a),
    "count_nonzero_0": lambda a: torch.count_nonzero(a, 0),
    "prod": lambda a: (a * 0.2 + 1).prod(),
    "prod_0": lambda a: a.prod(0),
    "prod_1_keepdim": lambda a: a.prod(1, keepdim=True),
    "amax": lambda a: a.amax(),
    "amax_0": lambda a: a.amax(0),
    "amin_1": lambda a: a.amin(1),
    "amax_both_keepdim": lambda a: a.amax((0, 1), keepdim=True),
    "amin_neg_keepdim": lambda a: a.amin(-2, keepdim=True),
    "max": lambda a: a.max(),
    "min": lambda a: a.min(),
    "max_0": lambda a: a.max(0),
    "max_1": lambda a: a.max(1),
    "min_0_keepdim": lambda a: a.min(0, keepdim=True),
    "min_neg": lambda a: a.min(-1),
    "argmax": lambda a: a.argmax(),
    "argmin": lambda a: a.argmin(),
    "argmax_keepdim": lambda a: a.argmax(keepdim=True),
    "argmax_0": lambda a: a.argmax(0),
    "argmin_1_keepdim": lambda a: a.argmin(1, keepdim=True),
    "var": lambda a: a.var(),
    "var_0": lambda a: a.var(0),
    "std_1": lambda a: a.std(1),
    "var_0_correction_0": lambda a: torch.var(a, 0, correction=0),
    "std_both_keepdim": lambda a: a.std((0, 1), keepdim=True),
    "var_mean_0": lambda a: torch.var_mean(a, 0),
    "std_mean": lambda a: torch.std_mean(a),
    "norm": lambda a: a.norm(),
    "norm_1_dim_0": lambda a: a.norm(p=1, dim=0),
    "norm_inf_1": lambda a: torch.linalg.vector_norm(a, math.inf, 1),
    "norm_neg_inf": lambda a: torch.linalg.vector_norm(a, -math.inf),
    "norm_0_dim_0": lambda a: torch.linalg.vector_norm(a, 0, 0),
    "norm_3_both": lambda a: torch.linalg.vector_norm(a, 3, (0, 1)),
    "norm_2_dtype": lambda a: torch.linalg.vector_norm(a, 2, 0, dtype=torch.float64),
    "all": lambda a: (a > -1).all(),
    "all_0": lambda a: (a > -1).all(0),
    "any_1": lambda a: (a > 1).any(1),
    "any_both": lambda a: (a > 1).any((0, 1)),
    "all_1_keepdim": lambda a: (a > -1).all(1, keepdim=True),
    "logsumexp_0": lambda a: a.logsumexp(0),
    "logsumexp_1": lambda a: a.logsumexp(1),
    "logsumexp_both": lambda a: torch.logsumexp(a, (0, 1)),
    "logsumexp_neg_keepdim": lambda a: a.logsumexp(-1, keepdim=True),
    "softmax_0": lambda a: a.softmax(0),
    "softmax_1": lambda a: a.softmax(1),
    "log_softmax_0": lambda a: a.log_softmax(0),
    "log_softmax_neg": lambda a: a.log_softmax(-1),
    "softmax_dtype": lambda a: a.softmax(0, dtype=torch.float64),
}

INT_CASES: dict[str, Case] = {
    "sum": lambda a: a.sum(),
    "sum_0": lambda a: a.sum(0),
    "sum_1_keepdim": lambda a: a.sum(1, keepdim=True),
    "prod_0": lambda a: (a % 3 + 1).prod(0),
    "amax_0": lambda a: a.amax(0),
    "amin": lambda a: a.amin(),
    "max_1": lambda a: a.max(1),
    "min": lambda a: a.min(),
    "argmax_0": lambda a: a.argmax(0),
    "argmin": lambda a: a.argmin(),
    "mean_dtype": lambda a: a.mean(0, dtype=torch.float32),
    "logsumexp_0": lambda a: a.logsumexp(0),
    "bool_sum": lambda a: (a > 30).sum(0),
    "bool_all": lambda a: (a > 3).all(0),
    "bool_amax": lambda a: (a > 30).amax(0),
    "uint8_any": lambda a: (a % 2).to(torch.uint8).any(0),
}


def _dense(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _values(result: Any) -> list[torch.Tensor]:
    items = list(result) if isinstance(result, tuple) else [result]
    for item in items:
        assert isinstance(item, ds.ShardedTensor), type(item)
    return [item.full_tensor() for item in items]


def _check(name: str, got: Any, want: Any) -> None:
    wants = list(want) if isinstance(want, tuple) else [want]
    gots = _values(got)
    assert len(gots) == len(wants), name
    for g, w in zip(gots, wants, strict=True):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _check_cases(cases: dict[str, Case], sharded: ds.ShardedTensor, dense: torch.Tensor) -> None:
    for name, op in cases.items():
        _check(name, op(sharded), op(dense))


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
def test_reductions_match_dense(rank: int, world_size: int, layout: str) -> None:
    spec = specs_2d(SIZE, world_size)[layout]
    x = _dense(*SIZE, seed=1)
    _check_cases(FLOAT_CASES, shard(x, spec), x)
    integers = torch.randperm(70, generator=torch.Generator().manual_seed(2)).reshape(SIZE) - 20
    _check_cases(INT_CASES, shard(integers, spec), integers)


@multi_rank(world_size=[1, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_planned_sums_match_the_general_path(rank: int, world_size: int, layout: str) -> None:
    """NOTE [sum plans] in ops/reduction.py: later sums with the same layout and arguments
    run the plan the first one made; each value matches dense, with the general path's
    result layout."""
    from dispatch_shard.ops import reduction

    spec = specs_2d(SIZE, world_size)[layout]
    arguments: list[tuple[Any, bool, torch.dtype | None]] = [
        (0, True, None), (0, False, None), (1, False, None), (1, True, torch.float64),
        ([0, 1], False, torch.float64)]
    for dim, keepdim, dtype in arguments:
        reduction._SUM_PLANS.clear()
        layouts = set()
        for seed in range(3):
            x = _dense(*SIZE, seed=seed)
            got = shard(x, spec).sum(dim, keepdim=keepdim, dtype=dtype)
            _check(f"sum({dim}, {keepdim}, {dtype}) #{seed}", got,
                   x.sum(dim, keepdim=keepdim, dtype=dtype))
            layouts.add(got._layout)
        assert len(layouts) == 1, (dim, keepdim, layouts)
        if layout == "rows":  # blockwise (dim 1) or one whole-width block per rank: planned
            assert len(reduction._SUM_PLANS) == 1, (dim, keepdim)


@multi_rank(world_size=[2, 3])
def test_ties_pick_the_first_index_like_dense(rank: int, world_size: int) -> None:
    x = torch.zeros(SIZE)
    x[9, 6] = x[2, 5] = x[6, 1] = x[6, 5] = 4.0     # ties in several blocks and ranks
    x[8, 0] = x[3, 3] = x[0, 6] = -4.0
    integers = (x * 2).to(torch.int32)
    for spec in specs_2d(SIZE, world_size).values():
        for dense in (x, integers):
            sharded = shard(dense, spec)
            for op in (torch.argmax, torch.argmin):
                _check("arg", op(sharded), op(dense))
                _check("arg_0", op(sharded, 0), op(dense, 0))
                _check("arg_1", op(sharded, 1, keepdim=True), op(dense, 1, keepdim=True))
            _check("max_0", sharded.max(0), dense.max(0))
            _check("min_1", sharded.min(1), dense.min(1))


@multi_rank(world_size=[2, 3])
def test_nan_propagates_like_dense(rank: int, world_size: int) -> None:
    x = _dense(*SIZE, seed=3)
    # NaNs in late blocks only, so that the ranks holding them are not the first.
    x[8, 5] = x[9, 1] = x[4, 6] = float("nan")
    for spec in specs_2d(SIZE, world_size).values():
        sharded = shard(x, spec)
        for name, op in FLOAT_CASES.items():
            if not name.startswith(("all", "any", "count")):
                _check(name, op(sharded), op(x))


@multi_rank(world_size=[3, 4])
def test_mean_weights_uneven_blocks_by_element_count(rank: int, world_size: int) -> None:
    # 10 rows over 4 ranks: 3, 3, 3, 1 -- a mean of per-block means would be wrong.
    x, target = _dense(*SIZE, seed=4), _dense(*SIZE, seed=5)
    for spec in (rows(world_size), grid(SIZE, world_size), several(world_size)):
        sx, st = shard(x, spec), shard(target, spec)
        _check("mse", ((sx - st) ** 2).mean(), ((x - target) ** 2).mean())
        _check("mean_0", sx.mean(0), x.mean(0))
        _check("var_0", sx.var(0), x.var(0))
    two_rows = _dense(2, 7, seed=6)  # leaves empty blocks
    _check("mean_empty_blocks", shard(two_rows, rows(world_size)).mean(0), two_rows.mean(0))


@multi_rank(world_size=[3])
def test_partial_results_and_collectives(rank: int, world_size: int) -> None:
    x = _dense(*SIZE, seed=7)
    sx = shard(x, rows(world_size))
    with _collectives() as issued:
        by_row = sx.sum(1)
        column_sums, column_max, column_min = sx.sum(0), sx.amax(0), sx.amin(0)
        column_means = sx.mean(0, keepdim=True)
    assert issued == []  # blockwise or partial: no communication yet
    spec = by_row.sharding_spec()
    assert isinstance(spec, ds.ChunkShardingSpec) and spec.dim == 0
    assert column_sums.sharding_spec() == ds.Partial("sum")
    assert column_max.sharding_spec() == ds.Partial("max")
    assert column_min.sharding_spec() == ds.Partial("min")
    assert column_means.sharding_spec() == ds.Partial("sum")
    _check("sum_0", column_sums, x.sum(0))
    _check("amax_0", column_max, x.amax(0))
    _check("amin_0", column_min, x.amin(0))
    _check("mean_0", column_means, x.mean(0, keepdim=True))
    _check("next_op", column_sums * 2 + 1, x.sum(0) * 2 + 1)
    # A reduction of a partial input that commutes with it stays partial, 0-dim too: the
    # scalar is all-reduced once, where its value is needed.
    with _collectives() as issued:
        total = column_sums.sum()
        full_total = sx.sum()
    assert issued == []
    assert total.sharding_spec() == ds.Partial("sum")
    assert full_total.sharding_spec() == ds.Partial("sum")
    with _collectives() as issued:
        value, again = total.item(), total.item()
    assert issued == ["all_reduce"] and value == again  # reduced once, cached
    _check("partial_sum", total, x.sum())
    _check("full_sum", full_total, x.sum())
    assert column_max.amax().full_tensor().item() == x.max().item()
    _check("partial_mean", column_sums.mean(), x.sum(0).mean())
    _check("partial_std", column_sums.std(), x.sum(0).std())  # nonlinear: reduced first
    whole = shard(x, rows(world_size)).redistribute(ds.Partial())
    _check("sum_of_partial", whole.sum(1), x.sum(1))
    assert whole.sum(1).sharding_spec() == ds.Partial("sum")
    _check("max_of_partial", whole.max(1), x.max(1))
    # Counts of collectives where the result needs the final value.
    with _collectives() as issued:
        sx.var(0)
    assert issued == ["all_reduce", "all_reduce"]
    with _collectives() as issued:
        sx.argmax()
        sx.softmax(0)
    assert issued == ["all_reduce"] * 4
    replicated = shard(x, ds.Replicate())
    with _collectives() as issued:
        replicated.sum(0)
        sx.softmax(1)
        sx.logsumexp(1)
        sx.max(1)
    assert issued == [], issued


@multi_rank(world_size=[3])
def test_ranks_without_blocks_empty_blocks_and_empty_tensors(rank: int, world_size: int) -> None:
    x = _dense(*SIZE, seed=8)
    only_one = ds.ChunkShardingSpec(0, ["rank:1/cpu"])
    _check_cases(FLOAT_CASES, shard(x, only_one), x)
    two_rows = _dense(2, 7, seed=9)  # 2 rows over 3 ranks: an empty block
    _check_cases(FLOAT_CASES, shard(two_rows, rows(world_size)), two_rows)
    one_row = _dense(1, 7, seed=10)  # 1 row over 3 ranks: dim 0 is not split at all
    _check_cases(FLOAT_CASES, shard(one_row, rows(world_size)), one_row)
    empty = torch.zeros(0, 7)
    sharded_empty = ds.zeros(cols(world_size), 0, 7)
    for name, op in {"sum": lambda a: a.sum(), "sum_0": lambda a: a.sum(0),
                     "sum_1": lambda a: a.sum(1), "mean": lambda a: a.mean(),
                     "prod_0": lambda a: a.prod(0), "amax_1": lambda a: a.amax(1),
                     "all": lambda a: a.all(), "norm": lambda a: a.norm()}.items():
        _check(name, op(sharded_empty), op(empty))


@multi_rank(world_size=[2])
def test_errors_like_dense(rank: int, world_size: int) -> None:
    integers = shard(torch.arange(70).reshape(SIZE), rows(world_size))
    with pytest.raises(RuntimeError, match="mean"):
        integers.mean()
    with pytest.raises(RuntimeError, match="floating point"):
        integers.var(0)
    with pytest.raises(IndexError, match="Dimension out of range"):
        shard(_dense(*SIZE), rows(world_size)).sum(2)
    with pytest.raises((RuntimeError, IndexError)):
        ds.zeros(rows(world_size), 0, 7).max()


@multi_rank(world_size=[1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_backward(rank: int, world_size: int, layout: str) -> None:
    spec = specs_2d(SIZE, world_size)[layout]
    x, weight = _dense(*SIZE, seed=11), _dense(*SIZE, seed=12)
    for name, loss_of in {"sum": lambda a: a.sum(), "mean": lambda a: a.mean(),
                          "weighted": lambda a: (a * weight).sum(),
                          "sum_0_then_mean": lambda a: (a.sum(0) ** 2).mean(),
                          "mse": lambda a: ((a - weight) ** 2).mean()}.items():
        leaf = shard(x, spec, requires_grad=True)
        loss = loss_of(leaf)
        # Replicated (mse's pow reduces) or partial (a sum's ranks' shares): backward
        # seeds both with ones, so every rank's gradient counts once.
        assert loss.dim() == 0 and loss.sharding_spec() in (ds.Replicate(), ds.Partial()), name
        loss.backward()
        dense = x.clone().requires_grad_(True)
        loss_of(dense).backward()
        assert isinstance(leaf.grad, ds.ShardedTensor), name
        _check(name, leaf.grad, dense.grad)
        _check(name, loss, loss_of(x))
    leaf = shard(x, spec, requires_grad=True)
    leaf.sum().backward()
    assert torch.equal(leaf.grad.full_tensor(), torch.ones(SIZE))


@multi_rank(world_size=[1, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_softmax_forward_and_backward(rank: int, world_size: int, layout: str) -> None:
    spec = specs_2d(SIZE, world_size)[layout]
    x, weight = _dense(*SIZE, seed=13), _dense(*SIZE, seed=14)
    for op in (torch.softmax, torch.log_softmax):
        for dim in (0, 1, -1):
            leaf = shard(x, spec, requires_grad=True)
            out = op(leaf, dim)
            if layout != "replicate":
                assert out.sharding_spec() == leaf.sharding_spec()
            (out * weight).sum().backward()
            dense = x.clone().requires_grad_(True)
            dense_out = op(dense, dim)
            (dense_out * weight).sum().backward()
            _check(f"{op.__name__}_{dim}", out, dense_out)
            assert isinstance(leaf.grad, ds.ShardedTensor)
            _check(f"{op.__name__}_{dim}_grad", leaf.grad, dense.grad)
    # The backward ops on operands in different layouts, directly.
    output = torch.softmax(x, 0)
    for other in specs_2d(SIZE, world_size).values():
        got = torch.ops.aten._softmax_backward_data(shard(weight, other), shard(output, spec),
                                                    0, torch.float32)
        want = torch.ops.aten._softmax_backward_data(weight, output, 0, torch.float32)
        _check("softmax_backward_data", got, want)
        log_output = torch.log_softmax(x, 1)
        got = torch.ops.aten._log_softmax_backward_data(shard(weight, other),
                                                        shard(log_output, spec), 1, torch.float32)
        want = torch.ops.aten._log_softmax_backward_data(weight, log_output, 1, torch.float32)
        _check("log_softmax_backward_data", got, want)


@multi_rank(world_size=[3])
def test_complex_inputs(rank: int, world_size: int) -> None:
    x = torch.complex(_dense(*SIZE, seed=15), _dense(*SIZE, seed=16))
    cases: dict[str, Case] = {
        "sum": lambda a: a.sum(), "sum_0": lambda a: a.sum(0), "mean_1": lambda a: a.mean(1),
        "prod_0": lambda a: a.prod(0), "var_0": lambda a: a.var(0),
        "std_mean": lambda a: torch.std_mean(a), "norm": lambda a: a.norm(),
        "norm_inf_0": lambda a: torch.linalg.vector_norm(a, math.inf, 0),
        "norm_1_dtype": lambda a: torch.linalg.vector_norm(a, 1, 1, dtype=torch.complex128),
    }
    for spec in (rows(world_size), grid(SIZE, world_size), ds.Replicate()):
        _check_cases(cases, shard(x, spec), x)
    _check("logsumexp_blockwise", shard(x, rows(world_size)).logsumexp(1), x.logsumexp(1))
    # along the split dim: shifted by the max of the real parts, as dense
    _check("logsumexp_split", shard(x, rows(world_size)).logsumexp(0), x.logsumexp(0))


@multi_rank(world_size=[3])
def test_subgroup_leaves_rank_zero_out(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=[1, 2])
    x = _dense(*SIZE, seed=17)
    for placements in (["rank:1/cpu", "rank:2/cpu"], ["rank:2/cpu", "rank:1/cpu", "rank:2/cpu"]):
        sharded = ds.zeros(ds.ChunkShardingSpec(0, placements), *SIZE, process_group=group)
        for block in sharded.local_shards():
            offsets, sizes = block.metadata.shard_offsets, block.metadata.shard_sizes
            block.tensor.copy_(x[offsets[0]:offsets[0] + sizes[0]])
        for name, op in FLOAT_CASES.items():
            got = op(sharded)  # rank 0 holds nothing and issues no collective
            if rank != 0:
                _check(name, got, op(x))


def _columns_in_row_blocks(size: tuple[int, int], world_size: int, mixed: bool
                           ) -> ds.EnumerableShardingSpec:
    """Each rank holds a range of columns as two row blocks (``mixed``: the second row
    block of the last range goes to rank 0 instead)."""
    top = size[0] // 2 + 1
    bounds = [size[1] * r // world_size for r in range(world_size + 1)]
    blocks = []
    for r in range(world_size):
        left, width = bounds[r], bounds[r + 1] - bounds[r]
        for row, height, owner in ((0, top, r), (top, size[0] - top, r)):
            if mixed and r == world_size - 1 and row:
                owner = 0
            blocks.append(ds.ShardMetadata([row, left], [height, width], f"rank:{owner}/cpu"))
    return ds.EnumerableShardingSpec(blocks)


@multi_rank(world_size=[2, 3])
def test_reductions_combined_within_a_rank(rank: int, world_size: int) -> None:
    """A reduced dim split into blocks that all lie on one rank per output position:
    each rank combines its blocks, no collective, a sharded result (NOTE [reductions
    combined within a rank] in ops/reduction.py); where two ranks meet an output
    position, the usual Partial result."""
    x = _dense(*SIZE, seed=11)
    sx = shard(x, _columns_in_row_blocks(SIZE, world_size, mixed=False))
    cases: dict[str, Case] = {
        "sum_0": lambda a: a.sum(0), "sum_0_keepdim": lambda a: a.sum(0, keepdim=True),
        "mean_0": lambda a: a.mean(0), "amax_0": lambda a: a.amax(0),
        "amin_0_keepdim": lambda a: a.amin(0, keepdim=True), "prod_0": lambda a: a.prod(0),
        "nansum_0": lambda a: a.nansum(0), "sum_1": lambda a: a.sum(1),
    }
    with _collectives() as issued:
        results = {name: op(sx) for name, op in cases.items()}
    assert issued == []
    for name in ("sum_0", "mean_0", "amax_0", "prod_0"):
        assert results[name]._layout.is_sharded, name  # complete values, no Partial
    for name, op in cases.items():
        _check(name, results[name], op(x))
    mixed = shard(x, _columns_in_row_blocks(SIZE, world_size, mixed=True))
    assert mixed.sum(0).sharding_spec() == ds.Partial("sum")
    for name, op in cases.items():
        _check(f"mixed {name}", op(mixed), op(x))
