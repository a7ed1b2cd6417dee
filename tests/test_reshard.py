"""Layout changes: ``reshard`` (in place), ``redistribute`` (out of place) and their autograd.

Every pair of layouts -- chunks along dims 0 and 1, a 2x2 grid, several blocks
per rank, a shuffled placement order, replicated and partial -- is checked
against the dense tensor the sharded one was cut from, on even and uneven
sizes and several world sizes.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

import dispatch_shard as ds
from dispatch_shard import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    Partial,
    Replicate,
    ShardedTensor,
    ShardingSpec,
    ShardMetadata,
    collectives,
)
from dispatch_shard.testing import multi_rank


def chunk_spec(dim: int, ranks: list[int]) -> ChunkShardingSpec:
    return ChunkShardingSpec(dim=dim, placements=[f"rank:{r}/cpu" for r in ranks])


def layouts(world_size: int, rows: int, cols: int) -> dict[str, ShardingSpec]:
    """The layouts under test, by name, for a ``rows x cols`` tensor."""
    ranks = list(range(world_size))
    top, left = (rows + 1) // 2, (cols + 1) // 2
    boxes = [([0, 0], [top, left]), ([0, left], [top, cols - left]),
             ([top, 0], [rows - top, left]), ([top, left], [rows - top, cols - left])]
    # Block i on rank (3 - i) % world: on 3 ranks, rank 0 holds two blocks.
    grid = EnumerableShardingSpec([
        ShardMetadata(offsets, sizes, f"rank:{(3 - i) % world_size}/cpu")
        for i, (offsets, sizes) in enumerate(boxes)
    ])
    shuffled = [r for r in (2, 0, 3, 1, 1, 0) if r < world_size]
    return {
        "rows": chunk_spec(0, ranks),
        "cols": chunk_spec(1, ranks),
        "grid": grid,
        "several": chunk_spec(0, ranks + ranks),  # two blocks per rank, some empty
        "shuffled": chunk_spec(-1, shuffled),
        "replicate": Replicate(),
        "partial": Partial(),
    }


def seeded(*size: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*size, generator=generator, dtype=dtype)


def box(metadata: ShardMetadata) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(metadata.shard_offsets, metadata.shard_sizes,
                                                  strict=True))


def sharded(dense: torch.Tensor, spec: ShardingSpec, summands: torch.Tensor | None = None
            ) -> ShardedTensor:
    """``dense`` laid out by ``spec``: each local block a slice of it.

    For a :class:`Partial` spec, rank r holds ``summands[r]`` (their sum is ``dense``).
    """
    st = ds.empty(spec, *dense.shape, dtype=dense.dtype)
    for shard in st.local_shards():
        if isinstance(spec, Partial):
            assert summands is not None
            shard.tensor.copy_(summands[dist.get_rank()])
        else:
            shard.tensor.copy_(dense[box(shard.metadata)])
    return st


def dense_and_summands(world_size: int, rows: int, cols: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense tensor and per-rank summands of it.

    The summands are multiples of 1/64, so every order of summation (the
    all-reduce's included) gives the dense sum exactly.
    """
    summands = torch.round(seeded(world_size, rows, cols, seed=1) * 64) / 64
    return summands.sum(0), summands


def assert_holds(st: ShardedTensor, spec: ShardingSpec, dense: torch.Tensor) -> None:
    """``st`` is laid out by ``spec`` and its value is exactly ``dense``."""
    assert st.sharding_spec() == spec
    assert st.size() == dense.shape and st.dtype == dense.dtype
    if not isinstance(spec, Partial):
        # Each local block is its slice of the dense tensor (checked without a collective).
        for shard in st.local_shards():
            assert torch.equal(shard.tensor, dense[box(shard.metadata)]), shard.metadata
    assert torch.equal(st.full_tensor(), dense)


# -- every pair ---------------------------------------------------------------------


@multi_rank(world_size=[1, 2, 3, 4])
@pytest.mark.parametrize("size", [(8, 8), (10, 7)], ids=["8x8", "10x7"])
def test_reshard_and_redistribute_every_pair(rank: int, world_size: int,
                                             size: tuple[int, int]) -> None:
    dense, summands = dense_and_summands(world_size, *size)
    specs = layouts(world_size, *size)
    for source, target in itertools.product(specs, specs):
        st = sharded(dense, specs[source], summands)
        before = [s.tensor.clone() for s in st.local_shards()]

        moved = st.redistribute(specs[target])  # out of place
        assert isinstance(moved, ShardedTensor)
        assert_holds(moved, specs[target], dense)
        assert st.sharding_spec() == specs[source]  # the source is untouched
        assert all(torch.equal(a, s.tensor) for a, s in zip(before, st.local_shards(),
                                                            strict=True))

        result = st.reshard(specs[target])  # in place
        assert result is st
        assert_holds(st, specs[target], dense)


