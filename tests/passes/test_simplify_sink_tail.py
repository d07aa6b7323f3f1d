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


def _runs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> bool:
    """True when onnxruntime (its optimizations off) runs ``model`` on ``feeds`` without an error."""
    try:
        run_model(model, feeds)
    except Exception:  # noqa: BLE001 - any run-time failure counts
        return False
    return True


def test_failing_else_path_is_replaced_by_the_checked_then_branch() -> None:
    """The else path (last dim not 1) always fails (Gemm of a rank-4 tensor) and the then branch
    squeezes the dim the condition tests: only Squeeze and Gemm are left, no If at all."""
    source, model, counters = _optimize(SQUEEZE_THEN_RANK_TEST)
    assert counters["sunk-tails"] == 1
    assert counters["inlined-ifs"] >= 1
    assert [n.op_type for n in model.graph] == ["Squeeze", "Gemm"]
    output = ir.to_proto(model)
    make_session(output)  # loads in onnxruntime
    rng = np.random.default_rng(0)
    for batch in (5, 1):
        feeds = {"x": rng.standard_normal((batch, 4, 1)).astype(np.float32)}
        result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=1e-6, atol=1e-6)
        assert result.ok, result.summary()
    # Where the original fails, the optimized model fails too (in the Squeeze), never returns values.
    bad = {"x": rng.standard_normal((5, 4, 2)).astype(np.float32)}
    assert not _runs(source, bad) and not _runs(output, bad)
    assert [v.name for v in model.graph.outputs] == ["y"]


#: The same chain whose later nodes accept any rank: the else path runs fine, nothing is assumed.
RANK_AGNOSTIC_TAIL = (SQUEEZE_THEN_RANK_TEST
                      .replace("=> (float[N,3] y)", "=> (float y)")
                      .replace("y = Gemm(e, w)", "r = Relu(e)\n  y = ReduceSum<keepdims = 0>(r)"))


def test_else_path_that_runs_keeps_the_if() -> None:
    """Must not assume the then branch: the else path (last dim not 1) computes a result."""
    source, model, counters = _optimize(RANK_AGNOSTIC_TAIL)
    assert counters["sunk-tails"] == 1
    assert [n.op_type for n in model.graph].count("If") == 1
    output = ir.to_proto(model)
    rng = np.random.default_rng(1)
    for shape in ((3, 4, 1), (3, 4, 5)):
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=1e-5, atol=1e-5)
        assert result.ok, result.summary()


def test_contradiction_only_with_declared_types_proves_nothing() -> None:
    """Must not assume the then branch when only a declared (value_info) type contradicts the
    else path: runtimes do not check those, and the else path runs fine."""
    text = RANK_AGNOSTIC_TAIL.replace("<float[4,3] w =", "<float[N,4] e, float[4,3] w =")
    source, model, _ = _optimize(text)
    assert [n.op_type for n in model.graph].count("If") == 1
    output = ir.to_proto(model)
    feeds = {"x": np.random.default_rng(2).standard_normal((3, 4, 5)).astype(np.float32)}
    result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=1e-5, atol=1e-5)
    assert result.ok, result.summary()


def test_then_branch_without_the_check_keeps_the_if() -> None:
    """Must not assume the then branch when it does not itself fail where the condition is false
    (here it reduces the last dim instead of squeezing it): a failing run must stay a failure."""
    text = SQUEEZE_THEN_RANK_TEST.replace("t_out = Squeeze(x, last)", "t_out = ReduceMax<axes = [-1], keepdims = 0>(x)")
    source, model, counters = _optimize(text)
    assert counters["sunk-tails"] == 1
    assert [n.op_type for n in model.graph].count("If") == 1
    output = ir.to_proto(model)
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((5, 4, 1)).astype(np.float32)}
    result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=1e-6, atol=1e-6)
    assert result.ok, result.summary()
    bad = {"x": rng.standard_normal((5, 4, 2)).astype(np.float32)}
    assert not _runs(source, bad) and not _runs(output, bad)


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


def _branch(name: str, scale: str) -> str:
    """One sample-rate branch of :data:`SAMPLE_RATE_IF`: silero's squeeze-then-rank-test chain."""
    return f"""{name} () => (float[N,3] y_{name}) {{
      shape_{name} = Shape(x)
      last_{name} = Constant<value = int64[1] {{-1}}>()
      dim_{name} = Gather<axis = 0>(shape_{name}, last_{name})
      one_{name} = Constant<value = int64[1] {{1}}>()
      c_{name} = Equal(dim_{name}, one_{name})
      d_{name} = If(c_{name}) <
        then_branch = t_{name} () => (float[N,4] ta_{name}) {{ ta_{name} = Squeeze(x, last_{name}) }},
        else_branch = e_{name} () => (float[N,4,T] ea_{name}) {{ ea_{name} = Identity(x) }}
      >
      ds_{name} = Shape(d_{name})
      rank_{name} = Size(ds_{name})
      two_{name} = Constant<value = int64 {{2}}>()
      m_{name} = Equal(rank_{name}, two_{name})
      b_{name} = Not(m_{name})
      zero_{name} = Constant<value = int64[1] {{0}}>()
      e_{name} = If(b_{name}) <
        then_branch = bt_{name} () => (float[1,N,4] u_{name}) {{ u_{name} = Unsqueeze(d_{name}, zero_{name}) }},
        else_branch = be_{name} () => (float[N,4] i_{name}) {{ i_{name} = Identity(d_{name}) }}
      >
      s_{name} = Constant<value = float {{{scale}}}>()
      ws_{name} = Mul(w, s_{name})
      y_{name} = Gemm(e_{name}, ws_{name})
    }}"""


#: An If on a graph input (silero's sample rate) around two such chains: it must stay.
SAMPLE_RATE_IF = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4,T] x, int64 sr) => (float[N,3] y)
  <float[4,3] w = {{0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 0.75, 1.0, -2.0, 0.1, 0.2, 0.3}}, int64 rate = {{16000}}>
{{
  is16k = Equal(sr, rate)
  y = If(is16k) <
    then_branch = {_branch("hi", "1.0")},
    else_branch = {_branch("lo", "-0.5")}
  >
}}
"""


def test_if_on_a_graph_input_stays_and_both_rates_match() -> None:
    """The If on ``sr`` (a graph input, never a constant) stays; each of its branches loses its
    inner Ifs; outputs equal the original's for both rates, and failing inputs still fail."""
    source, model, _ = _optimize(SAMPLE_RATE_IF)
    assert [n.op_type for n in model.graph] == ["Equal", "If"]
    outer = next(n for n in model.graph if n.op_type == "If")
    for attr in ("then_branch", "else_branch"):
        assert _count_ifs(outer.attr(attr)) == 0
    output = ir.to_proto(model)
    rng = np.random.default_rng(4)
    for rate in (16000, 8000):
        feeds = {"x": rng.standard_normal((3, 4, 1)).astype(np.float32), "sr": np.array(rate, dtype=np.int64)}
        result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=1e-6, atol=1e-6)
        assert result.ok, result.summary()
        bad = {"x": rng.standard_normal((3, 4, 2)).astype(np.float32), "sr": np.array(rate, dtype=np.int64)}
        assert not _runs(source, bad) and not _runs(output, bad)
