"""Global ops computed on the whole value: linear algebra of a matrix (factorizations,
solves, inverses), ``unique``/``nonzero``/``masked_select`` (whose output size
depends on every element), histograms, ``searchsorted``, the CTC loss, pairwise distances
and a few others whose every output element can depend on every input element.

Each gathers its ShardedTensor operands and runs the op on the whole values, the same
on every rank, so its results are replicated (NOTE [replicated fallback] in
:mod:`dispatch_shard.ops.view`). Collectives: one all-to-all per sharded operand.
Correct for any layout, but as costly as the gather: an op here is never a fast path.

Not here: random ops (each rank would draw its own values), views (a gathered copy is
no view), in-place resizes and sparse results.
"""

from __future__ import annotations

from typing import Any

import torch

from dispatch_shard.ops._common import replicated_fallback
from dispatch_shard.registry import custom_sharded_op_impl

aten = torch.ops.aten

__all__ = ["whole_value_overloads"]

_NAMES = (
    # linear algebra
    "_linalg_check_errors.default", "_linalg_det.default", "_linalg_eigh.default",
    "_linalg_slogdet.default",
    "_linalg_solve_ex.default", "_linalg_svd.default", "cholesky.default",
    "cholesky_inverse.default", "cholesky_solve.default", "geqrf.default",
    "linalg_cholesky_ex.default", "linalg_eig.default", "linalg_householder_product.default",
    "linalg_inv_ex.default", "linalg_ldl_factor_ex.default", "linalg_ldl_solve.default",
    "linalg_lstsq.default", "linalg_lu.default", "linalg_lu_factor_ex.default",
    "linalg_lu_solve.default", "linalg_matrix_exp.default", "linalg_pinv.atol_rtol_tensor",
    "linalg_qr.default", "linalg_solve_triangular.default", "lu_unpack.default",
    "ormqr.default", "triangular_solve.default",
    # outputs sized by the data
    "_unique.default", "_unique2.default", "unique_consecutive.default", "unique_dim.default",
    "nonzero.default", "nonzero_static.default", "masked_select.default",
    "repeat_interleave.Tensor", "bincount.default",
    # order statistics of all elements
    "median.default", "nanmedian.default",
    # histograms and searches
    "histc.default", "histogram.bin_ct", "histogram.bins_tensor",
    "_histogramdd_bin_edges.default", "_histogramdd_from_bin_cts.default",
    "_histogramdd_from_bin_tensors.default",
    "searchsorted.Scalar", "searchsorted.Tensor",
    # CTC: every output reads a whole sequence (one alignment lattice per batch entry)
    "_ctc_loss.default", "_ctc_loss.Tensor", "_ctc_loss_backward.default",
    "_ctc_loss_backward.Tensor",
    # the rest
    "_cdist_forward.default", "_pdist_forward.default", "_trilinear.default",
    "addbmm.default", "segment_reduce.default", "index_reduce.default",
    "masked_scatter.default", "fractional_max_pool2d.default", "hash_tensor.default",
    "fractional_max_pool3d.default", "put.default",
    # backward kernels of ops above: each gradient element can depend on every element
    # (the masked positions before it, a segment's other values, every pair's distance)
    "_cdist_backward.default", "_pdist_backward.default", "_segment_reduce_backward.default",
    "masked_scatter_backward.default",
)

_REGISTERED: list[torch._ops.OpOverload] = []


def whole_value_overloads() -> list[torch._ops.OpOverload]:
    """The overloads this module serves on the whole value."""
    return list(_REGISTERED)


def _register(func: torch._ops.OpOverload) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        return replicated_fallback(func, args, kwargs)

    impl.__name__ = impl.__qualname__ = f"whole_{func.name().split('::')[1]}"
    impl.__doc__ = (f"``{func}`` on the whole values: gathered operands, a replicated "
                    "result (see the module docstring).")
    custom_sharded_op_impl(func, handles_partial=True)(impl)
    _REGISTERED.append(func)


for _name in _NAMES:
    _packet, _overload = _name.split(".")
    _func = getattr(getattr(aten, _packet), _overload)
    assert torch.Tag.nondeterministic_seeded not in _func.tags, _func
    _register(_func)