@multi_rank(world_size=[3, 4])
def test_reshard_through_every_layout_in_turn(rank: int, world_size: int) -> None:
    dense, summands = dense_and_summands(world_size, 10, 7)
    specs = layouts(world_size, 10, 7)
    st = sharded(dense, specs["partial"], summands)
    names = ["shuffled", "grid", "several", "cols", "replicate", "rows", "grid", "partial",
             "cols"]
    for name in names:
        assert st.reshard(specs[name]) is st
        assert_holds(st, specs[name], dense)


@multi_rank(world_size=4)
def test_reshard_three_dims_and_other_dtypes(rank: int, world_size: int) -> None:
    ranks = list(range(world_size))
    specs = [chunk_spec(0, ranks), chunk_spec(2, ranks[::-1]), chunk_spec(1, ranks + ranks),
             Replicate()]
    for dense in (seeded(5, 3, 6), torch.arange(90).reshape(5, 3, 6),
                  seeded(5, 3, 6) > 0, seeded(5, 3, 6, dtype=torch.complex64)):
        for source, target in itertools.product(specs, specs):
            st = sharded(dense, source)
            assert_holds(st.redistribute(target), target, dense)
            assert_holds(st.reshard(target), target, dense)


@multi_rank(world_size=4)
@pytest.mark.parametrize("reduce_op", ["sum", "avg", "max", "min"])
def test_partial_sources_of_every_reduce_op(rank: int, world_size: int, reduce_op: str) -> None:
    summands = torch.round(seeded(world_size, 6, 5, seed=2) * 64) / 64
    dense = {"sum": summands.sum(0), "avg": summands.mean(0),
             "max": summands.amax(0), "min": summands.amin(0)}[reduce_op]
    for name, spec in layouts(world_size, 6, 5).items():
        st = sharded(dense, Partial(reduce_op), summands)
        assert torch.equal(st.full_tensor(), dense)
        if name == "partial":
            spec = Partial(reduce_op)
        moved = st.redistribute(spec)
        assert moved.sharding_spec() == spec
        assert torch.equal(moved.full_tensor(), dense)
        st.reshard(spec)
        assert torch.equal(st.full_tensor(), dense)


@multi_rank(world_size=4)
def test_reshard_in_a_subgroup(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=[1, 2, 3])
    dense = seeded(9, 6)
    st = ds.empty(chunk_spec(0, [1, 2, 3]), 9, 6, dtype=dense.dtype, process_group=group)
    for shard in st.local_shards():
        shard.tensor.copy_(dense[box(shard.metadata)])
    for spec in (chunk_spec(1, [3, 1]), chunk_spec(0, [2, 2, 3]), Replicate(), chunk_spec(0, [1])):
        moved = st.redistribute(spec)
        assert st.reshard(spec) is st
        for result in (moved, st):
            assert result.sharding_spec() == spec
            if rank == 0:  # outside the group: no blocks, no collective, no hang
                assert result.local_shards() == []
            else:
                for shard in result.local_shards():
                    assert torch.equal(shard.tensor, dense[box(shard.metadata)])
                assert torch.equal(result.full_tensor(), dense)


@multi_rank(world_size=4)
def test_reshard_errors_raise_on_every_rank_and_keep_the_tensor(rank: int,
                                                                world_size: int) -> None:
    dense = seeded(8, 4)
    spec = chunk_spec(0, [0, 1, 2, 3])
    st = sharded(dense, spec)
    with pytest.raises(ValueError, match="Global rank 4 does not exist in input process group"):
        st.reshard(chunk_spec(0, [0, 4]))
    with pytest.raises(ValueError, match="Invalid sharding dim"):
        st.reshard(chunk_spec(2, [0, 1]))
    with pytest.raises(ValueError, match="do not cover"):
        st.reshard(EnumerableShardingSpec([ShardMetadata([0, 0], [4, 4], "rank:0/cpu")]))
    # sharded -> Partial("max"): summands hold the identity where a rank has no block.
    assert torch.equal(st.redistribute(Partial("max")).full_tensor(), dense)
    complex_st = sharded(torch.complex(dense, dense), spec)
    with pytest.raises(NotImplementedError, match="Partial"):
        complex_st.redistribute(Partial("max"))  # complex numbers have no max
    assert_holds(st, spec, dense)


# -- communication -------------------------------------------------------------------


@contextmanager
def recorded_collectives() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()

    def observe(kind: str, nbytes: int, group: object) -> None:
        counts[kind] += 1

    collectives._observers.append(observe)
    try:
        yield counts
    finally:
        collectives._observers.remove(observe)


