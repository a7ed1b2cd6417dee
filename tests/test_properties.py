"""Property-based tests: random tensors, layouts and chains of ops against the dense computation.

Hypothesis draws *programs*: an input of random shape (1-3 dims, sizes 0-9), dtype
(float32, float64, complex64, int64, bool) and layout (chunk along any dim over a random rank list
with repeats, a random grid of blocks with empty ones, replicated, partial), then 1-4
steps: pointwise unary / binary (broadcasting, either operand order, sharded or plain
second operand) / scalar / in-place ops, reductions over random dims, views (transpose,
permute, unsqueeze, squeeze, reshape, flatten, slice, select, expand), ``cat``, matmul and
reshards. Every step is also applied to the dense tensors; the results, the inputs (not
mutated) and, for float and complex programs, the gradients of ``result.sum()`` (of its
real and imaginary parts, for a complex result) must match.

NOTE [examples are drawn once, run on every rank]
Every rank must build the same data, so hypothesis runs only in the pytest process: a
program is plain data (shapes, seeds, layout descriptions, op names), validated and shaped
there on meta tensors, and sent to a rank pool (``get_pool(n).run``); each rank rebuilds
the tensors from the seeds. A program runs on a fresh process group with a short timeout
(see NOTE [collective timeouts] in dispatch_shard.collectives): a rank that raises alone
makes the others fail with a CollectiveError instead of hanging, so a failing example is
reported (and shrunk) without restarting the pool. Every rank returns its verdict; any
mismatch fails the test with the program and each rank's message.

Profiles: ``ci`` (the default; fixed examples, ``derandomize``) and ``long`` (random, many
more examples, world sizes 1-4), picked by ``HYPOTHESIS_PROFILE``; ``nox -s properties``
runs the long one.
"""

from __future__ import annotations

import itertools
import math
import os
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import dispatch_shard as ds
from dispatch_shard.specs import mesh_sharding_spec
from dispatch_shard.testing import get_pool, multi_rank

# -- profiles ------------------------------------------------------------------------

