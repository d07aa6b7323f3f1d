"""``quantize-dynamic``: the emitted graph, its numbers against onnxruntime on the float model,
and onnxruntime's own dynamic kernels in the optimized session."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from graphopt import ir
from graphopt.errors import PipelineError
from graphopt.passes.quant.dynamic import QuantizeDynamic, quantize_weight_int8
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import run_model

K, N = 64, 32


def _model(opset: int = 17, *, bias: bool = True, rows: int | str = "M") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "w"], ["p" if bias else "y"], name="proj")]
    inits = [numpy_helper.from_array(w, "w")]
    if bias:
        nodes.append(oh.make_node("Add", ["p", "b"], ["y"], name="bias"))
        inits.append(numpy_helper.from_array(b, "b"))
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [rows, K])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [rows, N])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=5 if opset <= 10 else 8)


def _run(proto: onnx.ModelProto, target: str = "cpu", **options: object) -> tuple[ir.Model, dict[str, int]]:
    model = ir.load(proto)
    report = PassManager([QuantizeDynamic(**{"min_elements": 0, **options})], PassContext(target=target)).run(model)
    return model, report.records[-1].counters


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _dynamic_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, per_channel: bool,
                       reduce_range: bool) -> np.ndarray:
    """numpy's DynamicQuantizeLinear (uint8) + int8 weights, the math of the emitted graph."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((high - low) / 255)
    zero = np.clip(np.rint(-low / scale), 0, 255)
    x_q = np.clip(np.rint(x / scale) + zero, 0, 255)
    codes, w_scale = quantize_weight_int8(w, per_channel, reduce_range)
    return ((x_q - zero) @ codes.astype(np.float64)) * (scale * w_scale) + b


def test_contrib_form_matches_the_quantized_math_and_bounds_the_error() -> None:
    source = _model()
    model, counters = _run(source)
    assert _ops(model) == ["DynamicQuantizeMatMul"]
    assert counters["quantized-matmul"] == 1 and counters["fused-bias"] == 1
    assert model.opset_imports["com.microsoft"] == 1
    assert model.graph.initializers[model.graph.nodes[0].inputs[1].name].const_value.dtype == TensorProto.INT8  # type: ignore[index,union-attr]
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    out = run_model(ir.to_proto(model), {"x": x})["y"]
    expected = run_model(source, {"x": x})["y"]  # onnxruntime on the float model
    w = numpy_helper.to_array(source.graph.initializer[0])
    b = numpy_helper.to_array(source.graph.initializer[1])
    # The graph computes exactly the quantized math (float rounding only).
    np.testing.assert_allclose(out, _dynamic_reference(x, w, b, True, True), rtol=1e-5, atol=1e-5)
    # And stays within the rounding bound of the float model: |x|·s_w/2 + s_a/2·|w| + s_a·s_w/4 per term.
    _, w_scale = quantize_weight_int8(w, True, True)
    s_a = (max(x.max(), 0) - min(x.min(), 0)) / 255
    bound = np.abs(x) @ np.broadcast_to(w_scale / 2, w.shape) + (s_a / 2) * np.abs(w).sum(0) + K * s_a * w_scale / 4
    assert np.all(np.abs(out - expected) <= bound + 1e-5)


def test_standard_form_for_cuda_equals_contrib_form() -> None:
    source = _model()
    cuda_model, _ = _run(source, target="cuda")
    assert _ops(cuda_model) == ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul", "Add"]
    assert "com.microsoft" not in cuda_model.opset_imports
    cpu_model, _ = _run(source)
    x = np.random.default_rng(2).standard_normal((3, K)).astype(np.float32)
    standard = run_model(ir.to_proto(cuda_model), {"x": x})["y"]
    fused = run_model(ir.to_proto(cpu_model), {"x": x})["y"]
    np.testing.assert_allclose(standard, fused, rtol=1e-5, atol=1e-5)


