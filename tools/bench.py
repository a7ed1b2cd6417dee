"""Benchmarks: dispatch_shard against a minimal wrapper subclass, DTensor and plain tensors.

Run with ``nox -s bench`` (or ``python tools/bench.py``). All figures of one
table are taken in one run, and reported as ratios as well as times, because
shared machines are noisy.

Today: per-op overhead on small tensors at world size 1 (one process, gloo),
for the ops every implementation supports. The op list grows with the op
families; communication and memory figures join it with the performance work.
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
        # Top-level arguments only: no pytree, the cheapest honest unwrap/rewrap.
        out = func(*[a.elem if isinstance(a, MinimalWrapper) else a for a in args],
                   **(kwargs or {}))
        return MinimalWrapper(out) if isinstance(out, torch.Tensor) else out


def _time_us(fn: Callable[[], Any], repeat: int, number: int) -> float:
    fn()
    runs = timeit.repeat(fn, repeat=repeat, number=number)
    return statistics.median(runs) / number * 1e6


def dispatch_overhead(repeat: int, number: int) -> list[tuple[str, dict[str, float]]]:
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

    import dispatch_shard as ds

    dense = torch.randn(8, 8)
    st = ds.ShardedTensor.from_local_tensor(
        dense.clone(), ds.ChunkShardingSpec(0, ["rank:0/cpu"]), 8, 8
    )
    mesh = DeviceMesh("cpu", [0])
    dt = distribute_tensor(dense.clone(), mesh, [Shard(0)])
    dt_rep = distribute_tensor(dense.clone(), mesh, [Replicate()])
    wrapped = MinimalWrapper(dense.clone())
    ops: list[tuple[str, Callable[[torch.Tensor], Any]]] = [
        ("detach", torch.Tensor.detach),
        ("clone", torch.clone),
        ("zeros_like", torch.zeros_like),
    ]
    subjects = {"plain": dense, "minimal wrapper": wrapped, "DTensor": dt,
                "DTensor (replicated)": dt_rep, "dispatch_shard": st}
    rows = []
    for name, op in ops:
        times = {
            label: _time_us(functools.partial(op, tensor), repeat, number)
            for label, tensor in subjects.items()
        }
        rows.append((name, times))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        rows = dispatch_overhead(args.repeat, args.number)
    finally:
        dist.destroy_process_group()
    print("Per-op overhead, 8x8 float32, world size 1 (median of runs, microseconds)")
    header = ["op", "plain", "minimal wrapper", "DTensor", "dispatch_shard",
              "ds / DTensor", "ds / wrapper"]
    print(" | ".join(f"{h:>15}" for h in header))
    for name, t in rows:
        cells = [name, f"{t['plain']:.2f}", f"{t['minimal wrapper']:.2f}", f"{t['DTensor']:.2f}",
                 f"{t['dispatch_shard']:.2f}", f"{t['dispatch_shard'] / t['DTensor']:.2f}",
                 f"{t['dispatch_shard'] / t['minimal wrapper']:.2f}"]
        print(" | ".join(f"{c:>15}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
