"""Matrix products: ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``mv``, ``addmv``, ``dot``.

``torch.matmul``, ``F.linear`` and ``torch.einsum`` decompose into these (plus
``t``/``expand``/``permute``, served by ``ops/view.py``, and ``view``/``_unsafe_view``,
served by ``ops/reshape.py``) before they reach ``__torch_dispatch__``.

Per rank, for ``a [B?, M, K] @ b [B?, K, N]`` over ``R`` ranks (``B?``: the batch
dim 0 of ``bmm``; "replicated" includes plain tensors):

* rows: ``a [M/R, K]`` @ replicated ``b [K, N]`` -> rows ``[M/R, N]``; collectives: none.
* cols (column-parallel): replicated ``a`` @ ``b [K, N/R]`` -> cols ``[M, N/R]``; none.
* contraction (row-parallel): ``a [M, K/R]`` @ ``b [K/R, N]`` with the same K blocks on
  the same ranks -> ``Partial("sum") [M, N]``; each rank sums the products of its blocks;
  collectives: none (the consumer reduces, see NOTE [bias of a partial product]).
* batch: ``a [B/R, M, K]`` @ ``b [B/R, K, N]`` (or one of them replicated: sliced
  locally) -> batch-sharded ``[B/R, M, N]``; none.
* replicated @ replicated -> replicated; none.
* ``Partial("sum"|"avg")`` @ replicated (either side) -> the same Partial (the product
  is linear in the partial operand); none.
* anything else: operands are moved to the cheapest of these first, see
  NOTE [choosing a matmul strategy]; enumerable (grid) layouts included.

Errors are dense's: the op is first checked on meta tensors of the global sizes
(the same verdict on every rank, no communication), and a failing call is rerun on
zero-stride stand-ins so that the message is dense's own (both in ``meta_results``); a
dtype the CPU kernel lacks (a bool product, which meta accepts) raises from a small
dense run, on every rank.

NOTE [choosing a matmul strategy]
Each strategy above names the layout each operand needs (a chunk spec on some
dim with some placements, Replicate, or the operand as it is). The placements
tried are those of every chunk-sharded operand (any rank list serves any dim),
or the group's ranks in order when no operand is chunk-sharded. A strategy's
cost is the number of bytes its moves send across ranks, computed from global
metadata so that every rank picks the same one: a sharded operand moved to
another layout sends the parts of its blocks that land on other ranks (one
all-to-all); a replicated operand is sliced locally (free); a partial operand
is all-reduced (``2 (R - 1)`` times its size). A Partial result adds the
all-reduce its consumer will likely issue. The choice, in order: a strategy
that moves nothing now (so the Megatron cases never communicate, and a
row-parallel product stays partial); then the lowest total; then the fewest
local re-layouts (copies); then the order batch, rows, cols, contraction,
partial, replicated. So replicated @ replicated stays replicated, and a big
sharded operand stays put while the small one is gathered. Choices are cached
per pair of (interned) layouts and dtype sizes.

NOTE [bias of a partial product]
``addmm(bias, a, b)`` is ``beta * bias + alpha * (a @ b)``. ``alpha`` scales the
local products (linear, so summands may be scaled). When ``a @ b`` is partial,
the bias is added to the summand of the group's first rank only (to every
summand for ``Partial("avg")``), so the result stays partial and ``addmm``
issues no collective: the row-parallel linear's single all-reduce happens when
a consumer needs the value (``full_tensor``, a non-linear op, ...), and a
consumer may choose a cheaper reduction. A bias that is itself partial with the
same reduce op is added summand by summand; any other bias is gathered whole
first (one all-to-all for a sharded bias, nothing for a replicated or plain
one). When the product is not partial, the bias is added by the pointwise
``add`` (no collectives when the bias is replicated, plain, or laid out like
the product); a bias chunk-sharded like the product's split dim (the
column-parallel bias ``[N/R]``) is added block by block.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dispatch_shard.layout import Layout, layout_of
from dispatch_shard.ops._common import first_sharded, meta_results
from dispatch_shard.ops.layouts import like_leading, split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import ChunkShardingSpec, Partial, Replicate, ShardingSpec

__all__ = ["Strategy", "choose_strategy"]

aten = torch.ops.aten

_LINEAR_REDUCE_OPS = ("sum", "avg")


# -- checking against dense -----------------------------------------------------------

def _key(value: Any) -> tuple[Any, ...]:
    """A hashable description of an argument: a tensor's global size and dtype, or a scalar."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    return ("scalar", type(value), value)


