"""N-D layouts: placements that mix Shard with Replicate or Partial on a 2x2 mesh.

Each box of such a layout has several holders (copies along replicated mesh dims,
terms of a pending reduction along partial ones). Values are compared with the dense
computation on the same data, blocks with DTensor's, and every test also checks
that the copies of a box stay bitwise equal.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from layouts import assert_raised_alike, outcome
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor import distribute_tensor as dtensor_distribute

import dispatch_shard as ds
from dispatch_shard import ShardedTensor, holders
from dispatch_shard.collectives import all_gather_object
from dispatch_shard.testing import get_pool, multi_rank

ONE_DIM = [Shard(0), Shard(1), Replicate(), Partial()]
PAIRS = [list(p) for p in itertools.product(ONE_DIM, ONE_DIM)]
MIXED = [p for p in PAIRS if len({type(q) for q in p}) > 1 or p == [Shard(0), Shard(0)]]


def _dense(*size: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mesh() -> Any:
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


def _copies_agree(tensor: ShardedTensor) -> None:
    """The holders of each box of a non-pending layout hold bitwise equal blocks."""
    layout = tensor._layout
    mine = [(tuple(layout.shards[i].shard_offsets), block)
            for i, block in zip(layout.local_indices(tensor._rank), tensor._local_tensors,
                                strict=True)]
    seen: dict[tuple[int, ...], torch.Tensor] = {}
    for theirs in all_gather_object(mine, tensor._process_group):
        for box, block in theirs:
            if box in seen:
                assert torch.equal(seen[box], block), f"copies of box {box} differ"
            seen[box] = block


@multi_rank(world_size=[4])
def test_every_placement_pair_lays_out_like_dtensor(rank: int, world_size: int) -> None:
    mesh = _mesh()
    for size in ((8, 6), (7, 5), (3, 1)):  # even, uneven, with empty blocks
        dense = _dense(*size, seed=sum(size))
        for placements in PAIRS:
            ours = ds.distribute_tensor(dense, mesh, placements)
            assert list(ours.placements) == placements and ours.device_mesh is mesh
            torch.testing.assert_close(ours.full_tensor(), dense, msg=str(placements))
            if any(isinstance(p, Partial) for p in placements):
                # Terms: the value is their sum, whichever rank holds which.
                theirs = ds.to_dtensor(ours)
                torch.testing.assert_close(theirs.full_tensor(), dense)
                continue
            theirs = dtensor_distribute(dense, mesh, placements).to_local()
            assert torch.equal(ours.local_tensor(), theirs), (size, placements)
            _copies_agree(ours)


@multi_rank(world_size=[4])
def test_redistribute_between_any_two_layouts(rank: int, world_size: int) -> None:
    mesh = _mesh()
    dense = _dense(7, 5, seed=1)
    weight = _dense(7, 5, seed=2)
    for src in PAIRS:
        x = ds.distribute_tensor(dense, mesh, src)
        for dst in PAIRS:
            y = x.redistribute(mesh, dst)
            assert list(y.placements) == dst
            torch.testing.assert_close(y.full_tensor(), dense, msg=f"{src} -> {dst}")
            if not any(isinstance(p, Partial) for p in dst):
                _copies_agree(y)
    # Differentiable: the gradient comes back in the source's layout (a leaf's grad
    # keeps the leaf's layout, a pending one too) and equals dense's.
    for src, dst in [([Shard(0), Replicate()], [Replicate(), Shard(1)]),
                     ([Partial(), Shard(1)], [Shard(0), Shard(0)]),
                     ([Replicate(), Shard(0)], [Partial(), Replicate()])]:
        x = ds.distribute_tensor(dense, mesh, src).requires_grad_()
        y = x.redistribute(mesh, dst)
        (y * ds.distribute_tensor(weight, mesh, [Replicate(), Replicate()])).sum().backward()
        assert list(x.grad.placements) == src, (src, x.grad.placements)
        torch.testing.assert_close(x.grad.full_tensor(), weight)


def _sent_bytes(tensor: ShardedTensor, mesh: Any, placements: list[Any],
                on: list[int] | None = None) -> tuple[int, int]:
    """Collectives and bytes of one move; ``on``: the ranks they must run on."""
    with ds.count_collectives() as counted:
        tensor.redistribute(mesh, placements)
    if on is not None:
        assert all(list(e.ranks) == on for e in counted.events), (on, counted.events)
    return len(counted.events), sum(e.nbytes for e in counted.events)


@multi_rank(world_size=[4])
def test_redistribution_moves_the_minimum_bytes(rank: int, world_size: int) -> None:
    mesh = _mesh()
    dense = _dense(8, 6, seed=3)  # float64: a 4x6 half is 192 bytes, a 4x3 block 96
    x = ds.distribute_tensor(dense, mesh, [Shard(0), Replicate()])
    # Cutting a copy further: no data moves.
    assert _sent_bytes(x, mesh, [Shard(0), Shard(1)]) == (0, 0)
    # All-gather over tp: each rank sends its half to its one tp peer, on the tp group.
    tp_peers = [r for r in range(4) if r // 2 == rank // 2]
    dp_peers = [r for r in range(4) if r % 2 == rank % 2]
    y = ds.distribute_tensor(dense, mesh, [Replicate(), Shard(0)])
    assert _sent_bytes(y, mesh, [Replicate(), Replicate()], on=tp_peers) == (1, 192)
    # A pending sum over dp, to the value: each rank sends its term to its dp peer.
    p = ds.distribute_tensor(dense, mesh, [Partial(), Shard(0)])
    assert _sent_bytes(p, mesh, [Replicate(), Shard(0)], on=dp_peers) == (1, 192)
    # ... and to a layout that cuts it further (a reduce-scatter): half of that.
    assert _sent_bytes(p, mesh, [Shard(1), Shard(0)]) == (1, 96)
    # Fully sharded to replicated: each rank's 4x3 block to the 3 others.
    z = ds.distribute_tensor(dense, mesh, [Shard(0), Shard(1)])
    assert _sent_bytes(z, mesh, [Replicate(), Replicate()]) == (1, 288)


def _ops(x: Any, y: Any, w: Any, p: Any, target: Any) -> dict[str, Any]:
    return {
        "add": x + y, "mul partial": x * p, "sub scalar": x - 2.5,
        "where": torch.where(x > 0, x, y),
        "mm": torch.mm(x, w), "linear": F.linear(x, w.t()),
        "sum 0": x.sum(0), "sum": y.sum(), "mean": x.mean(), "mean 1": p.mean(1),
        "amax": y.amax(1), "var": x.var(0), "softmax": torch.softmax(y, -1),
        "log_softmax": F.log_softmax(x, 0), "layer_norm": F.layer_norm(y, (5,)),
        "mse_loss": F.mse_loss(x, y), "cross_entropy": F.cross_entropy(x, target),
        "t": x.t(), "reshape": y.reshape(35), "slice": x[1:5], "select": y[:, 2],
        "cat": torch.cat([x, y]), "max dim": y.max(dim=1).values, "cumsum": x.cumsum(0),
        "index_select": y.index_select(0, target), "gelu": F.gelu(p),
    }


@multi_rank(world_size=[4])
def test_ops_on_mixed_layouts_match_dense(rank: int, world_size: int) -> None:
    """Uneven sizes (7 rows over a mesh dim of 2), operands of different N-D layouts,
    a Partial on one mesh dim; means over batch-sharded rows weigh element counts."""
    mesh = _mesh()
    values = [_dense(7, 5, seed=4), _dense(7, 5, seed=5), _dense(5, 3, seed=6),
              _dense(7, 5, seed=7)]
    target = torch.tensor([0, 4, 1, 3, 2, 2, 0])
    placements = [[Shard(0), Replicate()], [Replicate(), Shard(1)], [Replicate(), Shard(0)],
                  [Partial(), Shard(0)]]
    sharded = [ds.distribute_tensor(v, mesh, pl).requires_grad_()
               for v, pl in zip(values, placements, strict=True)]
    dense = [v.clone().requires_grad_() for v in values]
    got = _ops(*sharded, target)
    expected = _ops(*dense, target)
    for name, value in got.items():
        torch.testing.assert_close(value.full_tensor(), expected[name], msg=name)
    total = sum(v.float().sum() if v.dim() else v.float() for v in got.values())
    dense_total = sum(v.float().sum() if v.dim() else v.float() for v in expected.values())
    total.backward()
    dense_total.backward()
    for ours, theirs in zip(sharded, dense, strict=True):
        assert ours.grad._layout is ours.detach()._layout.value_layout() or \
            ours.grad._layout is ours._layout
        torch.testing.assert_close(ours.grad.full_tensor(), theirs.grad)


@multi_rank(world_size=[4])
def test_linear_ops_keep_a_pending_mesh_value_pending(rank: int, world_size: int) -> None:
    """``Σa * r``, ``Σa / r``, ``-Σa``, ``Σa + Σb`` (same layout), and their in-place
    forms, run term by term on a value pending over dp: no collective, and the value is
    dense's. A pending max is not linear: the same ops reduce it first (or refuse the
    write), and give dense's value."""
    mesh = _mesh()
    a, b = _dense(7, 5, seed=21), _dense(7, 5, seed=22)
    for op in ("sum", "avg"):
        p = ds.distribute_tensor(a, mesh, [Partial(op), Shard(0)])
        q = ds.distribute_tensor(b, mesh, [Partial(op), Shard(0)])
        with ds.count_collectives() as counted:
            got = [p * 3.0, p / 4, -p, p + q, p - q, torch.add(p, q, alpha=2), 2 * p]
            inplace = p.clone()
            inplace.mul_(2.0).add_(q).neg_()
        assert counted.events == [], (op, counted.events)
        expected = [a * 3.0, a / 4, -a, a + b, a - b, a + 2 * b, 2 * a]
        for ours, theirs in zip(got, expected, strict=True):
            assert ours._layout is p._layout
            torch.testing.assert_close(ours.full_tensor(), theirs)
        torch.testing.assert_close(inplace.full_tensor(), -(2 * a + b))
        _copies_agree(ours.redistribute(mesh, [Replicate(), Shard(0)]))
    m = ds.distribute_tensor(a, mesh, [Partial("max"), Shard(0)])
    for ours, theirs in ((-m, -a), (m * -2.0, a * -2.0), (m + m, a + a)):
        assert not ours._layout.pending
        torch.testing.assert_close(ours.full_tensor(), theirs)
    with pytest.raises(NotImplementedError, match="pending"):
        m.mul_(-1.0)


