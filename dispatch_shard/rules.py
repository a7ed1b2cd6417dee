"""Declarative sharding rules: say how an op's dims map, the library does the rest.

A rule names each dim of each tensor argument and of the result, einsum-style::

    ds.register_sharding_rule(torch.ops.mylib.matmul.default, "m k, k n -> m n",
                              contract="sum")
    ds.register_sharding_rule(torch.ops.mylib.gelu.default, "pointwise")
    ds.register_sharding_rule(torch.ops.mylib.row_max.default, "m n -> m", contract="max")

Why this syntax: it is what an op author already knows about the op (which dims
are kept, which are contracted, which belong together) and nothing about layouts;
it reads like ``torch.einsum`` and JAX's ``custom_partitioning`` sharding rules,
so one line says what DTensor's per-strategy ``register_sharding`` lists case by
case.

How an op with a rule runs, per rank (1-D layouts; on N-D layouts the same rule is
applied per mesh dim: NOTE [applying a rule per mesh dim] in dispatch_shard.mesh_rules):

- Partial arguments are reduced first (the safe default of every registration).
- The *split letter* is the rule's name for the dim along which the first
  chunk-sharded argument is split. Every argument with that letter is laid out
  by the same chunks along it; every other tensor argument is replicated.
  Arguments already laid out so move nothing; others move once (an all-to-all).
- A letter kept in the result gives a result chunked the same way along its
  position: no collective. A contracted letter (absent from the result) gives a
  :class:`~dispatch_shard.Partial` result of the rule's ``contract`` reduction
  (``"sum"`` for a matmul, ``"max"`` for a max-reduction): each rank combines its
  blocks' results; no collective until the value is needed. A rule without
  ``contract`` never splits a contracted letter: such inputs are replicated.
- No argument split (replicated, or only enumerable grids, which are replicated
  first): the op runs on the whole value on every rank; the result is replicated.
- The op runs block by block: the k-th local block of every split argument, with
  the whole local value of the replicated ones. A rank without blocks runs none.
- The result's dtype and size come from a meta run of the op on the global
  shapes, so ranks without blocks agree with those that have some.

Check a rule with :func:`dispatch_shard.testing.check_sharded_op`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from dispatch_shard import collectives
from dispatch_shard.layout import layout_of
from dispatch_shard.ops._common import meta_results
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor, _placement_device
from dispatch_shard.specs import ChunkShardingSpec, Partial, Replicate, ShardingSpec

__all__ = ["ShardingRule", "register_sharding_rule"]

_CONTRACTIONS = ("sum", "max", "min")


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """A parsed rule: the dim letters of each tensor argument and of the result.

    ``inputs`` is None for ``"pointwise"`` (every tensor argument has the result's
    shape, every dim kept).
    """

    inputs: tuple[tuple[str, ...], ...] | None
    output: tuple[str, ...] | None
    contract: str | None

    @staticmethod
    def parse(text: str, contract: str | None = None) -> ShardingRule:
        """``"m k, k n -> m n"`` or ``"pointwise"``; ``ValueError`` naming what is wrong."""
        if contract is not None and contract not in _CONTRACTIONS:
            raise ValueError(f"sharding rule: contract must be one of {_CONTRACTIONS}, "
                             f"got {contract!r}")
        if text.strip() == "pointwise":
            return ShardingRule(None, None, contract)
        if text.count("->") != 1:
            raise ValueError(f"sharding rule {text!r}: expected 'inputs -> output', e.g. "
                             "'m k, k n -> m n', or 'pointwise'")
        left, right = text.split("->")
        inputs = tuple(tuple(part.split()) for part in left.split(","))
        output = tuple(right.split())
        for dims in (*inputs, output):
            if len(set(dims)) != len(dims):
                raise ValueError(f"sharding rule {text!r}: a letter repeats within one "
                                 "tensor (diagonals are not expressible)")
        known = {d for dims in inputs for d in dims}
        if not set(output) <= known:
            raise ValueError(f"sharding rule {text!r}: the result's dims "
                             f"{sorted(set(output) - known)} appear in no input")
        return ShardingRule(inputs, output, contract)


def register_sharding_rule(op: object, rule: str, *, contract: str | None = None,
                           override: bool = False) -> ShardingRule:
    """Serve ``op`` (an aten or ``torch.library`` overload) by ``rule``; see the module
    docstring for the syntax and what runs. Returns the parsed rule.

    Raises:
        ValueError: the rule does not parse, or ``op`` already has an implementation
            and ``override`` is False.
        TypeError: ``op`` is not an overload.
    """
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"register_sharding_rule expects an op overload such as "
                        f"torch.ops.mylib.op.default, got {op!r}")
    parsed = ShardingRule.parse(rule, contract)

    def by_rule(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                process_group: Any) -> Any:
        return _run(op, parsed, args, kwargs)

    by_rule.__name__ = by_rule.__qualname__ = f"rule {rule!r}"
    custom_sharded_op_impl(op, override=override)(by_rule)
    from dispatch_shard.mesh_rules import mesh_rule  # (imports this module)

    mesh_rule(op, parsed)  # N-D operands: the same rule, per mesh dim
    return parsed


# -- running an op by its rule ------------------------------------------------------------

def _tensor_positions(args: Sequence[Any]) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


def _letters(rule: ShardingRule, args: Sequence[Any], positions: list[int],
             op: object) -> list[tuple[str, ...]]:
    if rule.inputs is None:  # pointwise: letters of the result's dims, right-aligned
        ndim = max(args[i].dim() for i in positions)
        names = tuple(f"d{j}" for j in range(ndim))
        return [names[ndim - args[i].dim():] for i in positions]
    if len(rule.inputs) != len(positions):
        raise ValueError(f"{op}: its sharding rule names {len(rule.inputs)} tensor "
                         f"arguments, but the call passes {len(positions)}")
    for dims, i in zip(rule.inputs, positions, strict=True):
        if len(dims) != args[i].dim():
            raise ValueError(f"{op}: its sharding rule gives argument {i} the dims "
                             f"{' '.join(dims)}, but it has {args[i].dim()} dims")
    return list(rule.inputs)


def _split_letter(args: Sequence[Any], positions: list[int],
                  letters: list[tuple[str, ...]], rule: ShardingRule,
                  output: tuple[str, ...]) -> tuple[str, ChunkShardingSpec] | None:
    for i, dims in zip(positions, letters, strict=True):
        value = args[i]
        if not isinstance(value, ShardedTensor):
            continue
        spec = value._layout.spec
        if isinstance(spec, ChunkShardingSpec):
            letter = dims[spec.dim % value.dim()]
            if letter in output or rule.contract is not None:
                return letter, spec
    return None


def _run(op: Any, rule: ShardingRule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    positions = _tensor_positions(args)
    sharded = [args[i] for i in positions if isinstance(args[i], ShardedTensor)]
    anchor = sharded[0]
    letters = _letters(rule, args, positions, op)
    output = rule.output if rule.output is not None else letters[
        max(range(len(positions)), key=lambda k: len(letters[k]))]
    meta = _result_meta(op, args, kwargs, positions, letters, output)
    split = _split_letter(args, positions, letters, rule, output)
    moved: dict[int, Any] = {}
    for i, dims in zip(positions, letters, strict=True):
        value = args[i]
        broadcast = rule.inputs is None and split is not None and split[0] in dims and \
            value.shape[dims.index(split[0])] != meta.shape[output.index(split[0])]
        if split is not None and split[0] in dims and not broadcast:
            letter, source = split
            if rule.inputs is not None:
                others = [args[j].shape[letters[k].index(letter)]
                          for k, j in enumerate(positions) if letter in letters[k]]
                if len(set(others)) != 1:
                    raise ValueError(f"{op}: dim {letter!r} has sizes {others} across the "
                                     "arguments; a sharding rule needs equal sizes")
            target: ShardingSpec = dataclasses.replace(source, dim=dims.index(letter))
        else:
            target = Replicate()
        if not isinstance(value, ShardedTensor):  # a plain tensor: the same on every rank
            with collectives.unchecked_creation():
                value = ShardedTensor.from_replicated(value, target, anchor.process_group)
        elif value._layout.spec != target:
            value = value._redistributed(target)
        moved[i] = value
    call = list(args)

    def run_block(k: int | None) -> torch.Tensor:
        for i in positions:
            blocks = moved[i]._local_tensors
            call[i] = blocks[0] if moved[i]._layout.is_replicate else blocks[k]
        result: torch.Tensor = op(*call, **kwargs)
        return result

    if split is None:  # every argument replicated: the whole op on every rank
        blocks = [run_block(None)] if moved[positions[0]]._local_tensors else []
        return _wrap(anchor, blocks, Replicate(), meta)
    letter, source = split
    count = max(len(moved[i]._local_tensors) for i in positions
                if not moved[i]._layout.is_replicate)
    results = [run_block(k) for k in range(count)]
    if letter in output:
        out_spec = dataclasses.replace(source, dim=output.index(letter))
        return _wrap(anchor, results, out_spec, meta)
    # A contracted split letter: each rank combines its blocks' results into a summand.
    contract = rule.contract
    assert contract is not None
    if results:
        combined = results[0]
        for extra in results[1:]:
            combined = (combined + extra if contract == "sum" else
                        torch.maximum(combined, extra) if contract == "max" else
                        torch.minimum(combined, extra))
    else:
        fill = {"sum": 0.0, "max": float("-inf"), "min": float("inf")}[contract]
        combined = torch.full(meta.shape, fill, dtype=meta.dtype, device=anchor.device)
    return _wrap(anchor, [combined], Partial(contract), meta)


def _result_meta(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], positions: list[int],
                 letters: list[tuple[str, ...]], output: tuple[str, ...]) -> torch.Tensor:
    """A meta tensor with the result's size and dtype: from a meta run of the op, or,
    for an op with no meta kernel (a ``torch.library`` op without ``register_fake``),
    the size from the rule and the dtype from a run on one-element stand-ins."""
    try:  # (NotImplementedError is a RuntimeError: an op without a meta kernel)
        results: list[tuple[torch.Size, torch.dtype]] | None = meta_results(op, args, kwargs)
    except RuntimeError:
        results = None
    if results is not None:
        if len(results) != 1:
            raise NotImplementedError(f"{op}: sharding rules serve ops with one tensor result")
        size, dtype = results[0]
        meta = torch.empty(size, dtype=dtype, device="meta")
    else:
        sizes: dict[str, int] = {}
        for i, dims in zip(positions, letters, strict=True):
            for letter, n in zip(dims, args[i].shape, strict=True):
                sizes[letter] = max(sizes.get(letter, n), n)
        stand_ins = [torch.zeros([min(n, 1) for n in a.shape], dtype=a.dtype)
                     if isinstance(a, torch.Tensor) else a for a in args]
        dtype = op(*stand_ins, **kwargs).dtype
        meta = torch.empty([sizes[letter] for letter in output], dtype=dtype, device="meta")
    return meta


def _wrap(anchor: ShardedTensor, blocks: list[torch.Tensor], spec: ShardingSpec,
          meta: torch.Tensor) -> ShardedTensor:
    layout = layout_of(spec, meta.shape, anchor._layout.group_ranks,
                       str(_placement_device(anchor._layout)))
    expected = [list(layout.shards[i].shard_sizes) for i in layout.local_indices(anchor._rank)]
    if [list(b.shape) for b in blocks] != expected:
        raise ValueError(
            f"sharding rule: the op's blocks have sizes {[list(b.shape) for b in blocks]}, "
            f"but its result laid out by {spec!r} has blocks of sizes {expected}: the rule "
            "does not describe the op"
        )
    return anchor._like(blocks, layout, meta.dtype)
