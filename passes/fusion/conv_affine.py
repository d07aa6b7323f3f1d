"""``fuse-mul-add-into-conv``: fold a per-output-channel constant Mul or Add after a Conv into it.

Algebra: for ``y = Conv(x, W) + b`` and constants that hold one value per output channel ``m``
(shape ``[C,1,1]``, ``[1,C,1,1]``, ``[1]`` or a scalar)::

    y·c = Conv(x, W·c) + b·c         (W'[m] = W[m]·c[m], b'[m] = b[m]·c[m])
    y + c = Conv(x, W) + (b + c)     (b'[m] = b[m] + c[m]; the weight is untouched)

Must not fire when:

* the constant varies along any axis but the channel axis (``[1,C,H,W]``, ``[W]`` of a
  width > 1), or has more dims than the Conv output (the product would gain dims);
* the constant is not a constant (a graph input may be overridden) or is not finite (a Mul by
  ``inf`` or ``nan`` does not distribute over the convolution's sum);
* for Mul: the weight is not a constant, or another node reads it too (a folded copy would
  store it twice); for both: the bias is present but not a constant;
* the Conv output has other readers or is a graph output (the engine refuses);
* the element type is not float, float16 or double.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet, constant_value

from graphopt.passes.fusion._common import (cast_like, channel_vector, checked_constant, element_type,
                                            exclusive_constant, float_reason, not_constant_reason,
                                            optional_constant)

__all__ = ["FuseMulAddIntoConv", "CONV_AFFINE_RULES"]


def _conv_mul(op: Any, x: Any, w: Any, c: Any) -> Any:
    return op.Mul(op.Conv(x, w, _allow_other_inputs=True, _name="conv"), c)


def _conv_add(op: Any, x: Any, w: Any, c: Any) -> Any:
    return op.Add(op.Conv(x, w, _allow_other_inputs=True, _name="conv"), c)


def _conv_bias(conv: ir.Node) -> ir.Value | None:
    return conv.inputs[2] if len(conv.inputs) > 2 else None


def _weight_shape(w: ir.Value) -> tuple[int, ...] | None:
    shape = w.shape
    if shape is None:  # an untyped Constant output (function bodies are not shape-inferred)
        array = constant_value(w)
        return None if array is None else tuple(array.shape)
    if not shape.is_static():
        return None
    return tuple(int(d) for d in shape.dims)  # type: ignore[arg-type]


def _per_channel(w: ir.Value, c: ir.Value) -> np.ndarray | str:
    """The constant ``c`` as one value per output channel of the Conv reading ``w``, or why not."""
    weight_shape = _weight_shape(w)
    if weight_shape is None or len(weight_shape) < 3:
        return f"the shape of the weight '{w.name}' is not known"
    constant = constant_value(c)
    if constant is None:
        return not_constant_reason(c, "the operand")
    vector = channel_vector(constant, weight_shape[0], len(weight_shape))
    if vector is None:
        return (f"'{c.name}' of shape {list(constant.shape)} does not hold one value per output channel "
                f"of a rank-{len(weight_shape)} Conv output with {weight_shape[0]} channel(s)")
    if not np.all(np.isfinite(vector.astype(np.float64))):
        return f"'{c.name}' holds a non-finite value"
    return vector


def _common_reason(w: ir.Value, c: ir.Value, conv: ir.Node) -> str | None:
    reason = float_reason(w) or float_reason(c)
    if reason:
        return reason
    if element_type(w) != element_type(c):
        return f"'{w.name}' and '{c.name}' have different element types"
    bias = optional_constant(_conv_bias(conv), "the Conv bias")
    return bias if isinstance(bias, str) else None


def _check_mul(ctx: MatchContext, w: ir.Value, c: ir.Value, conv: ir.Node) -> Any:
    reason = _common_reason(w, c, conv)
    if reason:
        return Failure(reason)
    weight = exclusive_constant(w, "the weight")
    if isinstance(weight, str):
        return Failure(weight)
    vector = _per_channel(w, c)
    return Failure(vector) if isinstance(vector, str) else True


def _check_add(ctx: MatchContext, w: ir.Value, c: ir.Value, conv: ir.Node) -> Any:
    reason = _common_reason(w, c, conv)
    if reason:
        return Failure(reason)
    vector = _per_channel(w, c)
    return Failure(vector) if isinstance(vector, str) else True


def _old_bias(conv: ir.Node, channels: int) -> np.ndarray:
    bias = _conv_bias(conv)
    return np.zeros(channels) if bias is None else checked_constant(bias).astype(np.float64)


def _rewrite_mul(op: Any, x: ir.Value, w: ir.Value, c: ir.Value, conv: ir.Node) -> ir.Value:
    vector = _per_channel(w, c)
    assert not isinstance(vector, str), vector
    factors = vector.astype(np.float64)
    weight = checked_constant(w).astype(np.float64)
    new_weight = weight * factors.reshape((-1,) + (1,) * (weight.ndim - 1))
    inputs = [x, op.initializer(cast_like(new_weight, w), name_hint=f"{w.name}_scaled")]
    if _conv_bias(conv) is not None:
        new_bias = _old_bias(conv, factors.shape[0]) * factors
        inputs.append(op.initializer(cast_like(new_bias, w), name_hint=f"{w.name}_scaled_bias"))
    return op.node("Conv", inputs, dict(conv.attributes))


def _rewrite_add(op: Any, x: ir.Value, w: ir.Value, c: ir.Value, conv: ir.Node) -> ir.Value:
    vector = _per_channel(w, c)
    assert not isinstance(vector, str), vector
    new_bias = _old_bias(conv, vector.shape[0]) + vector.astype(np.float64)
    bias = op.initializer(cast_like(new_bias, w), name_hint=f"{w.name}_bias")
    return op.node("Conv", [x, w, bias], dict(conv.attributes))


CONV_AFFINE_RULES = RuleSet([
    Rule("conv-mul", _conv_mul, _rewrite_mul, check=_check_mul, commute=True),
    Rule("conv-add", _conv_add, _rewrite_add, check=_check_add, commute=True),
])


class FuseMulAddIntoConv(RewritePass):
    """Fold a per-output-channel constant Mul or Add after a Conv into its weight or bias.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> FuseMulAddIntoConv().run(model, PassContext()).counters  # doctest: +SKIP
        {'conv-mul': 1, 'conv-add': 1}
    """

    name = "fuse-mul-add-into-conv"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = CONV_AFFINE_RULES
