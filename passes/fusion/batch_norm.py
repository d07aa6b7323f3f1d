"""``decompose-batch-norm``: an inference-mode BatchNormalization no producer absorbed becomes ``Mul`` + ``Add``.

Algebra: per channel ``c`` (axis 1), ``bn(x) = (x − μ)·γ/√(σ²+ε) + β = x·s + t`` with
``s = γ/√(σ²+ε)`` and ``t = β − μ·s``. ``s`` and ``t`` are stored with shape
``[C, 1, ..., 1]`` (rank of ``x`` minus one), so they broadcast along axis 1 only.

The two elementwise ops are what the other fusions understand: a following or preceding
constant Mul/Add can merge with them, where a BatchNormalization node blocks every rule.

Must not fire when:

* BatchNormalization is in training mode or its extra outputs are read (see
  ``fuse-bn-into-conv``), or its parameters are not constant ``[C]`` vectors;
* a ``fuse-bn-into-conv`` or ``fuse-bn-into-gemm`` rule can fold it into its producer
  (that removes the node instead of replacing it with two);
* the rank of ``x`` is unknown or below 2 (the constants' shape depends on it);
* the element type is not float, float16 or double; the default-domain opset is below 7
  (Mul/Add without multidirectional broadcasting).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

from graphopt.passes.fusion._common import batch_norm_affine, float_reason, opset_reason, static_rank, to_dtype
from graphopt.passes.fusion.conv_bn import CONV_BN_RULES
from graphopt.passes.fusion.linear_bn import LINEAR_BN_RULES

__all__ = ["DecomposeBatchNorm", "BATCH_NORM_RULES"]

#: Mul and Add broadcast multidirectionally from opset 7.
BROADCAST_OPSET = 7


def _batch_norm(op: Any, x: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
    return op.BatchNormalization(x, scale, bias, mean, var, _name="bn")


def _affine(x: ir.Value, bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """``(s, t)`` shaped ``[C, 1, ..., 1]`` for the rank of ``x``, or why not."""
    reason = float_reason(x)
    if reason:
        return reason
    rank = static_rank(x)
    if rank is None or rank < 2:
        return f"the rank of '{x.name}' is {'unknown' if rank is None else rank}, expected at least 2"
    channels = x.shape.dims[1] if x.shape is not None else None
    affine = batch_norm_affine(bn, channels if isinstance(channels, int) else None)
    if isinstance(affine, str):
        return affine
    shape = (-1,) + (1,) * (rank - 2)
    return affine[0].reshape(shape), affine[1].reshape(shape)


def _check(ctx: MatchContext, x: ir.Value, bn: ir.Node) -> Any:
    reason = opset_reason(ctx, BROADCAST_OPSET, "Mul/Add with broadcasting")
    if reason:
        return Failure(reason)
    found = _affine(x, bn)
    if isinstance(found, str):
        return Failure(found)
    for folding in (*CONV_BN_RULES.rules_for(bn), *LINEAR_BN_RULES.rules_for(bn)):
        if not isinstance(folding.find_match(bn, ctx.pass_context, explain=False), str):
            return Failure(f"rule '{folding.name}' folds it into its producer")
    return True


def _rewrite(op: Any, x: ir.Value, bn: ir.Node) -> ir.Value:
    found = _affine(x, bn)
    assert not isinstance(found, str) and x.dtype is not None, found
    scale, shift = found
    scaled = op.Mul(x, op.initializer(to_dtype(scale, x.dtype), name_hint="bn_scale"))
    return op.Add(scaled, op.initializer(to_dtype(shift, x.dtype), name_hint="bn_shift"))


BATCH_NORM_RULES = RuleSet([Rule("batch-norm-to-mul-add", _batch_norm, _rewrite, check=_check)])


class DecomposeBatchNorm(RewritePass):
    """Turn an inference-mode BatchNormalization that no producer absorbed into Mul and Add by per-channel constants.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> DecomposeBatchNorm().run(model, PassContext()).counters  # doctest: +SKIP
        {'batch-norm-to-mul-add': 1}
    """

    name = "decompose-batch-norm"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = BATCH_NORM_RULES
