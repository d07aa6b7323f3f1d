"""``fuse-bn-into-gemm``: fold an inference-mode BatchNormalization into the Gemm or MatMul before it.

Algebra: BatchNormalization of a 2-D ``[M, N]`` tensor normalizes along axis 1, the product's
output columns: ``bn(y) = y·s + t`` with ``s = γ/√(σ²+ε)``, ``t = β − μ·s`` per column. For
``y = α·A·B + β_g·C`` (``B`` is ``[K, N]``, or ``[N, K]`` with ``transB=1``)::

    B'[:, n] = B[:, n]·s[n]        C' = β_g·C·s + t        (β_g becomes 1)

``MatMul(A, B)`` with a 2-D ``A`` is ``Gemm(A, B)`` with ``C = 0``, so it becomes
``Gemm(A, B', t)``.

Must not fire when:

* BatchNormalization is in training mode or its extra outputs are read (see ``fuse-bn-into-conv``);
* the product is not 2-D: MatMul's ``A`` must have static rank 2 (for a rank-3 product the
  normalized axis 1 is not the output-column axis the weight owns);
* ``B`` is not a constant or is read by another node too (a folded copy would store it twice);
  Gemm's ``C``, when present, is not a constant;
* the element type is not float, float16 or double; Gemm needs opset 7 (unidirectional ``C``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

from graphopt.passes.fusion._common import (batch_norm_affine, cast_like, checked_constant,
                                            exclusive_constant, float_reason, opset_reason, optional_constant,
                                            static_rank)

__all__ = ["FuseBnIntoGemm", "LINEAR_BN_RULES"]

#: Gemm with unidirectional broadcasting of ``C`` (and no ``broadcast`` attribute) starts at opset 7.
GEMM_OPSET = 7


def _gemm_bn(op: Any, a: Any, b: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
    gemm = op.Gemm(a, b, _allow_other_inputs=True, _name="gemm")
    return op.BatchNormalization(gemm, scale, bias, mean, var, _name="bn")


def _matmul_bn(op: Any, a: Any, b: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
    product = op.MatMul(a, b)
    return op.BatchNormalization(product, scale, bias, mean, var, _name="bn")


def _columns(weight: np.ndarray, trans_b: int) -> int:
    return int(weight.shape[0] if trans_b else weight.shape[1])


def _check_weight(ctx: MatchContext, b: ir.Value) -> np.ndarray | Failure:
    reason = float_reason(b) or opset_reason(ctx, GEMM_OPSET, "Gemm")
    if reason:
        return Failure(reason)
    weight = exclusive_constant(b, "the weight")
    if isinstance(weight, str):
        return Failure(weight)
    if weight.ndim != 2:
        return Failure(f"the weight '{b.name}' has rank {weight.ndim}, expected 2")
    return weight


def _check_gemm(ctx: MatchContext, b: ir.Value, gemm: ir.Node, bn: ir.Node) -> Any:
    weight = _check_weight(ctx, b)
    if isinstance(weight, Failure):
        return weight
    c = optional_constant(gemm.inputs[2] if len(gemm.inputs) > 2 else None, "Gemm's C")
    if isinstance(c, str):
        return Failure(c)
    affine = batch_norm_affine(bn, _columns(weight, gemm.attr("transB", 0)))
    return Failure(affine) if isinstance(affine, str) else True


def _check_matmul(ctx: MatchContext, a: ir.Value, b: ir.Value, bn: ir.Node) -> Any:
    weight = _check_weight(ctx, b)
    if isinstance(weight, Failure):
        return weight
    rank = static_rank(a)
    if rank != 2:
        return Failure(f"MatMul's A '{a.name}' has rank {'unknown' if rank is None else rank}, expected 2")
    affine = batch_norm_affine(bn, _columns(weight, 0))
    return Failure(affine) if isinstance(affine, str) else True


def _fold(b: ir.Value, trans_b: int, bn: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B', s, t)`` in float64: the weight with its output columns scaled, and the BN affine map."""
    weight = checked_constant(b).astype(np.float64)
    affine = batch_norm_affine(bn, _columns(weight, trans_b))
    assert not isinstance(affine, str), affine
    scale, shift = affine
    folded = weight * (scale[:, None] if trans_b else scale[None, :])
    return folded, scale, shift


def _rewrite_gemm(op: Any, a: ir.Value, b: ir.Value, gemm: ir.Node, bn: ir.Node) -> ir.Value:
    weight, scale, shift = _fold(b, gemm.attr("transB", 0), bn)
    old_c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    c = 0.0 if old_c is None else checked_constant(old_c).astype(np.float64) * float(gemm.attr("beta", 1.0))
    new_c = np.asarray(c) * scale + shift
    attributes = {k: v for k, v in gemm.attributes.items() if k != "beta"}
    return op.Gemm(a, op.initializer(cast_like(weight, b), name_hint=f"{b.name}_bn"),
                   op.initializer(cast_like(new_c, b), name_hint=f"{b.name}_bn_bias"), **attributes)


def _rewrite_matmul(op: Any, a: ir.Value, b: ir.Value, bn: ir.Node) -> ir.Value:
    weight, _, shift = _fold(b, 0, bn)
    return op.Gemm(a, op.initializer(cast_like(weight, b), name_hint=f"{b.name}_bn"),
                   op.initializer(cast_like(shift, b), name_hint=f"{b.name}_bn_bias"))


LINEAR_BN_RULES = RuleSet([
    Rule("gemm-bn", _gemm_bn, _rewrite_gemm, check=_check_gemm),
    Rule("matmul-bn", _matmul_bn, _rewrite_matmul, check=_check_matmul),
])


class FuseBnIntoGemm(RewritePass):
    """Fold inference-mode BatchNormalization into the weight and bias of the Gemm/2-D MatMul before it.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> FuseBnIntoGemm().run(model, PassContext()).counters  # doctest: +SKIP
        {'matmul-bn': 1}
    """

    name = "fuse-bn-into-gemm"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = LINEAR_BN_RULES
