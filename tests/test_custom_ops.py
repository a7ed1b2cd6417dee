"""Registering ops safely: Partial arguments reduced unless asked, torch-level
registrations keep autograd, torch.library ops of the user's own, the op-author API.

NOTE [implementations never see a pending sum unasked] and NOTE [a torch-level
registration keeps autograd] in dispatch_shard/registry.py are what is checked here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from layouts import cols, grid, rows, several

import dispatch_shard as ds
from dispatch_shard import ShardedTensor
from dispatch_shard.testing import multi_rank


# A user's own torch.library op with its autograd formula: 2 * sin(x).
@torch.library.custom_op("dstest::twice_sin", mutates_args=())
def twice_sin(x: torch.Tensor) -> torch.Tensor:
    return 2 * torch.sin(x)


def _twice_sin_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(inputs[0])


def _twice_sin_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return grad * 2 * torch.cos(x)


torch.library.register_autograd("dstest::twice_sin", _twice_sin_backward,
                                setup_context=_twice_sin_setup)


def per_block_twice_sin(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                        process_group: Any) -> ShardedTensor:
    """The documented per-block pattern: right for values, summands never arrive."""
    x = args[0]
    return x.with_blocks([twice_sin(block) for block in x.local_blocks()])


def per_block_asin(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   process_group: Any) -> ShardedTensor:
    x = args[0]
    return x.with_blocks([torch.asin(block) for block in x.local_blocks()])


def _dense(*size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*size, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64) * 1.6 - 0.8  # inside asin's domain


def _partial(dense: torch.Tensor, world_size: int) -> ShardedTensor:
    """``dense`` as a pending sum: a row-parallel product's output, summands on every rank."""
    eye = torch.eye(dense.shape[1], dtype=dense.dtype)
    a = ShardedTensor.from_replicated(dense, cols(world_size))
    b = ShardedTensor.from_replicated(eye, rows(world_size))
    product = a @ b
    assert product.sharding_spec() == ds.Partial(), product.sharding_spec()
    return product


LAYOUTS = ["partial", "rows", "cols", "grid", "several", "replicate"]


def _input(name: str, dense: torch.Tensor, world_size: int) -> ShardedTensor:
    if name == "partial":
        return _partial(dense, world_size)
    spec = {"rows": rows(world_size), "cols": cols(world_size), "several": several(world_size),
            "grid": grid(tuple(dense.shape), world_size), "replicate": ds.Replicate()}[name]
    return ShardedTensor.from_replicated(dense, spec)


@multi_rank(world_size=[1, 2, 3])
def test_user_custom_op_forward_and_backward_on_every_layout(rank: int,
                                                             world_size: int) -> None:
    ds.custom_sharded_op_impl(torch.ops.dstest.twice_sin.default)(per_block_twice_sin)
    try:
        for name in LAYOUTS:
            dense = _dense(5, 4, seed=len(name))
            if name == "partial":  # a leaf, then a row-parallel product of it
                leaf = ShardedTensor.from_replicated(dense, cols(world_size)).requires_grad_()
                eye = ShardedTensor.from_replicated(torch.eye(4, dtype=dense.dtype),
                                                    rows(world_size))
                x = leaf @ eye
                assert x.sharding_spec() == ds.Partial()
            else:
                leaf = x = _input(name, dense, world_size).requires_grad_()
            out = twice_sin(x)
            torch.testing.assert_close(out.full_tensor(), 2 * torch.sin(dense), msg=name)
            out.sum().backward()
            torch.testing.assert_close(leaf.grad.full_tensor(), 2 * torch.cos(dense), msg=name)
    finally:
        ds.remove_sharded_op_impl(torch.ops.dstest.twice_sin.default)


@multi_rank(world_size=[2, 3])
def test_user_custom_op_on_a_partial_gets_the_value(rank: int, world_size: int) -> None:
    ds.custom_sharded_op_impl(torch.ops.dstest.twice_sin.default)(per_block_twice_sin)
    try:
        dense, weight = _dense(4, 6, seed=1), _dense(6, 3, seed=2)
        x = ShardedTensor.from_replicated(dense, cols(world_size)).requires_grad_()
        w = ShardedTensor.from_replicated(weight, rows(world_size)).requires_grad_()
        product = x @ w  # a row-parallel linear: Partial
        assert product.sharding_spec() == ds.Partial()
        out = twice_sin(product)
        dx, dw = dense.clone().requires_grad_(), weight.clone().requires_grad_()
        expected = twice_sin(dx @ dw)
        torch.testing.assert_close(out.full_tensor(), expected.detach())
        out.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(x.grad.full_tensor(), dx.grad)
        torch.testing.assert_close(w.grad.full_tensor(), dw.grad)
    finally:
        ds.remove_sharded_op_impl(torch.ops.dstest.twice_sin.default)


