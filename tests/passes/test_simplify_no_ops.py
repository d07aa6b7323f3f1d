"""``eliminate-no-ops``: counters, the reasons rules give for not firing, and the O2 preset (graph + numbers)."""

from __future__ import annotations

import onnx
import onnx.parser
import pytest

from graphopt import ir
from graphopt.passes.simplify.no_ops import NO_OP_RULES, reshape_is_identity
from graphopt.pipeline import PassContext, PassManager, PassRegistry, PipelineReport
from graphopt.rewrite import format_why_not, why_not
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

NO_OPS = "eliminate-no-ops"


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """The built-in passes."""
    return PassRegistry.default(plugins=False)


def _optimize(text: str, registry: PassRegistry, pipeline: str = NO_OPS) -> tuple[onnx.ModelProto, ir.Model,
                                                                                  PipelineReport]:
    source = onnx.parser.parse_model(text)
    onnx.checker.check_model(source)
    model = ir.load(source)
    report = PassManager(pipeline, PassContext(registry=registry)).run(model)
    return source, model, report


def _assert_same_outputs(source: onnx.ModelProto, model: ir.Model, dims: dict[str, int] | None = None) -> None:
    output = ir.to_proto(model)
    onnx.checker.check_model(output, full_check=True)
    feeds = random_inputs(make_session(source), seed=0, dims=dims or {})
    result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=0, atol=0)
    assert result.ok, result.summary()


def _reasons(model: ir.Model) -> str:
    return "\n".join(format_why_not(why_not(model, rule)) for rule in NO_OP_RULES)


@pytest.mark.parametrize(("dims", "spec", "allowzero", "identity"), [
    ((2, 3), [2, 3], False, True),
    (("N", 4), [0, 4], False, True),
    (("N", 4), [-1, 4], False, True),
    (("N", "M"), [0, -1], False, True),
    (("N", "M"), [-1, -1], False, False),  # two unknowns: invalid, never "identity"
    (("N", 4), [2, 4], False, False),       # N may not be 2
    ((2, 0), [0, 0], True, False),          # literal 0 against a dim of 2
    ((0, 2), [0, 2], True, True),
    ((2, 3), [3, 2], False, False),
    ((2, 3), [2, 3, 1], False, False),
    ((None, 3), [0, 3], False, True),
])
def test_reshape_is_identity(dims: tuple, spec: list[int], allowzero: bool, identity: bool) -> None:
    """Dim-by-dim proof that a Reshape target is the input shape."""
    assert reshape_is_identity(dims, spec, allowzero) is identity


def test_counters_per_rule(registry: PassRegistry) -> None:
    """Each removed node counts under its rule; the graph keeps only the real work."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3] x) => (float[N,3] y) {
      a = Dropout(x)
      b = Cast<to = 1>(a)
      one = Constant<value = float {1}>()
      c = Mul(one, b)
      d = Mul(c, one)
      e = Sum(d)
      f = Transpose<perm = [0, 1]>(e)
      g1 = Relu(f)
      y = Concat<axis = 1>(g1)
    }"""
    source, model, report = _optimize(text, registry)
    counters = report.totals()[NO_OPS]["counters"]
    assert counters == {"drop-inference-dropout": 1, "drop-same-type-cast": 1, "drop-mul-by-one": 2,
                        "drop-single-input-sum": 1, "drop-identity-transpose": 1, "drop-single-input-concat": 1}
    assert [n.op_type for n in model.graph] == ["Constant", "Relu"]
    assert model.graph.outputs[0].name == "y" and model.graph.outputs[0].producer.op_type == "Relu"
    _assert_same_outputs(source, model, {"N": 3})


def test_must_not_fire_reasons(registry: PassRegistry) -> None:
    """Training-mode Dropout, shape-changing broadcasts, dtype-changing Casts stay, each with its reason."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y, float[2,3] z, int32[3] w) {
      on = Constant<value = bool {1}>()
      r = Constant<value = float {0.25}>()
      y = Dropout<seed = 1>(x, r, on)
      ones = Constant<value = float[2,3] {1, 1, 1, 1, 1, 1}>()
      z = Mul(x, ones)
      w = Cast<to = 6>(x)
    }"""
    source, model, report = _optimize(text, registry)
    assert report.totals()[NO_OPS]["counters"] == {}
    reasons = _reasons(model)
    assert "training_mode is true" in reasons
    assert "broadcasting with shape [2, 3] changes the shape [3]" in reasons
    assert "Cast changes the element type" in reasons
    _assert_same_outputs(source, model)


