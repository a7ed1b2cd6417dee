"""Sharding rules for ops with several results (dispatch_shard.rules): ``"m n -> m, m"``
for a max's values and indices, ``"b n -> b n, b"`` for a value and a per-row statistic,
``"pointwise"`` for two elementwise results,
on 1-D layouts and per mesh dim on a 2x2 mesh, checked against dense by
dispatch_shard.testing.check_sharded_op, forward and backward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Partial, Replicate, Shard

import dispatch_shard as ds
from dispatch_shard import ShardedTensor
from dispatch_shard.testing import LAYOUTS, check_sharded_op, get_pool, multi_rank

# -- four torch.library ops with several results, with derivatives -------------------------


@torch.library.custom_op("dsmulti::row_max", mutates_args=())
def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``x.max(dim=1)``: each row's largest value and its column."""
    values, indices = x.max(dim=1)
    return values, indices


def _row_max_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(inputs[0], output[0])


def _row_max_backward(ctx: Any, grad: torch.Tensor, _indices: Any) -> torch.Tensor:
    x, values = ctx.saved_tensors
    return grad.unsqueeze(1) * (x == values.unsqueeze(1))  # (ties: each gets the gradient)


torch.library.register_autograd("dsmulti::row_max", _row_max_backward,
                                setup_context=_row_max_setup)

# The values of a split row could be a pending max, but its indices cannot be pending
# (the maximum of per-block indices is not the index of the maximum): contract None for
# them, so a split n is moved away first (to rows, one all-to-all).
ds.register_sharding_rule(torch.ops.dsmulti.row_max.default, "m n -> m, m",
                          contract=("max", None))


@torch.library.custom_op("dsmulti::normalize_rows", mutates_args=())
def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row divided by its norm, and the norms."""
    norms = x.norm(dim=1)
    return x / norms.unsqueeze(1), norms


@normalize_rows.register_fake
def _normalize_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (with a fake kernel, the results' sizes come from a meta run; the other ops here
    # have none, and their sizes come from the rule)
    return torch.empty_like(x), x.new_empty(x.shape[0])


def _normalize_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*output)


def _normalize_backward(ctx: Any, grad: torch.Tensor, grad_norms: torch.Tensor
                        ) -> torch.Tensor:
    y, norms = ctx.saved_tensors
    along = (grad * y).sum(1, keepdim=True)
    return (grad - y * along) / norms.unsqueeze(1) + grad_norms.unsqueeze(1) * y


torch.library.register_autograd("dsmulti::normalize_rows", _normalize_backward,
                                setup_context=_normalize_setup)

# No contract: the normalized rows need whole rows, so n is never split.
ds.register_sharding_rule(torch.ops.dsmulti.normalize_rows.default, "b n -> b n, b")


@torch.library.custom_op("dsmulti::scaled_and_row_sum", mutates_args=())
def scaled_and_row_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3 x, x.sum(1))``: elementwise and a row sum, both fine on column blocks."""
    return x * 3, x.sum(1)


def _scaled_backward(ctx: Any, grad: torch.Tensor, grad_sums: torch.Tensor) -> torch.Tensor:
    return grad * 3 + grad_sums.unsqueeze(1)


torch.library.register_autograd("dsmulti::scaled_and_row_sum", _scaled_backward)

# One contract, for the one result that contracts n: a split n gives column blocks of
# the first result and a pending sum of the second.
ds.register_sharding_rule(torch.ops.dsmulti.scaled_and_row_sum.default, "b n -> b n, b",
                          contract="sum")


@torch.library.custom_op("dsmulti::mm_and_row_total", mutates_args=())
def mm_and_row_total(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ w, (x @ w).sum(1))``: the second result contracts k and n, both by a sum."""
    product = x @ w
    return product, product.sum(1)


def _mm_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _mm_backward(ctx: Any, grad: torch.Tensor, grad_totals: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = ctx.saved_tensors
    grad = grad + grad_totals.unsqueeze(1)
    return grad @ w.t(), x.t() @ grad


torch.library.register_autograd("dsmulti::mm_and_row_total", _mm_backward,
                                setup_context=_mm_setup)

ds.register_sharding_rule(torch.ops.dsmulti.mm_and_row_total.default, "m k, k n -> m n, m",
                          contract=("sum", "sum"))


# A wrong rule, as in torch.einsum: a result lacking a letter contracts it, even one of
# an input it does not read. ``x.sum(1)`` does not add up over blocks of n, so its
# contract must be None; the validation helper catches the "sum" (on the 2x2 mesh,
# where w's columns are split while x is not).
@torch.library.custom_op("dsmulti::mm_and_row_sum", mutates_args=())
def mm_and_row_sum(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x @ w, x.sum(1)


ds.register_sharding_rule(torch.ops.dsmulti.mm_and_row_sum.default, "m k, k n -> m n, m",
                          contract=("sum", "sum"))


@torch.library.custom_op("dsmulti::sin_and_square", mutates_args=())
def sin_and_square(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two elementwise results: served by ``"pointwise"`` (one per result the schema
    declares), with no meta kernel (the dtypes come from a small dense run)."""
    return x.sin(), x * x


