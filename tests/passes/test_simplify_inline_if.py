"""``inline-constant-if``: nested Ifs, name clashes, output names, scopes and guards (graph + numbers)."""

from __future__ import annotations

from collections import Counter

import onnx
import onnx.parser
import pytest

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager, PassRegistry, PipelineReport
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

INLINE = "inline-constant-if"


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """The built-in passes."""
    return PassRegistry.default(plugins=False)


def _optimize(text: str, registry: PassRegistry, pipeline: str = INLINE,
              **ctx_args: object) -> tuple[onnx.ModelProto, ir.Model, PipelineReport]:
    source = onnx.parser.parse_model(text)
    onnx.checker.check_model(source)
    model = ir.load(source)
    report = PassManager(pipeline, PassContext(registry=registry, **ctx_args)).run(model)  # type: ignore[arg-type]
    return source, model, report


def _assert_same_outputs(source: onnx.ModelProto, model: ir.Model) -> onnx.ModelProto:
    """Both models agree exactly in onnxruntime (optimizations off); returns the output proto."""
    output = ir.to_proto(model)
    onnx.checker.check_model(output, full_check=True)
    feeds = random_inputs(make_session(source), seed=0)
    result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=0, atol=0)
    assert result.ok, result.summary()
    return output


def _counters(report: PipelineReport) -> dict[str, int]:
    return report.totals()[INLINE]["counters"]


def _defined_names(model: ir.Model) -> list[str]:
    names: list[str] = []
    for graph in model.all_graphs():
        names += [v.name for v in graph.inputs] + list(graph.initializers)
        names += [v.name for n in graph for v in n.outputs if v.name]
    return names


