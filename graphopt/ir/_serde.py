"""Reading ONNX protos into the IR and writing them back, losslessly.

Everything the IR does not model (training_info, device configurations, quantization
annotations, presence of fields set to their default value) is carried as is, and pieces that no
pass touched (tensors, attributes, value infos) are written back as the very protos they were
read from. ``to_proto(from_proto(m)) == m`` holds field by field.
"""

from __future__ import annotations

import logging
from typing import Callable

import onnx

from graphopt.errors import ExternalDataError, ModelLoadError
from graphopt.ir._attrs import Attr, attr_from_proto
from graphopt.ir._core import Function, Graph, Model, Node, Value
from graphopt.ir._tensors import ExternalTensor, ProtoTensor, SparseTensor, Tensor
from graphopt.ir._types import TensorType, type_from_proto

__all__ = ["model_from_proto", "model_to_proto", "graph_to_proto"]

logger = logging.getLogger(__name__)

_NODE_DEFAULTS = ("name", "domain", "doc_string", "overload")
_GRAPH_DEFAULTS = ("name", "doc_string")
_MODEL_DEFAULTS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")
_FUNCTION_DEFAULTS = ("doc_string", "overload")


def _explicit_defaults(proto, fields: tuple[str, ...]) -> tuple[str, ...]:
    """Fields present in ``proto`` although they hold the default value (proto2 presence)."""
    out = []
    for f in fields:
        if not getattr(proto, f) and proto.HasField(f):  # the cheap test first
            out.append(f)
    return tuple(out)


def _set_fields(proto, obj, fields: tuple[str, ...], explicit: tuple[str, ...]) -> None:
    for f in fields:
        v = getattr(obj, f)
        if v or f in explicit:
            setattr(proto, f, v)


class _Reader:
    """Builds the IR of one model; resolves names through nested scopes."""

    def __init__(self, base_dir: str | None) -> None:
        self.base_dir = base_dir

    def tensor(self, proto: onnx.TensorProto) -> Tensor:
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            if self.base_dir is None:
                raise ExternalDataError(
                    f"tensor '{proto.name}' has external data but the model was given as bytes or a "
                    "proto; load it from its path, or pass base_dir= to graphopt.load")
            return ExternalTensor(proto, self.base_dir)
        return ProtoTensor(proto)

    def graph(self, proto: onnx.GraphProto, outer: list[dict[str, Value]],
              parent: Node | None = None, formal_inputs: list[str] | None = None) -> Graph:
        g = Graph(proto.name, doc_string=proto.doc_string)
        g._explicit = _explicit_defaults(proto, _GRAPH_DEFAULTS)
        g.parent = parent
        scope: dict[str, Value] = {}
        scopes = outer + [scope]

        for name in formal_inputs or ():
            scope[name] = g.add_input(name)
        for info in proto.input:
            v = g.add_input(info.name)
            self._apply_info(g, "input", v, info)
            scope[info.name] = v
        for tproto in proto.initializer:
            tensor = self.tensor(tproto)
            existing = scope.get(tproto.name)
            if existing is not None and existing.graph is g and existing.const_value is None:
                existing.const_value = tensor  # IR < 4: an initializer that is also an input
                g.initializers[tproto.name] = existing
                continue
            v = Value(tproto.name, TensorType(tensor.dtype, tensor.shape), const_value=tensor)
            v._loaded_type = v.type
            v.graph = g
            g.initializers[tproto.name] = v
            scope[tproto.name] = v
        for sproto in proto.sparse_initializer:
            name = sproto.values.name
            existing = scope.get(name)
            sparse = SparseTensor(sproto)
            if existing is not None and existing.graph is g and existing.const_value is None:
                existing.const_value = sparse
                g.sparse_initializers[name] = existing
            else:
                v = Value(name, TensorType(sparse.dtype, sparse.shape), const_value=sparse)
                v._loaded_type = v.type
                v.graph = g
                g.sparse_initializers[name] = v
                scope[name] = v
            g._sparse_order.append(name)

        # Create every node and its outputs first, so that inputs can be resolved even when the
        # producers come later (unsorted graphs load; the verifier reports them).
        nodes: list[tuple[Node, onnx.NodeProto]] = []
        for nproto in proto.node:
            outs = []
            for oname in nproto.output:
                v = Value(oname)
                if oname:
                    scope[oname] = v
                outs.append(v)
            node = Node(nproto.domain, nproto.op_type, (), outputs=outs, name=nproto.name,
                        overload=nproto.overload, doc_string=nproto.doc_string)
            node._explicit = _explicit_defaults(nproto, _NODE_DEFAULTS)
            if nproto.metadata_props:
                node.metadata_props = {p.key: p.value for p in nproto.metadata_props}
            if len(nproto.device_configurations):
                extra = onnx.NodeProto()
                extra.device_configurations.extend(nproto.device_configurations)
                node._extra = extra
            nodes.append((node, nproto))
            g.append(node)

        for node, nproto in nodes:
            ins: list[Value | None] = []
            for iname in nproto.input:
                if not iname:
                    ins.append(None)
                    continue
                v = scope.get(iname)  # most inputs are defined in this graph
                if v is None:
                    v = _lookup(scopes, iname)
                if v is None:
                    where = f"'{nproto.name}'" if nproto.name else f"#{len(ins)}"
                    raise ModelLoadError(
                        f"node {nproto.op_type} {where} reads '{iname}', which no node, graph input "
                        f"or initializer of graph '{proto.name}' (or an enclosing scope) defines")
                ins.append(v)
            node.set_inputs(ins)
            read_graph = lambda gp, node=node: self.graph(gp, scopes, node)  # noqa: E731
            for aproto in nproto.attribute:
                attr = attr_from_proto(aproto, read_graph, self.tensor)
                node.attributes[attr.name] = attr

        for info in proto.output:
            v = _lookup(scopes, info.name)
            if v is None:
                raise ModelLoadError(
                    f"graph '{proto.name}' output '{info.name}' is not produced by any node, input "
                    "or initializer")
            self._apply_info(g, "output", v, info)
            g.outputs.append(v)
        for info in proto.value_info:
            v = scope.get(info.name)
            if v is None:
                v = Value(info.name)  # describes nothing in this graph: kept until cleanup
            self._apply_info(g, "value_info", v, info)
            g.value_info.append(v)
        g.quantization_annotation = list(proto.quantization_annotation)
        if proto.metadata_props:
            g.metadata_props = {p.key: p.value for p in proto.metadata_props}
        return g

    @staticmethod
    def _apply_info(g: Graph, role: str, v: Value, info: onnx.ValueInfoProto) -> None:
        g._infos[(role, v)] = info
        if info.HasField("type") and v.type is None:
            v.type = type_from_proto(info.type)
            v._loaded_type = v.type
        if info.doc_string and not v.doc_string:
            v.doc_string = info.doc_string
        if info.metadata_props and v.metadata_props is None:
            v.metadata_props = {p.key: p.value for p in info.metadata_props}

    def function(self, proto: onnx.FunctionProto) -> Function:
        gp = onnx.GraphProto()
        gp.node.extend(proto.node)
        gp.value_info.extend(proto.value_info)
        body = self.graph(gp, [], formal_inputs=list(proto.input))
        scope = {v.name: v for v in body.inputs}
        scope.update(_outputs_scope(body))
        for name in proto.output:
            v = scope.get(name)
            if v is None:
                raise ModelLoadError(f"function '{proto.name}' output '{name}' is not produced in its body")
            body.outputs.append(v)
        defaults = [attr_from_proto(a, lambda sub: self.graph(sub, [scope]), self.tensor)
                    for a in proto.attribute_proto]
        fn = Function(proto.domain, proto.name, body, overload=proto.overload,
                      attributes=list(proto.attribute), attribute_defaults=defaults,
                      opset_imports={o.domain: o.version for o in proto.opset_import},
                      doc_string=proto.doc_string)
        fn._explicit = _explicit_defaults(proto, _FUNCTION_DEFAULTS)
        if proto.metadata_props:
            fn.metadata_props = {p.key: p.value for p in proto.metadata_props}
        return fn


