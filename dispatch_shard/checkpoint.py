"""Distributed checkpoints: ShardedTensors in ``torch.distributed.checkpoint`` (DCP).

A ShardedTensor of any layout works with ``torch.distributed.checkpoint.save`` and
``load`` as they are: it implements DCP's tensor-subclass protocol
(``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``,
the hooks DTensor implements), so DCP writes each block as a chunk of the global
tensor and, on load, reads into each block the parts of the saved chunks that
overlap it. Loading therefore reshards: a checkpoint written on W ranks with one
spec loads on W' ranks with another, and checkpoints written from DTensor or the
legacy ``torch.distributed._shard`` ShardedTensor load into ShardedTensors (and
the other way round), since all of them describe chunks of the global tensor.

This module adds:

* :func:`save` / :func:`load`: DCP to a folder, crash-safe (see NOTE [atomic
  checkpoints]);
* :func:`load_sharded_optimizer_state_dict`: optimizer state read from a checkpoint
  without an optimizer state to load into (optimizers create their state lazily),
  laid out like the model's parameters (the DCP function of that name, for
  ShardedTensor parameters);
* :func:`optim_state_dict_to_load`: an FQN-keyed optimizer state dict (the format of
  :meth:`NamedOptimizer.state_dict` and of DCP's ``get_optimizer_state_dict``) in the
  form a plain ``torch.optim`` optimizer's ``load_state_dict`` takes.

NOTE [ShardedTensors in DCP]
What each rank contributes, by layout (ranks outside the tensor's group: nothing):

* sharded (chunk, enumerable, several blocks per rank): one chunk per non-empty
  local block, at the block's offsets. Empty blocks are skipped (several empty
  blocks can share an offset); a tensor with no elements is written as one empty
  chunk so that it still has an entry in the checkpoint.
* :class:`~dispatch_shard.Replicate`: every member offers the whole tensor as one
  chunk at offset 0; DCP's deduplication (by chunk index) keeps one writer. On load
  every member reads the whole tensor.
* :class:`~dispatch_shard.Partial`: reduced before saving, then written like a
  replicated tensor. :func:`save` reduces every Partial tensor of the state dict
  before DCP starts. Given to ``torch.distributed.checkpoint.save`` directly, a
  Partial tensor is reduced (an all-reduce on its group) while DCP plans the
  save: every member must then save the same Partial tensors in the same order
  (the same state dict keys give that), and a planning error on one rank before
  that all-reduce leaves the others waiting in it. ``__get_tensor_shard__``
  serves the reduced value from the tensor's reduction cache (NOTE [a Partial is
  reduced at most once]), so writing issues no collective. Loading into a
  Partial tensor gives the loaded value to the first rank of the group and
  zeros to the others (every rank the value for ``max``/``min``/``avg``).

Loading writes into the live blocks of the tensors in the given state dict, in
place, like DCP does for DTensor.

NOTE [atomic checkpoints]
``save(state_dict, path)`` never writes into the checkpoint ``path`` names. Every
save writes a new sibling folder ``.<name>.v<32 hex digits>`` (the coordinator
draws the name and broadcasts it); only after every rank has finished (DCP's
final step, then a barrier) does the coordinator publish it by pointing the
symlink ``path`` at it: a new link is created beside ``path`` and renamed over
it (``os.replace``, atomic on POSIX). Until then ``path`` names the previous
checkpoint, complete, so a crash at any moment leaves a loadable checkpoint.
After publishing, the coordinator removes older ``.<name>.v*`` folders (the
previous version, and leftovers of saves that crashed hard); so a load that
runs while another job saves to the same path may lose its folder.
A save that fails on any rank (DCP collects the errors of its steps from every
rank) fails on every rank: the coordinator removes the new folder, a barrier
lets it finish, and then every rank raises. A process that dies mid-save
leaves the others waiting in a collective until the group's timeout; ``path``
is untouched. ``path`` must be absent, an empty folder, or a symlink written
by an earlier save; other ranks' file systems must show the same folder
(a shared file system, as DCP's FileSystemWriter assumes).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint._nested_dict import unflatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
)
from torch.distributed.checkpoint.metadata import TensorProperties as DcpTensorProperties
from torch.distributed.checkpoint.planner import (
    LoadPlanner,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

from dispatch_shard import collectives
from dispatch_shard.collectives import ProcessGroup

if TYPE_CHECKING:
    from dispatch_shard.sharded_tensor import ShardedTensor

__all__ = ["load", "load_sharded_optimizer_state_dict", "optim_state_dict_to_load", "save"]


# -- the DCP protocol (called by ShardedTensor's dunder hooks) -------------------------------

def _box(offsets: list[int] | tuple[int, ...], sizes: list[int] | tuple[int, ...]
         ) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))


def _whole(tensor: torch.Tensor) -> ChunkStorageMetadata:
    return _box([0] * tensor.dim(), list(tensor.shape))


def _local_blocks(tensor: ShardedTensor) -> Iterator[tuple[ChunkStorageMetadata, torch.Tensor]]:
    """The non-empty local blocks of a sharded or replicated tensor, with their boxes."""
    layout = tensor._layout
    if layout.is_replicate:
        if tensor._local_tensors:
            yield _whole(tensor), tensor._local_tensors[0]
        return
    for block, index in zip(tensor._local_tensors, layout.local_indices(tensor._rank),
                            strict=True):
        shard = layout.shards[index]
        if block.numel() > 0:
            yield _box(shard.shard_offsets, shard.shard_sizes), block


def _is_member(tensor: ShardedTensor) -> bool:
    return collectives.is_member(tensor._process_group, tensor._rank)


def _fresh_reduction(tensor: ShardedTensor) -> ShardedTensor | None:
    """A Partial tensor's cached reduction, if it has not changed since (members only)."""
    if not tensor._local_tensors:
        return None
    return tensor._cached_reduction()


