"""Distributed checkpoints: ShardedTensors with ``torch.distributed.checkpoint`` (DCP).

The optimizer scenario is the legacy ``test/distributed/checkpoint/test_fsdp_optim_state.py``
(there with FSDP; here with a Megatron-parallel transformer block and plain Adam): train a
step, save model and optimizer state, load both into a fresh model and optimizer whose
Adam state does not exist yet, compare, and take one more step on each. Then the
resharding matrix (other specs, 4 ranks -> 2 and 3 ranks on subgroups of the 4-rank
pool, 3 -> 4), interop with DTensor and the legacy ShardedTensor both ways, and the
crash safety of :func:`dispatch_shard.checkpoint.save`. Checkpoint folders live in a
pytest ``tmp_path`` made by the parent process and passed to every rank.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed._shard.sharded_tensor as legacy
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed._shard.sharding_spec import ChunkShardingSpec as LegacyChunkShardingSpec
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard
from torch.distributed.tensor import distribute_tensor

import dispatch_shard as ds
from dispatch_shard import ShardedTensor
from dispatch_shard import checkpoint as ckpt
from dispatch_shard.examples import TRANSFORMER_PLAN, TransformerBlock, parallelize
from dispatch_shard.testing import multi_rank


def dense(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, ShardedTensor) else value


def on(ranks: list[int]) -> list[str]:
    return [f"rank:{r}/cpu" for r in ranks]


def grid(size: tuple[int, int], ranks: list[int]) -> ds.EnumerableShardingSpec:
    """A 2x2 grid of uneven blocks over ``ranks``, cycled (several blocks per rank when
    there are fewer ranks than blocks)."""
    top, left = size[0] // 2 + 1, size[1] // 3 + 1
    blocks = [((0, 0), (top, left)), ((0, left), (top, size[1] - left)),
              ((top, 0), (size[0] - top, left)), ((top, left), (size[0] - top, size[1] - left))]
    return ds.EnumerableShardingSpec([
        ds.ShardMetadata(list(offsets), list(sizes), f"rank:{ranks[i % len(ranks)]}/cpu")
        for i, (offsets, sizes) in enumerate(blocks)
    ])


SIZE = (10, 7)


def specs(ranks: list[int]) -> dict[str, ds.ShardingSpec]:
    """Every kind of layout over ``ranks`` (global ranks of the group)."""
    shuffled = [ranks[(3 * i + 1) % len(ranks)] for i in range(2 * len(ranks))]
    return {"rows": ds.ChunkShardingSpec(0, on(ranks)), "cols": ds.ChunkShardingSpec(1, on(ranks)),
            "several": ds.ChunkShardingSpec(1, on(shuffled)), "grid": grid(SIZE, ranks),
            "replicate": ds.Replicate()}


def reference(key: str) -> torch.Tensor:
    """The dense value saved under ``key`` (the same on every rank)."""
    if key == "partial":
        left, right = partial_factors()
        return left @ right
    generator = torch.Generator().manual_seed(sum(map(ord, key)))
    if key.startswith("int"):
        return torch.randint(-100, 100, SIZE, generator=generator)
    return torch.randn(SIZE, generator=generator, dtype=torch.float64 if "64" in key else None)


def partial_factors() -> tuple[torch.Tensor, torch.Tensor]:
    """Small integers in float: their product is exact in any summation order."""
    generator = torch.Generator().manual_seed(3)
    return (torch.randint(-5, 5, (SIZE[0], 4), generator=generator).float(),
            torch.randint(-5, 5, (4, SIZE[1]), generator=generator).float())


def sharded(value: torch.Tensor, spec: ds.ShardingSpec,
            group: dist.ProcessGroup | None = None) -> ShardedTensor:
    return ShardedTensor.from_replicated(value, spec, process_group=group)


def blank(key: str, spec: ds.ShardingSpec, group: dist.ProcessGroup | None = None
          ) -> ShardedTensor:
    """A load target for ``key``: the right size and dtype, wrong values."""
    value = reference(key)
    return sharded(torch.full_like(value, -7), spec, group)


# -- seed 003: model + Adam state, saved and loaded into a fresh model and optimizer ---------

# Another Megatron plan for the same block: the loaded optimizer state is resharded too.
# ln2 stays a dense parameter: its state loads from replicated ShardedTensors.
SWAPPED_PLAN = {"q": "rowwise", "k": "replicate", "v": "rowwise", "o": "colwise",
                "mlp.fc1": "rowwise", "mlp.fc2": "colwise", "ln1": "replicate"}


def block(world_size: int, seed: int, plan: dict[str, str] = TRANSFORMER_PLAN) -> nn.Module:
    torch.manual_seed(seed)  # another seed: other initial values than the saved ones
    return parallelize(TransformerBlock(), plan, world_size)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(seed))
    loss = model(x).sum()
    dense(loss).backward()
    optimizer.step()
    optimizer.zero_grad()


def assert_same_optimizer_state(want: dict[str, Any], got: dict[str, Any],
                                same_layout: bool = True) -> None:
    assert len(want["state"]) == len(got["state"]) > 0
    for fqn, states in want["state"].items():
        assert states.keys() == got["state"][fqn].keys(), fqn
        for name, state in states.items():
            other = got["state"][fqn][name]
            if isinstance(state, ShardedTensor) and same_layout:
                assert isinstance(other, ShardedTensor), (fqn, name)
                assert other.sharding_spec() == state.sharding_spec(), (fqn, name)
                assert torch.equal(dense(state), dense(other)), (fqn, name)
            elif isinstance(state, ShardedTensor):  # another layout, or a dense parameter
                assert torch.equal(dense(state), dense(other)), (fqn, name)
            elif isinstance(state, torch.Tensor):
                assert torch.equal(state, other), (fqn, name)
            else:
                assert state == other, (fqn, name)


def assert_same_parameters(model: nn.Module, other: nn.Module, exact: bool = True) -> None:
    for (name, param), (_, param_2) in zip(model.named_parameters(), other.named_parameters(),
                                           strict=True):
        if exact:
            assert torch.equal(dense(param), dense(param_2)), name
        else:
            torch.testing.assert_close(dense(param), dense(param_2), atol=1e-5, rtol=1e-5)


@multi_rank(world_size=4)
@pytest.mark.parametrize("pass_planner", [True, False])
def test_load_sharded_optimizer_state_dict(rank: int, world_size: int, tmp_path: Path,
                                           pass_planner: bool) -> None:
    planner = dcp.DefaultLoadPlanner() if pass_planner else None
    model = block(world_size, seed=0)
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    train_step(model, optim, seed=1)  # step ahead to initialize the optimizer

    optim_osd = get_optimizer_state_dict(model, optim)  # keyed by parameter names
    assert isinstance(optim_osd["state"]["q.weight"]["exp_avg"], ShardedTensor)
    ckpt.save({"model": model.state_dict(), "optim": optim_osd}, tmp_path / "ckpt")

    loaded = []
    for plan, exact in ((TRANSFORMER_PLAN, True), (SWAPPED_PLAN, False)):
        model_2 = block(world_size, seed=7, plan=plan)
        optim_2 = torch.optim.Adam(model_2.parameters(), lr=0.1)
        assert len(optim_2.state) == 0  # Adam lazily creates its state

        state_dict = {"model": model_2.state_dict()}  # the optimizer has nothing to load into
        ckpt.load(state_dict, tmp_path / "ckpt", planner=planner)
        model_2.load_state_dict(state_dict["model"])
        optim_state = ckpt.load_sharded_optimizer_state_dict(
            model_state_dict=state_dict["model"], optimizer_key="optim",
            storage_reader=dcp.FileSystemReader(str(tmp_path / "ckpt")), planner=planner,
        )
        assert len(optim_2.state) == 0
        optim_2.load_state_dict(ckpt.optim_state_dict_to_load(model_2, optim_2,
                                                              optim_state["optim"]))
        # The state follows the new parameters' layouts.
        weight = model_2.get_parameter("q.weight")
        assert optim_2.state[weight]["exp_avg"].sharding_spec() == weight.sharding_spec()
        osd_after_load = get_optimizer_state_dict(model_2, optim_2)
        assert_same_optimizer_state(optim_osd, osd_after_load, same_layout=exact)
        assert_same_parameters(model, model_2)
        loaded.append((model_2, optim_2, exact))

    # One more step on each: the same parameters (up to summation order across layouts).
    train_step(model, optim, seed=2)
    for model_2, optim_2, exact in loaded:
        train_step(model_2, optim_2, seed=2)
        assert_same_parameters(model, model_2, exact=exact)


@multi_rank(world_size=4)
def test_named_optimizer_and_dcp_state_dict_helpers(rank: int, world_size: int,
                                                     tmp_path: Path) -> None:
    """Optimizer state keyed by FQN from NamedOptimizer, loaded two ways: into a
    NamedOptimizer, and through DCP's get_state_dict/set_state_dict into plain Adam."""
    model = block(world_size, seed=0)
    named = ds.NamedOptimizer(model.named_parameters(), torch.optim.Adam, lr=0.05)
    train_step(model, named, seed=1)
    saved_osd = named.state_dict()
    ckpt.save({"model": model.state_dict(), "optim": saved_osd}, tmp_path / "ckpt")

    # A NamedOptimizer loads in place: its state must exist first.
    model_2 = block(world_size, seed=7)
    named_2 = ds.NamedOptimizer(model_2.named_parameters(), torch.optim.Adam, lr=0.05)
    named_2.init_state()
    state_dict = {"model": model_2.state_dict(), "optim": named_2.state_dict()}
    ckpt.load(state_dict, tmp_path / "ckpt")
    model_2.load_state_dict(state_dict["model"])
    named_2.load_state_dict(state_dict["optim"])
    assert_same_optimizer_state(saved_osd, named_2.state_dict())

    # DCP's helpers: get_state_dict creates the Adam state (a zero-lr step) and keys it
    # by FQN; dcp.load fills it in place; set_state_dict puts it back.
    model_3 = block(world_size, seed=9)
    optim_3 = torch.optim.Adam(model_3.parameters(), lr=0.05)
    model_sd, optim_sd = get_state_dict(model_3, optim_3)
    state_dict = {"model": model_sd, "optim": optim_sd}
    dcp.load(state_dict, checkpoint_id=str(tmp_path / "ckpt"))  # a save()d path: plain DCP too
    set_state_dict(model_3, optim_3, model_state_dict=state_dict["model"],
                   optim_state_dict=state_dict["optim"])
    assert_same_optimizer_state(saved_osd, get_optimizer_state_dict(model_3, optim_3))

    assert_same_parameters(model, model_2)
    assert_same_parameters(model, model_3)
    for run in ((model, named), (model_2, named_2), (model_3, optim_3)):
        train_step(*run, seed=2)
    assert_same_parameters(model, model_2)
    assert_same_parameters(model, model_3)


