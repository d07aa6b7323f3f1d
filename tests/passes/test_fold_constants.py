"""Unit tests of ``fold-constants`` for what golden files cannot show.

Counters, options, evaluation in one session, the onnxruntime -> reference evaluator fallback,
size limits checked before anything runs (time and memory), element types onnxruntime's Python
binding cannot return, stale declared shapes, IR version 3, bisecting. Every test that changes a
model checks the graph and that onnxruntime (optimizations off) computes the same outputs as on
the original (exact equality unless stated: folding runs the same kernels).
"""

from __future__ import annotations

import resource
import time

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import pytest

from graphopt import ir
from graphopt.passes import PASSES, PIPELINES
from graphopt.passes.fold import FoldConstants, InferShapes
from graphopt.pipeline import Limits, PassContext, PassManager, PassRegistry, PipelineReport, parse_pipeline
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'
REGISTRY = PassRegistry.default(plugins=False)


def _parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text if text.lstrip().startswith("<") else HEAD + text)


def _fold(source: onnx.ModelProto, pipeline: str = "fold-constants,eliminate-dead-code",
          **ctx_args: object) -> tuple[ir.Model, dict[str, int]]:
    model = ir.load(source)
    report = PassManager(pipeline, PassContext(registry=REGISTRY, **ctx_args)).run(model)  # type: ignore[arg-type]
    return model, _counters(report)


def _counters(report: PipelineReport) -> dict[str, int]:
    return report.totals().get("fold-constants", {}).get("counters", {})


def _same_numbers(source: onnx.ModelProto, model: ir.Model, feeds: dict | None = None, *,
                  rtol: float = 0.0, atol: float = 0.0) -> None:
    """``model`` verifies, passes the checker and computes what ``source`` computes."""
    ir.verify(model)
    output = ir.to_proto(model)
    onnx.checker.check_model(output)
    feeds = feeds if feeds is not None else random_inputs(make_session(source), seed=0, dims={"N": 3})
    comparison = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=rtol, atol=atol)
    assert comparison.ok, comparison.summary()


def _ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for n in graph]


# -- registration ------------------------------------------------------------------------------
def test_passes_are_registered_and_in_the_o2_o3_presets() -> None:
    assert FoldConstants in PASSES and InferShapes in PASSES
    assert (FoldConstants.opt_level, InferShapes.opt_level) == (2, 2)
    assert FoldConstants.requires == frozenset({"topo-sorted", "shapes-inferred"})
    assert InferShapes.provides == frozenset({"shapes-inferred"})
    for level in ("O2", "O3"):
        steps = parse_pipeline(PIPELINES[level], REGISTRY)
        assert [getattr(s, "name", None) for s in steps[:2]] == ["topo-sort", "infer-shapes"]
        group = next(s for s in steps if hasattr(s, "steps"))
        names = [s.name for s in group.steps]
        assert names.index("fold-constants") < names.index("eliminate-dead-code")
    assert "fold-constants" not in PIPELINES["O1"]


def test_infer_shapes_runs_first_when_only_fold_constants_is_asked_for() -> None:
    source = _parse("g (float[2,3] x) => (float[6] y) { s = Shape (x)\n p = ReduceProd (s)\n y = Reshape (x, p) }")
    model = ir.load(source)
    report = PassManager("fold-constants", PassContext(registry=REGISTRY)).run(model)
    assert [r.name for r in report.records] == ["topo-sort", "infer-shapes", "fold-constants"]
    assert _ops(model.graph) == ["Reshape"]
    _same_numbers(source, model)


