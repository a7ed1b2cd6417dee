"""Training parity: models with sharded parameters, plain torch.optim, dense numbers.

Each test trains a sharded model and a dense copy on the same data and checks
every parameter after every step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from layouts import cols, rows, shard
from torch import nn

import dispatch_shard as ds
from dispatch_shard import collectives
from dispatch_shard.examples import MLP, TRANSFORMER_PLAN, TransformerBlock, parallelize
from dispatch_shard.testing import multi_rank

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
}
MODES = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


MLP_PLAN = {"fc1": "colwise", "fc2": "rowwise"}


def megatron(model: MLP, world_size: int) -> MLP:
    """fc1 column-parallel (weight rows and bias split), fc2 row-parallel (weight columns
    split, bias replicated)."""
    return parallelize(copy.deepcopy(model), MLP_PLAN, world_size)  # type: ignore[return-value]


def _batch(step: int, rows_: int = 6, d_model: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)  # the same on every rank
    return (torch.randn(rows_, d_model, generator=generator),
            torch.randn(rows_, d_model, generator=generator))


def _assert_same_parameters(sharded: nn.Module, dense: nn.Module, step: int) -> None:
    for (name, p), (_, q) in zip(sharded.named_parameters(), dense.named_parameters(),
                                 strict=True):
        value = p.detach().full_tensor() if isinstance(p, ds.ShardedTensor) else p.detach()
        torch.testing.assert_close(value, q.detach(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, n=name: f"step {step}, {n}: {m}")


def _train(sharded: nn.Module, dense: nn.Module, make_optimizer: Callable[..., Any],
           steps: int, clip: str | None = None,
           loss_fn: Callable[[nn.Module, int], torch.Tensor] | None = None,
           dense_loss_fn: Callable[[nn.Module, int], torch.Tensor] | None = None) -> None:
    sharded_opt, dense_opt = make_optimizer(sharded.parameters()), make_optimizer(
        dense.parameters())

    def default_loss(model: nn.Module, step: int) -> torch.Tensor:
        x, y = _batch(step)
        return F.mse_loss(model(x), y)

    for step in range(steps):
        for model, opt, fn in ((sharded, sharded_opt, loss_fn or default_loss),
                               (dense, dense_opt, dense_loss_fn or loss_fn or default_loss)):
            opt.zero_grad(set_to_none=step % 2 == 0)
            fn(model, step).backward()
            if clip == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
            elif clip == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=0.05)
            opt.step()
        for p in sharded.parameters():
            assert p.grad is None or p.grad._layout is p._layout  # grads keep the sharding
        _assert_same_parameters(sharded, dense, step)


@multi_rank(world_size=[2, 4], timeout_s=120)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_megatron_mlp_trains_like_dense(rank: int, world_size: int, name: str,
                                        mode: str) -> None:
    torch.manual_seed(0)
    dense = MLP()
    sharded = megatron(dense, world_size)
    cls, options = OPTIMIZERS[name]
    _train(sharded, dense, lambda params: cls(params, **options, **MODES[mode]), steps=10)


@multi_rank(world_size=[2, 4], timeout_s=120)
@pytest.mark.parametrize("clip", ["norm", "value"])
def test_gradient_clipping_matches_dense(rank: int, world_size: int, clip: str) -> None:
    torch.manual_seed(1)
    dense = MLP()
    sharded = megatron(dense, world_size)
    for mode in MODES.values():
        model_a, model_b = copy.deepcopy(sharded), copy.deepcopy(dense)
        _train(model_a, model_b, lambda params, m=mode: torch.optim.AdamW(params, lr=0.05, **m),
               steps=5, clip=clip)


@multi_rank(world_size=[4])
def test_megatron_mlp_forward_issues_one_all_reduce(rank: int, world_size: int) -> None:
    torch.manual_seed(2)
    dense = MLP()
    sharded = megatron(dense, world_size)
    issued: list[str] = []

    def observe(kind: str, nbytes: int, group: Any) -> None:
        issued.append(kind)

    x, y = _batch(0)
    collectives._observers.append(observe)
    try:
        out = sharded(x)
        forward = list(issued)
        loss = F.mse_loss(out, y)
        through_loss = list(issued)
        issued.clear()
        loss.backward()
        backward = list(issued)
    finally:
        collectives._observers.remove(observe)
    # Column-parallel fc1: none. Row-parallel fc2: a Partial output (bias on one
    # summand), reduced by one all-reduce where the loss consumes it.
    assert forward == [], forward
    assert out.sharding_spec() == ds.Partial()
    assert through_loss == ["all_reduce"], through_loss
    assert backward == [], backward  # grads stay sharded like their parameters
    torch.testing.assert_close(out.full_tensor(), dense(x))


@multi_rank(world_size=[3])
def test_a_partial_is_reduced_once_and_never_stale(rank: int, world_size: int) -> None:
    dense = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    partial = shard(dense, rows(world_size)).redistribute(ds.Partial())
    issued: list[str] = []

    def observe(kind: str, nbytes: int, group: Any) -> None:
        issued.append(kind)

    collectives._observers.append(observe)
    try:
        torch.testing.assert_close(partial.full_tensor(), dense)
        torch.testing.assert_close((partial + 1).full_tensor(), dense + 1)
        assert issued == ["all_reduce"]  # the second consumer reuses the reduction
        partial._local_tensors[0].mul_(2)  # an in-place change of the summand ...
        torch.testing.assert_close(partial.full_tensor(), dense * 2)  # ... is seen
        assert issued == ["all_reduce", "all_reduce"]
    finally:
        collectives._observers.remove(observe)


def sharded_block(block: TransformerBlock, world_size: int) -> TransformerBlock:
    """q/k/v column-parallel (each rank holds whole heads), o row-parallel, the MLP
    Megatron-style, layer norms replicated."""
    return parallelize(copy.deepcopy(block), TRANSFORMER_PLAN, world_size)  # type: ignore[return-value]


@multi_rank(world_size=[2, 4], timeout_s=180)
# The foreach mode (torch's default) in the quick tier; the for-loop and fused ones in all.
@pytest.mark.parametrize("mode", [m if m == "foreach" else pytest.param(m, marks=pytest.mark.slow)
                                  for m in MODES])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_transformer_block_trains_like_dense(rank: int, world_size: int, name: str,
                                             mode: str) -> None:
    torch.manual_seed(3)
    dense = TransformerBlock()
    sharded = sharded_block(dense, world_size)

    def loss(model: nn.Module, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(2000 + step)
        x = torch.randn(2, 5, 8, generator=generator)
        return F.mse_loss(model(x), torch.randn(2, 5, 8, generator=generator))

    cls, options = OPTIMIZERS[name]
    _train(sharded, dense, lambda params: cls(params, **options, **MODES[mode]),
           steps=10, loss_fn=loss)


class BagCollection(nn.Module):
    """TorchRec-style: two pooled embedding tables feeding a dense over-arch."""

    def __init__(self) -> None:
        super().__init__()
        self.user = nn.EmbeddingBag(13, 4, mode="sum")
        self.item = nn.EmbeddingBag(9, 6, mode="mean")
        self.over = nn.Linear(10, 3)

    def forward(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        user_ids, user_offsets, item_ids, item_offsets = batch
        pooled = torch.cat([self.user(user_ids, user_offsets),
                            self.item(item_ids, item_offsets)], 1)
        return self.over(pooled)  # type: ignore[no-any-return]


def _bag_batch(step: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    generator = torch.Generator().manual_seed(3000 + step)
    user_ids = torch.randint(0, 13, (9,), generator=generator)
    item_ids = torch.randint(0, 9, (7,), generator=generator)
    batch = (user_ids, torch.tensor([0, 2, 2, 6]), item_ids, torch.tensor([0, 3, 4, 5]))
    return batch, torch.randint(0, 3, (4,), generator=generator)


@multi_rank(world_size=[2, 4], timeout_s=180)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_embedding_bag_collection_trains_like_dense(rank: int, world_size: int, name: str,
                                                    mode: str) -> None:
    """Half the tables row-wise (user), half column-wise (item), the over-arch replicated."""
    torch.manual_seed(4)
    dense = BagCollection()
    sharded = copy.deepcopy(dense)
    for table, spec in ((sharded.user, rows(world_size)), (sharded.item, cols(world_size))):
        table.weight = nn.Parameter(ds.ShardedTensor.from_replicated(table.weight.detach(), spec))
    parallelize(sharded, {"over": "replicate"}, world_size)

    def loss(model: nn.Module, step: int) -> torch.Tensor:
        batch, labels = _bag_batch(step)
        return F.cross_entropy(model(batch), labels)

    cls, options = OPTIMIZERS[name]
    _train(sharded, dense, lambda params: cls(params, **options, **MODES[mode]),
           steps=10, loss_fn=loss)
