"""``graphopt run OUTDIR --inputs FILE.npz``: outputs, comparison with the original, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from partition_runtime_helpers import mlp_model, write_partitions

from graphopt.cli import cli
from graphopt.runtime import run_model

STAGES = [("stage0", "stage", ["x"], ["h0"]), ("stage1", "stage", ["h0"], ["y"])]


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    model = mlp_model(layers=2)
    write_partitions(model, tmp_path / "parts", STAGES)
    onnx.save(model, tmp_path / "model.onnx")
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    return tmp_path


def _run(*args: str):
    return CliRunner().invoke(cli, ["run", *args])


def test_run_writes_outputs_and_matches_the_original_bit_exactly(workdir: Path) -> None:
    inputs_before = (workdir / "in.npz").read_bytes()
    result = _run(str(workdir / "parts"), "--inputs", str(workdir / "in.npz"),
                  "--output", str(workdir / "out.npz"), "--compare", str(workdir / "model.onnx"))
    assert result.exit_code == 0, result.output
    assert "2 partitions, local backend" in result.output
    assert "bit-exact" in result.output and "PASS" in result.output
    with np.load(workdir / "in.npz") as feeds, np.load(workdir / "out.npz") as outs:
        assert list(outs.files) == ["y"]
        expected = run_model(onnx.load(workdir / "model.onnx"), {"x": feeds["x"]})["y"]
        np.testing.assert_array_equal(outs["y"], expected)
    assert (workdir / "in.npz").read_bytes() == inputs_before
    assert sorted(p.name for p in workdir.iterdir()) == ["in.npz", "model.onnx", "out.npz", "parts"]


def test_micro_batches_and_quiet(workdir: Path) -> None:
    result = _run(str(workdir / "parts"), "--inputs", str(workdir / "in.npz"), "--micro-batches", "3",
                  "--compare", str(workdir / "model.onnx"), "-q")
    assert result.exit_code == 0, result.output
    assert result.output == ""


def test_compare_against_a_different_model_exits_1(workdir: Path) -> None:
    onnx.save(mlp_model(layers=2, seed=7), workdir / "other.onnx")
    result = _run(str(workdir / "parts"), "--inputs", str(workdir / "in.npz"),
                  "--compare", str(workdir / "other.onnx"))
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "max abs error" in result.output


@pytest.mark.parametrize("args, message", [
    (["{d}/nowhere", "--inputs", "{d}/in.npz"], "no partition manifest"),
    (["{d}/parts", "--inputs", "{d}/missing.npz"], "inputs file"),
    (["{d}/parts", "--inputs", "{d}/bad.npz"], "'z' is not an input"),
    (["{d}/parts", "--inputs", "{d}/in.npz", "--micro-batches", "7"], "at least 7 on axis 0"),
    (["{d}/parts", "--inputs", "{d}/in.npz", "--device", "stage1"], "is not PARTITION=DEVICE"),
    (["{d}/parts", "--inputs", "{d}/in.npz", "--device", "stage1=npu"], "unknown partition device"),
    (["{d}/parts", "--inputs", "{d}/in.npz", "--compare", "{d}/missing.onnx"], "does not exist"),
    (["{d}/parts", "--inputs", "{d}/in.npz", "--output", "{d}/no/dir/out.npz"], "does not exist"),
], ids=["no-manifest", "no-inputs", "wrong-input-name", "micro-batches", "device-spec",
        "device-name", "compare-missing", "output-folder"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workdir: Path, args: list[str], message: str) -> None:
    np.savez(workdir / "bad.npz", z=np.zeros((6, 16), np.float32))
    before = sorted(p.name for p in workdir.iterdir())
    extra = [] if "--output" in args else ["--output", str(workdir / "out.npz")]
    result = _run(*[a.format(d=workdir) for a in args], *extra)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("graphopt: error:") and message in result.output
    assert result.output.count("\n") == 1
    assert sorted(p.name for p in workdir.iterdir()) == before  # no outputs file, no temp file


def test_compare_with_a_model_of_other_outputs_is_refused(workdir: Path) -> None:
    model = mlp_model(layers=2)
    model.graph.output[0].name = "out"
    model.graph.node[-1].output[0] = "out"
    onnx.save(model, workdir / "renamed.onnx")
    result = _run(str(workdir / "parts"), "--inputs", str(workdir / "in.npz"),
                  "--compare", str(workdir / "renamed.onnx"))
    assert result.exit_code == 2
    assert "has no output 'out' of the original" in result.output
