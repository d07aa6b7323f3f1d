"""The conformance harness itself: it must notice what it is there to notice."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from _conformance import Case, DataSet, baked_case, compare_runs, first_difference, reference_of, run_case


def _add_model(ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"], name="r")],
        "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model


def _add_case(ir_version: int = 8, expected: list[float] | None = None) -> Case:
    a = np.array([1.0, -3.0], np.float32)
    b = np.array([2.0, 1.0], np.float32)
    y = np.array(expected if expected is not None else [3.0, 0.0], np.float32)
    return Case("test", "add_relu", _add_model(ir_version), [DataSet({"a": a, "b": b}, [y])])


def test_first_difference_names_the_field_path() -> None:
    a = _add_model()
    b = onnx.ModelProto()
    b.CopyFrom(a)
    assert first_difference(a, b) is None
    b.graph.node[1].attribute.add().CopyFrom(helper.make_attribute("alpha", 1))
    assert first_difference(a, b) == "graph.node[1].attribute (only in the copy)"
    b.CopyFrom(a)
    b.graph.node.add().CopyFrom(helper.make_node("Neg", ["y"], ["z"]))
    assert first_difference(a, b) == "graph.node (length 2 != 3)"
    b.CopyFrom(a)
    b.graph.node[1].name = "other"
    assert first_difference(a, b) == "graph.node[1].name"
    b.CopyFrom(a)
    b.graph.doc_string = ""  # present but empty: only field presence differs
    assert first_difference(a, b) == "graph.doc_string (only in the copy)"


def test_exact_comparison_catches_one_ulp_and_accepts_equal_nans() -> None:
    x = np.array([1.0, np.nan], np.float32)
    nudged = x.copy()
    nudged[0] = np.nextafter(nudged[0], np.float32(2))
    assert compare_runs([{"y": x}], [{"y": x.copy()}], ["y"], rtol=0.0, atol=0.0) == ""
    assert compare_runs([{"y": x}], [{"y": nudged}], ["y"], rtol=0.0, atol=0.0).startswith("data set 0: y:")


def test_reference_skips_a_case_whose_expected_outputs_onnxruntime_misses() -> None:
    good = reference_of(_add_case())
    assert good.skip == ""
    np.testing.assert_array_equal(good.outputs[0]["y"], [3.0, 0.0])
    assert reference_of(_add_case(expected=[3.0, 1.0])).skip == "onnxruntime disagrees with the expected outputs"


def test_baked_case_makes_every_input_an_initializer() -> None:
    baked = baked_case(_add_case())
    assert isinstance(baked, Case)
    assert [i.name for i in baked.model.graph.input] == []
    assert [t.name for t in baked.model.graph.initializer] == ["a", "b"]
    assert baked.data_sets[0].feeds == {}
    np.testing.assert_array_equal(run_case(baked.model, baked)[0]["y"], [3.0, 0.0])


def test_baked_ir3_case_keeps_its_initializers_listed_as_inputs() -> None:
    baked = baked_case(_add_case(ir_version=3))
    assert isinstance(baked, Case)
    assert [i.name for i in baked.model.graph.input] == ["a", "b"]
    assert baked.data_sets[0].feeds == {}
    np.testing.assert_array_equal(run_case(baked.model, baked)[0]["y"], [3.0, 0.0])
