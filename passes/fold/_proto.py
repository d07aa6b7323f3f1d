"""Small ONNX protos built from parts of the IR, for onnx shape inference and for evaluation.

Shape inference needs the graph structure and the *types* of the weights, not their bytes: a
"light" proto lists every initializer above a size threshold as a typed graph input instead,
so inferring a 2 GB model serializes a few kilobytes. Small initializers keep their data,
because data propagation (``Reshape`` shapes, ``ConstantOfShape`` sizes) reads it.

:class:`ProtoMap` remembers which IR graph and node each emitted graph and node came from, so
results read from the (re-created) proto can be copied back onto IR values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import onnx

from graphopt import ir

__all__ = ["ProtoMap", "node_to_proto", "light_model_proto", "value_info", "tensor_proto_of",
           "subgraph_proto", "walk_maps", "LIGHT_DATA_BYTES"]

#: Initializers (and ``Constant`` values) up to this many bytes keep their data in light protos.
LIGHT_DATA_BYTES = 8192


@dataclass
class ProtoMap:
    """The IR graph an emitted ``GraphProto`` came from, node by node (``nodes[i]`` made ``node[i]``)."""

    graph: ir.Graph
    nodes: list[ir.Node] = field(default_factory=list)
    #: Maps of the subgraphs, keyed by (emitted node index, attribute name, graph index).
    subgraphs: dict[tuple[int, str, int], ProtoMap] = field(default_factory=dict)


def value_info(name: str, type_: ir.ValueType | None) -> onnx.ValueInfoProto:
    """A ``ValueInfoProto`` for ``name`` with ``type_`` (no type field when unknown)."""
    info = onnx.ValueInfoProto()
    info.name = name
    if type_ is not None:
        info.type.CopyFrom(type_.to_proto())
    return info


def tensor_proto_of(value: ir.Value) -> onnx.TensorProto:
    """The constant of ``value`` as a ``TensorProto`` named like the value, data inline."""
    tensor = value.const_value
    assert isinstance(tensor, ir.Tensor), f"'{value.name}' has no dense constant"
    proto = tensor.to_proto(with_data=True)
    if proto.name != value.name:
        renamed = onnx.TensorProto()
        renamed.CopyFrom(proto)
        renamed.name = value.name
        proto = renamed
    return proto


def node_to_proto(node: ir.Node, write_graph=None) -> onnx.NodeProto:
    """A ``NodeProto`` for ``node``; graph attributes are written with ``write_graph(graph)``."""
    proto = onnx.NodeProto()
    proto.op_type = node.op_type
    if node.domain:
        proto.domain = node.domain
    if node.overload:
        proto.overload = node.overload
    if node.name:
        proto.name = node.name
    proto.input.extend(v.name if v is not None else "" for v in node.inputs)
    proto.output.extend(v.name for v in node.outputs)
    for attr in node.attributes.values():
        proto.attribute.append(attr.to_proto(write_graph))
    return proto


def _dense_type(value: ir.Value) -> ir.TensorType:
    tensor = value.const_value
    assert tensor is not None
    return ir.TensorType(tensor.dtype, ir.Shape(tensor.shape))


def _is_light(tensor: ir.Tensor | ir.SparseTensor | None, keep_bytes: int) -> bool:
    return isinstance(tensor, ir.Tensor) and tensor.nbytes <= keep_bytes


def _light_graph(graph: ir.Graph, keep_bytes: int, is_main: bool,
                 typed_outputs: bool = False) -> tuple[onnx.GraphProto, ProtoMap]:
    proto = onnx.GraphProto()
    proto.name = graph.name or "graph"
    pmap = ProtoMap(graph)
    declared = {v.name for v in graph.inputs}
    for v in graph.inputs:
        proto.input.append(value_info(v.name, v.type))
    for v in list(graph.initializers.values()) + list(graph.sparse_initializers.values()):
        if _is_light(v.const_value, keep_bytes):
            proto.initializer.append(tensor_proto_of(v))
        elif v.name not in declared:
            # Shape inference needs the weight's type only: list it as a typed input.
            proto.input.append(value_info(v.name, _dense_type(v)))
    for node in graph:
        big_constant = _big_constant_value(node, keep_bytes)
        if big_constant is not None and is_main:
            proto.input.append(value_info(node.outputs[0].name,
                                          ir.TensorType(big_constant.dtype, ir.Shape(big_constant.shape))))
            continue
        index = len(proto.node)
        subgraph_maps: dict[tuple[int, str, int], ProtoMap] = {}

        def write(sub: ir.Graph, _index: int = index, _node: ir.Node = node,
                  _maps: dict = subgraph_maps) -> onnx.GraphProto:
            sub_proto, sub_map = _light_graph(sub, keep_bytes, False, typed_outputs)
            name = next(a.name for a in _node.attributes.values() if any(g is sub for g in a.graphs()))
            k = sum(1 for key in _maps if key[1] == name)
            _maps[(_index, name, k)] = sub_map
            return sub_proto

        proto.node.append(node_to_proto(node, write))
        pmap.nodes.append(node)
        pmap.subgraphs.update(subgraph_maps)
    for v in graph.outputs:
        # Declared output types are left out for inference: a stale one would leak into it.
        proto.output.append(value_info(v.name, v.type if typed_outputs else None))
    return proto, pmap


def subgraph_proto(graph: ir.Graph) -> onnx.GraphProto:
    """A complete ``GraphProto`` of a subgraph (all data inline, declared types kept), to run it."""
    return _light_graph(graph, 1 << 62, False, True)[0]


def _big_constant_value(node: ir.Node, keep_bytes: int) -> ir.Tensor | None:
    """The tensor of a ``Constant`` node holding more than ``keep_bytes`` (else ``None``)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    attr = node.attributes.get("value")
    if attr is None or not isinstance(attr.value, ir.Tensor):
        return None
    return attr.value if attr.value.nbytes > keep_bytes else None