@multi_rank(world_size=[4])
def test_gradients_accumulate_into_a_pending_leaf(rank: int, world_size: int) -> None:
    """A leaf laid out as a pending sum (1-D Partial, or Partial over dp): backward runs
    several times, and the later gradients arrive in other layouts; each is added into
    one term of the accumulated gradient (they raised before), which equals dense's."""
    mesh = _mesh()
    dense = _dense(7, 5, seed=23)
    for on, placements in ((mesh, [Partial(), Shard(0)]), (mesh, [Partial("avg"), Replicate()]),
                           (mesh["dp"], [Partial()])):
        x = ds.distribute_tensor(dense, on, placements).requires_grad_()
        d = dense.clone().requires_grad_()
        for op in (torch.sin, lambda t: t @ t.t(), lambda t: t.sum(0)):
            (op(x) ** 2).sum().backward()
            (op(d) ** 2).sum().backward()
            torch.testing.assert_close(x.grad.full_tensor(), d.grad, msg=str(placements))


@multi_rank(world_size=[4])
def test_writes_into_nd_tensors_keep_copies_equal(rank: int, world_size: int) -> None:
    mesh = _mesh()
    dense = _dense(7, 5, seed=8)
    x = ds.distribute_tensor(dense, mesh, [Replicate(), Shard(0)])
    other = ds.distribute_tensor(dense * 3, mesh, [Shard(1), Replicate()])
    x.add_(other)  # another layout: served flattened, written back to every copy
    torch.testing.assert_close(x.full_tensor(), dense * 4)
    _copies_agree(x)
    x.mul_(0.5)  # the same layout: block by block on every holder
    torch.testing.assert_close(x.full_tensor(), dense * 2)
    x.copy_(dense)
    torch.testing.assert_close(x.full_tensor(), dense)
    torch.manual_seed(rank)  # different generators: copies must still draw alike
    x.uniform_()
    _copies_agree(x)
    noise = torch.rand_like(x)
    assert noise._layout is x._layout
    _copies_agree(noise)
    torch.manual_seed(11)
    with ds.random.dense_equivalent():
        x.normal_()
        torch.manual_seed(11)
        torch.testing.assert_close(x.full_tensor(), torch.randn(7, 5, dtype=torch.float64))
    # Optimizer state made by *_like keeps the layout, so steps need no collective.
    assert torch.zeros_like(x)._layout is x._layout