def _create_write_items(tensor: ShardedTensor, fqn: str) -> list[WriteItem]:
    """This rank's chunks of ``tensor`` for DCP's save plan (see NOTE [ShardedTensors in DCP])."""
    if not _is_member(tensor):
        return []
    value = tensor._reduced() if tensor._layout.pending else tensor  # collective if pending
    if tensor.numel() == 0:
        chunks = [_whole(tensor)]
    else:
        chunks = [box for box, _ in _local_blocks(value)]
    properties = DcpTensorProperties(
        dtype=tensor.dtype, layout=torch.strided, requires_grad=tensor.requires_grad,
        memory_format=torch.contiguous_format, pin_memory=False,
    )
    return [
        WriteItem(
            index=MetadataIndex(fqn, chunk.offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=tensor.size()),
        )
        for chunk in chunks
    ]


def _create_chunk_list(tensor: ShardedTensor) -> list[ChunkStorageMetadata]:
    """The boxes this rank loads into (see NOTE [ShardedTensors in DCP]).

    For a Partial tensor this also zeroes the summands of the ranks that load nothing.
    """
    if not _is_member(tensor) or tensor.numel() == 0:
        return []
    layout = tensor._layout
    if layout.pending and not layout.local_indices(tensor._rank):
        return []  # (a mesh position that holds no block of a spec placement)
    if layout.pending:
        with contextlib.suppress(AttributeError):  # the summand is about to be overwritten
            del tensor._reduced_cache
        term = layout.summand_classes()[layout.local_indices(tensor._rank)[0]]
        if layout.reduce_op in ("max", "min", "avg") or term == 0:
            # The first term of each reduction (every term for max, min, avg) loads the
            # value; the other terms of a sum hold zero.
            return [box for box, _ in _local_blocks(tensor)] if layout.is_mesh \
                else [_whole(tensor)]
        with torch.no_grad():
            tensor._local_tensors[0].zero_()
        return []
    return [box for box, _ in _local_blocks(tensor)]


def _get_tensor_shard(tensor: ShardedTensor, index: MetadataIndex) -> torch.Tensor:
    """The local tensor DCP reads from (save) or copies into (load) for chunk ``index``."""
    if tensor._layout.pending:
        reduced = _fresh_reduction(tensor)
        # Save: the reduction made while planning. Load: the summand itself.
        tensor = reduced if reduced is not None else tensor
        if len(tensor._local_tensors) == 1:
            return tensor._local_tensors[0]  # (else one of several blocks, by its offset)
    if tensor.numel() == 0:
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    offsets = torch.Size(index.offset) if index.offset is not None else None
    for box, block in _local_blocks(tensor):
        if offsets is None or box.offsets == offsets:
            return block
    raise ValueError(f"Could not find shard at '{index.offset}' for FQN: '{index.fqn}' "
                     f"on rank {tensor._rank}")


