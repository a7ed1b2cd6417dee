"""The ShardedTensor core: creation, metadata, local data, gather, pickling, the op registry.

The behaviours are those of PyTorch's legacy ShardedTensor tests
(``test/distributed/_shard/sharded_tensor/test_sharded_tensor.py``), adapted
to CPU shards on gloo (``"rank:N/cpu"`` placements). Layout changes
(``reshard`` / ``redistribute``) are in ``test_reshard.py``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dispatch_shard as ds
from dispatch_shard import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    Replicate,
    Shard,
    ShardedTensor,
    ShardMetadata,
    registry,
)
from dispatch_shard.testing import get_pool, multi_rank

CONTIGUOUS_ONLY = re.escape("Only torch.contiguous_format memory_format is currently supported")
STRIDED_ONLY = re.escape("Only torch.strided layout is currently supported")
SINGLE_SHARD_ONLY = re.escape("Only single local shard is supported.")

# -- helpers ---------------------------------------------------------------------


def chunk_spec(dim: int, ranks: list[int]) -> ChunkShardingSpec:
    return ChunkShardingSpec(dim=dim, placements=[f"rank:{r}/cpu" for r in ranks])


def grid_spec(rows: int, cols: int, owners: list[int]) -> EnumerableShardingSpec:
    """A 2x2 grid of blocks, row-major, block ``i`` on ``owners[i]``."""
    top, left = (rows + 1) // 2, (cols + 1) // 2
    boxes = [([0, 0], [top, left]), ([0, left], [top, cols - left]),
             ([top, 0], [rows - top, left]), ([top, left], [rows - top, cols - left])]
    return EnumerableShardingSpec([
        ShardMetadata(offsets, sizes, f"rank:{owner}/cpu")
        for (offsets, sizes), owner in zip(boxes, owners, strict=True)
    ])


def box(metadata: ShardMetadata) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(metadata.shard_offsets, metadata.shard_sizes,
                                                  strict=True))


def chunk_lengths(length: int, pieces: int) -> list[int]:
    """Block lengths of ``torch.chunk`` semantics, padded with empty blocks to ``pieces``."""
    lengths = [len(c) for c in torch.arange(length).chunk(pieces)]
    return lengths + [0] * (pieces - len(lengths))


def check_local_shards_match(st: ShardedTensor, dense: torch.Tensor) -> None:
    """Every local shard holds the slice of ``dense`` its metadata names."""
    for shard in st.local_shards():
        assert torch.equal(shard.tensor, dense[box(shard.metadata)]), shard.metadata


def seeded(*size: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same dense tensor on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*size, generator=generator, dtype=dtype)


# -- the op registry (in-process) --------------------------------------------------

# Every built-in op and the module that registers it. A dropped import in
# ``ops/__init__.py`` (or an op moving family) fails the test below; extend it
# with each new op family.
BUILTIN_OPS = {
    "dispatch_shard.ops.advanced_indexing": [
        "aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
    ],
    "dispatch_shard.ops.attention": [
        "aten._scaled_dot_product_flash_attention_for_cpu.default",
        "aten._scaled_dot_product_flash_attention_for_cpu_backward.default",
    ],
    "dispatch_shard.ops.complex": [
        "aten._conj.default", "aten._fft_c2c.default", "aten._fft_c2r.default",
        "aten._fft_r2c.default", "aten._neg_view.default", "aten.view_as_complex.default",
        "aten.view_as_real.default",
    ],
    "dispatch_shard.ops.factory": [
        "aten.bernoulli_", "aten.cauchy_", "aten.empty_like", "aten.exponential_",
        "aten.full_like", "aten.geometric_", "aten.log_normal_", "aten.new_empty",
        "aten.new_empty_strided", "aten.new_full", "aten.new_ones", "aten.new_zeros",
        "aten.normal_", "aten.ones_like",
        "aten.rand_like", "aten.randn_like", "aten.random_", "aten.uniform_", "aten.zeros_like",
    ],
    "dispatch_shard.ops.embedding": [
        "aten._embedding_bag.default", "aten._embedding_bag_backward.default",
        "aten._embedding_bag_forward_only.default",
        "aten._embedding_bag_per_sample_weights_backward.default", "aten.embedding.default",
        "aten.embedding_dense_backward.default",
    ],
    "dispatch_shard.ops.indexing": [
        "aten.gather.default", "aten.index_add.default", "aten.index_add_.default",
        "aten.index_select.default", "aten.scatter.reduce", "aten.scatter.src",
        "aten.scatter.value", "aten.scatter.value_reduce", "aten.scatter_.reduce",
        "aten.scatter_.src", "aten.scatter_.value", "aten.scatter_.value_reduce",
        "aten.scatter_add.default",
        "aten.scatter_add_.default", "aten.scatter_reduce.two", "aten.scatter_reduce_.two",
    ],
    "dispatch_shard.ops.linear_cross_entropy": [
        "torch_nn._linear_cross_entropy_batch_chunked.default",
        "torch_nn._linear_cross_entropy_batch_chunked_no_reduction.default",
    ],
    "dispatch_shard.ops.losses": [
        "aten.mse_loss.default", "aten.mse_loss_backward.default",
        "aten.multi_margin_loss_backward.default",
        "aten.multilabel_margin_loss_backward.default",
        "aten.multilabel_margin_loss_forward.default",
        "aten.multilabel_margin_loss_forward.output",
        "aten.nll_loss_backward.default", "aten.nll_loss_forward.default",
    ],
    "dispatch_shard.ops.matmul": [
        "aten.addmm.default", "aten.addmv.default", "aten.baddbmm.default", "aten.bmm.default",
        "aten.dot.default", "aten.mm.default", "aten.mv.default",
    ],
    "dispatch_shard.ops.reduction": [
        "aten.all.default", "aten.all.dim", "aten.all.dims", "aten.amax.default",
        "aten.amin.default", "aten.any.default", "aten.any.dim", "aten.any.dims",
        "aten.count_nonzero.default", "aten.count_nonzero.dim_IntList", "aten.max.default",
        "aten.mean.default", "aten.mean.dim", "aten.min.default", "aten.nansum.default",
        "aten.prod.default", "aten.prod.dim_int", "aten.sum.default", "aten.sum.dim_IntList",
    ],
    "dispatch_shard.ops.arg_reduction": [
        "aten.argmax.default", "aten.argmin.default", "aten.max.dim", "aten.min.dim",
    ],
    "dispatch_shard.ops.norms": [
        "aten.linalg_vector_norm.default", "aten.std.correction", "aten.std_mean.correction",
        "aten.var.correction", "aten.var_mean.correction",
    ],
    "dispatch_shard.ops.softmax": [
        "aten._log_softmax.default", "aten._log_softmax_backward_data.default",
        "aten._softmax.default", "aten._softmax_backward_data.default",
        "aten.logsumexp.default",
    ],
    "dispatch_shard.ops.tensor_basics": [
        "aten._local_scalar_dense.default", "aten._to_sparse", "aten._to_sparse_bsc",
        "aten._to_sparse_bsr", "aten._to_sparse_csc", "aten._to_sparse_csr", "aten.alias.default",
        "aten.allclose.default", "aten.clone.default", "aten.detach.default", "aten.equal.default",
        "aten.is_pinned.default", "aten.resize_.default", "aten.resize_as_.default",
        "aten.sparse_mask", "aten.to_sparse", "aten.zero_.default",
    ],
    "dispatch_shard.ops.random_ops": [
        "aten._sample_dirichlet", "aten._standard_gamma", "aten.bernoulli", "aten.binomial",
        "aten.multinomial", "aten.poisson", "aten.randint_like", "aten.rrelu_with_noise",
    ],
    "dispatch_shard.ops.sorting": [
        "aten.cummax.default", "aten.cummin.default", "aten.kthvalue.default",
        "aten.median.dim", "aten.mode.default", "aten.nanmedian.dim", "aten.sort.default",
        "aten.sort.stable", "aten.topk.default",
    ],
    "dispatch_shard.ops.whole": [
        "aten._cdist_backward.default", "aten._cdist_forward.default", "aten._ctc_loss.Tensor",
        "aten._ctc_loss.default", "aten._ctc_loss_backward.Tensor",
        "aten._ctc_loss_backward.default", "aten._histogramdd_bin_edges.default",
        "aten._histogramdd_from_bin_cts.default", "aten._histogramdd_from_bin_tensors.default",
        "aten._linalg_check_errors.default", "aten._linalg_det.default",
        "aten._linalg_eigh.default", "aten._linalg_slogdet.default",
        "aten._linalg_solve_ex.default", "aten._linalg_svd.default",
        "aten._pdist_backward.default", "aten._pdist_forward.default",
        "aten._segment_reduce_backward.default", "aten._trilinear.default", "aten._unique.default",
        "aten._unique2.default", "aten.addbmm.default", "aten.bincount.default",
        "aten.cholesky.default",
        "aten.cholesky_inverse.default", "aten.cholesky_solve.default",
        "aten.fractional_max_pool2d.default", "aten.fractional_max_pool3d.default",
        "aten.geqrf.default", "aten.hash_tensor.default", "aten.histc.default",
        "aten.histogram.bin_ct", "aten.histogram.bins_tensor", "aten.index_reduce.default",
        "aten.linalg_cholesky_ex.default", "aten.linalg_eig.default",
        "aten.linalg_householder_product.default", "aten.linalg_inv_ex.default",
        "aten.linalg_ldl_factor_ex.default", "aten.linalg_ldl_solve.default",
        "aten.linalg_lstsq.default", "aten.linalg_lu.default", "aten.linalg_lu_factor_ex.default",
        "aten.linalg_lu_solve.default", "aten.linalg_matrix_exp.default",
        "aten.linalg_pinv.atol_rtol_tensor", "aten.linalg_qr.default",
        "aten.linalg_solve_triangular.default", "aten.lu_unpack.default",
        "aten.masked_scatter.default", "aten.masked_scatter_backward.default",
        "aten.masked_select.default", "aten.median.default", "aten.nanmedian.default",
        "aten.nonzero.default", "aten.nonzero_static.default", "aten.ormqr.default",
        "aten.put.default", "aten.repeat_interleave.Tensor", "aten.searchsorted.Scalar",
        "aten.searchsorted.Tensor", "aten.segment_reduce.default", "aten.triangular_solve.default",
        "aten.unique_consecutive.default", "aten.unique_dim.default",
    ],
    "dispatch_shard.ops.spatial": [
        "aten.avg_pool2d.default", "aten.avg_pool2d_backward.default",
        "aten.avg_pool3d.default", "aten.avg_pool3d_backward.default",
        "aten.convolution.default", "aten.convolution_backward.default",
        "aten.max_pool2d_with_indices.default",
        "aten.max_pool2d_with_indices_backward.default",
        "aten.max_pool3d_with_indices.default",
        "aten.max_pool3d_with_indices_backward.default",
    ],
    "dispatch_shard.ops.spatial_backward": [
        "aten._adaptive_avg_pool2d_backward.default", "aten._adaptive_avg_pool3d.default",
        "aten._adaptive_avg_pool3d_backward.default",
        "aten._upsample_bicubic2d_aa_backward.default", "aten._upsample_bilinear2d_aa.default",
        "aten._upsample_bilinear2d_aa_backward.default",
        "aten._upsample_nearest_exact1d_backward.default",
        "aten._upsample_nearest_exact2d_backward.default",
        "aten._upsample_nearest_exact3d_backward.default", "aten.adaptive_max_pool2d.default",
        "aten.adaptive_max_pool2d_backward.default", "aten.adaptive_max_pool3d.default",
        "aten.adaptive_max_pool3d_backward.default",
        "aten.fractional_max_pool2d_backward.default",
        "aten.fractional_max_pool3d_backward.default", "aten.grid_sampler_2d_backward.default",
        "aten.grid_sampler_3d.default", "aten.grid_sampler_3d_backward.default",
        "aten.reflection_pad1d_backward.default", "aten.reflection_pad2d_backward.default",
        "aten.reflection_pad3d_backward.default", "aten.replication_pad1d_backward.default",
        "aten.replication_pad2d_backward.default", "aten.replication_pad3d_backward.default",
        "aten.upsample_bicubic2d_backward.default", "aten.upsample_bilinear2d_backward.default",
        "aten.upsample_linear1d_backward.default", "aten.upsample_nearest1d_backward.default",
        "aten.upsample_nearest2d_backward.default", "aten.upsample_nearest3d_backward.default",
        "aten.upsample_trilinear3d_backward.default",
    ],
    "dispatch_shard.ops.scan": [
        "aten.cumprod.default", "aten.cumprod_.default", "aten.cumsum.default",
        "aten.cumsum_.default", "aten.logcumsumexp.default",
    ],
    "dispatch_shard.ops.strided": [
        "aten.as_strided.default", "aten.as_strided_scatter.default",
        "prims.as_strided_scatter.default",
    ],
    "dispatch_shard.ops.view": [
        "aten.detach_.default", "aten.diagonal.default", "aten.diagonal_scatter.default",
        "aten.expand.default", "aten.permute.default", "aten.select.int", "aten.slice.Tensor",
        "aten.slice_backward.default", "aten.slice_scatter.default", "aten.split.Tensor",
        "aten.split_with_sizes.default", "aten.squeeze.default",
        "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze_.default", "aten.squeeze_.dim",
        "aten.squeeze_.dims", "aten.t.default", "aten.t_.default", "aten.transpose.int",
        "aten.transpose_.default", "aten.unbind.int", "aten.unsqueeze.default",
        "aten.unsqueeze_.default",
    ],
    "dispatch_shard.ops.reshape": ["aten._unsafe_view.default", "aten.view.default"],
    "dispatch_shard.ops.copies": [
        "aten._to_copy.default", "aten.cat.default", "aten.copy_.default", "aten.flip.default",
        "aten.repeat.default", "aten.stack.default", "prims.copy_to.default",
    ],
}
# ops/pointwise.py serves every overload torch tags pointwise, and ops/foreach.py every
# elementwise _foreach_/fused optimizer overload: pinned to those derived sets.
POINTWISE_MODULE = "dispatch_shard.ops.pointwise"
FOREACH_MODULE = "dispatch_shard.ops.foreach"
# ops/decomposed.py fills in, through torch's decompositions, what no family serves.
DECOMPOSED_MODULE = "dispatch_shard.ops.decomposed"

_LIST_REGISTRY = """
import json
import dispatch_shard
from dispatch_shard import registry
from dispatch_shard.ops.decomposed import decomposed_overloads
from dispatch_shard.ops.foreach import foreach_overloads
from dispatch_shard.ops.pointwise import pointwise_overloads
tables = (registry.OVERLOADS, registry.PACKETS, registry.TORCH_FUNCTIONS)
print(json.dumps([{str(op): fn.__module__ for op, fn in table.items()} for table in tables]
                 + [sorted(str(op) for op in pointwise_overloads())]
                 + [sorted(str(op) for op in foreach_overloads())]
                 + [sorted(str(op) for op in decomposed_overloads())]))
