"""Regressions the OpInfo differential run found (issue #4), pinned on world sizes 2 and 3.

Each test is the smallest form of a failing OpInfo sample: tensors sharded along dim 0 in
uneven chunks (a size-1 or empty dim leaves some ranks with empty blocks), compared with
the dense op.
"""

from __future__ import annotations

import pytest
import torch
from layouts import rows, several, shard, specs_2d

import dispatch_shard as ds
from dispatch_shard.testing import multi_rank


def _full(value: object) -> torch.Tensor:
    assert isinstance(value, ds.ShardedTensor), type(value)
    return value.full_tensor()


@multi_rank(world_size=[2, 3])
def test_frexp_gives_two_sharded_outputs(rank: int, world_size: int) -> None:
    x = torch.linspace(-3.0, 5.0, 7)
    mantissa, exponent = torch.frexp(shard(x, rows(world_size)))
    want_mantissa, want_exponent = torch.frexp(x)
    torch.testing.assert_close(_full(mantissa), want_mantissa)
    torch.testing.assert_close(_full(exponent), want_exponent)
    empty_mantissa, empty_exponent = torch.frexp(shard(torch.ones(1, 0, 3), rows(world_size)))
    assert empty_mantissa.shape == (1, 0, 3) and empty_exponent.dtype == torch.int32


@multi_rank(world_size=[2, 3])
def test_equal_with_a_plain_operand_is_dense_equal(rank: int, world_size: int) -> None:
    x = torch.arange(6.0).reshape(3, 2)
    sx = shard(x, rows(world_size))
    assert torch.equal(sx, torch.tensor(1.0)) is False  # sizes differ: False, no error
    assert torch.equal(torch.tensor(1.0), sx) is False
    assert torch.equal(sx, x.clone()) is True
    assert torch.equal(x.clone(), sx) is True
    changed = x.clone()
    changed[-1, -1] = -1.0  # on the last rank's block only
    assert torch.equal(sx, changed) is False


@multi_rank(world_size=[2, 3])
def test_adaptive_max_pool_with_uneven_windows_matches_dense(rank: int,
                                                             world_size: int) -> None:
    # Its decomposition returns NotImplemented for windows that do not divide the input
    # (it raised NotImplementedError here); ops/spatial_backward.py now runs the kernel
    # per block, forward and backward.
    dense = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = shard(dense, rows(world_size), requires_grad=True)
    out = torch.nn.functional.adaptive_max_pool1d(x, 3)
    out.sum().backward()
    reference = dense.clone().requires_grad_()
    expected = torch.nn.functional.adaptive_max_pool1d(reference, 3)
    expected.sum().backward()
    torch.testing.assert_close(_full(out), expected)
    torch.testing.assert_close(_full(x.grad), reference.grad)


@multi_rank(world_size=[2, 3])
def test_one_element_sharded_tensor_viewed_as_0_dim(rank: int, world_size: int) -> None:
    # prelu(0-dim input, weight [1]) views the sharded weight (one block of 1, empty
    # blocks elsewhere) to 0-dim: the empty blocks used to become overlapping 0-dim blocks.
    weight = torch.tensor([0.25])
    x = torch.tensor(-0.7)
    got = torch.nn.functional.prelu(x, shard(weight, rows(world_size)))
    torch.testing.assert_close(_full(got), torch.nn.functional.prelu(x, weight))
    scalar = shard(torch.tensor([[3.0]]), rows(world_size)).view(())
    assert scalar.shape == () and scalar.item() == 3.0
    torch.testing.assert_close(_full(scalar.reshape(1, 1, 1)), torch.full((1, 1, 1), 3.0))


