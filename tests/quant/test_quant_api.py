"""``graphopt.quantize``: report, accuracy budget, SmoothQuant, statistics cache, speed warning, modes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphopt.passes.quant.smoothquant import find_smooth_groups, smooth_quant
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.runtime import run_model


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 13) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def outlier_mlp() -> onnx.ModelProto:
    """mm1 reads an input whose channel 0 is 300x the others: per-tensor uint8 wipes out the rest."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 32)) * 0.3).astype(np.float32)
    w1[0] = 1e-4  # the outlier channel hardly matters to the result
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array((rng.standard_normal((32, 10)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Relu", ["m1"], ["r1"], name="act1"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 10])], inits)


def outlier_feeds(n: int = 20) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    feeds = []
    for _ in range(n):
        x = rng.standard_normal((8, 16)).astype(np.float32)
        x[:, 0] *= 300.0
        feeds.append({"x": x})
    return feeds


def layer_norm_model(outliers: bool = True) -> onnx.ModelProto:
    """x -> LayerNormalization (two channels with a large gamma) -> MatMul."""
    rng = np.random.default_rng(2)
    gamma = np.ones(32, np.float32)
    if outliers:
        gamma[[3, 17]] = 40.0
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.full(32, 0.1, np.float32), "beta"),
             numpy_helper.from_array((rng.standard_normal((32, 24)) * 0.2).astype(np.float32), "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["n", "w"], ["y"], name="proj")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 24])], inits, opset=17)


def _ln_feeds(n: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((1, 6, 32)).astype(np.float32)} for _ in range(n)]


def test_report_fields_and_json(tmp_path: Path) -> None:
    out_path, report_path = tmp_path / "q.onnx", tmp_path / "report.json"
    outcome = graphopt.quantize(outlier_mlp(), out_path, calibration=outlier_feeds(), report=report_path,
                                speed_runs=20)
    assert outcome.model is None and out_path.exists()
    data = json.loads(report_path.read_text())
    assert data == json.loads(json.dumps(outcome.report, default=str))
    assert data["schema"] == "graphopt.quantize/1" and data["mode"] == "static"
    x = data["tensors"]["x"]
    assert set(x) >= {"range", "scale", "zero_point", "type"} and x["type"] == "uint8"
    assert x["range"][1] > 100  # the outlier channel sets the range
    assert data["weights"]["w1"]["axis"] == 1 and data["weights"]["w1"]["channels"] == 32
    units = {u["unit"]: u for u in data["units"]}
    assert units["mm1"]["status"] == "quantized" and isinstance(units["mm1"]["sqnr_db"], float)
    # mm1 -> Relu -> Q: onnxruntime drops the Relu (zero point 0) and writes uint8 (QLinearMatMul).
    assert data["fusion"]["fused"] == {"MatMulIntegerToFloat": 1, "QLinearMatMul": 1}
    assert data["fusion"]["unfused"] == 0
    assert data["calibration"]["held_out"] == 4 and data["calibration"]["samples"] == 16
    assert data["size"]["weights_after"] < data["size"]["weights_before"]
    assert set(data["latency"]) >= {"float_ms", "quantized_ms", "speedup", "slower"}
    assert set(data["accuracy"]) >= {"cosine", "sqnr_db", "top1_agreement", "drop"}
    assert data["fallbacks"] == []
    quantized = onnx.load(str(out_path))
    assert quantized.ir_version <= graphopt.runtime.max_ir_version()
    feed = outlier_feeds(1)[0]
    assert run_model(quantized, feed)["y"].shape == (8, 10)


def test_accuracy_budget_falls_back_the_most_sensitive_unit() -> None:
    plain = graphopt.quantize(outlier_mlp(), calibration=outlier_feeds(), check_speed=False)
    drop = plain.report["accuracy"]["drop"]
    assert drop > 0.01  # the outlier ruins mm1's input
    budget = graphopt.quantize(outlier_mlp(), calibration=outlier_feeds(), max_drop=0.005, check_speed=False)
    rep = budget.report
    assert [f["unit"] for f in rep["fallbacks"]] == ["mm1"]
    reason = rep["fallbacks"][0]["reason"]
    assert "rank 1" in reason and "budget 0.005" in reason
    assert rep["accuracy"]["drop"] <= 0.005 and rep["accuracy"]["met"] is True
    units = {u["unit"]: u for u in rep["units"]}
    assert units["mm1"]["status"] == "fallback" and units["mm2"]["status"] == "quantized"
    # The fallen-back MatMul really runs in float: one integer kernel is left.
    assert rep["fusion"]["fused"] == {"MatMulIntegerToFloat": 1}
    ops = {n.op_type for n in budget.model.graph.node if "mm1" in n.name or n.output[0] == "m1"}
    assert ops == {"MatMul"}


def test_user_metric_drives_the_budget() -> None:
    calls = []

    def agreement(reference: list, candidate: list) -> float:
        calls.append(len(candidate))
        ref = np.concatenate([r["y"].argmax(-1) for r in reference])
        cand = np.concatenate([c["y"].argmax(-1) for c in candidate])
        return float((ref == cand).mean() * 100)

    out = graphopt.quantize(outlier_mlp(), calibration=outlier_feeds(), max_drop=0.0, metric=agreement,
                            check_speed=False)
    assert calls and out.report["accuracy"]["metric"] == "agreement"
    assert out.report["accuracy"]["drop"] <= 0.0


def test_smoothquant_keeps_float_outputs_and_improves_sqnr() -> None:
    proto = layer_norm_model()
    model = ir.load(proto)
    PassManager("infer-shapes", PassContext()).run(model)
    groups = find_smooth_groups(model)
    assert [g.activation.name for g in groups] == ["n"] and groups[0].producer.op_type == "LayerNormalization"
    smoothed = smooth_quant(model, _ln_feeds(), alpha=0.5)
    assert smoothed == ["n"]
    after = ir.to_proto(model)
    gamma = next(numpy_helper.to_array(t) for t in after.graph.initializer
                 if t.name == after.graph.node[0].input[1])
    assert gamma[3] < 40.0  # the outlier moved into the weight
    for feed in _ln_feeds(3):
        np.testing.assert_allclose(run_model(after, feed)["y"], run_model(proto, feed)["y"], rtol=1e-4, atol=1e-4)
    base = graphopt.quantize(proto, calibration=_ln_feeds(), per_channel=True, check_speed=False)
    smooth = graphopt.quantize(proto, calibration=_ln_feeds(), per_channel=True, smoothquant_alpha=0.5,
                               check_speed=False)
    assert smooth.report["smoothquant"] == {"alpha": 0.5, "smoothed": ["n"]}
    assert smooth.report["accuracy"]["sqnr_db"] > base.report["accuracy"]["sqnr_db"] + 3.0


def test_smoothquant_must_not_fire_on_shared_weight_or_graph_output() -> None:
    proto = layer_norm_model()
    proto.graph.output.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, 6, 32]))
    model = ir.load(proto)
    assert find_smooth_groups(model) == []
    proto = layer_norm_model()
    proto.graph.node.append(helper.make_node("Identity", ["gamma"], ["g_out"]))
    proto.graph.output.append(helper.make_tensor_value_info("g_out", TensorProto.FLOAT, [32]))
    assert find_smooth_groups(ir.load(proto)) == []