# -- loading reshards ---------------------------------------------------------------------------

SAVED_KEYS = ["rows", "cols", "several", "grid", "replicate", "partial", "int_rows", "f64_grid"]


def saved_state(ranks: list[int], group: dist.ProcessGroup | None) -> dict[str, Any]:
    """Every saved key in its own layout over ``ranks``."""
    state: dict[str, Any] = {
        key: sharded(reference(key), specs(ranks)[key.rsplit("_", 1)[-1]], group)
        for key in SAVED_KEYS if key != "partial"
    }
    # A row-parallel product: a Partial whose summands differ on every rank, saved reduced.
    left, right = partial_factors()
    state["partial"] = (sharded(left, ds.ChunkShardingSpec(1, on(ranks)), group)
                        @ sharded(right, ds.ChunkShardingSpec(0, on(ranks)), group))
    if dist.get_rank() in ranks:
        assert state["partial"].sharding_spec() == ds.Partial("sum")
    return state


def check_loads(directory: Path, ranks: list[int], group: dist.ProcessGroup | None) -> None:
    """Load every saved tensor into every layout over ``ranks``; values equal the dense ones."""
    if dist.get_rank() not in ranks:
        return
    targets = {**specs(ranks), "partial": ds.Partial("sum")}
    for target_name, spec in targets.items():
        state = {key: blank(key, spec, group) for key in SAVED_KEYS}
        ckpt.load(state, directory, process_group=group)
        for key, value in state.items():
            assert value.sharding_spec() == spec
            assert torch.equal(value.full_tensor(), reference(key)), (key, target_name)


