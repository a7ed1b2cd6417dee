"""torch.compile of code on ShardedTensors: compiled equals eager, collectives in the graph.

Most tests use the ``aot_eager`` backend (AOTAutograd traces our ``__torch_dispatch__``
on fake blocks; the graph then runs eagerly); one uses ``inductor``. A backend that
records the graphs it is given shows the functional collectives inside them.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from layouts import rows
from torch import nn

import dispatch_shard as ds
from dispatch_shard.examples import MLP, TransformerBlock, parallelize
from dispatch_shard.testing import multi_rank


class _Recorder:
    """An ``aot_eager`` backend that keeps the forward and backward graphs it compiles."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        from torch._dynamo.backends.common import aot_autograd

        def keep(graph: torch.fx.GraphModule, _: Any) -> Any:
            self.graphs.append(graph)
            return graph.forward

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    def collectives(self) -> list[str]:
        return [str(node.target) for graph in self.graphs for node in graph.graph.nodes
                if node.op == "call_function" and "_c10d_functional" in str(node.target)
                and "wait_tensor" not in str(node.target)]


def _full(value: Any) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, ds.ShardedTensor) else value


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    yield
    torch._dynamo.reset()


@multi_rank(world_size=[2])
def test_pointwise_compiles_to_one_graph(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    dense = torch.randn(7, 4)
    x = ds.ShardedTensor.from_replicated(dense, rows(world_size))

    def f(t: torch.Tensor) -> torch.Tensor:
        return (t * 2 + 1).relu().sum(dim=1)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert isinstance(out, ds.ShardedTensor)
    assert out.sharding_spec() == f(x).sharding_spec()
    torch.testing.assert_close(out.full_tensor(), f(dense))
    torch._dynamo.reset()


def _tp_mlp(world_size: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = MLP(8, 16)
    return dense, parallelize(copy.deepcopy(dense), {"fc1": "colwise", "fc2": "rowwise"},
                              world_size)


@multi_rank(world_size=[2, 4])
def test_tensor_parallel_mlp_fullgraph_has_functional_collectives(rank: int,
                                                                  world_size: int) -> None:
    dense, sharded = _tp_mlp(world_size)
    recorder = _Recorder()
    compiled = torch.compile(sharded, backend=recorder, fullgraph=True)
    torch.manual_seed(1)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    for _ in range(2):  # the second call reuses the graph
        loss = F.mse_loss(compiled(x), y)
        loss.backward()
    dense_loss = F.mse_loss(dense(x), y)
    dense_loss.backward()
    dense_loss = F.mse_loss(dense(x), y)  # (two steps of gradient, as above)
    dense_loss.backward()
    torch.testing.assert_close(_full(loss), dense_loss.detach())
    for ours, theirs in zip(sharded.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(_full(ours.grad), theirs.grad)
    assert len(recorder.graphs) == 2  # one forward, one backward: no recompilation
    # The row-parallel output is partial: its sum runs in the graph, as an all-reduce
    # (forward: the loss needs it; backward: the input gradient of fc1 needs one too).
    assert "_c10d_functional.all_reduce.default" in recorder.collectives(), \
        recorder.collectives()


@multi_rank(world_size=[2])
def test_inductor_compiles_the_tensor_parallel_mlp(rank: int, world_size: int) -> None:
    dense, sharded = _tp_mlp(world_size)
    compiled = torch.compile(sharded, backend="inductor", fullgraph=True)
    torch.manual_seed(2)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    F.mse_loss(compiled(x), y).backward()
    F.mse_loss(dense(x), y).backward()
    for ours, theirs in zip(sharded.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(_full(ours.grad), theirs.grad)


@multi_rank(world_size=[2])
def test_data_parallel_model_compiles_and_buckets_its_gradients(rank: int,
                                                                world_size: int) -> None:
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    sharded = copy.deepcopy(dense)
    for name, param in list(sharded.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(sharded.get_submodule(owner), attr, nn.Parameter(
            ds.ShardedTensor.from_replicated(param.detach(), ds.Replicate())))
    compiled = torch.compile(sharded, backend="aot_eager", fullgraph=True)
    x, y = torch.randn(6 * world_size, 8), torch.randn(6 * world_size, 4)
    xs = ds.ShardedTensor.from_replicated(x, rows(world_size))
    ys = ds.ShardedTensor.from_replicated(y, rows(world_size))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (dense, sharded)]
    for _ in range(2):
        for model, opt, a, b in ((dense, optimizers[0], x, y),
                                 (compiled, optimizers[1], xs, ys)):
            opt.zero_grad()
            F.mse_loss(model(a), b).backward()
            opt.step()
    for ours, theirs in zip(sharded.parameters(), dense.parameters(), strict=True):
        assert ours.grad.sharding_spec() == ds.Replicate()
        torch.testing.assert_close(_full(ours.detach()), theirs.detach())


@multi_rank(world_size=[2])
def test_transformer_block_compiles(rank: int, world_size: int) -> None:
    from dispatch_shard.examples import TRANSFORMER_PLAN

    torch.manual_seed(4)
    dense = TransformerBlock(8, heads=2, hidden=16)
    sharded = parallelize(copy.deepcopy(dense), TRANSFORMER_PLAN, world_size)
    compiled = torch.compile(sharded, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 8)
    compiled(x).sum().backward()
    dense(x).sum().backward()
    for (name, ours), theirs in zip(sharded.named_parameters(), dense.parameters(),
                                    strict=True):
        torch.testing.assert_close(_full(ours.grad), theirs.grad, msg=name)


@multi_rank(world_size=[2])
def test_compiled_optimizer_step_matches_eager(rank: int, world_size: int) -> None:
    """``torch.compile(opt.step)``: torch's own graph break in the step, then the update
    compiled on ShardedTensor parameters (its lerp reaches us as inductor's prims.fma)."""
    eager_model, compiled_model = (_tp_mlp(world_size)[1] for _ in range(2))
    eager_opt = torch.optim.AdamW(eager_model.parameters(), lr=1e-2)
    compiled_opt = torch.optim.AdamW(compiled_model.parameters(), lr=1e-2)
    step = torch.compile(compiled_opt.step, backend="aot_eager")
    torch.manual_seed(5)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    for _ in range(3):
        for model, run in ((eager_model, eager_opt.step), (compiled_model, step)):
            model.zero_grad()
            F.mse_loss(model(x), y).backward()
            run()
    for ours, theirs in zip(compiled_model.parameters(), eager_model.parameters(),
                            strict=True):
        assert isinstance(ours, ds.ShardedTensor)
        assert ours.sharding_spec() == theirs.sharding_spec()
        torch.testing.assert_close(ours.detach().full_tensor(), theirs.detach().full_tensor())


@torch.library.custom_op("dstest_compile::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@multi_rank(world_size=[2])
def test_an_unsupported_op_under_compile_names_the_op(rank: int, world_size: int) -> None:
    """No sharded implementation of a user's op: the graph breaks there and eager raises
    our error naming it; with ``fullgraph=True`` the compile error names it."""
    x = ds.ShardedTensor.from_replicated(torch.ones(4, 2), rows(world_size))

    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.ops.dstest_compile.twice(t + 1) - 1

    message = re.escape("dstest_compile.twice.default not supported for ShardedTensor!")
    with pytest.raises(NotImplementedError, match=message):
        torch.compile(f, backend="aot_eager")(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message) as info:
        torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert "InternalTorchDynamoError" not in type(info.value).__name__
