"""View and shape ops against the dense computation, on every layout; views alias their base."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from layouts import rows, several, shard, specs_2d

import dispatch_shard as ds
from dispatch_shard.testing import multi_rank

SIZE = (10, 7)

CASES: dict[str, Callable[[torch.Tensor], object]] = {
    "t": lambda a: a.t(),
    "transpose": lambda a: a.transpose(0, 1),
    "permute": lambda a: a.permute(1, 0),
    "unsqueeze_front": lambda a: a.unsqueeze(0),
    "unsqueeze_back": lambda a: a.unsqueeze(-1),
    "squeeze": lambda a: a.unsqueeze(1).squeeze(1),
    "view_add_dim": lambda a: a.view(10, 7, 1),
    "flatten": lambda a: a.flatten(),
    "reshape": lambda a: a.reshape(5, 14),
    "expand": lambda a: a.unsqueeze(0).expand(3, 10, 7),
    "slice_dim0": lambda a: a[2:8],
    "slice_dim1": lambda a: a[:, 1:5],
    "slice_step": lambda a: a[::2],
    "slice_negative": lambda a: a[-4:-1],
    "select_dim0": lambda a: a[3],
    "select_dim1": lambda a: a[:, -3],
    "split": lambda a: a.split(3),
    "split_with_sizes": lambda a: a.split([2, 5], 1),
    "chunk": lambda a: a.chunk(4, 0),
    "unbind": lambda a: a.unbind(1),
    "cat_dim0": lambda a: torch.cat([a, a * 2], 0),
    "cat_dim1": lambda a: torch.cat([a, a], 1),
    "stack": lambda a: torch.stack([a, a + 1], 1),
    "to_double": lambda a: a.to(torch.float64),
    "transpose_then_pointwise": lambda a: a.t() * 2 + 1,
}


def _values(result: object) -> list[torch.Tensor]:
    items = list(result) if isinstance(result, list | tuple) else [result]
    for item in items:
        assert isinstance(item, ds.ShardedTensor), type(item)
    return [item.full_tensor() for item in items]  # type: ignore[union-attr]


@multi_rank(world_size=[1, 3, 4])
@pytest.mark.parametrize("layout", ["rows", "cols", "several", "grid", "replicate"])
def test_view_and_shape_ops_match_dense(rank: int, world_size: int, layout: str) -> None:
    x = torch.randn(*SIZE, generator=torch.Generator().manual_seed(0))
    sx = shard(x, specs_2d(SIZE, world_size)[layout])
    for name, op in CASES.items():
        got, want = _values(op(sx)), op(x)
        want_list = list(want) if isinstance(want, list | tuple) else [want]
        assert len(got) == len(want_list), name
        for g, w in zip(got, want_list, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w), name


# (dim, start, end, step); (0, 0, 2, 1) and (0, 8, 10, 1) fall inside one block of rows:
# the other blocks of the slice are empty along the sliced dim.
SLICES = [(1, 0, 6, 1), (1, 2, 7, 2), (0, 2, 8, 1), (0, 1, 10, 3), (1, 3, 3, 1), (-1, -5, -1, 1),
          (0, 0, 2, 1), (0, 8, 10, 1)]


@multi_rank(world_size=[1, 3, 4])
@pytest.mark.parametrize("layout", ["rows", "cols", "several", "grid", "replicate", "partial"])
def test_slice_backward_and_slice_scatter_match_dense(rank: int, world_size: int,
                                                      layout: str) -> None:
    """NOTE [a slice's gradient, block by block] in ops/view.py: ``slice_backward`` and
    ``slice_scatter`` on every layout, along split and unsplit dims, steps and an empty
    slice, equal dense's; along an unsplit dim no collective runs and the result keeps
    the gradient's layout (a pending gradient stays pending)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(*SIZE, generator=generator)
    aten = torch.ops.aten
    spec = ds.Partial() if layout == "partial" else specs_2d(SIZE, world_size)[layout]
    for dim, start, end, step in SLICES:
        want_grad = x[(slice(None),) * (dim % 2) + (slice(start, end, step),)]
        if layout == "partial":  # each rank a different summand, pending
            share = want_grad * (rank + 1) / (world_size * (world_size + 1) / 2)
            grad = ds.ShardedTensor.from_local_tensor(share.contiguous(), ds.Partial(),
                                                      *want_grad.shape)
        else:  # a slice of a sharded tensor, as autograd hands it (the view's layout)
            grad = shard(x, spec)[(slice(None),) * (dim % 2) + (slice(start, end, step),)]
        assert tuple(grad.shape) == tuple(want_grad.shape)
        unsplit = dim % 2 not in ds.ops.layouts.split_dims(grad._layout)
        with ds.count_collectives() as counted:
            got = aten.slice_backward.default(grad, list(SIZE), dim, start, end, step)
        want = aten.slice_backward.default(want_grad, list(SIZE), dim, start, end, step)
        torch.testing.assert_close(got.full_tensor(), want, msg=f"{layout} {dim} {start}")
        if unsplit and want_grad.numel():
            assert not counted.events, counted.events
            assert got._layout.pending == grad._layout.pending
        # slice_scatter: into x's layout, the source cut like x's blocks (or not).
        base = shard(x * 3, rows(world_size)).redistribute(
            ds.Replicate() if layout == "partial" else spec)
        src = base[(slice(None),) * (dim % 2) + (slice(start, end, step),)] * 2
        got = aten.slice_scatter.default(base, src, dim, start, end, step)
        want = aten.slice_scatter.default(x * 3, src.full_tensor(), dim, start, end, step)
        torch.testing.assert_close(got.full_tensor(), want, msg=f"{layout} {dim} {start}")
    # Through autograd: a language model's shifted logits, split by rows; the first rows.
    for cut in ((slice(None), slice(None, -1)), (slice(None, 2),)):
        leaf = shard(x, specs_2d(SIZE, world_size)["rows" if layout == "partial" else layout],
                     requires_grad=True)
        dense = x.clone().requires_grad_(True)
        weight = torch.randn(dense[cut].shape, generator=generator)
        (leaf[cut] * weight).sum().backward()
        (dense[cut] * weight).sum().backward()
        torch.testing.assert_close(leaf.grad.full_tensor(), dense.grad)
    # A dim out of range is dense's error, on every rank.
    some = shard(x, rows(world_size))
    for op in (lambda: aten.slice_backward.default(some, list(SIZE), 2, 0, 4, 1),
               lambda: aten.slice_scatter.default(some, some, 2, 0, 4, 1)):
        with pytest.raises(IndexError, match="Dimension out of range"):
            op()


@multi_rank(world_size=[2, 3])
def test_views_keep_sharding_without_communication(rank: int, world_size: int) -> None:
    x = shard(torch.randn(*SIZE), rows(world_size))
    transposed = x.t()
    spec = transposed.sharding_spec()
    assert isinstance(spec, ds.ChunkShardingSpec) and spec.dim == 1
    for view, block in zip(transposed._local_tensors, x._local_tensors, strict=True):
        assert view.data_ptr() == block.data_ptr()  # a view of the block, not a copy
    unsqueezed = x.unsqueeze(0).sharding_spec()
    assert isinstance(unsqueezed, ds.ChunkShardingSpec) and unsqueezed.dim == 1


@multi_rank(world_size=[1, 3])
def test_in_place_through_a_view_reaches_the_base(rank: int, world_size: int) -> None:
    x = torch.randn(*SIZE, generator=torch.Generator().manual_seed(1))
    for spec in (rows(world_size), several(world_size)):
        base = shard(x, spec)
        base[:, 2:4].mul_(0)
        base.t()[1].add_(5)
        expected = x.clone()
        expected[:, 2:4] = 0
        expected[:, 1] += 5
        assert torch.equal(base.full_tensor(), expected)


@multi_rank(world_size=[2, 3])
def test_copy_between_layouts_and_from_plain(rank: int, world_size: int) -> None:
    x = torch.randn(*SIZE, generator=torch.Generator().manual_seed(2))
    specs = specs_2d(SIZE, world_size)
    for source in specs.values():
        for target in specs.values():
            destination = shard(torch.zeros(SIZE), target)
            assert destination.copy_(shard(x, source)) is destination
            assert torch.equal(destination.full_tensor(), x)
    destination = shard(torch.zeros(SIZE), rows(world_size))
    destination.copy_(x[0])  # a plain, broadcasting source
    assert torch.equal(destination.full_tensor(), x[0].expand(SIZE))


@multi_rank(world_size=[2])
def test_moving_to_another_device_is_refused(rank: int, world_size: int) -> None:
    x = shard(torch.randn(*SIZE), rows(world_size))
    with pytest.raises(NotImplementedError, match="not supported for ShardedTensor!"):
        x.to("meta")


@multi_rank(world_size=[2, 3])
def test_diagonal_is_a_view_of_every_layout(rank: int, world_size: int) -> None:
    # Each block holds a piece of the diagonal: the result has one block per input block,
    # no collectives; its backward writes through the same view (diagonal_scatter).
    for shape in ((5, 5), (4, 7), (7, 3)):
        dense = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        for name, spec in specs_2d(shape, world_size).items():
            for offset in (0, 1, -2, 3, -6):
                x = ds.ShardedTensor.from_replicated(dense, spec).requires_grad_()
                with ds.count_collectives() as counted:
                    diagonal = x.diagonal(offset)
                assert counted.counts == {}, name
                where = f"{name} {shape} offset {offset}"
                torch.testing.assert_close(diagonal.full_tensor(), dense.diagonal(offset),
                                           msg=where)
                (diagonal * torch.arange(diagonal.shape[0])).sum().backward()
                reference = dense.clone().requires_grad_()
                (reference.diagonal(offset) * torch.arange(diagonal.shape[0])).sum().backward()
                torch.testing.assert_close(x.grad.full_tensor(), reference.grad, msg=where)
        square = ds.ShardedTensor.from_replicated(dense[:3, :3].contiguous(), spec)
        torch.testing.assert_close(torch.trace(square).full_tensor(), dense[:3, :3].trace())
    cube = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(2))
    x = ds.ShardedTensor.from_replicated(cube, ds.ChunkShardingSpec(
        0, [f"rank:{r}/cpu" for r in range(world_size)]))
    torch.testing.assert_close(x.diagonal(1, 1, 2).full_tensor(), cube.diagonal(1, 1, 2))
    torch.testing.assert_close(x.diagonal(0, 2, 0).full_tensor(), cube.diagonal(0, 2, 0))
    with pytest.raises(RuntimeError, match="diagonal dimensions cannot be identical"):
        x.diagonal(0, 1, -2)


