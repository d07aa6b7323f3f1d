"""``fuse-matmul-add-into-gemm``: ``Add(MatMul(A, B), C)`` becomes ``Gemm(A, B, C)`` where Gemm is legal.

Algebra: ``Gemm(A, B, C) = A·B + C`` (``alpha = beta = 1``, no transposes) with ``C``
broadcast one way to ``[M, N]``. ``Add`` broadcasts both ways, so the two agree only when the
sum keeps the product's shape ``[M, N]``.

Must not fire when:

* ``A`` does not have static rank 2: Gemm is 2-D only, and a batched MatMul (rank > 2) stays
  MatMul + Add (onnxruntime fuses those itself into its own kernels);
* ``B`` is not a constant 2-D weight (a graph input may be overridden);
* the bias shape is not static, has more than 2 dims, or would widen the product
  (``[K, 1]`` with ``K`` ≠ ``M``, a last dim other than 1 or ``N``);
* the MatMul output has other readers or is a graph output (the engine refuses);
* the element type is not float, float16 or double; Gemm needs opset 7.

onnxruntime at ``ORT_ENABLE_ALL`` makes the same fusion at load time; doing it here makes the
saved model already fused, for runtimes and optimization levels that do not.
"""

from __future__ import annotations

from typing import Any

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet, constant_value

from graphopt.passes.fusion._common import bias_shape_reason, float_reason, not_constant_reason, opset_reason

__all__ = ["FuseMatMulAddIntoGemm", "MATMUL_ADD_RULES"]

#: Gemm with unidirectional broadcasting of ``C`` (and no ``broadcast`` attribute) starts at opset 7.
GEMM_OPSET = 7


def _matmul_add(op: Any, a: Any, b: Any, c: Any) -> Any:
    return op.Add(op.MatMul(a, b), c)


def _check(ctx: MatchContext, a: ir.Value, b: ir.Value, c: ir.Value) -> Any:
    reason = float_reason(a) or float_reason(c) or opset_reason(ctx, GEMM_OPSET, "Gemm")
    if reason:
        return Failure(reason)
    a_shape = a.shape
    if a_shape is None or a_shape.rank != 2:
        rank = "unknown" if a_shape is None else a_shape.rank
        return Failure(f"A '{a.name}' has rank {rank}; Gemm needs rank 2")
    weight = constant_value(b)
    if weight is None:
        return Failure(not_constant_reason(b, "B"))
    if weight.ndim != 2:
        return Failure(f"B '{b.name}' has rank {weight.ndim}; Gemm needs rank 2")
    c_shape = c.shape
    if c_shape is None or not c_shape.is_static():
        return Failure(f"the shape of the bias '{c.name}' is not static")
    reason = bias_shape_reason([int(d) for d in c_shape.dims],  # type: ignore[arg-type]
                               a_shape.dims[0], int(weight.shape[1]))
    return Failure(reason) if reason else True


def _rewrite(op: Any, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    return op.Gemm(a, b, c)


MATMUL_ADD_RULES = RuleSet([Rule("matmul-add-to-gemm", _matmul_add, _rewrite, check=_check, commute=True)])


class FuseMatMulAddIntoGemm(RewritePass):
    """Turn ``Add(MatMul(A, B), C)`` with a 2-D ``A`` and a constant 2-D ``B`` into ``Gemm(A, B, C)``.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> FuseMatMulAddIntoGemm().run(model, PassContext()).counters  # doctest: +SKIP
        {'matmul-add-to-gemm': 1}
    """

    name = "fuse-matmul-add-into-gemm"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = MATMUL_ADD_RULES
