"""Facts about a model that every cleanup pass must respect before it drops or renames a value."""

from __future__ import annotations

import onnx

from graphopt import ir

__all__ = ["pinned_outputs", "training_names", "training_domains", "describe", "is_default_domain"]


def pinned_outputs(model: ir.Model) -> set[int]:
    """Ids of every value listed as an output of some graph (main, subgraph or function body).

    A value listed as the output of *any* graph must survive, even where its own graph does
    not list it (a subgraph may, in invalid but loadable models, return an outer value).
    """
    return {id(v) for g in model.all_graphs() for v in g.outputs}


def training_names(model: ir.Model) -> set[str]:
    """Names the model's ``training_info`` refers to (bindings and values its graphs read).

    Training graphs read the inference graph's initializers by name; graphopt does not model
    them, so the cleanup passes never drop or rename a value with one of these names.
    """
    names: set[str] = set()
    for info in model.training_info:
        for binding in list(info.initialization_binding) + list(info.update_binding):
            names.add(binding.key)
            names.add(binding.value)
        for graph in (info.initialization, info.algorithm):
            _collect_graph_names(graph, names)
    names.discard("")
    return names


def _collect_graph_names(graph: onnx.GraphProto, names: set[str]) -> None:
    pending = [graph]
    while pending:
        g = pending.pop()
        names.update(v.name for v in g.output)
        for node in g.node:
            names.update(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    pending.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    pending.extend(attr.graphs)


def training_domains(model: ir.Model) -> set[str]:
    """Operator domains used by nodes of the model's ``training_info`` graphs."""
    domains: set[str] = set()
    pending: list[onnx.GraphProto] = []
    for info in model.training_info:
        pending.extend([info.initialization, info.algorithm])
    while pending:
        g = pending.pop()
        for node in g.node:
            domains.add(node.domain)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    pending.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    pending.extend(attr.graphs)
    return domains


def is_default_domain(domain: str) -> bool:
    """True for the standard ONNX operator domain (spelled ``""`` or ``"ai.onnx"``)."""
    return domain in ("", "ai.onnx")


def describe(node: ir.Node) -> str:
    """A short human name for a node in log lines and bisect messages."""
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    return f"{op} '{node.name}'" if node.name else f"{op} -> {', '.join(v.name for v in node.outputs)}"