# Verdicts already given, by the op's id (NOTE [the dispatch loop's table is keyed by id]
# in dispatch_shard.registry) and each operand's layout and dtype (a layout fixes the
# global size); bounded. A cheaper key than meta_results' own cache, for the hot path of
# every product.
_VERDICTS: dict[tuple[Any, ...], torch.dtype] = {}


def _checked(func: torch._ops.OpOverload, args: tuple[Any, ...],
             kwargs: dict[str, Any] | None = None) -> torch.dtype:
    """The dense result's dtype, or dense's error (the same on every rank: global sizes;
    :func:`~dispatch_shard.authoring.meta_results`)."""
    kwargs = kwargs or {}
    key: tuple[Any, ...] | None = (
        id(func), *[(a._layout, a._dtype) if type(a) is ShardedTensor else _key(a)
                    for a in args], *kwargs.items())
    try:
        found = _VERDICTS.get(key)  # type: ignore[arg-type]
    except TypeError:  # an unhashable argument
        key, found = None, None
    if found is not None:
        return found
    # dense_kernels: meta accepts products the CPU kernel lacks (bool): they must raise
    # on every rank, not only where a block meets the kernel.
    ((_, dtype),) = meta_results(func, args, kwargs, dense_kernels=True)
    if key is not None and len(_VERDICTS) < 4096:
        _VERDICTS[key] = dtype
    return dtype


# -- strategies --------------------------------------------------------------------------

@dataclass(frozen=True)
class Strategy:
    """How to compute a product: the layout each operand is moved to and the result's.

    ``kind`` is one of ``"rows"``, ``"cols"``, ``"contraction"``, ``"batch"``,
    ``"replicate"``, ``"partial"``; ``a`` / ``b`` are the operands' target layouts.
    """

    kind: str
    a: Layout
    b: Layout
    out: Layout


def _device_of(layout: Layout) -> str:
    if layout.device:
        return layout.device
    placement = layout.shards[0].placement if layout.shards else None
    return str(placement.device()) if placement is not None else "cpu"


def _same_blocks(src: Layout, dst: Layout) -> bool:
    """Whether ``src``'s local blocks already are ``dst``'s (no copy needed)."""
    if src is dst:
        return True
    return src.is_sharded and dst.is_sharded and src.shards == dst.shards


def _overlap(first: Any, second: Any) -> int:
    volume = 1
    for o1, n1, o2, n2 in zip(first.shard_offsets, first.shard_sizes, second.shard_offsets,
                              second.shard_sizes, strict=True):
        length = min(o1 + n1, o2 + n2) - max(o1, o2)
        if length <= 0:
            return 0
        volume *= length
    return volume


@functools.lru_cache(maxsize=4096)
def _elements_sent(src: Layout, dst: Layout) -> int:
    """Elements sent across ranks to lay ``src``'s value out as ``dst`` (global, see
    NOTE [choosing a matmul strategy])."""
    if _same_blocks(src, dst) or src.is_replicate:
        return 0
    numel = src.size.numel()
    world = len(src.group_ranks)
    if src.is_partial:
        if dst.is_partial and dst.spec == src.spec:
            return 0
        return 2 * (world - 1) * numel  # all-reduce, then local slicing
    sent = 0
    for target in dst.shards:
        for block in src.shards:
            if block.placement.rank() != target.placement.rank():  # type: ignore[union-attr]
                sent += _overlap(block, target)
    return sent


