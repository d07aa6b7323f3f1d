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

When the ``else`` branch cannot be specialized because the specialized copy always fails at run
time (the original fails there as well), and the ``then`` branch itself checks the condition,
the sunk ``If`` is marked :data:`THEN_ALWAYS`: its ``then`` branch may replace it. Both facts
are required:

* *the else path always fails*: a copy of the model with the specialized else branch is
  stripped of every declared intermediate type (value_info and subgraph output shapes, which
  runtimes do not check and exporters write from one trace), simplified (constant ``If``
  inlining, constant folding, dead-code removal) and typed again by inference, so each type
  left derives from operator semantics, the graph inputs' shapes (a contract onnxruntime
  enforces) and constants. Some node at the top level of that else branch, which runs whenever
  the branch runs, must then contradict its operator schema (onnx's per-node inference raises):
  e.g. an ``LSTM`` fed a rank-5 tensor.
* *the then path checks the condition*: the condition is ``Equal(Gather(Shape(x), k), 1)`` and
  the then branch squeezes axis ``k`` of ``x``, which fails exactly when the condition is false.

So every run that succeeds in the original takes the then branch, and a run that fails in the
original still fails (in the ``Squeeze``) instead of returning values. onnx's operator schemas
are the judge of "fails"; where a runtime kernel accepts more than its schema (onnxruntime's
``Gemm`` also takes a rank-1 input), the worst case is a run that now fails in the ``Squeeze``
where the original returned values: loud, never a silent change of outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx

from graphopt import ir
from graphopt.runtime import make_session

__all__ = ["THEN_ALWAYS", "sink_tails"]

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
               keep_names: set[str], allow: Callable[[str], bool], prove: Simplifier | None = None) -> int:
    """Sink tails of ``If`` nodes of ``graph`` into their branches; returns how many were sunk.

    ``allow(description)`` is asked before each rewrite (the bisect limit); False stops here.
    ``prove(model)`` simplifies a scratch copy of the model in place; with it, a sunk ``If``
    whose else path provably fails is marked :data:`THEN_ALWAYS` (without it, never).
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
        if not _sink(model, graph, node, tail, escaping, prove):
            logger.debug("kept the tail of If -> %s: no branch layout loads", node.outputs[0].name)
            continue
        sunk += 1
        logger.debug("sank %d node(s) into the branches of If -> %s", len(tail), node.outputs[0].name)
    return sunk


def _sink(model: ir.Model, graph: ir.Graph, node: ir.Node, tail: list[ir.Node], escaping: list[ir.Value],
          prove: Simplifier | None) -> bool:
    """Replace ``node`` and ``tail`` by one ``If`` whose branches hold the tail; False if none loads.

    A branch is *specialized* (the tail reads that branch's results, the condition is a constant)
    when the model still passes strict shape inference; otherwise the branch holds a copy of the
    original ``If`` and tail, which computes the same values there (a specialized branch that fails
    inference is one that always fails at run time, yet onnxruntime refuses to load it).
    """
    if not _infers(model):
        return False
    else_fails = False
    for specialize in ((True, True), (True, False), (False, True)):
        then_graph = _branch_copy(model, node, tail, escaping, True, specialize[0])
        else_graph = _branch_copy(model, node, tail, escaping, False, specialize[1])
        outputs = [ir.Value(model.unique_name(v.name + "_sunk"), _copy_type(v.type)) for v in escaping]
        new = ir.Node(node.domain, "If", [node.inputs[0]], attributes={
            "then_branch": ir.Attr.from_value("then_branch", then_graph),
            "else_branch": ir.Attr.from_value("else_branch", else_graph)}, outputs=outputs)
        graph.insert_after(tail[-1], new)
        loads = _infers(model)
        if specialize == (True, True) and not loads and prove is not None \
                and _then_checks(node.inputs[0], then_graph):
            else_fails = _else_always_fails(model, new, escaping, prove)
        if specialize == (True, False) and loads and else_fails:
            new.meta[THEN_ALWAYS] = True
            logger.debug("If -> %s: the else path always fails and the then path checks the condition",
                         node.outputs[0].name)
        if loads:
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

#: ``Node.meta`` key of a sunk ``If`` whose then branch may replace it (see the module notes).
THEN_ALWAYS = "sink_tail_then_always"


#: Simplifies a scratch model in place (constant ``If`` inlining, folding, dead code, shapes).
Simplifier = Callable[[ir.Model], None]


def _else_always_fails(model: ir.Model, new: ir.Node, escaping: list[ir.Value], prove: Simplifier) -> bool:
    """True when the else branch of ``new`` (just inserted in ``model``, to yield ``escaping``)
    fails whenever it runs.

    Works on a scratch copy stripped of declared intermediate types, in which ``new`` replaces
    the values it is to yield (so that dead-code removal keeps it); see the module notes.
    """
    marker = model.unique_name("sunk_if")
    saved = new.name
    new.name = marker
    try:
        proto = ir.to_proto(model)
    except Exception:  # noqa: BLE001 - a model that cannot be written proves nothing
        return False
    finally:
        new.name = saved
    _strip_types(proto.graph, top=True)
    try:
        scratch = ir.load(proto)
        probe = next((n for n in scratch.all_nodes() if n.name == marker and _is_if(n)), None)
        if probe is None or probe.graph is None:
            return False
        by_name = {v.name: v for n in probe.graph for v in n.outputs if n is not probe}
        for old, value in zip(escaping, probe.outputs):
            if old.name not in by_name:
                return False
            by_name[old.name].replace_all_uses_with(value, rename_graph_outputs=True)
        prove(scratch)
    except Exception as exc:  # noqa: BLE001 - a failed proof only means the If stays
        logger.debug("no proof for If %s: %s", marker, exc)
        return False
    try:
        typed = onnx.shape_inference.infer_shapes(ir.to_proto(scratch), data_prop=True)
    except Exception as exc:  # noqa: BLE001 - without types nothing is proven
        logger.debug("no proof for If %s: %s", marker, exc)
        return False
    found = _find_node(typed.graph, marker)
    if found is None:
        return False
    branch = next((a.g for a in found[0].attribute if a.name == "else_branch"), None)
    if branch is None:
        return False
    # Outer values take the types inference found; the branch is then typed node by node, in
    # order, so a contradiction stops only the nodes after it.
    types = _known_types(typed.graph, {})
    constants = _small_constants(typed.graph, {})
    opsets = {o.domain: o.version for o in typed.opset_import}
    return any(_contradicts_schema(n, types, constants, opsets) for n in branch.node)


def _find_node(graph: onnx.GraphProto, name: str) -> tuple[onnx.NodeProto, onnx.GraphProto] | None:
    """The node called ``name`` anywhere in ``graph`` and the graph that holds it."""
    for node in graph.node:
        if node.name == name:
            return node, graph
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                hit = _find_node(sub, name)
                if hit is not None:
                    return hit
    return None


def _small_constants(graph: onnx.GraphProto, found: dict[str, onnx.TensorProto]) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` values of at most 64 elements, by name, over every graph."""
    for tensor in graph.initializer:
        if int(np.prod(tensor.dims)) <= 64:
            found.setdefault(tensor.name, tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value" \
                and int(np.prod(node.attribute[0].t.dims)) <= 64:
            found.setdefault(node.output[0], node.attribute[0].t)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _small_constants(sub, found)
    return found


def _known_types(graph: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> dict[str, onnx.TypeProto]:
    """Types by value name over ``graph`` and its subgraphs (names are unique model-wide)."""
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            types.setdefault(info.name, info.type)
    for tensor in graph.initializer:
        types.setdefault(tensor.name, onnx.helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)))
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            types.setdefault(node.output[0], onnx.helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)))
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _known_types(sub, types)
    return types


