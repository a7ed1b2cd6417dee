"""Global ops served on the whole value (ops/whole.py): dense's results, any layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from layouts import specs_2d, whole

import dispatch_shard as ds
from dispatch_shard.testing import multi_rank

SIZE = (5, 5)

OPS: dict[str, Callable[[torch.Tensor], Any]] = {
    "inv": torch.linalg.inv, "det": torch.linalg.det, "slogdet": torch.linalg.slogdet,
    "svdvals": torch.linalg.svdvals, "eigvalsh": lambda t: torch.linalg.eigvalsh(t @ t.mT),
    "solve": lambda t: torch.linalg.solve(t, torch.ones(5, 2)),
    "pinv": torch.linalg.pinv, "matrix_exp": lambda t: torch.linalg.matrix_exp(t / 4),
    "fft": lambda t: torch.fft.rfft(t, dim=0).abs(), "ifft": lambda t: torch.fft.irfft(t),
    "unique": lambda t: torch.unique(t.round(), return_counts=True),
    "nonzero": lambda t: torch.nonzero(t > 0), "masked_select": lambda t: t[t > 0.5],
    "histc": lambda t: torch.histc(t, bins=4, min=-2, max=2),
    # int bins: _histogramdd_bin_edges, then _histogramdd_from_bin_cts
    "histogramdd": lambda t: torch.histogramdd(t, bins=[3, 2, 4, 2, 3]).hist,
    "histogramdd_weight_density": lambda t: torch.histogramdd(
        t[:, :3], bins=[2, 3, 2], weight=t[:, 4].abs(), density=True).hist,
    "searchsorted": lambda t: torch.searchsorted(torch.sort(t, dim=1).values,
                                                 torch.zeros(5, 1)),
    "cdist": lambda t: torch.cdist(t, t[:2]), "repeat_interleave": lambda t: t.repeat_interleave(
        torch.tensor([1, 0, 2, 1, 1]), dim=0),
    "bincount": lambda t: torch.bincount((t.abs() * 2).long().flatten()),
    "bincount, weights": lambda t: torch.bincount((t.abs() * 2).long()[:, 0], weights=t[:, 1]),
    "hash_tensor": torch.hash_tensor, "hash_tensor, dim": lambda t: torch.hash_tensor(t, 1),
    "_unique": lambda t: torch._unique(t.round(), return_inverse=True),
}


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("layout", ["rows", "grid", "several"])
def test_whole_value_ops_match_dense(rank: int, world_size: int, layout: str) -> None:
    dense = torch.randn(SIZE, generator=torch.Generator().manual_seed(7)) + 3 * torch.eye(5)
    sharded = ds.ShardedTensor.from_replicated(dense, specs_2d(SIZE, world_size)[layout])
    for name, op in OPS.items():
        got, expected = whole(op(sharded)), op(dense)
        if isinstance(expected, tuple):
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, msg=name)
        else:
            torch.testing.assert_close(got, expected, msg=name)


@multi_rank(world_size=[2])
def test_whole_value_ops_raise_like_dense(rank: int, world_size: int) -> None:
    singular = ds.ShardedTensor.from_replicated(torch.zeros(SIZE), specs_2d(SIZE, 2)["rows"])
    with pytest.raises(torch.linalg.LinAlgError, match="singular"):
        torch.linalg.inv(singular)
