"""``graphopt partition`` on the command line: plan table, output folder, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphopt._partition import parse_size
from graphopt.cli import cli
from graphopt.errors import GraphoptError
from graphopt.runtime import Manifest


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i in range(6):
        inits.append(numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1, f"w{i}"))
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"h{i}"])]
        current = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", 64])], inits)
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def invoke(*args: str):
    # a wide terminal, so that rich does not wrap the table's headers
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


def test_plan_only_prints_the_table_and_throughput(model_path: Path, tmp_path: Path) -> None:
    result = invoke("partition", str(model_path), "--stages", "3", "--plan-only", "--dim", "batch=32",
                    "--json", str(tmp_path / "plan.json"))
    assert result.exit_code == 0, result.output
    out = result.output
    for column in ("partition", "nodes", "weight MB", "peak act MB", "GFLOPs", "device", "MB sent"):
        assert column in out
    assert "stage0" in out and "stage2" in out and "runs/s pipelined" in out
    assert "straight chain cut" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [p["nodes"] for p in plan["plan"]["partitions"]] == [4, 4, 4]  # two layers each
    assert plan["plan"]["dims"] == {"batch": 32}
    assert plan["throughput"]["runs_per_second"] > plan["throughput"]["unsplit_runs_per_second"]
    assert sorted(os.listdir(tmp_path)) == ["chain.onnx", "plan.json"]  # nothing else written


def test_writes_the_folder_with_a_manifest(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    result = invoke("partition", str(model_path), "-o", str(out), "--memory-budget", "40KB", "-q")
    assert result.exit_code == 0 and result.output == ""
    manifest = Manifest.load(out)
    assert manifest.strategy == "memory-budget"
    assert len(manifest.partitions) == 3  # 16 KB of weights per layer, 40 KB budget: two per stage
    assert all(p.weight_bytes + p.peak_activation_bytes <= 40_000 for p in manifest.partitions)


def test_devices_give_one_stage_each(model_path: Path, tmp_path: Path) -> None:
    result = invoke("partition", str(model_path), "-o", str(tmp_path / "p"), "--devices", "cpu,cuda:0")
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(tmp_path / "p")
    assert [p.device for p in manifest.partitions] == ["cpu", "cuda:0"]
    assert [p.resources["num_gpus"] for p in manifest.partitions] == [0.0, 1.0]


@pytest.mark.parametrize("args, message", [
    (("--stages", "0"), "at least 1"),
    (("--stages", "99"), "at most 12"),
    (("--memory-budget", "lots"), "is not a size"),
    (("--memory-budget", "1KB"), "over the memory budget"),
    (("--devices", "tpu:0"), "is not cpu or cuda:K"),
    (("--stages", "2", "--branches"), "choose one strategy"),
    (("--branches",), "no two independent branches"),
    ((), "give --stages K"),
])
def test_bad_input_is_one_line_exit_2_and_no_folder(model_path: Path, tmp_path: Path, args, message) -> None:
    out = tmp_path / "parts"
    result = CliRunner().invoke(cli, ["partition", str(model_path), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:") and message in lines[0]
    assert not out.exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".parts")]


def test_missing_model_and_existing_folder(model_path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["partition", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "p"),
                                      "--stages", "2"])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "x").write_text("")
    result = CliRunner().invoke(cli, ["partition", str(model_path), "-o", str(tmp_path / "p"), "--stages", "2"])
    assert result.exit_code == 2 and "--force" in result.output
    result = invoke("partition", str(model_path), "-o", str(tmp_path / "p"), "--stages", "2", "--force", "-q")
    assert result.exit_code == 0
    assert sorted(os.listdir(tmp_path / "p")) == ["manifest.json", "stage0.onnx", "stage1.onnx"]


def test_parse_size() -> None:
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("512MB") == 512_000_000
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("100") == 100 and parse_size(4096) == 4096
    for bad in ("", "GB", "-1GB", "2 parsecs", "0"):
        with pytest.raises(GraphoptError):
            parse_size(bad)


def test_partition_leaves_no_files_in_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """onnxruntime's symbolic shape inference saved sym_shape_infer_temp.onnx (and external data)
    into the current directory whenever it could not infer every value."""
    light = Path(onnx.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = invoke("partition", str(light), "-o", str(tmp_path / "parts"), "--stages", "2", "-q")
    assert result.exit_code == 0, result.output
    assert os.listdir(cwd) == []
    assert len(Manifest.load(tmp_path / "parts").partitions) == 2
