"""Large weights left in the model file (``FileTensor``): lossless, lazy, and safe to save over.

Loading from a path keeps the main graph's large ``raw_data`` initializers in the file; these
tests prove that everything else behaves as if the file had been parsed whole: the same values,
the same protos, the same file after a save (also over the input itself, renamed, or with
external data), and the plain parse for files the wire reader declines.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import numpy_helper

from graphopt import ir
from graphopt.errors import ModelLoadError
from graphopt.ir._tensors import FileTensor
from graphopt.ir._wire import split_large_initializers
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

FLOAT = onnx.TensorProto.FLOAT
#: Threshold used by the tests: tensors of 1 KiB or more stay in the file.
SMALL = 1024


def _weights_model() -> onnx.ModelProto:
    """Large raw weights of several dtypes, a typed-storage weight, small ones, a subgraph weight."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w")
    w.doc_string = "projection"
    half = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float16), "half")
    idx = numpy_helper.from_array(np.arange(300, dtype=np.int64), "idx")
    flags = numpy_helper.from_array(rng.random(2048) > 0.5, "flags")
    typed = oh.make_tensor("typed", FLOAT, [32, 16], rng.standard_normal(512).astype(np.float32).tolist())
    small = numpy_helper.from_array(np.ones(4, dtype=np.float32), "small")
    bias = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "bias")
    then_w = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "then_w")
    then_branch = oh.make_graph([oh.make_node("MatMul", ["y", "then_w"], ["t"])], "then", [],
                                [oh.make_tensor_value_info("t", FLOAT, ["N", 32])], initializer=[then_w])
    else_branch = oh.make_graph([oh.make_node("Identity", ["y"], ["e"])], "else", [],
                                [oh.make_tensor_value_info("e", FLOAT, ["N", 32])])
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["xw"]),
        oh.make_node("Add", ["xw", "bias"], ["y0"]),
        oh.make_node("MatMul", ["y0", "half_f"], ["y"]),
        oh.make_node("Cast", ["half"], ["half_f"], to=FLOAT),
        oh.make_node("If", ["cond"], ["z"], then_branch=then_branch, else_branch=else_branch),
        oh.make_node("MatMul", ["z", "typed"], ["zt"]),
        oh.make_node("ReduceSum", ["small"], ["s"], keepdims=0),
        oh.make_node("Add", ["zt", "s"], ["out"]),
        oh.make_node("Size", ["idx"], ["n_idx"]),
        oh.make_node("Size", ["flags"], ["n_flags"]),
    ]
    graph = oh.make_graph(
        nodes, "g",
        [oh.make_tensor_value_info("x", FLOAT, ["N", 16]), oh.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("out", FLOAT, ["N", 16]),
         oh.make_tensor_value_info("n_idx", onnx.TensorProto.INT64, []),
         oh.make_tensor_value_info("n_flags", onnx.TensorProto.INT64, [])],
        initializer=[w, half, idx, flags, typed, small, bias])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="k", value="v")
    return model


@pytest.fixture()
def saved(tmp_path) -> tuple[onnx.ModelProto, str]:
    proto = _weights_model()
    path = str(tmp_path / "m.onnx")
    onnx.save(proto, path)
    return proto, path


def test_large_raw_weights_stay_in_the_file(saved) -> None:
    proto, path = saved
    model = ir.load(path, file_tensor_bytes=SMALL)
    kinds = {name: type(v.const_value).__name__ for name, v in model.graph.initializers.items()}
    assert kinds == {"w": "FileTensor", "half": "FileTensor", "idx": "FileTensor", "flags": "FileTensor",
                     "typed": "ProtoTensor", "small": "ProtoTensor", "bias": "ProtoTensor"}
    for t in proto.graph.initializer:
        tensor = model.graph.initializers[t.name].const_value
        expected = numpy_helper.to_array(t)
        array = tensor.numpy()
        assert array.dtype == expected.dtype and array.shape == expected.shape
        assert np.array_equal(array, expected)
        assert tensor.to_proto(with_data=True) == t
        assert tensor.digest() == ir.ProtoTensor(t).digest()
        if isinstance(tensor, FileTensor):
            assert not array.flags.writeable  # shared by readers: nobody changes it in place
            assert not tensor.to_proto(with_data=False).HasField("raw_data")
            assert tensor.dtype == t.data_type and tensor.shape == tuple(t.dims)
    # The subgraph's weight is read with its node, as before.
    if_node = next(n for n in model.graph if n.op_type == "If")
    then_tensor = if_node.attributes["then_branch"].value.initializers["then_w"].const_value
    assert type(then_tensor).__name__ == "ProtoTensor"


def test_large_weight_is_memory_mapped_not_copied(tmp_path) -> None:
    weight = np.arange(1 << 19, dtype=np.float32).reshape(512, 1024)  # 2 MiB: above the cached size
    graph = oh.make_graph([oh.make_node("Identity", ["w"], ["y"])], "g", [],
                          [oh.make_tensor_value_info("y", FLOAT, [512, 1024])],
                          initializer=[numpy_helper.from_array(weight, "w")])
    path = str(tmp_path / "big.onnx")
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)
    tensor = ir.load(path).graph.initializers["w"].const_value
    assert isinstance(tensor, FileTensor)
    array = tensor.numpy()
    assert np.array_equal(array, weight) and not array.flags.writeable
    assert not array.flags.owndata  # a view of the mapped file, not a copy in memory