settings.register_profile(
    "ci", max_examples=150, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=1500, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
SETTINGS = settings.get_profile(PROFILE)
# Examples per test, as a multiple of the profile's max_examples.
WEIGHTS = {"chains": 2.0, "reshards": 0.7, "matmul": 0.6, "mesh": 1.0}
WORLD_SIZES = (2, 3) if PROFILE == "ci" else (1, 2, 3, 4)
GROUP_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 120.0

EXAMPLES_RUN: Counter[str] = Counter()  # per test
GAPS_HIT: Counter[str] = Counter()  # examples that met a known gap (see KNOWN_GAPS)
STEPS_RUN: Counter[str] = Counter()  # step kinds and features, over all examples


def profile(test: str) -> settings:
    return settings(SETTINGS, max_examples=max(1, int(SETTINGS.max_examples * WEIGHTS[test])))


@pytest.fixture(scope="module", autouse=True)
def _report_example_counts() -> Iterator[None]:
    yield
    print(f"\nproperty examples run ({PROFILE} profile): {dict(EXAMPLES_RUN)}, "
          f"total {sum(EXAMPLES_RUN.values())}; known gaps hit: {dict(GAPS_HIT)}")
    print(f"steps and features: {dict(sorted(STEPS_RUN.items()))}")


# -- building tensors from descriptions (on every rank, and on meta in the parent) --------

DTYPES = {"float32": torch.float32, "float64": torch.float64, "complex64": torch.complex64,
          "int64": torch.int64, "bool": torch.bool}
FLOATS = ("float32", "float64")
INEXACT = (*FLOATS, "complex64")  # the differentiable dtypes
NUMBERS = (*INEXACT, "int64")
TOLERANCE = {"float32": {"rtol": 1e-3, "atol": 1e-3}, "float64": {"rtol": 1e-9, "atol": 1e-9},
             "complex64": {"rtol": 1e-3, "atol": 1e-3}}

Shape = tuple[int, ...]
Layout = tuple[Any, ...]   # ("chunk", dim, ranks) | ("grid", cuts, owners) | ("replicate",)
#                            | ("partial", reduce_op)
Operand = dict[str, Any]   # shape, dtype, seed, values, layout (None: a plain tensor), build


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def make_values(operand: Operand) -> torch.Tensor:
    shape, dtype = operand["shape"], DTYPES[operand["dtype"]]
    generator = torch.Generator().manual_seed(operand["seed"])
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype == torch.int64 or operand["values"] == "ties":
        return torch.randint(-2, 3, shape, generator=generator).to(dtype)
    return torch.randn(shape, generator=generator, dtype=dtype)


def make_spec(layout: Layout, shape: Shape) -> ds.ShardingSpec:
    kind = layout[0]
    if kind == "chunk":
        return ds.ChunkShardingSpec(layout[1], [f"rank:{r}/cpu" for r in layout[2]])
    if kind == "grid":
        cuts, owners = layout[1], layout[2]
        intervals = [list(itertools.pairwise(c)) for c in cuts]
        blocks = [
            ds.ShardMetadata([lo for lo, _ in box], [hi - lo for lo, hi in box],
                             f"rank:{owner}/cpu")
            for box, owner in zip(itertools.product(*intervals), owners, strict=True)
        ]
        return ds.EnumerableShardingSpec(blocks)
    if kind == "partial":
        return ds.Partial(layout[1])
    if kind == "mesh":  # per-mesh-dim placements on a 2x2 mesh of ranks 0-3
        return mesh_sharding_spec((2, 2), (0, 1, 2, 3), layout[1], shape)
    return ds.Replicate()


def _summand(dense: torch.Tensor, reduce_op: str, seed: int, rank: int, world_size: int,
             exact: bool) -> torch.Tensor:
    """This rank's summand of a Partial ``reduce_op`` whose value is ``dense``.

    ``exact``: integer-valued summands, whose sum is ``dense`` to the bit, for the
    "ties" values (a sum off by a rounding error would move a tie, or a zero's sign).
    """
    generator = torch.Generator().manual_seed(seed + 7)
    if dense.is_floating_point() and not exact:
        noise = [torch.randn(dense.shape, generator=generator, dtype=dense.dtype)
                 for _ in range(world_size)]
    else:
        noise = [torch.randint(-2, 3, dense.shape, generator=generator).to(dense.dtype)
                 for _ in range(world_size)]
    holder = seed % world_size
    if reduce_op in ("max", "min"):
        if rank == holder:
            return dense.clone()
        return dense - noise[rank].abs() if reduce_op == "max" else dense + noise[rank].abs()
    total = dense * world_size if reduce_op == "avg" else dense
    if rank != holder:
        return noise[rank]
    return total - sum((noise[r] for r in range(world_size) if r != holder),
                       torch.zeros_like(dense))


def make_sharded(operand: Operand, dense: torch.Tensor, group: dist.ProcessGroup
                 ) -> ds.ShardedTensor:
    layout = operand["layout"]
    shape = tuple(dense.shape)
    spec = make_spec(layout, shape)
    rank, world_size = dist.get_rank(), dist.get_world_size(group)
    if layout[0] == "partial":
        summand = _summand(dense, layout[1], operand["seed"], rank, world_size,
                           exact=operand["values"] == "ties")
        return ds.ShardedTensor.from_local_tensor(summand, spec, *shape, process_group=group)
    build = operand["build"] if layout[0] != "mesh" else "from_replicated"
    if build == "shard_tensor":
        source = operand["seed"] % world_size
        local = dense.clone() if rank == source else torch.zeros_like(dense)
        return ds.shard_tensor(local, spec, src_rank=source, process_group=group)
    whole = ds.ShardedTensor.from_replicated(dense, spec, process_group=group)
    if build == "from_local_shards" and layout[0] in ("chunk", "grid"):
        shards = [ds.Shard(s.tensor.clone(), s.metadata) for s in whole.local_shards()]
        return ds.ShardedTensor.from_local_shards(shards, *shape, process_group=group)
    return whole


class Side:
    """How one of the three computations (meta, dense, sharded) makes operands and reshards."""

    def __init__(self, requires_grad: bool) -> None:
        self.requires_grad = requires_grad
        self.leaves: list[torch.Tensor] = []

    def operand(self, operand: Operand) -> torch.Tensor:
        value = self._make(operand)
        if self.requires_grad and operand["dtype"] in INEXACT:
            value.requires_grad_(True)
            self.leaves.append(value)
        return value

    def _make(self, operand: Operand) -> torch.Tensor:
        raise NotImplementedError

    def reshard(self, value: torch.Tensor, layout: Layout, in_place: bool) -> torch.Tensor:
        return value


class MetaSide(Side):
    def _make(self, operand: Operand) -> torch.Tensor:
        return torch.empty(operand["shape"], dtype=DTYPES[operand["dtype"]], device="meta")


class DenseSide(Side):
    def _make(self, operand: Operand) -> torch.Tensor:
        return make_values(operand)


class ShardedSide(Side):
    def __init__(self, requires_grad: bool, group: dist.ProcessGroup) -> None:
        super().__init__(requires_grad)
        self.group = group

    def _make(self, operand: Operand) -> torch.Tensor:
        dense = make_values(operand)
        if operand["layout"] is None:
            return dense  # a plain tensor: a replicated value
        return make_sharded(operand, dense, self.group)

    def reshard(self, value: torch.Tensor, layout: Layout, in_place: bool) -> torch.Tensor:
        assert isinstance(value, ds.ShardedTensor)
        spec = make_spec(layout, tuple(value.shape))
        if in_place and not value.requires_grad:
            assert value.reshard(spec) is value
            return value
        return value.redistribute(spec)


# -- the ops --------------------------------------------------------------------------

def _clamp(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-0.5, 0.5) if x.is_floating_point() else x.clamp(-1, 1)


UNARY: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], tuple[str, ...]]] = {
    "neg": (torch.neg, NUMBERS),
    "abs": (torch.abs, NUMBERS),
    "conj": (torch.conj, INEXACT),
    "sin": (torch.sin, INEXACT),
    "tanh": (torch.tanh, INEXACT),
    "sigmoid": (torch.sigmoid, FLOATS),
    "exp": (torch.exp, INEXACT),
    "relu": (torch.relu, ("float32", "float64", "int64")),
    "square": (torch.square, NUMBERS),
    "clamp": (_clamp, ("float32", "float64", "int64")),
    "logical_not": (torch.logical_not, ("bool",)),
    "bitwise_not": (torch.bitwise_not, ("int64", "bool")),
}
BINARY: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tuple[str, ...]]] = {
    "add": (torch.add, NUMBERS),
    "sub": (torch.sub, NUMBERS),
    "mul": (torch.mul, (*NUMBERS, "bool")),
    "maximum": (torch.maximum, ("float32", "float64", "int64", "bool")),
    "minimum": (torch.minimum, ("float32", "float64", "int64")),
    "atan2": (torch.atan2, FLOATS),
    "logical_xor": (torch.logical_xor, ("bool",)),
    "logical_or": (torch.logical_or, ("bool",)),
    "bitwise_and": (torch.bitwise_and, ("int64", "bool")),
}
SCALAR: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], tuple[str, ...]]] = {
    "add": (lambda x, c: x + c, (*NUMBERS, "bool")),
    "mul": (lambda x, c: x * c, (*NUMBERS, "bool")),
    "rsub": (lambda x, c: c - x, NUMBERS),
    "pow": (lambda x, c: x ** 2, NUMBERS),
    "div": (lambda x, c: x / c, NUMBERS),
}
INPLACE = ("add_", "sub_", "mul_")
REDUCTIONS: dict[str, tuple[str, ...]] = {
    "sum": (*NUMBERS, "bool"),
    "mean": INEXACT,
    "amax": ("float32", "float64", "int64"),
    "amin": ("float32", "float64", "int64"),
    "prod": NUMBERS,
    "logsumexp": FLOATS,
    "softmax": FLOATS,
    "log_softmax": FLOATS,
    "var": FLOATS,
    "std": FLOATS,
    "norm": FLOATS,
    "max_dim": ("float32", "float64", "int64"),
    "min_dim": ("float32", "float64", "int64"),
    "any": ("bool",),
    "all": ("bool",),
    "count_nonzero": (*NUMBERS, "bool"),
}
SINGLE_DIM = ("prod", "softmax", "log_softmax", "max_dim", "min_dim", "any", "all")