@functools.lru_cache(maxsize=1024)
def choose_strategy(a: Layout, b: Layout, a_itemsize: int, b_itemsize: int,
                    out_itemsize: int) -> Strategy:
    """The strategy for ``a @ b`` (2-D, or 3-D with a batch dim 0); see
    NOTE [choosing a matmul strategy]. Both layouts are on the same group."""
    ndim = len(a.size)
    group = a.group_ranks
    device = _device_of(a)
    out_size = torch.Size([*a.size[:-1], b.size[-1]])
    pool: list[tuple[Any, ...]] = []
    for layout in (a, b):
        spec = layout.spec
        if isinstance(spec, ChunkShardingSpec) and spec.placements not in pool:
            pool.append(spec.placements)
    if not pool:
        pool.append(tuple(f"rank:{r}/{device}" for r in group))

    def chunk(dim: int, placements: tuple[Any, ...]) -> ChunkShardingSpec:
        return ChunkShardingSpec(dim, placements)

    replicate = Replicate()
    # (kind, spec of a or None to keep a, spec of b or None, spec of the result)
    candidates: list[tuple[str, ShardingSpec | None, ShardingSpec | None, ShardingSpec]] = []
    for placements in pool:
        rows = chunk(ndim - 2, placements)
        cols = chunk(ndim - 1, placements)
        if ndim == 3:
            batch = chunk(0, placements)
            candidates.append(("batch", batch, batch, batch))
        candidates.append(("rows", rows, replicate, rows))
        candidates.append(("cols", replicate, cols, cols))
        candidates.append(("contraction", cols, rows, Partial("sum")))
    if ndim == 3:
        # Blocks that split the batch dim only, kept as they are (several per rank: the
        # pieces of NOTE [views that cut blocks into pieces] in ops/reshape.py); the other
        # operand laid out on the same batch blocks.
        for position, layout in enumerate((a, b)):
            # (An empty block must be empty along the batch dim: the other operand's
            # block on it is then empty too, never overlapping a real one; and whole
            # along the others, where its product with the other block must fit.)
            if layout.is_sharded and split_dims(layout) <= {0} and all(
                    (s.shard_sizes[0] == 0 or 0 not in s.shard_sizes)
                    and list(s.shard_sizes[1:]) == list(layout.size[1:])
                    for s in layout.shards):
                other = b if position == 0 else a
                other_spec = like_leading(layout, 1, other.size).spec
                out_spec = like_leading(layout, 1, out_size).spec
                candidates.append(("batch", None, other_spec, out_spec) if position == 0
                                  else ("batch", other_spec, None, out_spec))
    for position, layout in enumerate((a, b)):
        spec = layout.spec
        if isinstance(spec, Partial) and spec.reduce_op in _LINEAR_REDUCE_OPS:
            # Keep this operand's summands; the other one is made whole.
            candidates.append(("partial", None, replicate, spec) if position == 0
                              else ("partial", replicate, None, spec))
    candidates.append(("replicate", replicate, replicate, replicate))

    world = len(group)
    best: tuple[tuple[Any, ...], Strategy] | None = None
    for order, (kind, a_spec, b_spec, out_spec) in enumerate(candidates):
        a_dst = a if a_spec is None else a.with_spec(a_spec)
        b_dst = b if b_spec is None else b.with_spec(b_spec)
        out = layout_of(out_spec, out_size, group, device)
        now = (_elements_sent(a, a_dst) * a_itemsize + _elements_sent(b, b_dst) * b_itemsize)
        later = 2 * (world - 1) * out_size.numel() * out_itemsize if out.is_partial else 0
        copies = (not _same_blocks(a, a_dst)) + (not _same_blocks(b, b_dst))
        key = (now > 0, now + later, copies, order)
        if best is None or key < best[0]:
            best = (key, Strategy(kind, a_dst, b_dst, out))
    assert best is not None
    return best[1]