@multi_rank(world_size=[2, 3])
def test_as_strided_that_is_a_reshape(rank: int, world_size: int) -> None:
    dense = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(3))
    for name, spec in {"rows": rows(world_size), "several": several(world_size),
                       "replicate": ds.Replicate()}.items():
        x = ds.ShardedTensor.from_replicated(dense, spec)
        torch.testing.assert_close(x.as_strided((4, 6), (6, 1)).full_tensor(),
                                   dense.as_strided((4, 6), (6, 1)), msg=name)
    # group norm's decomposition reshapes through as_strided
    weight, bias = torch.ones(3), torch.zeros(3)
    x = ds.ShardedTensor.from_replicated(dense, rows(world_size))
    torch.testing.assert_close(torch.nn.functional.group_norm(x, 3, weight, bias).full_tensor(),
                               torch.nn.functional.group_norm(dense, 3, weight, bias))


# (size, stride, offset) of ``as_strided`` views of a [10, 7] tensor, and whether they stay
# inside row blocks (NOTE [strided views that stay inside blocks] in ops/strided.py)
STRIDED = {
    "windows_in_rows": ((10, 3, 3), (7, 2, 1), 0, True),  # unfold(1, 3, 2)
    "windows_in_rows_offset": ((10, 2, 3), (7, 1, 2), 1, True),
    "rows_last": ((4, 10), (1, 7), 2, True),  # a transposed piece of every row
    "windows_across_rows": ((9, 14), (7, 1), 0, False),  # overlapping pairs of rows
    "overlapping_flat": ((60, 3), (1, 1), 5, False),
    "broadcast": ((3, 10, 2), (0, 7, 3), 0, True),
    "every_other_row": ((5, 7), (14, 1), 0, False),
}


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("layout", ["rows", "cols", "several", "grid", "replicate",
                                    "partial"])
