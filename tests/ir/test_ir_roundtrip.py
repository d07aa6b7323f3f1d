"""Lossless round trip: ``ir.to_proto(ir.load(m)) == m`` and ``onnx.load(ir.save(...)) == m``."""

from __future__ import annotations

import glob
import os

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir

FLOAT = TensorProto.FLOAT
A = onnx.AttributeProto


def _assert_round_trip(proto: onnx.ModelProto, tmp_path) -> ir.Model:
    """Both ways of writing give back exactly ``proto``; returns the loaded model."""
    before = proto.SerializeToString()
    model = ir.load(proto)
    out = ir.to_proto(model)
    assert out == proto
    assert out.SerializeToString(deterministic=True) == proto.SerializeToString(deterministic=True)
    path = tmp_path / "rt.onnx"
    ir.save(model, path, external_data=False)
    assert onnx.load(str(path), load_external_data=False) == proto
    assert proto.SerializeToString() == before  # the input proto was not touched
    return model


def _sparse(name: str) -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), name)
    indices = numpy_helper.from_array(np.array([1, 5], np.int64), "")
    return helper.make_sparse_tensor(values, indices, [2, 3])


def _branch(name: str, op: str, reads: str, typed_output: bool = True) -> onnx.GraphProto:
    out = (helper.make_tensor_value_info(f"{name}_out", FLOAT, ["N"]) if typed_output
           else helper.make_empty_tensor_value_info(f"{name}_out"))
    return helper.make_graph([helper.make_node(op, [reads], [f"{name}_out"])], name, [], [out])


