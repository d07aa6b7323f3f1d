"""The pattern language and the matcher: commuted inputs, repeated variables, attribute
constraints, constants, omitted inputs, multi-output ops, and rule construction errors."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.rewrite import (Failure, MatchContext, PatternBuilder, PatternValue, RewriteBuilder, Rule,
                              RuleError, RuleSet, Var, apply_rules, compile_pattern, constant_value,
                              match_pattern, rule, why_not)


# -- rules used below -------------------------------------------------------------------------------
def add_add(op: PatternBuilder, x: Var, c1: Var, c2: Var) -> PatternValue:
    return op.Add(op.Add(x, c1), c2)


def both_constant(ctx: MatchContext, c1: ir.Value, c2: ir.Value) -> bool:
    if ctx.constant(c1) is None or ctx.constant(c2) is None:
        return Failure("c1 and c2 must be constants")
    return True


def fold_adds(op: RewriteBuilder, x: ir.Value, c1: ir.Value, c2: ir.Value) -> ir.Value:
    total = constant_value(c1) + constant_value(c2)
    return op.Add(x, op.initializer(total, name_hint="sum"))


FOLD_ADDS = Rule("fold-add-add", add_add, fold_adds, check=both_constant, commute=True)
FOLD_ADDS_IN_ORDER = Rule("fold-add-add-in-order", add_add, fold_adds, check=both_constant)


ADD_CHAIN = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2,3] x) => (float[2,3] y1, float[2,3] y2, float[2,3] y3)
  <float[3] c1 = {1.0, 2.0, 3.0}, float[1] c2 = {10.0}, float[2,1] c3 = {100.0, 200.0}> {
   a1 = Add(x, c1)
   y1 = Add(a1, c2)
   a2 = Add(c1, x)
   y2 = Add(c2, a2)
   a3 = Add(x, c3)
   y3 = Add(c1, a3)
}
"""


def test_commuted_inputs_match_only_with_commute(rewrite) -> None:
    result = rewrite(ADD_CHAIN, [FOLD_ADDS])
    assert result.counts == {"fold-add-add": 3}
    assert result.ops() == ["Add", "Add", "Add"]
    # Each output is now x plus one folded constant.
    for node in result.model.graph:
        assert node.inputs[0].name == "x"
        assert node.inputs[1].is_initializer()
    folded = {n.outputs[0].name: constant_value(n.inputs[1]) for n in result.model.graph}
    np.testing.assert_array_equal(folded["y1"], [11.0, 12.0, 13.0])
    np.testing.assert_array_equal(folded["y3"], [[101.0, 102.0, 103.0], [201.0, 202.0, 203.0]])


def test_without_commute_only_the_written_order_matches(rewrite, load) -> None:
    model = load(ADD_CHAIN)
    verdicts = {w.node.outputs[0].name: w.reason for w in why_not(model, FOLD_ADDS_IN_ORDER)}
    assert verdicts["y1"] is None
    assert verdicts["y2"] == "input 0: expected Add, found initializer 'c2'"
    assert verdicts["y3"] == "input 0: expected Add, found initializer 'c1'"
    result = rewrite(ADD_CHAIN, [FOLD_ADDS_IN_ORDER])
    assert result.counts == {"fold-add-add-in-order": 1}
    assert result.ops() == ["Add", "Add", "Add", "Add", "Add"]


# -- repeated variables ------------------------------------------------------------------------------
def add_self(op: PatternBuilder, x: Var) -> PatternValue:
    return op.Add(x, x)


def double(op: RewriteBuilder, x: ir.Value) -> ir.Value:
    return op.Mul(x, op.initializer(np.array(2.0, dtype=np.float32), name_hint="two"))


DOUBLE = Rule("add-self-to-mul", add_self, double)