def test_as_strided_matches_dense(rank: int, world_size: int, layout: str) -> None:
    dense = torch.randn(*SIZE, generator=torch.Generator().manual_seed(4))
    weights = torch.Generator().manual_seed(5)
    for name, (size, stride, offset, in_blocks) in STRIDED.items():
        if layout == "partial":
            x = ds.ShardedTensor.from_local_tensor(dense / world_size, ds.Partial(), *SIZE)
            x.requires_grad_(True)
        else:
            x = shard(dense, specs_2d(SIZE, world_size)[layout], requires_grad=True)
        leaf = dense.clone().requires_grad_(True)
        got, want = x.as_strided(size, stride, offset), leaf.as_strided(size, stride, offset)
        assert isinstance(got, ds.ShardedTensor), name
        torch.testing.assert_close(got.full_tensor(), want, msg=name)
        if layout in ("rows", "several"):
            # served per block where the view stays in the row blocks, else gathered
            assert (got.sharding_spec() != ds.Replicate()) == in_blocks, name
        weight = torch.randn(want.shape, generator=weights)
        (got * weight).sum().backward()
        (want * weight).sum().backward()
        torch.testing.assert_close(x.grad.full_tensor(), leaf.grad, msg=name)
    x = shard(dense, specs_2d(SIZE, world_size)[layout]) if layout != "partial" else None
    if x is not None:
        with pytest.raises(RuntimeError, match="out of bounds for storage of size 280"):
            x.as_strided((10, 8), (7, 1))


