"""The why-not tracer, rule lookup by name, and rule sets run as passes by the pass manager."""

from __future__ import annotations

import pytest

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.rewrite import (Failure, MatchContext, PatternBuilder, PatternValue, RewritePass, Rule,
                              RuleError, Var, find_rule, format_why_not, rule_set_pass, why_not)


def relu_of_conv(op: PatternBuilder, x: Var, w: Var) -> PatternValue:
    return op.Relu(op.Conv(x, w, _name="conv", group=1))


def weight_is_private(ctx: MatchContext, w: ir.Value, conv: ir.Node) -> bool | Failure:
    if ctx.constant(w) is None:
        return Failure("weight is not a constant")
    if w.num_uses > 1:
        return Failure("weight is shared")
    return True


CONV_RELU = Rule("conv-relu-demo", relu_of_conv, lambda op, x, w: op.Relu(op.Conv(x, w)),
                 check=weight_is_private)

CANDIDATES = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[1,2,4,4] x, float[1,2,4,4] x2, float[2,2,1,1] wi) => (float[1,2,4,4] r1, float[1,2,4,4] r2,
   float[1,2,4,4] r3, float[1,2,4,4] r4, float[1,2,4,4] r5, float[1,2,4,4] r6, float[1,2,4,4] c5)
  <float[2,2,1,1] w = {1.0, 0.0, 0.0, 1.0}, float[2,2,1,1] ws = {0.5, 0.0, 0.0, 0.5},
   float[2,1,1,1] wg = {1.0, 2.0}> {
   c1 = Conv(x, w)
   r1 = Relu(c1)
   r2 = Relu(x)
   c3 = Conv<group = 2>(x, wg)
   r3 = Relu(c3)
   c4a = Conv(x, ws)
   r4 = Relu(c4a)
   c4b = Conv(x2, ws)
   c5 = Conv(x2, wi)
   r5 = Relu(c5)
   a = Add(c4b, x)
   r6 = Relu(a)
}
"""


def test_why_not_reports_every_candidate(load) -> None:
    model = load(CANDIDATES)
    entries = why_not(model, CONV_RELU)
    assert [e.node.outputs[0].name for e in entries] == ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert [e.reason for e in entries] == [
        None,
        "input 0: expected Conv, found graph input 'x'",
        "input 0: attribute 'group': expected 1, found 2",
        "check failed: weight is shared",
        "intermediate 'c5' is a graph output",
        "input 0: expected Conv, found Add ('a')",
    ]
    assert [e.fires for e in entries] == [True] + [False] * 5
    text = format_why_not(entries)
    assert text.splitlines()[0] == "Relu -> 'r1': fires"
    assert text.splitlines()[3] == "Relu -> 'r4': does not fire: check failed: weight is shared"
    assert len(text.splitlines()) == 6


def test_why_not_names_nodes_and_subgraphs(load) -> None:
    model = load("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (bool c, float[2] x) => (float[2] y) {
           y = If(c) <
             then_branch = t () => (float[2] o) { n = Neg(x) o = Relu(n) },
             else_branch = e () => (float[2] o2) { o2 = Identity(x) }
           >
        }
    """)
    model.graph.nodes[0].name = "branch"
    model.graph.nodes[0].attributes["then_branch"].value.nodes[1].name = "inner_relu"
    rule = Rule("relu-of-neg", lambda op, x: op.Relu(op.Neg(x)), lambda op, x: op.Relu(op.Neg(x)))
    assert format_why_not(why_not(model, rule)) == "Relu 'inner_relu' in If 'branch' then_branch: fires"
    no_candidates = Rule("no-softmax", lambda op, x: op.Softmax(x), lambda op, x: x)
    assert why_not(model, no_candidates) == []
    assert "no candidate" in format_why_not([])