TWO_ADDS = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2,3] a, float[2,3] b) => (float[2,3] y, float[2,3] z) {
   y = Add(a, a)
   z = Add(a, b)
}
"""


def test_a_repeated_variable_must_bind_the_same_value(rewrite, load) -> None:
    result = rewrite(TWO_ADDS, [DOUBLE])
    assert result.counts == {"add-self-to-mul": 1}
    assert result.ops() == ["Mul", "Add"]
    mul = result.model.graph.nodes[0]
    assert mul.inputs[0].name == "a" and mul.outputs[0].name == "y"
    reasons = [w.reason for w in why_not(load(TWO_ADDS), DOUBLE)]
    assert reasons == [None, "variable 'x' bound to two different values ('a' and 'b')"]


# -- attribute constraints ---------------------------------------------------------------------------
def double_swap(op: PatternBuilder, x: Var) -> PatternValue:
    return op.Transpose(op.Transpose(x, perm=[1, 0]), perm=(1, 0))


SWAP_TWICE = Rule("swap-twice", double_swap, lambda op, x: op.Identity(x))


def leaky_default(op: PatternBuilder, x: Var) -> PatternValue:
    return op.LeakyRelu(x, alpha=0.01)


def leaky_as_max(op: RewriteBuilder, x: ir.Value) -> ir.Value:
    slope = op.initializer(np.array(0.01, dtype=np.float32), name_hint="slope")
    return op.Max(x, op.Mul(x, slope))


LEAKY = Rule("leaky-relu-to-max", leaky_default, leaky_as_max)

ATTRS = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2,3] x, float[2,3] s) => (float[2,3] y, float[2,3] z, float[2,3] u, float[2,3] v) {
   t = Transpose<perm = [1, 0]>(x)
   y = Transpose<perm = [1, 0]>(t)
   z = LeakyRelu(s)
   u = LeakyRelu<alpha = 0.2>(x)
   v = LeakyRelu<alpha = 0.01>(s)
}
"""


def test_attribute_constraints_compare_values_and_schema_defaults(rewrite, load) -> None:
    result = rewrite(ATTRS, [SWAP_TWICE, LEAKY])
    assert result.counts == {"swap-twice": 1, "leaky-relu-to-max": 2}
    assert sorted(result.ops()) == sorted(["Identity", "Mul", "Max", "LeakyRelu", "Mul", "Max"])
    leaky = [n for n in result.model.graph if n.op_type == "LeakyRelu"]
    assert [n.attr("alpha") for n in leaky] == [pytest.approx(0.2)]
    reasons = [w.reason for w in why_not(load(ATTRS), LEAKY)]
    assert reasons == [None, "attribute 'alpha': expected 0.01, found 0.2", None]


def test_callable_attribute_constraint(load) -> None:
    model = load(ATTRS)

    def rank_two(perm: tuple[int, ...] | None) -> bool:
        return perm is not None and len(perm) == 2

    def rank_three(perm: tuple[int, ...] | None) -> bool:
        return perm is not None and len(perm) == 3

    ok = Rule("t2", lambda op, x: op.Transpose(x, perm=rank_two), lambda op, x: op.Identity(x))
    bad = Rule("t3", lambda op, x: op.Transpose(x, perm=rank_three), lambda op, x: op.Identity(x))
    assert [w.reason for w in why_not(model, ok)] == [None, None]
    assert [w.reason for w in why_not(model, bad)] == ["attribute 'perm': [1, 0] rejected by rank_three"] * 2


# -- constants and omitted inputs ------------------------------------------------------------------
def mul_by_one(op: PatternBuilder, x: Var) -> PatternValue:
    return op.Mul(x, 1.0, _name="mul")


def keeps_shape(ctx: MatchContext, x: ir.Value, mul: ir.Node) -> bool | Failure:
    one = mul.inputs[1] if mul.inputs[0] is x else mul.inputs[0]
    if x.shape is None or len(ctx.constant(one).shape) > x.shape.rank or ctx.constant(one).size != 1:
        return Failure("the constant would broadcast x")
    return True


MUL_ONE = Rule("mul-by-one", mul_by_one, lambda op, x: x, check=keeps_shape, commute=True)