def _function_proto(fn: ir.Function) -> onnx.FunctionProto:
    proto = onnx.FunctionProto()
    proto.name = fn.name
    proto.domain = fn.domain
    if fn.overload:
        proto.overload = fn.overload
    proto.input.extend(v.name for v in fn.graph.inputs)
    proto.output.extend(v.name for v in fn.graph.outputs)
    proto.attribute.extend(fn.attributes)

    def write(sub: ir.Graph) -> onnx.GraphProto:
        return _light_graph(sub, 1 << 62, False)[0]

    for attr in fn.attribute_defaults:
        proto.attribute_proto.append(attr.to_proto(write))
    for node in fn.graph:
        proto.node.append(node_to_proto(node, write))
    for domain, version in fn.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    return proto


def light_model_proto(model: ir.Model, *, keep_bytes: int = LIGHT_DATA_BYTES,
                      ir_version: int | None = None) -> tuple[onnx.ModelProto, ProtoMap]:
    """The model without large tensor payloads, and the map back to its IR graphs.

    Initializers over ``keep_bytes`` become typed graph inputs; ``Constant`` nodes of the main
    graph over ``keep_bytes`` become typed graph inputs too; intermediate ``value_info`` and
    declared output shapes are left out so inference starts from the graph alone.
    """
    proto = onnx.ModelProto()
    proto.ir_version = ir_version if ir_version is not None else max(model.ir_version, 4)
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    graph_proto, pmap = _light_graph(model.graph, keep_bytes, True)
    proto.graph.CopyFrom(graph_proto)
    for fn in model.functions.values():
        proto.functions.append(_function_proto(fn))
    return proto, pmap


def walk_maps(root: ProtoMap, graph: onnx.GraphProto) -> Iterable[tuple[ProtoMap, onnx.GraphProto]]:
    """Pairs of (map, graph proto) for ``root`` and every nested subgraph of ``graph``."""
    pending = [(root, graph)]
    while pending:
        pmap, gproto = pending.pop()
        yield pmap, gproto
        for (index, name, k), sub_map in pmap.subgraphs.items():
            if index >= len(gproto.node):
                continue
            attr = next((a for a in gproto.node[index].attribute if a.name == name), None)
            if attr is None:
                continue
            if attr.type == onnx.AttributeProto.GRAPH and k == 0:
                pending.append((sub_map, attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS and k < len(attr.graphs):
                pending.append((sub_map, attr.graphs[k]))