def test_statistics_cache_is_written_then_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "stats.npz"
    first = graphopt.quantize(outlier_mlp(), calibration=outlier_feeds(), stats_cache=cache, check_speed=False)
    assert cache.exists()
    with caplog.at_level(logging.INFO, logger="graphopt.passes.quant.calibration"):
        second = graphopt.quantize(outlier_mlp(), calibration=outlier_feeds(), stats_cache=cache,
                                   method="percentile", percentile=99.0, check_speed=False)
    assert "read from" in caplog.text
    assert second.report["tensors"]["x"]["range"] != first.report["tensors"]["x"]["range"]  # percentile


def test_tiny_model_is_reported_slower_than_float32() -> None:
    rng = np.random.default_rng(4)
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="tiny")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                   [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")])
    feeds = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(6)]
    out = graphopt.quantize(proto, calibration=feeds, speed_runs=300)
    assert out.slower and out.report["latency"]["speedup"] < 0.98
    assert any("SLOWER THAN FLOAT32" in w for w in out.warnings)


def test_bad_arguments_raise_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(outlier_mlp(), str(path))
    with pytest.raises(GraphoptError, match="needs calibration data"):
        graphopt.quantize(str(path))
    with pytest.raises(GraphoptError, match="never overwrites its input"):
        graphopt.quantize(str(path), str(path), calibration="synthetic")
    with pytest.raises(GraphoptError, match="max_drop"):
        graphopt.quantize(str(path), calibration="synthetic", max_drop=-1)
    with pytest.raises(GraphoptError, match="method"):
        graphopt.quantize(str(path), calibration="synthetic", method="kl")
    with pytest.raises(GraphoptError, match="nothing to quantize for target 'cuda'"):
        graphopt.quantize(str(path), calibration="synthetic", target="cuda")


def test_synthetic_calibration_warns() -> None:
    out = graphopt.quantize(outlier_mlp(), calibration="synthetic", samples=6, check_speed=False)
    assert out.report["calibration"]["synthetic"] is True
    assert any("synthetic" in w for w in out.warnings)