MULS = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2,3] x) => (float[2,3] y) <float[1] one = {1.0}, float[1] two = {2.0}> {
   k = Constant<value_float = 1.0>()
   a = Mul(x, one)
   b = Mul(k, a)
   c = Mul(b, two)
   y = Relu(c)
}
"""


def test_number_in_pattern_matches_initializers_and_constant_nodes(rewrite, load) -> None:
    reasons = [w.reason for w in why_not(load(MULS), MUL_ONE)]
    # 'a' has no known shape yet, so the check refuses the second Mul ...
    assert reasons == [None, "check failed: the constant would broadcast x",
                       "input 1: expected constant 1.0, found a constant with other values ('two')"]
    # ... until the first rewrite makes it read x: the driver revisits users of replaced values.
    result = rewrite(MULS, [MUL_ONE])
    assert result.counts == {"mul-by-one": 2}
    assert [n.op_type for n in result.model.graph] == ["Constant", "Mul", "Relu"]
    assert result.model.graph.nodes[1].inputs[0].name == "x"


def clip_without_min(op: PatternBuilder, x: Var, hi: Var) -> PatternValue:
    return op.Clip(x, None, hi)


CLIP_TO_MIN = Rule("clip-max-only", clip_without_min, lambda op, x, hi: op.Min(x, hi))

CLIPS = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2,3] x) => (float[2,3] y, float[2,3] z, float[2,3] w) <float lo = {-0.5}, float hi = {0.5}> {
   y = Clip(x, "", hi)
   z = Clip(x, lo, hi)
   w = Clip(x)
}
"""


def test_none_in_pattern_matches_an_omitted_input(rewrite, load) -> None:
    reasons = [w.reason for w in why_not(load(CLIPS), CLIP_TO_MIN)]
    assert reasons == [None, "input 1: expected nothing (an omitted input), found initializer 'lo'",
                       "input 2: expected a value for 'hi', found nothing"]
    result = rewrite(CLIPS, [CLIP_TO_MIN])
    assert result.counts == {"clip-max-only": 1}
    assert result.ops() == ["Min", "Clip", "Clip"]


def test_extra_inputs_need_allow_other_inputs(load) -> None:
    model = load(CLIPS)
    strict = Rule("strict", lambda op, x: op.Clip(x), lambda op, x: op.Identity(x))
    loose = Rule("loose", lambda op, x: op.Clip(x, _allow_other_inputs=True), lambda op, x: op.Identity(x))
    assert [w.reason for w in why_not(model, strict)] == [
        "Clip has 3 inputs, the pattern expects 1", "Clip has 3 inputs, the pattern expects 1", None]
    assert [w.reason for w in why_not(model, loose)] == [None, None, None]


# -- multi-output ops ------------------------------------------------------------------------------
def split_concat(op: PatternBuilder, x: Var) -> PatternValue:
    first, second = op.Split(x, axis=0, _outputs=2)
    return op.Concat(first, second, axis=0)


SPLIT_CONCAT = Rule("split-concat", split_concat, lambda op, x: op.Identity(x))

SPLITS = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[4,3] x) => (float[4,3] y, float[4,3] z) {
   a, b = Split<axis = 0, num_outputs = 2>(x)
   y = Concat<axis = 0>(a, b)
   p, q = Split<axis = 0, num_outputs = 2>(x)
   z = Concat<axis = 0>(q, p)
}
"""


def test_multi_output_node_inside_a_pattern(rewrite, load) -> None:
    reasons = [w.reason for w in why_not(load(SPLITS), SPLIT_CONCAT)]
    assert reasons == [None, "input 0: expected output 0 of Split, found output 1"]
    result = rewrite(SPLITS, [SPLIT_CONCAT])
    assert result.counts == {"split-concat": 1}
    assert result.ops() == ["Identity", "Split", "Concat"]
    assert result.model.graph.outputs[0].name == "y"


def neg_then_split(op: PatternBuilder, x: Var) -> tuple[PatternValue, ...]:
    return op.Split(op.Neg(x), axis=0, _outputs=2)


def split_then_neg(op: RewriteBuilder, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    first, second = op.Split(x, axis=0, num_outputs=2, _outputs=2)
    return op.Neg(first), op.Neg(second)


SINK_NEG = Rule("sink-neg-below-split", neg_then_split, split_then_neg)

NEG_SPLIT = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[4,3] x) => (float[2,3] y, float[2,3] z) {
   n = Neg(x)
   y, z = Split<axis = 0, num_outputs = 2>(n)
}
"""


def test_multi_output_root_is_replaced_output_by_output(rewrite) -> None:
    result = rewrite(NEG_SPLIT, [SINK_NEG])
    assert result.counts == {"sink-neg-below-split": 1}
    assert result.ops() == ["Split", "Neg", "Neg"]
    assert [v.name for v in result.model.graph.outputs] == ["y", "z"]
    assert [v.producer.op_type for v in result.model.graph.outputs] == ["Neg", "Neg"]


