"""Random ops that give the dense values: :func:`dense_equivalent`.

By default a random op on a sharded tensor draws each block from its rank's
generator, in block order: cheap, but the values depend on the layout and the world
size, so a model with dropout trains differently at every world size and cannot be
compared with its dense self. Inside :func:`dense_equivalent`, a random op on a
ShardedTensor (``dropout``, ``rrelu``, the in-place fills ``bernoulli_``, ``normal_``,
``uniform_``..., ``rand_like``, ``randn_like``, ``randint_like``, ``bernoulli``,
``poisson``, ``binomial``, ``multinomial``...) gives exactly the values the dense op
gives after the same ``torch.manual_seed``, at any world size and layout:

- every rank draws the whole tensor from its default generator, as the dense op
  does, and keeps its blocks (so every rank's generator advances as the dense
  program's does, and the next draw agrees too);
- a replicated result needs no broadcast; a Partial one keeps the draw on its first
  rank and zeros elsewhere.

Costs: each rank draws (and briefly holds) the whole tensor, and a probability
tensor argument (``bernoulli_(p)``) is gathered. CPU generators cannot skip ahead, so
the draw cannot be limited to a rank's range; ``nox -s bench`` (section 9) measures it.

NOTE [random draws follow the dense memory order]
A dense random fill draws in memory order, and ``empty_like`` keeps its input's
strides: ``F.dropout`` of a transposed view draws the same numbers as of its
contiguous copy, but lays them out transposed. A ShardedTensor reports contiguous
strides whatever view made it, so the whole tensor is drawn in logical (row-major)
order: the values equal dense's exactly when the dense operand is contiguous (or its
memory order is row-major), as it is in the usual places of dropout (after a linear,
an activation, a residual sum, torch's ``[seq, batch, features]`` attention). After a
transposing view (``nn.MultiheadAttention`` with ``batch_first=True`` hands its
dropout such a view) the same numbers land in another order: still a correct
dropout, and the generator still advances as dense's, but not dense's mask.

Every rank must have seeded its generator alike; entering the context checks that
(one small all_gather of a digest of each rank's generator state) and raises on every
rank if they differ.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from dispatch_shard import collectives

__all__ = ["dense_equivalent", "is_dense_equivalent"]

_depth = 0


def is_dense_equivalent() -> bool:
    """True inside :func:`dense_equivalent`."""
    return _depth > 0


@contextlib.contextmanager
def dense_equivalent(process_group: collectives.ProcessGroup | None = None) -> Iterator[None]:
    """Random ops on ShardedTensors give the dense op's values inside this block (see the
    module docstring). ``process_group`` (default: the default group) is where the
    ranks' generator states are compared on entry.

    Raises:
        ValueError: on every rank, when the ranks' default generators differ.
    """
    global _depth
    if dist.is_initialized():
        group = collectives.resolve_group(process_group)
        if collectives.is_member(group, dist.get_rank()):
            state = hashlib.blake2b(bytes(torch.random.get_rng_state().tolist()),
                                    digest_size=8).hexdigest()
            collectives.agree(
                "dispatch_shard.random.dense_equivalent",
                (("generator state (seed every rank alike, e.g. torch.manual_seed(0))",
                  state),), None, group)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