@multi_rank(world_size=[1, 2, 3])
def test_torch_level_registration_keeps_autograd(rank: int, world_size: int) -> None:
    """The documented example: ``(torch.asin(x) + 2 * x).sum().backward()`` gave a
    gradient of 2 everywhere (asin's part lost); now it is dense's."""
    ds.custom_sharded_op_impl(torch.asin)(per_block_asin)
    try:
        for spec in (rows(world_size), cols(world_size), several(world_size)):
            dense = _dense(6, 5, seed=3)
            x = ShardedTensor.from_replicated(dense, spec).requires_grad_()
            out = torch.asin(x) + 2 * x
            out.sum().backward()
            reference = dense.clone().requires_grad_()
            expected = torch.asin(reference) + 2 * reference
            expected.sum().backward()
            torch.testing.assert_close(out.full_tensor(), expected.detach())
            torch.testing.assert_close(x.grad.full_tensor(), reference.grad)
            # Without a gradient to keep, the registration's result is returned as is.
            with torch.no_grad():
                plain = torch.asin(x)
            assert not plain.requires_grad and plain.grad_fn is None
        # On a Partial input: the value, not asin of each summand.
        partial = _partial(_dense(4, 4, seed=4), world_size)
        torch.testing.assert_close(torch.asin(partial).full_tensor(),
                                   torch.asin(_dense(4, 4, seed=4)))
    finally:
        ds.remove_sharded_op_impl(torch.asin)


@torch.library.custom_op("dstest::sin_in_place", mutates_args=("x",))
def sin_in_place(x: torch.Tensor) -> None:
    x.sin_()


@multi_rank(world_size=[2])
def test_writing_into_a_partial_argument_raises(rank: int, world_size: int) -> None:
    def per_block(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  process_group: Any) -> None:
        for block in args[0].local_blocks():
            sin_in_place(block)

    op = torch.ops.dstest.sin_in_place.default
    ds.custom_sharded_op_impl(op)(per_block)
    try:
        partial = _partial(_dense(3, 4, seed=5), world_size)
        with pytest.raises(NotImplementedError, match=r"dstest.sin_in_place.default: .* would "
                                                      r"write into a Partial ShardedTensor"):
            sin_in_place(partial)
        replicated = ShardedTensor.from_replicated(_dense(3, 4, seed=5), rows(world_size))
        sin_in_place(replicated)  # not partial: served by the implementation
        torch.testing.assert_close(replicated.full_tensor(), torch.sin(_dense(3, 4, seed=5)))
    finally:
        ds.remove_sharded_op_impl(op)


def test_where_names_the_serving_implementation() -> None:
    assert ds.debug.where(torch.ops.aten.mm.default).startswith("aten.mm.default: ")
    assert "ops/matmul.py" in ds.debug.where(torch.ops.aten.mm.default)
    # a family's registration helper wraps the function that does the work: that one is named
    assert "_var at " in ds.debug.where(torch.ops.aten.var.correction)
    assert "ops/norms.py" in ds.debug.where(torch.ops.aten.var.correction)
    assert ds.debug.where(torch.ops.dstest.twice_sin.default) == (
        "dstest.twice_sin.default: not supported for ShardedTensor")
    ds.custom_sharded_op_impl(torch.ops.dstest.twice_sin.default)(per_block_twice_sin)
    try:
        text = ds.debug.where(torch.ops.dstest.twice_sin.default)
        assert "per_block_twice_sin" in text and "Partial arguments are reduced" in text
    finally:
        ds.remove_sharded_op_impl(torch.ops.dstest.twice_sin.default)