@pytest.mark.parametrize("external", [False, True])
def test_load_save_is_lossless(saved, tmp_path, external: bool) -> None:
    proto, path = saved
    model = ir.load(path, file_tensor_bytes=SMALL)
    assert ir.to_proto(model) == proto
    out = str(tmp_path / "out.onnx")
    ir.save(model, out, external_data=external, size_threshold=SMALL)
    assert onnx.load(out) == proto if not external else _inline(onnx.load(out)) == _inline(proto)


def _inline(proto: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in proto.graph.initializer}


def test_saving_over_the_loaded_file_keeps_the_weights(saved) -> None:
    proto, path = saved
    model = ir.load(path, file_tensor_bytes=SMALL)
    ir.save(model, path)  # replaces the file the tensors read from
    assert onnx.load(path) == proto
    ir.save(model, path)  # and again, from the replaced file's predecessor
    assert onnx.load(path) == proto
    assert np.array_equal(model.graph.initializers["w"].const_value.numpy(),
                          numpy_helper.to_array(proto.graph.initializer[0]))


def test_renamed_file_tensor_is_written_under_its_new_name(saved, tmp_path) -> None:
    proto, path = saved
    model = ir.load(path, file_tensor_bytes=SMALL)
    model.graph.rename_initializer(model.graph.initializers["w"], "w_renamed")
    out = str(tmp_path / "renamed.onnx")
    ir.save(model, out)
    written = {t.name: t for t in onnx.load(out).graph.initializer}
    assert "w" not in written
    assert written["w_renamed"].doc_string == "projection"
    assert np.array_equal(numpy_helper.to_array(written["w_renamed"]), numpy_helper.to_array(proto.graph.initializer[0]))
    feeds = random_inputs(make_session(proto), seed=0, dims={"N": 3})
    feeds["cond"] = np.array(True)
    comparison = compare_outputs(run_model(proto, feeds), run_model(onnx.load(out), feeds), rtol=0, atol=0)
    assert comparison.ok, comparison.summary()


def test_optimized_output_equals_the_one_from_a_whole_parse(saved, tmp_path) -> None:
    """A pipeline gives the same model whether the weights were left in the file or not."""
    from graphopt.pipeline import PassContext, PassManager

    proto, path = saved
    outputs = []
    for threshold in (SMALL, None):
        model = ir.load(path, file_tensor_bytes=threshold)
        PassManager("topo-sort,eliminate-identity,eliminate-dead-code,dedup-initializers", PassContext()).run(model)
        out = str(tmp_path / f"opt_{threshold}.onnx")
        ir.save(model, out)
        outputs.append(onnx.load(out))
    assert outputs[0] == outputs[1]


def test_wire_reader_declines_a_repeated_graph_field(saved, tmp_path) -> None:
    """Two serialized models concatenated parse as one merged model: the plain parse handles it."""
    proto, path = saved
    with open(path, "rb") as f:
        data = f.read()
    merged = onnx.ModelProto.FromString(data + data)
    assert split_large_initializers(data + data, SMALL) is None
    assert split_large_initializers(data, SMALL) is not None
    twice = str(tmp_path / "twice.onnx")
    with open(twice, "wb") as f:
        f.write(data + data)
    model = ir.load(twice, file_tensor_bytes=SMALL)
    assert not any(isinstance(v.const_value, FileTensor) for v in model.graph.initializers.values())
    assert ir.to_proto(model) == ir.to_proto(ir.load(merged))  # what the whole parse gives


def test_truncated_file_still_reports_a_load_error(saved, tmp_path) -> None:
    _, path = saved
    with open(path, "rb") as f:
        data = f.read()
    cut = str(tmp_path / "cut.onnx")
    with open(cut, "wb") as f:
        f.write(data[: len(data) - 700])
    with pytest.raises(ModelLoadError):
        ir.load(cut, file_tensor_bytes=SMALL)


def test_light_zoo_models_round_trip_from_their_files(tmp_path) -> None:
    """Files written by other tools: every raw tensor left in the file (threshold 1 byte)."""
    folder = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".onnx"))
    assert names
    for name in names:
        path = os.path.join(folder, name)
        expected = onnx.load(path)
        model = ir.load(path, file_tensor_bytes=1)
        assert any(isinstance(v.const_value, FileTensor) for v in model.graph.initializers.values()), name
        assert ir.to_proto(model) == expected, name
        out = str(tmp_path / name)
        ir.save(model, out)
        assert onnx.load(out) == expected, name


def test_copies_of_a_file_tensor_share_the_open_file(saved) -> None:
    import copy
    import pickle

    proto, path = saved
    model = ir.load(path, file_tensor_bytes=SMALL)
    tensor = model.graph.initializers["w"].const_value
    duplicate = copy.deepcopy(tensor)
    assert duplicate.source is tensor.source
    del model, tensor
    expected = numpy_helper.to_array(proto.graph.initializer[0])
    assert np.array_equal(duplicate.numpy(), expected)  # the file is still open for the copy
    assert np.array_equal(pickle.loads(pickle.dumps(duplicate)).numpy(), expected)


def test_source_file_reads_without_pread(tmp_path) -> None:
    """Platforms without os.pread (Windows) read through a locked seek and read."""
    import threading

    from graphopt.ir._tensors import SourceFile

    path = tmp_path / "bytes.bin"
    payload = bytes(range(256)) * 64
    path.write_bytes(payload)
    source = SourceFile(str(path))
    source._seek_lock = threading.Lock()  # what __init__ chooses where os.pread is missing
    assert source.read(1000, 3000) == payload[1000:4000]
    assert b"".join(source.iter_chunks(10, 500)) == payload[10:510]
