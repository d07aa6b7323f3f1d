"""graphopt's rewrite engine: patterns, rules, a greedy worklist driver and a why-not tracer.

Patterns
    A pattern is a Python function over an op builder. Its first parameter is the builder
    ``op``; every other parameter is a *variable* that binds the :class:`~graphopt.ir.Value` found
    at that place (a variable used twice must bind the same value)::

        def pattern(op, x, w):
            return op.Relu(op.Conv(x, w, _name="conv"))

    ``op.OpType(*inputs, _domain="", _name=None, _allow_other_inputs=False, _outputs=1, **attrs)``:

    - inputs: variables, nested op calls, numbers (a constant whose every element equals the
      number) or ``None`` (the optional input must be omitted). Without ``_allow_other_inputs``,
      the node may not have inputs beyond those written.
    - ``_name`` binds the matched :class:`~graphopt.ir.Node` under that name.
    - attribute constraints: ``axis=1`` (an absent attribute takes its schema default; lists
      equal tuples) or a callable that gets the value (``None`` when absent without default):
      ``perm=lambda p: p is not None and len(p) == 4``. Other attributes are not constrained.
    - ``_outputs=k`` (k > 1) returns a tuple of the node's outputs: ``a, b = op.Split(x, _outputs=2)``.
      Nodes may have more outputs than the pattern uses when the others are unused.

    The pattern has a single root: the returned op call, or the complete output tuple of one
    multi-output op (then ``rewrite`` returns a tuple of as many values).

Rules
    ``Rule(name, pattern, rewrite, check=None, benefit=1, commute=False)``. ``check(ctx, **bindings)``
    returns ``True``/``None`` to accept, or ``False``, a reason string or ``Failure("reason")``;
    ``ctx`` is a :class:`MatchContext` (the pass context, the match, ``ctx.constant(value)``).
    ``rewrite(op, **bindings)`` builds the replacement with a real builder (``op.Conv(...)``,
    ``op.initializer(array)`` for a NEW tensor, ``op.constant(value)``) and returns the value
    that replaces the root's output, or ``None`` to decline. ``check`` and ``rewrite`` take only
    the bindings they name. New nodes carry ``node.meta["created_by"] = rule.name``.

Driver
    :func:`apply_rules` visits candidates found through an index on the root op, never scanning
    every node for every rule. Before replacing, it refuses matches whose intermediates are
    used outside the match or are graph outputs; the root output may be a graph output (its name
    and type are kept). Dead matched nodes are removed. It recurses into If/Loop/Scan bodies and
    function bodies, honours ``--bisect-limit`` through ``ctx.allow_rewrite`` and stops with a
    warning after ``ctx.limits.max_rewrites`` rewrites.

Complete example::

    import numpy as np
    from graphopt import ir
    from graphopt.pipeline import PassContext
    from graphopt.rewrite import (Failure, Rule, apply_rules, constant_value, format_why_not,
                                  why_not)

    def add_add(op, x, c1, c2):
        return op.Add(op.Add(x, c1), c2)

    def both_constant(ctx, c1, c2):
        if ctx.constant(c1) is None or ctx.constant(c2) is None:
            return Failure("c1 and c2 must be constants")
        return True

    def fold(op, x, c1, c2):
        total = op.initializer(constant_value(c1) + constant_value(c2), name_hint="sum")
        return op.Add(x, total)

    rule = Rule("fold-add-add", add_add, fold, check=both_constant, commute=True)
    model = ir.load("model.onnx")
    print(format_why_not(why_not(model, rule)))
    counts = apply_rules(model, [rule], PassContext())   # {'fold-add-add': 3}

A rule set becomes a pass with :func:`rule_set_pass` or by subclassing :class:`RewritePass`.
"""

from __future__ import annotations

from graphopt.rewrite._builder import RewriteBuilder
from graphopt.rewrite._driver import apply_rules
from graphopt.rewrite._matcher import Match, MatchSearch, constant_value, match_pattern, unsafe_reason
from graphopt.rewrite._pass import RewritePass, rule_set_pass
from graphopt.rewrite._pattern import (COMMUTATIVE_OPS, NodeOutputPattern, Pattern, PatternBuilder, PatternValue,
                                       RuleError, Var, compile_pattern)
from graphopt.rewrite._rule import Failure, MatchContext, Rule, RuleSet, rule
from graphopt.rewrite._why_not import WhyNot, find_rule, format_why_not, why_not

__all__ = [
    "COMMUTATIVE_OPS", "Failure", "Match", "MatchContext", "MatchSearch", "NodeOutputPattern", "Pattern",
    "PatternBuilder", "PatternValue", "RewriteBuilder", "RewritePass", "Rule", "RuleError", "RuleSet", "Var",
    "WhyNot", "apply_rules", "compile_pattern",
    "constant_value", "find_rule", "format_why_not", "match_pattern", "rule", "rule_set_pass",
    "unsafe_reason", "why_not",
]
