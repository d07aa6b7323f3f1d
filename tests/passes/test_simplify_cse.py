"""``eliminate-common-subexpressions``: counters, scopes, output names, limits (graph + numbers)."""

from __future__ import annotations

import onnx
import onnx.parser
import pytest

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager, PassRegistry, PipelineReport
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

CSE = "eliminate-common-subexpressions"


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """The built-in passes."""
    return PassRegistry.default(plugins=False)


def _optimize(text: str, registry: PassRegistry, pipeline: str = CSE,
              **ctx_args: object) -> tuple[onnx.ModelProto, ir.Model, PipelineReport]:
    source = onnx.parser.parse_model(text)
    onnx.checker.check_model(source)
    model = ir.load(source)
    report = PassManager(pipeline, PassContext(registry=registry, **ctx_args)).run(model)  # type: ignore[arg-type]
    return source, model, report


def _assert_same_outputs(source: onnx.ModelProto, model: ir.Model) -> None:
    """Both models agree exactly in onnxruntime (optimizations off) on seeded inputs."""
    output = ir.to_proto(model)
    onnx.checker.check_model(output, full_check=True)
    feeds = random_inputs(make_session(source), seed=0)
    result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=0, atol=0)
    assert result.ok, result.summary()


def _counter(report: PipelineReport, name: str = "merged-nodes") -> int:
    return report.totals()[CSE]["counters"][name]


def test_counts_merged_nodes_across_a_chain(registry: PassRegistry) -> None:
    """Three copies of a two-node chain: four nodes go in one run, and the numbers stay."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) {
      a1 = Relu(x)
      b1 = Exp(a1)
      a2 = Relu(x)
      b2 = Exp(a2)
      a3 = Relu(x)
      b3 = Exp(a3)
      s = Sum(b1, b2, b3)
      y = Neg(s)
    }"""
    source, model, report = _optimize(text, registry)
    assert _counter(report) == 4
    assert [n.op_type for n in model.graph] == ["Relu", "Exp", "Sum", "Neg"]
    exp = model.graph.nodes[1].outputs[0]
    assert model.graph.nodes[2].inputs == (exp, exp, exp)
    _assert_same_outputs(source, model)


def test_second_run_finds_nothing(registry: PassRegistry) -> None:
    """The pass reaches its fixed point in one run (parents first, chains in order)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
      a = Relu(x)
      b = Relu(x)
      y = Add(a, b)
    }"""
    _, model, _ = _optimize(text, registry)
    report = PassManager(CSE, PassContext(registry=registry)).run(model)
    assert report.records[-1].changed is False
    assert _counter(report) == 0


def test_scopes_merge_separately(registry: PassRegistry) -> None:
    """Equal nodes merge inside a branch and inside the main graph, never between them."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y, float[2] z) {
      a = Relu(x)
      b = Relu(x)
      z = Add(a, b)
      y = If(c) <
        then_branch = then_g () => (float[2] t_out) {
          t1 = Relu(x)
          t2 = Relu(x)
          t3 = Neg(a)
          t4 = Neg(b)
          t5 = Add(t1, t2)
          t6 = Add(t3, t4)
          t_out = Add(t5, t6)
        },
        else_branch = else_g () => (float[2] e_out) {
          e_out = Neg(a)
        }
      >
    }"""
    source, model, report = _optimize(text, registry, pipeline=f"{CSE},eliminate-dead-code")
    # main: b into a; then-branch: t2 into t1, t4 into t3 (a and b are one value now).
    assert _counter(report) == 3
    main = model.graph
    relu = main.nodes[0]
    assert [n.op_type for n in main] == ["Relu", "Add", "If"]
    then_branch = main.nodes[2].attr("then_branch")
    else_branch = main.nodes[2].attr("else_branch")
    assert [n.op_type for n in then_branch] == ["Relu", "Neg", "Add", "Add", "Add"]
    # The branch keeps its own Relu of x: scopes never merge.
    assert then_branch.nodes[0] is not relu and then_branch.nodes[0].inputs[0] is main.inputs[0]
    # Sibling branches each keep their Neg of the outer value.
    assert then_branch.nodes[1].inputs[0] is relu.outputs[0]
    assert else_branch.nodes[0].inputs[0] is relu.outputs[0]
    _assert_same_outputs(source, model)


