"""A catalogue of bad inputs and faults, each with its expected outcome on every rank.

The catalogue is the table in ``docs/reliability.rst``; each row is a case here. A bad
input raises the same clear error on every rank of the group (never a hang, never a
silently wrong value); NaN, inf and zero-size dims behave as in dense. Faults (a rank
that skips a collective or dies) surface as a ``CollectiveError`` naming the op and the
ranks, and the debug mode (``dispatch_shard.debug``) names the first op where ranks diverge.

NOTE [bad-input cases run on a group with a short timeout]
Each case body builds its tensors on a fresh process group with a short timeout, so
if a case regressed into an error raised on some ranks only, the others would fail
with a CollectiveError a few seconds later (reported as a different outcome per rank)
instead of hanging the test until the pool's timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard as TShard

import dispatch_shard as ds
from dispatch_shard import ShardedTensor, collectives
from dispatch_shard.collectives import CollectiveError
from dispatch_shard.debug import RankDivergenceError
from dispatch_shard.testing import RankFailure, get_pool, multi_rank

CASE_GROUP_TIMEOUT = timedelta(seconds=10)
FAULT_GROUP_TIMEOUT = timedelta(seconds=3)


def chunk(dim: int, ranks: list[int] | range) -> ds.ChunkShardingSpec:
    return ds.ChunkShardingSpec(dim, [f"rank:{r}/cpu" for r in ranks])


def seeded(*size: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def short_group(world_size: int, timeout: timedelta = CASE_GROUP_TIMEOUT) -> dist.ProcessGroup:
    return dist.new_group(list(range(world_size)), timeout=timeout)


def block_on(rank: int, rows: int, cols: int, offset: int, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> ds.Shard:
    """A ``rows x cols`` block at row ``offset``, placed on ``rank``."""
    metadata = ds.ShardMetadata([offset, 0], [rows, cols], f"rank:{rank}/{device}")
    return ds.Shard(torch.zeros(rows, cols, dtype=dtype, device=device), metadata)


def redistributed(tensor: torch.Tensor, spec: ds.ShardingSpec) -> torch.Tensor:
    """``tensor`` laid out by ``spec`` (a dense tensor as it is)."""
    return tensor.redistribute(spec) if isinstance(tensor, ShardedTensor) else tensor


def outcome(fn: Callable[[], Any]) -> tuple[str, str]:
    """``("ok", "")`` or the exception's type name and message."""
    try:
        fn()
    except Exception as error:
        return type(error).__name__, str(error)
    return "ok", ""


# -- bad inputs: every rank raises the same error --------------------------------------
# Each body runs on every rank and returns its outcome; the cases table below names the
# expected error and message for every rank.

def _from_local_shards(rank: int, world_size: int, case: str) -> tuple[str, str]:
    group = short_group(world_size)
    rows = 2 * world_size
    if case == "dtype within a rank":
        shards = [block_on(rank, 1, 3, 2 * rank),
                  block_on(rank, 1, 3, 2 * rank + 1,
                           dtype=torch.float64 if rank == 1 else torch.float32)]
    elif case == "dtype across ranks":
        shards = [block_on(rank, 2, 3, 2 * rank,
                           dtype=torch.float64 if rank == 1 else torch.float32)]
    elif case == "device within a rank":
        shards = [block_on(rank, 1, 3, 2 * rank),
                  block_on(rank, 1, 3, 2 * rank + 1, device="meta" if rank == 1 else "cpu")]
    elif case == "device across ranks":
        shards = [block_on(rank, 2, 3, 2 * rank, device="meta" if rank == 1 else "cpu")]
    elif case == "overlap":
        shards = [block_on(rank, 3 if rank == 0 else 2, 3, 2 * rank)]
    elif case == "gap":
        shards = [block_on(rank, 1 if rank == 1 else 2, 3, 2 * rank)]
    elif case == "global size on one rank":
        shards = [block_on(rank, 2, 3, 2 * rank)]
        if rank == 1:
            rows += 1
    elif case == "placed on another rank":
        shards = [block_on((rank + 1) % world_size if rank == 1 else rank, 2, 3, 2 * rank)]
    elif case == "non-contiguous":
        shards = [block_on(rank, 2, 3, 2 * rank)]
        if rank == 1:
            shards[0].tensor = torch.zeros(3, 2).t()
    else:
        raise AssertionError(case)
    return outcome(lambda: ShardedTensor.from_local_shards(shards, rows, 3, process_group=group))