# -- computing -----------------------------------------------------------------------------

def _as_sharded(value: Any, anchor: ShardedTensor) -> ShardedTensor:
    """A ShardedTensor operand; a plain tensor becomes a replicated one (no communication)."""
    if isinstance(value, ShardedTensor):
        if value._layout.group_ranks != anchor._layout.group_ranks:
            raise ValueError(
                "matrix product of ShardedTensors on different process groups: ranks "
                f"{list(anchor._layout.group_ranks)} and {list(value._layout.group_ranks)}"
            )
        return value
    layout = layout_of(Replicate(), value.shape, anchor._layout.group_ranks,
                       _device_of(anchor._layout))
    member = bool(layout.local_indices(anchor._rank))
    return anchor._like([value] if member else [], layout, value.dtype)


def _laid_out(x: ShardedTensor, dst: Layout) -> list[torch.Tensor]:
    if _same_blocks(x._layout, dst):
        return x._local_tensors
    return x._redistributed(dst.spec)._local_tensors


# NOTE [a product of a transposed block is column-major]
# Dense autograd computes a weight's gradient in the weight's memory order: for
# ``x @ w.t()`` it sees that ``w.t()`` is column-major and computes ``(g.t() @ x).t()``,
# so that the gradient of ``w`` is contiguous. A ShardedTensor always reports contiguous
# strides, so autograd takes the other form, ``x.t() @ g``, whose transpose (the
# gradient of ``w``) would have transposed blocks, and AccumulateGrad, the leaf hook and
# the optimizer would copy or read them strided every step. So a block product whose
# left block is a column-major transpose is computed as dense does in that case,
# ``(b.t() @ a.t()).t()``: the same kernel call (the same value, bit for bit, as the
# dense formula), a column-major block, and its transpose, the gradient, contiguous.

