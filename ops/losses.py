"""Losses: ``mse_loss`` and ``nll_loss`` (what ``F.cross_entropy`` reaches), forward and
backward.

``mse_loss``, block by block.

Per rank, when the input and the target share one layout (any 1-D split, one or
several blocks per rank, or replicated), each block's squared error is computed on its
own:

- ``reduction="none"``: the errors, in the operands' layout;
- ``"sum"`` and ``"mean"``: each rank sums its blocks' errors into a Partial scalar (a
  pending sum over the ranks). The mean divides that sum by the global element count,
  so it weighs every element alike, never averaging per-rank means. Replicated operands
  give a replicated scalar.
- Backward: ``2 (x - y) grad`` per block, divided by the global element count for the
  mean; the incoming gradient is a replicated (or plain) scalar, or the errors' layout
  for ``"none"``.

Collectives: none here (the Partial loss is reduced where its value is read). Other
operands (broadcasting, mixed layouts, pending inputs, integer dtypes) take torch's
decomposition (ops/decomposed.py); N-D layouts are served per mesh dim
(:mod:`dispatch_shard.mesh_rules`).

``nll_loss_forward`` / ``nll_loss_backward``: each rank picks the target class's entry
of each sample from its blocks (targets and class weights are replicated values, see
NOTE [index operands are replicated values] in ops/indexing.py), except where the
logits and the target are both split by rows, as a data-parallel batch is: then each
rank reads its own rows of the target (NOTE [a batch-split target stays split]). The
per-op docstrings give the per-rank shapes and collectives.

``multi_margin_loss_backward`` / ``multilabel_margin_loss_backward``: each sample's
gradient depends on its own row only, so per block of rows (dim 0), no collective; a
mean is the sum of ``grad / N``. Split classes: on the whole value.
"""

from __future__ import annotations

from typing import Any

import torch

from dispatch_shard import collectives
from dispatch_shard.authoring import small_dense_call
from dispatch_shard.layout import Box, layout_of
from dispatch_shard.ops._common import (
    bind_arguments,
    blockwise,
    by_decomposition,
    dense_value,
    first_sharded,
    in_group,
    is_block_sharded,
    meta_results,
    outside_result,
    partial_result,
    pieces_of,
    replicated_fallback,
    replicated_result,
)
from dispatch_shard.ops.layouts import reduced_layout, split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import Partial

__all__: list[str] = []

aten = torch.ops.aten
_NONE, _MEAN, _SUM = 0, 1, 2


def _same_layout(*values: Any) -> bool:
    """Whether every value is a ShardedTensor of the first one's layout (not pending)
    and floating dtype."""
    first = values[0]
    if type(first) is not ShardedTensor or first._layout.pending:
        return False
    return all(type(v) is ShardedTensor and v._layout is first._layout
               and v.dtype == first.dtype and v.is_floating_point() for v in values)


def _scalar_grad(grad: Any) -> torch.Tensor | None:
    """A 0-dim gradient as a dense tensor on this rank (None if it is not one)."""
    if type(grad) is ShardedTensor:
        if grad.dim() != 0 or not grad._layout.is_replicate or len(grad._local_tensors) != 1:
            return None
        return grad._local_tensors[0]
    if isinstance(grad, torch.Tensor) and grad.dim() == 0:
        return grad
    return None


