"""The IR verifier: invariants every pass must keep.

Checked: each value has one producer and sits at its recorded output index; use lists mirror node
inputs exactly (no missing, no stale entries); nodes are in topological order; values are read
only where they are in scope (same graph before the reader, or an enclosing graph before the
node that holds the subgraph); every value name is defined once in the model; every node's
domain is imported; the default opset is one that the installed onnx knows.
"""

from __future__ import annotations

import onnx

from graphopt.errors import VerificationError
from graphopt.ir._core import Graph, Model, Node, Value

__all__ = ["verify", "find_problems"]


def find_problems(model: Model, *, max_opset: int | None = None) -> list[str]:
    """Return a list of broken invariants (empty when the model is sound)."""
    problems: list[str] = []
    max_opset = max_opset or onnx.defs.onnx_opset_version()
    default = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if default is not None and default > max_opset:
        problems.append(f"the model imports opset {default} of the default domain; the installed "
                        f"onnx supports up to {max_opset}")
    _check_graph(model.graph, model.opset_imports, [], problems, [], "main graph")
    for fn in model.functions.values():
        _check_graph(fn.graph, fn.opset_imports, [], problems, [], f"function {fn.name}")
    return problems


def verify(model: Model, **kwargs) -> None:
    """Raise :class:`VerificationError` listing every broken invariant.

    Example:
        >>> verify(model)  # doctest: +SKIP
    """
    problems = find_problems(model, **kwargs)
    if problems:
        raise VerificationError(problems)


def _describe(node: Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} node"


def _check_graph(g: Graph, imports: dict[str, int], outer: list[set[Value]], problems: list[str],
                 outer_names: list[dict[str, Value]], where: str) -> None:
    # Names are single-assignment across nested scopes, but sibling subgraphs may reuse a name.
    defined: dict[str, Value] = {}
    names = outer_names + [defined]
    visible: set[Value] = set(g.inputs)
    visible.update(g.initializers.values())
    visible.update(g.sparse_initializers.values())
    for v in visible:
        _define(v, names, problems, where)
    scopes = outer + [visible]
    seen_nodes: set[Node] = set()
    for node in g:
        if node.graph is not g:
            problems.append(f"{where}: {_describe(node)} is listed in the graph but points to another")
        if node in seen_nodes:
            problems.append(f"{where}: {_describe(node)} appears twice in the node list")
        seen_nodes.add(node)
        domain = node.domain if node.domain != "ai.onnx" else ""
        if domain not in imports and not (domain == "" and "ai.onnx" in imports):
            problems.append(f"{where}: {_describe(node)} uses domain '{node.domain}', which the "
                            "model does not import (add it to opset_import)")
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if not v.name:
                # Written out, an empty name means "input omitted": the edge would be lost.
                problems.append(f"{where}: input {i} of {_describe(node)} is a value with no name "
                                "(name it, e.g. with Model.unique_name)")
            if (node, i) not in v._uses:
                problems.append(f"{where}: use list of '{v.name}' misses input {i} of {_describe(node)}")
            if not any(v in s for s in scopes):
                if v.producer is not None and v.producer.graph is g:
                    problems.append(f"{where}: {_describe(node)} reads '{v.name}' before it is "
                                    "computed (nodes are not in topological order)")
                else:
                    problems.append(f"{where}: {_describe(node)} reads '{v.name}', which is not "
                                    "defined in this graph or an enclosing one")
        for sub in node.subgraphs():
            if sub.parent is not node:
                problems.append(f"{where}: a subgraph of {_describe(node)} does not point back to it")
            _check_graph(sub, imports, scopes, problems, names, f"{where} > {node.op_type} body")
        for i, v in enumerate(node.outputs):
            if v.producer is not node or v.index != i:
                problems.append(f"{where}: output {i} '{v.name}' of {_describe(node)} records another producer")
            if v.name:
                _define(v, names, problems, where)
            visible.add(v)
    for v in list(visible) + _all_used(g):
        for user, i in v._uses:
            if i >= len(user.inputs) or user.inputs[i] is not v:
                problems.append(f"{where}: use list of '{v.name}' names input {i} of "
                                f"{_describe(user)}, which reads something else")
            elif not user.is_live():
                problems.append(f"{where}: use list of '{v.name}' names a removed {_describe(user)}")
            elif not _attached(user):
                problems.append(f"{where}: use list of '{v.name}' names {_describe(user)} of a "
                                "subgraph that is no longer in the model (detach_inputs() the "
                                "nodes of a dropped subgraph)")
    for v in g.outputs:
        if not any(v in s for s in scopes):
            problems.append(f"{where}: graph output '{v.name}' is not defined in the graph")


def _attached(node: Node) -> bool:
    """True when the node's graph is reachable from a model or function through live nodes."""
    g = node.graph
    while g is not None and g.parent is not None:
        parent = g.parent
        if not parent.is_live() or all(sub is not g for sub in parent.subgraphs()):
            return False
        g = parent.graph
    return g is not None and (g.model is not None or g.function is not None)


def _all_used(g: Graph) -> list[Value]:
    return [v for n in g for v in n.inputs if v is not None and v.producer is None and v.graph is None]


def _define(v: Value, names: list[dict[str, Value]], problems: list[str], where: str) -> None:
    if not v.name:
        return
    for scope in names:
        other = scope.get(v.name)
        if other is not None and other is not v:
            problems.append(f"{where}: value name '{v.name}' is defined more than once")
            return
    names[-1][v.name] = v