def _bad(rank: int, world_size: int, case: str) -> tuple[str, str]:
    mesh = _mesh()
    column = init_device_mesh("cpu", (4, 1))  # (made on every rank: it makes groups)
    dense = _dense(4, 4)
    pending = ds.distribute_tensor(dense, mesh, [Partial(), Shard(0)])
    calls: dict[str, Any] = {
        "write into pending": lambda: pending.add_(1.0),
        "copy into pending": lambda: pending.copy_(dense),
        "two reductions": lambda: ds.distribute_tensor(dense, mesh,
                                                       [Partial("sum"), Partial("max")]),
        "placements differ by rank": lambda: ds.distribute_tensor(
            dense, mesh, [Shard(0), Replicate()] if rank != 2 else [Shard(1), Replicate()]),
        "meshes share no ranks": lambda: ds.distribute_tensor(dense, mesh["tp"], [Shard(0)])
        + ds.distribute_tensor(dense, mesh, [Replicate(), Shard(0)]),
        "mesh differs by rank": lambda: ds.distribute_tensor(
            dense, mesh if rank != 1 else column,
            [Replicate(), Shard(0)]),
        "spec with shard": lambda: ds.distribute_tensor(
            dense, mesh, [Shard(1), ds.ChunkShardingSpec(0, ["rank:0/cpu", "rank:1/cpu"])]),
        "spec rank past its mesh dim": lambda: ds.distribute_tensor(
            dense, mesh, [Replicate(), ds.ChunkShardingSpec(0, ["rank:0/cpu", "rank:2/cpu"])]),
        "spec to DTensor": lambda: ds.to_dtensor(ds.distribute_tensor(
            dense, mesh, [Replicate(), ds.ChunkShardingSpec(0, ["rank:1/cpu", "rank:0/cpu"])])),
    }
    return outcome(calls[case])


@pytest.mark.parametrize(("case", "kind", "pattern"), [
    ("write into pending", "NotImplementedError", "reduction pending over a mesh dim"),
    ("copy into pending", "NotImplementedError", "reduction pending over a mesh dim"),
    ("two reductions", "NotImplementedError", "different reductions per mesh dim"),
    ("placements differ by rank", "ValueError", "does not match from different ranks"),
    ("meshes share no ranks", "ValueError", "operands live on different process groups"),
    ("mesh differs by rank", "ValueError", "does not match from different ranks"),
    ("spec with shard", "NotImplementedError", "composes with Replicate and Partial"),
    ("spec rank past its mesh dim", "ValueError", "places blocks on rank 2, but on mesh dim 1"),
    ("spec to DTensor", "NotImplementedError", "has no DTensor placements"),
])
def test_bad_nd_input_raises_alike_on_every_rank(case: str, kind: str, pattern: str) -> None:
    outcomes = get_pool(4).run(_bad, timeout_s=60, case=case)
    assert_raised_alike(outcomes, kind, pattern)
    if case != "meshes share no ranks":  # (that one names each rank's own sub-mesh)
        assert len({message for _, message in outcomes}) == 1, outcomes


@multi_rank(world_size=[4])
def test_dtensor_interop_for_mixed_placements(rank: int, world_size: int) -> None:
    mesh = _mesh()
    dense = _dense(7, 5, seed=9)
    for placements in MIXED:
        if any(isinstance(p, Partial) for p in placements):
            theirs = ds.to_dtensor(ds.distribute_tensor(dense, mesh, placements))
        else:
            theirs = dtensor_distribute(dense, mesh, placements)
        ours = ds.from_dtensor(theirs)
        assert list(ours.placements) == placements
        assert torch.equal(ours.local_tensor(), theirs.to_local())  # no copy, same block
        torch.testing.assert_close(ours.full_tensor(), dense)
        back = ds.to_dtensor(ours)
        assert tuple(back.placements) == tuple(placements)
        torch.testing.assert_close(back.full_tensor(), dense)