@custom_sharded_op_impl(aten.mse_loss.default, handles_partial=True)
def mse_loss(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``mean((x - y)^2)`` (or its sum, or the errors): per block, no collective; the
    sum and mean are Partial scalars (see the module docstring)."""
    x, target = args[0], args[1]
    reduction = args[2] if len(args) > 2 else kwargs.get("reduction", _MEAN)
    if not _same_layout(x, target) or x.shape != target.shape:
        return by_decomposition(aten.mse_loss.default, types, args, kwargs, pg)
    blocks = [aten.mse_loss.default(a, b, _NONE if reduction == _NONE else _SUM)
              for a, b in zip(x._local_tensors, target._local_tensors, strict=True)]
    if reduction == _NONE:
        return x._like(blocks)
    layout = x._layout
    if layout.is_replicate:
        total = blocks[0] if blocks else None
    else:
        total = torch.stack(blocks).sum() if len(blocks) > 1 else (
            blocks[0] if blocks else torch.zeros((), dtype=x.dtype, device=x.device))
        layout = layout_of(Partial(), torch.Size([]), layout.group_ranks,
                           layout.device or str(x.device))
    if total is not None and reduction == _MEAN:
        total = total / x.numel()
    return x._like([] if total is None else [total], layout)


@custom_sharded_op_impl(aten.mse_loss_backward.default, handles_partial=True)
def mse_loss_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                      pg: Any) -> Any:
    """``2 (x - y) grad`` per block (over the global element count for the mean); no
    collective."""
    grad, x, target = args[0], args[1], args[2]
    reduction = args[3] if len(args) > 3 else kwargs.get("reduction", _MEAN)
    if not _same_layout(x, target) or x.shape != target.shape:
        return by_decomposition(aten.mse_loss_backward.default, types, args, kwargs, pg)
    if reduction == _NONE:
        if not _same_layout(x, grad):
            return by_decomposition(aten.mse_loss_backward.default, types, args, kwargs, pg)
        pieces = grad._local_tensors
    else:
        scalar = _scalar_grad(grad)
        if scalar is None:
            return by_decomposition(aten.mse_loss_backward.default, types, args, kwargs, pg)
        if reduction == _MEAN:
            scalar = scalar / x.numel()
        pieces = [scalar] * len(x._local_tensors)
    blocks = [aten.mse_loss_backward.default(g, a, b, _SUM if reduction != _NONE else _NONE)
              for g, a, b in zip(pieces, x._local_tensors, target._local_tensors,
                                 strict=True)]
    return x._like(blocks)


# -- nll_loss (what cross_entropy reaches) ---------------------------------------------------

class _Targets:
    """The per-sample facts of an ``nll_loss`` call, from the whole (replicated) target and
    class weight: valid samples, their classes and weights."""

    def __init__(self, target: Any, weight: Any, classes: int, ignore_index: int,
                 dtype: torch.dtype, check: bool) -> None:
        # (a Byte target's values are classes too, not a mask: read them as Long)
        target = dense_value(target).reshape(-1).long()
        valid = target != ignore_index
        if check:
            bad = valid & ((target < 0) | (target >= classes))
            if bool(bad.any()):
                raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")
        self.classes = torch.where(valid, target, 0).clamp_(0, max(classes - 1, 0))
        weight = dense_value(weight)
        if weight is None:
            self.weights = valid.to(dtype)
        else:
            self.weights = torch.where(valid, weight.to(dtype)[self.classes], 0)
        self.valid = valid

    def hits(self, rows: slice, columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples of ``rows`` whose (valid) class is in ``columns``, relative to the block."""
        classes = self.classes[rows]
        hit = self.valid[rows] & (classes >= columns.start) & (classes < columns.stop)
        where = hit.nonzero().reshape(-1)
        return where, classes[where] - columns.start


def _rows_and_columns(box: Box) -> tuple[slice, slice]:
    """A block's samples and classes (a 1-D input is one sample)."""
    return (box[0], box[1]) if len(box) == 2 else (slice(0, 1), box[0])


# NOTE [a batch-split target stays split]
# In data-parallel training the logits ``[N, C]`` and the target ``[N]`` are both split
# by rows, alike. Each rank's blocks then hold whole rows, and the target's matching rows
# (its own blocks, no collective) decide each sample's loss and gradient. Only the
# mean's divisor (the total weight) and the bounds check's verdict need the other
# ranks: they ride the loss's own all-reduce, three numbers (the loss's sum, the total
# weight, the count of out-of-bounds targets). Gathering the whole target instead cost
# an all-to-all in forward and another in backward. ``reduction="none"`` all-reduces the
# count alone (so an out-of-bounds target raises on every rank); backward, nothing. The
# sums accumulate in float64: a bfloat16 loss can differ from dense's, which accumulates
# in bfloat16, in its last bit (toward the exact value).

def _rows_of(x: Any, target: Any) -> Any:
    """The row layout of ``x [N, C]`` when every block of ``x`` holds whole rows and the
    target is split in blocks too (the case NOTE [a batch-split target stays split]
    serves; the target's pieces for those rows are its own blocks when it is split alike,
    else one all-to-all moves them), or None."""
    if x.dim() != 2 or x.shape[1] == 0 or not is_block_sharded(x) \
            or not is_block_sharded(target):
        return None
    if 1 in split_dims(x._layout):
        return None
    return reduced_layout(x._layout, (1,), False)


def _row_facts(x: ShardedTensor, rows: Any, target: Any, weight: Any, ignore_index: int,
               dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """Per block of ``x`` on this rank: its samples' targets, validity, (clamped) classes,
    weights and out-of-bounds flags."""
    classes = x.shape[1]
    weight = dense_value(weight)
    facts: list[tuple[torch.Tensor, ...]] = []
    for t in pieces_of(target, rows, x._rank):
        t = t.long()  # (a Byte target's values are classes, not a mask)
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= classes))
        cls = torch.where(valid & ~bad, t, 0)
        w = valid.to(dtype) if weight is None else torch.where(valid, weight.to(dtype)[cls], 0)
        facts.append((t, valid, cls, w, bad))
    return facts


