"""torch.optim on ShardedTensor parameters: for-loop, foreach and fused kernels against dense."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from layouts import rows, shard, specs_2d
from torch.optim.optimizer import register_optimizer_step_pre_hook

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


@multi_rank(world_size=[2])
def test_default_step_takes_the_foreach_path_on_cpu(rank: int, world_size: int) -> None:
    """NOTE [optimizers take their foreach path]: torch's default on CPU is the for-loop
    (about nine dispatches per parameter); a group of ShardedTensors left to the default
    takes the fused kernel for the step (Adam, AdamW) or the foreach path (others), and
    reads ``fused=None`` / ``foreach=None`` again after it; a group with a plain tensor,
    or an explicit choice, is left alone."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*SIZE, generator=generator)
    sharded = [shard(weight, rows(world_size), requires_grad=True)]
    dense = [weight.clone().requires_grad_()]
    plain = [torch.randn(7, requires_grad=True)]
    sharded_opt = torch.optim.AdamW([{"params": sharded}, {"params": plain}], lr=0.1)
    explicit = torch.optim.AdamW([shard(weight, rows(world_size), requires_grad=True)],
                                 lr=0.1, foreach=False)
    dense_opt = torch.optim.AdamW(dense, lr=0.1)
    sgd_params = [shard(weight, rows(world_size), requires_grad=True)]
    sgd = torch.optim.SGD(sgd_params, lr=0.1, momentum=0.9)
    dense_sgd_params = [weight.clone().requires_grad_()]
    dense_sgd = torch.optim.SGD(dense_sgd_params, lr=0.1, momentum=0.9)
    seen: list[Any] = []

    def spy(optimizer: Any, args: Any, kwargs: Any) -> None:
        seen.append([(group["foreach"], group["fused"]) for group in optimizer.param_groups])

    handle = register_optimizer_step_pre_hook(spy)
    try:
        for step in range(3):
            grad = _grads(step)[0]
            sharded[0].grad = shard(grad, rows(world_size))
            plain[0].grad = torch.ones(7)
            dense[0].grad = grad.clone()
            explicit.param_groups[0]["params"][0].grad = shard(grad, rows(world_size))
            sgd_params[0].grad = shard(grad, rows(world_size))
            dense_sgd_params[0].grad = grad.clone()
            sharded_opt.step()
            explicit.step()
            dense_opt.step()
            sgd.step()
            dense_sgd.step()
    finally:
        handle.remove()
    # (AdamW: sharded and plain groups, explicit, dense; SGD: sharded, dense)
    assert seen == [[(None, True), (None, None)], [(False, None)], [(None, None)],
                    [(True, None)], [(None, None)]] * 3
    assert [(group["foreach"], group["fused"]) for group in sharded_opt.param_groups] == \
        [(None, None), (None, None)]
    torch.testing.assert_close(sharded[0].detach().full_tensor(), dense[0].detach())
    torch.testing.assert_close(sgd_params[0].detach().full_tensor(), dense_sgd_params[0].detach())


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


@multi_rank(world_size=[3])
@pytest.mark.parametrize("mode", ["for_loop", "foreach"])
def test_optimizer_over_parameters_of_different_groups(rank: int, world_size: int,
                                                       mode: str) -> None:
    """One optimizer over a parameter sharded on every rank and one on a subgroup (as
    2-D parallelism makes): elements of a foreach list may live on different groups,
    since nothing communicates between them; each matches its dense twin."""
    import torch.distributed as dist

    pair = dist.new_group([0, 1])
    generator = torch.Generator().manual_seed(4)
    weights = [torch.randn(*SIZE, generator=generator), torch.randn(5, 3, generator=generator)]
    sharded = [shard(weights[0], rows(world_size), requires_grad=True),
               ds.ShardedTensor.from_replicated(
                   weights[1], ds.ChunkShardingSpec(0, ["rank:0/cpu", "rank:1/cpu"]),
                   process_group=pair).requires_grad_()]
    dense = [w.clone().requires_grad_() for w in weights]
    sharded_opt = torch.optim.Adam(sharded, lr=0.1, **MODES[mode])
    dense_opt = torch.optim.Adam(dense, lr=0.1, **MODES[mode])
    for step in range(2):
        generator = torch.Generator().manual_seed(10 + step)
        grads = [torch.randn(*SIZE, generator=generator), torch.randn(5, 3, generator=generator)]
        sharded[0].grad = shard(grads[0], rows(world_size))
        sharded[1].grad = ds.ShardedTensor.from_replicated(
            grads[1], ds.ChunkShardingSpec(0, ["rank:0/cpu", "rank:1/cpu"]), process_group=pair)
        for p, g in zip(dense, grads, strict=True):
            p.grad = g
        sharded_opt.step()
        dense_opt.step()
    torch.testing.assert_close(sharded[0].detach().full_tensor(), dense[0].detach())
    if rank in (0, 1):
        torch.testing.assert_close(sharded[1].detach().full_tensor(), dense[1].detach())
    else:
        assert sharded[1].local_shards() == []  # rank 2 holds none of the pair's tensor
    dist.destroy_process_group(pair)


