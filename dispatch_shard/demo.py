"""The dispatch_shard demo: ``dispatch-shard-demo`` or ``python -m dispatch_shard.demo``.

By default it starts 4 CPU ranks with gloo on this machine. Under ``torchrun``
(``RANK``/``WORLD_SIZE`` set) it uses the launcher's ranks instead, on one
machine or several.

Each rank takes its blocks of one dense matrix, and the sharded matrix moves
through every layout (rows, columns, a 2-D grid, several blocks per rank,
replicated, partial sums); after each step the demo compares the value with
the dense matrix and reports the largest deviation and the bytes each rank
holds and moves.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

__all__ = ["main"]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dispatch-shard-demo",
        description="Shard a matrix over several ranks and move it through every layout.",
    )
    parser.add_argument("--ranks", type=int, default=4, help="ranks to start (default 4)")
    parser.add_argument("--rows", type=int, default=1000, help="matrix rows (default 1000)")
    parser.add_argument("--cols", type=int, default=300, help="matrix columns (default 300)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                        help="gloo (CPU, default) or nccl (one GPU per rank)")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error(f"--ranks must be at least 1, got {args.ranks}")
    if args.rows < 1 or args.cols < 1:
        parser.error("--rows and --cols must be at least 1")
    if args.backend == "nccl":
        import torch

        if torch.cuda.device_count() < args.ranks:
            parser.error(
                f"--backend nccl needs one GPU per rank: {args.ranks} ranks, "
                f"{torch.cuda.device_count()} GPUs found"
            )
    return args


def _layouts(world: int, device: str) -> list[tuple[str, Any]]:
    import dispatch_shard as ds

    ranks = range(world)
    rows = ds.ChunkShardingSpec(0, [f"rank:{r}/{device}" for r in ranks])
    cols = ds.ChunkShardingSpec(1, [f"rank:{r}/{device}" for r in ranks])
    several = ds.ChunkShardingSpec(0, [f"rank:{r % world}/{device}" for r in range(2 * world)])
    return [
        ("rows", rows),
        ("columns", cols),
        ("2 blocks per rank", several),
        ("replicated", ds.Replicate()),
        ("partial sums", ds.Partial()),
        ("rows again", rows),
    ]


def _run(rank: int, world: int, args: argparse.Namespace) -> float:
    import torch
    import torch.distributed as dist

    import dispatch_shard as ds
    from dispatch_shard import collectives

    device = f"cuda:{rank % max(1, torch.cuda.device_count())}" if args.backend == "nccl" \
        else "cpu"
    if args.backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    torch.manual_seed(0)
    dense = torch.randn(args.rows, args.cols, device=device)
    moved: list[int] = []

    def count(kind: str, nbytes: int, group: Any) -> None:
        moved.append(nbytes)

    collectives._observers.append(count)
    worst = 0.0
    first_spec = _layouts(world, device)[0][1]
    blocks = ds.zeros(first_spec, args.rows, args.cols)
    local = dense[blocks._layout.shard_box(blocks._layout.local_indices(rank)[0])]
    tensor = ds.ShardedTensor.from_local_tensor(local.contiguous(), first_spec,
                                                args.rows, args.cols)
    lines = []
    for name, spec in _layouts(world, device):
        moved.clear()
        tensor = tensor.redistribute(spec)
        step_bytes = sum(moved)
        deviation = (tensor.full_tensor() - dense).abs().max().item()
        held = sum(t.numel() * t.element_size() for t in tensor._local_tensors)
        worst = max(worst, deviation)
        lines.append(f"  {name:<18} holds {held / 2**10:9.1f} KiB  moved {step_bytes / 2**10:9.1f}"
                     f" KiB  max |sharded - dense| = {deviation:.1e}")
    collectives._observers.remove(count)
    totals = torch.tensor([worst], device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.MAX)
    if rank == 0:
        dense_kib = dense.numel() * dense.element_size() / 2**10
        print(f"dispatch_shard demo: {args.rows}x{args.cols} float32 ({dense_kib:.0f} KiB) "
              f"on {world} rank(s), backend {args.backend}")
        print("rank 0, layout by layout:")
        print("\n".join(lines))
        print(f"max deviation from dense over all ranks: {totals.item():.1e}")
    return float(totals.item())


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group(args.backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        deviation = _run(rank, world, args)
    finally:
        dist.destroy_process_group()
    if deviation > 1e-5:
        raise SystemExit(f"rank {rank}: deviation {deviation:.1e} above 1e-5")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        import torch.distributed as dist

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
