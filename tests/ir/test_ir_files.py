"""Files: external data (lazy, safe against hostile locations), atomic saves, load errors."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir
from graphopt.errors import EmitError, ExternalDataError, GraphoptError, ModelLoadError

FLOAT = TensorProto.FLOAT


def _weights_model() -> onnx.ModelProto:
    """y = (x + w) * v, with w and v big enough to go to external data."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    v = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "v")
    small = numpy_helper.from_array(np.array([2.0], np.float32), "small")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["t"]), helper.make_node("Mul", ["t", "v"], ["u"]),
         helper.make_node("Mul", ["u", "small"], ["y"])],
        "weights", [helper.make_tensor_value_info("x", FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y", FLOAT, [64, 64])], initializer=[w, v, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # what the installed onnxruntime reads
    return model


def _run(path_or_proto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(path_or_proto) if isinstance(path_or_proto, (str, os.PathLike)) \
        else path_or_proto.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _save_external(tmp_path, name: str = "model.onnx", proto: onnx.ModelProto | None = None):
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    path = folder / name
    ir.save(ir.load(proto or _weights_model()), path, external_data=True)
    return path


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


# -- external data ---------------------------------------------------------------------------------

def test_external_data_loads_lazily_as_memory_map(tmp_path) -> None:
    proto = _weights_model()
    path = _save_external(tmp_path, proto=proto)
    assert sorted(os.listdir(path.parent)) == ["model.onnx", "model.onnx.data"]
    on_disk = onnx.load(str(path), load_external_data=False)
    external = {t.name for t in on_disk.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"w", "v"}
    model = ir.load(path)
    w = model.graph.initializers["w"].const_value
    assert isinstance(w, ir.ExternalTensor) and w.is_external()
    assert isinstance(model.graph.initializers["small"].const_value, ir.ProtoTensor)
    array = w.numpy()
    assert isinstance(array, np.memmap)
    assert not array.flags.writeable
    np.testing.assert_array_equal(array, numpy_helper.to_array(proto.graph.initializer[0]))
    assert w.nbytes == 64 * 64 * 4
    assert w.digest() == ir.ArrayTensor(numpy_helper.to_array(proto.graph.initializer[0])).digest()
    x = np.ones((64, 64), np.float32)
    np.testing.assert_array_equal(_run(path, x), _run(proto, x))


def test_external_data_saved_again_elsewhere_is_copied(tmp_path) -> None:
    proto = _weights_model()
    src = _save_external(tmp_path, proto=proto)
    model = ir.load(src)
    dst_dir = tmp_path / "dst"
    dst_dir.mkdir()
    dst = dst_dir / "copy.onnx"
    ir.save(model, dst)  # external by default: the input had external data
    assert sorted(os.listdir(dst_dir)) == ["copy.onnx", "copy.onnx.data"]
    # The copy must not depend on the source folder.
    for f in os.listdir(src.parent):
        os.unlink(src.parent / f)
    os.rmdir(src.parent)
    again = ir.load(dst)
    for t in proto.graph.initializer:
        np.testing.assert_array_equal(again.graph.initializers[t.name].const_value.numpy(),
                                      numpy_helper.to_array(t))
    x = np.full((64, 64), 0.5, np.float32)
    np.testing.assert_array_equal(_run(dst, x), _run(proto, x))


def test_external_data_inlined_when_saved_without_it(tmp_path) -> None:
    proto = _weights_model()
    model = ir.load(_save_external(tmp_path, proto=proto))
    out = tmp_path / "inline.onnx"
    ir.save(model, out, external_data=False)
    loaded = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.graph.initializer)
    assert ir.to_proto(model) == proto


def test_save_in_place_keeps_in_memory_values(tmp_path) -> None:
    # Saving over the file the model was loaded from must not leave its tensors reading the
    # new file at old offsets.
    proto = _weights_model()
    path = _save_external(tmp_path, proto=proto)
    model = ir.load(path)
    g = model.graph
    add = g.nodes[0]
    add.outputs[0].replace_all_uses_with(add.inputs[0])  # drop "+ w": w leaves the data file
    g.remove(add)
    g.remove_initializer(g.initializers["w"])
    ir.save(model, path)
    expected_v = numpy_helper.to_array(proto.graph.initializer[1])
    np.testing.assert_array_equal(g.initializers["v"].const_value.numpy(), expected_v)
    other = tmp_path / "other.onnx"
    ir.save(model, other)
    np.testing.assert_array_equal(ir.load(other).graph.initializers["v"].const_value.numpy(), expected_v)
    np.testing.assert_array_equal(ir.load(path).graph.initializers["v"].const_value.numpy(), expected_v)


@pytest.mark.parametrize("dtype, values", [
    (TensorProto.INT4, list(range(-8, 8)) * 40 + [3]),
    (TensorProto.UINT4, list(range(16)) * 40 + [5]),
    (TensorProto.FLOAT16, [0.5, -1.25] * 300),
    (TensorProto.BFLOAT16, [0.5, -1.25] * 300),
    (TensorProto.FLOAT8E4M3FN, [0.5, -1.25] * 600),
    (TensorProto.INT64, list(range(300))),
    (TensorProto.BOOL, [True, False, True] * 400),
])
def test_typed_storage_survives_external_data(tmp_path, dtype: int, values: list) -> None:
    # Regression: int4/uint4 tensors stored in typed fields (int32_data) were written to the
    # data file one element per byte instead of packed, corrupting the saved weights.
    tensor = helper.make_tensor("t", dtype, [len(values)], values)
    assert not tensor.HasField("raw_data")
    graph = helper.make_graph([helper.make_node("Identity", ["t"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", dtype, [len(values)])],
                              initializer=[tensor])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "typed.onnx"
    ir.save(ir.load(proto), path, external_data=True, size_threshold=0)
    reloaded = ir.load(path).graph.initializers["t"].const_value
    assert isinstance(reloaded, ir.ExternalTensor)
    expected = numpy_helper.to_array(tensor)
    np.testing.assert_array_equal(reloaded.numpy(), expected)
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]), expected)
    assert reloaded.digest() == ir.ProtoTensor(tensor).digest()


def _hand_made_external(tmp_path, location: str, *, length: int | None = None, offset: int = 0):
    """A model whose initializer w (float[4]) points at ``location``."""
    tensor = TensorProto(name="w", data_type=FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    entries = [("location", location), ("offset", str(offset))]
    if length is not None:
        entries.append(("length", str(length)))
    for key, value in entries:
        tensor.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", FLOAT, [4])], initializer=[tensor])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp_path / "model_dir"
    folder.mkdir(exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_external_data_missing_file(tmp_path) -> None:
    path = _hand_made_external(tmp_path, "weights.bin")
    with pytest.raises(ExternalDataError, match=r"'w'.*weights\.bin.*missing") as info:
        ir.load(path)
    _one_line(info.value)


def test_external_data_file_too_short(tmp_path) -> None:
    path = _hand_made_external(tmp_path, "weights.bin", offset=8)
    (path.parent / "weights.bin").write_bytes(b"\0" * 20)  # needs 8 + 16
    with pytest.raises(ExternalDataError, match=r"'w'.*too short") as info:
        ir.load(path)
    _one_line(info.value)


def test_external_data_length_disagrees_with_shape(tmp_path) -> None:
    path = _hand_made_external(tmp_path, "weights.bin", length=12)
    (path.parent / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ExternalDataError, match=r"'w'.*length 12"):
        ir.load(path)


def test_external_data_location_with_dotdot(tmp_path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = _hand_made_external(tmp_path, "../secret.bin")
    with pytest.raises(ExternalDataError, match=r"'w'.*'\.\./secret\.bin'.*\.\.") as info:
        ir.load(path)
    _one_line(info.value)


def test_external_data_location_with_dotdot_inside_path(tmp_path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = _hand_made_external(tmp_path, "sub/../../secret.bin")
    with pytest.raises(ExternalDataError, match=r"\.\."):
        ir.load(path)


def test_external_data_absolute_location(tmp_path) -> None:
    target = tmp_path / "abs.bin"
    target.write_bytes(b"\0" * 16)
    path = _hand_made_external(tmp_path, str(target))
    with pytest.raises(ExternalDataError, match=r"'w'.*absolute path") as info:
        ir.load(path)
    _one_line(info.value)


def test_external_data_symlink_leaving_the_folder(tmp_path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 16)
    path = _hand_made_external(tmp_path, "link.bin")
    os.symlink(outside, path.parent / "link.bin")
    with pytest.raises(ExternalDataError, match=r"'w'.*outside the model's folder") as info:
        ir.load(path)
    _one_line(info.value)


def test_external_data_symlink_inside_the_folder_is_fine(tmp_path) -> None:
    path = _hand_made_external(tmp_path, "link.bin")
    data = np.array([1, 2, 3, 4], np.float32)
    (path.parent / "real.bin").write_bytes(data.tobytes())
    os.symlink(path.parent / "real.bin", path.parent / "link.bin")
    np.testing.assert_array_equal(ir.load(path).graph.initializers["w"].const_value.numpy(), data)


def test_external_data_in_subfolder_is_fine(tmp_path) -> None:
    path = _hand_made_external(tmp_path, "weights/w.bin")
    (path.parent / "weights").mkdir()
    data = np.array([1, 2, 3, 4], np.float32)
    (path.parent / "weights" / "w.bin").write_bytes(data.tobytes())
    np.testing.assert_array_equal(ir.load(path).graph.initializers["w"].const_value.numpy(), data)


def test_external_data_from_bytes_is_refused(tmp_path) -> None:
    path = _save_external(tmp_path)
    with pytest.raises(ExternalDataError, match=r"'w'.*external data.*path") as info:
        ir.load(path.read_bytes())
    _one_line(info.value)
    with pytest.raises(ExternalDataError):
        ir.load(onnx.load(str(path), load_external_data=False))
    # With the folder given, bytes work.
    model = ir.load(path.read_bytes(), base_dir=str(path.parent))
    assert model.graph.initializers["w"].const_value.numpy().shape == (64, 64)


def test_save_refuses_unsafe_location(tmp_path) -> None:
    model = ir.load(_weights_model())
    for location in ("../escape.data", str(tmp_path / "abs.data")):
        with pytest.raises(EmitError, match="plain file name"):
            ir.save(model, tmp_path / "m.onnx", external_data=True, location=location)
    assert os.listdir(tmp_path) == []


# -- atomic save ---------------------------------------------------------------------------------

class _FailingTensor(ir.Tensor):
    """A tensor whose bytes fail half way through (a disk error, a bad computation...)."""

    def __init__(self) -> None:
        super().__init__("boom")

    dtype = FLOAT
    shape = (4096,)

    def numpy(self) -> np.ndarray:
        raise RuntimeError("cannot compute the weight")

    def iter_bytes(self) -> Iterator[bytes]:
        yield b"\0" * 8192
        raise RuntimeError("cannot compute the weight")

    def to_proto(self, *, with_data: bool = True) -> onnx.TensorProto:
        raise RuntimeError("cannot compute the weight")


def _model_with_failing_tensor() -> ir.Model:
    model = ir.load(_weights_model())
    g = model.graph
    g.add_initializer("boom", _FailingTensor())
    return model


@pytest.mark.parametrize("external", [True, False])
def test_failed_save_leaves_no_files(tmp_path, external: bool) -> None:
    model = _model_with_failing_tensor()
    with pytest.raises(RuntimeError, match="cannot compute"):
        ir.save(model, tmp_path / "out.onnx", external_data=external)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("external", [True, False])
def test_failed_save_keeps_existing_output_untouched(tmp_path, external: bool) -> None:
    out = tmp_path / "out.onnx"
    data = tmp_path / "out.onnx.data"
    out.write_bytes(b"previous model")
    data.write_bytes(b"previous data")
    with pytest.raises(RuntimeError):
        ir.save(_model_with_failing_tensor(), out, external_data=external)
    assert out.read_bytes() == b"previous model"
    assert data.read_bytes() == b"previous data"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]


def test_save_to_missing_folder(tmp_path) -> None:
    model = ir.load(_weights_model())
    with pytest.raises(EmitError, match="does not exist") as info:
        ir.save(model, tmp_path / "nope" / "out.onnx")
    _one_line(info.value)
    assert os.listdir(tmp_path) == []


def test_save_onto_a_folder_fails_cleanly(tmp_path) -> None:
    (tmp_path / "taken.onnx").mkdir()
    with pytest.raises(EmitError, match="taken.onnx"):
        ir.save(ir.load(_weights_model()), tmp_path / "taken.onnx")
    assert os.listdir(tmp_path) == ["taken.onnx"]
    assert os.listdir(tmp_path / "taken.onnx") == []


def test_successful_save_leaves_only_the_outputs(tmp_path) -> None:
    model = ir.load(_weights_model())
    ir.save(model, tmp_path / "a.onnx")
    ir.save(model, tmp_path / "b.onnx", external_data=True, location="b_weights.bin")
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "b.onnx", "b_weights.bin"]
    x = np.ones((64, 64), np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "a.onnx", x), _run(tmp_path / "b.onnx", x))


# -- load errors ---------------------------------------------------------------------------------

def _assert_load_error(source, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match) as info:
        ir.load(source)
    assert type(info.value) in (ModelLoadError, ExternalDataError)
    assert isinstance(info.value, GraphoptError)
    _one_line(info.value)
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, GraphoptError)


def test_load_missing_file(tmp_path) -> None:
    _assert_load_error(tmp_path / "missing.onnx", "does not exist")


def test_load_folder(tmp_path) -> None:
    _assert_load_error(tmp_path, "is a folder")


def test_load_empty_file(tmp_path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    _assert_load_error(tmp_path / "empty.onnx", "empty")
    _assert_load_error(b"", "empty")


def test_load_random_bytes(tmp_path) -> None:
    rng = np.random.default_rng(1)
    for size in (1, 7, 100, 4096):
        for _ in range(5):
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            (tmp_path / "random.onnx").write_bytes(data)
            _assert_load_error(tmp_path / "random.onnx", "ONNX model")


def test_load_text_file(tmp_path) -> None:
    (tmp_path / "notes.onnx").write_text("This is not a model.\nJust some text.\n")
    _assert_load_error(tmp_path / "notes.onnx", "ONNX model")
    text_model = tmp_path / "model.txt"
    text_model.write_text(onnx.printer.to_text(_weights_model()))
    _assert_load_error(text_model, "ONNX model")


def test_load_truncated_model(tmp_path) -> None:
    data = _weights_model().SerializeToString()
    for cut in (len(data) // 2, len(data) // 3, len(data) - 1, 10):
        (tmp_path / "cut.onnx").write_bytes(data[:cut])
        _assert_load_error(tmp_path / "cut.onnx", ".")


def test_load_proto_without_graph(tmp_path) -> None:
    proto = onnx.ModelProto(ir_version=8)
    proto.opset_import.add(domain="", version=17)
    (tmp_path / "nograph.onnx").write_bytes(proto.SerializeToString())
    _assert_load_error(tmp_path / "nograph.onnx", "no graph")
    _assert_load_error(proto, "no graph")


def test_load_node_reading_undefined_value() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["ghost"], ["y"], name="r")], "g", [],
                              [helper.make_tensor_value_info("y", FLOAT, [1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _assert_load_error(proto, "'ghost'")


def test_load_accepts_path_bytes_and_proto(tmp_path) -> None:
    proto = _weights_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    for source in (path, str(path), path.read_bytes(), proto):
        assert ir.to_proto(ir.load(source)) == proto
    model = ir.load(proto)
    assert ir.load(model) is model


def test_external_scalar_empty_and_subgraph_tensors(tmp_path) -> None:
    body_weight = np.arange(300, dtype=np.float32).reshape(150, 2)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (bool c, float[2] x) => (float[2] y) <float s = {3.5}, float[0,3] e = {}> {
        y = If (c) <
            then_branch = then_g () => (float[2] a) { r = ReduceSum <keepdims = 0> (w, zero) a = Add (r, x) },
            else_branch = else_g () => (float[2] b) { b = Mul (x, s) }
        >
    }
    """
    proto = onnx.parser.parse_model(text)
    then_g = proto.graph.node[0].attribute[0].g
    then_g.initializer.extend([numpy_helper.from_array(body_weight, "w"),
                               numpy_helper.from_array(np.array([0], np.int64), "zero")])
    path = tmp_path / "m.onnx"
    ir.save(ir.load(proto), path, external_data=True, size_threshold=0)
    model = ir.load(path)
    inner = model.graph.nodes[0].subgraphs()[0].initializers["w"].const_value
    assert isinstance(inner, ir.ExternalTensor)
    np.testing.assert_array_equal(inner.numpy(), body_weight)
    scalar = model.graph.initializers["s"].const_value
    assert isinstance(scalar, ir.ExternalTensor) and scalar.numpy().shape == () and scalar.numpy() == 3.5
    assert model.graph.initializers["e"].const_value.numpy().shape == (0, 3)
    inline = ir.to_proto(model)  # values come back inline (as raw bytes: storage may differ)
    for got, want in ((inline.graph, proto.graph), (inline.graph.node[0].attribute[0].g, then_g)):
        assert [t.name for t in got.initializer] == [t.name for t in want.initializer]
        for a, b in zip(got.initializer, want.initializer):
            np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    # onnxruntime's shape inference wants small constants (the axes) inline: default threshold.
    run_path = tmp_path / "run.onnx"
    ir.save(model, run_path, external_data=True)
    on_disk = onnx.load(str(run_path), load_external_data=False).graph.node[0].attribute[0].g
    assert [t.data_location for t in on_disk.initializer] == [TensorProto.EXTERNAL, TensorProto.DEFAULT]
    x = np.array([1.0, 2.0], np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(run_path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"c": np.array(True), "x": x})
    np.testing.assert_array_equal(got, body_weight.sum(axis=0) + x)
