"""A BatchNormalization no producer absorbed becomes ``Mul`` + ``Add`` when a constant Mul/Add follows it.

Algebra: per channel ``c`` (axis 1), ``bn(x) = (x − μ)·γ/√(σ²+ε) + β = x·s + t`` with
``s = γ/√(σ²+ε)`` and ``t = β − μ·s``. ``s`` and ``t`` are stored with shape
``[C, 1, ..., 1]`` (rank of ``x`` minus one), so they broadcast along axis 1 only.

This is a rule of ``fuse-affine-chain`` (see :mod:`.affine_chain`), whose other rules then
merge the pair with the constant Mul/Add after it: Caffe2 exports write every
BatchNormalization as ``BN → Mul(γ') → Add(β')``, three nodes that become two. A lone
BatchNormalization is left alone: onnxruntime runs it in one pass over the tensor, about
twice as fast as a Mul and an Add.

Must not fire when:

* BatchNormalization is in training mode or its extra outputs are read (see
  ``fuse-bn-into-conv``), or its parameters are not constant ``[C]`` vectors;
* a ``fuse-bn-into-conv`` or ``fuse-bn-into-gemm`` rule can fold it into its producer
  (that removes the node instead of replacing it with two);
* its output is not read by exactly one Mul or Add by a finite constant that combines with
  the ``[C,1,...,1]`` pair without growing (nothing would merge);
* the rank of ``x`` is unknown or below 2 (the constants' shape depends on it);
* the element type is not float, float16 or double; the default-domain opset is below 7
  (Mul/Add without multidirectional broadcasting).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, Rule, RuleSet, constant_value

from graphopt.passes.fusion._common import (batch_norm_affine, cast_like, combined_size_reason, float_reason,
                                            opset_reason, static_rank, typed)
from graphopt.passes.fusion.conv_bn import CONV_BN_RULES
from graphopt.passes.fusion.linear_bn import LINEAR_BN_RULES

__all__ = ["BATCH_NORM_RULES"]

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
    return combined_size_reason(scale_shape, constant.shape)


def _check(ctx: MatchContext, x: ir.Value, bn: ir.Node) -> Any:
    reason = opset_reason(ctx, BROADCAST_OPSET, "Mul/Add with broadcasting")
    if reason:
        return Failure(reason)
    found = _affine(x, bn)
    if isinstance(found, str):
        return Failure(found)
    reason = _merging_reader_reason(bn, found[0].shape)
    if reason:
        return Failure(reason)
    for folding in (*CONV_BN_RULES.rules_for(bn), *LINEAR_BN_RULES.rules_for(bn)):
        if not isinstance(folding.find_match(bn, ctx.pass_context, explain=False), str):
            return Failure(f"rule '{folding.name}' folds it into its producer")
    return True


def _rewrite(op: Any, x: ir.Value, bn: ir.Node) -> ir.Value:
    found = _affine(x, bn)
    assert not isinstance(found, str), found
    scale, shift = found
    # s and t are [C, 1, ..., 1] of rank(x) - 1 dims, and x's axis 1 has C channels: x's shape.
    scaled = typed(op.Mul(x, op.initializer(cast_like(scale, x), name_hint="bn_scale")), x, x.shape)
    return op.Add(scaled, op.initializer(cast_like(shift, x), name_hint="bn_shift"))


BATCH_NORM_RULES = RuleSet([Rule("batch-norm-to-mul-add", _batch_norm, _rewrite, check=_check)])