def reduce(x: torch.Tensor, name: str, dims: tuple[int, ...] | None, keepdim: bool,
           correction: int) -> torch.Tensor:
    all_dims = tuple(range(x.dim()))
    if name in SINGLE_DIM and dims is not None:
        dim = dims[0]
        if name in ("softmax", "log_softmax"):
            return getattr(x, name)(dim)
        if name in ("max_dim", "min_dim"):
            return getattr(x, name[:3])(dim, keepdim).values
        return getattr(x, name)(dim, keepdim)
    if name in ("sum", "mean"):
        return getattr(x, name)() if dims is None else getattr(x, name)(dims, keepdim)
    if name in ("amax", "amin"):
        return getattr(x, name)(() if dims is None else dims, keepdim)
    if name in ("prod", "any", "all"):
        return getattr(x, name)()
    if name in ("max_dim", "min_dim"):
        return getattr(x, name[:3])()
    if name == "logsumexp":
        return x.logsumexp(all_dims if dims is None else dims, keepdim)
    if name in ("var", "std"):
        return getattr(x, name)(dims, correction=correction, keepdim=keepdim)
    if name == "norm":
        return torch.linalg.vector_norm(x, dim=dims, keepdim=keepdim)
    if name == "count_nonzero":
        return x.count_nonzero(dims)
    raise AssertionError(name)


def view(x: torch.Tensor, kind: str, params: tuple[Any, ...]) -> torch.Tensor:
    if kind in ("transpose", "permute", "unsqueeze", "squeeze", "select"):
        return getattr(x, kind)(*params)
    if kind == "reshape":
        return x.reshape(params)
    if kind == "flatten":
        return x.flatten()
    if kind == "slice":
        dim, start, stop, step = params
        return x[(slice(None),) * dim + (slice(start, stop, step),)]
    if kind == "expand":
        return x.expand(params)
    if kind == "contiguous":
        return x.contiguous()
    raise AssertionError(kind)


