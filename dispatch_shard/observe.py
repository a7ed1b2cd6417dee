"""Seeing what a ShardedTensor does: who holds which block, and what it communicates.

- :func:`visualize_sharding`: a text table of the blocks and the ranks holding them.
- :func:`sharding_svg`: the same as a picture (used for the docs' layout pictures).
- :class:`count_collectives`: a context manager recording each collective that
  dispatch_shard issues: its kind, bytes and the op that caused it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from dispatch_shard import collectives, grad_reduction
from dispatch_shard.layout import Layout
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import ChunkShardingSpec, EnumerableShardingSpec

__all__ = ["CollectiveEvent", "count_collectives", "sharding_svg", "visualize_sharding"]


# -- the table ---------------------------------------------------------------------------

def _describe(layout: Layout) -> str:
    ranks = layout.group_ranks
    group = f"ranks {ranks[0]}-{ranks[-1]}" if list(ranks) == list(
        range(ranks[0], ranks[-1] + 1)) and len(ranks) > 1 else f"ranks {list(ranks)}"
    if layout.is_replicate:
        return f"{group} (replicated)"
    return f"{group} (partial {layout.spec.reduce_op})"  # type: ignore[attr-defined]


def _spec_text(layout: Layout) -> str:
    from dispatch_shard.mesh import remembered_mesh

    found = remembered_mesh(layout)
    if found is not None:  # made over a device mesh: say so in its own words
        mesh, placements = found
        names = f" {mesh.mesh_dim_names}" if mesh.mesh_dim_names else ""
        shown = ", ".join(str(p) for p in placements)
        return f"mesh {tuple(mesh.shape)}{names} placements [{shown}]"
    spec = layout.spec
    if isinstance(spec, ChunkShardingSpec):
        ranks = [p.rank() for p in spec.placements]
        return f"chunked along dim {spec.dim} over ranks {ranks}"
    if isinstance(spec, EnumerableShardingSpec):
        return f"{len(layout.shards)} enumerated blocks"
    return repr(spec)


def _cuts(layout: Layout, dim: int) -> list[int]:
    points = {0, layout.size[dim]}
    for shard in layout.shards:
        if 0 not in shard.shard_sizes:
            points.add(shard.shard_offsets[dim])
            points.add(shard.shard_offsets[dim] + shard.shard_sizes[dim])
    return sorted(points)


def _holders(layout: Layout, index: tuple[int, ...]) -> str:
    ranks = []
    for shard in layout.shards:
        inside = all(o <= i < o + n for i, o, n in
                     zip(index, shard.shard_offsets, shard.shard_sizes, strict=True))
        if inside and shard.placement is not None:
            ranks.append(shard.placement.rank())
    # Copies are listed with commas; terms of a pending reduction (an N-D layout's
    # partial mesh dims) are joined with its operator.
    joint = f" {'+' if layout.reduce_op in ('sum', 'avg') else layout.reduce_op} " \
        if layout.pending else ", "
    return joint.join(f"rank {r}" for r in ranks) or "-"


def visualize_sharding(tensor: ShardedTensor, *, show: bool = True) -> str:
    """A table of ``tensor``'s blocks and the ranks that hold them; returned on every rank,
    and printed (unless ``show=False``) once, by the first rank of the tensor's group.

    1-D and 2-D tensors are drawn as a grid of the blocks' boundaries (a rank with
    several blocks appears in several cells; a block with several holders lists them,
    joined by ``+`` where they hold terms of a pending sum); other ranks list their
    blocks.
    Needs no communication: the layout is known on every rank.
    """
    layout = tensor._layout
    size = list(layout.size)
    title = (f"{type(tensor).__name__} {'x'.join(map(str, size)) or 'scalar'} "
             f"{str(tensor.dtype).replace('torch.', '')}, {_spec_text(layout)}")
    if layout.is_replicate:
        text = f"{title}\n{_describe(layout)} hold the whole tensor"
    elif layout.is_partial:
        text = f"{title}\n{_describe(layout)} each hold a full-size summand"
    elif len(size) in (1, 2):
        rows_cuts = _cuts(layout, 0) if len(size) == 2 else [0, 1]
        cols_cuts = _cuts(layout, len(size) - 1)
        header = ["", *(f"[{a}:{b}]" for a, b in itertools.pairwise(cols_cuts))]
        table = [header]
        for top, bottom in itertools.pairwise(rows_cuts):
            label = f"[{top}:{bottom}]" if len(size) == 2 else ""
            cells = []
            for left in cols_cuts[:-1]:
                index = (top, left) if len(size) == 2 else (left,)
                cells.append(_holders(layout, index))
            table.append([label, *cells])
        widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                 for row in table]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        text = title + "\n" + "\n".join(lines)
    else:
        entries = [
            f"rank {s.placement.rank() if s.placement else '?'}: "
            + " x ".join(f"[{o}:{o + n}]" for o, n in zip(s.shard_offsets, s.shard_sizes,
                                                         strict=True))
            for s in layout.shards if 0 not in s.shard_sizes
        ]
        text = title + "\n" + "\n".join(entries)
    if show and _prints_here(layout):
        print(text)
    return text


def _prints_here(layout: Layout) -> bool:
    """One rank prints: the first of the tensor's group (every rank has the same text)."""
    if not dist.is_initialized():
        return True
    return dist.get_rank() == min(layout.group_ranks, default=dist.get_rank())


# -- the picture ---------------------------------------------------------------------------

_COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948",
           "#9c755f"]


