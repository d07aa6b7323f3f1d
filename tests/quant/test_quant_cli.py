"""``graphopt quantize``: success path, report, fusion check exit code, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import cli
from graphopt.runtime import run_model


def _cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    init = lambda name, shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Add", ["c2", "p1"], ["a2"], name="residual"),
             helper.make_node("Relu", ["a2"], ["y"], name="relu2")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [init("w1", (8, 3, 3, 3)), init("b1", (8,)), init("w2", (8, 8, 3, 3)), init("b2", (8,))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    onnx.save(_cnn(), str(tmp_path / "m.onnx"))
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        np.savez(calib / f"s{i}.npz", x=rng.standard_normal((1, 3, 12, 12)).astype(np.float32))
    return tmp_path


def _run(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_quantize_writes_model_and_report(workdir: Path) -> None:
    out, rep = workdir / "q.onnx", workdir / "r.json"
    result = _run("quantize", str(workdir / "m.onnx"), "-o", str(out), "--calibration", str(workdir / "calib"),
                  "--report", str(rep), "--check-fusion", "--no-speed-check")
    assert result.exit_code == 0, result.output
    assert "integer kernel" in result.output and "unfused Q/DQ" in result.output
    data = json.loads(rep.read_text())
    assert data["fusion"]["unfused"] == 0 and data["fusion"]["fused"]["QLinearConv"] == 2
    assert data["calibration"]["samples"] + data["calibration"]["held_out"] == 8
    x = np.random.default_rng(2).standard_normal((1, 3, 12, 12)).astype(np.float32)
    expected = run_model(_cnn(), {"x": x})["y"]
    actual = run_model(onnx.load(str(out)), {"x": x})["y"]
    # Tolerance of int8 with ranges from 7 samples: a new input may clip at the range's edge.
    cosine = float(expected.ravel() @ actual.ravel() / np.linalg.norm(expected) / np.linalg.norm(actual))
    assert cosine > 0.995
    assert np.abs(expected - actual).mean() < 0.02 * np.abs(expected).max()


def _with_fake_quant(model: onnx.ModelProto) -> onnx.ModelProto:
    """A Softmax and then a Q->DQ round trip (fake quantization) before the output: nothing fuses it."""
    g = model.graph
    g.node[-1].output[0] = "pre"
    g.node.extend([helper.make_node("Softmax", ["pre"], ["soft"], axis=1),
                   helper.make_node("QuantizeLinear", ["soft", "fq_s", "fq_z"], ["soft_q"]),
                   helper.make_node("DequantizeLinear", ["soft_q", "fq_s", "fq_z"], ["y"])])
    g.initializer.extend([numpy_helper.from_array(np.array(1 / 255, np.float32), "fq_s"),
                          numpy_helper.from_array(np.array(0, np.uint8), "fq_z")])
    return model


def test_check_fusion_fails_when_qdq_stays_unfused(workdir: Path) -> None:
    onnx.save(_with_fake_quant(_cnn()), str(workdir / "fq.onnx"))
    out, rep = workdir / "q.onnx", workdir / "r.json"
    args = ["quantize", str(workdir / "fq.onnx"), "-o", str(out), "--calibration", str(workdir / "calib"),
            "--no-speed-check"]
    result = CliRunner().invoke(cli, [*args, "--check-fusion", "--report", str(rep)])
    fusion = json.loads(rep.read_text())["fusion"]
    assert fusion["unfused"] == 2 and fusion["unfused_quantize"] == 1 and fusion["unfused_dequantize"] == 1
    assert fusion["fused"]["QLinearConv"] == 2  # graphopt's own units all fused
    assert result.exit_code == 2
    assert "left 2 Q/DQ node(s) unfused" in result.output
    assert not out.exists()
    # Without --check-fusion the same run succeeds and says what stayed unfused.
    ok = CliRunner().invoke(cli, args)
    assert ok.exit_code == 0 and "unfused" in ok.output and out.exists()


def test_int8_activations_place_only_units_that_fuse(workdir: Path) -> None:
    rep = workdir / "r.json"
    result = CliRunner().invoke(cli, ["quantize", str(workdir / "m.onnx"), "-o", str(workdir / "q.onnx"),
                                      "--calibration", str(workdir / "calib"), "--activation-type", "int8",
                                      "--check-fusion", "--no-speed-check", "--report", str(rep)])
    assert result.exit_code == 0, result.output
    data = json.loads(rep.read_text())
    assert data["fusion"]["unfused"] == 0 and data["fusion"]["fused"] == {"QLinearConv": 2}
    assert data["tensors"]["x"]["type"] == "int8"
    x = np.random.default_rng(5).standard_normal((1, 3, 12, 12)).astype(np.float32)
    expected = run_model(_cnn(), {"x": x})["y"]
    actual = run_model(onnx.load(str(workdir / "q.onnx")), {"x": x})["y"]
    assert np.abs(expected - actual).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("args, message", [
    (["--no-speed-check"], "needs calibration data"),
    (["--calibration", "missing_dir"], "does not exist"),
    (["--calibration", "no_such_module_xyz:fn"], "no_such_module_xyz"),
    (["--calibration", "CALIB", "--synthetic"], "contradict"),
    (["--calibration", "CALIB", "--target", "cuda"], "nothing to quantize for target 'cuda'"),
    (["--calibration", "CALIB", "--report", "no/such/dir/r.json"], "does not exist"),
    (["--calibration", "CALIB", "--metric", "nomod_xyz:metric", "--max-drop", "0.1"], "nomod_xyz"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(workdir: Path, args: list[str], message: str) -> None:
    out = workdir / "q.onnx"
    args = [str(workdir / "calib") if a == "CALIB" else a for a in args]
    result = CliRunner().invoke(cli, ["quantize", str(workdir / "m.onnx"), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("graphopt: error")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_output_equal_to_input_is_refused(workdir: Path) -> None:
    model = workdir / "m.onnx"
    before = model.read_bytes()
    result = CliRunner().invoke(cli, ["quantize", str(model), "-o", str(model), "--synthetic"])
    assert result.exit_code == 2 and "never overwrites its input" in result.output
    assert model.read_bytes() == before


def test_missing_model_and_invalid_model(workdir: Path) -> None:
    result = CliRunner().invoke(cli, ["quantize", str(workdir / "nope.onnx"), "-o", str(workdir / "q.onnx"),
                                      "--synthetic"])
    assert result.exit_code == 2 and "does not exist" in result.output
    bad = workdir / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = CliRunner().invoke(cli, ["quantize", str(bad), "-o", str(workdir / "q.onnx"), "--synthetic"])
    assert result.exit_code == 2 and result.output.startswith("graphopt: error")
    assert not (workdir / "q.onnx").exists()


def test_slower_than_float32_is_said_loudly(workdir: Path) -> None:
    rng = np.random.default_rng(3)
    tiny = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 13)])
    tiny.ir_version = 8
    onnx.save(tiny, str(workdir / "tiny.onnx"))
    result = CliRunner().invoke(cli, ["quantize", str(workdir / "tiny.onnx"), "-o", str(workdir / "t.onnx"),
                                      "--synthetic", "--samples", "6"])
    assert result.exit_code == 0, result.output
    assert "SLOWER THAN FLOAT32" in result.output and "SLOWER than float32" in result.output


def _fixed_batch_reshape(tmp: Path) -> Path:
    """A symbolic batch dim N that a Reshape to [1, 16] only allows at 1."""
    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"], name="mm")],
        "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(np.array([1, 16], np.int64), "shape"),
         numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp / "fixed.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("mode_args", [["--synthetic"], ["--mode", "float16"]])
def test_float_model_that_cannot_run_on_the_samples_is_a_one_line_error(workdir: Path, mode_args: list[str]) -> None:
    model = _fixed_batch_reshape(workdir)
    out = workdir / "q.onnx"
    result = CliRunner().invoke(cli, ["quantize", str(model), "-o", str(out), "--dim", "N=2", "--no-speed-check",
                                      *mode_args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("graphopt: error")]
    assert len(lines) == 1 and "cannot run the float model on the sample inputs" in lines[0] and "--dim" in lines[0]
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert not out.exists()


def test_float16_mode_summary_shows_the_accuracy_check(workdir: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "gain"], ["t"]), helper.make_node("Add", ["t", "t"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(np.array(50000.0, np.float32), "gain")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(workdir / "big.onnx"))
    # float32 inputs and outputs: onnxruntime's CPU provider computes this chain in float32, no overflow
    result = CliRunner().invoke(cli, ["quantize", str(workdir / "big.onnx"), "-o", str(workdir / "h.onnx"),
                                      "--mode", "float16", "--no-speed-check"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "cosine" in result.output
    x = np.random.default_rng(6).standard_normal((4, 16)).astype(np.float32)
    expected = run_model(model, {"x": x})["y"]
    actual = run_model(onnx.load(str(workdir / "h.onnx")), {"x": x})["y"]
    assert np.isfinite(actual).all() and np.abs(expected - actual).max() < 1e-2 * np.abs(expected).max()
