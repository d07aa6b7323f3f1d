"""``fuse-layer-norm``: the decomposed layer normalization of older exports becomes ``LayerNormalization``.

Algebra: over the trailing axes ``A`` (``k`` of them)::

    d = x − mean_A(x)
    y = d / √(mean_A(d²) + ε)  =  d · 1/√(mean_A(d²) + ε)  =  LayerNormalization(x, 1, axis=−k, ε)

``d²`` is written ``Pow(d, 2)`` or ``Mul(d, d)``. The affine tail folds in separately, so any
mix of ``·γ`` and ``+β`` after the core is absorbed one step at a time::

    LN(x, s, b)·γ = LN(x, s·γ, b·γ)        LN(x, s, b) + β = LN(x, s, b + β)

Must not fire when:

* the default-domain opset is below 17 (no LayerNormalization);
* the two ReduceMean nodes reduce different axes, axes that are not a trailing block, axes
  that are not constants, or drop the reduced dims (``keepdims=0``);
* the rank of ``x`` or its normalized dims are not static (the scale must have that shape);
* ``ε`` or the exponent are not one-element constants (a constant of higher rank than ``x``
  would widen the result), ``ε`` is negative, or the exponent is not 2;
* ``γ``/``β`` are not constants, are not finite, vary along a leading axis or have more dims
  than ``x``;
* an intermediate (the mean, ``d``, the variance...) has readers outside the pattern or is
  a graph output (the engine refuses);
* the element type is not float, float16 or double.

``LayerNormalization`` computes in float32 (``stash_type=1``) for float16 inputs, so float16
results become slightly more accurate than the float16 chain they replace.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet, constant_value

from graphopt.passes.fusion._common import (cast_like, element_type, float_reason, normalized_dims,
                                            opset_reason, over_normalized_axes, reduce_axes, scalar_constant,
                                            static_rank)

__all__ = ["FuseLayerNorm", "LAYER_NORM_RULES", "normalization_core_reason"]

#: LayerNormalization entered the default domain at opset 17.
LAYER_NORM_OPSET = 17


# -- core: (x - mean) / sqrt(var + eps) ---------------------------------------------------------
def _centered(op: Any, x: Any) -> Any:
    return op.Sub(x, op.ReduceMean(x, _allow_other_inputs=True, _name="mean"))


def _pow_div(op: Any, x: Any, two: Any, eps: Any) -> Any:
    d = _centered(op, x)
    var = op.ReduceMean(op.Pow(d, two), _allow_other_inputs=True, _name="var")
    return op.Div(d, op.Sqrt(op.Add(var, eps)))


def _mul_div(op: Any, x: Any, eps: Any) -> Any:
    d = _centered(op, x)
    var = op.ReduceMean(op.Mul(d, d), _allow_other_inputs=True, _name="var")
    return op.Div(d, op.Sqrt(op.Add(var, eps)))


def _pow_reciprocal(op: Any, x: Any, two: Any, eps: Any) -> Any:
    d = _centered(op, x)
    var = op.ReduceMean(op.Pow(d, two), _allow_other_inputs=True, _name="var")
    return op.Mul(d, op.Reciprocal(op.Sqrt(op.Add(var, eps))))


def _mul_reciprocal(op: Any, x: Any, eps: Any) -> Any:
    d = _centered(op, x)
    var = op.ReduceMean(op.Mul(d, d), _allow_other_inputs=True, _name="var")
    return op.Mul(d, op.Reciprocal(op.Sqrt(op.Add(var, eps))))


def normalization_core_reason(x: ir.Value, eps: ir.Value, reductions: list[ir.Node],
                              two: ir.Value | None) -> tuple[int, float] | str:
    """``(k, ε)`` for a normalization over the last ``k`` axes of ``x``, or why it is not one.

    Every node of ``reductions`` must be a ``keepdims=1`` ReduceMean over the same trailing
    axes; ``ε`` (and the exponent ``two``, when given) one-element constants that cannot widen
    the result.
    """
    reason = float_reason(x)
    if reason:
        return reason
    rank = static_rank(x)
    if rank is None:
        return f"the rank of '{x.name}' is not known"
    axes_seen = []
    for node in reductions:
        axes = reduce_axes(node, rank)
        if isinstance(axes, str):
            return axes
        axes_seen.append(axes)
    axes = axes_seen[0]
    if any(a != axes for a in axes_seen):
        return f"the ReduceMean nodes reduce different axes {axes_seen}"
    k = len(axes)
    if axes != list(range(rank - k, rank)):
        return f"ReduceMean axes {axes} are not the trailing axes of a rank-{rank} tensor"
    dims = normalized_dims(x, -k)
    if isinstance(dims, str):
        return dims
    epsilon = scalar_constant(eps, rank)
    if epsilon is None or not np.isfinite(epsilon) or epsilon < 0:
        return f"epsilon '{eps.name}' is not a non-negative one-element constant"
    if two is not None and scalar_constant(two, rank) != 2.0:
        return f"the exponent '{two.name}' is not the constant 2"
    return k, epsilon


def _check_core(ctx: MatchContext, x: ir.Value, eps: ir.Value, mean: ir.Node, var: ir.Node,
                two: ir.Value | None = None) -> Any:
    reason = opset_reason(ctx, LAYER_NORM_OPSET, "LayerNormalization")
    if reason:
        return Failure(reason)
    core = normalization_core_reason(x, eps, [mean, var], two)
    return Failure(core) if isinstance(core, str) else True


def _rewrite_core(op: Any, x: ir.Value, eps: ir.Value, mean: ir.Node, var: ir.Node,
                  two: ir.Value | None = None) -> ir.Value:
    core = normalization_core_reason(x, eps, [mean, var], two)
    assert not isinstance(core, str), core
    k, epsilon = core
    dims = normalized_dims(x, -k)
    assert not isinstance(dims, str)
    scale = op.initializer(cast_like(np.ones(dims), x), name_hint="layer_norm_scale")
    return op.LayerNormalization(x, scale, axis=-k, epsilon=epsilon)


# -- affine tail: LN(x)·γ, LN(x) + β ------------------------------------------------------------
def _ln_mul(op: Any, x: Any, gamma: Any) -> Any:
    return op.Mul(op.LayerNormalization(x, _allow_other_inputs=True, _name="ln"), gamma)


def _ln_add(op: Any, x: Any, beta: Any) -> Any:
    return op.Add(op.LayerNormalization(x, _allow_other_inputs=True, _name="ln"), beta)


def affine_operands(x: ir.Value, norm: ir.Node, factor: ir.Value
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | str:
    """``(scale, bias, factor)`` of a normalization node, each over its normalized dims, or why not.

    ``scale`` and ``bias`` (``None`` when absent) are the node's own constant inputs,
    ``factor`` the constant ``γ``/``β`` that follows it, all broadcast to the normalized dims.
    """
    reason = float_reason(x)
    if reason:
        return reason
    rank = static_rank(x)
    if rank is None:
        return f"the rank of '{x.name}' is not known"
    dims = normalized_dims(x, int(norm.attr("axis", -1)))
    if isinstance(dims, str):
        return dims
    if element_type(factor) != element_type(x):
        return f"'{factor.name}' and '{x.name}' have different element types"
    arrays: list[np.ndarray | None] = []
    for value, what, within in ((norm.inputs[1] if len(norm.inputs) > 1 else None, "scale", len(dims)),
                                (norm.inputs[2] if len(norm.inputs) > 2 else None, "bias", len(dims)),
                                (factor, "operand", rank)):
        if value is None:
            arrays.append(None)
            continue
        array = constant_value(value)
        if array is None:
            return f"the {what} '{value.name}' is not a constant"
        spread = over_normalized_axes(array, within, dims)
        if spread is None:
            return f"the {what} '{value.name}' of shape {list(array.shape)} does not broadcast over {list(dims)}"
        if not np.all(np.isfinite(spread.astype(np.float64))):
            return f"the {what} '{value.name}' holds a non-finite value"
        arrays.append(spread.astype(np.float64))
    scale, bias, operand = arrays
    if scale is None or operand is None:
        return f"{norm.op_type} has no scale input"
    return scale, bias, operand


def _check_affine(ctx: MatchContext, x: ir.Value, ln: ir.Node, factor: ir.Value) -> Any:
    found = affine_operands(x, ln, factor)
    return Failure(found) if isinstance(found, str) else True


def _check_mul(ctx: MatchContext, x: ir.Value, gamma: ir.Value, ln: ir.Node) -> Any:
    return _check_affine(ctx, x, ln, gamma)


def _check_add(ctx: MatchContext, x: ir.Value, beta: ir.Value, ln: ir.Node) -> Any:
    return _check_affine(ctx, x, ln, beta)


def _rewrite_mul(op: Any, x: ir.Value, gamma: ir.Value, ln: ir.Node) -> ir.Value:
    found = affine_operands(x, ln, gamma)
    assert not isinstance(found, str), found
    scale, bias, factor = found
    inputs = [x, op.initializer(cast_like(scale * factor, x), name_hint="layer_norm_scale")]
    if bias is not None:
        inputs.append(op.initializer(cast_like(bias * factor, x), name_hint="layer_norm_bias"))
    return op.node("LayerNormalization", inputs, dict(ln.attributes))


def _rewrite_add(op: Any, x: ir.Value, beta: ir.Value, ln: ir.Node) -> ir.Value:
    found = affine_operands(x, ln, beta)
    assert not isinstance(found, str), found
    scale, bias, shift = found
    new_bias = shift if bias is None else bias + shift
    inputs = [x, ln.inputs[1], op.initializer(cast_like(new_bias, x), name_hint="layer_norm_bias")]
    return op.node("LayerNormalization", inputs, dict(ln.attributes))


LAYER_NORM_RULES = RuleSet([
    Rule("layer-norm-pow-div", _pow_div, _rewrite_core, check=_check_core, commute=True),
    Rule("layer-norm-mul-div", _mul_div, _rewrite_core, check=_check_core, commute=True),
    Rule("layer-norm-pow-reciprocal", _pow_reciprocal, _rewrite_core, check=_check_core, commute=True),
    Rule("layer-norm-mul-reciprocal", _mul_reciprocal, _rewrite_core, check=_check_core, commute=True),
    Rule("layer-norm-scale", _ln_mul, _rewrite_mul, check=_check_mul, commute=True),
    Rule("layer-norm-bias", _ln_add, _rewrite_add, check=_check_add, commute=True),
])


class FuseLayerNorm(RewritePass):
    """Replace the decomposed layer normalization (mean, variance, sqrt, divide, ·γ, +β) with LayerNormalization.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> FuseLayerNorm().run(model, PassContext()).counters  # doctest: +SKIP
        {'layer-norm-pow-div': 12, 'layer-norm-scale': 12, 'layer-norm-bias': 12}
    """

    name = "fuse-layer-norm"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = LAYER_NORM_RULES
