"""``fold-constants`` on ``CastLike`` of a constant and on ``Shape``/``Size`` of ``ConstantOfShape``.

``CastLike(c, x)`` folds when ``c`` is constant and ``x``'s element type is known, whether or
not ``x`` is; ``Shape``/``Size`` of ``ConstantOfShape(s)`` fold from the elements of ``s``
without building the tensor. Golden cases are in ``fixtures/fold-constants/``; these tests
cover every float8 target and saturation mode, memory and time on a huge ``ConstantOfShape``,
and the cases where folding would hide a run-time error. Numbers are compared exactly with
onnxruntime (optimizations off) on the original model: folding runs the same kernels.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import onnx
import onnx.parser
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager, PassRegistry, PipelineReport
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

HEAD = '<ir_version: 9, opset_import: ["" : 19]>\n'
REGISTRY = PassRegistry.default(plugins=False)
FLOAT8_TYPES = [onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
                onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ]


def _fold(source: onnx.ModelProto) -> tuple[ir.Model, dict[str, int]]:
    model = ir.load(source)
    report: PipelineReport = PassManager("fold-constants,eliminate-dead-code",
                                         PassContext(registry=REGISTRY)).run(model)
    return model, report.totals().get("fold-constants", {}).get("counters", {})


def _same_numbers(source: onnx.ModelProto, model: ir.Model, feeds: dict[str, np.ndarray] | None = None) -> None:
    ir.verify(model)
    output = ir.to_proto(model)
    onnx.checker.check_model(output)
    feeds = feeds if feeds is not None else random_inputs(make_session(source), seed=0, dims={"N": 3})
    comparison = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=0.0, atol=0.0)
    assert comparison.ok, comparison.summary()


def _ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for n in graph]


@pytest.mark.parametrize("saturate", [0, 1])
@pytest.mark.parametrize("target", FLOAT8_TYPES, ids=onnx.helper.tensor_dtype_to_string)
def test_castlike_float8_saturation_matches_onnxruntime(target: int, saturate: int) -> None:
    """Out-of-range, infinite, NaN and subnormal values cast to each float8 type as onnxruntime does."""
    source = onnx.parser.parse_model(HEAD + f"""
        g (float[8] x) => (float[8] y) {{
            q = Cast <to = {target}> (x)
            c = Constant <value_floats = [0.3, -1000.0, 1000.0, 1e-7, 57344.0, 70000.0, -0.0, 3.0]> ()
            r = CastLike <saturate = {saturate}> (c, q)
            back = Cast <to = 1> (r)
            y = Add (x, back)
        }}""")
    model, counters = _fold(source)
    assert "CastLike" not in _ops(model.graph)
    assert _ops(model.graph) == ["Add"]
    assert counters["folded-nodes"] >= 2
    _same_numbers(source, model)


def test_castlike_special_values_to_float8() -> None:
    """inf and NaN through a saturating CastLike fold to the values onnxruntime computes."""
    source = onnx.parser.parse_model(HEAD + """
        g (float[3] x) => (float[3] y) <float[3] c = {1.0, -1.0, 0.0}> {
            q = Cast <to = 17> (x)
            special = Div (c, zero)
            zero = Constant <value_floats = [0.0, 0.0, 0.0]> ()
            r = CastLike <saturate = 1> (special, q)
            back = Cast <to = 1> (r)
            y = Add (x, back)
        }""")
    model, _ = _fold(source)
    assert _ops(model.graph) == ["Add"]
    _same_numbers(source, model)


def test_castlike_target_in_enclosing_graph() -> None:
    """Inside an If branch, the type of an outer (non-constant) value is known: CastLike folds there."""
    source = onnx.parser.parse_model(HEAD + """
        g (bool cond, float16[2] h) => (float16[2] y) {
            y = If (cond) <
                then_branch = t () => (float16[2] a) {
                    c = Constant <value_floats = [0.5, 65504.0]> ()
                    cl = CastLike (c, h)
                    a = Mul (h, cl)
                },
                else_branch = e () => (float16[2] b) { b = Identity (h) }
            >
        }""")
    model, counters = _fold(source)
    then_branch = model.graph.nodes[0].attr("then_branch")
    assert _ops(then_branch) == ["Mul"]
    assert counters["folded-nodes"] >= 1
    for cond in (True, False):
        _same_numbers(source, model, {"cond": np.array(cond), "h": np.array([2.0, 0.5], dtype=np.float16)})


def test_castlike_stale_value_info_not_trusted() -> None:
    """A declared value_info type of an untyped contrib output is not trusted: CastLike stays."""
    source = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 19, "com.microsoft" : 1]>
        g (float[3,3] x) => (float[3,3] y) <float c = {2.0}, double[3,3] inv> {
            inv = com.microsoft.Inverse (x)
            two = CastLike (c, inv)
            y = Mul (x, two)
        }""")
    model, counters = _fold(source)
    assert _ops(model.graph) == ["Inverse", "CastLike", "Mul"]
    assert counters["folded-nodes"] == 0


