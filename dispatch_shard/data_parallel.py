"""Data-parallel modules: a module run on each rank's rows as dense code.

A model whose parameters are replicated ShardedTensors, called on a batch split along
dim 0, already trains right with no wrapper: every op runs block by block and backward
leaves each parameter a pending gradient, reduced in buckets
(:mod:`dispatch_shard.grad_reduction`). But every op of the step then pays a Python
``__torch_dispatch__`` (about 110 per step for an 8-layer MLP), and with several ranks
sharing cores that cost is what keeps such a step slower than ``DistributedDataParallel``.

:func:`data_parallel` removes it for a module whose rows are independent, the contract
``DistributedDataParallel`` assumes too: row ``i`` of every output depends only on row
``i`` of the inputs (no batch statistics, no mean over the batch inside the module).
Then the global computation *is* each rank running the module on its own rows, so the
module's forward and backward run as plain dense code:

- **Inputs**: ShardedTensors split along dim 0 by a :class:`ChunkShardingSpec` with one
  block per rank of its group (all such inputs split alike); each rank passes its block
  ``[rows_r, ...]``. Plain tensors and other values pass through unchanged (the same on
  every rank: constants, masks). With gradients on, at least one input must be such a
  ShardedTensor: a call with plain tensors only (each rank's rows, as under DDP) raises,
  as their gradients would never be combined.
- **Parameters and buffers**: ShardedTensors replicated (:class:`Replicate`) over the
  inputs' ranks; the module sees each rank's full copy. A plain tensor parameter would
  train on one rank's rows only: refused when the module is wrapped.
- **Outputs**: every tensor the module returns must keep the batch: ``[rows_r, ...]``
  on each rank. It is returned as a ShardedTensor split like the inputs, of global size
  ``[B, ...]``. A result that visibly lost the batch (a scalar loss, a mean over rows
  whose size differs from the rank's rows on some rank) raises on every rank; one that
  mixes rows but keeps their number cannot be seen, which is the contract's to exclude.
- **Gradients**: a parameter's gradient comes out of backward pending (each rank the
  gradient of its rows) and joins the bucketed reduction as usual: ``no_sync``,
  ``set_gradient_bucketing`` and ``count_collectives`` work unchanged. An input's
  gradient gets the input's layout. A branch on a rank's own rows may skip a layer on
  some ranks only (an expert that no row of the rank needs): its parameters' gradients
  are then dense's, reduced with zeros from the ranks that skipped it in fixed buckets;
  unbucketed, every rank raises instead (NOTE [every rank reduces the same parameters]
  in dispatch_shard.grad_reduction).

Collectives: none in forward; in backward, the gradient buckets. The first call with
given inputs (their sizes and dtypes, the values of other hashable arguments, training
and grad mode) exchanges one all-gather of 16 bytes per rank (``collectives.agree``) so
that a module that raised on some ranks only (an empty block, a batch that lost its
rows) raises on every rank, and so do outputs whose trailing sizes differ across ranks;
where some rank's block is empty, every call checks. Later calls with the same inputs'
facts communicate nothing in forward: an error there that
depends on the data of some ranks (an index out of range) is raised on those ranks only,
as under DDP, and the others then stop at their next collective, under the group's
timeout.

A BatchNorm that computes batch statistics (training mode, or no running statistics)
breaks the contract: refused at each call (in eval mode with running statistics it works
row by row, and is accepted). Also refused: a second derivative through the module
(``create_graph=True``), and a forward that assigns a new tensor to
a replicated parameter or buffer. Activation checkpointing of the whole module or of
submodules inside it works (NOTE [checkpointed submodules of a data-parallel module]),
as long as a checkpointed function reaches parameters through the modules that hold
them. Under ``torch.compile`` the data-parallel forward runs as it does eagerly (NOTE [a
data-parallel forward runs eagerly under torch.compile]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from dispatch_shard import collectives, grad_reduction
from dispatch_shard.layout import Layout, layout_of
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import ChunkShardingSpec, Partial

__all__ = ["data_parallel"]

# (where a replicated parameter or buffer lives, its name there, it, its gradient's layout)
_Slot = tuple[dict[str, Any], str, ShardedTensor, Layout]


class _ToLocal(torch.autograd.Function):
    """A ShardedTensor with one block on this rank -> that block (an alias); backward
    wraps the block's gradient with ``grad_layout`` (a parameter: pending over the
    ranks; an input: the input's own layout)."""

    @staticmethod
    def forward(ctx: Any, tensor: ShardedTensor, grad_layout: Layout) -> torch.Tensor:
        ctx.anchor = tensor
        ctx.grad_layout = grad_layout
        block = tensor._local_tensors[0]
        return block.view_as(block)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[ShardedTensor, None]:
        _first_order_only()
        return ctx.anchor._like([_unshared(grad)], ctx.grad_layout, grad.dtype), None