@multi_rank(world_size=4)
def test_collectives_issued_by_a_layout_change(rank: int, world_size: int) -> None:
    dense, summands = dense_and_summands(world_size, 10, 7)
    specs = layouts(world_size, 10, 7)
    expected = {
        ("rows", "rows"): {},  # nothing to move
        ("rows", "cols"): {"all_to_all": 1},
        ("rows", "replicate"): {"all_to_all": 1},
        ("replicate", "grid"): {},  # every rank slices its own blocks
        ("replicate", "partial"): {},
        ("cols", "partial"): {},  # each rank's summand is its blocks, zero elsewhere
        ("partial", "replicate"): {"all_reduce": 1},
        ("partial", "rows"): {"all_reduce": 1},
    }
    for (source, target), counts in expected.items():
        st = sharded(dense, specs[source], summands)
        with recorded_collectives() as issued:
            moved = st.redistribute(specs[target])
        assert dict(issued) == counts, (source, target, dict(issued))
        if source == "partial":
            # The reduction is cached on the Partial (NOTE [a Partial is reduced at
            # most once]): a second layout change from it communicates nothing.
            with recorded_collectives() as issued:
                st.redistribute(specs[target])
            assert dict(issued) == {}, (source, target, dict(issued))
        fresh = sharded(dense, specs[source], summands)
        with recorded_collectives() as issued:
            fresh.reshard(specs[target])
        assert dict(issued) == counts, (source, target, dict(issued))
        assert_holds(moved, specs[target], dense)


# -- autograd --------------------------------------------------------------------------


@multi_rank(world_size=[3, 4])
def test_redistribute_backward_every_pair(rank: int, world_size: int) -> None:
    dense, summands = dense_and_summands(world_size, 10, 7)
    weight = seeded(10, 7, seed=3)
    specs = layouts(world_size, 10, 7)
    for source, target in itertools.product(specs, specs):
        # A leaf's grad keeps the leaf's layout (a Partial leaf gets Partial summands
        # of the gradient of the global value).
        grad_spec = specs[source]
        for loss_weight in (torch.ones(10, 7, dtype=dense.dtype), weight):
            st = sharded(dense, specs[source], summands).requires_grad_(True)
            moved = st.redistribute(specs[target])
            assert moved.requires_grad and moved.grad_fn is not None
            (moved.full_tensor() * loss_weight).sum().backward()
            grad = st.grad
            assert isinstance(grad, ShardedTensor), (source, target)
            assert grad.sharding_spec() == grad_spec, (source, target)
            assert grad.metadata().shards_metadata == st.metadata().shards_metadata
            assert_holds(grad, grad_spec, loss_weight)


@multi_rank(world_size=[1, 4])
def test_full_tensor_backward(rank: int, world_size: int) -> None:
    dense = seeded(10, 7)
    weight = seeded(10, 7, seed=3)
    for name, spec in layouts(world_size, 10, 7).items():
        if name == "partial":
            continue
        st = sharded(dense, spec).requires_grad_(True)
        full = st.full_tensor()
        assert full.requires_grad and not isinstance(full, ShardedTensor)
        assert torch.equal(full, dense)
        (full * weight).sum().backward()
        assert isinstance(st.grad, ShardedTensor)
        assert_holds(st.grad, spec, weight)
        assert st.grad.metadata().shards_metadata == st.metadata().shards_metadata

        st.grad = None
        st.full_tensor().sum().backward()
        assert_holds(st.grad, spec, torch.ones(10, 7, dtype=dense.dtype))


@multi_rank(world_size=2)
def test_a_layout_reached_by_reshard_is_the_one_creation_makes(rank: int,
                                                               world_size: int) -> None:
    """Layouts are interned: equal layouts are one object, whichever way a tensor got there."""
    for spec in (Replicate(), Partial(), chunk_spec(1, [1, 0])):
        created = ds.zeros(spec, 6, 4)
        for source in (chunk_spec(0, [0, 1]), Replicate(), grid_spec_2x2(6, 4)):
            st = ds.zeros(source, 6, 4)
            assert st.reshard(spec)._layout is created._layout, (source, spec)
            assert st.redistribute(source)._layout is ds.zeros(source, 6, 4)._layout


def grid_spec_2x2(rows: int, cols: int) -> EnumerableShardingSpec:
    return layouts(2, rows, cols)["grid"]  # type: ignore[return-value]


@multi_rank(world_size=[3, 4])
def test_integer_partial_values(rank: int, world_size: int) -> None:
    dense = torch.arange(30).reshape(6, 5) - 7
    rows = chunk_spec(0, list(range(world_size)))
    # A sharded tensor becomes a partial sum or average; any layout a partial max or min.
    for reduce_op, sources in (("sum", [Replicate(), rows]), ("avg", [Replicate(), rows]),
                               ("max", [Replicate()]), ("min", [Replicate()])):
        for source in sources:
            moved = sharded(dense, source).redistribute(Partial(reduce_op))
            assert moved.dtype == torch.int64
            assert torch.equal(moved.full_tensor(), dense), (source, reduce_op)
            assert torch.equal(moved.redistribute(source).full_tensor(), dense)
    # Integer averages of arbitrary summands round down, like ``//``.
    summands = torch.arange(world_size * 6).reshape(world_size, 2, 3)
    summands[0] += 1
    average = summands.sum(0) // world_size
    assert not torch.equal(average * world_size, summands.sum(0))  # it does round
    assert torch.equal(sharded(average, Partial("avg"), summands).full_tensor(), average)