NESTED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y, float[2] t_1) {
  t = Relu(x)
  t_1 = Sigmoid(x)
  c = Constant<value = bool {1}>()
  d = Constant<value = bool[1] {0}>()
  r = If(c) <
    then_branch = then_g () => (float[2] out1) {
      t_2 = Neg(t)
      out1 = If(d) <
        then_branch = inner_then () => (float[2] it) { it = Sigmoid(t_2) },
        else_branch = inner_else () => (float[2] ie) {
          t_3 = Exp(t_2)
          ie = Add(t_3, t_1)
        }
      >
    },
    else_branch = else_g () => (float[2] out2) {
      t_2 = Tanh(t)
      t_3 = Neg(t_2)
      out2 = Add(t_3, t_1)
    }
  >
  y = Mul(r, t)
}"""


def test_nested_ifs_inline_with_unique_names(registry: PassRegistry) -> None:
    """Both levels inline; names the branches share with each other and with the outer graph stay unique."""
    source, model, report = _optimize(NESTED, registry)
    assert _counters(report) == {"inlined-ifs": 2, "moved-nodes": 4, "sunk-tails": 0}
    ops = [n.op_type for n in model.graph]
    assert "If" not in ops
    assert ops.count("Neg") == 1 and ops.count("Exp") == 1 and ops.count("Add") == 1
    assert "Tanh" not in ops and ops.count("Sigmoid") == 1  # untaken branches are gone
    duplicates = [name for name, k in Counter(_defined_names(model)).items() if k > 1]
    assert not duplicates
    # The If output keeps its name for its reader; the signature is untouched.
    mul = next(n for n in model.graph if n.op_type == "Mul")
    assert mul.inputs[0].name == "r" and mul.inputs[0].producer.op_type == "Add"
    assert [v.name for v in model.graph.outputs] == ["y", "t_1"]
    output = _assert_same_outputs(source, model)
    assert [o.name for o in output.graph.output] == ["y", "t_1"]


def test_counters_and_idempotence(registry: PassRegistry) -> None:
    """A second run has nothing left to inline and reports no change."""
    _, model, _ = _optimize(NESTED, registry)
    report = PassManager(INLINE, PassContext(registry=registry)).run(model)
    assert report.records[-1].changed is False
    assert _counters(report) == {"inlined-ifs": 0, "moved-nodes": 0, "sunk-tails": 0}


def test_if_in_loop_body_reads_outer_constant(registry: PassRegistry) -> None:
    """An If inside a Loop body on a constant of the main graph inlines into the body."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
      n = Constant<value = int64 {3}>()
      c = Constant<value = bool {1}>()
      y = Loop(n, , x) <
        body = body_g (int64 i, bool cond, float[2] acc) => (bool cond_out, float[2] acc_out) {
          cond_out = Identity(cond)
          acc_out = If(c) <
            then_branch = then_g () => (float[2] t_out) {
              h = Mul(acc, acc)
              t_out = Sin(h)
            },
            else_branch = else_g () => (float[2] e_out) { e_out = Neg(acc) }
          >
        }
      >
    }"""
    source, model, report = _optimize(text, registry)
    assert _counters(report) == {"inlined-ifs": 1, "moved-nodes": 2, "sunk-tails": 0}
    body = next(n for n in model.graph if n.op_type == "Loop").attr("body")
    assert [n.op_type for n in body] == ["Identity", "Mul", "Sin"]
    assert body.outputs[1].name == "acc_out" and body.outputs[1].producer.op_type == "Sin"
    _assert_same_outputs(source, model)


def test_branch_output_from_outer_scope_in_a_body(registry: PassRegistry) -> None:
    """In a Loop body, an inlined branch that returns an outer value needs an Identity (computed in the body)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
      n = Constant<value = int64 {2}>()
      c = Constant<value = bool {0}>()
      y = Loop(n, , x) <
        body = body_g (int64 i, bool cond, float[2] acc) => (bool cond_out, float[2] acc_out) {
          cond_out = Identity(cond)
          acc_out = If(c) <
            then_branch = then_g () => (float[2] t_out) { t_out = Neg(acc) },
            else_branch = else_g () => (float[2] e_out) { e_out = Identity(x) }
          >
        }
      >
    }"""
    source, model, report = _optimize(text, registry)
    assert _counters(report)["inlined-ifs"] == 1
    body = next(n for n in model.graph if n.op_type == "Loop").attr("body")
    result = body.outputs[1]
    assert result.name == "acc_out" and result.producer is not None and result.producer.graph is body
    _assert_same_outputs(source, model)


def test_guards(registry: PassRegistry) -> None:
    """Non-constant, overridable and multi-element conditions stay; so do branch weights in functions."""
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2] x, bool c) => (float[2] y, float[2] z, float[2] w) {
      y = If(c) <
        then_branch = a1 () => (float[2] o1) { o1 = Neg(x) },
        else_branch = b1 () => (float[2] o2) { o2 = Exp(x) }
      >
      many = Constant<value = bool[2] {1, 0}>()
      z = Identity(x)
      w = local.F(x)
    }
    <domain: "local", opset_import: ["" : 17]>
    F (p) => (q) {
      k = Constant<value = bool {1}>()
      q = If(k) <
        then_branch = a2 () => (float[2] o3) <float[2] wt = {1, 2}> { o3 = Mul(p, wt) },
        else_branch = b2 () => (float[2] o4) { o4 = Neg(p) }
      >
    }"""
    _, model, report = _optimize(text, registry)
    assert _counters(report)["inlined-ifs"] == 0
    fn = next(iter(model.functions.values()))
    assert [n.op_type for n in fn.graph] == ["Constant", "If"]


def test_bisect_limit_stops_inlining(registry: PassRegistry) -> None:
    """Each If inlined asks ctx.allow_rewrite; with a limit of 1 only the outer one goes."""
    source, model, report = _optimize(NESTED, registry, bisect_limit=1)
    assert _counters(report)["inlined-ifs"] == 1
    assert sum(n.op_type == "If" for n in model.graph) == 1
    _assert_same_outputs(source, model)
