"""Check a sharded op registration against the dense op, on many layouts and world sizes.

:func:`check_sharded_op` runs the op on ShardedTensor copies of a dense sample, laid
out every way below, on the persistent rank pool (world sizes 1-4 by default), and
compares the value and the gradient of every floating argument with the dense op's:

========== ===========================================================================
layout     what it is (applied to every floating tensor argument it fits)
========== ===========================================================================
rows       ``torch.chunk`` of dim 0 over the ranks (uneven where sizes don't divide)
cols       the same along the last dim (arguments of 2+ dims)
several    two blocks per rank along dim 0, in a shuffled rank order
empty      more blocks than rows: trailing blocks are empty
grid       a 2x2 grid of uneven blocks (an enumerable spec; arguments of 2+ dims)
replicate  every rank holds the whole value
partial    every rank holds a different summand; the value is their sum
mesh       on a 2x2 device mesh (4 ranks only): ``(Shard(0), Shard(-1))`` for
           arguments of 2+ dims, ``(Shard(0), Replicate())`` for 1-D ones
mesh-dp    on a 2x2 mesh: ``(Partial(), Shard(0))``, a data-parallel replica
           holding summands and split within (4 ranks only)
========== ===========================================================================

Integer and bool arguments (indices, masks) are replicated. An op with several
results (a tuple) is compared result by result (integer ones exactly), and its
backward weights every floating result. Use it in your tests::

    def sample():  # module level: the ranks import it by name
        return (torch.randn(5, 4, dtype=torch.float64),), {}

    def test_my_op():
        check_sharded_op(torch.ops.mylib.my_op.default, sample)

The module defining ``sample`` is imported on every rank, so the op's
``torch.library`` definition and its sharded registration, if they live there, are
made on every rank too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from dispatch_shard.testing.pool import _resolve

__all__ = ["LAYOUTS", "check_sharded_op"]

LAYOUTS = ("rows", "cols", "several", "empty", "grid", "replicate", "partial", "mesh",
           "mesh-dp")


def check_sharded_op(op: Any, sample: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]],
                     *, world_sizes: Sequence[int] = (1, 2, 3, 4),
                     layouts: Sequence[str] = LAYOUTS, backward: bool = True,
                     timeout_s: float = 120.0) -> dict[tuple[int, str], str]:
    """Run ``op`` on every layout of ``sample()``'s tensors at every world size and compare
    with the dense op, forward and (``backward=True``) backward.

    ``op`` is an op overload or a torch-level function; ``sample`` a module-level
    function returning ``(args, kwargs)`` of dense tensors (the same on every call).
    Returns ``{(world_size, layout): "ok" | "skipped: why"}``.

    It starts rank processes (spawned): call it from pytest or a plain ``python`` script
    (under ``if __name__ == "__main__":``), not under torchrun.

    Raises:
        AssertionError: listing every (world size, layout) whose value or gradient
            differs from dense, or that raised, with the error.
        TypeError: ``sample`` is not a module-level function (the rank processes
            import it by name).
        ValueError: an unknown layout, or ``sample()`` returns different values on
            two calls (an unseeded ``torch.randn``: each rank would draw its own).
    """
    from dispatch_shard.registry import resolve_op
    from dispatch_shard.testing.pool import get_pool  # (the pool module is light; kept local)

    op = resolve_op(op)
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"check_sharded_op: unknown layouts {unknown}; known: {LAYOUTS}")
    if "<" in sample.__qualname__:  # a lambda, or a function defined inside another
        raise TypeError(f"check_sharded_op: sample must be a module-level function (the "
                        f"rank processes import it by name), got {sample.__qualname__}")
    first, second = sample(), sample()
    if not _same_samples(first, second):
        raise ValueError("check_sharded_op: sample() returned different values on two "
                         "calls; draw from a seeded torch.Generator (every rank calls it "
                         "and must get the same tensors)")
    summary: dict[tuple[int, str], str] = {}
    failures: list[str] = []
    for world_size in world_sizes:
        outcomes = get_pool(world_size).run(
            _check_on_rank, timeout_s=timeout_s, op=_op_ref(op),
            sample=(sample.__module__, sample.__qualname__), layouts=list(layouts),
            backward=backward)
        for layout, outcome in outcomes[0]:  # every rank compares the same whole values
            summary[(world_size, layout)] = outcome
            if outcome not in ("ok",) and not outcome.startswith("skipped"):
                failures.append(f"world {world_size}, layout {layout}: {outcome}")
    if failures:
        raise AssertionError(f"{_op_ref(op)}: the sharded op differs from dense:\n  "
                             + "\n  ".join(failures))
    return summary


def _same_samples(first: Any, second: Any) -> bool:
    flat_first, flat_second = pytree.tree_leaves(first), pytree.tree_leaves(second)
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and a.dtype == b.dtype and bool(
                ((a == b) | (a != a) & (b != b)).all())  # (NaN where NaN)
        return type(a) is type(b) and bool(a == b or (a != a and b != b))

    return len(flat_first) == len(flat_second) and all(
        same(a, b) for a, b in zip(flat_first, flat_second, strict=True))


def _op_ref(op: Any) -> str:
    if isinstance(op, torch._ops.OpOverload):
        return f"overload:{op._schema.name}.{op._overloadname or 'default'}"
    return f"function:{op.__module__}.{op.__qualname__}"


def _resolve_op(ref: str) -> Any:
    kind, name = ref.split(":", 1)
    if kind == "overload":
        qualified, overload = name.rsplit(".", 1)
        namespace, op_name = qualified.split("::")
        return getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
    module, _, qualname = name.rpartition(".")
    return _resolve(module, qualname)


def _spec_for(layout: str, value: torch.Tensor, world_size: int) -> Any:
    """The sharding spec of ``layout`` for ``value``, or None where it does not fit."""
    import dispatch_shard as ds

    ranks = list(range(world_size))

    def chunk(dim: int, order: list[int]) -> Any:
        return ds.ChunkShardingSpec(dim, [f"rank:{r}/cpu" for r in order])

    if layout.startswith("mesh"):
        if world_size != 4:
            return None
        from torch.distributed.tensor import Partial, Replicate, Shard

        if layout == "mesh-dp":
            return (Partial(), Shard(0)) if value.dim() else None
        if value.dim() == 0:
            return None
        return (Shard(0), Shard(value.dim() - 1) if value.dim() >= 2 else Replicate())
    if layout == "replicate":
        return ds.Replicate()
    if layout == "partial":
        return ds.Partial()
    if value.dim() == 0:
        return None
    if layout == "rows":
        return chunk(0, ranks)
    if layout == "cols":
        return chunk(value.dim() - 1, ranks) if value.dim() >= 2 else None
    if layout == "several":
        return chunk(0, [(3 * i + 1) % world_size for i in range(2 * world_size)])
    if layout == "empty":
        return chunk(0, [i % world_size for i in range(value.shape[0] + 2)])
    if layout == "grid":
        if value.dim() < 2 or value.shape[0] < 2 or value.shape[1] < 2:
            return None
        top, left = value.shape[0] // 2 + value.shape[0] % 2, value.shape[1] // 3 + 1
        rest = list(value.shape[2:])
        boxes = [((0, 0), (top, left)), ((0, left), (top, value.shape[1] - left)),
                 ((top, 0), (value.shape[0] - top, left)),
                 ((top, left), (value.shape[0] - top, value.shape[1] - left))]
        return ds.EnumerableShardingSpec([
            ds.ShardMetadata([*offsets, *[0] * len(rest)], [*sizes, *rest],
                             f"rank:{i % world_size}/cpu")
            for i, (offsets, sizes) in enumerate(boxes)])
    raise AssertionError(layout)


def _sharded(value: torch.Tensor, spec: Any, rank: int, world_size: int,
             backward: bool, ds: Any) -> tuple[Any, Any]:
    """The argument laid out by ``spec``, and the leaf its gradient reaches (None when
    ``backward`` is False)."""
    if isinstance(spec, tuple):  # placements on a 2x2 mesh
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Partial, Replicate

        mesh = init_device_mesh("cpu", (2, 2))
        pending = any(isinstance(p, Partial) for p in spec)
        whole = [Replicate() if isinstance(p, Partial) else p for p in spec]
        leaf = ds.distribute_tensor(value, mesh, whole if pending else list(spec))
        leaf.requires_grad_(backward)
        # (a Partial placement: the value on one term's ranks, zeros on the others')
        return (leaf.redistribute(mesh, list(spec)) if pending else leaf,
                leaf if backward else None)
    if isinstance(spec, ds.Partial):  # unequal summands that add up to the value
        weight = (rank + 1) / (world_size * (world_size + 1) / 2)
        argument = ds.ShardedTensor.from_local_tensor(value * weight, spec, *value.shape)
        if not backward:
            return argument, None
        # Summands are made below autograd: the gradient reaches a replicated leaf
        # through (source - source.detach()) as a Partial, which adds zero to the
        # summands (Partial + Partial of one layout stays Partial).
        source = ds.ShardedTensor.from_replicated(value, ds.Replicate()).requires_grad_()
        argument = argument + (source - source.detach()).redistribute(ds.Partial())
        assert isinstance(argument.sharding_spec(), ds.Partial), argument.sharding_spec()
        return argument, source
    leaf = ds.ShardedTensor.from_replicated(value, spec).requires_grad_(backward)
    return leaf, leaf if backward else None


def _check_on_rank(rank: int, world_size: int, op: str, sample: tuple[str, str],
                   layouts: list[str], backward: bool) -> list[tuple[str, str]]:
    make = _resolve(*sample)
    func = _resolve_op(op)
    import dispatch_shard as ds

    outcomes = []
    for layout in layouts:
        args, kwargs = make()
        try:
            outcomes.append((layout, _check_one(func, args, kwargs, layout, rank, world_size,
                                                backward, ds)))
        except Exception as error:  # reported, not raised: the other layouts still run
            outcomes.append((layout, f"raised {type(error).__name__}: {error}"))
    return outcomes


def _tensors(value: Any) -> list[Any]:
    """An op's tensor results, in order (a single tensor, or those in a tuple/list)."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [v for v in value if isinstance(v, torch.Tensor)]


