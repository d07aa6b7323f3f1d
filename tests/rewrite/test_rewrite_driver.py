"""The greedy driver: rewrites and their safety checks, subgraphs and functions, the rewrite cap and
the bisect limit. Every rewrite is checked on the graph and numerically in onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from graphopt import ir
from graphopt.pipeline import Limits, PassContext
from graphopt.rewrite import (Failure, MatchContext, PatternBuilder, PatternValue, RewriteBuilder, Rule,
                              RuleError, Var, apply_rules, constant_value, why_not)


def relu_relu(op: PatternBuilder, x: Var) -> PatternValue:
    return op.Relu(op.Relu(x))


DOUBLE_RELU = Rule("double-relu", relu_relu, lambda op, x: op.Relu(x))


def transpose_transpose(op: PatternBuilder, x: Var) -> PatternValue:
    has_perm = lambda perm: perm is not None  # noqa: E731
    return op.Transpose(op.Transpose(x, perm=has_perm, _name="first"), perm=has_perm, _name="second")


def compose_transposes(op: RewriteBuilder, x: ir.Value, first: ir.Node, second: ir.Node) -> ir.Value:
    # out[i] = mid[second[i]] = x[first[second[i]]]
    inner, outer = first.attr("perm"), second.attr("perm")
    perm = [inner[i] for i in outer]
    if perm == sorted(perm):
        return op.Identity(x)
    return op.Transpose(x, perm=perm)


COMPOSE = Rule("compose-transposes", transpose_transpose, compose_transposes)


def add_add(op: PatternBuilder, x: Var, c1: Var, c2: Var) -> PatternValue:
    return op.Add(op.Add(x, c1), c2)


def fold_adds(op: RewriteBuilder, x: ir.Value, c1: ir.Value, c2: ir.Value) -> ir.Value:
    total = constant_value(c1) + constant_value(c2)
    return op.Add(x, op.initializer(total, name_hint="sum"))


def both_constant(ctx: MatchContext, c1: ir.Value, c2: ir.Value) -> bool:
    return ctx.constant(c1) is not None and ctx.constant(c2) is not None


FOLD_ADDS = Rule("fold-add-add", add_add, fold_adds, check=both_constant, commute=True)


# -- plain rewrites ------------------------------------------------------------------------------------
def test_chain_of_relus_collapses_to_one(rewrite) -> None:
    result = rewrite("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2,3] x) => (float[2,3] y) {
           a = Relu(x)
           b = Relu(a)
           c = Relu(b)
           d = Relu(c)
           y = Neg(d)
        }
    """, [DOUBLE_RELU])
    assert result.counts == {"double-relu": 3}
    assert result.text().split("{", 1)[1].split() == ["v0", "=", "Relu", "(x)", "y", "=", "Neg", "(v0)", "}"]
    relu = result.model.graph.nodes[0]
    assert relu.meta["created_by"] == "double-relu"


