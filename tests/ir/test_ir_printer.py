"""The canonical printer: stable under renaming and reordering, sensitive to real changes."""

from __future__ import annotations

import string

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir

FLOAT = TensorProto.FLOAT


def _canon(text: str) -> str:
    return ir.print_model(ir.load(onnx.parser.parse_model(text)))


_BASE = """
<ir_version: 8, opset_import: ["" : 17]>
main (float[N,4] x, float[4] b) => (float[N,4] y) <float[4] w = {1, 2, 3, 4}> {
    $p = Mul (x, w)
    $q = Add (x, b)
    $r = Sigmoid ($p)
    $s = Relu ($q)
    y = Sub ($r, $s)
}
"""


def _base(p: str = "p", q: str = "q", r: str = "r", s: str = "s") -> str:
    return string.Template(_BASE).substitute(p=p, q=q, r=r, s=s)


def test_canonical_text_ignores_value_and_node_names() -> None:
    renamed = _base("alpha", "beta", "gamma", "delta").replace("w = ", "weight = ").replace(
        "(x, w)", "(x, weight)")
    proto = onnx.parser.parse_model(_base())
    for i, node in enumerate(proto.graph.node):
        node.name = f"node_{i}"
    assert ir.print_model(ir.load(proto)) == _canon(renamed)
    assert "node_0" not in ir.print_model(ir.load(proto))


def test_canonical_text_ignores_order_of_independent_nodes() -> None:
    reordered = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (float[N,4] x, float[4] b) => (float[N,4] y) <float[4] w = {1, 2, 3, 4}> {
        q = Add (x, b)
        s = Relu (q)
        p = Mul (x, w)
        r = Sigmoid (p)
        y = Sub (r, s)
    }
    """
    assert _canon(reordered) == _canon(_base())


def test_canonical_text_ignores_attribute_order() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (bool c, float[2] x) => (float[2] y) {
        t = Relu (x)
        u = Sigmoid (x)
        y = If (c) <$first, $second>
    }
    """
    then_b = "then_branch = then_g () => (float[2] a) { a = Neg (t) }"
    else_b = "else_branch = else_g () => (float[2] b) { b = Abs (u) }"
    template = string.Template(text)
    assert _canon(template.substitute(first=then_b, second=else_b)) == \
        _canon(template.substitute(first=else_b, second=then_b))


