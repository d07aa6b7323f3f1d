"""``contrib-gelu``: Gelu forms and their bias ``Add`` become ``com.microsoft`` Gelu, BiasGelu, FastGelu.

Algebra::

    Gelu(x)            = ½·x·(1 + erf(x/√2))                                    com.microsoft::Gelu
    BiasGelu(a, b)     = Gelu(a + b)            b a constant [H], a [..., H]
    FastGelu(x)        = ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))              tanh approximation
    FastGelu(a, b)     = FastGelu(a + b)

Sources, folded one step at a time (the driver revisits what a rule creates):

* the erf pattern of exports (``x/√2`` as ``Div(x, √2)`` or ``Mul(x, 1/√2)``; the product
  ``½·x·P`` grouped as ``(x·P)·½``, ``(x·½)·P`` or ``x·(P·½)``; Mul/Add operands in any order)
  → ``Gelu``. Default-domain opsets below 20 have no ``Gelu``, and the standard fusions leave the
  pattern there;
* the tanh pattern (``x³`` as ``Pow(x, 3)``, ``x·(x·x)`` or ``(x·x)·x``; same groupings) →
  ``FastGelu``;
* ``Gelu(Add(a, b))`` (standard ``Gelu`` with ``approximate="none"``, or the contrib one) →
  ``BiasGelu(a, b)``; standard ``Gelu(approximate="tanh")`` or ``FastGelu`` of ``Add(a, b)`` →
  ``FastGelu(a, b)``.

Constants are read with a relative tolerance of 1e-5 (``√2``, ``1/√2``, ``√(2/π)``,
``0.044715``: exporters round them to float32 or fewer digits) and exactly for ½, 1 and 3.

Must not fire when:

* the target has no kernel for the emitted op and element type;
* a constant has another value, is not a one-element float constant, or has more dims than
  ``x`` (it would widen the result; with the rank of ``x`` unknown only rank-0 constants pass);
* the bias is not a constant vector ``[H]`` with ``H`` the (known) last dim of ``a`` (the
  kernels broadcast the bias along the last axis only, and ``a`` itself must not broadcast);
* an intermediate is read outside the pattern or is a graph output (the engine refuses).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

from graphopt.passes.contrib._common import (CONTRIB_DOMAIN, kernel_reason, last_dim, scalar_constant,
                                             static_rank, vector_constant_reason)

__all__ = ["ContribGelu", "GELU_RULES"]

#: Relative tolerance for the irrational constants of the patterns.
CONSTANT_RTOL = 1e-5
SQRT_2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715

Pattern = Callable[..., Any]


def _close(actual: float | None, expected: float, rtol: float) -> bool:
    return actual is not None and abs(actual - expected) <= rtol * abs(expected)


def _constants_reason(x: ir.Value, expected: dict[str, tuple[ir.Value, float, float]]) -> str | None:
    """Why one of the named constants is not the number expected (``value, expected, rtol``)."""
    rank = static_rank(x)
    for name, (value, number, rtol) in expected.items():
        found = scalar_constant(value, rank)
        if not _close(found, number, rtol):
            shown = "not a one-element float constant that keeps the shape of x" if found is None else found
            return f"constant {name} '{value.name}' is {shown}, expected {number:g}"
    return None


# -- the three groupings of ½·x·P ----------------------------------------------------------------
def _times_half(op: Any, x: Any, p: Any, half: Any, grouping: str) -> Any:
    if grouping == "xp-half":
        return op.Mul(op.Mul(x, p), half)
    if grouping == "xhalf-p":
        return op.Mul(op.Mul(x, half), p)
    return op.Mul(x, op.Mul(p, half))


GROUPINGS = ("xp-half", "xhalf-p", "x-phalf")


def _erf_pattern(grouping: str, divide: bool) -> Pattern:
    if divide:
        def pattern(op: Any, x: Any, half: Any, one: Any, sqrt2: Any) -> Any:
            p = op.Add(op.Erf(op.Div(x, sqrt2)), one)
            return _times_half(op, x, p, half, grouping)
    else:
        def pattern(op: Any, x: Any, half: Any, one: Any, sqrt2: Any) -> Any:  # type: ignore[misc]
            p = op.Add(op.Erf(op.Mul(x, sqrt2)), one)
            return _times_half(op, x, p, half, grouping)
    pattern.__qualname__ = f"gelu_erf_{'div' if divide else 'mul'}_{grouping.replace('-', '_')}"
    return pattern


def _erf_check(divide: bool) -> Callable[..., Any]:
    root = SQRT_2 if divide else 1.0 / SQRT_2

    def check(ctx: MatchContext, x: ir.Value, half: ir.Value, one: ir.Value, sqrt2: ir.Value) -> Any:
        reason = _constants_reason(x, {"½": (half, 0.5, 0.0), "1": (one, 1.0, 0.0),
                                       "√2" if divide else "1/√2": (sqrt2, root, CONSTANT_RTOL)})
        return Failure(reason) if reason else _kernel_check(ctx, "Gelu", x)

    return check


def _cube(op: Any, x: Any, three: Any, form: str) -> Any:
    if form == "pow":
        return op.Pow(x, three)
    if form == "x-xx":
        return op.Mul(x, op.Mul(x, x))
    return op.Mul(op.Mul(x, x), x)


def _tanh_pattern(grouping: str, cube: str) -> Pattern:
    if cube == "pow":
        def pattern(op: Any, x: Any, half: Any, one: Any, beta: Any, kappa: Any, three: Any) -> Any:
            inner = op.Mul(op.Add(x, op.Mul(_cube(op, x, three, cube), kappa)), beta)
            return _times_half(op, x, op.Add(op.Tanh(inner), one), half, grouping)
    else:
        def pattern(op: Any, x: Any, half: Any, one: Any, beta: Any, kappa: Any) -> Any:  # type: ignore[misc]
            inner = op.Mul(op.Add(x, op.Mul(_cube(op, x, None, cube), kappa)), beta)
            return _times_half(op, x, op.Add(op.Tanh(inner), one), half, grouping)
    pattern.__qualname__ = f"gelu_tanh_{cube.replace('-', '_')}_{grouping.replace('-', '_')}"
    return pattern


def _tanh_check(ctx: MatchContext, x: ir.Value, half: ir.Value, one: ir.Value, beta: ir.Value,
                kappa: ir.Value, three: ir.Value | None = None) -> Any:
    expected = {"½": (half, 0.5, 0.0), "1": (one, 1.0, 0.0), "√(2/π)": (beta, SQRT_2_OVER_PI, CONSTANT_RTOL),
                "0.044715": (kappa, CUBIC, CONSTANT_RTOL)}
    if three is not None:
        expected["3"] = (three, 3.0, 0.0)
    reason = _constants_reason(x, expected)
    return Failure(reason) if reason else _kernel_check(ctx, "FastGelu", x)


def _kernel_check(ctx: MatchContext, op_type: str, x: ir.Value) -> Any:
    reason = kernel_reason(ctx, op_type, x)
    return Failure(reason) if reason else True


def _gelu(op: Any, x: ir.Value) -> Any:
    return op.Gelu(x, _domain=CONTRIB_DOMAIN)


def _fast_gelu(op: Any, x: ir.Value) -> Any:
    return op.FastGelu(x, _domain=CONTRIB_DOMAIN)


# -- bias --------------------------------------------------------------------------------------------
def _std_gelu_bias(approximate: str) -> Pattern:
    def pattern(op: Any, a: Any, bias: Any) -> Any:
        return op.Gelu(op.Add(a, bias), approximate=approximate)

    pattern.__qualname__ = f"gelu_{approximate}_of_add"
    return pattern


def _contrib_bias(op_type: str) -> Pattern:
    def pattern(op: Any, a: Any, bias: Any) -> Any:
        return getattr(op, op_type)(op.Add(a, bias), _domain=CONTRIB_DOMAIN)

    pattern.__qualname__ = f"{op_type.lower()}_of_add"
    return pattern


def _bias_check(emitted: str) -> Callable[..., Any]:
    def check(ctx: MatchContext, a: ir.Value, bias: ir.Value) -> Any:
        reason = kernel_reason(ctx, emitted, a)
        if reason:
            return Failure(reason)
        hidden = last_dim(a)
        if hidden is None:
            return Failure(f"the last dim of '{a.name}' is unknown")
        reason = vector_constant_reason(bias, hidden, "the bias")
        if reason:
            return Failure(reason)
        if bias.dtype != a.dtype:
            return Failure(f"the bias '{bias.name}' and '{a.name}' have different element types")
        return True

    return check


def _bias_gelu(op: Any, a: ir.Value, bias: ir.Value) -> Any:
    return op.BiasGelu(a, bias, _domain=CONTRIB_DOMAIN)


def _fast_gelu_bias(op: Any, a: ir.Value, bias: ir.Value) -> Any:
    return op.FastGelu(a, bias, _domain=CONTRIB_DOMAIN)


def _rules() -> RuleSet:
    rules: list[Rule] = []
    for grouping in GROUPINGS:
        for divide in (True, False):
            rules.append(Rule(f"gelu-erf-{'div' if divide else 'mul'}-{grouping}", _erf_pattern(grouping, divide),
                              _gelu, check=_erf_check(divide), commute=True))
        for cube in ("pow", "x-xx", "xx-x"):
            rules.append(Rule(f"fast-gelu-tanh-{cube}-{grouping}", _tanh_pattern(grouping, cube), _fast_gelu,
                              check=_tanh_check, commute=True))
    rules += [
        Rule("bias-gelu", _std_gelu_bias("none"), _bias_gelu, check=_bias_check("BiasGelu"), commute=True),
        Rule("bias-gelu-contrib", _contrib_bias("Gelu"), _bias_gelu, check=_bias_check("BiasGelu"), commute=True),
        Rule("fast-gelu-bias", _std_gelu_bias("tanh"), _fast_gelu_bias, check=_bias_check("FastGelu"),
             commute=True),
        Rule("fast-gelu-bias-contrib", _contrib_bias("FastGelu"), _fast_gelu_bias, check=_bias_check("FastGelu"),
             commute=True),
    ]
    return RuleSet(rules)


#: The rules of :class:`ContribGelu`.
GELU_RULES = _rules()


class ContribGelu(RewritePass):
    """Fuse Gelu patterns and bias Adds into com.microsoft Gelu, BiasGelu and FastGelu.

    Example:
        >>> ContribGelu().run(model, PassContext()).counters  # doctest: +SKIP
        {'gelu-erf-div-xp-half': 12, 'bias-gelu-contrib': 12}
    """

    name = "contrib-gelu"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = GELU_RULES
