"""Module APIs: shard_tensor, shard_parameter, shard_module with plans and sharders, output hooks.

The behaviours are those of PyTorch's legacy tests of ``torch.distributed._shard``
(``test_sharded_tensor.py``: TestShardParameter, TestShardTensor, TestModuleHookApi;
``test_sharder.py``; ``sharded_optim/test_sharded_optim.py``), adapted to CPU shards
on gloo. Where the legacy API refused (enumerable specs) we shard; where it could
hang (arguments that differ between ranks) every rank raises.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from layouts import cols, grid, rows, several

import dispatch_shard as ds
from dispatch_shard import ChunkShardingSpec, ShardedTensor, ShardingPlan
from dispatch_shard.testing import multi_rank


def placements(ranks: list[int]) -> list[str]:
    return [f"rank:{r}/cpu" for r in ranks]


def shuffled_specs(dims: list[int], world_size: int, seed: int) -> list[ChunkShardingSpec]:
    """Chunk specs over every rank in a shuffled order (the legacy tests' helper)."""
    specs = []
    order = list(range(world_size))
    for i, dim in enumerate(dims):
        random.Random(seed + i).shuffle(order)
        specs.append(ChunkShardingSpec(dim, placements(order)))
    return specs


def box(metadata: ds.ShardMetadata) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(metadata.shard_offsets, metadata.shard_sizes,
                                                  strict=True))