@multi_rank(world_size=[2])
def test_with_blocks_checks_shapes_and_dtypes(rank: int, world_size: int) -> None:
    x = ShardedTensor.from_replicated(_dense(4, 3), rows(world_size))
    doubled = x.with_blocks([b * 2 for b in x.local_blocks()])
    torch.testing.assert_close(doubled.full_tensor(), _dense(4, 3) * 2)
    assert x.local_blocks()[0].data_ptr() == x.local_shards()[0].tensor.data_ptr()  # live
    with pytest.raises(ValueError, match="places blocks of sizes"):
        x.with_blocks([torch.zeros(1, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="pass dtype="):
        x.with_blocks([b.float() for b in x.local_blocks()])
    as_float = x.with_blocks([b.float() for b in x.local_blocks()], dtype=torch.float32)
    assert as_float.dtype == torch.float32
    moved = x.with_blocks([torch.zeros(4, 2 if rank == 0 else 1, dtype=torch.float64)],
                          layout=cols(world_size))
    assert moved.sharding_spec() == cols(world_size) and moved.shape == x.shape


EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "custom_op.py"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="needs the checkout's docs/examples")
def test_the_docs_example_runs_under_torchrun() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "soft_clip: sharded value and gradient equal dense" in done.stdout
    assert "demo.soft_clip.default: sharded_soft_clip" in done.stdout


@torch.library.custom_op("dstest::scaled_rows", mutates_args=())
def _scaled_rows(x: torch.Tensor, factor: float = 2.0, offset: float = 0.0) -> torch.Tensor:
    return x * factor + offset


@_scaled_rows.register_fake
def _(x: torch.Tensor, factor: float = 2.0, offset: float = 0.0) -> torch.Tensor:
    return torch.empty_like(x)


@multi_rank(world_size=[2, 3])
def test_the_authoring_helpers(rank: int, world_size: int) -> None:
    """An implementation written with ``dispatch_shard.authoring`` alone: arguments by
    name with defaults, result sizes from a meta run (no collective), the whole value
    and a pending value reduced (collectives), each equal to dense's."""
    from dispatch_shard import authoring

    op = torch.ops.dstest.scaled_rows.default
    seen: dict[str, Any] = {}

    @ds.custom_sharded_op_impl(op, handles_partial=True)
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             process_group: Any) -> Any:
        bound = authoring.bind_arguments(op, args, kwargs)
        with ds.count_collectives() as counted:
            seen["meta"] = authoring.meta_results(op, args, kwargs)
        seen["meta collectives"] = len(counted.events)
        x = authoring.reduced(bound["x"])  # a pending value's reduction, still sharded
        seen["whole"] = authoring.whole(x)
        return x.with_blocks([b * bound["factor"] + bound["offset"]
                              for b in x.local_blocks()], layout=x.sharding_spec())

    try:
        dense, weight = _dense(7, 6, seed=4), _dense(6, 5, seed=5)
        x = ShardedTensor.from_replicated(dense, rows(world_size))
        product = ShardedTensor.from_replicated(dense, cols(world_size)) @ \
            ShardedTensor.from_replicated(weight, rows(world_size))
        assert product.sharding_spec() == ds.Partial()
        for value, expected in ((x, dense), (product, dense @ weight)):
            out = torch.ops.dstest.scaled_rows(value, offset=1.0)
            torch.testing.assert_close(out.full_tensor(), expected * 2.0 + 1.0)
            assert seen["meta"] == [(expected.shape, expected.dtype)]
            assert seen["meta collectives"] == 0
            torch.testing.assert_close(seen["whole"], expected)
            assert type(seen["whole"]) is torch.Tensor
    finally:
        ds.remove_sharded_op_impl(op)


@torch.library.custom_op("dstest::as_double", mutates_args=())
def _as_double(x: torch.Tensor) -> torch.Tensor:  # no register_fake: no meta kernel
    return x.double() * 2


def test_stand_in_runs_for_ops_meta_cannot_answer() -> None:
    """``small_dense_call`` gives the result dtypes of an op with no meta kernel; and
    ``dense_kernels=True`` raises dense's error where the meta kernel is laxer than the
    CPU kernel (a softmax of integers), with dense's own message."""
    from dispatch_shard import authoring

    x = torch.zeros(300, 7, dtype=torch.float32)
    op = torch.ops.dstest.as_double.default
    with pytest.raises((NotImplementedError, RuntimeError)):
        authoring.meta_results(op, (x,), {})
    small = authoring.small_dense_call(op, (x,), {})
    assert small.dtype == torch.float64 and small.shape == (2, 2)
    ints = torch.zeros(5, 3, dtype=torch.int64)
    softmax = torch.ops.aten._softmax.default
    with pytest.raises(RuntimeError) as dense_error:
        softmax(ints, 1, False)
    with pytest.raises(RuntimeError, match=re.escape(str(dense_error.value))):
        authoring.meta_results(softmax, (ints, 1, False), {}, dense_kernels=True)


