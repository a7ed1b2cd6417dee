"""Data parallel against DistributedDataParallel and FSDP2's ``fully_shard``.

The model of the data-parallel issue: 8 x (Linear(256, 256) + GELU), batch 16 per rank,
AdamW, gloo. Step times are taken in alternating rounds in one run (the libraries take
turns, so machine noise hits both), and reported as the median of per-round ratios.

- **DP**: every parameter replicated (a ``Replicate`` ShardedTensor), the batch split
  along dim 0; against DDP with its default buckets, at world 1 and world 4. Also the
  collectives per step against DDP's bucket count, and the largest parameter difference
  from DDP's after the run.
- **DP, ``ds.data_parallel``**: the same replicated model wrapped by
  :func:`dispatch_shard.data_parallel` (run on each rank's rows as dense code), against
  DDP likewise.
- **GPT-2, ``ds.data_parallel``**: a Hugging Face ``GPT2LMHeadModel`` (tiny random
  config: 4 layers, width 128, vocabulary 1000, tied embedding and head), batch 8 x 32
  tokens per rank, next-token cross-entropy computed outside the model from the split
  logits, AdamW; against DDP. A real model's mix of ops, beside the MLP's.
- **FSDP-style**: every parameter chunked along dim 0 over the ranks; against
  ``fully_shard`` on each Linear and the root, world 4. Also the peak memory per rank:
  the growth of the process's peak RSS over the timed steps, each library in its own
  processes (so one's peak can't hide the other's).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

WIDTH, LAYERS, BATCH = 256, 8, 16
ROUNDS = 20


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
    return nn.Sequential(*layers)


def _ours(dense: nn.Module, spec: Any) -> nn.Module:
    from dispatch_shard import ShardedTensor

    model = copy.deepcopy(dense)
    for name, param in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr,
                nn.Parameter(ShardedTensor.from_replicated(param.detach(), spec)))
    return model


def _data(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH * world_size, WIDTH, generator=generator),
             torch.randn(BATCH * world_size, WIDTH, generator=generator)) for _ in range(4)]


def _steppers(rank: int, world_size: int, kind: str
              ) -> tuple[dict[str, Callable[[int], None]], tuple[nn.Module, nn.Module]]:
    """``{"ours": step, "theirs": step}`` (each step(i) trains on batch i % 4) and the two
    models."""
    import dispatch_shard as ds

    if kind == "gpt2":
        return _gpt2_steppers(rank, world_size)

    dense = _model()
    rows = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])
    ours = _ours(dense, rows if kind == "fsdp" else ds.Replicate())
    if kind == "dp_module":
        ours = ds.data_parallel(ours)
    theirs: nn.Module
    if kind != "fsdp":
        theirs = nn.parallel.DistributedDataParallel(copy.deepcopy(dense))
    else:
        from torch.distributed.fsdp import fully_shard

        theirs = copy.deepcopy(dense)
        for layer in theirs:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(theirs)
    data = _data(world_size)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    optimizers = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-3),
                  "theirs": torch.optim.AdamW(theirs.parameters(), lr=1e-3)}

    def ours_step(i: int) -> None:
        # Each step wraps this rank's rows, as a training loop does (DDP's takes them).
        with ds.unchecked_creation():
            x, y = (ds.ShardedTensor.from_local_tensor(t[mine], rows, *t.shape)
                    for t in data[i % 4])
        optimizers["ours"].zero_grad()
        F.mse_loss(ours(x), y).backward()
        optimizers["ours"].step()

    def theirs_step(i: int) -> None:
        x, y = data[i % 4]
        optimizers["theirs"].zero_grad()
        F.mse_loss(theirs(x[mine]), y[mine]).backward()
        optimizers["theirs"].step()

    return {"ours": ours_step, "theirs": theirs_step}, (ours, theirs)


GPT2 = {"vocab_size": 1000, "n_positions": 32, "n_embd": 128, "n_layer": 4, "n_head": 4}
GPT2_BATCH = 8


def _gpt2_steppers(rank: int, world_size: int
                   ) -> tuple[dict[str, Callable[[int], None]], tuple[nn.Module, nn.Module]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    from transformers import GPT2Config, GPT2LMHeadModel

    import dispatch_shard as ds

    config = GPT2Config(**GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(config)
    ours = _ours(dense, ds.Replicate())
    ours.lm_head.weight = ours.transformer.wte.weight  # tied again, as in dense
    ours = ds.data_parallel(ours)
    theirs = nn.parallel.DistributedDataParallel(copy.deepcopy(dense))
    vocab, length = GPT2["vocab_size"], GPT2["n_positions"]
    rows = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world_size)])
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(0, vocab, (GPT2_BATCH * world_size, length), generator=generator)
            for _ in range(4)]
    mine = slice(rank * GPT2_BATCH, (rank + 1) * GPT2_BATCH)
    optimizers = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-3),
                  "theirs": torch.optim.AdamW(theirs.parameters(), lr=1e-3)}

    def step(label: str, model: nn.Module, ids: torch.Tensor) -> None:
        optimizers[label].zero_grad()
        logits = model(input_ids=ids).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)).backward()
        optimizers[label].step()

    def ours_step(i: int) -> None:
        with ds.unchecked_creation():
            ids = ds.ShardedTensor.from_local_tensor(data[i % 4][mine], rows,
                                                     *data[i % 4].shape)
        step("ours", ours, ids)

    return ({"ours": ours_step, "theirs": lambda i: step("theirs", theirs, data[i % 4][mine])},
            (ours, theirs))


def _figures(rank: int, world_size: int, kind: str) -> dict[str, float]:
    import dispatch_shard as ds

    steppers, (ours, theirs) = _steppers(rank, world_size, kind)
    for i in range(3):  # optimizer state; DDP rebuilds its buckets after its first step
        for step in steppers.values():
            step(i)
    figures: dict[str, float] = {}
    with ds.count_collectives() as counted:
        steppers["ours"](3)
    steppers["theirs"](3)
    figures["ours_collectives"] = len(counted.events)
    figures["ours_buckets"] = sum(e.op.startswith("gradient bucket") for e in counted.events)
    figures["ours_hidden"] = counted.reduction_hidden_s / max(counted.reduction_s, 1e-12)
    if kind not in ("fsdp", "gpt2"):
        figures["theirs_buckets"] = _ddp_buckets_per_step(world_size)
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for i in range(ROUNDS):
        order = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
        for label in order:
            dist.barrier()
            start = time.perf_counter()
            steppers[label](4 + i)
            dist.barrier()
            times[label].append(time.perf_counter() - start)
    figures["ratio"] = statistics.median(
        a / b for a, b in zip(times["ours"], times["theirs"], strict=True))
    figures["ours_ms"] = statistics.median(times["ours"]) * 1e3
    figures["theirs_ms"] = statistics.median(times["theirs"]) * 1e3
    inner: nn.Module = theirs.module if isinstance(theirs, nn.parallel.DistributedDataParallel) \
        else theirs
    theirs_params = inner.parameters()
    figures["deviation"] = max(
        (_dense(p) - _dense(q)).abs().max().item()
        for p, q in zip(ours.parameters(), theirs_params, strict=True))
    return figures


def _ddp_buckets_per_step(world_size: int) -> int:
    """The all-reduces DDP issues per step once it has rebuilt its buckets (its third
    step), counted by a comm hook that runs DDP's default all-reduce, on a twin model."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    model = nn.parallel.DistributedDataParallel(_model())
    count: list[int] = []

    def counting(state: Any, bucket: Any) -> Any:
        count.append(1)
        return allreduce_hook(state, bucket)

    # DDP checks the hook's annotations as objects (this module's are strings).
    counting.__annotations__.update(bucket=dist.GradBucket,
                                    **{"return": torch.futures.Future[torch.Tensor]})
    model.register_comm_hook(None, counting)
    x, y = _data(world_size)[0]
    for _ in range(3):
        count.clear()
        F.mse_loss(model(x[:BATCH]), y[:BATCH]).backward()
    return len(count)


