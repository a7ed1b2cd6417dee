"""Benchmarks: dispatch_shard against DTensor, a minimal wrapper subclass and plain tensors.

Run with ``nox -s bench`` (or ``python tools/bench.py``). Every figure of the
table is taken in this one run, and reported as a ratio as well, because shared
machines are noisy. Sections:

1. Per-op overhead on small tensors (8x8 float32, world 1): pointwise, in-place
   optimizer and view ops, against DTensor and the floor of a minimal Python
   ``__torch_dispatch__`` wrapper that unwraps and rewraps.
2. Overhead against world size: the same ops at world 1 and world 1024
   (PyTorch's fake process group, one process).
   Also the cost against the number of blocks one rank holds.
3. Communication, memory and step time of a Megatron MLP training step at
   world 4 (gloo, the persistent rank pool): bytes moved against the minimum
   the math needs and against DTensor's ``parallelize_module``; per-rank bytes
   of parameters, gradients and optimizer state against dense / world.
4. Communication of a transformer block step at world 4, against the minimum
   and DTensor, with fused and spelled-out attention.
5. Memory at scale: a 32 GiB-parameter MLP from the meta device on 1024 fake
   ranks, trained in a process whose address space could not hold one weight.
6. DP x TP on a 2x2 mesh: the Megatron MLP with its batch split over "dp", against
   DTensor with the same placements (given a sum/N loss, which is right on split
   batches): step time in alternating rounds, collectives and bytes.
7. Data parallel against DDP (world 1 and 4; the plain replicated model and the same
   model under ``ds.data_parallel``; a tiny Hugging Face GPT-2 under
   ``ds.data_parallel`` at world 4, when ``transformers`` is installed, as ``nox -s
   bench`` installs it) and FSDP-style parameters against FSDP2's
   ``fully_shard`` (world 4): step time, collectives, peak memory
   (``tools/bench_data_parallel.py``).
8. torch.compile (inductor) of the Megatron MLP step at world 4: against eager and
   against DTensor compiled, with compile times (``tools/bench_compile.py``).
9. The cost of ``dispatch_shard.random.dense_equivalent()``: dropout of a batch-split
   activation at worlds 2 and 4, against the per-rank draw (``tools/bench_random.py``).
10. Every target of the above in one table, with whether it is met.

The legacy ``torch.distributed._shard`` ShardedTensor is timed where it runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import timeit
import warnings
from collections.abc import Callable
from typing import Any

import bench_compile
import bench_data_parallel
import bench_random
import torch
import torch.distributed as dist


class MinimalWrapper(torch.Tensor):
    """The floor: a wrapper subclass that unwraps, runs the op, and rewraps."""

    __slots__ = ("elem",)

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> MinimalWrapper:
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype,
                                                device=elem.device)
        r.elem = elem
        return r  # type: ignore[no-any-return]

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # Top-level arguments (and one list level, for foreach ops) only: no pytree.
        def unwrap(a: Any) -> Any:
            if isinstance(a, MinimalWrapper):
                return a.elem
            if isinstance(a, list):
                return [unwrap(x) for x in a]
            return a

        out = func(*[unwrap(a) for a in args], **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            return MinimalWrapper(out)
        return out


def _time_us(fn: Callable[[], Any], repeat: int, number: int) -> float:
    fn()
    runs = timeit.repeat(fn, repeat=repeat, number=number)
    return statistics.median(runs) / number * 1e6


def _ops() -> list[tuple[str, Callable[[Any, Any], Any]]]:
    return [
        ("add (pointwise)", lambda x, y: x + y),
        ("mul_ (in place)", lambda x, y: x.mul_(1.0)),
        ("_foreach_add_", lambda x, y: torch._foreach_add_([x], [y], alpha=0.1)),
        # An optimizer's list (the one tensor sixteen times: the per-element cost is the
        # same as for sixteen tensors).
        ("_foreach_add_ x16", lambda x, y: torch._foreach_add_([x] * 16, [y] * 16, alpha=0.1)),
        ("t (view)", lambda x, y: x.t()),
        ("view", lambda x, y: x.view(64)),
        ("sum (reduction)", lambda x, y: x.sum()),
        ("detach", lambda x, y: x.detach()),
    ]


def _subjects(world_size: int) -> dict[str, tuple[Any, Any]]:
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    import dispatch_shard as ds

    dense = torch.randn(8 * world_size, 8)
    spec = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])
    st = ds.ShardedTensor.from_replicated(dense, spec)
    subjects: dict[str, tuple[Any, Any]] = {
        "dispatch_shard": (st, ds.ShardedTensor.from_replicated(dense, spec)),
    }
    if world_size == 1:
        local = dense[:8].clone()
        subjects["plain"] = (local, local.clone())
        subjects["minimal wrapper"] = (MinimalWrapper(local.clone()), MinimalWrapper(local.clone()))
        mesh = DeviceMesh("cpu", list(range(world_size)))
        subjects["DTensor"] = (distribute_tensor(dense.clone(), mesh, [Shard(0)]),
                               distribute_tensor(dense.clone(), mesh, [Shard(0)]))
        subjects["legacy"] = (_legacy(dense), _legacy(dense))
    return subjects


def _legacy(dense: torch.Tensor) -> Any:
    """The legacy ``torch.distributed._shard`` ShardedTensor of ``dense`` (world 1)."""
    import warnings

    from torch.distributed._shard.metadata import ShardMetadata as LegacyMetadata
    from torch.distributed._shard.sharded_tensor import Shard as LegacyShard
    from torch.distributed._shard.sharded_tensor import (
        init_from_local_shards,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation warning
        shard = LegacyShard(dense.clone(), LegacyMetadata([0, 0], list(dense.shape),
                                                          "rank:0/cpu"))
        return init_from_local_shards([shard], *dense.shape)


def _time_or_none(fn: Callable[[], Any], repeat: int, number: int) -> float | None:
    """Microseconds per call, or None when the subject does not support the op."""
    try:
        fn()
    except Exception:  # the legacy API raises RuntimeError, TypeError...
        return None
    return _time_us(fn, repeat, number)


def per_op_overhead(repeat: int, number: int) -> list[tuple[str, dict[str, float | None]]]:
    rows = []
    subjects = _subjects(1)
    for name, op in _ops():
        times = {label: _time_or_none(functools.partial(op, x, y), repeat, number)
                 for label, (x, y) in subjects.items()}
        rows.append((name, times))
    return rows


def shards_per_rank(repeat: int, number: int) -> list[tuple[str, dict[int, float]]]:
    """(op, {local blocks: microseconds}): one rank holding 1, 4 or 16 blocks of an 8x8
    tensor each (an enumerable spec of row blocks); cost should grow with blocks only."""
    import dispatch_shard as ds

    results: dict[str, dict[int, float]] = {}
    for blocks in (1, 4, 16):
        dense = torch.randn(8 * blocks, 8)
        spec = ds.EnumerableShardingSpec([ds.ShardMetadata([8 * i, 0], [8, 8], "rank:0/cpu")
                                          for i in range(blocks)])
        x, y = (ds.ShardedTensor.from_replicated(dense, spec) for _ in range(2))
        for name, op in _ops():
            if name.startswith("view"):
                continue  # a 2-D-only view of the 8x8 case
            results.setdefault(name, {})[blocks] = _time_us(functools.partial(op, x, y),
                                                             repeat, number)
    return list(results.items())


def world_scaling(repeat: int, number: int) -> list[tuple[str, float, float]]:
    """(op, microseconds at world 1, at world 1024), each in its own fake-group world."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    results: dict[str, list[float]] = {}
    for world_size in (1, 1024):
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        try:
            x, y = _subjects(world_size)["dispatch_shard"]
            for name, op in _ops():
                if name.startswith(("sum", "view")):
                    continue  # a collective (not timed by the fake group); a 2-D-only view
                results.setdefault(name, []).append(
                    _time_us(functools.partial(op, x, y), repeat, number))
        finally:
            dist.destroy_process_group()
    return [(name, t[0], t[1]) for name, t in results.items()]