def _contradicts_schema(node: onnx.NodeProto, types: dict[str, onnx.TypeProto],
                        constants: dict[str, onnx.TensorProto], opsets: dict[str, int]) -> bool:
    """True when onnx's inference for ``node`` alone rejects its input types in ``types``.

    Otherwise the output types it finds are added to ``types``.
    """
    if node.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                 for a in node.attribute):
        return False
    version = opsets.get("", opsets.get("ai.onnx"))
    if version is None:
        return False
    try:
        schema = onnx.defs.get_schema(node.op_type, version, "")
    except Exception:  # noqa: BLE001 - an operator onnx does not know proves nothing
        return False
    inputs = [name for name in node.input if name]
    if any(name not in types for name in inputs):
        return False  # an unknown input type: inference could only complain about that
    try:
        outputs = onnx.shape_inference.infer_node_outputs(
            schema, node, {name: types[name] for name in inputs},
            input_data={name: constants[name] for name in inputs if name in constants})
    except onnx.shape_inference.InferenceError as exc:
        logger.debug("%s contradicts its schema: %s", node.op_type, exc)
        return True
    except Exception:  # noqa: BLE001 - anything else proves nothing
        return False
    for name, value_type in outputs.items():
        if value_type.HasField("tensor_type") and value_type.tensor_type.HasField("shape"):
            types[name] = value_type  # the next nodes read it
    return False