def apply_step(side: Side, x: torch.Tensor, step: tuple[Any, ...]) -> torch.Tensor:
    kind = step[0]
    if kind == "unary":
        return UNARY[step[1]][0](x)
    if kind == "scalar":
        return SCALAR[step[1]][0](x, step[2])
    if kind == "binary":
        _, name, other, swap = step
        y = side.operand(other)
        return BINARY[name][0](y, x) if swap else BINARY[name][0](x, y)
    if kind == "inplace":
        _, name, other = step
        y = side.operand(other) if isinstance(other, dict) else other
        result = x.clone()
        getattr(result, name)(y)
        return result
    if kind == "reduce":
        return reduce(x, *step[1:])
    if kind == "view":
        return view(x, step[1], step[2])
    if kind == "cat":
        _, other, dim, swap = step
        y = side.operand(other)
        return torch.cat([y, x] if swap else [x, y], dim)
    if kind == "matmul":
        _, other, swap = step
        y = side.operand(other)
        return torch.matmul(y, x) if swap else torch.matmul(x, y)
    if kind == "reshard":
        return side.reshard(x, step[1], step[2])
    raise AssertionError(kind)


# -- running a program on every rank ---------------------------------------------------

def _close(what: str, actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return (f"{what}: got {tuple(actual.shape)} {actual.dtype}, dense gives "
                f"{tuple(expected.shape)} {expected.dtype}")
    tolerance = TOLERANCE.get(dtype_name(expected.dtype), {"rtol": 0.0, "atol": 0.0})
    try:
        torch.testing.assert_close(actual.detach(), expected.detach(), equal_nan=True,
                                   **tolerance)
    except AssertionError as error:
        return f"{what} differs from dense: {error}\n got {actual}\n want {expected}"
    return None


def _check_blocks(what: str, value: torch.Tensor) -> str | None:
    """A ShardedTensor's local blocks agree with its metadata (no communication)."""
    if not isinstance(value, ds.ShardedTensor):
        return f"{what} is a plain {type(value).__name__}, not a ShardedTensor"
    layout = value._layout
    indices = layout.local_indices(dist.get_rank())
    if len(indices) != len(value._local_tensors) and not layout.is_partial:
        return f"{what}: {len(value._local_tensors)} blocks, but the layout places {indices}"
    for index, block in zip(indices, value._local_tensors, strict=False):
        metadata = layout.shards[index]
        if list(block.shape) != list(metadata.shard_sizes):
            return (f"{what} ({layout.spec}): block {metadata} holds a tensor of size "
                    f"{list(block.shape)}")
        if block.dtype != value.dtype:
            return f"{what}: block {metadata} is {block.dtype}, not {value.dtype}"
    return None


def _real_sum(value: torch.Tensor) -> torch.Tensor:
    """A real loss: the sum, over the real and imaginary parts of a complex value (of the
    complex sum: ``view_as_real(empty).sum()`` has no dense backward in torch 2.13)."""
    total = value.sum()
    return total.real + total.imag if value.is_complex() else total


def _whole(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, ds.ShardedTensor) else value


def _verdict(program: dict[str, Any], group: dist.ProcessGroup) -> str | None:
    backward = program["backward"]
    dense_side = DenseSide(backward)
    try:
        dense_x = dense_side.operand(program["input"])
        dense = dense_x
        for step in program["steps"]:
            dense = apply_step(dense_side, dense, step)
    except Exception as error:  # the parent validated on meta: a data-dependent error
        return f"INVALID: dense raised {type(error).__name__}: {error}"

    sharded_side = ShardedSide(backward, group)
    x = sharded_side.operand(program["input"])
    problem = _check_blocks("the input", x)
    if problem:
        return problem
    value = x
    for number, step in enumerate(program["steps"]):
        value = apply_step(sharded_side, value, step)
        problem = _check_blocks(f"the result of step {number} {step[:2]}", value)
        if problem:
            return problem
    problem = _close("the result", _whole(value), dense)
    if problem:
        return problem
    problem = _close("the input after the program (mutated?)", _whole(x), make_values(
        program["input"]))
    if problem:
        return problem
    if value.requires_grad != dense.requires_grad:
        return f"the result's requires_grad is {value.requires_grad}, dense's {dense.requires_grad}"
    if not backward or not dense.requires_grad:
        return None
    _real_sum(dense).backward()
    _real_sum(value).backward()
    for number, (leaf, dense_leaf) in enumerate(zip(sharded_side.leaves, dense_side.leaves,
                                                    strict=True)):
        if dense_leaf.grad is None or leaf.grad is None:
            if (dense_leaf.grad is None) != (leaf.grad is None):
                return f"leaf {number}: grad is {leaf.grad}, dense grad {dense_leaf.grad}"
            continue
        if isinstance(leaf, ds.ShardedTensor):
            assert isinstance(leaf.grad, ds.ShardedTensor)
            if leaf.grad.sharding_spec() != leaf.sharding_spec():
                return (f"leaf {number}: grad laid out by {leaf.grad.sharding_spec()}, "
                        f"the leaf by {leaf.sharding_spec()}")
        problem = _close(f"the grad of leaf {number}", _whole(leaf.grad), dense_leaf.grad)
        if problem:
            return problem
    return None


def run_program(rank: int, world_size: int, program: dict[str, Any]) -> str | None:
    """On every rank: the program's verdict (None: matches dense)."""
    group = dist.new_group(list(range(world_size)),
                           timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        return _verdict(program, group)
    except Exception as error:
        return f"raised {type(error).__name__}: {error}\n{traceback.format_exc()}"


# Clean refusals (NotImplementedError on every rank) that are known gaps, not wrong numbers.
# An example that hits one passes and is counted apart; any other error fails.
KNOWN_GAPS = {
    "into a Partial ShardedTensor is not supported":
        "non-linear in-place ops into a Partial tensor (ops/pointwise.py refuses them)",
    "would write into a ShardedTensor with a reduction pending":
        "non-linear in-place ops into a value pending on a mesh dim (dispatch_shard.holders)",
}


def _known_gap(verdicts: list[str | None]) -> str | None:
    for pattern in KNOWN_GAPS:
        if all(v is not None and v.startswith("raised NotImplementedError") and pattern in v
               for v in verdicts):
            return pattern
    return None


def check(test: str, program: dict[str, Any]) -> None:
    """Run ``program`` on every rank of a pool; fail with every rank's message."""
    pool = get_pool(program["world_size"])
    try:
        verdicts = pool.run(run_program, timeout_s=RUN_TIMEOUT_S, program=program)
    except BaseException:
        pool.stop()  # interrupted (a timeout, ^C): no stale reply may reach the next run
        raise
    if all(v is not None and v.startswith("INVALID") for v in verdicts):
        reject()
    EXAMPLES_RUN[test] += 1
    STEPS_RUN.update(f"{step[0]}:{step[1]}" if step[0] in ("view", "reduce") else step[0]
                     for step in program["steps"])
    STEPS_RUN["backward"] += program["backward"]
    STEPS_RUN[f"world size {program['world_size']}"] += 1
    STEPS_RUN["N-D layouts"] += sum("'mesh'" in repr(v) for v in (program["input"],
                                                                    *program["steps"]))
    if all(v is None for v in verdicts):
        return
    gap = _known_gap(verdicts)
    if gap is not None:
        GAPS_HIT[gap] += 1
        return
    report = "\n".join(f"--- rank {r}: {v}" for r, v in enumerate(verdicts))
    raise AssertionError(f"the sharded program does not match dense:\n{report}")


# -- strategies ---------------------------------------------------------------------------

def meta(shape: Shape, dtype: str) -> torch.Tensor:
    return torch.empty(shape, dtype=DTYPES[dtype], device="meta")


def _partial_ops(dtype: str) -> list[str]:
    """The pending reductions a value of ``dtype`` can hold (complex numbers have no order)."""
    return [] if dtype == "bool" else ["sum", "avg"] if dtype == "complex64" \
        else ["sum", "avg", "max", "min"]


@st.composite
def layouts(draw: st.DrawFn, shape: Shape, world_size: int, dtype: str) -> Layout:
    kinds = ["replicate"] + (["partial"] if _partial_ops(dtype) else [])
    if shape:
        kinds += ["chunk", "chunk", "chunk", "grid", "grid"]
    if world_size == 4 and shape:
        kinds += ["mesh"] * 6
    kind = draw(st.sampled_from(kinds))
    if kind == "mesh":
        placement = st.sampled_from(
            [("shard", d) for d in range(len(shape))] + [("replicate", 0)]
            + ([("partial", op) for op in _partial_ops(dtype)]))
        first = draw(placement)
        second = draw(placement)
        if first[0] == second[0] == "partial" and first[1] != second[1]:
            second = first  # (one reduction per tensor)
        return ("mesh", (first, second))
    rank = st.integers(0, world_size - 1)
    if kind == "chunk":
        dim = draw(st.integers(-len(shape), len(shape) - 1))
        ranks = draw(st.lists(rank, min_size=1, max_size=2 * world_size))
        return ("chunk", dim, tuple(ranks))
    if kind == "grid":
        cuts = []
        for size in shape:
            count = draw(st.integers(0, 2))
            points = sorted(draw(st.lists(st.integers(0, size), min_size=count,
                                          max_size=count)))
            cuts.append((0, *points, size))
        blocks = math.prod(len(c) - 1 for c in cuts)
        owners = draw(st.lists(rank, min_size=blocks, max_size=blocks))
        return ("grid", tuple(cuts), tuple(owners))
    if kind == "partial":
        return ("partial", draw(st.sampled_from(_partial_ops(dtype))))
    return ("replicate",)


@st.composite
def operands(draw: st.DrawFn, shape: Shape, dtype: str, world_size: int,
             plain: bool = True) -> Operand:
    sharded = not plain or draw(st.integers(0, 3)) > 0
    return {
        "shape": tuple(shape), "dtype": dtype, "seed": draw(st.integers(0, 2**16)),
        "values": draw(st.sampled_from(["normal", "normal", "ties"])),
        "layout": draw(layouts(tuple(shape), world_size, dtype)) if sharded else None,
        "build": draw(st.sampled_from(["from_replicated", "from_replicated",
                                       "from_local_shards", "shard_tensor"])),
    }


@st.composite
def broadcast_shapes(draw: st.DrawFn, shape: Shape, grow: bool = True) -> Shape:
    """A shape that broadcasts with ``shape`` (``grow``: may also expand ``shape``)."""
    other = [draw(st.sampled_from([s, 1])) if s != 1 or not grow
             else draw(st.integers(1, 3)) for s in shape]
    drop = draw(st.integers(0, len(other)))
    other = other[drop:]
    if grow and drop == 0 and len(shape) < 3 and draw(st.booleans()):
        other.insert(0, draw(st.integers(1, 3)))
    return tuple(other)


@st.composite
def dims_of(draw: st.DrawFn, ndim: int, single: bool) -> tuple[int, ...]:
    if single:
        dims = [draw(st.integers(0, max(ndim - 1, 0)))]
    else:
        dims = sorted(set(draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim))))
    return tuple(d - ndim if ndim and draw(st.booleans()) else d for d in dims)