def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of two 2-D blocks; column-major when ``a`` is (NOTE above)."""
    if a.stride(0) == 1 and a.stride(1) == a.shape[0] and a.shape[0] > 1 and a.shape[1] > 1 \
            and b.is_contiguous():
        return torch.mm(b.t(), a.t()).t()
    return torch.mm(a, b)


def _product(a: Any, b: Any, alpha: Any, dtype: torch.dtype,
             bias: tuple[Any, Any] | None = None) -> ShardedTensor:
    """``alpha * (a @ b)`` for 2-D or 3-D (batched) operands, by the chosen strategy;
    may be partial (see the module docstring for per-rank shapes and collectives).

    ``bias``: ``(bias, beta)`` for ``addmm``: ``beta * bias`` is added. A dense bias that
    broadcasts along rows (``[N]`` or ``[1, N]``) is fused into each block's product (one
    ``addmm`` per block) where the blocks are whole rows of the result; other biases
    are added after (:func:`_add_bias`)."""
    anchor = first_sharded((a, b), {})
    a, b = _as_sharded(a, anchor), _as_sharded(b, anchor)
    itemsize = dtype.itemsize
    strategy = choose_strategy(a._layout, b._layout, a.element_size(), b.element_size(),
                               itemsize)
    a_blocks = _laid_out(a, strategy.a)
    b_blocks = _laid_out(b, strategy.b)
    multiply: Callable[..., torch.Tensor] = aten.bmm.default if a.dim() == 3 else _mm
    out = strategy.out
    member = bool(out.local_indices(anchor._rank)) if not out.is_sharded else True
    kind = strategy.kind
    blocks: list[torch.Tensor]
    row = None if bias is None or kind not in ("rows", "replicate") or a.dim() != 2 \
        else _row_bias(bias[0], dtype)
    if row is not None:
        blocks = [aten.addmm.default(row, x, b_blocks[0], beta=bias[1], alpha=alpha)  # type: ignore[index]
                  for x in a_blocks] if kind == "rows" or member else []
        return anchor._like(blocks, out, dtype)
    if kind == "rows":
        blocks = [multiply(x, b_blocks[0]) for x in a_blocks]
    elif kind == "cols":
        blocks = [multiply(a_blocks[0], y) for y in b_blocks]
    elif kind == "batch":
        blocks = [multiply(x, y) for x, y in zip(a_blocks, b_blocks, strict=True)]
    elif kind == "contraction":
        blocks = []
        if member:
            pairs = list(zip(a_blocks, b_blocks, strict=True))
            if not pairs:
                blocks = [torch.zeros(out.size, dtype=dtype, device=anchor.device)]
            else:  # (the common case, one pair: its product is the summand, no copy)
                total = multiply(*pairs[0])
                for x, y in pairs[1:]:
                    total = total.add_(multiply(x, y))
                blocks = [total]
    else:  # replicate, partial: one whole block (or summand) on each member
        blocks = [multiply(a_blocks[0], b_blocks[0])] if member else []
    if alpha != 1:
        blocks = [block.mul_(alpha) for block in blocks]
    result = anchor._like(blocks, out, dtype)
    return result if bias is None else _add_bias(result, *bias)


def _whole_blocks(value: Any, anchor: ShardedTensor) -> torch.Tensor | None:
    """``value`` as a dense tensor on this rank (None on a rank outside the group)."""
    if not isinstance(value, ShardedTensor):
        return value  # type: ignore[no-any-return]
    blocks = value._redistributed(Replicate())._local_tensors
    return blocks[0] if blocks else None


def _aligned_chunk(out: ShardedTensor, bias: Any) -> bool:
    """Whether ``bias`` is chunk-sharded like ``out`` along the same (right-aligned) dim."""
    spec, bias_spec = out._layout.spec, getattr(bias, "_layout", None)
    if not isinstance(spec, ChunkShardingSpec) or bias_spec is None:
        return False
    bias_spec = bias_spec.spec
    if not isinstance(bias_spec, ChunkShardingSpec) or bias_spec.placements != spec.placements:
        return False
    lead = out.dim() - bias.dim()
    dim = spec.dim % out.dim()
    bias_dim = bias_spec.dim % bias.dim()
    return bool(lead >= 0 and bias_dim + lead == dim
                and bias.shape[bias_dim] == out.shape[dim])


def _add_bias(out: ShardedTensor, bias: Any, beta: Any) -> ShardedTensor:
    """``out + beta * bias`` (``out`` was just computed: its blocks are updated in place when
    that is cheaper); see NOTE [bias of a partial product]."""
    layout = out._layout
    if layout.is_partial:
        op = layout.spec.reduce_op  # type: ignore[attr-defined]
        if isinstance(bias, ShardedTensor) and bias._layout.spec == layout.spec:
            summands = bias._local_tensors
            for block, summand in zip(out._local_tensors, summands, strict=True):
                block.add_(summand, alpha=beta)
            return out
        whole = _whole_blocks(bias, out)
        if out._local_tensors and whole is not None and (
                op == "avg" or out._rank == layout.group_ranks[0]):
            out._local_tensors[0].add_(whole, alpha=beta)
        return out
    if _aligned_chunk(out, bias):
        for block, piece in zip(out._local_tensors, bias._local_tensors, strict=True):
            block.add_(piece, alpha=beta)
        return out
    if beta == 1:
        return aten.add.Tensor(out, bias)  # type: ignore[no-any-return]
    return aten.add.Tensor(out, bias, alpha=beta)  # type: ignore[no-any-return]


def _unsqueezed(value: Any, dim: int) -> Any:
    """``value.unsqueeze(dim)`` (a view of each block for a ShardedTensor)."""
    return aten.unsqueeze.default(value, dim)


# -- the ops ---------------------------------------------------------------------------------

@custom_sharded_op_impl(aten.mm.default, handles_partial=True)
def mm(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``a [M, K] @ b [K, N]``: rows ``[M/R, N]``, cols ``[M, N/R]``, partial ``[M, N]``
    (K split alike) or replicated, by the operands' layouts; fwd: none in those cases, else
    the moves of NOTE [choosing a matmul strategy]."""
    a, b = args
    dtype = _checked(aten.mm.default, (a, b))
    return _product(a, b, 1, dtype)


