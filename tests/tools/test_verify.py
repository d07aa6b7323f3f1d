"""``graphopt verify`` and ``graphopt.runtime.verify_models``: pass, fail, per-layer, inputs, dims."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import graphopt
from graphopt.cli import cli
from graphopt.errors import GraphoptError
from graphopt.runtime import verify_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "fixtures", "examples", "tiny_cnn.onnx")

# A chain with named nodes: the per-layer walk must name "bias1" when b1 is altered.
CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
chain (float[N, 4] x) => (float[N, 3] y)
<float[4, 4] w1 = {0.5, -0.25, 0.1, 0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8, 0.9, 0.1, -0.2, 0.3, 0.4, 0.5},
 float[4] b1 = {0.1, 0.2, 0.3, 0.4},
 float[4, 3] w2 = {0.1, 0.2, 0.3, -0.4, 0.5, 0.6, 0.7, 0.8, -0.9, 0.1, 0.2, 0.3}>
{
    h1 = MatMul(x, w1)
    a1 = Add(h1, b1)
    r1 = Relu(a1)
    h2 = MatMul(r1, w2)
    y = Sigmoid(h2)
}
"""
CHAIN_NODE_NAMES = ["matmul1", "bias1", "relu1", "matmul2", "sigmoid"]


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def _chain(names: list[str] = CHAIN_NODE_NAMES) -> onnx.ModelProto:
    model = onnx.parser.parse_model(CHAIN)
    for node, name in zip(model.graph.node, names):
        node.name = name
    return model


def _with_initializer_delta(model: onnx.ModelProto, name: str, delta: float,
                            index: int = 0) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for t in changed.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            arr.flat[index] += delta
            t.CopyFrom(numpy_helper.from_array(arr, name))
            return changed
    raise AssertionError(f"no initializer {name}")


@pytest.fixture(scope="module")
def optimized_example(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("verify") / "tiny_cnn.opt.onnx")
    graphopt.optimize(EXAMPLE, output=out)
    return out


def test_verify_passes_on_optimized_copy(tmp_path, optimized_example):
    report_path = str(tmp_path / "v.json")
    code, out, err = _run("verify", EXAMPLE, optimized_example, "--samples", "2", "--dim", "batch=2",
                          "--json", report_path)
    assert code == 0, err
    assert "logits" in out and "pass" in out and "PASS" in out
    data = _load(report_path)
    assert data["ok"] is True and data["samples"] == 2 and data["dims"] == {"batch": 2}
    [logits] = data["outputs"]
    assert logits["name"] == "logits" and logits["ok"] is True
    assert logits["max_abs"] <= 1e-5 and logits["cosine"] > 0.99999 and logits["top1"] == 1.0


def test_verify_fails_on_altered_weight_and_names_the_output(tmp_path, optimized_example):
    altered = _save(_with_initializer_delta(onnx.load(optimized_example), "fc.bias", 0.5),
                    tmp_path / "altered.onnx")
    report_path = str(tmp_path / "v.json")
    code, out, _ = _run("verify", EXAMPLE, altered, "--json", report_path)
    assert code == 1
    assert "FAIL" in out and "logits" in out
    [logits] = _load(report_path)["outputs"]
    assert logits["ok"] is False
    # Only the bias of class 0 moved by 0.5, so that is exactly the largest error.
    assert logits["max_abs"] == pytest.approx(0.5, abs=1e-5)