@multi_rank(world_size=4)
def test_loading_reshards(rank: int, world_size: int, tmp_path: Path) -> None:
    everyone = list(range(world_size))
    ckpt.save(saved_state(everyone, None), tmp_path / "four")
    metadata = dcp.FileSystemReader(str(tmp_path / "four")).read_metadata()
    assert metadata.state_dict_metadata["int_rows"].properties.dtype == torch.int64

    check_loads(tmp_path / "four", everyone, None)  # other specs, 4 ranks
    two = dist.new_group([0, 1])
    three = dist.new_group([1, 2, 3])
    check_loads(tmp_path / "four", [0, 1], two)  # 4 ranks -> 2
    check_loads(tmp_path / "four", [1, 2, 3], three)  # 4 ranks -> 3

    # 3 ranks -> 4: saved by a subgroup whose global ranks are not 0..2.
    if rank in (1, 2, 3):
        ckpt.save(saved_state([1, 2, 3], three), tmp_path / "three", process_group=three,
                  coordinator_rank=2)
    dist.barrier()
    check_loads(tmp_path / "three", everyone, None)

    # A tensor without elements still has its entry.
    dcp.save({"empty": ds.zeros(specs(everyone)["rows"], 0, 3)},
             checkpoint_id=str(tmp_path / "empty"))
    target = ds.ones(specs(everyone)["cols"], 0, 3)
    dcp.load({"empty": target}, checkpoint_id=str(tmp_path / "empty"))
    assert target.shape == (0, 3)

    # Into Partial tensors that cached a reduction of their old value, and a "max" one.
    for reduce_op in ("sum", "max"):
        target = blank("rows", ds.Partial(reduce_op))
        target.full_tensor()
        ckpt.load({"rows": target}, tmp_path / "four")
        assert torch.equal(target.full_tensor(), reference("rows")), reduce_op


