"""visualize_sharding output (expecttest snapshots) and the collective counter's counts."""

from __future__ import annotations

import copy

import expecttest
import torch
import torch.nn.functional as F
from layouts import cols, grid, rows, several, shard

import dispatch_shard as ds
from dispatch_shard.examples import MLP, parallelize
from dispatch_shard.observe import count_collectives, sharding_svg, visualize_sharding
from dispatch_shard.testing import get_pool, multi_rank


def _render(rank: int, world_size: int, case: str) -> str:
    size = (10, 7)
    specs = {"rows": rows(world_size), "cols": cols(world_size), "several": several(world_size),
             "grid": grid(size, world_size), "replicate": ds.Replicate(),
             "partial": ds.Partial(), "subset": ds.ChunkShardingSpec(0, ["rank:2/cpu",
                                                                          "rank:1/cpu"])}
    if case == "vector":
        return visualize_sharding(ds.zeros(rows(world_size), 9), show=False)
    if case == "3d":
        return visualize_sharding(ds.zeros(ds.ChunkShardingSpec(1, ["rank:0/cpu", "rank:1/cpu"]),
                                           2, 5, 3), show=False)
    return visualize_sharding(ds.zeros(specs[case], *size), show=False)


class TestVisualizeSharding(expecttest.TestCase):
    def render(self, case: str) -> str:
        results = get_pool(4).run(_render, case=case)
        assert all(r == results[0] for r in results)  # the same picture on every rank
        return str(results[0])

    def test_rows_uneven(self) -> None:
        self.assertExpectedInline(self.render("rows"), """\
ShardedTensor 10x7 float32, chunked along dim 0 over ranks [0, 1, 2, 3]
       | [0:7]
-------+-------
[0:3]  | rank 0
[3:6]  | rank 1
[6:9]  | rank 2
[9:10] | rank 3""")

    def test_columns(self) -> None:
        self.assertExpectedInline(self.render("cols"), """\
ShardedTensor 10x7 float32, chunked along dim 1 over ranks [0, 1, 2, 3]
       | [0:2]  | [2:4]  | [4:6]  | [6:7]
-------+--------+--------+--------+-------
[0:10] | rank 0 | rank 1 | rank 2 | rank 3""")

    def test_several_blocks_per_rank(self) -> None:
        self.assertExpectedInline(self.render("several"), """\
ShardedTensor 10x7 float32, chunked along dim 0 over ranks [1, 0, 3, 2, 1, 0, 3, 2]
       | [0:7]
-------+-------
[0:2]  | rank 1
[2:4]  | rank 0
[4:6]  | rank 3
[6:8]  | rank 2
[8:10] | rank 1""")

    def test_enumerable_grid(self) -> None:
        self.assertExpectedInline(self.render("grid"), """\
ShardedTensor 10x7 float32, 4 enumerated blocks
       | [0:3]  | [3:7]
-------+--------+-------
[0:6]  | rank 0 | rank 1
[6:10] | rank 2 | rank 3""")

    def test_replicated_and_partial(self) -> None:
        self.assertExpectedInline(self.render("replicate"), """\
ShardedTensor 10x7 float32, Replicate()
ranks 0-3 (replicated) hold the whole tensor""")
        self.assertExpectedInline(self.render("partial"), """\
ShardedTensor 10x7 float32, Partial(reduce_op='sum')
ranks 0-3 (partial sum) each hold a full-size summand""")

    def test_subset_of_ranks_and_vectors_and_3d(self) -> None:
        self.assertExpectedInline(self.render("subset"), """\
ShardedTensor 10x7 float32, chunked along dim 0 over ranks [2, 1]
       | [0:7]
-------+-------
[0:5]  | rank 2
[5:10] | rank 1""")
        self.assertExpectedInline(self.render("vector"), """\
ShardedTensor 9 float32, chunked along dim 0 over ranks [0, 1, 2, 3]
 | [0:3]  | [3:6]  | [6:9]
-+--------+--------+-------
 | rank 0 | rank 1 | rank 2""")
        self.assertExpectedInline(self.render("3d"), """\
ShardedTensor 2x5x3 float32, chunked along dim 1 over ranks [0, 1]
rank 0: [0:2] x [0:3] x [0:3]
rank 1: [0:2] x [3:5] x [0:3]""")


@multi_rank(world_size=[2])
def test_sharding_svg_draws_one_rectangle_per_block(rank: int, world_size: int) -> None:
    svg = sharding_svg(ds.zeros(several(world_size), 10, 7))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<rect") == 4  # two blocks per rank


@multi_rank(world_size=[4])
def test_collective_counter_counts_and_names_ops(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    dense = MLP(8, 16)
    model = parallelize(copy.deepcopy(dense), {"fc1": "colwise", "fc2": "rowwise"}, world_size)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    with count_collectives() as forward:
        out = model(x)
    assert forward.counts == {}  # column- then row-parallel: nothing until consumed
    with count_collectives() as loss_counter:
        loss = F.mse_loss(out, y)
    assert loss_counter.counts == {"all_reduce": 1}
    torch.testing.assert_close(loss.full_tensor(), F.mse_loss(dense(x), y))
    event = loss_counter.events[0]
    assert event.op == "aten.mse_loss.default"  # the user-level op that caused it
    # The aten op that issued it: mse_loss's decomposition reduces its partial input first
    # (NOTE [decompositions get reduced inputs]).
    assert event.primitive == "aten.mse_loss.default"
    assert event.nbytes == 6 * 8 * 4  # one float32 [6, 8] buffer
    sharded = shard(torch.randn(10, 7), rows(world_size))
    with count_collectives() as outer:
        with count_collectives() as inner:
            sharded.redistribute(cols(world_size))
        sharded.full_tensor()
    assert inner.counts == {"all_to_all": 1}
    assert outer.counts == {"all_to_all": 2}  # nested counters both see the inner ones
    assert loss_counter.by_op() == {("aten.mse_loss.default", "all_reduce"): 1}