@st.composite
def reshape_targets(draw: st.DrawFn, shape: Shape) -> Shape:
    numel = math.prod(shape)
    ndim = draw(st.integers(1, 3))
    if numel == 0:
        dims = [draw(st.integers(0, 4)) for _ in range(ndim)]
        dims[draw(st.integers(0, ndim - 1))] = 0
        return tuple(dims)
    dims = []
    rest = numel
    for _ in range(ndim - 1):
        divisors = [d for d in range(1, rest + 1) if rest % d == 0]
        dims.append(draw(st.sampled_from(divisors)))
        rest //= dims[-1]
    dims.append(rest)
    if draw(st.booleans()):
        dims[draw(st.integers(0, ndim - 1))] = -1
    return tuple(dims)


@st.composite
def view_steps(draw: st.DrawFn, shape: Shape) -> tuple[Any, ...]:
    ndim = len(shape)
    kinds = ["unsqueeze", "reshape", "flatten", "contiguous"]
    if ndim >= 2:
        kinds += ["transpose", "transpose"]
    if ndim == 3:
        kinds.append("permute")
    if ndim >= 1:
        kinds += ["slice", "slice", "select"]
    if 1 in shape:
        kinds += ["squeeze", "expand"]
    kind = draw(st.sampled_from(kinds))
    params: tuple[Any, ...] = ()
    if kind == "transpose":
        params = (draw(st.integers(-ndim, ndim - 1)), draw(st.integers(-ndim, ndim - 1)))
    elif kind == "permute":
        params = tuple(draw(st.permutations(range(ndim))))
    elif kind == "unsqueeze":
        params = (draw(st.integers(-ndim - 1, ndim)),)
    elif kind == "squeeze":
        params = (draw(st.sampled_from([d for d, s in enumerate(shape) if s == 1])),)
    elif kind == "reshape":
        params = draw(reshape_targets(shape))
    elif kind == "slice":
        dim = draw(st.integers(0, ndim - 1))
        start = draw(st.one_of(st.none(), st.integers(-shape[dim] - 1, shape[dim])))
        stop = draw(st.one_of(st.none(), st.integers(-shape[dim] - 1, shape[dim] + 1)))
        params = (dim, start, stop, draw(st.sampled_from([1, 1, 2, 3])))
    elif kind == "select":
        candidates = [d for d, s in enumerate(shape) if s > 0]
        if not candidates:
            return ("view", "flatten", ())
        dim = draw(st.sampled_from(candidates))
        params = (dim, draw(st.integers(-shape[dim], shape[dim] - 1)))
    elif kind == "expand":
        params = tuple(draw(st.integers(1, 3)) if s == 1 else s for s in shape)
    return ("view", kind, params)


