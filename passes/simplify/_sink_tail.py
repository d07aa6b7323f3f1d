"""Move the nodes that follow an ``If`` into both of its branches when that decides later ``If`` s.

Exporters turn shape-dependent Python (``x.squeeze(-1)`` on a dim that may be 1, ``if x.dim() == 2``)
into ``If`` nodes whose conditions test shapes or ranks. When a first ``If`` ``I`` (condition
``c``) yields results of different ranks per branch, later conditions that test those ranks
cannot be decided in the graph that holds ``I``, but they can inside each branch, where the
branch's result replaces ``I``'s output and ``c`` is a known constant. This rewrite moves ``I``'s
*tail* (every node that reads ``I``'s results, transitively) into the ``then`` branch and a copy
of it into the ``else`` branch:

    y = If(c, then: A, else: B);  z = Tail(y, c)
    ==>  z = If(c, then: {a = A; Tail(a, true)}, else: {b = B; Tail(b, false)})

Exactly one branch runs, with ``c`` equal to the constant it is given there, so ``z`` is
unchanged. The folds that run afterwards (shape inference, constant folding, constant ``If``
inlining) then decide the inner conditions branch by branch, and only one ``If`` runs where
several did.

Fires only when it pays and stays small:

* some ``If`` of the tail has a condition computed (through shape arithmetic: ``Shape``,
  ``Size``, ``Gather``, comparisons, logic, ``Cast``, ``Squeeze``/``Unsqueeze``, ``Slice``,
  ``Concat`` and integer arithmetic) from constants, ``c``, and the shape or size of ``I``'s
  results only;
* the tail holds at most ``max_tail_nodes`` nodes;
* the tail's only results leaving it are graph outputs of the holding graph (always true: a
  node reading a tail value is in the tail), none of them listed by another graph or named by
  ``training_info``; no node of the tail has sparse initializers in its subgraphs.

Function bodies are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx

from graphopt import ir
from graphopt.runtime import make_session

__all__ = ["sink_tails"]

logger = logging.getLogger(__name__)

#: Ops through which a condition may be computed from shapes (no tensor data is read).
_SHAPE_ARITHMETIC = frozenset({
    "Gather", "Equal", "Not", "And", "Or", "Xor", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
    "Cast", "Squeeze", "Unsqueeze", "Slice", "Concat", "Add", "Sub", "Mul", "Div", "Identity",
    "ReduceProd", "ReduceSum", "Reshape", "Max", "Min", "Abs", "Neg", "Where",
})


def _is_if(node: ir.Node) -> bool:
    return node.op_type == "If" and node.domain in ("", "ai.onnx")


def _top_node(node: ir.Node, graph: ir.Graph) -> ir.Node | None:
    """The node of ``graph`` that holds ``node`` (itself, or the owner of its subgraph)."""
    current: ir.Node | None = node
    while current is not None and current.graph is not graph:
        owner = current.graph.parent if current.graph is not None else None
        current = owner
    return current


def _tail(graph: ir.Graph, first: ir.Node) -> list[ir.Node]:
    """Nodes of ``graph`` reading ``first``'s results transitively, in graph order."""
    members: set[int] = set()
    frontier = list(first.outputs)
    while frontier:
        value = frontier.pop()
        for user, _ in value.uses():
            top = _top_node(user, graph)
            if top is not None and top is not first and id(top) not in members:
                members.add(id(top))
                frontier.extend(top.outputs)
    return [n for n in graph if id(n) in members]


def _decided_by_branch(cond: ir.Value, first: ir.Node, tail_ids: set[int]) -> bool:
    """True when ``cond`` is shape arithmetic over constants, ``first``'s condition and result shapes."""
    outer_cond = first.inputs[0]
    results = {id(v) for v in first.outputs}
    hits = False
    stack = [cond]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value is outer_cond:
            hits = True
            continue
        if value.is_constant():
            continue
        producer = value.producer
        if producer is None or id(producer) not in tail_ids or producer.domain not in ("", "ai.onnx"):
            return False
        if producer.op_type in ("Shape", "Size"):
            source = producer.inputs[0] if producer.inputs else None
            if source is not None and producer.op_type == "Size" and source.producer is not None \
                    and source.producer.op_type == "Shape" and id(source.producer) in tail_ids:
                source = source.producer.inputs[0]  # Size(Shape(x)) is the rank of x
            if source is None or id(source) not in results:
                return False
            hits = True
            continue
        if producer.op_type not in _SHAPE_ARITHMETIC or producer.subgraphs():
            return False
        stack.extend(v for v in producer.inputs if v is not None)
    return hits


