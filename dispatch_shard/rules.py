"""Declarative sharding rules: say how an op's dims map, the library does the rest.

A rule names each dim of each tensor argument and of each result, einsum-style::

    ds.register_sharding_rule(torch.ops.mylib.matmul.default, "m k, k n -> m n",
                              contract="sum")
    ds.register_sharding_rule(torch.ops.mylib.gelu.default, "pointwise")
    # (an elementwise op with several results too: each has the broadcast shape)
    ds.register_sharding_rule(torch.ops.mylib.row_max.default, "m n -> m", contract="max")
    # several results, separated by commas after '->': (values, indices) of a max
    ds.register_sharding_rule(torch.ops.mylib.max_dim.default, "m n -> m, m",
                              contract=("max", None))

Why this syntax: it is what an op author already knows about the op (which dims
are kept, which are contracted, which belong together) and nothing about layouts;
it reads like ``torch.einsum`` and JAX's ``custom_partitioning`` sharding rules,
so one line says what DTensor's per-strategy ``register_sharding`` lists case by
case. Several results read as a Python function's results do: ``"m n -> m, m"``.

What a rule promises: the op may run on blocks. A letter kept in a result means
the result's elements along it depend only on the inputs' elements at the same
position along it; a letter an input has and a result lacks is *contracted*, and
the result's ``contract`` (``"sum"``, ``"max"``, ``"min"``) combines the results of
blocks split along it. A result with no contract (None) is never pending: a letter
it contracts is never split (as for an index, or a value normalized over whole rows).

``contract`` is one reduction, or one entry per result. A single one applies to the
result that contracts letters; where several results contract letters it must be
given per result (``ValueError`` otherwise): ``("max", None)`` for a max's values
and indices says "the values could be a pending max, the indices cannot be pending"
(the maximum of per-block indices is not the index of the maximum), so a split of
the reduced dim is moved away before the op runs. An entry for a result that keeps
every letter must be None. Parse errors name what is wrong.

How an op with a rule runs, per rank (1-D layouts; on N-D layouts the same rule is
applied per mesh dim: NOTE [applying a rule per mesh dim] in dispatch_shard.mesh_rules):

- Partial arguments are reduced first (the safe default of every registration).
- The *split letter* is the rule's name for the dim along which the first
  chunk-sharded argument is split, if the rule can split it (every result keeps it,
  or contracts it with a reduction); if not, the largest letter of that argument
  every result keeps, its blocks moved there (one all-to-all; e.g. a max's input
  split along the reduced dim is moved to rows). Every argument with the split
  letter is laid out by the same chunks along it; every other tensor argument is
  replicated. Arguments already laid out so move nothing; others move once.
- A result that keeps the split letter is chunked the same way along its position:
  no collective. A result that contracts it is a :class:`~dispatch_shard.Partial`
  of its ``contract`` reduction (``"sum"`` for a matmul, ``"max"`` for a
  max-reduction): each rank combines its blocks' results; no collective until the
  value is needed.
- No argument split (replicated, or only enumerable grids, which are replicated
  first, or no letter the rule can split): the op runs on the whole value on every
  rank; the results are replicated.
- The op runs block by block: the k-th local block of every split argument, with
  the whole local value of the replicated ones. A rank without blocks runs none.
- The results' dtypes and sizes come from a meta run of the op on the global
  shapes, so ranks without blocks agree with those that have some. An op with
  several results returns a tuple of ShardedTensors, one per result.

Check a rule with :func:`dispatch_shard.testing.check_sharded_op`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from dispatch_shard import collectives
from dispatch_shard.authoring import meta_results, small_dense_call
from dispatch_shard.layout import layout_of
from dispatch_shard.registry import custom_sharded_op_impl, resolve_op
from dispatch_shard.sharded_tensor import ShardedTensor, _placement_device
from dispatch_shard.specs import ChunkShardingSpec, Partial, Replicate, ShardingSpec

__all__ = ["ShardingRule", "register_sharding_rule"]

_CONTRACTIONS = ("sum", "max", "min")

Letters = tuple[str, ...]
Contract = str | None


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """A parsed rule: the dim letters of each tensor argument and of each result, and
    each result's contraction.

    ``inputs`` and ``outputs`` are None for ``"pointwise"`` (every tensor argument has
    the result's shape, every dim kept). ``contracts`` has one entry per result (one for
    ``"pointwise"``): the reduction that combines that result's per-block values where a
    letter it does not keep is split, or None where the result can never be pending (a
    letter it contracts is then never split).
    """

    inputs: tuple[Letters, ...] | None
    outputs: tuple[Letters, ...] | None
    contracts: tuple[Contract, ...]

    @staticmethod
    def parse(text: str, contract: Contract | Sequence[Contract] = None) -> ShardingRule:
        """``"m k, k n -> m n"``, ``"m n -> m, m"`` (several results) or ``"pointwise"``;
        ``contract`` a reduction for every result that contracts a letter, or one entry
        per result. ``ValueError`` naming what is wrong."""
        if text.strip() == "pointwise":
            if contract is not None:
                raise ValueError("sharding rule 'pointwise': a pointwise op contracts no "
                                 f"dim, so it takes no contract (got {contract!r})")
            return ShardingRule(None, None, (None,))
        if text.count("->") != 1:
            raise ValueError(f"sharding rule {text!r}: expected 'inputs -> results', e.g. "
                             "'m k, k n -> m n', 'm n -> m, m', or 'pointwise'")
        left, right = text.split("->")
        inputs = tuple(tuple(part.split()) for part in left.split(","))
        outputs = tuple(() if part.strip() == "()" else tuple(part.split())
                        for part in right.split(","))  # ("()": a 0-dim result)
        for dims in (*inputs, *outputs):
            bad = [d for d in dims if not d.isidentifier()]
            if bad:
                raise ValueError(f"sharding rule {text!r}: {bad[0]!r} is not a dim name "
                                 "(names are letters or words, separated by spaces)")
            if len(set(dims)) != len(dims):
                raise ValueError(f"sharding rule {text!r}: a letter repeats within one "
                                 "tensor (diagonals are not expressible)")
        if len(outputs) > 1 and any(not part.strip() for part in right.split(",")):
            raise ValueError(f"sharding rule {text!r}: an empty result between commas; "
                             "a rule with several results names each one's dims ('()' "
                             "for a 0-dim result)")
        known = {d for dims in inputs for d in dims}
        for k, dims in enumerate(outputs):
            if not set(dims) <= known:
                which = "the result's" if len(outputs) == 1 else f"result {k}'s"
                raise ValueError(f"sharding rule {text!r}: {which} dims "
                                 f"{sorted(set(dims) - known)} appear in no input")
        return ShardingRule(inputs, outputs, _contracts(text, contract, known, outputs))

    def splittable(self, letter: str, outputs: Sequence[Letters]) -> bool:
        """Whether the op may run block by block with ``letter`` split: every result
        keeps it, or contracts it with a reduction (``outputs``: the results' letters)."""
        return all(letter in dims or contract is not None
                   for dims, contract in zip(outputs, self.contracts, strict=True))


def _contracts(text: str, contract: Contract | Sequence[Contract], known: set[str],
               outputs: tuple[Letters, ...]) -> tuple[Contract, ...]:
    """One contract per result: a single one applies to the one result that contracts
    letters; several results that contract letters need one each (ambiguous otherwise:
    the maximum of a max's values is right, the maximum of its indices is not)."""
    contracting = [k for k, dims in enumerate(outputs) if known - set(dims)]
    several = len(outputs) > 1
    if contract is None or isinstance(contract, str):
        if contract is None:
            return (None,) * len(outputs)
        if len(contracting) > 1:
            raise ValueError(
                f"sharding rule {text!r}: contract={contract!r} is ambiguous: results "
                f"{', '.join(map(str, contracting))} contract letters; give one "
                "per result, e.g. "
                f"contract=({contract!r}, None) (None: never pending, as indices)")
        given: tuple[Contract, ...] = tuple(contract if k in contracting else None
                                            for k in range(len(outputs)))
        if not contracting:
            given = (contract,) + (None,) * (len(outputs) - 1)
    else:
        given = tuple(contract)
        if len(given) != len(outputs):
            raise ValueError(f"sharding rule {text!r}: {len(given)} contracts for "
                             f"{len(outputs)} results; give one per result")
    for k, reduction in enumerate(given):
        if reduction is None:
            continue
        if reduction not in _CONTRACTIONS:
            raise ValueError(f"sharding rule {text!r}: contract must be one of "
                             f"{_CONTRACTIONS} or None, got {reduction!r}")
        if k not in contracting:
            which = "the result" if not several else f"result {k}"
            raise ValueError(f"sharding rule {text!r}: {which} "
                             f"({' '.join(outputs[k]) or 'a scalar'}) keeps every letter, "
                             f"so it contracts nothing: its contract must be None")
    return given


def register_sharding_rule(op: object, rule: str, *,
                           contract: Contract | Sequence[Contract] = None,
                           override: bool = False) -> ShardingRule:
    """Serve ``op`` (an aten or ``torch.library`` overload) by ``rule``; see the module
    docstring for the syntax and what runs. Returns the parsed rule.

    Raises:
        ValueError: the rule does not parse, or ``op`` already has an implementation
            and ``override`` is False.
        TypeError: ``op`` is not an overload.
    """
    op = resolve_op(op)  # (a torch.library.custom_op's CustomOpDef: its overload)
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"register_sharding_rule expects an op overload such as "
                        f"torch.ops.mylib.op.default, got {op!r}")
    parsed = for_op(ShardingRule.parse(rule, contract), op)

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
             op: object) -> list[Letters]:
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