def sharding_svg(tensor: ShardedTensor, cell: int = 24) -> str:
    """An SVG picture of a 1-D or 2-D ``tensor``'s blocks, coloured by rank."""
    layout = tensor._layout
    size = list(layout.size)
    if len(size) not in (1, 2):
        raise ValueError(f"sharding_svg draws 1-D and 2-D tensors, not {len(size)}-D")
    rows_, cols_ = (size if len(size) == 2 else [1, size[0]])
    width, height = cols_ * cell + 2, rows_ * cell + 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="{cell // 2}">']
    blocks = [(0, 0, rows_, cols_, ", ".join(map(str, layout.group_ranks)),
               layout.group_ranks[0])] if not layout.is_sharded else []
    for shard in layout.shards if layout.is_sharded else []:
        if 0 in shard.shard_sizes or shard.placement is None:
            continue
        offsets = shard.shard_offsets if len(size) == 2 else [0, *shard.shard_offsets]
        sizes = shard.shard_sizes if len(size) == 2 else [1, *shard.shard_sizes]
        rank = shard.placement.rank()
        blocks.append((offsets[0], offsets[1], sizes[0], sizes[1], str(rank), rank))
    for top, left, h, w, label, rank in blocks:
        x, y = left * cell + 1, top * cell + 1
        color = _COLORS[rank % len(_COLORS)]
        parts.append(f'<rect x="{x}" y="{y}" width="{w * cell}" height="{h * cell}" '
                     f'fill="{color}" fill-opacity="0.75" stroke="#222" stroke-width="1"/>')
        parts.append(f'<text x="{x + w * cell / 2}" y="{y + h * cell / 2}" '
                     f'text-anchor="middle" dominant-baseline="middle">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# -- the collective counter --------------------------------------------------------------

@dataclass(frozen=True)
class CollectiveEvent:
    """One collective: its kind, the bytes this rank sent, and the ops that caused it
    (``op``: the op the user called or, for a collective issued outside any op, the
    dispatch_shard function that issued it, such as ``"ShardedTensor.full_tensor"`` or
    ``"_create"`` (``"(outside any op)"`` if none is found); ``primitive``: the op that
    issued it inside a decomposition, or ``None`` outside any op; ``ranks``: the global
    ranks of the process group it ran on, a mesh dim's sub-group for most moves
    between N-D layouts)."""

    kind: str
    nbytes: int
    op: str
    primitive: str | None
    ranks: tuple[int, ...] = ()


@dataclass
class count_collectives(contextlib.AbstractContextManager["count_collectives"]):
    """Record every collective dispatch_shard issues inside the ``with`` block::

        with count_collectives() as counted:
            loss = model(x).sum()
        counted.counts  # Counter({'all_reduce': 1})
        counted.events  # [CollectiveEvent(kind='all_reduce', op='aten.add.Tensor', ...)]

    Counts are this rank's. Counters may nest.

    Gradients reduced in buckets during backward (:mod:`dispatch_shard.grad_reduction`)
    are also timed, per bucket waited for inside the block: :attr:`reduction_s` (from
    launch until the bucket was seen complete), :attr:`reduction_exposed_s` (the time
    spent blocked waiting for it) and :attr:`reduction_hidden_s` (the rest: reduction
    time that overlapped backward or the optimizer).
    """

    events: list[CollectiveEvent] = field(default_factory=list)
    # Per bucket waited for: (seconds from launch to seen complete, seconds blocked).
    reductions: list[tuple[float, float]] = field(default_factory=list)

    def __enter__(self) -> count_collectives:
        collectives._observers.append(self._observe)
        grad_reduction.wait_observers.append(self._observe_wait)
        return self

    def __exit__(self, *exc: Any) -> None:
        collectives._observers.remove(self._observe)
        grad_reduction.wait_observers.remove(self._observe_wait)

    def _observe_wait(self, span: float, blocked: float) -> None:
        self.reductions.append((span, blocked))

    @property
    def reduction_s(self) -> float:
        """Seconds the bucketed gradient reductions took, launch to completion (each
        completion is seen at the next gradient hook or wait, so an upper bound)."""
        return sum(span for span, _ in self.reductions)

    @property
    def reduction_exposed_s(self) -> float:
        """Seconds spent blocked waiting for bucketed gradient reductions."""
        return sum(blocked for _, blocked in self.reductions)

    @property
    def reduction_hidden_s(self) -> float:
        """Seconds of bucketed gradient reduction that overlapped other work."""
        return max(0.0, self.reduction_s - self.reduction_exposed_s)

    def _observe(self, kind: str, nbytes: int, group: Any) -> None:
        stack = collectives._op_stack
        if stack:
            op, primitive = str(stack[0]), str(stack[-1])
        else:  # walk the stack only here, outside any op
            op, primitive = collectives._entry_point() or "(outside any op)", None
        ranks = collectives.group_ranks(group) if isinstance(group, collectives.ProcessGroup) \
            else ()
        self.events.append(CollectiveEvent(kind, nbytes, op, primitive, ranks))

    @property
    def counts(self) -> Counter[str]:
        """How many collectives of each kind."""
        return Counter(event.kind for event in self.events)

    @property
    def nbytes(self) -> int:
        """Bytes this rank sent; for an all-reduce, the size of the buffer reduced."""
        return sum(event.nbytes for event in self.events)

    def by_op(self) -> Counter[tuple[str, str]]:
        """How many collectives of each kind each user-level op caused, keyed by
        ``(op, kind)``; ``op`` is as in :class:`CollectiveEvent` (an aten op, or the
        dispatch_shard function that issued a collective outside any op)."""
        return Counter((event.op, event.kind) for event in self.events)
