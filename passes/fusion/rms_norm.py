"""``fuse-rms-norm``: the decomposed RMS normalization becomes ``RMSNormalization`` (opset 23+).

Algebra: over the trailing axes ``A`` (``k`` of them)::

    y = x / √(mean_A(x²) + ε)  =  x · 1/√(mean_A(x²) + ε)  =  RMSNormalization(x, 1, axis=−k, ε)
    RMSNormalization(x, s)·γ = RMSNormalization(x, s·γ)

``x²`` is written ``Pow(x, 2)`` or ``Mul(x, x)``.

Must not fire when:

* the default-domain opset is below 23 (no RMSNormalization; the onnxruntime contrib
  ``SimplifiedLayerNormalization`` belongs to the target-specific fusions, not here);
* ReduceMean does not reduce a constant, trailing block of axes with ``keepdims=1``;
* the rank of ``x`` or its normalized dims are not static (the scale must have that shape);
* ``ε`` or the exponent are not one-element constants that cannot widen the result, ``ε``
  is negative or the exponent is not 2;
* ``γ`` is not a finite constant varying only along the normalized axes;
* an intermediate is read outside the pattern or is a graph output (the engine refuses);
* the element type is not float, float16 or double.

``(x − mean)/√(mean((x − mean)²) + ε)`` also has this shape with ``x − mean`` in the role of
``x``; ``fuse-layer-norm`` runs first and takes it whole, and were it not to, the RMS form
of the centered input is still the same function.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

from graphopt.passes.fusion._common import cast_like, normalized_dims, opset_reason
from graphopt.passes.fusion.layer_norm import affine_operands, normalization_core_reason

__all__ = ["FuseRmsNorm", "RMS_NORM_RULES"]

#: RMSNormalization entered the default domain at opset 23.
RMS_NORM_OPSET = 23


def _pow_div(op: Any, x: Any, two: Any, eps: Any) -> Any:
    ms = op.ReduceMean(op.Pow(x, two), _allow_other_inputs=True, _name="mean")
    return op.Div(x, op.Sqrt(op.Add(ms, eps)))


def _mul_div(op: Any, x: Any, eps: Any) -> Any:
    ms = op.ReduceMean(op.Mul(x, x), _allow_other_inputs=True, _name="mean")
    return op.Div(x, op.Sqrt(op.Add(ms, eps)))


def _pow_reciprocal(op: Any, x: Any, two: Any, eps: Any) -> Any:
    ms = op.ReduceMean(op.Pow(x, two), _allow_other_inputs=True, _name="mean")
    return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(ms, eps))))


def _mul_reciprocal(op: Any, x: Any, eps: Any) -> Any:
    ms = op.ReduceMean(op.Mul(x, x), _allow_other_inputs=True, _name="mean")
    return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(ms, eps))))


def _check_core(ctx: MatchContext, x: ir.Value, eps: ir.Value, mean: ir.Node,
                two: ir.Value | None = None) -> Any:
    reason = opset_reason(ctx, RMS_NORM_OPSET, "RMSNormalization")
    if reason:
        return Failure(reason)
    core = normalization_core_reason(x, eps, [mean], two)
    return Failure(core) if isinstance(core, str) else True


def _rewrite_core(op: Any, x: ir.Value, eps: ir.Value, mean: ir.Node, two: ir.Value | None = None) -> ir.Value:
    core = normalization_core_reason(x, eps, [mean], two)
    assert not isinstance(core, str), core
    k, epsilon = core
    dims = normalized_dims(x, -k)
    assert not isinstance(dims, str)
    scale = op.initializer(cast_like(np.ones(dims), x), name_hint="rms_norm_scale")
    return op.RMSNormalization(x, scale, axis=-k, epsilon=epsilon)


def _rms_mul(op: Any, x: Any, gamma: Any) -> Any:
    return op.Mul(op.RMSNormalization(x, _allow_other_inputs=True, _name="rms"), gamma)


def _check_mul(ctx: MatchContext, x: ir.Value, gamma: ir.Value, rms: ir.Node) -> Any:
    found = affine_operands(x, rms, gamma)
    return Failure(found) if isinstance(found, str) else True


def _rewrite_mul(op: Any, x: ir.Value, gamma: ir.Value, rms: ir.Node) -> ir.Value:
    found = affine_operands(x, rms, gamma)
    assert not isinstance(found, str), found
    scale, _, factor = found
    new_scale = op.initializer(cast_like(scale * factor, x), name_hint="rms_norm_scale")
    return op.node("RMSNormalization", [x, new_scale], dict(rms.attributes))


RMS_NORM_RULES = RuleSet([
    Rule("rms-norm-pow-div", _pow_div, _rewrite_core, check=_check_core, commute=True),
    Rule("rms-norm-mul-div", _mul_div, _rewrite_core, check=_check_core, commute=True),
    Rule("rms-norm-pow-reciprocal", _pow_reciprocal, _rewrite_core, check=_check_core, commute=True),
    Rule("rms-norm-mul-reciprocal", _mul_reciprocal, _rewrite_core, check=_check_core, commute=True),
    Rule("rms-norm-scale", _rms_mul, _rewrite_mul, check=_check_mul, commute=True),
])


class FuseRmsNorm(RewritePass):
    """Replace the decomposed RMS normalization (x / sqrt(mean(x²) + ε), ·γ) with RMSNormalization (opset 23+).

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> FuseRmsNorm().run(model, PassContext()).counters  # doctest: +SKIP
        {'rms-norm-pow-reciprocal': 4, 'rms-norm-scale': 4}
    """

    name = "fuse-rms-norm"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = RMS_NORM_RULES
