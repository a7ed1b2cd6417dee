"""The GPU tier: CUDA blocks, NCCL, and gloo with CUDA tensors (``tools/gpu_check.sh``).

Every test here is marked ``cuda`` and skipped where no CUDA device is present. One
GPU cannot host several NCCL ranks, so NCCL runs at world 1 (one rank, real NCCL
communicators) and multi-rank coverage on one GPU uses gloo, which reduces CUDA
tensors itself (``all_reduce``, ``broadcast``); the CPU tiers cover every layout on
several ranks.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

import dispatch_shard as ds
from dispatch_shard import ShardedTensor
from dispatch_shard.examples import MLP, TRANSFORMER_PLAN, TransformerBlock, parallelize
from dispatch_shard.testing import multi_rank

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cuda_spec(dim: int, world_size: int) -> ds.ChunkShardingSpec:
    return ds.ChunkShardingSpec(dim, [f"rank:{r}/cuda:0" for r in range(world_size)])


@multi_rank(world_size=[1], backend="nccl")
def test_cuda_blocks_on_nccl(rank: int, world_size: int) -> None:
    dense = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).cuda()
    weight = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).cuda()
    x = ds.shard_tensor(dense, _cuda_spec(0, world_size))
    assert x.device.type == "cuda" and x.local_tensor().device.type == "cuda"
    w = ds.shard_tensor(weight, _cuda_spec(0, world_size))
    torch.testing.assert_close((x @ w).full_tensor(), dense @ weight)
    torch.testing.assert_close((x.relu() * 2 + 1).sum().item(),
                               (dense.relu() * 2 + 1).sum().item())
    created = ds.ones(_cuda_spec(1, world_size), 3, 8)
    assert created.local_tensor().is_cuda
    assert created.full_tensor().sum().item() == 24


def _parity(model: torch.nn.Module, plan: dict[str, str], x: torch.Tensor, y: torch.Tensor,
            world_size: int, steps: int = 4) -> None:
    """Sharded vs dense on CUDA, both against a float64 copy (see the Adam note)."""
    reference = copy.deepcopy(model).double()
    dense = model
    sharded = parallelize(copy.deepcopy(model), plan, world_size, "cuda:0")
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2)
                  for m in (dense, sharded, reference)]
    for _ in range(steps):
        for m, opt in zip((dense, sharded, reference), optimizers, strict=True):
            opt.zero_grad()
            inputs, target = (x.double(), y.double()) if m is reference else (x, y)
            F.mse_loss(m(inputs), target).backward()
            opt.step()
    for (name, p), (_, q), (_, r) in zip(sharded.named_parameters(), dense.named_parameters(),
                                         reference.named_parameters(), strict=True):
        value = p.detach().full_tensor() if isinstance(p, ShardedTensor) else p.detach()
        assert value.is_cuda, name
        sharded_error = (value.double() - r.detach()).abs().max().item()
        dense_error = (q.detach().double() - r.detach()).abs().max().item()
        assert sharded_error <= max(2 * dense_error, 1e-5), (name, sharded_error, dense_error)


@multi_rank(world_size=[1], backend="nccl")
def test_mlp_training_parity_on_cuda(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 8, generator=generator).cuda(), torch.randn(6, 8, generator=generator)
    _parity(MLP(8, 16).cuda(), {"fc1": "colwise", "fc2": "rowwise"}, x, y.cuda(), world_size)


@multi_rank(world_size=[1], backend="nccl")
def test_transformer_training_parity_on_cuda(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, generator=generator).cuda()
    y = torch.randn(2, 5, 8, generator=generator).cuda()
    _parity(TransformerBlock(8, 4, 16).cuda(), TRANSFORMER_PLAN, x, y, world_size)


@multi_rank(world_size=[1], backend="nccl")
def test_embedding_bag_model_on_cuda(rank: int, world_size: int) -> None:
    """The demo's model (EmbeddingBag rows split, two transformer blocks) on CUDA + NCCL."""
    from dispatch_shard import demo

    args = argparse.Namespace(backend="nccl", steps=5, width=16, ranks=world_size)
    deviation = demo._run(rank, world_size, args)
    assert deviation <= 1e-5, deviation


@multi_rank(world_size=[1], backend="nccl")
def test_dcp_save_load_of_cuda_blocks(rank: int, world_size: int, tmp_path: Path) -> None:
    dense = torch.arange(24.0).reshape(6, 4).cuda()
    saved = ds.shard_tensor(dense, _cuda_spec(0, world_size))
    dcp.save({"w": saved}, checkpoint_id=str(tmp_path / "ckpt"))
    loaded = ds.zeros(_cuda_spec(1, world_size), 6, 4)
    dcp.load({"w": loaded}, checkpoint_id=str(tmp_path / "ckpt"))
    assert loaded.local_tensor().is_cuda
    torch.testing.assert_close(loaded.full_tensor(), dense)


@multi_rank(world_size=[2])
def test_gloo_with_cuda_blocks(rank: int, world_size: int) -> None:
    """Two gloo ranks share the one GPU; a row-parallel matmul's partial result is
    all-reduced by gloo on CUDA tensors."""
    torch.cuda.set_device(0)
    generator = torch.Generator().manual_seed(3)
    dense, weight = torch.randn(4, 6, generator=generator), torch.randn(6, 3, generator=generator)
    x = ShardedTensor.from_replicated(dense.cuda(), _cuda_spec(1, world_size))
    w = ShardedTensor.from_replicated(weight.cuda(), _cuda_spec(0, world_size))
    product = x @ w  # partial: each rank holds a summand on its GPU block
    torch.testing.assert_close(product.full_tensor().cpu(), dense @ weight)
    torch.testing.assert_close(product.sum().item(), (dense @ weight).sum().item())
