"""Plain, picklable, comparable values that describe a sharded tensor.

* :class:`Placement` -- where a shard lives: a global rank and a device
  (``"rank:N/device"``), compatible with the ``rank()`` / ``device()``
  accessors of torch's legacy ``_remote_device``.
* :class:`ShardMetadata` -- one rectangular block of the global tensor
  (offsets, sizes, placement).
* :class:`TensorProperties` -- dtype, layout, requires_grad, memory format and
  pinning of the global tensor.
* :class:`ShardedTensorMetadata` -- every block of a tensor, its global size
  and its properties.
* :class:`Shard` -- a local tensor together with its :class:`ShardMetadata`.

# NOTE [Metadata values are shared, never mutated]
Sharding specs cache the :class:`ShardedTensorMetadata` they build (see
``dispatch_shard.specs``), so one metadata object, and the
:class:`ShardMetadata` objects inside it, are shared by every tensor built
from the same spec, size and properties. :class:`Placement`,
:class:`TensorProperties` and :class:`ShardedTensorMetadata` are frozen.
:class:`ShardMetadata` keeps ``shard_offsets`` / ``shard_sizes`` as plain lists
for compatibility with the legacy API (users compare them with lists), and its
hash is computed from their contents: treat an instance as immutable once it
has been built. Use ``dataclasses.replace`` (or a new instance) to derive a
changed value.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from collections.abc import Iterable, Sequence
from typing import Final, NoReturn, final

import torch

__all__ = [
    "Placement",
    "Shard",
    "ShardMetadata",
    "ShardedTensorMetadata",
    "TensorProperties",
]


_PLACEMENT_PATTERN: Final = re.compile(r"rank:(\d+)/(.+)", re.ASCII)
_PLACEMENT_FORMAT: Final = "'rank:<global rank>/<device>', e.g. 'rank:0/cpu' or 'rank:1/cuda:1'"


@final
class Placement:
    """Where a shard lives: a *global* rank and a device, ``"rank:N/device"``.

    Immutable, hashable and picklable. ``str(placement)`` gives the canonical
    text (``"rank:2/cpu"``, ``"rank:1/cuda:1"``), which :meth:`parse` accepts
    back. The accessors :meth:`rank` and :meth:`device` match torch's legacy
    ``torch.distributed._remote_device``.

    Args:
        rank: global rank of the process holding the shard (``>= 0``).
        device: the device on that rank, as a string or ``torch.device``.

    Raises:
        ValueError: ``rank`` is negative or ``device`` is not a valid device.
        TypeError: ``rank`` is not an int.
    """

    __slots__ = ("_device", "_device_text", "_rank")

    _rank: int
    _device_text: str
    _device: torch.device

    def __init__(self, rank: int, device: str | torch.device = "cpu") -> None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"Placement rank must be an int, found {type(rank).__name__}")
        if rank < 0:
            raise ValueError(f"Placement rank must be >= 0, found {rank}")
        if isinstance(device, torch.device):
            torch_device = device
        elif isinstance(device, str):
            try:
                torch_device = torch.device(device)
            except RuntimeError as error:
                raise ValueError(f"Invalid placement device {device!r}: {error}") from None
        else:
            raise TypeError(
                f"Placement device must be a str or torch.device, found {type(device).__name__}"
            )
        object.__setattr__(self, "_rank", rank)
        object.__setattr__(self, "_device_text", str(torch_device))
        object.__setattr__(self, "_device", torch_device)

    @classmethod
    def parse(cls, placement: str | Placement) -> Placement:
        """Return ``placement`` as a :class:`Placement`.

        Accepts a :class:`Placement` (returned unchanged), its text form
        ``"rank:N/device"`` where ``N`` is a global rank, or a legacy
        ``torch.distributed._remote_device`` of that form.

        Raises:
            ValueError: any other text, e.g. ``"worker0/cuda:1"``, ``"rank:x/cpu"``
                or ``"cpu"`` (worker names and bare devices are not supported).
            TypeError: ``placement`` is neither a string nor a placement.
        """
        if isinstance(placement, Placement):
            return placement
        if isinstance(placement, str):
            text = placement
        else:
            from torch.distributed.remote_device import _remote_device

            if not isinstance(placement, _remote_device):
                raise TypeError(
                    "A placement must be a str or Placement, found "
                    f"{type(placement).__name__}: {placement!r}"
                )
            text = str(placement)
        return _parse_placement_text(text)

    def rank(self) -> int:
        """The global rank holding the shard."""
        return self._rank

    def device(self) -> torch.device:
        """The device of the shard on :meth:`rank`."""
        return self._device

    def __str__(self) -> str:
        return f"rank:{self._rank}/{self._device_text}"

    def __repr__(self) -> str:
        return f"Placement('{self}')"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self._rank == other._rank and self._device_text == other._device_text

    def __hash__(self) -> int:
        return hash((self._rank, self._device_text))

    def __reduce__(self) -> tuple[type[Placement], tuple[int, str]]:
        return (Placement, (self._rank, self._device_text))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"Placement is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"Placement is immutable; cannot delete {name!r}")


@functools.lru_cache(maxsize=4096)
def _parse_placement_text(text: str) -> Placement:
    """Parse ``"rank:N/device"`` (cached: placements are immutable, so sharing is safe)."""
    match = _PLACEMENT_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"Invalid placement {text!r}: the supported format is {_PLACEMENT_FORMAT}")
    try:
        return Placement(int(match.group(1)), match.group(2))
    except ValueError as error:
        raise ValueError(f"Invalid placement {text!r}: {error}") from None


def _non_negative_ints(values: Iterable[int], name: str) -> list[int]:
    """``values`` as a list of ints, each ``>= 0``."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of ints, found {values!r}")
    result: list[int] = []
    for value in values:
        if isinstance(value, bool):
            raise TypeError(f"{name} must hold ints, found {value!r}")
        try:
            integer = operator.index(value)
        except TypeError:
            raise TypeError(
                f"{name} must hold ints, found {type(value).__name__}: {value!r}"
            ) from None
        result.append(integer)
    if any(integer < 0 for integer in result):
        raise ValueError(f"{name} should be >= 0, found {result}")
    return result