# NOTE [one gradient tensor for two parameters]
# Autograd may hand the same tensor to two inputs: ``p1 + p2`` gives both the output's
# gradient. Dense AccumulateGrad sees the tensor shared and clones it; here each
# parameter's gradient is a new wrapper around it, unshared to AccumulateGrad, so both
# parameters' gradients would hold one block, and accumulating into one (a second
# micro-batch, a kept gradient, a group of one where the block is the value) would add
# into the other too. A block already handed out in this backward pass is cloned.
_handed: dict[int, torch.Tensor] = {}  # id -> the tensor (kept alive: ids stay unique)
_handed_task = [-1]


def _unshared(grad: torch.Tensor) -> torch.Tensor:
    task = torch._C._current_graph_task_id()
    if task != _handed_task[0]:
        _handed.clear()
        _handed_task[0] = task
        torch.autograd.Variable._execution_engine.queue_callback(_handed.clear)
    if _handed.get(id(grad)) is grad:
        return grad.clone()
    _handed[id(grad)] = grad
    return grad


def _first_order_only() -> None:
    """A backward that builds a graph (``create_graph=True``) raises: the results above
    are not differentiable, and a second derivative would silently lose its term.
    (``once_differentiable`` would do it too, at twice the cost of these calls.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "data_parallel: backward with create_graph=True (a second derivative) through "
            "a data-parallel module is not supported; run the module without "
            "data_parallel for it")


class _FromLocal(torch.autograd.Function):
    """This rank's rows of an output -> the ShardedTensor split like the inputs;
    backward hands back this rank's rows of the output's gradient."""

    @staticmethod
    def forward(ctx: Any, block: torch.Tensor, anchor: ShardedTensor,
                layout: Layout, parameters: list[ShardedTensor]) -> ShardedTensor:
        ctx.layout = layout
        ctx.rank = anchor._rank
        ctx.parameters = parameters
        return anchor._like([block], layout, block.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        _first_order_only()
        # The module's parameters, reduced in fixed buckets by this pass (NOTE [every rank
        # reduces the same parameters] in dispatch_shard.grad_reduction)
        grad_reduction.expect(ctx.parameters)
        layout: Layout = ctx.layout
        if not isinstance(grad, ShardedTensor):  # (a plain gradient: the global value)
            index = layout.local_indices(ctx.rank)[0]
            return grad[layout.shard_box(index)], None, None, None
        if grad._layout is not layout:
            grad = grad._redistributed(layout.spec)
        return grad._local_tensors[0], None, None, None


class _DataParallelModule(nn.Module):
    """Mixed into a module's class by :func:`data_parallel` (as ``fully_shard`` does):
    the module keeps its identity, its submodules and its state-dict keys."""

    _dp_slots: list[_Slot]
    _dp_checked: set[tuple[Any, ...]]
    _dp_batchnorms: list[nn.modules.batchnorm._BatchNorm]
    _dp_built: tuple[int, ...]  # the group ranks the slots were checked against
    _dp_modules: list[nn.Module]  # the modules when the slots were found
    _dp_structure: list[tuple[Any, ...]]  # and their _structure

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        split = _split_of(leaves)
        if split is None:
            if (_running[0] or not torch.is_grad_enabled()
                    or not any(isinstance(leaf, torch.Tensor) for leaf in leaves)):
                # (a submodule inside a data-parallel run; or values without gradients,
                # computed as given, with the replicated parameters)
                return super().forward(*args, **kwargs)
            raise TypeError(
                f"data_parallel: {type(self).__mro__[2].__name__} was called with plain "
                "tensors only. Pass the batch as a ShardedTensor split along dim 0, e.g. "
                "each rank's rows as ShardedTensor.from_local_tensor(rows, "
                "ChunkShardingSpec(0, placements), *global_size) (inside "
                "ds.unchecked_creation(): no communication); a plain tensor is read as "
                "the same value on every rank, and the gradients of each rank's own rows "
                "would never be combined")
        grad = torch.is_grad_enabled()
        swapped = _swap_in(self, grad, split)
        placed = [holder[name] for holder, name, _, _ in swapped]
        failed = True
        _running[0] += 1
        try:
            for norm in self._dp_batchnorms:
                if norm.training or norm.running_mean is None:
                    raise ValueError(
                        f"data_parallel: {type(self).__mro__[2].__name__} has a BatchNorm "
                        "that uses batch statistics (training mode, or no running "
                        "statistics), which mix rows; data_parallel runs each rank's rows "
                        "alone. Train it without data_parallel (sharded ops compute the "
                        "statistics over the whole batch), or put the BatchNorm in eval mode")
            local = [_local(leaf, leaf._layout, grad) if isinstance(leaf, ShardedTensor)
                     else leaf for leaf in leaves]
            key = (self.training, grad, *(_fact(leaf) for leaf in leaves))
            if key in self._dp_checked:
                result = self._run(local, spec, split)
            else:
                result = self._first_call(local, spec, split, key)
            failed = False
            return result
        finally:
            _running[0] -= 1
            reassigned = [name for (holder, name, _, _), put in zip(swapped, placed, strict=True)
                          if holder.get(name) is not put]
            for holder, name, tensor, _ in swapped:
                holder[name] = tensor
            if reassigned and not failed:
                raise TypeError(  # (only when nothing else is in flight)
                    f"data_parallel: the forward assigned a new value to {reassigned}; a "
                    "replicated parameter or buffer can only be updated in place there")

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # The mixed class is made at run time, so pickle cannot find it by name: a pickle
        # names the module's own class, and loading mixes it in again.
        # (the state third: it refers to the module itself, made first)
        return _unpickled, (type(self).__mro__[2],), self.__dict__

    def _run(self, local: list[Any], spec: Any, split: ShardedTensor) -> Any:
        args, kwargs = pytree.tree_unflatten(local, spec)
        return _outputs(super().forward(*args, **kwargs), split, self._dp_slots)

    def _first_call(self, local: list[Any], spec: Any, split: ShardedTensor,
                    key: tuple[Any, ...]) -> Any:
        """The first call with these input sizes: every rank learns whether any raised,
        and that the outputs' trailing sizes agree (see the module docstring)."""
        error: Exception | None = None
        result: Any = None
        facts: list[tuple[str, Any]] = []
        try:
            result = self._run(local, spec, split)
            facts = [("outputs", [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor)
                                  else type(t) for t in pytree.tree_leaves(result)])]
        except Exception as raised:  # re-raised on every rank below
            error = raised
        collectives.agree("data_parallel outputs", facts, error, split._process_group)
        if not _empty_somewhere(split):  # (an empty block: checked at every call)
            self._dp_checked.add(key)
        return result


