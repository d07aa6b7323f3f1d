"""``contrib-residual-sum``: on the CPU target, the residual ``Add`` before a ``LayerNormalization`` is written ``Sum``.

Algebra: ``Sum(a, b) = Add(a, b)`` for two inputs (same multidirectional broadcasting since
opset 8, same rounding: one addition per element), so the outputs do not change by a bit.

Why: at ``ORT_ENABLE_EXTENDED`` and above, onnxruntime fuses ``Add → LayerNormalization`` (with
a bias ``Add`` before it) into ``com.microsoft::SkipLayerNormalization`` whenever both sides of
the ``Add`` have known, equal 3-D shapes and the ``Add`` has no other reader. On onnxruntime
1.31's CPU provider that kernel is about 4x slower than the ``Add`` and ``LayerNormalization``
kernels it replaces (24 BERT-base residual blocks at ``[1, 128, 768]``, one thread: 14 ms fused
against 3.4 ms unfused, ``bench/contrib_latency.py residual --layers 24``; about 3 % of the
latency of BERT-base exported by the dynamo exporter, whose shapes let onnxruntime fuse). Its
fusion matches the op type ``Add`` only, so the same sum written ``Sum`` keeps the faster kernels.
``contrib-skip-layer-norm`` (not in ``-O3`` for the same reason) emits the fused op on purpose.

Must not fire when:

* the target is not ``cpu`` (the CUDA kernel is fast; fusing pays there);
* the element type is not float or float16 (onnxruntime does not fuse others);
* the ``Add`` has another reader or is a graph output (onnxruntime does not fuse it then), or
  it feeds the normalization's scale or bias rather than its input;
* the opset is below 8 (``Sum`` does not broadcast there).
"""

from __future__ import annotations

from typing import Any

import onnx

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

__all__ = ["ContribResidualSum", "RESIDUAL_SUM_RULES"]

_FUSED_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _residual_add(op: Any, a: Any, b: Any) -> Any:
    return op.Add(a, b, _name="add")


def _check(ctx: MatchContext, a: ir.Value, b: ir.Value, add: ir.Node) -> Any:
    if ctx.target != "cpu":
        return Failure(f"target '{ctx.target}' fuses SkipLayerNormalization to its benefit; only cpu is kept apart")
    out = add.outputs[0]
    dtype = out.dtype or a.dtype or b.dtype  # Add's inputs and output share one element type
    if dtype not in _FUSED_TYPES:
        return Failure(f"'{out.name}' is not float or float16 (onnxruntime fuses no other type)")
    if (add.version or 0) < 8:
        return Failure(f"Add at opset {add.version}: Sum broadcasts from opset 8 only")
    if out.is_graph_output():
        return Failure(f"'{out.name}' is a graph output")
    uses = out.uses()
    if len(uses) != 1:
        return Failure(f"'{out.name}' has {len(uses)} readers; onnxruntime fuses an Add with one reader only")
    reader, index = uses[0]
    if reader.op_type != "LayerNormalization" or reader.domain not in ("", "ai.onnx") or index != 0:
        return Failure(f"'{out.name}' is not the input of a LayerNormalization")
    return True


def _sum(op: Any, a: ir.Value, b: ir.Value) -> Any:
    return op.Sum(a, b)


#: The rule of :class:`ContribResidualSum`.
RESIDUAL_SUM_RULES = RuleSet([Rule("residual-add-as-sum", _residual_add, _sum, check=_check)])


class ContribResidualSum(RewritePass):
    """On the CPU target, write the residual Add before a LayerNormalization as Sum (same numbers).

    Keeps onnxruntime's CPU provider from fusing it into the slower SkipLayerNormalization.

    Example:
        >>> ContribResidualSum().run(model, PassContext(opt_level=3)).counters  # doctest: +SKIP
        {'residual-add-as-sum': 24}
    """

    name = "contrib-residual-sum"
    opt_level = 3
    preserves = frozenset({"topo-sorted", "shapes-inferred"})
    description = ("On the cpu target, write a residual Add that only feeds a LayerNormalization as Sum "
                   "(same numbers), so onnxruntime keeps it out of its slower SkipLayerNormalization kernel.")
    rules = RESIDUAL_SUM_RULES