def test_huge_constant_of_shape_is_never_built() -> None:
    """Shape and Size of a 4 TB ConstantOfShape fold in little time and memory."""
    source = onnx.parser.parse_model(HEAD + """
        g (float[200] x) => (int64[3] s2, int64[1] s1, float[200] y) {
            s = Shape (x)
            two = Constant <value_ints = [2]> ()
            k = Div (s, two)
            big = Constant <value_ints = [1000000, 1000000]> ()
            cs = Concat <axis = 0> (k, big)
            huge = ConstantOfShape <value = float[1] {1.0}> (cs)
            s2 = Shape (huge)
            s1 = Shape <start = -1> (huge)
            sz = Size (huge)
            szf = Cast <to = 1> (sz)
            y = Mul (x, szf)
        }""")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model, _ = _fold(source)
    elapsed = time.perf_counter() - start
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert elapsed < 10, f"folding took {elapsed:.1f} s"
    assert grown_kb < 300_000, f"peak memory grew by {grown_kb / 1024:.0f} MB"
    assert _ops(model.graph) == ["Mul"]
    values = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    np.testing.assert_array_equal(values["s2"], [100, 1_000_000, 1_000_000])
    np.testing.assert_array_equal(values["s1"], [1_000_000])
    # The original cannot run (it allocates 4e14 bytes): the folded one runs.
    x = np.ones(200, dtype=np.float32)
    outputs = run_model(ir.to_proto(model), {"x": x})
    np.testing.assert_array_equal(outputs["y"], x * np.float32(1e14))


def test_negative_shape_element_keeps_the_error() -> None:
    """ConstantOfShape with a negative dim fails at run time: nothing computed from it folds."""
    source = onnx.parser.parse_model(HEAD + """
        g (float[N,4] x) => (int64[1] s1, int64 sz) {
            s = Shape (x)
            i0 = Constant <value_ints = [0]> ()
            n = Gather <axis = 0> (s, i0)
            neg = Constant <value_ints = [-1]> ()
            cs = Concat <axis = 0> (n, neg)
            z = ConstantOfShape <value = float[1] {1.0}> (cs)
            s1 = Shape <start = 1> (z)
            sz = Size (z)
        }""")
    model, _ = _fold(source)
    assert _ops(model.graph).count("ConstantOfShape") == 1
    assert {"Shape", "Size"} <= set(_ops(model.graph))
    feeds = {"x": np.ones((3, 4), dtype=np.float32)}
    for proto in (source, ir.to_proto(model)):
        with pytest.raises(OrtFail, match="[Nn]egative|shape"):
            run_model(proto, feeds)


def test_partly_known_shape_folds_only_known_slice() -> None:
    """Shape<start, end> selecting known elements of s folds; the full Shape (symbolic N) stays."""
    source = onnx.parser.parse_model(HEAD + """
        g (float[N,6] x) => (int64[1] known, int64[2] full) {
            s = Shape (x)
            two = Constant <value_ints = [2]> ()
            half = Div (s, two)
            z = ConstantOfShape <value = float[1] {1.0}> (half)
            known = Shape <start = 1, end = 2> (z)
            full = Shape (z)
        }""")
    model, _ = _fold(source)
    assert "known" in model.graph.initializers
    assert _ops(model.graph)[-1] == "Shape" and "full" not in model.graph.initializers
    np.testing.assert_array_equal(model.graph.initializers["known"].const_value.numpy(), [3])
    _same_numbers(source, model, {"x": np.ones((4, 6), dtype=np.float32)})
