"""``contrib-silu``: ``x * Sigmoid(x)`` (SiLU, Swish) becomes ``com.microsoft::QuickGelu(alpha=1)``.

Algebra: ``QuickGelu(x, alpha) = x · σ(alpha · x)`` with ``σ(t) = 1 / (1 + e^-t)``, so

* ``Mul(x, Sigmoid(x))``              = ``QuickGelu(x, alpha=1)``  (SiLU / Swish, YOLOv5-v8,
  EfficientNet);
* ``Mul(x, Sigmoid(Mul(x, a)))``      = ``QuickGelu(x, alpha=a)``  (CLIP's quick GELU, a = 1.702).

One kernel reads ``x`` once and writes the result once, where the decomposed form runs two
kernels and writes the sigmoid to memory in between. On onnxruntime's CPU provider the kernel
computes ``t = x·alpha`` (exact for alpha = 1), ``σ(t)`` with the same MLAS logistic routine the
``Sigmoid`` kernel uses, and ``x·σ(t)``: the results are bit-identical to the decomposed form.
The attribute is always written, because the kernel's default alpha is 1.702, not 1.

Mul operands are matched in either order.

Must not fire when:

* the target has no ``QuickGelu`` kernel for the element type (the CPU kernel is float32 only;
  CUDA has float32, float64 and float16);
* the sigmoid (or the scaled input) is read by another node or is a graph output (the engine
  refuses: that value would be lost);
* ``Sigmoid`` reads another value than the one multiplied (``x · σ(y)`` is no SiLU);
* the scale ``a`` is not a one-element float constant, or has more dims than ``x`` (it would
  broadcast ``x`` to a larger shape); with the rank of ``x`` unknown only a rank-0 scale passes.
"""

from __future__ import annotations

from typing import Any

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

from graphopt.passes.contrib._common import CONTRIB_DOMAIN, kernel_reason, scalar_constant, static_rank

__all__ = ["ContribSiLU", "SILU_RULES"]


def _silu(op: Any, x: Any) -> Any:
    return op.Mul(x, op.Sigmoid(x))


def _scaled_silu(op: Any, x: Any, alpha: Any) -> Any:
    return op.Mul(x, op.Sigmoid(op.Mul(x, alpha)))


def _check(ctx: MatchContext, x: ir.Value) -> Any:
    reason = kernel_reason(ctx, "QuickGelu", x)
    return Failure(reason) if reason else True


def _check_scaled(ctx: MatchContext, x: ir.Value, alpha: ir.Value) -> Any:
    reason = kernel_reason(ctx, "QuickGelu", x)
    if reason:
        return Failure(reason)
    if alpha.dtype is not None and alpha.dtype != x.dtype:
        return Failure(f"the scale '{alpha.name}' and '{x.name}' have different element types")
    if scalar_constant(alpha, static_rank(x)) is None:
        return Failure(f"the scale '{alpha.name}' is not a one-element float constant that keeps the shape of "
                       f"'{x.name}'")
    return True


def _rewrite(op: Any, x: ir.Value) -> Any:
    return op.QuickGelu(x, _domain=CONTRIB_DOMAIN, alpha=1.0)


def _rewrite_scaled(op: Any, x: ir.Value, alpha: ir.Value) -> Any:
    scale = scalar_constant(alpha, static_rank(x))
    assert scale is not None, "checked"
    return op.QuickGelu(x, _domain=CONTRIB_DOMAIN, alpha=scale)


#: The rules of :class:`ContribSiLU`: ``silu`` (alpha 1) and ``quick-gelu`` (a constant scale).
SILU_RULES = RuleSet([
    # The scaled form first: its Sigmoid reads Mul(x, a), which the plain rule would not match
    # anyway, but a larger match is the better one when both could apply.
    Rule("quick-gelu", _scaled_silu, _rewrite_scaled, check=_check_scaled, benefit=2, commute=True),
    Rule("silu", _silu, _rewrite, check=_check, commute=True),
])


class ContribSiLU(RewritePass):
    """Fuse ``x * Sigmoid(x)`` (and ``x * Sigmoid(a * x)``) into com.microsoft QuickGelu.

    Example:
        >>> ContribSiLU().run(model, PassContext(target="cpu")).counters  # doctest: +SKIP
        {'silu': 57}
    """

    name = "contrib-silu"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = SILU_RULES