"""


def test_builtin_ops_are_pinned() -> None:
    # A fresh interpreter: other test modules may import op modules themselves.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    listing = subprocess.run([sys.executable, "-c", _LIST_REGISTRY], env=env, check=True,
                             capture_output=True, text=True).stdout
    overloads, packets, torch_functions, tagged, foreach, decomposed = json.loads(listing)
    registered: dict[str, list[str]] = {}
    for name, module in sorted({**overloads, **packets}.items()):
        registered.setdefault(module, []).append(name)
    assert sorted(registered.pop(POINTWISE_MODULE)) == tagged
    assert len(tagged) > 500
    assert sorted(registered.pop(FOREACH_MODULE)) == sorted([*foreach, "aten._foreach_norm.Scalar"])
    assert len(foreach) > 200  # torch 2.13: 243 overloads
    assert sorted(registered.pop(DECOMPOSED_MODULE)) == decomposed
    assert "aten.huber_loss.default" in decomposed and "aten.to.dtype" in decomposed
    assert registered == BUILTIN_OPS
    assert torch_functions == {}  # no built-in op needs __torch_function__


def test_torch_function_is_off_until_a_torch_level_registration() -> None:
    disabled = torch._C._disabled_torch_function_impl
    assert ShardedTensor.__torch_function__ is disabled

    @ds.custom_sharded_op_impl(torch.asin)
    def sharded_asin(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     process_group: Any) -> Any:
        return None

    try:
        assert ShardedTensor.__torch_function__ is not disabled
        assert registry._user_fn(registry.TORCH_FUNCTIONS[torch.asin]) is sharded_asin
    finally:
        assert ds.remove_sharded_op_impl(torch.asin) is sharded_asin
    assert ShardedTensor.__torch_function__ is disabled
    assert torch.asin not in registry.TORCH_FUNCTIONS


def _four_arguments(types: Any, args: Any, kwargs: Any, process_group: Any) -> None:
    return None


def _five_arguments(types: Any, args: Any, kwargs: Any, process_group: Any, extra: Any) -> None:
    return None


def _one_argument(types: Any) -> None:
    return None


# _compute_linear_combination: an op no built-in family serves (no decomposition either).
UNSERVED = torch.ops.aten._compute_linear_combination


@pytest.mark.parametrize("op", [torch.asin, UNSERVED.default, UNSERVED,
                                torch.nn.functional.linear])
@pytest.mark.parametrize("fn", [_five_arguments, _one_argument])
def test_wrong_signature_fails_at_registration(op: Any, fn: Callable[..., Any]) -> None:
    expected = re.escape("expects signature (types, args, kwargs, process_group)")
    with pytest.raises(TypeError, match=expected):
        ds.custom_sharded_op_impl(op)(fn)
    assert op not in registry.OVERLOADS and op not in registry.PACKETS
    assert op not in registry.TORCH_FUNCTIONS
    assert ShardedTensor.__torch_function__ is torch._C._disabled_torch_function_impl


def _another_four_arguments(types: Any, args: Any, kwargs: Any, process_group: Any) -> None:
    return None


@pytest.mark.parametrize("op", [torch.asin, UNSERVED.default, UNSERVED])
def test_registering_twice_needs_override(op: Any) -> None:
    ds.custom_sharded_op_impl(op)(_four_arguments)
    table = registry.TORCH_FUNCTIONS if op is torch.asin else (
        registry.OVERLOADS if isinstance(op, torch._ops.OpOverload) else registry.PACKETS)
    try:
        with pytest.raises(ValueError, match=r"already has a sharded implementation "
                                             r"\(_four_arguments at .*test_core\.py:\d+\); "
                                             r"pass override=True to replace it with "
                                             r"_another_four_arguments"):
            ds.custom_sharded_op_impl(op)(_another_four_arguments)
        assert registry._user_fn(table[op]) is _four_arguments
        registered = ds.custom_sharded_op_impl(op, override=True)(_another_four_arguments)
        assert registered is _another_four_arguments
        assert registry._user_fn(table[op]) is _another_four_arguments
    finally:
        ds.remove_sharded_op_impl(op)
    assert op not in table
    assert ShardedTensor.__torch_function__ is torch._C._disabled_torch_function_impl


def test_builtin_op_cannot_be_replaced_silently() -> None:
    with pytest.raises(ValueError, match=r"aten\.clone\.default already has a sharded "
                                         r"implementation \(clone at .*tensor_basics\.py"):
        ds.custom_sharded_op_impl(torch.ops.aten.clone.default)(_four_arguments)
    assert registry.OVERLOADS[torch.ops.aten.clone.default].__name__ == "clone"


def test_removing_an_unregistered_op_raises_key_error() -> None:
    assert UNSERVED.default not in registry.OVERLOADS
    with pytest.raises(KeyError):
        ds.remove_sharded_op_impl(UNSERVED.default)
    with pytest.raises(TypeError, match="expects an aten overload"):
        ds.custom_sharded_op_impl(3)


# -- metadata and sizes ---------------------------------------------------------------


@multi_rank(world_size=4)
def test_sharded_tensor_metadata(rank: int, world_size: int) -> None:
    spec = chunk_spec(0, [0, 1, 2, 3])
    st = ds.empty(spec, 10, 20)
    metadata = st.metadata()
    assert metadata.size == torch.Size([10, 20])
    assert st.size() == torch.Size([10, 20])
    assert st.dtype == torch.float
    assert st.layout == torch.strided
    assert st.requires_grad is False
    assert st.is_contiguous()
    assert not st.is_pinned()
    assert st.device == torch.device("cpu")
    assert metadata.tensor_properties == ds.TensorProperties(dtype=torch.float)
    assert isinstance(st, torch.Tensor) and isinstance(st, ShardedTensor)

    st = ds.empty(spec, 10, 20, requires_grad=True)
    assert st.requires_grad is True and st.is_leaf
    assert st.metadata().tensor_properties.requires_grad is True
    st = ds.empty(spec, 10, 20, dtype=torch.double)
    assert st.dtype == torch.double
    assert st.local_tensor().dtype == torch.double
    assert st.metadata().tensor_properties.dtype == torch.double

    if torch.accelerator.is_available():
        assert ds.empty(spec, 10, 20, pin_memory=True).is_pinned()
    else:
        # No pinned-memory allocator without an accelerator: torch's own error passes through.
        with pytest.raises(RuntimeError, match="pin"):
            ds.empty(spec, 10, 20, pin_memory=True)


@multi_rank(world_size=[1, 4])
def test_sharded_tensor_sizes(rank: int, world_size: int) -> None:
    spec = chunk_spec(0, list(range(world_size)))
    assert ds.empty(spec, 10, 20).size() == torch.Size([10, 20])  # varargs
    assert ds.empty(spec, 10).size() == torch.Size([10])  # a single vararg
    assert ds.empty(spec, [10, 20]).size() == torch.Size([10, 20])  # list
    assert ds.empty(spec, (10, 20)).size() == torch.Size([10, 20])  # tuple
    assert ds.empty(spec, torch.Size([10, 20])).size() == torch.Size([10, 20])
    st = ds.empty(spec, (10, 20))
    assert st.size(0) == 10
    assert st.size(1) == 20
    assert st.size(-1) == 20
    assert st.size(-2) == 10
    assert st.shape == torch.Size([10, 20])
    assert st.dim() == 2
    assert st.ndim == 2
    assert st.numel() == 200
    with pytest.raises(IndexError, match="Dimension out of range"):
        st.size(-3)
    with pytest.raises(IndexError, match="Dimension out of range"):
        st.size(2)
    with pytest.raises(TypeError, match="'foo'"):
        ds.empty(spec, "foo")
    with pytest.raises(TypeError):
        ds.empty(spec, 10, 2.5)


@multi_rank(world_size=4)
def test_complete_world_size(rank: int, world_size: int) -> None:
    for dim in (0, -2):
        st = ds.empty(chunk_spec(dim, [0, 1, 2, 3]), 10, 20)
        lengths = chunk_lengths(10, 4)  # 3, 3, 3, 1

        local_shards = st.local_shards()
        assert len(local_shards) == 1
        assert local_shards[0].tensor.device == torch.device("cpu")
        assert local_shards[0].tensor.size() == (lengths[rank], 20)
        assert local_shards[0].metadata == st.metadata().shards_metadata[rank]

        shards_metadata = st.metadata().shards_metadata
        assert len(shards_metadata) == 4
        for shard_rank, shard_metadata in enumerate(shards_metadata):
            assert shard_metadata.shard_offsets == [shard_rank * 3, 0]
            assert shard_metadata.shard_sizes == [lengths[shard_rank], 20]
            assert str(shard_metadata.placement) == f"rank:{shard_rank}/cpu"
            assert shard_metadata.placement.rank() == shard_rank


@multi_rank(world_size=4)
def test_partial_world_size(rank: int, world_size: int) -> None:
    spec = chunk_spec(0, [2, 3])
    st = ds.empty(spec, 10, 20)
    local_shards = st.local_shards()
    if rank >= 2:
        assert len(local_shards) == 1
        assert local_shards[0].tensor.size() == (5, 20)
        assert str(local_shards[0].metadata.placement) == f"rank:{rank}/cpu"
    else:
        assert local_shards == []
    shards_metadata = st.metadata().shards_metadata
    assert len(shards_metadata) == 2
    for index, shard_metadata in enumerate(shards_metadata):
        assert shard_metadata.shard_offsets == [index * 5, 0]
        assert shard_metadata.shard_sizes == [5, 20]
        assert str(shard_metadata.placement) == f"rank:{index + 2}/cpu"

    # The value is whole on every rank, ranks without blocks included.
    dense = seeded(10, 20)
    st = ds.empty(spec, 10, 20, dtype=dense.dtype)
    for shard in st.local_shards():
        shard.tensor.copy_(dense[box(shard.metadata)])
    assert torch.equal(st.full_tensor(), dense)
    out = torch.zeros(10, 20, dtype=dense.dtype) if rank == 0 else None
    st.gather(0, out)  # to a rank that holds no block
    if rank == 0:
        assert torch.equal(out, dense)


@multi_rank(world_size=4)
def test_new_group(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=[1, 2, 3])
    spec = chunk_spec(0, [2, 3])
    st = ds.empty(spec, 10, 20, process_group=group)  # rank 0 is outside the group

    assert st.size() == torch.Size([10, 20])
    local_shards = st.local_shards()
    if rank >= 2:
        assert len(local_shards) == 1
        assert local_shards[0].tensor.size() == (5, 20)
    else:
        assert local_shards == []
    shards_metadata = st.metadata().shards_metadata
    assert len(shards_metadata) == 2
    for index, shard_metadata in enumerate(shards_metadata):
        assert shard_metadata.shard_offsets == [index * 5, 0]
        assert shard_metadata.shard_sizes == [5, 20]
        assert str(shard_metadata.placement) == f"rank:{index + 2}/cpu"

    # Data on the group; rank 0 takes part in no collective and does not hang.
    dense = seeded(10, 20)
    st = ds.zeros(spec, 10, 20, dtype=dense.dtype, process_group=group)
    for shard in st.local_shards():
        shard.tensor.copy_(dense[box(shard.metadata)])
    full = st.full_tensor()
    if rank != 0:
        assert torch.equal(full, dense)
    assert full.shape == dense.shape
    out = torch.zeros_like(dense) if rank == 1 else None
    st.gather(1, out)
    if rank == 1:
        assert torch.equal(out, dense)

    # A placement outside the group is an error on every rank, rank 0 included.
    with pytest.raises(ValueError, match="Global rank 0 does not exist in input process group"):
        ds.empty(chunk_spec(0, [0, 1]), 10, 20, process_group=group)


@multi_rank(world_size=4)
def test_two_subgroups_leave_rank_zero_out(rank: int, world_size: int) -> None:
    """Rank 0 is outside both groups: each tensor keeps its own group's ranks.

    (torch names every group a rank is not in by one sentinel value.)
    """
    first = dist.new_group(ranks=[2, 3])
    st_first = ds.ones(chunk_spec(0, [2, 3]), 4, 2, process_group=first)
    replicated_first = ds.ones(Replicate(), 4, 2, process_group=first)
    second = dist.new_group(ranks=[1, 2, 3])
    st_second = ds.ones(chunk_spec(0, [1, 2, 3]), 6, 2, process_group=second)
    replicated_second = ds.ones(Replicate(), 6, 2, process_group=second)
    assert [str(m.placement) for m in st_second.metadata().shards_metadata] == \
        ["rank:1/cpu", "rank:2/cpu", "rank:3/cpu"]
    assert [str(m.placement) for m in replicated_first.metadata().shards_metadata] == \
        ["rank:2/cpu", "rank:3/cpu"]
    assert [str(m.placement) for m in replicated_second.metadata().shards_metadata] == \
        ["rank:1/cpu", "rank:2/cpu", "rank:3/cpu"]
    if rank in (2, 3):
        assert torch.equal(st_first.full_tensor(), torch.ones(4, 2))
        assert torch.equal(replicated_first.full_tensor(), torch.ones(4, 2))
    if rank != 0:
        assert torch.equal(st_second.full_tensor(), torch.ones(6, 2))
        assert torch.equal(replicated_second.full_tensor(), torch.ones(6, 2))
    assert len(st_first.local_shards()) == (0 if rank < 2 else 1)
    assert len(st_second.local_shards()) == (0 if rank < 1 else 1)


@multi_rank(world_size=4)
def test_multiple_local_shards(rank: int, world_size: int) -> None:
    spec = chunk_spec(0, [0, 1, 2, 3, 0, 1, 2, 3])
    st = ds.empty(spec, 16, 20)
    local_shards = st.local_shards()
    assert len(local_shards) == 2
    assert [s.metadata.shard_offsets for s in local_shards] == [[2 * rank, 0], [2 * rank + 8, 0]]
    for shard in local_shards:
        assert shard.tensor.size() == (2, 20)
        assert shard.tensor.device == torch.device("cpu")
    shards_metadata = st.metadata().shards_metadata
    assert len(shards_metadata) == 8
    for index, shard_metadata in enumerate(shards_metadata):
        assert shard_metadata.shard_offsets == [index * 2, 0]
        assert shard_metadata.shard_sizes == [2, 20]
        assert str(shard_metadata.placement) == f"rank:{index % 4}/cpu"

    dense = seeded(16, 20, dtype=st.dtype)
    for shard in local_shards:
        shard.tensor.copy_(dense[box(shard.metadata)])
    assert torch.equal(st.full_tensor(), dense)


@multi_rank(world_size=4)
def test_sharding_columns(rank: int, world_size: int) -> None:
    for dim in (1, -1):
        st = ds.empty(chunk_spec(dim, [0, 1, 2, 3]), 10, 32)
        local_shards = st.local_shards()
        assert len(local_shards) == 1
        assert local_shards[0].tensor.size() == (10, 8)
        shards_metadata = st.metadata().shards_metadata
        assert len(shards_metadata) == 4
        for shard_rank, shard_metadata in enumerate(shards_metadata):
            assert shard_metadata.shard_offsets == [0, shard_rank * 8]
            assert shard_metadata.shard_sizes == [10, 8]
            assert str(shard_metadata.placement) == f"rank:{shard_rank}/cpu"


@multi_rank(world_size=4)
def test_insufficient_sharding_dims(rank: int, world_size: int) -> None:
    st = ds.empty(chunk_spec(0, [0, 1, 2, 3]), 2, 20)
    local_shards = st.local_shards()
    assert len(local_shards) == 1
    if rank <= 1:
        assert local_shards[0].tensor.size() == (1, 20)
    else:
        assert local_shards[0].tensor.numel() == 0
    shards_metadata = st.metadata().shards_metadata
    assert len(shards_metadata) == 4
    for shard_rank, shard_metadata in enumerate(shards_metadata):
        assert shard_metadata.shard_offsets == [shard_rank, 0]  # legacy offsets
        assert shard_metadata.shard_sizes == [1 if shard_rank <= 1 else 0, 20]
        assert str(shard_metadata.placement) == f"rank:{shard_rank}/cpu"

    dense = seeded(2, 20)
    st = ds.zeros(chunk_spec(0, [0, 1, 2, 3]), 2, 20, dtype=dense.dtype)
    for shard in st.local_shards():
        shard.tensor.copy_(dense[box(shard.metadata)])
    assert torch.equal(st.full_tensor(), dense)




def unsupported_op(tensor: torch.Tensor) -> torch.Tensor:
    """aten._compute_linear_combination.default: no sharded implementation."""
    return torch._compute_linear_combination(tensor, torch.ones(1, tensor.shape[0]))



@multi_rank(world_size=4)
def test_invalid_sharding(rank: int, world_size: int) -> None:
    with pytest.raises(NotImplementedError, match="does not support named dimension"):
        spec = ChunkShardingSpec(dim="H", placements=["rank:1/cpu"])  # type: ignore[arg-type]
        ds.empty(spec, 10, 20)

    for dim in (2, 3, 4, -3, -4, -5):
        with pytest.raises(ValueError, match="Invalid sharding dim"):
            ds.empty(ChunkShardingSpec(dim=dim, placements=["rank:1/cpu"]), 10, 20)

    with pytest.raises(ValueError, match="Global rank 5 does not exist in input process group"):
        ds.empty(ChunkShardingSpec(dim=0, placements=["rank:5/cpu"]), 10, 20)

    st = ds.empty(ChunkShardingSpec(dim=0, placements=["rank:0/cpu"]), 10, 20)
    assert UNSERVED.default not in registry.OVERLOADS
    assert UNSERVED not in registry.PACKETS
    unsupported = (r"^aten\._compute_linear_combination\.default not supported for "
                   r"ShardedTensor!$")
    with pytest.raises(RuntimeError, match=unsupported):
        unsupported_op(st)
    with pytest.raises(NotImplementedError, match=r".*not supported for ShardedTensor!$"):
        unsupported_op(st)

    with pytest.raises(ValueError, match=STRIDED_ONLY):
        ds.empty(ChunkShardingSpec(dim=0, placements=["rank:0/cpu"]), 10, 20,
                 layout=torch.sparse_coo)
    with pytest.raises(ValueError,
                       match=CONTIGUOUS_ONLY):
        ds.empty(ChunkShardingSpec(dim=0, placements=["rank:0/cpu"]), 10, 20,
                 memory_format=torch.channels_last)
    with pytest.raises(ValueError,
                       match=CONTIGUOUS_ONLY):
        ds.empty(ChunkShardingSpec(dim=0, placements=["rank:0/cpu"]), 2, 3, 4, 5,
                 memory_format=torch.channels_last)


# -- values of the creation functions ---------------------------------------------------


@multi_rank(world_size=[1, 4])
def test_ones_zeros_full(rank: int, world_size: int) -> None:
    spec = chunk_spec(0, list(range(world_size)))
    lengths = chunk_lengths(10, world_size)
    for create, reference in ((ds.ones, torch.ones), (ds.zeros, torch.zeros)):
        st = create(spec, 10, 20)
        (local,) = st.local_shards()
        assert local.tensor.size() == (lengths[rank], 20)
        assert torch.equal(local.tensor, reference(lengths[rank], 20))
        assert torch.equal(st.full_tensor(), reference(10, 20))

    st = ds.full(spec, size=(10, 20), fill_value=1234, dtype=torch.int32)
    assert st.dtype == torch.int32
    expected = torch.full((10, 20), 1234, dtype=torch.int32)
    assert torch.equal(st.local_tensor(), expected[box(st.local_shards()[0].metadata)])
    assert torch.equal(st.full_tensor(), expected)
    # Positional size and fill value; the dtype follows torch.full's inference.
    st = ds.full(spec, [10, 20], 2.5)
    assert st.dtype == torch.full((1,), 2.5).dtype
    assert torch.equal(st.full_tensor(), torch.full((10, 20), 2.5))
    st = ds.full(spec, (10, 20), 7)
    assert st.dtype == torch.full((1,), 7).dtype


@multi_rank(world_size=4)
@pytest.mark.parametrize("placements", [[0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3]],
                         ids=["one_per_rank", "two_per_rank"])
def test_rand_and_randn_follow_the_rank_generator(rank: int, world_size: int,
                                                  placements: list[int]) -> None:
    spec = chunk_spec(0, placements)
    seed = 1234
    for create, reference in ((ds.rand, torch.rand), (ds.randn, torch.randn)):
        torch.manual_seed(seed)
        st = create(spec, 8, 2, dtype=torch.double)
        torch.manual_seed(seed)
        for shard in st.local_shards():  # drawn in the order of the rank's blocks
            expected = reference(*shard.metadata.shard_sizes, dtype=torch.double)
            assert shard.tensor.size() == expected.size()
            assert torch.equal(shard.tensor, expected)
        assert st.dtype == torch.double
        # full_tensor assembles every rank's draws.
        full = st.full_tensor()
        check_local_shards_match(st, full)


@multi_rank(world_size=4)
@pytest.mark.parametrize("layout_name", ["chunk", "grid"])
def test_like_ops_keep_sharding(rank: int, world_size: int, layout_name: str) -> None:
    spec = chunk_spec(0, [0, 1, 2, 3]) if layout_name == "chunk" else grid_spec(8, 8, [3, 2, 1, 0])
    st = ds.rand(spec, (8, 8), dtype=torch.float)
    seed = 1234

    def check_layout(result: torch.Tensor, dtype: torch.dtype) -> ShardedTensor:
        assert isinstance(result, ShardedTensor)
        assert result.sharding_spec() == st.sharding_spec()
        assert result.metadata().shards_metadata == st.metadata().shards_metadata
        assert result.size() == st.size()
        assert result.dtype == dtype
        assert [s.tensor.dtype for s in result.local_shards()] == [dtype]
        return result

    for like_op, reference in ((torch.zeros_like, torch.zeros), (torch.ones_like, torch.ones)):
        result = check_layout(like_op(st, dtype=torch.double), torch.double)
        assert torch.equal(result.full_tensor(), reference(8, 8, dtype=torch.double))
    for like_op, reference in ((torch.rand_like, torch.rand), (torch.randn_like, torch.randn)):
        torch.manual_seed(seed)
        result = check_layout(like_op(st, dtype=torch.double), torch.double)
        torch.manual_seed(seed)
        expected = reference(*result.local_shards()[0].metadata.shard_sizes, dtype=torch.double)
        assert torch.equal(result.local_tensor(), expected)
    result = check_layout(torch.full_like(st, 8.8, dtype=torch.double), torch.double)
    assert torch.equal(result.full_tensor(), torch.full((8, 8), 8.8, dtype=torch.double))
    result = check_layout(torch.empty_like(st, dtype=torch.double), torch.double)
    assert result.local_tensor().shape == st.local_tensor().shape
    # No dtype argument: the input's dtype.
    result = check_layout(torch.zeros_like(st), st.dtype)
    assert torch.equal(result.full_tensor(), torch.zeros(8, 8))


# -- local data --------------------------------------------------------------------------


@multi_rank(world_size=4)
def test_local_tensor(rank: int, world_size: int) -> None:
    st = ds.rand(chunk_spec(0, [0, 1, 2, 3]), 24, 12)
    local = st.local_tensor()
    assert local.size() == (6, 12)
    assert local is st.local_shards()[0].tensor  # the live block, not a copy
    assert not isinstance(local, ShardedTensor)
    full = st.full_tensor()
    assert torch.equal(local, full[6 * rank:6 * rank + 6])


@multi_rank(world_size=4)
def test_local_tensor_error(rank: int, world_size: int) -> None:
    spec = chunk_spec(0, [0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
    st = ds.rand(spec, 24, 12)
    with pytest.raises(NotImplementedError, match=f"^{SINGLE_SHARD_ONLY}$"):
        st.local_tensor()
    # Ranks without a block cannot return one either.
    st = ds.rand(chunk_spec(0, [2, 3]), 24, 12)
    if rank < 2:
        with pytest.raises(NotImplementedError, match=SINGLE_SHARD_ONLY):
            st.local_tensor()
    else:
        assert st.local_tensor().size() == (12, 12)


@multi_rank(world_size=4)
@pytest.mark.parametrize("placements", [[0, 1, 2, 3], [0, 0, 1, 1, 2]], ids=["even", "uneven"])
def test_gather(rank: int, world_size: int, placements: list[int]) -> None:
    spec = chunk_spec(0, placements)
    st = ds.ones(spec, 10, 20)
    dst = 1
    full = torch.zeros(10, 20) if rank == dst else None
    st.gather(dst, full)
    if rank == dst:
        assert torch.equal(full, torch.ones(10, 20))
    else:
        assert full is None

    dense = seeded(10, 20)
    st = ds.empty(spec, 10, 20, dtype=dense.dtype)
    for shard in st.local_shards():
        shard.tensor.copy_(dense[box(shard.metadata)])
    for dst in (3, 0):
        out = torch.zeros_like(dense) if rank == dst else None
        st.gather(dst=dst, out=out)
        if rank == dst:
            assert torch.equal(out, dense)
    with pytest.raises(ValueError, match="dst rank 7 is not in the process group"):
        st.gather(7, None)
    if rank == 2:
        with pytest.raises(ValueError, match=r"out has size \(10, 2\)"):
            st.gather(2, torch.zeros(10, 2))
    else:
        st.gather(2, None)  # the data moved: no rank is left waiting


@multi_rank(world_size=4)
def test_gather_replicated_and_partial(rank: int, world_size: int) -> None:
    summands = torch.round(seeded(world_size, 6, 5) * 64) / 64  # sums exact in any order
    dense = summands.sum(0)
    replicated = ShardedTensor.from_local_tensor(dense.clone(), Replicate(), 6, 5)
    partial = ShardedTensor.from_local_tensor(summands[rank].clone(), ds.Partial(), 6, 5)
    for st in (replicated, partial):
        out = torch.zeros_like(dense) if rank == 3 else None
        st.gather(3, out)
        if rank == 3:
            assert torch.equal(out, dense)
        assert torch.equal(st.full_tensor(), dense)


@multi_rank(world_size=[1, 2, 3, 4])
def test_full_tensor_is_the_dense_value(rank: int, world_size: int) -> None:
    dense = seeded(10, 7)
    ranks = list(range(world_size))
    specs = [chunk_spec(0, ranks), chunk_spec(1, ranks[::-1]), chunk_spec(-1, ranks + ranks),
             grid_spec(10, 7, [r % world_size for r in (1, 3, 0, 2)]), Replicate()]
    for spec in specs:
        st = ds.empty(spec, 10, 7, dtype=dense.dtype)
        for shard in st.local_shards():
            shard.tensor.copy_(dense[box(shard.metadata)])
        full = st.full_tensor()
        assert not isinstance(full, ShardedTensor)
        assert torch.equal(full, dense), spec


# -- pickling -------------------------------------------------------------------------------


def _round_trip(st: ShardedTensor, how: str) -> Any:
    if how == "pickle":
        return pickle.loads(pickle.dumps(st))
    buffer = io.BytesIO()
    torch.save(st, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@multi_rank(world_size=4)
@pytest.mark.parametrize("how", ["pickle", "torch_save"])
def test_save_and_load_on_the_same_ranks(rank: int, world_size: int, how: str) -> None:
    dense = seeded(10, 7)
    for spec in (chunk_spec(0, [0, 1, 2, 3]), chunk_spec(1, [3, 2, 1, 0, 3]),
                 grid_spec(10, 7, [0, 1, 2, 3]), Replicate()):
        st = ds.empty(spec, 10, 7, dtype=dense.dtype, requires_grad=True)
        with torch.no_grad():
            for shard in st.local_shards():
                shard.tensor.copy_(dense[box(shard.metadata)])
        loaded = _round_trip(st, how)
        assert isinstance(loaded, ShardedTensor)
        assert loaded.sharding_spec() == spec
        assert loaded.metadata() == st.metadata()
        assert loaded.requires_grad and loaded.dtype == dense.dtype
        check_local_shards_match(loaded, dense)
        assert torch.equal(loaded.full_tensor(), dense)


@multi_rank(world_size=4)
def test_save_and_load_in_a_subgroup(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=[2, 3])
    dense = seeded(10, 20)
    spec = chunk_spec(0, [2, 3, 2, 3])
    st = ds.empty(spec, 10, 20, dtype=dense.dtype, process_group=group)
    for shard in st.local_shards():
        shard.tensor.copy_(dense[box(shard.metadata)])
    buffer = io.BytesIO()
    torch.save(st, buffer)
    buffer.seek(0)
    with ds.load_with_process_group(group):
        loaded = torch.load(buffer, weights_only=False)
        nested = ds.load_with_process_group(group)
        with pytest.raises(RuntimeError, match="ProcessGroup already set"):
            nested.__enter__()  # entering a second one inside the first refuses
    assert loaded.process_group is group
    assert loaded.metadata() == st.metadata()
    if rank >= 2:
        assert len(loaded.local_shards()) == 2
        check_local_shards_match(loaded, dense)
        assert torch.equal(loaded.full_tensor(), dense)
        assert torch.equal(loaded, st)
    else:
        assert loaded.local_shards() == []


@multi_rank(world_size=4)
def test_load_with_another_group_errors(rank: int, world_size: int) -> None:
    st = ds.rand(chunk_spec(0, [0, 1, 2, 3]), 10, 20)
    buffer = io.BytesIO()
    torch.save(st, buffer)
    group = dist.new_group(ranks=[0, 2, 3])
    buffer.seek(0)
    if rank != 0:
        with pytest.raises(RuntimeError, match="Local rank at save time was"):
            with ds.load_with_process_group(group):
                torch.load(buffer, weights_only=False)
    else:
        with pytest.raises(RuntimeError, match="Local world size at save time was"):
            with ds.load_with_process_group(group):
                torch.load(buffer, weights_only=False)
    # Pickle behaves the same way.
    data = pickle.dumps(st)
    with pytest.raises(RuntimeError, match="at save time was"):
        with ds.load_with_process_group(group):
            pickle.loads(data)
    # The context manager was left cleanly: loading on the default group works.
    assert torch.equal(pickle.loads(data).full_tensor(), st.full_tensor())


def _pickled_sharded_tensor(rank: int, world_size: int) -> bytes:
    return pickle.dumps(ds.ones(chunk_spec(0, list(range(world_size))), 4, 4))


def test_load_without_a_default_group_errors() -> None:
    """This pytest process has no default process group."""
    assert not dist.is_initialized()
    data = get_pool(2).run(_pickled_sharded_tensor)
    assert len(data) == 2
    with pytest.raises(RuntimeError, match="Need to initialize default process group"):
        pickle.loads(data[0])


# -- enumerable specs ----------------------------------------------------------------------


@multi_rank(world_size=4)
def test_enumerable_grid(rank: int, world_size: int) -> None:
    spec = grid_spec(10, 10, [0, 1, 2, 3])
    st = ds.empty(spec, 10, 10)
    metadata = st.metadata()
    assert metadata.size == torch.Size([10, 10])
    assert st.dtype == torch.float and st.layout == torch.strided
    assert st.requires_grad is False and st.is_contiguous() and not st.is_pinned()
    assert ds.empty(spec, 10, 10, requires_grad=True).requires_grad
    assert ds.empty(spec, 10, 10, dtype=torch.double).dtype == torch.double

    (local,) = st.local_shards()
    assert local.tensor.size() == (5, 5)
    assert local.metadata.shard_offsets == [(rank // 2) * 5, (rank % 2) * 5]
    assert local.metadata.shard_sizes == [5, 5]
    assert str(local.metadata.placement) == f"rank:{rank}/cpu"
    assert len(metadata.shards_metadata) == 4
    for shard_rank, shard_metadata in enumerate(metadata.shards_metadata):
        assert shard_metadata.shard_offsets == [(shard_rank // 2) * 5, (shard_rank % 2) * 5]
        assert shard_metadata.shard_sizes == [5, 5]
        assert str(shard_metadata.placement) == f"rank:{shard_rank}/cpu"

    assert torch.equal(ds.ones(spec, 10, 10).full_tensor(), torch.ones(10, 10))
    torch.manual_seed(7)
    st = ds.rand(spec, 10, 10)
    torch.manual_seed(7)
    assert torch.equal(st.local_tensor(), torch.rand(5, 5))
    full = st.full_tensor()
    check_local_shards_match(st, full)

    # Two blocks per rank on ranks 0 and 1; ranks 2 and 3 hold none.
    spec = grid_spec(10, 10, [0, 1, 0, 1])
    st = ds.empty(spec, 10, 10)
    local_shards = st.local_shards()
    if rank <= 1:
        assert [s.metadata.shard_offsets for s in local_shards] == [[0, 5 * rank], [5, 5 * rank]]
    else:
        assert local_shards == []
    dense = seeded(10, 10)
    for shard in local_shards:
        shard.tensor.copy_(dense[box(shard.metadata)].float())
    assert torch.equal(st.full_tensor(), dense.float())

    with pytest.raises(ValueError, match="do not cover the entire tensor"):
        ds.empty(spec, 12, 12)


# -- from local data ---------------------------------------------------------------------


def _grid_shard(rank: int, dense: torch.Tensor, size: list[int] | None = None) -> Shard:
    offsets = [(rank // 2) * 5, (rank % 2) * 5]
    sizes = size or [5, 5]
    return Shard(dense[box(ShardMetadata(offsets, sizes))].clone(),
                 ShardMetadata(offsets, sizes, f"rank:{rank}/cpu"))


@multi_rank(world_size=4)
def test_from_local_shards(rank: int, world_size: int) -> None:
    dense = seeded(10, 10)
    local_shard = _grid_shard(rank, dense)
    assert local_shard.metadata == Shard.from_tensor_and_offsets(
        local_shard.tensor, local_shard.metadata.shard_offsets, rank).metadata
    st = ShardedTensor.from_local_shards([local_shard], [10, 10])
    assert st.size() == (10, 10) and st.dtype == dense.dtype
    (got,) = st.local_shards()
    assert got.tensor is local_shard.tensor
    assert got.metadata == local_shard.metadata
    shards_metadata = st.metadata().shards_metadata
    assert len(shards_metadata) == 4
    for shard_rank, shard_metadata in enumerate(shards_metadata):
        assert shard_metadata.shard_offsets == [(shard_rank // 2) * 5, (shard_rank % 2) * 5]
        assert shard_metadata.shard_sizes == [5, 5]
        assert str(shard_metadata.placement) == f"rank:{shard_rank}/cpu"
    assert torch.equal(st.full_tensor(), dense)
    # Global size as varargs; the legacy name.
    st = ShardedTensor._init_from_local_shards([_grid_shard(rank, dense)], 10, 10)
    assert torch.equal(st.full_tensor(), dense)

    # requires_grad of the local shards carries over.
    leaf = _grid_shard(rank, dense)
    leaf.tensor.requires_grad_(True)
    assert ShardedTensor.from_local_shards([leaf], 10, 10).requires_grad

    # Chunk blocks come back as a ChunkShardingSpec.
    rows = seeded(8, 3)
    blocks = [Shard(rows[2 * rank:2 * rank + 2].clone(),
                    ShardMetadata([2 * rank, 0], [2, 3], f"rank:{rank}/cpu"))]
    st = ShardedTensor.from_local_shards(blocks, 8, 3)
    assert st.sharding_spec() == chunk_spec(0, [0, 1, 2, 3])
    assert torch.equal(st.full_tensor(), rows)


@multi_rank(world_size=4)
def test_from_local_shards_several_per_rank(rank: int, world_size: int) -> None:
    dense = seeded(16, 3)
    # Rank r holds rows r and r + 4 (blocks of 2 rows), given in reverse order.
    shards = [Shard(dense[2 * i:2 * i + 2].clone(), ShardMetadata([2 * i, 0], [2, 3],
                                                                   f"rank:{rank}/cpu"))
              for i in (rank + 4, rank)]
    st = ShardedTensor.from_local_shards(shards, 16, 3)
    assert st.sharding_spec() == chunk_spec(0, [0, 1, 2, 3, 0, 1, 2, 3])
    local_shards = st.local_shards()
    assert [s.metadata.shard_offsets for s in local_shards] == [[2 * rank, 0], [2 * rank + 8, 0]]
    check_local_shards_match(st, dense)
    assert torch.equal(st.full_tensor(), dense)

    # Ranks 0 and 1 hold everything, ranks 2 and 3 nothing.
    grid = grid_spec(10, 10, [0, 1, 0, 1])
    dense = seeded(10, 10, seed=1)
    mine = [Shard(dense[box(m)].clone(), m) for m in grid.shards if m.placement.rank() == rank]
    st = ShardedTensor.from_local_shards(mine, 10, 10)
    assert len(st.local_shards()) == (2 if rank <= 1 else 0)
    assert torch.equal(st.full_tensor(), dense)


@multi_rank(world_size=4)
def test_from_local_shards_errors_raise_on_every_rank(rank: int, world_size: int) -> None:
    dense = seeded(12, 12)

    # Rank 0's block is 6x6: it overlaps its neighbours.
    shard = _grid_shard(rank, dense, [6, 6] if rank == 0 else None)
    with pytest.raises(ValueError, match="overlap"):
        ShardedTensor.from_local_shards([shard], [10, 10])

    # Rank 0's block is 4x4: a gap.
    shard = _grid_shard(rank, dense, [4, 4] if rank == 0 else None)
    with pytest.raises(ValueError, match="do not tile"):
        ShardedTensor.from_local_shards([shard], [10, 10])

    shard = _grid_shard(rank, dense)
    with pytest.raises(ValueError, match="ShardedTensor global_size property does not match "
                                         "from different ranks!"):
        ShardedTensor.from_local_shards([shard], [10, 10] if rank == 0 else [10, 5])

    dtype = torch.int if rank == 0 else torch.float32
    shard = Shard(torch.ones(5, 5, dtype=dtype), _grid_shard(rank, dense).metadata)
    with pytest.raises(ValueError, match="ShardedTensor dtype property does not match "
                                         "from different ranks!"):
        ShardedTensor.from_local_shards([shard], [10, 10])

    shard = Shard(torch.ones(5, 5, requires_grad=rank == 0), _grid_shard(rank, dense).metadata)
    with pytest.raises(ValueError, match="ShardedTensor requires_grad property does not match "
                                         "from different ranks!"):
        ShardedTensor.from_local_shards([shard], [10, 10])

    # Only rank 1 passes a block placed on another rank: every rank raises.
    shard = _grid_shard(rank, dense)
    if rank == 1:
        shard = Shard(shard.tensor, ShardMetadata(shard.metadata.shard_offsets, [5, 5],
                                                  "rank:2/cpu"))
    with pytest.raises(ValueError, match="Local shard metadata's rank does not match with "
                                         "process group's current rank!"):
        ShardedTensor.from_local_shards([shard], [10, 10])

    # Only rank 3 passes a transposed (non-contiguous) block.
    shard = _grid_shard(rank, dense)
    if rank == 3:
        shard = Shard(shard.tensor.t(), shard.metadata)
    with pytest.raises(ValueError,
                       match=CONTIGUOUS_ONLY):
        ShardedTensor.from_local_shards([shard], [10, 10])

    # Only rank 2 passes a sparse block.
    shard = _grid_shard(rank, dense)
    if rank == 2:
        shard = Shard(shard.tensor.to_sparse(), shard.metadata)
    with pytest.raises(ValueError, match=STRIDED_ONLY):
        ShardedTensor.from_local_shards([shard], [10, 10])

    with pytest.raises(ValueError, match="no rank holds a shard"):
        ShardedTensor.from_local_shards([], [10, 10])

    # Errors of the Shard itself are local.
    with pytest.raises(ValueError, match="Shard tensor size does not match"):
        Shard(torch.randn(2, 3), _grid_shard(rank, dense).metadata)

    # Every rank is still in step: a valid call works.
    st = ShardedTensor.from_local_shards([_grid_shard(rank, dense)], [10, 10])
    assert torch.equal(st.full_tensor(), dense[:10, :10])


@multi_rank(world_size=4)
def test_from_local_shards_in_a_subgroup(rank: int, world_size: int) -> None:
    group = dist.new_group(ranks=[1, 2, 3])
    dense = seeded(15, 5)
    if rank == 0:
        st = ShardedTensor.from_local_shards([], [15, 5], process_group=group)
        assert st.local_shards() == [] and st.size() == (15, 5)
        return
    index = rank - 1
    shard = Shard(dense[5 * index:5 * index + 5].clone(),
                  ShardMetadata([5 * index, 0], [5, 5], f"rank:{rank}/cpu"))
    st = ShardedTensor.from_local_shards([shard], [15, 5], process_group=group)
    assert st.process_group is group
    shards_metadata = st.metadata().shards_metadata
    assert [m.shard_offsets for m in shards_metadata] == [[0, 0], [5, 0], [10, 0]]
    assert [str(m.placement) for m in shards_metadata] == ["rank:1/cpu", "rank:2/cpu",
                                                           "rank:3/cpu"]
    assert torch.equal(st.full_tensor(), dense)


@multi_rank(world_size=[1, 2, 3, 4])
def test_from_local_tensor(rank: int, world_size: int) -> None:
    for size, dim in (([20, 10], 0), ([21, 11], 1), ([23, 16], -1), ([44, 16, 8], 1)):
        dense = seeded(*size)
        spec = chunk_spec(dim, list(range(world_size))[::-1])
        metadata = spec.build_metadata(size, ds.TensorProperties(dtype=dense.dtype),
                                       list(range(world_size)))
        (mine,) = [m for m in metadata.shards_metadata if m.placement.rank() == rank]
        local = dense[box(mine)].clone()
        st = ShardedTensor.from_local_tensor(local, spec, size)
        assert st.size() == tuple(size)
        assert torch.equal(st.local_tensor(), local)
        assert st.local_tensor().data_ptr() == local.data_ptr()  # no copy
        assert st.local_shards()[0].metadata == mine
        assert st.metadata().shards_metadata == metadata.shards_metadata
        assert torch.equal(st.full_tensor(), dense)
    st = ShardedTensor._init_from_local_tensor(torch.ones(2, 3), Replicate(), 2, 3)
    assert torch.equal(st.full_tensor(), torch.ones(2, 3))


@multi_rank(world_size=4)
def test_from_local_tensor_errors_raise_on_every_rank(rank: int, world_size: int) -> None:
    spec = chunk_spec(0, [0, 1, 2, 3])
    # Only rank 2 has a wrong-shaped local tensor.
    local = torch.zeros(2 if rank == 2 else 3, 4)
    with pytest.raises(ValueError, match=r"Local tensor on rank 2 has size \[2, 4\]"):
        ShardedTensor.from_local_tensor(local, spec, 12, 4)

    grid = EnumerableShardingSpec([ShardMetadata([0, 0], [5, 5], "rank:0/cpu"),
                                   ShardMetadata([5, 0], [5, 5], "rank:1/cpu")])
    with pytest.raises(ValueError, match="do not cover the entire tensor"):
        ShardedTensor.from_local_tensor(torch.rand(24, 12), grid, [24, 12])

    # Only rank 0's tensor is not contiguous.
    local = torch.zeros(4, 3).t() if rank == 0 else torch.zeros(3, 4)
    with pytest.raises(ValueError, match=CONTIGUOUS_ONLY):
        ShardedTensor.from_local_tensor(local, spec, 12, 4)

    # Only rank 1's tensor is sparse.
    local = torch.ones(3, 4).to_sparse() if rank == 1 else torch.ones(3, 4)
    with pytest.raises(ValueError, match=STRIDED_ONLY):
        ShardedTensor.from_local_tensor(local, spec, 12, 4)

    # Only rank 3 passes another global size (its block still has the right shape).
    with pytest.raises(ValueError, match="global_size property does not match"):
        ShardedTensor.from_local_tensor(torch.zeros(3, 4), spec, [12, 4] if rank != 3 else [15, 4])

    # Several blocks on one rank cannot come from one local tensor.
    with pytest.raises(NotImplementedError, match="exactly one block per rank"):
        ShardedTensor.from_local_tensor(torch.zeros(1, 4), chunk_spec(0, [0, 1, 2, 3] * 2), 8, 4)

    st = ShardedTensor.from_local_tensor(torch.full((3, 4), float(rank)), spec, 12, 4)
    assert torch.equal(st.full_tensor(), torch.arange(4.).repeat_interleave(3)[:, None]
                       .expand(12, 4))


# -- custom ops --------------------------------------------------------------------------


@multi_rank(world_size=4)
def test_custom_torch_level_op(rank: int, world_size: int) -> None:
    calls = []

    @ds.custom_sharded_op_impl(torch.asin)
    def sharded_asin(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     process_group: Any) -> Any:
        calls.append(process_group)
        return torch.asin(args[0].local_shards()[0].tensor)

    try:
        st = ds.rand(chunk_spec(0, [0, 1, 2, 3]), 10, 10)
        result = torch.asin(st)
        assert calls == [st.process_group]
        assert not isinstance(result, ShardedTensor)
        assert torch.equal(result, torch.asin(st.local_tensor()))
        # Other calls still work while the torch-level table is non-empty.
        assert torch.equal(st.full_tensor()[3 * rank:3 * rank + 3], st.local_tensor())
    finally:
        ds.remove_sharded_op_impl(torch.asin)
    assert ShardedTensor.__torch_function__ is torch._C._disabled_torch_function_impl


@multi_rank(world_size=4)
def test_custom_aten_op(rank: int, world_size: int) -> None:
    mm = torch.ops.aten.mm.default
    existing = registry.OVERLOADS[mm]  # the built-in (ops/matmul.py)

    @ds.custom_sharded_op_impl(mm, override=True)
    def sharded_mm(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   process_group: Any) -> Any:
        first, second = args
        assert process_group is first.process_group
        local = first.local_tensor() @ second.full_tensor()
        return ShardedTensor.from_local_tensor(local, first.sharding_spec(), first.size(0),
                                               second.size(1), process_group=process_group)

    try:
        dense = seeded(8, 8)
        spec = chunk_spec(0, [0, 1, 2, 3])
        st = ds.empty(spec, 8, 8, dtype=dense.dtype)
        st.local_tensor().copy_(dense[2 * rank:2 * rank + 2])
        result = torch.mm(st, st)
        assert isinstance(result, ShardedTensor)
        assert torch.allclose(result.full_tensor(), dense @ dense)
        assert torch.allclose((st @ st).full_tensor(), dense @ dense)  # matmul reaches aten.mm
    finally:
        ds.remove_sharded_op_impl(mm)
        ds.custom_sharded_op_impl(mm, handles_partial=True)(existing)
    assert registry.OVERLOADS[mm] is existing  # the built-in is back
    assert torch.allclose(torch.mm(st, st).full_tensor(), dense @ dense)


@multi_rank(world_size=2)
def test_override_of_a_group_free_builtin_gets_the_group(rank: int, world_size: int) -> None:
    """The built-in pointwise and foreach implementations skip the dispatch loop's group
    lookup; a user's override of one is called with the group, as documented, and the
    built-in's fast path is back once it is restored."""
    add = torch.ops.aten.add.Tensor
    existing = registry.OVERLOADS[add]
    assert registry.GROUP_FREE_OVERLOADS[add] is existing
    seen: list[Any] = []

    @ds.custom_sharded_op_impl(add, override=True)
    def logged_add(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   process_group: Any) -> Any:
        seen.append(process_group)
        return existing(types, args, kwargs, process_group)

    dense = seeded(4, 3)
    st = ShardedTensor.from_replicated(dense, chunk_spec(0, [0, 1]))
    try:
        assert add not in registry.GROUP_FREE_OVERLOADS
        assert torch.equal((st + st).full_tensor(), dense + dense)
        assert seen == [st.process_group]
    finally:
        ds.remove_sharded_op_impl(add)
        ds.custom_sharded_op_impl(add, handles_partial=True)(existing)
    assert registry.GROUP_FREE_OVERLOADS[add] is existing
    assert torch.equal((st + st).full_tensor(), dense + dense)
    assert len(seen) == 1


