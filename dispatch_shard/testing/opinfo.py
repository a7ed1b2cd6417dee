"""Differential testing against dense PyTorch over the OpInfo database.

For each OpInfo of ``torch.testing._internal.common_methods_invocations.op_db``
and each of its float32 CPU samples, every tensor argument of ``ndim >= 1`` is
sharded along dim 0 in uneven ``torch.chunk`` blocks over the ranks of the
pool (0-dim tensors, non-tensor arguments and NOTE [host arguments stay dense]
are kept as they are), the op runs
on the sharded sample and on the dense one, and the results are compared::

    from dispatch_shard.testing import get_pool
    from dispatch_shard.testing.opinfo import find_ops, run_ops

    results = run_ops(find_ops(["add", "sum"]), get_pool(2), library="dispatch_shard")
    print([(r.op, r.forward, r.backward) for r in results])

Outcome of one sample, forward and backward:

``PASS``
    every tensor output is a sharded tensor of the library (a Python scalar
    where dense gives one), with the dense shape and dtype, and its
    ``full_tensor()`` equals the dense output within the OpInfo's float32
    tolerances (``assert_close`` defaults otherwise; NaN equals NaN); inputs
    end up as the dense op leaves them (in-place ops); for backward, the input
    gradients of ``sum(output * fixed weight)`` equal the dense ones. A plain
    output passes only where it comes from plain inputs alone (see NOTE
    [plain outputs]).
``UNSUPPORTED``
    the op raised ``NotImplementedError``: allowed.
``WRONG``
    a value, shape or dtype differs, or a plain tensor came back where dense
    gives a tensor: never allowed.
``ERROR``
    any other exception (or ranks that disagree about the outcome).
``SKIP``
    nothing to compare: the dense op itself raised, no argument could be
    sharded, the output is random or uninitialised memory (then only type,
    shape and dtype are checked), or the sample is not strided.

NOTE [plain outputs]
``plain.view_as(sharded)`` or ``meshgrid(sharded, plain_0dim)`` give plain
tensors that no sharded op produced: the op's composite code works on the
plain input alone. A dispatch mode around the sharded forward sees every aten
op that gets a sharded argument (not the ops the library's implementations
issue in turn); if one of them returns a new plain tensor, a plain output is
WRONG, else it is compared by value like a sharded one. The same mode notes
which ``ops/`` family served each of those aten ops (``dispatched``).

NOTE [float32 rounding]
Sharded reductions add in another order than dense ones, and some ops amplify
the difference beyond the float32 tolerances (a layer norm of one element
divides rounding noise by ``sqrt(eps)``). A float32 mismatch of values
therefore goes to a referee: the same sample in float64, at float64
tolerances. Where sharded and dense agree there, the sample passes (the
detail says so); a wrong algorithm is as wrong in float64.

NOTE [running samples on every rank]
Each op's samples run as one task on every rank of a :class:`RankPool`, in
the same order, so every rank issues the same collectives. Each rank seeds
torch, ``random`` and numpy identically before generating the samples, so the
dense samples are the same on every rank (checked: a fingerprint of every
sample is gathered; samples listed in another order on another rank, as some
OpInfos do by iterating over sets, are paired by fingerprint, and samples
missing on some rank are skipped). Every exception is caught per sample,
and after each sample the ranks exchange
their outcomes and how many collectives they issued, on a process group of
their own (its collectives pair up even when the default group's are out of
step). Ranks that issued different numbers of collectives (one rank raised
before a collective the others entered) are out of step: the task stops
there, the pool is restarted and the op resumes at the next sample. Ranks
that agree on the count but not on the outcome give the worse one. A task
that hangs or dies (the pool's timeout) marks the op ``HANG`` / ``ERROR``;
the pool restarts itself for the next op.

Backward runs for ops with ``supports_autograd`` on samples whose forward
passed: the loss is ``sum((out * w).sum())`` over the differentiable outputs
(after the sample's ``output_process_fn_grad``), with ``w`` a fixed tensor
(``linspace(0.5, 1.5)``), plain for dispatch_shard and a replicated DTensor
for DTensor (DTensor refuses plain operands).

The same harness runs DTensor (``distribute_tensor(t, mesh, [Shard(0)])`` on
a 1-D CPU mesh over the pool's ranks) for comparison: ``library="dtensor"``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from dispatch_shard.testing.pool import RankFailure, RankPool

__all__ = [
    "ERROR",
    "HANG",
    "LIBRARIES",
    "PARTIAL",
    "PASS",
    "SKIP",
    "UNSUPPORTED",
    "WRONG",
    "OpResult",
    "SampleResult",
    "dtype_ops",
    "find_ops",
    "float32_ops",
    "op_key",
    "registration",
    "run_op",
    "run_ops",
    "run_samples_on_rank",
    "summarize",
]

PASS = "PASS"
UNSUPPORTED = "UNSUPPORTED"
WRONG = "WRONG"
ERROR = "ERROR"
SKIP = "SKIP"
# Op-level only: the task hung or died; some samples passed, others are unsupported.
HANG = "HANG"
PARTIAL = "PARTIAL"

LIBRARIES = ("dispatch_shard", "dispatch_shard_2x2", "dtensor")
SEED = 1234
_DETAIL_CHARS = 600

# Worst first: how outcomes of several ranks (or samples) combine.
_SEVERITY = {WRONG: 5, ERROR: 4, UNSUPPORTED: 2, SKIP: 1, PASS: 0}


# -- the op database ----------------------------------------------------------------

def _op_db() -> list[Any]:
    from torch.testing._internal.common_methods_invocations import op_db

    return list(op_db)


def op_key(op: Any) -> str:
    """``name`` or ``name.variant_test_name``: unique in ``op_db``."""
    name: str = op.name
    return f"{name}.{op.variant_test_name}" if op.variant_test_name else name


_BY_KEY: dict[str, Any] = {}


def _index() -> dict[str, Any]:
    if not _BY_KEY:
        _BY_KEY.update((op_key(op), op) for op in _op_db())
    return _BY_KEY


def _op_by_key(key: str) -> Any:
    return _index()[key]


def float32_ops() -> list[Any]:
    """Every OpInfo of ``op_db`` that supports float32 on CPU, in ``op_db`` order."""
    return dtype_ops("float32")


def dtype_ops(dtype: str) -> list[Any]:
    """Every OpInfo of ``op_db`` that supports ``dtype`` (``"float32"``, ``"complex64"``)
    on CPU, in ``op_db`` order."""
    wanted = _DTYPES[dtype]
    return [op for op in _op_db() if wanted in op.supported_dtypes("cpu")]


# The sample dtypes the harness runs, by name (names travel to the pool's ranks), and
# the wider dtype of NOTE [float32 rounding]'s referee.
_DTYPES = {"float32": torch.float32, "complex64": torch.complex64}
_WIDER = {torch.float32: torch.float64, torch.complex64: torch.complex128}


def find_ops(keys: Iterable[str]) -> list[Any]:
    """The OpInfos named by ``keys`` (see :func:`op_key`); ``KeyError`` names missing ones."""
    keys = list(keys)
    _index()
    missing = [k for k in keys if k not in _BY_KEY]
    if missing:
        raise KeyError(f"not in op_db: {missing}")
    return [_BY_KEY[k] for k in keys]


def _aten_packet(op: Any) -> torch._ops.OpOverloadPacket | None:
    """The aten op behind an OpInfo, by its names (``nn.functional.mse_loss`` -> ``mse_loss``)."""
    name: str = op.name
    last = name.rsplit(".", 1)[-1]
    candidates = [getattr(op, "aten_name", None) or name, name.replace(".", "_"), last]
    if last.startswith("__r") and last.endswith("__"):  # __radd__ -> add
        candidates.append(last[3:-2])
    for candidate in candidates:
        packet = getattr(torch.ops.aten, candidate, None) if "." not in candidate else None
        if isinstance(packet, torch._ops.OpOverloadPacket):
            return packet
    return None


def registration(op: Any) -> str:
    """How dispatch_shard serves the aten op behind ``op``.

    The ``ops/`` families registering any overload of the op's aten packet
    (``pointwise``, ``decomposed``...), ``composite`` when torch decomposes
    the op above the dispatch (CompositeImplicitAutograd), else ``none``.
    """
    import dispatch_shard  # noqa: F401  (registers the built-in ops)
    from dispatch_shard.registry import OVERLOADS, PACKETS

    packet = _aten_packet(op)
    if packet is None:
        return "none"
    families: set[str] = set()
    composite = False
    packet_impl = PACKETS.get(packet)
    for overload_name in packet.overloads():
        overload = getattr(packet, overload_name)
        impl = OVERLOADS.get(overload) or packet_impl
        if impl is not None:
            families.add(impl.__module__.rsplit(".", 1)[-1])
        else:
            try:
                composite |= torch._C._dispatch_has_kernel_for_dispatch_key(
                    overload.name(), "CompositeImplicitAutograd")
            except RuntimeError:  # TorchScript-only overloads (aten::add.t) have no kernels
                pass
    if families:
        return "+".join(sorted(families, key=lambda f: (f == "decomposed", f)))
    return "composite" if composite else "none"


def _tolerance(op: Any, dtype: str = "float32") -> tuple[float, float]:
    """(rtol, atol) for ``dtype``: the largest CPU override the OpInfo declares, or the
    defaults (assert_close's float32 ones, which complex64 shares)."""
    from torch.testing._internal.common_device_type import precisionOverride, toleranceOverride
    from torch.testing._internal.opinfo.core import DecorateInfo

    rtol, atol = 1.3e-6, 1e-5  # assert_close's float32 (and complex64) defaults
    wanted = _DTYPES[dtype]
    for info in op.decorators:
        if not isinstance(info, DecorateInfo) or info.device_type not in (None, "cpu"):
            continue
        for decorator in info.decorators:
            if isinstance(decorator, toleranceOverride) and wanted in decorator.d:
                tol = decorator.d[wanted]
                rtol, atol = max(rtol, tol.rtol), max(atol, tol.atol)
            elif isinstance(decorator, precisionOverride) and wanted in decorator.d:
                atol = max(atol, decorator.d[wanted])
    return rtol, atol


# -- per-library adapters (run on the ranks) ------------------------------------------

class _Library:
    """How one library shards a dense tensor and reads a sharded one back."""

    name: str
    tensor_type: type

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, tensor: torch.Tensor) -> torch.Tensor:
        """A replicated operand for the backward loss."""
        raise NotImplementedError

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.full_tensor()  # type: ignore[attr-defined,no-any-return]

    def inconsistency(self, tensor: torch.Tensor) -> str | None:
        """What is wrong with the tensor's local blocks, if anything (local check)."""
        return None

    def family(self, func: Any) -> str | None:
        """The name of what serves the aten overload ``func`` (None: not known)."""
        return None


