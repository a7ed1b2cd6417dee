"""A persistent pool of ranks for multi-rank tests.

Starting a process group per test costs seconds on a small machine (spawning N
interpreters that import torch). A :class:`RankPool` starts its N worker
processes once, each with its default process group initialised, and then runs
test bodies on every rank for as long as the pool stays healthy.

NOTE [pool failure handling]
A test body that raises on one rank may leave the other ranks waiting in a
collective forever. So after the first error the pool gives the remaining ranks
a short grace period; a rank still busy after that is considered hung. On a hang
or a timeout the pool asks every busy worker for its Python stacks
(faulthandler on SIGUSR1), kills the whole pool and raises :class:`RankFailure`
carrying each rank's traceback. Any failure restarts the pool for the next
test, because ranks that disagreed about the collective sequence cannot be
trusted to agree again.

The rendezvous store lives in the parent process on a port chosen by the OS
(port 0), so parallel test sessions never collide on a fixed port.
"""

from __future__ import annotations

import atexit
import faulthandler
import importlib
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["RankFailure", "RankPool", "get_pool", "shutdown_pools"]

_STARTUP_TIMEOUT_S = 120.0
_ERROR_GRACE_S = 3.0


class RankFailure(AssertionError):
    """A multi-rank test failed: a rank raised, hung, timed out or died."""


@dataclass(frozen=True)
class _Task:
    module: str
    qualname: str
    kwargs: dict[str, Any]


def _resolve(module: str, qualname: str) -> Callable[..., Any]:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    # ``multi_rank`` wraps the body; the worker runs the undecorated body.
    return getattr(obj, "__rank_body__", obj)  # type: ignore[no-any-return]


def _destroy_new_groups(before: set[Any]) -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map.keys()):
        if group not in before and group is not c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)


