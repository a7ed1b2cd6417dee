"""Attention on split heads: head-splitting views, scaled_dot_product_attention, and the
transformer block's collectives (tensor parallelism's minimum)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from layouts import several

import dispatch_shard as ds
from dispatch_shard.examples import TRANSFORMER_PLAN, TransformerBlock, parallelize
from dispatch_shard.testing import multi_rank


def _chunk(dim: int, world_size: int) -> ds.ChunkShardingSpec:
    return ds.ChunkShardingSpec(dim, [f"rank:{r}/cpu" for r in range(world_size)])


def _randn(*size: int, seed: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


@multi_rank(world_size=[2, 3, 4])
def test_head_splitting_views_keep_blocks(rank: int, world_size: int) -> None:
    for batch, seq, heads, dh in ((2, 3, 4, 2), (1, 5, 6, 3), (2, 2, 3, 4), (2, 2, 5, 2),
                                  (3, 2, 12, 1)):
        dense = _randn(batch, seq, heads * dh, seed=heads)
        x = ds.ShardedTensor.from_replicated(dense, _chunk(2, world_size))
        with ds.count_collectives() as counted:
            split = x.view(batch, seq, heads, dh).transpose(1, 2)
            merged = split.transpose(1, 2).reshape(batch, seq, heads * dh)
        torch.testing.assert_close(split.full_tensor(),
                                   dense.view(batch, seq, heads, dh).transpose(1, 2))
        torch.testing.assert_close(merged.full_tensor(), dense)
        # Blocks on head boundaries (the chunk of H * dh is a whole number of heads):
        # no collective, and the chunk moves to the head dim.
        per_rank = -(-heads * dh // world_size)
        if per_rank % dh == 0:
            assert counted.counts == {}, (heads, dh)
            spec = split.sharding_spec()
            assert isinstance(spec, (ds.ChunkShardingSpec, ds.EnumerableShardingSpec))
        else:  # a block ends inside a head: the view gathers (replicated), never wrong
            assert split.sharding_spec() == ds.Replicate()


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_scaled_dot_product_attention_on_split_heads(rank: int, world_size: int,
                                                     dim: int, blocks: str) -> None:
    spec = _chunk(dim, world_size) if blocks == "one" else several(world_size, dim)
    for batch, heads, length, e, causal in ((2, 4, 5, 8, True), (3, 2, 4, 4, False),
                                            (2, 3, 6, 2, True), (1, 1, 3, 2, False)):
        q, k, v, grad = (_randn(batch, heads, length, e, seed=s) for s in range(4))
        sq, sk, sv = (ds.ShardedTensor.from_replicated(t, spec)
                      .requires_grad_() for t in (q, k, v))
        sgrad = ds.ShardedTensor.from_replicated(grad, spec)
        with ds.count_collectives() as counted:
            out = F.scaled_dot_product_attention(sq, sk, sv, is_causal=causal)
            out.backward(sgrad)
        assert counted.counts == {}  # blocks of whole (batch, head) pairs: local kernels
        dq, dk, dv = (t.clone().requires_grad_() for t in (q, k, v))
        expected = F.scaled_dot_product_attention(dq, dk, dv, is_causal=causal)
        expected.backward(grad)
        assert out.sharding_spec() == spec
        torch.testing.assert_close(out.full_tensor(), expected)
        for sharded, dense in ((sq, dq), (sk, dk), (sv, dv)):
            assert sharded.grad.sharding_spec() == spec
            torch.testing.assert_close(sharded.grad.full_tensor(), dense.grad)


@multi_rank(world_size=[2, 3])
def test_scaled_dot_product_attention_other_layouts_fall_back(rank: int,
                                                              world_size: int) -> None:
    q, k, v = (_randn(2, 3, 5, 4, seed=s) for s in range(3))
    mask = _randn(5, 5, seed=9) > 0
    mask[:, 0] = True  # no query without a key
    cases = [
        ((_chunk(2, world_size),) * 3, {}),                       # split sequence
        ((_chunk(1, world_size), _chunk(0, world_size), _chunk(1, world_size)), {}),
        ((_chunk(1, world_size),) * 3, {"attn_mask": mask}),     # a mask: whole operands
    ]
    for specs, kwargs in cases:
        leaves = [ds.ShardedTensor.from_replicated(t, s).requires_grad_()
                  for t, s in zip((q, k, v), specs, strict=True)]
        out = F.scaled_dot_product_attention(*leaves, **kwargs)
        out.sum().backward()
        dense = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = F.scaled_dot_product_attention(*dense, **kwargs)
        expected.sum().backward()
        torch.testing.assert_close(out.full_tensor(), expected)
        for sharded, plain in zip(leaves, dense, strict=True):
            torch.testing.assert_close(sharded.grad.full_tensor(), plain.grad)


@multi_rank(world_size=[2, 3])
def test_linear_ops_keep_partial_values_partial(rank: int, world_size: int) -> None:
    a, b, r = _randn(4, 3, seed=1), _randn(4, 3, seed=2), _randn(4, 3, seed=3)
    pa, pb = (ds.ShardedTensor.from_replicated(t, _chunk(0, world_size))
              .redistribute(ds.Partial()) for t in (a, b))
    replicated = ds.ShardedTensor.from_replicated(r, ds.Replicate())
    with ds.count_collectives() as counted:
        results = {
            "add": (pa + pb, a + b), "sub_alpha": (torch.sub(pa, pb, alpha=2), a - 2 * b),
            "neg": (-pa, -a), "mul_scalar": (pa * 3, a * 3), "rmul": (0.5 * pa, 0.5 * a),
            "div_scalar": (pa / 4, a / 4), "mul_plain": (pa * r, a * r),
            "mul_replicated": (replicated * pa, r * a), "div_row": (pa / r[0], a / r[0]),
        }
    assert counted.counts == {}
    for name, (sharded, dense) in results.items():
        assert sharded.sharding_spec() == ds.Partial(), name
        torch.testing.assert_close(sharded.full_tensor(), dense, msg=name)
    # Not linear in a partial value: reduced first (one all-reduce per partial operand).
    with ds.count_collectives() as counted:
        product = pa * pb
    assert counted.counts == {"all_reduce": 2}
    torch.testing.assert_close(product.full_tensor(), a * b)
    torch.testing.assert_close((r / pa).full_tensor(), r / a)
    torch.testing.assert_close((pa + r).full_tensor(), a + r)


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("reduce_op", ["sum", "avg"])
def test_linear_in_place_ops_into_partial_values(rank: int, world_size: int,
                                                 reduce_op: str) -> None:
    """``partial += residual``, ``*=``, ``-=``, ``/=``, ``neg_`` write into the summands
    (NOTE [linear in-place ops into partial values] in ops/pointwise.py): no collective,
    views of the partial follow, a cached reduction is dropped on every rank alike."""
    a, b, r = _randn(4, 3, seed=4), _randn(4, 3, seed=5), _randn(4, 3, seed=6)
    spec = _chunk(0, world_size)
    pa, pb = (ds.ShardedTensor.from_replicated(t, spec).redistribute(ds.Partial(reduce_op))
              for t in (a, b))
    row = pa[1]  # a view of the partial: it aliases the summands
    torch.testing.assert_close(pa.full_tensor(), a)  # reduced and cached
    replicated = ds.ShardedTensor.from_replicated(r, ds.Replicate())
    steps = [
        (lambda: pa.add_(r), lambda d: d.add_(r)),
        (lambda: pa.add_(1.5), lambda d: d.add_(1.5)),
        (lambda: pa.sub_(replicated, alpha=2), lambda d: d.sub_(r, alpha=2)),
        (lambda: pa.add_(pb), lambda d: d.add_(b)),
        (lambda: pa.mul_(3.0), lambda d: d.mul_(3.0)),
        (lambda: pa.div_(r[0]), lambda d: d.div_(r[0])),
        (lambda: pa.neg_(), lambda d: d.neg_()),
        (lambda: pa.__iadd__(pa), lambda d: d.__iadd__(d)),
    ]
    dense = a.clone()
    for step, (sharded_step, dense_step) in enumerate(steps):
        with ds.count_collectives() as counted:
            out = sharded_step()
        assert counted.counts == {} and out is pa, step
        dense_step(dense)
        assert pa.sharding_spec() == ds.Partial(reduce_op)
        torch.testing.assert_close(pa.full_tensor(), dense, msg=f"step {step}")
        torch.testing.assert_close(row.full_tensor(), dense[1], msg=f"view, step {step}")
    # Not linear, or not fitting: refused on every rank, the value unchanged.
    with pytest.raises(NotImplementedError, match="into a Partial ShardedTensor"):
        pa.relu_()
    integers = ds.ShardedTensor.from_replicated(torch.arange(12).reshape(4, 3), spec)
    partial_ints = integers.redistribute(ds.Partial(reduce_op)) if reduce_op == "sum" \
        else integers.redistribute(ds.Partial("sum"))
    with pytest.raises(RuntimeError, match="can't be cast"):
        partial_ints.add_(0.5)  # dense's error, on the ranks that skip the write too
    torch.testing.assert_close(pa.full_tensor(), dense)


@multi_rank(world_size=[2, 4])
@pytest.mark.parametrize("fused", [True, False])
def test_transformer_block_moves_the_minimum(rank: int, world_size: int, fused: bool) -> None:
    """Fused (``scaled_dot_product_attention``) or spelled out (``q @ k.T``, softmax,
    ``@ v``: 4-D matmuls whose views cut each rank's heads into per-batch pieces)."""
    torch.manual_seed(0)
    dense = TransformerBlock(16, 4, 32, fused_attention=fused)
    sharded = parallelize(copy.deepcopy(dense), TRANSFORMER_PLAN, world_size)
    x, y = _randn(3, 5, 16, seed=1), _randn(3, 5, 16, seed=2)
    activation_bytes = x.numel() * 4
    for model in (dense, sharded):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(3):
            optimizer.zero_grad()
            with ds.count_collectives() as counted:
                F.mse_loss(model(x), y).backward()
                optimizer.step()
            if model is sharded:
                # Forward: the attention output and the MLP output projections (row-parallel)
                # each one all-reduce; backward: the gradients into the column-parallel
                # Q/K/V and fc1 inputs, one each. Nothing else (heads stay split).
                assert counted.counts == {"all_reduce": 4}, (step, counted.events)
                assert counted.nbytes == 4 * activation_bytes
    for (name, p), q in zip(sharded.named_parameters(), dense.parameters(), strict=True):
        value = p.full_tensor() if isinstance(p, ds.ShardedTensor) else p
        torch.testing.assert_close(value, q, atol=1e-5, rtol=1e-5, msg=name)


@multi_rank(world_size=[3])
def test_spelled_out_attention_trains_like_dense(rank: int, world_size: int) -> None:
    # ``q @ k.transpose(-2, -1)`` of 4-D tensors folds the split head dim into the batch:
    # each rank's heads become one block per batch entry (three heads on three ranks).
    torch.manual_seed(0)
    dense = TransformerBlock(12, 3, 24, fused_attention=False)
    sharded = parallelize(copy.deepcopy(dense), TRANSFORMER_PLAN, world_size)
    x, y = _randn(2, 4, 12, seed=1), _randn(2, 4, 12, seed=2)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (dense, sharded)]
    for _ in range(3):
        for model, optimizer in zip((dense, sharded), optimizers, strict=True):
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
    for (name, p), q in zip(sharded.named_parameters(), dense.parameters(), strict=True):
        value = p.full_tensor() if isinstance(p, ds.ShardedTensor) else p
        torch.testing.assert_close(value, q, atol=1e-5, rtol=1e-5, msg=name)