def test_opset10_needs_no_newer_opset_on_cpu_but_the_standard_form_does() -> None:
    source = _model(opset=10, bias=False)
    model, _ = _run(source)
    assert _ops(model) == ["DynamicQuantizeMatMul"] and model.opset_imports[""] == 10
    kept, kept_counters = _run(source, target="cuda")
    assert _ops(kept) == ["MatMul"] and kept_counters["quantized-matmul"] == 0
    x = np.random.default_rng(3).standard_normal((2, K)).astype(np.float32)
    np.testing.assert_allclose(run_model(ir.to_proto(model), {"x": x})["y"], run_model(source, {"x": x})["y"],
                               rtol=0.05, atol=0.1)


@pytest.mark.parametrize("per_channel,reduce_range", [(0, 0), (1, 0), (0, 1)])
def test_weight_options_change_scales_and_codes(per_channel: int, reduce_range: int) -> None:
    model, _ = _run(_model(bias=False), per_channel=per_channel, reduce_range=reduce_range)
    node = model.graph.nodes[0]
    codes = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
    scale = node.inputs[2].const_value.numpy()  # type: ignore[union-attr]
    assert scale.shape == ((N,) if per_channel else ())
    assert int(np.abs(codes).max()) == (63 if reduce_range else 127)


def test_onnxruntime_keeps_its_dynamic_kernel_and_matches_its_own_quantizer(tmp_path: os.PathLike) -> None:
    """At ORT_ENABLE_ALL the session runs DynamicQuantizeMatMul, as with onnxruntime's quantizer."""
    from onnxruntime.quantization import quantize_dynamic

    source = _model()
    model, _ = _run(source, per_channel=0, reduce_range=0)
    ours = os.path.join(tmp_path, "ours.onnx")
    ir.save(model, ours)
    float_path = os.path.join(tmp_path, "float.onnx")
    onnx.save(source, float_path)
    theirs = os.path.join(tmp_path, "theirs.onnx")
    quantize_dynamic(float_path, theirs)
    optimized = os.path.join(tmp_path, "ours.opt.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = optimized
    x = np.random.default_rng(4).standard_normal((7, K)).astype(np.float32)
    ours_out = ort.InferenceSession(ours, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert "DynamicQuantizeMatMul" in {n.op_type for n in onnx.load(optimized).graph.node}
    theirs_out = ort.InferenceSession(theirs, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # Same per-tensor int8 scheme: the outputs agree up to a weight rounding step.
    np.testing.assert_allclose(ours_out, theirs_out, rtol=1e-2, atol=2e-2)


def test_gemm_with_matrix_bias_is_kept() -> None:
    rng = np.random.default_rng(5)
    graph = oh.make_graph(
        [oh.make_node("Gemm", ["x", "w", "c"], ["y"])], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
        [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((3, N)).astype(np.float32), "c")])
    model, counters = _run(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)]))
    assert _ops(model) == ["Gemm"] and counters["quantized-gemm"] == 0


def test_bisect_limit_stops_after_one_rewrite() -> None:
    rng = np.random.default_rng(6)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("MatMul", ["h", "w2"], ["y"])], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, K])],
        [numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32), f"w{i}") for i in (1, 2)])
    model = ir.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    PassManager([QuantizeDynamic(min_elements=0)], PassContext(bisect_limit=1)).run(model)
    assert _ops(model) == ["DynamicQuantizeMatMul", "MatMul"]
    ir.verify(model)


@pytest.mark.parametrize("options,message", [({"op_types": "Conv"}, "op_types"), ({"exclude": "("}, "exclude"),
                                             ({"per_channel": "maybe"}, "per_channel")])
def test_bad_options_name_the_option(options: dict[str, str], message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        _run(_model(), **options)


def test_saved_model_has_int8_weights_and_reloads(tmp_path: os.PathLike) -> None:
    model, _ = _run(_model())
    path = os.path.join(tmp_path, "q.onnx")
    ir.save(model, path)
    saved = onnx.load(path)
    onnx.checker.check_model(saved)
    assert {t.name for t in saved.graph.initializer if t.data_type == TensorProto.INT8}
    assert not [t for t in saved.graph.initializer if t.name == "w"]  # the float weight is gone