@multi_rank(world_size=[2, 3])
def test_masked_var_with_a_broadcast_mask(rank: int, world_size: int) -> None:
    # The mask [1, 5, 5] is chunked along its size-1 dim; the full reduction ends in a
    # view of a one-element sharded tensor to 0-dim (as above).
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 5, 5, generator=generator)
    mask = torch.rand(1, 5, 5, generator=generator) > 0.3
    for correction in (None, -1):
        got = torch.masked._ops.var(shard(x, rows(world_size)),
                                    mask=shard(mask, rows(world_size)), correction=correction)
        torch.testing.assert_close(_full(got), torch.masked._ops.var(x, mask=mask,
                                                                     correction=correction))


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("case", ["empty_uint8", "empty_2d_uint8", "0_dim_source",
                                  "empty_rows", "empty_columns"])
def test_gather_with_empty_or_0_dim_operands(rank: int, world_size: int, case: str) -> None:
    x, dim, index = {
        "empty_uint8": (torch.arange(5.0), 0, torch.zeros(0, dtype=torch.uint8)),
        "empty_2d_uint8": (torch.arange(5.0), 0, torch.zeros(2, 0, dtype=torch.uint8)),
        "0_dim_source": (torch.tensor(1.5), 0, torch.zeros(1, dtype=torch.int64)),
        "empty_rows": (torch.randn(4, 3), 0, torch.zeros(0, 3, dtype=torch.int64)),
        "empty_columns": (torch.randn(4, 3), 1, torch.zeros(4, 0, dtype=torch.int64)),
    }[case]
    dense = x.clone().requires_grad_(True)
    sharded = (shard(x, rows(world_size)) if x.dim() else x.clone()).requires_grad_(True)
    want = torch.gather(dense, dim, index)
    got = torch.gather(sharded, dim, shard(index, rows(world_size)))
    torch.testing.assert_close(_full(got), want)
    (want * 2.0).sum().backward()
    (got * 2.0).sum().backward()
    grad = sharded.grad
    torch.testing.assert_close(grad.full_tensor() if isinstance(grad, ds.ShardedTensor)
                               else grad, dense.grad)


@multi_rank(world_size=[2, 3])
def test_in_place_views_change_the_tensor_not_its_aliases(rank: int, world_size: int) -> None:
    x = torch.randn(4, 1, 3, generator=torch.Generator().manual_seed(0))
    sx = shard(x, rows(world_size))
    alias = sx.detach()
    assert sx.squeeze_(1) is sx
    assert sx.shape == (4, 3) and alias.shape == (4, 1, 3)
    want = x.squeeze(1)
    torch.testing.assert_close(sx.full_tensor(), want)
    for step in (lambda t: t.unsqueeze_(0), lambda t: t.transpose_(0, 2),
                 lambda t: t.squeeze_(), lambda t: t.t_(), lambda t: t.squeeze_(-1)):
        want = step(want.clone())
        assert step(sx) is sx
        assert sx.shape == want.shape and sx.is_contiguous()
        torch.testing.assert_close(sx.full_tensor(), want)
    sx.mul_(2.0)  # the blocks still alias the original data
    torch.testing.assert_close(alias.full_tensor(), 2.0 * x)


@multi_rank(world_size=[2, 3])
def test_vector_matrix_product_uses_squeeze_(rank: int, world_size: int) -> None:
    vector = torch.arange(3.0)
    matrix = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    sharded = shard(vector, rows(world_size)).requires_grad_(True)
    got = sharded @ matrix  # matmul: unsqueeze(0).mm(...).squeeze_(0)
    torch.testing.assert_close(_full(got), vector @ matrix)
    got.sum().backward()
    torch.testing.assert_close(_full(sharded.grad), matrix.sum(1))


# -- ops that were unsupported: flip and the scans, on every 2-D layout -------------------

@multi_rank(world_size=[1, 2, 3])
@pytest.mark.parametrize("layout", ["rows", "cols", "several", "several_cols", "grid",
                                    "replicate"])
