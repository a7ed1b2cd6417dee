"""Layouts and sharded copies of dense tensors, shared by the multi-rank tests."""

from __future__ import annotations

from typing import Any

import torch

import dispatch_shard as ds


def rows(world_size: int) -> ds.ChunkShardingSpec:
    return ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])


def cols(world_size: int) -> ds.ChunkShardingSpec:
    return ds.ChunkShardingSpec(1, [f"rank:{r}/cpu" for r in range(world_size)])


def several(world_size: int, dim: int = 0) -> ds.ChunkShardingSpec:
    """Two blocks per rank, in a shuffled rank order."""
    order = [(3 * i + 1) % world_size for i in range(2 * world_size)] if world_size > 1 \
        else [0, 0]
    return ds.ChunkShardingSpec(dim, [f"rank:{r}/cpu" for r in order])


def grid(size: tuple[int, int], world_size: int) -> ds.EnumerableShardingSpec:
    """A 2x2 grid of uneven blocks over ranks ``i % world_size``."""
    top, left = size[0] // 2 + 1, size[1] // 3 + 1
    blocks = [((0, 0), (top, left)), ((0, left), (top, size[1] - left)),
              ((top, 0), (size[0] - top, left)), ((top, left), (size[0] - top, size[1] - left))]
    return ds.EnumerableShardingSpec([
        ds.ShardMetadata(list(offsets), list(sizes), f"rank:{i % world_size}/cpu")
        for i, (offsets, sizes) in enumerate(blocks)
    ])


def specs_2d(size: tuple[int, int], world_size: int) -> dict[str, ds.ShardingSpec]:
    return {"rows": rows(world_size), "cols": cols(world_size), "several": several(world_size),
            "grid": grid(size, world_size), "replicate": ds.Replicate()}


def shard(dense: torch.Tensor, spec: ds.ShardingSpec, requires_grad: bool = False
          ) -> ds.ShardedTensor:
    """A ShardedTensor holding (copies of) ``dense``'s blocks under ``spec``; no communication
    beyond from_local_shards' metadata check."""
    rank = torch.distributed.get_rank()
    if isinstance(spec, ds.Replicate):
        result = ds.ShardedTensor.from_local_tensor(dense.clone(), spec, *dense.shape)
    else:
        blank = ds.empty(spec, *dense.shape, dtype=dense.dtype)
        layout = blank._layout
        shards = [ds.Shard(dense[layout.shard_box(i)].clone(), layout.shards[i])
                  for i in layout.local_indices(rank)]
        result = ds.ShardedTensor.from_local_shards(shards, *dense.shape)
    return result.requires_grad_(True) if requires_grad else result


def whole(value: Any) -> Any:
    """The dense value of a ShardedTensor result, or of each in a tuple of them."""
    if isinstance(value, tuple):
        return tuple(whole(v) for v in value)
    assert isinstance(value, ds.ShardedTensor), type(value)
    return value.full_tensor()


def train_side_by_side(dense: Any, sharded: Any, steps: int, shape: tuple[int, int],
                       seed: int, around_loss: Any = None) -> None:
    """``steps`` AdamW steps of an MSE loss on the same float64 batches for both models;
    ``around_loss(step)`` (a context manager factory) wraps each loss and backward."""
    import contextlib

    import torch.nn.functional as F

    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (dense, sharded)]
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x, y = (torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in range(2))
        for model, optimizer in zip((dense, sharded), optimizers, strict=True):
            optimizer.zero_grad()
            with around_loss(step) if around_loss else contextlib.nullcontext():
                F.mse_loss(model(x), y).backward()
            optimizer.step()


def outcome(call: Any) -> tuple[str, str]:
    """``call()``'s exception as (type name, message), or ("ok", "")."""
    try:
        call()
    except Exception as error:
        return type(error).__name__, str(error)
    return "ok", ""


def assert_raised_alike(outcomes: list[tuple[str, str]], kind: str, pattern: str) -> None:
    """Every rank's outcome is a ``kind`` error whose message matches ``pattern``."""
    import re

    for rank, (got, message) in enumerate(outcomes):
        assert got == kind and re.search(pattern, message), (rank, got, message)
