"""Draw the docs' layout pictures from real layouts, with the code that makes each.

Run with ``python tools/layout_pictures.py`` after changing a layout or how layouts
are drawn. On 4 gloo ranks it runs each picture's constructor code below, reads the
blocks of the tensor it makes from :meth:`~dispatch_shard.ShardedTensor.metadata`
(public, the same on every rank) and writes

- ``docs/_static/layouts/<name>.svg``: the picture, with its dims, index ranges and
  holders labelled; copies of a block (replicated over a mesh dim) are drawn side by
  side in solid colours, terms of a pending sum (Partial) hatched and joined by ``+``;
- ``docs/layouts/<page>.inc``: for each picture on that page, the code beside the
  picture, with alt text, included by ``docs/concepts.rst`` and ``docs/meshes.rst``.

Both are committed, so the docs build needs no process group.
"""

from __future__ import annotations

import html
import pathlib
import sys
from dataclasses import dataclass
from typing import Any

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
SVG_DIR = DOCS / "_static" / "layouts"
INC_DIR = DOCS / "layouts"
WORLD = 4

# The code each picture shows; it runs as written on every rank (``ds``, ``torch``,
# ``init_device_mesh`` and DTensor's ``Shard``, ``Replicate``, ``Partial`` are imported).
ROWS = 'ranks = [f"rank:{r}/cpu" for r in range(4)]\n'
MESH = ('names = ("dp", "tp")\n'
        'mesh = init_device_mesh("cpu", (2, 2),\n'
        '                        mesh_dim_names=names)\n')


def _on_mesh(placements: str) -> str:
    return (MESH + f"placements = [{placements}]\n"
            "x = ds.distribute_tensor(torch.zeros(10, 7),\n"
            "                         mesh, placements)")


@dataclass(frozen=True)
class Picture:
    name: str
    page: str
    title: str
    text: str
    code: str  # at most 46 characters a line: it sits beside the picture


PICTURES = [
    Picture("rows", "concepts", "Rows",
            "``torch.chunk`` blocks along dim 0: uneven, and trailing blocks may be empty.",
            ROWS + "spec = ds.ChunkShardingSpec(0, ranks)\nx = ds.zeros(spec, 10, 7)"),
    Picture("columns", "concepts", "Columns", "The same along dim 1.",
            ROWS + "spec = ds.ChunkShardingSpec(1, ranks)\nx = ds.zeros(spec, 10, 7)"),
    Picture("several", "concepts", "Several blocks per rank",
            "A rank may appear several times among the placements.",
            ROWS + "spec = ds.ChunkShardingSpec(0, ranks + ranks)\n"
            "x = ds.zeros(spec, 16, 7)  # 2 blocks a rank"),
    Picture("grid", "concepts", "Any grid",
            "``EnumerableShardingSpec``: any blocks that tile the tensor exactly.",
            "block = ds.ShardMetadata\n"
            "spec = ds.EnumerableShardingSpec([\n"
            '    block([0, 0], [6, 3], "rank:0/cpu"),\n'
            '    block([0, 3], [6, 4], "rank:1/cpu"),\n'
            '    block([6, 0], [4, 3], "rank:2/cpu"),\n'
            '    block([6, 3], [4, 4], "rank:3/cpu"),\n'
            "])\n"
            "x = ds.zeros(spec, 10, 7)"),
    Picture("replicated", "concepts", "Replicated",
            "``Replicate()``: every rank holds the whole value, the same on each.",
            "x = ds.zeros(ds.Replicate(), 10, 7)"),
    Picture("partial", "concepts", "Partial",
            "``Partial()``: every rank holds a full-size *term*; the value is their sum "
            "(a row-parallel matmul's output, before anyone needs the sum).",
            "x = ds.zeros(ds.Partial(), 10, 7)"),
    Picture("mesh_tp_dp", "meshes", "Split over tp, copied over dp",
            "``[Replicate(), Shard(0)]``: the rows are split between the two ranks of each "
            "``tp`` pair, and each block has a copy on the other ``dp`` row of the mesh (a "
            "tensor-parallel weight under data parallelism).",
            _on_mesh("Replicate(), Shard(0)")),
    Picture("mesh_partial_dp", "meshes", "Split over tp, a pending sum over dp",
            "``[Partial(), Shard(0)]``: the same blocks, but the two holders of a block hold "
            "terms whose sum is the block (gradients before their sum over ``dp``).",
            _on_mesh("Partial(), Shard(0)")),
    Picture("mesh_2d", "meshes", "Split over both mesh dims",
            "``[Shard(0), Shard(1)]``: rows over ``dp``, columns over ``tp``; one block per "
            "rank.",
            _on_mesh("Shard(0), Shard(1)")),
]