def test_flip_and_scans_match_dense(rank: int, world_size: int, layout: str) -> None:
    size = (10, 7)
    specs = {**specs_2d(size, world_size), "several_cols": several(world_size, 1)}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, generator=generator)
    integers = torch.randint(-3, 4, size, generator=generator)
    sx, si = shard(x, specs[layout]), shard(integers, specs[layout])
    for dims in ([0], [1], [0, 1], [-1]):
        torch.testing.assert_close(_full(sx.flip(dims)), x.flip(dims))
    for dim in (0, 1, -1):
        for scan in (torch.cumsum, torch.cumprod):
            torch.testing.assert_close(_full(scan(sx, dim)), scan(x, dim))
            torch.testing.assert_close(_full(scan(si, dim)), scan(integers, dim))
            torch.testing.assert_close(_full(scan(sx, dim, dtype=torch.float64)),
                                       scan(x, dim, dtype=torch.float64))
        torch.testing.assert_close(_full(torch.logcumsumexp(sx, dim)),
                                   torch.logcumsumexp(x, dim))
        in_place = sx.clone()
        assert in_place.cumsum_(dim) is in_place
        torch.testing.assert_close(_full(in_place), x.cumsum(dim))
    weight = torch.linspace(0.5, 1.5, x.numel()).reshape(size)
    for chain in (lambda t: t.cumsum(0).flip([1]), lambda t: t.cumprod(0),
                  lambda t: t.cumprod(1).flip([0, 1]), lambda t: t.logcumsumexp(0)):
        dense = x.clone().requires_grad_(True)
        sharded = shard(x, specs[layout], requires_grad=True)
        (chain(dense) * weight).sum().backward()
        (chain(sharded) * weight).sum().backward()
        torch.testing.assert_close(_full(sharded.grad), dense.grad)


@multi_rank(world_size=[2, 3])
def test_cumsum_of_a_partial_stays_partial(rank: int, world_size: int) -> None:
    summand = torch.arange(6.0).reshape(2, 3) * (rank + 1)
    partial = ds.ShardedTensor.from_local_tensor(summand, ds.Partial(), 2, 3)
    got = partial.cumsum(1)
    assert got._layout.is_partial
    total = torch.arange(6.0).reshape(2, 3) * sum(range(1, world_size + 1))
    torch.testing.assert_close(got.full_tensor(), total.cumsum(1))
    torch.testing.assert_close(partial.cumprod(0).full_tensor(), total.cumprod(0))


@multi_rank(world_size=[2, 3])
def test_pointwise_with_kwargs_on_a_0_dim_sharded_tensor(rank: int, world_size: int) -> None:
    # x[i] of a sharded vector is 0-dim with its one block on one rank; the other ranks
    # learn the result's dtype from stand-ins, and need rounding_mode for it (bucketize's
    # decomposition divides so): they raised while the owner went on to a collective.
    boundaries = torch.tensor([0.1, 0.5, 0.9, 1.3, 2.0])
    sharded = shard(boundaries, rows(world_size))
    got = torch.div(sharded[4], sharded[1], rounding_mode="floor")
    torch.testing.assert_close(_full(got), torch.div(boundaries[4], boundaries[1],
                                                     rounding_mode="floor"))
    bucket = torch.bucketize(torch.tensor(0.7), sharded)
    torch.testing.assert_close(_full(bucket), torch.bucketize(torch.tensor(0.7), boundaries))