def _worker_main(
    rank: int,
    world_size: int,
    backend: str,
    store_port: int,
    store_prefix: str,
    conn: mp_connection.Connection,
    log_path: str,
    sys_path: list[str],
    pg_timeout_s: float,
) -> None:
    # Everything the worker prints goes to its log; the parent shows the log of
    # a failing rank. faulthandler dumps every thread's stack on SIGUSR1.
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    sys.path[:] = sys_path
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore(
        "127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=_STARTUP_TIMEOUT_S)
    )
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(store_prefix, store),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=pg_timeout_s),
    )
    conn.send(("ready", None))
    from torch.distributed import distributed_c10d as c10d

    while True:
        task = conn.recv()
        if task is None:
            break
        groups_before = set(c10d._world.pg_map.keys())
        try:
            body = _resolve(task.module, task.qualname)
            result = body(rank=rank, world_size=world_size, **task.kwargs)
            reply: tuple[str, Any] = ("ok", result)
        except BaseException as exc:  # report everything, KeyboardInterrupt included
            reply = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        try:
            _destroy_new_groups(groups_before)
        except Exception:
            pass
        try:
            conn.send(reply)
        except Exception as exc:  # an unpicklable return value
            conn.send(("error", f"could not send the result back: {exc!r}"))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` worker processes, each a rank of a live default process group."""

    _generation = 0

    def __init__(
        self, world_size: int, backend: str = "gloo", pg_timeout_s: float = 60.0
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.pg_timeout_s = pg_timeout_s
        self._procs: list[Any] = []
        self._conns: list[mp_connection.Connection] = []
        self._logs: list[str] = []
        self._store: Any = None
        self._logdir = tempfile.mkdtemp(prefix=f"rankpool{world_size}-")

    # -- lifecycle ---------------------------------------------------------
    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        import torch.distributed as dist

        if self._store is None:
            # Port 0: the OS picks a free port; workers read it from us.
            self._store = dist.TCPStore(
                "127.0.0.1", 0, is_master=True, wait_for_workers=False,
                timeout=timedelta(seconds=_STARTUP_TIMEOUT_S),
            )
        RankPool._generation += 1
        prefix = f"pool/{self.world_size}/{RankPool._generation}/"
        ctx = mp.get_context("spawn")
        self._procs, self._conns, self._logs = [], [], []
        for rank in range(self.world_size):
            parent_conn, child_conn = ctx.Pipe()
            log_path = os.path.join(self._logdir, f"gen{RankPool._generation}-rank{rank}.log")
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, self.world_size, self.backend, self._store.port, prefix,
                      child_conn, log_path, list(sys.path), self.pg_timeout_s),
                daemon=True,
                name=f"rank{rank}of{self.world_size}",
            )
            proc.start()
            child_conn.close()
            self._procs.append(proc)
            self._conns.append(parent_conn)
            self._logs.append(log_path)
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        for rank, conn in enumerate(self._conns):
            started = conn.poll(max(0.0, deadline - time.monotonic()))
            try:
                if started:
                    conn.recv()
                    continue
                problem = "did not start in time"
            except EOFError:
                self._procs[rank].join(timeout=5)  # (its exit code, once it is reaped)
                problem = f"died while starting (exit code {self._procs[rank].exitcode})"
                if self._procs[rank].exitcode == 1:  # spawn re-imports the main module
                    problem += ("; if a script starts the pool (check_sharded_op, say) at "
                                "import, put that code under if __name__ == \"__main__\": "
                                "(the ranks are spawned, and re-import the main module)")
            details = self._collect({}, set(range(self.world_size)))
            self.stop()
            raise RankFailure(f"rank {rank} of {self.world_size} {problem}\n{details}")

    def stop(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except Exception:
                pass
        for proc in self._procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    # -- running -----------------------------------------------------------
    def run(
        self,
        body: Callable[..., Any] | tuple[str, str],
        timeout_s: float = 60.0,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``body(rank=, world_size=, **kwargs)`` on every rank; return each rank's result.

        ``body`` is a module-level function (or a ``(module, qualname)`` pair): the
        workers import it by name. Raises :class:`RankFailure` if any rank raises,
        hangs past ``timeout_s``, or dies.
        """
        if isinstance(body, tuple):
            module, qualname = body
        else:
            module, qualname = body.__module__, body.__qualname__
        if not self.alive:
            self.stop()
            self.start()
        task = _Task(module, qualname, kwargs)
        for conn in self._conns:
            conn.send(task)

        results: dict[int, tuple[str, Any]] = {}
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout_s
        first_error_at: float | None = None
        while pending:
            now = time.monotonic()
            limit = deadline
            if first_error_at is not None:
                limit = min(deadline, first_error_at + _ERROR_GRACE_S)
            if now >= limit:
                break
            ready = mp_connection.wait(
                [self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending],
                timeout=min(0.5, limit - now),
            )
            for rank in list(pending):
                conn = self._conns[rank]
                if conn in ready or conn.poll():
                    try:
                        results[rank] = conn.recv()
                    except EOFError:
                        results[rank] = ("error", "the worker process died")
                elif not self._procs[rank].is_alive():
                    code = self._procs[rank].exitcode
                    results[rank] = ("error", f"the worker process died (exit code {code})")
                else:
                    continue
                pending.discard(rank)
                if results[rank][0] == "error" and first_error_at is None:
                    first_error_at = time.monotonic()

        failed = {r: res for r, res in results.items() if res[0] == "error"}
        if not pending and not failed:
            return [results[r][1] for r in range(self.world_size)]

        reason = (
            f"timed out after {timeout_s:.1f}s" if first_error_at is None
            else "a rank raised" + (" and others hung" if pending else "")
        )
        details = self._collect(failed, pending)
        self.stop()  # see NOTE [pool failure handling]
        raise RankFailure(
            f"{qualname} failed on world size {self.world_size}: {reason}\n{details}"
        )

    def _collect(self, failed: dict[int, tuple[str, Any]], hung: set[int]) -> str:
        for rank in hung:
            proc = self._procs[rank]
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGUSR1)
        if hung:
            time.sleep(0.5)  # let faulthandler write
        parts = []
        for rank in range(self.world_size):
            if rank in failed:
                parts.append(f"--- rank {rank} raised:\n{failed[rank][1]}")
            elif rank in hung:
                code = self._procs[rank].exitcode
                state = "hung; its stacks" if code is None else f"exited ({code}); its log"
                parts.append(f"--- rank {rank} {state}:\n{_tail(self._logs[rank])}")
        return "\n".join(parts)


def _tail(path: str, limit: int = 6000) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return "(no log)"
    return text[-limit:]


_POOLS: dict[tuple[int, str], RankPool] = {}


def get_pool(world_size: int, backend: str = "gloo") -> RankPool:
    """The shared pool for ``world_size`` ranks of ``backend``, started on first use."""
    key = (world_size, backend)
    pool = _POOLS.get(key)
    if pool is None:
        if not _POOLS:
            atexit.register(shutdown_pools)
        pool = _POOLS[key] = RankPool(world_size, backend)
    return pool


def shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.stop()
    _POOLS.clear()
