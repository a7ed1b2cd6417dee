"""Ops on N-D layouts by their sharding rules, mesh dim by mesh dim.

An op with an einsum-style rule (:mod:`dispatch_shard.rules`: ``"m k, k n -> m n"``,
``"pointwise"``) runs on N-D operands without flattening them: the rule is applied to
each mesh dim on its own, as DTensor's and JAX's sharding propagation do, and the
result keeps an N-D layout. The built-in matrix products, transposes, pointwise ops
(with broadcasting) and sums are served so; a user's rule too.

NOTE [applying a rule per mesh dim]
For each mesh dim, each operand's placement there names one of its rule letters
(``Shard(d)``: the letter of dim ``d``), none (``Replicate``) or a pending reduction:

* A pending reduction on that mesh dim is done first (the terms meet on the
  sub-groups along that dim).
* No letter split: the result is replicated on that mesh dim.
* One letter ``L`` split: every operand with ``L`` (not broadcast) is split by ``L``
  there (a copy is cut further: no data moves), every other operand is replicated
  there (gathered along that mesh dim if it was split by another letter).
* Several letters split: the one whose choice moves and holds the fewest elements
  stays split (its cost: the operands gathered, plus what each rank then holds of
  the result), the other operands are gathered along that mesh dim.
* The result is split by ``L`` where the rule keeps it, or holds a pending
  ``contract`` reduction where the rule contracts it (a rule without ``contract``
  gathers ``L`` instead).

Operands split by one letter on the same mesh dims are cut alike (nested chunks in
mesh-dim order of equal sizes), so every rank then runs the op once, on its blocks,
and its result is its block of the result. A call this cannot serve (an operand in a
1-D layout that names no mesh, an op whose result does not fit the rule) returns None
and is served flattened (NOTE [serving N-D operands] in dispatch_shard.holders).

Per rank: one redistribution per operand that is not yet laid out as needed (an
all-gather or reduce over one mesh dim's peers, nothing for a cut), one op call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# The built-in implementations register first: a mesh rule belongs to the implementation
# its op has when the rule is given (``mesh_rule``), so the rules below need them there.
from dispatch_shard import collectives, ops  # noqa: F401
from dispatch_shard.layout import layout_of
from dispatch_shard.registry import OVERLOADS, PACKETS
from dispatch_shard.rules import Letters, ShardingRule
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import (
    MeshPlacement,
    MeshShardingSpec,
    Partial,
    Replicate,
    mesh_sharding_spec,
)

__all__ = ["MESH_RULES", "mesh_rule", "run"]

aten = torch.ops.aten

# An op's rule for N-D operands: a ShardingRule, or a function of the call's arguments
# that returns one (a transpose's rule depends on its dims), or None to decline. Each
# belongs to the implementation the op had when the rule was given: it serves only
# while that implementation is registered (an override by a user's own takes over).
RuleFor = ShardingRule | Callable[[tuple[Any, ...], dict[str, Any]], ShardingRule | None]
MESH_RULES: dict[Any, tuple[RuleFor, Any]] = {}

_REPLICATE: MeshPlacement = ("replicate", 0)


def mesh_rule(op: Any, rule: RuleFor) -> None:
    """Serve ``op``'s calls with N-D operands by ``rule``, mesh dim by mesh dim, while its
    current implementation stays registered."""
    MESH_RULES[op] = (rule, _implementation(op))


def _implementation(op: Any) -> Any:
    return OVERLOADS.get(op) or PACKETS.get(op.overloadpacket)


def current(table: dict[Any, tuple[Any, Any]], op: Any) -> Any:
    """``op``'s entry of ``table`` (a rule or a handler) if its implementation is still
    the one registered, else None."""
    entry = table.get(op)
    if entry is None or entry[1] is not _implementation(op):
        return None
    return entry[0]


Mesh = tuple[tuple[int, ...], tuple[int, ...]]  # (shape, row-major global ranks)


def _mesh_of(args: Sequence[Any]) -> Mesh | None:
    for value in args:
        if isinstance(value, ShardedTensor):
            spec = value._layout.spec
            if isinstance(spec, MeshShardingSpec):
                return spec.mesh_shape, spec.mesh_ranks
    return None


def _placements(value: Any, mesh: Mesh) -> tuple[MeshPlacement, ...] | None:
    """``value``'s placements on ``mesh``, or None when its layout names no such form."""
    shape, ranks = mesh
    if not isinstance(value, ShardedTensor):
        return (_REPLICATE,) * len(shape)  # a plain tensor: the same on every rank
    layout = value._layout
    if sorted(layout.group_ranks) != sorted(ranks):
        return None
    spec = layout.spec
    if isinstance(spec, MeshShardingSpec):
        if (spec.mesh_shape, spec.mesh_ranks) == mesh and all(
                kind != "spec" for kind, _ in spec.placements):
            return spec.placements
        return None  # (a 1-D spec on a mesh dim: served flattened)
    if isinstance(spec, Replicate):
        return (_REPLICATE,) * len(shape)
    if isinstance(spec, Partial):
        return (("partial", spec.reduce_op),) * len(shape)
    return None  # a 1-D layout: on no mesh