@st.composite
def steps(draw: st.DrawFn, x: torch.Tensor, world_size: int) -> tuple[Any, ...]:
    shape, dtype = tuple(x.shape), dtype_name(x.dtype)
    ndim = len(shape)
    kinds = ["unary", "scalar", "binary", "binary", "inplace", "reduce", "reduce", "reduce",
             "view", "view", "reshard", "reshard"]
    if ndim >= 1:
        kinds.append("cat")
    if dtype != "bool" and 1 <= ndim <= 3:
        kinds += ["matmul", "matmul"]
    kind = draw(st.sampled_from(kinds))
    if kind == "unary":
        return ("unary", draw(st.sampled_from([n for n, (_, d) in UNARY.items() if dtype in d])))
    if kind == "scalar":
        name = draw(st.sampled_from([n for n, (_, d) in SCALAR.items() if dtype in d]))
        scalar: Any = draw(st.sampled_from([2, 3] if dtype in ("int64", "bool") and name != "div"
                                           else [1.5, -0.5, 2.0]))
        return ("scalar", name, scalar)
    if kind == "binary":
        name = draw(st.sampled_from([n for n, (_, d) in BINARY.items() if dtype in d]))
        other = draw(operands(draw(broadcast_shapes(shape)), dtype, world_size))
        return ("binary", name, other, draw(st.booleans()))
    if kind == "inplace":
        name = draw(st.sampled_from(INPLACE if dtype != "bool" else ("mul_",)))
        if draw(st.booleans()):
            return ("inplace", name,
                    draw(operands(draw(broadcast_shapes(shape, grow=False)), dtype, world_size)))
        return ("inplace", name, True if dtype == "bool" else 2 if dtype == "int64" else 0.5)
    if kind == "reduce":
        name = draw(st.sampled_from([n for n, d in REDUCTIONS.items() if dtype in d]))
        single = name in SINGLE_DIM
        dims = None if (ndim == 0 or draw(st.integers(0, 3)) == 0) and name not in (
            "softmax", "log_softmax") else draw(dims_of(ndim, single))
        return ("reduce", name, dims, draw(st.booleans()), draw(st.integers(0, 1)))
    if kind == "view":
        return draw(view_steps(shape))
    if kind == "reshard":
        return ("reshard", draw(layouts(shape, world_size, dtype)), draw(st.booleans()))
    if kind == "cat":
        dim = draw(st.integers(-ndim, ndim - 1))
        other_shape = list(shape)
        other_shape[dim] = draw(st.integers(0, 4))
        other = draw(operands(tuple(other_shape), dtype, world_size))
        return ("cat", other, dim, draw(st.booleans()))
    # matmul: x [K] / [M, K] / [B, M, K] @ other, or other @ x (swap)
    swap = draw(st.booleans())
    n = draw(st.integers(0, 5))
    if not swap:
        k = shape[-1]
        choices = [(k,), (k, n)] + ([(shape[0], k, n)] if ndim == 3 else [])
    else:
        k = shape[0] if ndim == 1 else shape[-2]
        choices = [(k,), (n, k)] + ([(shape[0], n, k)] if ndim == 3 else [])
    other_shape = draw(st.sampled_from(choices))
    return ("matmul", draw(operands(other_shape, dtype, world_size)), swap)


