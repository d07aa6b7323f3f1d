"""The verifier finds each broken invariant, and stays quiet on sound models."""

from __future__ import annotations

import onnx
import onnx.parser
import pytest
from onnx import TensorProto

from graphopt import ir
from graphopt.errors import GraphoptError, VerificationError

FLOAT = TensorProto.FLOAT

_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
main (float[2] x) => (float[2] y) {
    a = Relu (x)
    b = Neg (a)
    y = Abs (b)
}
"""

_IF = """
<ir_version: 8, opset_import: ["" : 17]>
main (bool c, float[2] x) => (float[2] y) {
    t = Relu (x)
    y = If (c) <
        then_branch = then_g () => (float[2] a) { a = Neg (t) },
        else_branch = else_g () => (float[2] b) { b = Abs (x) }
    >
}
"""


def _load(text: str) -> ir.Model:
    return ir.load(onnx.parser.parse_model(text))


def _only_problem(model: ir.Model, *fragments: str) -> str:
    problems = ir.find_problems(model)
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0], problems
    with pytest.raises(VerificationError) as info:
        ir.verify(model)
    assert info.value.problems == problems
    assert isinstance(info.value, GraphoptError)
    return problems[0]


def test_sound_models_have_no_problems() -> None:
    for text in (_CHAIN, _IF):
        model = _load(text)
        assert ir.find_problems(model) == []
        ir.verify(model)


def test_dangling_input() -> None:
    model = _load(_CHAIN)
    neg = model.graph.nodes[1]
    neg.replace_input(0, ir.Value("ghost"))
    model.graph.remove(model.graph.nodes[0])
    _only_problem(model, "'ghost'", "not defined")


def test_use_list_missing_an_entry() -> None:
    model = _load(_CHAIN)
    a = model.graph.nodes[0].outputs[0]
    a._uses.clear()  # corrupt by hand
    _only_problem(model, "use list of 'a'", "misses input 0")


def test_use_list_with_stale_entry() -> None:
    model = _load(_CHAIN)
    relu, neg, _ = model.graph.nodes
    x = model.graph.inputs[0]
    x._uses[(neg, 0)] = None  # neg reads a, not x
    _only_problem(model, "use list of 'x'", "reads something else")


def test_use_list_naming_a_node_outside_any_graph() -> None:
    model = _load(_CHAIN)
    x = model.graph.inputs[0]
    ir.Node("", "Sigmoid", [x])  # built, never added to the graph
    _only_problem(model, "use list of 'x'", "removed")


def test_wrong_topological_order() -> None:
    model = _load(_CHAIN)
    g = model.graph
    relu, neg, abs_ = g.nodes
    g.remove(relu, force=True)
    g.append(relu)
    relu.set_inputs([g.inputs[0]])
    problems = ir.find_problems(model)
    assert any("reads 'a' before it is computed" in p and "topological" in p for p in problems)
    assert g.sort() is True
    ir.verify(model)


def test_cycle_reported_by_sort_and_verifier() -> None:
    model = _load(_CHAIN)
    relu, neg, abs_ = model.graph.nodes
    relu.replace_input(0, neg.outputs[0])
    with pytest.raises(VerificationError, match="cycle") as info:
        model.graph.sort()
    assert "Relu" in str(info.value) and "Neg" in str(info.value)
    assert ir.find_problems(model)


def test_duplicate_value_names() -> None:
    model = _load(_CHAIN)
    neg = model.graph.nodes[1]
    neg.outputs[0].name = "a"
    problems = ir.find_problems(model)
    assert any("'a' is defined more than once" in p for p in problems)


def test_input_and_node_output_with_same_name() -> None:
    model = _load(_CHAIN)
    model.graph.nodes[0].outputs[0].name = "x"
    assert any("'x' is defined more than once" in p for p in ir.find_problems(model))


def test_same_name_in_sibling_if_branches_is_fine() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (bool c, float[2] x) => (float[2] y) {
        y = If (c) <
            then_branch = then_g () => (float[2] r) { tmp = Neg (x) r = Abs (tmp) },
            else_branch = else_g () => (float[2] r) { tmp = Relu (x) r = Abs (tmp) }
        >
    }
    """
    model = _load(text)
    assert ir.find_problems(model) == []


