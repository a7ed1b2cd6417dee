"""Fast in-process tests of the metadata values and sharding specs (no process groups)."""

from __future__ import annotations

import dataclasses
import itertools
import pickle
import random
import re

import pytest
import torch

from dispatch_shard.metadata import (
    Placement,
    Shard,
    ShardedTensorMetadata,
    ShardMetadata,
    TensorProperties,
)
from dispatch_shard.specs import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    Partial,
    Replicate,
    ShardingSpec,
)

PROPS = TensorProperties()
WORLD = (0, 1, 2, 3)


def cpu_placements(*ranks: int) -> list[str]:
    return [f"rank:{rank}/cpu" for rank in ranks]


def grid_shards(rows: int, cols: int, block: tuple[int, int]) -> list[ShardMetadata]:
    """A ``rows x cols`` grid of ``block``-sized blocks, ranks round robin over 4."""
    return [
        ShardMetadata(
            [row * block[0], col * block[1]],
            list(block),
            f"rank:{(row * cols + col) % 4}/cpu",
        )
        for row in range(rows)
        for col in range(cols)
    ]


def coverage_counts(shards: list[ShardMetadata], size: list[int]) -> torch.Tensor:
    """How many shards cover each index of a tensor of ``size`` (brute force)."""
    counts = torch.zeros(size, dtype=torch.int64)
    for shard in shards:
        index = tuple(
            slice(offset, offset + length)
            for offset, length in zip(shard.shard_offsets, shard.shard_sizes, strict=True)
        )
        counts[index] += 1
    return counts


# --------------------------------------------------------------------------- Placement


@pytest.mark.parametrize(
    ("text", "rank", "device"),
    [
        ("rank:0/cpu", 0, torch.device("cpu")),
        ("rank:2/cpu", 2, torch.device("cpu")),
        ("rank:1/cuda:1", 1, torch.device("cuda", 1)),
        ("rank:3/cuda", 3, torch.device("cuda")),
        ("rank:12/meta", 12, torch.device("meta")),
    ],
)
def test_placement_parse_and_str_round_trip(text: str, rank: int, device: torch.device) -> None:
    placement = Placement.parse(text)
    assert placement.rank() == rank
    assert placement.device() == device
    assert str(placement) == text
    assert Placement.parse(str(placement)) == placement
    assert Placement(rank, device) == placement
    assert Placement(rank, str(device)) == placement
    assert hash(Placement(rank, device)) == hash(placement)
    assert pickle.loads(pickle.dumps(placement)) == placement
    assert repr(placement) == f"Placement('{text}')"
    assert Placement.parse(placement) is placement


def test_placement_canonical_text_and_equality() -> None:
    assert str(Placement.parse("rank:007/cpu")) == "rank:7/cpu"
    assert Placement.parse("rank:1/cpu") != Placement.parse("rank:2/cpu")
    assert Placement.parse("rank:1/cpu") != Placement.parse("rank:1/cuda:1")
    assert Placement.parse("rank:1/cuda") != Placement.parse("rank:1/cuda:0")
    assert Placement.parse("rank:1/cpu") != "rank:1/cpu"
    assert len({Placement.parse("rank:1/cpu"), Placement(1, "cpu"), Placement(1)}) == 1


