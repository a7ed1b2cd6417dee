"""Benchmarks: dispatch_shard against DTensor, a minimal wrapper subclass and plain tensors.

Run with ``nox -s bench`` (or ``python tools/bench.py``). Every figure of the
table is taken in this one run, and reported as a ratio as well, because shared
machines are noisy. Sections:

1. Per-op overhead on small tensors (8x8 float32, world 1): pointwise, in-place
   optimizer and view ops, against DTensor and the floor of a minimal Python
   ``__torch_dispatch__`` wrapper that unwraps and rewraps.
2. Overhead against world size: the same ops at world 1 and world 1024
   (PyTorch's fake process group, one process).
3. Communication, memory and step time of a Megatron MLP training step at
   world 4 (gloo, the persistent rank pool): bytes moved against the minimum
   the math needs and against DTensor's ``parallelize_module``; per-rank bytes
   of parameters, gradients and optimizer state against dense / world.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import timeit
from collections.abc import Callable
from typing import Any

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
        ("t (view)", lambda x, y: x.t()),
        ("view", lambda x, y: x.view(64)),
        ("sum (reduction)", lambda x, y: x.sum()),
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
    return subjects


def per_op_overhead(repeat: int, number: int) -> list[tuple[str, dict[str, float]]]:
    rows = []
    subjects = _subjects(1)
    for name, op in _ops():
        times = {label: _time_us(functools.partial(op, x, y), repeat, number)
                 for label, (x, y) in subjects.items()}
        rows.append((name, times))
    return rows


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
    for label, model in (("ours", ours), ("dtensor", theirs), ("dense", dense)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
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
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step(model, optimizer)
        dist.barrier()
        figures[f"{label}_step_ms"] = (time.perf_counter() - start) / steps * 1e3
        state = [v for s in optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        figures[f"{label}_memory"] = sum(_local_bytes(t) for t in
                                         [*model.parameters(), *grads, *state])
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


def world4_training(steps: int) -> dict[str, float]:
    from dispatch_shard.testing import get_pool, shutdown_pools

    try:
        results = get_pool(4).run(_mlp_step_figures, timeout_s=600, steps=steps)
    finally:
        shutdown_pools()
    first = results[0]
    # Slowest rank for times, largest rank for memory.
    for key in first:
        if key.endswith("_step_ms") or key.endswith("_memory"):
            first[key] = max(r[key] for r in results)
    return dict(first)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20, help="timed MLP steps at world 4")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        overhead = per_op_overhead(args.repeat, args.number)
    finally:
        dist.destroy_process_group()
    scaling = world_scaling(args.repeat, args.number // 4)
    training = world4_training(args.steps)

    print("1. Per-op overhead, 8x8 float32 blocks, world 1 (median, microseconds)")
    rows = []
    for name, t in overhead:
        rows.append([name, f"{t['plain']:.2f}", f"{t['minimal wrapper']:.2f}",
                     f"{t['DTensor']:.2f}", f"{t['dispatch_shard']:.2f}",
                     f"{t['dispatch_shard'] / t['DTensor']:.2f}",
                     f"{t['dispatch_shard'] / t['minimal wrapper']:.2f}"])
    print(_table(["op", "plain", "minimal wrapper", "DTensor", "dispatch_shard",
                  "ds/DTensor (<=1.0)", "ds/wrapper (<=1.25)"], rows))
    print("\n2. Overhead against world size (fake process group; microseconds)")
    print(_table(["op", "world 1", "world 1024", "ratio (<=1.2)"],
                 [[n, f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}"] for n, a, b in scaling]))
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
        ["step time (ms, slowest rank)", f"{t['ours_step_ms']:.1f}",
         f"{t['dtensor_step_ms']:.1f}", f"{t['ours_step_ms'] / t['dtensor_step_ms']:.2f}"],
    ]))
    print(f"   dense step on one rank: {t['dense_step_ms']:.1f} ms. The legacy ShardedTensor has "
          "no sharded linear/optimizer path in torch 2.13 to run this model: not shown.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
