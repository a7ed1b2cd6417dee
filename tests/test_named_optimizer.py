"""NamedOptimizer: FQN-keyed optimizer state, over dense and ShardedTensor parameters.

The single-process tests are the scenarios of the legacy
``test/distributed/optim/test_named_optimizer.py`` (plain tensors, no process
group); the multi-rank ones run them with sharded parameters on 4 ranks against
a dense twin, and save/load the state with ``torch.save``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import torch
import torch.nn as nn
from layouts import cols, grid, rows, several

import dispatch_shard as ds
from dispatch_shard import NamedOptimizer, ShardedTensor, ShardingPlan
from dispatch_shard.testing import multi_rank


class DummyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net1 = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.net2 = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.net3 = nn.Linear(32, 64)
        self.net4 = nn.Sequential(nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net4(self.net3(self.net2(self.net1(x))))  # type: ignore[no-any-return]


Optimizers = Sequence[torch.optim.Optimizer]


def train(runs: Iterable[tuple[nn.Module, Optimizers]], steps: int = 2, seed: int = 0) -> None:
    """``steps`` forward/backward/step rounds, the same inputs for every model (grads
    accumulate, as in the legacy tests)."""
    runs = list(runs)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.rand(5, 8, generator=generator)
        for model, optimizers in runs:
            loss = model(x).sum()
            (loss.full_tensor() if isinstance(loss, ShardedTensor) else loss).backward()
            for optimizer in optimizers:
                optimizer.step()


def dense(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, ShardedTensor) else value


def assert_group_state(want: dict[str, Any], got: dict[str, Any], equal: bool = True) -> None:
    """Every entry of ``want`` but ``params`` is in ``got`` and is (or is not) equal."""
    for key, value in want.items():
        if key == "params":
            continue
        assert key in got, f"{key} not in named optimizer state dict"
        if isinstance(value, torch.Tensor):
            same = torch.allclose(dense(value), dense(got[key]))
        else:
            same = value == got[key]
        assert same == equal, f"{key} state {'not ' if equal else ''}equal"


def assert_param_groups(groups: list[dict[str, Any]], others: list[dict[str, Any]]) -> None:
    assert len(groups) == len(others)
    for group, other in zip(groups, others, strict=True):
        assert group.keys() == other.keys()
        for key, value in group.items():
            if key == "params":
                for a, b in zip(value, other[key], strict=True):
                    assert torch.allclose(dense(a.detach()), dense(b.detach()))
            else:
                assert value == other[key], key


def sgd(params: Any, **kwargs: Any) -> NamedOptimizer:
    return NamedOptimizer(params, torch.optim.SGD, lr=1e-2, **{"momentum": 0.9, **kwargs})


def two_groups(model: DummyModel) -> list[dict[str, Any]]:
    return [{"params": model.net1.parameters()},
            {"params": model.net3.parameters(), "lr": 1e-3}]


# -- single process: the legacy scenarios ------------------------------------------------------


def test_state_dict() -> None:
    m, m_dup = DummyModel(), DummyModel()
    optim = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
    named_optim = sgd(m_dup.named_parameters())
    assert_param_groups(optim.param_groups, named_optim.param_groups)
    train([(m, [optim]), (m_dup, [named_optim])])
    assert_param_groups(optim.param_groups, named_optim.param_groups)
    sd, named_sd = optim.state_dict(), named_optim.state_dict()
    for index, name in ((0, "net1.0.weight"), (3, "net2.0.bias"), (4, "net3.weight"),
                        (7, "net4.1.bias")):
        assert_group_state(sd["state"][index], named_sd["state"][name])
    assert named_sd["param_groups"][0]["params"] == sorted(dict(m.named_parameters()))
    assert isinstance(named_optim, torch.optim.Optimizer) and named_optim.defaults["lr"] == 1e-2


def test_zero_grad_and_lr_scheduler_reach_the_wrapped_optimizer() -> None:
    m = DummyModel()
    named_optim = NamedOptimizer(m.named_parameters(), torch.optim.SGD, lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(named_optim, step_size=1, gamma=0.5)
    train([(m, [named_optim])], steps=1)
    scheduler.step()
    named_optim.zero_grad()
    assert m.net3.weight.grad is None
    assert named_optim.param_groups[0]["lr"] == 0.5
    assert named_optim.state_dict()["param_groups"][0]["lr"] == 0.5


def test_state_dict_multi_param_group() -> None:
    m, m_dup = DummyModel(), DummyModel()
    optim_1 = torch.optim.SGD(two_groups(m), lr=1e-2, momentum=0.9)
    optim_2 = torch.optim.Adam([{"params": m.net2.parameters()},
                                {"params": m.net4.parameters(), "lr": 1e-5}])
    named_optim_1 = NamedOptimizer(m_dup.named_parameters(), torch.optim.SGD,
                                   two_groups(m_dup), lr=1e-2, momentum=0.9)
    named_optim_2 = NamedOptimizer(m_dup.named_parameters(), torch.optim.Adam,
                                   [{"params": m_dup.net2.parameters()},
                                    {"params": m_dup.net4.parameters(), "lr": 1e-5}])
    assert_param_groups(optim_1.param_groups, named_optim_1.param_groups)
    assert_param_groups(optim_2.param_groups, named_optim_2.param_groups)
    train([(m, [optim_1, optim_2]), (m_dup, [named_optim_1, named_optim_2])])
    assert_param_groups(optim_1.param_groups, named_optim_1.param_groups)
    assert_param_groups(optim_2.param_groups, named_optim_2.param_groups)
    sd_1, sd_2 = optim_1.state_dict(), optim_2.state_dict()
    named_sd_1, named_sd_2 = named_optim_1.state_dict(), named_optim_2.state_dict()
    assert_group_state(sd_1["state"][0], named_sd_1["state"]["net1.0.weight"])
    assert_group_state(sd_2["state"][1], named_sd_2["state"]["net2.0.bias"])
    assert_group_state(sd_1["state"][2], named_sd_1["state"]["net3.weight"])
    assert_group_state(sd_2["state"][3], named_sd_2["state"]["net4.1.bias"])
    assert_group_state(sd_1["param_groups"][0], named_sd_1["param_groups"][0])
    assert_group_state(sd_2["param_groups"][1], named_sd_2["param_groups"][1])
    assert named_sd_2["param_groups"][1]["params"] == ["net4.1.bias", "net4.1.weight"]


CHECKED = ("net1.0.weight", "net2.0.bias", "net3.weight", "net4.1.bias")


def test_load_state_dict() -> None:
    m = DummyModel()
    named_optim_1 = sgd(m.named_parameters())
    train([(m, [named_optim_1])])
    to_load = named_optim_1.state_dict()
    named_optim_2 = sgd(m.named_parameters(), momentum=0.6)
    train([(m, [named_optim_2])])
    before = named_optim_2.state_dict()
    for name in CHECKED:
        assert_group_state(to_load["state"][name], before["state"][name], equal=False)
    named_optim_2.load_state_dict(to_load)
    after = named_optim_2.state_dict()
    for name in CHECKED:
        assert_group_state(to_load["state"][name], after["state"][name])
    assert after["param_groups"][0]["momentum"] == 0.9


def test_load_state_dict_conditional_training() -> None:
    m = DummyModel()
    named_optim_1 = NamedOptimizer(m.named_parameters(), torch.optim.SGD, two_groups(m),
                                   lr=1e-2, momentum=0.9)
    train([(m, [named_optim_1])])
    to_load = named_optim_1.state_dict()
    assert sorted(to_load["state"]) == ["net1.0.bias", "net1.0.weight", "net3.bias",
                                        "net3.weight"]
    named_optim_2 = sgd(m.named_parameters(), momentum=0.6)
    train([(m, [named_optim_2])])
    untouched = named_optim_2.state_dict()["state"]["net2.0.weight"]["momentum_buffer"].clone()
    named_optim_2.load_state_dict(to_load)
    after = named_optim_2.state_dict()
    assert_group_state(to_load["state"]["net1.0.weight"], after["state"]["net1.0.weight"])
    assert_group_state(to_load["state"]["net3.weight"], after["state"]["net3.weight"])
    assert torch.equal(after["state"]["net2.0.weight"]["momentum_buffer"], untouched)
    assert after["param_groups"][0]["momentum"] == 0.6  # no saved group has these params


def test_load_state_dict_error() -> None:
    m = DummyModel()
    named_optim_1 = sgd(m.named_parameters())
    train([(m, [named_optim_1])])
    to_load = named_optim_1.state_dict()
    named_optim_2 = sgd(m.named_parameters(), momentum=0.6)
    with pytest.raises(ValueError, match="Expects the optim to be initialized before load but "
                                         "found not initialized"):
        named_optim_2.load_state_dict(to_load)
    named_optim_2.init_state()
    adam_state = NamedOptimizer(m.named_parameters(), torch.optim.Adam)
    adam_state.init_state()
    with pytest.raises(ValueError, match="Expects equal length as 1 for parameter"):
        named_optim_2.load_state_dict(adam_state.state_dict())


def test_add_param_group() -> None:
    m, m_dup = DummyModel(), DummyModel()
    optim = torch.optim.SGD(two_groups(m), lr=1e-2, momentum=0.9)
    named_optim = NamedOptimizer(m_dup.named_parameters(), torch.optim.SGD, two_groups(m_dup),
                                 lr=1e-2, momentum=0.9)
    train([(m, [optim]), (m_dup, [named_optim])])
    assert_param_groups(optim.param_groups, named_optim.param_groups)
    optim.add_param_group({"params": m.net2.parameters(), "lr": 1e-5})
    named_optim.add_param_group({"params": m_dup.net2.parameters(), "lr": 1e-5})
    train([(m, [optim]), (m_dup, [named_optim])])
    assert_param_groups(optim.param_groups, named_optim.param_groups)
    optim.add_param_group({"params": m.net4[1].weight, "lr": 1e-3})
    named_optim.add_param_group({"params": m_dup.net4[1].weight, "lr": 1e-3})
    train([(m, [optim]), (m_dup, [named_optim])])
    assert_param_groups(optim.param_groups, named_optim.param_groups)
    assert "net4.1.weight" in named_optim.state_dict()["state"]


def test_add_param_group_error() -> None:
    m = DummyModel()
    named_optim = NamedOptimizer(m.named_parameters(), torch.optim.SGD, two_groups(m),
                                 lr=1e-2, momentum=0.9)
    with pytest.raises(ValueError, match="some parameters are not in the module"):
        named_optim.add_param_group({"params": [torch.ones(8, 1)], "lr": 1e-5})
    with pytest.raises(AssertionError, match="param group must be a dict"):
        NamedOptimizer(m.named_parameters(), torch.optim.SGD, [m.parameters()], lr=0.1)  # type: ignore[list-item]
    with pytest.raises(AssertionError, match="param group must contain key params"):
        NamedOptimizer(m.named_parameters(), torch.optim.SGD, [{"lr": 0.1}], lr=0.1)
    with pytest.raises(TypeError, match="optimizer can only optimize Tensors"):
        NamedOptimizer(m.named_parameters(), torch.optim.SGD, [{"params": [1.0]}], lr=0.1)
    with pytest.raises(ValueError, match="found in param group but is missing"):
        NamedOptimizer(m.named_parameters(), torch.optim.SGD,
                       [{"params": [nn.Parameter(torch.ones(2))]}], lr=0.1)


def test_init_state() -> None:
    m = DummyModel()
    named_optim = NamedOptimizer(m.named_parameters(), torch.optim.SGD, two_groups(m),
                                 lr=1e-2, momentum=0.9)
    assert m.net1[0].weight.grad is None
    assert len(named_optim.state_dict()["state"]) == 0
    named_optim.init_state()
    state = named_optim.state_dict()["state"]
    assert m.net1[0].weight.grad is not None and m.net3.bias.grad is not None
    for name in ("net1.0.weight", "net1.0.bias", "net3.weight", "net3.bias"):
        assert "momentum_buffer" in state[name]
        assert not torch.all(state[name]["momentum_buffer"]).item()


# -- 4 ranks: sharded parameters against a dense twin --------------------------------------


def sharded_model(world_size: int, other_layouts: bool = False) -> DummyModel:
    model = DummyModel()
    if other_layouts:
        plan = {"net1.0.weight": cols(world_size), "net3.weight": rows(world_size),
                "net4.1.weight": cols(world_size), "net2.0.bias": several(world_size)}
    else:
        plan = {"net1.0.weight": rows(world_size), "net3.weight": grid((64, 32), world_size),
                "net4.1.weight": several(world_size, dim=1), "net2.0.bias": rows(world_size)}
    ds.shard_module(model, ShardingPlan(plan=dict(plan)))
    return model


SHARDED = ("net1.0.weight", "net3.weight", "net4.1.weight", "net2.0.bias")


def saved_and_loaded(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@multi_rank(world_size=4)
def test_sharded_state_dict_matches_dense(rank: int, world_size: int) -> None:
    m, m_sharded = DummyModel(), sharded_model(world_size)
    optim_1 = NamedOptimizer(m.named_parameters(), torch.optim.SGD, two_groups(m),
                             lr=1e-2, momentum=0.9)
    optim_2 = NamedOptimizer(m.named_parameters(), torch.optim.Adam,
                             [{"params": m.net2.parameters()},
                              {"params": m.net4.parameters(), "lr": 1e-3}])
    sharded_1 = NamedOptimizer(m_sharded.named_parameters(), torch.optim.SGD,
                               two_groups(m_sharded), lr=1e-2, momentum=0.9)
    sharded_2 = NamedOptimizer(m_sharded.named_parameters(), torch.optim.Adam,
                               [{"params": m_sharded.net2.parameters()},
                                {"params": m_sharded.net4.parameters(), "lr": 1e-3}])
    train([(m, [optim_1, optim_2]), (m_sharded, [sharded_1, sharded_2])])
    assert_param_groups(optim_1.param_groups, sharded_1.param_groups)
    assert_param_groups(optim_2.param_groups, sharded_2.param_groups)
    for want_optim, got_optim in ((optim_1, sharded_1), (optim_2, sharded_2)):
        want, got = want_optim.state_dict(), got_optim.state_dict()
        assert want["state"].keys() == got["state"].keys()
        for name, state in got["state"].items():
            assert_group_state(want["state"][name], state)
            if name in SHARDED:  # the state of a sharded parameter is sharded alike
                param = m_sharded.get_parameter(name)
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        assert isinstance(value, ShardedTensor)
                        assert value.sharding_spec() == param.sharding_spec()
        assert want["param_groups"] == got["param_groups"]


@multi_rank(world_size=4)
def test_sharded_save_and_load(rank: int, world_size: int) -> None:
    m, m_sharded = DummyModel(), sharded_model(world_size)
    optim = NamedOptimizer(m.named_parameters(), torch.optim.Adam, lr=1e-2)
    sharded = NamedOptimizer(m_sharded.named_parameters(), torch.optim.Adam, lr=1e-2)
    train([(m, [optim]), (m_sharded, [sharded])])
    to_load = saved_and_loaded(sharded.state_dict())
    assert isinstance(to_load["state"]["net3.weight"]["exp_avg"], ShardedTensor)

    # Into a fresh model sharded another way: the saved state is redistributed.
    target_model = sharded_model(world_size, other_layouts=True)
    target = NamedOptimizer(target_model.named_parameters(), torch.optim.Adam, lr=5e-2)
    with pytest.raises(ValueError, match="Expects the optim to be initialized"):
        target.load_state_dict(to_load)
    target.init_state()
    target.load_state_dict(to_load)
    got = target.state_dict()
    assert got["param_groups"][0]["lr"] == 1e-2
    for name, state in optim.state_dict()["state"].items():
        assert_group_state(state, got["state"][name])
    exp_avg = got["state"]["net1.0.weight"]["exp_avg"]
    assert exp_avg.sharding_spec() == cols(world_size)

    # A dense optimizer state dict loads into the sharded one (each rank keeps its blocks),
    # and the sharded one into a dense optimizer.
    fresh = NamedOptimizer(sharded_model(world_size).named_parameters(), torch.optim.Adam)
    fresh.init_state()
    fresh.load_state_dict(optim.state_dict())
    plain = NamedOptimizer(DummyModel().named_parameters(), torch.optim.Adam)
    plain.init_state()
    plain.load_state_dict(to_load)
    for name, state in optim.state_dict()["state"].items():
        assert_group_state(state, fresh.state_dict()["state"][name])
        assert_group_state(state, plain.state_dict()["state"][name])
        assert not isinstance(plain.state_dict()["state"][name]["exp_avg"], ShardedTensor)


@multi_rank(world_size=4)
def test_sharded_conditional_training_add_group_and_init_state(rank: int,
                                                                world_size: int) -> None:
    m, m_sharded = DummyModel(), sharded_model(world_size)
    optim = NamedOptimizer(m.named_parameters(), torch.optim.SGD, two_groups(m),
                           lr=1e-2, momentum=0.9)
    sharded = NamedOptimizer(m_sharded.named_parameters(), torch.optim.SGD,
                             two_groups(m_sharded), lr=1e-2, momentum=0.9)
    train([(m, [optim]), (m_sharded, [sharded])])
    optim.add_param_group({"params": m.net4[1].weight, "lr": 1e-3})
    sharded.add_param_group({"params": m_sharded.net4[1].weight, "lr": 1e-3})
    with pytest.raises(ValueError, match="some parameters are not in the module"):
        sharded.add_param_group({"params": [ds.ones(rows(world_size), 8, 2)]})
    train([(m, [optim]), (m_sharded, [sharded])], seed=1)
    assert_param_groups(optim.param_groups, sharded.param_groups)
    to_load = sharded.state_dict()
    assert "net4.1.weight" in to_load["state"] and "net2.0.weight" not in to_load["state"]

    # Conditional training: load the state of the parameters that were trained.
    m_other = sharded_model(world_size)
    other = NamedOptimizer(m_other.named_parameters(), torch.optim.SGD, lr=1e-2, momentum=0.6)
    other.init_state()
    init = other.state_dict()["state"]["net3.weight"]["momentum_buffer"]
    assert isinstance(init, ShardedTensor) and not dense(torch.all(init)).item()
    other.load_state_dict(to_load)
    after = other.state_dict()["state"]
    for name in ("net1.0.weight", "net3.weight", "net4.1.weight"):
        assert_group_state(optim.state_dict()["state"][name], after[name])
    assert not dense(torch.any(after["net2.0.bias"]["momentum_buffer"])).item()
