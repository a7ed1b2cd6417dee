"""Example models and a tensor-parallel helper, used by the demo, the tests and the docs.

:func:`parallelize` shards a module's linear layers in place, Megatron-style:
``"colwise"`` splits a layer's output features (weight rows and bias), so its
output is split along the last dim with no communication; ``"rowwise"`` splits
its input features (weight columns), so it consumes a column-split input and
produces a Partial output (one all-reduce when consumed); ``"replicate"`` gives
every rank the whole parameter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import ChunkShardingSpec, Replicate, ShardingSpec

__all__ = ["MLP", "TransformerBlock", "parallelize"]


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``."""

    def __init__(self, d_model: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_model]`` -> ``[..., d_model]``. After :func:`parallelize` with
        ``{"fc1": "colwise", "fc2": "rowwise"}``: one all-reduce, when the output is used."""
        return self.fc2(F.gelu(self.fc1(x)))  # type: ignore[no-any-return]


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: multi-head self-attention and an MLP."""

    def __init__(self, d_model: int = 8, heads: int = 4, hidden: int = 16,
                 fused_attention: bool = True) -> None:
        super().__init__()
        self.heads = heads
        # ``F.scaled_dot_product_attention`` (True), or the same math spelled out with
        # ``@`` and ``softmax`` (False; on sharded heads, ``@`` of 4-D tensors folds the
        # split head dim into the batch, which cuts each rank's heads into per-batch
        # pieces: NOTE [views that cut blocks into pieces] in ops/reshape.py).
        self.fused_attention = fused_attention
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        # No key bias: its exact gradient is zero (softmax ignores a per-query shift).
        self.q, self.v = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model)
        self.mlp = MLP(d_model, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [batch, seq, d_model]`` -> ``[batch, seq, d_model]``. With
        ``TRANSFORMER_PLAN``: two all-reduces forward, two backward."""
        batch, seq, d_model = x.shape
        h = self.ln1(x)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, d_model // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q(h)), split_heads(self.k(h)), split_heads(self.v(h))
        if self.fused_attention:
            heads = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q @ k.transpose(-2, -1)) / (d_model // self.heads) ** 0.5
            heads = scores.softmax(-1) @ v
        attended = heads.transpose(1, 2).reshape(batch, seq, d_model)
        x = x + self.o(attended)
        return x + self.mlp(self.ln2(x))  # type: ignore[no-any-return]


TRANSFORMER_PLAN = {"q": "colwise", "k": "colwise", "v": "colwise", "o": "rowwise",
                    "mlp.fc1": "colwise", "mlp.fc2": "rowwise",
                    "ln1": "replicate", "ln2": "replicate"}


def _placements(world_size: int, device: str) -> list[str]:
    return [f"rank:{r}/{device}" for r in range(world_size)]


def parallelize(module: nn.Module, plan: dict[str, Any], world_size: int | None = None,
                device: str = "cpu", *, mesh: Any = None) -> nn.Module:
    """Shard ``module``'s submodules in place by ``plan`` (path -> style).

    With ``mesh`` (a ``DeviceMesh``), ``plan`` has one entry per mesh dim name: a
    path -> style plan for that dim, ``"replicate"`` (data parallel: every parameter
    copied over that dim) or ``"fsdp"`` (every parameter's dim 0 split over that dim,
    nested with the other dims' splits in mesh-dim order). A parameter no dim splits
    is replicated over the whole mesh (a ShardedTensor still: its gradient is reduced
    over the batch's dims)::

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize(model, {"dp": "replicate", "tp": {"fc1": "colwise", "fc2": "rowwise"}},
                    mesh=mesh)

    Styles: ``colwise`` / ``rowwise`` (Megatron's column- and row-parallel linears: the
    weight's rows, or columns, chunked), ``table_rowwise`` (an embedding table's rows
    chunked, TorchRec's row-wise) and ``replicate``.

    ``world_size`` defaults to the default process group's. Every rank must hold the
    same dense module (same seed); each keeps its blocks, so no data moves (each
    parameter's creation checks that the ranks agree on its spec, size and dtype: one
    16-byte all_gather per rank). Returns ``module``.
    """
    if mesh is not None:
        return _parallelize_on_mesh(module, plan, mesh)
    if world_size is None:
        world_size = dist.get_world_size()
    rows = ChunkShardingSpec(0, _placements(world_size, device))
    cols = ChunkShardingSpec(1, _placements(world_size, device))
    for path, style in plan.items():
        sub = module.get_submodule(path)
        specs: dict[str, ShardingSpec]
        if style == "colwise":
            specs = {"weight": rows, "bias": rows}
        elif style == "table_rowwise":
            specs = {"weight": rows}
        elif style == "rowwise":
            specs = {"weight": cols, "bias": Replicate()}
        elif style == "replicate":
            specs = {name: Replicate() for name, _ in sub.named_parameters(recurse=False)}
        else:
            raise ValueError(f"unknown parallel style {style!r} for {path!r}: "
                             "expected colwise, rowwise, table_rowwise or replicate")
        for name, spec in specs.items():
            param = getattr(sub, name, None)
            if param is None:
                continue
            setattr(sub, name, nn.Parameter(ShardedTensor.from_replicated(param.detach(), spec)))
    return module


def _parallelize_on_mesh(module: nn.Module, plan: dict[str, Any], mesh: Any) -> nn.Module:
    from torch.distributed.tensor import Replicate as TorchReplicate
    from torch.distributed.tensor import Shard as TorchShard

    from dispatch_shard.mesh import distribute_tensor

    names = tuple(mesh.mesh_dim_names or (str(d) for d in range(mesh.ndim)))
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise ValueError(f"plan names mesh dims {unknown}; the mesh's are {list(names)}")
    styles: dict[str, dict[str, Any]] = {
        "colwise": {"weight": TorchShard(0), "bias": TorchShard(0)},
        "rowwise": {"weight": TorchShard(1), "bias": TorchReplicate()},
        "table_rowwise": {"weight": TorchShard(0)}}
    params = dict(module.named_parameters())
    placements: dict[str, list[Any]] = {name: [TorchReplicate()] * mesh.ndim
                                        for name in params}
    for dim, name in enumerate(names):
        entry = plan.get(name, "replicate")
        if entry == "replicate":
            continue
        if entry == "fsdp":
            for full, param in params.items():
                if param.dim() >= 1:
                    placements[full][dim] = TorchShard(0)
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"plan for mesh dim {name!r} must be a path -> style dict, "
                             f"'replicate' or 'fsdp', got {entry!r}")
        for path, style in entry.items():
            if style == "replicate":
                continue
            if style not in styles:
                raise ValueError(f"unknown parallel style {style!r} for {path!r}: expected "
                                 "colwise, rowwise, table_rowwise or replicate")
            module.get_submodule(path)  # (a clear error for a wrong path)
            for attr, placement in styles[style].items():
                if f"{path}.{attr}" in placements:
                    placements[f"{path}.{attr}"][dim] = placement
    for full, param in params.items():
        owner, _, attr = full.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        setattr(sub, attr, nn.Parameter(distribute_tensor(param.detach(), mesh,
                                                          placements[full])))
    return module
