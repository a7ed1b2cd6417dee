"""torch's fused linear + cross-entropy (``F.linear_cross_entropy(..., options=...)``).

With ``options`` torch calls two custom ops, ``torch_nn::_linear_cross_entropy_batch_chunked``
(``reduction="mean"``/``"sum"``: the loss and the three gradients, computed in forward;
its backward only scales them by the incoming gradient) and
``..._no_reduction`` (``reduction="none"``: the per-sample losses). On dense tensors they
save memory by running the batch in chunks; a sharded batch is already cut in blocks.

NOTE [fused linear cross-entropy communicates as the unfused pair]
Each op here issues exactly the aten ops that autograd runs for ``F.linear`` followed by
``F.cross_entropy`` and, for the gradients, their backward formulas (``nll_loss_backward``,
``_log_softmax_backward_data``, the two ``mm`` of ``addmm``'s backward and the bias sum),
so every layout takes the path, and the collectives, of the unfused pair: e.g. classes
split (``weight [C/R, K]``, replicated ``x [N, K]``): logits ``[N, C/R]``, the softmax's
all-reduces, a Partial loss; ``grad_input`` ``[N, C/R] @ [C/R, K]`` Partial, ``grad_weight``
``[C/R, K]`` and ``grad_bias`` ``[C/R]`` local. Nothing is communicated that the unfused
pair does not (``tests/test_losses.py`` counts both). What the fusion buys on one device,
never holding ``[N, C]`` logits, the sharding buys per rank only for the layouts that
split ``N`` or ``C``.

The one exception is the backward of ``reduction="none"``: torch runs it as a Python
recomputation, chunk by chunk, into plain buffers, above this module (see
:func:`chunked_linear_cross_entropy_no_reduction`). It gives dense's gradients but gathers
each chunk: with the batch split over 2 ranks (64 samples, chunks of 16) it takes 20
all-to-alls where the unfused pair takes one all-reduce. Train with ``"mean"``/``"sum"``
or ``options=None`` where that matters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.modules.linear_cross_entropy  # (defines the torch_nn ops)

from dispatch_shard.ops._common import bind_arguments, first_sharded, replicated_result
from dispatch_shard.registry import custom_sharded_op_impl

aten = torch.ops.aten

__all__ = ["chunked_linear_cross_entropy", "chunked_linear_cross_entropy_no_reduction"]

_REDUCTION = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction, as nll_loss takes it


def _accumulated(bound: dict[str, Any]) -> tuple[dict[str, Any], torch.dtype]:
    """The arguments in ``acc_dtype`` (dense's rule: float16/bfloat16 inputs may accumulate
    in float32; its error otherwise), and the dtype the results are given in (the
    input's, as dense gives them)."""
    dtype, acc_dtype = bound["input"].dtype, bound["acc_dtype"]
    if dtype != acc_dtype and not (dtype in (torch.float16, torch.bfloat16)
                                   and acc_dtype == torch.float32):
        raise RuntimeError("linear_cross_entropy supports float32 acc_dtype with float16/"
                           f"bfloat16 inputs, but got {acc_dtype} acc_dtype and {dtype} inputs.")
    if dtype == acc_dtype:
        return bound, dtype
    upcast = {name: value.to(acc_dtype) if isinstance(value, torch.Tensor)
              and value.is_floating_point() else value for name, value in bound.items()}
    return upcast, dtype


def _given_in(dtype: torch.dtype, *results: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The results in ``dtype`` (those computed in ``acc_dtype`` rounded once)."""
    return tuple(r if r.dtype == dtype else r.to(dtype) for r in results)


def _log_probs(bound: dict[str, Any]) -> torch.Tensor:
    """``log_softmax(linear(input, linear_weight, linear_bias), 1)``: what
    ``F.cross_entropy(F.linear(...))`` computes before the loss."""
    logits = F.linear(bound["input"], bound["linear_weight"], bound["linear_bias"])
    return aten._log_softmax.default(logits, 1, False)  # type: ignore[no-any-return]


@custom_sharded_op_impl(torch.ops.torch_nn._linear_cross_entropy_batch_chunked.default)
def chunked_linear_cross_entropy(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                                 pg: Any) -> Any:
    """``(loss, grad_input, grad_linear_weight, grad_linear_bias)`` for ``"mean"``/``"sum"``:
    the unfused pair's forward and backward aten ops (NOTE [fused linear cross-entropy
    communicates as the unfused pair]); gradients not asked for are empty ``[0, 0]``
    (``[0]``) replicated tensors, as dense returns them. Per-rank shapes and collectives:
    those of ``linear``, ``log_softmax``, ``nll_loss`` and their backward on these layouts."""
    func = torch.ops.torch_nn._linear_cross_entropy_batch_chunked.default
    bound, out_dtype = _accumulated(bind_arguments(func, args, kwargs))
    x, weight_matrix = bound["input"], bound["linear_weight"]
    if bound["label_smoothing"]:  # (torch takes the reference path for these)
        raise NotImplementedError(f"{func} with label_smoothing not supported for "
                                  "ShardedTensor!")
    reduction = _REDUCTION[bound["reduction"]]
    log_probs = _log_probs(bound)
    loss, total_weight = aten.nll_loss_forward.default(
        log_probs, bound["target"], bound["weight"], reduction, bound["ignore_index"])
    anchor = first_sharded(args, kwargs)
    dtype = out_dtype

    def empty(*size: int) -> torch.Tensor:
        return replicated_result(anchor, torch.empty(size, dtype=dtype, device=x.device),
                                 size, dtype)

    wanted = (bound["compute_input_grad"], bound["compute_linear_weight_grad"],
              bound["compute_linear_bias_grad"] and bound["linear_bias"] is not None)
    if not any(wanted):
        return _given_in(dtype, loss, empty(0, 0), empty(0, 0), empty(0))
    one = torch.ones((), dtype=loss.dtype, device=x.device)  # d loss / d loss
    grad_log_probs = aten.nll_loss_backward.default(
        one, log_probs, bound["target"], bound["weight"], reduction, bound["ignore_index"],
        total_weight)
    grad_logits = aten._log_softmax_backward_data.default(grad_log_probs, log_probs, 1,
                                                          log_probs.dtype)
    grad_input = aten.mm.default(grad_logits, weight_matrix) if wanted[0] else empty(0, 0)
    grad_weight = (aten.t.default(aten.mm.default(aten.t.default(x), grad_logits))
                   if wanted[1] else empty(0, 0))
    grad_bias = aten.sum.dim_IntList(grad_logits, [0]) if wanted[2] else empty(0)
    return _given_in(dtype, loss, grad_input, grad_weight, grad_bias)


@custom_sharded_op_impl(torch.ops.torch_nn._linear_cross_entropy_batch_chunked_no_reduction
                        .default)
def chunked_linear_cross_entropy_no_reduction(types: Any, args: tuple[Any, ...],
                                              kwargs: dict[str, Any], pg: Any) -> Any:
    """Per-sample losses ``[N]`` (``reduction="none"``): ``linear``, ``log_softmax`` and
    ``nll_loss`` as the unfused pair runs them, with their collectives.

    Its backward is torch's Python recomputation, chunk by chunk, which writes through
    ``out=`` overloads (``mm.out``, ``addmm.out``) into plain buffers: served by the
    ``out=`` source of ops/decomposed.py (a plain buffer is a replicated value, so each
    chunk's product is gathered into it). Right, but it communicates more than the
    unfused pair; ``reduction="mean"``/``"sum"``, or ``options=None``, do not."""
    func = torch.ops.torch_nn._linear_cross_entropy_batch_chunked_no_reduction.default
    bound, dtype = _accumulated(bind_arguments(func, args, kwargs))
    loss, _ = aten.nll_loss_forward.default(_log_probs(bound), bound["target"],
                                            bound["weight"], 0, bound["ignore_index"])
    return _given_in(dtype, loss)[0]
