"""Reading ONNX protos into the IR and writing them back, losslessly.

Everything the IR does not model (training_info, device configurations, quantization
annotations, presence of fields set to their default value) is carried as is, and pieces that no
pass touched (nodes, tensors, attributes, value infos) are written back as the very protos they
were read from. ``to_proto(from_proto(m)) == m`` holds field by field.

Loading does the least it can per node, since a model has thousands: a node keeps its
``NodeProto`` (and its encoding), reads its attributes only when asked (except those holding
subgraphs, whose reads of outer values are uses), and is written back as read until it changes;
declared value types are decoded on first use too.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from itertools import chain
from typing import Callable, Iterable

import onnx

from graphopt.errors import ExternalDataError, ModelLoadError
from graphopt.ir._attrs import _GRAPH_TYPES, Attr, attr_from_proto
from graphopt.ir._core import _NOT_READ, Function, Graph, Model, Node, Value
from graphopt.ir._tensors import ExternalTensor, ProtoTensor, SparseTensor, Tensor
from graphopt.ir._types import Shape, TensorType

__all__ = ["model_from_proto", "model_to_proto", "graph_to_proto", "encode_nodes",
           "UndecodableNameError"]

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

    def __init__(self, base_dir: str | None, owned: bool,
                 main_tensors: dict[int, Callable[[onnx.TensorProto], Tensor]] | None = None) -> None:
        self.base_dir = base_dir
        self.owned = owned
        self.main_tensors = main_tensors or {}
        # Reads one attribute of a node without subgraphs, when the node's attributes are first
        # asked for (most never are: saving writes the node's proto back as is).
        self.read_attribute = partial(attr_from_proto, read_graph=_no_graph, read_tensor=self.tensor)

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

        # Values are created directly, not with ``Graph.add_input``: the model has no name cache
        # to update while it is being read.
        inputs = g.inputs
        for name in formal_inputs or ():
            v = scope[name] = Value(name)
            v.graph = g
            inputs.append(v)
        apply_info = self._apply_info
        for info in proto.input:
            name = info.name
            v = scope[name] = Value(name)
            v.graph = g
            inputs.append(v)
            apply_info(g, "input", v, info)
        # Initializers of the main graph whose bytes were left in the file: built by the loader.
        special = self.main_tensors if not outer and parent is None else {}
        for index, tproto in enumerate(proto.initializer):
            make = special.get(index)
            tensor = self.tensor(tproto) if make is None else make(tproto)
            name = tensor.name
            existing = scope.get(name)
            if existing is not None and existing.graph is g and existing.const_value is None:
                existing.const_value = tensor  # IR < 4: an initializer that is also an input
                g.initializers[name] = existing
                continue
            v = Value(name, TensorType(tproto.data_type, Shape(tproto.dims)), const_value=tensor)
            v._loaded_type = v.type
            v.graph = g
            g.initializers[name] = v
            scope[name] = v
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
        # producers come later (unsorted graphs load; the verifier reports them). This loop runs
        # once per node of the model: it reads each NodeProto field once and builds nothing the
        # save does not need (attributes are read on demand, the proto is written back as is).
        read_attribute = self.read_attribute
        owned = self.owned
        nodes: list[Node] = []
        input_names: list[list[str]] = []
        keys: list[tuple[str, str, str, str, str]] = []
        for nproto in proto.node:
            key = (nproto.name, nproto.op_type, nproto.domain, nproto.overload, nproto.doc_string)
            outs = []
            for oname in nproto.output[:]:
                v = Value(oname)
                if oname:
                    scope[oname] = v
                outs.append(v)
            # Whether the node holds subgraphs, from its encoding (see _GRAPH_TYPE_ENCODING),
            # which is kept for the save. A Constant may hold a large tensor: its attribute's
            # type is read instead.
            encoded = nproto.SerializeToString() if key[1] != "Constant" else None
            if not owned and encoded is not None:
                # The caller keeps the proto and may edit it: the node keeps a copy of its own.
                nproto = onnx.NodeProto.FromString(encoded)
            if (encoded is not None and _GRAPH_TYPE_ENCODING.search(encoded) is None) \
                    or not _holds_graphs(nproto):
                node = Node._from_source(nproto, key, outs, read_attribute, encoded)
                if not owned and encoded is None:
                    node._source_key = None  # a Constant of the caller's proto: written from the IR
            else:
                node = Node._from_source(nproto, key, outs, None)
                node._attrs = {}  # read below, once every value of this scope exists
                node._source_key = None  # its subgraphs are written from the IR
            nodes.append(node)
            input_names.append(nproto.input[:])
            keys.append(key)
        g._append_loaded(nodes)

        for node, names in zip(nodes, input_names):
            ins: list[Value | None] = []
            for i, iname in enumerate(names):
                if not iname:
                    ins.append(None)
                    continue
                v = scope.get(iname) or _lookup(scopes, iname)  # most are defined in this graph
                if v is None:
                    where = f"'{node.name}'" if node.name else f"#{i}"
                    raise ModelLoadError(
                        f"node {node.op_type} {where} reads '{iname}', which no node, graph input "
                        f"or initializer of graph '{proto.name}' (or an enclosing scope) defines")
                v._uses[(node, i)] = None
                ins.append(v)
            node._inputs = tuple(ins)
            attrs = node._attrs
            if attrs is not None:  # a node with subgraphs: read its attributes in scope
                read_graph = lambda gp, node=node: self.graph(gp, scopes, node)  # noqa: E731
                for aproto in node._source.attribute:
                    attr = attr_from_proto(aproto, read_graph, self.tensor)
                    attrs[attr.name] = attr

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
        # Every name defined here (inputs, initializers, node outputs) is a key of ``scope``;
        # graph outputs and node inputs resolve to such names, here or in an enclosing graph.
        if _any_bytes(scope) or _any_bytes(chain.from_iterable(keys)) or _any_bytes((g.name, g.doc_string)):
            raise UndecodableNameError()
        return g

    @staticmethod
    def _apply_info(g: Graph, role: str, v: Value, info: onnx.ValueInfoProto) -> None:
        g._infos[(role, v)] = info
        t = v._type
        if t is _NOT_READ:
            t = v.type  # declared by an earlier entry, which may have no type
        if t is None:
            # The first entry with a type gives the value's type, read when first asked for.
            v._type = _NOT_READ
            v._type_source = info
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
        if _any_bytes((fn.domain, fn.name, fn.overload, fn.doc_string)):
            raise UndecodableNameError()
        return fn


def _outputs_scope(g: Graph) -> dict[str, Value]:
    return {v.name: v for n in g for v in n.outputs if v.name}


def _lookup(scopes: list[dict[str, Value]], name: str) -> Value | None:
    for scope in reversed(scopes):
        v = scope.get(name)
        if v is not None:
            return v
    return None


class UndecodableNameError(ModelLoadError):
    """A name or string field of the proto is not valid UTF-8 (the file is corrupt).

    protobuf does not check proto2 strings when parsing: an invalid one comes back as ``bytes``.
    """

    def __init__(self) -> None:
        super().__init__("the model has a name or string field that is not valid UTF-8; "
                         "the file is corrupt")


def _any_bytes(strings: Iterable[str | bytes]) -> bool:
    """True when one of ``strings`` is ``bytes`` (what protobuf gives for invalid UTF-8)."""
    try:
        "".join(strings)  # one C loop over thousands of names; it refuses a bytes item
    except TypeError:
        return True
    return False


# The encoding of an AttributeProto of type GRAPH (5) or GRAPHS (10) holds its ``type`` field
# (number 20, a varint: key bytes a0 01) as a0 01 05 or a0 01 0a. A node whose encoding has
# neither holds no subgraph; searching the encoding costs less than reading every attribute's
# type (protobuf builds a Python object per attribute). The bytes can also occur by chance
# (inside a name or tensor data): then the attribute types are read to be sure.
_GRAPH_TYPE_ENCODING = re.compile(b"\xa0\x01[\x05\x0a]")


def _holds_graphs(nproto: onnx.NodeProto) -> bool:
    """True when some attribute of ``nproto`` is of type GRAPH or GRAPHS."""
    return any(a.type in _GRAPH_TYPES for a in nproto.attribute)


def _no_graph(proto: onnx.GraphProto) -> Graph:
    raise AssertionError("a node whose attributes are read on demand holds no subgraph")


def model_from_proto(proto: onnx.ModelProto, base_dir: str | None = None, *,
                     owned: bool = False,
                     main_tensors: dict[int, Callable[[onnx.TensorProto], Tensor]] | None = None) -> Model:
    """Build the IR of ``proto``. External data is resolved (lazily) against ``base_dir``.

    The proto is not modified. The IR refers to it: tensors, declared types and the attributes
    of ``Constant`` nodes are read from it when first used, and written back from it while
    unchanged; unchanged nodes are written back as read. Unless ``owned`` (the caller parsed
    the proto and hands it over), nodes keep a copy of their proto: the caller may edit its own.
    ``main_tensors`` maps positions of main-graph initializers to a function that builds the
    tensor from the proto (the loader's, for weights whose bytes stay in the file).
    """
    reader = _Reader(base_dir, owned, main_tensors)
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
    if _any_bytes((model.producer_name, model.producer_version, model.domain, model.doc_string)):
        raise UndecodableNameError()
    return model


def _value_info(g: Graph, role: str, v: Value) -> onnx.ValueInfoProto:
    original = g._infos.get((role, v))
    type_as_read = v._type is _NOT_READ or v._type is v._loaded_type
    if original is not None and original.name == v.name and type_as_read:
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
                   proto: onnx.GraphProto | None = None, *, initializers: bool = True,
                   nodes: bool = True) -> onnx.GraphProto:
    """Write a graph (and its subgraphs); ``write_tensor`` decides how initializers are stored.

    With ``proto`` given, the graph is written into it (saves a copy of large initializers).
    With ``initializers=False`` this graph's (dense) initializers are left out, for a writer
    that streams them itself; those of subgraphs are always written. With ``nodes=False`` the
    nodes are left out, for a writer that encodes them itself (see :func:`encode_nodes`).
    """
    if proto is None:
        proto = onnx.GraphProto()
    if nodes:
        _add_nodes(proto.node, g, write_tensor)
    _set_fields(proto, g, _GRAPH_DEFAULTS, g._explicit)
    for name, v in (g.initializers.items() if initializers else ()):
        t = v.const_value
        if isinstance(t, Tensor):
            t.name = v.name
            proto.initializer.append(write_tensor(t))
    for v in g.sparse_initializers.values():
        proto.sparse_initializer.append(v.const_value.to_proto(v.name))
    proto.input.extend([_value_info(g, "input", v) for v in g.inputs])
    proto.output.extend([_value_info(g, "output", v) for v in g.outputs])
    # An entry whose node a pass removed is stale: left out.
    proto.value_info.extend([_value_info(g, "value_info", v) for v in g.value_info
                             if v.producer is None or v.producer.is_live()])
    if g.quantization_annotation:
        proto.quantization_annotation.extend(g.quantization_annotation)
    if g.metadata_props:
        for k, val in g.metadata_props.items():
            proto.metadata_props.add(key=k, value=val)
    return proto


def _add_nodes(container, g: Graph, write_tensor: TensorWriter) -> None:
    """Append the nodes of ``g`` to a repeated ``NodeProto`` field."""
    unchanged: list[onnx.NodeProto] = []  # a run of nodes written back as read, added at once
    for node in g:
        source = _unchanged_source(node)
        if source is not None:
            unchanged.append(source)
            continue
        if unchanged:
            container.extend(unchanged)
            unchanged = []
        _node_to_proto(node, write_tensor, container.add())
    if unchanged:
        container.extend(unchanged)


def encode_nodes(g: Graph) -> list[bytes]:
    """The encoded ``NodeProto`` of each node of ``g``, in order, tensors inline.

    A writer that frames them as ``GraphProto.node`` fields itself saves copying every node
    into a graph message before encoding it.
    """
    out = []
    for node in g:
        source = _unchanged_source(node)
        if source is None:
            out.append(_node_to_proto(node, _inline).SerializeToString())
        else:
            encoded = node._encoded
            out.append(encoded if encoded is not None else source.SerializeToString())
    return out


def _unchanged_source(node: Node) -> onnx.NodeProto | None:
    """The proto ``node`` was read from, when writing the node would reproduce it exactly."""
    key = node._source_key
    if key is None or key != (node.name, node.op_type, node.domain, node.overload, node.doc_string):
        return None  # new, or changed (inputs, outputs, attributes, value names, fields)
    source = node._source
    attrs = node._attrs
    if attrs is not None:
        # Read, hence possibly edited in place: unchanged when it holds the very Attr objects
        # read from the proto, in order (an Attr is immutable and keeps its proto).
        protos = source.attribute
        if len(attrs) != len(protos) or any(a._proto is not p for a, p in zip(attrs.values(), protos)):
            return None
    props = node._metadata_props
    if props is not _NOT_READ and (props or {}) != {p.key: p.value for p in source.metadata_props}:
        return None
    return source


def _node_to_proto(node: Node, write_tensor: TensorWriter, p: onnx.NodeProto | None = None) -> onnx.NodeProto:
    # Filling ``graph.node.add()`` in place saves copying each NodeProto into the graph.
    if p is None:
        p = onnx.NodeProto()
    source = node._source
    p.input.extend([v.name if v is not None else "" for v in node.inputs])
    p.output.extend([v.name for v in node.outputs])
    explicit = _explicit_defaults(source, _NODE_DEFAULTS) if source is not None else ()
    _set_fields(p, node, _NODE_DEFAULTS, explicit)
    p.op_type = node.op_type
    for attr in node.attributes.values():
        p.attribute.append(attr.to_proto(lambda sub: graph_to_proto(sub, write_tensor)))
    if node.metadata_props:
        for k, val in node.metadata_props.items():
            p.metadata_props.add(key=k, value=val)
    if source is not None and len(source.device_configurations):
        p.device_configurations.extend(source.device_configurations)  # not modeled: kept as read
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
    _add_nodes(p.node, fn.graph, _inline)
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
                   main_initializers: bool = True, main_nodes: bool = True) -> onnx.ModelProto:
    """Write the whole model. With the default writer all tensors are stored inline.

    ``main_initializers=False`` and ``main_nodes=False`` leave the main graph's initializers or
    nodes out (see ``graph_to_proto``).
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
    graph_to_proto(model.graph, write_tensor, p.graph, initializers=main_initializers,
                   nodes=main_nodes)
    for k, val in model.metadata_props.items():
        p.metadata_props.add(key=k, value=val)
    if model.training_info:
        p.training_info.extend(model.training_info)
    for fn in model.functions.values():
        p.functions.append(_function_to_proto(fn))
    if model.configuration:
        p.configuration.extend(model.configuration)
    return p
