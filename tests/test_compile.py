"""torch.compile of code on ShardedTensors: compiled equals eager, collectives in the graph.

Most tests use the ``aot_eager`` backend (AOTAutograd traces our ``__torch_dispatch__``
on fake blocks; the graph then runs eagerly); the MLP, the transformer block and Llama
also run with ``inductor``. A backend that records the graphs it is given shows the
functional collectives inside them. Each model trains three AdamW steps beside its dense
twin (:func:`_train_like_dense`): equal values, and no compilation after the first step.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from layouts import rows
from torch import nn

import dispatch_shard as ds
from dispatch_shard.examples import MLP, TransformerBlock, parallelize
from dispatch_shard.testing import multi_rank


class _Recorder:
    """An ``aot_eager`` backend that keeps the forward and backward graphs it compiles."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        from torch._dynamo.backends.common import aot_autograd

        def keep(graph: torch.fx.GraphModule, _: Any) -> Any:
            self.graphs.append(graph)
            return graph.forward

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    def collectives(self) -> list[str]:
        return [str(node.target) for graph in self.graphs for node in graph.graph.nodes
                if node.op == "call_function" and "_c10d_functional" in str(node.target)
                and "wait_tensor" not in str(node.target)]

    def waits(self) -> int:
        return sum(1 for graph in self.graphs for node in graph.graph.nodes
                   if node.target is torch.ops._c10d_functional.wait_tensor.default)


def _full(value: Any) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, ds.ShardedTensor) else value


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    yield
    torch._dynamo.reset()