def test_transposes_compose(rewrite) -> None:
    result = rewrite("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2,3,4] x) => (float[4,3,2] y, float[2,3,4] z) {
           a = Transpose<perm = [1, 2, 0]>(x)
           y = Transpose<perm = [1, 0, 2]>(a)
           b = Transpose<perm = [2, 0, 1]>(x)
           z = Transpose<perm = [1, 2, 0]>(b)
        }
    """, [COMPOSE])
    assert result.counts == {"compose-transposes": 2}
    assert result.ops() == ["Transpose", "Identity"]
    assert result.model.graph.nodes[0].attr("perm") == (2, 1, 0)
    assert [v.name for v in result.model.graph.outputs] == ["y", "z"]


def test_rules_fire_inside_if_branches(rewrite) -> None:
    text = """
        <ir_version: 10, opset_import: ["" : 18]>
        g (bool c, float[2,3] x) => (float[2,3] y) <float[3] k1 = {1.0, 2.0, 3.0}> {
           y = If(c) <
             then_branch = then_g () => (float[2,3] t) { r = Relu(x) t = Relu(r) },
             else_branch = else_g () => (float[2,3] e) {
                k2 = Constant<value = float[3] {10.0, 20.0, 30.0}>()
                s = Add(x, k1)
                e = Add(k2, s)
             }
           >
        }
    """
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for cond in (True, False):
        result = rewrite(text, [DOUBLE_RELU, FOLD_ADDS], feeds={"c": np.array(cond), "x": x})
        assert result.counts == {"double-relu": 1, "fold-add-add": 1}
    then_g, else_g = (result.model.graph.nodes[0].attributes[k].value for k in ("then_branch", "else_branch"))
    assert [n.op_type for n in then_g] == ["Relu"]
    assert [n.op_type for n in else_g] == ["Constant", "Add"]
    folded = else_g.nodes[1].inputs[1]
    assert folded.owning_graph() is else_g
    np.testing.assert_array_equal(constant_value(folded), [11.0, 22.0, 33.0])


def test_rules_fire_inside_function_bodies_with_constant_nodes(rewrite) -> None:
    result = rewrite("""
        <ir_version: 10, opset_import: ["" : 18, "local" : 1]>
        g (float[2,3] x) => (float[2,3] y) { y = local.F(x) }
        <domain: "local", opset_import: ["" : 18]>
        F (p) => (q) {
           one = Constant<value = float[1] {1.0}>()
           two = Constant<value = float[1] {2.0}>()
           s = Relu(p)
           r = Relu(s)
           a = Add(r, one)
           q = Add(a, two)
        }
    """, [DOUBLE_RELU, FOLD_ADDS])
    assert result.counts == {"double-relu": 1, "fold-add-add": 1}
    body = next(iter(result.model.functions.values())).graph
    ops = [n.op_type for n in body]
    # Functions have no initializers: the folded constant is a new Constant node.
    assert ops.count("Relu") == 1 and ops.count("Add") == 1 and ops.count("Constant") == 3
    assert not body.initializers
    assert body.outputs[0].name == "q"


# -- safety ------------------------------------------------------------------------------------------
USED_OUTSIDE = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2,3] x) => (float[2,3] y) {
   a = Relu(x)
   b = Relu(a)
   y = Add(a, b)
}
"""

INNER_IS_OUTPUT = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2,3] x) => (float[2,3] a, float[2,3] y) {
   a = Relu(x)
   y = Relu(a)
}
"""


def test_intermediate_used_outside_the_match_blocks_the_rewrite(rewrite, load) -> None:
    result = rewrite(USED_OUTSIDE, [DOUBLE_RELU])
    assert result.counts == {}
    assert result.ops() == ["Relu", "Relu", "Add"]
    reasons = [w.reason for w in why_not(load(USED_OUTSIDE), DOUBLE_RELU)]
    assert reasons[1] == "intermediate 'a' is used outside the match by Add -> 'y'"


def test_intermediate_that_is_a_graph_output_blocks_the_rewrite(rewrite, load) -> None:
    result = rewrite(INNER_IS_OUTPUT, [DOUBLE_RELU])
    assert result.counts == {}
    assert result.ops() == ["Relu", "Relu"]
    reasons = [w.reason for w in why_not(load(INNER_IS_OUTPUT), DOUBLE_RELU)]
    assert reasons[1] == "intermediate 'a' is a graph output"


def test_root_that_is_a_graph_output_keeps_its_name_and_type(rewrite) -> None:
    result = rewrite("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[N,3] x) => (float[N,3] y) {
           a = Relu(x)
           y = Relu(a)
        }
    """, [DOUBLE_RELU])
    assert result.counts == {"double-relu": 1}
    assert result.ops() == ["Relu"]
    out = result.model.graph.outputs[0]
    assert out.name == "y" and str(out.type) == "float[N,3]"
    assert out.producer.inputs[0].name == "x"


def test_replacement_that_is_a_graph_input_goes_through_identity(rewrite) -> None:
    mul_one = Rule("mul-by-one", lambda op, x: op.Mul(x, 1.0), lambda op, x: x, commute=True)
    result = rewrite("""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2,3] x) => (float[2,3] y) <float one = {1.0}> { y = Mul(one, x) }
    """, [mul_one])
    assert result.counts == {"mul-by-one": 1}
    assert result.ops() == ["Identity"]
    ident = result.model.graph.nodes[0]
    assert ident.inputs[0].name == "x" and ident.outputs[0].name == "y"
    assert ident.meta["created_by"] == "mul-by-one"


def scaled_matmul(op: PatternBuilder, x: Var, s: Var, w: Var) -> PatternValue:
    return op.MatMul(op.Mul(x, s), w)


def scalar_and_constant(ctx: MatchContext, s: ir.Value, w: ir.Value) -> bool | Failure:
    scale, weight = ctx.constant(s), ctx.constant(w)
    if scale is None or scale.size != 1 or weight is None:
        return Failure("needs a constant scalar scale and a constant weight")
    return True