def _from_local_tensor(rank: int, world_size: int, case: str) -> tuple[str, str]:
    group = short_group(world_size)
    spec = chunk(0, range(world_size))
    local = torch.zeros(2, 3)
    rows = 2 * world_size
    if case == "local size on one rank" and rank == 1:
        local = torch.zeros(3, 3)
    elif case == "non-contiguous" and rank == 1:
        local = torch.zeros(3, 2).t()
    elif case == "global size on one rank" and rank == 1:
        rows += 1  # 7 rows over 3 ranks: blocks of 3, 3 and 1 rows
        local = torch.zeros(3, 3)
    return outcome(lambda: ShardedTensor.from_local_tensor(local, spec, rows, 3,
                                                           process_group=group))


def _shard_tensor(rank: int, world_size: int, case: str) -> tuple[str, str]:
    group = short_group(world_size)
    tensor = torch.zeros(6, 4)
    src_rank = 0
    if case == "non-contiguous" and rank == 1:
        tensor = torch.zeros(4, 6).t()
    elif case == "src_rank differs" and rank == 1:
        src_rank = 1
    elif case == "size differs" and rank == 1:
        tensor = torch.zeros(7, 4)
    return outcome(lambda: ds.shard_tensor(tensor, chunk(0, range(world_size)),
                                           src_rank=src_rank, process_group=group))


def _outside_group(rank: int, world_size: int, case: str) -> tuple[str, str]:
    pair = dist.new_group([0, 1], timeout=CASE_GROUP_TIMEOUT)
    if case == "placement outside the group":
        return outcome(lambda: ds.zeros(chunk(0, [0, 1, 2]), 6, 3, process_group=pair))
    if case == "shards passed by a rank outside the group":
        shards = [block_on(rank, 2, 3, 2 * rank)]
        return outcome(lambda: ShardedTensor.from_local_shards(shards, 4, 3, process_group=pair))
    raise AssertionError(case)


def _mixed_groups(rank: int, world_size: int, case: str) -> tuple[str, str]:
    everyone = short_group(world_size)
    pair = dist.new_group([0, 1], timeout=CASE_GROUP_TIMEOUT)
    dense = seeded(4, 4)
    a = ShardedTensor.from_replicated(dense, chunk(0, range(world_size)), process_group=everyone)
    b = ShardedTensor.from_replicated(dense, chunk(0, [0, 1]), process_group=pair)
    ops = {
        "add": lambda: a + b,
        "mm": lambda: torch.mm(a, b),
        "cat": lambda: torch.cat([a, b]),
        "add in place": lambda: a.add_(b),
        "foreach, one index": lambda: torch._foreach_add_([a], [b]),
        # Different groups at different indices are fine (the optimizer of 2-D
        # parallelism): the error comes from the one index that mixes them.
        "foreach, second index": lambda: torch._foreach_add_([b, a], [b, b]),
    }
    return outcome(ops[case])


def _int_into_foreach(rank: int, world_size: int, case: str) -> tuple[str, str]:
    """An in-place foreach op whose result dtype does not fit the destination, on a
    tensor some ranks hold no element of: dense's error there too."""
    group = short_group(world_size)
    target = ShardedTensor.from_replicated(torch.arange(2).reshape(2, 1), chunk(0, range(3)),
                                           process_group=group)
    return outcome(lambda: torch._foreach_div_([target], 2))