# -- world 4: one training step of the Megatron MLP -------------------------------------

BATCH, D_MODEL, HIDDEN = 64, 256, 1024
ROUNDS = 20  # alternating timing rounds of the MLP step


def _mlp_step_figures(rank: int, world_size: int, steps: int) -> dict[str, float]:
    import copy
    import time

    import torch.nn.functional as F
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import dispatch_shard as ds
    from dispatch_shard.examples import MLP, parallelize

    torch.manual_seed(0)
    dense = MLP(D_MODEL, HIDDEN)
    ours = parallelize(copy.deepcopy(dense), {"fc1": "colwise", "fc2": "rowwise"}, world_size)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world_size,))
    theirs = parallelize_module(copy.deepcopy(dense), mesh,
                                {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    x, y = torch.randn(BATCH, D_MODEL), torch.randn(BATCH, D_MODEL)

    def step(model: Any, optimizer: Any) -> None:
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()

    figures: dict[str, float] = {}
    models = {"ours": ours, "dtensor": theirs, "dense": dense}
    optimizers = {}
    for label, model in models.items():
        optimizer = optimizers[label] = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step(model, optimizer)  # creates the optimizer state
        if label == "ours":
            with ds.count_collectives() as counted:
                step(model, optimizer)
            figures["ours_bytes"] = counted.nbytes
            figures["ours_collectives"] = len(counted.events)
        elif label == "dtensor":
            with CommDebugMode() as comm:
                step(model, optimizer)
            figures["dtensor_collectives"] = comm.get_total_counts()
            # All DTensor collectives here are all-reduces of the [BATCH, D_MODEL] output or
            # its gradient; count their bytes like ours (buffer bytes per all-reduce).
            figures["dtensor_bytes"] = comm.get_total_counts() * BATCH * D_MODEL * 4
    # Step times: rounds that alternate the libraries, so a change in the machine's load
    # (it is shared) falls on all of them alike; the median round of each.
    # Also each round's ratio ours / DTensor (taken seconds apart: the robust figure),
    # and this rank's CPU time per step (what the library costs, without the waiting
    # of four ranks on two cores).
    rounds = ROUNDS
    per_round = max(1, steps // rounds)
    times: dict[str, list[float]] = {label: [] for label in models}
    cpu: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                step(model, optimizers[label])
            cpu[label].append((time.process_time() - start_cpu) / per_round * 1e3)
            dist.barrier()
            times[label].append((time.perf_counter() - start) / per_round * 1e3)
    figures["step_ratio"] = statistics.median(
        o / d for o, d in zip(times["ours"], times["dtensor"], strict=True))
    for label, model in models.items():
        figures[f"{label}_step_ms"] = statistics.median(times[label])
        figures[f"{label}_cpu_ms"] = statistics.median(cpu[label])
        state = [v for s in optimizers[label].state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        figures[f"{label}_memory"] = sum(_local_bytes(t) for t in
                                         [*model.parameters(), *grads, *state])
    return figures


TB_BATCH, TB_SEQ, TB_MODEL, TB_HEADS, TB_HIDDEN = 4, 8, 64, 4, 128


def _transformer_figures(rank: int, world_size: int) -> dict[str, float]:
    """Collectives and bytes of one AdamW step of the transformer block, ours and DTensor's,
    with fused (``scaled_dot_product_attention``) and spelled-out attention."""
    import copy

    import torch.nn.functional as F
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import dispatch_shard as ds
    from dispatch_shard.examples import TRANSFORMER_PLAN, TransformerBlock, parallelize

    torch.manual_seed(0)
    dense = TransformerBlock(TB_MODEL, TB_HEADS, TB_HIDDEN)
    ours = parallelize(copy.deepcopy(dense), TRANSFORMER_PLAN, world_size)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world_size,))
    # Q/K/V outputs stay DTensors so that the head view sees the global shape.
    theirs = parallelize_module(copy.deepcopy(dense), mesh, {
        "q": ColwiseParallel(use_local_output=False),
        "k": ColwiseParallel(use_local_output=False),
        "v": ColwiseParallel(use_local_output=False),
        "o": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()})
    x, y = torch.randn(TB_BATCH, TB_SEQ, TB_MODEL), torch.randn(TB_BATCH, TB_SEQ, TB_MODEL)
    figures: dict[str, float] = {}
    for label, model in (("ours", ours), ("dtensor", theirs)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for fused in (True, False):
            setattr(model, "fused_attention", fused)  # noqa: B010 - a Module attribute
            key = f"{label}_{'fused' if fused else 'spelled'}"
            try:
                for _ in range(2):  # the second step is counted (optimizer state exists)
                    optimizer.zero_grad()
                    if label == "ours":
                        with ds.count_collectives() as counted:
                            F.mse_loss(model(x), y).backward()
                            optimizer.step()
                        figures[f"{key}_collectives"] = len(counted.events)
                        figures[f"{key}_bytes"] = counted.nbytes
                    else:
                        with CommDebugMode() as comm:
                            F.mse_loss(model(x), y).backward()
                            optimizer.step()
                        counts = comm.get_comm_counts()
                        figures[f"{key}_collectives"] = comm.get_total_counts()
                        # All-reduces of [B, S, D] activations or their gradients.
                        others = {str(k) for k, n in counts.items()
                                  if n and "all_reduce" not in str(k)}
                        figures[f"{key}_bytes"] = -1.0 if others else (
                            comm.get_total_counts() * x.numel() * 4)
            except Exception:  # a library that cannot run this variant
                figures[f"{key}_collectives"] = figures[f"{key}_bytes"] = float("nan")
    return figures


def _local_bytes(tensor: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    import dispatch_shard as ds

    if isinstance(tensor, ds.ShardedTensor):
        return sum(b.numel() * b.element_size() for b in tensor._local_tensors)
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        return local.numel() * local.element_size()
    return tensor.numel() * tensor.element_size()


def _creation_figures(rank: int, world_size: int) -> dict[str, float]:
    """``ds.zeros`` of a 64x64 chunk-sharded tensor with the ranks' argument check (one
    16-byte-per-rank all_gather) and inside ``unchecked_creation`` (no communication):
    median microseconds of alternating rounds."""
    import time

    import dispatch_shard as ds

    spec = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])
    number = 200
    times: dict[str, list[float]] = {"checked": [], "unchecked": []}
    for _ in range(ROUNDS):
        for label in times:
            dist.barrier()
            start = time.perf_counter()
            if label == "checked":
                for _ in range(number):
                    ds.zeros(spec, 64, 64)
            else:
                with ds.unchecked_creation():
                    for _ in range(number):
                        ds.zeros(spec, 64, 64)
            times[label].append((time.perf_counter() - start) / number * 1e6)
    return {f"create_{label}_us": statistics.median(v) for label, v in times.items()}


def world4_training(steps: int) -> dict[str, float]:
    from dispatch_shard.testing import get_pool, shutdown_pools

    try:
        results = get_pool(4).run(_mlp_step_figures, timeout_s=600, steps=steps)
        transformer = get_pool(4).run(_transformer_figures, timeout_s=600)[0]
        creation = get_pool(4).run(_creation_figures, timeout_s=600)
    finally:
        shutdown_pools()
    first = results[0]
    first.update({f"tb_{k}": v for k, v in transformer.items()})
    for key in creation[0]:  # the slowest rank
        first[key] = max(r[key] for r in creation)
    # Slowest rank for times, largest rank for memory.
    for key in first:
        if key.endswith(("_step_ms", "_cpu_ms", "_memory")):
            first[key] = max(r[key] for r in results)
    return dict(first)


# -- DP x TP on a 2x2 mesh ------------------------------------------------------------

def _bytes_of_dtensor_collectives(fn: Callable[[], Any]) -> tuple[int, int]:
    """(collectives, bytes handed to them) while ``fn`` runs DTensor code: the functional
    collectives' input sizes, counted as ours are (what this rank gives the collective)."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    counted = [0, 0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            if any(t is DTensor for t in types):
                return NotImplemented  # DTensor first: it issues the collectives below
            if func.namespace in ("_c10d_functional", "c10d") and \
                    "wait" not in func.__name__:
                first = args[0]
                tensors = first if isinstance(first, list | tuple) else [first]
                counted[0] += 1
                counted[1] += sum(t.numel() * t.element_size() for t in tensors)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return counted[0], counted[1]


def _dp_tp_figures(rank: int, world_size: int, steps: int) -> dict[str, float]:
    import copy
    import time

    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import distribute_tensor as dtensor_distribute

    import dispatch_shard as ds
    from dispatch_shard.examples import MLP, parallelize

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    dense = MLP(D_MODEL, HIDDEN)
    ours = parallelize(copy.deepcopy(dense), {"dp": "replicate",
                                              "tp": {"fc1": "colwise", "fc2": "rowwise"}},
                       mesh=mesh)
    theirs = copy.deepcopy(dense)
    placements = {"fc1.weight": [Replicate(), Shard(0)], "fc1.bias": [Replicate(), Shard(0)],
                  "fc2.weight": [Replicate(), Shard(1)], "fc2.bias": [Replicate(), Replicate()]}
    for name, placement in placements.items():
        layer, attr = name.split(".")
        module = getattr(theirs, layer)
        setattr(module, attr, torch.nn.Parameter(
            dtensor_distribute(getattr(module, attr).detach(), mesh, placement)))
    x, y = torch.randn(BATCH, D_MODEL), torch.randn(BATCH, D_MODEL)
    batch = [Shard(0), Replicate()]
    inputs = {"ours": (ds.distribute_tensor(x, mesh, batch), ds.distribute_tensor(y, mesh, batch)),
              "dtensor": (dtensor_distribute(x, mesh, batch), dtensor_distribute(y, mesh, batch))}

    def step(label: str, model: Any, optimizer: Any) -> None:
        optimizer.zero_grad()
        xi, yi = inputs[label]
        if label == "ours":
            F.mse_loss(model(xi), yi).backward()
        else:  # DTensor's mse_loss of a split batch is a mean of means: sum / N is right
            (((model(xi) - yi) ** 2).sum() / yi.numel()).backward()
        optimizer.step()

    models = {"ours": ours, "dtensor": theirs}
    optimizers = {label: torch.optim.AdamW(m.parameters(), lr=1e-3)
                  for label, m in models.items()}
    figures: dict[str, float] = {}
    for label, model in models.items():
        step(label, model, optimizers[label])  # the optimizer state
    with ds.count_collectives() as counted:
        step("ours", ours, optimizers["ours"])
    figures["ours_collectives"], figures["ours_bytes"] = len(counted.events), counted.nbytes
    figures["dtensor_collectives"], figures["dtensor_bytes"] = _bytes_of_dtensor_collectives(
        lambda: step("dtensor", theirs, optimizers["dtensor"]))
    per_round = max(1, steps // ROUNDS)
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(ROUNDS):
        for label, model in models.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(per_round):
                step(label, model, optimizers[label])
            dist.barrier()
            times[label].append((time.perf_counter() - start) / per_round * 1e3)
    figures["step_ratio"] = statistics.median(
        o / d for o, d in zip(times["ours"], times["dtensor"], strict=True))
    for label in models:
        figures[f"{label}_step_ms"] = statistics.median(times[label])
    deviation = max((p.detach().full_tensor() - q.detach().full_tensor()).abs().max().item()
                    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True))
    figures["deviation"] = deviation
    return figures


def dp_tp_training(steps: int) -> dict[str, float]:
    from dispatch_shard.testing import get_pool, shutdown_pools

    try:
        results = get_pool(4).run(_dp_tp_figures, timeout_s=600, steps=steps)
    finally:
        shutdown_pools()
    first = dict(results[0])
    for key in first:
        if key.endswith("_step_ms") or key.endswith("_bytes") or key == "deviation":
            first[key] = max(r[key] for r in results)
    return first


# -- memory at scale: a model no rank could hold, on 1024 fake ranks -------------------

SCALE_WORLD, SCALE_MODEL, SCALE_HIDDEN, SCALE_BATCH = 1024, 16384, 262144, 8
SCALE_LIMIT = 8 << 30  # address-space limit of the child process (bytes)


def _scale_child() -> None:
    """In a child process limited to SCALE_LIMIT bytes of address space: a Megatron MLP
    of 32 GiB of parameters (128 GiB with gradients and AdamW state) built from the meta
    device, sharded over SCALE_WORLD fake ranks, trained two steps as rank 0. Any op that
    materialized a full-size weight would fail to allocate. Prints one line of figures."""
    import json
    import resource

    import torch.nn.functional as F
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import dispatch_shard as ds
    from dispatch_shard.examples import MLP

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=SCALE_WORLD)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.device("meta"):
        model = MLP(SCALE_MODEL, SCALE_HIDDEN)
    ranks = [f"rank:{r}/cpu" for r in range(SCALE_WORLD)]
    rows, cols = ds.ChunkShardingSpec(0, ranks), ds.ChunkShardingSpec(1, ranks)
    model.fc1.weight = torch.nn.Parameter(ds.randn(rows, SCALE_HIDDEN, SCALE_MODEL) * 0.01)
    model.fc1.bias = torch.nn.Parameter(ds.zeros(rows, SCALE_HIDDEN))
    model.fc2.weight = torch.nn.Parameter(ds.randn(cols, SCALE_MODEL, SCALE_HIDDEN) * 0.01)
    model.fc2.bias = torch.nn.Parameter(ds.zeros(ds.Replicate(), SCALE_MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(SCALE_BATCH, SCALE_MODEL), torch.randn(SCALE_BATCH, SCALE_MODEL)
    for _ in range(2):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = [v for st in optimizer.state.values() for v in st.values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    held = sum(_local_bytes(t) for t in [*model.parameters(), *grads, *state])
    dense = 4 * 4 * sum(p.numel() for p in model.parameters())  # params+grads+2 states
    print(json.dumps({"dense": dense, "held": held, "peak_growth": peak - start}))


def memory_at_scale() -> dict[str, float] | str:
    """The figures of :func:`_scale_child`, or why it failed."""
    import json
    import resource
    import subprocess

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (SCALE_LIMIT, SCALE_LIMIT))

    done = subprocess.run([sys.executable, __file__, "--scale-child"], capture_output=True,
                          text=True, preexec_fn=limit, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["no output"])[-1]
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _us(value: float | None) -> str:
    return "unsupported" if value is None else f"{value:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{a / b:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=80,
                        help="timed MLP steps at world 4, per library (in alternating rounds)")
    parser.add_argument("--scale-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # the legacy API's deprecation
    if args.scale_child:
        _scale_child()
        return 0

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        overhead = per_op_overhead(args.repeat, args.number)
        blocks = shards_per_rank(args.repeat, args.number // 4)
    finally:
        dist.destroy_process_group()
    scaling = world_scaling(args.repeat, args.number // 4)
    training = world4_training(args.steps)
    dp_tp = dp_tp_training(args.steps)
    at_scale = memory_at_scale()
    data_parallel = {"dp1": bench_data_parallel.figures(1, "dp"),
                     "dp4": bench_data_parallel.figures(4, "dp"),
                     "dpm1": bench_data_parallel.figures(1, "dp_module"),
                     "dpm4": bench_data_parallel.figures(4, "dp_module"),
                     "fsdp4": bench_data_parallel.figures(4, "fsdp")}
    if importlib.util.find_spec("transformers") is not None:
        data_parallel["gpt2_4"] = bench_data_parallel.figures(4, "gpt2")
    memory = {which: bench_data_parallel.peak_memory(which) for which in ("ours", "fsdp2")}
    compiled = bench_compile.figures()
    randomness = {world: bench_random.figures(world) for world in (2, 4)}

    print("1. Per-op overhead, 8x8 float32 blocks, world 1 (median, microseconds)")
    rows = []
    for name, times in overhead:
        ours = times["dispatch_shard"]
        rows.append([name, _us(times["plain"]), _us(times["minimal wrapper"]),
                     _us(times["DTensor"]), _us(times["legacy"]), _us(ours),
                     _ratio(ours, times["DTensor"]), _ratio(ours, times["minimal wrapper"]),
                     _ratio(ours, times["legacy"])])
    print(_table(["op", "plain", "minimal wrapper", "DTensor", "legacy ShardedTensor",
                  "dispatch_shard", "ds/DTensor (<=1.0)", "ds/wrapper (<=1.25)", "ds/legacy"],
                 rows))
    print("\n2. Overhead against world size (fake process group; microseconds)")
    print(_table(["op", "world 1", "world 1024", "ratio (<=1.2)"],
                 [[n, f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}"] for n, a, b in scaling]))
    print("\n   and against local blocks (one rank holding k 8x8 blocks; microseconds)")
    print(_table(["op", "k=1", "k=4", "k=16", "k=16 / k=1 (linear: <=16)"],
                 [[n, f"{k[1]:.2f}", f"{k[4]:.2f}", f"{k[16]:.2f}", f"{k[16] / k[1]:.2f}"]
                  for n, k in blocks]))
    t = training
    minimum = BATCH * D_MODEL * 4  # one all-reduce of the row-parallel output
    dense_mem = t["dense_memory"]
    print(f"\n3. Megatron MLP ({BATCH}x{D_MODEL} -> {HIDDEN}), AdamW step, world 4 (gloo)")
    print(_table(["figure", "dispatch_shard", "DTensor", "ratio ds/DTensor"], [
        ["collectives per step", f"{t['ours_collectives']:.0f}",
         f"{t['dtensor_collectives']:.0f}", ""],
        ["bytes sent per step (KiB)", f"{t['ours_bytes'] / 2**10:.1f}",
         f"{t['dtensor_bytes'] / 2**10:.1f}", f"{t['ours_bytes'] / t['dtensor_bytes']:.2f}"],
        ["bytes / minimum (1.00)", f"{t['ours_bytes'] / minimum:.2f}",
         f"{t['dtensor_bytes'] / minimum:.2f}", ""],
        ["param+grad+state per rank / (dense/4)", f"{t['ours_memory'] / (dense_mem / 4):.3f}",
         f"{t['dtensor_memory'] / (dense_mem / 4):.3f}", ""],
        [f"step time (ms; median of {ROUNDS} alternating rounds)", f"{t['ours_step_ms']:.1f}",
         f"{t['dtensor_step_ms']:.1f}", f"{t['step_ratio']:.2f} (median of rounds)"],
        ["CPU time per step of the busiest rank (ms)", f"{t['ours_cpu_ms']:.2f}",
         f"{t['dtensor_cpu_ms']:.2f}", f"{t['ours_cpu_ms'] / t['dtensor_cpu_ms']:.2f}"],
    ]))
    print(f"   dense step on one rank: {t['dense_step_ms']:.1f} ms. The legacy ShardedTensor has "
          "no sharded linear, autograd or optimizer path in torch 2.13 to run this model "
          "(ShardedOptimizer needs gradients on local shards, which nothing computes): not "
          "shown.")
    tb_min = 4 * TB_BATCH * TB_SEQ * TB_MODEL * 4  # 2 forward + 2 backward all-reduces

    def tb(key: str) -> list[str]:
        n, b = t[f"tb_{key}_collectives"], t[f"tb_{key}_bytes"]
        if n != n:  # NaN: the library raised
            return ["raises", "", ""]
        if b < 0:
            return [f"{n:.0f}", "(not only all-reduces)", ""]
        return [f"{n:.0f}", f"{b / 2**10:.1f}", f"{b / tb_min:.2f}"]

    print(f"\n4. Transformer block (batch {TB_BATCH}, seq {TB_SEQ}, width {TB_MODEL}, "
          f"{TB_HEADS} heads), AdamW step, world 4: communication")
    print(_table(["library, attention", "collectives", "KiB sent", "bytes / minimum (1.00)"], [
        ["dispatch_shard, scaled_dot_product_attention", *tb("ours_fused")],
        ["dispatch_shard, q @ k.T and softmax", *tb("ours_spelled")],
        ["DTensor, scaled_dot_product_attention", *tb("dtensor_fused")],
        ["DTensor, q @ k.T and softmax", *tb("dtensor_spelled")],
    ]))
    print("   minimum: 2 all-reduces of the [B, S, D] activations forward (attention and MLP "
          "outputs), 2 backward (gradients into the column-parallel inputs).")
    print("\n   Creation, world 4: ds.zeros of a 64x64 tensor, rows split (microseconds, "
          f"slowest rank, median of {ROUNDS} alternating rounds)")
    print(_table(["with the ranks' argument check", "inside unchecked_creation()", "ratio"], [
        [f"{t['create_checked_us']:.1f}", f"{t['create_unchecked_us']:.1f}",
         f"{t['create_checked_us'] / t['create_unchecked_us']:.2f}"]]))
    print(f"\n5. Memory at scale: a Megatron MLP {SCALE_MODEL} -> {SCALE_HIDDEN} from the meta "
          f"device on {SCALE_WORLD} fake ranks, 2 AdamW steps as rank 0 in a process limited "
          f"to {SCALE_LIMIT >> 30} GiB of address space")
    if isinstance(at_scale, str):
        print(f"   FAILED: {at_scale}")
    else:
        gib = 2**30
        dense_b, held, growth = at_scale["dense"], at_scale["held"], at_scale["peak_growth"]
        print(_table(["figure", "value"], [
            ["params+grads+AdamW state, dense (GiB)", f"{dense_b / gib:.1f}"],
            ["the same held by rank 0 (MiB)", f"{held / 2**20:.1f}"],
            [f"held / (dense/{SCALE_WORLD}) (1.00)", f"{held / (dense_b / SCALE_WORLD):.3f}"],
            ["peak RSS growth of the process (MiB)", f"{growth / 2**20:.1f}"],
            ["peak RSS growth / held (no full-size tensor: small)", f"{growth / held:.2f}"],
        ]))
    print(f"\n6. DP x TP on a 2x2 mesh: the MLP above, batch {BATCH} split over dp, "
          "colwise/rowwise over tp, AdamW (busiest rank; DTensor given a sum/N loss)")
    print(_table(["figure", "dispatch_shard", "DTensor", "ratio ds/DTensor"], [
        ["collectives per step", f"{dp_tp['ours_collectives']:.0f}",
         f"{dp_tp['dtensor_collectives']:.0f}", ""],
        ["bytes given to collectives per step (KiB)", f"{dp_tp['ours_bytes'] / 2**10:.1f}",
         f"{dp_tp['dtensor_bytes'] / 2**10:.1f}",
         f"{dp_tp['ours_bytes'] / dp_tp['dtensor_bytes']:.2f}"],
        [f"step time (ms; median of {ROUNDS} alternating rounds)",
         f"{dp_tp['ours_step_ms']:.1f}", f"{dp_tp['dtensor_step_ms']:.1f}",
         f"{dp_tp['step_ratio']:.2f} (median of rounds)"],
        ["largest parameter difference after the steps", f"{dp_tp['deviation']:.1e}", "", ""],
    ]))
    dp1, dp4, fsdp4 = data_parallel["dp1"], data_parallel["dp4"], data_parallel["fsdp4"]
    w, n, b = bench_data_parallel.WIDTH, bench_data_parallel.LAYERS, bench_data_parallel.BATCH
    print(f"\n7. Data parallel: {n} x (Linear({w}, {w}) + GELU), batch {b} per rank, AdamW "
          f"(ms per step, slowest rank; ratio: median of {bench_data_parallel.ROUNDS} "
          "alternating rounds)")
    print(_table(["setup", "dispatch_shard", "anchor", "ratio", "collectives per step",
                  "largest parameter difference"], [
        ["replicated, world 1 (anchor: DDP)", f"{dp1['ours_ms']:.1f}",
         f"{dp1['theirs_ms']:.1f}", f"{dp1['ratio']:.2f}",
         f"{dp1['ours_collectives']:.0f} (DDP buckets: {dp1['theirs_buckets']:.0f})",
         f"{dp1['deviation']:.1e}"],
        ["replicated, world 4 (anchor: DDP)", f"{dp4['ours_ms']:.1f}",
         f"{dp4['theirs_ms']:.1f}", f"{dp4['ratio']:.2f}",
         f"{dp4['ours_collectives']:.0f} (DDP buckets: {dp4['theirs_buckets']:.0f})",
         f"{dp4['deviation']:.1e}"],
        *[[f"ds.data_parallel, world {world} (anchor: DDP)", f"{f['ours_ms']:.1f}",
           f"{f['theirs_ms']:.1f}", f"{f['ratio']:.2f}",
           f"{f['ours_collectives']:.0f} (DDP buckets: {f['theirs_buckets']:.0f})",
           f"{f['deviation']:.1e}"]
          for world, f in ((1, data_parallel["dpm1"]), (4, data_parallel["dpm4"]))],
        *[["GPT-2 (tiny), ds.data_parallel, world 4 (anchor: DDP)", f"{f['ours_ms']:.1f}",
           f"{f['theirs_ms']:.1f}", f"{f['ratio']:.2f}", f"{f['ours_collectives']:.0f}",
           f"{f['deviation']:.1e} (AdamW noise)"]
          for f in [data_parallel[k] for k in ("gpt2_4",) if k in data_parallel]],
        ["dim-0 chunked, world 4 (anchor: FSDP2)", f"{fsdp4['ours_ms']:.1f}",
         f"{fsdp4['theirs_ms']:.1f}", f"{fsdp4['ratio']:.2f}",
         f"{fsdp4['ours_collectives']:.0f}", f"{fsdp4['deviation']:.1e}"],
    ]))
    hidden = dp4["ours_hidden"]
    print(f"   world 4: {dp4['ours_buckets']:.0f} gradient buckets per step, "
          f"{100 * hidden:.0f}% of their reduction time hidden behind backward.")
    print("   Peak RSS growth per rank over 10 steps, dim-0 chunked, world 4 (MiB): "
          f"dispatch_shard {_mib(memory['ours'])}, FSDP2 {_mib(memory['fsdp2'])}")
    c = compiled
    print(f"\n8. torch.compile (inductor) of the Megatron MLP step ({BATCH}x{D_MODEL} -> "
          f"{HIDDEN}), world 4: forward and backward compiled, AdamW eager (ms per step, "
          f"slowest rank; ratios: median of {bench_compile.ROUNDS} alternating rounds of "
          f"{bench_compile.STEPS} steps; compile times after inductor's one-time costs)")
    print(_table(["figure", "value"], [
        ["dispatch_shard eager", f"{c['eager_ms']:.1f}"],
        ["dispatch_shard compiled", f"{c['compiled_ms']:.1f}"],
        ["DTensor compiled", f"{c['dtensor_compiled_ms']:.1f}"],
        ["speedup of compiling (eager / compiled)", f"{c['speedup']:.2f}"],
        ["compiled / DTensor compiled", f"{c['vs_dtensor']:.2f}"],
        ["compile time, dispatch_shard (s)", f"{c['compiled_compile_s']:.1f}"],
        ["compile time, DTensor (s)", f"{c['dtensor_compiled_compile_s']:.1f}"],
        ["largest parameter difference, compiled - eager", f"{c['deviation']:.1e}"],
    ]))
    print(f"\n9. Dropout (p={bench_random.P}) of a [{bench_random.ROWS}, {bench_random.COLS}] "
          "float32 activation chunked along dim 0 (ms, slowest rank; ratios: median of "
          f"{bench_random.ROUNDS} alternating rounds)")
    print(_table(["world", "per-rank draw", "dense_equivalent()", "dense, one rank",
                  "dense_equivalent / per-rank", "dense_equivalent / dense",
                  "equal to dense"], [
        [str(world), f"{r['per_rank_ms']:.2f}", f"{r['dense_equivalent_ms']:.2f}",
         f"{r['dense_ms']:.2f}", f"{r['vs_per_rank']:.2f}", f"{r['vs_dense']:.2f}",
         "yes" if r["equal_to_dense"] else "NO"] for world, r in randomness.items()]))
    print("\n10. Every target in one table (ratios from the sections above)")
    print(_table(["figure", "dispatch_shard", "target", "met"],
                 _summary(overhead, scaling, blocks, training, at_scale, dp_tp)
                 + _data_parallel_summary(data_parallel, memory)
                 + [[
                     "compiled MLP step / DTensor compiled", f"{c['vs_dtensor']:.3f}",
                     "<= 1.0", "yes" if c["vs_dtensor"] <= 1.0 else "NO"]]))
    return 0


def _mib(value: float | None) -> str:
    return "failed" if value is None else f"{value:.1f}"


def _data_parallel_summary(figures: dict[str, dict[str, float]],
                           memory: dict[str, float | None]) -> list[list[str]]:
    dp1, dp4, fsdp4 = figures["dp1"], figures["dp4"], figures["fsdp4"]

    def row(figure: str, value: float, target: str, met: bool) -> list[str]:
        return [figure, f"{value:.3f}" if value < 10 else f"{value:.1f}", target,
                "yes" if met else "NO"]

    rows = []
    for label, one, four in (("ds.data_parallel", figures["dpm1"], figures["dpm4"]),
                             ("plain module", dp1, dp4)):
        rows += [
            row(f"DP world 4, {label}: step time / DDP's", four["ratio"], "<= 1.0",
                four["ratio"] <= 1.0),
            row(f"DP world 4, {label}: collectives per step", four["ours_collectives"],
                f"<= DDP's buckets + 1 = {four['theirs_buckets'] + 1:.0f}",
                four["ours_collectives"] <= four["theirs_buckets"] + 1),
            row(f"DP world 4, {label}: parameters - DDP's", four["deviation"], "< 1e-6",
                four["deviation"] < 1e-6),
            row(f"DP world 1, {label}: step time / DDP's", one["ratio"], "<= 1.3",
                one["ratio"] <= 1.3),
        ]
    rows += [
        row("FSDP-style world 4: step time / FSDP2's", fsdp4["ratio"], "<= 1.0",
            fsdp4["ratio"] <= 1.0),
    ]
    ours, theirs = memory["ours"], memory["fsdp2"]
    if ours is None or theirs is None:
        rows.append(["FSDP-style world 4: peak memory", "FAILED", "", "NO"])
    else:
        rows.append(row("FSDP-style world 4: peak RSS growth - FSDP2's (MiB)", ours - theirs,
                        "<= 0", ours <= theirs))
    return rows


def _summary(overhead: list[tuple[str, dict[str, float | None]]],
             scaling: list[tuple[str, float, float]],
             blocks: list[tuple[str, dict[int, float]]], t: dict[str, float],
             at_scale: dict[str, float] | str, dp_tp: dict[str, float]) -> list[list[str]]:
    rows: list[list[str]] = []

    def row(figure: str, value: float, target: str, met: bool) -> None:
        rows.append([figure, f"{value:.3f}" if value < 10 else f"{value:.1f}", target,
                     "yes" if met else "NO"])

    for name, times in overhead:
        ours, theirs, floor = times["dispatch_shard"], times["DTensor"], times["minimal wrapper"]
        assert ours is not None and theirs is not None and floor is not None
        row(f"{name}: time / DTensor's", ours / theirs, "<= 1.0", ours <= theirs)
        row(f"{name}: time / minimal wrapper's", ours / floor, "<= 1.25", ours <= 1.25 * floor)
    for name, one, many in scaling:
        row(f"{name}: world 1024 / world 1", many / one, "<= 1.2", many <= 1.2 * one)
    for name, k in blocks:
        row(f"{name}: 16 blocks / 1 block", k[16] / k[1], "<= 16 (linear)", k[16] <= 16 * k[1])
    minimum = BATCH * D_MODEL * 4
    row("MLP: bytes / minimum", t["ours_bytes"] / minimum, "1.00", t["ours_bytes"] == minimum)
    row("MLP: bytes / DTensor's", t["ours_bytes"] / t["dtensor_bytes"], "<= 1.0",
        t["ours_bytes"] <= t["dtensor_bytes"])
    memory = t["ours_memory"] / (t["dense_memory"] / 4)
    row("MLP: param+grad+state per rank / (dense/4)", memory, "<= 1.01", memory <= 1.01)
    row("MLP: step time / DTensor's (median of rounds)", t["step_ratio"], "<= 1.0",
        t["step_ratio"] <= 1.0)
    tb_min = 4 * TB_BATCH * TB_SEQ * TB_MODEL * 4
    for key, label in (("fused", "scaled_dot_product_attention"), ("spelled", "q @ k.T")):
        ours = t[f"tb_ours_{key}_bytes"]
        row(f"transformer block ({label}): bytes / minimum", ours / tb_min, "1.00",
            ours == tb_min)
        theirs = t[f"tb_dtensor_{key}_bytes"]
        if theirs == theirs and theirs >= 0:  # DTensor ran (its fused variant raises)
            row(f"transformer block ({label}): bytes / DTensor's", ours / theirs, "<= 1.0",
                ours <= theirs)
    row("DP x TP MLP (2x2): step time / DTensor's", dp_tp["step_ratio"], "<= 1.0",
        dp_tp["step_ratio"] <= 1.0)
    row("DP x TP MLP (2x2): bytes / DTensor's", dp_tp["ours_bytes"] / dp_tp["dtensor_bytes"],
        "<= 1.0", dp_tp["ours_bytes"] <= dp_tp["dtensor_bytes"])
    if isinstance(at_scale, str):
        rows.append(["memory at scale", "FAILED", "", "NO"])
    else:
        held = at_scale["held"] / (at_scale["dense"] / SCALE_WORLD)
        row(f"memory at scale: held / (dense/{SCALE_WORLD})", held, "<= 1.01", held <= 1.01)
        growth = at_scale["peak_growth"] / at_scale["held"]
        row("memory at scale: peak RSS growth / held", growth,
            "small (a full-size weight: > 100)", growth < 10)
    return rows


if __name__ == "__main__":
    sys.exit(main())