@multi_rank(world_size=[2, 3])
def test_as_strided_views_alias_their_blocks(rank: int, world_size: int) -> None:
    dense = torch.randn(*SIZE, generator=torch.Generator().manual_seed(6))
    for spec in (rows(world_size), several(world_size)):
        x = shard(dense, spec)
        windows = x.unfold(1, 3, 2)  # inside the row blocks: a view of them
        assert windows.sharding_spec() == ds.ChunkShardingSpec(0, spec.placements)
        x.mul_(2)
        torch.testing.assert_close(windows.full_tensor(), (dense * 2).unfold(1, 3, 2))


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("layout", ["rows", "several", "grid", "replicate"])
def test_unfold_stft_and_as_strided_scatter_match_dense(rank: int, world_size: int,
                                                        layout: str) -> None:
    dense = torch.randn(*SIZE, generator=torch.Generator().manual_seed(7))
    spec = specs_2d(SIZE, world_size)[layout]
    for dim, length, step in [(0, 3, 2), (1, 3, 1), (1, 7, 1), (0, 10, 3)]:
        x, leaf = shard(dense, spec, requires_grad=True), dense.clone().requires_grad_(True)
        got, want = x.unfold(dim, length, step), leaf.unfold(dim, length, step)
        torch.testing.assert_close(got.full_tensor(), want)
        weight = torch.linspace(0.5, 1.5, want.numel()).reshape(want.shape)
        (got * weight).sum().backward()
        (want * weight).sum().backward()
        torch.testing.assert_close(x.grad.full_tensor(), leaf.grad)
    signal = torch.randn(10, 64, generator=torch.Generator().manual_seed(8))
    window = torch.hann_window(16)
    sharded = shard(signal, specs_2d((10, 64), world_size)[layout])
    for center in (False, True):
        got = torch.stft(sharded, 16, hop_length=4, window=window, center=center,
                         return_complex=True)
        torch.testing.assert_close(got.full_tensor(), torch.stft(
            signal, 16, hop_length=4, window=window, center=center, return_complex=True))
    src = torch.randn(4, 3, generator=torch.Generator().manual_seed(9))
    for size, stride, offset in [((4, 3), (7, 2), 1), ((4, 3), (1, 4), 0), ((4, 3), (14, 1), 20)]:
        x = shard(dense, spec)
        got = torch.as_strided_scatter(x, shard(src, ds.Replicate()), size, stride, offset)
        assert got.sharding_spec() == x.sharding_spec()
        torch.testing.assert_close(got.full_tensor(),
                                   torch.as_strided_scatter(dense, src, size, stride, offset))