def _outputs_scope(g: Graph) -> dict[str, Value]:
    return {v.name: v for n in g for v in n.outputs if v.name}


def _lookup(scopes: list[dict[str, Value]], name: str) -> Value | None:
    for scope in reversed(scopes):
        v = scope.get(name)
        if v is not None:
            return v
    return None


def model_from_proto(proto: onnx.ModelProto, base_dir: str | None = None) -> Model:
    """Build the IR of ``proto``. External data is resolved (lazily) against ``base_dir``.

    The proto is not modified; tensors of the IR refer to it until a pass replaces them.
    """
    reader = _Reader(base_dir)
    graph = reader.graph(proto.graph, [])
    model = Model(graph, ir_version=proto.ir_version,
                  opset_imports={o.domain: o.version for o in proto.opset_import},
                  producer_name=proto.producer_name, producer_version=proto.producer_version,
                  domain=proto.domain, model_version=proto.model_version,
                  doc_string=proto.doc_string)
    model._explicit = _explicit_defaults(proto, _MODEL_DEFAULTS)
    model.meta["_opset_protos"] = (dict(model.opset_imports), list(proto.opset_import))
    model.base_dir = base_dir
    model.metadata_props = {p.key: p.value for p in proto.metadata_props}
    for fproto in proto.functions:
        model.add_function(reader.function(fproto))
    model.training_info = list(proto.training_info)
    model.configuration = list(proto.configuration)
    return model


def _value_info(g: Graph, role: str, v: Value) -> onnx.ValueInfoProto:
    original = g._infos.get((role, v))
    if original is not None and original.name == v.name and v.type is v._loaded_type:
        return original
    info = onnx.ValueInfoProto()
    info.name = v.name
    if v.type is not None:
        info.type.CopyFrom(v.type.to_proto())
    if v.doc_string:
        info.doc_string = v.doc_string
    if v.metadata_props:
        for k, val in v.metadata_props.items():
            info.metadata_props.add(key=k, value=val)
    return info


