"""Aliasing, copying and whole-tensor queries.

``detach``/``alias``: new wrapper, the same blocks; collectives: none.
``clone``: copies each block; collectives: none.
These three keep any layout, N-D ones (and their pending terms) included.
``is_pinned``: every local block pinned; collectives: none.
``equal``: local ``torch.equal`` per block, then an all-reduce(min) of the verdict.
``resize_``/``resize_as_``: ``x`` takes the blocks and layout of its first ``prod(size)``
elements reshaped (zeros past its end, where dense leaves memory uninitialised); the
collectives are those of that reshape (none where the view stays in the blocks).
``to_sparse`` and the other sparse conversions raise NotImplementedError: blocks are
strided tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._mode_utils import no_dispatch

from dispatch_shard import collectives
from dispatch_shard.ops._common import bind_arguments, map_blocks
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

aten = torch.ops.aten


@custom_sharded_op_impl(aten.detach.default, handles_partial=True, handles_mesh="pending")
def detach(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], process_group: Any) -> Any:
    """``x -> x``: a new ShardedTensor on the same blocks (detached); no collectives."""
    tensor: ShardedTensor = args[0]
    return tensor._like(list(tensor._local_tensors))


custom_sharded_op_impl(aten.alias.default, handles_partial=True, handles_mesh="pending")(detach)


@custom_sharded_op_impl(aten.zero_.default, handles_partial=True, handles_mesh="pending")
def zero_(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], process_group: Any) -> Any:
    """``x.zero_()``: each block zeroed in place, whatever the layout (zero summands sum,
    average or take the max to zero: a pending gradient stays pending, at zero, as
    ``zero_grad(set_to_none=False)`` leaves it); no collectives."""
    tensor: ShardedTensor = args[0]
    for block in tensor._local_tensors:
        block.zero_()
    return tensor


@custom_sharded_op_impl(aten.clone.default, handles_partial=True, handles_mesh="pending")
def clone(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], process_group: Any) -> Any:
    """``x -> copy of x``, each block cloned contiguous; no collectives."""
    return map_blocks(args[0], lambda block: block.clone())


@custom_sharded_op_impl(aten.is_pinned.default, handles_partial=True, handles_mesh="pending")
def is_pinned(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
              process_group: Any) -> bool:
    """True when this rank holds blocks and all are pinned; no collectives."""
    blocks = args[0]._local_tensors
    return bool(blocks) and all(b.is_pinned() for b in blocks)


@custom_sharded_op_impl(aten.equal.default, handles_partial=True)
def equal(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], process_group: Any) -> bool:
    """Same size and values on every rank; one all-reduce(min) of the local verdict.

    Operands with different layouts are compared after moving the second to
    the first's layout; a plain operand is a replicated value, compared block by block.
    """
    first, second = args
    if not isinstance(first, ShardedTensor):
        first, second = second, first
    if first.shape != second.shape:
        return False
    first = first._reduced()
    layout = first._layout
    if isinstance(second, ShardedTensor):
        second = second._reduced()
        if second._layout is not layout:
            second = second._redistributed(layout.spec)
        others = list(second._local_tensors)
    else:
        # A plain tensor is a replicated value: each block meets its own part of it.
        others = [second[layout.shard_box(i)] for i in layout.local_indices(first._rank)]
    verdict = all(
        torch.equal(a, b) for a, b in zip(first._local_tensors, others, strict=True)
    )
    group = first._process_group
    if not collectives.is_member(group, first._rank):
        return verdict
    flag = torch.tensor([1 if verdict else 0], dtype=torch.int32, device=first.device)
    return bool(collectives.all_reduce(flag, "min", group).item())


@custom_sharded_op_impl(aten._local_scalar_dense.default, handles_partial=True)
def local_scalar_dense(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                       process_group: Any) -> Any:
    """``x.item()`` of a one-element tensor: the Python number on every rank. Replicated:
    local; sharded or partial: whichever collective ``full_tensor`` needs (every rank of the
    group calls ``item()``, as with any collective)."""
    tensor: ShardedTensor = args[0]
    if tensor.numel() != 1:
        raise RuntimeError(
            f"a Tensor with {tensor.numel()} elements cannot be converted to Scalar")
    if tensor._layout.is_replicate and tensor._local_tensors:
        return tensor._local_tensors[0].item()
    return tensor.full_tensor().item()


@custom_sharded_op_impl(aten.allclose.default, handles_partial=True)
def allclose(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             process_group: Any) -> bool:
    """``torch.allclose(a, b, rtol, atol, equal_nan)``: ``isclose`` (pointwise, operands
    moved to one layout) then ``all()`` (one all-reduce); a Python bool on every rank."""
    first, second = args[0], args[1]
    options = dict(zip(("rtol", "atol", "equal_nan"), args[2:], strict=False))
    options.update(kwargs)
    return bool(torch.isclose(first, second, **options).all().item())


def _resize_wrapper(x: ShardedTensor, size: torch.Size) -> None:
    """``x``'s own (wrapper) sizes become ``size``, contiguous: the meta kernel of
    ``resize_`` on the data-less wrapper (it also grows the wrapper's nominal storage,
    which ``as_strided_`` would refuse; compare NOTE [in-place views] in ops/view.py)."""
    with no_dispatch():
        meta_in_tls = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            aten.resize_.default(x, list(size))
        finally:
            torch._C._set_meta_in_tls_dispatch_include(meta_in_tls)


def _resized(x: ShardedTensor, size: list[int]) -> ShardedTensor:
    """``x``'s first ``prod(size)`` row-major elements as ``size``, zeros past its end."""
    if size == list(x.shape):
        return x
    length = math.prod(size)
    flat = aten.view.default(x, [x.numel()])
    if length < x.numel():
        flat = aten.slice.Tensor(flat, 0, 0, length)
    elif length > x.numel():
        tail = torch.zeros(length - x.numel(), dtype=x.dtype, device=x.device)
        flat = aten.cat.default([flat, tail])
    return aten.view.default(flat, size)  # type: ignore[no-any-return]


