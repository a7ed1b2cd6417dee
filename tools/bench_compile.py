"""torch.compile of the Megatron MLP step, against eager and against DTensor compiled.

The model of ``tools/bench.py`` section 3 (``MLP(256, 1024)``, batch 64, column- then
row-parallel, AdamW, world 4 on the gloo rank pool). The forward and backward are
compiled with ``inductor``; the optimizer step runs eagerly for all. Step times are
taken in alternating rounds in one run (``STEPS`` steps of each model a round) and
reported as medians of per-round ratios.

NOTE [timing a compile]
A process's first inductor compile also pays once-per-process costs: building the
probe programs that pick the CPU's vector instruction set, hashing torch's sources for
the cache keys, importing the code generators (about 3 s on the 2-core machine).
Whichever model compiles first paid them all, so they are paid here first, on a small
dense function (:func:`_warm_inductor`). The FX graph and AOTAutograd caches are off,
so that a compile does its whole work whatever an earlier run left on disk. Each model
is then compiled twice, in the order A B B A (``torch._dynamo.reset()`` before each),
and its compile time is the mean of its two first calls less its median step.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

BATCH, D_MODEL, HIDDEN = 64, 256, 1024
ROUNDS = 20
STEPS = 5  # steps of each model in a round: one step (about 15 ms) is within the noise
COMPILE_ORDER = ("compiled", "dtensor_compiled", "dtensor_compiled", "compiled")


def _warm_inductor() -> None:
    """Compile a small dense forward and backward with inductor (NOTE [timing a compile])."""
    layer = torch.nn.Linear(8, 8)
    warm = torch.compile(lambda x: F.gelu(layer(x)).sum(), backend="inductor")
    warm(torch.randn(4, 8)).backward()


def _figures(rank: int, world_size: int) -> dict[str, float]:
    import torch._functorch.config
    import torch._inductor.config

    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        return _measured(world_size)


def _measured(world_size: int) -> dict[str, float]:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from dispatch_shard.examples import MLP, parallelize

    torch.manual_seed(0)
    dense = MLP(D_MODEL, HIDDEN)
    plan = {"fc1": "colwise", "fc2": "rowwise"}
    eager = parallelize(copy.deepcopy(dense), plan, world_size)
    ours = parallelize(copy.deepcopy(dense), plan, world_size)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world_size,))
    theirs = parallelize_module(copy.deepcopy(dense), mesh,
                                {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    x, y = torch.randn(BATCH, D_MODEL), torch.randn(BATCH, D_MODEL)
    models: dict[str, Any] = {"eager": eager,
                              "compiled": torch.compile(ours, backend="inductor"),
                              "dtensor_compiled": torch.compile(theirs, backend="inductor")}
    optimizers = {label: torch.optim.AdamW(m.parameters(), lr=1e-3)
                  for label, m in models.items()}

    def step(label: str) -> None:
        optimizers[label].zero_grad()
        F.mse_loss(models[label](x), y).backward()
        optimizers[label].step()

    figures: dict[str, float] = {}
    for _ in range(2):  # every model takes as many steps (the compiled ones compile twice)
        step("eager")
    _warm_inductor()
    first_calls: dict[str, list[float]] = {label: [] for label in COMPILE_ORDER}
    for label in COMPILE_ORDER:
        torch._dynamo.reset()
        dist.barrier()
        start = time.perf_counter()
        step(label)  # compiles
        first_calls[label].append(time.perf_counter() - start)
    for _ in range(2):  # warm (the model the last reset dropped compiles again here)
        for label in models:
            step(label)
    times: dict[str, list[float]] = {label: [] for label in models}
    for i in range(ROUNDS):
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        for label in order:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(STEPS):
                step(label)
            dist.barrier()
            times[label].append((time.perf_counter() - start) / STEPS)
    for label, calls in first_calls.items():
        figures[f"{label}_compile_s"] = statistics.mean(calls) - statistics.median(times[label])
    for label in models:
        figures[f"{label}_ms"] = statistics.median(times[label]) * 1e3
    figures["speedup"] = statistics.median(
        e / c for e, c in zip(times["eager"], times["compiled"], strict=True))
    figures["vs_dtensor"] = statistics.median(
        c / d for c, d in zip(times["compiled"], times["dtensor_compiled"], strict=True))
    deviation = max((p.detach().full_tensor() - q.detach().full_tensor()).abs().max().item()
                    for p, q in zip(ours.parameters(), eager.parameters(), strict=True))
    figures["deviation"] = deviation
    return figures


def figures(world_size: int = 4) -> dict[str, float]:
    """The figures on the rank pool: times and compile times of the slowest rank."""
    from dispatch_shard.testing import get_pool, shutdown_pools

    try:
        results = get_pool(world_size).run(_figures, timeout_s=900)
    finally:
        shutdown_pools()
    first = dict(results[0])
    for key in first:
        if key.endswith(("_ms", "_s")) or key in ("speedup", "vs_dtensor", "deviation"):
            values = [r[key] for r in results]
            first[key] = min(values) if key == "speedup" else max(values)
    return first


if __name__ == "__main__":
    if dist.is_available():
        print(figures())
