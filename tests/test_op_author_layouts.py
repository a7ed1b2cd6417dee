"""Layouts as public values: what an implementation reads (``sharding_spec()``,
``placements``, ``device_mesh``, ``local_shards()``) and derives its results from
(``with_blocks(blocks, layout=, size=)``), with public names only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Partial, Replicate, Shard

import dispatch_shard as ds
from dispatch_shard import ShardedTensor
from dispatch_shard.testing import multi_rank


def _dense(*size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _chunks(dim: int, world_size: int) -> ds.ChunkShardingSpec:
    return ds.ChunkShardingSpec(dim, [f"rank:{r}/cpu" for r in range(world_size)])


@multi_rank(world_size=[1, 3, 4])
def test_results_of_another_size(rank: int, world_size: int) -> None:
    """A reduction, a pending reduction and a transpose, each built from blocks."""
    dense = _dense(6, 7)
    x = ShardedTensor.from_replicated(dense, _chunks(1, world_size))  # column blocks
    with ds.count_collectives() as counted:
        # Row sums of column blocks: this rank's term, pending (no collective) ...
        term = sum((b.sum(1) for b in x.local_blocks()), torch.zeros(6, dtype=dense.dtype))
        pending = x.with_blocks([term], layout=ds.Partial(), size=[6])
        # ... or reduced here and replicated (the docs' full implementation).
        reduced = term.clone()
        dist.all_reduce(reduced, group=x.process_group)
        replicated = x.with_blocks([reduced], layout=ds.Replicate(), size=[6])
        # A transpose: the same chunks, along the result's dim 0.
        spec = x.sharding_spec()
        assert isinstance(spec, ds.ChunkShardingSpec)
        transposed = x.with_blocks([b.t() for b in x.local_blocks()],
                                   layout=dataclasses.replace(spec, dim=0), size=[7, 6])
    assert counted.counts == {}, counted.counts  # (the all_reduce above is our own)
    assert pending.sharding_spec() == ds.Partial() and pending.shape == (6,)
    torch.testing.assert_close(pending.full_tensor(), dense.sum(1))
    torch.testing.assert_close(replicated.full_tensor(), dense.sum(1))
    torch.testing.assert_close(transposed.full_tensor(), dense.t())
    # Rows: the input's own spec fits the row sums (size only).
    y = ShardedTensor.from_replicated(dense, _chunks(0, world_size))
    row_sums = y.with_blocks([b.sum(1) for b in y.local_blocks()], size=[6])
    assert row_sums.sharding_spec() == y.sharding_spec()
    torch.testing.assert_close(row_sums.full_tensor(), dense.sum(1))


@multi_rank(world_size=4)
def test_mesh_results_by_placements(rank: int, world_size: int) -> None:
    """On a 2x2 mesh: read the placements, derive the result's from them."""
    mesh = init_device_mesh("cpu", (2, 2))
    dense = _dense(6, 7, seed=1)
    x = ds.distribute_tensor(dense, mesh, [Shard(0), Shard(1)])
    assert list(x.placements) == [Shard(0), Shard(1)] and x.device_mesh is mesh
    # Row sums: rows stay split on mesh dim 0, the columns' terms pend on mesh dim 1.
    derived = [Partial() if p == Shard(1) else p for p in x.placements]
    with ds.count_collectives() as counted:
        row_sums = x.with_blocks([b.sum(1) for b in x.local_blocks()], layout=derived,
                                 size=[6])
    assert counted.counts == {}
    assert list(row_sums.placements) == [Shard(0), Partial()]
    assert row_sums.device_mesh is mesh
    torch.testing.assert_close(row_sums.full_tensor(), dense.sum(1))
    # The block's place in the whole value, to build a block from a replicated value.
    (shard,) = x.local_shards()
    rows, cols = (slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets,
                                                   shard.metadata.shard_sizes, strict=True))
    offsets = torch.arange(42, dtype=dense.dtype).reshape(6, 7)[rows, cols]
    shifted = x.with_blocks([b + o for b, o in zip(x.local_blocks(), [offsets], strict=True)])
    torch.testing.assert_close(shifted.full_tensor(),
                               dense + torch.arange(42, dtype=dense.dtype).reshape(6, 7))
    # A whole result, replicated on every mesh dim.
    whole = x.with_blocks([dense.sum(0)], layout=[Replicate(), Replicate()], size=[7])
    assert whole.sharding_spec() == ds.Replicate()


@multi_rank(world_size=2)
def test_with_blocks_names_a_misfit(rank: int, world_size: int) -> None:
    x = ShardedTensor.from_replicated(_dense(6, 7), _chunks(1, world_size))
    term = torch.zeros(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"passed blocks of sizes \[\[6\]\], but Partial"):
        x.with_blocks([term], layout=ds.Partial())  # no size: the input's [6, 7]
    with pytest.raises(ValueError, match="out of range for a tensor of 1 dims"):
        x.with_blocks([term], layout=[Shard(1)], size=[6])


@multi_rank(world_size=[2, 3])
def test_pending_blocks_of_any_strides(rank: int, world_size: int) -> None:
    """A pending value whose blocks are column-major on some ranks and row-major on
    others (a transposed view, as a block product may return) reduces to the reduction
    of the values, not of the storages in memory order (NOTE [collectives send memory
    order])."""
    terms = [_dense(4, 6, seed=s) for s in range(world_size)]
    template = ShardedTensor.from_replicated(torch.zeros(4, 6, dtype=torch.float64),
                                             ds.Replicate())
    wants = {"sum": sum(terms), "avg": sum(terms) / world_size,
             "max": torch.stack(terms).amax(0)}
    for reduce_op, want in wants.items():
        mine = terms[rank].t().contiguous().t() if rank % 2 == 0 else terms[rank].clone()
        assert mine.is_contiguous() == (rank % 2 == 1)
        pending = template.with_blocks([mine], layout=ds.Partial(reduce_op))
        torch.testing.assert_close(pending.full_tensor(), want)
        rows = template.with_blocks([mine.clone(memory_format=torch.preserve_format)],
                                    layout=ds.Partial(reduce_op))
        rows = rows.redistribute(_chunks(0, world_size))
        torch.testing.assert_close(rows.full_tensor(), want)