def _sin_square_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(inputs[0])


def _sin_square_backward(ctx: Any, grad_sin: torch.Tensor, grad_square: torch.Tensor
                         ) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return grad_sin * x.cos() + grad_square * 2 * x


torch.library.register_autograd("dsmulti::sin_and_square", _sin_square_backward,
                                setup_context=_sin_square_setup)
ds.register_sharding_rule(torch.ops.dsmulti.sin_and_square.default, "pointwise")


def _randn(*size: int, seed: int) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def one_matrix() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn(7, 6, seed=1),), {}


def two_matrices() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn(7, 5, seed=2), _randn(5, 6, seed=3)), {}


OPS = [(torch.ops.dsmulti.row_max.default, one_matrix),
       (torch.ops.dsmulti.normalize_rows.default, one_matrix),
       (torch.ops.dsmulti.scaled_and_row_sum.default, one_matrix),
       (torch.ops.dsmulti.mm_and_row_total.default, two_matrices),
       (torch.ops.dsmulti.sin_and_square.default, one_matrix)]


@pytest.mark.parametrize(("op", "sample"), OPS,
                         ids=["values-indices", "normalized-norms", "kept-and-summed",
                              "two-contractions", "pointwise-two-results"])
def test_multi_result_rules_match_dense(op: Any, sample: Any) -> None:
    summary = check_sharded_op(op, sample, world_sizes=(1, 2, 3, 4))
    ran = [key for key, outcome in summary.items() if outcome == "ok"]
    # Every 1-D layout at every world size, and the two 2x2-mesh layouts at 4 ranks.
    assert len(ran) == 4 * (len(LAYOUTS) - 2) + 2, summary


def test_the_helper_catches_a_wrong_multi_result_rule() -> None:
    with pytest.raises(AssertionError, match=r"world 4, layout mesh: result 1: forward differs"):
        check_sharded_op(torch.ops.dsmulti.mm_and_row_sum.default, two_matrices,
                         world_sizes=(4,), layouts=("rows", "mesh"), backward=False)


@torch.library.custom_op("dsmulti::column_max", mutates_args=())
def column_max(x: torch.Tensor) -> torch.Tensor:
    return x.amax(0)


# A split m gives a pending max; an empty block of rows (more blocks than rows) runs
# nothing, where amax of no rows would raise.
ds.register_sharding_rule(torch.ops.dsmulti.column_max.default, "m n -> n", contract="max")


def test_empty_blocks_of_a_contracted_letter_add_nothing() -> None:
    summary = check_sharded_op(torch.ops.dsmulti.column_max.default, one_matrix,
                               world_sizes=(2, 4), layouts=("rows", "several", "empty"),
                               backward=False)
    assert set(summary.values()) == {"ok"}, summary


def _wrong_count_sample() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn(6, 4, seed=4),), {}


@torch.library.custom_op("dsmulti::max_and_argmax", mutates_args=())
def max_and_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = x.max(dim=1)
    return values, indices


# A wrong rule: it says the max is one result.
ds.register_sharding_rule(torch.ops.dsmulti.max_and_argmax.default, "m n -> m",
                          contract="max")


def _call_wrong(rank: int, world_size: int) -> tuple[str, str]:
    rows = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])
    x = ShardedTensor.from_replicated(_wrong_count_sample()[0][0], rows)
    try:
        max_and_argmax(x)
    except ValueError as error:
        return "ValueError", str(error)
    return "ok", ""


def test_a_rule_naming_too_few_results_raises_on_every_rank() -> None:
    for kind, message in get_pool(2).run(_call_wrong, timeout_s=60):
        assert kind == "ValueError" and "returns 2 value(s), but its sharding rule names " \
            "1 result(s)" in message, message


def test_multi_result_syntax_and_errors() -> None:
    parse = ds.ShardingRule.parse
    assert parse("m n -> m, m", ("max", None)) == ds.ShardingRule(
        (("m", "n"),), (("m",), ("m",)), ("max", None))
    # A single contract goes to the one result that contracts a letter.
    assert parse("b n -> b n, b", "sum").contracts == (None, "sum")
    assert parse("n -> n, ()", "sum").outputs == (("n",), ())
    with pytest.raises(ValueError, match=r"contract='max' is ambiguous: results 0, 1"):
        parse("m n -> m, m", "max")
    with pytest.raises(ValueError, match="1 contracts for 2 results"):
        parse("m n -> m, m", ("max",))
    with pytest.raises(ValueError, match=r"result 0 \(m n\) keeps every letter"):
        parse("m n -> m n, m", ("sum", None))
    with pytest.raises(ValueError, match="an empty result between commas"):
        parse("m n -> m,, m")
    with pytest.raises(ValueError, match=r"result 1's dims \['z'\] appear in no input"):
        parse("m n -> m, z")
    with pytest.raises(ValueError, match="'2' is not a dim name"):
        parse("m 2 -> m")
    with pytest.raises(ValueError, match="contract must be one of"):
        parse("m n -> m, m", ("mean", None))