class _Counter:
    """A backend that counts the graphs Dynamo hands it (one per frame or graph-break
    piece) and compiles each with ``backend``; for ``aot_eager`` it also keeps the forward
    and backward graphs AOTAutograd makes, as :class:`_Recorder` does."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.frames = 0
        self.recorder = _Recorder()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.frames += 1
        if self.backend == "aot_eager":
            return self.recorder(gm, example_inputs)
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.backend)(gm, example_inputs)


_LR = 1e-2


def _train_like_dense(dense: nn.Module, sharded: nn.Module, batches: list[tuple[Any, ...]],
                      loss_of: Any, *, backend: str = "aot_eager", fullgraph: bool = False,
                      dense_batches: list[tuple[Any, ...]] | None = None,
                      tolerance: dict[str, float] | None = None) -> _Counter:
    """Three (or ``len(batches)``) training steps, plain AdamW, of the compiled sharded
    model beside the dense one: equal losses at every step, equal gradients and
    parameters at the end, and nothing compiled after the first step (returns the
    counter). ``loss_of(model, *batch)``; ``dense_batches`` when the dense model's
    inputs differ (sharded inputs)."""
    torch._dynamo.reset()  # a rank process outlives the test: start from an empty cache
    tolerance = tolerance or {}
    counter = _Counter(backend)
    compiled = torch.compile(sharded, backend=counter, fullgraph=fullgraph)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=_LR) for m in (sharded, dense)]
    counts = []
    for step, batch in enumerate(batches):
        dense_batch = batch if dense_batches is None else dense_batches[step]
        losses = []
        for model, optimizer, inputs in ((compiled, optimizers[0], batch),
                                         (dense, optimizers[1], dense_batch)):
            optimizer.zero_grad()
            loss = loss_of(model, *inputs)
            loss.backward()
            optimizer.step()
            losses.append(_full(loss.detach()))
        torch.testing.assert_close(losses[0], losses[1], **tolerance,
                                   msg=lambda m, s=step: f"loss at step {s}: {m}")
        counts.append((counter.frames, len(counter.recorder.graphs)))
    assert counts[0][0] >= 1, "nothing was compiled"
    assert counts == [counts[0]] * len(counts), f"recompiled after the first step: {counts}"
    for (name, ours), theirs in zip(sharded.named_parameters(), dense.parameters(),
                                    strict=True):
        if theirs.grad is None:
            assert ours.grad is None, name
        else:
            torch.testing.assert_close(_full(ours.grad), theirs.grad,
                                       msg=lambda m, n=name: f"{n}.grad: {m}", **tolerance)
        # NOTE: a gradient that is zero in exact arithmetic (the attention key's bias:
        # softmax ignores it) is rounding noise, ~1e-8, which AdamW divides by its own RMS
        # into lr-sized steps that differ between two correct runs. Those weights are
        # held only to the bound of AdamW's moves; all others to the tolerance.
        ours_full = _full(ours.detach())
        noise = (theirs.grad.abs() < 1e-6 if theirs.grad is not None
                 else torch.zeros_like(theirs, dtype=torch.bool))
        torch.testing.assert_close(ours_full[~noise], theirs.detach()[~noise],
                                   msg=lambda m, n=name: f"{n}: {m}", **tolerance)
        moved = (ours_full[noise] - theirs.detach()[noise]).abs()
        assert moved.numel() == 0 or moved.max() <= 2 * _LR * len(batches), name
    return counter


def _batches(*shapes: tuple[int, ...], steps: int = 3, seed: int = 0) -> list[tuple[Any, ...]]:
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(shape, generator=generator) for shape in shapes)
            for _ in range(steps)]


@multi_rank(world_size=[2])
def test_pointwise_compiles_to_one_graph(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    dense = torch.randn(7, 4)
    x = ds.ShardedTensor.from_replicated(dense, rows(world_size))

    def f(t: torch.Tensor) -> torch.Tensor:
        return (t * 2 + 1).relu().sum(dim=1)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert isinstance(out, ds.ShardedTensor)
    assert out.sharding_spec() == f(x).sharding_spec()
    torch.testing.assert_close(out.full_tensor(), f(dense))
    torch._dynamo.reset()


def _tp_mlp(world_size: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = MLP(8, 16)
    return dense, parallelize(copy.deepcopy(dense), {"fc1": "colwise", "fc2": "rowwise"},
                              world_size)


@multi_rank(world_size=[2])
def test_compiled_autograd_raises_a_clear_error(rank: int, world_size: int) -> None:
    """Compiled autograd does not support ShardedTensor yet: our error, on every rank,
    instead of a tangent-metadata or Dynamo internal error deep in its trace."""
    from torch._dynamo import compiled_autograd

    _, sharded = _tp_mlp(world_size)
    loss = sharded(torch.randn(4, 8)).pow(2).mean()
    with pytest.raises(Exception, match=r"compiled autograd .* does not support ShardedTensor"):
        with compiled_autograd._enable(torch.compile(backend="aot_eager")):
            loss.backward()


@multi_rank(world_size=[2, 4])
def test_tensor_parallel_mlp_fullgraph_has_functional_collectives(rank: int,
                                                                  world_size: int) -> None:
    dense, sharded = _tp_mlp(world_size)
    recorder = _Recorder()
    compiled = torch.compile(lambda a, b: F.mse_loss(sharded(a), b), backend=recorder,
                             fullgraph=True)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (sharded, dense)]
    torch.manual_seed(1)
    for _ in range(3):  # three training steps: compiled once, then reused
        x, y = torch.randn(6, 8), torch.randn(6, 8)
        losses = []
        for loss_of, optimizer in ((compiled, optimizers[0]),
                                   (lambda a, b: F.mse_loss(dense(a), b), optimizers[1])):
            optimizer.zero_grad()
            loss = loss_of(x, y)
            loss.backward()
            optimizer.step()
            losses.append(_full(loss.detach()))
        torch.testing.assert_close(losses[0], losses[1])
    for ours, theirs in zip(sharded.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(_full(ours.grad), theirs.grad)
        torch.testing.assert_close(_full(ours.detach()), theirs.detach())
    assert len(recorder.graphs) == 2  # one forward, one backward: no recompilation
    # The row-parallel output is partial: the loss needs its sum, which runs in the forward
    # graph as a functional all-reduce; the backward needs none (its tangent is traced as
    # replicated, as autograd hands it).
    assert recorder.collectives() == ["_c10d_functional.all_reduce.default"], \
        recorder.collectives()
    assert recorder.waits() == 1  # NOTE [collectives under torch.compile]: one wait each


@multi_rank(world_size=[2], timeout_s=240.0)
def test_inductor_trains_the_tensor_parallel_mlp(rank: int, world_size: int) -> None:
    _inductor_mlp(world_size)


@pytest.mark.slow  # the heaviest of these on 4 ranks: in `nox -s tests`, not quick
@multi_rank(world_size=[4], timeout_s=240.0)
def test_inductor_trains_the_tensor_parallel_mlp_on_4_ranks(rank: int, world_size: int) -> None:
    _inductor_mlp(world_size)


def _inductor_mlp(world_size: int) -> None:
    dense, sharded = _tp_mlp(world_size)
    counter = _train_like_dense(dense, sharded, _batches((6, 8), (6, 8), seed=2), _mse,
                                backend="inductor", fullgraph=True)
    assert counter.frames == 1


@multi_rank(world_size=[2, 4])
def test_data_parallel_model_compiles_and_buckets_its_gradients(rank: int,
                                                                world_size: int) -> None:
    """Replicated parameters, a batch split over the ranks: the gradients are reduced in
    buckets by the eager post-accumulate-grad hooks, after the compiled backward."""
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    sharded = copy.deepcopy(dense)
    for name, param in list(sharded.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(sharded.get_submodule(owner), attr, nn.Parameter(
            ds.ShardedTensor.from_replicated(param.detach(), ds.Replicate())))
    batches = _batches((6 * world_size, 8), (6 * world_size, 4), seed=3)
    split = [tuple(ds.ShardedTensor.from_replicated(t, rows(world_size)) for t in batch)
             for batch in batches]
    _train_like_dense(dense, sharded, split, _mse, fullgraph=True, dense_batches=batches)
    for param in sharded.parameters():
        assert param.grad.sharding_spec() == ds.Replicate()


@multi_rank(world_size=[2, 4])
@pytest.mark.parametrize("mode", ["for_loop", "foreach", "fused"])
def test_compiled_optimizer_step_matches_dense(rank: int, world_size: int, mode: str) -> None:
    """``torch.compile(opt.step)`` of AdamW in its three implementations, on the
    tensor-parallel MLP's parameters, against the dense model's eager AdamW: torch's own
    graph break in the step, then the update compiled on ShardedTensor parameters (the
    for-loop's lerp reaches us as inductor's prims.fma; foreach as the ``_foreach_*``
    kernels). Nothing compiled after the first step. Fused: torch 2.13 wraps its
    ``_fused_adam`` in ``torch.compiler.disable`` ("don't trace into fused optimizer"),
    for plain tensors too, so the kernel runs eagerly, through our ``_fused_adamw_``."""
    torch._dynamo.reset()
    options = {"for_loop": {"foreach": False}, "foreach": {"foreach": True},
               "fused": {"fused": True}}[mode]
    dense, sharded = _tp_mlp(world_size)
    dense_opt = torch.optim.AdamW(dense.parameters(), lr=_LR, **options)
    sharded_opt = torch.optim.AdamW(sharded.parameters(), lr=_LR, **options)
    counter = _Counter("aot_eager")
    step = torch.compile(sharded_opt.step, backend=counter)
    counts = []
    for x, y in _batches((6, 8), (6, 8), seed=5):
        for model, run in ((dense, dense_opt.step), (sharded, step)):
            model.zero_grad()
            F.mse_loss(model(x), y).backward()
            run()
        counts.append(counter.frames)
    assert counts == [counts[0]] * 3, counts
    assert counts[0] >= 1 or mode == "fused", counts
    for ours, theirs in zip(sharded.parameters(), dense.parameters(), strict=True):
        assert isinstance(ours, ds.ShardedTensor)
        torch.testing.assert_close(ours.detach().full_tensor(), theirs.detach())
    for ours_state, theirs_state in zip(sharded_opt.state.values(), dense_opt.state.values(),
                                        strict=True):
        torch.testing.assert_close(_full(ours_state["exp_avg_sq"]), theirs_state["exp_avg_sq"])


@torch.library.custom_op("dstest_compile::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@multi_rank(world_size=[2])
def test_an_unsupported_op_under_compile_names_the_op(rank: int, world_size: int) -> None:
    """No sharded implementation of a user's op: the graph breaks there and eager raises
    our error naming it; with ``fullgraph=True`` the compile error names it."""
    x = ds.ShardedTensor.from_replicated(torch.ones(4, 2), rows(world_size))

    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.ops.dstest_compile.twice(t + 1) - 1

    message = re.escape("dstest_compile.twice.default not supported for ShardedTensor!")
    with pytest.raises(NotImplementedError, match=message):
        torch.compile(f, backend="aot_eager")(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message) as info:
        torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert "InternalTorchDynamoError" not in type(info.value).__name__


def _mse(model: nn.Module, *inputs: Any) -> torch.Tensor:
    """The loss against a random target (the last input). Not ``out.pow(2).mean()``: after
    a final LayerNorm that is constant, its gradients rounding noise, which AdamW (dividing
    by their RMS) turns into lr-sized steps that differ between two correct runs."""
    *args, target = inputs
    return F.mse_loss(model(*args), target)


def _transformer_block(world_size: int, backend: str) -> None:
    from dispatch_shard.examples import TRANSFORMER_PLAN

    torch.manual_seed(4)
    dense = TransformerBlock(8, heads=4, hidden=16)
    sharded = parallelize(copy.deepcopy(dense), TRANSFORMER_PLAN, world_size)
    counter = _train_like_dense(dense, sharded, _batches((2, 3, 8), (2, 3, 8)), _mse,
                                backend=backend, fullgraph=True)
    assert counter.frames == 1  # fullgraph: one graph


@multi_rank(world_size=[2, 4])
def test_transformer_block_trains_fullgraph(rank: int, world_size: int) -> None:
    """The transformer block (``scaled_dot_product_attention``), ``fullgraph=True``: three
    AdamW steps equal the dense block's, one graph, no recompilation."""
    _transformer_block(world_size, "aot_eager")


