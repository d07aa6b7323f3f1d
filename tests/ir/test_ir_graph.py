"""The graph's node list, node removal, subgraph scopes, sorting and model-wide names."""

from __future__ import annotations

import onnx
import onnx.parser
import pytest
from onnx import TensorProto

from graphopt import ir
from graphopt.errors import VerificationError

FLOAT = TensorProto.FLOAT


def _chain(n: int) -> tuple[ir.Model, ir.Graph, list[ir.Node]]:
    """x -> Relu -> Relu ... (n nodes), last output is the graph output."""
    graph = ir.Graph("main")
    model = ir.Model(graph, ir_version=10, opset_imports={"": 17})
    v = graph.add_input("x", ir.TensorType(FLOAT, [2]))
    nodes = []
    for i in range(n):
        node = graph.append(ir.Node("", "Relu", [v], name=f"n{i}"))
        node.outputs[0].name = f"v{i}"
        v = node.outputs[0]
        nodes.append(node)
    graph.outputs.append(v)
    return model, graph, nodes


def _independent(n: int) -> tuple[ir.Graph, list[ir.Node]]:
    """n unconnected nodes that read the graph input only."""
    graph = ir.Graph("main")
    ir.Model(graph, opset_imports={"": 17})
    x = graph.add_input("x", ir.TensorType(FLOAT, [2]))
    nodes = [graph.append(ir.Node("", "Relu", [x], name=f"n{i}")) for i in range(n)]
    return graph, nodes


def _names(graph: ir.Graph) -> list[str]:
    return [n.name for n in graph]


def _check_links(graph: ir.Graph) -> None:
    """Forward and backward iteration agree and match ``len``."""
    forward = list(graph)
    assert list(reversed(graph)) == forward[::-1]
    assert len(graph) == len(forward)
    assert all(n.graph is graph and n.is_live() for n in forward)


# -- building the list -------------------------------------------------------------------------------

def test_append_insert_before_insert_after_order() -> None:
    graph, (a, b) = _independent(2)
    x = graph.inputs[0]
    c = graph.insert_before(b, ir.Node("", "Neg", [x], name="c"))
    d = graph.insert_after(b, ir.Node("", "Neg", [x], name="d"))
    e = graph.insert_before(a, ir.Node("", "Neg", [x], name="e"))
    f = graph.insert_after(None, ir.Node("", "Neg", [x], name="f"))
    g_ = graph.insert_before(None, ir.Node("", "Neg", [x], name="g"))
    assert _names(graph) == ["f", "e", "n0", "c", "n1", "d", "g"]
    assert graph.nodes == [f, e, a, c, b, d, g_]
    _check_links(graph)


def test_insert_into_empty_graph() -> None:
    graph = ir.Graph("g")
    x = ir.Value("x")
    a = graph.insert_after(None, ir.Node("", "Relu", [x], name="a"))
    graph.insert_before(a, ir.Node("", "Relu", [x], name="b"))
    assert _names(graph) == ["b", "a"]
    _check_links(graph)


def test_append_refuses_node_of_another_graph() -> None:
    graph, (a, _) = _independent(2)
    other = ir.Graph("other")
    with pytest.raises(ValueError, match="already belongs"):
        other.append(a)
    with pytest.raises(ValueError, match="already belongs"):
        graph.append(a)
    assert len(other) == 0 and len(graph) == 2


def test_insert_before_refuses_anchor_outside_graph() -> None:
    graph, (a, _) = _independent(2)
    other = ir.Graph("other")
    with pytest.raises(ValueError, match="not in graph"):
        other.insert_before(a, ir.Node("", "Relu", [ir.Value("y")]))
    assert len(other) == 0


def test_insert_after_removed_anchor_is_refused() -> None:
    # Regression: insert_after accepted an anchor that had been removed and silently inserted
    # the node before the anchor's former successor.
    graph, (a, b, c) = _independent(3)
    graph.remove(b)
    with pytest.raises(ValueError, match="not in graph"):
        graph.insert_after(b, ir.Node("", "Neg", [graph.inputs[0]], name="new"))
    assert _names(graph) == ["n0", "n2"]
    _check_links(graph)


def test_insert_after_anchor_of_another_graph_is_refused() -> None:
    # Regression: an anchor at the end of another graph made insert_after append here silently.
    graph, _ = _independent(2)
    other, (o1,) = _independent(1)
    with pytest.raises(ValueError, match="not in graph"):
        graph.insert_after(o1, ir.Node("", "Neg", [graph.inputs[0]], name="new"))
    assert len(graph) == 2