class ShardMetadata:
    """One rectangular block of a global tensor and where it lives.

    The block covers ``[shard_offsets[d], shard_offsets[d] + shard_sizes[d])``
    along every dim ``d``. ``shard_offsets`` and ``shard_sizes`` are stored as
    ``list[int]`` (like the legacy API); ``placement`` accepts ``"rank:N/device"``
    text or a :class:`Placement` and is stored as a :class:`Placement` (or
    ``None``).

    Equality, hashing and pickling go by value. The hash is computed from the
    lists' contents, so an instance must not be mutated after it is built
    (see NOTE [Metadata values are shared, never mutated]).

    Raises:
        ValueError: offsets and sizes differ in length, or a value is negative.
        TypeError: an offset or size is not an int.
    """

    __slots__ = ("placement", "shard_offsets", "shard_sizes")

    shard_offsets: list[int]
    shard_sizes: list[int]
    placement: Placement | None

    def __init__(
        self,
        shard_offsets: Sequence[int],
        shard_sizes: Sequence[int],
        placement: str | Placement | None = None,
    ) -> None:
        offsets = _non_negative_ints(shard_offsets, "shard_offsets")
        sizes = _non_negative_ints(shard_sizes, "shard_sizes")
        if len(offsets) != len(sizes):
            raise ValueError(
                "shard_offsets and shard_sizes should have the same number of elements, "
                f"found {len(offsets)} and {len(sizes)} respectively"
            )
        self.shard_offsets = offsets
        self.shard_sizes = sizes
        self.placement = None if placement is None else Placement.parse(placement)

    def _key(self) -> tuple[tuple[int, ...], tuple[int, ...], Placement | None]:
        return (tuple(self.shard_offsets), tuple(self.shard_sizes), self.placement)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardMetadata):
            return NotImplemented
        return (
            self.shard_offsets == other.shard_offsets
            and self.shard_sizes == other.shard_sizes
            and self.placement == other.placement
        )

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(
        self,
    ) -> tuple[type[ShardMetadata], tuple[list[int], list[int], Placement | None]]:
        return (ShardMetadata, (self.shard_offsets, self.shard_sizes, self.placement))

    def __repr__(self) -> str:
        placement = "None" if self.placement is None else f"'{self.placement}'"
        return (
            f"ShardMetadata(shard_offsets={self.shard_offsets}, "
            f"shard_sizes={self.shard_sizes}, placement={placement})"
        )


_MEMORY_FORMAT_NAMES: Final[dict[torch.memory_format, str]] = {
    torch.contiguous_format: "contiguous_format",
    torch.channels_last: "channels_last",
    torch.channels_last_3d: "channels_last_3d",
    torch.preserve_format: "preserve_format",
}
_MEMORY_FORMATS_BY_NAME: Final[dict[str, torch.memory_format]] = {
    name: memory_format for memory_format, name in _MEMORY_FORMAT_NAMES.items()
}