def test_only_the_changed_output_fails(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    two (float[2, 4] x) => (float[2, 3] y1, float[2, 4] y2)
    <float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[4] b = {0.5, 0.5, 0.5, 0.5}>
    { y1 = MatMul(x, w)  y2 = Add(x, b) }
    """
    model = onnx.parser.parse_model(text)
    original = _save(model, tmp_path / "a.onnx")
    altered = _save(_with_initializer_delta(model, "b", 1.0, index=2), tmp_path / "b.onnx")
    report = verify_models(original, altered)
    by_name = {o.name: o for o in report.outputs}
    assert not report.ok
    assert by_name["y1"].ok and by_name["y1"].max_abs == 0.0
    assert not by_name["y2"].ok and by_name["y2"].max_abs == pytest.approx(1.0)
    assert [o.name for o in report.failures()] == ["y2"]
    code, out, _ = _run("verify", original, altered)
    assert code == 1 and "1 of 2 output(s) differ: y2" in out


def test_per_layer_names_the_first_diverging_node(tmp_path):
    model = _chain()
    original = _save(model, tmp_path / "a.onnx")
    altered = _save(_with_initializer_delta(model, "b1", 2.0, index=1), tmp_path / "b.onnx")
    report_path = str(tmp_path / "v.json")
    code, out, _ = _run("verify", original, altered, "--per-layer", "--dim", "N=3", "--json", report_path)
    assert code == 1
    assert "first divergence at Add node 'bias1', tensor 'a1'" in out
    per_layer = _load(report_path)["per_layer"]
    # The parsed model has no value_info: shape inference typed every intermediate.
    assert per_layer["skipped_untyped"] == 0
    assert [layer["tensor"] for layer in per_layer["layers"]] == ["h1", "a1", "r1", "h2", "y"]
    assert [layer["ok"] for layer in per_layer["layers"]][:2] == [True, False]
    assert per_layer["first_divergence"]["node"] == "bias1"
    assert per_layer["first_divergence"]["max_abs"] == pytest.approx(2.0)


def test_per_layer_reports_no_divergence_on_equal_models(tmp_path):
    path = _save(_chain(), tmp_path / "a.onnx")
    report = verify_models(path, path, per_layer=True, samples=2)
    assert report.ok and report.first_divergence is None
    assert report.layers is not None and len(report.layers) == 5
    assert all(layer.max_abs == 0.0 for layer in report.layers)


def test_mismatched_signatures_exit_2_with_one_line(tmp_path):
    a = _save(_chain(), tmp_path / "a.onnx")
    renamed = _chain()
    renamed.graph.output[0].name = "z"
    renamed.graph.node[-1].output[0] = "z"
    b = _save(renamed, tmp_path / "b.onnx")
    code, out, err = _run("verify", a, b)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "outputs differ" in err
    assert "only the original has output(s) y" in err and "only the optimized model has output(s) z" in err


def test_missing_model_file_exits_2(tmp_path):
    a = _save(_chain(), tmp_path / "a.onnx")
    code, _, err = _run("verify", a, str(tmp_path / "nope.onnx"))
    assert code == 2 and "nope.onnx" in err and "does not exist" in err


def test_npz_inputs_are_used(tmp_path):
    # Relu and Abs agree on non-negative inputs only: generated (normal) inputs tell them apart,
    # the file's positive inputs do not.
    template = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) {{ y = {op}(x) }}
    """
    relu = _save(onnx.parser.parse_model(template.format(op="Relu")), tmp_path / "relu.onnx")
    absolute = _save(onnx.parser.parse_model(template.format(op="Abs")), tmp_path / "abs.onnx")
    feeds = str(tmp_path / "in.npz")
    np.savez(feeds, x=np.arange(1, 7, dtype=np.float32).reshape(2, 3))
    assert _run("verify", relu, absolute, "--inputs", feeds)[0] == 0
    assert _run("verify", relu, absolute)[0] == 1


def test_npz_inputs_are_checked(tmp_path):
    path = _save(_chain(), tmp_path / "a.onnx")
    wrong_dtype = str(tmp_path / "d.npz")
    np.savez(wrong_dtype, x=np.ones((2, 4), dtype=np.float64))
    code, _, err = _run("verify", path, path, "--inputs", wrong_dtype)
    assert code == 2 and "input 'x' is float64" in err
    wrong_name = str(tmp_path / "n.npz")
    np.savez(wrong_name, X=np.ones((2, 4), dtype=np.float32))
    code, _, err = _run("verify", path, path, "--inputs", wrong_name)
    assert code == 2 and "'X' is not an input" in err
    wrong_size = str(tmp_path / "s.npz")
    np.savez(wrong_size, x=np.ones((2, 5), dtype=np.float32))
    code, _, err = _run("verify", path, path, "--inputs", wrong_size)
    assert code == 2 and "axis 1" in err
    not_npz = tmp_path / "x.npz"
    not_npz.write_text("not an archive")
    code, _, err = _run("verify", path, path, "--inputs", str(not_npz))
    assert code == 2 and "not a readable .npz" in err


def test_symbolic_dims_are_bound(tmp_path):
    # Summing over the batch axis equals taking the first row only when the batch is 1.
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, 3] x) => (float[1, 3] y) {{ {body} }}
    """
    summed = _save(onnx.parser.parse_model(text.format(
        body="axes = Constant<value = int64[1] {0}>()  y = ReduceSum<keepdims = 1>(x, axes)")),
        tmp_path / "sum.onnx")
    first_row = _save(onnx.parser.parse_model(text.format(
        body="s = Constant<value = int64[1] {0}>()  e = Constant<value = int64[1] {1}>()  "
             "y = Slice(x, s, e)")),
        tmp_path / "first.onnx")
    assert _run("verify", summed, first_row)[0] == 0  # symbolic dims default to 1
    assert _run("verify", summed, first_row, "--dim", "batch=1")[0] == 0
    assert _run("verify", summed, first_row, "--dim", "batch=3")[0] == 1
    code, _, err = _run("verify", summed, first_row, "--dim", "bach=3")
    assert code == 2 and "no symbolic input dim" in err and "batch" in err
    code, _, err = _run("verify", summed, first_row, "--dim", "batch")
    assert code == 2 and "NAME=SIZE" in err


def test_top1_agreement_is_counted_per_row(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4, 3] x) => (float[4, 3] y, float[4, 1] z)
    <float[3] s = {1, 1, 1}, float[1] t = {1}>
    { y = Mul(x, s)  z = ReduceMax<keepdims = 1>(x) }
    """
    model = onnx.parser.parse_model(text)
    a = _save(model, tmp_path / "a.onnx")
    # Scaling column 0 by -1 changes which column wins in some rows only.
    b = _save(_with_initializer_delta(model, "s", -2.0, index=0), tmp_path / "b.onnx")
    x = np.array([[5, 1, 0], [0, 3, 1], [4, -2, 6], [-1, -3, -2]], dtype=np.float32)
    report = verify_models(a, b, feeds={"x": x})
    y = next(o for o in report.outputs if o.name == "y")
    z = next(o for o in report.outputs if o.name == "z")
    # Rows: argmax 0 -> 1 (changed), 1 -> 1, 2 -> 2, 0 -> 0 (-1 becomes 1): 3 of 4 agree.
    assert y.top1 == pytest.approx(0.75)
    assert z.top1 is None  # last axis of size 1: no argmax to compare


def test_level_all_and_quiet(tmp_path, optimized_example):
    code, out, err = _run("verify", EXAMPLE, optimized_example, "--level", "all", "-q")
    assert code == 0 and out == "", err


def test_library_rejects_bad_arguments(tmp_path):
    path = _save(_chain(), tmp_path / "a.onnx")
    with pytest.raises(GraphoptError, match="samples"):
        verify_models(path, path, samples=0)
    with pytest.raises(GraphoptError, match="missing"):
        verify_models(path, path, feeds={})


def test_model_onnxruntime_refuses_exits_2_with_its_reason(tmp_path):
    good = _save(_chain(), tmp_path / "a.onnx")
    too_new = _chain()
    too_new.ir_version = 99
    bad = _save(too_new, tmp_path / "b.onnx")
    code, _, err = _run("verify", good, bad)
    assert code == 2 and err.count("\n") == 1
    assert "onnxruntime cannot load" in err and "b.onnx" in err and "IR version" in err
    assert ".cc:" not in err  # no C++ source location in the message