# -- removal and iteration ---------------------------------------------------------------------------

def test_remove_middle_head_and_tail() -> None:
    graph, nodes = _independent(5)
    graph.remove(nodes[2])
    graph.remove(nodes[0])
    graph.remove(nodes[4])
    assert _names(graph) == ["n1", "n3"]
    _check_links(graph)
    graph.remove(nodes[1])
    graph.remove(nodes[3])
    assert list(graph) == [] and len(graph) == 0
    assert list(reversed(graph)) == []


def test_remove_current_node_while_iterating() -> None:
    graph, nodes = _independent(6)
    seen = []
    for node in graph:
        seen.append(node.name)
        if node.name in ("n1", "n2", "n5"):
            graph.remove(node)
    assert seen == [f"n{i}" for i in range(6)]
    assert _names(graph) == ["n0", "n3", "n4"]
    _check_links(graph)


def test_remove_next_node_while_iterating() -> None:
    graph, nodes = _independent(6)
    seen = []
    for node in graph:
        seen.append(node.name)
        if node.name in ("n0", "n3"):
            graph.remove(nodes[int(node.name[1:]) + 1])
    assert seen == ["n0", "n2", "n3", "n5"]
    assert _names(graph) == ["n0", "n2", "n3", "n5"]
    _check_links(graph)


def test_remove_several_nodes_including_current_while_iterating() -> None:
    graph, nodes = _independent(8)
    seen = []
    for node in graph:
        seen.append(node.name)
        if node is nodes[1]:
            # current, the next two, and one before: in an awkward order
            graph.remove(nodes[3])
            graph.remove(node)
            graph.remove(nodes[2])
            graph.remove(nodes[0])
    assert seen == ["n0", "n1", "n4", "n5", "n6", "n7"]
    assert _names(graph) == ["n4", "n5", "n6", "n7"]
    _check_links(graph)


def test_remove_everything_while_iterating_visits_each_once() -> None:
    graph, nodes = _independent(10)
    seen = []
    for node in graph:
        seen.append(node)
        graph.remove(node)
    assert seen == nodes
    assert len(graph) == 0 and list(graph) == []


def test_remove_all_remaining_from_first_node() -> None:
    graph, nodes = _independent(5)
    seen = []
    for node in graph:
        seen.append(node.name)
        for other in graph.nodes:
            graph.remove(other)
    assert seen == ["n0"]
    assert len(graph) == 0


def test_nodes_inserted_after_current_are_visited() -> None:
    graph, nodes = _independent(3)
    seen = []
    for node in graph:
        seen.append(node.name)
        if node.name == "n1":
            graph.insert_after(node, ir.Node("", "Neg", [graph.inputs[0]], name="new"))
    assert seen == ["n0", "n1", "new", "n2"]


def test_reversed_iteration_with_removal() -> None:
    graph, nodes = _independent(6)
    seen = []
    for node in reversed(graph):
        seen.append(node.name)
        if node.name == "n4":
            graph.remove(node)
            graph.remove(nodes[3])  # the one the iterator goes to next
        if node.name == "n2":
            graph.remove(nodes[0])
    assert seen == ["n5", "n4", "n2", "n1"]
    assert _names(graph) == ["n1", "n2", "n5"]
    _check_links(graph)


def test_reversed_order_of_chain() -> None:
    _, graph, nodes = _chain(5)
    assert list(reversed(graph)) == nodes[::-1]


def test_remove_refuses_used_output_unless_forced() -> None:
    _, graph, nodes = _chain(3)
    with pytest.raises(ValueError, match="still used"):
        graph.remove(nodes[1])
    assert len(graph) == 3 and nodes[1].is_live()
    v0 = nodes[0].outputs[0]
    graph.remove(nodes[1], force=True)
    assert not nodes[1].is_live()
    assert v0.uses() == []  # the removed node no longer reads v0
    assert _names(graph) == ["n0", "n2"]


def test_remove_refuses_graph_output_producer_unless_forced() -> None:
    _, graph, nodes = _chain(2)
    with pytest.raises(ValueError, match="graph output"):
        graph.remove(nodes[-1])
    graph.remove(nodes[-1], force=True)
    assert len(graph) == 1