def _kernel_dtype(rank: int, world_size: int, case: str) -> tuple[str, str]:
    """A product of a dtype the CPU kernel lacks (meta accepts it), with a rank that
    holds no row: dense's error there too, not only where a block meets the kernel."""
    group = short_group(world_size)
    x = ShardedTensor.from_replicated(torch.ones(1, 4, dtype=torch.bool), chunk(0, range(3)),
                                      process_group=group)
    w = ShardedTensor.from_replicated(torch.ones(4, 3, dtype=torch.bool), ds.Replicate(),
                                      process_group=group)
    return outcome(lambda: x @ w if case == "bool mm" else torch.nn.functional.linear(x, w.t()))


def _sparse(rank: int, world_size: int, case: str) -> tuple[str, str]:
    """Sparse layouts: a clear NotImplementedError on every rank (blocks are strided)."""
    group = short_group(world_size)
    mesh = DeviceMesh.from_group(group, "cpu")
    dense = seeded(6, 4)
    if case == "distribute a sparse tensor":
        return outcome(lambda: ds.distribute_tensor(dense.to_sparse(), mesh, [TShard(0)]))
    if case == "sparse on one rank":
        value = dense.to_sparse() if rank == 1 else dense
        return outcome(lambda: ds.distribute_tensor(value, mesh, [TShard(0)]))
    sharded = ds.distribute_tensor(dense, mesh, [TShard(0)])
    if case == "to_sparse":
        return outcome(lambda: sharded.to_sparse())
    if case == "to_sparse_csr":
        return outcome(lambda: sharded.to_sparse_csr())
    raise AssertionError(case)


# (body, case, world size, ranks expected to raise (None: all), error type, message regex)
CASES: list[tuple[Callable[..., tuple[str, str]], str, int, list[int] | None, str, str]] = [
    (_from_local_shards, "dtype within a rank", 3, None, "ValueError",
     r"Local shards' tensor dtype property need to be the same on rank:1"),
    (_from_local_shards, "dtype across ranks", 3, None, "ValueError",
     r"ShardedTensor dtype property does not match from different ranks"),
    (_from_local_shards, "device within a rank", 3, None, "ValueError",
     r"Local shards' tensor device property need to be the same on rank:1"),
    (_from_local_shards, "device across ranks", 3, None, "ValueError",
     r"ShardedTensor device type property does not match from different ranks"),
    (_from_local_shards, "overlap", 3, None, "ValueError", r"Shards .* overlap"),
    (_from_local_shards, "gap", 3, None, "ValueError", r"Shards do not (tile|cover)"),
    (_from_local_shards, "global size on one rank", 3, None, "ValueError",
     r"global_size property does not match from different ranks"),
    (_from_local_shards, "placed on another rank", 3, None, "ValueError",
     r"Local shard metadata's rank does not match with process group's current rank"),
    (_from_local_shards, "non-contiguous", 3, None, "ValueError",
     r"Only torch.contiguous_format memory_format is currently supported"),
    (_from_local_tensor, "local size on one rank", 3, None, "ValueError",
     r"Local tensor on rank 1 has size \[3, 3\]"),
    (_from_local_tensor, "non-contiguous", 3, None, "ValueError",
     r"Only torch.contiguous_format memory_format is currently supported"),
    (_from_local_tensor, "global size on one rank", 3, None, "ValueError",
     r"global_size property does not match from different ranks"),
    (_shard_tensor, "non-contiguous", 3, None, "ValueError", r"not a contiguous Tensor"),
    (_shard_tensor, "src_rank differs", 3, None, "ValueError", r"does not match with src_rank"),
    (_shard_tensor, "size differs", 3, None, "ValueError", r"size=.* does not match with size"),
    (_outside_group, "placement outside the group", 3, None, "ValueError",
     r"Global rank 2 does not exist in input process group"),
    (_outside_group, "shards passed by a rank outside the group", 3, [2], "ValueError",
     r"rank 2 is not in the process group, but passed 1 local shard"),
    (_mixed_groups, "add", 3, None, "ValueError",
     r"aten.add.Tensor: ShardedTensor operands live on different process groups \(global "
     r"ranks \[0, 1, 2\] and \[0, 1\]\)"),
    (_mixed_groups, "mm", 3, None, "ValueError", r"aten.mm.default: .*different process groups"),
    (_mixed_groups, "cat", 3, None, "ValueError", r"aten.cat.default: .*different process groups"),
    (_mixed_groups, "add in place", 3, None, "ValueError",
     r"aten.add_.Tensor: .*different process groups"),
    (_mixed_groups, "foreach, one index", 3, None, "ValueError",
     r"aten._foreach_add_.List: .*different process groups"),
    (_mixed_groups, "foreach, second index", 3, None, "ValueError",
     r"aten._foreach_add_.List: .*ranks \[0, 1, 2\] and \[0, 1\]"),
    (_int_into_foreach, "int destination", 3, None, "RuntimeError",
     r"result type Float can't be cast to the desired output type Long"),
    (_kernel_dtype, "bool mm", 3, None, "NotImplementedError",
     r"\"addmm_impl_cpu_\" not implemented for 'Bool'"),
    (_kernel_dtype, "bool linear", 3, None, "NotImplementedError",
     r"\"addmm_impl_cpu_\" not implemented for 'Bool'"),
    (_sparse, "distribute a sparse tensor", 3, None, "NotImplementedError",
     r"shards strided tensors only, not torch.sparse_coo: pass tensor.to_dense\(\)"),
    (_sparse, "sparse on one rank", 3, None, "NotImplementedError",
     r"shards strided tensors only, not torch.sparse_coo"),
    (_sparse, "to_sparse", 3, None, "NotImplementedError",
     r"sparse layouts are not supported .*x.full_tensor\(\).to_sparse\(\)"),
    (_sparse, "to_sparse_csr", 3, None, "NotImplementedError", r"sparse layouts are not supported"),
]