@multi_rank(world_size=[4])
def test_state_of_mixed_layouts(rank: int, world_size: int, tmp_path: Any) -> None:
    """DCP: save N-D layouts (copies, a pending sum) on 2x2; load on 4x1, 1x4 and a
    2-rank mesh, and into N-D layouts; torch.save round trip."""
    import io

    import torch.distributed.checkpoint as dcp

    mesh = _mesh()
    a, b = _dense(7, 6, seed=10), _dense(5, 4, seed=11)
    saved = {"a": ds.distribute_tensor(a, mesh, [Replicate(), Shard(0)]),
             "b": ds.distribute_tensor(b, mesh, [Partial(), Shard(1)])}
    dcp.save(saved, checkpoint_id=str(tmp_path / "ckpt"))
    for target_mesh, placements in [
            (init_device_mesh("cpu", (4, 1)), [Shard(0), Shard(1)]),
            (init_device_mesh("cpu", (1, 4)), [Shard(1), Shard(0)]),
            (mesh["dp"], [Shard(0)]),
            (mesh, [Shard(1), Replicate()]),
            (mesh, [Shard(0), Partial()])]:
        target = {name: ds.distribute_tensor(torch.zeros_like(v), target_mesh, placements)
                  for name, v in (("a", a), ("b", b))}
        dcp.load(target, checkpoint_id=str(tmp_path / "ckpt"))
        torch.testing.assert_close(target["a"].full_tensor(), a, msg=str(placements))
        torch.testing.assert_close(target["b"].full_tensor(), b, msg=str(placements))
    for value in saved.values():
        buffer = io.BytesIO()
        torch.save(value, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert loaded.sharding_spec() == value.sharding_spec()
        torch.testing.assert_close(loaded.full_tensor(), value.full_tensor())


# -- a 1-D spec as the placement of one mesh dim --------------------------------------

def _grid(cut: tuple[int, int], size: tuple[int, int]) -> Any:
    """A 2x2 grid cut at ``cut``, its blocks on ranks 1, 0 / 0, 1 (row-major)."""
    (r, c), (rows, cols) = cut, size
    boxes = [([0, 0], [r, c]), ([0, c], [r, cols - c]), ([r, 0], [rows - r, c]),
             ([r, c], [rows - r, cols - c])]
    return ds.EnumerableShardingSpec([ds.ShardMetadata(o, n, f"rank:{k}/cpu")
                                      for (o, n), k in zip(boxes, (1, 0, 0, 1), strict=True)])


def _one_dim_specs() -> dict[str, list[Any]]:
    """Placement lists with a 1-D spec on one mesh dim (its rank k: position k along it)."""
    grid = _grid((4, 3), (7, 5))
    several = ds.ChunkShardingSpec(0, ["rank:1/cpu", "rank:0/cpu", "rank:1/cpu"])
    with_empty = ds.ChunkShardingSpec(1, ["rank:0/cpu", "rank:1/cpu", "rank:0/cpu", "rank:1/cpu",
                                          "rank:0/cpu", "rank:1/cpu"])  # 5 columns: one empty
    return {"several blocks per rank, copies over dp": [Replicate(), several],
            "grid, pending sum over dp": [Partial(), grid],
            "chunks on dp (reversed), copies over tp": [
                ds.ChunkShardingSpec(1, ["rank:1/cpu", "rank:0/cpu"]), Replicate()],
            "grid on dp, pending max over tp": [grid, Partial("max")],
            "an empty block, pending mean over dp": [Partial("avg"), with_empty]}


@multi_rank(world_size=[4])
def test_one_dim_specs_compose_with_replicate_and_partial(rank: int, world_size: int) -> None:
    """A chunk spec (several blocks per rank, an empty block, any rank order) or a grid as
    the placement of one mesh dim, with Replicate or Partial on the other: the blocks are
    the spec's, copies stay equal, every move to and from other layouts and ops forward
    and backward give dense's values; torch.save keeps the layout."""
    import io

    mesh = _mesh()
    dense = _dense(7, 5, seed=30)
    weight = _dense(5, 3, seed=31)
    for name, placements in _one_dim_specs().items():
        x = ds.distribute_tensor(dense, mesh, placements).requires_grad_()
        assert list(x.placements) == placements, name
        spec = placements[0] if isinstance(placements[0], ds.ShardingSpec) else placements[1]
        along = 0 if spec is placements[0] else 1
        position = mesh.get_coordinate()[along]
        inner = spec.build_metadata(dense.shape, ds.TensorProperties(), (0, 1))
        expected = [s for s in inner.shards_metadata if s.placement.rank() == position]
        assert [list(s.shard_sizes) for s in (t.metadata for t in x.local_shards())] == \
            [list(s.shard_sizes) for s in expected], name
        torch.testing.assert_close(x.full_tensor(), dense, msg=name)
        if not x._layout.pending:
            _copies_agree(x.detach())
            for shard, block in zip(expected, x.local_blocks(), strict=True):
                box = tuple(slice(o, o + n) for o, n in zip(shard.shard_offsets,
                                                             shard.shard_sizes, strict=True))
                torch.testing.assert_close(block.detach(), dense[box], rtol=0, atol=0)
        # Moves to and from a Shard layout and to the other spec layouts.
        there = x.redistribute(mesh, [Shard(0), Shard(1)])
        torch.testing.assert_close(there.full_tensor(), dense, msg=name)
        back = there.redistribute(mesh, placements)
        torch.testing.assert_close(back.full_tensor(), dense, msg=name)
        for other in _one_dim_specs().values():
            if not any(isinstance(p, Partial) for p in other):
                torch.testing.assert_close(x.redistribute(mesh, other).full_tensor(), dense)
        # Ops, forward and backward.
        for op in (lambda t: (t * 2 + 1).sin(), lambda t: torch.softmax(t, 1),
                   lambda t: t @ weight, lambda t: t.sum(0), lambda t: t.t().reshape(35)):
            leaf = x.detach().requires_grad_()
            d = dense.clone().requires_grad_()
            got, want = op(leaf), op(d)
            torch.testing.assert_close(got.full_tensor(), want, msg=name)
            (got * got).sum().backward()
            (want * want).sum().backward()
            torch.testing.assert_close(leaf.grad.full_tensor(), d.grad, msg=name)
        buffer = io.BytesIO()
        torch.save(x.detach(), buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert loaded._layout is x._layout
        torch.testing.assert_close(loaded.full_tensor(), dense)


@multi_rank(world_size=[4])
def test_one_dim_spec_layouts_save_load_and_train(rank: int, world_size: int,
                                                  tmp_path: Any) -> None:
    """DCP saves spec-on-a-mesh-dim layouts (copies, a pending sum) and loads them on
    other meshes and into them; an MLP whose first weight is a grid over tp (copies over
    dp) and whose second is chunked in several blocks per rank trains like dense."""
    import torch.distributed.checkpoint as dcp

    mesh = _mesh()
    specs = _one_dim_specs()
    a = _dense(7, 5, seed=32)
    saved = {name: ds.distribute_tensor(a * (k + 1), mesh, placements)
             for k, (name, placements) in enumerate(specs.items())}
    dcp.save(saved, checkpoint_id=str(tmp_path / "ckpt"))
    targets = [(init_device_mesh("cpu", (4, 1)), [Shard(0), Shard(1)]),
               (mesh["dp"], [Shard(1)]), *((mesh, p) for p in specs.values())]
    for target_mesh, placements in targets:
        target = {name: ds.distribute_tensor(torch.zeros_like(a), target_mesh, placements)
                  for name in saved}
        dcp.load(target, checkpoint_id=str(tmp_path / "ckpt"))
        for k, name in enumerate(saved):
            torch.testing.assert_close(target[name].full_tensor(), a * (k + 1),
                                       msg=f"{name} into {placements}")
    grid = _grid((8, 4), (12, 8))
    several = ds.ChunkShardingSpec(1, ["rank:0/cpu", "rank:1/cpu", "rank:0/cpu"])
    plan = {"0.weight": [Replicate(), grid], "2.weight": [Replicate(), several],
            "2.bias": [ds.ChunkShardingSpec(0, ["rank:1/cpu", "rank:0/cpu"]), Replicate()]}
    _train(_mlp(), plan, batch=[Shard(0), Replicate()])


# -- training on a 2x2 ("dp", "tp") mesh ------------------------------------------------

def _train(model: nn.Module, plan: dict[str, list[Any]], batch: list[Any], steps: int = 3,
           inputs: Any = None, mesh: Any = None) -> None:
    """AdamW steps of ``model`` float32 dense, float32 sharded by ``plan`` (parameter
    name -> placements), and float64 dense (the reference); batches laid out by
    ``batch``. The sharded model must be as close to the reference as dense is."""
    mesh = mesh or _mesh()
    reference = copy.deepcopy(model).double()
    sharded = copy.deepcopy(model)
    for name, placements in plan.items():
        owner, attr = name.rsplit(".", 1)
        module = sharded.get_submodule(owner)
        setattr(module, attr, nn.Parameter(ds.distribute_tensor(
            getattr(module, attr).detach(), mesh, placements)))
    models = (reference, model, sharded)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    generator = torch.Generator().manual_seed(3)
    make = inputs or (lambda g: (torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)))
    for _ in range(steps):
        x, y = make(generator)
        for m, optimizer in zip(models, optimizers, strict=True):
            xi, yi = x, y
            if m is reference:
                xi, yi = (v.double() if v.is_floating_point() else v for v in (x, y))
            elif m is sharded:
                xi, yi = (ds.distribute_tensor(v, mesh, batch) for v in (x, y))
            optimizer.zero_grad()
            loss = F.mse_loss(m(xi), yi)
            loss.backward()
            optimizer.step()
    for (name, ours), theirs, exact in zip(sharded.named_parameters(), model.parameters(),
                                           reference.parameters(), strict=True):
        if name in plan:
            assert list(ours.placements) == plan[name], name
            _copies_agree(ours.detach())
            ours = ours.detach().full_tensor()
        ours_error = (ours.double() - exact).abs().max().item()
        dense_error = (theirs.detach().double() - exact).abs().max().item()
        assert ours_error <= 4 * dense_error + 1e-6, (name, ours_error, dense_error)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))


