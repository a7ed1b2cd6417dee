"""Built-in sharded op implementations, one module per op family.

Installed as ``dispatch_shard.ops``. Each module registers its ops through the
public :func:`dispatch_shard.custom_sharded_op_impl` decorator, exactly as users do.
"""

from __future__ import annotations

from dispatch_shard.ops import factory, foreach, matmul, pointwise, reduction, tensor_basics, view

__all__ = ["factory", "foreach", "matmul", "pointwise", "reduction", "tensor_basics",
           "view"]