def data_parallel(module: nn.Module) -> nn.Module:
    """Run ``module`` on each rank's rows of its batch as dense code (see the module
    docstring for the contract), in place; returns ``module``.

    Its parameters (and ShardedTensor buffers) must be replicated ShardedTensors, for
    example from :meth:`ShardedTensor.from_replicated`. Call it on the module that takes
    the split batch (usually the root); the same call on every rank.

    Raises:
        TypeError: a parameter is a plain tensor, or not replicated.
        ValueError: the module was already made data-parallel.
    """
    if isinstance(module, _DataParallelModule):
        raise ValueError("data_parallel: this module is already data-parallel")
    _slots(list(module.named_modules()))  # (refuses plain and sharded parameters now)
    if not _compiler_disabled:
        # NOTE [a data-parallel forward runs eagerly under torch.compile]: its work is
        # swapping parameters and wrapping blocks, which a compiler cannot trace; compiled
        # from outside, it runs as it does eagerly (already without per-op dispatch).
        # (torch.compiler imports dynamo, about a second: only when data_parallel is used)
        _DataParallelModule.forward = torch.compiler.disable(  # type: ignore[method-assign]
            _DataParallelModule.forward, recursive=True)
        _compiler_disabled.append(True)
    module.__class__ = _mixed(type(module))
    dp: Any = module
    dp._dp_slots = []
    dp._dp_checked = set()
    dp._dp_batchnorms = []
    dp._dp_built = ()
    dp._dp_modules = []
    dp._dp_structure = []
    return module


_classes: dict[type, type] = {}


def _mixed(cls: type) -> type:
    mixed = _classes.get(cls)
    if mixed is None:
        mixed = _classes[cls] = type(f"DataParallel{cls.__name__}",
                                     (_DataParallelModule, cls), {})
    return mixed


