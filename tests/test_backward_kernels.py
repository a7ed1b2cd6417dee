"""Backward kernels of resampling ops, shrinks, margin losses and whole-value ops (issue
#18), on batch-split, channel-split and spatially split layouts, against dense."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from layouts import several, shard
from torch import nn

import dispatch_shard as ds
from dispatch_shard.testing import multi_rank


def _spec(dim: int, world_size: int, blocks: str) -> ds.ChunkShardingSpec:
    if blocks == "several":
        return several(world_size, dim)
    return ds.ChunkShardingSpec(dim, [f"rank:{r}/cpu" for r in range(world_size)])


def _randn(*size: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _check(fn: Callable[..., torch.Tensor], denses: list[torch.Tensor],
           specs: list[ds.ShardingSpec | None], name: str,
           no_collectives: bool = False) -> None:
    """``fn`` forward and backward on sharded copies of ``denses`` (plain where the spec
    is None) against dense; the upstream gradient is sharded like the output."""
    leaves = [d.clone().requires_grad_(d.is_floating_point()) if spec is None
              else shard(d, spec, requires_grad=d.is_floating_point())
              for d, spec in zip(denses, specs, strict=True)]
    out = fn(*leaves)
    upstream = ds.ShardedTensor.from_replicated(_randn(*out.shape, seed=2),
                                                out.sharding_spec())
    with ds.count_collectives() as backward:
        out.backward(upstream)
    references = [d.clone().requires_grad_(d.is_floating_point()) for d in denses]
    expected = fn(*references)
    expected.backward(_randn(*expected.shape, seed=2))
    torch.testing.assert_close(out.full_tensor(), expected, equal_nan=True, msg=name)
    for leaf, reference in zip(leaves, references, strict=True):
        if reference.grad is None:
            continue
        got = leaf.grad.full_tensor() if isinstance(leaf.grad, ds.ShardedTensor) else leaf.grad
        torch.testing.assert_close(got, reference.grad, equal_nan=True, msg=f"{name} grad")
    if no_collectives:  # (a scalar's upstream gradient may be a pending sum: reduced once)
        allowed = {"all_reduce": 1} if out.dim() == 0 else {}
        assert not backward.counts or backward.counts == allowed, (name, backward.counts)


# name: (op, input shape, number of trailing dims it mixes)
RESAMPLING: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], tuple[int, ...], int]] = {
    "nearest1d": (lambda t: F.interpolate(t, scale_factor=2), (5, 3, 4), 1),
    "nearest_exact1d": (lambda t: F.interpolate(t, size=7, mode="nearest-exact"), (5, 3, 4), 1),
    "linear1d": (lambda t: F.interpolate(t, size=7, mode="linear"), (5, 3, 4), 1),
    "nearest2d": (lambda t: F.interpolate(t, size=(7, 5)), (5, 3, 4, 3), 2),
    "nearest_exact2d": (lambda t: F.interpolate(t, scale_factor=2, mode="nearest-exact"),
                        (5, 3, 4, 3), 2),
    "bilinear": (lambda t: F.interpolate(t, size=(7, 5), mode="bilinear"), (5, 3, 4, 3), 2),
    "bilinear_corners": (lambda t: F.interpolate(t, scale_factor=2, mode="bilinear",
                                                 align_corners=True), (5, 3, 4, 3), 2),
    "bilinear_aa": (lambda t: F.interpolate(t, size=(2, 2), mode="bilinear", antialias=True),
                    (5, 3, 4, 3), 2),
    "bicubic": (lambda t: F.interpolate(t, size=(7, 5), mode="bicubic"), (5, 3, 4, 3), 2),
    "nearest3d": (lambda t: F.interpolate(t, scale_factor=2), (5, 3, 2, 3, 2), 3),
    "nearest_exact3d": (lambda t: F.interpolate(t, size=(3, 4, 3), mode="nearest-exact"),
                        (5, 3, 2, 3, 2), 3),
    "trilinear": (lambda t: F.interpolate(t, size=(3, 4, 3), mode="trilinear"),
                  (5, 3, 2, 3, 2), 3),
    "adaptive_avg_pool2d": (lambda t: F.adaptive_avg_pool2d(t, (3, 2)), (5, 3, 7, 5), 2),
    "adaptive_avg_pool3d": (lambda t: F.adaptive_avg_pool3d(t, (2, 3, 2)), (5, 3, 3, 5, 4), 3),
    "adaptive_max_pool2d": (lambda t: F.adaptive_max_pool2d(t, (3, 2)), (5, 3, 7, 5), 2),
    "adaptive_max_pool3d": (lambda t: F.adaptive_max_pool3d(t, (2, 3, 2)), (5, 3, 3, 5, 4), 3),
    "replicate_pad1d": (lambda t: F.pad(t, (2, 1), mode="replicate"), (5, 3, 4), 1),
    "replicate_pad2d": (lambda t: F.pad(t, (2, 1, 0, 3), mode="replicate"), (5, 3, 4, 3), 2),
    "replicate_pad3d": (lambda t: F.pad(t, (1, 1, 2, 0, 1, 2), mode="replicate"),
                        (5, 3, 2, 3, 2), 3),
    "reflect_pad2d": (lambda t: F.pad(t, (2, 1, 0, 2), mode="reflect"), (5, 3, 4, 3), 2),
    "hardshrink": (lambda t: F.hardshrink(t, 0.6), (5, 3, 4), 0),
    "softshrink": (lambda t: F.softshrink(t, 0.4), (5, 3, 4), 0),
}


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_resampling_backward_matches_dense(rank: int, world_size: int, dim: int,
                                           blocks: str) -> None:
    # dim 0: batch blocks; dim 1: channel blocks (3 channels: empty blocks on 3 ranks with
    # several blocks each); dim 2: a split spatial dim (the whole-value path).
    spec = _spec(dim, world_size, blocks)
    for name, (fn, shape, mixed) in RESAMPLING.items():
        dense = _randn(*shape, seed=1)
        per_block = dim < len(shape) - mixed and name != "bilinear_aa"
        _check(fn, [dense], [spec], name, no_collectives=per_block)


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_grid_sampler_backward_matches_dense(rank: int, world_size: int, blocks: str) -> None:
    batch = _spec(0, world_size, blocks)
    channels = _spec(1, world_size, blocks)
    for mode, padding in (("bilinear", "zeros"), ("nearest", "border"),
                          ("bicubic", "reflection")):
        def sample2d(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            return F.grid_sample(x, grid, mode=mode, padding_mode=padding,  # noqa: B023
                                 align_corners=False)

        x, grid = _randn(5, 3, 4, 6, seed=3), _randn(5, 3, 2, 2, seed=4)
        _check(sample2d, [x, grid], [batch, batch], f"2d {mode}", no_collectives=True)
        _check(sample2d, [x, grid], [channels, None], f"2d {mode} channels")  # whole value
        if mode != "bicubic":
            x3, grid3 = _randn(5, 2, 3, 4, 3, seed=5), _randn(5, 2, 3, 2, 3, seed=6)
            _check(sample2d, [x3, grid3], [batch, batch], f"3d {mode}")


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_fractional_max_pool_backward_matches_dense(rank: int, world_size: int,
                                                    blocks: str) -> None:
    spec = _spec(0, world_size, blocks)
    torch.manual_seed(0)
    samples2d, samples3d = torch.rand(5, 3, 2), torch.rand(5, 3, 3)
    _check(lambda t: F.fractional_max_pool2d(t, 2, output_size=(3, 4),
                                             _random_samples=samples2d),
           [_randn(5, 3, 6, 7, seed=7)], [spec], "fractional_max_pool2d")
    _check(lambda t: F.fractional_max_pool3d(t, 2, output_size=(2, 3, 2),
                                             _random_samples=samples3d),
           [_randn(5, 3, 4, 5, 4, seed=8)], [spec], "fractional_max_pool3d")


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_margin_losses_backward_matches_dense(rank: int, world_size: int, dim: int,
                                              blocks: str) -> None:
    # dim 0: blocks of samples (per block); dim 1: split classes (the whole value).
    spec = _spec(dim, world_size, blocks)
    rows = _spec(0, world_size, blocks)
    x = _randn(7, 5, seed=9)
    target = torch.randint(0, 5, (7,), generator=torch.Generator().manual_seed(10))
    labels = torch.tensor([[3, 0, -1, 1, 2], [1, -1, 0, 0, 0], [4, 2, 1, 0, 3],
                           [0, 1, -1, 2, 2], [-1, 0, 0, 0, 0], [2, -1, 3, 3, 3],
                           [1, 4, -1, 0, 0]])
    weight = torch.rand(5, generator=torch.Generator().manual_seed(11)) + 0.5
    for reduction in ("none", "sum", "mean"):
        for p, w in ((1, None), (2, weight)):
            _check(lambda a, t: F.multi_margin_loss(a, t, p=p, margin=0.7,  # noqa: B023
                                                    weight=w, reduction=reduction),  # noqa: B023
                   [x, target], [spec, rows], f"multi_margin {reduction} p={p}",
                   no_collectives=dim == 0)
        _check(lambda a, t: F.multilabel_margin_loss(a, t, reduction=reduction),  # noqa: B023
               [x, labels], [spec, spec], f"multilabel_margin {reduction}",
               no_collectives=dim == 0)
    # The out= form would take torch's decomposition, which counts labels after a -1.
    with pytest.raises(NotImplementedError, match=r"multilabel_margin_loss_forward\.output"):
        torch.ops.aten.multilabel_margin_loss_forward.output(
            shard(x, spec), shard(labels, spec), 0, output=shard(torch.empty(7), rows),
            is_target=shard(torch.empty(7, 5), spec))


@multi_rank(world_size=[2, 3])
def test_whole_value_backward_kernels_match_dense(rank: int, world_size: int) -> None:
    rows = _spec(0, world_size, "one")
    x1, x2 = _randn(5, 3, seed=11), _randn(4, 3, seed=12)
    for p in (1.0, 2.0, 3.0):
        _check(lambda a, b: torch.cdist(a, b, p=p), [x1, x2], [rows, rows],  # noqa: B023
               f"cdist p={p}")
    mask = _randn(5, 4, seed=13) > 0
    source = _randn(6, 4, seed=14)
    _check(lambda s, m: torch.zeros(5, 4).masked_scatter(m, s), [source, mask], [rows, rows],
           "masked_scatter")
    data = _randn(6, 3, seed=15)
    lengths = torch.tensor([2, 0, 3, 1])
    for reduce in ("sum", "mean", "max", "min", "prod"):
        _check(lambda d, n: torch.segment_reduce(d, reduce, lengths=n,  # noqa: B023
                                                 unsafe=True),
               [data, lengths], [rows, None], f"segment_reduce {reduce}")


# -- a U-Net-like block trained with AdamW ------------------------------------------------

class UNetBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Conv2d(7, 2, 1)  # 1x1 conv over [upsampled (4), skip (3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.down(x))                          # [N, 4, 8, 8]
        h = F.adaptive_avg_pool2d(h, (3, 3))              # [N, 4, 3, 3]
        h = F.relu(self.mid(h))
        h = F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(torch.cat([h, x], dim=1))         # [N, 2, 8, 8]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("layout", ["batch", "batch_several", "channels"])
def test_unet_block_trains_like_dense(rank: int, world_size: int, layout: str) -> None:
    torch.manual_seed(0)
    model = UNetBlock()
    reference = copy.deepcopy(model).double()
    x, y = _randn(5, 3, 8, 8, seed=16), _randn(5, 2, 8, 8, seed=17)
    sharded = copy.deepcopy(model)
    if layout == "channels":
        # Activations split by channel; the parameters replicated (each rank applies the
        # whole convolution, its input gathered) and the activations' channel blocks
        # carried through the pooling, upsampling, concatenation and 1x1 convolution.
        spec: ds.ShardingSpec = _spec(1, world_size, "one")
    else:
        spec = _spec(0, world_size, "several" if layout == "batch_several" else "one")
    for module in (sharded.down, sharded.mid, sharded.out):
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(
                ds.ShardedTensor.from_replicated(param.detach(), ds.Replicate())))
    _train(sharded, shard(x, spec), shard(y, spec), steps=3)
    _train(model, x, y, steps=3)
    _train(reference, x.double(), y.double(), steps=3)
    for (name, got), dense, exact in zip(sharded.named_parameters(), model.parameters(),
                                         reference.parameters(), strict=True):
        full = got.full_tensor()
        torch.testing.assert_close(full, exact.float(), atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(dense, exact.float(), atol=1e-4, rtol=1e-4, msg=name)


# -- the OpInfo differential harness on the affected OpInfos ------------------------------

# The OpInfos whose backward reaches the kernels above (every tensor argument split along
# dim 0 in uneven blocks, or in the four N-D layouts of a 2x2 mesh; forward and backward
# against dense). Not fractional_max_pool3d:
# its OpInfo draws its own random samples, which the harness skips (see
# test_fractional_max_pool_backward_matches_dense).
OPINFOS = [
    "nn.functional.interpolate.nearest", "nn.functional.interpolate.nearest-exact",
    "nn.functional.interpolate.linear", "nn.functional.interpolate.bilinear",
    "nn.functional.interpolate.bicubic", "nn.functional.interpolate.trilinear",
    "nn.functional.upsample_bilinear", "nn.functional.upsample_nearest",
    "_upsample_bilinear2d_aa", "nn.functional.adaptive_avg_pool1d",
    "nn.functional.adaptive_avg_pool2d", "nn.functional.adaptive_avg_pool3d",
    "nn.functional.adaptive_max_pool1d", "nn.functional.adaptive_max_pool2d",
    "nn.functional.adaptive_max_pool3d", "nn.functional.fractional_max_pool2d",
    "nn.functional.pad.replicate",
    "nn.functional.pad.replicate_negative", "nn.functional.pad.reflect",
    "nn.functional.grid_sample", "grid_sampler_2d", "grid_sampler_3d",
    "nn.functional.hardshrink", "nn.functional.softshrink",
    "nn.functional.multi_margin_loss", "nn.functional.multilabel_margin_loss",
    "masked_scatter", "cdist", "_segment_reduce.lengths", "_segment_reduce.offsets",
]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("world_size", "library"), [
    (2, "dispatch_shard"), (3, "dispatch_shard"), (4, "dispatch_shard_2x2"),
], ids=["w2", "w3", "mesh2x2"])
def test_opinfo_backward_kernels_match_dense(world_size: int, library: str) -> None:
    from dispatch_shard.testing import RankPool
    from dispatch_shard.testing.opinfo import PASS, SKIP, find_ops, run_ops

    pool = RankPool(world_size, pg_timeout_s=20.0)
    try:
        results = run_ops(find_ops(OPINFOS), pool, library, timeout_s=240.0)
    finally:
        pool.stop()
    # Every sample equals dense, forward and backward: none wrong, none raising, none
    # unsupported (the kernels above serve every layout, some on the whole value).
    bad = [f"{r.op}: {r.failure} {r.failure_detail[-300:]}" for r in results if r.failure]
    bad += [f"{r.op} sample {s.index} ({s.sample}): {s.forward} / {s.backward}: {s.detail}"
            for r in results for s in r.samples
            if s.forward not in (PASS, SKIP) or s.backward not in (PASS, SKIP, None, "")]
    assert not bad, "\n".join(bad)
    short = [f"{r.op}: forward {r.forward}, backward {r.backward or '-'}" for r in results
             if (r.forward, r.backward) != (PASS, PASS)]
    assert not short, "\n".join(short)