def test_graph_output_names_survive(registry: PassRegistry) -> None:
    """A merged graph output keeps its name: the kept value is renamed, or an Identity keeps both."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] p, float[2,3] q, float[2,3] r) {
      a = Sigmoid(x)
      p = Neg(a)
      q = Sigmoid(x)
      r = Sigmoid(x)
    }"""
    source, model, report = _optimize(text, registry)
    assert _counter(report) == 2
    assert [v.name for v in model.graph.outputs] == ["p", "q", "r"]
    ops = {n.outputs[0].name: (n.op_type, [v.name for v in n.inputs]) for n in model.graph}
    assert ops["q"] == ("Sigmoid", ["x"])
    assert ops["p"] == ("Neg", ["q"])
    assert ops["r"] == ("Identity", ["q"])
    _assert_same_outputs(source, model)


def test_identity_outputs_are_not_churned(registry: PassRegistry) -> None:
    """Two Identity nodes that are graph outputs would only be re-created: they stay."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y, float[2] z) {
      a = Relu(x)
      y = Identity(a)
      z = Identity(a)
    }"""
    _, model, report = _optimize(text, registry)
    assert _counter(report) == 0
    assert [n.op_type for n in model.graph] == ["Relu", "Identity", "Identity"]


def test_large_constants_compare_by_identity(registry: PassRegistry) -> None:
    """Above max-constant-bytes, equal initializers are not hashed, so their readers stay apart."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y)
      <float[4] w1 = {1, 2, 3, 4}, float[4] w2 = {1, 2, 3, 4}>
    {
      a = Mul(x, w1)
      b = Mul(x, w2)
      y = Sub(a, b)
    }"""
    _, _, small = _optimize(text, registry)
    assert _counter(small) == 1
    _, model, large = _optimize(text, registry, pipeline=f"{CSE}<max-constant-bytes=8>")
    assert _counter(large) == 0
    assert [n.op_type for n in model.graph] == ["Mul", "Mul", "Sub"]


def test_random_and_custom_ops_stay(registry: PassRegistry) -> None:
    """Random generators, training Dropout and unknown custom ops are never merged."""
    text = """
    <ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
    g (float[2,3] x) => (float[2,3] y, float[2,3] z, float[2,3] w) {
      a = RandomNormalLike(x)
      b = RandomNormalLike(x)
      y = Add(a, b)
      r = Constant<value = float {0.5}>()
      on = Constant<value = bool {1}>()
      c = Dropout(x, r, on)
      d = Dropout(x, r, on)
      z = Add(c, d)
      e = custom.Noise(x)
      f = custom.Noise(x)
      w = Add(e, f)
    }"""
    _, model, report = _optimize(text, registry)
    assert _counter(report) == 0
    assert len(model.graph) == 11


def test_inference_dropout_and_constants_merge(registry: PassRegistry) -> None:
    """Dropout without training_mode is deterministic; equal Constant nodes merge by content."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) {
      c1 = Constant<value = float[3] {1, 2, 3}>()
      c2 = Constant<value = float[3] {1, 2, 3}>()
      a = Add(x, c1)
      b = Add(x, c2)
      d1 = Dropout(a)
      d2 = Dropout(b)
      y = Mul(d1, d2)
    }"""
    source, model, report = _optimize(text, registry)
    assert _counter(report) == 3
    assert [n.op_type for n in model.graph] == ["Constant", "Add", "Dropout", "Mul"]
    _assert_same_outputs(source, model)


def test_bisect_limit_stops_merging(registry: PassRegistry) -> None:
    """Every merge asks ctx.allow_rewrite: a limit of 1 merges exactly one node."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
      a = Relu(x)
      b = Relu(x)
      c = Relu(x)
      y = Sum(a, b, c)
    }"""
    source, model, report = _optimize(text, registry, bisect_limit=1)
    assert _counter(report) == 1
    assert [n.op_type for n in model.graph] == ["Relu", "Relu", "Sum"]
    _assert_same_outputs(source, model)