@pytest.mark.parametrize(
    ("body", "case", "world_size", "raising", "error", "pattern"), CASES,
    ids=[f"{body.__name__.strip('_')}-{case}" for body, case, *_ in CASES],
)
def test_bad_input_raises_alike_on_every_rank(
    body: Callable[..., tuple[str, str]], case: str, world_size: int, raising: list[int] | None,
    error: str, pattern: str,
) -> None:
    outcomes = get_pool(world_size).run(body, timeout_s=60, case=case)
    for rank, (kind, message) in enumerate(outcomes):
        if raising is not None and rank not in raising:
            assert kind == "ok", (rank, kind, message)
            continue
        assert kind == error and re.search(pattern, message), (rank, kind, message)


@multi_rank(world_size=[3])
def test_operands_on_two_groups_with_the_same_ranks_are_fine(rank: int, world_size: int) -> None:
    first, second = short_group(world_size), short_group(world_size)
    dense = seeded(5, 4)
    a = ShardedTensor.from_replicated(dense, chunk(0, [2, 0, 1]), process_group=first)
    b = ShardedTensor.from_replicated(dense, chunk(1, [1, 2]), process_group=second)
    torch.testing.assert_close((a + b).full_tensor(), dense + dense)


# -- NaN, inf and zero-size dims: like dense ----------------------------------------------