def _rich_model() -> onnx.ModelProto:
    """A model using nearly every field of the ONNX protos."""
    f32 = np.arange(6, dtype=np.float32).reshape(2, 3)
    initializers = [
        numpy_helper.from_array(f32, "w_raw"),
        helper.make_tensor("w_typed", FLOAT, [2, 3], f32.ravel().tolist()),
        helper.make_tensor("i64_typed", TensorProto.INT64, [3], [1, -2, 3]),
        helper.make_tensor("i64_raw", TensorProto.INT64, [3],
                           np.array([4, 5, -6], np.int64).tobytes(), raw=True),
        helper.make_tensor("f64_typed", TensorProto.DOUBLE, [2], [0.1, 0.2]),
        helper.make_tensor("u8", TensorProto.UINT8, [3], [0, 128, 255]),
        helper.make_tensor("bools", TensorProto.BOOL, [2], [True, False]),
        helper.make_tensor("strs", TensorProto.STRING, [3], [b"a", b"", "\u00e9".encode()]),
        helper.make_tensor("h_typed", TensorProto.FLOAT16, [2], [1.5, -2.25]),
        numpy_helper.from_array(np.array([1.5, -2.25], np.float16), "h_raw"),
        helper.make_tensor("bf16", TensorProto.BFLOAT16, [2], [1.0, 3.0]),
        numpy_helper.from_array(np.array([1.0, 3.0], ml_dtypes.bfloat16), "bf16_raw"),
        helper.make_tensor("f8", TensorProto.FLOAT8E4M3FN, [3], [0.5, 1.0, -2.0]),
        helper.make_tensor("f8e5", TensorProto.FLOAT8E5M2, [2], [0.5, 4.0]),
        helper.make_tensor("i4", TensorProto.INT4, [5], [1, -2, 3, -4, 7]),
        helper.make_tensor("u4", TensorProto.UINT4, [3], [1, 2, 15]),
        numpy_helper.from_array(np.array([1, -2, 3], ml_dtypes.int4), "i4_raw"),
        helper.make_tensor("c64", TensorProto.COMPLEX64, [1], [1 + 2j]),
        helper.make_tensor("scalar", FLOAT, [], [7.0]),
        helper.make_tensor("empty", FLOAT, [0, 3], []),
    ]
    initializers[0].doc_string = "raw weight"
    unknown_dim = onnx.TensorShapeProto.Dimension()  # neither value nor param
    x_info = helper.make_tensor_value_info("x", FLOAT, ["N", 3], doc_string="input x",
                                           shape_denotation=["DATA_BATCH", "DATA_CHANNEL"])
    x_info.type.denotation = "TENSOR"
    helper.set_metadata_props(x_info, {"role": "input"})
    u_info = helper.make_tensor_value_info("u", FLOAT, None)  # unknown rank
    y_info = helper.make_tensor_value_info("y", FLOAT, ["N", 3])
    y_info.type.tensor_type.shape.dim.append(unknown_dim)
    del y_info.type.tensor_type.shape.dim[-1]
    seq_info = helper.make_tensor_sequence_value_info("seq", FLOAT, ["M"])
    opt_info = helper.make_value_info(
        "opt", helper.make_optional_type_proto(helper.make_tensor_type_proto(FLOAT, [None])))

    attrs_node = helper.make_node(
        "AllAttrs", ["x"], ["custom_out"], name="all_attrs", domain="com.example",
        doc_string="every attribute type",
        i=3, f=0.5, s="text", ints=[1, 2, 3], floats=[0.5, 1.5], strings=["a", "b"],
        t=helper.make_tensor("t", FLOAT, [2], [1.0, 2.0]),
        ts=[helper.make_tensor("t1", FLOAT, [1], [1.0]),
            helper.make_tensor("t2", TensorProto.INT32, [1], [2])],
        g=_branch("g_attr", "Relu", "x"),
        gs=[_branch("gs0", "Neg", "x"), _branch("gs1", "Abs", "x")],
    )
    attrs_node.attribute.extend([
        helper.make_attribute("sp", _sparse("sp_vals")),
        helper.make_attribute("sps", [_sparse("a"), _sparse("b")]),
        helper.make_attribute("tp", helper.make_tensor_type_proto(FLOAT, ["N"])),
        helper.make_attribute("tps", [helper.make_tensor_type_proto(FLOAT, [1]),
                                      helper.make_tensor_type_proto(TensorProto.INT64, None)]),
        helper.make_attribute("empty_ints", [], attr_type=A.INTS),
        helper.make_attribute("bytes_s", b"\xff\xfe"),
        helper.make_attribute("bytes_ss", [b"\xff", b"ok"]),
        helper.make_attribute("doc_i", 1, doc_string="attribute doc"),
    ])
    helper.set_metadata_props(attrs_node, {"created_by": "test"})

    relu = helper.make_node("Relu", ["x"], ["u"], domain="")
    relu.name = ""  # explicitly present, though empty (proto2 keeps presence)
    relu.overload = ""
    add = helper.make_node("Add", ["u", "w_raw"], ["y"], name="add", doc_string="add doc")
    if_node = helper.make_node("If", ["cond"], ["branch_out"],
                               then_branch=_branch("then_g", "Neg", "u", typed_output=False),
                               else_branch=_branch("else_g", "Abs", "x", typed_output=False))
    seq_node = helper.make_node("SequenceConstruct", ["x", "x"], ["seq"])
    opt_node = helper.make_node("Optional", ["u"], ["opt"], domain="ai.onnx")
    graph = helper.make_graph(
        [relu, add, if_node, seq_node, opt_node, attrs_node], "rich",
        [x_info, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [y_info, helper.make_tensor_value_info("branch_out", FLOAT, None), seq_info, opt_info],
        initializer=initializers, doc_string="graph doc",
        value_info=[u_info,
                    helper.make_tensor_value_info("describes_nothing", FLOAT, [1]),
                    helper.make_empty_tensor_value_info("untyped_nothing")],
        sparse_initializer=[_sparse("sparse_w")],
    )
    helper.set_metadata_props(graph, {"graph_key": "graph_value"})
    annotation = onnx.TensorAnnotation(tensor_name="y")
    annotation.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value="w_raw")
    graph.quantization_annotation.append(annotation)

    model = helper.make_model(
        graph, producer_name="tests", producer_version="1.0", domain="", model_version=7,
        doc_string="model doc",
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 3)])
    model.ir_version = 9
    model.producer_name = ""
    assert model.HasField("producer_name") and model.graph.node[0].HasField("name")
    helper.set_metadata_props(model, {"author": "me", "license": "none"})
    training = onnx.TrainingInfoProto()
    training.algorithm.node.append(helper.make_node("Neg", ["y"], ["y_train"]))
    training.update_binding.add(key="w_raw", value="y_train")
    model.training_info.append(training)
    return model