@dataclasses.dataclass(frozen=True)
class TensorProperties:
    """Properties of a (global) tensor: what a factory function needs besides its size.

    Frozen, comparable, hashable and picklable (``memory_format`` travels by
    name, since torch does not promise that ``torch.memory_format`` pickles).
    """

    dtype: torch.dtype = torch.float32
    layout: torch.layout = torch.strided
    requires_grad: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, found {self.dtype!r}")
        if not isinstance(self.layout, torch.layout):
            raise TypeError(f"layout must be a torch.layout, found {self.layout!r}")
        if self.memory_format not in _MEMORY_FORMAT_NAMES:
            raise TypeError(
                f"memory_format must be one of {sorted(_MEMORY_FORMATS_BY_NAME)}, "
                f"found {self.memory_format!r}"
            )

    @classmethod
    def create_from_tensor(cls, tensor: torch.Tensor) -> TensorProperties:
        """The properties of ``tensor`` (memory format: ``torch.contiguous_format``, as legacy)."""
        return cls(
            dtype=tensor.dtype,
            layout=tensor.layout,
            requires_grad=tensor.requires_grad,
            memory_format=torch.contiguous_format,
            pin_memory=tensor.is_pinned(),
        )

    def __getstate__(self) -> tuple[torch.dtype, torch.layout, bool, str, bool]:
        return (
            self.dtype,
            self.layout,
            self.requires_grad,
            _MEMORY_FORMAT_NAMES[self.memory_format],
            self.pin_memory,
        )

    def __setstate__(self, state: tuple[torch.dtype, torch.layout, bool, str, bool]) -> None:
        dtype, layout, requires_grad, memory_format_name, pin_memory = state
        try:
            memory_format = _MEMORY_FORMATS_BY_NAME[memory_format_name]
        except KeyError:
            raise ValueError(f"Invalid memory format name: {memory_format_name!r}") from None
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "requires_grad", requires_grad)
        object.__setattr__(self, "memory_format", memory_format)
        object.__setattr__(self, "pin_memory", pin_memory)


@dataclasses.dataclass(frozen=True)
class ShardedTensorMetadata:
    """Every block of a sharded tensor, its global size and its properties.

    Frozen and comparable; hashing raises ``TypeError`` (``shards_metadata`` is
    a list, as in the legacy API). ``size`` is stored as ``torch.Size`` and
    ``shards_metadata`` as a list. Instances built by a sharding spec are
    cached and shared: never mutate them
    (see NOTE [Metadata values are shared, never mutated]).
    """

    shards_metadata: list[ShardMetadata] = dataclasses.field(default_factory=list)
    size: torch.Size = dataclasses.field(default_factory=torch.Size)
    tensor_properties: TensorProperties = dataclasses.field(default_factory=TensorProperties)

    def __post_init__(self) -> None:
        if not isinstance(self.shards_metadata, list):
            object.__setattr__(self, "shards_metadata", list(self.shards_metadata))
        if not isinstance(self.size, torch.Size):
            object.__setattr__(self, "size", torch.Size(self.size))


@dataclasses.dataclass(slots=True, eq=False)
class Shard:
    """A local tensor and the :class:`ShardMetadata` of the block it holds.

    Compared by identity (comparing tensors elementwise has no single truth
    value).

    Raises:
        ValueError: the tensor's size differs from ``metadata.shard_sizes``, or
            its device differs from the placement's device.
    """

    tensor: torch.Tensor
    metadata: ShardMetadata

    def __post_init__(self) -> None:
        tensor_size = list(self.tensor.size())
        if tensor_size != self.metadata.shard_sizes:
            raise ValueError(
                "Shard tensor size does not match with metadata.shard_lengths! "
                f"Found shard tensor size: {tensor_size}, "
                f"metadata.shard_lengths: {self.metadata.shard_sizes}"
            )
        placement = self.metadata.placement
        if placement is not None and placement.device() != self.tensor.device:
            raise ValueError(
                "Local shard tensor device does not match with local Shard's placement! "
                f"Found local shard tensor device: {self.tensor.device}, "
                f"local shard metadata placement device: {placement.device()}"
            )

    @classmethod
    def from_tensor_and_offsets(
        cls, tensor: torch.Tensor, shard_offsets: Sequence[int], rank: int
    ) -> Shard:
        """A shard holding ``tensor`` at ``shard_offsets``, placed on global ``rank``.

        The placement is ``f"rank:{rank}/{tensor.device}"`` and the sizes are
        the tensor's.
        """
        metadata = ShardMetadata(
            shard_offsets=shard_offsets,
            shard_sizes=list(tensor.size()),
            placement=Placement(rank, tensor.device),
        )
        return cls(tensor, metadata)