def _letters(rule: ShardingRule, tensors: list[Any], out_shape: torch.Size
             ) -> tuple[list[tuple[str | None, ...]], tuple[Letters, ...]] | None:
    """Each operand's letter per dim (None: a broadcast dim, never split), and each
    result's letters."""
    if rule.inputs is None:  # pointwise: the result's dims, right-aligned
        ndim = len(out_shape)
        names = _names(ndim)
        letters = []
        for t in tensors:
            lead = ndim - t.dim()
            letters.append(tuple(names[lead + d] if t.shape[d] == out_shape[lead + d]
                                 else None for d in range(t.dim())))
        return letters, (names,) * len(rule.contracts)  # (one per result: rules.for_op)
    if len(rule.inputs) != len(tensors) or rule.outputs is None or any(
            len(dims) != t.dim() for dims, t in zip(rule.inputs, tensors, strict=True)):
        return None
    return [tuple(dims) for dims in rule.inputs], rule.outputs


def _cheapest(split: dict[int, str], sizes: list[int], rule: ShardingRule,
              outputs: tuple[Letters, ...], out_numels: list[int], parts: int) -> str | None:
    """The letter to keep split along one mesh dim of ``parts`` ranks (None: none).

    Each candidate costs the elements of the operands it gathers (split by another
    letter), plus what each rank then holds of the results: a ``parts``-th where the
    letter is kept, all of it where a result is replicated, and twice that where it
    is a pending reduction (still to come). So a weight-sized result (a weight's
    gradient) is kept split, and small activations move instead. A letter that a
    result contracts with no reduction (an index) is no candidate.
    """
    def cost(letter: str | None) -> tuple[float, int]:
        moved = sum(sizes[k] for k, other in split.items() if other != letter)
        held = 0.0
        for dims, numel in zip(outputs, out_numels, strict=True):
            if letter is not None and letter in dims:
                held += numel / parts
            elif letter is not None:
                held += 2 * numel
            else:
                held += numel
        return moved + held, -max((sizes[k] for k, o in split.items() if o == letter),
                                  default=0)

    candidates: list[str | None] = [letter for letter in dict.fromkeys(split.values())
                                    if rule.splittable(letter, outputs)]
    return min([*candidates, None], key=cost)