def for_op(rule: ShardingRule, op: Any) -> ShardingRule:
    """``rule`` for ``op``'s calls: a ``"pointwise"`` rule gets one (empty) contract per
    result the op's schema declares (``"pointwise"`` serves an op with several results,
    each of the broadcast shape); other rules as they are."""
    if rule.inputs is not None:
        return rule
    schema = getattr(op, "_schema", None)
    count = max(len(schema.returns), 1) if schema is not None else 1
    return rule if count == len(rule.contracts) else dataclasses.replace(
        rule, contracts=(None,) * count)


def result_letters(rule: ShardingRule, letters: Sequence[Letters]) -> tuple[Letters, ...]:
    """The letters of each result (for ``"pointwise"``: the longest argument's, for each
    of its results: :func:`for_op`)."""
    if rule.outputs is not None:
        return rule.outputs
    return (max(letters, key=len),) * len(rule.contracts)


def _split_letter(args: Sequence[Any], positions: list[int], letters: list[Letters],
                  rule: ShardingRule, outputs: tuple[Letters, ...]
                  ) -> tuple[str, ChunkShardingSpec] | None:
    """The letter to run split, and the chunks it is split by: the first chunked
    argument's, or where the rule cannot split that one, the largest letter of that
    argument every result keeps (its blocks move once, all-to-all, instead of every rank
    gathering the whole); None where no argument is chunked."""
    for i, dims in zip(positions, letters, strict=True):
        value = args[i]
        if not isinstance(value, ShardedTensor):
            continue
        spec = value._layout.spec
        if not isinstance(spec, ChunkShardingSpec):
            continue
        letter = dims[spec.dim % value.dim()]
        if rule.splittable(letter, outputs):
            return letter, spec
        kept = [d for d in dims if all(d in out for out in outputs)]
        if kept:
            return max(kept, key=lambda d: value.shape[dims.index(d)]), spec
    return None


