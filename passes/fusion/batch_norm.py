"""A BatchNormalization no producer absorbed takes in the constant Mul/Add after it.

Algebra: per channel ``c`` (axis 1), ``bn(x) = (x − μ)·γ/√(σ²+ε) + β = x·s + t`` with
``s = γ/√(σ²+ε)`` and ``t = β − μ·s``.

``batch-norm-absorbs-mul-add`` (and ``-mul``, ``-add``): a per-channel constant Mul by ``a`` and
Add of ``b`` after it (Caffe2 exports write every BatchNormalization as ``BN → Mul(γ') →
Add(β')``) fold into the normalization's own parameters::

    bn(x)·a + b = (x − μ)·(γ·a)/√(σ²+ε) + (β·a + b)      γ' = γ·a,  β' = β·a + b

three nodes become one, which onnxruntime runs in one pass over the tensor (about twice as fast
as a Mul and an Add). At ``ORT_ENABLE_ALL`` its NCHWc transformer keeps a BatchNormalization
in the blocked layout, while a Mul/Add pair stays NCHW with layout conversions around it
(DenseNet-121: 62 ReorderInput and 63 ReorderOutput nodes with Mul + Add, one with
BatchNormalization): the model measured 6-11% faster with optimizations off, 14-16% with them on.
``a`` and ``b`` must broadcast along axis 1 only (``[C,1,...,1]``, ``[1,C,1,...]`` or one element),
so that they are per-channel vectors.

``batch-norm-to-mul-add``: for a constant that is not per-channel but merges without growing
(``[C,H,W]`` on an ``[N,C,H,W]`` input), the BatchNormalization becomes ``Mul(s) + Add(t)``
with ``s``, ``t`` of shape ``[C, 1, ..., 1]`` (rank of ``x`` minus one), which the other rules
of ``fuse-affine-chain`` (see :mod:`.affine_chain`) then merge with the constant after it. A
lone BatchNormalization is left alone.

Must not fire when:

* BatchNormalization is in training mode or its extra outputs are read (see
  ``fuse-bn-into-conv``), or its parameters are not constant ``[C]`` vectors;
* a ``fuse-bn-into-conv`` or ``fuse-bn-into-gemm`` rule can fold it into its producer
  (that removes the node instead of replacing it with two);
* its output is not read by exactly one Mul or Add by a finite constant (that is per-channel
  for the absorbing rules, and combines with the ``[C,1,...,1]`` pair without growing for
  ``batch-norm-to-mul-add``; a per-channel constant is left to the absorbing rules);
* the rank of ``x`` is unknown or below 2 (the constants' shape depends on it);
* the element type is not float, float16 or double; the default-domain opset is below 7
  (Mul/Add without multidirectional broadcasting).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, Rule, RuleSet, constant_value

from graphopt.passes.fusion._common import (batch_norm_affine, cast_like, channel_vector, checked_constant,
                                            combined_size_reason, float_reason, opset_reason, static_rank, typed)
from graphopt.passes.fusion.conv_bn import CONV_BN_RULES
from graphopt.passes.fusion.linear_bn import LINEAR_BN_RULES

__all__ = ["BATCH_NORM_RULES", "absorbed_parameters"]

#: Mul and Add broadcast multidirectionally from opset 7.
BROADCAST_OPSET = 7


def _batch_norm(op: Any, x: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
    return op.BatchNormalization(x, scale, bias, mean, var, _name="bn")


def _ranked_affine(x: ir.Value, bn: ir.Node) -> tuple[int, tuple[np.ndarray, np.ndarray]] | str:
    """The static rank of ``x`` (at least 2) and the per-channel ``(s, t)`` of ``bn``, or why not."""
    reason = float_reason(x)
    if reason:
        return reason
    rank = static_rank(x)
    if rank is None or rank < 2:
        return f"the rank of '{x.name}' is {'unknown' if rank is None else rank}, expected at least 2"
    channels = x.shape.dims[1] if x.shape is not None else None
    affine = batch_norm_affine(bn, channels if isinstance(channels, int) else None)
    return affine if isinstance(affine, str) else (rank, affine)


def _affine(x: ir.Value, bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """``(s, t)`` shaped ``[C, 1, ..., 1]`` for the rank of ``x``, or why not."""
    found = _ranked_affine(x, bn)
    if isinstance(found, str):
        return found
    rank, (s, t) = found
    shape = (-1,) + (1,) * (rank - 2)
    return s.reshape(shape), t.reshape(shape)


def _merging_reader_reason(bn: ir.Node, scale_shape: tuple[int, ...]) -> str | None:
    """Why no constant Mul/Add after ``bn`` would merge with the decomposed pair (``None``: one does).

    ``fuse-affine-chain`` merges the reader's constant with ``s``/``t`` (of ``scale_shape``)
    when it is finite and the combination does not grow; otherwise nothing would merge.
    """
    output = bn.outputs[0]
    readers = output.uses()
    if output.is_graph_output() or len(readers) != 1:
        return "its output is not read by exactly one node"
    reader, _ = readers[0]
    if reader.op_type not in ("Mul", "Add") or reader.domain not in ("", "ai.onnx") or len(reader.inputs) != 2:
        return f"its reader is a {reader.op_type}, not a Mul or Add to merge with"
    other = reader.inputs[1] if reader.inputs[0] is output else reader.inputs[0]
    constant = constant_value(other)
    if constant is None:
        return f"its reader {reader.op_type} does not take a constant"
    if not np.all(np.isfinite(constant.astype(np.float64))):
        return f"the constant of its reader {reader.op_type} holds a non-finite value"
    if channel_vector(constant, scale_shape[0], len(scale_shape) + 1) is not None:
        return f"the per-channel constant of its reader {reader.op_type} folds into the BatchNormalization itself"
    return combined_size_reason(scale_shape, constant.shape)


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
    reason = _merging_reader_reason(bn, found[0].shape)
    if reason:
        return Failure(reason)
    return True


def _rewrite(op: Any, x: ir.Value, bn: ir.Node) -> ir.Value:
    found = _affine(x, bn)
    assert not isinstance(found, str), found
    scale, shift = found
    # s and t are [C, 1, ..., 1] of rank(x) - 1 dims, and x's axis 1 has C channels: x's shape.
    scaled = typed(op.Mul(x, op.initializer(cast_like(scale, x), name_hint="bn_scale")), x, x.shape)
    return op.Add(scaled, op.initializer(cast_like(shift, x), name_hint="bn_shift"))


# -- a per-channel Mul/Add after the BatchNormalization folds into its parameters ---------------
def _bn_mul_add(op: Any, x: Any, scale: Any, bias: Any, mean: Any, var: Any, a: Any, b: Any) -> Any:
    return op.Add(op.Mul(_batch_norm(op, x, scale, bias, mean, var), a), b)


def _bn_mul(op: Any, x: Any, scale: Any, bias: Any, mean: Any, var: Any, a: Any) -> Any:
    return op.Mul(_batch_norm(op, x, scale, bias, mean, var), a)


def _bn_add(op: Any, x: Any, scale: Any, bias: Any, mean: Any, var: Any, b: Any) -> Any:
    return op.Add(_batch_norm(op, x, scale, bias, mean, var), b)


def _channel_constant(value: ir.Value | None, channels: int, rank: int, what: str) -> np.ndarray | str | None:
    """``value`` as a float64 per-channel vector, ``None`` when absent, or why it is none."""
    if value is None:
        return None
    array = constant_value(value)
    if array is None:
        kind = "a graph input (callers may override it)" if value.is_graph_input() else "not a constant"
        return f"the {what} '{value.name}' is {kind}"
    if array.dtype.kind != "f" or not np.all(np.isfinite(array)):
        return f"the {what} '{value.name}' is not a finite float constant"
    vector = channel_vector(array.astype(np.float64), channels, rank)
    if vector is None:
        return f"the {what} '{value.name}' of shape {list(array.shape)} is not per-channel (axis 1 of rank {rank})"
    return vector


def absorbed_parameters(bn: ir.Node, x: ir.Value, a: ir.Value | None, b: ir.Value | None,
                        ) -> tuple[np.ndarray, np.ndarray] | str:
    """``(γ', β')`` in float64 with ``bn'(x) = bn(x)·a + b`` per channel, or why the Mul/Add cannot fold.

    Example:
        >>> absorbed_parameters(bn, x, a=mul_constant, b=None)  # doctest: +SKIP
        (array([...]), array([...]))
    """
    found = _ranked_affine(x, bn)
    if isinstance(found, str):
        return found
    rank = found[0]
    gamma = checked_constant(bn.inputs[1]).astype(np.float64)
    beta = checked_constant(bn.inputs[2]).astype(np.float64)
    factor = _channel_constant(a, gamma.shape[0], rank, "Mul constant")
    shift = _channel_constant(b, gamma.shape[0], rank, "Add constant")
    for found in (factor, shift):
        if isinstance(found, str):
            return found
    factor = np.ones_like(gamma) if factor is None else factor
    shift = np.zeros_like(beta) if shift is None else shift
    return gamma * factor, beta * factor + shift


def _absorb_check(ctx: MatchContext, x: ir.Value, bn: ir.Node, a: ir.Value | None = None,
                  b: ir.Value | None = None) -> Any:
    found = absorbed_parameters(bn, x, a, b)
    if isinstance(found, str):
        return Failure(found)
    for folding in (*CONV_BN_RULES.rules_for(bn), *LINEAR_BN_RULES.rules_for(bn)):
        if not isinstance(folding.find_match(bn, ctx.pass_context, explain=False), str):
            return Failure(f"rule '{folding.name}' folds it into its producer")
    return True


def _absorb(op: Any, x: ir.Value, bn: ir.Node, a: ir.Value | None = None, b: ir.Value | None = None) -> ir.Value:
    found = absorbed_parameters(bn, x, a, b)
    assert not isinstance(found, str), found
    gamma, beta = found
    scale, bias = bn.inputs[1], bn.inputs[2]
    new_scale = op.initializer(cast_like(gamma, scale), name_hint=f"{scale.name}_absorbed")
    new_bias = op.initializer(cast_like(beta, bias), name_hint=f"{bias.name}_absorbed")
    return op.BatchNormalization(x, new_scale, new_bias, *bn.inputs[3:5], **bn.attributes)


BATCH_NORM_RULES = RuleSet([
    Rule("batch-norm-absorbs-mul-add", _bn_mul_add, _absorb, check=_absorb_check, commute=True, benefit=3),
    Rule("batch-norm-absorbs-mul", _bn_mul, _absorb, check=_absorb_check, commute=True, benefit=2),
    Rule("batch-norm-absorbs-add", _bn_add, _absorb, check=_absorb_check, commute=True, benefit=2),
    Rule("batch-norm-to-mul-add", _batch_norm, _rewrite, check=_check),
])
