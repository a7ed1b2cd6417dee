"""Draw the docs' layout pictures (docs/_static/layouts/*.svg) from real layouts.

Run with ``python tools/layout_pictures.py`` after changing how layouts are drawn;
the pictures are committed so the docs build needs no process group.
"""

from __future__ import annotations

import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "_static" / "layouts"


def _draw(rank: int, world_size: int) -> dict[str, str]:
    import dispatch_shard as ds

    placements = [f"rank:{r}/cpu" for r in range(world_size)]
    grid = ds.EnumerableShardingSpec([
        ds.ShardMetadata([0, 0], [6, 3], "rank:0/cpu"),
        ds.ShardMetadata([0, 3], [6, 4], "rank:1/cpu"),
        ds.ShardMetadata([6, 0], [4, 3], "rank:2/cpu"),
        ds.ShardMetadata([6, 3], [4, 4], "rank:3/cpu"),
    ])
    specs = {
        "rows": ds.ChunkShardingSpec(0, placements),
        "columns": ds.ChunkShardingSpec(1, placements),
        "several": ds.ChunkShardingSpec(0, [placements[i % world_size] for i in range(8)]),
        "grid": grid,
        "replicated": ds.Replicate(),
    }
    return {name: ds.sharding_svg(ds.zeros(spec, 10, 7)) for name, spec in specs.items()}


def main() -> int:
    from dispatch_shard.testing import get_pool, shutdown_pools

    try:
        pictures = get_pool(4).run(_draw)[0]
    finally:
        shutdown_pools()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, svg in pictures.items():
        (OUT / f"{name}.svg").write_text(svg + "\n")
        print(f"wrote {OUT / name}.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
