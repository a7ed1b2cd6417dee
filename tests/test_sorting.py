"""Ops along one dim (sort, topk, kthvalue, median, mode, cummax...) against dense."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from layouts import specs_2d, whole

import dispatch_shard as ds
from dispatch_shard.testing import multi_rank

SIZE = (7, 6)

OPS: dict[str, Callable[[torch.Tensor], Any]] = {
    "sort_last": lambda t: torch.sort(t, dim=-1),
    "sort_0_descending": lambda t: torch.sort(t, dim=0, descending=True),
    "sort_stable": lambda t: torch.sort(t, dim=1, stable=True),
    "argsort": lambda t: torch.argsort(t, dim=1),
    "msort": torch.msort,
    "topk_1": lambda t: torch.topk(t, 3, dim=1),
    "topk_0_smallest": lambda t: torch.topk(t, 2, dim=0, largest=False),
    "kthvalue": lambda t: torch.kthvalue(t, 2, dim=1, keepdim=True),
    "kthvalue_0": lambda t: torch.kthvalue(t, 4, dim=0),
    "median_dim": lambda t: torch.median(t, dim=1),
    "median": torch.median, "nanmedian": torch.nanmedian,
    "nanmedian_dim": lambda t: torch.nanmedian(t, dim=0, keepdim=True),
    "mode": lambda t: torch.mode(t, dim=1),
    "cummax": lambda t: torch.cummax(t, dim=1),
    "cummin_0": lambda t: torch.cummin(t, dim=0),
}


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("layout", ["rows", "cols", "grid", "several", "replicate"])
def test_ops_along_a_dim_match_dense(rank: int, world_size: int, layout: str) -> None:
    spec = specs_2d(SIZE, world_size)[layout]
    # Few distinct values: ties, where indices must still be dense's.
    dense = torch.randint(0, 4, SIZE, generator=torch.Generator().manual_seed(3)).float()
    dense[2, 3] = float("nan")
    for name, op in OPS.items():
        source = dense if "nan" in name or "sort" in name else dense.nan_to_num(1.0)
        sharded = ds.ShardedTensor.from_replicated(source, spec)
        with ds.count_collectives() as counted:
            result = op(sharded)
        expected = op(source)
        got = whole(result)
        if isinstance(expected, tuple):
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, equal_nan=True, msg=name)
        else:
            torch.testing.assert_close(got, expected, equal_nan=True, msg=name)
        if layout == "rows" and name in ("sort_last", "topk_1", "kthvalue", "median_dim",
                                          "mode", "cummax", "argsort"):
            assert counted.counts == {}, (name, counted.counts)  # whole rows per block


@multi_rank(world_size=[2])
def test_ops_along_a_dim_raise_like_dense(rank: int, world_size: int) -> None:
    spec = specs_2d(SIZE, world_size)["rows"]
    sharded = ds.ShardedTensor.from_replicated(torch.zeros(SIZE), spec)
    with pytest.raises(RuntimeError, match="selected index k out of range"):
        torch.topk(sharded, 9, dim=1)
    with pytest.raises(IndexError, match="Dimension out of range"):
        torch.sort(sharded, dim=3)
