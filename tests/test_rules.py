"""Declarative sharding rules (dispatch_shard.rules), checked by the validation helper
(dispatch_shard.testing.check_sharded_op) against the dense ops."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dispatch_shard as ds
from dispatch_shard import ShardedTensor
from dispatch_shard.testing import LAYOUTS, check_sharded_op, get_pool, multi_rank

# -- three torch.library ops of our own, with derivatives, served by rules ----------------


@torch.library.custom_op("dsrules::scaled_mm", mutates_args=())
def scaled_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x @ w) * 2


def _mm_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _mm_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = ctx.saved_tensors
    return (grad @ w.t()) * 2, (x.t() @ grad) * 2


torch.library.register_autograd("dsrules::scaled_mm", _mm_backward, setup_context=_mm_setup)


@torch.library.custom_op("dsrules::softsign", mutates_args=())
def softsign(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + x.abs())


def _softsign_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(inputs[0])


def _softsign_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return grad / (1 + x.abs()) ** 2


torch.library.register_autograd("dsrules::softsign", _softsign_backward,
                                setup_context=_softsign_setup)


@torch.library.custom_op("dsrules::row_sum", mutates_args=())
def row_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(1)


def _row_sum_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.columns = inputs[0].shape[1]


def _row_sum_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    return grad.unsqueeze(1).expand(-1, ctx.columns)


torch.library.register_autograd("dsrules::row_sum", _row_sum_backward,
                                setup_context=_row_sum_setup)

# The rules: one line each.
# [docs: rules]
ds.register_sharding_rule(torch.ops.dsrules.scaled_mm.default, "m k, k n -> m n",
                          contract="sum")  # a split k gives a Partial result
ds.register_sharding_rule(torch.ops.dsrules.softsign.default, "pointwise")
ds.register_sharding_rule(torch.ops.dsrules.row_sum.default, "m n -> m", contract="sum")
# [docs: rules end]


def _randn(*size: int, seed: int) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


# [docs: check]
def mm_sample() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn(7, 5, seed=1), _randn(5, 6, seed=2)), {}


def softsign_sample() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn(7, 5, seed=3),), {}


def row_sum_sample() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn(7, 6, seed=4),), {}


@pytest.mark.parametrize(("op", "sample"), [
    (torch.ops.dsrules.scaled_mm.default, mm_sample),
    (torch.ops.dsrules.softsign.default, softsign_sample),
    (torch.ops.dsrules.row_sum.default, row_sum_sample),
], ids=["matmul-like", "pointwise", "reduction"])
def test_rules_match_dense_on_every_layout(op: Any, sample: Any) -> None:
    summary = check_sharded_op(op, sample, world_sizes=(1, 2, 3, 4))
    checked = [key for key, outcome in summary.items() if outcome == "ok"]
    # Every 1-D layout ran at every world size, the 2x2-mesh ones at 4 ranks.
    assert len(checked) == 4 * (len(LAYOUTS) - 2) + 2, summary
# [docs: check end]


def wrong_rule_sample() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn(6, 4, seed=5),), {}


@torch.library.custom_op("dsrules::cumsum_rows", mutates_args=())
def cumsum_rows(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(0)


# A wrong rule: cumsum along dim 0 is not pointwise. The helper must catch it.
ds.register_sharding_rule(torch.ops.dsrules.cumsum_rows.default, "pointwise")


def test_the_helper_catches_a_wrong_rule() -> None:
    with pytest.raises(AssertionError, match=r"world 2, layout rows: forward differs"):
        check_sharded_op(torch.ops.dsrules.cumsum_rows.default, wrong_rule_sample,
                         world_sizes=(2,), layouts=("rows", "replicate"), backward=False)
    # On a replicated layout the whole op runs on every rank: right.
    summary = check_sharded_op(torch.ops.dsrules.cumsum_rows.default, wrong_rule_sample,
                               world_sizes=(2,), layouts=("replicate",), backward=False)
    assert summary == {(2, "replicate"): "ok"}


@multi_rank(world_size=[2, 3])
def test_rules_move_the_minimum(rank: int, world_size: int) -> None:
    (x, w), _ = mm_sample()
    rows = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])
    cols = ds.ChunkShardingSpec(1, [f"rank:{r}/cpu" for r in range(world_size)])
    sx = ShardedTensor.from_replicated(x, rows)
    sw = ShardedTensor.from_replicated(w, ds.Replicate())
    with ds.count_collectives() as counted:
        out = scaled_mm(sx, sw)  # batch rows split, weight replicated: local
    assert counted.counts == {} and out.sharding_spec() == rows
    # The contracted dim split on both sides: a Partial result, no collective yet.
    sx, sw = ShardedTensor.from_replicated(x, cols), ShardedTensor.from_replicated(w, rows)
    with ds.count_collectives() as counted:
        out = scaled_mm(sx, sw)
    assert counted.counts == {} and out.sharding_spec() == ds.Partial()
    torch.testing.assert_close(out.full_tensor(), scaled_mm(x, w))


def test_rule_syntax_errors() -> None:
    with pytest.raises(ValueError, match="expected 'inputs -> results'"):
        ds.ShardingRule.parse("m k, k n")
    with pytest.raises(ValueError, match=r"the result's dims \['z'\] appear in no input"):
        ds.ShardingRule.parse("m k -> z")
    with pytest.raises(ValueError, match="contract must be one of"):
        ds.ShardingRule.parse("m k -> m", contract="mean")
    with pytest.raises(TypeError, match="expects an op overload"):
        ds.register_sharding_rule(torch.sin, "pointwise")
    assert ds.ShardingRule.parse("m k, k n -> m n", "sum") == ds.ShardingRule(
        (("m", "k"), ("k", "n")), (("m", "n"),), ("sum",))


# -- the built-ins, checked by the same helper ----------------------------------------------

def mul_sample() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn(6, 5, seed=6), _randn(6, 5, seed=7)), {}


def sum_sample() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn(6, 5, seed=8), [1]), {}


def softmax_sample() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn(6, 5, seed=9), 1, False), {}


@pytest.mark.parametrize(("op", "sample"), [
    (torch.ops.aten.mm.default, mm_sample),
    (torch.ops.aten.mul.Tensor, mul_sample),
    (torch.ops.aten.sum.dim_IntList, sum_sample),
    (torch.ops.aten._softmax.default, softmax_sample),
], ids=["mm", "mul", "sum", "softmax"])
@pytest.mark.slow  # 30 layout x world size runs each; the op families' own tests are quick
def test_builtins_pass_the_helper(op: Any, sample: Any) -> None:
    summary = check_sharded_op(op, sample, world_sizes=(1, 2, 3, 4))
    # (the 2x2-mesh layouts run at 4 ranks only)
    assert all(outcome == "ok" for (world, layout), outcome in summary.items()
               if world == 4 or not layout.startswith("mesh")), summary


def _wrong_call(rank: int, world_size: int) -> tuple[str, str]:
    rows = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])
    x = ShardedTensor.from_replicated(_randn(4, 5, 2, seed=10), rows)  # 3 dims, rule says 2
    try:
        scaled_mm(x, _randn(5, 3, seed=11))
    except ValueError as error:
        return "ValueError", str(error)
    return "ok", ""


def test_a_call_the_rule_does_not_fit_raises_on_every_rank() -> None:
    outcomes = get_pool(3).run(_wrong_call, timeout_s=60)
    for rank, (kind, message) in enumerate(outcomes):
        assert kind == "ValueError" and "gives argument 0 the dims m k" in message, (rank,
                                                                                      message)
