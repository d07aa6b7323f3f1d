"""Static quantization of models whose weights live in external data, up to models over 2 GB.

``graphopt.quantize`` hands every model to onnxruntime as a file with external data (the float
copy it calibrates, each quantized candidate, the checks), whatever its size: there is no size
threshold that switches to another code path, so the small model of the fast test runs the same
path as the 2.4 GB model of the slow one (``--runslow``). The output keeps the input's storage
(external data in, external data out) unless ``external_data`` says otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.runtime import session_on_file

#: Output cosine, quantized against float32 on fresh inputs, that int8 must keep here.
COSINE_BOUND = 0.99


def _mlp(hidden: int, layers: int, rows: int, weights: list[TensorProto]) -> onnx.ModelProto:
    """``layers`` x (MatMul -> Relu), the last MatMul writing ``y``."""
    nodes, x = [], "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"m{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [out], name=f"mm{i}"))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, hidden])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _small_external(folder: Path, hidden: int = 512, layers: int = 6, rows: int = 4) -> Path:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((hidden, hidden)) * np.sqrt(2.0 / hidden))
                                       .astype(np.float32), f"w{i}") for i in range(layers)]
    path = folder / "mlp.onnx"
    onnx.save(_mlp(hidden, layers, rows, weights), str(path), save_as_external_data=True,
              location="mlp.onnx.data", size_threshold=1024)
    return path


def _worst_cosine(float_path: Path, quant_path: Path, inputs: np.ndarray) -> float:
    reference = session_on_file(float_path)
    worst = 1.0
    for optimize in (False, True):  # as written, and with onnxruntime's integer kernels
        quantized = session_on_file(quant_path, optimize=optimize)
        for x in inputs:
            a = reference.run(None, {"x": x})[0].ravel().astype(np.float64)
            b = quantized.run(None, {"x": x})[0].ravel().astype(np.float64)
            worst = min(worst, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return worst


def _has_external_data(path: Path) -> bool:
    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_external_data_model_quantizes_without_copying_its_weights_into_python(tmp_path: Path) -> None:
    hidden, layers = 512, 16  # 16 MB of float32 weights
    path = _small_external(tmp_path, hidden, layers)
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((4, hidden)).astype(np.float32)} for _ in range(8)]
    out = tmp_path / "out" / "mlp.int8.onnx"
    out.parent.mkdir()
    weight_bytes = layers * hidden * hidden * 4
    warm = tmp_path / "warm"  # a first run imports what quantize needs: imports are not the model
    warm.mkdir()
    graphopt.quantize(str(_small_external(warm, 32, 2)), speed_runs=5,
                      calibration=[{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(3)])
    tracemalloc.start()
    try:
        outcome = graphopt.quantize(str(path), out, calibration=calib, speed_runs=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Python holds one weight being quantized at a time (with its float64 temporaries) and the
    # int8 weights, never the model: a protobuf or bytes of the whole model (what a 2 GB model
    # cannot have) would alone take the weights' size.
    print(f"Python allocations peak {peak / 1e6:.1f} MB for {weight_bytes / 1e6:.1f} MB of weights")
    assert peak < 0.8 * weight_bytes, (peak, weight_bytes)
    rep = outcome.report
    assert rep["fusion"]["unfused"] == 0
    assert rep["fusion"]["fused"].get("MatMulIntegerToFloat", 0) + rep["fusion"]["fused"].get("QLinearMatMul", 0) == layers
    assert _has_external_data(out) and os.path.exists(str(out) + ".data")  # as the input was
    assert outcome.ir_model is not None and len(outcome.ir_model.graph) > 0  # readable after the temp files went
    fresh = np.random.default_rng(7).standard_normal((3, 4, hidden)).astype(np.float32)
    assert _worst_cosine(path, out, fresh) >= COSINE_BOUND


def test_output_storage_follows_the_input_or_the_argument(tmp_path: Path) -> None:
    path = _small_external(tmp_path, hidden=128, layers=2)
    inline_input = tmp_path / "inline.onnx"
    onnx.save(onnx.load(str(path)), str(inline_input))
    calib = [{"x": np.random.default_rng(i).standard_normal((4, 128)).astype(np.float32)} for i in range(6)]
    plain = tmp_path / "plain.onnx"
    graphopt.quantize(str(inline_input), plain, calibration=calib, check_speed=False)
    assert not _has_external_data(plain) and not os.path.exists(str(plain) + ".data")
    forced = tmp_path / "forced.onnx"
    graphopt.quantize(str(inline_input), forced, calibration=calib, check_speed=False, external_data=True)
    assert _has_external_data(forced)
    fresh = np.random.default_rng(9).standard_normal((2, 4, 128)).astype(np.float32)
    assert _worst_cosine(path, plain, fresh) >= COSINE_BOUND
    assert _worst_cosine(path, forced, fresh) >= COSINE_BOUND


# -- over 2 GB (slow) ---------------------------------------------------------------------------------
_CHUNK = 4 << 20  # float32 values per write: 16 MiB


def _write_large(folder: Path, hidden: int, layers: int, rows: int) -> Path:
    """The MLP with N(0, 2/hidden) weights written straight to one data file, 16 MiB at a time."""
    weights, offset = [], 0
    with open(folder / "big.onnx.data", "wb") as f:
        for i in range(layers):
            rng = np.random.default_rng(i)
            left = hidden * hidden
            while left:
                n = min(_CHUNK, left)
                (rng.standard_normal(n, dtype=np.float32) * np.float32(np.sqrt(2.0 / hidden))).tofile(f)
                left -= n
            length = hidden * hidden * 4
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[hidden, hidden],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", "big.onnx.data"), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
            weights.append(t)
            offset += length
    path = folder / "big.onnx"
    onnx.save(_mlp(hidden, layers, rows, weights), str(path))
    return path


@pytest.mark.slow
def test_model_over_2gb_quantizes_end_to_end(tmp_path: Path) -> None:
    hidden, layers, rows = 8192, 9, 8  # 2.42 GB of float32 weights
    src = tmp_path / "in"
    src.mkdir()
    path = _write_large(src, hidden, layers, rows)
    assert sum(f.stat().st_size for f in src.iterdir()) > 2**31
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((8, rows, hidden), dtype=np.float32))
    out = tmp_path / "out" / "big.int8.onnx"
    out.parent.mkdir()
    report = tmp_path / "report.json"
    started = time.perf_counter()
    with tempfile.TemporaryFile() as output:  # a file, not a pipe: the child never blocks on it
        proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", "quantize", str(path), "-o", str(out),
                                 "--calibration", str(calib), "--report", str(report), "--quiet"],
                                stdout=output, stderr=subprocess.STDOUT, cwd=str(tmp_path))
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS
        output.seek(0)
        log = output.read().decode(errors="replace")
    seconds, peak_rss = time.perf_counter() - started, usage.ru_maxrss * 1024
    assert os.waitstatus_to_exitcode(status) == 0, log[-3000:]
    rep = json.loads(report.read_text())
    print(f"\nquantized {layers}x{hidden}x{hidden} (2.42 GB) in {seconds:.1f} s, peak RSS {peak_rss / 1e9:.2f} GB")
    assert rep["fusion"]["unfused"] == 0
    assert rep["fusion"]["fused"].get("MatMulIntegerToFloat", 0) + rep["fusion"]["fused"].get("QLinearMatMul", 0) == layers
    assert _has_external_data(out) and os.path.getsize(out) < 1 << 20  # the structure alone; weights beside it
    fresh = np.random.default_rng(7).standard_normal((2, rows, hidden)).astype(np.float32)
    assert _worst_cosine(path, out, fresh) >= COSINE_BOUND
    # Weights are read from their files, never all at once: peak memory stays near the sessions'
    # own copies (float32 2.4 GB when onnxruntime holds it), far from holding the model twice.
    assert peak_rss < 7e9, peak_rss