@multi_rank(world_size=[4])
def test_dp_x_tp_megatron_mlp_trains_like_dense(rank: int, world_size: int) -> None:
    plan = {"0.weight": [Replicate(), Shard(0)], "0.bias": [Replicate(), Shard(0)],
            "2.weight": [Replicate(), Shard(1)], "2.bias": [Replicate(), Replicate()]}
    _train(_mlp(), plan, batch=[Shard(0), Replicate()])


@multi_rank(world_size=[4])
def test_fsdp_x_tp_mlp_trains_like_dense(rank: int, world_size: int) -> None:
    plan = {"0.weight": [Shard(1), Shard(0)], "0.bias": [Shard(0), Shard(0)],
            "2.weight": [Shard(0), Shard(1)], "2.bias": [Shard(0), Replicate()]}
    _train(_mlp(), plan, batch=[Shard(0), Replicate()])


@multi_rank(world_size=[4])
def test_hsdp_mlp_trains_like_dense(rank: int, world_size: int) -> None:
    """Replicated over one mesh dim, sharded over the other, the batch over both."""
    plan = {name: [Replicate(), Shard(0)] for name in ("0.weight", "0.bias", "2.weight",
                                                       "2.bias")}
    _train(_mlp(), plan, batch=[Shard(0), Shard(0)])


class _Block(nn.Module):
    """A pre-norm transformer block with SDPA: heads split by the tp layout of q/k/v."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(x)


@multi_rank(world_size=[4])
def test_dp_x_tp_transformer_block_trains_like_dense(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    before = holders.flattened.copy()
    plan = {"qkv.weight": [Replicate(), Shard(0)], "qkv.bias": [Replicate(), Shard(0)],
            "out.weight": [Replicate(), Shard(1)], "mlp.0.weight": [Replicate(), Shard(0)],
            "mlp.0.bias": [Replicate(), Shard(0)], "mlp.2.weight": [Replicate(), Shard(1)]}
    _train(_Block(), plan, batch=[Shard(0), Replicate()], steps=2,
           inputs=lambda g: (torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)))
    # Layer norm, attention and the linears run per mesh dim (mesh_rules), forward and
    # backward; what is left is served flattened (see dispatch_shard.holders).
    flattened = holders.flattened - before
    served = {"aten.native_layer_norm.default", "aten.native_layer_norm_backward.default",
              "aten._scaled_dot_product_flash_attention_for_cpu.default",
              "aten._scaled_dot_product_flash_attention_for_cpu_backward.default",
              "aten.mm.default", "aten.addmm.default", "aten.t.default"}
    assert not served & set(flattened), flattened


@multi_rank(world_size=[4])
def test_parallelize_takes_a_mesh_and_per_dim_plans(rank: int, world_size: int) -> None:
    from dispatch_shard.examples import MLP, parallelize

    mesh = _mesh()
    torch.manual_seed(0)
    dense = MLP(8, 12)
    model = parallelize(copy.deepcopy(dense), {"dp": "fsdp",
                                               "tp": {"fc1": "colwise", "fc2": "rowwise"}},
                        mesh=mesh)
    assert list(model.fc1.weight.placements) == [Shard(0), Shard(0)]
    assert list(model.fc2.weight.placements) == [Shard(0), Shard(1)]
    assert list(model.fc2.bias.placements) == [Shard(0), Replicate()]
    x = _dense(6, 8, dtype=torch.float32)
    out = model(ds.distribute_tensor(x, mesh, [Shard(0), Replicate()]))
    torch.testing.assert_close(out.full_tensor(), dense(x))
    with pytest.raises(ValueError, match="plan names mesh dims"):
        parallelize(copy.deepcopy(dense), {"pp": "replicate"}, mesh=mesh)


@multi_rank(world_size=[4])
def test_the_demo_on_a_2x2_mesh(rank: int, world_size: int) -> None:
    """``dispatch-shard-demo --mesh 2x2``: DP x TP, the batch split over dp, as close to
    the dense model as the 1-D demo."""
    from dispatch_shard import demo

    args = demo._parse(["--mesh", "2x2", "--steps", "2", "--width", "8"])
    assert args.ranks == 4 and args.mesh == (2, 2)
    assert demo._run(rank, world_size, args) < 1e-5


@multi_rank(world_size=[4], timeout_s=240.0)
def test_hugging_face_llama_dp_x_tp_trains_like_dense(rank: int, world_size: int) -> None:
    """A ``transformers`` LlamaForCausalLM (tiny random config, grouped-query SDPA
    attention, rotary embeddings, its own causal-LM loss) with Megatron TP on "tp", the
    embedding table's rows split, and ``input_ids`` split over "dp"; AdamW."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    from transformers import LlamaConfig, LlamaForCausalLM

    from dispatch_shard.examples import parallelize

    mesh = _mesh()
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, attn_implementation="sdpa")
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config)
    reference = copy.deepcopy(dense).double()
    sharded = copy.deepcopy(dense)
    tp = {"model.embed_tokens": "table_rowwise"}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        tp |= {f"{layer}.self_attn.{p}": "colwise" for p in ("q_proj", "k_proj", "v_proj")}
        tp |= {f"{layer}.mlp.{p}": "colwise" for p in ("gate_proj", "up_proj")}
        tp |= {f"{layer}.self_attn.o_proj": "rowwise", f"{layer}.mlp.down_proj": "rowwise"}
    parallelize(sharded, {"dp": "replicate", "tp": tp}, mesh=mesh)
    models = (reference, dense, sharded)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 64, (4, 10), generator=generator)
        losses = []
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            inputs = ds.distribute_tensor(ids, mesh, [Shard(0), Replicate()]) \
                if model is sharded else ids
            loss = model(input_ids=inputs, labels=inputs).loss
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach().full_tensor() if model is sharded
                                else loss.detach()))
        assert abs(losses[2] - losses[0]) <= 4 * abs(losses[1] - losses[0]) + 1e-5, losses
    ours = theirs = 0.0
    for mine, plain, exact in zip(sharded.parameters(), dense.parameters(),
                                  reference.parameters(), strict=True):
        value = mine.detach().full_tensor() if isinstance(mine, ShardedTensor) else mine
        ours = max(ours, (value.double() - exact).abs().max().item())
        theirs = max(theirs, (plain.detach().double() - exact).abs().max().item())
    assert ours <= 4 * theirs + 1e-6, (ours, theirs)