def test_why_not_passes_the_context_to_check(load) -> None:
    model = load(CANDIDATES)
    seen: list[str] = []

    def target_is_cuda(ctx: MatchContext, conv: ir.Node) -> bool | str:
        seen.append(ctx.target)
        return ctx.target == "cuda" or "needs the cuda target"

    rule = Rule("cuda-only", relu_of_conv, lambda op, x, w: op.Relu(op.Conv(x, w)), check=target_is_cuda)
    assert why_not(model, rule)[0].reason == "check failed: needs the cuda target"
    assert why_not(model, rule, PassContext(target="cuda"))[0].reason is None
    assert seen[0] == "cpu" and seen[-1] == "cuda"


DOUBLE_RELU = Rule("double-relu", lambda op, x: op.Relu(op.Relu(x)), lambda op, x: op.Relu(x))

CollapseRelus = rule_set_pass("collapse-relus", [DOUBLE_RELU], opt_level=1,
                              description="Collapse Relu(Relu(x)) into Relu(x).")


class FoldNegations(RewritePass):
    """Remove Neg(Neg(x))."""

    name = "fold-negations"
    rules = [Rule("double-neg", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: x)]


NESTED = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2,3] x) => (float[2,3] y) {
   a = Relu(x)
   b = Relu(a)
   c = Neg(b)
   d = Neg(c)
   e = Relu(d)
   y = Relu(e)
}
"""


@pytest.fixture
def registry() -> PassRegistry:
    reg = PassRegistry()
    reg.register(CollapseRelus)
    reg.register(FoldNegations)
    return reg


def test_rule_set_pass_runs_under_the_pass_manager(registry, parse, same_outputs) -> None:
    assert CollapseRelus.name == "collapse-relus" and CollapseRelus.opt_level == 1
    assert CollapseRelus.description == "Collapse Relu(Relu(x)) into Relu(x)."
    assert CollapseRelus.__module__ == __name__
    assert FoldNegations.description == "Remove Neg(Neg(x))."
    original = parse(NESTED)
    model = ir.load(original)
    report = PassManager("collapse-relus,fold-negations,collapse-relus", PassContext(registry=registry)).run(model)
    assert [(r.name, r.changed, r.counters) for r in report.records] == [
        ("collapse-relus", True, {"double-relu": 2}),
        ("fold-negations", True, {"double-neg": 1}),
        ("collapse-relus", True, {"double-relu": 1}),
    ]
    ir.verify(model)
    assert [n.op_type for n in model.graph] == ["Relu"]
    same_outputs(original, model)


def test_rewrite_pass_stops_the_pipeline_at_the_bisect_limit(registry, parse, same_outputs) -> None:
    original = parse(NESTED)
    model = ir.load(original)
    ctx = PassContext(registry=registry, bisect_limit=2)
    report = PassManager("collapse-relus,fold-negations", ctx).run(model)
    # No third rewrite happens: fold-negations is skipped or refused by the bisect limit.
    assert (report.records[0].name, report.records[0].counters) == ("collapse-relus", {"double-relu": 2})
    assert not any(r.changed for r in report.records[1:])
    assert ctx.bisect_stopped and ctx.rewrites_applied == 2
    ir.verify(model)
    assert [n.op_type for n in model.graph] == ["Relu", "Neg", "Neg", "Relu"]
    same_outputs(original, model)


def test_find_rule_searches_rewrite_passes(registry) -> None:
    assert find_rule(registry, "double-relu") is DOUBLE_RELU
    assert find_rule(registry, "double-neg").root_key == ("", "Neg")
    with pytest.raises(RuleError, match="unknown rule 'double-rlu'; did you mean double-relu") as info:
        find_rule(registry, "double-rlu")
    assert isinstance(info.value, GraphoptError)
    with pytest.raises(RuleError, match="known rules: double-neg, double-relu"):
        find_rule(registry, "zzz")
    with pytest.raises(RuleError, match="no registered pass is a rewrite pass"):
        find_rule(PassRegistry(), "double-relu")