def test_canonical_text_sees_a_changed_attribute() -> None:
    a = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (float[2,3] x) => (float[3,2] y) { y = Transpose <perm = [1, 0]> (x) }
    """
    b = a.replace("perm = [1, 0]", "perm = [0, 1]")
    assert _canon(a) != _canon(b)
    assert "perm: ints = [1, 0]" in _canon(a)


def test_canonical_text_sees_a_changed_edge() -> None:
    swapped = _base().replace("y = Sub (r, s)", "y = Sub (s, r)")
    assert _canon(swapped) != _canon(_base())
    rewired = _base().replace("s = Relu (q)", "s = Relu (p)")
    assert _canon(rewired) != _canon(_base())


def test_canonical_text_sees_changed_constant_values() -> None:
    changed = _base().replace("{1, 2, 3, 4}", "{1, 2, 3, 5}")
    assert _canon(changed) != _canon(_base())


def test_canonical_text_keeps_signature_names() -> None:
    text = _canon(_base())
    assert "main (float[N,4] x, float[4] b) => (float[N,4] y)" in text
    assert "c0 = {1.0,2.0,3.0,4.0}" in text


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


_PARSE_CASES = {
    "base": (_base(), {"x": np.ones((2, 4), np.float32), "b": np.arange(4, dtype=np.float32)}),
    "if": ("""
        <ir_version: 8, opset_import: ["" : 17]>
        main (bool c, float[2] x) => (float[2] y) {
            t = Relu (x)
            y = If (c) <
                then_branch = then_g () => (float[2] a) { a = Neg (t) },
                else_branch = else_g () => (float[2] b) {
                    k = Constant <value = float[2] {1, 2}> ()
                    b = Add (x, k)
                }
            >
        }
        """, {"c": np.array(False), "x": np.array([-1.0, 3.0], np.float32)}),
    "attrs": ("""
        <ir_version: 8, opset_import: ["" : 17]>
        main (float[2,3,4] x) => (float[4,2,1] y, int64[3] s) {
            t = Transpose <perm = [2, 0, 1]> (x)
            m = ReduceSum <keepdims = 1> (t, axes)
            y = LeakyRelu <alpha = 0.25> (m)
            s = Shape (x)
        }
        """.replace("(t, axes)", "(t, ax)").replace("int64[3] s) {", "int64[3] s) <int64[1] ax = {2}> {"),
        {"x": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)}),
    "function": ("""
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        main (float[2] x) => (float[2] y) { y = local.scale <alpha = 3.0> (x) }
        <domain: "local", opset_import: ["" : 17]>
        scale <alpha> (a) => (b) { k = Constant <value_float: float = @alpha> () b = Mul (a, k) }
        """, {"x": np.array([1.0, -2.0], np.float32)}),
    "loop": ("""
        <ir_version: 8, opset_import: ["" : 17]>
        main (int64 n, float[2] x) => (float[2] y) {
            s = Sigmoid (x)
            cond = Constant <value = bool {1}> ()
            y = Loop (n, cond, x) <
                body = body_g (int64 i, bool c_in, float[2] acc) => (bool c_out, float[2] acc_out) {
                    c_out = Identity (c_in)
                    acc_out = Add (acc, s)
                }
            >
        }
        """, {"n": np.array(3, np.int64), "x": np.array([0.5, -1.0], np.float32)}),
}


@pytest.mark.parametrize("name", sorted(_PARSE_CASES))
def test_canonical_text_parses_back_to_an_equivalent_model(name: str) -> None:
    text, feeds = _PARSE_CASES[name]
    original = onnx.parser.parse_model(text)
    printed = ir.print_model(ir.load(original))
    reparsed = onnx.parser.parse_model(printed)
    onnx.checker.check_model(reparsed, full_check=True)
    # The canonical text is a fixed point, and the reparsed model computes the same thing.
    assert ir.print_model(ir.load(reparsed)) == printed
    for got, want in zip(_run(reparsed, feeds), _run(original, feeds)):
        np.testing.assert_array_equal(got, want)


def test_large_tensor_printed_as_digest() -> None:
    big = np.arange(100, dtype=np.float32)
    graph = helper.make_graph([helper.make_node("Add", ["x", "big"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", FLOAT, [100])],
                              [helper.make_tensor_value_info("y", FLOAT, [100])],
                              initializer=[numpy_helper.from_array(big, "big")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    text = ir.print_model(ir.load(proto))
    digest = ir.ArrayTensor(big).digest()
    assert f"float[100] c0 = <{digest}>" in text
    assert "99.0" not in text
    # The same values stored another way print the same.
    proto.graph.initializer[0].CopyFrom(helper.make_tensor("big", FLOAT, [100], big.tolist()))
    assert not proto.graph.initializer[0].HasField("raw_data")
    assert ir.print_model(ir.load(proto)) == text
    big[7] = -1
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(big, "big"))
    assert ir.print_model(ir.load(proto)) != text
    # And max_elements controls the cut-off.
    assert "99.0" in ir.print_model(ir.load(proto), max_elements=100)


def test_constant_attribute_tensor_printed_as_digest_when_large() -> None:
    value = numpy_helper.from_array(np.ones(64, np.float32), "value")
    graph = helper.make_graph([helper.make_node("Constant", [], ["y"], value=value)], "g", [],
                              [helper.make_tensor_value_info("y", FLOAT, [64])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    text = ir.print_model(ir.load(proto))
    assert ir.ArrayTensor(np.ones(64, np.float32)).digest() in text


def test_deep_chain_prints_without_recursion_error() -> None:
    graph = ir.Graph("deep")
    model = ir.Model(graph, ir_version=8, opset_imports={"": 17})
    v = graph.add_input("x", ir.TensorType(FLOAT, [1]))
    for i in range(20_000):
        v = graph.append(ir.Node("", "Neg", [v])).outputs[0]
        v.name = f"t{i}"
    v.name = "y"
    graph.outputs.append(v)
    text = ir.print_model(model)
    lines = text.splitlines()
    assert sum(1 for line in lines if "= Neg (" in line) == 20_000
    assert "v0 = Neg (x)" in text and "y = Neg (v19998)" in text
    assert ir.canonical_order(graph) == graph.nodes


def test_subgraphs_are_printed() -> None:
    text = _canon(_PARSE_CASES["if"][0])
    assert "then_branch: graph = then_g" in text and "else_branch: graph = else_g" in text
    assert "= Neg (" in text and "= Add (x, " in text
    loop_text = _canon(_PARSE_CASES["loop"][0])
    assert "body: graph = body_g (int64 " in loop_text


def test_non_canonical_print_keeps_names_and_order() -> None:
    model = ir.load(onnx.parser.parse_model(_base()))
    text = ir.print_model(model, canonical=False)
    body = [line.strip() for line in text.splitlines() if " = " in line and "<" not in line]
    assert body == ["p = Mul (x, w)", "q = Add (x, b)", "r = Sigmoid (p)", "s = Relu (q)",
                    "y = Sub (r, s)"]


def test_print_graph_of_built_graph() -> None:
    graph = ir.Graph("g")
    x = graph.add_input("x", ir.TensorType(FLOAT, ["N"]))
    relu = graph.append(ir.Node("", "Relu", [x], name="my_relu"))
    relu.outputs[0].name = "y"
    relu.outputs[0].type = ir.TensorType(FLOAT, ["N"])
    graph.outputs.append(relu.outputs[0])
    assert ir.print_graph(graph) == "g (float[N] x) => (float[N] y)\n{\n   y = Relu (x)\n}\n"


def test_unnamed_values_that_are_read_get_canonical_names() -> None:
    # Regression: an unnamed value read by a node printed as an empty name (as if omitted).
    graph = ir.Graph("g")
    ir.Model(graph, ir_version=8, opset_imports={"": 17})
    x = graph.add_input("x", ir.TensorType(FLOAT, [2]))
    relu = graph.append(ir.Node("", "Relu", [x]))
    neg = graph.append(ir.Node("", "Neg", [relu.outputs[0]]))
    neg.outputs[0].name = "y"
    graph.outputs.append(neg.outputs[0])
    split = graph.append(ir.Node("", "Split", [x], num_outputs=2))  # outputs unread: omitted
    text = ir.print_graph(graph)
    assert "v0 = Relu (x)" in text and "y = Neg (v0)" in text
    assert " = Split (x)" in text and "v1" not in text
    assert split.outputs[0].name == ""