# -- where the results land and what moves ---------------------------------------------------

def _chunks(dim: int, world_size: int) -> ds.ChunkShardingSpec:
    return ds.ChunkShardingSpec(dim, [f"rank:{r}/cpu" for r in range(world_size)])


@multi_rank(world_size=[2, 3])
def test_multi_result_layouts_1d(rank: int, world_size: int) -> None:
    (dense,), _ = one_matrix()
    rows, cols = _chunks(0, world_size), _chunks(1, world_size)
    by_cols = ShardedTensor.from_replicated(dense, cols)
    # Column blocks: the kept result stays in column blocks, the row sum is pending.
    with ds.count_collectives() as counted:
        scaled, sums = scaled_and_row_sum(by_cols)
    assert counted.counts == {}, counted.counts
    assert scaled.sharding_spec() == cols and sums.sharding_spec() == ds.Partial()
    for got, want in zip((scaled, sums), scaled_and_row_sum(dense), strict=True):
        torch.testing.assert_close(got.full_tensor(), want)
    # A max's indices cannot be pending: the columns move to rows (one all-to-all).
    with ds.count_collectives() as counted:
        values, indices = row_max(by_cols)
    assert sum(counted.counts.values()) == 1, counted.counts
    assert values.sharding_spec() == rows and indices.sharding_spec() == rows
    assert indices.dtype == torch.int64
    for got, want in zip((values, indices), row_max(dense), strict=True):
        torch.testing.assert_close(got.full_tensor(), want)
    # Row blocks: nothing moves.
    by_rows = ShardedTensor.from_replicated(dense, rows)
    with ds.count_collectives() as counted:
        normalized, norms = normalize_rows(by_rows)
    assert counted.counts == {} and norms.sharding_spec() == rows, (counted.counts, norms)
    for got, want in zip((normalized, norms), normalize_rows(dense), strict=True):
        torch.testing.assert_close(got.full_tensor(), want)


@multi_rank(world_size=4)
def test_multi_result_rules_per_mesh_dim(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (2, 2))
    (dense,), _ = one_matrix()
    x = ds.distribute_tensor(dense, mesh, [Shard(0), Shard(1)])
    with ds.count_collectives() as counted:
        scaled, sums = scaled_and_row_sum(x)
    assert counted.counts == {}, counted.counts  # served per mesh dim, nothing moves
    assert list(scaled.placements) == [Shard(0), Shard(1)]
    assert list(sums.placements) == [Shard(0), Partial()]
    values, indices = row_max(x)  # n gathered along mesh dim 1, rows kept split
    assert list(values.placements) == [Shard(0), Replicate()]
    assert list(indices.placements) == [Shard(0), Replicate()]
    for got, want in zip((scaled, sums, values, indices),
                         (*scaled_and_row_sum(dense), *row_max(dense)), strict=True):
        torch.testing.assert_close(got.full_tensor(), want)
    # Both contract k, split on mesh dim 1: two pending sums there.
    (a, b), _ = two_matrices()
    product, totals = mm_and_row_total(ds.distribute_tensor(a, mesh, [Shard(0), Shard(1)]),
                                       ds.distribute_tensor(b, mesh, [Replicate(), Shard(0)]))
    assert list(product.placements) == [Shard(0), Partial()]
    assert list(totals.placements) == [Shard(0), Partial()]
    for got, want in zip((product, totals), mm_and_row_total(a, b), strict=True):
        torch.testing.assert_close(got.full_tensor(), want)


@multi_rank(world_size=4)
def test_a_sum_of_a_pending_mean_split_on_another_mesh_dim(rank: int, world_size: int) -> None:
    """Terms of a mean on mesh dim 0, the summed dim split on mesh dim 1: the sum rule
    would leave a pending sum there beside the pending mean; one layout holds one kind,
    so the mean is reduced first."""
    mesh = init_device_mesh("cpu", (2, 2))
    (dense,), _ = one_matrix()
    x = ds.distribute_tensor(dense, mesh, [Replicate(), Shard(1)])
    x = x.redistribute(mesh, [Partial("avg"), Shard(1)])
    total = x.sum(1)
    assert list(total.placements) == [Replicate(), Partial()]
    torch.testing.assert_close(total.full_tensor(), dense.sum(1))