def _special_values(rank: int, world_size: int, layout: str) -> None:
    dense = seeded(6, 5)
    dense[4, 1] = float("nan")  # in the last rank's rows
    dense[0, 2] = float("inf")
    dense[1, 2] = float("-inf")
    dense[2, 3] = float("inf")
    spec = {"rows": chunk(0, range(world_size)), "cols": chunk(1, range(world_size)),
            "replicate": ds.Replicate()}[layout]
    st = ShardedTensor.from_replicated(dense, spec)
    ops: dict[str, Callable[[torch.Tensor], Any]] = {
        "sum": lambda t: t.sum(0), "sum all": lambda t: t.sum(), "mean": lambda t: t.mean(1),
        "amax": lambda t: t.amax(0), "amin": lambda t: t.amin(1), "max": lambda t: t.max(),
        "max dim": lambda t: t.max(0).values, "min dim": lambda t: t.min(1).values,
        "argmax": lambda t: t.argmax(0), "argmin": lambda t: t.argmin(1),
        "softmax": lambda t: t.softmax(1), "log_softmax": lambda t: t.log_softmax(0),
        "logsumexp": lambda t: t.logsumexp(0), "norm": lambda t: torch.linalg.vector_norm(t),
        "prod": lambda t: t.prod(0), "exp": lambda t: t.exp(),
        "mul by zero": lambda t: t * 0, "matmul": lambda t: t @ seeded(5, 3),
        "isnan": lambda t: t.isnan(), "nan_to_num": lambda t: t.nan_to_num(),
        "reshard": lambda t: redistributed(t, chunk(1, range(world_size))),
    }
    for name, op in ops.items():
        got, want = op(st), op(dense)
        assert isinstance(got, ShardedTensor), name
        torch.testing.assert_close(got.full_tensor(), want, equal_nan=True, msg=name)
    # Comparisons with NaN: False, as in dense.
    assert torch.equal(st, st) is False and torch.equal(dense, dense) is False
    assert torch.allclose(st, st) is False
    assert torch.allclose(st, st, equal_nan=True) is True
    assert bool(st.isnan().any()) is True


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("layout", ["rows", "cols", "replicate"])
def test_nan_and_inf_propagate_like_dense(rank: int, world_size: int, layout: str) -> None:
    _special_values(rank, world_size, layout)


@multi_rank(world_size=[3])
def test_zero_size_dims_behave_like_dense(rank: int, world_size: int) -> None:
    spec = chunk(0, range(world_size))
    empty = ds.zeros(spec, 0, 5, dtype=torch.float64)
    dense = torch.zeros(0, 5, dtype=torch.float64)
    assert empty.shape == (0, 5) and all(t.numel() == 0 for t in empty._local_tensors)
    for name, op in {
        "add": lambda t: t + 1, "sum": lambda t: t.sum(), "sum dim 0": lambda t: t.sum(0),
        "mean": lambda t: t.mean(), "amax dim 1": lambda t: t.amax(1),
        "prod": lambda t: t.prod(), "transpose": lambda t: t.t(),
        "matmul": lambda t: t @ torch.ones(5, 2, dtype=torch.float64),
        "contract over 0": lambda t: t.t() @ torch.ones(0, 2, dtype=torch.float64),
        "reshard": lambda t: redistributed(t, chunk(1, range(world_size))),
        "cat": lambda t: torch.cat([t, t]),
    }.items():
        got, want = op(empty), op(dense)
        torch.testing.assert_close(got.full_tensor(), want, equal_nan=True, msg=name)
    # Dense's errors, on every rank.
    with pytest.raises(IndexError, match="Expected reduction dim 0 to have non-zero size"):
        empty.amax(0)
    with pytest.raises(RuntimeError, match="Expected reduction dim to be specified"):
        empty.max()
    # Creation with a zero-size dim that is not the sharded one.
    sideways = ds.ones(spec, 6, 0)
    assert sideways.sum().item() == 0


# -- faults: a rank that skips a collective, a rank that dies ------------------------------

def _skip_collective(rank: int, world_size: int, op: str) -> tuple[str, str, float]:
    group = short_group(world_size, FAULT_GROUP_TIMEOUT)
    st = ShardedTensor.from_replicated(seeded(6, 4), chunk(0, range(world_size)),
                                       process_group=group)
    if rank == 0:
        # Rank 0 never joins the collective below, but stays alive and holds the group
        # past the timeout: leaving the test would destroy the group, and the peers
        # would see its connections close instead of a timeout.
        time.sleep(FAULT_GROUP_TIMEOUT.total_seconds() + 3)
        return "skipped", "", 0.0
    start = time.monotonic()
    run: Callable[[], Any] = {"full_tensor": st.full_tensor, "var": st.var,
                              "reshard": lambda: st.reshard(chunk(1, range(world_size)))}[op]
    try:
        run()
    except CollectiveError as error:
        assert isinstance(error, RuntimeError)
        return type(error).__name__, str(error), time.monotonic() - start
    return "ok", "", time.monotonic() - start