@custom_sharded_op_impl(aten.bmm.default, handles_partial=True)
def bmm(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``a [B, M, K] @ b [B, K, N]``: the ``mm`` rules on the last two dims, plus batch-sharded
    ``[B/R, M, N]`` when dim 0 is split alike (or one operand is replicated); collectives as
    ``mm``."""
    a, b = args
    dtype = _checked(aten.bmm.default, (a, b))
    return _product(a, b, 1, dtype)


def _add_product(func: torch._ops.OpOverload, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    """``beta * bias + alpha * (a @ b)`` for ``addmm``, ``baddbmm`` and ``addmv``."""
    bias, a, b = args
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    dtype = _checked(func, args, kwargs)
    if func is aten.addmv.default:
        product = aten.squeeze.dim(_product(a, _unsqueezed(b, 1), alpha, dtype), 1)
    elif func is aten.addmm.default and beta != 0:
        return _product(a, b, alpha, dtype, (bias, beta))
    else:
        product = _product(a, b, alpha, dtype)
    if beta == 0:
        return product  # dense ignores the bias (its nan and inf too)
    return _add_bias(product, bias, beta)


def _row_bias(bias: Any, dtype: torch.dtype) -> torch.Tensor | None:
    """``bias`` as a dense ``[N]`` or ``[1, N]`` tensor (a plain tensor, or a replicated
    ShardedTensor's block), or None."""
    if isinstance(bias, ShardedTensor):
        if not bias._layout.is_replicate or len(bias._local_tensors) != 1:
            return None
        bias = bias._local_tensors[0]
    if not isinstance(bias, torch.Tensor) or bias.dtype != dtype or bias.dim() > 2 or (
            bias.dim() == 2 and bias.shape[0] != 1):
        return None
    return bias


@custom_sharded_op_impl(aten.addmm.default, handles_partial=True)
def addmm(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``beta * bias + alpha * (a [M, K] @ b [K, N])``: the ``mm`` result, then the bias
    (NOTE [bias of a partial product]); fwd: ``mm``'s, plus a gather of a sharded bias that
    is not laid out like the result."""
    return _add_product(aten.addmm.default, args, kwargs)


@custom_sharded_op_impl(aten.baddbmm.default, handles_partial=True)
def baddbmm(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``beta * bias + alpha * (a [B, M, K] @ b [B, K, N])``: ``bmm``, then the bias as
    ``addmm``."""
    return _add_product(aten.baddbmm.default, args, kwargs)


@custom_sharded_op_impl(aten.mv.default, handles_partial=True)
def mv(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``a [M, K] @ v [K]``: ``mm`` of ``a`` and ``v`` as a ``[K, 1]`` column (a view), then the
    column dropped; collectives as ``mm``."""
    a, v = args
    dtype = _checked(aten.mv.default, (a, v))
    return aten.squeeze.dim(_product(a, _unsqueezed(v, 1), 1, dtype), 1)


@custom_sharded_op_impl(aten.addmv.default, handles_partial=True)
def addmv(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``beta * bias + alpha * (a [M, K] @ v [K])``: ``mv``, then the bias as ``addmm``."""
    return _add_product(aten.addmv.default, args, kwargs)


@custom_sharded_op_impl(aten.dot.default, handles_partial=True)
def dot(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``a [K] . b [K]``: ``mm`` of ``[1, K]`` and ``[K, 1]`` views, then both dims dropped;
    K split alike on both -> a partial scalar; collectives as ``mm``."""
    a, b = args
    dtype = _checked(aten.dot.default, (a, b))
    product = _product(_unsqueezed(a, 0), _unsqueezed(b, 1), 1, dtype)
    return aten.squeeze.dims(product, [0, 1])