def _raise_out_of_bounds(x: ShardedTensor, rows: Any, facts: list[tuple[torch.Tensor, ...]]
                         ) -> None:
    """Raise dense's error for the first out-of-bounds target in row order, on every rank
    (two small all-reduces, on this error path only)."""
    group = x._process_group
    first = torch.tensor(x.shape[0], dtype=torch.int64, device=x.device)
    for i, (_, _, _, _, bad) in zip(rows.local_indices(x._rank), facts, strict=True):
        where = bad.nonzero()
        if where.numel():
            first = torch.minimum(first, rows.shard_box(i)[0].start + where[0, 0])
    collectives.all_reduce(first, "min", group)
    value = torch.zeros((), dtype=torch.int64, device=x.device)
    for i, (t, _, _, _, _) in zip(rows.local_indices(x._rank), facts, strict=True):
        start = rows.shard_box(i)[0].start
        if start <= int(first) < start + t.numel():
            value = t[int(first) - start].clone()
    collectives.all_reduce(value, "sum", group)
    raise IndexError(f"Target {int(value)} is out of bounds.")


def _nll_forward_by_rows(anchor: Any, x: ShardedTensor, rows: Any, bound: Any,
                         results: Any) -> Any:
    """NOTE [a batch-split target stays split]: ``nll_loss_forward`` on a row-split ``x``."""
    (size, dtype), (_, weight_dtype) = results
    reduction = bound["reduction"]
    facts = _row_facts(x, rows, bound["target"], bound["weight"], bound["ignore_index"],
                       x.dtype)
    losses = [-(w * torch.where(valid, block.gather(1, cls[:, None])[:, 0], 0))
              for block, (_, valid, cls, w, _) in zip(x._local_tensors, facts, strict=True)]
    bad = sum((int(f[4].sum()) for f in facts), 0)
    if reduction == _NONE:
        count = collectives.all_reduce(
            torch.tensor([bad], dtype=torch.float64, device=x.device), "sum", x._process_group)
        if count[0] > 0:
            _raise_out_of_bounds(x, rows, facts)
        no_total = replicated_result(
            anchor, torch.zeros((), dtype=weight_dtype, device=x.device), (), weight_dtype)
        return x._like([loss.to(dtype) for loss in losses], rows, dtype), no_total
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)
    for block_losses, (_, _, _, w, _) in zip(losses, facts, strict=True):
        sums[0] += block_losses.sum(dtype=torch.float64)
        sums[1] += w.sum(dtype=torch.float64)
    sums[2] = bad
    collectives.all_reduce(sums, "sum", x._process_group)
    if sums[2] > 0:
        _raise_out_of_bounds(x, rows, facts)
    loss_sum, total = sums[0], sums[1]
    loss = loss_sum / total if reduction == _MEAN else loss_sum
    return (replicated_result(anchor, loss.to(dtype), size, dtype),
            replicated_result(anchor, total.to(weight_dtype), (), weight_dtype))


