"""Complex numbers: the lazy conjugate and negative views, ``view_as_real`` /
``view_as_complex``, and FFTs block by block.

The rest of complex arithmetic needs nothing of its own: pointwise ops, matmuls,
reductions and collectives serve complex blocks as they serve real ones (collectives
ship raw bytes; a sum all-reduce of complex blocks is the sum of their real pairs).

Per rank, with ``[b_i]`` this rank's blocks:

- ``x._conj()`` / ``x._neg_view()`` (what ``x.conj()`` and ``x.conj().imag`` call):
  ``[conj_physical(b_i)]`` / ``[neg(b_i)]``, same layout (NOTE [no lazy conjugate
  blocks]). Both are real-linear, so a ``Partial("sum"|"avg")`` stays pending.
  Collectives: none.
- ``view_as_real(x)``: ``[view_as_real(b_i)]``, a trailing dim of 2 that no block
  splits; ``view_as_complex(x)``: the inverse, when no block splits the trailing dim
  of 2 (else the whole value, replicated). Both alias the blocks (a block whose
  strides cannot be viewed is copied first).
  Real-linear: a ``Partial("sum"|"avg")`` stays pending. Collectives: none.
- ``_fft_c2c`` / ``_fft_r2c`` / ``_fft_c2r`` (the whole ``torch.fft`` family) over
  ``dims``: when no transformed dim is split, each block is transformed
  (``[fft(b_i)]``; ``r2c``/``c2r`` resize the last transformed dim, which no block
  splits); the result keeps the layout, and a ``Partial("sum"|"avg")`` stays pending
  (FFTs are linear). Collectives: none. When a transformed dim is split, a chunked
  operand first moves its split to the largest dim not transformed (one
  all-to-all, NOTE [an FFT along a split dim]); a layout with no such dim is
  transformed whole (gathered, replicated result).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dispatch_shard.layout import Layout
from dispatch_shard.ops._common import meta_call, replicated_fallback
from dispatch_shard.ops.layouts import relayout, resized_layout, split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import ChunkShardingSpec

aten = torch.ops.aten

__all__ = ["fft", "view_as_complex", "view_as_real"]


def _linear_operand(x: ShardedTensor) -> ShardedTensor:
    """``x``, reduced first unless it is a sum or mean pending (real-linear ops keep those)."""
    if x._layout.is_partial and x._layout.reduce_op not in ("sum", "avg"):
        return x._reduced()
    return x


# -- the conjugate and negative views --------------------------------------------------

# NOTE [no lazy conjugate blocks]
# Dense ``x.conj()`` is a lazy view: torch sets the conjugate bit and the kernels of
# the Conjugate dispatch key resolve it. Inside ``__torch_dispatch__`` that key is
# excluded for the blocks too, so an op on a block with the bit would read its stored
# (unconjugated) values: ``x.conj() * x`` would be ``x * x``. The blocks of
# ``x.conj()`` are therefore conjugated copies: the values are dense's, but, unlike
# dense, writing into ``x.conj()`` does not change ``x`` (as for the views of NOTE
# [replicated fallback] in :mod:`dispatch_shard.ops.view`).

_PHYSICAL = {aten._conj.default: torch.conj_physical, aten._neg_view.default: torch.neg}


def _register_conj_view(func: torch._ops.OpOverload) -> None:
    physical = _PHYSICAL[func]

    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        x = _linear_operand(args[0])
        return x._like([physical(b) for b in x._local_tensors])

    impl.__name__ = impl.__qualname__ = f"sharded{func.name().split('::')[1].split('.')[0]}"
    impl.__doc__ = (f"``{func}``: each block {physical.__name__}-ed (NOTE [no lazy conjugate "
                    "blocks]), same layout; a sum or mean Partial stays pending; no "
                    "collectives.")
    custom_sharded_op_impl(func, handles_partial=True, handles_mesh=True)(impl)


for _func in _PHYSICAL:
    _register_conj_view(_func)


# -- real and complex views ------------------------------------------------------------

def _viewable(block: torch.Tensor, view: Any) -> torch.Tensor:
    """``view(block)``, or of a fresh copy where torch cannot view its strides or storage
    offset (``contiguous()`` would keep an odd offset: an error on this rank only)."""
    try:
        return view(block)  # type: ignore[no-any-return]
    except RuntimeError:
        return view(block.clone(memory_format=torch.contiguous_format))  # type: ignore[no-any-return]


def _with_trailing(layout: Layout) -> Layout:
    """``layout`` with a trailing dim of 2 that every block spans (``view_as_real``)."""
    size = [*layout.size, 2]
    chunk_dim = _chunk_dim(layout)
    return relayout(layout, size, chunk_dim,
                    lambda o, s: ([*o, 0], [*s, 2]))


def _without_trailing(layout: Layout) -> Layout:
    """``layout`` without its trailing dim, which every block spans (``view_as_complex``)."""
    size = list(layout.size[:-1])
    chunk_dim = _chunk_dim(layout)
    if chunk_dim == len(size):  # chunked along the dim that goes (one block spans it)
        chunk_dim = None
    return relayout(layout, size, chunk_dim, lambda o, s: (o[:-1], s[:-1]))


def _chunk_dim(layout: Layout) -> int | None:
    spec = layout.spec
    return spec.dim % len(layout.size) if isinstance(spec, ChunkShardingSpec) else None


@custom_sharded_op_impl(aten.view_as_real.default, handles_partial=True)
def view_as_real(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``torch.view_as_real(x)``: each block viewed, a trailing dim of 2; no collectives."""
    x = args[0]
    meta_call(torch.view_as_real, (x,), {})  # dense's errors
    x = _linear_operand(x)
    blocks = [_viewable(b, torch.view_as_real) for b in x._local_tensors]
    return x._like(blocks, _with_trailing(x._layout), torch.empty(
        (), dtype=x.dtype).real.dtype)


