"""Device meshes (dispatch_shard.mesh): DTensor's vocabulary over the library's layouts.

Blocks are compared with DTensor's own ``distribute_tensor`` on the same mesh: the
same boxes on the same ranks, for even and uneven sizes and nested shards.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from layouts import assert_raised_alike, outcome, train_side_by_side
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor import distribute_tensor as dtensor_distribute

import dispatch_shard as ds
from dispatch_shard import ShardedTensor
from dispatch_shard.testing import get_pool, multi_rank

FULLY_SHARDED = [
    [Shard(0), Shard(1)],
    [Shard(1), Shard(0)],
    [Shard(0), Shard(0)],  # nested on one dim
    [Shard(1), Shard(1)],
]


def _dense(*size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@multi_rank(world_size=[4])
def test_blocks_match_dtensor_on_a_2x2_mesh(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for size in ((8, 6), (7, 5), (3, 1), (5, 9)):  # even, uneven, with empty blocks
        dense = _dense(*size, seed=sum(size))
        for placements in [*FULLY_SHARDED, [Replicate(), Replicate()]]:
            ours = ds.distribute_tensor(dense, mesh, placements)
            theirs = dtensor_distribute(dense, mesh, placements)
            mine = ours.local_tensor()
            assert mine.shape == theirs.to_local().shape, (size, placements)
            torch.testing.assert_close(mine, theirs.to_local())
            torch.testing.assert_close(ours.full_tensor(), dense)
            assert ours.device_mesh is mesh and list(ours.placements) == placements
            # Ops work on them as on any layout.
            torch.testing.assert_close((ours * 2 + ours).sum().item(), (dense * 3).sum().item())


@multi_rank(world_size=[4])
def test_partial_and_sub_meshes(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dense = _dense(4, 3, seed=1)
    summand = ds.ShardedTensor.from_local(dense * (rank + 1), mesh, [Partial(), Partial()])
    assert summand.sharding_spec() == ds.Partial()
    torch.testing.assert_close(summand.full_tensor(), dense * 10)
    # A sub-mesh by name: a 1-D mesh of the tp ranks of this rank's dp row.
    tp = mesh["tp"]
    row = ds.distribute_tensor(dense, tp, [Shard(1)])
    assert row.process_group is tp.get_group() or \
        ds.collectives.group_ranks(row.process_group) == tuple(tp.mesh.tolist())
    torch.testing.assert_close(row.full_tensor(), dense)
    assert list(row.placements) == [Shard(1)] and row.device_mesh is tp


@multi_rank(world_size=[4])
def test_redistribute_between_placements_is_differentiable(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (2, 2))
    dense = _dense(7, 6, seed=2)
    weight = _dense(7, 6, seed=3)
    for src in FULLY_SHARDED:
        for dst in [*FULLY_SHARDED, [Replicate(), Replicate()]]:
            x = ds.distribute_tensor(dense, mesh, src).requires_grad_()
            y = x.redistribute(mesh, dst)
            assert list(y.placements) == dst and y.device_mesh is mesh
            torch.testing.assert_close(y.full_tensor(), dense)
            (y * ds.distribute_tensor(weight, mesh, dst)).sum().backward()
            assert list(x.grad.placements) == src
            torch.testing.assert_close(x.grad.full_tensor(), weight)
    # The mesh may be left out: this tensor's.
    z = ds.distribute_tensor(dense, mesh, [Shard(0), Shard(1)]).redistribute(
        None, [Replicate(), Replicate()])
    assert z.sharding_spec() == ds.Replicate()


@multi_rank(world_size=[4])
def test_parameters_on_a_mesh_train_like_dense(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (2, 2))
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6)).double()
    sharded = copy.deepcopy(dense)
    layouts = {"0.weight": [Shard(0), Shard(1)], "0.bias": [Shard(0), Shard(0)],
               "2.weight": [Shard(1), Shard(0)], "2.bias": [Replicate(), Replicate()]}
    for name, placements in layouts.items():
        module, attr = sharded.get_submodule(name.split(".")[0]), name.split(".")[1]
        setattr(module, attr, nn.Parameter(ds.distribute_tensor(
            getattr(module, attr).detach(), mesh, placements)))
    train_side_by_side(dense, sharded, steps=3, shape=(5, 6), seed=4)
    for (name, p), (_, q) in zip(sharded.named_parameters(), dense.named_parameters(),
                                 strict=True):
        assert isinstance(p, ShardedTensor) and list(p.placements) == layouts[name]
        assert p.grad is not None and p.grad._layout is p._layout
        torch.testing.assert_close(p.detach().full_tensor(), q.detach(), msg=name)


@multi_rank(world_size=[4])
def test_dtensor_interop(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (2, 2))
    dense = _dense(7, 5, seed=5)
    for placements in [*FULLY_SHARDED, [Replicate(), Replicate()]]:
        theirs = dtensor_distribute(dense, mesh, placements)
        ours = ds.from_dtensor(theirs)
        torch.testing.assert_close(ours.full_tensor(), dense)
        back = ds.to_dtensor(ours)
        assert tuple(back.placements) == tuple(placements)
        torch.testing.assert_close(back.full_tensor(), dense)
    partial = ds.ShardedTensor.from_local(dense, mesh, [Partial(), Partial()])
    torch.testing.assert_close(ds.to_dtensor(partial).full_tensor(), dense * 4)


def _bad(rank: int, world_size: int, case: str) -> tuple[str, str]:
    mesh = init_device_mesh("cpu", (2, 2))
    dense = _dense(4, 4)
    calls: dict[str, Any] = {
        "wrong length": lambda: ds.distribute_tensor(dense, mesh, [Shard(0)]),
        "dim out of range": lambda: ds.distribute_tensor(dense, mesh, [Shard(0), Shard(2)]),
        "from_local shapes disagree": lambda: ds.ShardedTensor.from_local(
            _dense(2, 2) if rank != 3 else _dense(3, 2), mesh, [Shard(0), Shard(1)],
            shape=(4, 4)),
    }
    return outcome(calls[case])


@pytest.mark.parametrize(("case", "kind", "pattern"), [
    ("wrong length", "ValueError", "placements has 1 entries but the device mesh has 2 dims"),
    ("dim out of range", "ValueError", "Shard dim 2 is out of range for a tensor of 2 dims"),
    ("from_local shapes disagree", "ValueError", "Local tensor on rank 3 has size"),
])
def test_bad_mesh_input_raises_alike_on_every_rank(case: str, kind: str, pattern: str) -> None:
    outcomes = get_pool(4).run(_bad, timeout_s=60, case=case)
    assert_raised_alike(outcomes, kind, pattern)


@multi_rank(world_size=[4])
def test_state_across_meshes(rank: int, world_size: int, tmp_path: Any) -> None:
    """DCP: save on a 2x2 mesh, load on 4x1, 1x4 and a 2-rank sub-mesh; torch.save."""
    import io

    import torch.distributed.checkpoint as dcp

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dense = _dense(7, 6, seed=6)
    saved = ds.distribute_tensor(dense, mesh, [Shard(0), Shard(1)])
    dcp.save({"w": saved}, checkpoint_id=str(tmp_path / "ckpt"))
    targets = [
        ds.distribute_tensor(torch.zeros_like(dense), init_device_mesh("cpu", (4, 1)),
                             [Shard(0), Shard(1)]),
        ds.distribute_tensor(torch.zeros_like(dense), init_device_mesh("cpu", (1, 4)),
                             [Shard(1), Shard(0)]),
        ds.distribute_tensor(torch.zeros_like(dense), mesh["dp"], [Shard(0)]),  # 2 ranks
    ]
    for target in targets:
        dcp.load({"w": target}, checkpoint_id=str(tmp_path / "ckpt"))
        torch.testing.assert_close(target.full_tensor(), dense)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded.full_tensor(), dense)
    assert list(loaded.placements) == [Shard(0), Shard(1)]


@multi_rank(world_size=[4])
def test_visualize_sharding_names_the_mesh(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    x = ds.distribute_tensor(_dense(4, 4), mesh, [Shard(0), Shard(1)])
    text = ds.visualize_sharding(x, show=False)
    assert "mesh (2, 2) ('dp', 'tp') placements [S(0), S(1)]" in text, text
    for holder in ("rank 0", "rank 1", "rank 2", "rank 3"):
        assert holder in text, text
