"""Helpers for writing multi-rank tests of code that uses dispatch_shard.

A test body decorated with :func:`multi_rank` runs on every rank of a persistent
pool of worker processes (see :mod:`dispatch_shard.testing.pool`)::

    @multi_rank(world_size=[2, 4])
    def test_sum(rank: int, world_size: int) -> None:
        ...  # runs on every rank; an exception on any rank fails the test
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dispatch_shard.testing.check import LAYOUTS, check_sharded_op
from dispatch_shard.testing.pool import RankFailure, RankPool, get_pool, shutdown_pools

__all__ = ["LAYOUTS", "RankFailure", "RankPool", "check_sharded_op", "get_pool", "multi_rank",
           "shutdown_pools"]

F = TypeVar("F", bound=Callable[..., Any])


def multi_rank(
    world_size: int | Sequence[int] = 4, *, backend: str = "gloo", timeout_s: float = 60.0
) -> Callable[[F], F]:
    """Run the decorated pytest test on every rank of a ``world_size`` pool.

    The body takes ``rank`` and ``world_size`` keyword arguments plus any
    parameters from ``pytest.mark.parametrize`` (they must be picklable). With a
    list of world sizes the test is parametrized over them. ``backend="nccl"``
    tests are skipped with a reason when fewer GPUs than ranks are present.
    Failure, hang or timeout on any rank fails the test with every rank's
    traceback.
    """
    import pytest

    sizes = [world_size] if isinstance(world_size, int) else list(world_size)

    def decorate(body: F) -> F:
        params = [
            p for name, p in inspect.signature(body).parameters.items()
            if name not in ("rank", "world_size")
        ]

        @functools.wraps(body)
        def run_on_ranks(world_size: int, **kwargs: Any) -> None:
            if backend == "nccl":
                import torch

                if torch.cuda.device_count() < world_size:
                    pytest.skip(f"needs {world_size} CUDA devices for NCCL")
            get_pool(world_size, backend).run(
                (body.__module__, body.__qualname__), timeout_s=timeout_s, **kwargs
            )

        world_param = inspect.Parameter("world_size", inspect.Parameter.KEYWORD_ONLY)
        run_on_ranks.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [world_param, *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params)]
        )
        run_on_ranks.__rank_body__ = body  # type: ignore[attr-defined]
        del run_on_ranks.__wrapped__  # pytest must see our signature, not the body's
        marked = pytest.mark.parametrize("world_size", sizes, ids=[f"w{s}" for s in sizes])
        return marked(run_on_ranks)  # type: ignore[no-any-return]

    return decorate