@dataclass(frozen=True)
class Block:
    offsets: tuple[int, int]
    sizes: tuple[int, int]
    holders: tuple[int, ...]


@dataclass(frozen=True)
class Drawn:
    size: tuple[int, int]
    kind: str  # "sharded", "replicated" or "partial" (every rank the whole value / a term)
    pending: bool  # the holders of a block hold terms of a sum, not copies
    blocks: tuple[Block, ...]


def _layouts(rank: int, world_size: int) -> dict[str, Drawn]:
    """Every picture's layout, from the tensor its code makes (run on every rank)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard

    import dispatch_shard as ds

    out = {}
    for picture in PICTURES:
        scope: dict[str, Any] = {"ds": ds, "torch": torch, "init_device_mesh": init_device_mesh,
                                 "Shard": Shard, "Replicate": Replicate, "Partial": Partial}
        exec(picture.code, scope)
        x = scope["x"]
        spec = x.sharding_spec()
        # metadata() runs on every rank: on an N-D layout with a pending sum it
        # communicates (it asks is_pinned(), which reduces the pending value).
        shards = x.metadata().shards_metadata
        boxes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        for shard in shards:
            if 0 not in shard.shard_sizes:
                key = (tuple(shard.shard_offsets), tuple(shard.shard_sizes))
                boxes.setdefault(key, []).append(shard.placement.rank())
        pending = isinstance(spec, ds.Partial) or getattr(spec, "partial_op", None) is not None
        kind = ("partial" if isinstance(spec, ds.Partial)
                else "replicated" if isinstance(spec, ds.Replicate) else "sharded")
        out[picture.name] = Drawn(
            (int(x.shape[0]), int(x.shape[1])), kind, pending,
            tuple(Block((o[0], o[1]), (s[0], s[1]), tuple(sorted(r)))
                  for (o, s), r in sorted(boxes.items())))
    return out


# -- drawing -------------------------------------------------------------------------------

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759"]
CELL = 26
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


def _hatch(rank: int) -> str:
    color = COLORS[rank % len(COLORS)]
    return (f'<pattern id="terms{rank}" width="8" height="8" patternUnits="userSpaceOnUse" '
            f'patternTransform="rotate(45)"><rect width="8" height="8" fill="white"/>'
            f'<rect width="4" height="8" fill="{color}" fill-opacity="0.85"/></pattern>')


def _fill(rank: int, pending: bool) -> str:
    return f"url(#terms{rank})" if pending else COLORS[rank % len(COLORS)]


def _label(x: float, y: float, text: str, size: int = 12, anchor: str = "middle",
           weight: str = "normal", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" dominant-baseline="middle" {extra}>'
            f"{html.escape(text)}</text>")


def _label_size(lines: list[str]) -> tuple[float, float]:
    return max(len(line) for line in lines) * 6.6 + 10, 15 * len(lines) + 4


def _boxed_label(x: float, y: float, lines: list[str], rotate: bool = False) -> list[str]:
    """Labels on a white box, readable over any fill; ``rotate``: along a tall block."""
    width, height = _label_size(lines)
    turn = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    parts = [f'<g{turn}><rect x="{x - width / 2:.1f}" y="{y - height / 2:.1f}" '
             f'width="{width:.1f}" height="{height}" rx="3" fill="white" fill-opacity="0.9"/>']
    for i, line in enumerate(lines):
        parts.append(_label(x, y - height / 2 + 9.5 + 15 * i, line, 11))
    parts.append("</g>")
    return parts


def _block_label(x: float, y: float, w: float, h: float, who: str, where: str) -> list[str]:
    """The holders and index ranges of a block, in the first arrangement that fits it."""
    for lines, rotate in (([who, where], False), ([f"{who} {where}"], False),
                          ([who, where], True), ([f"{who} {where}"], True), ([who], False)):
        width, height = _label_size(lines)
        if (width <= h and height <= w) if rotate else (width <= w and height <= h):
            return _boxed_label(x + w / 2, y + h / 2, lines, rotate)
    return []


def _range(offset: int, size: int) -> str:
    return f"{offset}:{offset + size}"


def svg(drawn: Drawn) -> str:
    rows, cols = drawn.size
    if drawn.kind in ("replicated", "partial"):
        return _whole_svg(drawn)
    left, top = 64, 52
    width, height = left + cols * CELL + 24, top + rows * CELL + 16
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" {FONT}>',
             "<defs>" + "".join(_hatch(r) for r in range(WORLD)) + "</defs>",
             _label(left + cols * CELL / 2, 12, f"dim 1 (size {cols})", 12, weight="bold"),
             _label(14, top + rows * CELL / 2, f"dim 0 (size {rows})", 12, weight="bold",
                    extra=f'transform="rotate(-90 14 {top + rows * CELL / 2:.1f})"')]
    row_cuts = sorted({0, rows, *(b.offsets[0] for b in drawn.blocks),
                       *(b.offsets[0] + b.sizes[0] for b in drawn.blocks)})
    col_cuts = sorted({0, cols, *(b.offsets[1] for b in drawn.blocks),
                       *(b.offsets[1] + b.sizes[1] for b in drawn.blocks)})
    for r in row_cuts:
        parts.append(_label(left - 8, top + r * CELL, str(r), 11, anchor="end"))
    for c in col_cuts:
        parts.append(_label(left + c * CELL, top - 10, str(c), 11))
    for block in drawn.blocks:
        y, x = top + block.offsets[0] * CELL, left + block.offsets[1] * CELL
        h, w = block.sizes[0] * CELL, block.sizes[1] * CELL
        stripe = w / len(block.holders)
        for i, rank in enumerate(block.holders):  # copies or terms, side by side
            parts.append(f'<rect x="{x + i * stripe:.1f}" y="{y}" width="{stripe:.1f}" '
                         f'height="{h}" fill="{_fill(rank, drawn.pending)}" '
                         f'fill-opacity="{1 if drawn.pending else 0.8}"/>')
        parts.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="none" '
                     f'stroke="#222" stroke-width="1.5"/>')
        joint = " + " if drawn.pending else ", "
        who = ("rank " if len(block.holders) == 1 else "ranks ") + joint.join(
            map(str, block.holders))
        where = (f"[{_range(block.offsets[0], block.sizes[0])}, "
                 f"{_range(block.offsets[1], block.sizes[1])}]")
        parts += _block_label(x, y, w, h, who, where)
    parts.append("</svg>")
    return "\n".join(parts)


def _whole_svg(drawn: Drawn) -> str:
    """Replicated: a solid copy per rank. Partial: a hatched term per rank, joined by +."""
    rows, cols = drawn.size
    cell = 9
    w, h = cols * cell, rows * cell
    gap = 34
    holders = drawn.blocks[0].holders
    width = len(holders) * (w + gap) + (80 if drawn.pending else 0)
    height = h + 70
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" {FONT}>',
             "<defs>" + "".join(_hatch(r) for r in range(WORLD)) + "</defs>"]
    for i, rank in enumerate(holders):
        x, y = 20 + i * (w + gap), 30
        parts.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" '
                     f'fill="{_fill(rank, drawn.pending)}" fill-opacity="0.8" stroke="#222" '
                     f'stroke-width="1.5"/>')
        parts.append(_label(x + w / 2, 14, f"rank {rank}", 12, weight="bold"))
        parts.append(_label(x + w / 2, y + h + 14, "a term" if drawn.pending else "a copy",
                            11))
        if i + 1 < len(holders):
            parts.append(_label(x + w + gap / 2, y + h / 2, "+" if drawn.pending else "",
                                26, weight="bold"))
    if drawn.pending:
        x = 20 + len(holders) * (w + gap) - gap / 2
        parts.append(_label(x + 40, 30 + h / 2, "= value", 14, weight="bold"))
    parts.append(_label(20, h + 58, f"each rank: all of [0:{rows}, 0:{cols}] "
                        f"(dim 0 size {rows}, dim 1 size {cols})", 11, anchor="start"))
    parts.append("</svg>")
    return "\n".join(parts)


def alt(drawn: Drawn) -> str:
    rows, cols = drawn.size
    head = f"A {rows} by {cols} tensor on {WORLD} ranks"
    if drawn.kind == "replicated":
        return f"{head}: each rank, drawn in its own solid colour, holds the whole value."
    if drawn.kind == "partial":
        return (f"{head}: each rank, drawn hatched in its own colour, holds a full-size term; "
                "plus signs between them: the value is their sum.")
    parts = []
    for block in drawn.blocks:
        who = ("rank " if len(block.holders) == 1 else "ranks ") + (
            " plus " if drawn.pending else " and ").join(map(str, block.holders))
        what = " (terms of a sum)" if drawn.pending and len(block.holders) > 1 else \
            " (copies)" if len(block.holders) > 1 else ""
        parts.append(f"rows {_range(block.offsets[0], block.sizes[0])} and columns "
                     f"{_range(block.offsets[1], block.sizes[1])} on {who}{what}")
    return f"{head}, in {len(drawn.blocks)} blocks: " + "; ".join(parts) + "."


def inc(page: str, drawn: dict[str, Drawn]) -> str:
    """The rst for a page: each picture beside the code that makes it."""
    for picture in PICTURES:
        too_long = [line for line in picture.code.splitlines() if len(line) > 46]
        if too_long:
            raise ValueError(f"{picture.name}: code lines over 46 characters do not fit "
                             f"beside the picture: {too_long}")
    lines = [".. This file is generated by tools/layout_pictures.py; do not edit it by hand.",
             "", ".. list-table::", "   :widths: 55 45", "   :width: 100%",
             "   :class: layouts", ""]
    for picture in PICTURES:
        if picture.page != page:
            continue
        lines += [f"   * - **{picture.title}.** {picture.text}", "",
                  "       .. fragment: a layout's constructor, in a program on 4 ranks", "",
                  "       .. code-block:: python", "",
                  *("          " + line for line in picture.code.splitlines()), "",
                  f"     - .. image:: /_static/layouts/{picture.name}.svg",
                  "          :alt: " + alt(drawn[picture.name]), ""]
    return "\n".join(lines)


def main() -> int:
    from dispatch_shard.testing import get_pool, shutdown_pools

    try:
        drawn = get_pool(WORLD).run(_layouts)[0]
    finally:
        shutdown_pools()
    SVG_DIR.mkdir(parents=True, exist_ok=True)
    INC_DIR.mkdir(parents=True, exist_ok=True)
    for name, layout in drawn.items():
        (SVG_DIR / f"{name}.svg").write_text(svg(layout) + "\n")
        print(f"wrote {SVG_DIR / name}.svg")
    for page in sorted({p.page for p in PICTURES}):
        (INC_DIR / f"{page}.inc").write_text(inc(page, drawn))
        print(f"wrote {INC_DIR / page}.inc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