@torch.library.custom_op("dstest::doubled", mutates_args=())
def doubled(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@torch.library.custom_op("dstest::doubled_pair", mutates_args=())
def doubled_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 2, x * 3


@multi_rank(world_size=[2])
def test_an_implementation_returning_what_the_op_does_not_raises(rank: int,
                                                                  world_size: int) -> None:
    """NOTE [what a user's implementation returns is checked]: this rank's block as a
    plain tensor (it gave a tensor of the block's size, different on each rank), or one
    result of two, raise TypeError naming the op and the implementation; registering
    the CustomOpDef that ``@torch.library.custom_op`` returns registers its overload
    (it was filed as a torch-level function no call reached)."""
    x = ShardedTensor.from_replicated(_dense(6, 4, seed=1), rows(world_size))

    @ds.custom_sharded_op_impl(doubled)  # the CustomOpDef itself
    def plain(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        return args[0].local_blocks()[0] * 2  # mistake: not wrapped by with_blocks

    try:
        assert "plain" in ds.debug.where(torch.ops.dstest.doubled.default)
        with pytest.raises(TypeError, match=r"dstest.doubled.default: .*plain.*returned a "
                           r"plain torch.Tensor of size \[3, 4\] as result 0"):
            doubled(x)
    finally:
        ds.remove_sharded_op_impl(doubled)

    @ds.custom_sharded_op_impl(torch.ops.dstest.doubled_pair.default)
    def one_of_two(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   pg: Any) -> Any:
        return args[0].with_blocks([b * 2 for b in args[0].local_blocks()])

    try:
        with pytest.raises(TypeError, match=r"returned 1 value\(s\), but the op returns 2"):
            doubled_pair(x)
    finally:
        ds.remove_sharded_op_impl(torch.ops.dstest.doubled_pair.default)

    @ds.custom_sharded_op_impl(doubled)
    def right(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        return args[0].with_blocks([b * 2 for b in args[0].local_blocks()])

    try:
        torch.testing.assert_close(doubled(x).full_tensor(), _dense(6, 4, seed=1) * 2)
    finally:
        ds.remove_sharded_op_impl(doubled)
    # Unregistered, an op of one's own says how to register it.
    with pytest.raises(NotImplementedError, match=re.escape(
            "not supported for ShardedTensor! (an op of your own: register it with "
            "dispatch_shard.register_sharding_rule(torch.ops.dstest.doubled_pair.default")):
        doubled_pair(x)
    # with_blocks names itself and what to pass: a per-row result of column blocks keeps
    # the input's column layout unless told; blocks of another size than the layout's.
    columns = ShardedTensor.from_replicated(_dense(6, 4, seed=1), cols(world_size))
    with pytest.raises(ValueError, match=r"with_blocks: the layout .*\(kept from this "
                       r"tensor: no layout= given\) does not fit size \[6\].*pass layout="):
        columns.with_blocks([b.sum(1) for b in columns.local_blocks()], size=[6])
    with pytest.raises(ValueError, match=r"places blocks of sizes .*; pass size="):
        columns.with_blocks([b.sum(1) for b in columns.local_blocks()])


def _unseeded_sample() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (torch.randn(4, 3),), {}


def test_the_validation_helper_names_a_bad_sample() -> None:
    """A lambda cannot be imported by the rank processes, and an unseeded sample draws
    other tensors on each rank: both are named before any rank starts."""
    from dispatch_shard.testing import check_sharded_op

    with pytest.raises(TypeError, match="sample must be a module-level function"):
        check_sharded_op(doubled, lambda: ((torch.ones(2),), {}), world_sizes=(1,))
    with pytest.raises(ValueError, match=r"sample\(\) returned different values"):
        check_sharded_op(doubled, _unseeded_sample, world_sizes=(1,))
