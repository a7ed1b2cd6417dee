"""Built-in sharded op implementations, one module per op family.

Installed as ``dispatch_shard.ops``. Each module registers its ops through the
public :func:`dispatch_shard.custom_sharded_op_impl` decorator, exactly as users do.
"""

from __future__ import annotations

from dispatch_shard.ops import (
    advanced_indexing,
    arg_reduction,
    attention,
    complex,
    copies,
    embedding,
    factory,
    foreach,
    indexing,
    linear_cross_entropy,
    losses,
    matmul,
    norms,
    pointwise,
    random_ops,
    reduction,
    reshape,
    scan,
    softmax,
    sorting,
    spatial,
    spatial_backward,
    strided,
    tensor_basics,
    view,
    whole,
)

# isort: split
# Last, and it must stay last: torch's decompositions fill in only the ops that
# no family above serves (see ops/decomposed.py).
from dispatch_shard.ops import decomposed

__all__ = ["advanced_indexing", "arg_reduction", "attention", "complex", "copies",
           "decomposed", "embedding", "factory", "foreach", "indexing", "linear_cross_entropy",
           "losses", "matmul", "norms", "pointwise", "random_ops", "reduction", "reshape",
           "scan", "softmax", "sorting", "spatial", "spatial_backward", "strided",
           "tensor_basics", "view", "whole"]
