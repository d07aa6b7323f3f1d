"""Static quantization's fast path: only placed tensors observed, one session per model, one warning.

Each test checks what the fast path saves (tensors fetched, sessions opened, weights left in
their file) and that the numbers stay right (quantized outputs against float32).
"""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphopt.passes.quant.calibration import calibration_tensors, placement_tensors
from graphopt.passes.quant.placement import PlacementConfig
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir
from graphopt._quantize import _Ranges
from graphopt.cli import cli
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import (
    CalibrationResult,
    calibrate,
    check_fusion,
    fusion_report,
    run_model,
    session_on_file,
)
from graphopt.runtime import _calibration as calibration_module
from graphopt.runtime._calibration import model_digest


def _cnn() -> onnx.ModelProto:
    """conv -> relu -> maxpool -> conv -> add (residual) -> relu, plus a float Softmax branch."""
    rng = np.random.default_rng(0)
    init = lambda name, shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Add", ["c2", "p1"], ["a2"], name="residual"),
             helper.make_node("Relu", ["a2"], ["y"], name="relu2"),
             helper.make_node("Softmax", ["p1"], ["s"], axis=1, name="soft")]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 8, 6, 6])],
        [init("w1", (8, 3, 3, 3)), init("b1", (8,)), init("w2", (8, 8, 3, 3)), init("b2", (8,))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _planned(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    m = ir.load(model)
    PassManager("infer-shapes", PassContext()).run(m)
    return placement_tensors(m, PlacementConfig()), calibration_tensors(m)


def test_calibration_fetches_only_the_tensors_placement_quantizes(monkeypatch, tmp_path: Path) -> None:
    fetched: list[list[str]] = []
    real = calibration_module.session_on_file

    def spy(path, outputs=None, **kwargs):
        fetched.append(list(outputs or []))
        return real(path, outputs, **kwargs)

    monkeypatch.setattr(calibration_module, "session_on_file", spy)
    out = tmp_path / "q.onnx"
    rep = graphopt.quantize(_cnn(), out, calibration=_feeds(10), check_speed=False, level=0).report
    placed, every = _planned(_cnn())
    assert len(fetched) == 1  # one calibration session, one pass over the data
    assert set(fetched[0]) == set(placed) - {"x"}  # graph inputs come from the feeds themselves
    assert len(placed) < len(every)  # the Softmax input and the conv outputs before Relu are not observed
    assert rep["calibration"]["tensors"] == len(placed)
    assert rep["fusion"]["fused"]["QLinearConv"] == 2 and rep["fusion"]["unfused"] == 0
    x = _feeds(1, seed=9)[0]
    expected, actual = run_model(_cnn(), x), run_model(onnx.load(str(out)), x)
    assert _cosine(expected["y"], actual["y"]) > 0.995
    assert _cosine(expected["s"], actual["s"]) > 0.995  # the Softmax reads the pool's output through a DQ


def test_ranges_missing_for_a_fallback_placement_are_calibrated_in_one_pass(tmp_path: Path) -> None:
    path = str(tmp_path / "m.onnx")
    onnx.save(_cnn(), path)
    feeds = _feeds(6)
    first = calibrate(path, ["r1"], feeds)
    ranges = _Ranges(first, path, feeds, "minmax", 99.999, cache=str(tmp_path / "stats.npz"))
    ranges.ensure(["r1", "p1", "a2"])
    both = calibrate(path, ["r1", "p1", "a2"], feeds)
    for name in ("r1", "p1", "a2"):
        assert ranges.range(name) == both.range(name)
    assert ranges.result.samples == 6
    cached = CalibrationResult.load(tmp_path / "stats.npz", model=path)
    assert set(cached.ranges) == {"r1", "p1", "a2"}  # the cache holds the merged statistics


def test_static_quantize_opens_each_model_once_and_reports_what_it_ran(monkeypatch, tmp_path: Path) -> None:
    import graphopt.runtime as runtime

    opened: list[tuple[str, bool, bool]] = []  # (model file, fetches other outputs, optimized)
    real = runtime.session_on_file

    def spy(path, outputs=None, **kwargs):
        opened.append((Path(path).name, outputs is not None, bool(kwargs.get("optimize"))))
        return real(path, outputs, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("static quantization opens a second session of a model it already opened")

    monkeypatch.setattr(runtime, "session_on_file", spy)
    monkeypatch.setattr(calibration_module, "session_on_file", spy)
    monkeypatch.setattr(runtime, "check_fusion", refuse)
    monkeypatch.setattr(runtime, "bench_models", refuse)
    feeds = _feeds(10)
    out = tmp_path / "q.onnx"
    rep = graphopt.quantize(_cnn(), out, calibration=feeds, held_out=3, speed_runs=5, level=0).report
    monkeypatch.undo()
    # float (reference + timing), calibration, quantized (accuracy + fusion graph + timing), and
    # the two sessions of the per-unit SQNR; it used to be 11 or more.
    assert sorted(opened) == sorted([("float.onnx", False, True), ("float.onnx", True, False),
                                     ("quant1.onnx", False, True), ("float.onnx", True, False),
                                     ("quant1.onnx", True, False)]), opened
    assert rep["latency"]["runs"] == 5 and rep["latency"]["float_ms"] > 0
    assert rep["fusion"]["fused"]["QLinearConv"] == 2 and rep["fusion"]["unfused"] == 0
    assert rep["fusion"] == check_fusion(str(out)).to_dict()  # the report is about the written model
    # The accuracy comes from the written model, on the held-out samples (the last three).
    held = feeds[-3:]
    quant, float_model = onnx.load(str(out)), _cnn()
    cos = [_cosine(run_model(float_model, f)[k], run_model(quant, f)[k]) for f in held for k in ("y", "s")]
    assert rep["accuracy"]["cosine"] == pytest.approx(float(np.mean(cos)), abs=2e-4)
    assert rep["accuracy"]["cosine"] > 0.995
    assert all(u["sqnr_db"] is not None and u["sqnr_db"] > 20 for u in rep["units"] if u["kind"] == "compute")


def test_fusion_report_of_a_session_graph_equals_check_fusion(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    graphopt.quantize(_cnn(), out, calibration=_feeds(6), check_speed=False, level=0)
    optimized = tmp_path / "opt" / "optimized.onnx"
    optimized.parent.mkdir()
    session = session_on_file(out, optimize=True, optimized_model_path=str(optimized))
    assert session.run(None, _feeds(1)[0])[0].shape == (1, 8, 6, 6)
    assert fusion_report(optimized).to_dict() == check_fusion(str(out)).to_dict()
    assert fusion_report(optimized).fused == {"QLinearConv": 2}


def _external_mlp(folder: Path, hidden: int = 512, layers: int = 4) -> Path:
    rng = np.random.default_rng(3)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((hidden, hidden)) * np.sqrt(2.0 / hidden)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"m{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [out], name=f"mm{i}"))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "mlp.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="mlp.onnx.data", size_threshold=1024)
    return path


def test_calibrating_a_file_leaves_its_weights_to_onnxruntime(tmp_path: Path) -> None:
    path = _external_mlp(tmp_path, hidden=1024)  # 16 MB of weights
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 1024)).astype(np.float32)} for _ in range(3)]
    tracemalloc.start()
    try:
        result = calibrate(str(path), ["h0", "h1", "y"], feeds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Reading the weights into Python (onnx.load, or serializing the model) would cost >= 16 MB.
    assert peak < 4 << 20, peak
    expected = run_model(onnx.load(str(path)), feeds[0])["y"]
    assert result.range("y")[1] >= float(expected.max())


def test_model_digest_is_the_same_inline_or_external_and_sees_a_changed_weight(tmp_path: Path) -> None:
    path = _external_mlp(tmp_path, hidden=64, layers=2)
    inline = onnx.load(str(path))  # weights read back inline
    assert model_digest(str(path)) == model_digest(inline)
    changed = onnx.load(str(path))
    w = numpy_helper.to_array(changed.graph.initializer[0]).copy()
    w[0, 0] += 1.0
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, changed.graph.initializer[0].name))
    assert model_digest(changed) != model_digest(inline)


def test_synthetic_warning_is_said_once_by_the_python_api(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        out = graphopt.quantize(_cnn(), calibration="synthetic", samples=6, check_speed=False, level=0)
    said = [r for r in caplog.records if "synthetic" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert sum("synthetic" in w for w in out.warnings) == 1  # the outcome and the report still carry it
    assert sum("synthetic" in w for w in out.report["warnings"]) == 1


def test_synthetic_warning_is_printed_once_by_the_cli(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(_cnn(), str(model))
    result = CliRunner().invoke(cli, ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--synthetic",
                                      "--samples", "6", "--no-speed-check", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("synthetic") == 1, result.output