def same_everywhere(*size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


def check_blocks(st: ShardedTensor, dense: torch.Tensor) -> None:
    for shard in st.local_shards():
        assert torch.equal(shard.tensor, dense[box(shard.metadata)]), shard.metadata


# -- shard_tensor ------------------------------------------------------------------------


@multi_rank(world_size=4)
def test_shard_tensor(rank: int, world_size: int) -> None:
    spec = rows(world_size)
    tensor = torch.rand(12, 12)
    dist.broadcast(tensor, src=0)
    st = ds.shard_tensor(tensor, spec)
    assert isinstance(st, ShardedTensor)
    assert len(st.local_shards()) == 1
    assert st.local_tensor().shape == torch.Size([3, 12])
    assert torch.equal(st.local_tensor(), tensor.narrow(0, 3 * rank, 3))
    assert st.sharding_spec() == spec and not st.requires_grad
    # The blocks are copies: the source tensor is not aliased.
    st.local_tensor().zero_()
    assert tensor.abs().sum() > 0


@multi_rank(world_size=4)
def test_shard_tensor_with_empty_shard(rank: int, world_size: int) -> None:
    tensor = same_everywhere(9, 12)
    st = ds.shard_tensor(tensor, rows(world_size))
    sms = st.metadata().shards_metadata
    assert len(sms) == 4
    assert all(sm.shard_offsets[0] + sm.shard_sizes[0] <= tensor.size(0) for sm in sms)
    assert len(st.local_shards()) == 1
    if rank < 3:
        assert torch.equal(st.local_tensor(), tensor.narrow(0, 3 * rank, 3))
    else:
        assert st.local_tensor().shape == torch.Size([0, 12])


@multi_rank(world_size=4)
def test_shard_tensor_any_spec_from_any_source(rank: int, world_size: int) -> None:
    """Only src_rank's data counts; chunk, several, grid, replicate and partial layouts."""
    value = same_everywhere(10, 7, seed=3)
    mine = value if rank == 2 else torch.full((10, 7), float(rank))  # others: junk
    for spec in (rows(world_size), cols(world_size), several(world_size),
                 grid((10, 7), world_size), ds.Replicate(), ds.Partial()):
        st = ds.shard_tensor(mine, spec, src_rank=2)
        assert st.sharding_spec() == spec
        if not isinstance(spec, ds.Partial):
            check_blocks(st, value)
        assert torch.equal(st.full_tensor(), value)
    wants_grad = mine.clone().requires_grad_(rank == 2)
    assert ds.shard_tensor(wants_grad, rows(world_size), src_rank=2).requires_grad  # src's flag


@multi_rank(world_size=4)
def test_shard_tensor_in_a_subgroup(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=[1])
    value = same_everywhere(6, 4)
    st = ds.shard_tensor(value, ChunkShardingSpec(0, ["rank:1/cpu", "rank:1/cpu"]),
                         src_rank=0, process_group=group)  # src_rank is a rank of the group
    if rank == 1:
        assert len(st.local_shards()) == 2
        check_blocks(st, value)
    else:
        assert st.local_shards() == []


@multi_rank(world_size=4)
def test_shard_tensor_errors(rank: int, world_size: int) -> None:
    spec = rows(world_size)
    tensor = same_everywhere(12, 12)
    with pytest.raises(ValueError, match="does not match with src_rank"):
        ds.shard_tensor(tensor, spec, src_rank=rank)
    with pytest.raises(ValueError, match="not a contiguous Tensor"):
        ds.shard_tensor(tensor.t(), spec)
    ranked = ChunkShardingSpec(0, placements([rank, 1, 2, 3]))
    with pytest.raises(ValueError, match="does not match with sharding_spec"):
        ds.shard_tensor(tensor, ranked)
    # Enumerable specs are supported; one that does not tile the tensor is refused.
    halves = ds.EnumerableShardingSpec([
        ds.ShardMetadata([0, 0], [5, 5], "rank:0/cpu"),
        ds.ShardMetadata([5, 0], [5, 5], "rank:1/cpu"),
    ])
    with pytest.raises(ValueError):
        ds.shard_tensor(tensor, halves)
    with pytest.raises(ValueError, match="not a rank of the process group"):
        ds.shard_tensor(tensor, spec, src_rank=world_size)
    with pytest.raises(TypeError, match="already a ShardedTensor"):
        ds.shard_tensor(ds.shard_tensor(tensor, spec), spec)


@multi_rank(world_size=4, timeout_s=30)
def test_shard_tensor_one_rank_differs_raises_everywhere(rank: int, world_size: int) -> None:
    """One rank's bad argument raises on every rank instead of hanging the others."""
    spec = rows(world_size)
    tensor = same_everywhere(12, 12)
    with pytest.raises(ValueError, match="does not match with src_rank"):
        ds.shard_tensor(tensor, spec, src_rank=1 if rank == 3 else 0)
    with pytest.raises(ValueError, match="does not match with sharding_spec"):
        ds.shard_tensor(tensor, cols(world_size) if rank == 1 else spec)
    with pytest.raises(ValueError, match="does not match with size"):
        ds.shard_tensor(same_everywhere(13, 12) if rank == 0 else tensor, spec)
    with pytest.raises(ValueError, match="not a contiguous Tensor"):
        ds.shard_tensor(tensor.t() if rank == 2 else tensor, spec)
    # The ranks are still in step.
    assert torch.equal(ds.shard_tensor(tensor, spec).full_tensor(), tensor)


# -- shard_parameter ---------------------------------------------------------------------


@multi_rank(world_size=4)
def test_shard_parameter(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    fc = nn.Linear(12, 12)
    weight_og = fc.weight.detach().clone()
    ds.shard_parameter(fc, "weight", rows(world_size))
    assert isinstance(fc.weight, ShardedTensor) and isinstance(fc.weight, nn.Parameter)
    assert fc.weight.requires_grad and fc.weight.is_leaf
    local_shards = fc.weight.local_shards()
    assert len(local_shards) == 1
    assert local_shards[0].tensor.size() == torch.Size([3, 12])
    assert torch.equal(torch.narrow(weight_og, 0, 3 * rank, 3), local_shards[0].tensor)
    assert any(p is fc.weight for p in fc.parameters())
    # Enumerable specs too (the legacy API raised "not implemented yet!").
    spec = grid((12, 12), world_size)
    ds.shard_parameter(fc, "bias", ds.EnumerableShardingSpec([
        ds.ShardMetadata([0], [5], "rank:3/cpu"), ds.ShardMetadata([5], [7], "rank:1/cpu")]))
    assert isinstance(fc.bias, nn.Parameter)
    assert fc.bias.sharding_spec().shards[0].shard_sizes == [5]
    dense = nn.Linear(12, 12)
    ds.shard_parameter(dense, "weight", spec)
    ds.shard_parameter(dense, "bias", ds.Replicate())
    assert dense.weight.sharding_spec() == spec and dense.bias.sharding_spec() == ds.Replicate()
    # requires_grad is kept; a buffer stays a buffer.
    norm = nn.BatchNorm1d(8)
    norm.weight.requires_grad_(False)
    ds.shard_parameter(norm, "weight", rows(world_size))
    ds.shard_parameter(norm, "running_mean", rows(world_size))
    assert isinstance(norm.weight, nn.Parameter) and not norm.weight.requires_grad
    assert "running_mean" in dict(norm.named_buffers())
    assert isinstance(norm.state_dict()["running_mean"], ShardedTensor)


@multi_rank(world_size=4)
def test_shard_parameter_errors(rank: int, world_size: int) -> None:
    spec = rows(world_size)
    fc = nn.Linear(12, 12)
    with pytest.raises(ValueError, match="does not match with src_rank"):
        ds.shard_parameter(fc, "weight", spec, src_rank=rank)
    with pytest.raises(AttributeError, match="has no attribute"):
        ds.shard_parameter(fc, "foo", spec)
    with pytest.raises(ValueError, match=r"Expected Linear\.bias to be a Tensor, but found str"):
        del fc.bias
        fc.bias = "foo"  # type: ignore[assignment]
        ds.shard_parameter(fc, "bias", spec)
    with pytest.raises(ValueError, match="not a contiguous Tensor"):
        fc.bias = torch.rand(10, 10).t()
        ds.shard_parameter(fc, "bias", spec)
    with pytest.raises(ValueError, match="does not match with sharding_spec"):
        ds.shard_parameter(fc, "weight", ChunkShardingSpec(0, placements([rank, 1, 2, 3])))
    assert not isinstance(fc.weight, ShardedTensor)  # nothing changed on failure


@multi_rank(world_size=4, timeout_s=30)
def test_shard_parameter_one_rank_differs_raises_everywhere(rank: int, world_size: int) -> None:
    spec = rows(world_size)
    fc = nn.Linear(12, 12)
    with pytest.raises(AttributeError, match="has no attribute"):
        ds.shard_parameter(fc, "foo" if rank == 2 else "weight", spec)
    with pytest.raises(ValueError, match="does not match with sharding_spec"):
        ds.shard_parameter(fc, "weight", several(world_size) if rank == 3 else spec)
    with pytest.raises(ValueError, match="does not match with src_rank"):
        ds.shard_parameter(fc, "weight", spec, src_rank=2 if rank == 0 else 0)
    ds.shard_parameter(fc, "weight", spec)
    assert isinstance(fc.weight, ShardedTensor)


# -- seed: a model with sharded linears trained by plain torch.optim -----------------


class ShardedLinearModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same on every rank
        self.linear1 = nn.Linear(17, 12)
        self.linear2 = nn.Linear(12, 29)
        self.gelu = nn.GELU()

    def shard_parameter(self, world_size: int) -> None:
        ds.shard_parameter(self.linear1, "weight", rows(world_size))
        ds.shard_parameter(self.linear2, "weight", cols(world_size))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.gelu(self.linear1(inp)))  # type: ignore[no-any-return]


def dense_values(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().full_tensor() if isinstance(p, ShardedTensor) else p.detach().clone()
            for name, p in module.named_parameters()}


@multi_rank(world_size=4)
def test_sharded_model_trains_like_dense_with_plain_sgd(rank: int, world_size: int) -> None:
    dense = ShardedLinearModel()
    sharded = ShardedLinearModel()
    sharded.shard_parameter(world_size)
    assert sorted(dict(sharded.named_parameters())) == [
        "linear1.bias", "linear1.weight", "linear2.bias", "linear2.weight"]
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    sharded_opt = torch.optim.SGD(dict(sharded.named_parameters()).values(), lr=0.1,
                                  momentum=0.9)
    before = dense_values(sharded)
    for step in range(3):
        inp = same_everywhere(5, 17, seed=10 + step)
        for model, opt in ((dense, dense_opt), (sharded, sharded_opt)):
            opt.zero_grad()
            out = model(inp)
            loss = out.sum() if not isinstance(out, ShardedTensor) else out.sum().full_tensor()
            loss.backward()
            opt.step()
    assert isinstance(sharded.linear1.weight, ShardedTensor)
    assert sharded.linear1.weight.sharding_spec() == rows(world_size)
    assert isinstance(sharded.linear2.weight.grad, ShardedTensor)
    after, want = dense_values(sharded), dense_values(dense)
    for name in want:
        assert not torch.equal(after[name], before[name]), name  # every parameter moved
        torch.testing.assert_close(after[name], want[name])


class ParamAndShardedParam(nn.Module):
    """A dense parameter beside a ShardedTensor parameter made by a creation function."""

    def __init__(self, spec: ds.ShardingSpec | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.param = nn.Parameter(torch.rand(5, 10))
        value = torch.rand(20, 10)
        if spec is None:
            self.sharded_param = nn.Parameter(value)
        else:
            self.sharded_param = nn.Parameter(ds.rand(spec, 20, 10, requires_grad=True))
            with torch.no_grad():
                self.sharded_param.copy_(value)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return (self.sharded_param * inp).sum() + (self.param * inp[:5]).sum()


@multi_rank(world_size=4)
def test_named_params_with_sharded_tensor(rank: int, world_size: int) -> None:
    dense, sharded = ParamAndShardedParam(), ParamAndShardedParam(rows(world_size))
    params = dict(sharded.named_parameters())
    assert sorted(params) == ["param", "sharded_param"]
    assert isinstance(params["sharded_param"], ShardedTensor)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    sharded_opt = torch.optim.SGD(params.values(), lr=0.1)
    inp = same_everywhere(20, 10, seed=4)
    dense(inp).backward()
    out = sharded(inp)
    (out.full_tensor() if isinstance(out, ShardedTensor) else out).backward()
    dense_opt.step()
    sharded_opt.step()
    for name, value in dense_values(dense).items():
        torch.testing.assert_close(dense_values(sharded)[name], value)


# -- seed: a custom sharder ----------------------------------------------------------------


class Collection(nn.Module):
    """Several embedding bags (the legacy test's collection) or linears; outputs concatenated."""

    def __init__(self, count: int, size: int, kind: str = "embedding_bag") -> None:
        super().__init__()
        torch.manual_seed(1)
        self.count = count
        self.items = nn.ModuleDict({
            f"item_{i}": nn.EmbeddingBag(size, 8, mode="sum") if kind == "embedding_bag"
            else nn.Linear(size, 8)
            for i in range(count)
        })

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return torch.cat([item(inp) for item in self.items.values()])


class ShardedCollection(nn.Module):
    """The first ``split`` items sharded along dim 0 of their weight, the others along dim 1
    (each by ``shard_module`` on the original collection, as the legacy sharder does)."""

    def __init__(self, collection: Collection, split: int,
                 specs: tuple[ds.ShardingSpec, ds.ShardingSpec]) -> None:
        super().__init__()
        assert split < collection.count
        self.items = nn.ModuleDict()
        for i in range(collection.count):
            key = f"item_{i}"
            spec = specs[0] if i < split else specs[1]
            ds.shard_module(collection, ShardingPlan(plan={f"items.{key}.weight": spec}))
            self.items[key] = collection.items[key]

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        outputs = [item(inp) for item in self.items.values()]
        return torch.cat([o.full_tensor() if isinstance(o, ShardedTensor) else o
                          for o in outputs])


class CollectionSharder(ds.Sharder):
    def __init__(self, world_size: int, split: int) -> None:
        self.split = split
        self.rowwise_spec = rows(world_size)
        self.colwise_spec = cols(world_size)

    def shard(self, module: nn.Module) -> nn.Module:
        if not isinstance(module, Collection):
            raise RuntimeError("The custom sharder only supports Collection")
        return ShardedCollection(module, self.split, (self.rowwise_spec, self.colwise_spec))


class Holder(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.collection = Collection(10, 10, kind)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.collection(inp)  # type: ignore[no-any-return]


@multi_rank(world_size=4)
@pytest.mark.parametrize("kind", ["embedding_bag", "linear"])
def test_custom_sharder(rank: int, world_size: int, kind: str) -> None:
    sharder = CollectionSharder(world_size, split=world_size // 2)
    local_model = Holder(kind)
    sharded_model = copy.deepcopy(local_model)
    ds.shard_module(sharded_model, ShardingPlan(plan={"collection": sharder}))
    assert isinstance(sharded_model.collection, ShardedCollection)
    items = sharded_model.collection.items
    assert isinstance(items["item_0"].weight, ShardedTensor)
    assert isinstance(items["item_9"].weight, ShardedTensor)
    assert items["item_0"].weight.sharding_spec() == sharder.rowwise_spec
    assert items["item_9"].weight.sharding_spec() == sharder.colwise_spec
    if kind == "embedding_bag":
        inp = torch.arange(8).reshape((2, 4))
    else:
        inp = same_everywhere(2, 10, seed=5)
    torch.testing.assert_close(sharded_model(inp), local_model(inp))


@multi_rank(world_size=4)
def test_custom_sharder_errors(rank: int, world_size: int) -> None:
    sharder = CollectionSharder(world_size, split=1)
    model = Collection(4, 8)
    with pytest.raises(KeyError, match="path must not be empty for custom sharder!"):
        ds.shard_module(model, ShardingPlan(plan={"": sharder}))
    spec = rows(world_size)
    conflicted = ShardingPlan(plan={"items.item_0.weight": spec, "items": sharder})
    with pytest.raises(RuntimeError, match="should not conflict with the submodule tree"):
        ds.shard_module(model, conflicted)
    with pytest.raises(TypeError, match="Only `ShardingSpec` and `Sharder` are supported"):
        ds.shard_module(model, ShardingPlan(plan={"items.item_0.weight": "rows"}))  # type: ignore[dict-item]
    with pytest.raises(AttributeError):
        ds.shard_module(model, ShardingPlan(plan={"items.nothing.weight": spec}))
    # A path that merely starts like the sharder's is no conflict.
    holder = nn.Module()
    holder.fc = nn.Linear(4, 4)
    holder.fc1 = nn.Linear(4, 4)

    class Identity(ds.Sharder):
        def shard(self, module: nn.Module) -> nn.Module:
            return module

    ds.shard_module(holder, ShardingPlan(plan={"fc": Identity(), "fc1.weight": spec}))
    assert isinstance(holder.fc1.weight, ShardedTensor)
    assert all(isinstance(p, nn.Parameter) for p in holder.parameters())


@multi_rank(world_size=4, timeout_s=30)
def test_plans_that_differ_between_ranks_raise_everywhere(rank: int, world_size: int) -> None:
    model = Collection(2, 8)
    plan = {"items.item_0.weight": rows(world_size)}
    if rank == 1:
        plan["items.item_1.weight"] = rows(world_size)
    with pytest.raises(ValueError, match="does not match"):
        ds.shard_module(model, ShardingPlan(plan=plan))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not match"):
        ds.shard_module(model, ShardingPlan(plan={"items.item_0.weight": rows(world_size)}),
                        src_rank=rank % 2)
    assert not isinstance(model.items["item_0"].weight, ShardedTensor)


# -- output plans and the module hooks ----------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.fc1 = nn.Linear(10, 16)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(16, 8)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gelu(self.fc1(inp)))  # type: ignore[no-any-return]


@multi_rank(world_size=4)
def test_shard_module_with_output_plan_and_local_tensor(rank: int, world_size: int) -> None:
    dense, sharded = MLP(), MLP()
    output_spec = rows(world_size)
    ds.shard_module(sharded, ShardingPlan(
        plan={"fc1.weight": rows(world_size), "fc2.weight": cols(world_size)},
        output_plan={"fc2": output_spec},
        return_local_tensor=["fc2"],
    ))
    assert isinstance(sharded.fc1.weight, ShardedTensor)
    inp = same_everywhere(world_size * 3, 10, seed=6)
    out = sharded(inp)
    want = dense(inp)
    # Data parallel from here on: each rank has its rows of the output.
    assert not isinstance(out, ShardedTensor)
    torch.testing.assert_close(out, want[3 * rank:3 * rank + 3])
    # Each rank's loss on its rows: together, the loss of the whole output.
    out.pow(2).sum().backward()
    want.pow(2).sum().backward()
    for name, param in sharded.named_parameters():
        grad = param.grad
        assert grad is not None, name
        # Every gradient is global (the dense biases' too: a ShardedTensor gradient).
        assert isinstance(grad, ShardedTensor), name
        torch.testing.assert_close(grad.full_tensor(), dense.get_parameter(name).grad)


class ReturnsAttribute(nn.Module):
    def __init__(self, spec: ds.ShardingSpec, size: list[int]) -> None:
        super().__init__()
        self.st = ds.rand(spec, *size)

    def forward(self) -> ShardedTensor:
        return self.st


@multi_rank(world_size=4)
def test_reshard_output(rank: int, world_size: int) -> None:
    spec, reshard_spec = shuffled_specs([0, 1], world_size, seed=5)
    module = ReturnsAttribute(spec, [24, 12])
    st = module()
    compare = ShardedTensor.from_local_shards(copy.deepcopy(st.local_shards()), st.size())
    compare.reshard(reshard_spec)
    module = ds.reshard_output(module, reshard_spec)
    out = module()
    assert torch.equal(out.local_tensor(), compare.local_tensor())
    assert out.local_tensor().shape == torch.Size([24, 3])
    assert module.st.sharding_spec() == spec  # the attribute keeps its own layout
    assert ds.reshard_output(nn.Identity(), reshard_spec)(torch.ones(2)).equal(torch.ones(2))


@multi_rank(world_size=4)
def test_collect_local_shard(rank: int, world_size: int) -> None:
    (spec,) = shuffled_specs([0], world_size, seed=5)
    module = ReturnsAttribute(spec, [23, 15])
    local = module().local_tensor()
    module = ds.collect_local_shard(module)
    output = module()
    assert type(output) is torch.Tensor
    assert torch.equal(local, output)
    # A block of size 1 along the sharding dim is squeezed: [4, 16] -> [16] per rank.
    squeezed = ds.collect_local_shard(ReturnsAttribute(rows(world_size), [4, 16]))()
    assert squeezed.shape == torch.Size([16])
    several_blocks = ds.collect_local_shard(ReturnsAttribute(several(world_size), [16, 4]))
    with pytest.raises(NotImplementedError, match="Only single local shard is supported"):
        several_blocks()
