"""Weight-free protos for analyses: ``ir.typed_stub`` and ``ir.stubs_to_inputs``."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphopt import ir


def _model() -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.ones((64, 32), np.float32), "w"),
         onnx.numpy_helper.from_array(np.array([-1, 4, 8], np.int64), "shape")])
    return ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_stubbed_weights_become_typed_inputs_and_shapes_still_infer() -> None:
    model = _model()
    proto = ir.to_proto_with(model, lambda t: ir.typed_stub(t) if t.nbytes > 64 else t.to_proto())
    stub = next(t for t in proto.graph.initializer if t.name == "w")
    assert not stub.raw_data and list(stub.dims) == [64, 32] and stub.data_type == TensorProto.FLOAT

    ir.stubs_to_inputs(proto.graph)

    assert [t.name for t in proto.graph.initializer] == ["shape"]  # small constants keep their data
    assert [i.name for i in proto.graph.input] == ["x", "w"]
    w_type = proto.graph.input[1].type.tensor_type
    assert w_type.elem_type == TensorProto.FLOAT and [d.dim_value for d in w_type.shape.dim] == [64, 32]
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    h = next(v for v in inferred.graph.value_info if v.name == "h")  # needs the stub's type
    assert [d.dim_param or d.dim_value for d in h.type.tensor_type.shape.dim] == ["N", 32]
    y = next(o for o in inferred.graph.output if o.name == "y")  # needs the kept shape data
    assert [d.dim_value for d in y.type.tensor_type.shape.dim][1:] == [4, 8]


def test_real_external_data_is_not_a_stub() -> None:
    graph = onnx.GraphProto()
    real = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    real.external_data.add(key="location", value="w.bin")
    graph.initializer.append(real)
    graph.initializer.append(ir.typed_stub(ir.ArrayTensor(np.zeros(3, np.float32), name="s")))

    ir.stubs_to_inputs(graph)

    assert [t.name for t in graph.initializer] == ["w"]
    assert [i.name for i in graph.input] == ["s"]
