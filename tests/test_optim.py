"""torch.optim on ShardedTensor parameters: for-loop, foreach and fused kernels against dense."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from layouts import rows, shard, specs_2d

import dispatch_shard as ds
from dispatch_shard.ops.foreach import foreach_overloads
from dispatch_shard.testing import multi_rank

SIZE = (10, 7)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True,
                                       "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "adam_amsgrad": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
}
MODES = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def test_foreach_family_covers_optimizer_kernels() -> None:
    names = {str(op) for op in foreach_overloads()}
    for needed in ("aten._foreach_add_.List", "aten._foreach_lerp_.Scalar",
                   "aten._foreach_addcdiv_.ScalarList", "aten._fused_adam_.default",
                   "aten._fused_adamw_.default", "aten._fused_sgd_.default"):
        assert needed in names
    assert "aten._foreach_norm.Scalar" not in names  # not elementwise: served separately


def _grads(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(*SIZE, generator=generator), torch.randn(7, generator=generator)]


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_steps_match_dense(rank: int, world_size: int, name: str, mode: str) -> None:
    cls, options = OPTIMIZERS[name]
    if mode == "fused" and name.startswith("sgd") and options.get("nesterov"):
        options = {**options}  # fused SGD supports nesterov too; kept for clarity
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*SIZE, generator=generator)
    bias = torch.randn(7, generator=generator)
    for spec in specs_2d(SIZE, world_size).values():
        dense = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
        # A sharded weight and a plain (replicated) bias in one optimizer.
        sharded = [shard(weight, spec, requires_grad=True), bias.clone().requires_grad_()]
        dense_opt = cls(dense, **options, **MODES[mode])
        sharded_opt = cls(sharded, **options, **MODES[mode])
        for step in range(3):
            grads = _grads(step)
            for p, g in zip(dense, grads, strict=True):
                p.grad = g.clone()
            sharded[0].grad = shard(grads[0], spec)
            sharded[1].grad = grads[1].clone()
            dense_opt.step()
            sharded_opt.step()
        assert isinstance(sharded[0], ds.ShardedTensor)
        assert sharded[0].sharding_spec() == shard(weight, spec).sharding_spec()
        torch.testing.assert_close(sharded[0].detach().full_tensor(), dense[0].detach())
        torch.testing.assert_close(sharded[1].detach(), dense[1].detach())
        state = sharded_opt.state[sharded[0]]
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert isinstance(value, ds.ShardedTensor), key  # state keeps the sharding
                torch.testing.assert_close(value.full_tensor(), dense_opt.state[dense[0]][key])


@multi_rank(world_size=[3])
def test_foreach_norm_matches_dense(rank: int, world_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    dense = [torch.randn(*SIZE, generator=generator), torch.randn(7, generator=generator)]
    for spec in specs_2d(SIZE, world_size).values():
        tensors = [shard(dense[0], spec), dense[1]]
        for order in (1.0, 2.0, float("inf")):
            got = torch._foreach_norm(tensors, order)
            want = torch._foreach_norm(dense, order)
            assert isinstance(got[0], ds.ShardedTensor) and got[0].dim() == 0
            torch.testing.assert_close(got[0].full_tensor(), want[0])
            torch.testing.assert_close(got[1], want[1])


@multi_rank(world_size=[2])
def test_foreach_with_mismatched_layouts_moves_data(rank: int, world_size: int) -> None:
    x = torch.randn(*SIZE, generator=torch.Generator().manual_seed(2))
    y = torch.randn(*SIZE, generator=torch.Generator().manual_seed(3))
    specs = specs_2d(SIZE, world_size)
    targets = [shard(x, specs["rows"]), shard(x, specs["cols"])]
    torch._foreach_add_(targets, [shard(y, specs["grid"]), shard(y, rows(world_size))],
                        alpha=2.0)
    for target in targets:
        torch.testing.assert_close(target.full_tensor(), x + 2.0 * y)
    outs = torch._foreach_mul([shard(x, specs["several"])], 3.0)
    assert isinstance(outs[0], ds.ShardedTensor)
    torch.testing.assert_close(outs[0].full_tensor(), x * 3.0)
