"""Dense-equivalent random ops (dispatch_shard.random.dense_equivalent): the same values
as the dense op after the same seed, at any world size and layout."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from layouts import cols, grid, rows, several, train_side_by_side
from torch import nn

import dispatch_shard as ds
from dispatch_shard import ShardedTensor
from dispatch_shard.examples import parallelize
from dispatch_shard.testing import get_pool, multi_rank


def _layouts(world_size: int) -> dict[str, ds.ShardingSpec]:
    return {"rows": rows(world_size), "cols": cols(world_size),
            "several": several(world_size), "grid": grid((7, 5), world_size),
            "replicate": ds.Replicate()}


def _same(sharded: ShardedTensor, dense: torch.Tensor, what: str) -> None:
    assert torch.equal(sharded.full_tensor(), dense), what


@multi_rank(world_size=[1, 2, 3, 4])
def test_random_ops_give_the_dense_values(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    dense = torch.randn(7, 5)
    for name, spec in _layouts(world_size).items():
        x = ShardedTensor.from_replicated(dense, spec)
        draws: dict[str, Any] = {
            "dropout": lambda t: F.dropout(t, 0.3, training=True),
            "bernoulli_": lambda t: t.clone().bernoulli_(0.4),
            "rand_like": torch.rand_like,
            "randn_like": torch.randn_like,
            "normal_": lambda t: t.clone().normal_(2.0, 3.0),
            "uniform_": lambda t: t.clone().uniform_(-1, 1),
        }
        for what, draw in draws.items():
            with ds.random.dense_equivalent():
                torch.manual_seed(11)
                ours = draw(x)
                again = draw(x)  # the generator advanced as the dense one did
            torch.manual_seed(11)
            theirs = draw(dense)
            _same(ours, theirs, f"{what} on {name}")
            _same(again, draw(dense), f"second {what} on {name}")
    # A probability tensor, sharded: gathered, then the dense draw.
    probabilities = torch.rand(7, 5)
    p = ShardedTensor.from_replicated(probabilities, rows(world_size))
    with ds.random.dense_equivalent():
        torch.manual_seed(3)
        ours = ShardedTensor.from_replicated(dense, cols(world_size)).bernoulli_(p)
    torch.manual_seed(3)
    _same(ours, dense.clone().bernoulli_(probabilities), "bernoulli_(p)")


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), 0.25, training=self.training))


@multi_rank(world_size=[2, 4])
def test_a_model_with_dropout_trains_like_dense(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    dense = DropoutMLP().double()
    sharded = parallelize(copy.deepcopy(dense), {"fc1": "colwise", "fc2": "rowwise"})

    @contextlib.contextmanager
    def same_masks(step: int) -> Any:
        torch.manual_seed(100 + step)  # the same dropout masks for both models
        with ds.random.dense_equivalent():
            yield

    train_side_by_side(dense, sharded, steps=4, shape=(6, 8), seed=1, around_loss=same_masks)
    for (name, p), (_, q) in zip(sharded.named_parameters(), dense.named_parameters(),
                                 strict=True):
        value = p.detach().full_tensor() if isinstance(p, ShardedTensor) else p.detach()
        torch.testing.assert_close(value, q.detach(), msg=name)


def _unseeded(rank: int, world_size: int) -> tuple[str, str]:
    torch.manual_seed(rank)  # a different seed on every rank
    try:
        with ds.random.dense_equivalent():
            torch.rand(2)  # never reached: entering raises
    except ValueError as error:
        return "ValueError", str(error)
    return "ok", ""


def test_ranks_with_different_generators_raise_on_every_rank() -> None:
    outcomes = get_pool(3).run(_unseeded, timeout_s=60)
    for rank, (kind, message) in enumerate(outcomes):
        assert kind == "ValueError" and "generator state" in message, (rank, kind, message)
        assert message == outcomes[0][1]


@pytest.mark.parametrize("world_size", [2])
def test_without_the_context_blocks_draw_per_rank(world_size: int) -> None:
    """The default stays cheap: no collective, each rank its own draws."""
    assert not ds.random.is_dense_equivalent()
    results = get_pool(world_size).run(_per_rank_draw, timeout_s=60)
    assert results[0] == results[1]  # both ranks drew their own block from seed 0


def _per_rank_draw(rank: int, world_size: int) -> list[float]:
    torch.manual_seed(0)
    x = ds.zeros(rows(world_size), 4, 3)
    with ds.count_collectives() as counted:
        x.uniform_()
    assert counted.counts == {}
    return x.local_tensor().flatten().tolist()