def _unpickled(cls: type[nn.Module]) -> nn.Module:
    module: nn.Module = cls.__new__(_mixed(cls))
    return module

_compiler_disabled: list[bool] = []


def _split_of(leaves: list[Any]) -> ShardedTensor | None:
    """The first ShardedTensor input, after checking every one is split along dim 0 like
    it, one block per rank; None when there is none."""
    first: ShardedTensor | None = None
    for leaf in leaves:
        if not isinstance(leaf, ShardedTensor):
            continue
        layout = leaf._layout
        spec = layout.spec
        if not (isinstance(spec, ChunkShardingSpec) and spec.dim in (0, -len(layout.size))
                and len({p.rank() for p in spec.placements}) == len(spec.placements)
                == len(layout.group_ranks)):
            raise ValueError(
                f"data_parallel: an input of size {list(layout.size)} is laid out by "
                f"{spec}; inputs must be split along dim 0 by a ChunkShardingSpec with one "
                "block per rank of the group (the batch)")
        if first is None:
            first = leaf
        elif (spec != first._layout.spec or layout.size[0] != first._layout.size[0]
              or leaf._process_group is not first._process_group):
            raise ValueError(
                f"data_parallel: inputs of sizes {list(first._layout.size)} and "
                f"{list(layout.size)} are split differently ({first._layout.spec}, {spec}); "
                "every sharded input must split the same batch alike")
    return first


def _local(tensor: ShardedTensor, grad_layout: Layout, grad: bool) -> torch.Tensor:
    """This rank's block of ``tensor``; through :class:`_ToLocal` (its gradient laid
    out by ``grad_layout``) where a gradient will flow."""
    if grad and tensor.requires_grad:
        local: torch.Tensor = _ToLocal.apply(tensor, grad_layout)  # type: ignore[no-untyped-call]
        return local
    return tensor._local_tensors[0]


def _pending(tensor: ShardedTensor) -> Layout:
    """A replicated parameter's gradient layout here: pending over its ranks."""
    return tensor._layout.with_spec(Partial("sum"))