@pytest.mark.slow  # each waits for a collective timeout
@pytest.mark.parametrize(("op", "names"), [
    ("full_tensor", r"collective all_to_all while running ShardedTensor.full_tensor"),
    ("var", r"collective all_reduce while running aten.var.correction"),
    ("reshard", r"collective all_to_all while running ShardedTensor.reshard"),
])
def test_a_rank_skipping_a_collective_times_out_with_the_op_and_ranks(op: str, names: str
                                                                      ) -> None:
    outcomes = get_pool(3).run(_skip_collective, timeout_s=60, op=op)
    assert outcomes[0][0] == "skipped"
    for rank, (kind, message, waited) in enumerate(outcomes[1:], start=1):
        assert kind == "CollectiveError", (rank, kind, message)
        assert re.search(names, message), message
        assert f"on rank {rank} of the process group with global ranks [0, 1, 2]" in message
        assert "timed out after 3s" in message
        assert waited < 30, waited


def _dies(rank: int, world_size: int) -> None:
    group = short_group(world_size, timedelta(seconds=20))
    st = ShardedTensor.from_replicated(seeded(6, 4), chunk(0, range(world_size)),
                                       process_group=group)
    if rank == 0:
        os._exit(3)  # a crash: its connections close
    try:
        st.full_tensor()
    except CollectiveError as error:
        raise RuntimeError(f"reported: {error}") from None


@pytest.mark.slow  # kills a rank: the pool restarts
def test_a_dead_peer_surfaces_as_an_error_naming_the_op() -> None:
    pool = get_pool(2)
    with pytest.raises(RankFailure) as info:
        pool.run(_dies, timeout_s=60)
    text = str(info.value)
    assert "rank 0 raised:\nthe worker process died" in text
    assert re.search(r"reported: dispatch_shard: collective all_to_all while running "
                     r"ShardedTensor.full_tensor on rank 1 of the process group with global "
                     r"ranks \[0, 1\] (lost a peer|timed out)", text), text
    assert pool.run(_rank_id) == [0, 1]  # the pool restarted


def _rank_id(rank: int, world_size: int) -> int:
    return rank


def test_collective_error_pickles_with_its_ops() -> None:
    import pickle

    error = CollectiveError("all_reduce", (0, 1), 1, "Timed out waiting 3000ms", None, 3.0)
    error.add_op(torch.ops.aten.sum.default)
    error.add_op(torch.ops.aten.sum.default)  # the same op twice is named once
    error.add_op(torch.ops.aten.mean.default)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert ("collective all_reduce while running aten.sum.default (inside aten.mean.default) "
            "on rank 1 of the process group with global ranks [0, 1] timed out after 3s") \
        in str(error)


# -- debug mode ----------------------------------------------------------------------------

def _unchecked(make: Callable[[], Any]) -> Any:
    """Made without the ranks' argument check, so that debug mode is what finds the
    divergence (NOTE [rank-consistent creation] would catch it at creation)."""
    with ds.unchecked_creation():
        return make()


def _diverge(rank: int, world_size: int, case: str) -> tuple[str, str]:
    group = short_group(world_size)
    st = ShardedTensor.from_replicated(seeded(6, 4), chunk(0, range(world_size)),
                                       process_group=group)
    programs: dict[str, Callable[[], Any]] = {
        # torch.randn without a seed: a different "replicated" value on every rank
        "unseeded plain tensor": lambda: st + seeded(4, seed=rank),
        "one rank's plain tensor": lambda: st * seeded(4, seed=int(rank == 2)),
        "different ops": lambda: st * 2 if rank == 1 else st + 2,
        "different scalars": lambda: st * (3 if rank == 1 else 2),
        "op versus collective": lambda: st.full_tensor() if rank == 1 else st.sum(0),
        "different layouts": lambda: st + _unchecked(lambda: ShardedTensor.from_replicated(
            seeded(6, 4), chunk(0, [0, 1, 2] if rank else [2, 1, 0]), process_group=group)),
    }
    with ds.debug.check_consistency():
        return outcome(programs[case])


