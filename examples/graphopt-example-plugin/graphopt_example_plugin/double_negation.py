"""``fold-double-negation``: ``Neg(Neg(x))`` computes ``x``.

Algebra: ``-(-x) = x`` holds exactly for every type ONNX's ``Neg`` accepts: for floats,
including ``-0.0``, infinities and NaN (negation only flips the sign bit), and for signed
integers, including the most negative value (its negation wraps around to itself). The
rewrite is therefore exact, with no tolerance.

Must not fire when the inner ``Neg`` is read by anything else or is a graph output (the
rewrite engine refuses such matches). When the outer ``Neg`` feeds a graph output, the output
keeps its name and type.
"""

from __future__ import annotations

from typing import Any

from graphopt.rewrite import Rule, RewritePass

__all__ = ["FoldDoubleNegation", "DOUBLE_NEGATION"]


def _double_negation(op: Any, x: Any) -> Any:
    return op.Neg(op.Neg(x))


def _just_x(op: Any, x: Any) -> Any:
    return x


#: The rule: ``Neg(Neg(x))`` -> ``x``.
DOUBLE_NEGATION = Rule("double-negation", _double_negation, _just_x)


class FoldDoubleNegation(RewritePass):
    """Replace ``Neg(Neg(x))`` by ``x``.

    Example:
        >>> from graphopt.pipeline import PassManager, PassContext
        >>> PassManager("fold-double-negation", PassContext()).run(model)  # doctest: +SKIP
    """

    name = "fold-double-negation"
    opt_level = 2
    rules = [DOUBLE_NEGATION]