class _DispatchShard(_Library):
    name = "dispatch_shard"

    def __init__(self, rank: int) -> None:
        from dispatch_shard import ChunkShardingSpec, ShardedTensor
        from dispatch_shard.collectives import group_ranks, resolve_group

        self.tensor_type = ShardedTensor
        self.rank = rank
        self.group = resolve_group(None)
        self.ranks = group_ranks(self.group)
        self.spec = ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in self.ranks])

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        # The internal constructor: every rank holds the dense value, no communication.
        from dispatch_shard import ShardedTensor
        from dispatch_shard.layout import layout_of

        layout = layout_of(self.spec, tensor.shape, self.ranks)
        dense = tensor.detach()
        blocks = [dense[layout.shard_box(i)].clone(memory_format=torch.contiguous_format)
                  for i in layout.local_indices(self.rank)]
        result = ShardedTensor._wrap(blocks, layout, self.group, self.rank, tensor.dtype,
                                     tensor.device)
        if tensor.requires_grad:
            result.requires_grad_(True)
        return result

    def weight(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # a plain tensor is a replicated value

    def family(self, func: Any) -> str | None:
        from dispatch_shard.registry import OVERLOADS, PACKETS

        impl = OVERLOADS.get(func) or PACKETS.get(func.overloadpacket)
        return impl.__module__.rsplit(".", 1)[-1] if impl is not None else "missing"

    def inconsistency(self, tensor: torch.Tensor) -> str | None:
        from dispatch_shard import ShardedTensor

        assert isinstance(tensor, ShardedTensor)
        layout = tensor._layout
        if tuple(layout.size) != tuple(tensor.shape):
            return f"layout size {list(layout.size)} != tensor size {list(tensor.shape)}"
        indices = layout.local_indices(self.rank)
        if len(indices) != len(tensor._local_tensors):
            return (f"rank {self.rank} holds {len(tensor._local_tensors)} blocks, its layout "
                    f"places {len(indices)}")
        for block, index in zip(tensor._local_tensors, indices, strict=True):
            expected = layout.shards[index].shard_sizes
            if list(block.shape) != list(expected) or block.dtype != tensor.dtype:
                return (f"block {index} on rank {self.rank} is {list(block.shape)} "
                        f"{block.dtype}, the layout says {list(expected)} {tensor.dtype}")
        return None


class _DispatchShardMesh(_DispatchShard):
    """dispatch_shard on a 2x2 mesh of 4 ranks, each tensor of a sample in the next of a
    few N-D layouts: split on one mesh dim and replicated on the other, a pending sum on
    one mesh dim (floating tensors), uneven wherever a dim does not divide by 2."""

    name = "dispatch_shard_2x2"

    def __init__(self, rank: int) -> None:
        super().__init__(rank)
        from torch.distributed.device_mesh import init_device_mesh

        if "2x2" not in _MESHES:  # (made once per process: it makes process groups)
            _MESHES["2x2"] = init_device_mesh("cpu", (2, 2))
        self.mesh = _MESHES["2x2"]
        self.turn = 0

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import Partial, Replicate, Shard

        from dispatch_shard import distribute_tensor, unchecked_creation

        options = [[Shard(0), Replicate()], [Replicate(), Shard(-1)]]
        if tensor.is_floating_point():
            options += [[Partial(), Shard(0)], [Shard(-1), Partial()]]
        placements = options[self.turn % len(options)]
        self.turn += 1  # (reset per sample by _copies: the same on every rank)
        with unchecked_creation():
            result = distribute_tensor(tensor.detach(), self.mesh, placements)
        if tensor.requires_grad:
            result.requires_grad_(True)
        return result


_MESHES: dict[str, Any] = {}


class _DTensor(_Library):
    name = "dtensor"

    def __init__(self, world_size: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        self.tensor_type = DTensor
        self.mesh = init_device_mesh("cpu", (world_size,))

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import Shard, distribute_tensor

        result = distribute_tensor(tensor.detach(), self.mesh, [Shard(0)])
        if tensor.requires_grad:
            result.requires_grad_(True)
        return result

    def weight(self, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import Replicate, distribute_tensor

        return distribute_tensor(tensor, self.mesh, [Replicate()])


def _library(name: str, rank: int, world_size: int) -> _Library:
    if name == "dispatch_shard":
        return _DispatchShard(rank)
    if name == "dispatch_shard_2x2":
        return _DispatchShardMesh(rank)
    if name == "dtensor":
        return _DTensor(world_size)
    raise ValueError(f"library must be one of {LIBRARIES}, got {name!r}")


# -- one sample ---------------------------------------------------------------------

@dataclasses.dataclass
class _Copies:
    """A sample's arguments twice: dense clones and sharded ones, leaf for leaf."""

    dense: tuple[Any, tuple[Any, ...], dict[str, Any]]
    sharded: tuple[Any, tuple[Any, ...], dict[str, Any]]
    # (dense leaf, sharded or kept leaf) for every distinct tensor of the sample.
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    sharded_count: int


def _arguments(sample: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    return (sample.input, tuple(sample.args), dict(sample.kwargs))


def _clone_leaf(tensor: torch.Tensor) -> torch.Tensor:
    copy = tensor.detach().clone()
    return copy.requires_grad_(True) if tensor.requires_grad else copy


def _dense_copy(sample: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    memo: dict[int, torch.Tensor] = {}

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in memo:
                memo[id(value)] = _clone_leaf(value)
            return memo[id(value)]
        return value

    return pytree.tree_map(copy, _arguments(sample))  # type: ignore[no-any-return]


# NOTE [host arguments stay dense]
# A few ops take a tensor that torch reads on the host, in a CompositeImplicitAutograd
# kernel, before any ``__torch_dispatch__`` can see it (``tensor_split``'s
# ``tensor_indices_or_sections``, which must be a CPU int64 tensor: a list of ints in
# tensor form). No tensor subclass that serves aten ops can hold such an argument (a
# wrapper has no data to read), so these arguments stay dense, by op name and position
# in ``sample.args``.
_HOST_ARGUMENTS: dict[str, tuple[int, ...]] = {"tensor_split": (0,)}


def _host_tensors(op: Any, sample: Any) -> set[int]:
    """Ids of the sample's tensors that stay dense (NOTE [host arguments stay dense])."""
    return {id(sample.args[i]) for i in _HOST_ARGUMENTS.get(op_key(op), ())
            if i < len(sample.args) and isinstance(sample.args[i], torch.Tensor)}


def _copies(sample: Any, library: _Library, host: set[int] | None = None) -> _Copies:
    dense_memo: dict[int, torch.Tensor] = {}
    sharded_memo: dict[int, torch.Tensor] = {}
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    count = 0
    if isinstance(library, _DispatchShardMesh):
        library.turn = 0

    def visit(value: Any) -> None:
        nonlocal count
        if isinstance(value, torch.Tensor) and id(value) not in dense_memo:
            dense_memo[id(value)] = _clone_leaf(value)
            if value.ndim >= 1 and id(value) not in (host or ()):
                sharded_memo[id(value)] = library.shard(value)
                count += 1
            else:
                sharded_memo[id(value)] = _clone_leaf(value)
            pairs.append((dense_memo[id(value)], sharded_memo[id(value)]))

    arguments = _arguments(sample)
    pytree.tree_map(visit, arguments)

    def pick(memo: dict[int, torch.Tensor]) -> Callable[[Any], Any]:
        return lambda v: memo[id(v)] if isinstance(v, torch.Tensor) else v

    return _Copies(pytree.tree_map(pick(dense_memo), arguments),
                   pytree.tree_map(pick(sharded_memo), arguments), pairs, count)


def _call(op: Any, arguments: tuple[Any, tuple[Any, ...], dict[str, Any]], seed: int) -> Any:
    torch.manual_seed(seed)
    first, args, kwargs = arguments
    return op(first, *args, **kwargs)


def _message(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:_DETAIL_CHARS]


def _same(a: Any, b: Any) -> bool:
    """Bitwise-equal outputs (NaN equal to NaN), for the randomness check."""
    a_leaves, a_spec = pytree.tree_flatten(a)
    b_leaves, b_spec = pytree.tree_flatten(b)
    if a_spec != b_spec:
        return False
    for x, y in zip(a_leaves, b_leaves, strict=True):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            try:
                torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=0,
                                           equal_nan=True)
            except AssertionError:
                return False
        elif isinstance(x, float) and isinstance(y, float):
            if not (x == y or (math.isnan(x) and math.isnan(y))):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or x != y:
            return False
    return True


class _Watch(TorchDispatchMode):
    """Around the sharded forward: each aten op that reaches the library from outside it.

    A dispatch mode sees the ops the caller issues, not the ones the library's
    implementations issue in turn (modes are off while a mode runs an op).
    Notes the ops that got a sharded argument (``dispatched``: op -> family)
    and those that returned a new plain tensor (``plain_from``): the library
    gave a plain tensor where a sharded one was due.
    """

    def __init__(self, library: _Library, dispatched: dict[str, str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.library = library
        self.dispatched = dispatched
        self.plain_from: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = pytree.tree_leaves((args, kwargs))
        sharded = any(isinstance(a, self.library.tensor_type) for a in inputs)
        if sharded:
            family = self.library.family(func)
            if family is not None:
                self.dispatched[str(func)] = family
        out = func(*args, **kwargs)
        if sharded:
            known = {id(a) for a in inputs if isinstance(a, torch.Tensor)}
            if any(type(o) is torch.Tensor and id(o) not in known
                   for o in pytree.tree_leaves(out)):
                self.plain_from.append(str(func))
        return out


class _SeededOps(TorchDispatchMode):
    """Notes whether any op tagged ``nondeterministic_seeded`` runs (dropout, rand_like...)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.seen = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen = True
        return func(*args, **(kwargs or {}))


def _on_any_rank(flag: bool) -> bool:
    """``flag`` or'ed over the ranks: uninitialised memory (``lstsq``'s unused outputs)
    differs between ranks, so one rank alone could call an output random and skip reading
    it while the others read it (a collective) and wait."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _random(op: Any, sample: Any, dense_out: Any, seed: int) -> bool:
    """Whether the dense op draws random numbers or gives another output on another seed.

    Both checks are needed: OpInfos of random ops often fix the seed themselves
    (``wrapper_set_seed``), so that two runs agree while sharded blocks draw
    from each rank's generator.
    """
    mode = _SeededOps()
    try:
        with mode:
            again = _call(op, _dense_copy(sample), seed + 1)
    except Exception:
        return True
    return mode.seen or not _same(dense_out, again)


# Marks a mismatch of values (not of types or shapes): the float64 referee may clear it.
_VALUES_DIFFER = "values differ"


def _compare_value(actual: Any, expected: Any, where: str, library: _Library,
                   tolerance: tuple[float, float], values: bool, allow_plain: bool
                   ) -> str | None:
    """Why ``actual`` (from the sharded run) is not ``expected`` (dense), or None.

    ``allow_plain``: a plain tensor may stand for a sharded one. Deterministic
    given the dense side and the types, so every rank issues the same
    ``full_tensor`` collectives.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return f"{where}: {type(actual).__name__} where dense gives a tensor"
        is_sharded = isinstance(actual, library.tensor_type)
        if not is_sharded and not allow_plain:
            return f"{where}: a plain tensor where dense gives a tensor"
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            return (f"{where}: {list(actual.shape)} {actual.dtype} where dense gives "
                    f"{list(expected.shape)} {expected.dtype}")
        if is_sharded:
            problem = library.inconsistency(actual)
            if problem is not None:
                return f"{where}: {problem}"
            full = library.full(actual)
        else:
            full = actual
        if full.shape != expected.shape or full.dtype != expected.dtype:
            return (f"{where}: full_tensor() is {list(full.shape)} {full.dtype} where dense "
                    f"gives {list(expected.shape)} {expected.dtype}")
        if values:
            rtol, atol = tolerance
            try:
                torch.testing.assert_close(full.detach(), expected.detach(), rtol=rtol,
                                           atol=atol, equal_nan=True, check_stride=False)
            except AssertionError as exc:
                return f"{where}: {_VALUES_DIFFER}: {_message(exc)}"
        return None
    if isinstance(actual, torch.Tensor):
        return f"{where}: a tensor where dense gives {type(expected).__name__} {expected!r}"
    if isinstance(expected, bool | int | float | complex) and not isinstance(expected, bool):
        if not isinstance(actual, int | float | complex) or isinstance(actual, bool):
            return f"{where}: {actual!r} where dense gives {expected!r}"
        if values and not (actual == expected or _isclose(actual, expected, tolerance)):
            return f"{where}: {_VALUES_DIFFER}: {actual!r} where dense gives {expected!r}"
        return None
    if values and actual != expected:
        return f"{where}: {actual!r} where dense gives {expected!r}"
    return None


def _isclose(a: complex, b: complex, tolerance: tuple[float, float]) -> bool:
    """NaN-equal closeness of two Python numbers."""
    a, b = complex(a), complex(b)
    if any(math.isnan(x) for x in (a.real, a.imag, b.real, b.imag)):
        return all(math.isnan(x) == math.isnan(y) for x, y in ((a.real, b.real),
                                                             (a.imag, b.imag)))
    rtol, atol = tolerance
    return abs(a - b) <= atol + rtol * abs(b)


def _compare(actual: Any, expected: Any, what: str, library: _Library,
             tolerance: tuple[float, float], values: bool, allow_plain: bool = False
             ) -> str | None:
    actual_leaves, actual_spec = pytree.tree_flatten(actual)
    expected_leaves, expected_spec = pytree.tree_flatten(expected)
    if actual_spec != expected_spec:
        return f"{what}: structure {actual_spec} where dense gives {expected_spec}"
    for position, (a, e) in enumerate(zip(actual_leaves, expected_leaves, strict=True)):
        where = what if len(expected_leaves) == 1 else f"{what} {position}"
        problem = _compare_value(a, e, where, library, tolerance, values, allow_plain)
        if problem is not None:
            return problem
    return None


def _weight(tensor: torch.Tensor) -> torch.Tensor:
    shape = tuple(tensor.shape) + ((2,) if tensor.is_complex() else ())
    real_dtype = tensor.real.dtype if tensor.is_complex() else tensor.dtype
    count = math.prod(shape)
    return torch.linspace(0.5, 1.5, count, dtype=real_dtype).reshape(shape)


def _loss(outputs: list[torch.Tensor], weight: Callable[[torch.Tensor], torch.Tensor]
          ) -> torch.Tensor:
    total: torch.Tensor | None = None
    for output in outputs:
        value = torch.view_as_real(output.resolve_conj()) if output.is_complex() else output
        term = (value * weight(_weight(output))).sum()
        total = term if total is None else total + term
    assert total is not None
    return total


def _differentiable(value: Any) -> list[int]:
    return [i for i, leaf in enumerate(pytree.tree_leaves(value))
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad
            and (leaf.is_floating_point() or leaf.is_complex())]


def _backward(sample: Any, copies: _Copies, dense_out: Any, out: Any, library: _Library,
              tolerance: tuple[float, float]) -> tuple[str, str]:
    if not any(d.requires_grad for d, _ in copies.pairs):
        return SKIP, "no input requires grad"
    try:
        dense_value = sample.output_process_fn_grad(dense_out)
    except Exception as exc:
        return SKIP, f"dense output_process_fn_grad raised {_message(exc)}"
    positions = _differentiable(dense_value)
    if not positions:
        return SKIP, "no differentiable output"
    try:
        value = sample.output_process_fn_grad(out)
        leaves = pytree.tree_leaves(value)
        dense_leaves = pytree.tree_leaves(dense_value)
        if len(leaves) != len(dense_leaves):
            return WRONG, "output_process_fn_grad: structure differs from dense"
        for i in positions:
            if not (isinstance(leaves[i], torch.Tensor) and leaves[i].requires_grad):
                return WRONG, f"output {i} does not require grad where dense does"
        _loss([dense_leaves[i] for i in positions], lambda w: w).backward()
        _loss([leaves[i] for i in positions], library.weight).backward()
    except NotImplementedError as exc:
        return UNSUPPORTED, _message(exc)
    except Exception as exc:
        return ERROR, _message(exc)
    try:
        with torch.no_grad():
            for position, (dense, sharded) in enumerate(copies.pairs):
                if not dense.requires_grad:
                    continue
                dense_grad = dense.grad
                grad = sharded.grad
                if dense_grad is None and grad is None:
                    continue
                if dense_grad is None:
                    assert grad is not None
                    dense_grad = torch.zeros(grad.shape, dtype=grad.dtype)
                if grad is None:
                    if bool(dense_grad.ne(0).any()):
                        return WRONG, f"grad of input {position} is None where dense is not"
                    continue
                problem = _compare_value(
                    grad, dense_grad, f"grad of input {position}", library, tolerance,
                    values=True, allow_plain=not isinstance(sharded, library.tensor_type))
                if problem is not None:
                    return WRONG, problem
    except NotImplementedError as exc:
        return ERROR, f"reading the gradient: {_message(exc)}"
    except Exception as exc:
        return ERROR, f"reading the gradient: {_message(exc)}"
    return PASS, ""


def _run_sample(op: Any, sample: Any, library: _Library, backward: bool, seed: int,
                tolerance: tuple[float, float], dispatched: dict[str, str],
                referee: bool = True) -> tuple[str, str | None, str]:
    """(forward outcome, backward outcome or None, detail) of one sample on this rank.

    A float32 mismatch of values goes to the float64 referee (``referee``).
    """
    for leaf in pytree.tree_leaves(_arguments(sample)):
        if isinstance(leaf, torch.Tensor) and (leaf.layout != torch.strided
                                               or type(leaf) is not torch.Tensor):
            return SKIP, None, "a non-strided or subclass input"
    try:
        copies = _copies(sample, library, _host_tensors(op, sample))
    except NotImplementedError as exc:
        return UNSUPPORTED, None, f"sharding the input: {_message(exc)}"
    except Exception as exc:
        return ERROR, None, f"sharding the input: {_message(exc)}"
    # The dense reference runs on the clones the pairs hold (in-place ops change them).
    try:
        dense_out = _call(op, copies.dense, seed)
    except Exception as exc:
        return SKIP, None, f"dense raised {_message(exc)}"
    if copies.sharded_count == 0:
        return SKIP, None, "no tensor input of ndim >= 1"
    random_output = _on_any_rank(op.has_nondeterministic_output
                                 or _random(op, sample, dense_out, seed))
    watch = _Watch(library, dispatched)
    try:
        with watch:
            out = _call(op, copies.sharded, seed)
    except NotImplementedError as exc:
        return UNSUPPORTED, None, _message(exc)
    except Exception as exc:
        return ERROR, None, _message(exc)
    # A plain output is fine where no op that got a sharded argument returned a plain
    # tensor: it comes from plain inputs alone (``plain.view_as(sharded)``, meshgrid).
    plain_is_fine = not watch.plain_from
    try:
        with torch.no_grad():
            problem = _compare(out, dense_out, "output", library, tolerance,
                               values=not random_output, allow_plain=plain_is_fine)
            if problem is not None and "plain tensor" in problem:
                problem += f" ({', '.join(sorted(set(watch.plain_from)))} returned one)"
            if problem is None and not random_output:
                problem = _compare([s for _, s in copies.pairs], [d for d, _ in copies.pairs],
                                   "input after the op", library, tolerance, values=True,
                                   allow_plain=True)
    except Exception as exc:
        return ERROR, None, f"reading the output: {_message(exc)}"
    if problem is not None:
        if referee and _VALUES_DIFFER in problem and _float64_agrees(op, sample, library,
                                                                     False, seed):
            return PASS, None, f"float32 rounding (float64 agrees): {problem}"
        return WRONG, None, problem
    if random_output:
        return SKIP, None, "random or uninitialised output: values not compared"
    if not backward:
        return PASS, None, ""
    backward_outcome, detail = _backward(sample, copies, dense_out, out, library, tolerance)
    if (referee and backward_outcome == WRONG and _VALUES_DIFFER in detail
            and _float64_agrees(op, sample, library, True, seed)):
        return PASS, PASS, f"float32 rounding (float64 agrees): {detail}"
    return PASS, backward_outcome, detail


def _in_float64(sample: Any) -> Any:
    def widen(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dtype in _WIDER:
            wide = value.detach().to(_WIDER[value.dtype])
            return wide.requires_grad_(True) if value.requires_grad else wide
        return value

    wide = copy.copy(sample)
    wide.input, wide.args, wide.kwargs = pytree.tree_map(widen, _arguments(sample))
    return wide


def _float64_agrees(op: Any, sample: Any, library: _Library, backward: bool,
                    seed: int) -> bool:
    """The referee for a float32 mismatch of values: the same sample in float64,
    at float64 tolerances. Where sharded and dense agree there, the float32
    difference is rounding (a different order of summation, amplified by the
    op), not a wrong result. Rank-consistent: every rank saw the same mismatch."""
    try:
        forward, back, _ = _run_sample(op, _in_float64(sample), library, backward, seed,
                                       (1e-7, 1e-7), {}, referee=False)
    except Exception:
        return False
    return forward == PASS and (not backward or back == PASS)


def _fingerprint(sample: Any) -> str:
    digest = hashlib.sha1()
    for leaf in pytree.tree_leaves(_arguments(sample)):
        if isinstance(leaf, torch.Tensor):
            digest.update(f"{leaf.dtype}{tuple(leaf.shape)}{leaf.layout}".encode())
            if leaf.layout == torch.strided and type(leaf) is torch.Tensor:
                digest.update(leaf.detach().resolve_conj().resolve_neg().contiguous().view(-1).view(torch.uint8).numpy()
                              .tobytes() if leaf.numel() else b"")
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


def describe(sample: Any) -> str:
    """A short text of a sample: tensors by shape and dtype, the rest by repr."""
    def text(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            return f"T{list(value.shape)}{'' if dtype == 'float32' else ':' + dtype}"
        if isinstance(value, list | tuple):
            inner = ", ".join(text(v) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner})"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}={text(v)}" for k, v in value.items()) + "}"
        return repr(value)

    parts = [text(sample.input)] + [text(a) for a in sample.args]
    parts += [f"{k}={text(v)}" for k, v in sample.kwargs.items()]
    name = f" [{sample.name}]" if sample.name else ""
    return (", ".join(parts) + name)[:_DETAIL_CHARS]


# -- the task every rank runs --------------------------------------------------------

_SAMPLE_CACHE: dict[tuple[str, int, str], list[Any]] = {}


def _samples(op: Any, seed: int, dtype: str = "float32") -> list[Any]:
    key = (op_key(op), seed, dtype)
    if key not in _SAMPLE_CACHE:
        import numpy

        _SAMPLE_CACHE.clear()  # the last op only
        torch.manual_seed(seed)
        random.seed(seed)
        numpy.random.seed(seed)
        _SAMPLE_CACHE[key] = list(op.sample_inputs("cpu", _DTYPES[dtype],
                                                   requires_grad=op.supports_autograd))
    return _SAMPLE_CACHE[key]


def _combine(outcomes: list[tuple[tuple[str, str | None, str], int]]
             ) -> tuple[str, str | None, str, bool]:
    """One outcome from every rank's (outcome, collectives issued so far).

    Returns (forward, backward, detail, ranks_out_of_step). Ranks that issued
    different numbers of collectives are out of step: the next collective would
    pair wrong ones, so the caller stops.
    """
    results = [o for o, _ in outcomes]
    counts = {c for _, c in outcomes}
    if len(counts) == 1 and all(r == results[0] for r in results):
        return (*results[0], False)
    forward = max((r[0] for r in results), key=_SEVERITY.__getitem__)
    backs = [r[1] for r in results if r[1] is not None]
    backward = max(backs, key=_SEVERITY.__getitem__) if backs else None
    out_of_step = len(counts) > 1
    if out_of_step and forward != WRONG:
        forward = ERROR
    details = "; ".join(f"rank {rank}: {r[0]}/{r[1]} after {c} collectives {r[2]}"
                        for rank, (r, c) in enumerate(outcomes))
    return forward, backward, f"ranks disagree: {details}"[:_DETAIL_CHARS * 2], out_of_step


def _aligned(prints: list[list[str]], rank: int) -> list[int | None]:
    """For each of rank 0's samples (by position), the position of the same sample here.

    Some OpInfos list their samples in an order that depends on the process's
    hash seed (sets of strings), so the same samples can come in another order
    on each rank. ``None`` where some rank lacks the sample. Every rank
    computes the same pairing from everyone's fingerprints.
    """
    available = [Counter(p) for p in prints]
    mine: dict[str, list[int]] = {}
    for position, fingerprint in enumerate(prints[rank]):
        mine.setdefault(fingerprint, []).append(position)
    seen: Counter[str] = Counter()
    aligned: list[int | None] = []
    for fingerprint in prints[0]:
        seen[fingerprint] += 1
        if all(c[fingerprint] >= seen[fingerprint] for c in available):
            aligned.append(mine[fingerprint][seen[fingerprint] - 1])
        else:
            aligned.append(None)
    return aligned


def run_samples_on_rank(
    *, rank: int, world_size: int, op: str, library: str, start: int = 0,
    max_samples: int | None = None, backward: bool = True, seed: int = SEED,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The pool task: run samples ``start..`` of OpInfo ``op`` (``dtype`` samples) on
    this rank.

    Returns ``{"samples": [(index, forward, backward, detail, description)],
    "total": n, "stopped_at": index or None, "error": text or None,
    "dispatched": {aten overload: family}}`` (the same on every rank: outcomes
    are exchanged after each sample; ``dispatched`` is empty for DTensor).
    """
    del world_size  # the pool passes it; the group knows it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = _op_by_key(op)
        try:
            samples = _samples(info, seed, dtype)
        except Exception as exc:
            return {"samples": [], "total": 0, "stopped_at": None,
                    "error": f"sample_inputs raised {_message(exc)}"}
        end = len(samples) if max_samples is None else min(len(samples), max_samples)
        group_size = dist.get_world_size()
        chosen = range(start, end)
        prints: list[Any] = [None] * group_size
        dist.all_gather_object(prints, [_fingerprint(s) for s in samples])
        local = _aligned(prints, rank)
        lib = _library(library, rank, group_size)
        tolerance = _tolerance(info, dtype)
        do_backward = backward and bool(info.supports_autograd)
        # The outcomes travel on a group of their own: its collectives pair up even when
        # a sample left the default group's collectives out of step.
        default_group = dist.distributed_c10d._get_default_group()
        side = dist.new_group(backend="gloo")
        dispatched: dict[str, str] = {}
        results: list[tuple[int, str, str | None, str, str]] = []
        for index in chosen:
            mine = local[index]
            sample = samples[index if mine is None else mine]
            outcome: tuple[str, str | None, str]
            if mine is None:
                outcome = (SKIP, None, "samples differ across ranks (nondeterministic)")
            else:
                outcome = _run_sample(info, sample, lib, do_backward, seed, tolerance,
                                      dispatched)
            issued: int = getattr(default_group, "_get_sequence_number_for_group")()  # noqa: B009
            gathered: list[Any] = [None] * group_size
            try:
                dist.all_gather_object(gathered, (outcome, issued), group=side)
                forward, back, detail, out_of_step = _combine(gathered)
            except Exception as exc:
                forward, back, detail = ERROR, None, f"exchanging outcomes: {_message(exc)}"
                out_of_step = True
            description = "" if (forward, back) in ((PASS, PASS), (PASS, None)) \
                else describe(sample)
            results.append((index, forward, back, detail, description))
            if out_of_step:
                return {"samples": results, "total": len(samples), "stopped_at": index,
                        "error": None, "dispatched": dispatched}
        return {"samples": results, "total": len(samples), "stopped_at": None, "error": None,
                "dispatched": dispatched}


# -- the parent side -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SampleResult:
    index: int
    forward: str
    backward: str | None  # None: not run (forward did not pass, or no autograd)
    detail: str
    sample: str  # a description, for samples that did not pass


def summarize(outcomes: Iterable[str], failure: str | None = None) -> str:
    """One outcome from several (samples', or world sizes'): the worst of WRONG, ERROR, the
    run's ``failure``, HANG; else PASS or UNSUPPORTED when all agree, PARTIAL for a mix
    (SKIP and "" do not count)."""
    counted = [o for o in outcomes if o not in (SKIP, "")]
    for bad in (WRONG, ERROR):
        if bad in counted:
            return bad
    if failure is not None:
        return failure
    if HANG in counted:
        return HANG
    if not counted:
        return SKIP
    if all(o == PASS for o in counted):
        return PASS
    if all(o == UNSUPPORTED for o in counted):
        return UNSUPPORTED
    return PARTIAL


@dataclasses.dataclass
class OpResult:
    """Every sample's outcome of one op on one library and world size."""

    op: str
    library: str
    world_size: int
    samples: list[SampleResult]
    total: int  # samples the OpInfo has
    failure: str | None = None  # HANG or ERROR: the task failed
    failure_detail: str = ""
    autograd: bool = True
    seconds: float = 0.0
    # The aten overloads the sharded forward sent to dispatch_shard, with the ops/ family
    # serving each ("missing" where none does).
    dispatched: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def forward(self) -> str:
        """The op's forward outcome: WRONG > ERROR > HANG > PASS / UNSUPPORTED / PARTIAL > SKIP."""
        return summarize([s.forward for s in self.samples], self.failure)

    @property
    def backward(self) -> str:
        """The same over the backward outcomes ("" when the op has no autograd)."""
        if not self.autograd:
            return ""
        outcomes = [s.backward for s in self.samples if s.backward is not None]
        if not outcomes and self.forward in (UNSUPPORTED, ERROR, HANG):
            return self.forward  # no forward, no backward
        return summarize(outcomes, self.failure)

    def count(self, outcome: str, backward: bool = False) -> int:
        return sum((s.backward if backward else s.forward) == outcome for s in self.samples)

    def problems(self) -> list[SampleResult]:
        """Samples that went WRONG or ERROR, forward or backward."""
        bad = (WRONG, ERROR)
        return [s for s in self.samples if s.forward in bad or s.backward in bad]

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op, "library": self.library, "world_size": self.world_size,
            "total": self.total, "failure": self.failure, "failure_detail": self.failure_detail,
            "autograd": self.autograd, "seconds": round(self.seconds, 3),
            "forward": self.forward, "backward": self.backward,
            "samples": [dataclasses.astuple(s) for s in self.samples],
            "dispatched": self.dispatched,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OpResult:
        return cls(data["op"], data["library"], data["world_size"],
                   [SampleResult(*s) for s in data["samples"]], data["total"],
                   data["failure"], data["failure_detail"], data["autograd"], data["seconds"],
                   data.get("dispatched", {}))


def run_op(op: Any, pool: RankPool, library: str = "dispatch_shard", *,
           max_samples: int | None = None, backward: bool = True, timeout_s: float = 300.0,
           seed: int = SEED, dtype: str = "float32") -> OpResult:
    """Run every sample of ``op`` (an OpInfo) on every rank of ``pool``, with samples of
    ``dtype`` (``"float32"`` or ``"complex64"``)."""
    key = op_key(op)
    result = OpResult(key, library, pool.world_size, [], 0,
                      autograd=bool(backward and op.supports_autograd))
    began = time.monotonic()
    start = 0
    retried = False
    while True:
        try:
            replies = pool.run(run_samples_on_rank, timeout_s=timeout_s, op=key,
                               library=library, start=start, max_samples=max_samples,
                               backward=backward, seed=seed, dtype=dtype)
        except RankFailure as exc:
            text = str(exc)
            if not retried and ("did not start" in text or "while starting" in text):
                retried = True  # a busy machine, not the op: one more try
                continue
            result.failure = HANG if "timed out" in text or "hung" in text else ERROR
            result.failure_detail = text[-4000:]
            break
        reply = replies[0]
        result.total = reply["total"]
        result.dispatched.update(reply["dispatched"])
        if reply["error"] is not None:
            result.failure_detail = reply["error"]
        stops = [r["stopped_at"] for r in replies if r["stopped_at"] is not None]
        stop = min(stops) if stops else None
        result.samples.extend(SampleResult(*s) for s in reply["samples"]
                              if stop is None or s[0] <= stop)
        if stop is None:
            break
        pool.stop()  # the ranks are out of step: a fresh pool for the rest
        start = stop + 1
    result.seconds = time.monotonic() - began
    return result


def run_ops(ops: Iterable[Any], pool: RankPool, library: str = "dispatch_shard", *,
            max_samples: int | None = None, backward: bool = True, timeout_s: float = 300.0,
            seed: int = SEED, progress: Callable[[OpResult], None] | None = None,
            dtype: str = "float32") -> list[OpResult]:
    """:func:`run_op` for each op, in order; ``progress`` is called after each."""
    results = []
    for op in ops:
        result = run_op(op, pool, library, max_samples=max_samples, backward=backward,
                        timeout_s=timeout_s, seed=seed, dtype=dtype)
        if progress is not None:
            progress(result)
        results.append(result)
    return results
