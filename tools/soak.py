"""Soak test: train the demo model for many steps and check that nothing accumulates.

``python tools/soak.py`` (or ``nox -s soak``) trains the demo's sharded 2-block
transformer (``dispatch_shard.demo``: Megatron plan, width 32) with plain
``torch.optim.AdamW`` on 4 gloo CPU ranks for 2000 steps and samples, on every
rank, every ``--sample-every`` steps at the same point of the step (after
``optimizer.step()`` and ``zero_grad()``, after ``gc.collect()``):

* RSS (``VmRSS`` of ``/proc/self/status``),
* live ``torch.Tensor`` objects (ShardedTensors among them) and all objects
  that the garbage collector tracks,
* the size of every cache in ``dispatch_shard`` and its ops (each
  ``functools.lru_cache``/``cache`` of a module or of a class in one, and
  module-level dicts, lists and sets such as layout interning and registries).

Before the first and after the last step it records the Python threads
(``threading.enumerate()``), the native threads (``/proc/self/task``) and the
process groups (``torch.distributed.distributed_c10d._world``: the live groups
in ``pg_map`` and ``group_count``, the number ever created).

NOTE [what flat means]
The first ``--warmup`` steps fill caches, the optimizer state, the allocator's
pools and gloo's buffers. After warm-up, on every rank:

* RSS never exceeds its value at the end of warm-up by more than
  ``--rss-bound-mib`` (default 2 MiB; a leak of one small tensor a step, 512 bytes,
  grows RSS by 1 MiB in 2000 steps);
* the live tensors and the GC-tracked objects are exactly as many at every
  sample as at the end of warm-up (the same point of the same step: any
  difference is something a step keeps);
* no cache has more entries than at the end of warm-up;
* the threads and process groups after the last step are those before the first
  (no group was created, none left behind).

The script prints one table (a row per rank) and exits 1 when any of these fails.
``tests/test_soak.py`` runs a shorter soak with the same checks.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["check", "main", "soak_rank", "table"]


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _groups() -> tuple[int, int]:
    """(live process groups, groups ever created)."""
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map), c10d._world.group_count


def _caches() -> dict[str, int]:
    """The number of entries of every cache and module-level container in dispatch_shard."""
    sizes: dict[str, int] = {}
    modules = [(name, module) for name, module in list(sys.modules.items())
               if module is not None and name.split(".")[0] == "dispatch_shard"]
    for module_name, module in modules:
        for name, value in list(vars(module).items()):
            if name.startswith("__"):
                continue
            where = f"{module_name}.{name}"
            if callable(getattr(value, "cache_info", None)):
                sizes[where] = value.cache_info().currsize
            elif isinstance(value, dict | list | set) and not isinstance(value, type):
                sizes[where] = len(value)
            elif isinstance(value, type) and value.__module__ == module_name:
                for attr, member in vars(value).items():
                    member = getattr(member, "__func__", member)  # static/class methods
                    if callable(getattr(member, "cache_info", None)):
                        sizes[f"{where}.{attr}"] = member.cache_info().currsize
    return sizes


def _objects() -> tuple[int, int, int]:
    """(live tensors, live ShardedTensors, GC-tracked objects) after a full collection: the
    least of three counts 20 ms apart. A collective's worker thread can hold a finished
    reduction's buffer (and with it the tensor's Python object) for a moment after the
    reduction is waited for; CI once saw one such tensor at a middle sample, gone at the
    next. Something a step keeps is there in all three counts, and at every later sample."""
    import torch

    from dispatch_shard import ShardedTensor

    counts = []
    for attempt in range(3):
        if attempt:
            time.sleep(0.02)
        gc.collect()
        objects = gc.get_objects()
        tensors = sharded = 0
        for obj in objects:
            if isinstance(obj, torch.Tensor):
                tensors += 1
                sharded += isinstance(obj, ShardedTensor)
        counts.append((tensors, sharded, len(objects)))
        del objects
    return min(c[0] for c in counts), min(c[1] for c in counts), min(c[2] for c in counts)


def _sample(step: int, kept: int) -> dict[str, Any]:
    """The figures at ``step``; ``kept``: the earlier samples (each one GC-tracked dict)."""
    tensors, sharded, objects = _objects()
    return {"step": step, "rss": _rss_bytes(), "tensors": tensors, "sharded": sharded,
            "objects": objects - kept, "caches": _caches()}


def _loss_value(loss: Any) -> float:
    """The loss as a float, read without a graph: a ``full_tensor()`` kept across steps
    would keep its step's loss (and what that holds) alive until it is replaced at the
    last step, and the last sample would count the soak's own bookkeeping."""
    import torch

    from dispatch_shard import ShardedTensor

    with torch.no_grad():
        return float(loss.full_tensor() if isinstance(loss, ShardedTensor) else loss)