def _check_one(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], layout: str,
               rank: int, world_size: int, backward: bool, ds: Any) -> str:
    floating = [i for i, a in enumerate(args)
                if isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex())]
    specs = {i: _spec_for(layout, args[i], world_size) for i in floating}
    if not floating or all(s is None for s in specs.values()):
        why = "needs 4 ranks (a 2x2 mesh)" if layout.startswith("mesh") else \
            "no floating argument fits this layout"
        return f"skipped: {why}"
    dense_args = [a.clone().requires_grad_(backward) if i in floating else a
                  for i, a in enumerate(args)]
    expected = _tensors(func(*dense_args, **kwargs))
    leaves: dict[int, Any] = {}
    sharded_args = list(args)
    for i in floating:
        spec = specs[i] if specs[i] is not None else ds.Replicate()
        sharded_args[i], leaf = _sharded(args[i], spec, rank, world_size, backward, ds)
        if leaf is not None:
            leaves[i] = leaf
    results = _tensors(func(*sharded_args, **kwargs))
    if len(results) != len(expected):
        return f"returned {len(results)} tensors where dense returns {len(expected)}"
    weighted = []
    for n, (result, dense) in enumerate(zip(results, expected, strict=True)):
        value = result.full_tensor() if isinstance(result, ds.ShardedTensor) else result
        which = "" if len(expected) == 1 else f"result {n}: "
        try:
            torch.testing.assert_close(value, dense.detach())
        except AssertionError as error:
            return f"{which}forward differs: {error}"
        if dense.requires_grad and (dense.is_floating_point() or dense.is_complex()):
            weight = torch.randn(dense.shape, generator=torch.Generator().manual_seed(7 + n),
                                 dtype=dense.dtype)
            weighted.append((result, dense, weight))
    if not backward or not weighted:
        return "ok"
    grads = torch.autograd.grad(sum((d * w).sum() for _, d, w in weighted),
                                [dense_args[i] for i in leaves], allow_unused=True)
    sum((r * w).sum() for r, _, w in weighted).backward()
    for (i, leaf), grad in zip(leaves.items(), grads, strict=True):
        got = None if leaf.grad is None else leaf.grad.full_tensor()
        if grad is None and got is None:
            continue
        try:
            torch.testing.assert_close(got, grad)
        except AssertionError as error:
            return f"gradient of argument {i} differs: {error}"
    return "ok"
