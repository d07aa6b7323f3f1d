"""Graphs that parse but are broken or out of reach: one clear line and exit 2, or a correct result."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx.parser
from _robust import assert_optimizes_correctly, assert_user_error
from onnx import TensorProto, helper

import graphopt
from graphopt import ir
from graphopt.analysis import model_stats
from graphopt.errors import EmitError
from graphopt.ir import Graph, Model, Node, TensorType, Value
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import run_model


def _save(tmp_path, text_or_proto, name: str = "m.onnx") -> str:
    proto = onnx.parser.parse_model(text_or_proto) if isinstance(text_or_proto, str) else text_or_proto
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


def test_cycle(tmp_path):
    path = _save(tmp_path, HEAD + " g (float[2] x) => (float[2] y) { a = Add(x, b)  b = Relu(a)  y = Relu(b) }")
    assert_user_error(path, "cycle")


def test_cycle_inside_a_branch(tmp_path):
    path = _save(tmp_path, HEAD + """ g (bool c, float[2] x) => (float[2] y) {
        y = If(c) <then_branch = t () => (float[2] p) { p = Add(x, q)  q = Relu(p) },
                   else_branch = e () => (float[2] r) { r = Neg(x) }> }""")
    assert_user_error(path, "cycle")


def test_self_loop_on_a_graph_input_name(tmp_path):
    """A node writes the name of a graph input: two definitions of one name."""
    path = _save(tmp_path, HEAD + " g (float[2] x) => (float[2] x) { x = Relu(x) }")
    assert_user_error(path, "'x'")


def test_dangling_input(tmp_path):
    path = _save(tmp_path, HEAD + " g (float[2] x) => (float[2] y) { t = Relu(x)  y = Add(t, missing) }")
    assert_user_error(path, "'missing'")


def test_dangling_input_inside_a_branch(tmp_path):
    path = _save(tmp_path, HEAD + """ g (bool c, float[2] x) => (float[2] y) {
        y = If(c) <then_branch = t () => (float[2] p) { p = Add(x, nowhere) },
                   else_branch = e () => (float[2] r) { r = Neg(x) }> }""")
    assert_user_error(path, "'nowhere'")


def test_graph_output_nobody_computes(tmp_path):
    path = _save(tmp_path, HEAD + " g (float[2] x) => (float[2] y, float[2] z) { y = Relu(x) }")
    assert_user_error(path, "'z'")


def test_two_nodes_produce_the_same_name(tmp_path):
    path = _save(tmp_path, HEAD + " g (float[2] x) => (float[2] y) { t = Relu(x)  t = Neg(x)  y = Add(t, t) }")
    assert_user_error(path, "defined more than once")


def test_node_output_reuses_an_initializer_name(tmp_path):
    path = _save(tmp_path, HEAD + """ g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> {
        w = Relu(x)  y = Add(w, x) }""")
    assert_user_error(path, "'w'")


def test_opset_newer_than_supported(tmp_path):
    proto = onnx.parser.parse_model(HEAD + " g (float[2] x) => (float[2] y) { y = Relu(x) }")
    proto.opset_import[0].version = onnx.defs.onnx_opset_version() + 3
    assert_user_error(_save(tmp_path, proto), "opset")


def test_unknown_domain_not_imported(tmp_path):
    proto = onnx.parser.parse_model(HEAD + " g (float[2] x) => (float[2] y) { t = Relu(x)  y = Identity(t) }")
    proto.graph.node[0].domain = "com.example.unknown"
    assert_user_error(_save(tmp_path, proto), "com.example.unknown")


def test_misspelled_op_in_the_default_domain(tmp_path):
    """Regression: a corrupt op type in a dead node was optimized away instead of refused."""
    proto = onnx.parser.parse_model(HEAD + """ g (float[2] x) => (float[2] y) {
        y = Relu(x)  unused = educeMean(x) }""")
    assert_user_error(_save(tmp_path, proto), "educeMean")


def test_op_newer_than_the_imported_opset(tmp_path):
    """Gelu exists from opset 20: an opset-17 model cannot use it."""
    proto = onnx.parser.parse_model(HEAD + " g (float[2] x) => (float[2] y) { y = Gelu(x) }")
    assert_user_error(_save(tmp_path, proto), "Gelu")


def test_op_in_an_imported_custom_domain_is_kept(tmp_path):
    path = _save(tmp_path, """<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[2] x) => (float[2] y) { t = Identity(x)  y = com.example.Mystery(t) }""")
    from _robust import run_cli

    code, _, stderr = run_cli("optimize", path, "-o", str(tmp_path / "o.onnx"), "-q")
    assert code == 0, stderr
    nodes = onnx.load(str(tmp_path / "o.onnx")).graph.node
    assert [(n.domain, n.op_type, list(n.input)) for n in nodes] == [("com.example", "Mystery", ["x"])]


# -- deep nesting ------------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_if_bytes(depth: int) -> bytes:
    """A model whose If nests ``depth`` levels deep in its then-branches.

    Written as raw protobuf: the protobuf library itself refuses to build messages nested
    deeper than its parse limit. Level k computes ``x + k`` when every condition is true.
    """
    f2 = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])]

    def out(name: str) -> list:
        return [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])]

    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["o0"])], "leaf", [], out("o0")).SerializeToString()
    for level in range(1, depth + 1):
        else_branch = helper.make_graph([helper.make_node("Neg", ["x"], [f"e{level}"])], f"else{level}", [],
                                        out(f"e{level}"))
        if_node = helper.make_node("If", ["c"], [f"i{level}"], else_branch=else_branch).SerializeToString()
        then_attr = onnx.AttributeProto(name="then_branch", type=onnx.AttributeProto.GRAPH).SerializeToString()
        if_node += _field(5, then_attr + _field(6, body))
        add = helper.make_node("Add", [f"i{level}", f"k{level}"], [f"o{level}"]).SerializeToString()
        shell = helper.make_graph([], f"level{level}", [], out(f"o{level}"),
                                  initializer=[helper.make_tensor(f"k{level}", TensorProto.FLOAT, [1], [1.0])])
        body = _field(1, if_node) + _field(1, add) + shell.SerializeToString()
    main = helper.make_graph([], "main", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])] + f2,
                             out("y"), initializer=[one])
    top_else = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "top_else", [], out("z"))
    top_if = helper.make_node("If", ["c"], ["y"], else_branch=top_else).SerializeToString()
    then_attr = onnx.AttributeProto(name="then_branch", type=onnx.AttributeProto.GRAPH).SerializeToString()
    top_if += _field(5, then_attr + _field(6, body))
    shell = helper.make_model(helper.make_graph([], "tmp", [], []), opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)
    shell.ClearField("graph")
    return shell.SerializeToString() + _field(7, _field(1, top_if) + main.SerializeToString())


def test_if_nested_25_deep_optimizes_correctly(tmp_path):
    path = str(tmp_path / "deep.onnx")
    with open(path, "wb") as f:
        f.write(nested_if_bytes(25))
    out = str(tmp_path / "o.onnx")
    assert_optimizes_correctly(path, out)
    x = np.array([1.0, -2.0], np.float32)
    got = run_model(onnx.load(out), {"c": np.array(True), "x": x})["y"]
    assert got.tolist() == (x + 25).tolist()
    assert run_model(onnx.load(out), {"c": np.array(False), "x": x})["y"].tolist() == x.tolist()


def test_if_nested_200_deep_is_refused_clearly(tmp_path):
    """Protobuf (and so onnx and onnxruntime) stops at 100 message levels: say that, not 'truncated'."""
    path = str(tmp_path / "deeper.onnx")
    with open(path, "wb") as f:
        f.write(nested_if_bytes(200))
    line = assert_user_error(path, "nests subgraphs deeper")
    assert "truncated" not in line


def _ir_nested_if(depth: int) -> Model:
    """The same kind of nesting built directly in the IR, where no protobuf limit applies."""
    main = Graph("main")
    cond = main.add_input("c", TensorType(TensorProto.BOOL, []))
    x = main.add_input("x", TensorType(TensorProto.FLOAT, [2]))

    def branch(name: str, op: str) -> Graph:
        g = Graph(name)
        n = g.append(Node("", op, [x], outputs=[Value(f"{name}_out", TensorType(TensorProto.FLOAT, [2]))]))
        g.outputs.append(n.outputs[0])
        return g

    body = branch("leaf", "Relu")
    for level in range(1, depth + 1):
        g = Graph(f"level{level}")
        n = g.append(Node("", "If", [cond], attributes={"then_branch": body, "else_branch": branch(f"e{level}", "Neg")},
                          outputs=[Value(f"o{level}", TensorType(TensorProto.FLOAT, [2]))]))
        ident = g.append(Node("", "Identity", [n.outputs[0]],
                              outputs=[Value(f"id{level}", TensorType(TensorProto.FLOAT, [2]))]))
        g.outputs.append(ident.outputs[0])
        body = g
    top = main.append(Node("", "If", [cond], attributes={"then_branch": body, "else_branch": branch("top_e", "Neg")},
                           outputs=[Value("y", TensorType(TensorProto.FLOAT, [2]))]))
    main.outputs.append(top.outputs[0])
    return Model(main, ir_version=8, opset_imports={"": 17})


def test_if_nested_200_deep_in_the_ir_has_no_recursion_error():
    model = _ir_nested_if(200)
    start = time.perf_counter()
    ir.verify(model)
    stats = model_stats(model)
    assert stats.subgraphs == 402 and stats.nodes == 201 + 201 + 200 + 1  # If, Neg, Identity, Relu
    text = ir.print_model(model)
    assert text.count("If") >= 200
    PassManager("O3", PassContext(opt_level=3)).run(model)
    ir.verify(model)
    after = model_stats(model)
    assert after.ops.get("Identity", 0) == 0, "identities inside every level are removed"
    assert after.ops["If"] == 201
    assert time.perf_counter() - start < 60
    try:
        ir.to_proto(model)
    except EmitError as exc:  # protobuf cannot hold 200 levels: a clear error, not a crash
        assert "nests subgraphs deeper" in str(exc)
    else:
        raise AssertionError("a 200-level model cannot be a protobuf message; expected EmitError")


def test_if_nested_20_deep_in_the_ir_round_trips_and_runs():
    model = _ir_nested_if(20)
    proto = graphopt.optimize(ir.to_proto(model), level=3)
    onnx.checker.check_model(proto)
    x = np.array([-1.0, 2.0], np.float32)
    assert run_model(proto, {"c": np.array(True), "x": x})["y"].tolist() == [0.0, 2.0]
    assert run_model(proto, {"c": np.array(False), "x": x})["y"].tolist() == [1.0, -2.0]