@custom_sharded_op_impl(aten.resize_.default, handles_partial=True)
def resize_(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
            process_group: Any) -> Any:
    """``x.resize_(size)``, as dense on a contiguous tensor: the same elements in row-major
    order, cut or extended (with zeros) to ``prod(size)``. ``x`` takes the result's blocks
    and layout (those of ``view``, gathered where the reshape crosses blocks; a Partial
    stays Partial). A memory format other than contiguous: NotImplementedError, since every
    ShardedTensor is contiguous."""
    func = aten.resize_.default
    bound = bind_arguments(func, args, kwargs)
    x, size, memory_format = bound["self"], [int(n) for n in bound["size"]], \
        bound["memory_format"]
    torch.empty(0, device="meta").resize_(size)  # dense's errors (negative sizes)
    if memory_format not in (None, torch.contiguous_format, torch.preserve_format):
        raise NotImplementedError(
            f"{func} with memory_format={memory_format} not supported for ShardedTensor!")
    result = _resized(x, size)
    if result is not x:
        x._local_tensors = list(result._local_tensors)
        x._layout = result._layout
        _resize_wrapper(x, result.shape)
    return x


@custom_sharded_op_impl(aten.resize_as_.default, handles_partial=True)
def resize_as_(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               process_group: Any) -> Any:
    """``x.resize_as_(template)``: ``x.resize_(template.shape)`` (see :func:`resize_`); a
    plain ``x`` with a sharded template is resized as the plain tensor it is."""
    bound = bind_arguments(aten.resize_as_.default, args, kwargs)
    x, size = bound["self"], list(bound["the_template"].shape)
    if not isinstance(x, ShardedTensor):
        return x.resize_(size, memory_format=bound["memory_format"])
    return aten.resize_.default(x, size, memory_format=bound["memory_format"])


def to_sparse(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
              process_group: Any) -> Any:
    """Sparse layouts are not supported: a ShardedTensor's blocks are strided tensors.
    Raises the same NotImplementedError on every rank, with no collective."""
    raise NotImplementedError(
        "dispatch_shard: sparse layouts are not supported (a ShardedTensor's blocks are "
        "strided tensors); to get a sparse tensor, convert the whole value: "
        "x.full_tensor().to_sparse()")


for _packet in (aten._to_sparse, aten._to_sparse_csr, aten._to_sparse_csc, aten._to_sparse_bsr,
                aten._to_sparse_bsc, aten.to_sparse, aten.sparse_mask):
    custom_sharded_op_impl(_packet, handles_partial=True, handles_mesh=True)(to_sparse)