@multi_rank(world_size=[2, 3])
def test_constant_pad_and_max_pool_through_prims_copy_to(rank: int, world_size: int) -> None:
    # torch's constant_pad_nd reference (max_pool's ceil_mode pads with it) copies its input
    # into a slice of a new plain tensor with prims.copy_to: that was unsupported.
    x = torch.randn(3, 2, 3, 6, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(shard(x, rows(world_size)), (1, 2, 0, 1), value=-1.0)
    torch.testing.assert_close(_full(padded), torch.nn.functional.pad(x, (1, 2, 0, 1),
                                                                      value=-1.0))
    dense = x.clone().requires_grad_(True)
    sharded = shard(x, rows(world_size), requires_grad=True)
    want = torch.nn.functional.max_pool2d(dense, 3, 2, ceil_mode=True)
    got = torch.nn.functional.max_pool2d(sharded, 3, 2, ceil_mode=True)
    torch.testing.assert_close(_full(got), want)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(_full(sharded.grad), dense.grad)


@multi_rank(world_size=[2])
def test_batched_product_with_empty_blocks_narrower_than_the_tensor(
        rank: int, world_size: int) -> None:
    # An empty tensor's grid whose empty blocks split dim 1 (a 2x2 mesh's [Shard(0),
    # Shard(1)] of a 0x2x0 tensor gives two such blocks on one box): the "keep the batch
    # blocks" strategy paired them with whole blocks of the other operand and raised.
    spec = ds.EnumerableShardingSpec([
        ds.ShardMetadata([0, 0, 0], [0, 1, 0], "rank:0/cpu"),
        ds.ShardMetadata([0, 1, 0], [0, 1, 0], "rank:1/cpu"),
        ds.ShardMetadata([0, 0, 0], [0, 1, 0], "rank:1/cpu")])
    x = torch.randn(0, 2, 0)
    other = torch.randn(0, 2)
    got = ds.ShardedTensor.from_replicated(other, ds.Partial()) @ \
        ds.ShardedTensor.from_replicated(x, spec)
    torch.testing.assert_close(_full(got), other @ x)


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("layout", ["rows", "cols", "several", "grid", "replicate"])
def test_tensor_split_by_an_index_tensor(rank: int, world_size: int, layout: str) -> None:
    """Issue #18: ``tensor_split(x, indices_tensor)``. With a plain index tensor (1-D
    indices or a 0-dim count) or a 0-dim sharded count it matches dense on every layout.

    A 1-D *sharded* index tensor cannot work: torch's CompositeImplicitAutograd kernel
    reads its data pointer on the host, above ``__torch_dispatch__`` (NOTE [host
    arguments stay dense] in dispatch_shard/testing/opinfo.py), and a wrapper has no data.
    Pinned so that a torch that dispatches there first shows up here."""
    dense = torch.randn(10, 7, generator=torch.Generator().manual_seed(11))
    x = shard(dense, specs_2d((10, 7), world_size)[layout])
    replicated_count = shard(torch.tensor(3), ds.Replicate())
    for indices, dim in [(torch.tensor([1, 4, 4, 9]), 0), (torch.tensor([2, 6]), 1),
                         (torch.tensor([-3, 12]), 0), (torch.tensor([], dtype=torch.long), 1),
                         (torch.tensor(4), 0), (torch.tensor(3), 1), (replicated_count, 0),
                         (replicated_count, 1)]:
        plain = indices.full_tensor() if isinstance(indices, ds.ShardedTensor) else indices
        got, want = torch.tensor_split(x, indices, dim), torch.tensor_split(dense, plain, dim)
        assert len(got) == len(want), (plain, dim)
        for piece, expected in zip(got, want, strict=True):
            torch.testing.assert_close(_full(piece), expected)
    with pytest.raises(RuntimeError, match="data is not allocated"):
        torch.tensor_split(x, shard(torch.tensor([1, 4]), ds.Replicate()))


@multi_rank(world_size=[2, 3])
def test_linear_weight_gradient_reduced_from_a_strided_summand(rank: int, world_size: int
                                                               ) -> None:
    """OpInfo ``nn.functional.linear_cross_entropy`` on world 2: batch-split input, class-split
    weight. The weight's gradient is a Partial whose summand is a transposed ``mm`` (not
    contiguous); with 8 rows over 2 ranks no padding copied it, and the bucketed
    reduce-scatter (dispatch_shard/grad_reduction.py) could not ``view`` it."""
    generator = torch.Generator().manual_seed(12)
    x, matrix = torch.randn(8, 3, generator=generator), torch.randn(4, 3, generator=generator)
    target = torch.randint(0, 4, (8,), generator=generator)
    sharded_x = shard(x, rows(world_size), requires_grad=True)
    sharded_matrix = shard(matrix, rows(world_size), requires_grad=True)
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(sharded_x, sharded_matrix),
                                      target).backward()
    dense_x, dense_matrix = x.clone().requires_grad_(True), matrix.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(dense_x, dense_matrix),
                                      target).backward()
    torch.testing.assert_close(_full(sharded_x.grad), dense_x.grad)
    torch.testing.assert_close(_full(sharded_matrix.grad), dense_matrix.grad)