# -- one evaluation per round --------------------------------------------------------------------
def test_constant_subgraphs_are_evaluated_together_in_one_session(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.passes.fold._evaluate as evaluate_module

    sessions: list[int] = []
    real = evaluate_module.make_session

    def counting(proto, **kwargs):  # type: ignore[no-untyped-def]
        sessions.append(len(proto.graph.node))
        return real(proto, **kwargs)

    monkeypatch.setattr(evaluate_module, "make_session", counting)
    source = _parse("""
        g (float[3] x) => (float[3] y, float[3] z) <float[3] a = {1.0, 2.0, 3.0}, float[3] b = {4.0, 5.0, 6.0}> {
           a2 = Mul (a, a)
           a3 = Add (a2, a)
           y = Add (x, a3)
           b2 = Exp (b)
           b3 = Neg (b2)
           z = Mul (x, b3)
        }""")
    model, counters = _fold(source)
    assert sessions == [4]  # both chains, four nodes, one session
    assert counters["folded-nodes"] == 4 and counters["new-initializers"] == 2
    assert _ops(model.graph) == ["Add", "Mul"]
    _same_numbers(source, model)


def test_each_folded_subgraph_is_one_rewrite_for_bisecting() -> None:
    source = _parse("""
        g (float[3] x) => (float[3] y, float[3] z) <float[3] a = {1.0, 2.0, 3.0}, float[3] b = {4.0, 5.0, 6.0}> {
           a2 = Mul (a, a)
           y = Add (x, a2)
           b2 = Neg (b)
           b3 = Abs (b2)
           z = Mul (x, b3)
        }""")
    model, counters = _fold(source, "fold-constants", bisect_limit=1)
    assert counters["folded-nodes"] == 1  # the first subgraph only
    assert _ops(model.graph) == ["Add", "Neg", "Abs", "Mul"]
    _same_numbers(source, model)


# -- size limits ----------------------------------------------------------------------------------
def test_constant_of_shape_of_10_to_the_12_is_never_evaluated() -> None:
    # 10^12 float32 elements (4 TB) inside a branch the test never takes at run time.
    source = _parse("""
        g (bool c, float[2] x) => (float[2] y, int64[2] s) <int64[2] huge = {1000000, 1000000}> {
           y = If (c) <
              then_branch = then_g () => (float[2] t) {
                 z = ConstantOfShape (huge)
                 r = ReduceSum <keepdims = 0> (z)
                 t = Add (x, r)
              },
              else_branch = else_g () => (float[2] e) { e = Neg (x) }
           >
           big = ConstantOfShape (huge)
           s = Shape (big)
        }""")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model, counters = _fold(source)
    elapsed = time.perf_counter() - start
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert elapsed < 10, f"folding took {elapsed:.1f} s"
    assert grown_kb < 300_000, f"peak memory grew by {grown_kb / 1024:.0f} MB"
    then_branch = model.graph.nodes[0].attr("then_branch")
    assert _ops(then_branch) == ["ConstantOfShape", "ReduceSum", "Add"]
    # The Shape of the huge tensor is known without computing it: it folds, the tensor goes.
    assert _ops(model.graph) == ["If"]
    assert model.graph.initializers["s"].const_value.numpy().tolist() == [1000000, 1000000]
    assert counters["skipped-too-large"] >= 2
    # The original cannot compute `s` (onnxruntime runs every node, and `big` needs 4 TB):
    # `y` is compared with the original without those two nodes, `s` with its known value.
    feeds = {"c": np.array(False), "x": np.array([1.0, 2.0], np.float32)}
    ir.verify(model)
    runnable = onnx.ModelProto()
    runnable.CopyFrom(source)
    del runnable.graph.node[1:]
    del runnable.graph.output[1:]
    expected_y = run_model(runnable, feeds)["y"]
    folded = run_model(ir.to_proto(model), feeds)
    assert np.array_equal(folded["y"], expected_y) and folded["s"].tolist() == [1000000, 1000000]


@pytest.mark.parametrize("op_text", [
    "Tile (w, reps)",
    "Expand (w, shape)",
    "Range (zero, limit, one)",
])
def test_value_sized_ops_are_bounded_from_their_inputs(op_text: str) -> None:
    # Outputs of 4 * 10^9 elements: refused from the input values alone, before any evaluation.
    source = _parse(f"""
        g (float[4] x) => (float[4] y)
           <float[4] w = {{1.0, 2.0, 3.0, 4.0}}, int64[1] reps = {{1000000000}}, int64[2] shape = {{1000000000, 4}},
            float zero = {{0.0}}, float limit = {{4000000000.0}}, float one = {{1.0}}, int64[1] four = {{4}},
            int64[1] start = {{0}}>
        {{
           big = {op_text}
           head = Slice (big, start, four)
           flat = Reshape (head, four)
           y = Add (x, flat)
        }}""")
    start = time.perf_counter()
    model, counters = _fold(source, "fold-constants")
    assert time.perf_counter() - start < 10
    assert _ops(model.graph)[0] in ("Tile", "Expand", "Range")
    assert counters["folded-nodes"] == 0 and counters["skipped-too-large"] >= 1


def test_max_bytes_option_and_context_limit() -> None:
    source = _parse("""
        g (float[16,16] x) => (float[16,16] y) <float[16,16] w = {""" + ",".join(["1.5"] * 256) + """}> {
           w2 = Mul (w, w)
           y = Add (x, w2)
        }""")
    model, counters = _fold(source, "fold-constants<max-bytes=512>")
    assert _ops(model.graph) == ["Mul", "Add"] and counters["skipped-too-large"] == 1
    model, _ = _fold(source, "fold-constants", limits=Limits(max_fold_bytes=512))
    assert _ops(model.graph) == ["Mul", "Add"]
    model, counters = _fold(source, "fold-constants,eliminate-dead-code")
    assert _ops(model.graph) == ["Add"] and counters["folded-nodes"] == 1
    _same_numbers(source, model)


def test_transposed_weight_also_used_as_it_is_is_not_stored_twice() -> None:
    # 600 x 600 float32 = 1.44 MB > the default growth allowance of 1 MiB.
    weights = onnx.numpy_helper.from_array(np.arange(360000, dtype=np.float32).reshape(600, 600) / 1e5, "w")
    source = _parse("""
        g (float[2,600] x) => (float[2,600] y) {
           a = MatMul (x, w)
           wt = Transpose (w)
           b = MatMul (x, wt)
           y = Add (a, b)
        }""")
    source.graph.initializer.append(weights)
    model, counters = _fold(source)
    assert _ops(model.graph) == ["MatMul", "Transpose", "MatMul", "Add"]
    assert counters["skipped-too-large"] == 1
    # When the transpose is the only reader, folding frees the original: it folds.
    source.graph.node[0].input[1] = "wt"
    model, counters = _fold(source)
    assert _ops(model.graph) == ["MatMul", "MatMul", "Add"] and counters["folded-nodes"] == 1
    assert list(model.graph.initializers) == ["wt"]
    # onnxruntime pre-packs constant MatMul weights: a different kernel, rounding within 1e-5.
    _same_numbers(source, model, rtol=1e-5, atol=1e-5)


# -- what never folds -------------------------------------------------------------------------------
def test_policy_refusals_are_counted() -> None:
    source = _parse("""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[2,2] x) => (float[2,2] y) <float[2,2] w = {0.5, -1.0, 0.25, 2.0}, float s = {0.02}, uint8 z = {128},
                                          bool train = {1}, float ratio = {0.5}> {
           q = QuantizeLinear (w, s, z)
           dq = DequantizeLinear (q, s, z)
           g = com.microsoft.Gelu (w)
           d, mask = Dropout (w, ratio, train)
           a = Add (dq, g)
           b = Add (a, d)
           y = Mul (x, b)
        }""")
    model, counters = _fold(source, "fold-constants")
    assert _ops(model.graph) == ["QuantizeLinear", "DequantizeLinear", "Gelu", "Dropout", "Add", "Add", "Mul"]
    assert counters["skipped-unsupported"] == 3  # QuantizeLinear, Gelu (contrib), training Dropout
    assert counters["folded-nodes"] == 0


def test_inference_dropout_folds() -> None:
    source = _parse("""
        g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}, float ratio = {0.5}> {
           d = Dropout (w, ratio)
           y = Add (x, d)
        }""")
    model, _ = _fold(source)
    assert _ops(model.graph) == ["Add"]
    _same_numbers(source, model)


def test_function_bodies_are_not_folded() -> None:
    source = _parse("""
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x) => (float[2] y) { y = local.AddTwo (x) }
        <domain: "local", opset_import: ["" : 17]>
        AddTwo (a) => (b) {
           one = Constant <value_float = 1.0> ()
           two = Add (one, one)
           b = Add (a, two)
        }""")
    model, counters = _fold(source)
    function = next(iter(model.functions.values()))
    assert _ops(function.graph) == ["Constant", "Add", "Add"]
    assert counters["folded-nodes"] == 0
    _same_numbers(source, model)


def test_loop_body_folds_into_body_initializers() -> None:
    source = _parse("""
        g (int64 n, float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> {
           y = Loop (n, , x) <body = body_g (int64 i, bool c, float[2] acc) => (bool c_out, float[2] acc_out) {
              c_out = Identity (c)
              w2 = Mul (w, w)
              acc_out = Add (acc, w2)
           }>
        }""")
    model, counters = _fold(source)
    body = model.graph.nodes[0].attr("body")
    assert _ops(body) == ["Identity", "Add"] and len(body.initializers) == 1
    assert counters["folded-nodes"] == 1
    _same_numbers(source, model, {"n": np.array(3, np.int64), "x": np.array([0.5, 1.0], np.float32)})


def test_ir3_model_is_raised_to_ir4_for_new_initializers() -> None:
    source = _parse("""
        <ir_version: 3, opset_import: ["" : 8]>
        g (float[2] x, float[2] w) => (float[2] y, float[2] z) <float[2] w = {1.0, 2.0}> {
           c = Constant <value = float[2] {3.0, 4.0}> ()
           c2 = Mul (c, c)
           y = Add (x, c2)
           w2 = Mul (w, w)
           z = Add (x, w2)
        }""")
    model, counters = _fold(source)
    assert model.ir_version == 4
    assert _ops(model.graph) == ["Add", "Mul", "Add"]  # the overridable w stays computed
    assert counters["folded-nodes"] == 2
    _same_numbers(source, model)


# -- element types ----------------------------------------------------------------------------------
def test_float8_graph_output_is_a_float8_initializer() -> None:
    source = _parse("""
        <ir_version: 9, opset_import: ["" : 19]>
        g (float[4] x) => (float8e4m3fn[4] q, float8e5m2[4] r, float[4] y) <float[4] w = {0.3, -1.7, 100.0, 0.01}> {
           q = Cast <to = 17> (w)
           r = Cast <to = 19> (w)
           y = Add (x, w)
        }""")
    model, _ = _fold(source)
    q = model.graph.initializers["q"].const_value
    r = model.graph.initializers["r"].const_value
    assert (q.dtype, r.dtype) == (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)
    expected = np.array([0.3, -1.7, 100.0, 0.01], np.float32)
    assert np.array_equal(q.numpy().astype(np.float32), expected.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert np.array_equal(r.numpy().astype(np.float32), expected.astype(ml_dtypes.float8_e5m2).astype(np.float32))
    # onnxruntime returns float8e4m3fn outputs as their raw bits: compare those.
    feeds = {"x": np.ones(4, np.float32)}
    original = make_session(source).run(["q", "y"], feeds)
    folded = make_session(ir.to_proto(model)).run(["q", "y"], feeds)
    assert all(np.array_equal(a, b) for a, b in zip(original, folded))


def test_bfloat16_and_int4_constants_round_trip() -> None:
    # onnxruntime's Python binding cannot return bfloat16 or int4 tensors: the reference
    # evaluator folds them, and the initializers keep their element types.
    source = _parse("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2] x, float s) => (float[4] y, float[2] z) <float[2] w = {1.5, -2.25}, float[2] v = {3.0, -7.0}> {
           xb = Cast <to = 16> (x)
           wb = Cast <to = 16> (w)
           cb = Concat <axis = 0> (xb, wb)
           y = Cast <to = 1> (cb)
           vi = Cast <to = 22> (v)
           z = DequantizeLinear (vi, s)
        }""")
    model, counters = _fold(source)
    dtypes = sorted(init.const_value.dtype for init in model.graph.initializers.values())
    assert dtypes == sorted([onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT4])
    assert counters["folded-nodes"] == 2
    _same_numbers(source, model, {"x": np.array([1.0, -3.0], np.float32), "s": np.array(0.5, np.float32)})


# -- evaluation fallbacks ---------------------------------------------------------------------------
def test_reference_evaluator_runs_what_onnxruntime_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.passes.fold._evaluate as evaluate_module

    def refuse(proto):  # type: ignore[no-untyped-def]
        raise RuntimeError("NOT_IMPLEMENTED: no kernel")

    monkeypatch.setattr(evaluate_module, "_run_onnxruntime", refuse)
    source = _parse("""
        g (float[3] x) => (float[3] y) <float[3] a = {1.0, 2.0, 3.0}> {
           e = Exp (a)
           y = Mul (x, e)
        }""")
    model, counters = _fold(source)
    assert _ops(model.graph) == ["Mul"] and counters["folded-nodes"] == 1
    _same_numbers(source, model, rtol=1e-6, atol=0.0)


def test_nodes_stay_when_no_evaluator_can_run_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.passes.fold._evaluate as evaluate_module

    def refuse(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("cannot run")

    monkeypatch.setattr(evaluate_module, "_run_onnxruntime", refuse)
    monkeypatch.setattr(evaluate_module, "_run_reference", refuse)
    source = _parse("""
        g (float[3] x) => (float[3] y) <float[3] a = {1.0, 2.0, 3.0}> {
           e = Exp (a)
           y = Mul (x, e)
        }""")
    model, counters = _fold(source)
    assert _ops(model.graph) == ["Exp", "Mul"]
    assert counters == {"folded-nodes": 0, "new-initializers": 0, "skipped-too-large": 0,
                        "skipped-unsupported": 1}
    _same_numbers(source, model)


# -- declared types -----------------------------------------------------------------------------------
def test_stale_declared_output_shape_is_not_folded_into_shape() -> None:
    # The declared [5,3] is wrong (onnxruntime does not check it): Shape must stay computed.
    source = _parse("""
        g (float[N,3] x) => (float[5,3] y, int64[2] s) {
           y = Relu (x)
           s = Shape (y)
        }""")
    model, _ = _fold(source)
    assert _ops(model.graph) == ["Relu", "Shape"]
    _same_numbers(source, model)


def test_stale_value_info_is_not_folded_into_shape() -> None:
    source = _parse("""
        g (float[N,3] x) => (int64[2] s) <float[7,3] r> {
           r = Relu (x)
           s = Shape (r)
        }""")
    model, _ = _fold(source)
    assert _ops(model.graph) == ["Relu", "Shape"]
    _same_numbers(source, model)


def test_static_shape_of_an_intermediate_folds() -> None:
    source = _parse("""
        g (float[N,3,4] x) => (float[N,12] y) {
           r = Relu (x)
           s = Shape <start = 1> (r)
           p = ReduceProd <keepdims = 1> (s)
           zero = Constant <value_ints = [0]> ()
           shape = Concat <axis = 0> (zero, p)
           y = Reshape (r, shape)
        }""")
    model, _ = _fold(source)
    assert _ops(model.graph) == ["Relu", "Reshape"]
    shape = model.graph.nodes[1].inputs[1].const_value.numpy().tolist()
    assert shape == [0, 12]
    _same_numbers(source, model)
