"""``graphopt prune``: outputs, the report (table and JSON), and one-line errors with exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from _prune_builders import bert, resnet
from click.testing import CliRunner

from graphopt.cli import cli
from graphopt.runtime import run_model


@pytest.fixture
def resnet_file(tmp_path) -> str:
    path = str(tmp_path / "resnet.onnx")
    onnx.save(resnet(width=8, blocks=1, hw=8), path)
    return path


def _run(args: list[str]):
    return CliRunner().invoke(cli, ["prune", *args], catch_exceptions=False)


def test_prune_writes_model_and_json_report(resnet_file: str, tmp_path) -> None:
    out, report = str(tmp_path / "out.onnx"), str(tmp_path / "report.json")
    before = Path(resnet_file).read_bytes()
    result = _run([resnet_file, "-o", out, "--ratio", "0.5", "--json", report])
    assert result.exit_code == 0, result.output
    assert "blocked:" in result.output and "channel groups" in result.output  # table cells wrap
    assert "MACs" in result.output and "layers" in result.output
    assert Path(resnet_file).read_bytes() == before  # the input is never touched
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert run_model(model, {"x": np.ones((1, 3, 8, 8), np.float32)})["y"].shape == (1, 10)
    data = json.loads(Path(report).read_text())
    assert data["schema"] == "graphopt.prune/1" and data["command"] == "prune"
    assert data["summary"] == {"groups": 3, "prunable": 2, "blocked": 1, "pruned": 2, "units_removed": 8}
    blocked = [g for g in data["groups"] if g["blocked"]]
    assert blocked[0]["blocked"] == ["reaches graph output 'y'"] and blocked[0]["removed"] == 0
    assert data["macs"]["after"] < data["macs"]["before"] and data["params"]["after"] < data["params"]["before"]
    assert {tuple(layer["after"]) for layer in data["layers"]} >= {(4, 3, 3, 3), (4, 4, 3, 3)}
    assert data["latency_ms"]["before"] is None


def test_prune_bench_heads_and_unstructured_message(tmp_path) -> None:
    path, out = str(tmp_path / "bert.onnx"), str(tmp_path / "bert.pruned.onnx")
    onnx.save(bert(hidden=32, heads=4, ff=48, seq=5), path)
    result = _run([path, "-o", out, "--ratio", "0.25", "--heads", "0.5", "--bench", "--runs", "3",
                   "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["latency_ms"]["before"] > 0 and data["latency_ms"]["after"] > 0
    assert "latency p50" in result.output
    sparse_out = str(tmp_path / "sparse.onnx")
    result = _run([path, "-o", sparse_out, "--unstructured", "0.8"])
    assert result.exit_code == 0, result.output
    assert "will not run faster" in " ".join(result.output.split())
    assert len(onnx.load(sparse_out).graph.sparse_initializer) > 0


@pytest.mark.parametrize("args,message", [
    (["--ratio", "0.5", "--target-macs", "0.5"], "not both"),
    ([], "say how much to prune"),
    (["--ratio", "1.5"], "ratio must be in [0, 1)"),
    (["--ratio", "0.5", "--reconstruct"], "need calibration data"),
    (["--ratio", "0.5", "--exclude", "("], "not a valid regular expression"),
    (["--ratio", "0.5", "--calibration", "missing.npz", "--reconstruct"], "missing.npz"),
])
def test_bad_options_give_one_line_and_exit_2(resnet_file: str, tmp_path, args: list[str], message: str) -> None:
    out = str(tmp_path / "never.onnx")
    result = CliRunner().invoke(cli, ["prune", resnet_file, "-o", out, *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:") and message in lines[0], result.output
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f != "resnet.onnx"]


def test_bad_model_gives_one_line_and_exit_2(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    out = str(tmp_path / "out.onnx")
    for source in (str(bad), str(tmp_path / "missing.onnx")):
        result = CliRunner().invoke(cli, ["prune", source, "-o", out, "--ratio", "0.5"])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("graphopt: error:") and len(result.output.strip().splitlines()) == 1
        assert not os.path.exists(out)
    result = CliRunner().invoke(cli, ["prune", str(bad), "-o", str(bad), "--ratio", "0.5"])
    assert result.exit_code == 2 and "never overwrites its input" in result.output
