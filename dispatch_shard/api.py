"""Module-level APIs: shard tensors, parameters and whole modules; hook module outputs.

Everything here is collective: every rank of the process group calls it with
the same arguments. Arguments that can differ between ranks (``src_rank``, the
spec, the tensor's size, a plan) are exchanged and compared first, so a
mistake raises on every rank instead of leaving some ranks waiting (see NOTE
[rank-consistent errors] in :mod:`dispatch_shard.collectives`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn

from dispatch_shard import collectives
from dispatch_shard.collectives import ProcessGroup
from dispatch_shard.layout import Layout, layout_of
from dispatch_shard.sharded_tensor import ShardedTensor, _empty_member, _single_block_layout
from dispatch_shard.sharder import Sharder, ShardingPlan
from dispatch_shard.specs import ChunkShardingSpec, Partial, ShardingSpec

__all__ = [
    "collect_local_shard",
    "reshard_output",
    "shard_module",
    "shard_parameter",
    "shard_tensor",
]


# -- tensors and parameters -------------------------------------------------------

def shard_tensor(
    tensor: torch.Tensor,
    spec: ShardingSpec,
    src_rank: int = 0,
    process_group: ProcessGroup | None = None,
) -> ShardedTensor:
    """Scatter ``tensor`` from ``src_rank`` into a ShardedTensor laid out by ``spec``.

    Every rank passes a tensor of the same size and dtype; only ``src_rank``'s
    data is used (the legacy ``_shard_tensor``). Any spec works: chunk,
    enumerable (several or empty blocks per rank), :class:`~dispatch_shard.Replicate`
    (a broadcast) or :class:`~dispatch_shard.Partial` (``src_rank`` holds the value,
    the other summands are zero). The result requires grad when ``src_rank``'s
    tensor does, and shares no memory with it.

    Args:
        tensor: the value on ``src_rank``; contiguous and strided on every rank.
        spec: the layout of the result.
        src_rank: the source, a rank *of* ``process_group`` (its global rank
            for the default group).
        process_group: default: the default group.

    Collectives: two small object exchanges (validation), then one
    ``all_to_all_single`` carrying the blocks (none on a group of one rank).

    Raises:
        ValueError: on every rank, if any rank's tensor is not contiguous
            (``"... is not a contiguous Tensor"``), or ``src_rank``, ``spec``,
            the size or the dtype differ between ranks (``"... does not match
            with src_rank=..."``, ``"... does not match with sharding_spec=..."``),
            or the spec does not fit the tensor.
    """
    group = collectives.resolve_group(process_group)
    return _scatter(tensor, _local_tensor_error(tensor, "input tensor"), spec, src_rank, group)


def shard_parameter(
    module: nn.Module,
    param_name: str,
    spec: ShardingSpec,
    src_rank: int = 0,
    process_group: ProcessGroup | None = None,
) -> None:
    """Replace ``module.<param_name>`` by its ShardedTensor (scattered from ``src_rank``).

    A parameter becomes an ``nn.Parameter`` ShardedTensor with the same
    ``requires_grad`` (so ``module.parameters()``, ``torch.optim`` and
    ``state_dict()`` see it); a buffer stays a buffer (same persistence); a
    plain tensor attribute stays a plain attribute. See :func:`shard_tensor`
    for the spec, ``src_rank`` and the collectives.

    Raises:
        AttributeError: ``module`` has no attribute ``param_name``
            (``"Linear has no attribute `foo`"``).
        ValueError: the attribute is not a tensor (``"Expected Linear.bias to be
            a Tensor, but found str"``), not contiguous, or the arguments differ
            between ranks, as in :func:`shard_tensor`.

    Every error is raised on every rank of the group.
    """
    group = collectives.resolve_group(process_group)
    error: Exception | None = None
    tensor: torch.Tensor | None = None
    if not hasattr(module, param_name):
        error = AttributeError(f"{module._get_name()} has no attribute `{param_name}`")
    else:
        value = getattr(module, param_name)
        if not isinstance(value, torch.Tensor):
            error = ValueError(
                f"Expected {type(module).__name__}.{param_name} to be a Tensor, but found "
                f"{type(value).__name__}"
            )
        else:
            tensor = value
            error = _local_tensor_error(value, f"param: {param_name}")
    sharded = _scatter(tensor, error, spec, src_rank, group)
    assert tensor is not None  # _scatter raised otherwise
    if param_name in module._parameters:
        module.register_parameter(
            param_name, nn.Parameter(sharded, requires_grad=tensor.requires_grad)
        )
    elif param_name in module._buffers:
        module._buffers[param_name] = sharded
    else:
        setattr(module, param_name, sharded)


def _local_tensor_error(tensor: Any, what: str) -> Exception | None:
    if not isinstance(tensor, torch.Tensor):
        return TypeError(f"{what} must be a torch.Tensor, but found {type(tensor).__name__}")
    if isinstance(tensor, ShardedTensor):
        return TypeError(f"{what} is already a ShardedTensor: use redistribute() to change "
                         "its layout")
    if tensor.layout != torch.strided:
        return ValueError(f"{what} is not a strided Tensor (layout {tensor.layout})")
    if not tensor.is_contiguous():
        return ValueError(f"{what} is not a contiguous Tensor")
    return None


def _scatter(
    tensor: torch.Tensor | None,
    error: Exception | None,
    spec: ShardingSpec,
    src_rank: int,
    group: ProcessGroup,
) -> ShardedTensor:
    """:func:`shard_tensor` once this rank's own checks produced ``error`` (or None)."""
    rank = dist.get_rank()
    if not collectives.is_member(group, rank):
        # Outside the group: no blocks and no collectives (see NOTE [ranks outside a subgroup]).
        if error is not None:
            raise error
        assert tensor is not None
        return _empty_member(tensor.shape, group, rank)
    collectives.raise_if_any(error, group)
    assert tensor is not None
    ranks = collectives.group_ranks(group)
    facts = (src_rank, spec, tuple(tensor.shape), tensor.dtype, tensor.requires_grad)
    everyone = [facts] if len(ranks) == 1 else collectives.all_gather_object(facts, group)
    # Every rank checks the same gathered list, so every rank raises alike.
    _check_agreement(everyone, ranks, rank)
    if isinstance(src_rank, bool) or not isinstance(src_rank, int) \
            or not 0 <= src_rank < len(ranks):
        raise ValueError(
            f"src_rank={src_rank} is not a rank of the process group (group ranks are "
            f"0..{len(ranks) - 1}, global ranks {list(ranks)})"
        )
    source_rank = ranks[src_rank]
    _, _, size, dtype, requires_grad = everyone[src_rank]
    layout = layout_of(spec, torch.Size(size), ranks, device=str(tensor.device))
    source_layout: Layout = _single_block_layout(layout, source_rank)
    blocks = [tensor.detach()] if rank == source_rank else []
    source = ShardedTensor._wrap(blocks, source_layout, group, rank, dtype, tensor.device)
    with torch.no_grad():
        result = source._redistributed(spec)
    if requires_grad:
        result.requires_grad_(True)
    return result


_AGREED = ("src_rank", "sharding_spec", "size", "dtype")


def _check_agreement(everyone: list[tuple[Any, ...]], ranks: Sequence[int], rank: int) -> None:
    mine = everyone[list(ranks).index(rank)]
    for position, name in enumerate(_AGREED):
        for other_rank, theirs in zip(ranks, everyone, strict=True):
            if theirs[position] != mine[position]:
                raise ValueError(
                    f"{name}={_show(mine[position])} on rank: {rank} does not match with "
                    f"{name}={_show(theirs[position])} on rank: {other_rank}"
                )


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


# -- output hooks ---------------------------------------------------------------------

def reshard_output(module: nn.Module, spec: ShardingSpec) -> nn.Module:
    """Make ``module``'s ShardedTensor output come out laid out by ``spec``; returns ``module``.

    A forward hook redistributes the output (differentiably: the gradient goes
    back to the original layout); other outputs pass unchanged. Unlike the
    legacy ``_reshard_output``, the output is a new tensor: a tensor the
    module returns as is (a parameter, an attribute) keeps its own layout.
    """
    def redistribute_output(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, ShardedTensor):
            return output.redistribute(spec)
        return output

    module.register_forward_hook(redistribute_output)
    return module


def collect_local_shard(module: nn.Module) -> nn.Module:
    """Make ``module`` return this rank's block of its ShardedTensor output; returns ``module``.

    This converts a sharded output back to data parallel: each rank continues
    with its own block. For a :class:`~dispatch_shard.ChunkShardingSpec` output
    whose block has size 1 along the sharding dim, that dim is squeezed (a
    ``[4, 16]`` output on 4 ranks gives each rank a ``[16]`` tensor). A
    replicated output gives the whole value, a partial one this rank's summand.

    Autograd flows back through the block: the gradient of a sharded output is
    the ShardedTensor of every rank's block gradient, that of a replicated
    output the partial sum of every rank's gradient (the sum of the ranks'
    losses is the loss). A partial output's summand is not differentiable.
    Outputs other than ShardedTensors pass unchanged; an output with several
    blocks on a rank raises ``NotImplementedError``.
    """
    def local_block(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if not isinstance(output, ShardedTensor):
            return output
        output.local_tensor()  # raises for zero or several blocks
        if output._layout.is_partial:
            local = output._local_tensors[0].detach()
        else:
            local = cast(torch.Tensor, _LocalBlock.apply(output))  # type: ignore[no-untyped-call]
        spec = output.sharding_spec()
        if isinstance(spec, ChunkShardingSpec) and local.size(spec.dim) == 1:
            local = local.squeeze(spec.dim)
        return local

    module.register_forward_hook(local_block)
    return module


class _LocalBlock(torch.autograd.Function):
    """This rank's only block (an alias); the backward builds the global gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: ShardedTensor) -> torch.Tensor:
        ctx.like = tensor._like([], dtype=tensor.dtype)  # layout, group and rank; no data
        return tensor._local_tensors[0].detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> ShardedTensor:
        like: ShardedTensor = ctx.like
        layout = like._layout
        if layout.is_replicate:
            # Each rank's loss saw the whole value: the gradient sums over ranks.
            layout = layout.with_spec(Partial())
        return like._like([grad.contiguous()], layout, grad.dtype)


# -- modules -----------------------------------------------------------------------

def shard_module(
    module: nn.Module,
    plan: ShardingPlan,
    src_rank: int = 0,
    process_group: ProcessGroup | None = None,
) -> None:
    """Shard ``module`` in place by ``plan`` (collective: every rank, the same plan).

    In the plan's order: each parameter path is sharded with
    :func:`shard_parameter` (data from ``src_rank``), and each :class:`Sharder`
    path's submodule is replaced by what the sharder returns. Then the
    ``output_plan`` modules get :func:`reshard_output` and the
    ``return_local_tensor`` modules :func:`collect_local_shard`.

    Every error below is raised on every rank.

    Raises:
        ValueError: the plan or ``src_rank`` differ between ranks.
        KeyError: a sharder on the empty path (``"Module path must not be
            empty for custom sharder!"``).
        RuntimeError: a parameter path inside a sharder's submodule, or a
            sharder inside another's (``"... should not conflict with the
            submodule tree ..."``).
        TypeError: a plan value that is neither a spec nor a sharder, or an
            ``output_plan`` value that is not a spec.
        AttributeError: a path that names no submodule.
    """
    group = collectives.resolve_group(process_group)
    # Ranks outside the group exchange nothing (their parameters become block-less).
    member = collectives.is_member(group, dist.get_rank())
    # One exchange makes the plan the same everywhere; checks on it then agree.
    digest = _plan_digest(plan, src_rank)
    if member and dist.get_world_size(group) > 1:
        ranks = collectives.group_ranks(group)
        for other_rank, theirs in zip(ranks, collectives.all_gather_object(digest, group),
                                      strict=True):
            if theirs != digest:
                raise ValueError(
                    f"ShardingPlan (with src_rank) on rank: {dist.get_rank()} does not match "
                    f"with the one on rank: {other_rank}: {digest} vs {theirs}"
                )
    _check_plan(plan)
    error: Exception | None = None
    try:  # the module trees could still differ between ranks
        for path, action in plan.plan.items():
            module.get_submodule(path if isinstance(action, Sharder) else
                                 path.rpartition(".")[0])
    except AttributeError as exc:
        error = exc
    if member:
        collectives.raise_if_any(error, group)
    elif error is not None:
        raise error

    for path, action in plan.plan.items():
        if isinstance(action, Sharder):
            parent_path, _, name = path.rpartition(".")
            sharded = action.shard(module.get_submodule(path))
            setattr(module.get_submodule(parent_path), name, sharded)
        else:
            module_path, _, name = path.rpartition(".")
            shard_parameter(module.get_submodule(module_path), name, action,
                            src_rank=src_rank, process_group=group)
    for path, spec in (plan.output_plan or {}).items():
        reshard_output(module.get_submodule(path), spec)
    for path in plan.return_local_tensor or []:
        collect_local_shard(module.get_submodule(path))


def _plan_digest(plan: ShardingPlan, src_rank: int) -> tuple[Any, ...]:
    """What every rank must agree on: paths, specs, sharder types, output handling."""
    actions = tuple(
        (path, f"Sharder {type(a).__module__}.{type(a).__qualname__}"
         if isinstance(a, Sharder) else a)
        for path, a in plan.plan.items()
    )
    outputs = tuple((plan.output_plan or {}).items())
    return (actions, outputs, tuple(plan.return_local_tensor or ()), src_rank)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def _check_plan(plan: ShardingPlan) -> None:
    sharder_paths = [p for p, a in plan.plan.items() if isinstance(a, Sharder)]
    for path, action in plan.plan.items():
        if isinstance(action, Sharder):
            if path == "":
                raise KeyError("Module path must not be empty for custom sharder!")
            inside = [s for s in sharder_paths if s != path and _within(path, s)]
        elif isinstance(action, ShardingSpec):
            inside = [s for s in sharder_paths if _within(path.rpartition(".")[0], s)]
        else:
            raise TypeError(
                f"Only `ShardingSpec` and `Sharder` are supported to shard '{path}', "
                f"got {type(action).__name__}"
            )
        if inside:
            raise RuntimeError(
                f"ShardingPlan is invalid: '{path}' lies inside the submodule '{inside[0]}' "
                "that a Sharder shards; entries should not conflict with the submodule tree "
                "that a Sharder is working with!"
            )
    for path, spec in (plan.output_plan or {}).items():
        if not isinstance(spec, ShardingSpec):
            raise TypeError(
                f"Only `ShardingSpec` is supported as output_plan for '{path}', "
                f"got {type(spec).__name__}"
            )