# -- interop: DTensor and the legacy ShardedTensor --------------------------------------------


@multi_rank(world_size=4)
def test_interop_with_dtensor(rank: int, world_size: int, tmp_path: Path) -> None:
    value = reference("dtensor")
    mesh = init_device_mesh("cpu", (world_size,))
    mesh_2d = init_device_mesh("cpu", (2, world_size // 2))
    dtensors = {"rows": distribute_tensor(value, mesh, [DShard(0)]),
                "blocks": distribute_tensor(value, mesh_2d, [DShard(1), DShard(0)]),
                "replicate": distribute_tensor(value, mesh, [DReplicate()])}
    dcp.save(dtensors, checkpoint_id=str(tmp_path / "from_dtensor"))
    for name, spec in specs(list(range(world_size))).items():
        state = {key: blank("dtensor", spec) for key in dtensors}
        ckpt.load(state, tmp_path / "from_dtensor")
        for key, loaded in state.items():
            assert torch.equal(loaded.full_tensor(), value), (key, name)

    ours = {"several": sharded(value, specs(list(range(world_size)))["several"]),
            "grid": sharded(value, grid(SIZE, list(range(world_size)))),
            "partial": sharded(value, ds.Partial("sum"))}
    dcp.save(ours, checkpoint_id=str(tmp_path / "ours"))  # the Partial is reduced by its hook
    for placements, device_mesh in (([DShard(1)], mesh), ([DShard(0), DShard(1)], mesh_2d),
                                    ([DReplicate()], mesh)):
        state = {key: distribute_tensor(torch.zeros(SIZE), device_mesh, placements)
                 for key in ours}
        dcp.load(state, checkpoint_id=str(tmp_path / "ours"))
        for key, loaded in state.items():
            assert torch.equal(loaded.full_tensor(), value), (key, placements)


def legacy_sharded(spec: LegacyChunkShardingSpec, value: torch.Tensor) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy API is deprecated
        tensor = legacy.zeros(spec, *value.shape)
    for shard in tensor.local_shards():
        shard.tensor.copy_(value[box(shard.metadata)])
    return tensor


def box(metadata: Any) -> tuple[slice, ...]:
    return tuple(slice(o, o + n)
                 for o, n in zip(metadata.shard_offsets, metadata.shard_sizes, strict=True))


@multi_rank(world_size=4)
def test_interop_with_legacy_sharded_tensor(rank: int, world_size: int, tmp_path: Path) -> None:
    value = reference("legacy")
    everyone = list(range(world_size))
    spec = LegacyChunkShardingSpec(dim=1, placements=on(everyone))
    dcp.save({"w": legacy_sharded(spec, value)}, checkpoint_id=str(tmp_path / "legacy"))
    for name, our_spec in specs(everyone).items():
        state = {"w": blank("legacy", our_spec)}
        ckpt.load(state, tmp_path / "legacy")
        assert torch.equal(state["w"].full_tensor(), value), name

    ckpt.save({"w": sharded(value, grid(SIZE, everyone)),
               "r": sharded(value, specs(everyone)["several"])}, tmp_path / "ours")
    # Uneven chunks over a reversed rank order (4 ranks: rows 3, 3, 3, 1).
    target_spec = LegacyChunkShardingSpec(dim=0, placements=on(everyone[::-1]))
    state = {"w": legacy_sharded(target_spec, torch.zeros(SIZE)),
             "r": legacy_sharded(target_spec, torch.zeros(SIZE))}
    dcp.load(state, checkpoint_id=str(tmp_path / "ours"))
    for key in state:
        for shard in state[key].local_shards():
            assert torch.equal(shard.tensor, value[box(shard.metadata)]), key


# -- crash safety --------------------------------------------------------------------------------

INJECTED = "injected failure"


class FailingWriter(dcp.FileSystemWriter):
    """Writes this rank's files, then fails on ``fail_rank``."""

    def __init__(self, path: str, fail_rank: int) -> None:
        super().__init__(path)
        self.fail_rank = fail_rank

    def write_data(self, plan: Any, planner: Any) -> Any:
        written = super().write_data(plan, planner)
        if dist.get_rank() == self.fail_rank:
            raise OSError(f"{INJECTED}: disk full")
        return written


class FailingFinishWriter(dcp.FileSystemWriter):
    """Every rank's data is written; the coordinator fails writing the metadata."""

    def finish(self, metadata: Any, results: Any) -> None:
        raise OSError(f"{INJECTED}: metadata")


class FailingPlanner(dcp.DefaultSavePlanner):
    def create_local_plan(self) -> Any:
        if dist.get_rank() == 1:
            raise RuntimeError(f"{INJECTED}: planner")
        return super().create_local_plan()


def versions(path: Path) -> list[str]:
    return sorted(e for e in os.listdir(path.parent) if e.startswith(f".{path.name}."))


@multi_rank(world_size=4)
def test_crash_during_save_keeps_previous_checkpoint(rank: int, world_size: int,
                                                     tmp_path: Path) -> None:
    everyone = list(range(world_size))
    path = tmp_path / "ckpt"
    value = reference("crash")

    def state(offset: float) -> dict[str, Any]:
        # A Partial too: save() reduces it before DCP plans, so a planner failing on one
        # rank cannot leave the others in the all-reduce.
        return {"w": sharded(value + offset, specs(everyone)["rows"]),
                "r": sharded(value + offset, ds.Replicate()), "step": torch.tensor(offset),
                "p": sharded(value + offset, ds.Partial("sum")), "extra": {"epoch": int(offset)}}

    def assert_loads(offset: float) -> None:
        target = {"w": blank("crash", grid(SIZE, everyone)), "r": blank("crash", ds.Replicate()),
                  "p": blank("crash", specs(everyone)["several"]),
                  "step": torch.tensor(-1.0), "extra": {"epoch": -1}}
        ckpt.load(target, path)
        for key in ("w", "r", "p"):
            assert torch.equal(target[key].full_tensor(), value + offset), key
        assert target["step"].item() == offset and target["extra"]["epoch"] == int(offset)

    ckpt.save(state(1.0), path)
    assert path.is_symlink() and len(versions(path)) == 1
    assert_loads(1.0)

    failures = [
        {"storage_writer": lambda folder: FailingWriter(folder, fail_rank=2)},
        {"storage_writer": FailingFinishWriter},
        {"planner": FailingPlanner()},
    ]
    for kwargs in failures:
        with pytest.raises((CheckpointException, RuntimeError, OSError)) as failure:
            ckpt.save(state(2.0), path, **kwargs)
        assert INJECTED in str(failure.value), failure.value  # on every rank
        dist.barrier()
        assert versions(path) == [os.readlink(path)]  # the new folder was removed
        assert_loads(1.0)

    ckpt.save(state(3.0), path)
    assert_loads(3.0)
    dist.barrier()
    assert len(versions(path)) == 1  # the previous version is gone

    # A path that is not ours is refused on every rank before anything is written.
    (tmp_path / "taken").mkdir(exist_ok=True)
    dist.barrier()
    if rank == 0:
        (tmp_path / "taken" / "file").write_text("data")
    dist.barrier()
    with pytest.raises(FileExistsError if rank == 0 else RuntimeError, match="not a checkpoint"):
        ckpt.save(state(4.0), tmp_path / "taken")


def test_save_and_load_without_process_group(tmp_path: Path) -> None:
    """This pytest process has no process group: DCP runs without collectives."""
    assert not dist.is_initialized()
    path = tmp_path / "single"
    path.mkdir()  # an empty folder is replaced by the checkpoint's link
    for value in (1.0, 2.0):
        ckpt.save({"w": torch.full((3, 2), value), "meta": {"note": "single"}}, path)
        target = {"w": torch.zeros(3, 2), "meta": {"note": ""}}
        ckpt.load(target, path)
        assert torch.equal(target["w"], torch.full((3, 2), value))
        assert target["meta"]["note"] == "single"
        assert path.is_symlink() and versions(path) == [os.readlink(path)]


# -- async_save: DCP stages a copy of the state dict, then writes it in a thread -------------

@multi_rank(world_size=[2, 3])
def test_async_save_and_load(rank: int, world_size: int, tmp_path: Path) -> None:
    everyone = list(range(world_size))
    keys = ["rows", "cols", "several", "grid", "replicate"]
    state: dict[str, Any] = {key: sharded(reference(key), specs(everyone)[key]) for key in keys}
    state["partial"] = sharded(reference("partial"), ds.Partial("sum"))
    state["step"] = torch.tensor(7)
    future = dcp.async_save(state, checkpoint_id=str(tmp_path / "async"))
    # Staging copied every block: changing the live tensors now does not reach the file.
    with torch.no_grad():
        for key in keys:
            state[key].fill_(-1.0)
    future.result()
    target: dict[str, Any] = {key: blank(key, specs(everyone)[key]) for key in keys}
    target["partial"] = blank("partial", specs(everyone)["several"])
    target["step"] = torch.tensor(0)
    dcp.load(target, checkpoint_id=str(tmp_path / "async"))
    for key in [*keys, "partial"]:
        assert torch.equal(target[key].full_tensor(), reference(key)), key
    assert target["step"].item() == 7

    # Training goes on while the model is written: the save thread runs DCP's collectives
    # on a group of its own, so they never interleave with training's on the default group.
    checkpoint_group = dist.new_group(backend="gloo")
    model = block(world_size, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    saved = {name: dense(p).clone() for name, p in model.named_parameters()}
    future = dcp.async_save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "model"),
                            process_group=checkpoint_group)
    for seed in (1, 2):
        train_step(model, optimizer, seed=seed)
    future.result()
    model_2 = block(world_size, seed=7, plan=SWAPPED_PLAN)  # another layout: reshards
    state_dict = {"model": model_2.state_dict()}
    dcp.load(state_dict, checkpoint_id=str(tmp_path / "model"))
    model_2.load_state_dict(state_dict["model"])
    for name, param in model_2.named_parameters():
        assert torch.equal(dense(param), saved[name]), name


@multi_rank(world_size=2)
def test_deepcopy_of_a_sharded_model_is_independent(rank: int, world_size: int) -> None:
    model = block(world_size, seed=0)
    train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2), seed=1)  # grads, hooks
    copied = copy.deepcopy(model)
    before = {name: dense(p).clone() for name, p in model.named_parameters()}
    for (name, param), copy_param in zip(model.named_parameters(), copied.parameters(),
                                         strict=True):
        assert type(copy_param) is type(param) and copy_param is not param, name
        assert torch.equal(dense(copy_param), dense(param)), name
        if isinstance(param, ShardedTensor):
            assert isinstance(copy_param, ShardedTensor)
            assert copy_param.process_group is param.process_group, name  # shared, not copied
            assert copy_param.sharding_spec() == param.sharding_spec(), name
            assert all(a.data_ptr() != b.data_ptr() for a, b in
                       zip(copy_param._local_tensors, param._local_tensors, strict=True)), name
    # Training the copy leaves the original alone; the copy's gradients keep its layouts.
    optimizer = torch.optim.AdamW(copied.parameters(), lr=1e-2)
    for seed in (2, 3):
        train_step(copied, optimizer, seed=seed)
    for name, param in model.named_parameters():
        assert torch.equal(dense(param), before[name]), name
    assert any(not torch.equal(dense(p), before[n]) for n, p in copied.named_parameters())
    # The copy trains like the original would.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seed in (2, 3):
        train_step(model, optimizer, seed=seed)
    assert_same_parameters(model, copied)
