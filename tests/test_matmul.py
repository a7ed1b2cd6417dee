"""Matrix products against the dense computation: every layout pair, the Megatron cases
without collectives, bias, 3-D, vectors, and a tensor-parallel MLP forward and backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from layouts import cols, rows, several, shard, specs_2d

import dispatch_shard as ds
from dispatch_shard import collectives
from dispatch_shard.testing import multi_rank

M, K, N = 10, 7, 6  # uneven over 3 and 4 ranks


def _dense(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


def _assert_matches(got: Any, want: torch.Tensor) -> None:
    assert isinstance(got, ds.ShardedTensor), type(got)
    assert tuple(got.shape) == tuple(want.shape) and got.dtype == want.dtype
    value = got.full_tensor()
    assert value.dtype == want.dtype, (value.dtype, want.dtype)
    torch.testing.assert_close(value, want)


@contextlib.contextmanager
def _collectives() -> Iterator[list[str]]:
    """The kinds of collectives this rank issues inside the block."""
    kinds: list[str] = []

    def observer(kind: str, nbytes: int, group: Any) -> None:
        kinds.append(kind)

    collectives._observers.append(observer)
    try:
        yield kinds
    finally:
        collectives._observers.remove(observer)


def _chunk(dim: int, world_size: int) -> ds.ChunkShardingSpec:
    return ds.ChunkShardingSpec(dim, [f"rank:{r}/cpu" for r in range(world_size)])


# -- mm on every pair of layouts -------------------------------------------------------------

@multi_rank(world_size=[1, 2, 3, 4])
def test_mm_every_layout_pair_matches_dense(rank: int, world_size: int) -> None:
    a, b = _dense(M, K, seed=1), _dense(K, N, seed=2)
    want = a @ b
    a_specs, b_specs = specs_2d((M, K), world_size), specs_2d((K, N), world_size)
    for a_name, a_spec in a_specs.items():
        sa = shard(a, a_spec)
        for b_name, b_spec in b_specs.items():
            sb = shard(b, b_spec)
            got = torch.mm(sa, sb)
            assert isinstance(got, ds.ShardedTensor), (a_name, b_name)
            torch.testing.assert_close(got.full_tensor(), want, msg=f"{a_name} @ {b_name}")
        # A plain tensor is a replicated operand, on either side.
        _assert_matches(sa @ b, want)
        _assert_matches(a @ shard(b, b_specs[a_name]), want)


@multi_rank(world_size=[2, 3])
def test_mm_with_partial_and_uncovered_ranks(rank: int, world_size: int) -> None:
    a, b = _dense(M, K, seed=3), _dense(K, N, seed=4)
    partial_a = shard(a, rows(world_size)).redistribute(ds.Partial())
    partial_b = shard(b, cols(world_size)).redistribute(ds.Partial())
    for first in (partial_a, shard(a, cols(world_size)), shard(a, ds.Replicate())):
        for second in (partial_b, shard(b, rows(world_size)), shard(b, several(world_size))):
            _assert_matches(torch.mm(first, second), a @ b)
    average = shard(a, rows(world_size)).redistribute(ds.Partial("avg"))
    product = average @ b
    assert product.sharding_spec() == ds.Partial("avg")
    _assert_matches(product, a @ b)
    # Blocks on rank 1 only: the other ranks hold nothing, or a zero summand.
    only_one = ds.ChunkShardingSpec(0, ["rank:1/cpu"])
    _assert_matches(shard(a, only_one) @ b, a @ b)
    on_k = ds.ChunkShardingSpec(1, ["rank:1/cpu", "rank:1/cpu"])
    on_k_rows = ds.ChunkShardingSpec(0, ["rank:1/cpu", "rank:1/cpu"])
    _assert_matches(shard(a, on_k) @ shard(b, on_k_rows), a @ b)


# -- the Megatron cases: expected layouts, no collectives ----------------------------------

@multi_rank(world_size=[2, 3, 4])
def test_megatron_cases_need_no_collectives(rank: int, world_size: int) -> None:
    a, b = _dense(M, K, seed=5), _dense(K, N, seed=6)
    row_spec, col_spec = rows(world_size), cols(world_size)
    cases: list[tuple[str, ds.ShardedTensor | torch.Tensor, ds.ShardedTensor | torch.Tensor,
                      ds.ShardingSpec]] = [
        ("rows @ replicated", shard(a, row_spec), shard(b, ds.Replicate()), row_spec),
        ("rows @ plain", shard(a, row_spec), b, row_spec),
        ("several rows @ plain", shard(a, several(world_size)), b, several(world_size)),
        ("replicated @ cols", shard(a, ds.Replicate()), shard(b, col_spec), col_spec),
        ("plain @ several cols", a, shard(b, several(world_size, 1)), several(world_size, 1)),
        ("K split alike", shard(a, col_spec), shard(b, row_spec), ds.Partial()),
        ("K split alike, several blocks a rank", shard(a, several(world_size, 1)),
         shard(b, several(world_size, 0)), ds.Partial()),
        ("K split @ replicated", shard(a, col_spec), b, ds.Partial()),
        ("replicated @ K split", a, shard(b, row_spec), ds.Partial()),
        ("replicated @ replicated", shard(a, ds.Replicate()), b, ds.Replicate()),
        ("partial @ replicated", shard(a, row_spec).redistribute(ds.Partial()), b,
         ds.Partial()),
        ("replicated @ partial", a, shard(b, col_spec).redistribute(ds.Partial()),
         ds.Partial()),
    ]
    for name, first, second, spec in cases:
        with _collectives() as issued:
            product = torch.mm(first, second)
        assert issued == [], (name, issued)
        assert isinstance(product, ds.ShardedTensor)
        assert product.sharding_spec() == spec, (name, product.sharding_spec())
        _assert_matches(product, a @ b)
    # The partial result is reduced once, by its consumer.
    partial = torch.mm(shard(a, col_spec), shard(b, row_spec))
    with _collectives() as issued:
        reduced = partial + 1
    assert issued == ["all_reduce"], issued
    _assert_matches(reduced, a @ b + 1)


@multi_rank(world_size=[3])
def test_other_pairs_move_the_cheaper_operand(rank: int, world_size: int) -> None:
    # x rows-sharded (many rows) @ w rows-sharded (small): gather w, keep x's rows.
    x, w = _dense(60, K, seed=7), _dense(K, N, seed=8)
    sx, sw = shard(x, rows(world_size)), shard(w, rows(world_size))
    with _collectives() as issued:
        product = sx @ sw
    assert issued == ["all_to_all"], issued
    assert product.sharding_spec() == rows(world_size)
    _assert_matches(product, x @ w)
    # Both cols-sharded with a wide a: the K split of b is moved to match a's (partial).
    a, b = _dense(4, 60, seed=9), _dense(60, 5, seed=10)
    sa, sb = shard(a, cols(world_size)), shard(b, cols(world_size))
    with _collectives() as issued:
        product = sa @ sb
    assert issued == ["all_to_all"] and product.sharding_spec() == ds.Partial()
    _assert_matches(product, a @ b)


# -- bias: addmm, F.linear -----------------------------------------------------------------

@multi_rank(world_size=[1, 3, 4])
def test_addmm_and_linear_with_bias(rank: int, world_size: int) -> None:
    a, b = _dense(M, K, seed=11), _dense(K, N, seed=12)
    biases = [_dense(N, seed=13), _dense(M, N, seed=14), _dense(M, 1, seed=15),
              torch.tensor(0.5)]
    for a_spec, b_spec in ((rows(world_size), ds.Replicate()), (ds.Replicate(), cols(world_size)),
                           (cols(world_size), rows(world_size)),
                           (specs_2d((M, K), world_size)["grid"], cols(world_size))):
        sa, sb = shard(a, a_spec), shard(b, b_spec)
        for bias in biases:
            for beta, alpha in ((1, 1), (0.5, 2.0)):
                want = torch.addmm(bias, a, b, beta=beta, alpha=alpha)
                _assert_matches(torch.addmm(bias, sa, sb, beta=beta, alpha=alpha), want)
                sharded_bias = shard(bias, ds.Replicate())
                _assert_matches(torch.addmm(sharded_bias, sa, sb, beta=beta, alpha=alpha), want)
        row_bias = shard(biases[1], rows(world_size))
        _assert_matches(torch.addmm(row_bias, sa, sb), torch.addmm(biases[1], a, b))
    # beta=0 ignores the bias, nan included, as dense does.
    nan_bias = torch.full((N,), float("nan"))
    _assert_matches(torch.addmm(nan_bias, shard(a, rows(world_size)), b, beta=0),
                    torch.addmm(nan_bias, a, b, beta=0))
    # F.linear: weight [N, K]; with a bias it reaches addmm.
    weight, bias = b.t().contiguous(), biases[0]
    for spec in specs_2d((N, K), world_size).values():
        _assert_matches(F.linear(a, shard(weight, spec), bias), F.linear(a, weight, bias))
        _assert_matches(F.linear(shard(a, rows(world_size)), shard(weight, spec)),
                        F.linear(a, weight))


@multi_rank(world_size=[2, 3])
def test_parallel_linears_add_their_bias_without_collectives(rank: int, world_size: int) -> None:
    x, weight = _dense(M, K, seed=16), _dense(N, K, seed=17)
    bias = _dense(N, seed=18)
    # Column-parallel: weight rows-sharded, its bias sharded like the output's columns.
    sw, sbias = shard(weight, rows(world_size)), shard(bias, rows(world_size))
    with _collectives() as issued:
        out = F.linear(x, sw, sbias)
    assert issued == [] and out.sharding_spec() == cols(world_size)
    _assert_matches(out, F.linear(x, weight, bias))
    # Row-parallel: the bias goes to one summand; the result stays partial.
    sx, sw = shard(x, cols(world_size)), shard(weight, cols(world_size))
    for plain_or_replicated in (bias, shard(bias, ds.Replicate())):
        with _collectives() as issued:
            out = F.linear(sx, sw, plain_or_replicated)
        assert issued == [] and out.sharding_spec() == ds.Partial()
        _assert_matches(out, F.linear(x, weight, bias))
    partial_bias = shard(bias, rows(world_size)).redistribute(ds.Partial())
    with _collectives() as issued:
        out = torch.addmm(partial_bias, sx, sw.t(), beta=2.0)
    assert issued == [] and out.sharding_spec() == ds.Partial()
    _assert_matches(out, torch.addmm(bias, x, weight.t(), beta=2.0))
    # A sharded bias that does not match the layout is gathered first (still one value).
    _assert_matches(F.linear(sx, sw, sbias), F.linear(x, weight, bias))


# -- dtypes and errors -----------------------------------------------------------------------

@multi_rank(world_size=[1, 3])
def test_dtypes_and_errors_like_dense(rank: int, world_size: int) -> None:
    integers = torch.arange(M * K).reshape(M, K)
    other = torch.arange(K * N).reshape(K, N) - 20
    _assert_matches(shard(integers, cols(world_size)) @ shard(other, rows(world_size)),
                    integers @ other)
    doubles = _dense(K, N, seed=19, dtype=torch.float64)
    _assert_matches(shard(_dense(M, K, seed=20, dtype=torch.float64), rows(world_size)) @ doubles,
                    _dense(M, K, seed=20, dtype=torch.float64) @ doubles)
    a = shard(_dense(M, K, seed=21), rows(world_size))
    cases = [
        (lambda: torch.mm(_dense(M, K), _dense(6, N)), lambda: torch.mm(a, _dense(6, N))),
        (lambda: torch.mm(_dense(M, K), doubles), lambda: torch.mm(a, doubles)),
        (lambda: torch.addmm(_dense(M + 1, N), _dense(M, K), _dense(K, N)),
         lambda: torch.addmm(_dense(M + 1, N), a, _dense(K, N))),
        (lambda: torch.bmm(_dense(2, M, K), _dense(3, K, N)),
         lambda: torch.bmm(shard(_dense(2, M, K), rows(world_size)), _dense(3, K, N))),
        (lambda: torch.dot(_dense(K), _dense(K + 1)),
         lambda: torch.dot(shard(_dense(K), rows(world_size)), _dense(K + 1))),
    ]
    for dense_call, sharded_call in cases:
        with pytest.raises(RuntimeError) as dense_error:
            dense_call()
        with pytest.raises(RuntimeError) as sharded_error:
            sharded_call()
        assert str(sharded_error.value) == str(dense_error.value)


# -- 3-D and vectors ---------------------------------------------------------------------------

@multi_rank(world_size=[1, 3, 4])
def test_bmm_baddbmm_matmul_einsum_3d(rank: int, world_size: int) -> None:
    batch = 5
    a, b = _dense(batch, M, K, seed=22), _dense(batch, K, N, seed=23)
    bias = _dense(M, N, seed=24)
    layouts = {"batch": _chunk(0, world_size), "rows": _chunk(1, world_size),
               "last": _chunk(2, world_size), "replicate": ds.Replicate()}
    for a_name, a_spec in layouts.items():
        sa = shard(a, a_spec)
        for b_name, b_spec in layouts.items():
            sb = shard(b, b_spec)
            name = f"{a_name} @ {b_name}"
            torch.testing.assert_close(torch.bmm(sa, sb).full_tensor(), a @ b, msg=name)
            torch.testing.assert_close(torch.matmul(sa, sb).full_tensor(), a @ b, msg=name)
            torch.testing.assert_close(
                torch.baddbmm(bias, sa, sb, alpha=0.5).full_tensor(),
                torch.baddbmm(bias, a, b, alpha=0.5), msg=name)
        _assert_matches(torch.einsum("bij,bjk->bik", sa, b), torch.einsum("bij,bjk->bik", a, b))
        _assert_matches(torch.matmul(sa, b[0]), a @ b[0])   # 3-D @ 2-D: view + mm
    two_d = shard(a[0], rows(world_size))
    _assert_matches(torch.einsum("ij,jk->ik", two_d, b[0]), a[0] @ b[0])
    _assert_matches(F.linear(shard(a, layouts["batch"]), b[0].t(), bias[0]),
                    F.linear(a, b[0].t(), bias[0]))
    # Batch-sharded alike, or one operand replicated: batch-sharded, no collectives.
    first = shard(a, layouts["batch"])
    for second in (shard(b, layouts["batch"]), b, shard(b, ds.Replicate())):
        with _collectives() as issued:
            product = torch.bmm(first, second)
        assert issued == []
        # (On one rank every chunk spec is the same single block: any may be chosen.)
        assert product.sharding_spec() == layouts["batch"] or world_size == 1
        _assert_matches(product, a @ b)


@multi_rank(world_size=[1, 3])
def test_vector_products(rank: int, world_size: int) -> None:
    a, v, u = _dense(M, K, seed=25), _dense(K, seed=26), _dense(K, seed=27)
    bias = _dense(M, seed=28)
    for a_spec in specs_2d((M, K), world_size).values():
        sa = shard(a, a_spec)
        for v_spec in (rows(world_size), ds.Replicate()):
            sv = shard(v, v_spec)
            _assert_matches(torch.mv(sa, sv), a @ v)
            _assert_matches(sa @ sv, a @ v)
            _assert_matches(torch.addmv(bias, sa, sv, beta=0.5, alpha=2),
                            torch.addmv(bias, a, v, beta=0.5, alpha=2))
    for v_spec in (rows(world_size), several(world_size), ds.Replicate()):
        for u_spec in (rows(world_size), ds.Replicate()):
            _assert_matches(torch.dot(shard(v, v_spec), shard(u, u_spec)), torch.dot(v, u))
    sv, su = shard(v, rows(world_size)), shard(u, rows(world_size))
    with _collectives() as issued:
        partial = torch.dot(sv, su)
    assert issued == [] and partial.sharding_spec() == ds.Partial()


# -- a tensor-parallel MLP -----------------------------------------------------------------------

@multi_rank(world_size=[1, 2, 3, 4])
def test_tensor_parallel_mlp_forward_and_backward(rank: int, world_size: int) -> None:
    batch, inputs, hidden, outputs = 5, K, 10, N
    x, target = _dense(batch, inputs, seed=29), _dense(batch, outputs, seed=30)
    params = [_dense(hidden, inputs, seed=31), _dense(hidden, seed=32),
              _dense(outputs, hidden, seed=33), _dense(outputs, seed=34)]

    def forward(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                biased_later: bool = False) -> torch.Tensor:
        h = F.gelu(F.linear(x, w1, b1))
        return F.linear(h, w2) + b2 if biased_later else F.linear(h, w2, b2)

    dense = [p.clone().requires_grad_(True) for p in params]
    dense_out = forward(*dense)
    (dense_out * target).sum().backward()

    # Column-parallel then row-parallel: W1 rows-sharded and its bias alike (the hidden
    # activations come out cols-sharded), W2 cols-sharded (partial output), b2 replicated.
    specs = [rows(world_size), rows(world_size), cols(world_size), ds.Replicate()]
    for biased_later in (False, True):
        sharded = [shard(p, spec, requires_grad=True) for p, spec in zip(params, specs,
                                                                          strict=True)]
        with _collectives() as issued:
            value = forward(*sharded, biased_later=biased_later).full_tensor()
        # The row-parallel one (a group of one sends nothing).
        assert issued == (["all_reduce"] if world_size > 1 else []), issued
        torch.testing.assert_close(value, dense_out.detach())
        # The bias grads sum over the batch dim (ops/reduction.py), locally.
        with _collectives() as issued:
            (value * target).sum().backward()
        assert issued == [], issued
        for param, reference in zip(sharded, dense, strict=True):
            grad = param.grad
            assert isinstance(grad, ds.ShardedTensor)
            # (On one rank, shard() infers dim 0 for any single-block chunk spec.)
            assert grad.sharding_spec() == param.sharding_spec() or world_size == 1
            assert grad.metadata().shards_metadata == param.metadata().shards_metadata
            torch.testing.assert_close(grad.full_tensor(), reference.grad)


@multi_rank(world_size=[2, 3])
def test_bmm_keeps_several_batch_blocks_per_rank(rank: int, world_size: int) -> None:
    """Blocks that split only the batch dim, several per rank in any order, are kept as
    they are; the other operand is laid out on the same batch blocks (sliced if
    replicated, moved if sharded otherwise)."""
    batch = 2 * world_size + 1
    a, b = _dense(batch, 3, 4, seed=1), _dense(batch, 4, 2, seed=2)
    order = [(r * 2 + 1) % world_size for r in range(batch)]
    spec = ds.EnumerableShardingSpec([ds.ShardMetadata([i, 0, 0], [1, 3, 4], f"rank:{r}/cpu")
                                      for i, r in enumerate(order)])
    sa = ds.ShardedTensor.from_replicated(a, spec)
    sb = ds.ShardedTensor.from_replicated(b, ds.Replicate())
    with _collectives() as issued:
        replicated = torch.bmm(sa, sb)
        plain = torch.bmm(sa, b)
    assert issued == []
    for out in (replicated, plain):
        _assert_matches(out, a @ b)
        assert [s.metadata.shard_offsets[0] for s in out.local_shards()] == \
            [i for i, r in enumerate(order) if r == rank]
    chunked = ds.ShardedTensor.from_replicated(b, _chunk(0, world_size))
    _assert_matches(torch.bmm(sa, chunked), a @ b)
    _assert_matches(torch.bmm(chunked.transpose(1, 2), sa.transpose(1, 2)),
                    b.transpose(1, 2) @ a.transpose(1, 2))
    # Empty blocks (a zero-size dim; a chunk past the end): kept apart, never overlapping.
    empty = _dense(1, 0, 1, seed=3)
    two_on_zero = ds.ChunkShardingSpec(0, ["rank:0/cpu", "rank:0/cpu"])
    # (matmul with autograd folds through expand and reshape, which move the empty block)
    held = ds.ShardedTensor.from_replicated(empty, two_on_zero).requires_grad_()
    _assert_matches(torch.matmul(held, _dense(1, 1, 1, seed=4)).detach(),
                    empty @ _dense(1, 1, 1, seed=4))
    _assert_matches(torch.bmm(ds.ShardedTensor.from_replicated(a[:1], _chunk(0, world_size)),
                              b[:1]), a[:1] @ b[:1])