@multi_rank(world_size=[2, 4], timeout_s=240.0)
def test_inductor_trains_the_transformer_block(rank: int, world_size: int) -> None:
    _transformer_block(world_size, "inductor")


@multi_rank(world_size=[2, 4])
def test_transformer_encoder_layer_trains(rank: int, world_size: int) -> None:
    """``nn.TransformerEncoderLayer`` (its fused fast path is off in training) with a
    tensor-parallel feed-forward."""
    torch.manual_seed(6)
    dense = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    sharded = parallelize(copy.deepcopy(dense), {"linear1": "colwise", "linear2": "rowwise"},
                          world_size)
    _train_like_dense(dense, sharded, _batches((2, 5, 8), (2, 5, 8)), _mse)


@multi_rank(world_size=[2, 4])
def test_embedding_bag_demo_model_trains(rank: int, world_size: int) -> None:
    """The demo's model: a row-wise sharded ``EmbeddingBag`` and two transformer blocks."""
    from dispatch_shard.demo import VOCAB, _model, _plan

    torch.manual_seed(12)
    dense = _model(16)
    sharded = parallelize(copy.deepcopy(dense), _plan(), world_size)
    generator = torch.Generator().manual_seed(13)
    batches = [(torch.randn(2, 5, 16, generator=generator),
                torch.randint(0, VOCAB, (2, 3), generator=generator),
                torch.randn(2, 5, 16, generator=generator)) for _ in range(3)]
    _train_like_dense(dense, sharded, batches, _mse)