@multi_rank(world_size=[2, 3])
def test_scans_on_an_irregular_tiling(rank: int, world_size: int) -> None:
    """Blocks that start at different rows in different columns (no grid): some
    (slot, column) totals have no writer, and take the scan's identity (a 0 there made
    cumprod 0 and logcumsumexp too large below it)."""
    boxes = [((0, 0), (2, 1)), ((0, 1), (1, 1)), ((1, 1), (3, 1)), ((2, 0), (2, 1))]
    spec = ds.EnumerableShardingSpec([
        ds.ShardMetadata(list(offsets), list(sizes), f"rank:{i % world_size}/cpu")
        for i, (offsets, sizes) in enumerate(boxes)])
    x = torch.rand(4, 2, generator=torch.Generator().manual_seed(1)) + 0.5
    sx = shard(x, spec)
    for scan in (torch.cumsum, torch.cumprod, torch.logcumsumexp):
        torch.testing.assert_close(_full(scan(sx, 0)), scan(x, 0), msg=scan.__name__)
        complex_x = x.to(torch.complex64) * (1 + 0.5j)
        torch.testing.assert_close(_full(scan(shard(complex_x, spec), 0)), scan(complex_x, 0),
                                   msg=f"complex {scan.__name__}")


@multi_rank(world_size=[2, 3])
def test_out_variants_write_into_sharded_and_plain_outs(rank: int, world_size: int) -> None:
    """``out=`` overloads (ops/decomposed.py, source 3): the functional op, then ``copy_``
    into each out: a ShardedTensor out keeps its own layout, a plain out (a replicated value)
    gets the whole result on every rank, an out of another size is resized as in dense."""
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 4, generator=generator), torch.randn(4, 5, generator=generator)
    x = shard(a, rows(world_size))
    w = shard(b, ds.Replicate())
    plain = torch.empty(7, 5)
    assert torch.mm(x, w, out=plain) is plain
    torch.testing.assert_close(plain, a @ b)
    sharded_out = shard(torch.zeros(7, 5), several(world_size))
    assert torch.mm(x, w, out=sharded_out) is sharded_out
    assert sharded_out.sharding_spec() == several(world_size)
    torch.testing.assert_close(_full(sharded_out), a @ b)
    resized = torch.empty(0)
    torch.amax(x, 1, out=resized)
    torch.testing.assert_close(resized, a.amax(1))
    values, indices = torch.empty(7), torch.empty(7, dtype=torch.long)
    torch.max(x, 1, out=(values, indices))
    want_values, want_indices = a.max(1)
    assert torch.equal(values, want_values) and torch.equal(indices, want_indices)
    bias = torch.randn(5, generator=generator)
    into = torch.empty(7, 5)
    torch.addmm(bias, x, w, out=into)
    torch.testing.assert_close(into, torch.addmm(bias, a, b))


@multi_rank(world_size=[2, 3])
def test_copy_into_a_partial_from_its_own_layout(rank: int, world_size: int) -> None:
    """``partial.copy_(other)`` where ``other`` is a Partial of the same layout and dtype
    copies the terms (the value follows; autograd's gradient accumulation does this);
    any other source into a Partial is still refused, on every rank."""
    dense = torch.arange(12.0).reshape(3, 4)
    term = dense if rank == 0 else torch.zeros(3, 4)
    target = ds.ShardedTensor.from_local_tensor(torch.ones(3, 4), ds.Partial(), 3, 4)
    source = ds.ShardedTensor.from_local_tensor(term.clone(), ds.Partial(), 3, 4)
    with ds.count_collectives() as counted:
        assert target.copy_(source) is target
    assert counted.counts == {}
    torch.testing.assert_close(_full(target), dense)
    with pytest.raises(NotImplementedError, match="copy_ into a Partial"):
        target.copy_(shard(dense, rows(world_size)))
    with pytest.raises(NotImplementedError, match="copy_ into a Partial"):
        target.copy_(source.double())