@multi_rank(world_size=[4])
def test_metadata_of_a_pending_nd_layout_needs_no_communication(rank: int,
                                                                world_size: int) -> None:
    """``metadata()`` and ``is_pinned()`` read the layout and the local blocks only, so
    one rank may call them alone (they once flattened the tensor: an all-to-all)."""
    mesh = _mesh()
    terms = ds.distribute_tensor(_dense(4, 4, seed=15), mesh, [Partial(), Shard(1)])
    with ds.count_collectives() as counted:
        if rank == 0:
            meta = terms.metadata()
            assert meta.size == torch.Size([4, 4]) and not terms.is_pinned()
    assert not counted.events, counted.events


@multi_rank(world_size=[4])
def test_visualize_and_copy_nd_layouts(rank: int, world_size: int) -> None:
    mesh = _mesh()
    dense = _dense(4, 4, seed=12)
    copies = ds.distribute_tensor(dense, mesh, [Replicate(), Shard(0)])
    text = ds.visualize_sharding(copies, show=False)
    assert "rank 0, rank 2" in text and "rank 1, rank 3" in text, text
    terms = ds.distribute_tensor(dense, mesh, [Partial(), Shard(1)])
    text = ds.visualize_sharding(terms, show=False)
    assert "rank 0 + rank 2" in text and "rank 1 + rank 3" in text, text
    for value in (copies, terms):
        twin = copy.deepcopy(value)
        assert twin._layout is value._layout
        torch.testing.assert_close(twin.full_tensor(), dense)


@multi_rank(world_size=[4])
def test_dp_x_tp_mlp_step_is_served_per_mesh_dim(rank: int, world_size: int) -> None:
    """No op of a DP x TP MLP step is flattened: the matmuls, transposes, the bias adds
    (broadcast), the loss and the bias gradients' sums run per mesh dim. The step then
    moves the minimum: the row-parallel output's sum over tp, the loss's over dp, each
    rank sending to its one peer, and the gradients' sum over dp, in one bucket."""
    _mlp_step_moves_the_minimum(_mesh())


def _peers(mesh: Any, mesh_dim: int) -> list[int]:
    """This rank's peers along ``mesh_dim`` (itself included), sorted."""
    line = mesh.mesh.movedim(mesh_dim, -1)[mesh.get_coordinate()[1 - mesh_dim]]
    return sorted(int(r) for r in line)


