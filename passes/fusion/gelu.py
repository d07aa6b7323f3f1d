"""``fuse-gelu``: the decomposed Gelu of exports becomes ``Gelu`` (opset 20+).

Algebra::

    Gelu(x)        = ½·x·(1 + erf(x/√2))                        (approximate="none")
    Gelu_tanh(x)   = ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))    (approximate="tanh")

Exports write ``x/√2`` as ``Div(x, √2)`` or ``Mul(x, 1/√2)``, ``x³`` as ``Pow(x, 3)`` or
``x·x·x``, and the product ``½·x·P`` in three groupings: ``(x·P)·½``, ``(x·½)·P`` and
``x·(P·½)``; every Mul and Add may have its operands in either order (the rules commute).
ONNX's own function body of Gelu (what ``_expanded`` models and function inlining produce)
adds with a two-input ``Sum`` instead of ``Add``; both are matched.

Constants are read with a relative tolerance of 1e-5 (``√2``, ``1/√2``, ``√(2/π)``,
``0.044715``: exporters write them rounded to float32 or fewer digits) and exactly for
``½``, ``1``, ``2`` and ``3``.

Must not fire when:

* the default-domain opset is below 20 (no Gelu); the onnxruntime contrib ``Gelu`` and
  ``FastGelu`` belong to the target-specific fusions, not here;
* a constant has another value, is not a one-element constant, or has more dims than ``x``
  (it would widen the result; with the rank of ``x`` unknown only rank-0 constants pass);
* an intermediate is read outside the pattern or is a graph output (the engine refuses);
* the element type is not float, float16 or double.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

from graphopt.passes.fusion._common import close_to, float_reason, opset_reason, scalar_constant, static_rank

__all__ = ["FuseGelu", "GELU_RULES"]

#: Gelu entered the default domain at opset 20.
GELU_OPSET = 20
#: Relative tolerance for the irrational constants of the patterns.
CONSTANT_RTOL = 1e-5
#: Tolerance for constants that exports write exactly (½, 1, 3).
EXACT = 1e-7
SQRT_2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715

Builder = Any
Pattern = Callable[..., Any]


# -- the three groupings of ½·x·P ---------------------------------------------------------------
def _times_half(op: Builder, x: Any, p: Any, half: Any, grouping: str) -> Any:
    if grouping == "xp-half":
        return op.Mul(op.Mul(x, p), half)
    if grouping == "xhalf-p":
        return op.Mul(op.Mul(x, half), p)
    return op.Mul(x, op.Mul(p, half))


def _erf_patterns(grouping: str, add: str) -> tuple[Pattern, Pattern]:
    def divided(op: Builder, x: Any, root2: Any, one: Any, half: Any) -> Any:
        return _times_half(op, x, getattr(op, add)(op.Erf(op.Div(x, root2)), one), half, grouping)

    def multiplied(op: Builder, x: Any, inv_root2: Any, one: Any, half: Any) -> Any:
        return _times_half(op, x, getattr(op, add)(op.Erf(op.Mul(x, inv_root2)), one), half, grouping)

    return divided, multiplied


def _tanh_patterns(grouping: str, add: str) -> tuple[Pattern, Pattern]:
    def with_pow(op: Builder, x: Any, three: Any, cubic: Any, root: Any, one: Any, half: Any) -> Any:
        inner = op.Mul(getattr(op, add)(x, op.Mul(op.Pow(x, three), cubic)), root)
        return _times_half(op, x, getattr(op, add)(op.Tanh(inner), one), half, grouping)

    def with_cube(op: Builder, x: Any, cubic: Any, root: Any, one: Any, half: Any) -> Any:
        inner = op.Mul(getattr(op, add)(x, op.Mul(op.Mul(op.Mul(x, x), x), cubic)), root)
        return _times_half(op, x, getattr(op, add)(op.Tanh(inner), one), half, grouping)

    return with_pow, with_cube


# -- checks --------------------------------------------------------------------------------------
def _constants_reason(x: ir.Value, expected: dict[str, tuple[ir.Value | None, float, float]]) -> str | None:
    rank = static_rank(x)
    for what, (value, target, rtol) in expected.items():
        if value is None:
            continue
        found = scalar_constant(value, rank)
        if not close_to(found, target, rtol):
            shown = "not a one-element constant of rank <= that of x" if found is None else f"{found:g}"
            return f"{what} '{value.name}' is {shown}, expected {target:g}"
    return None


def _base_reason(ctx: MatchContext, x: ir.Value) -> str | None:
    return opset_reason(ctx, GELU_OPSET, "Gelu") or float_reason(x)


def _check_erf(ctx: MatchContext, x: ir.Value, one: ir.Value, half: ir.Value,
               root2: ir.Value | None = None, inv_root2: ir.Value | None = None) -> Any:
    reason = _base_reason(ctx, x) or _constants_reason(x, {
        "the divisor": (root2, SQRT_2, CONSTANT_RTOL), "the factor": (inv_root2, 1 / SQRT_2, CONSTANT_RTOL),
        "the constant 1": (one, 1.0, EXACT), "the constant 0.5": (half, 0.5, EXACT)})
    return Failure(reason) if reason else True


def _check_tanh(ctx: MatchContext, x: ir.Value, cubic: ir.Value, root: ir.Value, one: ir.Value,
                half: ir.Value, three: ir.Value | None = None) -> Any:
    reason = _base_reason(ctx, x) or _constants_reason(x, {
        "the exponent": (three, 3.0, EXACT), "the cubic factor": (cubic, CUBIC, CONSTANT_RTOL),
        "the factor sqrt(2/pi)": (root, SQRT_2_OVER_PI, CONSTANT_RTOL),
        "the constant 1": (one, 1.0, EXACT), "the constant 0.5": (half, 0.5, EXACT)})
    return Failure(reason) if reason else True


def _rewrite_erf(op: Builder, x: ir.Value) -> ir.Value:
    return op.Gelu(x)


def _rewrite_tanh(op: Builder, x: ir.Value) -> ir.Value:
    return op.Gelu(x, approximate="tanh")


def _rules() -> list[Rule]:
    rules = []
    for add, suffix in (("Add", ""), ("Sum", "-sum")):
        for grouping in ("xp-half", "xhalf-p", "x-phalf"):
            divided, multiplied = _erf_patterns(grouping, add)
            rules.append(Rule(f"gelu-erf-div-{grouping}{suffix}", divided, _rewrite_erf, check=_check_erf,
                              commute=True))
            rules.append(Rule(f"gelu-erf-mul-{grouping}{suffix}", multiplied, _rewrite_erf, check=_check_erf,
                              commute=True))
            with_pow, with_cube = _tanh_patterns(grouping, add)
            rules.append(Rule(f"gelu-tanh-pow-{grouping}{suffix}", with_pow, _rewrite_tanh, check=_check_tanh,
                              commute=True))
            rules.append(Rule(f"gelu-tanh-cube-{grouping}{suffix}", with_cube, _rewrite_tanh, check=_check_tanh,
                              commute=True))
    return rules


GELU_RULES = RuleSet(_rules())


class FuseGelu(RewritePass):
    """Replace the erf and tanh forms of Gelu written out in elementary ops with Gelu (opset 20+).

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> FuseGelu().run(model, PassContext()).counters  # doctest: +SKIP
        {'gelu-erf-div-xp-half': 12}
    """

    name = "fuse-gelu"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = GELU_RULES
