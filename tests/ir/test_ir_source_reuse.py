"""A loaded node is written back as the proto it was read from, until something about it changes.

Each test edits the IR of a model and the proto of the same model the same way, and requires
``ir.to_proto`` and ``ir.save`` to give exactly the edited proto: an edit must never be lost to
a stale proto, and untouched nodes must keep every field as read. Models are loaded from bytes
(nodes are then written back as read while unchanged) and, where it matters, from a
``ModelProto`` (nodes are written from the IR: the caller may edit its proto).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir

MODEL = """
<ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
main (float[N, 4] x, float[4] w) => (float[N, 4] y, float[N, 4] z) {
    a = Add(x, w)
    b = Relu(a)
    c = Transpose <perm = [0, 1]> (b)
    d = custom.Scale <factor = 2.0, tag = "keep"> (c)
    y = Softmax <axis = 1> (d)
    z = Identity(b)
}
"""


def _model() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(MODEL)
    proto.graph.node[1].name = "relu"
    proto.graph.node[1].doc_string = "rectifier"
    proto.graph.node[2].domain = ""  # present although empty: written back as read
    helper.set_metadata_props(proto.graph.node[3], {"origin": "test"})
    return proto


def _written(model: ir.Model, tmp_path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    path = tmp_path / "out.onnx"
    ir.save(model, path)
    return ir.to_proto(model), onnx.load(str(path))


def _load(proto: onnx.ModelProto) -> ir.Model:
    return ir.load(proto.SerializeToString())


def _assert_writes(model: ir.Model, expected: onnx.ModelProto, tmp_path) -> None:
    in_memory, saved = _written(model, tmp_path)
    assert in_memory == expected
    assert saved == expected


def _node(model: ir.Model, op_type: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == op_type)


def test_unchanged_model_is_written_from_the_protos_read(tmp_path) -> None:
    proto = _model()
    model = _load(proto)
    assert all(node._attrs is None for node in model.graph)  # nothing read yet
    assert all(node._source_key is not None for node in model.graph)  # written back as read
    _assert_writes(model, proto, tmp_path)
    assert all(node._attrs is None for node in model.graph)  # saving read nothing either
    assert _node(model, "Softmax").attr("axis") == 1 and _node(model, "Scale").attr("tag") == "keep"
    assert _node(model, "Scale").metadata_props == {"origin": "test"}
    _assert_writes(model, proto, tmp_path)  # reading is not changing


def test_renamed_value_rewrites_its_producer_and_readers(tmp_path) -> None:
    proto = _model()
    model = _load(proto)
    _node(model, "Relu").outputs[0].name = "relu_out"
    for node in proto.graph.node:
        node.input[:] = ["relu_out" if n == "b" else n for n in node.input]
        node.output[:] = ["relu_out" if n == "b" else n for n in node.output]
    _assert_writes(model, proto, tmp_path)


def test_renamed_graph_input_rewrites_its_readers(tmp_path) -> None:
    proto = _model()
    model = _load(proto)
    model.graph.inputs[1].name = "weight"
    proto.graph.input[1].name = "weight"
    proto.graph.node[0].input[1] = "weight"
    _assert_writes(model, proto, tmp_path)


def test_edited_node_fields_are_written(tmp_path) -> None:
    proto = _model()
    model = _load(proto)
    relu = _node(model, "Relu")
    relu.name, relu.doc_string = "", ""
    _node(model, "Transpose").name = "t"
    _node(model, "Scale").domain = "other"
    proto.graph.node[1].ClearField("name")
    proto.graph.node[1].ClearField("doc_string")
    proto.graph.node[2].name = "t"
    proto.graph.node[3].domain = "other"
    _assert_writes(model, proto, tmp_path)


def test_attributes_edited_in_place_are_written(tmp_path) -> None:
    proto = _model()
    model = _load(proto)
    softmax, transpose, scale = _node(model, "Softmax"), _node(model, "Transpose"), _node(model, "Scale")
    softmax.attributes["axis"] = ir.Attr.from_value("axis", -1)
    del transpose.attributes["perm"]
    attrs = scale.attributes
    scale.attributes = {"tag": attrs["tag"], "factor": attrs["factor"]}  # same attributes, new order
    proto.graph.node[4].attribute[0].i = -1
    del proto.graph.node[2].attribute[:]
    scale_proto = proto.graph.node[3]
    factor, tag = (onnx.AttributeProto.FromString(a.SerializeToString()) for a in scale_proto.attribute)
    del scale_proto.attribute[:]
    scale_proto.attribute.extend([tag, factor])
    _assert_writes(model, proto, tmp_path)


def test_set_attr_and_rewired_inputs_are_written(tmp_path) -> None:
    proto = _model()
    model = _load(proto)
    relu, identity = _node(model, "Relu"), _node(model, "Identity")
    relu.set_attr("alpha", 0.5)
    identity.replace_input(0, model.graph.inputs[0])
    proto.graph.node[1].attribute.append(helper.make_attribute("alpha", 0.5))
    proto.graph.node[5].input[0] = "x"
    _assert_writes(model, proto, tmp_path)


def test_edited_metadata_is_written(tmp_path) -> None:
    proto = _model()
    model = _load(proto)
    _node(model, "Scale").metadata_props["origin"] = "edited"
    _node(model, "Relu").metadata_props = {"new": "1"}
    proto.graph.node[3].metadata_props[0].value = "edited"
    helper.set_metadata_props(proto.graph.node[1], {"new": "1"})
    _assert_writes(model, proto, tmp_path)


def test_new_and_moved_nodes_between_unchanged_ones(tmp_path) -> None:
    proto = _model()
    model = _load(proto)
    g = model.graph
    relu, transpose = _node(model, "Relu"), _node(model, "Transpose")
    neg = ir.Node("", "Neg", [relu.outputs[0]], outputs=[ir.Value("neg")])
    g.insert_after(relu, neg)
    transpose.replace_input(0, neg.outputs[0])
    proto.graph.node.insert(2, helper.make_node("Neg", ["b"], ["neg"]))
    proto.graph.node[3].input[0] = "neg"
    _assert_writes(model, proto, tmp_path)


def test_subgraph_attributes_are_read_at_load_and_written_from_the_ir(tmp_path) -> None:
    outer = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    then_g = helper.make_graph([helper.make_node("Neg", ["hidden"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["hidden"]),
         helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
        "g", [outer], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = _load(proto)
    relu, const, if_node = model.graph.nodes
    assert if_node._attrs is not None and const._attrs is None  # subgraphs are read at load
    assert relu.outputs[0].users() == [if_node.attributes["then_branch"].value.nodes[0]]
    _assert_writes(model, proto, tmp_path)
    inner = if_node.attributes["else_branch"].value.nodes[0]
    inner.op_type = "Sqrt"
    next(a for a in proto.graph.node[2].attribute if a.name == "else_branch").g.node[0].op_type = "Sqrt"
    _assert_writes(model, proto, tmp_path)


def test_graph_attribute_bytes_in_a_name_only_cost_a_closer_look(tmp_path) -> None:
    # U+00A0 encodes as c2 a0: the name's encoding holds a0 01 05, the mark of a GRAPH attribute.
    proto = _model()
    proto.graph.node[4].name = "\u00a0\x01\x05"
    model = _load(proto)
    softmax = _node(model, "Softmax")
    assert softmax._attrs is None  # the attribute types were checked: no subgraph
    _assert_writes(model, proto, tmp_path)


def test_value_types_are_read_on_first_use(tmp_path) -> None:
    proto = _model()
    proto.graph.output[1].ClearField("type")  # declared without a type as an output ...
    proto.graph.value_info.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4]))
    model = _load(proto)
    z = model.graph.outputs[1]
    assert z.shape == ("N", 4)  # ... the first entry with a type gives it
    x = model.graph.inputs[0]
    assert x.dtype == TensorProto.FLOAT and x.shape == ("N", 4)
    _assert_writes(model, proto, tmp_path)
    x.type = ir.TensorType(TensorProto.FLOAT, ["B", 4])
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "B"
    _assert_writes(model, proto, tmp_path)


def test_edits_of_the_callers_proto_do_not_reach_the_model(tmp_path) -> None:
    proto = _model()
    expected = onnx.ModelProto.FromString(proto.SerializeToString())
    model = ir.load(proto)
    assert not any(node._source is source for node, source in zip(model.graph, proto.graph.node))
    proto.graph.node[1].input[0] = "x"
    proto.graph.node[1].name = "edited"
    proto.graph.node[2].ClearField("domain")
    _assert_writes(model, expected, tmp_path)