def _under_same_condition(graph: ir.Graph, cond: ir.Value) -> bool:
    """True when ``graph`` lies inside a branch of an ``If`` on ``cond`` (an earlier sink's copy).

    Such an ``If`` is the unspecialized copy a sink leaves where specializing failed to load;
    sinking it again (in a later run) would only nest another copy.
    """
    owner = graph.parent
    while owner is not None:
        if _is_if(owner) and owner.inputs and owner.inputs[0] is cond:
            return True
        owner = owner.graph.parent if owner.graph is not None else None
    return False


def _has_sparse(node: ir.Node) -> bool:
    return any(g.sparse_initializers or any(_has_sparse(n) for n in g) for g in node.subgraphs())


def _copy_type(value_type: ir.TensorType | ir.OtherType | None) -> ir.TensorType | ir.OtherType | None:
    if isinstance(value_type, ir.TensorType):
        shape = value_type.shape
        return ir.TensorType(value_type.dtype, None if shape is None else ir.Shape(list(shape.dims)))
    return value_type


def _clone_graph(graph: ir.Graph, mapping: dict[int, ir.Value], model: ir.Model) -> ir.Graph:
    """A deep copy of subgraph ``graph``; outer values read through ``mapping`` where it maps them."""
    copy = ir.Graph(graph.name)
    for value in graph.inputs:
        mapping[id(value)] = copy.add_input(model.unique_name(value.name or "v"), _copy_type(value.type))
    for value in graph.initializers.values():
        tensor = value.const_value
        assert isinstance(tensor, ir.Tensor)
        mapping[id(value)] = copy.add_initializer(model.unique_name(value.name), ir.ArrayTensor(tensor.numpy().copy()))
    for node in graph:
        copy.append(_clone_node(node, mapping, model))
    copy.outputs.extend(mapping.get(id(v), v) for v in graph.outputs)
    return copy


def _clone_node(node: ir.Node, mapping: dict[int, ir.Value], model: ir.Model) -> ir.Node:
    """A copy of ``node`` reading mapped inputs; its outputs are added to ``mapping``."""
    attributes: dict[str, ir.Attr] = {}
    for name, attr in node.attributes.items():
        if attr.type == onnx.AttributeProto.GRAPH:
            attributes[name] = ir.Attr(name, attr.type, _clone_graph(attr.value, mapping, model))
        elif attr.is_graph:
            attributes[name] = ir.Attr(name, attr.type, [_clone_graph(g, mapping, model) for g in attr.value])
        else:
            attributes[name] = ir.Attr(name, attr.type, attr.value)
    outputs = [ir.Value(model.unique_name(v.name or "v") if v.name else "", _copy_type(v.type)) for v in node.outputs]
    copy = ir.Node(node.domain, node.op_type, [None if v is None else mapping.get(id(v), v) for v in node.inputs],
                   attributes=attributes, outputs=outputs, name="", overload=node.overload)
    for old, new in zip(node.outputs, outputs):
        mapping[id(old)] = new
    return copy


def _condition_constant(cond: ir.Value, flag: bool, branch: ir.Graph, model: ir.Model) -> ir.Value | None:
    """A constant of ``cond``'s static shape holding ``flag``, added to ``branch``; None if unknown."""
    shape = cond.shape
    if shape is None or not all(isinstance(d, int) for d in shape.dims):
        return None
    array = np.full(tuple(int(d) for d in shape.dims), flag, dtype=np.bool_)
    return branch.add_initializer(model.unique_name(f"{cond.name or 'cond'}_{str(flag).lower()}"), ir.ArrayTensor(array))


