"""Files that are not (or no longer) ONNX models: one clear line and exit 2, or a correct result."""

from __future__ import annotations

import json
import os
import random
import struct

import numpy as np
import onnx
import onnx.parser
import pytest
from _robust import EXAMPLE, assert_user_error, run_cli, tree

from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

DATA = open(EXAMPLE, "rb").read()


@pytest.mark.parametrize("keep", [1, 2, 16, 64, 100, 1000, len(DATA) // 3, len(DATA) // 2, len(DATA) - 1])
def test_truncated_model(tmp_path, keep):
    path = tmp_path / "cut.onnx"
    path.write_bytes(DATA[:keep])
    assert_user_error(str(path), "onnx")


@pytest.mark.parametrize("name,payload,fragment", [
    ("empty", b"", "is empty"),
    ("zeros", bytes(4096), "not a valid onnx model"),
    ("text", b"this is a README, not a model\n" * 30, "not a valid onnx model"),
    ("png", b"\x89PNG\r\n\x1a\n" + bytes(200), "is a png image"),
    ("jpeg", b"\xff\xd8\xff\xe0" + bytes(200), "is a jpeg image"),
    ("pytorch-zip", b"PK\x03\x04" + bytes(200), "zip archive"),
    ("npy", b"\x93NUMPY\x01\x00" + bytes(200), "numpy"),
    ("gzip", b"\x1f\x8b\x08\x00" + bytes(200), "gzip"),
    ("ort-format", b"\x18\x00\x00\x00ORTM" + bytes(200), ".ort model"),
    ("tflite", b"\x1c\x00\x00\x00TFL3" + bytes(200), "tensorflow lite"),
    ("json", json.dumps({"model": "resnet"}).encode(), "json"),
    ("safetensors", struct.pack("<Q", 2) + b"{}" + bytes(16), "safetensors"),
])
def test_not_an_onnx_file(tmp_path, name, payload, fragment):
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(payload)
    assert_user_error(str(path), fragment)


def test_other_protobuf_message_is_not_a_model(tmp_path):
    """A valid protobuf of another ONNX message (a bare tensor or graph) has no model fields."""
    tensor = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = onnx.load(EXAMPLE).graph
    for name, message in (("tensor", tensor), ("graph", graph)):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(message.SerializeToString())
        assert_user_error(str(path), "onnx")


def test_model_without_opset_import(tmp_path):
    proto = onnx.load(EXAMPLE)
    del proto.opset_import[:]
    path = tmp_path / "noopset.onnx"
    path.write_bytes(proto.SerializeToString())
    assert_user_error(str(path), "opset_import")


def test_invalid_utf8_node_name_is_a_load_error(tmp_path):
    """Regression: a corrupt name came back from protobuf as bytes and crashed the save."""
    proto = onnx.load(EXAMPLE)
    proto.graph.node[3].name = "relu1"
    data = proto.SerializeToString().replace(b"relu1", b"r\x8flu1", 1)
    path = tmp_path / "utf8.onnx"
    path.write_bytes(data)
    assert_user_error(str(path), "not valid UTF-8")


def test_invalid_utf8_value_name_is_a_load_error(tmp_path):
    data = DATA.replace(b"pooled", b"po\xc0led")
    assert data != DATA
    path = tmp_path / "utf8v.onnx"
    path.write_bytes(data)
    assert_user_error(str(path), "not valid UTF-8")


def test_folder_instead_of_file(tmp_path):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    code, _, stderr = run_cli("optimize", str(folder), "-o", str(tmp_path / "o.onnx"))
    # click's own usage error: exit 2, the usage line and one "Error:" line naming the problem
    assert code == 2 and "Traceback" not in stderr and "is a directory" in stderr
    assert not os.path.exists(tmp_path / "o.onnx")


def _corruptions(count: int, seed: int, middle_only: bool) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(DATA)
        lo, hi = (len(data) // 4, 3 * len(data) // 4) if middle_only else (0, len(data))
        for _ in range(rng.choice([1, 2, 4, 8])):
            data[rng.randrange(lo, hi)] = rng.randrange(256)
        out.append(bytes(data))
    return out


def _check_corrupt_model(folder, data: bytes) -> str:
    """Either a clean user error, or an output that computes what the (corrupt) input computes."""
    path = os.path.join(folder, "corrupt.onnx")
    out = os.path.join(folder, "out.onnx")
    for p in (path, out):
        if os.path.exists(p):
            os.remove(p)
    with open(path, "wb") as f:
        f.write(data)
    before = tree(folder)
    code, stdout, stderr = run_cli("optimize", path, "-o", out, "-q")
    assert code in (0, 2), (code, stderr)
    if code == 2:
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
        assert tree(folder) == before, "a refused model must leave no file behind"
        return "refused"
    assert sorted(set(tree(folder)) - set(before)) == [out], "only the output may be written"
    src, dst = onnx.load(path), onnx.load(out)
    assert [i.name for i in dst.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in dst.graph.output] == [o.name for o in src.graph.output]
    try:
        session = make_session(src)
        feeds = random_inputs(session, seed=0)
        expected = run_model(src, feeds)
    except Exception:  # onnxruntime refuses the corrupt input too: nothing to compare against
        return "accepted, not runnable"
    cmp = compare_outputs(expected, run_model(dst, feeds), rtol=1e-5, atol=1e-6, )
    assert cmp.ok, cmp.summary()
    return "accepted"


def test_flipped_bytes_in_the_middle_of_a_model(tmp_path):
    outcomes = [_check_corrupt_model(str(tmp_path), d) for d in _corruptions(12, seed=7, middle_only=True)]
    assert "accepted" in outcomes, outcomes  # weights changed: still a valid model, still optimized


def test_flipped_bytes_anywhere_in_a_model(tmp_path):
    outcomes = [_check_corrupt_model(str(tmp_path), d) for d in _corruptions(60, seed=11, middle_only=False)]
    assert outcomes.count("refused") >= 3 and outcomes.count("accepted") >= 30, outcomes