def test_remove_node_of_other_graph_or_twice_is_refused() -> None:
    graph, nodes = _independent(2)
    other, _ = _independent(1)
    with pytest.raises(ValueError, match="not in graph"):
        other.remove(nodes[0])
    graph.remove(nodes[0])
    with pytest.raises(ValueError, match="not in graph"):
        graph.remove(nodes[0])
    assert len(graph) == 1


def test_remove_drops_uses_of_inputs_used_twice() -> None:
    graph, _ = _independent(0)
    x = graph.inputs[0]
    add = graph.append(ir.Node("", "Add", [x, x]))
    graph.remove(add)
    assert x.uses() == []


def test_reappend_removed_node() -> None:
    graph, nodes = _independent(4)
    x = graph.inputs[0]
    graph.remove(nodes[1])
    assert not nodes[1].is_live() and nodes[1].graph is None
    graph.append(nodes[1])
    assert _names(graph) == ["n0", "n2", "n3", "n1"]
    _check_links(graph)
    # The removed node's uses were dropped; after re-wiring them they are exact again.
    nodes[1].set_inputs([x])
    assert (nodes[1], 0) in x.uses()
    assert len(x.uses()) == 4


def test_move_node_to_other_graph() -> None:
    graph, nodes = _independent(3)
    other = ir.Graph("other")
    graph.remove(nodes[0])
    other.append(nodes[0])
    assert nodes[0].graph is other
    assert _names(graph) == ["n1", "n2"] and _names(other) == ["n0"]
    _check_links(graph)
    _check_links(other)


def test_reappend_current_node_while_iterating_visits_each_once() -> None:
    # Regression: moving the node the iterator stands on to the end made the iteration stop
    # early (its forward link now pointed past the end), skipping the nodes after it.
    graph, nodes = _independent(5)
    seen = []
    for node in graph:
        seen.append(node.name)
        if node.name == "n1":
            graph.remove(node)
            graph.append(node)
    # Every node after the old place is visited once; the moved node comes again at its new
    # place, like any node appended during the iteration.
    assert seen == ["n0", "n1", "n2", "n3", "n4", "n1"]
    assert _names(graph) == ["n0", "n2", "n3", "n4", "n1"]


def test_move_current_node_earlier_while_iterating_does_not_revisit() -> None:
    # Regression: moving the current node before already-visited nodes made the iterator
    # walk those nodes again.
    graph, nodes = _independent(5)
    seen = []
    for node in graph:
        seen.append(node.name)
        if node.name == "n3":
            graph.remove(node)
            graph.insert_before(nodes[0], node)
    assert seen == ["n0", "n1", "n2", "n3", "n4"]
    assert _names(graph) == ["n3", "n0", "n1", "n2", "n4"]


# -- subgraphs ------------------------------------------------------------------------------------

_IF_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
main (bool c, float[2] x) => (float[2] y) {
    t = Relu (x)
    y = If (c) <
        then_branch = then_g () => (float[2] a) { a = Neg (t) },
        else_branch = else_g () => (float[2] b) { b = Abs (x) }
    >
}
"""

_LOOP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
main (int64 n, float[2] x) => (float[2] y, float[K,2] scan_out) {
    s = Sigmoid (x)
    cond = Constant <value = bool {1}> ()
    y, scan_out = Loop (n, cond, x) <
        body = body_g (int64 i, bool c_in, float[2] acc) => (bool c_out, float[2] acc_out, float[2] emit) {
            c_out = Identity (c_in)
            acc_out = Add (acc, s)
            emit = Identity (acc_out)
        }
    >
}
"""