@multi_rank(world_size=[2, 4])
def test_activation_checkpointing_trains_fullgraph(rank: int, world_size: int) -> None:
    """``torch.utils.checkpoint`` inside a ``fullgraph=True`` compile."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = MLP(8, 16), MLP(8, 16)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.b(checkpoint(self.a, t, use_reentrant=False))  # type: ignore[no-any-return]

    torch.manual_seed(14)
    dense = Checkpointed()
    sharded = parallelize(copy.deepcopy(dense), {"a.fc1": "colwise", "a.fc2": "rowwise",
                                                 "b.fc1": "colwise", "b.fc2": "rowwise"},
                          world_size)
    _train_like_dense(dense, sharded, _batches((4, 8), (4, 8)), _mse, fullgraph=True)


def _train_language_model(dense: nn.Module, sharded: nn.Module, backend: str) -> None:
    """Three steps of a Hugging Face causal LM on random ids (vocabulary 64), loss from
    its labels."""
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 64, (2, 8), generator=generator),) for _ in range(3)]
    _train_like_dense(dense, sharded, batches,
                      lambda model, ids: model(input_ids=ids, labels=ids).loss,
                      backend=backend)


def _gpt2(world_size: int, backend: str) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                        attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    torch.manual_seed(8)
    dense = GPT2LMHeadModel(config)
    sharded = copy.deepcopy(dense)
    # GPT-2's Conv1D weights are [in, out]: its MLP's c_fc splits dim 1, c_proj dim 0.
    cols = ds.ChunkShardingSpec(1, [f"rank:{r}/cpu" for r in range(world_size)])
    for i in range(config.n_layer):
        mlp = sharded.transformer.h[i].mlp
        for module, name, spec in ((mlp.c_fc, "weight", cols),
                                   (mlp.c_fc, "bias", rows(world_size)),
                                   (mlp.c_proj, "weight", rows(world_size))):
            setattr(module, name, nn.Parameter(ds.ShardedTensor.from_replicated(
                getattr(module, name).detach(), spec)))
    _train_language_model(dense, sharded, backend)


@multi_rank(world_size=[2], timeout_s=240.0)
def test_hugging_face_gpt2_with_tensor_parallel_mlps_trains(rank: int,
                                                            world_size: int) -> None:
    _gpt2(world_size, "aot_eager")


@pytest.mark.slow  # the heaviest of these on 4 ranks: in `nox -s tests`, not quick
@multi_rank(world_size=[4], timeout_s=240.0)
def test_hugging_face_gpt2_with_tensor_parallel_mlps_trains_on_4_ranks(
        rank: int, world_size: int) -> None:
    _gpt2(world_size, "aot_eager")


def _llama(world_size: int, backend: str) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, attn_implementation="sdpa")
    torch.manual_seed(7)
    dense = LlamaForCausalLM(config)
    plan: dict[str, str] = {}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        plan |= {f"{layer}.self_attn.{p}": "colwise" for p in ("q_proj", "k_proj", "v_proj")}
        plan |= {f"{layer}.mlp.{p}": "colwise" for p in ("gate_proj", "up_proj")}
        plan |= {f"{layer}.self_attn.o_proj": "rowwise", f"{layer}.mlp.down_proj": "rowwise"}
    sharded = parallelize(copy.deepcopy(dense), plan, world_size)
    _train_language_model(dense, sharded, backend)


@multi_rank(world_size=[2], timeout_s=240.0)
def test_hugging_face_llama_with_tensor_parallel_weights_trains(rank: int,
                                                                world_size: int) -> None:
    """One of Llama's graphs returns an output that backward never reaches: autograd hands
    it a plain zero tangent, which becomes the ShardedTensor the trace assumed (NOTE [a
    plain tangent for a sharded output])."""
    _llama(world_size, "aot_eager")


@pytest.mark.slow  # the heaviest of these on 4 ranks: in `nox -s tests`, not quick
@multi_rank(world_size=[4], timeout_s=240.0)
def test_hugging_face_llama_with_tensor_parallel_weights_trains_on_4_ranks(
        rank: int, world_size: int) -> None:
    _llama(world_size, "aot_eager")


@multi_rank(world_size=[2], timeout_s=240.0)
def test_inductor_trains_hugging_face_llama(rank: int, world_size: int) -> None:
    _llama(world_size, "inductor")


@pytest.mark.slow  # the heaviest of these on 4 ranks: in `nox -s tests`, not quick
@multi_rank(world_size=[4], timeout_s=240.0)
def test_inductor_trains_hugging_face_llama_on_4_ranks(rank: int, world_size: int) -> None:
    _llama(world_size, "inductor")


@multi_rank(world_size=[2, 4])
def test_dp_x_tp_on_a_mesh_trains_fullgraph(rank: int, world_size: int) -> None:
    """A (world_size / 2) x 2 mesh: data parallel over "dp", the MLP tensor-parallel over
    "tp"; the mesh moves are functional collectives in the graph."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(9)
    dense = MLP(8, 16)
    sharded = parallelize(copy.deepcopy(dense),
                          {"dp": "replicate", "tp": {"fc1": "colwise", "fc2": "rowwise"}},
                          mesh=mesh)
    batches = _batches((6, 8), (6, 8))
    split = [tuple(ds.distribute_tensor(t, mesh, [Shard(0), Replicate()]) for t in batch)
             for batch in batches]
    counter = _train_like_dense(dense, sharded, split, _mse, fullgraph=True,
                                dense_batches=batches)
    if world_size == 4:  # (on a 1 x 2 mesh the module's output stays partial over "tp":
        # the loss, outside the graph, reduces it; the graph itself needs no collective)
        assert counter.recorder.collectives(), "the mesh moves run in the graph"
        assert counter.recorder.waits() == len(counter.recorder.collectives())