def _swap_in(module: Any, grad: bool, split: ShardedTensor) -> list[_Slot]:
    """Put each rank's copy of every replicated parameter and buffer in its place;
    returns what to put back. The slots are found again when a parameter, buffer or
    submodule was added, removed or replaced since, or the inputs' ranks changed (about
    1 us per module per call to see; torch's global registration hooks would see it for
    free, but a compiled model that registers anything in its forward then recompiles
    at every step, guarding on the count they keep)."""
    ranks = split._layout.group_ranks
    if (module._dp_built != ranks or _structure(module._dp_modules) != module._dp_structure
            or any(holder.get(name) is not tensor for holder, name, tensor, _
                   in module._dp_slots)):
        named = list(module.named_modules())
        module._dp_slots = _slots(named)
        module._dp_modules = [owner for _, owner in named]
        module._dp_structure = _structure(module._dp_modules)
        module._dp_batchnorms = [m for m in module._dp_modules
                                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for _, name, tensor, _ in module._dp_slots:
            if tensor._layout.group_ranks != ranks:
                raise ValueError(
                    f"data_parallel: {name!r} is replicated over ranks "
                    f"{list(tensor._layout.group_ranks)}, the inputs are split over "
                    f"{list(ranks)}; parameters must be replicated over the batch's ranks")
        holders = {id(holder) for holder, _, _, _ in module._dp_slots}
        for owner in module._dp_modules:
            if (owner is not module and not getattr(owner, "_dp_recompute_hooks", False)
                    and (id(owner._parameters) in holders or id(owner._buffers) in holders)):
                owner.register_forward_pre_hook(_recompute_in)
                owner._dp_recompute_hooks = True
        module._dp_built = ranks
    slots: list[_Slot] = module._dp_slots
    for holder, name, tensor, pending in slots:
        holder[name] = _local(tensor, pending, grad)
    return slots


# NOTE [checkpointed submodules of a data-parallel module]
# Activation checkpointing (torch.utils.checkpoint) of a submodule inside the
# data-parallel forward recomputes it during backward, after the forward put the
# replicated parameters back: it would run them, as ShardedTensors, on a rank's rows
# given as a plain tensor, which the sharded ops read as a value replicated on every
# rank, and its gradients would miss the reduction over ranks. So every submodule
# holding such parameters has a forward pre-hook: a call during backward, outside any
# data-parallel forward and with no ShardedTensor among its positional inputs, is such a
# recomputation, and gets its own parameters' local copies, as the forward did (their
# gradients pending over the ranks again), until the backward pass ends (an autograd
# engine callback puts the parameters back). Only a pre-hook: a forward hook to undo it
# would cost every call a few more microseconds, for the rare recomputation.

_running = [0]  # data-parallel forwards running now: the hooks then do nothing
_recomputed: list[tuple[dict[str, Any], str, ShardedTensor]] = []  # put back at the end


_queued = [-1]  # the backward pass whose end puts them back


def _recompute_in(module: nn.Module, args: tuple[Any, ...]) -> None:
    task = torch._C._current_graph_task_id()
    if _running[0] or task == -1:
        return
    if any(isinstance(leaf, ShardedTensor) for leaf in pytree.tree_leaves(args)):
        return
    if _queued[0] != task:
        torch.autograd.Variable._execution_engine.queue_callback(_put_back)
        _queued[0] = task
    holders: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
    for holder in holders:
        for name, tensor in holder.items():
            if isinstance(tensor, ShardedTensor) and tensor._layout.is_replicate:
                _recomputed.append((holder, name, tensor))
                holder[name] = _local(tensor, _pending(tensor), torch.is_grad_enabled())


def _put_back() -> None:
    _queued[0] = -1
    while _recomputed:
        holder, name, tensor = _recomputed.pop()
        holder[name] = tensor


def _structure(modules: list[nn.Module]) -> list[tuple[Any, ...]]:
    """Per module: how many parameters and buffers it holds, and its submodules."""
    return [(len(m._parameters), len(m._buffers), *m._modules.values()) for m in modules]


def _fact(leaf: Any) -> Any:
    """What the first-call check of an input depends on: a tensor's size and dtype, any
    other hashable value itself (a flag may take another branch), else its type."""
    if isinstance(leaf, torch.Tensor):
        return (tuple(leaf.shape), leaf.dtype)
    try:
        hash(leaf)
    except TypeError:
        return type(leaf)
    return leaf


def _empty_somewhere(split: ShardedTensor) -> bool:
    return any(shard.shard_sizes[0] == 0 for shard in split._layout.shards)


def _slots(named: list[tuple[str, nn.Module]]) -> list[_Slot]:
    """The replicated parameters and buffers of the modules ``named``; raises for a
    plain parameter or a sharded one."""
    slots: list[_Slot] = []
    for owner_name, owner in named:
        for holder in (owner._parameters, owner._buffers):
            for name, tensor in holder.items():
                full = f"{owner_name}.{name}" if owner_name else name
                if isinstance(tensor, ShardedTensor):
                    if not tensor._layout.is_replicate:
                        raise TypeError(
                            f"data_parallel: {full!r} is laid out by {tensor._layout.spec}; "
                            "data_parallel runs replicated parameters only (and buffers; a "
                            "sharded one runs without it)")
                    slots.append((holder, name, tensor, _pending(tensor)))
                    if holder is owner._parameters:
                        grad_reduction.name_parameter(tensor, full)
                elif holder is owner._parameters and tensor is not None:
                    raise TypeError(
                        f"data_parallel: parameter {full!r} is a plain tensor; its gradient "
                        "would be this rank's rows' only. Make it a replicated ShardedTensor "
                        "(ShardedTensor.from_replicated(param, Replicate()))")
    return slots


def _outputs(result: Any, split: ShardedTensor, slots: list[_Slot]) -> Any:
    """Each tensor output, ``[rows_r, ...]`` on this rank, as the ShardedTensor split like
    the inputs (its backward names ``slots``' parameters)."""
    layout = split._layout
    rows = split._local_tensors[0].shape[0]
    parameters: list[ShardedTensor] = []

    def wrap(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if isinstance(value, ShardedTensor) or value.dim() == 0 or value.shape[0] != rows:
            raise ValueError(
                f"data_parallel: the module returned a tensor of size {list(value.shape)} "
                f"on a rank holding {rows} rows; every output must keep the batch (its "
                "rows along dim 0, one per input row). Compute losses and batch means "
                "outside the data-parallel module")
        out = layout_of(layout.spec, torch.Size([layout.size[0], *value.shape[1:]]),
                        layout.group_ranks, layout.device)
        if torch.is_grad_enabled() and value.requires_grad:
            if not parameters:
                parameters.extend(t for _, _, t, _ in slots if t.requires_grad)
            return _FromLocal.apply(value, split, out, parameters)  # type: ignore[no-untyped-call]
        return split._like([value], out, value.dtype)

    return pytree.tree_map(wrap, result)