# -- crash-safe save and load ----------------------------------------------------------------

_VERSION = re.compile(r"v[0-9a-f]{32}")


def _group(process_group: ProcessGroup | None) -> ProcessGroup | None:
    """The group to coordinate on; ``None`` when torch.distributed is not in use."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return collectives.resolve_group(None)
    return None


@contextlib.contextmanager
def _single_process(group: ProcessGroup | None) -> Iterator[None]:
    """Without a group DCP runs in one process, as asked: no warning that it assumes so."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _broadcast(value: Any, group: ProcessGroup | None, coordinator_rank: int) -> Any:
    if group is None or dist.get_world_size(group) == 1:
        return value
    mine = value if dist.get_rank(group) == coordinator_rank else None
    return collectives.all_gather_object(mine, group)[coordinator_rank]


def _agree(error: BaseException | None, group: ProcessGroup | None,
           cleanup: Callable[[], None] | None = None) -> None:
    """Raise on every rank if ``error`` is set on any; ``cleanup`` runs first (on callers
    that pass it), behind a barrier so no rank raises before it finished."""
    if group is None or dist.get_world_size(group) == 1:
        reports = [None if error is None else repr(error)]
    else:
        reports = collectives.all_gather_object(None if error is None else repr(error), group)
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if not failed:
        return
    if cleanup is not None:
        cleanup()
    if group is not None and dist.get_world_size(group) > 1:
        dist.barrier(group=group)
    if error is not None:
        raise error
    rank, report = failed[0]
    raise RuntimeError(f"checkpoint: group rank {rank} failed: {report}")


def _is_coordinator(group: ProcessGroup | None, coordinator_rank: int) -> bool:
    return group is None or dist.get_rank(group) == coordinator_rank


def _versions(path: str) -> Iterator[str]:
    parent, name = os.path.split(path)
    prefix = f".{name}."
    for entry in os.listdir(parent or "."):
        if entry.startswith(prefix) and _VERSION.fullmatch(entry[len(prefix):]):
            yield os.path.join(parent, entry)


def _check_target(path: str) -> None:
    if os.path.islink(path) or not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)  # an empty folder made for us: the link takes its place
        return
    raise FileExistsError(
        f"checkpoint path {path!r} exists and is not a checkpoint written by "
        "dispatch_shard.checkpoint.save (a symlink): choose another path or remove it"
    )