TensorWriter = Callable[[Tensor], onnx.TensorProto]


def _inline(tensor: Tensor) -> onnx.TensorProto:
    return tensor.to_proto(with_data=True)


def graph_to_proto(g: Graph, write_tensor: TensorWriter = _inline,
                   proto: onnx.GraphProto | None = None, *, initializers: bool = True) -> onnx.GraphProto:
    """Write a graph (and its subgraphs); ``write_tensor`` decides how initializers are stored.

    With ``proto`` given, the graph is written into it (saves a copy of large initializers).
    With ``initializers=False`` this graph's (dense) initializers are left out, for a writer
    that streams them itself; those of subgraphs are always written.
    """
    if proto is None:
        proto = onnx.GraphProto()
    for node in g:
        _node_to_proto(node, write_tensor, proto.node.add())
    _set_fields(proto, g, _GRAPH_DEFAULTS, g._explicit)
    for name, v in (g.initializers.items() if initializers else ()):
        t = v.const_value
        if isinstance(t, Tensor):
            t.name = v.name
            proto.initializer.append(write_tensor(t))
    for v in g.sparse_initializers.values():
        proto.sparse_initializer.append(v.const_value.to_proto(v.name))
    for v in g.inputs:
        proto.input.append(_value_info(g, "input", v))
    for v in g.outputs:
        proto.output.append(_value_info(g, "output", v))
    for v in g.value_info:
        if v.producer is not None and not v.producer.is_live():
            continue  # its node was removed by a pass: the entry is stale
        proto.value_info.append(_value_info(g, "value_info", v))
    if g.quantization_annotation:
        proto.quantization_annotation.extend(g.quantization_annotation)
    if g.metadata_props:
        for k, val in g.metadata_props.items():
            proto.metadata_props.add(key=k, value=val)
    return proto


def _node_to_proto(node: Node, write_tensor: TensorWriter, p: onnx.NodeProto | None = None) -> onnx.NodeProto:
    # Filling ``graph.node.add()`` in place saves copying each NodeProto into the graph.
    if p is None:
        p = onnx.NodeProto()
    p.input.extend([v.name if v is not None else "" for v in node.inputs])
    p.output.extend([v.name for v in node.outputs])
    _set_fields(p, node, _NODE_DEFAULTS, node._explicit)
    p.op_type = node.op_type
    for attr in node.attributes.values():
        p.attribute.append(attr.to_proto(lambda sub: graph_to_proto(sub, write_tensor)))
    if node.metadata_props:
        for k, val in node.metadata_props.items():
            p.metadata_props.add(key=k, value=val)
    if node._extra is not None:
        p.device_configurations.extend(node._extra.device_configurations)
    return p


def _function_to_proto(fn: Function) -> onnx.FunctionProto:
    p = onnx.FunctionProto()
    p.name = fn.name
    p.domain = fn.domain
    _set_fields(p, fn, _FUNCTION_DEFAULTS, fn._explicit)
    p.input.extend(v.name for v in fn.graph.inputs)
    p.output.extend(v.name for v in fn.graph.outputs)
    p.attribute.extend(fn.attributes)
    for a in fn.attribute_defaults:
        p.attribute_proto.append(a.to_proto(graph_to_proto))
    for node in fn.graph:
        _node_to_proto(node, _inline, p.node.add())
    for domain, version in fn.opset_imports.items():
        p.opset_import.add(domain=domain, version=version)
    for v in fn.graph.value_info:
        if v.producer is not None and not v.producer.is_live():
            continue
        p.value_info.append(_value_info(fn.graph, "value_info", v))
    if fn.metadata_props:
        for k, val in fn.metadata_props.items():
            p.metadata_props.add(key=k, value=val)
    return p


def model_to_proto(model: Model, write_tensor: TensorWriter = _inline, *,
                   main_initializers: bool = True) -> onnx.ModelProto:
    """Write the whole model. With the default writer all tensors are stored inline.

    ``main_initializers=False`` leaves the main graph's initializers out (see ``graph_to_proto``).
    """
    p = onnx.ModelProto()
    p.ir_version = model.ir_version
    loaded = model.meta.get("_opset_protos")
    if loaded is not None and loaded[0] == model.opset_imports:
        p.opset_import.extend(loaded[1])  # unchanged: keep field presence as read
    else:
        for domain, version in model.opset_imports.items():
            p.opset_import.add(domain=domain, version=version)
    _set_fields(p, model, _MODEL_DEFAULTS, model._explicit)
    graph_to_proto(model.graph, write_tensor, p.graph, initializers=main_initializers)
    for k, val in model.metadata_props.items():
        p.metadata_props.add(key=k, value=val)
    if model.training_info:
        p.training_info.extend(model.training_info)
    for fn in model.functions.values():
        p.functions.append(_function_to_proto(fn))
    if model.configuration:
        p.configuration.extend(model.configuration)
    return p
