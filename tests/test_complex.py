"""Complex tensors against the dense computation: arithmetic, the conjugate, real and
complex views, FFTs, forward and backward, on every layout."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from layouts import cols, rows, several, shard, specs_2d, whole
from torch import nn

import dispatch_shard as ds
from dispatch_shard.testing import multi_rank

SIZE = (10, 6)

CASES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "arithmetic": lambda z: (z * z + 2 * z - 1j) / (z.abs() + 1),
    "conj_times_self": lambda z: z.conj() * z,
    "conj_conj": lambda z: z.conj().conj() + z.conj().resolve_conj(),
    "conj_physical": torch.conj_physical,
    "real_imag": lambda z: torch.complex(z.real * 2, z.conj().imag),
    "abs_angle": lambda z: torch.polar(z.abs(), z.angle()),
    "view_as_real": lambda z: torch.view_as_real(z) * torch.arange(2.0),
    "view_as_real_of_conj": lambda z: torch.view_as_real(z.conj().resolve_conj()),
    "real_roundtrip": lambda z: torch.view_as_complex(torch.view_as_real(z) * 3),
    "exp_log": lambda z: z.exp() + (z + 5).log(),
    "sum": lambda z: z.sum(),
    "sum_dims": lambda z: z.sum(0) * 2 + z.sum(1, keepdim=True).sum(0),
    "mean": lambda z: z.mean(),
    "logsumexp": lambda z: torch.logsumexp(z, 0) + torch.logsumexp(z, 1, keepdim=True).sum(),
    "matmul": lambda z: z @ z.t().conj(),
    "contract_split": lambda z: z.t() @ z,
    "fft_dim0": lambda z: torch.fft.fft(z, dim=0),
    "fft_dim1": lambda z: torch.fft.fft(z, dim=1),
    "ifft2": lambda z: torch.fft.ifft2(z, norm="ortho"),
    "rfft_irfft": lambda z: torch.fft.irfft(torch.fft.rfft(z.real, dim=1), n=SIZE[1], dim=1),
    "hfft": lambda z: torch.fft.hfft(z, dim=0),
    "to_complex128": lambda z: z.to(torch.complex128) * 1.5,
    "pinv": lambda z: torch.linalg.pinv(z) * 2,  # a whole-value op, composite inside
    "cat_reshape": lambda z: torch.cat([z, z.conj()], 1).reshape(-1),
}


def _dense(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(SIZE, dtype=torch.complex64)


def _loss(value: torch.Tensor) -> torch.Tensor:
    real = torch.view_as_real(value) if value.is_complex() else value
    weight = torch.linspace(0.5, 1.5, real.numel(), dtype=real.dtype).reshape(real.shape)
    return (real * weight).sum()


@multi_rank(world_size=[1, 2, 3])
def test_complex_ops_equal_dense_on_every_layout(rank: int, world_size: int) -> None:
    dense = _dense()
    for layout, spec in specs_2d(SIZE, world_size).items():
        for name, case in CASES.items():
            where = f"{name} on {layout}"
            leaf = dense.clone().requires_grad_(True)
            expected = case(leaf)
            x = shard(dense, spec, requires_grad=True)
            got = case(x)
            assert isinstance(got, ds.ShardedTensor), where
            assert got.dtype == expected.dtype and got.shape == expected.shape, where
            torch.testing.assert_close(whole(got), expected.detach(), msg=where,
                                       rtol=1e-5, atol=1e-5)
            _loss(expected).backward()
            _loss(got).backward()
            assert x.grad is not None, where
            torch.testing.assert_close(whole(x.grad), leaf.grad, msg=f"grad of {where}",
                                       rtol=1e-5, atol=1e-5)


@multi_rank(world_size=[1, 2, 3])
def test_view_as_complex_of_sharded_pairs(rank: int, world_size: int) -> None:
    torch.manual_seed(1)
    pairs = torch.randn(7, 5, 2)
    for layout, spec in {"rows": rows(world_size), "cols": cols(world_size),
                         "several": several(world_size, 1),
                         "pair_dim": ds.ChunkShardingSpec(
                             2, [f"rank:{r}/cpu" for r in range(world_size)])}.items():
        x = shard(pairs, spec, requires_grad=True)
        leaf = pairs.clone().requires_grad_(True)
        got, expected = torch.view_as_complex(x), torch.view_as_complex(leaf)
        torch.testing.assert_close(whole(got), expected.detach(), msg=layout)
        _loss(got * (1 + 2j)).backward()
        _loss(expected * (1 + 2j)).backward()
        torch.testing.assert_close(whole(x.grad), leaf.grad, msg=f"grad on {layout}")
    # The view aliases: a write into the complex view reaches the real base.
    x = shard(pairs, rows(world_size))
    view = torch.view_as_complex(x)
    view.mul_(2)
    torch.testing.assert_close(whole(x), pairs * 2)
    # dense's errors, on every rank
    bad = shard(torch.randn(4, 3), rows(world_size))
    try:
        torch.view_as_complex(bad)
    except RuntimeError as error:
        assert "last dimension of size 2" in str(error)
    else:
        raise AssertionError("view_as_complex of a last dim of 3 did not raise")


@multi_rank(world_size=[2, 3])
def test_partial_complex_values_stay_pending_through_linear_ops(rank: int,
                                                                world_size: int) -> None:
    dense = _dense(2)
    other = _dense(3).t().contiguous()
    z = shard(dense, cols(world_size)) @ shard(other, rows(world_size))  # a pending sum
    assert isinstance(z.sharding_spec(), ds.Partial)
    expected = dense @ other
    with ds.count_collectives() as counts:
        results = {"conj": z.conj().resolve_conj(), "view_as_real": torch.view_as_real(z),
                   "fft": torch.fft.fft(z, dim=1), "neg_imag": z.conj().imag}
    assert not counts.events, counts.events
    for name, value in results.items():
        assert isinstance(value.sharding_spec(), ds.Partial), name
    torch.testing.assert_close(whole(results["conj"]), expected.conj().resolve_conj())
    torch.testing.assert_close(whole(results["view_as_real"]), torch.view_as_real(expected))
    torch.testing.assert_close(whole(results["fft"]), torch.fft.fft(expected, dim=1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole(results["neg_imag"]), expected.conj().imag)


@multi_rank(world_size=[2, 3])
def test_an_fft_along_a_split_dim_moves_the_split(rank: int, world_size: int) -> None:
    dense = _dense(4)
    x = shard(dense, rows(world_size))
    with ds.count_collectives() as counts:
        got = torch.fft.fft(x, dim=0)
    # One all-to-all moved the split to dim 1; the result stays sharded there.
    assert [e.kind for e in counts.events] == ["all_to_all"], counts.events
    spec = got.sharding_spec()
    assert isinstance(spec, ds.ChunkShardingSpec) and spec.dim == 1, spec
    torch.testing.assert_close(whole(got), torch.fft.fft(dense, dim=0), rtol=1e-5, atol=1e-5)
    # Along a dim that is not split: no collective, the layout is kept.
    with ds.count_collectives() as counts:
        kept = torch.fft.rfft(x.real, dim=1)
    assert not counts.events and kept.sharding_spec() == x.sharding_spec()
    torch.testing.assert_close(whole(kept), torch.fft.rfft(dense.real, dim=1))


# -- a Meta-style Llama attention: rotary embeddings as complex products ---------------

def _freqs_cis(head_dim: int, length: int) -> torch.Tensor:
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(length).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def _rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Meta's ``apply_rotary_emb``: pairs as complex numbers, times ``freqs_cis``."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(pairs * freqs_cis.view(1, pairs.shape[1], 1, -1))
    return rotated.flatten(3).type_as(x)


class ComplexRopeAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.wq(x).view(batch, length, -1, self.head_dim)
        k = self.wk(x).view(batch, length, -1, self.head_dim)
        v = self.wv(x).view(batch, length, -1, self.head_dim)
        q, k = _rotary(q, freqs_cis), _rotary(k, freqs_cis)
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))


@multi_rank(world_size=[2, 4])
def test_complex_rope_attention_trains_like_dense(rank: int, world_size: int) -> None:
    from dispatch_shard.examples import parallelize

    torch.manual_seed(0)
    dense = ComplexRopeAttention()
    reference = copy.deepcopy(dense).double()
    sharded = parallelize(copy.deepcopy(dense), {"wq": "colwise", "wk": "colwise",
                                                 "wv": "colwise", "wo": "rowwise"})
    freqs_cis = _freqs_cis(dense.head_dim, 6)
    models = {"dense": dense, "sharded": sharded, "reference": reference}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-2)
                  for name, m in models.items()}
    for step in range(3):
        torch.manual_seed(100 + step)
        batch = torch.randn(2, 6, 16)
        target = torch.randn(2, 6, 16)
        for name, model in models.items():
            data, goal = (batch.double(), target.double()) if name == "reference" \
                else (batch, target)
            freqs = freqs_cis.to(torch.complex128) if name == "reference" else freqs_cis
            loss = nn.functional.mse_loss(model(data, freqs), goal)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
    for (name, p), q, r in zip(sharded.named_parameters(), dense.parameters(),
                               reference.parameters(), strict=True):
        value = whole(p.detach())
        assert isinstance(p, ds.ShardedTensor), name
        torch.testing.assert_close(value.double(), r.detach(), rtol=1e-4, atol=1e-4,
                                   msg=f"sharded {name}")
        torch.testing.assert_close(q.detach().double(), r.detach(), rtol=1e-4, atol=1e-4,
                                   msg=f"dense {name}")


@multi_rank(world_size=[2, 3])
def test_a_complex_linear_with_weights_chunked_along_dim0(rank: int, world_size: int) -> None:
    """FSDP-style complex parameters: their gradients are reduce-scattered in buckets
    (a transposed gradient block is made contiguous first; an empty batch works)."""
    torch.manual_seed(5)
    weight, bias = torch.randn(4, 3, dtype=torch.complex64), torch.randn(4, dtype=torch.complex64)
    for batch in (8, 0):
        x = torch.randn(batch, 3, dtype=torch.complex64)
        dense_w, dense_b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        w, b = shard(weight, rows(world_size), True), shard(bias, rows(world_size), True)
        out = nn.functional.linear(shard(x, rows(world_size)), w, b)
        expected = nn.functional.linear(x, dense_w, dense_b)
        torch.testing.assert_close(whole(out), expected.detach())
        _loss(out).backward()
        _loss(expected).backward()
        torch.testing.assert_close(whole(w.grad), dense_w.grad, msg=f"weight, batch {batch}")
        torch.testing.assert_close(whole(b.grad), dense_b.grad, msg=f"bias, batch {batch}")


@multi_rank(world_size=[2, 3])
def test_plain_operands_with_lazy_conjugates(rank: int, world_size: int) -> None:
    """torch hands the BLAS products and ``copy_`` a plain operand's lazy conjugate bit
    unresolved; the sharded ops read its values (``addmm``'s bias is added block by
    block, where the bit would be ignored)."""
    torch.manual_seed(6)
    a, b = torch.randn(5, 4, dtype=torch.complex64), torch.randn(4, 3, dtype=torch.complex64)
    bias = torch.randn(5, 3, dtype=torch.complex64)
    for layout in (rows(world_size), cols(world_size)):
        x = shard(a, layout)
        torch.testing.assert_close(whole(torch.addmm(bias.conj(), x, b)),
                                   torch.addmm(bias.conj(), a, b), msg=str(layout))
        torch.testing.assert_close(whole(x @ b.conj()), a @ b.conj(), msg=str(layout))
        target = shard(torch.zeros(5, 4, dtype=torch.complex64), layout)
        target.copy_(a.conj())
        torch.testing.assert_close(whole(target), a.conj().resolve_conj())
        torch.testing.assert_close(whole(x + a.conj().imag), a + a.conj().imag)


@multi_rank(world_size=[2, 3])
def test_an_inverse_fft_that_resizes_a_chunked_dim(rank: int, world_size: int) -> None:
    """``irfft`` along a dim chunked in one non-empty block (the other blocks empty): the
    new length is not re-chunked over the ranks."""
    torch.manual_seed(7)
    dense = torch.randn(4, 1, dtype=torch.complex64)
    x = shard(dense, cols(world_size))
    torch.testing.assert_close(whole(torch.fft.irfft(x, n=8, dim=1)),
                               torch.fft.irfft(dense, n=8, dim=1))


@multi_rank(world_size=[4])
def test_complex_ops_on_a_2x2_mesh(rank: int, world_size: int) -> None:
    """The cases above on N-D layouts: split on both mesh dims (uneven), replicated over
    one, and a pending sum over one; forward and backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh = init_device_mesh("cpu", (2, 2))
    dense = _dense(8)
    names = ("arithmetic", "conj_times_self", "real_imag", "view_as_real", "real_roundtrip",
             "sum_dims", "matmul", "fft_dim0", "fft_dim1", "rfft_irfft", "logsumexp")
    for placements in ([Shard(0), Shard(1)], [Replicate(), Shard(0)], [Partial(), Shard(1)]):
        for name in names:
            where = f"{name} on {placements}"
            leaf = dense.clone().requires_grad_(True)
            expected = CASES[name](leaf)
            x = ds.distribute_tensor(dense, mesh, placements).requires_grad_(True)
            got = CASES[name](x)
            torch.testing.assert_close(whole(got), expected.detach(), msg=where,
                                       rtol=1e-5, atol=1e-5)
            _loss(expected).backward()
            _loss(got).backward()
            torch.testing.assert_close(whole(x.grad), leaf.grad, msg=f"grad of {where}",
                                       rtol=1e-5, atol=1e-5)
