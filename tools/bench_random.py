"""The cost of ``dispatch_shard.random.dense_equivalent()``: dropout on a sharded activation.

A ``[ROWS, COLS]`` float32 activation chunked along dim 0 (the batch), at worlds 2 and 4
on the gloo rank pool. Three ways to draw a dropout of it, timed in alternating rounds in
one run (the slowest rank's time; ratios are medians of per-round ratios):

- ``per_rank``: the default: each rank draws its own block (cheap, not dense's values);
- ``dense_equivalent``: every rank draws the whole tensor, as the dense op does, and
  keeps its block (dense's values at any world size);
- ``dense``: plain ``F.dropout`` of the whole tensor on one rank, for scale.

Drawing the whole tensor costs O(whole) per rank however many ranks share it: CPU
generators (mt19937) cannot skip ahead, so the draw cannot be limited to a rank's range.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROWS, COLS = 2048, 1024
ROUNDS = 15
P = 0.1


def _figures(rank: int, world_size: int) -> dict[str, float]:
    import dispatch_shard as ds

    torch.manual_seed(0)
    dense = torch.randn(ROWS, COLS)
    spec = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])
    x = ds.ShardedTensor.from_replicated(dense, spec)

    def per_rank() -> Any:
        return F.dropout(x, P, training=True)

    def dense_equivalent() -> Any:
        with ds.random.dense_equivalent():
            return F.dropout(x, P, training=True)

    def whole() -> Any:
        return F.dropout(dense, P, training=True)

    ways = {"per_rank": per_rank, "dense_equivalent": dense_equivalent, "dense": whole}
    for way in ways.values():  # warm
        way()
    times: dict[str, list[float]] = {label: [] for label in ways}
    for i in range(ROUNDS):
        order = list(ways) if i % 2 == 0 else list(ways)[::-1]
        for label in order:
            torch.manual_seed(i)
            dist.barrier()
            start = time.perf_counter()
            ways[label]()
            dist.barrier()
            times[label].append(time.perf_counter() - start)
    figures = {f"{label}_ms": statistics.median(t) * 1e3 for label, t in times.items()}
    figures["vs_per_rank"] = statistics.median(
        e / p for e, p in zip(times["dense_equivalent"], times["per_rank"], strict=True))
    figures["vs_dense"] = statistics.median(
        e / d for e, d in zip(times["dense_equivalent"], times["dense"], strict=True))
    # dense's values, to the bit (the point of paying for it)
    torch.manual_seed(7)
    with ds.random.dense_equivalent():
        ours = F.dropout(x, P, training=True).full_tensor()
    torch.manual_seed(7)
    figures["equal_to_dense"] = float(torch.equal(ours, F.dropout(dense, P, training=True)))
    return figures


def figures(world_size: int) -> dict[str, float]:
    """The figures on the rank pool (times of the slowest rank)."""
    from dispatch_shard.testing import get_pool, shutdown_pools

    try:
        results = get_pool(world_size).run(_figures, timeout_s=600)
    finally:
        shutdown_pools()
    first = dict(results[0])
    for key in first:
        if key.endswith("_ms") or key.startswith("vs_"):
            first[key] = max(r[key] for r in results)
        if key == "equal_to_dense":
            first[key] = min(r[key] for r in results)
    return first


if __name__ == "__main__":
    for world in (2, 4):
        print(world, figures(world))