@multi_rank(world_size=[2, 3])
@pytest.mark.parametrize("blocks", ["one", "several"])
def test_batched_matmul_on_heads_cut_into_pieces(rank: int, world_size: int,
                                                 blocks: str) -> None:
    """``[B, H, S, E] @ [B, H, E, S]`` with H split: the fold to ``[B * H, ...]`` cuts each
    rank's block into B pieces, ``bmm`` runs piece by piece, the result's view back keeps
    them; no collective, dense values forward and backward, uneven heads too."""
    for batch, heads, length, e in ((2, 4, 3, 2), (3, 5, 2, 3), (1, 3, 4, 2)):
        q, k, grad = (_randn(batch, heads, length, e, seed=s) for s in range(3))
        spec = _chunk(1, world_size) if blocks == "one" else several(world_size, 1)
        sq, sk = (ds.ShardedTensor.from_replicated(t, spec).requires_grad_() for t in (q, k))
        sgrad = ds.ShardedTensor.from_replicated(grad, spec)
        with ds.count_collectives() as counted:
            scores = sq @ sk.transpose(-2, -1)
            out = scores.softmax(-1) @ sq
            out.backward(sgrad)
        assert counted.counts == {}, counted.events
        dq, dk = (t.clone().requires_grad_() for t in (q, k))
        dense_out = (dq @ dk.transpose(-2, -1)).softmax(-1) @ dq
        dense_out.backward(grad)
        torch.testing.assert_close(out.full_tensor(), dense_out)
        torch.testing.assert_close(sq.grad.full_tensor(), dq.grad)
        torch.testing.assert_close(sk.grad.full_tensor(), dk.grad)
        assert sq.grad.sharding_spec() == spec  # the leaf's layout (NOTE in sharded_tensor)