_SCAN_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
main (float[2] init, float[3,2] xs) => (float[2] final, float[3,2] ys) {
    w = Constant <value = float[2] {2, 3}> ()
    final, ys = Scan (init, xs) <
        num_scan_inputs = 1,
        body = body_g (float[2] st, float[2] x) => (float[2] st_out, float[2] y) {
            p = Mul (x, w)
            st_out = Add (st, p)
            y = Identity (st_out)
        }
    >
}
"""


@pytest.mark.parametrize("text, op", [(_IF_TEXT, "If"), (_LOOP_TEXT, "Loop"), (_SCAN_TEXT, "Scan")])
def test_subgraph_bodies_load_and_round_trip(text: str, op: str) -> None:
    proto = onnx.parser.parse_model(text)
    model = ir.load(proto)
    (node,) = [n for n in model.graph if n.op_type == op]
    subs = node.subgraphs()
    assert subs and all(s.parent is node for s in subs)
    assert all(s.root_model() is model for s in subs)
    assert all(s.opset_imports() == {"": 17} for s in subs)
    assert all(n.version == 17 for s in subs for n in s)
    ir.verify(model)
    assert ir.to_proto(model) == proto


def test_outer_value_read_only_in_loop_body_lists_inner_user() -> None:
    model = ir.load(onnx.parser.parse_model(_LOOP_TEXT))
    sig, _, loop = model.graph.nodes
    body = loop.subgraphs()[0]
    add = next(n for n in body if n.op_type == "Add")
    assert sig.outputs[0].uses() == [(add, 1)]
    # So the producer cannot be removed while the body reads it.
    with pytest.raises(ValueError, match="still used"):
        model.graph.remove(sig)


def test_outer_value_read_only_in_scan_body_lists_inner_user() -> None:
    model = ir.load(onnx.parser.parse_model(_SCAN_TEXT))
    const, scan = model.graph.nodes
    mul = next(n for n in scan.subgraphs()[0] if n.op_type == "Mul")
    assert const.outputs[0].uses() == [(mul, 1)]


def test_nested_subgraph_reads_value_two_scopes_out() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (bool c, float[2] x) => (float[2] y) {
        t = Relu (x)
        y = If (c) <
            then_branch = g1 () => (float[2] a) {
                a = If (c) <
                    then_branch = g2 () => (float[2] b) { b = Neg (t) },
                    else_branch = g3 () => (float[2] d) { d = Abs (t) }
                >
            },
            else_branch = g4 () => (float[2] e) { e = Identity (x) }
        >
    }
    """
    model = ir.load(onnx.parser.parse_model(text))
    relu, outer_if = model.graph.nodes
    t = relu.outputs[0]
    assert {n.op_type for n, _ in t.uses()} == {"Neg", "Abs"}
    assert all(n.graph.parent.graph.parent is outer_if for n, _ in t.uses())
    # Removing the outer If drops the uses made two scopes down.
    model.graph.remove(outer_if, force=True)
    assert t.uses() == []
    model.graph.outputs.clear()
    assert model.graph.nodes == [relu]
    assert [g.name for g in model.all_graphs()] == ["main"]


def test_remove_if_node_drops_uses_inside_branches() -> None:
    model = ir.load(onnx.parser.parse_model(_IF_TEXT))
    relu, if_node = model.graph.nodes
    x = model.graph.inputs[1]
    model.graph.outputs.clear()
    model.graph.remove(if_node)
    assert relu.outputs[0].uses() == []
    assert x.uses() == [(relu, 0)]
    model.graph.remove(relu)
    assert len(model.graph) == 0
    ir.verify(model)


def test_sort_puts_producer_before_node_whose_subgraph_reads_it() -> None:
    model = ir.load(onnx.parser.parse_model(_IF_TEXT))
    g = model.graph
    relu, if_node = g.nodes
    g.remove(relu, force=True)
    g.append(relu)
    relu.set_inputs([g.inputs[1]])
    assert g.nodes == [if_node, relu]
    assert any("not in topological order" in p or "not defined" in p for p in ir.find_problems(model))
    assert g.sort() is True
    assert g.nodes == [relu, if_node]
    assert g.sort() is False
    ir.verify(model)


def test_sort_is_stable_for_independent_nodes() -> None:
    graph, nodes = _independent(5)
    assert graph.sort() is False
    assert graph.nodes == nodes


def test_sort_restores_chain_order_from_reverse() -> None:
    model, graph, nodes = _chain(50)
    graph._relink(nodes[::-1])
    assert graph.sort() is True
    assert graph.nodes == nodes
    ir.verify(model)


def test_sort_raises_on_cycle() -> None:
    _, graph, (a, b, c) = _chain(3)
    a.replace_input(0, c.outputs[0])  # a reads c, c reads b, b reads a
    with pytest.raises(VerificationError, match="cycle"):
        graph.sort()
    assert graph.nodes == [a, b, c]  # the order is left alone


# -- model-wide names and versions ----------------------------------------------------------------

def test_unique_name_never_returns_existing_name() -> None:
    model = ir.load(onnx.parser.parse_model(_IF_TEXT))
    used = {"c", "x", "t", "y", "a", "b"}
    for hint in sorted(used) + ["t", "t", "fresh", "fresh", ""]:
        name = model.unique_name(hint)
        assert name not in used
        used.add(name)