def _results(value: Any, count: int, op: object) -> tuple[torch.Tensor, ...]:
    """The op's return value as a tuple of ``count`` tensors (what its rule names)."""
    results = (value,) if isinstance(value, torch.Tensor) else tuple(value)
    if len(results) != count or not all(isinstance(r, torch.Tensor) for r in results):
        raise _count_error(op, len(results), count)
    return results


def _count_error(op: object, returned: int, count: int) -> ValueError:
    return ValueError(f"{op}: returns {returned} value(s), but its sharding rule names "
                      f"{count} result(s) (separate results by commas after '->', e.g. "
                      "'m n -> m, m')")


def _run(op: Any, rule: ShardingRule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    positions = _tensor_positions(args)
    sharded = [args[i] for i in positions if isinstance(args[i], ShardedTensor)]
    anchor = sharded[0]
    letters = _letters(rule, args, positions, op)
    outputs = result_letters(rule, letters)
    metas = result_metas(op, args, kwargs, positions, letters, outputs)
    split = _split_letter(args, positions, letters, rule, outputs)
    moved: dict[int, Any] = {}
    for i, dims in zip(positions, letters, strict=True):
        value = args[i]
        broadcast = rule.inputs is None and split is not None and split[0] in dims and \
            value.shape[dims.index(split[0])] != metas[0].shape[outputs[0].index(split[0])]
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

    def run_block(k: int | None) -> tuple[torch.Tensor, ...]:
        for i in positions:
            blocks = moved[i]._local_tensors
            call[i] = blocks[0] if moved[i]._layout.is_replicate else blocks[k]
        return _results(op(*call, **kwargs), len(outputs), op)

    if split is None:  # every argument replicated: the whole op on every rank
        whole = [run_block(None)] if moved[positions[0]]._local_tensors else []
        wrapped = tuple(_wrap(anchor, [r[n] for r in whole], Replicate(), meta)
                        for n, meta in enumerate(metas))
        return wrapped if len(outputs) > 1 else wrapped[0]
    letter, source = split
    first = next(i for i in positions if not moved[i]._layout.is_replicate)
    blocks_there = moved[first]._local_tensors
    along = letters[positions.index(first)].index(letter)
    # Where every result contracts the split letter, a block empty along it adds the
    # reduction's identity: it does not run (a max of no elements raises).
    contracted = all(letter not in dims for dims in outputs)
    per_block = [run_block(k) for k, block in enumerate(blocks_there)
                 if not (contracted and block.shape[along] == 0)]
    results = []
    for n, (dims, contract, meta) in enumerate(zip(outputs, rule.contracts, metas,
                                                   strict=True)):
        blocks = [r[n] for r in per_block]
        if letter in dims:
            out_spec = dataclasses.replace(source, dim=dims.index(letter))
            results.append(_wrap(anchor, blocks, out_spec, meta))
            continue
        # A contracted split letter: each rank combines its blocks' results into a term.
        assert contract is not None  # (_split_letter splits only what the rule can)
        results.append(_wrap(anchor, [_combined(blocks, contract, meta, anchor.device)],
                             Partial(contract), meta))
    return tuple(results) if len(outputs) > 1 else results[0]


def _combined(blocks: list[torch.Tensor], contract: str, meta: torch.Tensor,
              device: torch.device) -> torch.Tensor:
    """This rank's term of a pending ``contract`` reduction of its blocks' results (the
    reduction's identity on a rank without blocks)."""
    if not blocks:
        dtype = meta.dtype
        if contract == "sum":
            return torch.zeros(meta.shape, dtype=dtype, device=device)
        limits = (torch.finfo(dtype) if dtype.is_floating_point else
                  torch.iinfo(dtype))
        low, high = ((float("-inf"), float("inf")) if dtype.is_floating_point
                     else (limits.min, limits.max))
        return torch.full(meta.shape, low if contract == "max" else high, dtype=dtype,
                          device=device)
    combined = blocks[0]
    for extra in blocks[1:]:
        combined = (combined + extra if contract == "sum" else
                    torch.maximum(combined, extra) if contract == "max" else
                    torch.minimum(combined, extra))
    return combined


def result_metas(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 positions: list[int], letters: list[Letters],
                 outputs: tuple[Letters, ...]) -> list[torch.Tensor]:
    """Meta tensors with each result's size and dtype: from a meta run of the op, or,
    for an op with no meta kernel (a ``torch.library`` op without ``register_fake``),
    the sizes from the rule and the dtypes from a run on small stand-ins."""
    try:  # (NotImplementedError is a RuntimeError: an op without a meta kernel)
        results: list[tuple[torch.Size, torch.dtype]] | None = meta_results(op, args, kwargs)
    except RuntimeError:
        results = None
    if results is not None:
        if len(results) != len(outputs):
            raise _count_error(op, len(results), len(outputs))
        return [torch.empty(size, dtype=dtype, device="meta") for size, dtype in results]
    sizes: dict[str, int] = {}
    for i, dims in zip(positions, letters, strict=True):
        for letter, n in zip(dims, args[i].shape, strict=True):
            sizes[letter] = max(sizes.get(letter, n), n)
    dtypes = [r.dtype for r in _results(small_dense_call(op, args, kwargs), len(outputs), op)]
    return [torch.empty([sizes[letter] for letter in dims], dtype=dtype, device="meta")
            for dims, dtype in zip(outputs, dtypes, strict=True)]


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
