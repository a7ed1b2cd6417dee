"""The multi-rank harness itself: passing, raising, hanging and dying ranks."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from dispatch_shard.testing import RankFailure, get_pool, multi_rank


@multi_rank(world_size=[1, 2, 3, 4])
def test_all_reduce_on_every_rank(rank: int, world_size: int) -> None:
    assert dist.get_rank() == rank
    assert dist.get_world_size() == world_size
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == world_size * (world_size + 1) / 2


@multi_rank(world_size=2)
@pytest.mark.parametrize("scale", [2, 3])
def test_parameters_reach_every_rank(rank: int, world_size: int, scale: int) -> None:
    t = torch.full((2,), float(scale))
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((2,), float(scale * world_size)))


def _rank_one_raises(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one says no")
    dist.barrier()  # the others wait for rank 1 and would hang without the harness


def _rank_zero_hangs(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(3600)


def _rank_two_dies(rank: int, world_size: int) -> None:
    if rank == 2:
        os._exit(3)


def _returns_rank(rank: int, world_size: int) -> int:
    return rank * 10


@pytest.mark.slow  # a pool restart
def test_raising_rank_fails_with_its_traceback() -> None:
    pool = get_pool(4)
    with pytest.raises(RankFailure) as info:
        pool.run(_rank_one_raises, timeout_s=30)
    text = str(info.value)
    assert "rank 1 raised" in text
    assert "ValueError: rank one says no" in text
    assert "_rank_one_raises" in text  # the traceback names the failing body
    assert pool.run(_returns_rank) == [0, 10, 20, 30]  # restarted, healthy


@pytest.mark.slow  # a pool restart
def test_hanging_rank_fails_within_timeout_and_pool_recovers() -> None:
    pool = get_pool(4)
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        pool.run(_rank_zero_hangs, timeout_s=2)
    elapsed = time.monotonic() - start
    assert elapsed < 15, elapsed
    text = str(info.value)
    assert "timed out after 2.0s" in text
    assert "rank 0 hung; its stacks" in text
    assert "_rank_zero_hangs" in text  # faulthandler's dump of the hung frame
    assert pool.run(_returns_rank) == [0, 10, 20, 30]


@pytest.mark.slow  # a pool restart
def test_dead_rank_fails_and_pool_recovers() -> None:
    pool = get_pool(4)
    with pytest.raises(RankFailure, match="died"):
        pool.run(_rank_two_dies, timeout_s=30)
    assert pool.run(_returns_rank) == [0, 10, 20, 30]


@multi_rank(world_size=4)
@pytest.mark.parametrize("i", range(50))
def test_many_trivial_tests_share_the_pool(rank: int, world_size: int, i: int) -> None:
    assert dist.get_rank() == rank and i >= 0
