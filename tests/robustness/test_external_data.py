"""External data is untrusted input: missing, short, or pointing outside the model's folder."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.parser
import pytest
from _robust import assert_optimizes_correctly, assert_user_error, tree

from graphopt.runtime import run_model


def _model_with_external_weight(folder, location: str, *, offset: int = 0, length: int | None = None,
                                write_data: bool = True) -> str:
    """``y = MatMul(x, w)`` with w (64x64 float) stored externally at ``location``."""
    weight = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 64] x) => (float[2, 64] y) { t = Identity(x)  y = MatMul(t, w) }""")
    tensor = onnx.numpy_helper.from_array(weight, "w")
    raw = tensor.raw_data
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(len(raw) if length is None else length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    proto.graph.initializer.append(tensor)
    if write_data:
        target = location if os.path.isabs(location) else os.path.join(folder, location)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(b"\0" * offset + raw)
    path = os.path.join(folder, "model.onnx")
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


def test_valid_external_data_is_read_and_written_next_to_the_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = _model_with_external_weight(str(src), "weights/w.bin", offset=128)
    dst = tmp_path / "dst"
    dst.mkdir()
    out = str(dst / "o.onnx")
    before = tree(str(src))
    optimized = assert_optimizes_correctly(path, out)
    assert tree(str(src)) == before, "the input folder must not change"
    assert sorted(os.listdir(dst)) == ["o.onnx", "o.onnx.data"]
    assert [n.op_type for n in optimized.graph.node] == ["MatMul"]
    x = np.ones((2, 64), np.float32)
    ref = x @ (np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096)
    np.testing.assert_allclose(run_model(onnx.load(out), {"x": x})["y"], ref, rtol=1e-6)


def test_missing_external_data(tmp_path):
    path = _model_with_external_weight(str(tmp_path), "w.bin", write_data=False)
    assert_user_error(path, "missing")


def test_external_data_too_short(tmp_path):
    path = _model_with_external_weight(str(tmp_path), "w.bin")
    with open(tmp_path / "w.bin", "r+b") as f:
        f.truncate(1000)
    assert_user_error(path, "too short")


def test_external_data_offset_past_the_end(tmp_path):
    path = _model_with_external_weight(str(tmp_path), "w.bin", offset=0)
    proto = onnx.load(path, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = str(10**12)
    onnx.save(proto, path)
    assert_user_error(path, "too short")


@pytest.mark.parametrize("field,value", [("offset", "-8"), ("length", "lots"), ("length", "12")])
def test_external_data_bad_offset_or_length(tmp_path, field, value):
    path = _model_with_external_weight(str(tmp_path), "w.bin")
    proto = onnx.load(path, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == field:
            entry.value = value
    onnx.save(proto, path)
    assert_user_error(path, "external data")


def test_external_data_absolute_path(tmp_path):
    secret = tmp_path / "elsewhere" / "w.bin"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = _model_with_external_weight(str(model_dir), str(secret))
    before = secret.read_bytes()
    assert_user_error(path, "absolute path")
    assert secret.read_bytes() == before


def test_external_data_climbing_out_with_dotdot(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = _model_with_external_weight(str(model_dir), "../outside/w.bin")
    assert os.path.exists(tmp_path / "outside" / "w.bin")
    assert_user_error(path, "'..'")


def test_external_data_symlink_leaving_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    real = _model_with_external_weight(str(outside), "w.bin")
    os.remove(real)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    os.symlink(outside / "w.bin", model_dir / "w.bin")
    path = _model_with_external_weight(str(model_dir), "w.bin", write_data=False)
    assert_user_error(path, "outside the model's folder")


def test_external_data_symlinked_folder_leaving_the_folder(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    _model_with_external_weight(str(outside / "sub"), "w.bin")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    os.symlink(outside / "sub", model_dir / "data")
    path = _model_with_external_weight(str(model_dir), "data/w.bin", write_data=False)
    assert_user_error(path, "outside the model's folder")


def test_external_data_location_is_a_folder(tmp_path):
    (tmp_path / "w.bin").mkdir()
    path = _model_with_external_weight(str(tmp_path), "w.bin", write_data=False)
    assert_user_error(path, "external data")


def test_output_data_file_never_lands_outside_the_output_folder(tmp_path):
    """The written location is always ``<output name>.data`` next to the output, whatever the input used."""
    src = tmp_path / "src"
    src.mkdir()
    path = _model_with_external_weight(str(src), "nested/deeper/w.bin")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    everything = tree(str(tmp_path))
    assert_optimizes_correctly(path, str(out_dir / "m.onnx"))
    new = sorted(set(tree(str(tmp_path))) - set(everything))
    assert new == [str(out_dir / "m.onnx"), str(out_dir / "m.onnx.data")]
    proto = onnx.load(str(out_dir / "m.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"m.onnx.data"}