def _nll_backward_by_rows(x: ShardedTensor, rows: Any, bound: Any, dtype: torch.dtype) -> Any:
    """NOTE [a batch-split target stays split]: ``nll_loss_backward`` on a row-split ``x``
    (no collective)."""
    reduction = bound["reduction"]
    facts = _row_facts(x, rows, bound["target"], bound["weight"], bound["ignore_index"], dtype)
    grad = bound["grad_output"]
    if reduction == _NONE:
        grads = [g.to(dtype) for g in pieces_of(grad, rows, x._rank)]
    else:
        scalar = dense_value(grad).to(dtype)
        if reduction == _MEAN:
            scalar = scalar / dense_value(bound["total_weight"]).to(dtype)
        grads = [scalar] * len(facts)
    blocks = []
    for block, g, (_, valid, cls, w, _) in zip(x._local_tensors, grads, facts, strict=True):
        values = torch.where(valid, -w * g, 0)
        out = torch.zeros(block.shape, dtype=dtype, device=block.device)
        blocks.append(out.scatter_(1, cls[:, None], values[:, None]))
    return x._like(blocks, dtype=dtype)


def _nll_results(func: torch._ops.OpOverload, bound: dict[str, Any]) -> Any:
    """``nll_loss_forward``'s or ``nll_loss_backward``'s result sizes and dtypes, with
    dense's errors on every rank. Their meta kernel reads the target's dtype unlike the
    CPU kernel, which takes Long and Byte targets only: meta takes an Int target and
    refuses a Byte one. So any other dtype than Long meets dense's own check first (a run
    on small dense stand-ins), and the meta run sees a Long target."""
    values = [bound[argument.name] for argument in func._schema.arguments]
    target = bound["target"]
    if target.dtype != torch.int64:
        small_dense_call(func, values, {})
        values = [torch.empty(target.shape, dtype=torch.int64, device="meta")
                  if v is target else v for v in values]
    return meta_results(func, values, {})


