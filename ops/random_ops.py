"""Random ops that make a new tensor from their inputs.

``randint_like``, ``bernoulli`` (a float ``p``), ``poisson``, ``binomial``,
``_standard_gamma``, ``rrelu_with_noise`` (``F.rrelu`` in training), ``multinomial``
and ``_sample_dirichlet``. (The in-place fills, ``bernoulli_``, ``uniform_``... and
``rand_like``/``randn_like`` are in ``factory.py``; dropout reaches those.)

Per rank, outside :func:`dispatch_shard.random.dense_equivalent`:

- an elementwise op (every op here but ``multinomial`` and ``_sample_dirichlet``,
  whose draws read a whole row) on a block-sharded input: each block ``[b_i] ->
  op(b_i, ...)``, drawn from the rank's generator in block order, the other tensor
  arguments cut to the block; no collectives;
- otherwise (a replicated input, a row-wise op, an argument of another shape): the
  group's first rank draws on the whole values and broadcasts the result, so every copy
  of it is the same. Collectives: an all-gather per sharded input, a broadcast per result.

Inside ``dense_equivalent()`` every rank runs the dense op on the whole values (an
all-gather per sharded input): the dense op's stream, drawn alike on every rank, and
no broadcast.

A result of the input's shape keeps its layout, another is replicated. A Partial input
is reduced first (the registry does that: these ops are not linear). A mutated argument
(``rrelu_with_noise``'s ``noise``) gets its new values in its own blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from dispatch_shard import collectives
from dispatch_shard.ops._common import (
    first_sharded,
    in_group,
    meta_results,
    outside_result,
    pieces_of,
    replicated_result,
    whole,
)
from dispatch_shard.random import is_dense_equivalent
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

aten = torch.ops.aten

# The ops whose every output element is drawn from the same element of the inputs.
_ELEMENTWISE = (aten.randint_like, aten.bernoulli, aten.poisson, aten.binomial,
                aten._standard_gamma, aten.rrelu_with_noise)
# Draws that read a whole row: drawn on the whole value.
_ROWWISE = (aten.multinomial, aten._sample_dirichlet)
# Arguments the op writes into (position in ``args``): they must get the draw too.
_MUTATED = {aten.rrelu_with_noise: 1}


def _results(packet: Any, anchor: ShardedTensor, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> list[tuple[torch.Size, torch.dtype]]:
    """Result sizes and dtypes from a meta run. ``binomial`` and ``_sample_dirichlet`` have
    no meta kernel; their result has their first argument's size and dtype."""
    try:
        return meta_results(packet, args, kwargs)
    except NotImplementedError:
        if packet is aten.multinomial:
            raise
        return [(args[0].shape, args[0].dtype)]


def _per_block(packet: Any, anchor: ShardedTensor, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> ShardedTensor:
    """Each block drawn from this rank's generator, in block order."""
    layout, rank = anchor._layout, anchor._rank
    count = len(anchor._local_tensors)

    def parts(value: Any) -> list[Any]:
        if not isinstance(value, torch.Tensor):
            return [value] * count
        if value.dim() == 0:
            return [whole(value)] * count
        return pieces_of(value, layout, rank)

    columns = [parts(a) for a in args]
    named = {k: parts(v) for k, v in kwargs.items()}
    blocks = [packet(*(c[i] for c in columns), **{k: v[i] for k, v in named.items()})
              for i in range(count)]
    dtype = blocks[0].dtype if blocks else _results(packet, anchor, args, kwargs)[0][1]
    return anchor._like(blocks, dtype=dtype)


def _on_whole_values(packet: Any, anchor: ShardedTensor, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
    """The dense op on the whole values: on every rank inside ``dense_equivalent()``,
    else on the group's first rank, broadcast."""
    results = _results(packet, anchor, args, kwargs)
    if not in_group(anchor):
        return outside_result(anchor, results)
    operands, named = whole(args), {k: whole(v) for k, v in kwargs.items()}
    first = anchor._layout.group_ranks[0]
    if is_dense_equivalent() or anchor._rank == first:
        value = packet(*operands, **named)
    else:
        value = tuple(torch.empty(size, dtype=dtype, device=anchor.device)
                      for size, dtype in results)
        value = value if len(value) > 1 else value[0]
    mutated = _MUTATED.get(packet)
    written = [operands[mutated]] if mutated is not None else []
    if not is_dense_equivalent():
        for tensor in [*pytree.tree_leaves(value), *written]:
            collectives.broadcast(tensor, first, anchor._process_group)
    if mutated is not None and isinstance(args[mutated], ShardedTensor):
        target: ShardedTensor = args[mutated]
        for block, piece in zip(target._local_tensors,
                                pieces_of(written[0], target._layout, target._rank),
                                strict=True):
            block.copy_(piece)

    def wrap(tensor: torch.Tensor) -> ShardedTensor:
        if tensor.shape == anchor.shape and not anchor._layout.is_partial:
            return anchor._like([p.clone() for p in pieces_of(tensor, anchor._layout,
                                                                anchor._rank)],
                                dtype=tensor.dtype)
        return replicated_result(anchor, tensor, tensor.shape, tensor.dtype)

    return pytree.tree_map_only(torch.Tensor, wrap, value)


def _register(packet: Any) -> None:
    elementwise = packet in _ELEMENTWISE

    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             process_group: Any) -> Any:
        anchor = first_sharded(args, kwargs)
        mutated = _MUTATED.get(packet)
        blockwise = (
            elementwise and not is_dense_equivalent() and anchor._layout.is_sharded
            and all(t.dim() == 0 or t.shape == anchor.shape
                    for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            # a written argument must be laid out as the input, to be written in place
            and (mutated is None or (isinstance(args[mutated], ShardedTensor)
                                     and args[mutated]._layout is anchor._layout)))
        if blockwise:
            return _per_block(packet, anchor, args, kwargs)
        return _on_whole_values(packet, anchor, args, kwargs)

    impl.__name__ = impl.__qualname__ = f"sharded_{packet.__name__}"
    impl.__doc__ = (f"``{packet.__name__}``: " + (
        "per block from each rank's generator on a block-sharded input (no collectives); "
        if elementwise else "") + "otherwise drawn on the whole values by the first rank "
        "and broadcast; inside dense_equivalent() the dense draw on every rank.")
    custom_sharded_op_impl(packet)(impl)


for _packet in (*_ELEMENTWISE, *_ROWWISE):
    _register(_packet)