def test_rich_model_round_trips_exactly(tmp_path) -> None:
    proto = _rich_model()
    model = _assert_round_trip(proto, tmp_path)
    # And the IR understood what it read.
    g = model.graph
    assert g.doc_string == "graph doc" and g.metadata_props == {"graph_key": "graph_value"}
    assert model.metadata_props == {"author": "me", "license": "none"}
    x = g.inputs[0]
    assert x.shape == ("N", 3) and x.doc_string == "input x" and x.metadata_props == {"role": "input"}
    assert g.outputs[0].shape.dims == ("N", 3)
    assert g.initializers["i4"].const_value.nbytes == 3
    assert list(g.sparse_initializers) == ["sparse_w"]
    node = next(n for n in g if n.op_type == "AllAttrs")
    assert node.version == 3 and node.metadata_props == {"created_by": "test"}
    types = {name: a.type for name, a in node.attributes.items()}
    assert types["i"] == A.INT and types["g"] == A.GRAPH and types["gs"] == A.GRAPHS
    assert types["sp"] == A.SPARSE_TENSOR and types["tps"] == A.TYPE_PROTOS
    assert node.attr("ints") == (1, 2, 3) and node.attr("s") == "text"
    assert node.attr("bytes_s") == b"\xff\xfe"
    assert len(node.subgraphs()) == 3


def test_rich_model_saved_with_external_data_round_trips(tmp_path) -> None:
    proto = _rich_model()
    model = ir.load(proto)
    path = tmp_path / "ext.onnx"
    ir.save(model, path, external_data=True, size_threshold=0)
    loaded = onnx.load(str(path))  # onnx brings the external bytes back inline
    for t in loaded.graph.initializer:
        assert t.data_location == TensorProto.DEFAULT
    by_name = {t.name: t for t in proto.graph.initializer}
    for t in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(by_name[t.name]))
    for name in ("y", "u"):
        assert any(v.name == name for v in list(loaded.graph.output) + list(loaded.graph.value_info))
    # Everything but the initializers is identical.
    for proto_ in (loaded, proto):
        del proto_.graph.initializer[:]
    assert loaded == proto


