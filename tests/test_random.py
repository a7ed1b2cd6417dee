"""Dense-equivalent random ops (dispatch_shard.random.dense_equivalent): the same values
as the dense op after the same seed, at any world size and layout."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
        for what in ("dropout", "bernoulli_", "rand_like", "randn_like", "normal_", "uniform_"):
            draw = RANDOM_OPS[what]
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


class DropoutTransformer(nn.Module):
    """Two ``nn.TransformerEncoderLayer`` s with dropout 0.1 (residual, attention and
    feed-forward dropout), then a linear head; ``[seq, batch, features]`` (torch's default
    layout: with ``batch_first=True`` the attention's output reaches its dropout as a
    transposed view, see NOTE [random draws follow the dense memory order])."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(8, 2, 12, dropout=0.1) for _ in range(2))
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)  # type: ignore[no-any-return]


@multi_rank(world_size=[2, 3])
def test_a_transformer_with_dropout_trains_like_dense(rank: int, world_size: int) -> None:
    """Feed-forward layers tensor-parallel (uneven at world 3). Under dense_equivalent()
    every dropout of the sharded model zeroes exactly the elements the dense model's
    does, step after step, and training matches dense to float64 rounding."""
    torch.manual_seed(0)
    dense = DropoutTransformer().double()
    plan = {f"layers.{i}.{name}": style for i in range(2)
            for name, style in (("linear1", "colwise"), ("linear2", "rowwise"))}
    sharded = parallelize(copy.deepcopy(dense), plan)
    masks: dict[str, list[torch.Tensor]] = {"dense": [], "sharded": []}

    def keep_masks(key: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            value = output.full_tensor() if isinstance(output, ShardedTensor) else output
            masks[key].append((value.detach() == 0).clone())
        return hook

    for key, model in (("dense", dense), ("sharded", sharded)):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.register_forward_hook(keep_masks(key))

    losses: dict[str, list[float]] = {"dense": [], "sharded": []}
    optimizers = {key: torch.optim.AdamW(m.parameters(), lr=1e-2)
                  for key, m in (("dense", dense), ("sharded", sharded))}
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = (torch.randn(5, 2, 8, generator=generator, dtype=torch.float64)
                for _ in range(2))
        for key, model in (("dense", dense), ("sharded", sharded)):
            torch.manual_seed(100 + step)
            with ds.random.dense_equivalent():
                loss = F.mse_loss(model(x), y)
                optimizers[key].zero_grad()
                loss.backward()
            optimizers[key].step()
            losses[key].append(float(loss.full_tensor() if isinstance(loss, ShardedTensor)
                                     else loss))
    assert len(masks["dense"]) == len(masks["sharded"]) == 3 * 2 * 3
    for number, (ours, theirs) in enumerate(zip(masks["sharded"], masks["dense"],
                                                strict=True)):
        assert theirs.any(), number  # dropout did drop something
        assert torch.equal(ours, theirs), f"dropout {number} zeroed other elements"
    torch.testing.assert_close(losses["sharded"], losses["dense"], rtol=1e-12, atol=1e-12)
    for (name, p), (_, q) in zip(sharded.named_parameters(), dense.named_parameters(),
                                 strict=True):
        value = p.detach().full_tensor() if isinstance(p, ShardedTensor) else p.detach()
        torch.testing.assert_close(value, q.detach(), rtol=1e-10, atol=1e-10, msg=name)


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


# -- property test: random ops under dense_equivalent() on drawn layouts ---------------

RANDOM_OPS: dict[str, Any] = {
    "dropout": lambda t: F.dropout(t, 0.3, training=True),
    "bernoulli_": lambda t: t.clone().bernoulli_(0.4),
    "rand_like": torch.rand_like,
    "randn_like": torch.randn_like,
    "normal_": lambda t: t.clone().normal_(1.0, 2.0),
    "uniform_": lambda t: t.clone().uniform_(-2, 3),
    "exponential_": lambda t: t.clone().exponential_(1.5),
    "log_normal_": lambda t: t.clone().log_normal_(0.5, 0.3),
    "cauchy_": lambda t: t.clone().cauchy_(),
    "geometric_": lambda t: t.clone().geometric_(0.3),
    "random_": lambda t: t.clone().random_(0, 10),
    # the draws that make a new tensor (ops/random_ops.py)
    "randint_like": lambda t: torch.randint_like(t, -3, 9),
    "bernoulli(p)": lambda t: t.bernoulli(0.3),
    "poisson": lambda t: torch.poisson(t.abs()),
    "rrelu": lambda t: F.rrelu(t, training=True),
    "_standard_gamma": lambda t: torch._standard_gamma(t.abs() + 0.5),
    "binomial": lambda t: torch.binomial(t.abs().round(), torch.full_like(t, 0.3)),
}

# Draws on a positive [7, 5] matrix: the ops above and those whose draws read whole rows.
NEW_TENSOR_DRAWS: dict[str, Any] = {
    **{name: RANDOM_OPS[name] for name in ("randint_like", "bernoulli(p)", "poisson", "rrelu",
                                           "_standard_gamma", "binomial")},
    "rrelu of negatives": lambda t: F.rrelu(t - 1.0, 0.1, 0.4, training=True),
    "multinomial": lambda t: torch.multinomial(t, 3),
    "multinomial, replacement": lambda t: torch.multinomial(t, 9, replacement=True),
    "_sample_dirichlet": torch._sample_dirichlet,
}


@multi_rank(world_size=[2, 3])
def test_new_tensor_draws_give_the_dense_values(rank: int, world_size: int) -> None:
    """randint_like, bernoulli(p), poisson, rrelu, multinomial...: inside dense_equivalent()
    the dense values on every layout (and the dense gradient of rrelu)."""
    torch.manual_seed(0)
    dense = torch.rand(7, 5, dtype=torch.float64) + 0.1
    for name, spec in _layouts(world_size).items():
        for what, draw in NEW_TENSOR_DRAWS.items():
            x = ShardedTensor.from_replicated(dense, spec)
            with ds.random.dense_equivalent():
                torch.manual_seed(11)
                ours = draw(x)
                again = draw(x)
            torch.manual_seed(11)
            theirs = draw(dense)
            _same(ours, theirs, f"{what} on {name}")
            _same(again, draw(dense), f"second {what} on {name}")
        leaf = ShardedTensor.from_replicated(dense - 0.5, spec).requires_grad_()
        reference = (dense - 0.5).requires_grad_()
        with ds.random.dense_equivalent():
            torch.manual_seed(5)
            (F.rrelu(leaf, training=True) * 3).sum().backward()
        torch.manual_seed(5)
        (F.rrelu(reference, training=True) * 3).sum().backward()
        _same(leaf.grad, reference.grad, f"rrelu's gradient on {name}")


@multi_rank(world_size=[3])
def test_new_tensor_draws_outside_the_context(rank: int, world_size: int) -> None:
    """Without dense_equivalent(): a replicated result is one draw, the same on every rank;
    an elementwise draw on sharded blocks needs no collective; the values are valid."""
    torch.manual_seed(rank)  # the ranks' generators differ
    dense = torch.rand(7, 5) + 0.1
    replicated = ShardedTensor.from_replicated(dense, ds.Replicate())
    for what, draw in NEW_TENSOR_DRAWS.items():
        local = draw(replicated).local_tensor()
        copies = [torch.empty_like(local) for _ in range(world_size)]
        torch.distributed.all_gather(copies, local)
        assert all(torch.equal(c, copies[0]) for c in copies), what
    sharded = ShardedTensor.from_replicated(dense, rows(world_size))
    with ds.count_collectives() as counted:
        ints = torch.randint_like(sharded, 2, 6)
        coins = sharded.bernoulli(0.5)
        counts = torch.poisson(sharded * 4)
    assert counted.counts == {}
    value = ints.full_tensor()
    assert value.dtype == dense.dtype and ((value >= 2) & (value < 6)).all()
    assert (value == value.round()).all()
    assert set(coins.full_tensor().unique().tolist()) <= {0.0, 1.0}
    assert (counts.full_tensor() >= 0).all()
    rows_ = torch.multinomial(ShardedTensor.from_replicated(dense, rows(world_size)), 2)
    picked = rows_.full_tensor()
    assert picked.shape == (7, 2) and picked.dtype == torch.int64
    assert all(len(set(r)) == 2 for r in picked.tolist())  # without replacement


def _random_program(rank: int, world_size: int, shape: tuple[int, ...], layout: tuple[Any, ...],
                    op: str, seed: int) -> str | None:
    """The drawn program on one rank: None when it equals dense, else what differs."""
    torch.manual_seed(seed)
    dense = torch.randn(shape, dtype=torch.float64)
    if layout[0] == "partial":  # integer summands: their sum is dense to the bit
        dense = dense.round()
        summand = dense if rank == 0 else torch.zeros_like(dense)
        x = ShardedTensor.from_local_tensor(summand.clone(), ds.Partial(), *shape)
    elif layout[0] == "chunk":
        x = ShardedTensor.from_replicated(
            dense, ds.ChunkShardingSpec(layout[1], [f"rank:{r}/cpu" for r in layout[2]]))
    else:
        x = ShardedTensor.from_replicated(dense, ds.Replicate())
    with ds.random.dense_equivalent():
        torch.manual_seed(seed + 1)
        ours = RANDOM_OPS[op](x)
        next_ours = torch.rand(3)  # the generator advanced as the dense one does
    torch.manual_seed(seed + 1)
    theirs = RANDOM_OPS[op](dense)
    next_theirs = torch.rand(3)
    value = ours.full_tensor()
    if not torch.equal(value, theirs):
        return f"{op} on {layout}: values differ from dense"
    if not torch.equal(next_ours, next_theirs):
        return f"{op} on {layout}: the generator advanced differently"
    return None


@st.composite
def _random_programs(draw: st.DrawFn) -> dict[str, Any]:
    world_size = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
    kind = draw(st.sampled_from(["chunk", "chunk", "replicate", "partial"]))
    layout: tuple[Any, ...] = (kind,)
    if kind == "chunk":
        ranks = draw(st.lists(st.integers(0, world_size - 1), min_size=1,
                              max_size=2 * world_size))
        layout = ("chunk", draw(st.integers(0, len(shape) - 1)), tuple(ranks))
    return {"world_size": world_size, "shape": shape, "layout": layout,
            "op": draw(st.sampled_from(sorted(RANDOM_OPS))), "seed": draw(st.integers(0, 999))}


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(program=_random_programs())
def test_random_ops_under_dense_equivalent_on_drawn_layouts(program: dict[str, Any]) -> None:
    """Hypothesis draws a shape (empty dims too), a layout (chunks along any dim over a
    rank list with repeats, replicated, partial), a random op and a seed: inside
    dense_equivalent() the values equal dense's to the bit, and so does the next draw."""
    world_size = program.pop("world_size")
    verdicts = get_pool(world_size).run(_random_program, timeout_s=60, **program)
    assert verdicts == [None] * world_size, verdicts