def run(op: Any, rule: ShardingRule, args: tuple[Any, ...], kwargs: dict[str, Any],
        metas: Sequence[torch.Tensor]) -> Any:
    """``op(*args, **kwargs)`` by ``rule`` per mesh dim (NOTE [applying a rule per mesh
    dim]); ``metas`` has each result's size and dtype. Its result (a tuple of them where
    the rule names several), or None where it cannot serve."""
    mesh = _mesh_of(args)
    if mesh is None or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return None
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    tensors = [args[i] for i in positions]
    found = _letters(rule, tensors, metas[0].shape)
    if found is None:
        return None
    letters, outputs = found
    placements = [_placements(t, mesh) for t in tensors]
    if any(p is None for p in placements):
        return None
    shape, ranks = mesh
    sizes = [t.numel() for t in tensors]
    targets: list[list[MeshPlacement]] = [[_REPLICATE] * len(shape) for _ in tensors]
    results: list[list[MeshPlacement]] = [[] for _ in outputs]
    moves_elements = op in _MOVES_ELEMENTS and len(tensors) == 1
    for dim in range(len(shape)):
        kind, arg = placements[0][dim]  # type: ignore[index]
        if moves_elements and kind == "partial" and (arg in ("sum", "avg") or
                                                     op not in _SUMS):
            # A view or a sum of a value pending on this mesh dim: the same op of each
            # term, still pending (reduced once, where the value is needed).
            targets[0][dim] = (kind, arg)
            results[0].append((kind, arg))
            continue
        split: dict[int, str] = {}  # operand -> the letter it is split by here
        for k, placed in enumerate(placements):
            kind, arg = placed[dim]  # type: ignore[index]
            letter = letters[k][int(arg)] if kind == "shard" else None
            if letter is not None:
                split[k] = letter
        letter = _cheapest(split, sizes, rule, outputs, [m.numel() for m in metas],
                           shape[dim]) if split else None
        for k in range(len(tensors)):
            if letter is not None and letter in letters[k]:
                targets[k][dim] = ("shard", letters[k].index(letter))
        for placed_result, dims, contract in zip(results, outputs, rule.contracts,
                                                 strict=True):
            placed_result.append(_REPLICATE if letter is None else
                                 ("shard", dims.index(letter)) if letter in dims else
                                 ("partial", contract))
    if moves_elements and len({arg for kind, arg in results[0] if kind == "partial"}) > 1:
        # A sum of a mean pending on one mesh dim, split along the summed dim on
        # another: one layout holds one kind of pending reduction, so the mean is
        # reduced first (along its own mesh dim only).
        for dim, (kind, arg) in enumerate(targets[0]):
            if kind == "partial" and arg != rule.contracts[0]:
                targets[0][dim] = results[0][dim] = _REPLICATE
    anchor = next(t for t in tensors if isinstance(t, ShardedTensor))
    device = anchor._layout.device or str(anchor.device)
    call = list(args)
    for k, (i, value) in enumerate(zip(positions, tensors, strict=True)):
        call[i] = _relaid(value, mesh, targets[k], anchor)  # (one block per rank of a mesh)
    layouts = [layout_of(mesh_sharding_spec(shape, ranks, placed, meta.shape, device),
                         meta.shape, anchor._layout.group_ranks, device)
               for placed, meta in zip(results, metas, strict=True)]
    expected = [layout.shards[layout.local_indices(anchor._rank)[0]].shard_sizes
                for layout in layouts]
    if op in _SIZED:  # (a view's size argument is the global size: the block's here)
        call[1] = list(expected[0])
    returned = op(*call, **kwargs)
    blocks = (returned,) if isinstance(returned, torch.Tensor) else tuple(returned)
    if len(blocks) != len(outputs) or not all(isinstance(b, torch.Tensor) for b in blocks):
        return None
    for block, layout, sizes_there in zip(blocks, layouts, expected, strict=True):
        if list(block.shape) != list(sizes_there):
            raise ValueError(
                f"{op}: its sharding rule does not describe it: on rank {anchor._rank} the "
                f"op gave a block of size {list(block.shape)} where the result's layout "
                f"{layout.spec!r} places {list(sizes_there)}")
    wrapped = tuple(anchor._like([block], layout, block.dtype)
                    for block, layout in zip(blocks, layouts, strict=True))
    return wrapped if len(outputs) > 1 else wrapped[0]


# -- rules that depend on the call's arguments ------------------------------------------

def _names(ndim: int) -> tuple[str, ...]:
    return tuple(f"d{j}" for j in range(ndim))