@custom_sharded_op_impl(aten.nll_loss_forward.default, handles_partial=True)
def nll_loss_forward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``nll_loss_forward(x, target, weight, reduction, ignore_index) -> (loss, total_weight)``
    for ``x [N, C]`` (or ``[C]``); ``target [N]`` and ``weight [C]`` whole (gathered when
    sharded: one all-to-all each).

    Each rank picks ``-weight[t_n] * x[n, t_n]`` from its blocks (zeros where it holds no
    such element); ``total_weight`` is computed from the target alone, on every rank.
    * ``reduction="none"``: ``x [N/R, C]`` -> ``[N/R]`` (``x``'s row blocks); ``x`` split
      along the classes -> ``Partial("sum") [N]``; collectives: none.
    * ``"sum"`` / ``"mean"``: one scalar all-reduce -> replicated 0-dim (none when ``x`` is
      replicated).
    A ``Partial`` ``x`` is reduced first. ``x [N/R, C]`` (whole rows) with a target split
    in blocks (``[N/R]`` alike, a data-parallel batch): the target is not gathered, and
    ``"sum"`` / ``"mean"`` issue one all-reduce of 3 numbers, ``"none"`` one of 1 (NOTE [a
    batch-split target stays split]).
    """
    func = aten.nll_loss_forward.default
    bound = bind_arguments(func, args, kwargs)
    x = bound["self"]
    results = _nll_results(func, bound)
    (size, dtype), (_, weight_dtype) = results
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return outside_result(anchor, results)
    rows = _rows_of(x, bound["target"])
    if rows is not None:
        return _nll_forward_by_rows(anchor, x, rows, bound, results)
    reduction = bound["reduction"]
    classes = x.shape[-1]
    targets = _Targets(bound["target"], bound["weight"], classes, bound["ignore_index"],
                       x.dtype, check=True)
    total = (targets.weights.sum() if reduction != _NONE
             else torch.zeros((), dtype=weight_dtype, device=x.device))
    total_weight = replicated_result(anchor, total.to(weight_dtype), (), weight_dtype)
    if isinstance(x, ShardedTensor) and x._layout.is_partial:
        x = x._reduced()
    if not isinstance(x, ShardedTensor) or x._layout.is_replicate:
        loss, _ = func(dense_value(x), dense_value(bound["target"]),
                       dense_value(bound["weight"]), reduction, bound["ignore_index"])
        return replicated_result(anchor, loss, size, dtype), total_weight
    layout, rank = x._layout, x._rank
    picked = torch.zeros(targets.weights.shape, dtype=x.dtype, device=x.device)
    for block, i in zip(x._local_tensors, layout.local_indices(rank), strict=True):
        rows, columns = _rows_and_columns(layout.shard_box(i))
        where, local = targets.hits(rows, columns)
        if where.numel():
            picked[rows][where] = block.reshape(-1, block.shape[-1])[where, local]
    losses = -(targets.weights * picked)
    if reduction == _NONE and x.dim() == 2:
        if 1 in split_dims(layout):
            return partial_result(anchor, losses, dtype), total_weight
        out_layout = reduced_layout(layout, (1,), False)
        blocks = [losses[out_layout.shard_box(j)] for j in out_layout.local_indices(rank)]
        return x._like(blocks, out_layout, dtype), total_weight
    loss = collectives.all_reduce(losses.sum(), "sum", x._process_group)
    if reduction == _MEAN:
        loss = loss / total
    return replicated_result(anchor, loss.to(dtype), size, dtype), total_weight


@custom_sharded_op_impl(aten.nll_loss_backward.default, handles_partial=True)
def nll_loss_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``nll_loss_backward(grad, x, target, weight, reduction, ignore_index, total_weight)``
    -> ``grad_input`` in ``x``'s layout: each block holds ``-weight[t_n] * grad_n`` (divided
    by ``total_weight`` for ``"mean"``) at its ``(n, t_n)`` elements, zeros elsewhere.

    Collectives: none for a replicated ``grad`` or one laid out like the forward's
    ``"none"`` loss (``[N/R]`` for ``x [N/R, C]``); otherwise ``grad`` is gathered whole
    (one all-to-all, or one all-reduce when partial). A target split in blocks (when
    ``x`` holds whole rows) is read row by row, not gathered.
    """
    func = aten.nll_loss_backward.default
    bound = bind_arguments(func, args, kwargs)
    x, grad = bound["self"], bound["grad_output"]
    results = _nll_results(func, bound)
    ((size, dtype),) = results
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return outside_result(anchor, results)
    rows = _rows_of(x, bound["target"])
    if rows is not None:
        return _nll_backward_by_rows(x, rows, bound, dtype)
    reduction = bound["reduction"]
    targets = _Targets(bound["target"], bound["weight"], x.shape[-1], bound["ignore_index"],
                       dtype, check=False)
    scale = -targets.weights
    if reduction == _MEAN:
        scale = scale / dense_value(bound["total_weight"]).to(dtype)
    if not is_block_sharded(x):
        whole = func(dense_value(grad), torch.zeros((), dtype=x.dtype).expand(x.shape),
                     dense_value(bound["target"]), dense_value(bound["weight"]), reduction,
                     bound["ignore_index"], dense_value(bound["total_weight"]))
        return replicated_result(anchor, whole, size, dtype)
    layout, rank = x._layout, x._rank
    by_rows = reduction == _NONE and x.dim() == 2 and 1 not in split_dims(layout)
    if by_rows:
        row_layout = reduced_layout(layout, (1,), False)
        grads = pieces_of(grad, row_layout, rank)
    else:
        whole_grad = dense_value(grad).to(dtype)
        coefficients = scale * (whole_grad.reshape(-1) if reduction == _NONE else whole_grad)
    blocks = []
    for position, i in enumerate(layout.local_indices(rank)):
        sizes = layout.shards[i].shard_sizes
        block = torch.zeros(sizes, dtype=dtype, device=x.device)
        rows, columns = _rows_and_columns(layout.shard_box(i))
        where, local = targets.hits(rows, columns)
        if where.numel() and block.numel():
            if by_rows:
                values = scale[rows][where] * grads[position].to(dtype)[where]
            else:
                values = coefficients[rows][where]
            block.view(-1, sizes[-1])[where, local] = values
        blocks.append(block)
    return x._like(blocks, dtype=dtype)


# -- margin losses' backward: rows apart -------------------------------------------------

def _per_row_backward(func: torch._ops.OpOverload, args: tuple[Any, ...],
                      kwargs: dict[str, Any], rows: tuple[int, ...], replicated: tuple[int, ...],
                      reduction_at: int) -> Any:
    """``func(grad, self [N, C], ...)`` per block of rows: the arguments at ``rows`` (and
    the gradient for ``reduction="none"``) cut alike along dim 0, those at ``replicated``
    whole. A sum or mean gives a scalar gradient, replicated (a pending one is reduced:
    one all-reduce of a scalar); the mean is served as the sum of ``grad / N`` (N
    global). Other layouts: on the whole value."""
    bound = list(bind_arguments(func, args, kwargs).values())
    x = bound[1]
    if type(x) is not ShardedTensor or x.dim() != 2:
        return replicated_fallback(func, args, kwargs)
    reduction = bound[reduction_at]
    if reduction == _NONE:
        return blockwise(func, tuple(bound), {}, (1, 0, *rows), 1, replicated, (1,))
    grad = bound[0]
    if type(grad) is ShardedTensor and grad._layout.is_partial and grad.dim() == 0:
        grad = grad._reduced()  # the loss's pending sum: one all-reduce of a scalar
    scalar = _scalar_grad(grad)
    if scalar is None:
        return replicated_fallback(func, args, kwargs)
    if reduction == _MEAN:
        scalar, bound[reduction_at] = scalar / x.shape[0], _SUM
    bound[0] = scalar
    return blockwise(func, tuple(bound), {}, (1, *rows), 1, (0, *replicated), (1,))


@custom_sharded_op_impl(aten.multi_margin_loss_backward.default, handles_partial=True)
def multi_margin_loss_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                               pg: Any) -> Any:
    """``(grad [n] or [], self [n, C], target [n], weight [C]) -> [n, C]`` per block of
    ``n`` rows (class weights replicated); no collective. Split classes: the whole value."""
    return _per_row_backward(aten.multi_margin_loss_backward.default, args, kwargs, (2,),
                             (5,), 6)


