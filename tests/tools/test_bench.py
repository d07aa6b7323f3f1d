"""``graphopt bench`` and ``graphopt.runtime.bench_models``: side by side, JSON, errors, energy."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import graphopt
from graphopt import ir
from graphopt.cli import cli
from graphopt.errors import GraphoptError
from graphopt.runtime import bench_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "fixtures", "examples", "tiny_cnn.onnx")
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()

SMALL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 4] x) => (float[batch, 3] y)
<float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}>
{ y = MatMul(x, w) }
"""


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[str, str]:
    out = str(tmp_path_factory.mktemp("bench") / "tiny_cnn.opt.onnx")
    graphopt.optimize(EXAMPLE, output=out)
    return EXAMPLE, out


def test_two_models_side_by_side_with_ratios_and_json(tmp_path, two_models):
    first, second = two_models
    report = str(tmp_path / "bench.json")
    code, out, err = _run("bench", first, second, "--runs", "7", "--warmup", "1", "--json", report)
    assert code == 0, err
    assert "tiny_cnn.onnx" in out and "tiny_cnn.opt.onnx" in out
    assert "vs tiny_cnn.onnx" in out  # the ratio column
    for row in ("latency p50", "latency p90", "latency p99", "throughput", "session creation",
                "peak memory", "file size"):
        assert row in out
    with open(report) as f:
        data = json.load(f)
    assert data["schema"] == "graphopt.bench/1"
    assert data["settings"]["runs"] == 7 and data["settings"]["interleaved"] is True
    a, b = data["models"]
    for entry in (a, b):
        assert set(entry["latency_ms"]) == {"p50", "p90", "p99", "mean", "min", "max"}
        lat = entry["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert entry["runs"] == 7
        assert entry["throughput_per_s"] == pytest.approx(1e3 / lat["mean"], rel=1e-6)
        assert entry["session_ms"] > 0
        assert entry["peak_memory_bytes"] is None or entry["peak_memory_bytes"] >= 0
        assert set(entry["ratios"]) == {"latency_p50", "latency_p90", "latency_p99", "latency_mean",
                                        "throughput", "session", "peak_memory", "file_size"}
    assert a["ratios"]["latency_p50"] == 1.0 and a["ratios"]["file_size"] == 1.0
    assert a["file_bytes"] == os.path.getsize(first) and b["file_bytes"] == os.path.getsize(second)
    assert b["ratios"]["file_size"] == pytest.approx(b["file_bytes"] / a["file_bytes"])
    assert b["ratios"]["latency_p50"] == pytest.approx(b["latency_ms"]["p50"] / a["latency_ms"]["p50"])
    if sys.platform.startswith("linux"):
        assert a["peak_memory_bytes"] > 0 and "VmHWM" in a["memory_method"]


def test_library_results_and_interleaving(two_models):
    results = bench_models(list(two_models), runs=5, warmup=0, memory=False)
    assert [r.path for r in results] == list(two_models)
    for r in results:
        assert len(r.latencies) == 5 and all(t > 0 for t in r.latencies)
        assert r.p50 == pytest.approx(float(np.median(r.latencies)))
        assert r.peak_memory_bytes is None and r.memory_method == "not measured"


def test_external_data_counts_in_file_size(tmp_path):
    path = str(tmp_path / "m.onnx")
    ir.save(ir.load(onnx.parser.parse_model(SMALL)), path, external_data=True, size_threshold=0)
    assert os.path.exists(path + ".data")
    [result] = bench_models([path], runs=2, warmup=0, memory=False, dims={"batch": 2})
    assert result.file_bytes == os.path.getsize(path) + os.path.getsize(path + ".data")


def test_bad_path_exits_2_with_one_line(tmp_path, two_models):
    missing = str(tmp_path / "missing.onnx")
    code, out, err = _run("bench", two_models[0], missing, "--runs", "1", "--no-memory")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "missing.onnx" in err and "does not exist" in err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    code, _, err = _run("bench", str(garbage), "--runs", "1", "--no-memory")
    assert code == 2 and "garbage.onnx" in err


def test_inputs_file_and_dims(tmp_path):
    path = str(tmp_path / "m.onnx")
    onnx.save(onnx.parser.parse_model(SMALL), path)
    feeds = str(tmp_path / "in.npz")
    np.savez(feeds, x=np.ones((3, 4), np.float32))
    assert _run("bench", path, "--runs", "2", "--no-memory", "--inputs", feeds)[0] == 0
    np.savez(feeds, y=np.ones((3, 4), np.float32))
    code, _, err = _run("bench", path, "--runs", "2", "--no-memory", "--inputs", feeds)
    assert code == 2 and "'y' is not an input" in err
    code, _, err = _run("bench", path, "--runs", "2", "--no-memory", "--dim", "seq=4")
    assert code == 2 and "no symbolic input dim" in err


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_requested_without_cuda_exits_2(two_models):
    code, _, err = _run("bench", two_models[0], "--provider", "cuda", "--runs", "1", "--no-memory")
    assert code == 2 and "CUDA execution provider is not available" in err and "onnxruntime-gpu" in err


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_bench_runs(two_models):
    [result] = bench_models([two_models[0]], provider="cuda", runs=3, warmup=1, memory=False)
    assert result.provider == "cuda" and len(result.latencies) == 3


def test_energy_without_codecarbon_exits_2(monkeypatch, two_models):
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # makes "import codecarbon" fail
    code, out, err = _run("bench", two_models[0], "--energy", "--runs", "1", "--no-memory")
    assert code == 2 and out == ""
    assert 'pip install "graphopt[energy]"' in err


def _fake_codecarbon(cpu_mode: str, kwh: float, kg: float) -> types.ModuleType:
    """A stand-in for codecarbon's tracker API (start/stop, final data, tracked hardware)."""

    class CPU:
        _mode = cpu_mode

    class RAM:
        pass

    class OfflineEmissionsTracker:
        instances: list = []

        def __init__(self, **options) -> None:
            self.options = options
            self._hardware = [CPU(), RAM()]
            OfflineEmissionsTracker.instances.append(self)

        def start(self) -> None:
            self.started = True

        def stop(self) -> float:
            self.final_emissions_data = types.SimpleNamespace(energy_consumed=kwh)
            return kg

    module = types.ModuleType("codecarbon")
    module.OfflineEmissionsTracker = OfflineEmissionsTracker
    return module


def test_energy_is_per_1000_inferences_and_says_estimate(monkeypatch, two_models):
    fake = _fake_codecarbon("cpu_load", kwh=0.002, kg=0.001)
    monkeypatch.setitem(sys.modules, "codecarbon", fake)
    [result] = bench_models([two_models[0]], runs=1, warmup=0, memory=False, energy=True,
                            energy_seconds=0.05, energy_country="FRA")
    e = result.energy
    assert e is not None and e.inferences >= 1
    assert e.kwh_per_1000 == pytest.approx(0.002 / e.inferences * 1000)
    assert e.co2_kg_per_1000 == pytest.approx(0.001 / e.inferences * 1000)
    assert e.measured is False and "estimated from TDP" in e.method and e.country == "FRA"
    tracker = fake.OfflineEmissionsTracker.instances[-1]
    assert tracker.options["country_iso_code"] == "FRA" and tracker.options["save_to_file"] is False


def test_energy_cli_says_measured_with_rapl(monkeypatch, two_models):
    monkeypatch.setitem(sys.modules, "codecarbon", _fake_codecarbon("intel_rapl", kwh=0.001, kg=0.0005))
    code, out, err = _run("bench", two_models[0], "--energy", "--energy-seconds", "1", "--runs", "1",
                          "--no-memory")
    assert code == 0, err
    assert "energy / 1000 inf." in out and "CO2 / 1000 inf." in out
    assert "MEASURED" in out and "RAPL" in out


def test_library_argument_errors(two_models):
    with pytest.raises(GraphoptError, match="no model"):
        bench_models([])
    with pytest.raises(GraphoptError, match="runs"):
        bench_models([two_models[0]], runs=0)