def _dense(value: torch.Tensor) -> torch.Tensor:
    value = value.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def figures(world_size: int, kind: str) -> dict[str, float]:
    """The figures of ``kind`` ("dp", "dp_module", "gpt2" or "fsdp") at ``world_size``, on the
    rank pool:
    times of the slowest rank, everything else as rank 0 sees it."""
    from dispatch_shard.testing import get_pool, shutdown_pools

    try:
        results = get_pool(world_size).run(_figures, timeout_s=900, kind=kind)
    finally:
        shutdown_pools()
    first = dict(results[0])
    for key in ("ours_ms", "theirs_ms", "ratio", "deviation"):
        first[key] = max(r[key] for r in results)
    return first


# -- peak memory, each library in its own processes -----------------------------------

def _memory_child(which: str) -> None:
    """Run under torchrun: build, take 3 steps, then report the growth of the peak RSS
    over 10 more steps (KiB), the largest over the ranks, from rank 0."""
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    steppers, _ = _steppers(rank, world_size, "fsdp")
    step = steppers["ours" if which == "ours" else "theirs"]
    for i in range(3):
        step(i)
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    for i in range(10):
        step(3 + i)
    growth = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before])
    dist.all_reduce(growth, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"peak_growth_kib": int(growth.item())}))
    dist.destroy_process_group()


def peak_memory(which: str, world_size: int = 4) -> float | None:
    """Peak RSS growth per rank over training steps (MiB) of ``which`` ("ours" or
    "fsdp2"), FSDP-style, in fresh processes."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}",
         os.path.abspath(__file__), "--memory-child", which],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            return float(json.loads(line)["peak_growth_kib"]) / 1024
    return None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        _memory_child(sys.argv[2])