@multi_rank(world_size=[2])
def test_foreach_when_a_rank_holds_no_block(rank: int, world_size: int) -> None:
    """A one-row tensor chunked over two ranks: rank 1 holds no element of it (no block
    or an empty one), and the kernel (which refuses empty lists) must not fail there."""
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(1, 3, generator=generator), torch.randn(1, 3, generator=generator)
    spec = rows(world_size)
    target = shard(x, spec)
    assert sum(s.tensor.numel() for s in target.local_shards()) == (3 if rank == 0 else 0)
    torch._foreach_add_([target], [shard(y, spec)], alpha=0.5)
    torch.testing.assert_close(target.full_tensor(), x + 0.5 * y)
    outs = torch._foreach_mul([target], 2.0)
    assert isinstance(outs[0], ds.ShardedTensor) and outs[0]._layout is target._layout
    torch.testing.assert_close(outs[0].full_tensor(), (x + 0.5 * y) * 2.0)
    outs = torch._foreach_sqrt([shard(x.abs(), spec)])
    torch.testing.assert_close(outs[0].full_tensor(), x.abs().sqrt())


@multi_rank(world_size=[2, 3])
def test_foreach_fast_path_results_keep_layout_and_dtype(rank: int, world_size: int) -> None:
    """Out-of-place foreach results on the one-block-per-tensor fast path and on the
    several-blocks path: the operands' layout, the kernel's dtype, dense values."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(*SIZE, generator=generator)
    ints = torch.randint(-5, 5, SIZE, generator=generator)
    for spec in specs_2d(SIZE, world_size).values():
        a, b = shard(x, spec), shard(ints, spec)
        sums = torch._foreach_add([a, b], [a, b])
        for out, dense, source in zip(sums, [x + x, ints + ints], [a, b], strict=True):
            assert isinstance(out, ds.ShardedTensor) and out._layout is source._layout
            assert out.dtype == dense.dtype
            torch.testing.assert_close(out.full_tensor(), dense)
        halves = torch._foreach_div([b], 2)  # int / int: true division, float result
        assert halves[0].dtype == torch.float32
        torch.testing.assert_close(halves[0].full_tensor(), ints / 2)
        lerped = torch._foreach_lerp([a], [shard(x * 2, spec)], 0.25)
        torch.testing.assert_close(lerped[0].full_tensor(), torch.lerp(x, x * 2, 0.25))


@multi_rank(world_size=[3])
@pytest.mark.parametrize("name", ["adamw", "adam_amsgrad", "sgd_momentum"])
def test_fused_steps_of_all_sharded_parameters_match_dense(rank: int, world_size: int,
                                                           name: str) -> None:
    """Every parameter a ShardedTensor, one layout each (uneven rows over 3 ranks, columns,
    two blocks per rank, a grid, replicated): the fused step's fast path (one contiguous
    block per tensor) and its general path (several blocks) both give dense's values."""
    cls, options = OPTIMIZERS[name]
    generator = torch.Generator().manual_seed(1)
    for spec in specs_2d(SIZE, world_size).values():
        values = [torch.randn(*SIZE, generator=generator) for _ in range(2)]
        dense = [v.clone().requires_grad_() for v in values]
        sharded = [shard(v, spec, requires_grad=True) for v in values]
        dense_opt = cls(dense, **options, fused=True)
        sharded_opt = cls(sharded, **options, fused=True)
        for _ in range(3):
            grads = [torch.randn(*SIZE, generator=generator) for _ in range(2)]
            for p, q, g in zip(dense, sharded, grads, strict=True):
                p.grad = g.clone()
                q.grad = shard(g, spec)
            dense_opt.step()
            sharded_opt.step()
        for p, q in zip(dense, sharded, strict=True):
            torch.testing.assert_close(q.detach().full_tensor(), p.detach())
