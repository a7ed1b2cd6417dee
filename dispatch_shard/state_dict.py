"""Module state with ShardedTensors: state-dict hooks and ``torch.load(weights_only=True)``.

ShardedTensor parameters and buffers need nothing special: ``module.state_dict()``
holds them as ShardedTensors, and ``module.load_state_dict`` copies into them
(``aten.copy_``), so a ShardedTensor of any layout is redistributed to the
parameter's layout and a dense tensor is sliced, each rank keeping its blocks.
The hooks here are for ShardedTensors held as plain module attributes, which
``state_dict`` does not see.

NOTE [weights_only loading]
``torch.load`` defaults to ``weights_only=True``, whose unpickler builds only
allowlisted globals. A pickled ShardedTensor names its rebuild function, its
spec, metadata and placement classes, and a record of the ranks at save time;
importing :mod:`dispatch_shard` allowlists exactly those
(``torch.serialization.add_safe_globals``), as ``torch.distributed.tensor``
does for DTensor. None of them runs code named by the file: the rebuild
function only validates the ranks and wraps the saved blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from dispatch_shard.metadata import (
    Placement,
    ShardedTensorMetadata,
    ShardMetadata,
    TensorProperties,
)
from dispatch_shard.sharded_tensor import ShardedTensor, _GroupState, _rebuild_sharded_tensor
from dispatch_shard.specs import ChunkShardingSpec, EnumerableShardingSpec, Partial, Replicate

__all__ = ["pre_load_state_dict_hook", "state_dict_hook"]


def _attribute_keys(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module, str]]:
    """``(state-dict key, owning module, attribute name)`` for every plain attribute."""
    found = []
    for submodule_name, submodule in module.named_modules():
        module_prefix = prefix + submodule_name
        for name in list(vars(submodule)):
            key = f"{module_prefix}.{name}" if module_prefix else name
            found.append((key, submodule, name))
    return found


def state_dict_hook(
    module: nn.Module, destination: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """Add the ShardedTensors held as plain attributes of ``module``'s tree to its state dict.

    Register on the root module, with ``module.register_state_dict_post_hook``
    (or the legacy ``module._register_state_dict_hook``). Keys are the
    attributes' paths, like parameters' (``"submodule.sharded_tensor2"``).
    torch marks a function registered with ``register_state_dict_post_hook`` and
    then refuses it for ``_register_state_dict_hook``: within one process, use
    one of the two registrations, or register ``functools.partial(state_dict_hook)``.
    """
    for key, submodule, name in _attribute_keys(module, prefix):
        value = vars(submodule)[name]
        if isinstance(value, ShardedTensor):
            destination[key] = value


def pre_load_state_dict_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load plain-attribute ShardedTensors of ``module``'s tree from the state dict.

    Register on the root module with ``module.register_load_state_dict_pre_hook``
    (or the legacy ``module._register_load_state_dict_pre_hook(hook, True)``).
    For each existing attribute whose path is a key: a ShardedTensor value
    replaces the attribute; a dense tensor is copied into an attribute that is
    already a ShardedTensor (each rank keeps its blocks). Keys used here are
    taken out of the (copied) state dict, so ``strict=True`` loading works.
    """
    for key, submodule, name in _attribute_keys(module, prefix):
        if key not in state_dict:
            continue
        value = state_dict[key]
        if isinstance(value, ShardedTensor):
            setattr(submodule, name, value)
        elif isinstance(value, torch.Tensor) and isinstance(vars(submodule)[name], ShardedTensor):
            with torch.no_grad():
                vars(submodule)[name].copy_(value)
        else:
            continue
        del state_dict[key]


# See NOTE [weights_only loading].
torch.serialization.add_safe_globals([
    _rebuild_sharded_tensor, _GroupState, ChunkShardingSpec, EnumerableShardingSpec,
    Replicate, Partial, Placement, ShardMetadata, ShardedTensorMetadata, TensorProperties,
])