def _cut_case(world_size: int, blocks: str = "one") -> tuple[torch.Tensor, ds.ShardedTensor]:
    """``[3, 5, 2, 4]`` split unevenly along its dim 1: one block per rank, or two (in a
    shuffled rank order)."""
    dense = torch.randn(3, 5, 2, 4, generator=torch.Generator().manual_seed(7))
    spec = ds.ChunkShardingSpec(1, [f"rank:{r}/cpu" for r in range(world_size)]) \
        if blocks == "one" else several(world_size, 1)
    return dense, ds.ShardedTensor.from_replicated(dense, spec)


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_views_that_cut_blocks_into_pieces(rank: int, world_size: int, blocks: str) -> None:
    """Folding a whole dim into a split inner one (``[B, H, ...] -> [B * H, ...]``, H
    split) cuts each block into one piece per B index: no collective, the pieces are
    views of the blocks, and the view back keeps them (NOTE [views that cut blocks into
    pieces] in ops/reshape.py)."""
    dense, x = _cut_case(world_size, blocks)
    with ds.count_collectives() as counted:
        folded = x.view(15, 2, 4)
        flat = x.view(3, 40)  # H and the inner dims: whole rows, one piece per block
        back = folded.view(3, 5, 2, 4)
    assert counted.counts == {}
    torch.testing.assert_close(folded.full_tensor(), dense.view(15, 2, 4))
    torch.testing.assert_close(flat.full_tensor(), dense.view(3, 40))
    torch.testing.assert_close(back.full_tensor(), dense)
    held = [s for s in x.local_shards() if s.tensor.numel()]
    assert len([s for s in folded.local_shards() if s.tensor.numel()]) == 3 * len(held)
    storages = {s.tensor.untyped_storage().data_ptr() for s in held}
    for piece in folded.local_shards():  # views of this rank's blocks: the same storage
        if piece.tensor.numel():
            assert piece.tensor.untyped_storage().data_ptr() in storages
    folded.mul_(2)  # in place through the pieces reaches the base
    torch.testing.assert_close(x.full_tensor(), dense * 2)


@multi_rank(world_size=[2, 3])
def test_views_whose_pieces_are_no_boxes_gather(rank: int, world_size: int) -> None:
    """A run that is no box of the new dims (it wraps a row): the view falls back to
    replicated, never a wrong value."""
    dense, x = _cut_case(world_size)
    odd = x.view(6, 20)  # H's blocks (2 * 4 elements per head) end inside rows of 20
    torch.testing.assert_close(odd.full_tensor(), dense.view(6, 20))
    assert odd.sharding_spec() == ds.Replicate()


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("layout", ["rows", "cols", "several", "grid", "replicate",
                                    "partial"])
def test_resize_matches_dense_on_the_elements_it_keeps(rank: int, world_size: int,
                                                       layout: str) -> None:
    dense = torch.randn(*SIZE, generator=torch.Generator().manual_seed(10))

    def sharded() -> ds.ShardedTensor:
        if layout == "partial":
            return ds.ShardedTensor.from_local_tensor(dense / world_size, ds.Partial(), *SIZE)
        return shard(dense, specs_2d(SIZE, world_size)[layout])

    for size in [(10, 7), (7, 10), (70,), (2, 5, 7), (3, 5), (0,), (8, 10), (9, 9)]:
        x, want = sharded(), dense.clone()
        assert x.resize_(size) is x
        want.resize_(size)
        kept = min(70, want.numel())  # dense leaves the rest uninitialised; we write zeros
        assert x.shape == want.shape, size
        got = x.full_tensor()
        torch.testing.assert_close(got.flatten()[:kept], want.flatten()[:kept], msg=str(size))
        assert not got.flatten()[kept:].any(), size
        assert isinstance(x + 1, ds.ShardedTensor)  # x is still a working ShardedTensor
    x = sharded()
    x.resize_as_(shard(torch.zeros(5, 14), ds.Replicate()))
    torch.testing.assert_close(x.full_tensor(), dense.reshape(5, 14))
    x.resize_as_(torch.zeros(14, 5))
    torch.testing.assert_close(x.full_tensor(), dense.reshape(14, 5))
    plain = dense.clone()
    plain.resize_as_(shard(torch.zeros(7, 10), ds.Replicate()))  # a plain x stays plain
    assert type(plain) is torch.Tensor and plain.shape == (7, 10)
    with pytest.raises(NotImplementedError, match="not supported for ShardedTensor"):
        sharded().resize_(2, 5, 7, 1, memory_format=torch.channels_last)
