"""``inline-constant-if`` moving the nodes after an ``If`` into its branches (``_sink_tail``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.runtime import compare_outputs, make_session, run_model

#: silero-vad's pattern: ``squeeze(-1)`` exported as an If, then a rank test before a rank-2 op.
#: Where the last dim is not 1 the original fails at run time (Gemm of a rank-4 tensor).
SQUEEZE_THEN_RANK_TEST = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4,T] x) => (float[N,3] y)
  <float[4,3] w = {0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 0.75, 1.0, -2.0, 0.1, 0.2, 0.3}>
{
  shape = Shape(x)
  last = Constant<value = int64[1] {-1}>()
  dim = Gather<axis = 0>(shape, last)
  one = Constant<value = int64[1] {1}>()
  c = Equal(dim, one)
  d = If(c) <
    then_branch = then_g () => (float[N,4] t_out) { t_out = Squeeze(x, last) },
    else_branch = else_g () => (float[N,4,T] e_out) { e_out = Identity(x) }
  >
  d_shape = Shape(d)
  rank = Size(d_shape)
  two = Constant<value = int64 {2}>()
  is_matrix = Equal(rank, two)
  batched = Not(is_matrix)
  zero = Constant<value = int64[1] {0}>()
  e = If(batched) <
    then_branch = b_then () => (float[1,N,4] u_out) { u_out = Unsqueeze(d, zero) },
    else_branch = b_else () => (float[N,4] i_out) { i_out = Identity(d) }
  >
  y = Gemm(e, w)
}
"""

PIPELINE = "topo-sort,infer-shapes,fixpoint<max=8>(simplify),eliminate-dead-code"


def _optimize(text: str) -> tuple[onnx.ModelProto, ir.Model, dict[str, int]]:
    source = onnx.parser.parse_model(text)
    model = ir.load(source)
    ctx = PassContext(registry=PassRegistry.default(plugins=False))
    report = PassManager(PIPELINE, ctx).run(model)
    ir.verify(model)
    return source, model, report.totals().get("inline-constant-if", {}).get("counters", {})


def _count_ifs(graph: ir.Graph) -> int:
    return sum(1 for n in graph if n.op_type == "If") + sum(
        _count_ifs(sub) for n in graph for sub in n.subgraphs())


def test_rank_test_after_squeeze_is_decided_in_the_taken_branch() -> None:
    """The hot branch (last dim 1) runs Squeeze and Gemm with no If; outputs equal the original's."""
    source, model, counters = _optimize(SQUEEZE_THEN_RANK_TEST)
    assert counters["sunk-tails"] == 1
    top = [n for n in model.graph]
    assert [n.op_type for n in top].count("If") == 1
    sunk = next(n for n in top if n.op_type == "If")
    then_ops = [n.op_type for n in sunk.attr("then_branch")]
    assert "If" not in then_ops and "Gemm" in then_ops and "Squeeze" in then_ops
    # The else branch could not be specialized (it would fail inference at load): it keeps the
    # original If and tail, still on the outer condition.
    else_ops = [n.op_type for n in sunk.attr("else_branch")]
    assert else_ops.count("If") >= 1
    output = ir.to_proto(model)
    make_session(output)  # loads in onnxruntime
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 4, 1)).astype(np.float32)}
    result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=1e-6, atol=1e-6)
    assert result.ok, result.summary()
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_second_run_does_not_grow_the_model() -> None:
    """Running the pipeline on its own output changes nothing more (no nested copies pile up)."""
    _, model, _ = _optimize(SQUEEZE_THEN_RANK_TEST)
    first = _count_ifs(model.graph)
    again = ir.load(ir.to_proto(model))
    PassManager(PIPELINE, PassContext(registry=PassRegistry.default(plugins=False))).run(again)
    assert _count_ifs(again.graph) == first


def test_data_dependent_condition_is_not_sunk() -> None:
    """A later If on tensor data (not shapes) gains nothing from the move: the graph stays."""
    text = SQUEEZE_THEN_RANK_TEST.replace("d_shape = Shape(d)\n  rank = Size(d_shape)",
                                          "total = ReduceSum<keepdims = 0>(d)\n  rank = Cast<to = 7>(total)")
    source, model, counters = _optimize(text)
    assert not counters.get("sunk-tails")
    assert [n.op_type for n in model.graph].count("If") == 2


def test_option_turns_sinking_off() -> None:
    """``inline-constant-if<sink-tails=0>`` leaves the tail where it is."""
    model = ir.load(onnx.parser.parse_model(SQUEEZE_THEN_RANK_TEST))
    pipeline = "topo-sort,infer-shapes,inline-constant-if<sink-tails=0>"
    report = PassManager(pipeline, PassContext(registry=PassRegistry.default(plugins=False))).run(model)
    assert not report.totals()["inline-constant-if"]["counters"]["sunk-tails"]
    assert [n.op_type for n in model.graph].count("If") == 2