def test_placement_accepts_legacy_remote_device() -> None:
    from torch.distributed.remote_device import _remote_device

    assert Placement.parse(_remote_device("rank:1/cuda:1")) == Placement(1, "cuda:1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "worker0/cuda:1",
        "rank:x/cpu",
        "cpu",
        "cuda:1",
        "rank:1",
        "rank:-1/cpu",
        "rank:1/",
        " rank:1/cpu",
        "Rank:1/cpu",
        "rank:1/foo",
        "rank:1/cpu/extra",
        "",
    ],
)
def test_placement_parse_errors(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Invalid placement {text!r}")):
        Placement.parse(text)


def test_placement_constructor_errors_and_immutability() -> None:
    with pytest.raises(ValueError, match="Placement rank must be >= 0, found -1"):
        Placement(-1, "cpu")
    with pytest.raises(TypeError, match="Placement rank must be an int"):
        Placement(True, "cpu")
    with pytest.raises(TypeError, match="must be a str or Placement"):
        Placement.parse(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid placement device 'nope'"):
        Placement(0, "nope")
    placement = Placement(0, "cpu")
    with pytest.raises(AttributeError, match="immutable"):
        placement._rank = 3
    assert placement.rank() == 0


# --------------------------------------------------------------------------- ShardMetadata


def test_shard_metadata_values() -> None:
    metadata = ShardMetadata((0, 5), torch.Size([5, 5]), "rank:1/cuda:1")
    assert metadata.shard_offsets == [0, 5]
    assert metadata.shard_sizes == [5, 5]
    assert type(metadata.shard_offsets) is list
    assert type(metadata.shard_sizes) is list
    assert metadata.placement == Placement(1, "cuda:1")
    assert str(metadata.placement) == "rank:1/cuda:1"
    assert ShardMetadata([1], [2]).placement is None
    assert repr(metadata) == (
        "ShardMetadata(shard_offsets=[0, 5], shard_sizes=[5, 5], placement='rank:1/cuda:1')"
    )


def test_shard_metadata_equality_hash_pickle() -> None:
    first = ShardMetadata([0, 5], [5, 5], "rank:1/cpu")
    same = ShardMetadata([0, 5], [5, 5], Placement(1, "cpu"))
    assert first == same
    assert hash(first) == hash(same)
    assert len({first, same}) == 1
    assert first != ShardMetadata([0, 5], [5, 4], "rank:1/cpu")
    assert first != ShardMetadata([5, 0], [5, 5], "rank:1/cpu")
    assert first != ShardMetadata([0, 5], [5, 5], "rank:2/cpu")
    assert first != ShardMetadata([0, 5], [5, 5])
    assert first != (0, 5)
    restored = pickle.loads(pickle.dumps(first))
    assert restored == first
    assert hash(restored) == hash(first)
    assert restored.shard_offsets == [0, 5]
    assert pickle.loads(pickle.dumps(ShardMetadata([1], [2]))) == ShardMetadata([1], [2])


def test_shard_metadata_errors() -> None:
    with pytest.raises(ValueError, match="same number of elements, found 2 and 1"):
        ShardMetadata([0, 0], [1])
    with pytest.raises(ValueError, match=r"shard_offsets should be >= 0, found \[0, -1\]"):
        ShardMetadata([0, -1], [1, 1])
    with pytest.raises(ValueError, match=r"shard_sizes should be >= 0, found \[-3\]"):
        ShardMetadata([0], [-3])
    with pytest.raises(TypeError, match="shard_sizes must hold ints"):
        ShardMetadata([0], [1.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="Invalid placement 'worker0/cpu'"):
        ShardMetadata([0], [1], "worker0/cpu")


# --------------------------------------------------------------------------- TensorProperties

DTYPES = [
    torch.float,
    torch.double,
    torch.cfloat,
    torch.cdouble,
    torch.half,
    torch.bfloat16,
    torch.uint8,
    torch.int8,
    torch.short,
    torch.int,
    torch.long,
    torch.bool,
]
LAYOUTS = [torch.strided, torch.sparse_coo]
MEMORY_FORMATS = [
    torch.contiguous_format,
    torch.channels_last,
    torch.channels_last_3d,
    torch.preserve_format,
]
SEED_SHARDS = [
    ShardMetadata([0, 0], [5, 5], "rank:0/cuda:0"),
    ShardMetadata([0, 5], [5, 5], "rank:1/cuda:1"),
    ShardMetadata([5, 0], [5, 5], "rank:2/cuda:2"),
    ShardMetadata([5, 5], [5, 5], "rank:3/cuda:3"),
]


def test_tensor_properties_and_metadata_pickle_round_trip() -> None:
    combos = list(itertools.product(DTYPES, LAYOUTS, [True, False], MEMORY_FORMATS, [True, False]))
    assert len(combos) == 12 * 2 * 2 * 4 * 2
    for dtype, layout, requires_grad, memory_format, pin_memory in combos:
        properties = TensorProperties(dtype, layout, requires_grad, memory_format, pin_memory)
        restored_properties = pickle.loads(pickle.dumps(properties))
        assert restored_properties == properties
        assert hash(restored_properties) == hash(properties)
        assert restored_properties.memory_format is memory_format

        expected = ShardedTensorMetadata(SEED_SHARDS, (10, 10), properties)  # type: ignore[arg-type]
        restored = pickle.loads(pickle.dumps(expected))
        assert restored == expected
        assert restored.size == torch.Size([10, 10])
        assert restored.tensor_properties.memory_format is memory_format
        assert [str(shard.placement) for shard in restored.shards_metadata] == [
            f"rank:{rank}/cuda:{rank}" for rank in range(4)
        ]


def test_tensor_properties_values() -> None:
    assert TensorProperties() == TensorProperties(
        torch.float32, torch.strided, False, torch.contiguous_format, False
    )
    assert TensorProperties(dtype=torch.double) != TensorProperties()
    assert len({TensorProperties(), TensorProperties(), TensorProperties(requires_grad=True)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        TensorProperties().requires_grad = True  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        TensorProperties(dtype="float")  # type: ignore[arg-type]

    tensor = torch.zeros(3, 4, dtype=torch.double, requires_grad=True)
    assert TensorProperties.create_from_tensor(tensor) == TensorProperties(
        dtype=torch.double, requires_grad=True
    )


def test_sharded_tensor_metadata_values() -> None:
    metadata = ShardedTensorMetadata(tuple(SEED_SHARDS), [10, 10], PROPS)  # type: ignore[arg-type]
    assert type(metadata.shards_metadata) is list
    assert type(metadata.size) is torch.Size
    assert metadata == ShardedTensorMetadata(list(SEED_SHARDS), torch.Size([10, 10]), PROPS)
    assert metadata != ShardedTensorMetadata(list(SEED_SHARDS), torch.Size([10, 11]), PROPS)
    empty = ShardedTensorMetadata()
    assert (empty.shards_metadata, empty.size, empty.tensor_properties) == ([], (), PROPS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        metadata.size = torch.Size([1])  # type: ignore[misc]


# --------------------------------------------------------------------------- Shard


def test_shard_validation() -> None:
    tensor = torch.zeros(2, 3)
    shard = Shard(tensor, ShardMetadata([4, 0], [2, 3], "rank:1/cpu"))
    assert shard.tensor is tensor
    assert not hasattr(shard, "__dict__")

    with pytest.raises(
        ValueError,
        match=re.escape(
            "Shard tensor size does not match with metadata.shard_lengths! "
            "Found shard tensor size: [2, 3], metadata.shard_lengths: [3, 2]"
        ),
    ):
        Shard(tensor, ShardMetadata([0, 0], [3, 2], "rank:0/cpu"))
    with pytest.raises(
        ValueError,
        match="Local shard tensor device does not match with local Shard's placement! "
        "Found local shard tensor device: cpu, local shard metadata placement device: meta",
    ):
        Shard(tensor, ShardMetadata([0, 0], [2, 3], "rank:0/meta"))
    Shard(tensor, ShardMetadata([0, 0], [2, 3]))  # no placement: nothing to check


def test_shard_from_tensor_and_offsets() -> None:
    tensor = torch.zeros(2, 3, device="meta")
    shard = Shard.from_tensor_and_offsets(tensor, [4, 0], rank=3)
    assert shard.tensor is tensor
    assert shard.metadata == ShardMetadata([4, 0], [2, 3], "rank:3/meta")
    assert str(shard.metadata.placement) == "rank:3/meta"


# --------------------------------------------------------------------------- ChunkShardingSpec


def expected_chunks(length: int, chunks: int) -> list[tuple[int, int]]:
    """(offset, size) per chunk from torch.chunk; chunks torch.chunk does not return are
    empty, at the legacy offset ``index * split`` (which may lie past the end)."""
    pieces = torch.arange(length).chunk(chunks) if length else ()
    result = [(int(piece[0]), piece.numel()) for piece in pieces if piece.numel()]
    split = result[0][1] if result else 0
    return result + [(index * split, 0) for index in range(len(result), chunks)]


@pytest.mark.parametrize("size", [(10, 32), (2, 20), (9, 5), (16, 3), (1, 1), (0, 4), (7, 3, 5)])
@pytest.mark.parametrize("dim", [0, 1, -1, -2])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 8])
def test_chunk_metadata_matches_torch_chunk(size: tuple[int, ...], dim: int, chunks: int) -> None:
    group_ranks = tuple(range(chunks))
    spec = ChunkShardingSpec(dim, cpu_placements(*group_ranks))
    metadata = spec.build_metadata(torch.Size(size), PROPS, group_ranks)
    assert metadata.size == torch.Size(size)
    assert metadata.tensor_properties == PROPS
    normalized = dim % len(size)
    expected = expected_chunks(size[normalized], chunks)
    assert len(metadata.shards_metadata) == chunks
    tensor = torch.arange(torch.Size(size).numel()).reshape(size)
    reference = list(tensor.chunk(chunks, dim)) if tensor.numel() else []
    for index, shard in enumerate(metadata.shards_metadata):
        offset, length = expected[index]
        expected_offsets = [0] * len(size)
        expected_offsets[normalized] = offset
        expected_sizes = list(size)
        expected_sizes[normalized] = length
        assert shard.shard_offsets == expected_offsets
        assert shard.shard_sizes == expected_sizes
        assert str(shard.placement) == f"rank:{index}/cpu"
        if index < len(reference) and length:
            block = tensor.narrow(normalized, offset, length)
            assert torch.equal(block, reference[index])
    # The blocks tile the tensor exactly.
    assert bool((coverage_counts(metadata.shards_metadata, list(size)) == 1).all())
    enumerable = EnumerableShardingSpec(metadata.shards_metadata)
    assert enumerable.build_metadata(size, PROPS, group_ranks).shards_metadata == (
        metadata.shards_metadata
    )


@pytest.mark.parametrize(
    ("length", "chunks", "sizes"),
    [(10, 4, [3, 3, 3, 1]), (2, 4, [1, 1, 0, 0]), (9, 4, [3, 3, 3, 0]), (16, 8, [2] * 8)],
)
def test_chunk_uneven_and_empty_shards(length: int, chunks: int, sizes: list[int]) -> None:
    spec = ChunkShardingSpec(0, cpu_placements(*range(chunks)))
    metadata = spec.build_metadata(torch.Size([length, 20]), PROPS, tuple(range(chunks)))
    assert [shard.shard_sizes[0] for shard in metadata.shards_metadata] == sizes
    split = -(-length // chunks)
    for index, shard in enumerate(metadata.shards_metadata):
        assert shard.shard_offsets[0] == index * split  # legacy offsets, even past the end
        if shard.shard_sizes[0]:
            assert shard.shard_offsets[0] + shard.shard_sizes[0] <= length
        assert shard.shard_sizes[1] == 20


def test_chunk_matches_legacy_spec() -> None:
    from torch.distributed._shard.sharded_tensor.metadata import (
        TensorProperties as LegacyProperties,
    )
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec as LegacySpec

    for size, dim, chunks in itertools.product([(10, 20), (9, 7), (2, 5)], [0, 1, -1], [1, 3, 4]):
        placements = [f"rank:{rank}/cuda:{rank}" for rank in range(chunks)]
        ours = ChunkShardingSpec(dim, placements).build_metadata(size, PROPS, tuple(range(chunks)))
        legacy = LegacySpec(dim, list(placements)).build_metadata(
            torch.Size(size), LegacyProperties()
        )
        for mine, theirs in zip(ours.shards_metadata, legacy.shards_metadata, strict=True):
            assert mine.shard_sizes == theirs.shard_sizes
            assert str(mine.placement) == str(theirs.placement)
            if 0 not in mine.shard_sizes:  # legacy puts empty blocks past the end
                assert mine.shard_offsets == theirs.shard_offsets


def test_chunk_repeated_ranks() -> None:
    spec = ChunkShardingSpec(0, cpu_placements(0, 1, 2, 3, 0, 1, 2, 3))
    metadata = spec.build_metadata(torch.Size([16, 20]), PROPS, WORLD)
    assert len(metadata.shards_metadata) == 8
    for index, shard in enumerate(metadata.shards_metadata):
        assert shard.shard_offsets == [2 * index, 0]
        assert shard.shard_sizes == [2, 20]
        assert shard.placement == Placement(index % 4, "cpu")


def test_chunk_partial_world_and_subgroup() -> None:
    spec = ChunkShardingSpec(0, ["rank:2/cuda:2", "rank:3/cuda:3"])
    for group_ranks in [WORLD, (1, 2, 3)]:
        metadata = spec.build_metadata(torch.Size([10, 20]), PROPS, group_ranks)
        assert len(metadata.shards_metadata) == 2
        for index, shard in enumerate(metadata.shards_metadata):
            assert shard.shard_offsets == [index * 5, 0]
            assert shard.shard_sizes == [5, 20]
            assert str(shard.placement) == f"rank:{index + 2}/cuda:{index + 2}"
    with pytest.raises(
        ValueError, match=re.escape("Global rank 2 does not exist in input process group: [0, 1]")
    ):
        spec.build_metadata(torch.Size([10, 20]), PROPS, (0, 1))


def test_chunk_spec_value_semantics() -> None:
    spec = ChunkShardingSpec(0, cpu_placements(0, 1))
    assert spec.placements == (Placement(0, "cpu"), Placement(1, "cpu"))
    assert spec == ChunkShardingSpec(0, (Placement(0, "cpu"), "rank:1/cpu"))
    assert hash(spec) == hash(ChunkShardingSpec(0, tuple(cpu_placements(0, 1))))
    assert spec != ChunkShardingSpec(1, cpu_placements(0, 1))
    assert spec != ChunkShardingSpec(0, cpu_placements(1, 0))
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert repr(spec) == (
        "ChunkShardingSpec(dim=0, placements=(Placement('rank:0/cpu'), Placement('rank:1/cpu')))"
    )
    assert isinstance(spec, ShardingSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dim = 1  # type: ignore[misc]


def test_chunk_named_dim_error() -> None:
    with pytest.raises(
        NotImplementedError, match="ChunkShardingSpec does not support named dimension yet!"
    ):
        ChunkShardingSpec("H", ["rank:1/cuda:1"])


@pytest.mark.parametrize("dim", [2, 3, 4, -3, -4, -5])
def test_chunk_invalid_dim(dim: int) -> None:
    spec = ChunkShardingSpec(dim, ["rank:1/cuda:1"])
    with pytest.raises(ValueError, match=f"^Invalid sharding dim: {dim}"):
        spec.build_metadata(torch.Size([10, 20]), PROPS, WORLD)


def test_chunk_invalid_dim_on_scalar() -> None:
    with pytest.raises(ValueError, match=r"^Invalid sharding dim: 0 "):
        ChunkShardingSpec(0, ["rank:0/cpu"]).build_metadata(torch.Size([]), PROPS, WORLD)


def test_chunk_unknown_rank() -> None:
    spec = ChunkShardingSpec(0, ["rank:5/cuda:1"])
    with pytest.raises(
        ValueError,
        match=re.escape("Global rank 5 does not exist in input process group: [0, 1, 2, 3]"),
    ):
        spec.build_metadata(torch.Size([10, 20]), PROPS, WORLD)


def test_chunk_construction_errors() -> None:
    with pytest.raises(ValueError, match=r"Sharding dim needs to be an integer, found: 1\.5"):
        ChunkShardingSpec(1.5, ["rank:0/cpu"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs at least one placement"):
        ChunkShardingSpec(0, [])
    with pytest.raises(TypeError, match="found the string"):
        ChunkShardingSpec(0, "rank:0/cpu")
    with pytest.raises(ValueError, match="Invalid placement 'worker0/cuda:1'"):
        ChunkShardingSpec(0, ["worker0/cuda:1"])


ALL_SPECS: list[ShardingSpec] = [
    ChunkShardingSpec(0, ["rank:0/cuda:1"]),
    EnumerableShardingSpec([ShardMetadata([0, 0], [10, 20], "rank:0/cpu")]),
    Replicate(),
    Partial(),
]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda spec: type(spec).__name__)
def test_unsupported_layout_and_memory_format(spec: ShardingSpec) -> None:
    with pytest.raises(ValueError, match=r"^Only torch\.strided layout is currently supported$"):
        spec.build_metadata(torch.Size([10, 20]), TensorProperties(layout=torch.sparse_coo), WORLD)
    for memory_format in [torch.channels_last, torch.channels_last_3d, torch.preserve_format]:
        with pytest.raises(
            ValueError,
            match=r"^Only torch\.contiguous_format memory_format is currently supported$",
        ):
            spec.build_metadata(
                torch.Size([10, 20]), TensorProperties(memory_format=memory_format), WORLD
            )
    with pytest.raises(ValueError, match="group_ranks must name at least one rank"):
        spec.build_metadata(torch.Size([10, 20]), PROPS, ())


# --------------------------------------------------------------------------- caching


def test_build_metadata_is_cached() -> None:
    spec = ChunkShardingSpec(0, cpu_placements(0, 1, 2, 3))
    first = spec.build_metadata(torch.Size([10, 20]), PROPS, WORLD)
    assert spec.build_metadata(torch.Size([10, 20]), PROPS, WORLD) is first
    # Equal arguments of other types and equal specs hit the same entry.
    assert spec.build_metadata([10, 20], TensorProperties(), [0, 1, 2, 3]) is first
    assert (
        ChunkShardingSpec(0, cpu_placements(0, 1, 2, 3)).build_metadata((10, 20), PROPS, WORLD)
        is first
    )
    # The device argument does not matter to specs that name their devices.
    assert spec.build_metadata(torch.Size([10, 20]), PROPS, WORLD, device="meta") is first
    # Anything that changes the result gives another object.
    assert spec.build_metadata(torch.Size([10, 21]), PROPS, WORLD) is not first
    assert spec.build_metadata(torch.Size([10, 20]), PROPS, (0, 1, 2, 3, 4)) is not first
    other_properties = TensorProperties(dtype=torch.double)
    changed = spec.build_metadata(torch.Size([10, 20]), other_properties, WORLD)
    assert changed.tensor_properties == other_properties
    assert changed.shards_metadata == first.shards_metadata

    enumerable = EnumerableShardingSpec(grid_shards(2, 2, (5, 5)))
    cached = enumerable.build_metadata(torch.Size([10, 10]), PROPS, WORLD)
    assert enumerable.build_metadata(torch.Size([10, 10]), PROPS, WORLD) is cached

    replicated = Replicate().build_metadata(torch.Size([3]), PROPS, WORLD)
    assert Replicate().build_metadata(torch.Size([3]), PROPS, WORLD, device="cpu") is replicated
    assert Replicate().build_metadata(torch.Size([3]), PROPS, WORLD, device="meta") is not (
        replicated
    )


def test_errors_are_raised_on_every_call() -> None:
    spec = ChunkShardingSpec(0, ["rank:5/cpu"])
    for _ in range(2):
        with pytest.raises(ValueError, match="Global rank 5"):
            spec.build_metadata(torch.Size([10]), PROPS, WORLD)


# --------------------------------------------------------------------------- EnumerableShardingSpec


def test_enumerable_grid() -> None:
    shards = grid_shards(2, 2, (5, 5))
    spec = EnumerableShardingSpec(shards)
    assert spec.shards == tuple(shards)
    metadata = spec.build_metadata(torch.Size([10, 10]), PROPS, WORLD)
    assert metadata.shards_metadata == shards
    assert metadata.size == torch.Size([10, 10])
    assert spec == EnumerableShardingSpec(tuple(shards))
    assert hash(spec) == hash(EnumerableShardingSpec(grid_shards(2, 2, (5, 5))))
    assert spec != EnumerableShardingSpec(list(reversed(shards)))
    restored = pickle.loads(pickle.dumps(spec))
    assert restored == spec
    assert hash(restored) == hash(spec)
    assert restored.build_metadata(torch.Size([10, 10]), PROPS, WORLD) == metadata
    assert repr(spec).startswith("EnumerableShardingSpec(shards=(ShardMetadata(")
    assert "_bounds" not in repr(spec)


def test_enumerable_uneven_blocks_and_empty_shards() -> None:
    shards = [
        ShardMetadata([0, 0], [3, 7], "rank:0/cpu"),
        ShardMetadata([0, 7], [3, 1], "rank:1/cpu"),
        ShardMetadata([3, 0], [5, 2], "rank:2/cpu"),
        ShardMetadata([3, 2], [5, 6], "rank:3/cpu"),
        ShardMetadata([8, 0], [0, 8], "rank:3/cpu"),
        ShardMetadata([2, 2], [0, 0], "rank:0/cpu"),
    ]
    metadata = EnumerableShardingSpec(shards).build_metadata(torch.Size([8, 8]), PROPS, WORLD)
    assert metadata.shards_metadata == shards
    # A tensor with no elements: only empty shards.
    empty = EnumerableShardingSpec([ShardMetadata([0, 0], [0, 4], "rank:0/cpu")] * 2)
    assert len(empty.build_metadata(torch.Size([0, 4]), PROPS, WORLD).shards_metadata) == 2


def test_enumerable_overlap() -> None:
    first = ShardMetadata([0, 0], [5, 5], "rank:0/cpu")
    second = ShardMetadata([4, 4], [6, 6], "rank:1/cpu")
    others = [
        ShardMetadata([0, 5], [4, 5], "rank:2/cpu"),
        ShardMetadata([5, 0], [5, 4], "rank:3/cpu"),
    ]
    with pytest.raises(ValueError, match=re.escape(f"Shards {first} and {second} overlap")):
        EnumerableShardingSpec([first, second, *others])
    # Duplicates overlap as well, even when the volumes add up elsewhere.
    with pytest.raises(ValueError, match="overlap"):
        EnumerableShardingSpec([first, first])
    whole = ShardMetadata([0, 0], [10, 10], "rank:0/cpu")
    # Covered three times: the corners match the bounding box mod 2, the volume does not.
    with pytest.raises(ValueError, match=re.escape(f"Shards {whole} and {whole} overlap")):
        EnumerableShardingSpec([whole, whole, whole])
    with pytest.raises(ValueError, match=re.escape(f"Shards {whole} and {first} overlap")):
        EnumerableShardingSpec([whole, first])


def test_enumerable_gap() -> None:
    shards = grid_shards(2, 2, (5, 5))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Shards do not tile their bounding box (offsets 0, size [10, 10]): they cover 75 of "
            "its 100 elements; the uncovered region has a corner at index [0, 5]"
        ),
    ):
        EnumerableShardingSpec([shards[0], shards[2], shards[3]])
    # Blocks must start at the origin.
    with pytest.raises(ValueError, match="do not tile their bounding box"):
        EnumerableShardingSpec([ShardMetadata([1, 0], [4, 4], "rank:0/cpu")])
    # Only empty shards, but a bounding box with elements.
    with pytest.raises(ValueError, match="they cover 0 of its 6 elements"):
        EnumerableShardingSpec(
            [ShardMetadata([0, 0], [2, 0], "rank:0/cpu"), ShardMetadata([0, 0], [0, 3])]
        )


def test_enumerable_construction_errors() -> None:
    with pytest.raises(ValueError, match="Empty shard list provided"):
        EnumerableShardingSpec([])
    first = ShardMetadata([0, 0], [5, 5], "rank:0/cpu")
    third = ShardMetadata([0, 0, 0], [5, 5, 5], "rank:1/cpu")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Found inconsistent number of dims for shards: {first} has 2 dims and {third} has 3"
        ),
    ):
        EnumerableShardingSpec([first, third])
    with pytest.raises(TypeError, match="takes ShardMetadata objects"):
        EnumerableShardingSpec([first, "rank:0/cpu"])  # type: ignore[list-item]


def test_enumerable_build_metadata_errors() -> None:
    spec = EnumerableShardingSpec(grid_shards(2, 2, (5, 5)))
    with pytest.raises(ValueError, match=r"^Shards do not cover the tensor: they span \[10, 10\]"):
        spec.build_metadata(torch.Size([10, 11]), PROPS, WORLD)
    with pytest.raises(ValueError, match="all the individual shards do not cover the entire"):
        spec.build_metadata(torch.Size([12, 12]), PROPS, WORLD)
    with pytest.raises(ValueError, match=r"^Shards extend beyond the tensor"):
        spec.build_metadata(torch.Size([10, 9]), PROPS, WORLD)
    with pytest.raises(ValueError, match=r"Tensor has 3 dims \(size \[10, 10, 1\]\), but the"):
        spec.build_metadata(torch.Size([10, 10, 1]), PROPS, WORLD)
    with pytest.raises(
        ValueError,
        match=re.escape("Global rank 3 does not exist in input process group: [0, 1, 2]"),
    ):
        spec.build_metadata(torch.Size([10, 10]), PROPS, (0, 1, 2))
    no_placement = EnumerableShardingSpec([ShardMetadata([0], [4])])
    with pytest.raises(ValueError, match="needs a placement"):
        no_placement.build_metadata(torch.Size([4]), PROPS, WORLD)


def test_enumerable_4096_shard_grid() -> None:
    shards = grid_shards(64, 64, (2, 3))
    assert len(shards) == 4096
    spec = EnumerableShardingSpec(shards)
    metadata = spec.build_metadata(torch.Size([128, 192]), PROPS, WORLD)
    assert metadata.shards_metadata == shards
    assert spec.build_metadata(torch.Size([128, 192]), PROPS, WORLD) is metadata

    grown = list(shards)
    grown[64 * 10 + 20] = ShardMetadata([20, 60], [3, 3], "rank:0/cpu")
    with pytest.raises(
        ValueError,
        match=re.escape(f"Shards {grown[64 * 10 + 20]} and {shards[64 * 11 + 20]} overlap"),
    ):
        EnumerableShardingSpec(grown)

    holed = shards[: 64 * 33 + 7] + shards[64 * 33 + 8 :]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "cover 24570 of its 24576 elements; the uncovered region has a corner at index [66, 21]"
        ),
    ):
        EnumerableShardingSpec(holed)


def random_tiling(rng: random.Random, size: list[int], pieces: int) -> list[list[list[int]]]:
    """Split the box [0, size) into up to ``pieces`` blocks by random cuts: [[offsets, sizes]]."""
    blocks = [[[0] * len(size), list(size)]]
    for _ in range(pieces * 3):
        if len(blocks) >= pieces:
            break
        offsets, sizes = blocks.pop(rng.randrange(len(blocks)))
        dim = rng.randrange(len(size))
        if sizes[dim] < 2:
            blocks.append([offsets, sizes])
            continue
        cut = rng.randrange(1, sizes[dim])
        second_offsets = list(offsets)
        second_offsets[dim] += cut
        first_sizes, second_sizes = list(sizes), list(sizes)
        first_sizes[dim] = cut
        second_sizes[dim] -= cut
        blocks += [[offsets, first_sizes], [second_offsets, second_sizes]]
    return blocks


def test_enumerable_validation_matches_brute_force() -> None:
    rng = random.Random(1234)
    outcomes = {"tiles": 0, "overlap": 0, "gap": 0}
    for trial in range(400):
        ndim = rng.choice([1, 2, 3])
        size = [rng.randint(1, 6) for _ in range(ndim)]
        blocks = random_tiling(rng, size, rng.randint(1, 8))
        if trial % 2:  # perturb: move, grow, shrink, drop or duplicate a block
            index = rng.randrange(len(blocks))
            offsets, sizes = blocks[index]
            dim = rng.randrange(ndim)
            action = rng.choice(["move", "grow", "shrink", "drop", "duplicate"])
            if action == "move":
                offsets[dim] = max(0, offsets[dim] + rng.choice([-1, 1]))
            elif action == "grow":
                sizes[dim] += 1
            elif action == "shrink":
                sizes[dim] = max(0, sizes[dim] - 1)
            elif action == "drop" and len(blocks) > 1:
                blocks.pop(index)
            else:
                blocks.append([list(offsets), list(sizes)])
        shards = [ShardMetadata(offsets, sizes, "rank:0/cpu") for offsets, sizes in blocks]
        non_empty = [shard for shard in shards if 0 not in shard.shard_sizes] or shards
        bounds = [
            max(shard.shard_offsets[dim] + shard.shard_sizes[dim] for shard in non_empty)
            for dim in range(ndim)
        ]
        counts = coverage_counts(shards, bounds)
        if bool((counts == 1).all()):
            spec = EnumerableShardingSpec(shards)
            assert spec.build_metadata(bounds, PROPS, WORLD).shards_metadata == shards
            outcomes["tiles"] += 1
        elif bool((counts > 1).any()):
            with pytest.raises(ValueError, match="overlap") as error:
                EnumerableShardingSpec(shards)
            # The named pair really overlaps.
            named = [shard for shard in shards if repr(shard) in str(error.value)]
            assert any(
                bool((coverage_counts([first, second], bounds) == 2).any())
                for first, second in itertools.combinations(named, 2)
            )
            outcomes["overlap"] += 1
        else:
            with pytest.raises(ValueError, match="do not tile their bounding box"):
                EnumerableShardingSpec(shards)
            outcomes["gap"] += 1
    assert min(outcomes.values()) >= 20, outcomes


# --------------------------------------------------------------------------- Replicate / Partial


@pytest.mark.parametrize("spec", [Replicate(), Partial(), Partial("max")], ids=repr)
@pytest.mark.parametrize("group_ranks", [(0,), WORLD, (1, 3)])
def test_full_size_specs_metadata(spec: ShardingSpec, group_ranks: tuple[int, ...]) -> None:
    size = torch.Size([4, 6])
    metadata = spec.build_metadata(size, PROPS, group_ranks)
    assert metadata.size == size
    assert metadata.shards_metadata == [
        ShardMetadata([0, 0], [4, 6], f"rank:{rank}/cpu") for rank in group_ranks
    ]
    on_meta = spec.build_metadata(size, PROPS, group_ranks, device="meta")
    assert [str(shard.placement) for shard in on_meta.shards_metadata] == [
        f"rank:{rank}/meta" for rank in group_ranks
    ]
    on_cuda = spec.build_metadata(size, PROPS, group_ranks, device=torch.device("cuda", 1))
    assert {shard.placement.device() for shard in on_cuda.shards_metadata if shard.placement} == {
        torch.device("cuda", 1)
    }


def test_full_size_specs_value_semantics() -> None:
    assert Replicate() == Replicate()
    assert hash(Replicate()) == hash(Replicate())
    assert Partial() == Partial("sum")
    assert Partial("sum") != Partial("max")
    different: list[ShardingSpec] = [Partial(), Replicate()]
    assert different[0] != different[1]
    assert len({Partial(op) for op in ["sum", "avg", "max", "min", "sum"]}) == 4
    for spec in [Replicate(), Partial("avg")]:
        assert pickle.loads(pickle.dumps(spec)) == spec
    assert repr(Replicate()) == "Replicate()"
    assert repr(Partial("min")) == "Partial(reduce_op='min')"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Partial().reduce_op = "max"  # type: ignore[misc]
    with pytest.raises(ValueError, match="Unsupported reduce_op 'prod' for Partial"):
        Partial("prod")
