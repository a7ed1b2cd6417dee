"""Pointwise ops against the dense computation: layouts, broadcasting, promotion, in place, out=."""

from __future__ import annotations

import pytest
import torch
from layouts import rows, shard, specs_2d

import dispatch_shard as ds
from dispatch_shard.ops.pointwise import pointwise_overloads
from dispatch_shard.testing import multi_rank

SIZE = (10, 7)


def _dense(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def _assert_matches(got: ds.ShardedTensor, want: torch.Tensor) -> None:
    assert isinstance(got, ds.ShardedTensor)
    value = got.full_tensor()
    assert value.dtype == want.dtype, (value.dtype, want.dtype)
    torch.testing.assert_close(value, want, equal_nan=True)


def test_every_tagged_pointwise_overload_is_registered() -> None:
    overloads = pointwise_overloads()
    assert len(overloads) > 500  # torch 2.13 tags ~545 overloads pointwise
    assert all(op in ds.registry.OVERLOADS for op in overloads)
    assert torch.ops.aten.add.Tensor in overloads and torch.ops.aten.add_.Tensor in overloads
    assert torch.ops.aten.equal.default not in overloads  # returns a bool: not pointwise here


@multi_rank(world_size=[1, 3, 4])
@pytest.mark.parametrize("layout", ["rows", "cols", "several", "grid", "replicate"])
def test_unary_and_binary_on_one_layout(rank: int, world_size: int, layout: str) -> None:
    spec = specs_2d(SIZE, world_size)[layout]
    x, y = _dense(*SIZE, seed=1), _dense(*SIZE, seed=2)
    sx, sy = shard(x, spec), shard(y, spec)
    _assert_matches(torch.exp(sx), torch.exp(x))
    _assert_matches(torch.sigmoid(sx), torch.sigmoid(x))
    _assert_matches(sx + sy, x + y)
    _assert_matches(sx * sy - sx / (sy.abs() + 1), x * y - x / (y.abs() + 1))
    _assert_matches(torch.add(sx, sy, alpha=2.5), torch.add(x, y, alpha=2.5))
    _assert_matches(sx * 3 + 1.5, x * 3 + 1.5)
    _assert_matches(torch.where(sx > 0, sx, sy), torch.where(x > 0, x, y))
    _assert_matches(torch.clamp(sx, -0.5, 0.5), torch.clamp(x, -0.5, 0.5))
    _assert_matches(torch.addcmul(sx, sy, sy, value=0.5), torch.addcmul(x, y, y, value=0.5))
    _assert_matches(sx > sy, x > y)


@multi_rank(world_size=[2, 3])
def test_operands_with_different_layouts(rank: int, world_size: int) -> None:
    specs = specs_2d(SIZE, world_size)
    x, y = _dense(*SIZE, seed=3), _dense(*SIZE, seed=4)
    for first in specs.values():
        for second in specs.values():
            _assert_matches(shard(x, first) * shard(y, second), x * y)
            result = shard(x, first) - shard(y, second)
            assert result.sharding_spec() == shard(x, first).sharding_spec() or isinstance(
                first, ds.Replicate)


@multi_rank(world_size=[1, 3])
def test_broadcasting_with_plain_and_sharded_operands(rank: int, world_size: int) -> None:
    x = _dense(*SIZE, seed=5)
    bias, column, scalar = _dense(7, seed=6), _dense(10, 1, seed=7), torch.tensor(2.0)
    for spec in specs_2d(SIZE, world_size).values():
        sx = shard(x, spec)
        _assert_matches(sx + bias, x + bias)          # a plain tensor is a replicated value
        _assert_matches(bias + sx, bias + x)
        _assert_matches(sx * column, x * column)
        _assert_matches(sx * scalar, x * scalar)
        _assert_matches(sx + shard(bias, rows(world_size)), x + bias)  # a sharded broadcast
    # No operand has the broadcast shape: the result is computed replicated.
    a, b = _dense(10, 1, seed=8), _dense(1, 7, seed=9)
    _assert_matches(shard(a, rows(world_size)) + shard(b, ds.Replicate()), a + b)


@multi_rank(world_size=[1, 3])
def test_type_promotion(rank: int, world_size: int) -> None:
    integers = torch.arange(70).reshape(SIZE)
    spec = rows(world_size)
    _assert_matches(shard(integers, spec) * 0.5, integers * 0.5)
    _assert_matches(shard(integers, spec) / 3, integers / 3)
    halves = _dense(*SIZE, seed=10).to(torch.float16)
    _assert_matches(shard(halves, spec) + shard(integers, spec), halves + integers)
    _assert_matches(shard(integers, spec) + _dense(*SIZE, seed=11).double(),
                    integers + _dense(*SIZE, seed=11).double())


@multi_rank(world_size=[1, 3])
def test_in_place_and_out_forms(rank: int, world_size: int) -> None:
    specs = specs_2d(SIZE, world_size)
    x, y = _dense(*SIZE, seed=12), _dense(*SIZE, seed=13)
    for spec in specs.values():
        for other in specs.values():
            target = shard(x, spec)
            returned = target.mul_(shard(y, other))
            assert returned is target
            assert target.sharding_spec() == shard(x, spec).sharding_spec()
            _assert_matches(target, x * y)
            out = ds.zeros(other, *SIZE) if not isinstance(other, ds.Replicate) \
                else shard(torch.zeros(SIZE), other)
            assert torch.add(shard(x, spec), shard(y, spec), out=out) is out
            _assert_matches(out, x + y)
    target = shard(x, rows(world_size))
    target.add_(1.0).clamp_(max=1.0)
    _assert_matches(target, (x + 1.0).clamp(max=1.0))


@multi_rank(world_size=[2, 3])
def test_partial_operands_are_reduced_first(rank: int, world_size: int) -> None:
    x, y = _dense(*SIZE, seed=14), _dense(*SIZE, seed=15)
    partial = shard(x, rows(world_size)).redistribute(ds.Partial())
    _assert_matches(torch.exp(partial), torch.exp(x))   # exp(sum) != sum(exp)
    _assert_matches(partial + 1, x + 1)                 # adding 1 to each summand would be wrong
    _assert_matches(partial * shard(y, rows(world_size)), x * y)


@multi_rank(world_size=[3])
def test_ranks_without_blocks_and_empty_blocks(rank: int, world_size: int) -> None:
    # Placements on rank 1 only; 2 rows over 3 ranks leaves an empty block.
    x = _dense(*SIZE, seed=16)
    only_one = ds.ChunkShardingSpec(0, ["rank:1/cpu"])
    _assert_matches(shard(x, only_one) * 2 + shard(x, only_one), x * 3)
    small = _dense(2, 7, seed=17)
    ints = torch.arange(14).reshape(2, 7)
    _assert_matches(shard(small, rows(world_size)) + 1, small + 1)
    _assert_matches(shard(ints, rows(world_size)) * 1.5, ints * 1.5)  # dtype on an empty block


@multi_rank(world_size=[2])
def test_nan_and_inf_propagate_like_dense(rank: int, world_size: int) -> None:
    x = _dense(*SIZE, seed=18)
    x[0, 0], x[9, 6], x[5, 3] = float("nan"), float("inf"), -float("inf")
    sx = shard(x, rows(world_size))
    _assert_matches(sx * 2, x * 2)
    _assert_matches(torch.exp(sx), torch.exp(x))
    _assert_matches(torch.nan_to_num(sx), torch.nan_to_num(x))
