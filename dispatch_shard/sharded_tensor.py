"""The ShardedTensor wrapper subclass and its dispatch loop.

A ShardedTensor's size, dtype and requires_grad are the *global* ones. It owns
no storage: its data is the list of this rank's blocks (``_local_tensors``) of
an interned :class:`~dispatch_shard.layout.Layout`. Autograd works at the
global level above ``__torch_dispatch__``; each aten op that reaches the
dispatch loop is served by the op registry, shard by shard.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.optim.optimizer as torch_optimizer
import torch.utils._foreach_utils as torch_foreach_utils

from dispatch_shard import collectives, grad_reduction
from dispatch_shard.collectives import ProcessGroup
from dispatch_shard.layout import Layout, _mesh_layouts_made, flattened_layout, layout_of
from dispatch_shard.metadata import (
    Shard,
    ShardedTensorMetadata,
    ShardMetadata,
    TensorProperties,
)
from dispatch_shard.registry import (
    DISPATCH_TABLE,
    TORCH_FUNCTIONS,
    _on_torch_function_table_change,
    _op_name,
    lookup,
)
from dispatch_shard.specs import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    Replicate,
    ShardingSpec,
)

__all__ = ["ShardedTensor", "load_with_process_group"]

# ``collectives._observers`` itself (observers are added and removed in place): the
# dispatch loop reads it on every op.
_OBSERVERS = collectives._observers


def _first_group(args: Sequence[Any], func: object = None) -> ProcessGroup | None:
    """The process group of the first ShardedTensor in ``args`` (or in a list there).

    Every other ShardedTensor there must live on the same global ranks (see NOTE
    [operands share a process group]).
    """
    first: ShardedTensor | None = None
    for arg in args:
        if isinstance(arg, ShardedTensor):
            if first is None:
                first = arg
            elif arg._layout.group_ranks is not first._layout.group_ranks:
                _check_same_ranks(first, arg, func)
        elif isinstance(arg, list | tuple):
            for item in arg:
                if isinstance(item, ShardedTensor):
                    if first is None:
                        first = item
                    elif item._layout.group_ranks is not first._layout.group_ranks:
                        _check_same_ranks(first, item, func)
    return None if first is None else first._process_group


# NOTE [operands share a process group]
# An op's ShardedTensor operands must live on the same global ranks: the op's
# collectives run on one group, and ranks of another would never join them (or
# would compute with blocks they do not hold). Layouts carry their group's ranks
# (one cached tuple per group), so the check is an identity test per operand,
# and a comparison only when two groups differ as objects. Ranks outside a group
# cannot tell which group a tensor was made on (see NOTE [ranks outside a
# subgroup] in dispatch_shard.collectives); they compare the ranks torch reports.

def _check_same_ranks(first: ShardedTensor, other: ShardedTensor, func: object) -> None:
    ranks, other_ranks = first._layout.group_ranks, other._layout.group_ranks
    if ranks != other_ranks:
        name = "an op" if func is None else _op_name(func)
        raise ValueError(
            f"{name}: ShardedTensor operands live on different process groups (global "
            f"ranks {list(ranks)} and {list(other_ranks)}); move one onto the other's group "
            "first (e.g. full_tensor() and ShardedTensor.from_replicated)"
        )


class ShardedTensor(torch.Tensor):
    """A tensor whose blocks live on the ranks of a process group.

    Build one with the creation functions (:func:`dispatch_shard.empty`, ...),
    :func:`dispatch_shard.shard_tensor`, :meth:`from_local_shards` or
    :meth:`from_local_tensor`.
    """

    __slots__ = ("_awaiting", "_device", "_dtype", "_grad_layout_hook", "_kept_blocks",
                 "_layout", "_leaf_grad", "_local_tensors", "_process_group", "_rank",
                 "_reduced_cache")
    _local_tensors: list[torch.Tensor]
    _layout: Layout
    _awaiting: Any  # the gradient bucket this tensor awaits (dispatch_shard.grad_reduction)
    # True on a leaf's gradient, set by the leaf hook (NOTE [a kept gradient takes the
    # pending one] in dispatch_shard.grad_reduction).
    _leaf_grad: bool
    # A kept gradient's own blocks, set aside while it is pending; read with a default
    # (unset on most tensors: only gradients in that state are looked at).
    _kept_blocks: list[torch.Tensor] | None
    _process_group: ProcessGroup
    _rank: int
    # The wrapper's dtype and device, which never change, as plain attributes: ``_like``
    # runs once per op result, and reading them from the wrapper costs a call each.
    _dtype: torch.dtype
    _device: torch.device

    # NOTE [torch function is off unless needed] in dispatch_shard.registry
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def _wrap(
        local_tensors: list[torch.Tensor],
        layout: Layout,
        process_group: ProcessGroup,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        requires_grad: bool = False,
    ) -> ShardedTensor:
        """The internal constructor: no validation, no communication."""
        if any(t.is_conj() or t.is_neg() for t in local_tensors):
            local_tensors = _resolved(local_tensors)
        tensor: ShardedTensor = torch.Tensor._make_wrapper_subclass(
            ShardedTensor, layout.size, dtype=dtype, device=device, requires_grad=requires_grad
        )
        tensor._dtype = dtype
        tensor._device = tensor.device
        tensor._local_tensors = local_tensors
        tensor._layout = layout
        tensor._process_group = process_group
        tensor._rank = rank
        tensor._awaiting = None  # (set: reading an unset slot goes through __getattr__)
        tensor._leaf_grad = False
        return tensor

    def _like(
        self,
        local_tensors: list[torch.Tensor],
        layout: Layout | None = None,
        dtype: torch.dtype | None = None,
    ) -> ShardedTensor:
        """A new ShardedTensor on this one's group (by default: same layout and dtype)."""
        # (``_wrap`` inlined: this runs once per op result)
        layout = self._layout if layout is None else layout
        dtype = self._dtype if dtype is None else dtype
        tensor: ShardedTensor = torch.Tensor._make_wrapper_subclass(
            ShardedTensor, layout.size, dtype=dtype, device=self._device)
        tensor._dtype = dtype
        tensor._device = self._device
        tensor._local_tensors = local_tensors
        tensor._layout = layout
        tensor._process_group = self._process_group
        tensor._rank = self._rank
        # NOTE [an unset slot costs an exception]: reading an unset slot raises inside
        # the slot's descriptor and falls back to ``__getattr__``, which raises again
        # (about 3 us). While a gradient bucket is in flight every dispatch reads
        # ``_awaiting`` of every operand, so it is always set; ``_leaf_grad`` likewise
        # (the leaf hook reads it of every gradient).
        tensor._awaiting = None
        tensor._leaf_grad = False
        return tensor

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]  # torch types it as a plain callable
        cls,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        try:
            if grad_reduction.AWAITING[0]:  # a gradient's bucketed reduction is in flight
                grad_reduction.wait_operands(args, kwargs or {})
            if id(func) in _LAZY_VIEW_AWARE:  # NOTE [plain operands with lazy conjugates]
                args = tuple(_resolved_plain(a) for a in args)
            if _mesh_layouts_made[0]:
                from dispatch_shard import holders

                if holders.has_mesh(args, kwargs):  # NOTE [serving N-D operands]
                    if not _OBSERVERS:
                        return holders.serve(func, types, args, kwargs or {}, _dispatch)
                    collectives._op_stack.append(func)  # (what count_collectives names)
                    try:
                        return holders.serve(func, types, args, kwargs or {}, _dispatch)
                    finally:
                        collectives._op_stack.pop()
            return _dispatch(func, types, args, kwargs or {})
        except TypeError as error:
            if "SymInt" not in str(error):
                raise
            # NOTE [symbolic shapes]: layouts are made of concrete sizes. Under
            # torch.compile with dynamic shapes the op breaks the graph (Dynamo turns
            # this error into a graph break) and runs eagerly.
            raise NotImplementedError(
                f"{_op_name(func)}: symbolic (dynamic) shapes are not supported for "
                "ShardedTensor operands; compile with dynamic=False, or mark the "
                "input's dims static (torch._dynamo.mark_static)") from error

    # -- autograd ------------------------------------------------------------
    # NOTE [a leaf's grad keeps the leaf's layout]
    # Autograd builds a leaf's gradient from the global formulas: the gradient of
    # ``x.sum()`` is a 0-dim value expanded to ``x``'s shape, which here is a
    # replicated ShardedTensor, whatever ``x``'s layout. A ShardedTensor leaf that
    # requires grad therefore carries a post-accumulate-grad hook that moves
    # ``.grad`` to the leaf's layout: a local slice when the gradient is
    # replicated, an all-to-all otherwise, nothing when the layouts already match
    # (identity check; the usual case for parameters and optimizers). It also
    # makes the gradient's blocks contiguous, as AccumulateGrad does for dense
    # gradients (our wrapper is always "contiguous", so AccumulateGrad cannot).
    def requires_grad_(self, requires_grad: bool = True) -> ShardedTensor:
        super().requires_grad_(requires_grad)
        if requires_grad and self.is_leaf and getattr(self, "_grad_layout_hook", None) is None:
            self._grad_layout_hook = self.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                _grad_to_leaf_layout)
        return self

    @property
    def requires_grad(self) -> bool:
        return bool(_REQUIRES_GRAD.__get__(self))

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self.requires_grad_(value)

    # -- accessors ---------------------------------------------------------
    def _ready(self) -> None:
        """Wait for this gradient's bucketed reduction if it is in flight
        (:mod:`dispatch_shard.grad_reduction`)."""
        if grad_reduction.AWAITING[0] and getattr(self, "_awaiting", None) is not None:
            grad_reduction.wait(self)

    @property
    def process_group(self) -> ProcessGroup:
        """The process group whose ranks hold this tensor's blocks."""
        return self._process_group

    def local_shards(self) -> list[Shard]:
        """This rank's blocks with their metadata (the tensors are live, not copies)."""
        self._ready()
        shards = self._layout.shards
        indices = self._layout.local_indices(self._rank)
        return [Shard(t, shards[i]) for t, i in zip(self._local_tensors, indices, strict=True)]

    def local_tensor(self) -> torch.Tensor:
        """This rank's only block (``NotImplementedError`` with none or several)."""
        self._ready()
        if len(self._local_tensors) != 1:
            raise NotImplementedError("Only single local shard is supported.")
        return self._local_tensors[0]

    # -- the op-author API --------------------------------------------------
    def local_blocks(self) -> list[torch.Tensor]:
        """This rank's blocks, live (not copies), in the order of :meth:`local_shards`.

        A rank outside the process group, or one the layout places no block on, gets
        an empty list. For a :class:`~dispatch_shard.Partial` tensor the blocks are
        summands; a registered implementation sees one only if it registered with
        ``handles_partial=True``.
        """
        self._ready()
        return list(self._local_tensors)

    def with_blocks(self, blocks: Sequence[torch.Tensor], *,
                    layout: ShardingSpec | Sequence[Any] | None = None,
                    dtype: torch.dtype | None = None,
                    size: Sequence[int] | None = None) -> ShardedTensor:
        """A ShardedTensor on this tensor's ranks whose blocks on this rank are ``blocks``.

        No communication: every rank passes its own blocks, with the shapes that
        ``layout`` places on it for a tensor of ``size``, in the order of
        :meth:`local_shards`.

        Args:
            layout: a sharding spec, or placements over this tensor's
                :attr:`device_mesh`, one per mesh dim (``[Shard(0), Partial()]`` from
                ``torch.distributed.tensor``, as :meth:`redistribute` takes them);
                default: this tensor's layout.
            dtype: the blocks' dtype; default: this tensor's (pass it when an op
                changes the dtype, so that ranks without blocks agree).
            size: the result's global size; default: this tensor's (pass it when an
                op changes the size: a reduction, a product, a transpose).

        Raises:
            ValueError: the number, shapes or dtype of ``blocks`` do not match, or the
                layout does not fit ``size``.
        """
        target = self._layout if layout is None and size is None else \
            self._derived_layout(layout, size)
        dtype = self._dtype if dtype is None else dtype
        blocks = list(blocks)
        expected = [target.shards[i].shard_sizes for i in target.local_indices(self._rank)]
        if [list(b.shape) for b in blocks] != expected:
            hint = "; pass size= the result's size" if size is None and layout is None \
                else ""
            raise ValueError(
                f"with_blocks: rank {self._rank} passed blocks of sizes "
                f"{[list(b.shape) for b in blocks]}, but {target.spec!r} places blocks of "
                f"sizes {expected} there{hint}"
            )
        if any(b.dtype != dtype for b in blocks):
            raise ValueError(
                f"with_blocks: the blocks' dtypes {sorted({str(b.dtype) for b in blocks})} "
                f"differ from dtype={dtype}; pass dtype= the result's dtype"
            )
        if any(t.is_conj() or t.is_neg() for t in blocks):
            blocks = _resolved(blocks)
        return self._like(blocks, target, dtype)

    def _derived_layout(self, layout: ShardingSpec | Sequence[Any] | None,
                        size: Sequence[int] | None) -> Layout:
        """The layout ``with_blocks(layout=, size=)`` names, on this tensor's ranks."""
        if size is None and isinstance(layout, ShardingSpec):
            return self._layout.with_spec(layout)
        global_size = self._layout.size if size is None else torch.Size(size)
        device = str(_placement_device(self._layout))
        if layout is None or isinstance(layout, ShardingSpec):
            spec = self._layout.spec if layout is None else layout
            try:
                return layout_of(spec, global_size, self._layout.group_ranks, device)
            except ValueError as error:
                kept = " (kept from this tensor: no layout= given)" if layout is None else ""
                raise ValueError(
                    f"with_blocks: the layout {spec!r}{kept} does not fit size "
                    f"{list(global_size)}: {error}; pass layout= the result's layout "
                    "(a sharding spec, or placements over the device mesh)") from None
        from dispatch_shard.mesh import _remember, mesh_spec, remembered_mesh

        mesh, placements = self.device_mesh, tuple(layout)
        derived = layout_of(mesh_spec(mesh, placements, global_size, device), global_size,
                            self._layout.group_ranks, device)
        if remembered_mesh(self._layout) is not None:  # the result's device_mesh: this one
            _remember(derived, mesh, placements)
        return derived

    def sharding_spec(self) -> ShardingSpec:
        """The spec this tensor is laid out by: a :class:`~dispatch_shard.ChunkShardingSpec`,
        :class:`~dispatch_shard.EnumerableShardingSpec`, :class:`~dispatch_shard.Replicate`,
        :class:`~dispatch_shard.Partial` or :class:`~dispatch_shard.MeshShardingSpec`.

        The same value on every rank (specs are frozen and comparable), so code may branch
        on it without communicating."""
        return self._layout.spec

    def metadata(self) -> ShardedTensorMetadata:
        """The global metadata: every block's offsets, sizes and placement."""
        properties = TensorProperties(
            dtype=self.dtype,
            layout=torch.strided,
            requires_grad=self.requires_grad,
            memory_format=torch.contiguous_format,
            pin_memory=self.is_pinned(),
        )
        return ShardedTensorMetadata(list(self._layout.shards), self._layout.size, properties)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"ShardedTensor(size={tuple(self.shape)}, dtype={self.dtype}, "
            f"spec={self._layout.spec!r}, rank={self._rank}, "
            f"local_shards={[tuple(t.shape) for t in self._local_tensors]}"
            f"{', requires_grad=True' if self.requires_grad else ''})"
        )

    # -- whole-tensor views ------------------------------------------------
    def full_tensor(self) -> torch.Tensor:
        """The whole value as a dense tensor on every rank (differentiable).

        Ranks outside the process group get a tensor of uninitialised memory.
        """
        self._ready()
        return cast(torch.Tensor, _FullTensor.apply(self))  # type: ignore[no-untyped-call]

    def gather(  # type: ignore[override]  # the legacy ShardedTensor.gather, not torch.gather
        self, dst: int = 0, out: torch.Tensor | None = None
    ) -> None:
        """Copy the whole value into ``out`` on global rank ``dst``; other ranks pass ``None``.

        Every rank of the group must call it. A wrong ``out`` on ``dst`` raises
        there after the data moved, so no rank is left waiting.
        """
        group = self._process_group
        if not collectives.is_member(group, self._rank):
            return
        if dst not in self._layout.group_ranks:
            raise ValueError(
                f"gather: dst rank {dst} is not in the process group "
                f"{list(self._layout.group_ranks)}"
            )
        value = self._reduced()
        target = _single_block_layout(value._layout, dst)
        blocks = value._moved_to(target)
        if self._rank != dst:
            return
        if out is None:
            raise ValueError(f"gather: rank {dst} is dst and needs an out tensor")
        if out.shape != self.shape:
            raise ValueError(
                f"gather: out has size {tuple(out.shape)}, but the tensor is {tuple(self.shape)}"
            )
        out.copy_(blocks[0])

    # -- layout changes ------------------------------------------------------
    def _cached_reduction(self) -> ShardedTensor | None:
        """The cached reduction of this Partial tensor while it is fresh (NOTE [a Partial
        is reduced at most once]); else None."""
        cached = getattr(self, "_reduced_cache", None)
        if cached is None:
            return None
        summand = self._local_tensors[0] if self._local_tensors else None
        if (cached[0] is summand and cached[3] == self._version
                and (summand is None or cached[1] == summand._version)):
            return cast("ShardedTensor", cached[2])
        return None

    def _reduced(self) -> ShardedTensor:
        """A partial tensor reduced to replicated; others as they are.

        NOTE [a Partial is reduced at most once]
        Autograd saves Partial outputs for backward (a row-parallel linear's output
        feeding a loss), so the same Partial is often reduced in the forward and
        again in the backward. The result is cached on the tensor, keyed by its
        summand's identity and version counter and by the tensor's own version
        counter: an in-place change of the summand, or a reshard, invalidates it, and
        so does a write through a view of the tensor (made above autograd, a view
        shares the tensor's counter; the views of the summands made below autograd
        share nothing), so the cache never serves a stale value. The
        cached tensor and its blocks never leave dispatch_shard's internals:
        :meth:`_redistributed` hands out copies (an in-place op on what
        :meth:`redistribute` returns runs below autograd, where the blocks' version
        counters do not move, so it would change this tensor's value unseen).
        """
        layout = self._layout
        if not layout.pending:
            return self
        cached = self._cached_reduction()
        if cached is not None:
            return cached
        summand = self._local_tensors[0] if self._local_tensors else None
        if layout.is_mesh:  # a pending reduction over sub-groups: the plan sums the terms
            value_layout = layout.value_layout()
            local = self._moved_to(value_layout)
        else:
            op = layout.spec.reduce_op  # type: ignore[attr-defined]
            value_layout = layout.with_spec(Replicate())
            if summand is not None and collectives.is_member(self._process_group, self._rank):
                copy = summand.clone(memory_format=torch.contiguous_format)
                local = [collectives.all_reduce(copy, op, self._process_group)]
            else:
                local = []
        reduced = self._like(local, value_layout)
        self._reduced_cache = (summand, None if summand is None else summand._version, reduced,
                               self._version)
        return reduced

    def _moved_to(self, dst: Layout) -> list[torch.Tensor]:
        """This rank's blocks of ``dst``, which holds no pending reduction (self is not
        Partial; an N-D layout's pending terms are summed on the way).

        A sum of more than two terms into copies goes through the copies' split
        (flattened_layout): a reduce-scatter, then an all-gather, each rank sending
        about twice its block, not once per term (a ring all-reduce's bytes)."""
        src = self._layout
        move = functools.partial(collectives.redistribute, group=self._process_group,
                                 rank=self._rank, dtype=self.dtype, device=self.device)
        if src.is_mesh and src.pending and dst.size and not dst.is_partial and \
                (dst.is_replicate or dst.is_mesh) and len(set(src.summand_classes())) > 2:
            middle = flattened_layout(dst)
            return move(move(self._local_tensors, src, middle), middle, dst)
        return move(self._local_tensors, src, dst)

    def _redistributed(self, spec: ShardingSpec) -> ShardedTensor:
        """The same value laid out by ``spec`` (not differentiable)."""
        dst = self._layout.with_spec(spec)
        if dst is self._layout:
            return self._like(list(self._local_tensors))
        if self._layout.same_blocks(dst):  # no move, as for the same layout
            return self._like(list(self._local_tensors), dst)
        if dst.pending:
            return self._like(_to_partial(self, dst), dst)
        value = self._reduced() if self._layout.is_partial else self
        if value._layout is dst and value is not self:
            # A copy of the cached reduction, never the cache itself (see NOTE [a Partial
            # is reduced at most once]): callers may change it in place.
            return value._like([t.clone() for t in value._local_tensors])
        return self._like(value._moved_to(dst), dst)

    def redistribute(self, spec: Any = None, placements: Any = None) -> ShardedTensor:
        """A new ShardedTensor with the same value laid out by ``spec`` (differentiable).

        Also DTensor's form, ``redistribute(device_mesh, placements)`` (the mesh may be
        None: this tensor's), with one placement per mesh dim (see
        :mod:`dispatch_shard.mesh`).
        """
        if placements is not None:
            from dispatch_shard.mesh import redistribute_to_mesh

            return redistribute_to_mesh(self, spec, placements)
        return cast(ShardedTensor, _Redistribute.apply(self, spec))  # type: ignore[no-untyped-call]

    @property
    def device_mesh(self) -> Any:
        """The ``DeviceMesh`` this tensor was laid out over (by
        :func:`dispatch_shard.distribute_tensor`, ``redistribute(mesh, placements)``,
        ``from_local``), or a 1-D mesh of its group's ranks."""
        from dispatch_shard.mesh import mesh_view

        return mesh_view(self)[0]

    @property
    def placements(self) -> tuple[Any, ...]:
        """One placement per dim of :attr:`device_mesh` (``Shard(d)``, ``Replicate()``,
        ``Partial(op)``; a 1-D spec with no such placement stands for itself)."""
        from dispatch_shard.mesh import mesh_view

        return mesh_view(self)[1]

    @classmethod
    def from_local(cls, local_tensor: torch.Tensor, device_mesh: Any, placements: Any, *,
                   shape: Sequence[int] | None = None) -> ShardedTensor:
        """A ShardedTensor from each rank's block, like ``DTensor.from_local``; see
        :func:`dispatch_shard.mesh.from_local`."""
        from dispatch_shard.mesh import from_local

        return from_local(local_tensor, device_mesh, placements, shape=shape)

    def reshard(self, spec: ShardingSpec) -> ShardedTensor:
        """Lay this tensor out by ``spec``, in place; returns ``self`` (legacy semantics)."""
        moved = self._redistributed(spec)
        self._local_tensors = moved._local_tensors
        self._layout = moved._layout
        return self

    # -- construction from local data -----------------------------------------
    @classmethod
    def from_local_shards(
        cls,
        local_shards: list[Shard],
        *global_size: int | Sequence[int],
        process_group: ProcessGroup | None = None,
    ) -> ShardedTensor:
        """Assemble a ShardedTensor from every rank's blocks (collective on the group).

        Each rank passes its own blocks; the blocks of all ranks must tile the
        tensor. Errors (overlap, gap, mismatched dtypes or sizes across ranks,
        a block placed on another rank) are raised on every rank.
        """
        from dispatch_shard.creation import parse_size

        group = collectives.resolve_group(process_group)
        size = parse_size(global_size)
        rank = dist.get_rank()
        if not collectives.is_member(group, rank):
            if local_shards:  # they would be dropped silently
                raise ValueError(
                    f"from_local_shards: rank {rank} is not in the process group, but passed "
                    f"{len(local_shards)} local shard(s); a rank outside the group holds none"
                )
            return _empty_member(size, group, rank)
        local_error, summary = _summarize_local_shards(local_shards, size, rank)
        collectives.raise_if_any(local_error, group)
        summaries = (
            [summary] if dist.get_world_size(group) == 1
            else collectives.all_gather_object(summary, group)
        )
        ranks = collectives.group_ranks(group)
        spec, dtype, requires_grad = _check_global(summaries, size, ranks)
        layout = layout_of(spec, size, ranks)
        # Local tensors follow the layout's order of this rank's blocks.
        by_block = {s.metadata: s.tensor for s in local_shards}
        tensors = [by_block[layout.shards[i]] for i in layout.local_indices(rank)]
        device = tensors[0].device if tensors else _placement_device(layout)
        result = cls._wrap(tensors, layout, group, rank, dtype, device)
        if requires_grad:
            result.requires_grad_(True)
        return result

    _init_from_local_shards = from_local_shards  # the legacy name

    @classmethod
    def from_local_tensor(
        cls,
        local_tensor: torch.Tensor,
        spec: ShardingSpec,
        *global_size: int | Sequence[int],
        process_group: ProcessGroup | None = None,
    ) -> ShardedTensor:
        """A ShardedTensor whose one block on this rank is ``local_tensor``.

        ``spec`` places a single block per rank (or, for :class:`Replicate`
        and :class:`Partial`, every rank holds a full-size tensor). Shapes,
        dtypes and global sizes are checked across ranks; errors are raised
        on every rank. Inside :func:`~dispatch_shard.unchecked_creation` nothing is
        exchanged: this rank's block is still checked against the spec, and an error
        is raised on the rank that finds it only.
        """
        from dispatch_shard.creation import parse_size

        group = collectives.resolve_group(process_group)
        size = parse_size(global_size)
        rank = dist.get_rank()
        if not collectives.is_member(group, rank):
            return _empty_member(size, group, rank)
        error: Exception | None = None
        layout: Layout | None = None
        try:
            layout = layout_of(spec, size, collectives.group_ranks(group),
                               device=str(local_tensor.device))
            indices = layout.local_indices(rank)
            if len(indices) != 1:
                raise NotImplementedError(
                    f"from_local_tensor needs exactly one block per rank; spec {spec!r} "
                    f"places {len(indices)} on rank {rank}"
                )
            expected = layout.shards[indices[0]].shard_sizes
            if list(local_tensor.shape) != expected:
                raise ValueError(
                    f"Local tensor on rank {rank} has size {list(local_tensor.shape)}, but "
                    f"the spec places a block of size {expected} there"
                )
            if local_tensor.layout != torch.strided:
                raise ValueError(_STRIDED_ONLY)
            if not local_tensor.is_contiguous():
                raise ValueError(_CONTIGUOUS_ONLY)
        except (ValueError, NotImplementedError, TypeError) as exc:
            error = exc
        if collectives.creation_unchecked():  # (a batch wrapped every step: no exchange)
            if error is not None:
                raise error
        else:
            # One exchange: any rank's error, or global sizes / dtypes / specs that differ.
            collectives.agree("from_local_tensor", (
                ("global_size", tuple(size)), ("dtype", local_tensor.dtype),
                ("sharding_spec", spec)), error, group)
        assert layout is not None
        requires_grad = local_tensor.requires_grad
        result = cls._wrap([local_tensor.detach()], layout, group, rank, local_tensor.dtype,
                           local_tensor.device)
        if requires_grad:
            result.requires_grad_(True)
        return result

    _init_from_local_tensor = from_local_tensor  # the legacy name

    @classmethod
    def from_replicated(
        cls,
        tensor: torch.Tensor,
        spec: ShardingSpec,
        process_group: ProcessGroup | None = None,
    ) -> ShardedTensor:
        """``tensor``, which every rank already holds, laid out by ``spec``: each rank keeps
        copies of its own blocks. No communication and no check that the copies agree
        (use :func:`dispatch_shard.shard_tensor` to scatter from one rank instead)
        beyond one small all_gather that checks that the ranks passed the same spec,
        size and dtype (skipped inside :func:`dispatch_shard.unchecked_creation`).
        """
        group = collectives.resolve_group(process_group)
        rank = dist.get_rank()
        # NOTE [rank-consistent creation] in dispatch_shard.collectives
        def build() -> Layout:
            if tensor.layout != torch.strided:
                raise NotImplementedError(
                    f"dispatch_shard shards strided tensors only, not {tensor.layout}: "
                    "pass tensor.to_dense()")
            return layout_of(spec, tensor.shape, collectives.group_ranks(group),
                             device=str(tensor.device))

        layout = collectives.checked_creation(
            "from_replicated", (("sharding_spec", spec), ("size", tuple(tensor.shape)),
                                ("dtype", tensor.dtype), ("layout", str(tensor.layout))),
            group, build)
        source = tensor.detach()
        blocks = [source[layout.shard_box(i)].clone() for i in layout.local_indices(rank)]
        if layout.pending and blocks and layout.reduce_op == "sum":
            # One term of each sum holds the value, the others zero (a mean, a max, a
            # min of copies is the value: every term holds it).
            classes = layout.summand_classes()
            blocks = [b if classes[i] == 0 else b.zero_()
                      for b, i in zip(blocks, layout.local_indices(rank), strict=True)]
        result = cls._wrap(blocks, layout, group, rank, tensor.dtype, tensor.device)
        if tensor.requires_grad:
            result.requires_grad_(True)
        return result

    # -- torch.distributed.checkpoint: DCP's tensor-subclass protocol --------------
    # NOTE [ShardedTensors in DCP] in dispatch_shard.checkpoint
    def __create_write_items__(self, fqn: str, object: Any) -> list[Any]:
        from dispatch_shard.checkpoint import _create_write_items

        return _create_write_items(self, fqn)

    def __create_chunk_list__(self) -> list[Any]:
        from dispatch_shard.checkpoint import _create_chunk_list

        return _create_chunk_list(self)

    def __get_tensor_shard__(self, index: Any) -> torch.Tensor:
        from dispatch_shard.checkpoint import _get_tensor_shard

        return _get_tensor_shard(self, index)

    # -- tracing (torch.compile) ----------------------------------------------------
    # NOTE [ShardedTensor under torch.compile]
    # A traceable wrapper subclass: ``__tensor_flatten__`` names this rank's blocks
    # (``_block_0``...) and hands the layout, group, rank and dtype as the context.
    # Dynamo guards on that context (layouts are interned and compare by identity, and
    # deep-copy to themselves, so the guard is an identity check per tensor), and
    # AOTAutograd then runs ``__torch_dispatch__`` once, on fake blocks: the graph holds
    # the per-block aten ops and the functional collectives the layouts call for (NOTE
    # [collectives under torch.compile] in dispatch_shard.collectives). Every decision
    # of the dispatch code comes from layouts and shapes, so the trace is valid for
    # any values. A tangent that arrives in another layout than the trace assumed (a
    # replicated gradient for a partial output) is moved to it first.
    def __tensor_flatten__(self) -> tuple[list[str], Any]:
        if not _dynamo_skips[0]:
            _skip_in_dynamo()
        if _in_compiled_autograd():
            raise NotImplementedError(
                "dispatch_shard: compiled autograd (torch._dynamo.compiled_autograd) does not "
                "support ShardedTensor yet; run backward without it (torch.compile of the "
                "model and of the optimizer step works: see docs/compile.rst)")
        self._ready()
        names = [f"_block_{i}" for i in range(len(self._local_tensors))]
        return names, (self._layout, self._process_group, self._rank, self._dtype)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], context: Any,
                             outer_size: Any, outer_stride: Any) -> ShardedTensor:
        layout, group, rank, dtype = context
        blocks = [inner[f"_block_{i}"] for i in range(len(inner))]
        device = blocks[0].device if blocks else torch.device(layout.device or "cpu")
        return ShardedTensor._wrap(blocks, layout, group, rank, dtype, device)

    def __coerce_tangent_metadata__(self) -> ShardedTensor:
        # The tangent a trace assumes for a pending (Partial) output: its value layout.
        # Backward hands replicated gradients to such outputs, so the graph then needs
        # neither a move at each call nor a reduction of the tangent inside it.
        if not self._layout.pending:
            return self
        return self._redistributed(self._layout.value_layout().spec)

    def __coerce_same_metadata_as_tangent__(self, expected_metadata: Any,
                                            expected_type: Any = None) -> torch.Tensor | None:
        if expected_type is not None and expected_type is not ShardedTensor:
            # The trace saw a plain (replicated) tensor here: hand it the whole value.
            if expected_type is torch.Tensor:
                with torch.no_grad():
                    return self.full_tensor()
            return None
        layout = expected_metadata[0]
        if layout is self._layout:
            return self
        with torch.no_grad():
            return self._redistributed(layout.spec)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_block_"):
            return self._local_tensors[int(name[7:])]
        raise AttributeError(f"'ShardedTensor' object has no attribute '{name}'")

    # -- pickling ----------------------------------------------------------------
    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        self._ready()
        group = self._process_group
        state = _GroupState(
            local_rank=dist.get_rank(group),
            local_world_size=dist.get_world_size(group),
            global_rank=dist.get_rank(),
            global_world_size=dist.get_world_size(),
        )
        return (
            _rebuild_sharded_tensor,
            (list(self._local_tensors), self._layout.spec, tuple(self._layout.size),
             self._layout.device, self.dtype, self.requires_grad, state),
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardedTensor:
        self._ready()
        if id(self) in memo:
            return memo[id(self)]  # type: ignore[no-any-return]
        with torch.no_grad():
            result = self._like([t.clone() for t in self._local_tensors])
        result.requires_grad_(self.requires_grad)
        memo[id(self)] = result
        result.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return result


# NOTE [deep copies share the process group]
# A process group is a handle on a communicator: a copy of a ShardedTensor shares its
# group (as ``__deepcopy__`` above does), it cannot have a group of its own. DCP's
# ``async_save`` stages the state dict with its own deep copy, which copies a tensor
# subclass attribute by attribute (``__slots__`` included) instead of calling its
# ``__deepcopy__``, and so meets the ProcessGroup itself, which has no way to be
# copied. Deep copies of a ProcessGroup (``copy.deepcopy`` and DCP's stager both ask
# ``__deepcopy__`` first) therefore return the group itself. Pickling a ProcessGroup
# still fails, as it should.
def _share_process_group(group: ProcessGroup, memo: dict[int, Any]) -> ProcessGroup:
    return group


if not hasattr(ProcessGroup, "__deepcopy__"):
    ProcessGroup.__deepcopy__ = _share_process_group  # type: ignore[attr-defined]


# NOTE [plain operands with lazy conjugates]
# torch resolves a plain operand's lazy conjugate (or negative) bit before most ops reach
# ``__torch_dispatch__``, but hands it through to the ops whose kernels read the bit
# themselves (the BLAS products, ``copy_``). Ours run on blocks with those keys excluded
# (NOTE [no lazy conjugate blocks] in dispatch_shard.ops.complex), where ``add_`` of such
# an operand (``addmm``'s bias) would read its stored values: those ops get it resolved.
_aten = torch.ops.aten
# (by id: NOTE [the dispatch loop's table is keyed by id] in dispatch_shard.registry)
_LAZY_VIEW_AWARE = frozenset(id(op) for op in (
    _aten.mm.default, _aten.addmm.default, _aten.addmm_.default, _aten.bmm.default,
    _aten.baddbmm.default, _aten.baddbmm_.default, _aten.dot.default, _aten.vdot.default,
    _aten.mv.default, _aten.addmv.default, _aten.copy_.default))


def _resolved_plain(value: Any) -> Any:
    if type(value) is torch.Tensor and (value.is_conj() or value.is_neg()):
        return value.resolve_conj().resolve_neg()
    return value


def _resolved(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """``blocks`` with torch's lazy conjugate and negative bits resolved (copies where set).

    NOTE [no lazy conjugate blocks] in :mod:`dispatch_shard.ops.complex`: below the
    dispatch, torch's Conjugate and Negative keys are excluded, so an op on a block with
    such a bit would read its stored values. Blocks that enter from outside (``x.conj()``
    of a dense tensor, sliced) are resolved once, here."""
    return [t.resolve_conj().resolve_neg() for t in blocks]


def _dispatch(func: torch._ops.OpOverload, types: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
    """The dispatch loop: the registered implementation of ``func``, called."""
    entry = DISPATCH_TABLE.get(id(func))  # NOTE [the dispatch loop's table is keyed by id]
    try:
        if entry is None:
            impl = lookup(func)  # (an op served by its packet, or by a late family)
        else:
            impl, group_free = entry
            if group_free and not _OBSERVERS:
                # NOTE [implementations that find their own group]
                return impl(types, args, kwargs, None)
        if not _OBSERVERS:
            return impl(types, args, kwargs, _first_group(args, func))
        return _observed_dispatch(func, impl, types, args, kwargs)
    except collectives.CollectiveError as error:
        error.add_op(func)  # NOTE [collective timeouts] in dispatch_shard.collectives
        raise


def _observed_dispatch(
    func: torch._ops.OpOverload, impl: Any, types: Any, args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The dispatch loop while an observer is active (``count_collectives``, debug mode):
    keeps the op stack and runs the checks of :mod:`dispatch_shard.debug` first."""
    stack = collectives._op_stack
    stack.append(func)  # for dispatch_shard.observe.count_collectives
    try:
        group = _first_group(args, func)
        if len(stack) == 1:
            for check in collectives._op_checks:
                check(func, args, kwargs)
        return impl(types, args, kwargs, group)
    finally:
        stack.pop()


# NOTE [Dynamo never traces the dispatch code]
# Code that runs while a compiled function runs (after a graph break, say in an
# optimizer step) is itself handed to Dynamo, frame by frame; our ``__torch_dispatch__``
# is such a frame when a dense op meets a ShardedTensor there. Its code object, and
# every frame under it, is marked to run as plain Python: the dispatch code is traced
# by AOTAutograd (below Dynamo, on fake blocks), never by Dynamo. The mark is set when
# Dynamo first flattens a ShardedTensor (importing torch._dynamo ourselves would cost
# every user a second and a half), and costs nothing per call.
_dynamo_skips = [False]


def _skip_in_dynamo() -> None:
    import sys

    if "torch._dynamo" not in sys.modules:
        return
    from torch._dynamo import eval_frame, types

    code = ShardedTensor.__torch_dispatch__.__func__.__code__  # type: ignore[attr-defined]
    skip = types.FrameAction.SKIP  # type: ignore[attr-defined]
    eval_frame.set_code_exec_strategy(  # type: ignore[attr-defined]
        code, types.FrameExecStrategy(skip, skip))  # type: ignore[attr-defined]
    _dynamo_skips[0] = True


# NOTE [a plain tangent for a sharded output]
# When a compiled graph returns several outputs and backward reaches only some, autograd
# hands the others a plain zero tensor; AOTAutograd then asks that tensor to become the
# ShardedTensor the trace assumed (``__coerce_same_metadata_as_tangent__``), and a plain
# tensor has no such method, so the backward failed (a Hugging Face Llama under
# torch.compile does this). torch.Tensor gets one that answers only for ShardedTensor:
# the plain value is a replicated one (the same on every rank), laid out as expected
# with no communication for a replicated, split or partial target. Asked for any other
# type it declines, as the missing method did, so other subclasses see no change.

def _in_compiled_autograd() -> bool:
    """Whether torch's compiled autograd is tracing a backward (read only while tracing)."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    return module is not None and bool(module.in_compiled_autograd_region)


def _plain_tangent_as_sharded(self: torch.Tensor, expected_metadata: Any,
                              expected_type: Any = None) -> torch.Tensor | None:
    if expected_type is not ShardedTensor or type(self) is not torch.Tensor:
        return None
    _, group, _, dtype = expected_metadata
    with torch.no_grad(), collectives.unchecked_creation():
        value = ShardedTensor.from_replicated(self.to(dtype), Replicate(), group)
        return value.__coerce_same_metadata_as_tangent__(expected_metadata, ShardedTensor)


if not hasattr(torch.Tensor, "__coerce_same_metadata_as_tangent__"):
    torch.Tensor.__coerce_same_metadata_as_tangent__ = _plain_tangent_as_sharded  # type: ignore[attr-defined]


# NOTE [process groups released at exit]
# A process group that destroy_process_group() removed, but that something still
# references, is destroyed only when the interpreter finalizes; gloo's worker threads
# then try to take the GIL and the process aborts ("terminate called without an active
# exception", about one exit in three; plain torch holding the default group does the
# same). ShardedTensors hold their group, so a tensor still alive at exit (a module-level
# one) would do this. Our last exit hook (registered at import, so it runs after the
# user's) finds the live ShardedTensors once and drops their groups while the
# interpreter is whole, as a del before destroy_process_group would have.

def _release_groups_at_exit() -> None:
    if dist.is_available() and dist.is_initialized():
        return  # the groups are still in use: torch tears them down itself
    import gc

    for obj in gc.get_objects():
        if type(obj) is ShardedTensor:
            obj._process_group = None  # type: ignore[assignment]
    collectives._subgroups.clear()
    collectives._given_subgroups.clear()
    grad_reduction.release()


atexit.register(_release_groups_at_exit)


# The C-level descriptor behind Tensor.requires_grad, read by our property override.
_REQUIRES_GRAD: Any = vars(torch._C.TensorBase)["requires_grad"]


def _grad_to_leaf_layout(leaf: torch.Tensor) -> None:
    """See NOTE [a leaf's grad keeps the leaf's layout]. Also dense autograd's layout
    contract, block by block: a gradient's blocks are contiguous like the leaf's (some
    fused optimizer kernels silently miscompute on strided gradients)."""
    grad = leaf.grad
    if not isinstance(leaf, ShardedTensor) or grad is None:
        return
    if not isinstance(grad, ShardedTensor):
        # A derivative formula built a plain tensor (torch's cat backward does, with
        # at::zeros, for an empty 1-D input): a replicated value, cut to the leaf's blocks.
        # (the same global formula ran on every rank: no argument check needed)
        with torch.no_grad(), collectives.unchecked_creation():
            leaf.grad = ShardedTensor.from_replicated(grad, leaf._layout.spec,
                                                      leaf._process_group)
        return
    layout = leaf._layout
    if grad._layout is not layout:
        if grad._layout.same_blocks(layout):
            # The same value, block for block (on one rank, a whole block and the
            # replicated layout): relaid out in place, no new tensor and no .grad write.
            grad._layout = layout
        else:
            with torch.no_grad():
                if grad._layout.pending:
                    if grad_reduction.offer(leaf, grad):
                        return  # reduced in a bucket, during the rest of backward
                    grad_reduction.agree_alone(leaf, grad)
                moved = grad._redistributed(layout.spec)
                if getattr(grad, "_leaf_grad", False):  # a kept gradient: the same object
                    grad._local_tensors, grad._layout = moved._local_tensors, moved._layout
                    grad_reduction._restore_kept(grad)
                else:
                    leaf.grad = grad = moved
    blocks = grad._local_tensors
    if not all(b.is_contiguous() for b in blocks):
        grad._local_tensors = [b.contiguous() for b in blocks]
    # (NOTE [a kept gradient takes the pending one] in dispatch_shard.grad_reduction)
    grad._leaf_grad = True


def _torch_function_with_registry(
    cls: type, func: Any, types: Any, args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    impl = TORCH_FUNCTIONS.get(func)
    if impl is not None:
        return impl(types, args, kwargs or {}, _first_group(args, func))
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **(kwargs or {}))


def _switch_torch_function(enabled: bool) -> None:
    handler: Any = (
        classmethod(_torch_function_with_registry) if enabled
        else torch._C._disabled_torch_function_impl
    )
    setattr(ShardedTensor, "__torch_function__", handler)  # noqa: B010 - typed as a method


_on_torch_function_table_change(_switch_torch_function)

# NOTE [optimizers take their foreach path]
# torch.optim and clip_grad_norm_ default to their foreach (multi-tensor) kernels only
# for tensor types on these lists (DTensor adds itself too). The foreach family is
# served block by block (ops/foreach.py), one dispatch per list instead of one per
# tensor, so an AdamW step costs about a dozen dispatches, not a dozen per parameter.
# The optimizers' default also asks for a device with foreach kernels, and CPU is not
# one (for dense CPU tensors the for-loop is as fast); so on CPU a ShardedTensor step
# took the for-loop path, about nine dispatches per parameter (an 8-layer MLP's AdamW
# step: 128 dispatches, 2.9 ms where the foreach path takes 2.0). A global step hook
# (torch's public one) therefore asks for the foreach path, for that step only, in
# every param group that left the choice to torch (``foreach=None``, not fused, not
# differentiable, no Tensor ``lr`` without ``capturable``) and whose parameters are
# all ShardedTensors; the group's setting reads None again after the step.
#
# Adam and AdamW have a fused kernel on CPU too (``fused=True``): one dispatch and one
# pass over the state per step where the foreach path makes about ten and allocates the
# denominators of every parameter at once (the 8-layer MLP's step: 0.8 ms, against 1.9
# for the foreach path and 1.5 for dense's for-loop). Where such a group also left
# ``fused`` to torch (None) and its parameters are floating point, on devices with fused
# kernels, the hook asks for the fused kernel instead, for that step only. Its arithmetic
# is the same formula in another order: parameters differ from the for-loop's by float
# rounding (about 1e-7 after 80 AdamW steps), as torch's own fused and for-loop paths do.
for _types in (torch_optimizer._foreach_supported_types,
               torch_foreach_utils._foreach_supported_types):
    if ShardedTensor not in _types:
        _types.append(ShardedTensor)

# The param groups set to foreach or fused for the step now running, per optimizer (by
# id), with the key set.
_foreach_for_step: dict[int, list[tuple[dict[str, Any], str]]] = {}
# The optimizers whose fused CPU kernel the hook may choose (NOTE above).
_FUSED_BY_DEFAULT = (torch.optim.Adam, torch.optim.AdamW)


def _fused_fits(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``group`` (every parameter a ShardedTensor) may take the fused kernel."""
    if type(optimizer) not in _FUSED_BY_DEFAULT or group.get("fused", False) is not None:
        return False
    devices = torch_foreach_utils._get_fused_kernels_supported_devices()
    return all(p.dtype.is_floating_point and p.device.type in devices
               and (p.grad is None or not p.grad.is_sparse) for p in group["params"])


def _default_groups_to_foreach(optimizer: torch.optim.Optimizer, args: Any,
                               kwargs: Any) -> None:
    forced = []
    for group in optimizer.param_groups:
        if ("foreach" in group and group["foreach"] is None and not group.get("fused")
                and not group.get("differentiable")
                and not (isinstance(group.get("lr"), torch.Tensor)
                         and not group.get("capturable"))
                and group["params"]
                and all(type(p) is ShardedTensor for p in group["params"])):
            key = "fused" if _fused_fits(optimizer, group) else "foreach"
            group[key] = True
            forced.append((group, key))
    if forced:
        _foreach_for_step[id(optimizer)] = forced


def _restore_groups_after_step(optimizer: torch.optim.Optimizer, args: Any,
                               kwargs: Any) -> None:
    for group, key in _foreach_for_step.pop(id(optimizer), ()):
        group[key] = None


if not getattr(torch_optimizer, "_dispatch_shard_foreach_hooks", False):
    torch_optimizer.register_optimizer_step_pre_hook(_default_groups_to_foreach)
    torch_optimizer.register_optimizer_step_post_hook(_restore_groups_after_step)
    torch_optimizer._dispatch_shard_foreach_hooks = True  # type: ignore[attr-defined]


# -- helpers ----------------------------------------------------------------------

def _placement_device(layout: Layout) -> torch.device:
    if layout.device:
        return torch.device(layout.device)
    placement = layout.shards[0].placement if layout.shards else None
    return placement.device() if placement is not None else torch.device("cpu")


def _empty_member(size: torch.Size, group: ProcessGroup, rank: int) -> ShardedTensor:
    """What a rank outside ``group`` holds: the size, no blocks."""
    layout = layout_of(Replicate(), size, collectives.group_ranks(group))
    return ShardedTensor._wrap([], layout, group, rank, torch.get_default_dtype(),
                               torch.device("cpu"))


def _single_block_layout(layout: Layout, rank: int) -> Layout:
    device = layout.device or str(_placement_device(layout))
    block = ShardMetadata([0] * len(layout.size), list(layout.size), f"rank:{rank}/{device}")
    return layout.with_spec(EnumerableShardingSpec([block]))


def _to_partial(tensor: ShardedTensor, dst: Layout) -> list[torch.Tensor]:
    """This rank's summand of ``tensor`` as a partial of ``dst``'s reduce op (local only,
    but for the move of an N-D layout's value)."""
    op = dst.reduce_op
    assert op is not None
    rank, group = tensor._rank, tensor._process_group
    if not collectives.is_member(group, rank):
        return []
    if dst.is_mesh or tensor._layout.is_mesh:
        # The value in the layout with the partial mesh dims replicated; then the first
        # term of each reduction keeps it and the others hold the identity (for sum).
        value_layout = dst.value_layout()
        value = tensor._reduced()
        blocks = value._moved_to(value_layout) if value._layout is not value_layout \
            else [b.clone() for b in value._local_tensors]
        classes = dst.summand_classes()
        return [b if op != "sum" or classes[i] == 0 else b.zero_()
                for b, i in zip(blocks, dst.local_indices(rank), strict=True)]
    value = tensor._reduced()
    if value._layout.is_replicate:
        local = value._local_tensors[0]
        keep = op in ("max", "min", "avg") or rank == value._layout.group_ranks[0]
        return [local.clone() if keep else torch.zeros_like(local)]
    # Elements this rank holds no block of get the reduction's identity (0 for sum and
    # avg, the lowest value for max, the highest for min), so other ranks' values win.
    summand = torch.full(tuple(tensor.shape), _identity(op, tensor.dtype), dtype=tensor.dtype,
                         device=tensor.device)
    for block, index in zip(value._local_tensors, value._layout.local_indices(rank), strict=True):
        summand[value._layout.shard_box(index)] = block
    if op == "avg":
        summand.mul_(len(value._layout.group_ranks))
    return [summand]


def _identity(op: str, dtype: torch.dtype) -> bool | int | float:
    """The identity element of the reduction ``op`` (sum, avg, max, min) for ``dtype``."""
    if op in ("sum", "avg"):
        return False if dtype == torch.bool else 0
    highest = op == "min"
    if dtype == torch.bool:
        return highest
    if dtype.is_complex:
        raise NotImplementedError(f"Partial({op!r}) of a complex tensor is not supported")
    if dtype.is_floating_point:
        return float("inf") if highest else float("-inf")
    info = torch.iinfo(dtype)
    return info.max if highest else info.min


class _FullTensor(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: ShardedTensor) -> torch.Tensor:
        ctx.source = tensor
        value = tensor._reduced() if tensor._layout.is_partial else tensor
        if value._layout.is_replicate:
            blocks = value._local_tensors
            return blocks[0].clone() if blocks else torch.empty(tensor.shape, dtype=tensor.dtype)
        dst = value._layout.with_spec(Replicate())
        blocks = value._moved_to(dst)
        return blocks[0] if blocks else torch.empty(tensor.shape, dtype=tensor.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> ShardedTensor:
        # The gradient is the same dense tensor on every rank: each block is a slice.
        source: ShardedTensor = ctx.source
        layout = source._layout.value_layout()
        blocks = [grad[layout.shard_box(i)].contiguous()
                  for i in layout.local_indices(source._rank)]
        return source._like(blocks, layout, grad.dtype)


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: ShardedTensor, spec: ShardingSpec) -> ShardedTensor:
        # d(sum of summands)/d(summand) is the whole gradient: a pending source's
        # gradient takes the layout of its value.
        ctx.source_spec = tensor._layout.value_layout().spec
        return tensor._redistributed(spec)

    @staticmethod
    def backward(ctx: Any, grad: ShardedTensor) -> tuple[ShardedTensor, None]:
        return grad._redistributed(ctx.source_spec), None


# -- from_local_shards validation ------------------------------------------------

_STRIDED_ONLY = "Only torch.strided layout is currently supported"
_CONTIGUOUS_ONLY = "Only torch.contiguous_format memory_format is currently supported"


def _summarize_local_shards(
    local_shards: list[Shard], size: torch.Size, rank: int
) -> tuple[Exception | None, Any]:
    """This rank's facts for the global check, or the local error found."""
    try:
        dtypes = {s.tensor.dtype for s in local_shards}
        grads = {s.tensor.requires_grad for s in local_shards}
        devices = {s.tensor.device for s in local_shards}
        for prop, values in (("dtype", dtypes), ("requires_grad", grads), ("device", devices)):
            if len(values) > 1:
                raise ValueError(
                    f"Local shards' tensor {prop} property need to be the same on rank:{rank}! "
                    f"Found {sorted(map(str, values))}."
                )
        for shard in local_shards:
            placement = shard.metadata.placement
            if placement is None or placement.rank() != rank:
                raise ValueError(
                    "Local shard metadata's rank does not match with process group's "
                    f"current rank! Found current rank: {rank}, local ShardMetadata "
                    f"placement: {placement}"
                )
            if shard.tensor.layout != torch.strided:
                raise ValueError(_STRIDED_ONLY)
            if not shard.tensor.is_contiguous():
                raise ValueError(_CONTIGUOUS_ONLY)
            if len(shard.metadata.shard_offsets) != len(size):
                raise ValueError(
                    f"Shard {shard.metadata} has {len(shard.metadata.shard_offsets)} dims, "
                    f"but the global size {list(size)} has {len(size)}"
                )
    except ValueError as exc:
        return exc, None
    summary = (
        tuple(size),
        [s.metadata for s in local_shards],
        next(iter(dtypes)) if dtypes else None,
        next(iter(grads)) if grads else None,
        next(iter(devices)).type if devices else None,  # ranks may use different GPUs
    )
    return None, summary


def _check_same(facts: list[tuple[Any, ...]], names: list[str], ranks: Sequence[int]) -> None:
    for position, name in enumerate(names):
        first = None
        for rank, fact in zip(ranks, facts, strict=True):
            value = fact[position]
            if value is None:
                continue
            if first is None:
                first = (rank, value)
            elif value != first[1]:
                raise ValueError(
                    f"ShardedTensor {name} property does not match from different ranks! "
                    f"Found {name}={first[1]} on rank:{first[0]}, and {name}={value} on "
                    f"rank:{rank}."
                )


def _check_global(
    summaries: list[Any], size: torch.Size, ranks: tuple[int, ...]
) -> tuple[ShardingSpec, torch.dtype, bool]:
    _check_same([(s[0], s[2], s[3], s[4]) for s in summaries],
                ["global_size", "dtype", "requires_grad", "device type"], ranks)
    shards = [m for s in summaries for m in s[1]]
    if not shards:
        raise ValueError("from_local_shards: no rank holds a shard")
    spec = infer_spec(shards)
    # Validates bounds/coverage against the global size (the same on every rank).
    layout_of(spec, size, ranks)
    dtype = next((s[2] for s in summaries if s[2] is not None), torch.get_default_dtype())
    requires_grad = any(s[3] for s in summaries if s[3] is not None)
    return spec, dtype, requires_grad


def infer_spec(shards: list[ShardMetadata]) -> ShardingSpec:
    """A :class:`ChunkShardingSpec` when the blocks are ``torch.chunk`` blocks, else enumerable."""
    spec = EnumerableShardingSpec(shards)  # validates overlap and gaps
    ndim = len(shards[0].shard_offsets)
    for dim in range(ndim):
        if any(s.shard_offsets[d] != 0 for s in shards for d in range(ndim) if d != dim):
            continue
        ordered = sorted(shards, key=lambda s: s.shard_offsets[dim])
        length = sum(s.shard_sizes[dim] for s in ordered)
        chunk = ChunkShardingSpec(dim, [s.placement for s in ordered])  # type: ignore[misc]
        full = [length if d == dim else ordered[0].shard_sizes[d] for d in range(ndim)]
        candidate = chunk.build_metadata(full, TensorProperties(),
                                         tuple(sorted({s.placement.rank() for s in shards})))  # type: ignore[union-attr]
        if candidate.shards_metadata == ordered:
            return chunk
    return spec


# -- pickling --------------------------------------------------------------------

class _GroupState:
    __slots__ = ("global_rank", "global_world_size", "local_rank", "local_world_size")

    def __init__(self, local_rank: int, local_world_size: int, global_rank: int,
                 global_world_size: int) -> None:
        self.local_rank = local_rank
        self.local_world_size = local_world_size
        self.global_rank = global_rank
        self.global_world_size = global_world_size

    def __getstate__(self) -> tuple[int, int, int, int]:
        return (self.local_rank, self.local_world_size, self.global_rank,
                self.global_world_size)

    def __setstate__(self, state: tuple[int, int, int, int]) -> None:
        (self.local_rank, self.local_world_size, self.global_rank,
         self.global_world_size) = state


_load_group = threading.local()


@contextlib.contextmanager
def load_with_process_group(process_group: ProcessGroup) -> Iterator[ProcessGroup]:
    """Unpickled ShardedTensors inside this block belong to ``process_group``."""
    if getattr(_load_group, "group", None) is not None:
        raise RuntimeError("ProcessGroup already set by previous load_with_process_group")
    _load_group.group = process_group
    try:
        yield process_group
    finally:
        _load_group.group = None


def _rebuild_sharded_tensor(
    local_tensors: list[torch.Tensor],
    spec: ShardingSpec,
    size: tuple[int, ...],
    device: str,
    dtype: torch.dtype,
    requires_grad: bool,
    state: _GroupState,
) -> ShardedTensor:
    group = getattr(_load_group, "group", None)
    group = collectives.resolve_group(group)
    local_rank = dist.get_rank(group)
    if local_rank != state.local_rank:
        raise RuntimeError(
            f"Local rank at save time was {state.local_rank}, but at load time was {local_rank}"
        )
    world = dist.get_world_size(group) if local_rank >= 0 else -1
    if world != state.local_world_size:
        raise RuntimeError(
            f"Local world size at save time was {state.local_world_size}, but at load time "
            f"was {world}"
        )
    rank = dist.get_rank()
    layout = layout_of(spec, torch.Size(size), collectives.group_ranks(group), device)
    dev = local_tensors[0].device if local_tensors else _placement_device(layout)
    result = ShardedTensor._wrap(local_tensors, layout, group, rank, dtype, dev)
    if requires_grad:
        result.requires_grad_(True)
    return result