def _dispatch_table_mirrors_overloads() -> None:
    assert registry.DISPATCH_TABLE == {
        id(op): (impl, op in registry.GROUP_FREE_OVERLOADS)
        for op, impl in registry.OVERLOADS.items()}


def test_the_dispatch_table_follows_registration_and_removal() -> None:
    """NOTE [the dispatch loop's table is keyed by id]: one entry per registered overload
    (its implementation, and whether it is group-free), kept in step with OVERLOADS."""
    add = torch.ops.aten.add.Tensor
    existing = registry.OVERLOADS[add]
    _dispatch_table_mirrors_overloads()

    @ds.custom_sharded_op_impl(add, override=True, handles_partial=True)
    def other_add(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  process_group: Any) -> Any:
        return existing(types, args, kwargs, process_group)

    try:
        served, group_free = registry.DISPATCH_TABLE[id(add)]
        assert registry._user_fn(served) is other_add and not group_free  # (results checked)
        _dispatch_table_mirrors_overloads()
        ds.remove_sharded_op_impl(add)
        assert id(add) not in registry.DISPATCH_TABLE
        _dispatch_table_mirrors_overloads()
    finally:
        if add not in registry.OVERLOADS:
            ds.custom_sharded_op_impl(add, handles_partial=True)(existing)
    assert registry.DISPATCH_TABLE[id(add)] == (existing, True)
    _dispatch_table_mirrors_overloads()