def _shaped(side: Side, x: torch.Tensor, step: tuple[Any, ...]) -> torch.Tensor:
    try:
        return apply_step(side, x, step)
    except (RuntimeError, IndexError, ValueError, TypeError):
        reject()  # an invalid combination (e.g. a max over an empty dim): draw another


@st.composite
def programs(draw: st.DrawFn, max_steps: int = 4, step_kinds: tuple[str, ...] | None = None,
             world_sizes: tuple[int, ...] = WORLD_SIZES) -> dict[str, Any]:
    world_size = draw(st.sampled_from(world_sizes))
    dtype = draw(st.sampled_from(["float32", "float64", "float64", "complex64", "int64",
                                  "bool"]))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)))
    backward = dtype in INEXACT and draw(st.integers(0, 3)) > 0
    x_operand = draw(operands(shape, dtype, world_size, plain=False))
    side = MetaSide(False)
    x = side.operand(x_operand)
    program_steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        step = draw(steps(x, world_size))
        if step_kinds is not None and step[0] not in step_kinds:
            step = ("reshard", draw(layouts(tuple(x.shape), world_size, dtype_name(x.dtype))),
                    draw(st.booleans()))
        x = _shaped(side, x, step)
        program_steps.append(step)
    return {"world_size": world_size, "input": x_operand, "steps": program_steps,
            "backward": backward}


@st.composite
def matmul_programs(draw: st.DrawFn) -> dict[str, Any]:
    """``a @ b`` (then maybe a reshard and a reduction) with both operands sharded."""
    world_size = draw(st.sampled_from(WORLD_SIZES))
    dtype = draw(st.sampled_from(["float32", "float64", "float64", "complex64", "int64"]))
    batch, m, k, n = (draw(st.integers(0, 6)) for _ in range(4))
    shapes = draw(st.sampled_from([((m, k), (k, n)), ((m, k), (k,)), ((k,), (k,)),
                                   ((k,), (batch, k, n)), ((batch, m, k), (batch, k, n)),
                                   ((batch, m, k), (k, n)), ((batch, m, k), (k,))]))
    a = draw(operands(shapes[0], dtype, world_size, plain=False))
    b = draw(operands(shapes[1], dtype, world_size))
    program_steps: list[tuple[Any, ...]] = [("matmul", b, False)]
    side = MetaSide(False)
    value = _shaped(side, side.operand(a), program_steps[0])
    if draw(st.booleans()):
        step = draw(steps(value, world_size))
        _shaped(side, value, step)
        program_steps.append(step)
    return {"world_size": world_size, "input": a, "steps": program_steps,
            "backward": dtype in INEXACT}


# -- the tests ----------------------------------------------------------------------------

@profile("chains")
@given(program=programs())
def test_op_chains_match_dense(program: dict[str, Any]) -> None:
    check("chains", program)


@profile("reshards")
@given(program=programs(max_steps=4, step_kinds=("reshard", "view")))
def test_reshard_chains_match_dense(program: dict[str, Any]) -> None:
    check("reshards", program)


