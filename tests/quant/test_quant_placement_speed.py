"""Placement that keeps whole regions integer (SiLU, Split, Resize), minmax ranges for the
tensors that decide the outputs, and calibration through a file with external data."""

from __future__ import annotations

import numpy as np
import onnx
from graphopt.passes.quant.insert_qdq import insert_qdq
from graphopt.passes.quant.placement import PlacementConfig, plan_placement
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import _calibration as calibration_module
from graphopt.runtime import calibrate, check_fusion, run_model
from graphopt.runtime._calibration import output_critical_tensors


def _conv(rng: np.random.Generator, inits: list[onnx.TensorProto], name: str, cin: int, cout: int,
          k: int = 3) -> list[str]:
    w = (rng.standard_normal((cout, cin, k, k)) * (1.5 / np.sqrt(cin * k * k))).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
    return [f"{name}.w", f"{name}.b"]


def _silu(nodes: list[onnx.NodeProto], x: str, name: str) -> str:
    nodes.append(helper.make_node("Sigmoid", [x], [f"{name}.sig"], name=f"{name}.sigmoid"))
    nodes.append(helper.make_node("Mul", [x, f"{name}.sig"], [f"{name}.silu"], name=f"{name}.mul"))
    return f"{name}.silu"


def yolo_block() -> onnx.ModelProto:
    """Conv-SiLU, Split into two halves, a bottleneck with a residual Add, Concat, nearest
    Resize, MaxPool and a final Conv: the C2f/SPPF shapes of YOLOv8 detectors."""
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = [
        numpy_helper.from_array(np.array([8, 8], np.int64), "halves"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    nodes.append(helper.make_node("Conv", ["x", *_conv(rng, inits, "c0", 4, 16)], ["c0"], pads=[1] * 4, name="c0"))
    a = _silu(nodes, "c0", "c0")
    nodes.append(helper.make_node("Split", [a, "halves"], ["s0", "s1"], axis=1, name="split"))
    nodes.append(helper.make_node("Conv", ["s1", *_conv(rng, inits, "c1", 8, 8)], ["c1"], pads=[1] * 4, name="c1"))
    b = _silu(nodes, "c1", "c1")
    nodes.append(helper.make_node("Add", ["s1", b], ["res"], name="residual"))
    nodes.append(helper.make_node("Concat", ["s0", "s1", "res"], ["cat"], axis=1, name="concat"))
    nodes.append(helper.make_node("Conv", ["cat", *_conv(rng, inits, "c2", 24, 8, 1)], ["c2"], name="c2"))
    c = _silu(nodes, "c2", "c2")
    nodes.append(helper.make_node("MaxPool", [c], ["pool"], kernel_shape=[3, 3], pads=[1] * 4, name="pool"))
    nodes.append(helper.make_node("Resize", ["pool", "", "scales"], ["up"], mode="nearest", name="resize"))
    nodes.append(helper.make_node("Conv", ["up", *_conv(rng, inits, "c3", 8, 6)], ["y"], pads=[1] * 4, name="c3"))
    graph = helper.make_graph(nodes, "yolo_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 32, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 16, 16)).astype(np.float32)} for _ in range(n)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_silu_split_resize_regions_stay_integer() -> None:
    proto = yolo_block()
    model = ir.load(proto)
    PassManager("infer-shapes", PassContext()).run(model)
    config = PlacementConfig()
    plan = plan_placement(model, config)
    kinds = {u.id: u.kind for u in plan.units}
    assert kinds == {"c0": "compute", "c0.sigmoid": "elementwise", "c0.mul": "elementwise",
                     "split": "pass-through", "c1": "compute", "c1.sigmoid": "elementwise",
                     "c1.mul": "elementwise", "residual": "elementwise", "concat": "elementwise",
                     "c2": "compute", "c2.sigmoid": "elementwise", "c2.mul": "elementwise",
                     "pool": "pass-through", "resize": "pass-through", "c3": "compute"}
    # Both Split outputs are written quantized with the input's parameters; nothing to calibrate.
    assert plan.root("s0") == plan.root("s1") == "c0.silu"
    assert plan.root("up") == plan.root("pool") == "c2.silu"
    assert "s1" not in plan.tensor_names() and "c0.sig" in plan.tensor_names()

    calib, held = _feeds(8, seed=1), _feeds(4, seed=2)
    ranges = calibrate(proto, plan.tensor_names(), calib)
    insert_qdq(model, ranges, config, plan=plan)
    quantized = ir.to_proto(model)
    fusion = check_fusion(quantized)
    assert fusion.unfused == 0, fusion.unfused_nodes
    for kernel, count in {"QLinearConv": 4, "QLinearSigmoid": 3, "QLinearMul": 3, "QLinearAdd": 1,
                          "QLinearConcat": 1}.items():
        assert fusion.fused.get(kernel) == count, (kernel, fusion.fused)
    # No float island is left between the first Q and the last DQ.
    assert fusion.ops.get("Sigmoid", 0) == 0 and fusion.ops.get("Mul", 0) == 0
    assert fusion.ops.get("QuantizeLinear") == 1 and fusion.ops.get("DequantizeLinear") == 1
    for feed in held:
        expected = run_model(proto, feed)["y"]
        actual = run_model(quantized, feed)["y"]
        assert _cosine(expected, actual) >= 0.99  # 8-bit noise through 4 convs and 3 SiLUs
        assert np.abs(expected - actual).max() <= 0.1 * np.abs(expected).max()


def classifier() -> onnx.ModelProto:
    """Conv-Relu, GlobalAveragePool, Flatten and a Gemm head whose input has rare large values."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.4).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((5, 16)) * 0.5).astype(np.float32), "wf")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalMaxPool", ["r"], ["g"], name="gmp"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1, name="head")]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _heavy_tailed(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((1, 3, 8, 8)) ** 3).astype(np.float32)} for _ in range(n)]


def test_entropy_keeps_minmax_for_outputs_and_the_head_input() -> None:
    proto = classifier()
    assert output_critical_tensors(proto) == {"y", "f", "g"}
    names = ["x", "r", "g", "f", "y"]
    result = calibrate(proto, names, _heavy_tailed(12, seed=1), method="entropy")
    minmax = result.with_method("minmax")
    for name in ("g", "f", "y"):
        assert result.range(name) == minmax.range(name)
    # Inner activations still use the method: KL clips the heavy tail of the input.
    assert result.range("x")[1] < 0.8 * minmax.range("x")[1]
    # Kept through with_method() and the statistics cache.
    assert result.with_method("percentile", percentile=90.0).range("y") == minmax.range("y")
    # Without the rule KL would clip the head's input, which holds the largest (deciding) values.
    plain = calibration_module.CalibrationResult(method="entropy", samples=result.samples,
                                                 model_digest=result.model_digest, stats=result.stats,
                                                 params=result.params)
    assert plain.range("f")[1] < 0.9 * minmax.range("f")[1]
    # Numbers: the head quantized with the kept range stays close to float on held-out inputs.
    model = ir.load(proto)
    PassManager("infer-shapes", PassContext()).run(model)
    config = PlacementConfig(op_types=("Gemm",))
    plan = plan_placement(model, config)
    assert plan.tensor_names() == ["f"]
    insert_qdq(model, result, config, plan=plan)
    quantized = ir.to_proto(model)
    for feed in _heavy_tailed(4, seed=2):
        expected, actual = run_model(proto, feed)["y"], run_model(quantized, feed)["y"]
        assert np.argmax(expected) == np.argmax(actual)
        assert _cosine(expected, actual) >= 0.999  # 8-bit rounding of the features only


def test_cache_keeps_minmax_tensors(tmp_path) -> None:
    proto = classifier()
    result = calibrate(proto, ["r", "g", "y"], _heavy_tailed(6, seed=1), method="entropy")
    result.save(tmp_path / "stats.npz")
    loaded = calibration_module.CalibrationResult.load(tmp_path / "stats.npz", model=proto)
    assert loaded.minmax_tensors == {"g", "y"}
    assert loaded.ranges == result.ranges


def test_calibration_through_external_data(monkeypatch) -> None:
    proto = yolo_block()
    names = ["c0", "c0.sig", "cat", "y"]
    feeds = _feeds(5, seed=3)
    inline = calibrate(proto, names, feeds)
    opened: list[type] = []
    from graphopt.runtime import _session

    real = _session.make_session

    def spy(model, **kwargs):
        opened.append(type(model))
        return real(model, **kwargs)

    monkeypatch.setattr(_session, "make_session", spy)
    # A model over the limit (the limit lowered to 0 bytes) goes through a file automatically.
    monkeypatch.setattr(calibration_module, "_INLINE_LIMIT", 0)
    external = calibrate(proto, names, feeds, group_bytes=1)  # one group per tensor: files rewritten
    assert opened and all(t is str for t in opened)
    assert len(opened) == len(names)
    for name in names:
        assert external.stats[name].count == inline.stats[name].count
        assert external.range(name) == inline.range(name)
    opened.clear()
    calibrate(proto, names, feeds, external_data=False)
    assert opened == [bytes]