def fold_scale_into_weight(op: RewriteBuilder, x: ir.Value, s: ir.Value, w: ir.Value) -> ir.Value:
    scaled = (constant_value(w) * constant_value(s).reshape(())).astype(np.float32)
    return op.MatMul(x, op.initializer(scaled, name_hint=f"{w.name}_scaled"))


FOLD_SCALE = Rule("fold-scale-into-matmul", scaled_matmul, fold_scale_into_weight,
                  check=scalar_and_constant)


def weight_not_shared(ctx: MatchContext, s: ir.Value, w: ir.Value) -> bool | Failure:
    if w.num_uses > 1:
        return Failure("weight is shared")
    return scalar_and_constant(ctx, s, w)


FOLD_SCALE_UNSHARED = Rule("fold-scale-unshared", scaled_matmul, fold_scale_into_weight,
                           check=weight_not_shared)

SHARED_WEIGHT = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2,3] x) => (float[2,4] y, float[2,4] z)
  <float s = {0.5}, float[3,4] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0}> {
   m = Mul(x, s)
   y = MatMul(m, w)
   z = MatMul(x, w)
}
"""


def test_shared_initializer_is_never_modified_in_place(parse, same_outputs) -> None:
    original = parse(SHARED_WEIGHT)
    model = ir.load(original)
    w = model.graph.initializers["w"]
    tensor, values = w.const_value, w.const_value.numpy().copy()
    assert apply_rules(model, [FOLD_SCALE], PassContext()) == {"fold-scale-into-matmul": 1}
    ir.verify(model)
    same_outputs(original, model)
    assert model.graph.initializers["w"] is w and w.const_value is tensor
    np.testing.assert_array_equal(w.const_value.numpy(), values)
    folded = model.graph.nodes[0].inputs[1]
    assert folded is not w and folded.name == "w_scaled"
    np.testing.assert_array_equal(constant_value(folded), values * 0.5)
    assert [u.op_type for u in w.users()] == ["MatMul"]  # z still reads the original


def test_check_failure_reason_blocks_the_rewrite(rewrite, load) -> None:
    result = rewrite(SHARED_WEIGHT, [FOLD_SCALE_UNSHARED])
    assert result.counts == {}
    assert result.ops() == ["Mul", "MatMul", "MatMul"]
    reasons = [w.reason for w in why_not(load(SHARED_WEIGHT), FOLD_SCALE_UNSHARED)]
    assert reasons == ["check failed: weight is shared", "input 0: expected Mul, found graph input 'x'"]


def test_rewrite_that_replaces_a_tensor_in_place_is_an_error(load) -> None:
    def clobber(op: RewriteBuilder, x: ir.Value, s: ir.Value, w: ir.Value) -> ir.Value:
        w.const_value = ir.ArrayTensor(np.zeros((3, 4), np.float32))
        return op.MatMul(x, w)

    model = load(SHARED_WEIGHT)
    with pytest.raises(RuleError, match="replaced the tensor of 'w' in place"):
        apply_rules(model, [Rule("clobber", scaled_matmul, clobber)])


def test_declined_rewrite_changes_nothing(load) -> None:
    model = load(USED_OUTSIDE.replace("y = Add(a, b)", "y = Neg(b)"))
    before = ir.print_model(model, canonical=False)
    ctx = PassContext(bisect_limit=5)
    assert apply_rules(model, [Rule("decline", relu_relu, lambda op, x: None if op.Relu(x) else None)], ctx) == {}
    assert ir.print_model(model, canonical=False) == before
    assert ctx.rewrites_applied == 0
    assert [v.users() for v in model.graph.inputs] == [[model.graph.nodes[0]]]
    ir.verify(model)


def test_replacement_of_another_shape_is_refused(rewrite, caplog) -> None:
    broadcast_blind = Rule("mul-by-ones", lambda op, x: op.Mul(x, 1.0), lambda op, x: x)
    with caplog.at_level(logging.WARNING, logger="graphopt.rewrite"):
        result = rewrite("""
            <ir_version: 10, opset_import: ["" : 18]>
            g (float[3] x) => (float[2,3] y) <float[2,3] ones = {1.0, 1.0, 1.0, 1.0, 1.0, 1.0}> {
               y = Mul(x, ones)
            }
        """, [broadcast_blind])
    assert result.counts == {}
    assert result.ops() == ["Mul"]
    assert "has shape [3], expected [2, 3]" in caplog.text


# -- cap and bisect -------------------------------------------------------------------------------
def sub(op: PatternBuilder, x: Var, y: Var) -> PatternValue:
    return op.Sub(x, y)


def add_neg(op: PatternBuilder, x: Var, y: Var) -> PatternValue:
    return op.Add(x, op.Neg(y))


EXPAND_SUB = Rule("expand-sub", sub, lambda op, x, y: op.Add(x, op.Neg(y)))
FOLD_NEG = Rule("fold-neg", add_neg, lambda op, x, y: op.Sub(x, y))


def test_rules_that_undo_each_other_stop_at_the_cap(rewrite, caplog) -> None:
    ctx = PassContext(limits=Limits(max_rewrites=25))
    with caplog.at_level(logging.WARNING, logger="graphopt.rewrite"):
        result = rewrite("""
            <ir_version: 10, opset_import: ["" : 18]>
            g (float[2,3] x, float[2,3] y) => (float[2,3] z) { z = Sub(x, y) }
        """, [EXPAND_SUB, FOLD_NEG], ctx)
    assert sum(result.counts.values()) == 25
    assert set(result.counts) == {"expand-sub", "fold-neg"}
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "rewrite limit of 25" in warning[0]
    assert "expand-sub, fold-neg" in warning[0]
    assert result.model.graph.outputs[0].name == "z"


CHAINS = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2,3] x) => (float[2,3] y) {
   a1 = Relu(x)
   b1 = Relu(a1)
   a2 = Relu(b1)
   b2 = Relu(a2)
   a3 = Relu(b2)
   b3 = Relu(a3)
   a4 = Relu(b3)
   b4 = Relu(a4)
   y = Neg(b4)
}
"""