def _mlp_step_moves_the_minimum(mesh: Any) -> None:
    model = _mlp()  # Linear(8, 12), GELU, Linear(12, 8)
    plan = {"0.weight": [Replicate(), Shard(0)], "0.bias": [Replicate(), Shard(0)],
            "2.weight": [Replicate(), Shard(1)], "2.bias": [Replicate(), Replicate()]}
    for name, placements in plan.items():
        layer, attr = model[int(name[0])], name[2:]
        setattr(layer, attr, nn.Parameter(ds.distribute_tensor(
            getattr(layer, attr).detach(), mesh, placements)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = (ds.distribute_tensor(_dense(6, 8, seed=s, dtype=torch.float32), mesh,
                                 [Shard(0), Replicate()]) for s in (13, 14))
    before = holders.flattened.copy()
    with ds.count_collectives() as counted:
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    assert holders.flattened == before, holders.flattened - before
    # The loss is the same value on every rank: one rank alone may read it.
    assert not loss._layout.pending
    with ds.count_collectives() as read:
        loss.item()
    assert read.events == []
    rows, floats = 3, 4  # 6 rows over dp; float32
    grads = {"0.weight": 6 * 8, "0.bias": 6, "2.weight": 8 * 6, "2.bias": 8}  # per rank
    expected = {"forward: row-parallel output over tp": rows * 8 * floats,
                "loss over dp": floats,
                "gradients over dp, one bucket": sum(grads.values()) * floats}
    assert sorted(e.nbytes for e in counted.events) == sorted(expected.values()), \
        counted.events
    bucket = counted.events[-1]
    assert bucket.kind == "all_reduce" and sorted(bucket.ranks) == _peers(mesh, 0), bucket
    for event in counted.events[:-1]:  # each of the others on this rank's tp or dp peers
        assert sorted(event.ranks) in (_peers(mesh, 0), _peers(mesh, 1)), event


@multi_rank(world_size=[5])
def test_a_mesh_over_some_ranks_moves_on_its_own_sub_groups(rank: int,
                                                            world_size: int) -> None:
    """A 2x2 mesh over ranks 1-4 of 5, in no rank order. Moves along one mesh dim run on
    that dim's process groups of the DeviceMesh, not on the whole mesh's group, with the
    minimum bytes; a DP x TP MLP step does too (its gradient bucket on the dp peers), and
    trains like dense. Rank 0, outside the mesh, takes no part after making the mesh."""
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh("cpu", torch.tensor([[1, 3], [4, 2]]), mesh_dim_names=("dp", "tp"))
    if mesh.get_coordinate() is None:
        return
    dense = _dense(8, 6, seed=3)  # float64: a 4x6 half is 192 bytes
    y = ds.distribute_tensor(dense, mesh, [Replicate(), Shard(0)])
    with ds.count_collectives() as counted:
        gathered = y.redistribute(mesh, [Replicate(), Replicate()])
    assert [(sorted(e.ranks), e.nbytes) for e in counted.events] == [(_peers(mesh, 1), 192)]
    torch.testing.assert_close(gathered.local_tensor(), dense, rtol=0, atol=0)
    p = ds.distribute_tensor(dense, mesh, [Partial(), Shard(0)]) * 3.0
    with ds.count_collectives() as counted:
        summed = p.redistribute(mesh, [Replicate(), Shard(0)])
    assert [(sorted(e.ranks), e.nbytes) for e in counted.events] == [(_peers(mesh, 0), 192)], \
        counted.events
    torch.testing.assert_close(summed.full_tensor(), 3.0 * dense)
    _mlp_step_moves_the_minimum(mesh)
    plan = {"0.weight": [Replicate(), Shard(0)], "0.bias": [Replicate(), Shard(0)],
            "2.weight": [Replicate(), Shard(1)], "2.bias": [Replicate(), Replicate()]}
    _train(_mlp(), plan, batch=[Shard(0), Replicate()], mesh=mesh)


@multi_rank(world_size=[4])
def test_a_users_sharding_rule_serves_nd_operands_per_mesh_dim(rank: int,
                                                               world_size: int) -> None:
    import test_rules  # (registers dsrules::scaled_mm by its rule)

    mesh = _mesh()
    a, b = _dense(6, 4, seed=15), _dense(4, 5, seed=16)
    x = ds.distribute_tensor(a, mesh, [Shard(0), Shard(1)]).requires_grad_()
    w = ds.distribute_tensor(b, mesh, [Replicate(), Shard(0)]).requires_grad_()
    before = holders.flattened.copy()
    out = torch.ops.dsrules.scaled_mm(x, w)
    assert holders.flattened == before, holders.flattened - before
    # dp: rows split, w copied -> rows split; tp: k split in both -> a pending sum.
    assert out._layout.spec.placements == (("shard", 0), ("partial", "sum"))
    torch.testing.assert_close(out.full_tensor(), test_rules.scaled_mm(a, b))
    out.sum().backward()
    dense_a, dense_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    test_rules.scaled_mm(dense_a, dense_b).sum().backward()
    torch.testing.assert_close(x.grad.full_tensor(), dense_a.grad)
    torch.testing.assert_close(w.grad.full_tensor(), dense_b.grad)


@multi_rank(world_size=[4])
def test_in_place_views_of_mesh_tensors(rank: int, world_size: int) -> None:
    """``x.unsqueeze_(0)`` on an N-D layout changes ``x``'s shape (it takes the view's
    layout); ``vector @ matrix``, whose composite squeezes its result in place, works on a
    pending mesh value, empty contraction included (a write-back into the old N-D blocks
    used to fail on the new shape)."""
    mesh = init_device_mesh("cpu", (2, 2))
    torch.manual_seed(0)
    for rows in (3, 0):
        dense, vector = torch.randn(rows, 2), torch.randn(rows)
        x = ds.distribute_tensor(dense, mesh, [Partial(), Shard(1)])
        torch.testing.assert_close((vector @ x).full_tensor(), vector @ dense)
        z = ds.distribute_tensor(dense, mesh, [Replicate(), Shard(1)])
        assert z.unsqueeze_(0) is z and z.shape == (1, rows, 2)
        assert torch.equal(z.full_tensor(), dense.unsqueeze(0))


@multi_rank(world_size=[4])
def test_strided_views_and_fused_cross_entropy_on_a_2x2_mesh(rank: int, world_size: int) -> None:
    """``as_strided`` (a view inside blocks and one across them), ``unfold``, ``stft`` and
    torch's fused linear + cross-entropy on mixed 2x2-mesh placements, uneven sizes and a
    Partial on one mesh dim: forward and backward equal dense."""
    mesh = _mesh()
    signal, matrix = _dense(7, 12, seed=1), _dense(9, 5, seed=2)
    x_dense, bias = _dense(7, 5, seed=3), _dense(9, seed=4)
    target = torch.tensor([0, 4, 8, 3, 2, 7, 1])
    window = torch.hann_window(8, dtype=torch.float64)

    def strided(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"as_strided within rows": t.as_strided((7, 5), (12, 2), 1),
                "as_strided across rows": t.as_strided((10, 6), (7, 3), 2),
                "unfold": t.unfold(1, 4, 3),
                "stft": torch.view_as_real(torch.stft(t, 8, 4, window=window,
                                                      return_complex=True))}

    options = torch.nn.LinearCrossEntropyOptions()
    for placements in ([Shard(0), Replicate()], [Replicate(), Shard(1)], [Shard(0), Shard(1)],
                       [Partial(), Shard(0)]):
        leaf = ds.distribute_tensor(signal, mesh, placements).requires_grad_()
        reference = signal.clone().requires_grad_()
        got, want = strided(leaf), strided(reference)
        for name in want:
            torch.testing.assert_close(got[name].full_tensor(), want[name],
                                       msg=f"{name} on {placements}")
        sum(v.sum() * (i + 1) for i, v in enumerate(got.values())).backward()
        sum(v.sum() * (i + 1) for i, v in enumerate(want.values())).backward()
        torch.testing.assert_close(leaf.grad.full_tensor(), reference.grad,
                                   msg=f"strided gradients on {placements}")
    for x_pl, w_pl in (([Shard(0), Replicate()], [Replicate(), Shard(0)]),
                       ([Replicate(), Shard(1)], [Replicate(), Shard(1)]),
                       ([Shard(0), Shard(0)], [Replicate(), Replicate()])):
        leaves = [ds.distribute_tensor(v, mesh, pl).requires_grad_()
                  for v, pl in ((x_dense, x_pl), (matrix, w_pl), (bias, [Replicate(),
                                                                           Replicate()]))]
        dense = [v.clone().requires_grad_() for v in (x_dense, matrix, bias)]
        loss = F.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2],
                                      options=options)
        want_loss = F.cross_entropy(F.linear(*dense), target)
        torch.testing.assert_close(loss.full_tensor(), want_loss, msg=f"{x_pl}, {w_pl}")
        loss.backward()
        want_loss.backward()
        for ours, theirs in zip(leaves, dense, strict=True):
            torch.testing.assert_close(ours.grad.full_tensor(), theirs.grad,
                                       msg=f"fused CE gradients on {x_pl}, {w_pl}")