def test_ir3_initializers_that_are_also_inputs(tmp_path) -> None:
    w = numpy_helper.from_array(np.ones((2,), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "ir3",
        [helper.make_tensor_value_info("x", FLOAT, [2]), helper.make_tensor_value_info("w", FLOAT, [2])],
        [helper.make_tensor_value_info("y", FLOAT, [2])], initializer=[w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    proto.ir_version = 3
    model = _assert_round_trip(proto, tmp_path)
    wv = model.graph.inputs[1]
    assert wv is model.graph.initializers["w"]
    assert wv.is_graph_input() and wv.is_initializer()
    assert not wv.is_constant()  # a caller may feed w
    assert len(model.graph.inputs) == 2


def test_subgraph_outputs_without_type(tmp_path) -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (bool c, float[2] x) => (float[2] y) {
        y = If (c) <
            then_branch = then_g () => (a) { a = Neg (x) },
            else_branch = else_g () => (b) { b = Abs (x) }
        >
    }
    """
    proto = onnx.parser.parse_model(text)
    assert not proto.graph.node[0].attribute[0].g.output[0].HasField("type")
    model = _assert_round_trip(proto, tmp_path)
    then_g = model.graph.nodes[0].subgraphs()[0]
    assert then_g.outputs[0].type is None


def test_dims_symbolic_unknown_and_denotation(tmp_path) -> None:
    info = helper.make_tensor_value_info("x", FLOAT, ["N", None, 4, "seq"],
                                         shape_denotation=["DATA_BATCH", "", "", "DATA_FEATURE"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "dims", [info],
                              [helper.make_tensor_value_info("y", FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = _assert_round_trip(proto, tmp_path)
    x = model.graph.inputs[0]
    assert x.shape.dims == ("N", None, 4, "seq")
    assert not x.shape.is_static() and x.shape.numel() is None
    assert model.graph.outputs[0].shape is None
    # A changed type is written from the IR, and a changed-back shape proto is fresh.
    x.type = ir.TensorType(FLOAT, ["N", 5, 4, "seq"])
    out = ir.to_proto(model)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 5, 4, "seq"]


def test_typed_and_raw_storage_are_kept_as_read(tmp_path) -> None:
    proto = _rich_model()
    model = ir.load(proto)
    out = ir.to_proto(model)
    by_name = {t.name: t for t in out.graph.initializer}
    assert by_name["w_raw"].HasField("raw_data") and not by_name["w_raw"].float_data
    assert list(by_name["w_typed"].float_data) == [0, 1, 2, 3, 4, 5]
    assert list(by_name["i64_typed"].int64_data) == [1, -2, 3]
    assert by_name["i64_raw"].HasField("raw_data")
    assert list(by_name["strs"].string_data) == [b"a", b"", "\u00e9".encode()]
    np.testing.assert_array_equal(model.graph.initializers["w_typed"].const_value.numpy(),
                                  model.graph.initializers["w_raw"].const_value.numpy())


def test_renamed_initializer_is_written_under_its_new_name(tmp_path) -> None:
    proto = _rich_model()
    model = ir.load(proto)
    g = model.graph
    g.rename_initializer(g.initializers["w_typed"], "w_renamed")
    out = ir.to_proto(model)
    names = [t.name for t in out.graph.initializer]
    assert "w_renamed" in names and "w_typed" not in names
    renamed = next(t for t in out.graph.initializer if t.name == "w_renamed")
    assert list(renamed.float_data) == [0, 1, 2, 3, 4, 5]
    assert proto.graph.initializer[1].name == "w_typed"  # the input proto keeps its name


_FUNCTION_TEXT = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
main (float[2] x) => (float[2] y) {
    s = local.scale <alpha = 2.0> (x)
    y = local.outer (s)
}
<domain: "local", opset_import: ["" : 17]>
scale <alpha> (a) => (b) {
    k = Constant <value_float: float = @alpha> ()
    b = Mul (a, k)
}
<domain: "local", opset_import: ["" : 17, "local" : 1]>
outer (p) => (q) {
    r = local.scale <alpha = 3.0> (p)
    q = Relu (r)
}
"""


def test_functions_with_attribute_refs_and_nested_calls(tmp_path) -> None:
    proto = onnx.parser.parse_model(_FUNCTION_TEXT)
    proto.functions[0].doc_string = "scales by alpha"
    proto.functions[0].attribute_proto.append(helper.make_attribute("beta", 1.0))
    helper.set_metadata_props(proto.functions[1], {"kind": "wrapper"})
    proto.functions[1].value_info.append(helper.make_tensor_value_info("r", FLOAT, [2]))
    model = _assert_round_trip(proto, tmp_path)
    scale = model.functions[("local", "scale", "")]
    outer = model.functions[("local", "outer", "")]
    assert scale.attributes == ["alpha"]
    assert [a.name for a in scale.attribute_defaults] == ["beta"]
    assert scale.opset_imports == {"": 17} and outer.opset_imports == {"": 17, "local": 1}
    k = scale.graph.nodes[0]
    assert k.attributes["value_float"].ref_attr_name == "alpha"
    assert [v.name for v in scale.graph.inputs] == ["a"] and [v.name for v in scale.graph.outputs] == ["b"]
    assert outer.graph.nodes[0].version == 1
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_function_edit_is_written(tmp_path) -> None:
    model = ir.load(onnx.parser.parse_model(_FUNCTION_TEXT))
    outer = model.functions[("local", "outer", "")]
    relu = outer.graph.nodes[1]
    relu.op_type = "Sigmoid"
    out = ir.to_proto(model)
    assert [n.op_type for n in out.functions[1].node] == ["scale", "Sigmoid"]
    onnx.checker.check_model(out, full_check=True)


def test_load_edit_save_never_mutates_input_proto(tmp_path) -> None:
    proto = _rich_model()
    proto.functions.extend(onnx.parser.parse_model(_FUNCTION_TEXT).functions)
    before = proto.SerializeToString()
    model = ir.load(proto)
    g = model.graph
    # Edit a bit of everything that refers back to the input proto.
    g.rename_initializer(g.initializers["w_raw"], "w_new")
    g.initializers["w_typed"].const_value.doc_string = "changed"
    g.inputs[0].type = ir.TensorType(FLOAT, [5, 3])
    g.inputs[0].doc_string = "changed"
    relu = g.nodes[0]
    relu.name = "renamed"
    relu.set_attr("alpha", 0.1)
    g.sparse_initializers["sparse_w"].const_value.to_proto("sparse_renamed")
    model.metadata_props["new"] = "x"
    model.opset_imports["com.new"] = 1
    next(iter(model.functions.values())).graph.nodes[0].name = "changed"
    ir.save(model, tmp_path / "a.onnx", external_data=False)
    ir.save(model, tmp_path / "b.onnx", external_data=True, size_threshold=0)
    ir.to_proto(model)
    assert proto.SerializeToString() == before


def test_untouched_parts_survive_an_edit(tmp_path) -> None:
    proto = _rich_model()
    model = ir.load(proto)
    g = model.graph
    opt = next(n for n in g if n.op_type == "Optional")
    g.outputs.remove(opt.outputs[0])
    g.remove(opt)
    out = ir.to_proto(model)
    expected = onnx.ModelProto()
    expected.CopyFrom(proto)
    del expected.graph.node[4]
    del expected.graph.output[3]
    assert out == expected


def test_value_info_of_removed_node_is_dropped() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (float[2] x) => (float[2] y) <float[2] t, float[3] elsewhere> {
        t = Relu (x)
        y = Neg (x)
    }
    """
    proto = onnx.parser.parse_model(text)
    model = ir.load(proto)
    model.graph.remove(model.graph.nodes[0])
    out = ir.to_proto(model)
    assert [v.name for v in out.graph.value_info] == ["elsewhere"]


def test_model_without_optional_fields_round_trips(tmp_path) -> None:
    graph = helper.make_graph([], "empty", [], [])
    proto = onnx.ModelProto(ir_version=8, graph=graph)
    proto.opset_import.add(domain="", version=17)
    _assert_round_trip(proto, tmp_path)


def _backend_data_models() -> list[str]:
    root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    return sorted(glob.glob(os.path.join(root, "**", "*.onnx"), recursive=True))


@pytest.mark.parametrize("path", _backend_data_models(),
                         ids=lambda p: os.path.relpath(p, os.path.dirname(os.path.dirname(p))))
def test_onnx_backend_data_models_round_trip(path: str, tmp_path) -> None:
    proto = onnx.load(path, load_external_data=False)
    _assert_round_trip(proto, tmp_path)
    ir.verify(ir.load(proto))


def test_onnx_backend_model_cases_round_trip(tmp_path) -> None:
    from onnx.backend.test.case import model as model_cases

    models = [case.model for case in model_cases.collect_testcases() if case.model is not None]
    assert len(models) > 20
    for proto in models:
        _assert_round_trip(proto, tmp_path)