def _strip_types(graph: onnx.GraphProto, *, top: bool) -> None:
    """Drop value_info and output shapes (graph inputs of the main graph keep theirs)."""
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    if not top:
        for value in graph.input:
            if value.type.HasField("tensor_type"):
                value.type.tensor_type.ClearField("shape")
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_types(attr.g, top=False)
            for sub in attr.graphs:
                _strip_types(sub, top=False)


def _then_checks(cond: ir.Value | None, branch: ir.Graph) -> bool:
    """True when ``cond`` is ``Equal(Gather(Shape(x), k), 1)`` and ``branch`` squeezes axis ``k`` of ``x``."""
    found = _unit_dim_test(cond)
    if found is None:
        return False
    x, axis = found
    rank = x.shape.rank if x.shape is not None else None
    target = axis + rank if axis < 0 and rank is not None else axis
    for node in branch:
        if node.op_type != "Squeeze" or node.domain not in ("", "ai.onnx") or not node.inputs \
                or node.inputs[0] is not x or not node.outputs[0].has_uses():
            continue
        if (node.version or 0) >= 13:
            axes = _small_ints(node.inputs[1] if len(node.inputs) > 1 else None)
        else:
            axes = [int(a) for a in node.attr("axes", ())] or None
        if not axes:
            continue  # no axes: removes every 1, checks nothing
        normalized = [a + rank if a < 0 and rank is not None else a for a in axes]
        if axis in axes or (target >= 0 and target in normalized):
            return True
    return False


def _unit_dim_test(cond: ir.Value | None) -> tuple[ir.Value, int] | None:
    """``(x, k)`` when ``cond`` is ``Equal(Gather(Shape(x), k), 1)`` (either operand order)."""
    node = cond.producer if cond is not None else None
    if node is None or node.op_type != "Equal" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    for gathered, one in (node.inputs, tuple(reversed(node.inputs))):
        if _small_ints(one) != [1] or gathered is None:
            continue
        gather = gathered.producer
        if gather is None or gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx") \
                or gather.attr("axis", 0) != 0 or len(gather.inputs) != 2:
            continue
        index = _small_ints(gather.inputs[1])
        shape = gather.inputs[0].producer if gather.inputs[0] is not None else None
        if index is None or len(index) != 1 or shape is None or shape.op_type != "Shape" \
                or shape.domain not in ("", "ai.onnx") or not shape.inputs or shape.inputs[0] is None \
                or shape.attr("start", 0) != 0 or shape.attr("end") is not None:
            continue
        return shape.inputs[0], index[0]
    return None


def _small_ints(value: ir.Value | None) -> list[int] | None:
    """The elements of a constant integer tensor of at most 8 elements, else ``None``."""
    if value is None or not value.is_constant() or not isinstance(value.const_value, ir.Tensor):
        return None
    array = value.const_value.numpy()
    if array.size > 8 or not np.issubdtype(array.dtype, np.integer):
        return None
    return [int(v) for v in array.reshape(-1)]


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