@multi_rank(world_size=[4])
def test_shifted_logits_cross_entropy_on_a_2x2_mesh(rank: int, world_size: int) -> None:
    """A language model's loss on mixed 2x2-mesh placements (uneven batch, a batch-split
    target, logits split or partial over "tp"): ``logits[:, :-1]`` and ``ids[:, 1:]``
    (``slice_backward`` in backward, NOTE [a slice's gradient, block by block]) into
    cross-entropy (NOTE [a batch-split target stays split]), with ignored tokens; a bad
    target raises dense's error on every rank. Loss and gradient equal dense."""
    mesh = _mesh()
    logits, vocab = _dense(5, 6, 7, seed=11), 7
    ids = torch.randint(0, vocab, (5, 6), generator=torch.Generator().manual_seed(12))
    ids[1, 3] = -100
    for x_pl, t_pl in (([Shard(0), Replicate()], [Shard(0), Replicate()]),
                       ([Shard(0), Shard(2)], [Shard(0), Replicate()]),
                       ([Shard(0), Partial()], [Shard(0), Replicate()]),
                       ([Shard(0), Shard(0)], [Shard(0), Shard(0)])):
        leaf = ds.distribute_tensor(logits, mesh, x_pl).requires_grad_()
        target = ds.distribute_tensor(ids, mesh, t_pl)
        reference = logits.clone().requires_grad_()
        for reduction in ("mean", "sum", "none"):
            got = F.cross_entropy(leaf[:, :-1].reshape(-1, vocab), target[:, 1:].reshape(-1),
                                  reduction=reduction)
            want = F.cross_entropy(reference[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1),
                                   reduction=reduction)
            torch.testing.assert_close(got.full_tensor(), want, msg=f"{x_pl} {reduction}")
            got.sum().backward()
            want.sum().backward()
            torch.testing.assert_close(leaf.grad.full_tensor(), reference.grad,
                                       msg=f"{x_pl} {reduction}")
        bad = ids.clone()
        bad[4, 5] = vocab  # on the last rows' holders only
        with pytest.raises(IndexError, match=f"Target {vocab} is out of bounds"):
            F.cross_entropy(leaf[:, :-1].reshape(-1, vocab),
                            ds.distribute_tensor(bad, mesh, t_pl)[:, 1:].reshape(-1))


@multi_rank(world_size=[4])
def test_new_tensor_draws_out_variants_and_partial_copies_on_a_2x2_mesh(rank: int,
                                                                         world_size: int) -> None:
    """On mixed 2x2-mesh placements (uneven, a Partial on one mesh dim): random draws that
    make a new tensor give dense's values inside dense_equivalent(); an ``out=`` overload
    writes into a mesh tensor and into a plain one; ``copy_`` between Partials of one layout
    copies the terms."""
    mesh = _mesh()
    dense = _dense(7, 5, seed=8).abs() + 0.1
    draws = {"randint_like": lambda t: torch.randint_like(t, 0, 9),
             "bernoulli(p)": lambda t: t.bernoulli(0.3),
             "poisson": torch.poisson,
             "multinomial": lambda t: torch.multinomial(t, 3)}
    for placements in ([Shard(0), Replicate()], [Replicate(), Shard(1)], [Shard(0), Shard(1)],
                       [Partial(), Shard(0)]):
        x = ds.distribute_tensor(dense, mesh, placements)
        for name, draw in draws.items():
            torch.manual_seed(3)
            with ds.random.dense_equivalent():
                ours = draw(x)
            torch.manual_seed(3)
            assert torch.equal(ours.full_tensor(), draw(dense)), f"{name} on {placements}"
        weight = ds.distribute_tensor(_dense(5, 3, seed=9), mesh, [Replicate(), Replicate()])
        plain = torch.empty(7, 3, dtype=dense.dtype)
        torch.mm(x, weight, out=plain)
        torch.testing.assert_close(plain, dense @ _dense(5, 3, seed=9))
        into = ds.distribute_tensor(torch.zeros(7, 3, dtype=dense.dtype), mesh,
                                    [Shard(0), Replicate()])
        torch.mm(x, weight, out=into)
        assert into.placements == (Shard(0), Replicate())
        torch.testing.assert_close(into.full_tensor(), dense @ _dense(5, 3, seed=9))
    pending = ds.distribute_tensor(dense, mesh, [Partial(), Shard(0)])
    target = ds.distribute_tensor(torch.zeros(7, 5, dtype=dense.dtype), mesh,
                                  [Partial(), Shard(0)])
    assert target._layout is pending._layout  # (layouts are interned)
    with ds.count_collectives() as counted:
        target.copy_(pending)
    assert counted.counts == {}
    torch.testing.assert_close(target.full_tensor(), dense)
    with pytest.raises(NotImplementedError, match="reduction pending over a mesh dim"):
        target.copy_(ds.distribute_tensor(dense, mesh, [Shard(0), Replicate()]))
