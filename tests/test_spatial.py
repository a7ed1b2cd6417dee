"""Convolution and pooling on batches split across ranks, forward and backward, vs dense."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from layouts import several
from torch import nn

import dispatch_shard as ds
from dispatch_shard.testing import multi_rank


def _spec(dim: int, world_size: int) -> ds.ChunkShardingSpec:
    return ds.ChunkShardingSpec(dim, [f"rank:{r}/cpu" for r in range(world_size)])


def _randn(*size: int, seed: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


POOLS = {
    "max_pool1d": lambda t: F.max_pool1d(t, 2),
    "max_pool2d": lambda t: F.max_pool2d(t, 3, stride=2, padding=1, ceil_mode=True),
    "avg_pool2d": lambda t: F.avg_pool2d(t, 2, count_include_pad=False),
    "max_pool3d": lambda t: F.max_pool3d(t, 2),
    "avg_pool3d": lambda t: F.avg_pool3d(t, 2),
}
SHAPES = {"max_pool1d": (5, 3, 8), "max_pool3d": (5, 2, 4, 4, 4), "avg_pool3d": (5, 2, 4, 4, 4)}


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_pooling_matches_dense(rank: int, world_size: int, dim: int, blocks: str) -> None:
    spec = _spec(dim, world_size) if blocks == "one" else several(world_size, dim)
    for name, pool in POOLS.items():
        dense = _randn(*SHAPES.get(name, (5, 3, 6, 6)), seed=1)
        leaf = ds.ShardedTensor.from_replicated(dense, spec).requires_grad_()
        with ds.count_collectives() as counted:
            out = pool(leaf)
        # The upstream gradient is made outside the count (its creation checks its args).
        upstream = ds.ShardedTensor.from_replicated(_randn(*out.shape, seed=2),
                                                    out.sharding_spec())
        with ds.count_collectives() as backward:
            out.backward(upstream)
        counted.events.extend(backward.events)
        reference = dense.clone().requires_grad_()
        expected = pool(reference)
        expected.backward(_randn(*expected.shape, seed=2))
        torch.testing.assert_close(out.full_tensor(), expected, msg=name)
        torch.testing.assert_close(leaf.grad.full_tensor(), reference.grad, msg=name)
        if dim < dense.dim() - (3 if "3d" in name else 1 if "1d" in name else 2):
            assert counted.counts == {}, (name, counted.counts)  # batch/channel blocks


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv1d(4, 2, 3, stride=2, bias=False)
        self.head = nn.Linear(2 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [N, 4, 4, 4]
        x = self.conv2(x.flatten(2))                # [N, 2, 7]
        return self.head(F.pad(x, (0, 1)).flatten(1))


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_data_parallel_cnn_trains_like_dense(rank: int, world_size: int, blocks: str) -> None:
    # The batch is split across ranks, the parameters are replicated: each rank's weight
    # gradient is its share of a sum (no collective until the optimizer needs it).
    torch.manual_seed(0)
    dense = ConvNet()
    sharded = copy.deepcopy(dense)
    for module in (sharded.conv1, sharded.conv2, sharded.head):
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(
                ds.ShardedTensor.from_replicated(param.detach(), ds.Replicate())))
    x, y = _randn(7, 3, 8, 8, seed=3), _randn(7, 3, seed=4)
    spec = _spec(0, world_size) if blocks == "one" else several(world_size)
    sx = ds.ShardedTensor.from_replicated(x, spec)
    sy = ds.ShardedTensor.from_replicated(y, spec)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (dense, sharded)]
    for _ in range(3):
        for model, optimizer, inputs, target in ((dense, optimizers[0], x, y),
                                                 (sharded, optimizers[1], sx, sy)):
            optimizer.zero_grad()
            F.mse_loss(model(inputs), target).backward()
            optimizer.step()
    for (name, p), q in zip(sharded.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p.full_tensor(), q, atol=1e-5, rtol=1e-5, msg=name)


@multi_rank(world_size=[2])
def test_spatial_errors_are_dense_errors(rank: int, world_size: int) -> None:
    x = ds.ShardedTensor.from_replicated(torch.zeros(4, 3, 5, 5), _spec(0, world_size))
    with pytest.raises(RuntimeError, match="expected input"):
        F.conv2d(x, torch.zeros(2, 4, 3, 3))  # 3 input channels, the weight wants 4
    with pytest.raises(RuntimeError, match="pad should be"):
        F.max_pool2d(x, 2, padding=3)