@custom_sharded_op_impl(aten.view_as_complex.default, handles_partial=True)
def view_as_complex(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    pg: Any) -> Any:
    """``torch.view_as_complex(x)``: each block viewed, the trailing dim of 2 dropped; no
    collectives (the whole value, replicated, when a block splits that dim)."""
    x = args[0]
    meta = meta_call(torch.view_as_complex, (x,), {})[0]
    if x.dim() - 1 in split_dims(x._layout):
        return replicated_fallback(aten.view_as_complex.default, args, kwargs)
    x = _linear_operand(x)
    blocks = [_viewable(b, torch.view_as_complex) for b in x._local_tensors]
    return x._like(blocks, _without_trailing(x._layout), meta.dtype)


# -- FFTs ------------------------------------------------------------------------------

# NOTE [an FFT along a split dim]
# Every output element of an FFT mixes every input element along the transformed dims,
# so no block of a split transformed dim can be transformed alone. Rather than gather
# the whole value on every rank (memory and work O(whole) per rank), a chunked operand
# moves its split to another dim first: the largest dim not transformed, so the blocks
# stay about even. One all-to-all, then each rank transforms its blocks; the result
# keeps that layout. Only when every dim is transformed (or the layout is a grid) is
# the whole value transformed on every rank.

_FFTS = (aten._fft_c2c.default, aten._fft_r2c.default, aten._fft_c2r.default)


def _fft_size(func: torch._ops.OpOverload, x: ShardedTensor, dims: Sequence[int],
              extra: Sequence[Any]) -> int | None:
    """The new length of the last transformed dim (None: unchanged)."""
    last = dims[-1]
    if func is aten._fft_r2c.default:
        return x.shape[last] // 2 + 1 if extra[1] else None  # (normalization, onesided)
    if func is aten._fft_c2r.default:
        return int(extra[1])  # (normalization, last_dim_size)
    return None


def fft(func: torch._ops.OpOverload) -> None:
    """Register the FFT ``func`` (see the module docstring)."""

    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        x, dims, *extra = args
        dims = [d % x.dim() for d in dims]
        meta = meta_call(func, (x, dims, *extra), {})[0]
        x = _linear_operand(x)
        length = _fft_size(func, x, dims, extra)
        resized_chunk = length is not None and _chunk_dim(x._layout) == dims[-1]
        if set(dims) & split_dims(x._layout) or resized_chunk:
            spec = x._layout.spec
            others = [d for d in range(x.dim()) if d not in dims]
            if not isinstance(spec, ChunkShardingSpec) or not others:
                return replicated_fallback(func, (x, dims, *extra), kwargs)
            target = max(others, key=lambda d: (x.shape[d], -d))
            x = x._redistributed(ChunkShardingSpec(target, spec.placements))
        layout = x._layout if length is None else resized_layout(x._layout, dims[-1], length)
        blocks = [func(b, dims, *extra) if b.numel() else  # (MKL refuses empty transforms)
                  torch.empty(layout.shards[i].shard_sizes, dtype=meta.dtype, device=b.device)
                  for b, i in zip(x._local_tensors, layout.local_indices(x._rank),
                                  strict=True)]
        return x._like(blocks, layout, meta.dtype)

    impl.__name__ = impl.__qualname__ = f"sharded{func.name().split('::')[1].split('.')[0]}"
    impl.__doc__ = (f"``{func}``: each block transformed when no transformed dim is split "
                    "(else the split moves first: one all-to-all); see the module docstring.")
    custom_sharded_op_impl(func, handles_partial=True)(impl)


for _func in _FFTS:
    fft(_func)