def test_function_bodies_without_types(registry: PassRegistry) -> None:
    """In a function body (no inferred types) rules that need no shapes fire; the others wait for types."""
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2,3] x) => (float[2,3] y) {
      y = local.F(x)
    }
    <domain: "local", opset_import: ["" : 17]>
    F (p) => (q) {
      a = Dropout(p)
      b = Transpose<perm = [0, 1]>(a)
      c = Cast<to = 1>(b)
      q = Relu(c)
    }"""
    source, model, report = _optimize(text, registry)
    counters = report.totals()[NO_OPS]["counters"]
    assert counters == {"drop-inference-dropout": 1, "drop-identity-transpose": 1}
    body = next(iter(model.functions.values())).graph
    assert [n.op_type for n in body] == ["Cast", "Relu"]  # the Cast's input type is unknown here
    _assert_same_outputs(source, model)


def test_o2_runs_the_simplification_passes(registry: PassRegistry) -> None:
    """The O2 preset inlines a constant If, drops no-ops, merges chains and duplicates, to a fixed point."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) {
      c = Constant<value = bool {1}>()
      r = If(c) <
        then_branch = then_g () => (float[2,3] t_out) {
          t1 = Transpose<perm = [1, 0]>(x)
          t_out = Transpose<perm = [1, 0]>(t1)
        },
        else_branch = else_g () => (float[2,3] e_out) { e_out = Neg(x) }
      >
      a = Relu(r)
      b = Relu(r)
      one = Constant<value = float {1}>()
      m = Mul(b, one)
      y = Add(a, m)
    }"""
    source, model, report = _optimize(text, registry, pipeline="O2")
    totals = report.totals()
    assert totals["inline-constant-if"]["counters"]["inlined-ifs"] == 1
    assert totals["merge-chains"]["counters"]["merge-transpose-transpose"] == 1
    assert totals["eliminate-no-ops"]["counters"]["drop-mul-by-one"] == 1
    assert totals["eliminate-common-subexpressions"]["counters"]["merged-nodes"] == 1
    assert [n.op_type for n in model.graph] == ["Relu", "Add"]
    assert not report.warnings
    _assert_same_outputs(source, model)


def test_forms_of_other_opsets_are_left_alone(registry: PassRegistry) -> None:
    """Axes, pads or starts in the form of another opset (invalid models) never count as empty or zero.

    onnxruntime refuses these models, so only the graph is checked: it must come out unchanged.
    """
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
      y = Unsqueeze<axes: ints = []>(x)
      z = Squeeze<axes = [0]>(x)
    }"""
    model = ir.load(onnx.parser.parse_model(text))
    before = ir.print_model(model)
    report = PassManager(NO_OPS, PassContext(registry=registry)).run(model)
    assert report.totals()[NO_OPS]["counters"] == {}
    assert ir.print_model(model) == before
    assert "in the form of another opset" in _reasons(model)
    old = """
    <ir_version: 6, opset_import: ["" : 9]>
    g (float[2,3] x, int64[1] a, int64[4] p) => (float[2,3] y, float[2,3] z, float[2,3] w) {
      y = Squeeze(x, a)
      z = Slice<starts = [0], ends = [3], axes = [1]>(x, a)
      w = Pad<pads = [0, 0, 0, 0]>(x, p)
    }"""
    model = ir.load(onnx.parser.parse_model(old))
    before = ir.print_model(model)
    report = PassManager(NO_OPS, PassContext(registry=registry)).run(model)
    assert report.totals()[NO_OPS]["counters"] == {}
    assert ir.print_model(model) == before
    reasons = _reasons(model)
    assert "Slice has the form of another opset than 9" in reasons
    assert "Pad has the form of another opset than 9" in reasons