@custom_sharded_op_impl(aten.multilabel_margin_loss_backward.default, handles_partial=True)
def multilabel_margin_loss_backward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                                    pg: Any) -> Any:
    """``(grad [n] or [], self [n, C], target [n, C], is_target [n, C]) -> [n, C]`` per
    block of ``n`` rows; no collective. Split classes: the whole value."""
    return _per_row_backward(aten.multilabel_margin_loss_backward.default, args, kwargs,
                             (2, 4), (), 3)


@custom_sharded_op_impl(aten.multilabel_margin_loss_forward.default, handles_partial=True)
def multilabel_margin_loss_forward(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                                   pg: Any) -> Any:
    """``(self [n, C], target [n, C]) -> (loss [n] or a Partial scalar, is_target [n, C])``
    per block of ``n`` rows; no collective (the sum and mean are pending sums, the mean
    over the global N). Split classes: the whole value.

    NOTE [multilabel_margin_loss's decomposition]
    torch 2.13's decomposition counts the labels after a target's first ``-1`` too (its
    ``z`` is never masked by ``target_mask``), so it differs from the kernel: this op must
    never take it. The per-row kernel runs on blocks, else on the whole value.
    """
    func = aten.multilabel_margin_loss_forward.default
    x, target, reduction = list(bind_arguments(func, args, kwargs).values())
    if type(x) is not ShardedTensor or x.dim() != 2:
        return replicated_fallback(func, args, kwargs)
    meta_results(func, args, kwargs)  # dense's errors, every rank
    losses, is_target = blockwise(func, (x, target, _NONE), {}, (0, 1), 1, (), (0, 0))
    if reduction == _NONE:
        return losses, is_target
    total = aten.sum.default(losses)
    return (total / x.shape[0] if reduction == _MEAN else total), is_target


@custom_sharded_op_impl(aten.multilabel_margin_loss_forward.output, handles_partial=True)
def multilabel_margin_loss_forward_output(types: Any, args: tuple[Any, ...],
                                          kwargs: dict[str, Any], pg: Any) -> Any:
    """The ``out=`` form: refused, never the wrong decomposition (NOTE
    [multilabel_margin_loss's decomposition]); collectives: none."""
    raise NotImplementedError(
        "aten.multilabel_margin_loss_forward.output (out=) not supported for ShardedTensor!")