def test_unique_name_sees_values_added_after_first_call() -> None:
    # Regression: the name cache was built once, so names of nodes, inputs and initializers
    # added later could be handed out again.
    import numpy as np

    _, graph, nodes = _chain(2)
    model = graph.model
    first = model.unique_name("tmp")
    node = graph.append(ir.Node("", "Relu", [nodes[-1].outputs[0]]))
    node.outputs[0].name = "late_output"
    graph.add_input("late_input", ir.TensorType(FLOAT, [2]))
    graph.add_initializer("late_init", ir.ArrayTensor(np.zeros(2, np.float32)))
    inner = ir.Graph("body")
    inner_node = inner.append(ir.Node("", "Relu", [ir.Value("q")]))
    inner_node.outputs[0].name = "late_inner"
    graph.append(ir.Node("", "If", [graph.inputs[0]], attributes={"then_branch": inner}))
    names = {model.unique_name(h) for h in ("late_output", "late_input", "late_init", "late_inner")}
    assert names.isdisjoint({"late_output", "late_input", "late_init", "late_inner", first})


def test_unique_name_covers_function_bodies() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    main (float[2] x) => (float[2] y) { y = local.f (x) }
    <domain: "local", opset_import: ["" : 17]>
    f (a) => (b) { inner = Neg (a) b = Abs (inner) }
    """
    model = ir.load(onnx.parser.parse_model(text))
    assert model.unique_name("inner") != "inner"
    assert model.unique_name("a") != "a"


def test_node_version_with_ai_onnx_domain_spelling() -> None:
    # Regression: a model importing the default domain as "ai.onnx" gave nodes version None.
    graph = ir.Graph("main")
    ir.Model(graph, opset_imports={"ai.onnx": 17, "com.microsoft": 1})
    x = graph.add_input("x", ir.TensorType(FLOAT, [2]))
    relu = graph.append(ir.Node("", "Relu", [x]))
    explicit = graph.append(ir.Node("ai.onnx", "Relu", [x]))
    custom = graph.append(ir.Node("com.microsoft", "Gelu", [x]))
    unknown = graph.append(ir.Node("other", "Op", [x]))
    assert relu.version == 17 and explicit.version == 17
    assert custom.version == 1
    assert unknown.version is None


def test_node_version_inside_function_uses_function_opsets() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    main (float[2] x) => (float[2] y) { y = local.f (x) }
    <domain: "local", opset_import: ["" : 15]>
    f (a) => (b) { b = Neg (a) }
    """
    model = ir.load(onnx.parser.parse_model(text))
    (fn,) = model.functions.values()
    assert fn.graph.nodes[0].version == 15
    assert model.graph.nodes[0].version == 1


def test_all_nodes_and_all_graphs_cover_subgraphs_and_functions() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    main (bool c, float[2] x) => (float[2] y) {
        y = If (c) <
            then_branch = then_g () => (float[2] a) { a = local.f (x) },
            else_branch = else_g () => (float[2] b) { b = Abs (x) }
        >
    }
    <domain: "local", opset_import: ["" : 17]>
    f (p) => (q) { q = Neg (p) }
    """
    model = ir.load(onnx.parser.parse_model(text))
    assert [g.name for g in model.all_graphs()] == ["main", "then_g", "else_g", ""]
    assert [n.op_type for n in model.all_nodes()] == ["If", "f", "Abs", "Neg"]
    assert [n.op_type for n in model.graph.all_nodes()] == ["If", "f", "Abs"]


def test_remove_initializer_refuses_graph_input_default() -> None:
    # Regression: removing an IR-3 initializer that is also a graph input silently turned an
    # optional input (with a default) into a required one.
    text = """
    <ir_version: 3, opset_import: ["" : 8]>
    main (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1, 2}> { y = Relu (x) }
    """
    model = ir.load(onnx.parser.parse_model(text))
    g = model.graph
    w = g.initializers["w"]
    assert not w.has_uses() and w.is_graph_input()
    with pytest.raises(ValueError, match="graph input or output"):
        g.remove_initializer(w)
    assert "w" in g.initializers


def test_remove_initializer() -> None:
    import numpy as np

    graph = ir.Graph("g")
    w = graph.add_initializer("w", ir.ArrayTensor(np.ones(2, np.float32)))
    user = graph.append(ir.Node("", "Relu", [w]))
    with pytest.raises(ValueError, match="still used"):
        graph.remove_initializer(w)
    graph.remove(user)
    graph.remove_initializer(w)
    assert graph.initializers == {}
    with pytest.raises(ValueError, match="not an initializer"):
        graph.remove_initializer(w)