@pytest.mark.parametrize(("case", "pattern"), [
    ("unseeded plain tensor",
     r"diverge at aten.add.Tensor: argument 1 differs: rank 0 passes a cpu tensor \[4\] "
     r"torch.float64 \(sum .*, crc32 .*\); rank 1 passes .*; rank 2 passes .* must be "
     r"identical on every rank"),
    ("one rank's plain tensor",
     r"diverge at aten.mul.Tensor: argument 1 differs: ranks \[0, 1\] pass a cpu tensor .*; "
     r"rank 2 passes a cpu tensor"),
    ("different ops", r"diverge: ranks \[0, 2\] dispatch aten.add.Tensor; rank 1 dispatches "
                      r"aten.mul.Tensor"),
    ("different scalars", r"diverge at aten.mul.Tensor: argument 1 differs: ranks \[0, 2\] "
                          r"pass 2; rank 1 passes 3"),
    ("op versus collective", r"ranks \[0, 2\] dispatch aten.sum.dim_IntList; rank 1 issues "
                             r"the collective all_to_all in ShardedTensor.full_tensor"),
    ("different layouts", r"diverge at aten.add.Tensor: argument 1 differs: rank 0 passes a "
                          r"ShardedTensor \[6, 4\] torch.float64 laid out by "
                          r"ChunkShardingSpec.*; ranks \[1, 2\] pass a ShardedTensor"),
])
def test_debug_mode_names_the_first_divergence_on_every_rank(case: str, pattern: str) -> None:
    outcomes = get_pool(3).run(_diverge, timeout_s=60, case=case)
    for rank, (kind, message) in enumerate(outcomes):
        assert kind == RankDivergenceError.__name__, (rank, kind, message)
        assert message == outcomes[0][1]  # the same message on every rank
        assert re.search(pattern, message), message


@multi_rank(world_size=[1, 3])
def test_debug_mode_passes_a_consistent_program_and_counts_alike(rank: int,
                                                                 world_size: int) -> None:
    def program() -> torch.Tensor:
        x = ShardedTensor.from_replicated(seeded(6, 4), chunk(0, range(world_size)))
        w = ShardedTensor.from_replicated(seeded(4, 3, seed=1), chunk(1, range(world_size)))
        x.requires_grad_(True)
        loss = ((x @ w).relu() + seeded(3, seed=2)).sum()
        loss.backward()
        assert x.grad is not None
        return x.grad.full_tensor()

    from_environment = ds.debug.enabled()  # DISPATCH_SHARD_DEBUG=1 may be set
    with ds.count_collectives() as plain:
        expected = program()
    with ds.debug.check_consistency(), ds.count_collectives() as debugged:
        assert ds.debug.enabled()
        with ds.debug.check_consistency():  # nests
            got = program()
        assert ds.debug.enabled()
    assert ds.debug.enabled() == from_environment
    torch.testing.assert_close(got, expected)
    assert debugged.counts == plain.counts  # debug exchanges are not reported
    if not from_environment:  # off: the dispatch loop's hot path is as without debug mode
        assert collectives._observers == [] and collectives._op_checks == []


@pytest.mark.slow  # starts its own processes
def test_debug_mode_from_the_environment() -> None:
    code = "import dispatch_shard as ds; print(ds.debug.enabled())"
    for value, expected in (("1", "True"), ("0", "False"), ("", "False")):
        env = {**os.environ, "DISPATCH_SHARD_DEBUG": value,
               "PYTHONPATH": os.pathsep.join(sys.path)}
        result = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                capture_output=True, text=True)
        assert result.stdout.strip() == expected, (value, result.stdout, result.stderr)