def sink_tails(model: ir.Model, graph: ir.Graph, *, max_tail_nodes: int, pinned: set[int],
               keep_names: set[str], allow: Callable[[str], bool]) -> int:
    """Sink tails of ``If`` nodes of ``graph`` into their branches; returns how many were sunk.

    ``allow(description)`` is asked before each rewrite (the bisect limit); False stops here.
    """
    if graph.function is not None:
        return 0
    sunk = 0
    for node in list(graph):
        if not node.is_live() or node.graph is not graph or not _is_if(node) or not node.inputs:
            continue
        cond = node.inputs[0]
        if cond is None or cond.is_constant() or node.meta.get(_REJECTED) or _under_same_condition(graph, cond):
            continue
        then_branch, else_branch = node.attr("then_branch"), node.attr("else_branch")
        if not isinstance(then_branch, ir.Graph) or not isinstance(else_branch, ir.Graph) \
                or then_branch.inputs or else_branch.inputs or len(then_branch.outputs) != len(node.outputs) \
                or len(else_branch.outputs) != len(node.outputs):
            continue
        tail = _tail(graph, node)
        if not tail or len(tail) > max_tail_nodes:
            continue
        tail_ids = {id(n) for n in tail}
        if not any(_is_if(n) and n.inputs and n.inputs[0] is not None
                   and _decided_by_branch(n.inputs[0], node, tail_ids) for n in tail):
            continue
        produced = [v for n in [node, *tail] for v in n.outputs]
        if any(_has_sparse(n) for n in tail) or any(v.name in keep_names for v in produced) \
                or any(id(v) in pinned and not any(o is v for o in graph.outputs) for v in produced):
            continue
        escaping: list[ir.Value] = []
        for value in graph.outputs:
            if any(value is v for v in produced) and not any(value is e for e in escaping):
                escaping.append(value)
        if not escaping:
            continue
        if not allow(f"sink {len(tail)} node(s) after If -> {node.outputs[0].name} into its branches"):
            return sunk
        if not _sink(model, graph, node, tail, escaping):
            logger.debug("kept the tail of If -> %s: no branch layout loads", node.outputs[0].name)
            continue
        sunk += 1
        logger.debug("sank %d node(s) into the branches of If -> %s", len(tail), node.outputs[0].name)
    return sunk


def _sink(model: ir.Model, graph: ir.Graph, node: ir.Node, tail: list[ir.Node], escaping: list[ir.Value]) -> bool:
    """Replace ``node`` and ``tail`` by one ``If`` whose branches hold the tail; False if none loads.

    A branch is *specialized* (the tail reads that branch's results, the condition is a constant)
    when the model still passes strict shape inference; otherwise the branch holds a copy of the
    original ``If`` and tail, which computes the same values there (a specialized branch that fails
    inference is one that always fails at run time, yet onnxruntime refuses to load it).
    """
    if not _infers(model):
        return False
    for specialize in ((True, True), (True, False), (False, True)):
        then_graph = _branch_copy(model, node, tail, escaping, True, specialize[0])
        else_graph = _branch_copy(model, node, tail, escaping, False, specialize[1])
        outputs = [ir.Value(model.unique_name(v.name + "_sunk"), _copy_type(v.type)) for v in escaping]
        new = ir.Node(node.domain, "If", [node.inputs[0]], attributes={
            "then_branch": ir.Attr.from_value("then_branch", then_graph),
            "else_branch": ir.Attr.from_value("else_branch", else_graph)}, outputs=outputs)
        graph.insert_after(tail[-1], new)
        if _infers(model):
            for old, value in zip(escaping, outputs):
                old.replace_all_uses_with(value, rename_graph_outputs=True)
            for inner in reversed(tail):
                _remove_with_subgraphs(graph, inner)
            _remove_with_subgraphs(graph, node)
            return True
        graph.remove(new, force=True)
    node.meta[_REJECTED] = True
    return False


_REJECTED = "sink_tail_rejected"


def _infers(model: ir.Model) -> bool:
    """True when onnx's strict shape inference accepts the model and onnxruntime loads it.

    A specialized branch that always fails at run time can fail inference at load time: such a
    layout is rejected. The check runs only for an ``If`` whose tail qualifies (rare).
    """
    try:
        proto = ir.to_proto(model)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        make_session(proto)
    except Exception:  # noqa: BLE001 - any failure means the variant would not load
        return False
    return True


def _remove_with_subgraphs(graph: ir.Graph, node: ir.Node) -> None:
    graph.remove(node, force=True)


def _branch_copy(model: ir.Model, node: ir.Node, tail: list[ir.Node], escaping: list[ir.Value], flag: bool,
                 specialize: bool) -> ir.Graph:
    """A copy of ``node``'s branch for ``flag`` followed by a copy of ``tail``, yielding ``escaping``."""
    cond = node.inputs[0]
    assert cond is not None
    mapping: dict[int, ir.Value] = {}
    if specialize:
        branch = _clone_graph(node.attr("then_branch" if flag else "else_branch"), mapping, model)
        mapping.update({id(o): r for o, r in zip(node.outputs, branch.outputs)})
        constant = _condition_constant(cond, flag, branch, model)
        if constant is not None:
            mapping[id(cond)] = constant
    else:
        branch = ir.Graph(f"{cond.name}_{str(flag).lower()}")
        inner_if = _clone_node(node, mapping, model)
        inner_if.meta[_REJECTED] = True
        branch.append(inner_if)
    for inner in tail:
        copy = _clone_node(inner, mapping, model)
        if not specialize and _is_if(copy):
            copy.meta[_REJECTED] = True  # the unspecialized copy must not be taken apart again
        branch.append(copy)
    branch.outputs[:] = [mapping.get(id(v), v) for v in escaping]
    return branch


