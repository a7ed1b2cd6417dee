"""The dispatch_shard demo: ``dispatch-shard-demo`` or ``python -m dispatch_shard.demo``.

By default it starts 4 CPU ranks with gloo on this machine. Under ``torchrun``
(``RANK``/``WORLD_SIZE`` set) it uses the launcher's ranks instead, on one
machine or several.

Each rank builds the same small transformer-style model, shards it
Megatron-style (attention and MLP linears column- then row-parallel; layer norms
replicated) and trains it with plain ``torch.optim.AdamW``, next to a dense copy
trained on the same data. The report: the largest deviation of any parameter
from the dense model, the bytes of parameters, gradients and optimizer state a
rank holds against the dense model's, and the collectives one step issues.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

__all__ = ["main"]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dispatch-shard-demo",
        description="Train a sharded transformer-style model on several ranks and compare "
                    "it with the same model trained densely.",
    )
    parser.add_argument("--ranks", type=int, default=4, help="ranks to start (default 4)")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--width", type=int, default=32, help="model width (default 32)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                        help="gloo (CPU, default) or nccl (one GPU per rank)")
    parser.add_argument("--mesh", default=None, metavar="DPxTP",
                        help="train on a 2-D mesh: the batch split over DP ranks, the "
                             "model tensor-parallel over TP (e.g. 2x2; sets --ranks)")
    args = parser.parse_args(argv)
    if args.mesh is not None:
        try:
            dp, tp = (int(n) for n in args.mesh.lower().split("x"))
        except ValueError:
            parser.error(f"--mesh must look like 2x2 (DP x TP), got {args.mesh!r}")
        if dp < 1 or tp < 1:
            parser.error(f"--mesh sizes must be at least 1, got {args.mesh!r}")
        args.mesh = (dp, tp)
        args.ranks = dp * tp
    if args.ranks < 1:
        parser.error(f"--ranks must be at least 1, got {args.ranks}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.width < 4 or args.width % 4:
        parser.error(f"--width must be a positive multiple of 4 (4 heads), got {args.width}")
    if args.backend == "nccl":
        import torch

        if torch.cuda.device_count() < args.ranks:
            parser.error(
                f"--backend nccl needs one GPU per rank: {args.ranks} ranks, "
                f"{torch.cuda.device_count()} GPUs found"
            )
    return args


VOCAB = 64  # rows of the demo's EmbeddingBag


def _model(width: int) -> Any:
    import torch
    from torch import nn

    from dispatch_shard.examples import TransformerBlock

    class DemoModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Per sequence, a bag of context ids whose mean embedding joins every position.
            self.context = nn.EmbeddingBag(VOCAB, width, mode="mean")
            self.blocks = nn.Sequential(TransformerBlock(width, 4, 2 * width),
                                        TransformerBlock(width, 4, 2 * width))
            self.head = nn.Linear(width, width)

        def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            x = x + self.context(ids).unsqueeze(1)
            return self.head(self.blocks(x))  # type: ignore[no-any-return]

    return DemoModel()


def _plan() -> dict[str, str]:
    from dispatch_shard.examples import TRANSFORMER_PLAN

    plan = {f"blocks.{i}.{path}": style for i in (0, 1) for path, style in
            TRANSFORMER_PLAN.items()}
    plan["head"] = "replicate"
    plan["context"] = "table_rowwise"
    return plan


def _bytes(tensors: Any) -> int:
    import dispatch_shard as ds

    total = 0
    for t in tensors:
        blocks = t._local_tensors if isinstance(t, ds.ShardedTensor) else [t]
        total += sum(b.numel() * b.element_size() for b in blocks)
    return total


def _state_bytes(model: Any, optimizer: Any) -> int:
    import torch

    state = [v for s in optimizer.state.values() for v in s.values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return _bytes(model.parameters()) + _bytes(grads) + _bytes(state)


def _progress(step: int, steps: int, loss: float) -> None:
    done = int(30 * step / steps)
    line = f"[{'#' * done}{'.' * (30 - done)}] step {step:>4}/{steps}  loss {loss:.5f}"
    if sys.stdout.isatty():
        print("\r" + line, end="\n" if step == steps else "", flush=True)
    elif step == steps or step % max(1, steps // 8) == 0:
        print(line, flush=True)


def _run(rank: int, world: int, args: argparse.Namespace) -> float:
    import copy

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import dispatch_shard as ds
    from dispatch_shard import collectives
    from dispatch_shard.examples import parallelize

    device = f"cuda:{rank % max(1, torch.cuda.device_count())}" if args.backend == "nccl" \
        else "cpu"
    torch.manual_seed(0)  # every rank builds the same dense model
    dense = _model(args.width).to(device)
    mesh = None
    if args.mesh is not None:  # DP x TP: the plan on "tp", the batch on "dp"
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard

        if args.mesh[0] * args.mesh[1] != world:
            raise SystemExit(f"--mesh {args.mesh[0]}x{args.mesh[1]} needs "
                             f"{args.mesh[0] * args.mesh[1]} ranks, not {world}")
        mesh = init_device_mesh(device.split(":")[0], args.mesh, mesh_dim_names=("dp", "tp"))
        sharded = parallelize(copy.deepcopy(dense), {"dp": "replicate", "tp": _plan()},
                              mesh=mesh)
    else:
        sharded = parallelize(copy.deepcopy(dense), _plan(), world, device.split(":")[0]
                              if device == "cpu" else device)

    def batch(value: torch.Tensor) -> torch.Tensor:
        if mesh is None:
            return value
        return ds.distribute_tensor(value, mesh, [Shard(0), Replicate()])

    dense_opt = torch.optim.AdamW(dense.parameters(), lr=3e-3)
    sharded_opt = torch.optim.AdamW(sharded.parameters(), lr=3e-3)
    generator = torch.Generator(device="cpu").manual_seed(1)  # the same data on every rank
    issued: list[tuple[str, int]] = []

    def observe(kind: str, nbytes: int, group: Any) -> None:
        issued.append((kind, nbytes))

    per_step: list[tuple[str, int]] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(4, 6, args.width, generator=generator).to(device)
        ids = torch.randint(0, VOCAB, (4, 3), generator=generator).to(device)
        y = torch.sin(x.flip(-1)).to(device)  # something to learn
        for model, optimizer in ((dense, dense_opt), (sharded, sharded_opt)):
            optimizer.zero_grad()
            if model is sharded:
                collectives._observers.append(observe)
            if model is sharded:
                loss = F.mse_loss(model(batch(x), batch(ids)), batch(y))
            else:
                loss = F.mse_loss(model(x, ids), y)
            loss.backward()
            optimizer.step()
            if model is sharded:
                collectives._observers.remove(observe)
        if step == 1:
            per_step = list(issued)
        issued.clear()
        # (every rank: the loss may be pending, and its value a collective)
        value = loss.detach()
        if isinstance(value, ds.ShardedTensor):
            value = value.full_tensor()
        if rank == 0:
            _progress(step, args.steps, float(value.detach().item()))
    elapsed = time.perf_counter() - start

    deviation = 0.0
    for p, q in zip(sharded.parameters(), dense.parameters(), strict=True):
        value = p.full_tensor().detach() if isinstance(p, ds.ShardedTensor) else p.detach()
        deviation = max(deviation, (value - q.detach()).abs().max().item())
    worst = torch.tensor([deviation], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    sharded_bytes = torch.tensor([_state_bytes(sharded, sharded_opt)], device=device)
    held = [torch.zeros_like(sharded_bytes) for _ in range(world)]
    dist.all_gather(held, sharded_bytes)
    if rank == 0:
        dense_bytes = _state_bytes(dense, dense_opt)
        kinds = Counter(kind for kind, _ in per_step)
        moved = sum(nbytes for _, nbytes in per_step)
        where = f"{world} rank(s)" if mesh is None else \
            f"a {args.mesh[0]}x{args.mesh[1]} (dp x tp) mesh, the batch split over dp"
        print(f"dispatch_shard demo: a 2-block transformer with a row-wise EmbeddingBag "
              f"(width {args.width}) on {where}, "
              f"backend {args.backend}, {args.steps} AdamW steps in {elapsed:.1f} s")
        print(f"  max |sharded - dense| over all parameters and ranks: {worst.item():.2e}")
        print(f"  parameters + gradients + AdamW state: dense {dense_bytes / 2**10:.1f} KiB; "
              "per rank " + ", ".join(f"{int(h.item()) / 2**10:.1f}" for h in held) +
              f" KiB ({max(int(h.item()) for h in held) / dense_bytes:.0%} of dense at most)")
        print("  collectives per training step: "
              + (", ".join(f"{n} x {k}" for k, n in sorted(kinds.items())) or "none")
              + f"; {moved / 2**10:.1f} KiB sent by rank 0")
    return float(worst.item())


def _one_thread_per_rank() -> None:
    """Several ranks share this machine's cores: a rank with several intra-op threads
    waits on preempted peers (a tiny matmul went from 2 us to 12 ms on 2 busy cores)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    # Before init_process_group: NOTE [torch.distributed.nn is imported with the
    # package] in dispatch_shard/__init__.py.
    import dispatch_shard  # noqa: F401

    _one_thread_per_rank()
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group(args.backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        deviation = _run(rank, world, args)
        # Every rank leaves together: a rank that tears its gloo connections down while a
        # peer is still printing the report could take the peer down with it (one
        # SIGABRT seen on rank 3 in many runs).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if deviation > 1e-5:
        raise SystemExit(f"rank {rank}: deviation {deviation:.1e} above 1e-5")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        import torch.distributed as dist

        import dispatch_shard  # noqa: F401  (before init_process_group; see _worker)

        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            _one_thread_per_rank()

        dist.init_process_group(args.backend)
        try:
            deviation = _run(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return 0 if deviation <= 1e-5 else 1
    import torch.distributed as dist
    import torch.multiprocessing as mp

    # The rendezvous store lives here, on a port the OS picks.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        mp.spawn(_worker, args=(args.ranks, store.port, args), nprocs=args.ranks)
    except mp.ProcessRaisedException as exc:
        print(f"dispatch-shard-demo: a rank failed: {exc}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as exc:
        print(f"dispatch-shard-demo: a rank exited: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