def transpose_rule(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ShardingRule | None:
    """``transpose(x, a, b)`` (and ``t``): the letters of dims ``a`` and ``b`` swap."""
    x = args[0]
    if x.dim() < 2 and len(args) < 3:
        return None
    a, b = (args[1], args[2]) if len(args) >= 3 else (0, 1)
    names = list(_names(x.dim()))
    a, b = a % x.dim(), b % x.dim()
    out = list(names)
    out[a], out[b] = names[b], names[a]
    return ShardingRule((tuple(names),), (tuple(out),), (None,))


def permute_rule(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ShardingRule | None:
    x, dims = args[0], args[1]
    names = _names(x.dim())
    return ShardingRule((names,), (tuple(names[d % x.dim()] for d in dims),), (None,))


def sum_rule(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ShardingRule | None:
    """``sum(x, dims, keepdim)``: the summed letters contract with ``sum`` (a kept
    size-1 dim gets a letter of its own, never split)."""
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if kwargs.get("dtype") is not None or x.dim() == 0:
        return None
    names = _names(x.dim())
    reduced = set(range(x.dim())) if not dims else {d % x.dim() for d in dims}
    out = tuple(f"k{d}" if d in reduced else names[d] for d in range(x.dim())
                if keepdim or d not in reduced)
    return ShardingRule((names,), (out,), ("sum",))


# -- ops composed of ruled ones -----------------------------------------------------------

Handler = Callable[[tuple[Any, ...], dict[str, Any]], Any]
# Ops served on N-D operands by composing ops that have rules (each dispatched again).
MESH_HANDLERS: dict[Any, tuple[Handler, Any]] = {}


def _addmm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``beta * bias + alpha * (x @ w)``: the product by its rule, then the sum (a
    pending product is reduced where the bias joins it, as Megatron does)."""
    bias, x, w = args[:3]
    beta = kwargs.get("beta", args[3] if len(args) > 3 else 1)
    alpha = kwargs.get("alpha", args[4] if len(args) > 4 else 1)
    product = aten.mm.default(x, w)
    if alpha != 1:
        product = aten.mul.Tensor(product, alpha)
    return aten.add.Tensor(product, bias if beta == 1 else aten.mul.Tensor(bias, beta))


def _mean(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A mean is the sum over the global count: exact on split dims (never a mean of
    per-rank means)."""
    x = args[0]
    if not x.is_floating_point() or kwargs.get("dtype") is not None:
        return None
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    reduced = range(x.dim()) if not dims else {d % x.dim() for d in dims}
    count = 1
    for d in reduced:
        count *= x.shape[d]
    total = aten.sum.dim_IntList(x, list(reduced), keepdim)
    return aten.div.Tensor(_value(total), count)


def _value(total: ShardedTensor) -> ShardedTensor:
    """A mean's or a loss's sum, reduced where it is pending (over the mesh dims that split
    its elements): the result is then the same value on every rank, so reading it
    (``loss.item()`` on one rank) needs no collective."""
    return total._reduced() if total._layout.pending else total


def _mse_loss(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, target = args[0], args[1]
    reduction = args[2] if len(args) > 2 else kwargs.get("reduction", 1)
    if x.shape != target.shape or not x.is_floating_point():
        return None
    difference = aten.sub.Tensor(x, target)
    squared = aten.mul.Tensor(difference, difference)
    if reduction == 0:
        return squared
    total = _value(aten.sum.dim_IntList(squared, list(range(x.dim())), False))
    return total if reduction == 2 else aten.div.Tensor(total, x.numel())


def _mse_loss_backward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    grad, x, target = args[0], args[1], args[2]
    reduction = args[3] if len(args) > 3 else kwargs.get("reduction", 1)
    if x.shape != target.shape:
        return None
    scale = 2.0 / x.numel() if reduction == 1 else 2.0
    difference = aten.sub.Tensor(x, target)
    return aten.mul.Tensor(aten.mul.Tensor(difference, scale), grad)


for _op, _handler in ((aten.addmm.default, _addmm), (aten.mean.dim, _mean),
                      (aten.mse_loss.default, _mse_loss),
                      (aten.mse_loss_backward.default, _mse_loss_backward)):
    MESH_HANDLERS[_op] = (_handler, _implementation(_op))

POINTWISE = ShardingRule(None, None, (None,))

mesh_rule(aten.mm.default, ShardingRule.parse("m k, k n -> m n", "sum"))
mesh_rule(aten.bmm.default, ShardingRule.parse("b m k, b k n -> b m n", "sum"))
mesh_rule(aten.t.default, transpose_rule)
mesh_rule(aten.transpose.int, transpose_rule)
mesh_rule(aten.permute.default, permute_rule)
mesh_rule(aten.sum.dim_IntList, sum_rule)
mesh_rule(aten.sum.default, sum_rule)


def _view_groups(source: Sequence[int], target: Sequence[int]
                 ) -> list[tuple[list[int], list[int]]] | None:
    """The dims of ``source`` and ``target`` grouped where their products meet (torch's
    view semantics); size-1 dims are groups of their own."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(source) or j < len(target):
        if i < len(source) and source[i] == 1 and (j >= len(target) or target[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(target) and target[j] == 1 and (i >= len(source) or source[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(source) or j >= len(target):
            return None
        ins, outs = [i], [j]
        left, right = source[i], target[j]
        i, j = i + 1, j + 1
        while left != right:
            if left < right:
                if i >= len(source):
                    return None
                left *= source[i]
                ins.append(i)
                i += 1
            else:
                if j >= len(target):
                    return None
                right *= target[j]
                outs.append(j)
                j += 1
        groups.append((ins, outs))
    return groups


def view_rule(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ShardingRule | None:
    """``view``/``reshape`` to ``size``: a dim kept whole keeps its letter; where dims
    merge or split, the outermost one keeps its letter if its size divides evenly among
    all ranks (so that the chunks line up), and the rest are never split."""
    x, size = args[0], list(args[1])
    if -1 in size:
        known = 1
        for n in size:
            known *= n if n != -1 else 1
        size[size.index(-1)] = x.numel() // known if known else 0
    groups = _view_groups(list(x.shape), size)
    if groups is None or 0 in x.shape:
        return None
    ins: list[str] = [""] * x.dim()
    outs: list[str] = [""] * len(size)
    ranks = torch.distributed.get_world_size()
    for g, (in_dims, out_dims) in enumerate(groups):
        for k, d in enumerate(in_dims):
            ins[d] = f"i{g}_{k}"
        for k, d in enumerate(out_dims):
            outs[d] = f"o{g}_{k}"
        if in_dims and out_dims and (len(in_dims) == len(out_dims) == 1 or (
                x.shape[in_dims[0]] % ranks == 0 and size[out_dims[0]] % ranks == 0)):
            outs[out_dims[0]] = ins[in_dims[0]]
    return ShardingRule((tuple(ins),), (tuple(outs),), (None,))


_SIZED = {aten.view.default, aten._unsafe_view.default}
# Ops that only move or add up elements: linear, so they keep a pending reduction.
_SUMS = {aten.sum.dim_IntList, aten.sum.default}
_MOVES_ELEMENTS = {aten.t.default, aten.transpose.int, aten.permute.default, *_SIZED, *_SUMS}
mesh_rule(aten.view.default, view_rule)
mesh_rule(aten._unsafe_view.default, view_rule)


# -- ops whose rows are independent: layer norm, attention ---------------------------------

def _relaid(value: Any, mesh: Mesh, placements: Sequence[MeshPlacement], anchor: ShardedTensor
            ) -> torch.Tensor:
    """This rank's block of ``value`` (a ShardedTensor or a plain tensor) laid out on
    ``mesh`` by ``placements``."""
    spec = mesh_sharding_spec(mesh[0], mesh[1], placements, value.shape,
                              anchor._layout.device or str(anchor.device))
    if not isinstance(value, ShardedTensor):
        with collectives.unchecked_creation():
            value = ShardedTensor.from_replicated(value, spec, anchor.process_group)
    elif value._layout.spec != spec:
        value = value._redistributed(spec)
    block: torch.Tensor = value._local_tensors[0]
    return block


def _wrapped(anchor: ShardedTensor, mesh: Mesh, placements: Sequence[MeshPlacement],
             block: torch.Tensor, size: Sequence[int]) -> ShardedTensor:
    device = anchor._layout.device or str(anchor.device)
    spec = mesh_sharding_spec(mesh[0], mesh[1], placements, size, device)
    return anchor._like([block], layout_of(spec, torch.Size(size),
                                           anchor._layout.group_ranks, device), block.dtype)


def _rows(value: Any, mesh: Mesh, kept: int) -> list[MeshPlacement] | None:
    """``value``'s placements with only splits of its first ``kept`` dims left (the
    rows an op treats independently); the rest replicated, pending ones reduced."""
    placed = _placements(value, mesh)
    if placed is None:
        return None
    return [(kind, arg) if kind == "shard" and int(arg) < kept else _REPLICATE
            for kind, arg in placed]


def _layer_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``native_layer_norm``: rows split as they are (their normalized dims gathered),
    weight and bias whole; per rank one call. Mean and rstd keep the rows' split."""
    x, shape, weight, bias = args[0], list(args[1]), args[2], args[3]
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    mesh = _mesh_of([x])
    lead = x.dim() - len(shape)
    rows = _rows(x, mesh, lead) if mesh is not None else None
    if mesh is None or rows is None:
        return None
    anchor = x
    whole = [_REPLICATE] * len(mesh[0])
    local = [_relaid(x, mesh, rows, anchor),
             None if weight is None else _relaid(weight, mesh, whole, anchor),
             None if bias is None else _relaid(bias, mesh, whole, anchor)]
    out, mean, rstd = aten.native_layer_norm.default(local[0], shape, local[1], local[2], eps)
    stats = [*x.shape[:lead], *([1] * len(shape))]
    return (_wrapped(anchor, mesh, rows, out, x.shape),
            _wrapped(anchor, mesh, rows, mean, stats), _wrapped(anchor, mesh, rows, rstd, stats))


def _layer_norm_backward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Its backward: the input's gradient split like the rows; the weight's and bias's
    gradients are sums over the rows, pending over the mesh dims that split them."""
    grad, x, shape, mean, rstd, weight, bias, mask = args
    mesh = _mesh_of([x, grad])
    if mesh is None:
        return None
    lead = x.dim() - len(shape)
    rows = _rows(x, mesh, lead)
    if rows is None or any(_placements(v, mesh) is None for v in (grad, mean, rstd)):
        return None
    anchor = x if isinstance(x, ShardedTensor) else grad
    whole = [_REPLICATE] * len(mesh[0])
    local = [_relaid(v, mesh, rows, anchor) for v in (grad, x, mean, rstd)]
    params = [None if v is None else _relaid(v, mesh, whole, anchor) for v in (weight, bias)]
    grads = aten.native_layer_norm_backward.default(*local[:2], shape, *local[2:], *params,
                                                    mask)
    summed: list[MeshPlacement] = [("partial", "sum") if kind == "shard" else _REPLICATE
                                   for kind, _ in rows]
    return (None if grads[0] is None else _wrapped(anchor, mesh, rows, grads[0], x.shape),
            None if grads[1] is None else _wrapped(anchor, mesh, summed, grads[1], shape),
            None if grads[2] is None else _wrapped(anchor, mesh, summed, grads[2], shape))


def _attention_heads(q: Any, k: Any, v: Any, mesh: Mesh) -> list[MeshPlacement] | None:
    """The placements q, k and v share for attention: batch and head dims split as q's
    (k and v moved to them), sequence and features whole."""
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        return None  # (grouped-query heads: served flattened)
    return _rows(q, mesh, 2)


def _attention(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``_scaled_dot_product_flash_attention_for_cpu``: per (batch, head) block, whole
    sequences: one call per rank; the output and log-sum-exp keep the split."""
    q, k, v = args[:3]
    dropout = args[3] if len(args) > 3 else kwargs.get("dropout_p", 0.0)
    mesh = _mesh_of([q, k, v])
    if mesh is None or dropout or kwargs.get("attn_mask") is not None:
        return None
    heads = _attention_heads(q, k, v, mesh)
    if heads is None:
        return None
    anchor = next(t for t in (q, k, v) if isinstance(t, ShardedTensor))
    local = [_relaid(t, mesh, heads, anchor) for t in (q, k, v)]
    out, logsumexp = aten._scaled_dot_product_flash_attention_for_cpu.default(
        *local, *args[3:], **kwargs)
    return (_wrapped(anchor, mesh, heads, out, [*q.shape[:3], v.shape[-1]]),
            _wrapped(anchor, mesh, heads, logsumexp, q.shape[:3]))


def _attention_backward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    grad, q, k, v, out, logsumexp = args[:6]
    dropout = args[6] if len(args) > 6 else kwargs.get("dropout_p", 0.0)
    mesh = _mesh_of([grad, q, k, v, out])
    if mesh is None or dropout or kwargs.get("attn_mask") is not None:
        return None
    heads = _attention_heads(q, k, v, mesh)
    if heads is None or any(_placements(t, mesh) is None for t in (grad, out, logsumexp)):
        return None
    anchor = next(t for t in (grad, q, k, v) if isinstance(t, ShardedTensor))
    local = [_relaid(t, mesh, heads, anchor) for t in (grad, q, k, v, out, logsumexp)]
    grads = aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
        *local, *args[6:], **kwargs)
    return tuple(_wrapped(anchor, mesh, heads, g, t.shape)
                 for g, t in zip(grads, (q, k, v), strict=True))


def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``split(x, size, dim)``: per block, with ``dim`` gathered where a mesh dim splits
    it; every piece keeps the other splits."""
    x, size = args[0], args[1]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.dim()
    mesh = _mesh_of([x])
    placed = _placements(x, mesh) if mesh is not None else None
    if mesh is None or placed is None:
        return None
    target: list[MeshPlacement] = [
        (kind, arg) if kind == "shard" and int(arg) != dim else _REPLICATE
        for kind, arg in placed]
    pieces = aten.split.Tensor(_relaid(x, mesh, target, x), size, dim)
    return [_wrapped(x, mesh, target, piece, [*x.shape[:dim], piece.shape[dim],
                                              *x.shape[dim + 1:]]) for piece in pieces]


def _cat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``cat(tensors, dim)``: per block, every tensor laid out as the first N-D one with
    ``dim`` gathered where a mesh dim splits it (split's backward joins its pieces so)."""
    tensors = [t for t in args[0] if t.dim() > 0 or t.numel() > 0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    mesh = _mesh_of(tensors)
    if mesh is None or not tensors or len({t.dim() for t in tensors}) != 1:
        return None
    dim %= tensors[0].dim()
    anchor = next(t for t in tensors if isinstance(t, ShardedTensor)
                  and isinstance(t._layout.spec, MeshShardingSpec))
    placed = _placements(anchor, mesh)
    if placed is None or any(_placements(t, mesh) is None for t in tensors):
        return None
    target: list[MeshPlacement] = [
        (kind, arg) if kind == "shard" and int(arg) != dim else _REPLICATE
        for kind, arg in placed]
    block = aten.cat.default([_relaid(t, mesh, target, anchor) for t in tensors], dim)
    size = list(tensors[0].shape)
    size[dim] = sum(t.shape[dim] for t in tensors)
    return _wrapped(anchor, mesh, target, block, size)


for _op, _handler in (
        (aten.split.Tensor, _split),
        (aten.cat.default, _cat),
        (aten.native_layer_norm.default, _layer_norm),
        (aten.native_layer_norm_backward.default, _layer_norm_backward),
        (aten._scaled_dot_product_flash_attention_for_cpu.default, _attention),
        (aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
         _attention_backward)):
    MESH_HANDLERS[_op] = (_handler, _implementation(_op))
