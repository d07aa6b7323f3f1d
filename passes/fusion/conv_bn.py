"""``fuse-bn-into-conv``: fold an inference-mode BatchNormalization into the Conv before it.

Algebra: per output channel ``m``, ``bn(y) = y·s + t`` with ``s = γ/√(σ²+ε)`` and
``t = β − μ·s``; a convolution is linear in its weight, so for ``y = Conv(x, W) + b``::

    W'[m] = W[m]·s[m]        b'[m] = b[m]·s[m] + t[m] = (b[m] − μ[m])·s[m] + β[m]

For ``ConvTranspose`` the weight is ``[C_in, M/g, k...]``: output channel ``m = g·(M/g) + j``
is column ``j`` of the input channels of group ``g``, and that column is what gets scaled.

Must not fire when:

* BatchNormalization is in training mode (``training_mode=1``, ``is_test=0``, ``spatial=0``)
  or its running-statistics outputs are read (the engine refuses a used extra output);
* its four parameters are not constant ``[C]`` vectors, or give a non-finite scale;
* the Conv weight is not a constant (a graph input may be overridden by the caller), or is
  read by another node too: the folded weight is a new tensor, and keeping the old one for the
  other reader would store the weight twice;
* the Conv output has other readers or is a graph output (the engine refuses);
* the element type is not float, float16 or double.

A shared bias is fine: the fused bias is a new tensor of only ``C`` elements.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

from graphopt.passes.fusion._common import (batch_norm_affine, cast_like, checked_constant,
                                            exclusive_constant, float_reason, optional_constant)

__all__ = ["FuseBnIntoConv", "CONV_BN_RULES", "scale_output_channels"]


def _conv_bn(op: Any, x: Any, w: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
    conv = op.Conv(x, w, _allow_other_inputs=True, _name="conv")
    return op.BatchNormalization(conv, scale, bias, mean, var, _name="bn")


def _conv_transpose_bn(op: Any, x: Any, w: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
    conv = op.ConvTranspose(x, w, _allow_other_inputs=True, _name="conv")
    return op.BatchNormalization(conv, scale, bias, mean, var, _name="bn")


def _output_channels(conv: ir.Node, weight: np.ndarray) -> int:
    """Output channels of a Conv (``W.shape[0]``) or ConvTranspose (``W.shape[1]·group``)."""
    if conv.op_type == "ConvTranspose":
        return int(weight.shape[1]) * int(conv.attr("group", 1))
    return int(weight.shape[0])


def _conv_bias(conv: ir.Node) -> ir.Value | None:
    return conv.inputs[2] if len(conv.inputs) > 2 else None


def _check(ctx: MatchContext, w: ir.Value, conv: ir.Node, bn: ir.Node) -> Any:
    reason = float_reason(w)
    if reason:
        return Failure(reason)
    weight = exclusive_constant(w, "the weight")
    if isinstance(weight, str):
        return Failure(weight)
    if weight.ndim < 3:
        return Failure(f"the weight '{w.name}' has rank {weight.ndim}, expected at least 3")
    bias = optional_constant(_conv_bias(conv), f"the {conv.op_type} bias")
    if isinstance(bias, str):
        return Failure(bias)
    channels = _output_channels(conv, weight)
    if bias is not None and bias.shape != (channels,):
        return Failure(f"the {conv.op_type} bias has shape {list(bias.shape)}, expected [{channels}]")
    affine = batch_norm_affine(bn, channels)
    if isinstance(affine, str):
        return Failure(affine)
    return True


def scale_output_channels(conv: ir.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``weight`` with every output channel ``m`` of ``conv`` multiplied by ``scale[m]``.

    Works for Conv (``[M, C/g, k...]``) and ConvTranspose (``[C, M/g, k...]``) weights.

    Example:
        >>> scale_output_channels(conv, np.ones((2, 1, 1, 1)), np.array([2.0, 3.0])).ravel()  # doctest: +SKIP
        array([2., 3.])
    """
    if conv.op_type != "ConvTranspose":
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    group = int(conv.attr("group", 1))
    c_in, per_group = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    grouped = weight.reshape((group, c_in // group, per_group) + kernel)
    factors = scale.reshape((group, 1, per_group) + (1,) * len(kernel))
    return (grouped * factors).reshape(weight.shape)


def _rewrite(op: Any, x: ir.Value, w: ir.Value, conv: ir.Node, bn: ir.Node) -> ir.Value:
    weight = checked_constant(w)
    channels = _output_channels(conv, weight)
    affine = batch_norm_affine(bn, channels)
    assert not isinstance(affine, str), affine
    scale, shift = affine
    old_bias = _conv_bias(conv)
    bias = np.zeros(channels) if old_bias is None else checked_constant(old_bias).astype(np.float64)
    new_weight = op.initializer(cast_like(scale_output_channels(conv, weight.astype(np.float64), scale), w),
                                name_hint=f"{w.name}_bn")
    new_bias = op.initializer(cast_like(bias * scale + shift, w), name_hint=f"{w.name}_bn_bias")
    return op.node(conv.op_type, [x, new_weight, new_bias], dict(conv.attributes))


CONV_BN_RULES = RuleSet([
    Rule("conv-bn", _conv_bn, _rewrite, check=_check),
    Rule("conv-transpose-bn", _conv_transpose_bn, _rewrite, check=_check),
])


class FuseBnIntoConv(RewritePass):
    """Fold inference-mode BatchNormalization into the weight and bias of the Conv/ConvTranspose before it.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> FuseBnIntoConv().run(model, PassContext()).counters  # doctest: +SKIP
        {'conv-bn': 53}
    """

    name = "fuse-bn-into-conv"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = CONV_BN_RULES