def test_subgraph_shadowing_outer_name_is_flagged() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    main (bool c, float[2] x) => (float[2] y) {
        t = Relu (x)
        y = If (c) <
            then_branch = then_g () => (float[2] a) { t2 = Neg (x) a = Abs (t2) },
            else_branch = else_g () => (float[2] b) { b = Abs (t) }
        >
    }
    """
    model = _load(text)
    then_g = model.graph.nodes[1].subgraphs()[0]
    then_g.nodes[0].outputs[0].name = "t"
    assert any("'t' is defined more than once" in p for p in ir.find_problems(model))


def test_value_read_outside_its_scope() -> None:
    model = _load(_IF)
    then_g, else_g = model.graph.nodes[1].subgraphs()
    inner = then_g.nodes[0].outputs[0]
    else_g.nodes[0].replace_input(0, inner)  # a value of a sibling branch
    assert any("'a'" in p and "not defined" in p for p in ir.find_problems(model))


def test_node_domain_not_imported() -> None:
    model = _load(_CHAIN)
    model.graph.nodes[1].domain = "com.example"
    _only_problem(model, "domain 'com.example'", "opset_import")
    model.opset_imports["com.example"] = 1
    ir.verify(model)


def test_domain_not_imported_inside_function_uses_function_opsets() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1, "com.x" : 1]>
    main (float[2] x) => (float[2] y) { y = local.f (x) }
    <domain: "local", opset_import: ["" : 17]>
    f (a) => (b) { b = Neg (a) }
    """
    model = _load(text)
    ir.verify(model)
    (fn,) = model.functions.values()
    fn.graph.nodes[0].domain = "com.x"  # imported by the model, not by the function
    _only_problem(model, "function f", "com.x")


def test_default_opset_newer_than_onnx_supports() -> None:
    model = _load(_CHAIN)
    model.opset_imports[""] = onnx.defs.onnx_opset_version() + 1
    _only_problem(model, "opset", "supports up to")
    assert ir.find_problems(model, max_opset=onnx.defs.onnx_opset_version() + 1) == []


def test_default_opset_spelled_ai_onnx() -> None:
    model = _load(_CHAIN)
    del model.opset_imports[""]
    model.opset_imports["ai.onnx"] = 17
    ir.verify(model)
    model.opset_imports["ai.onnx"] = onnx.defs.onnx_opset_version() + 5
    assert any("opset" in p for p in ir.find_problems(model))


def test_output_recording_another_producer() -> None:
    model = _load(_CHAIN)
    relu, neg, _ = model.graph.nodes
    relu.outputs[0].index = 3
    _only_problem(model, "output 0 'a'", "another producer")


def test_graph_output_not_defined() -> None:
    model = _load(_CHAIN)
    model.graph.outputs.append(ir.Value("nowhere"))
    _only_problem(model, "graph output 'nowhere'")


def test_subgraph_not_pointing_back_to_its_node() -> None:
    model = _load(_IF)
    then_g = model.graph.nodes[1].subgraphs()[0]
    then_g.parent = None
    assert any("does not point back" in p for p in ir.find_problems(model))


def test_uses_from_replaced_subgraph_are_flagged() -> None:
    # Regression: after an If branch was replaced, the old body's nodes stayed among the uses of
    # outer values (so their producers looked used forever) and the verifier did not notice.
    model = _load(_IF)
    relu, if_node = model.graph.nodes
    x = model.graph.inputs[1]
    old_then = if_node.subgraphs()[0]
    new_then = ir.Graph("new_then")
    ident = new_then.append(ir.Node("", "Identity", [x]))
    ident.outputs[0].name = "new_a"
    new_then.outputs.append(ident.outputs[0])
    if_node.set_attr("then_branch", new_then)
    assert new_then.parent is if_node
    problem = _only_problem(model, "use list of 't'", "no longer in the model")
    assert "Neg" in problem
    # Detaching the old body (what a pass dropping a subgraph must do) makes the model sound.
    for node in old_then:
        node.detach_inputs()
    ir.verify(model)
    assert relu.outputs[0].uses() == []
    model.graph.remove(relu)
    ir.verify(model)


def test_swapping_branches_keeps_uses() -> None:
    model = _load(_IF)
    relu, if_node = model.graph.nodes
    then_g, else_g = if_node.subgraphs()
    if_node.set_attr("then_branch", else_g)
    if_node.set_attr("else_branch", then_g)
    assert relu.outputs[0].uses() == [(then_g.nodes[0], 0)]
    ir.verify(model)


def test_problems_are_one_line_each() -> None:
    model = _load(_IF)
    g = model.graph
    g.nodes[0].domain = "nope"
    g.outputs.append(ir.Value("nowhere"))
    model.opset_imports[""] = 999
    problems = ir.find_problems(model)
    assert len(problems) == 3
    assert all("\n" not in p for p in problems)
    with pytest.raises(VerificationError, match=r"\(and 2 more\)"):
        ir.verify(model)


def test_unnamed_value_read_by_a_node_is_flagged() -> None:
    # Regression: a node output left unnamed and read by another node was written out as an
    # empty input name, which ONNX reads as an omitted input: the edge silently vanished.
    model = _load(_CHAIN)
    relu = model.graph.nodes[0]
    relu.outputs[0].name = ""
    _only_problem(model, "input 0 of Neg node", "no name")
    relu.outputs[0].name = model.unique_name("a")
    ir.verify(model)
