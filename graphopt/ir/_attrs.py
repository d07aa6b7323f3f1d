"""Node attributes.

An :class:`Attr` is immutable: to change an attribute, set a new one on the node. An attribute
read from a model keeps its ``AttributeProto`` and is written back unchanged, except graph
attributes, whose subgraphs are re-emitted from the IR because passes may have changed them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

if TYPE_CHECKING:
    from graphopt.ir._core import Graph
    from graphopt.ir._tensors import Tensor

__all__ = ["Attr", "AttrType"]

AttrType = onnx.AttributeProto.AttributeType

_GRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


class Attr:
    """One node attribute: a name, an ONNX attribute type and a Python value.

    Values: ``int``, ``float``, ``str`` (``bytes`` if not UTF-8), tuples of those, a
    :class:`~graphopt.ir.Tensor`, a :class:`~graphopt.ir.Graph`, a list of graphs, or the raw proto
    for sparse tensors and type protos. ``ref_attr_name`` is set inside function bodies where the
    attribute refers to an attribute of the calling node.

    Example:
        >>> Attr.from_value("axis", 1).type == AttrType.INT
        True
    """

    __slots__ = ("name", "type", "value", "doc_string", "ref_attr_name", "_proto")

    def __init__(self, name: str, type: int, value: Any, *, doc_string: str = "",
                 ref_attr_name: str = "", _proto: onnx.AttributeProto | None = None) -> None:
        self.name = name
        self.type = int(type)
        self.value = value
        self.doc_string = doc_string
        self.ref_attr_name = ref_attr_name
        self._proto = _proto

    def __repr__(self) -> str:  # noqa: D105
        return f"Attr({self.name!r}, {AttrType.Name(self.type)}, {self.value!r})"

    @property
    def is_graph(self) -> bool:
        """True for GRAPH and GRAPHS attributes."""
        return self.type in _GRAPH_TYPES

    def graphs(self) -> list[Graph]:
        """The subgraphs this attribute holds (empty for non-graph attributes)."""
        if self.type == onnx.AttributeProto.GRAPH:
            return [self.value] if self.value is not None else []
        if self.type == onnx.AttributeProto.GRAPHS:
            return list(self.value)
        return []

    @classmethod
    def from_value(cls, name: str, value: Any, type: int | None = None) -> Attr:
        """Build an attribute from a Python value, inferring its type like ``onnx.helper``.

        Example:
            >>> Attr.from_value("perm", [0, 2, 1]).value
            (0, 2, 1)
        """
        from graphopt.ir._core import Graph
        from graphopt.ir._tensors import ArrayTensor, Tensor

        if type is None:
            type = _infer_type(value)
        if type == onnx.AttributeProto.INT:
            value = int(value)
        elif type == onnx.AttributeProto.FLOAT:
            value = float(np.float32(value))
        elif type == onnx.AttributeProto.INTS:
            value = tuple(int(v) for v in value)
        elif type == onnx.AttributeProto.FLOATS:
            value = tuple(float(np.float32(v)) for v in value)
        elif type == onnx.AttributeProto.STRINGS:
            value = tuple(value)
        elif type == onnx.AttributeProto.TENSOR and not isinstance(value, Tensor):
            value = ArrayTensor(np.asarray(value))
        elif type == onnx.AttributeProto.GRAPHS:
            value = list(value)
        elif type == onnx.AttributeProto.GRAPH and not isinstance(value, Graph):
            raise TypeError(f"attribute '{name}': expected a graphopt Graph, got {type(value).__name__}")
        return cls(name, type, value)

    def to_proto(self, graph_to_proto=None) -> onnx.AttributeProto:
        """Return the ``AttributeProto``; graph attributes need ``graph_to_proto(graph)``."""
        if self._proto is not None and not self.is_graph:
            return self._proto
        proto = onnx.AttributeProto()
        proto.name = self.name
        proto.type = self.type
        if self.doc_string:
            proto.doc_string = self.doc_string
        if self.ref_attr_name:
            proto.ref_attr_name = self.ref_attr_name
            return proto
        t, v = self.type, self.value
        A = onnx.AttributeProto
        if t == A.INT:
            proto.i = v
        elif t == A.FLOAT:
            proto.f = v
        elif t == A.STRING:
            proto.s = v.encode() if isinstance(v, str) else v
        elif t == A.INTS:
            proto.ints.extend(v)
        elif t == A.FLOATS:
            proto.floats.extend(v)
        elif t == A.STRINGS:
            proto.strings.extend(s.encode() if isinstance(s, str) else s for s in v)
        elif t == A.TENSOR:
            proto.t.CopyFrom(v.to_proto())
        elif t == A.TENSORS:
            proto.tensors.extend(x.to_proto() for x in v)
        elif t == A.GRAPH:
            proto.g.CopyFrom(graph_to_proto(v))
        elif t == A.GRAPHS:
            proto.graphs.extend(graph_to_proto(g) for g in v)
        elif t == A.SPARSE_TENSOR:
            proto.sparse_tensor.CopyFrom(v)
        elif t == A.SPARSE_TENSORS:
            proto.sparse_tensors.extend(v)
        elif t == A.TYPE_PROTO:
            proto.tp.CopyFrom(v)
        elif t == A.TYPE_PROTOS:
            proto.type_protos.extend(v)
        if self._proto is not None:
            # Keep the original field layout of graph attributes (e.g. an explicit empty doc).
            for field in ("doc_string",):
                if self._proto.HasField(field) and not proto.HasField(field):
                    setattr(proto, field, getattr(self._proto, field))
        return proto


def _infer_type(value: Any) -> int:
    from graphopt.ir._core import Graph
    from graphopt.ir._tensors import Tensor

    A = onnx.AttributeProto
    if isinstance(value, (bool, int, np.integer)):
        return A.INT
    if isinstance(value, (float, np.floating)):
        return A.FLOAT
    if isinstance(value, (str, bytes)):
        return A.STRING
    if isinstance(value, (Tensor, np.ndarray)):
        return A.TENSOR
    if isinstance(value, Graph):
        return A.GRAPH
    if isinstance(value, (list, tuple)):
        if not value:
            raise TypeError("cannot infer the type of an empty list attribute; pass type=")
        first = value[0]
        if isinstance(first, (bool, int, np.integer)):
            return A.INTS
        if isinstance(first, (float, np.floating)):
            return A.FLOATS
        if isinstance(first, (str, bytes)):
            return A.STRINGS
        if isinstance(first, Graph):
            return A.GRAPHS
        if isinstance(first, Tensor):
            return A.TENSORS
    raise TypeError(f"cannot infer an ONNX attribute type for {type(value).__name__}")


def attr_from_proto(proto: onnx.AttributeProto, read_graph, read_tensor) -> Attr:
    """Read an ``AttributeProto``; ``read_graph(GraphProto)`` builds subgraphs in scope."""
    A = onnx.AttributeProto
    t = proto.type
    if proto.ref_attr_name:
        value: Any = None
    elif t == A.INT:
        value = proto.i
    elif t == A.FLOAT:
        value = proto.f
    elif t == A.STRING:
        try:
            value = proto.s.decode()
        except UnicodeDecodeError:
            value = proto.s
    elif t == A.INTS:
        value = tuple(proto.ints)
    elif t == A.FLOATS:
        value = tuple(proto.floats)
    elif t == A.STRINGS:
        value = tuple(s.decode() if _is_utf8(s) else s for s in proto.strings)
    elif t == A.TENSOR:
        value = read_tensor(proto.t)
    elif t == A.TENSORS:
        value = tuple(read_tensor(x) for x in proto.tensors)
    elif t == A.GRAPH:
        value = read_graph(proto.g)
    elif t == A.GRAPHS:
        value = [read_graph(g) for g in proto.graphs]
    elif t == A.SPARSE_TENSOR:
        value = proto.sparse_tensor
    elif t == A.SPARSE_TENSORS:
        value = tuple(proto.sparse_tensors)
    elif t == A.TYPE_PROTO:
        value = proto.tp
    elif t == A.TYPE_PROTOS:
        value = tuple(proto.type_protos)
    else:
        value = None
    attr = Attr(proto.name, t, value, doc_string=proto.doc_string,
                ref_attr_name=proto.ref_attr_name, _proto=proto)
    if t == A.TENSOR and value is not None and value.is_external():
        # The proto points at the old data file; re-emit so the bytes follow the model.
        attr._proto = None
    return attr


def _is_utf8(s: bytes) -> bool:
    try:
        s.decode()
        return True
    except UnicodeDecodeError:
        return False