# -- pattern and rule errors -------------------------------------------------------------------------
def test_pattern_compiles_to_a_readable_tree() -> None:
    pattern = compile_pattern(lambda op, x, w: op.Relu(op.Conv(x, w, _name="conv", group=1)))
    assert repr(pattern) == "Relu(Conv(x, w, group=1))"
    assert pattern.variables == ["x", "w"] and pattern.node_names == ["conv"]
    assert pattern.root_key == ("", "Relu")
    assert [n.op_type for n in pattern.nodes] == ["Conv", "Relu"]


@pytest.mark.parametrize("make, message", [
    (lambda: Rule("r", lambda op, x, unused: op.Relu(x), lambda op, x: x), "unused are not used"),
    (lambda: Rule("r", lambda op, x: op.Relu(x), lambda op, y: y), "parameter 'y' is not a pattern variable"),
    (lambda: Rule("r", lambda op, x: op.Relu(x), lambda op, x: x, check=lambda ctx, w: True),
     "check parameter 'w'"),
    (lambda: Rule("r", lambda op, x: x, lambda op, x: x), "must return an op call"),
    (lambda: Rule("r", lambda op, x: (op.Relu(x), op.Neg(x)), lambda op, x: x), "single root"),
    (lambda: Rule("r", lambda op, x: op.Split(x, _outputs=2)[0], lambda op, x: x), "return all of its outputs"),
    (lambda: Rule("r", lambda op, x: op.Relu(op.Neg(x, _name="x")), lambda op, x: x), "shadows a variable"),
    (lambda: Rule("r", lambda op, x: op.Concat(op.Split(x, _outputs=2)), lambda op, x: x), "unpack"),
    (lambda: Rule("bad name", lambda op, x: op.Relu(x), lambda op, x: x), "without spaces"),
    (lambda: RuleSet([DOUBLE, DOUBLE]), "two rules are named 'add-self-to-mul'"),
])
def test_rule_errors_name_the_problem(make, message) -> None:
    with pytest.raises(RuleError, match=message) as info:
        make()
    assert isinstance(info.value, GraphoptError)


def test_rule_decorator_and_index_by_root_op(load) -> None:
    @rule("relu-of-neg", lambda op, x: op.Relu(op.Neg(x)), benefit=5)
    def relu_of_neg(op: RewriteBuilder, x: ir.Value) -> ir.Value:
        return op.Relu(op.Neg(x))

    low = Rule("relu-any", lambda op, x: op.Relu(x), lambda op, x: op.Relu(x), benefit=1)
    rules = RuleSet([low, relu_of_neg, DOUBLE])
    model = load("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y) { n = Neg(x) y = Relu(n) }
    """)
    neg, relu = model.graph.nodes
    assert [r.name for r in rules.rules_for(relu)] == ["relu-of-neg", "relu-any"]
    assert rules.rules_for(neg) == []
    assert rules.root_keys() == {("", "Relu"), ("", "Add")}


def test_matching_never_mutates(load) -> None:
    model = load(ADD_CHAIN)
    before = ir.print_model(model, canonical=False)
    uses = {id(v): v.uses() for n in model.graph for v in n.inputs}
    for node in model.graph:
        match_pattern(FOLD_ADDS.pattern, node, commute=True)
    why_not(model, FOLD_ADDS)
    assert ir.print_model(model, canonical=False) == before
    assert {id(v): v.uses() for n in model.graph for v in n.inputs} == uses


def test_domain_of_pattern_ops(load) -> None:
    model = load("""
        <ir_version: 10, opset_import: ["" : 18, "com.example" : 1]>
        g (float[2] x) => (float[2] y) { a = com.example.Scale(x) y = Relu(a) }
    """)
    custom = Rule("custom", lambda op, x: op.Relu(op.Scale(x, _domain="com.example")), lambda op, x: op.Relu(x))
    plain = Rule("plain", lambda op, x: op.Relu(op.Scale(x)), lambda op, x: op.Relu(x))
    assert [w.reason for w in why_not(model, custom)] == [None]
    assert [w.reason for w in why_not(model, plain)] == ["input 0: expected Scale, found com.example::Scale ('a')"]
    assert apply_rules(model, [custom]) == {"custom": 1}
    ir.verify(model)
    assert [n.op_type for n in model.graph] == ["Relu"]