@multi_rank(world_size=[2])
def test_recompiles_only_when_a_layout_changes(rank: int, world_size: int) -> None:
    recorder = _Recorder()

    def f(t: torch.Tensor) -> torch.Tensor:
        return (t * 3).sum(dim=0)

    compiled = torch.compile(f, backend=recorder, dynamic=False)
    torch.manual_seed(10)
    dense = [torch.randn(6, 4) for _ in range(3)]
    split = [ds.ShardedTensor.from_replicated(d, rows(world_size)) for d in dense]
    for d, s in zip(dense, split, strict=True):  # new values, same layout: one graph
        torch.testing.assert_close(_full(compiled(s)), f(d))
    assert len(recorder.graphs) == 1
    columns = ds.ChunkShardingSpec(1, [f"rank:{r}/cpu" for r in range(world_size)])
    other = ds.ShardedTensor.from_replicated(dense[0], columns)
    out = compiled(other)  # another layout: a new graph, with the other plan
    torch.testing.assert_close(_full(out), f(dense[0]))
    assert len(recorder.graphs) == 2
    assert out.sharding_spec() == f(other).sharding_spec()


@multi_rank(world_size=[2])
def test_dynamic_shapes_break_the_graph_with_a_clear_reason(rank: int, world_size: int) -> None:
    """A plain input whose batch size changes makes Dynamo retrace with a symbolic size;
    layouts need concrete sizes, so the sharded ops break the graph and run eagerly (right
    values), and under fullgraph the error says why and what to do."""
    dense, sharded = _tp_mlp(world_size)
    compiled = torch.compile(sharded, backend="aot_eager")
    torch.manual_seed(11)
    for batch in (6, 10, 14):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(_full(compiled(x)), dense(x))
    torch._dynamo.reset()
    strict = torch.compile(sharded, backend="aot_eager", fullgraph=True)
    strict(torch.randn(6, 8))
    with pytest.raises(Exception, match="symbolic \\(dynamic\\) shapes are not supported"):
        strict(torch.randn(10, 8))
    torch._dynamo.reset()
    static = torch.compile(sharded, backend="aot_eager", fullgraph=True, dynamic=False)
    for batch in (6, 10):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(_full(static(x)), dense(x))


def test_plain_tangents_become_sharded_only_for_sharded_outputs() -> None:
    """The method torch.Tensor gains answers for ShardedTensor alone."""
    plain = torch.zeros(3)
    assert plain.__coerce_same_metadata_as_tangent__(None, torch.Tensor) is None
    assert plain.__coerce_same_metadata_as_tangent__(None) is None




def test_stand_in_runs_skip_the_tracing_modes() -> None:
    """NOTE [stand-in runs outside a trace]: the meta run of a product's check and the
    dtype probe of a reduction reach no dispatch mode that is active (a trace's fake,
    proxy and functionalization modes); a bad product still raises dense's error."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dispatch_shard.ops import matmul, reduction

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[Any] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    aten = torch.ops.aten
    # Sizes no other test uses: the meta run and the probe are cached by size.
    a, b = torch.empty(13, 17, device="meta"), torch.empty(17, 19, device="meta")
    c = torch.empty(23, 29, device="meta")
    with Record() as record:
        assert matmul._checked(aten.mm.default, (a, b)) == torch.float32
        assert reduction.probe(aten.sum.dim_IntList, (c, [1]), {}) == (torch.float32,)
    assert record.ops == [], record.ops
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        matmul._checked(aten.mm.default, (a, a))