@pytest.mark.parametrize("limit", [0, 1, 3, 6])
def test_bisect_limit_stops_after_exactly_n_rewrites(rewrite, limit) -> None:
    ctx = PassContext(bisect_limit=limit)
    result = rewrite(CHAINS, [DOUBLE_RELU], ctx)
    assert result.counts.get("double-relu", 0) == limit
    assert ctx.rewrites_applied == limit
    assert result.ops().count("Relu") == 8 - limit
    assert ctx.bisect_stopped is (limit < 7)


def test_without_limit_the_chain_collapses_fully(rewrite) -> None:
    result = rewrite(CHAINS, [DOUBLE_RELU])
    assert result.counts == {"double-relu": 7}
    assert result.ops() == ["Relu", "Neg"]


def test_apply_rules_on_a_single_graph(load) -> None:
    model = load(CHAINS)
    graph = model.graph
    assert apply_rules(graph, DOUBLE_RELU) == {"double-relu": 7}
    ir.verify(model)


IR3_MODEL = """
<ir_version: 3, opset_import: ["" : 11]>
g (float[2,3] x, float[3] k) => (float[2,3] y, float[2,3] z) <float[3] k = {1.0, 2.0, 3.0}> {
   one = Constant<value = float[1] {1.0}>()
   two = Constant<value = float[1] {2.0}>()
   a = Add(x, one)
   y = Add(a, two)
   b = Add(x, k)
   z = Add(b, two)
}
"""


def test_ir3_models_get_constant_nodes_and_overridable_initializers_stay(rewrite, load) -> None:
    result = rewrite(IR3_MODEL, [FOLD_ADDS])
    assert result.counts == {"fold-add-add": 1}
    graph = result.model.graph
    assert list(graph.initializers) == ["k"]  # no new initializer: IR 3 lists them all as inputs
    folded = graph.outputs[0].producer.inputs[1]
    assert folded.producer.op_type == "Constant" and folded.producer.meta["created_by"] == "fold-add-add"
    np.testing.assert_array_equal(constant_value(folded), [3.0])
    # 'k' is a graph input too: a caller may override it, so it is not a constant.
    reasons = [w.reason for w in why_not(load(IR3_MODEL), FOLD_ADDS)]
    assert reasons[3] == "check failed"


def test_results_are_deterministic(load) -> None:
    texts = []
    for _ in range(2):
        model = load(CHAINS.replace("y = Neg(b4)", "n = Neg(b4)\n   k = Add(n, b2)\n   y = Add(k, b1)"))
        apply_rules(model, [DOUBLE_RELU, FOLD_ADDS, COMPOSE])
        texts.append(ir.print_model(model, canonical=False))
    assert texts[0] == texts[1]