@profile("matmul")
@given(program=matmul_programs())
def test_matmul_matches_dense(program: dict[str, Any]) -> None:
    check("matmul", program)


@profile("mesh")
@given(program=programs(world_sizes=(4,)))
def test_op_chains_on_a_2x2_mesh_match_dense(program: dict[str, Any]) -> None:
    """The chains on 4 ranks, with N-D layouts (per-mesh-dim placements on a 2x2 mesh:
    copies, a pending reduction on one mesh dim, uneven sizes) among the 1-D ones."""
    check("mesh", program)


def _vector_matrix_product(rank: int, world_size: int) -> None:
    vector = ds.ShardedTensor.from_replicated(torch.ones(3), ds.Replicate())
    product = vector @ torch.ones(3, 2)  # matmul: unsqueeze(0).mm(...).squeeze_(0)
    torch.testing.assert_close(product.full_tensor(), torch.full((2,), 3.0))


def test_vector_matrix_product() -> None:
    """Once a gap (the in-place view ``squeeze_``); the property tests now draw it too."""
    get_pool(2).run(_vector_matrix_product, timeout_s=RUN_TIMEOUT_S)


# -- regressions: bugs the properties found, pinned ---------------------------------------

@multi_rank(world_size=[2, 3])
def test_in_place_op_on_a_redistributed_partial_leaves_the_partial_alone(
        rank: int, world_size: int) -> None:
    # The Partial's cached reduction was handed out as the result: mul_ changed it, and
    # with it the Partial's value, while its summands stayed the same.
    partial = ds.ShardedTensor.from_local_tensor(torch.full((3,), rank + 1.0), ds.Partial(), 3)
    value = partial.full_tensor()
    replicated = partial.redistribute(ds.Replicate())
    replicated.mul_(10)
    torch.testing.assert_close(partial.full_tensor(), value)
    torch.testing.assert_close(replicated.full_tensor(), value * 10)
    # ... and resharding the copy in place does not reshard the cache.
    again = partial.redistribute(ds.Replicate())
    again.reshard(ds.Partial("sum"))
    torch.testing.assert_close(partial.full_tensor(), value)


@multi_rank(world_size=[1, 2])
def test_a_plain_gradient_reaches_a_sharded_leaf_as_a_sharded_tensor(
        rank: int, world_size: int) -> None:
    # torch's cat backward makes an empty 1-D input's gradient with at::zeros: plain.
    leaf = ds.ShardedTensor.from_replicated(torch.zeros(0), ds.Replicate()).requires_grad_(True)
    torch.cat([leaf * 2, torch.zeros(0)]).sum().backward()
    assert isinstance(leaf.grad, ds.ShardedTensor)
    assert leaf.grad.sharding_spec() == leaf.sharding_spec() and leaf.grad.shape == (0,)


@multi_rank(world_size=[2, 3])
def test_sharded_to_partial_max_and_min(rank: int, world_size: int) -> None:
    dense = torch.arange(-4.0, 5.0)
    for dtype in (torch.float32, torch.int64):
        sharded = ds.ShardedTensor.from_replicated(
            dense.to(dtype), ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in
                                                      reversed(range(world_size))]))
        for op in ("max", "min"):
            partial = sharded.redistribute(ds.Partial(op))
            torch.testing.assert_close(partial.full_tensor(), dense.to(dtype))


@multi_rank(world_size=[2, 3])
def test_expanding_a_chunked_size_one_dim(rank: int, world_size: int) -> None:
    # The chunk layout was recomputed for the expanded size: the ranks holding the empty
    # blocks then failed to expand them, alone (a rank-inconsistent error).
    for shape, size in (((2, 3, 1), (2, 3, 4)), ((0, 0, 1), (0, 0, 2)), ((1, 3), (4, 2, 3))):
        dense = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        chunked_dim = len(shape) - 1 if len(shape) == 3 else 0
        sharded = ds.ShardedTensor.from_replicated(dense, ds.ChunkShardingSpec(
            chunked_dim, [f"rank:{r}/cpu" for r in reversed(range(world_size))]))
        torch.testing.assert_close(sharded.expand(size).full_tensor(), dense.expand(size))


@multi_rank(world_size=[2])
def test_empty_slice_of_a_dim_with_empty_blocks_beyond_it(rank: int, world_size: int) -> None:
    # Blocks empty along an unsplit dim kept their offsets past the new, shorter length:
    # the resulting layout failed validation.
    dense = torch.arange(2.0)
    spec = ds.EnumerableShardingSpec([ds.ShardMetadata([0], [0], "rank:0/cpu"),
                                      ds.ShardMetadata([0], [2], "rank:1/cpu"),
                                      ds.ShardMetadata([2], [0], "rank:0/cpu")])
    sharded = ds.ShardedTensor.from_replicated(dense, spec)
    for stop in (0, 1, 2):
        torch.testing.assert_close(sharded[:stop].full_tensor(), dense[:stop])