@pytest.mark.parametrize("mode, pass_name", [("dynamic", "quantize-dynamic"), ("float16", "convert-float16")])
def test_other_modes_dispatch_to_their_passes(mode: str, pass_name: str) -> None:
    if not PassRegistry.default(plugins=False).has(pass_name):
        pytest.skip(f"pass {pass_name} is not available")
    rng = np.random.default_rng(5)
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="big")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 128])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
                   [numpy_helper.from_array(rng.standard_normal((128, 64)).astype(np.float32), "w")])
    out = graphopt.quantize(proto, mode=mode, check_speed=False)
    assert pass_name in out.report["pipeline"]
    assert out.report["size"]["weights_after"] < out.report["size"]["weights_before"]
    x = rng.standard_normal((4, 128)).astype(np.float32)
    expected = run_model(proto, {"x": x})["y"]
    actual = run_model(out.model, {"x": x})["y"].astype(np.float32)
    assert np.abs(expected - actual).max() < 0.05 * np.abs(expected).max()


def test_accuracy_budget_on_many_units_ranks_by_noise_added() -> None:
    """26 MatMul units (above the solo-ranking limit): layer 13 reads an outlier channel."""
    rng = np.random.default_rng(6)
    nodes, inits, current = [], [], "x"
    for i in range(26):
        w = (rng.standard_normal((16, 16)) * 0.35).astype(np.float32)
        if i == 12:
            w[:, 0] *= 400.0  # layer 12 writes a huge channel 0 ...
        if i == 13:
            w[0, :] /= 400.0  # ... that layer 13 reads back at the original scale
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"], name=f"layer{i}"))
        current = f"m{i}"
    proto = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                   [helper.make_tensor_value_info(current, TensorProto.FLOAT, [4, 16])], inits)
    feeds = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(15)]
    out = graphopt.quantize(proto, calibration=feeds, max_drop=0.02, check_speed=False)
    rep = out.report
    assert rep["fallbacks"] and "noise-to-signal ratio" in rep["fallbacks"][0]["ranked_by"]
    assert rep["fallbacks"][0]["unit"] == "layer13"
    assert rep["accuracy"]["drop"] <= 0.02
    assert sum(u["status"] == "quantized" for u in rep["units"]) >= 20


def test_float16_overflow_is_reported_not_silent() -> None:
    """Activations beyond ±65504 become inf in float16: the report and a warning must say so.

    (Float16 inputs, so that onnxruntime's CPU provider runs the ops in float16, as a GPU does.)
    """
    proto = _model([helper.make_node("Mul", ["x", "gain"], ["t"], name="gain"),
                    helper.make_node("Add", ["t", "t"], ["y"], name="double")],  # |y| ~ 1e5
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
                   [numpy_helper.from_array(np.array(50000.0, np.float32), "gain")])
    out = graphopt.quantize(proto, mode="float16", keep_io_types=False, check_speed=False)
    assert out.report["accuracy"]["non_finite_outputs"] == 2  # both seeded samples
    assert any("inf/NaN" in w for w in out.warnings)
    small = _model(proto.graph.node, list(proto.graph.input), list(proto.graph.output),
                   [numpy_helper.from_array(np.array(5.0, np.float32), "gain")])
    fine = graphopt.quantize(small, mode="float16", keep_io_types=False, check_speed=False)
    assert fine.report["accuracy"]["non_finite_outputs"] == 0 and fine.report["accuracy"]["cosine_min"] > 0.999
    assert not any("inf/NaN" in w for w in fine.warnings)


def test_mode_that_converts_nothing_says_so() -> None:
    rng = np.random.default_rng(9)
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="small")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                   [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")])
    out = graphopt.quantize(proto, mode="dynamic", check_speed=False)
    assert any("nothing was converted" in w for w in out.warnings)
    assert out.report["accuracy"]["max_abs"] == 0.0  # the float model, unchanged


def test_int4_mode_quantizes_a_matmul_with_bias_add() -> None:
    """The -O2 run before quantizing must not turn MatMul+Add into a Gemm that int4 cannot take."""
    rng = np.random.default_rng(10)
    w = (rng.standard_normal((256, 128)) * 0.1).astype(np.float32)
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["m"], name="proj"),
                    helper.make_node("Add", ["m", "b"], ["y"], name="bias")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 128])],
                   [numpy_helper.from_array(w, "w"),
                    numpy_helper.from_array(rng.standard_normal(128).astype(np.float32), "b")])
    out = graphopt.quantize(proto, mode="int4", check_speed=False)
    assert out.report["ops_after"].get("com.microsoft.MatMulNBits") == 1 and "Gemm" not in out.report["ops_after"]
    assert not any("nothing was converted" in w for w in out.warnings)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    expected = run_model(proto, {"x": x})["y"]
    actual = run_model(out.model, {"x": x})["y"]
    # 4-bit blocks of 32 rows: each output within sum_k |x_k| * s_k / 2 plus int8 activations; 15% of range
    assert np.abs(expected - actual).max() < 0.15 * np.abs(expected).max()
