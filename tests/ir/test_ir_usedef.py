"""Use-def chains: every way of changing a node's inputs keeps ``Value.uses()`` exact."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import TensorProto

from graphopt import ir

FLOAT = TensorProto.FLOAT


def _ftype(*dims: int | str) -> ir.TensorType:
    return ir.TensorType(FLOAT, list(dims))


def _new_model() -> tuple[ir.Model, ir.Graph]:
    graph = ir.Graph("main")
    return ir.Model(graph, ir_version=10, opset_imports={"": 17}), graph


def _expected_uses(graph: ir.Graph, value: ir.Value) -> set[tuple[ir.Node, int]]:
    """The uses of ``value`` recomputed from scratch from every node's inputs (all scopes)."""
    return {(node, i) for node in graph.all_nodes() for i, v in enumerate(node.inputs) if v is value}


def _assert_uses_exact(graph: ir.Graph, *values: ir.Value) -> None:
    for v in values:
        uses = v.uses()
        assert len(uses) == len(set(uses)), f"duplicate use entries for {v.name}"
        assert set(uses) == _expected_uses(graph, v), f"use list of {v.name} out of sync"
        assert v.num_uses == len(uses)
        assert v.has_uses() == bool(uses)


def _run(model_proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model_proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# -- construction and input edits ------------------------------------------------------------------

def test_node_construction_registers_each_input_slot() -> None:
    x, y = ir.Value("x"), ir.Value("y")
    add = ir.Node("", "Add", [x, y])
    mul = ir.Node("", "Mul", [x, x])
    assert x.uses() == [(add, 0), (mul, 0), (mul, 1)]
    assert y.uses() == [(add, 1)]
    assert x.users() == [add, mul]
    assert x.num_uses == 3


def test_omitted_optional_input_has_no_use() -> None:
    x = ir.Value("x")
    clip = ir.Node("", "Clip", [x, None, None])
    assert clip.inputs == (x, None, None)
    assert x.uses() == [(clip, 0)]


def test_replace_input_moves_exactly_one_use() -> None:
    _, g = _new_model()
    x, y = g.add_input("x", _ftype(2)), g.add_input("y", _ftype(2))
    mul = g.append(ir.Node("", "Mul", [x, x]))
    mul.replace_input(1, y)
    assert mul.inputs == (x, y)
    assert x.uses() == [(mul, 0)]
    assert y.uses() == [(mul, 1)]
    _assert_uses_exact(g, x, y)


def test_replace_input_with_none_drops_the_use() -> None:
    x = ir.Value("x")
    clip = ir.Node("", "Clip", [x, x])
    clip.replace_input(1, None)
    assert clip.inputs == (x, None)
    assert x.uses() == [(clip, 0)]


def test_replace_input_with_same_value_is_a_no_op() -> None:
    x = ir.Value("x")
    relu = ir.Node("", "Relu", [x])
    relu.replace_input(0, x)
    assert x.uses() == [(relu, 0)]


def test_replace_input_negative_index_keeps_use_lists_exact() -> None:
    # Regression: a negative index updated the input tuple but recorded the use under the
    # negative index and left the old value's use behind.
    _, g = _new_model()
    x, y = g.add_input("x", _ftype(2)), g.add_input("y", _ftype(2))
    add = g.append(ir.Node("", "Add", [x, x]))
    add.replace_input(-1, y)
    assert add.inputs == (x, y)
    assert x.uses() == [(add, 0)]
    assert y.uses() == [(add, 1)]
    _assert_uses_exact(g, x, y)


def test_replace_input_out_of_range_raises_and_changes_nothing() -> None:
    x, y = ir.Value("x"), ir.Value("y")
    relu = ir.Node("", "Relu", [x])
    with pytest.raises(IndexError):
        relu.replace_input(1, y)
    assert relu.inputs == (x,)
    assert x.uses() == [(relu, 0)] and y.uses() == []


def test_replace_input_with_replaces_every_occurrence() -> None:
    _, g = _new_model()
    x, y, z = (g.add_input(n, _ftype(2)) for n in "xyz")
    node = g.append(ir.Node("", "Sum", [x, y, x, z, x]))
    node.replace_input_with(x, z)
    assert node.inputs == (z, y, z, z, z)
    assert x.uses() == []
    assert sorted(i for _, i in z.uses()) == [0, 2, 3, 4]
    _assert_uses_exact(g, x, y, z)


def test_set_inputs_rewrites_all_slots() -> None:
    _, g = _new_model()
    x, y, z = (g.add_input(n, _ftype(2)) for n in "xyz")
    node = g.append(ir.Node("", "Sum", [x, x, y]))
    node.set_inputs([z, x])
    assert node.inputs == (z, x)
    assert x.uses() == [(node, 1)]
    assert y.uses() == []
    assert z.uses() == [(node, 0)]
    _assert_uses_exact(g, x, y, z)


def test_set_inputs_with_shorter_list_drops_trailing_uses() -> None:
    x, y = ir.Value("x"), ir.Value("y")
    node = ir.Node("", "Sum", [x, y, y, x])
    node.set_inputs([y])
    assert x.uses() == []
    assert y.uses() == [(node, 0)]


def test_append_input_adds_use_at_next_index() -> None:
    _, g = _new_model()
    x, y = g.add_input("x", _ftype(2)), g.add_input("y", _ftype(2))
    node = g.append(ir.Node("", "Sum", [x]))
    node.append_input(x)
    node.append_input(None)
    node.append_input(y)
    assert node.inputs == (x, x, None, y)
    assert x.uses() == [(node, 0), (node, 1)]
    assert y.uses() == [(node, 3)]
    _assert_uses_exact(g, x, y)


def test_uses_is_a_snapshot_safe_to_rewire_while_iterating() -> None:
    _, g = _new_model()
    x, y = g.add_input("x", _ftype(2)), g.add_input("y", _ftype(2))
    nodes = [g.append(ir.Node("", "Add", [x, x])) for _ in range(4)]
    snapshot = x.uses()
    visited = []
    for node, i in x.uses():
        visited.append((node, i))
        node.replace_input(i, y)
    assert visited == snapshot and len(visited) == 8
    assert x.uses() == []
    assert set(y.uses()) == {(n, i) for n in nodes for i in (0, 1)}
    # The snapshot list is not a live view: mutating it does not touch the value.
    snapshot.clear()
    assert y.num_uses == 8


def test_uses_of_outer_value_include_nodes_inside_subgraphs() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (bool c, float[2] x) => (float[2] y) {
        t = Relu (x)
        y = If (c) <
            then_branch = then_g () => (float[2] a) { a = Neg (t) },
            else_branch = else_g () => (float[2] b) { b = Abs (x) }
        >
    }
    """
    model = ir.load(onnx.parser.parse_model(text))
    g = model.graph
    relu, if_node = g.nodes
    t = relu.outputs[0]
    then_g, else_g = if_node.subgraphs()
    neg = then_g.nodes[0]
    # t is read only inside the then-branch: the inner node is its (only) user.
    assert t.uses() == [(neg, 0)]
    x = g.inputs[1]
    assert set(x.users()) == {relu, else_g.nodes[0]}
    _assert_uses_exact(g, t, x)


# -- replace_all_uses_with -------------------------------------------------------------------------

def test_replace_all_uses_with_rewires_every_reader() -> None:
    _, g = _new_model()
    x = g.add_input("x", _ftype(2))
    a = g.append(ir.Node("", "Relu", [x]))
    b = g.append(ir.Node("", "Neg", [x]))
    user1 = g.append(ir.Node("", "Add", [a.outputs[0], a.outputs[0]]))
    user2 = g.append(ir.Node("", "Abs", [a.outputs[0]]))
    g.outputs.extend([user1.outputs[0], user2.outputs[0]])
    a.outputs[0].replace_all_uses_with(b.outputs[0])
    assert user1.inputs == (b.outputs[0], b.outputs[0])
    assert user2.inputs == (b.outputs[0],)
    assert a.outputs[0].uses() == []
    _assert_uses_exact(g, a.outputs[0], b.outputs[0], x)


def test_replace_all_uses_with_reaches_uses_inside_subgraphs() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (bool c, float[2] x) => (float[2] y) {
        t = Relu (x)
        u = Neg (x)
        y = If (c) <
            then_branch = then_g () => (float[2] a) { a = Abs (t) },
            else_branch = else_g () => (float[2] b) { b = Identity (t) }
        >
    }
    """
    model = ir.load(onnx.parser.parse_model(text))
    relu, neg, _ = model.graph.nodes
    relu.outputs[0].replace_all_uses_with(neg.outputs[0])
    assert relu.outputs[0].uses() == []
    assert len(neg.outputs[0].uses()) == 2
    model.graph.remove(relu)
    ir.verify(model)


def test_replace_all_uses_with_refuses_graph_output_by_default() -> None:
    _, g = _new_model()
    x = g.add_input("x", _ftype(2))
    a = g.append(ir.Node("", "Relu", [x], name="a"))
    b = g.append(ir.Node("", "Neg", [x]))
    a.outputs[0].name = "y"
    g.outputs.append(a.outputs[0])
    consumer = g.append(ir.Node("", "Abs", [a.outputs[0]]))
    with pytest.raises(ValueError, match="graph output"):
        a.outputs[0].replace_all_uses_with(b.outputs[0])
    # Nothing changed.
    assert consumer.inputs == (a.outputs[0],)
    assert g.outputs == [a.outputs[0]] and a.outputs[0].name == "y"


def _rauw_model_text(extra_outputs: str = "", extra_body: str = "") -> str:
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    main (float[2,3] x) => (float[2,3] y{extra_outputs}) <float[2,3] w = {{1,2,3,4,5,6}}> {{
        r = Relu (x)
        y = Neg (r)
        n = Sigmoid (x)
        {extra_body}
    }}
    """


def _check_rauw_keeps_signature(tmp_path, text: str, pick_replacement, *,
                                expect_identity: bool) -> ir.Model:
    """Replace output ``y`` with ``pick_replacement(model)``; the signature must not change."""
    original = onnx.parser.parse_model(text)
    model = ir.load(original)
    g = model.graph
    y = next(v for v in g.outputs if v.name == "y")
    declared = y.type
    replacement = pick_replacement(model)
    replacement_name = replacement.name
    y.replace_all_uses_with(replacement, rename_graph_outputs=True)

    new_y = next(v for v in g.outputs if v.name == "y")
    assert [v.name for v in g.outputs] == [o.name for o in original.graph.output]
    assert new_y is not y
    assert new_y.type == declared
    assert y.name != "y" and y.name not in {v.name for v in g.outputs}
    identities = [n for n in g if n.op_type == "Identity" and n.outputs[0] is new_y]
    if expect_identity:
        assert len(identities) == 1 and identities[0].inputs == (replacement,)
        assert replacement.name == replacement_name  # the replacement keeps its own name
    else:
        assert not identities and new_y is replacement
    # The old producer is now dead; remove it and check the model is sound and runs.
    if y.producer is not None and not y.has_uses():
        g.remove(y.producer)
    ir.verify(model)
    out = tmp_path / "out.onnx"
    ir.save(model, out)
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    return model


def test_rauw_graph_output_with_internal_value_renames_it(tmp_path) -> None:
    model = _check_rauw_keeps_signature(
        tmp_path, _rauw_model_text(),
        lambda m: next(n for n in m.graph if n.op_type == "Sigmoid").outputs[0],
        expect_identity=False)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    got = _run(ir.to_proto(model), feeds)[0]
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-feeds["x"])), rtol=1e-6)


def test_rauw_graph_output_with_graph_input_inserts_identity(tmp_path) -> None:
    model = _check_rauw_keeps_signature(tmp_path, _rauw_model_text(),
                                        lambda m: m.graph.inputs[0], expect_identity=True)
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    np.testing.assert_array_equal(_run(ir.to_proto(model), feeds)[0], feeds["x"])


def test_rauw_graph_output_with_initializer_inserts_identity(tmp_path) -> None:
    model = _check_rauw_keeps_signature(tmp_path, _rauw_model_text(),
                                        lambda m: m.graph.initializers["w"], expect_identity=True)
    assert "w" in model.graph.initializers
    feeds = {"x": np.zeros((2, 3), np.float32)}
    np.testing.assert_array_equal(_run(ir.to_proto(model), feeds)[0],
                                  np.arange(1, 7, dtype=np.float32).reshape(2, 3))


def test_rauw_graph_output_with_another_output_inserts_identity(tmp_path) -> None:
    text = _rauw_model_text(extra_outputs=", float[2,3] z", extra_body="z = Abs (x)")
    model = _check_rauw_keeps_signature(
        tmp_path, text, lambda m: next(v for v in m.graph.outputs if v.name == "z"),
        expect_identity=True)
    feeds = {"x": np.arange(-3, 3, dtype=np.float32).reshape(2, 3)}
    y, z = _run(ir.to_proto(model), feeds)
    np.testing.assert_array_equal(y, np.abs(feeds["x"]))
    np.testing.assert_array_equal(z, np.abs(feeds["x"]))


def test_rauw_identity_for_later_output_is_placed_after_its_producer(tmp_path) -> None:
    # Regression: the Identity was inserted right after the old producer, before the node that
    # computes the replacement when that node comes later in the list (topological order broken).
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (float[2] x) => (float[2] y, float[2] z) {
        y = Relu (x)
        z = Neg (x)
    }
    """
    model = ir.load(onnx.parser.parse_model(text))
    g = model.graph
    y, z = g.outputs
    y.replace_all_uses_with(z, rename_graph_outputs=True)
    assert ir.find_problems(model) == []
    g.remove(y.producer)
    ir.verify(model)
    feeds = {"x": np.array([-1.0, 2.0], np.float32)}
    out_y, out_z = _run(ir.to_proto(model), feeds)
    np.testing.assert_array_equal(out_y, -feeds["x"])
    np.testing.assert_array_equal(out_z, -feeds["x"])


def test_rauw_output_of_subgraph_with_outer_value_inserts_identity(tmp_path) -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (bool c, float[2] x) => (float[2] y) {
        t = Neg (x)
        y = If (c) <
            then_branch = then_g () => (float[2] a) { a = Relu (x) },
            else_branch = else_g () => (float[2] b) { b = Abs (x) }
        >
    }
    """
    model = ir.load(onnx.parser.parse_model(text))
    neg, if_node = model.graph.nodes
    then_g = if_node.subgraphs()[0]
    a = then_g.outputs[0]
    a.replace_all_uses_with(neg.outputs[0], rename_graph_outputs=True)
    assert then_g.outputs[0].name == "a"
    ident = then_g.outputs[0].producer
    assert ident.op_type == "Identity" and ident.inputs == (neg.outputs[0],)
    then_g.remove(a.producer)
    ir.verify(model)
    x = np.array([-1.0, 2.0], np.float32)
    (got,) = _run(ir.to_proto(model), {"c": np.array(True), "x": x})
    np.testing.assert_array_equal(got, -x)


def test_rauw_keeps_declared_output_type_over_less_precise_replacement() -> None:
    _, g = _new_model()
    x = g.add_input("x", _ftype("N", 3))
    a = g.append(ir.Node("", "Relu", [x]))
    a.outputs[0].name = "y"
    a.outputs[0].type = _ftype(4, 3)
    g.outputs.append(a.outputs[0])
    b = g.append(ir.Node("", "Neg", [x]))
    b.outputs[0].name = "n"
    b.outputs[0].type = _ftype("N", None)
    a.outputs[0].replace_all_uses_with(b.outputs[0], rename_graph_outputs=True)
    assert g.outputs[0] is b.outputs[0]
    assert b.outputs[0].name == "y"
    assert b.outputs[0].type == _ftype(4, 3)


def test_rauw_with_self_is_a_no_op() -> None:
    x = ir.Value("x")
    relu = ir.Node("", "Relu", [x])
    x.replace_all_uses_with(x)
    assert x.uses() == [(relu, 0)]


def test_rauw_new_old_name_is_unique() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (float[2] x) => (float[2] y) {
        y_old = Relu (x)
        y = Neg (y_old)
        n = Abs (x)
    }
    """
    model = ir.load(onnx.parser.parse_model(text))
    g = model.graph
    y = g.outputs[0]
    y.replace_all_uses_with(g.nodes[2].outputs[0], rename_graph_outputs=True)
    names = [v.name for n in g for v in n.outputs]
    assert len(names) == len(set(names))
    ir.verify(model)


def test_rauw_on_loaded_file_then_save_keeps_outputs(tmp_path) -> None:
    # End to end through files: the saved model computes what the edit says.
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (float[3] x) => (float[3] y) {
        i = Identity (x)
        y = Relu (i)
    }
    """
    src = tmp_path / "in.onnx"
    onnx.save(onnx.parser.parse_model(text), str(src))
    model = ir.load(src)
    ident = model.graph.nodes[0]
    ident.outputs[0].replace_all_uses_with(ident.inputs[0])
    model.graph.remove(ident)
    out = tmp_path / "out.onnx"
    ir.save(model, out)
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Relu"]
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    np.testing.assert_array_equal(_run(onnx.load(str(out)), {"x": x})[0], np.maximum(x, 0))
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]  # no temp files left