def _publish(path: str, version: str) -> None:
    """Point ``path`` at the folder ``version`` atomically; remove older versions.

    Raises only if ``path`` still names the previous checkpoint.
    """
    link = f"{version}.link"
    os.symlink(os.path.basename(version), link)  # relative: the folder may move
    try:
        os.replace(link, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(link)
        raise
    # Published: nothing below may fail the save.
    with contextlib.suppress(OSError):
        descriptor = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(descriptor)  # make the rename durable
        finally:
            os.close(descriptor)
    for old in _versions(path):
        if old != version:
            shutil.rmtree(old, ignore_errors=True)


def save(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    process_group: ProcessGroup | None = None,
    planner: SavePlanner | None = None,
    storage_writer: Callable[[str], StorageWriter] | None = None,
    coordinator_rank: int = 0,
) -> Metadata:
    """Save ``state_dict`` to the checkpoint ``path`` with DCP, replacing it atomically.

    Every rank of ``process_group`` (default: the default group) calls it with
    its state dict (nested dicts and lists of ShardedTensors, DTensors, tensors
    and picklable objects, as for ``torch.distributed.checkpoint.save``). The
    checkpoint is written to a new folder beside ``path``, and ``path`` (a
    symlink) is switched to it only after every rank has finished; see NOTE
    [atomic checkpoints]. Until then, and if the save fails, ``path`` still
    names the previous checkpoint.

    Args:
        state_dict: what to save.
        path: the checkpoint; absent, an empty folder, or a symlink written by
            an earlier :func:`save`.
        process_group: the ranks that save (default: the default group).
        planner: a DCP ``SavePlanner`` (default: DCP's default planner).
        storage_writer: builds the ``StorageWriter`` for a folder (default:
            ``torch.distributed.checkpoint.FileSystemWriter``).
        coordinator_rank: the group rank that writes the metadata and publishes.

    Returns:
        The checkpoint's DCP metadata.

    Raises:
        FileExistsError: ``path`` is something else than the above (on every rank).
        Exception: a failure on any rank is raised on every rank (DCP's
            ``CheckpointException`` for failures while writing); the previous
            checkpoint is left as it was.
    """
    group = _group(process_group)
    coordinator = _is_coordinator(group, coordinator_rank)
    target = os.path.abspath(os.fspath(path))
    error: BaseException | None = None
    if coordinator:
        try:
            _check_target(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
        except OSError as exc:
            error = exc
    _agree(error, group)
    # The coordinator's absolute path and a fresh name, the same on every rank.
    target, token = _broadcast((target, uuid.uuid4().hex), group, coordinator_rank)
    parent, name = os.path.split(target)
    version = os.path.join(parent, f".{name}.v{token}")

    def remove_version() -> None:
        if coordinator:
            shutil.rmtree(version, ignore_errors=True)

    metadata: Metadata | None = None
    try:
        state_dict = _reduce_partials(state_dict)  # no collective inside DCP's planning
        writer = (storage_writer or FileSystemWriter)(version)
        with _single_process(group):
            metadata = dcp_save(state_dict, storage_writer=writer, planner=planner,
                                process_group=group, no_dist=group is None)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        error = exc
    _agree(error, group, remove_version)
    if group is not None and dist.get_world_size(group) > 1:
        dist.barrier(group=group)  # every rank finished writing
    if coordinator:
        try:
            _publish(target, version)
        except OSError as exc:
            error = exc
    _agree(error, group, remove_version)
    assert metadata is not None
    return metadata


def _reduce_partials(value: Any) -> Any:
    """``value`` with every Partial ShardedTensor in its dicts and lists (what DCP
    traverses) reduced: copies of the containers that hold one, the rest as it is."""
    from dispatch_shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return value._reduced() if value._layout.pending else value
    if isinstance(value, dict):
        items = {key: _reduce_partials(item) for key, item in value.items()}
        changed = any(items[key] is not item for key, item in value.items())
        return items if changed else value
    if isinstance(value, list):
        reduced = [_reduce_partials(item) for item in value]
        return reduced if any(a is not b for a, b in zip(reduced, value, strict=True)) else value
    return value


def _resolved(path: str | os.PathLike[str], group: ProcessGroup | None,
              coordinator_rank: int) -> str:
    """The folder ``path`` names now, the same on every rank (a save may swap it later)."""
    resolved = os.path.realpath(os.fspath(path)) if _is_coordinator(group, coordinator_rank) \
        else None
    return cast(str, _broadcast(resolved, group, coordinator_rank))


def load(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    process_group: ProcessGroup | None = None,
    planner: LoadPlanner | None = None,
    coordinator_rank: int = 0,
) -> None:
    """Load the checkpoint ``path`` into ``state_dict``, in place (DCP; reshards).

    The counterpart of :func:`save`; ``path`` may also be a folder written by
    ``torch.distributed.checkpoint.save``. Every rank reads the checkpoint that
    ``path`` named when the coordinator resolved it, even if a save publishes
    a new one meanwhile. ShardedTensors, DTensors and tensors in ``state_dict``
    receive the saved values whatever layout, world size or tensor type saved
    them; other values are replaced by the saved objects.
    """
    group = _group(process_group)
    folder = _resolved(path, group, coordinator_rank)
    with _single_process(group):
        dcp_load(state_dict, storage_reader=FileSystemReader(folder), planner=planner,
                 process_group=group, no_dist=group is None)


# -- optimizer state -------------------------------------------------------------------------

def load_sharded_optimizer_state_dict(
    model_state_dict: Mapping[str, Any],
    optimizer_key: str,
    storage_reader: StorageReader | str | os.PathLike[str],
    planner: LoadPlanner | None = None,
    *,
    process_group: ProcessGroup | None = None,
) -> dict[str, Any]:
    """Read the optimizer state saved under ``optimizer_key``, laid out like the parameters.

    Optimizers create their state lazily (at the first step), so a fresh one has
    no state to load into. This builds it from the checkpoint's metadata: a saved
    state tensor of parameter ``fqn`` with the parameter's size becomes a
    ShardedTensor laid out like ``model_state_dict[fqn]`` (on its process group)
    when that is a ShardedTensor, a dense tensor otherwise (``step`` counters);
    other entries are read as saved. The saved state was keyed by parameter
    names (:meth:`~dispatch_shard.NamedOptimizer.state_dict`, or DCP's
    ``get_optimizer_state_dict``). ``storage_reader`` may be a checkpoint path
    (:func:`load`'s).

    Returns:
        ``{optimizer_key: {"state": {fqn: {...}}, "param_groups": [...]}}``; load it
        with :meth:`NamedOptimizer.load_state_dict` (once its state exists), or into
        a plain optimizer with :func:`optim_state_dict_to_load`.
    """
    from dispatch_shard.sharded_tensor import ShardedTensor

    group = _group(process_group)
    if isinstance(storage_reader, str | os.PathLike):
        storage_reader = FileSystemReader(_resolved(storage_reader, group, 0))
    metadata = storage_reader.read_metadata()
    paths = metadata.planner_data
    if not isinstance(paths, dict):
        raise ValueError("load_sharded_optimizer_state_dict: the checkpoint was saved without "
                         "flattening (DCP's planner_data is missing)")
    state: dict[str, Any] = {}
    for key, entry in metadata.state_dict_metadata.items():
        key_path = paths[key]
        if key_path[0] != optimizer_key:
            continue
        if isinstance(entry, BytesStorageMetadata):
            state[key] = "<bytes_io>"
            continue
        param = (model_state_dict.get(str(key_path[2]))
                 if len(key_path) > 3 and key_path[1] == "state" else None)
        dtype = entry.properties.dtype
        if isinstance(param, ShardedTensor) and param.shape == entry.size:
            state[key] = torch.empty_like(param, dtype=dtype)  # the parameter's layout
        else:
            state[key] = torch.empty(entry.size, dtype=dtype)
    with _single_process(group):
        dcp_load(state, storage_reader=storage_reader, planner=planner, process_group=group,
                 no_dist=group is None)
    return unflatten_state_dict(state, paths)


def optim_state_dict_to_load(
    model: nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    optim_state_dict: Mapping[str, Any],
) -> dict[str, Any]:
    """An FQN-keyed optimizer state dict in the form ``optimizer.load_state_dict`` takes.

    ``optim_state_dict`` maps parameter names to their state (``"state"``) and
    lists parameter names in its ``"param_groups"``, as
    :meth:`NamedOptimizer.state_dict`, DCP's ``get_optimizer_state_dict`` and
    :func:`load_sharded_optimizer_state_dict` give it. ``model`` names the
    parameters (a module, or a name -> parameter mapping). Each of the optimizer's
    groups takes the hyperparameters of the saved group holding its first
    parameter; parameters without saved state get none.

    Raises:
        ValueError: an optimizer parameter that ``model`` does not name, or a
            group whose parameters are not in any saved group.
    """
    named = dict(model.named_parameters()) if isinstance(model, nn.Module) else dict(model)
    names = {id(param): name for name, param in named.items()}
    saved_state = optim_state_dict["state"]
    saved_groups = list(optim_state_dict["param_groups"])
    state: dict[int, Any] = {}
    groups: list[dict[str, Any]] = []
    position = 0
    for group in optimizer.param_groups:
        ids = []
        fqns = []
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(f"optim_state_dict_to_load: an optimizer parameter of size "
                                 f"{tuple(param.shape)} has no name in the model")
            fqn = names[id(param)]
            if fqn in saved_state:
                state[position] = saved_state[fqn]
            ids.append(position)
            fqns.append(fqn)
            position += 1
        source = next((g for g in saved_groups if not fqns or fqns[0] in g["params"]), None)
        if source is None:
            raise ValueError(f"optim_state_dict_to_load: no saved param group holds {fqns[0]!r}")
        groups.append({**{k: v for k, v in source.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}