def soak_rank(*, rank: int, world_size: int, steps: int = 2000, sample_every: int = 100,
              warmup: int = 200, width: int = 32) -> dict[str, Any]:
    """Train the demo model for ``steps`` steps on this rank; return the samples.

    Runs on every rank of a live default process group (gloo, CPU), one intra-op
    thread per rank. ``warmup`` must be a multiple of ``sample_every``.
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from dispatch_shard import demo
    from dispatch_shard.demo import _model, _plan
    from dispatch_shard.examples import parallelize

    if warmup % sample_every or steps % sample_every or not 0 < warmup < steps:
        raise ValueError(f"soak: warmup {warmup} and steps {steps} must be multiples of "
                         f"sample_every {sample_every}, 0 < warmup < steps")
    torch.set_num_threads(1)  # ranks share the cores: see dispatch_shard.demo
    # Groups that earlier work destroyed are freed when collected (no cache of ours keeps
    # one: NOTE [caches never keep a process group alive]), with their gloo threads:
    # collect them now, or they would leave during the soak and look like a change.
    gc.collect()
    threads_before = sorted(t.name for t in threading.enumerate())
    native_before, groups_before = _native_threads(), _groups()

    torch.manual_seed(0)  # the same dense model on every rank
    model = parallelize(_model(width), _plan(), world_size)
    # The demo model may also take the ids of an EmbeddingBag's bags (demo.VOCAB rows).
    vocab = getattr(demo, "VOCAB", None)
    takes_ids = "ids" in inspect.signature(model.forward).parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)  # the same data on every rank
    samples = []
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randn(4, 6, width, generator=generator)
        inputs = (x, torch.randint(0, vocab, (4, 3), generator=generator)) if takes_ids else (x,)
        loss = F.mse_loss(model(*inputs), torch.sin(x.flip(-1)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step == steps:
            losses.append(_loss_value(loss))
        del loss, x, inputs
        if step % sample_every == 0:
            samples.append(_sample(step, len(samples)))
    elapsed = time.perf_counter() - start
    dist.barrier()

    return {
        "rank": rank, "world_size": world_size, "steps": steps, "warmup": warmup,
        "seconds": elapsed, "losses": losses, "samples": samples,
        "threads": (threads_before, sorted(t.name for t in threading.enumerate())),
        "native_threads": (native_before, _native_threads()),
        "groups": (groups_before, _groups()),
    }


def check(results: Sequence[dict[str, Any]], rss_bound_mib: float = 2.0) -> list[str]:
    """What is not flat (NOTE [what flat means]); empty when all is well."""
    problems = []
    for result in results:
        rank = f"rank {result['rank']}"
        after = [s for s in result["samples"] if s["step"] >= result["warmup"]]
        base = after[0]
        growth = max(s["rss"] for s in after) - base["rss"]
        if growth > rss_bound_mib * 2**20:
            problems.append(f"{rank}: RSS grew {growth / 2**20:.2f} MiB after warm-up "
                            f"(bound {rss_bound_mib} MiB)")
        for key in ("tensors", "sharded", "objects"):
            counts = [s[key] for s in after]
            if any(count != base[key] for count in counts):
                problems.append(f"{rank}: live {key} after warm-up: {counts}")
        for name in sorted(set().union(*(s["caches"] for s in after))):
            largest = max(s["caches"].get(name, 0) for s in after)
            if largest > base["caches"].get(name, 0):
                problems.append(f"{rank}: {name} grew from {base['caches'].get(name, 0)} "
                                f"to {largest} entries after warm-up")
        for key in ("threads", "native_threads", "groups"):
            before, end = result[key]
            if before != end:
                problems.append(f"{rank}: {key} before {before}, after {end}")
        if not result["losses"][-1] < result["losses"][0]:
            problems.append(f"{rank}: the loss did not go down: {result['losses']}")
    return problems


def table(results: Sequence[dict[str, Any]]) -> str:
    """One row per rank: the soak's figures."""
    first = results[0]
    header = ("rank", "RSS warm MiB", "RSS end MiB", "max growth KiB", "last half KiB",
              "tensors warm/end",
              "objects warm/end", "cache entries", "py threads", "native threads",
              "groups live/created", "s")
    rows = [header]
    for result in results:
        after = [s for s in result["samples"] if s["step"] >= result["warmup"]]
        base, end = after[0], after[-1]
        growth = max(s["rss"] for s in after) - base["rss"]
        half = end["rss"] - after[len(after) // 2]["rss"]
        (groups_before, created_before), (groups_after, created_after) = result["groups"]
        rows.append((
            str(result["rank"]), f"{base['rss'] / 2**20:.1f}", f"{end['rss'] / 2**20:.1f}",
            f"{growth / 2**10:.0f}", f"{half / 2**10:.0f}", f"{base['tensors']}/{end['tensors']}",
            f"{base['objects']}/{end['objects']}",
            f"{sum(base['caches'].values())}/{sum(end['caches'].values())}",
            f"{len(result['threads'][0])}->{len(result['threads'][1])}",
            f"{result['native_threads'][0]}->{result['native_threads'][1]}",
            f"{groups_before}/{created_before}->{groups_after}/{created_after}",
            f"{result['seconds']:.0f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    steps, warmup, losses = first["steps"], first["warmup"], first["losses"]
    every = first["samples"][0]["step"]
    title = (f"soak: demo model, {first['world_size']} gloo CPU ranks, {steps} AdamW steps "
             f"(warm-up {warmup}; a sample every {every} steps; loss {losses[0]:.4f} -> "
             f"{losses[-1]:.4f}); RSS growth after warm-up: the largest, and over the "
             "second half of the samples after warm-up")
    return "\n".join([title, *lines])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--rss-bound-mib", type=float, default=2.0)
    args = parser.parse_args(argv)

    from dispatch_shard.testing import get_pool, shutdown_pools

    # The ranks import this file by name (``soak``): the pool hands them our sys.path.
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        results = get_pool(args.ranks).run(
            ("soak", "soak_rank"), timeout_s=3600.0, steps=args.steps,
            sample_every=args.sample_every, warmup=args.warmup, width=args.width)
    finally:
        shutdown_pools()
    print(table(results))
    problems = check(results, args.rss_bound_mib)
    for problem in problems:
        print("NOT FLAT:", problem)
    print("flat: yes" if not problems else f"flat: no ({len(problems)} problems)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
