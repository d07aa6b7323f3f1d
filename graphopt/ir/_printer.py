"""The canonical text form of a model, in ONNX's text syntax (what ``onnx.parser`` reads).

In canonical form node names are dropped, values are renamed in a deterministic topological order
(a depth-first walk from the graph outputs; graph inputs and outputs keep their names: they are
the model's signature), initializers become ``c0, c1, ...`` in order of first use, and tensors
with more than ``max_elements`` values are shown as ``dtype[shape] <digest>``. Two graphs that
differ only in node names, value names or node order that does not matter print the same, which
makes the text a good golden.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import onnx

from graphopt.ir._attrs import Attr
from graphopt.ir._core import Function, Graph, Model, Node, Value
from graphopt.ir._tensors import SparseTensor, Tensor
from graphopt.ir._types import OtherType, TensorType, dtype_name

__all__ = ["print_model", "print_graph", "canonical_order"]

_INDENT = "   "


def canonical_order(g: Graph) -> list[Node]:
    """Nodes in a deterministic topological order: post-order DFS from the outputs.

    Nodes that no output depends on follow in their list order.
    """
    seen: set[Node] = set()
    order: list[Node] = []
    live = set(g)
    for root in g.outputs:
        _visit(root.producer, g, live, seen, order)
    for n in g:
        _visit(n, g, live, seen, order)
    return order


def _visit(start: Node | None, g: Graph, live: set[Node], seen: set[Node], order: list[Node]) -> None:
    if start is None or start in seen or start not in live:
        return
    # Iterative DFS (deep graphs would overflow Python's recursion limit).
    stack: list[tuple[Node, Iterator[Value | None]]] = [(start, iter(_deps(start)))]
    seen.add(start)
    while stack:
        node, it = stack[-1]
        advanced = False
        for v in it:
            p = v.producer if v is not None else None
            while p is not None and p.graph is not g and p.graph is not None:
                p = p.graph.parent  # a value from a nested scope: depend on the enclosing node
            if p is not None and p not in seen and p in live:
                seen.add(p)
                stack.append((p, iter(_deps(p))))
                advanced = True
                break
        if not advanced:
            stack.pop()
            order.append(node)


def _deps(node: Node) -> list[Value | None]:
    deps = list(node.inputs)
    # Attributes in name order: the canonical order must not depend on how they were listed.
    for attr in sorted(node.attributes.values(), key=lambda a: a.name):
        for sub in attr.graphs():
            for inner in sub.all_nodes():
                deps.extend(inner.inputs)
    return deps


class _Namer:
    def __init__(self, canonical: bool) -> None:
        self.canonical = canonical
        self.names: dict[Value, str] = {}
        self.values = 0
        self.consts = 0

    def keep(self, v: Value) -> None:
        self.names.setdefault(v, v.name)

    def value(self, v: Value) -> None:
        if v not in self.names:
            # An unnamed output is an omitted optional one, unless something reads it.
            if self.canonical and (v.name or v.has_uses() or v.is_graph_output()):
                self.names[v] = f"v{self.values}"
                self.values += 1
            else:
                self.names[v] = v.name

    def const(self, v: Value) -> None:
        if v not in self.names:
            if self.canonical:
                self.names[v] = f"c{self.consts}"
                self.consts += 1
            else:
                self.names[v] = v.name

    def __call__(self, v: Value | None) -> str:
        if v is None:
            return ""
        return self.names.get(v, v.name)


def _fmt_scalar(x, dtype: int) -> str:
    if dtype in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return str(np.float32(x))
    if dtype == onnx.TensorProto.DOUBLE:
        return str(np.float64(x))
    if dtype == onnx.TensorProto.STRING:
        return json.dumps(x.decode(errors="replace") if isinstance(x, bytes) else str(x))
    if dtype == onnx.TensorProto.BOOL:
        return str(int(bool(x)))
    try:
        return str(int(x))
    except (TypeError, ValueError):
        return str(float(x))


def _fmt_tensor(t: Tensor | SparseTensor, max_elements: int) -> str:
    # A scalar is written without brackets (onnx.parser reads `float[]` as a shape to come).
    dims = ",".join(str(d) for d in t.shape)
    head = f"{dtype_name(t.dtype)}[{dims}]" if len(t.shape) else dtype_name(t.dtype)
    size = int(np.prod(t.shape)) if t.shape else 1
    if isinstance(t, SparseTensor) or size > max_elements:
        digest = t.digest() if isinstance(t, Tensor) else "sparse"
        return f"{head} <{digest}>"
    arr = np.asarray(t.numpy()).reshape(-1)
    if t.dtype in _FLOAT8 and arr.dtype.itemsize == 1:
        arr = arr.view(np.uint8)  # onnx's text syntax writes float8 elements as their bit patterns
    return head + " {" + ",".join(_fmt_scalar(x, t.dtype) for x in arr) + "}"


_FLOAT8 = frozenset(getattr(onnx.TensorProto, n) for n in (
    "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0")
    if hasattr(onnx.TensorProto, n))


def _fmt_type(t) -> str:
    if t is None:
        return ""
    if isinstance(t, TensorType):
        # onnx.parser reads `float` as a scalar and `float[]` as a tensor of unknown rank.
        if t.shape is None:
            return dtype_name(t.dtype) + "[]"
        if not t.shape.dims:
            return dtype_name(t.dtype)
        return dtype_name(t.dtype) + "[" + ",".join("?" if d is None else str(d) for d in t.shape.dims) + "]"
    if isinstance(t, OtherType):
        return _fmt_type_proto(t.to_proto())
    return str(t)


def _fmt_type_proto(p: onnx.TypeProto) -> str:
    kind = p.WhichOneof("value")
    if kind == "tensor_type":
        from graphopt.ir._types import type_from_proto

        return _fmt_type(type_from_proto(p))
    if kind == "sequence_type":
        return f"seq({_fmt_type_proto(p.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({_fmt_type_proto(p.optional_type.elem_type)})"
    if kind == "map_type":
        return f"map({dtype_name(p.map_type.key_type)}, {_fmt_type_proto(p.map_type.value_type)})"
    if kind == "sparse_tensor_type":
        st = p.sparse_tensor_type
        dims = ",".join(str(d.dim_value or d.dim_param or "?") for d in st.shape.dim)
        return f"sparse_tensor({dtype_name(st.elem_type)}[{dims}])"
    return kind or "undefined"


class _Printer:
    def __init__(self, canonical: bool, max_elements: int) -> None:
        self.canonical = canonical
        self.max_elements = max_elements
        self.name = _Namer(canonical)
        self.lines: list[str] = []

    def signature_value(self, v: Value) -> str:
        t = _fmt_type(v.type)
        return f"{t} {self.name(v)}" if t else self.name(v)

    def assign_names(self, g: Graph, order: list[Node], keep_signature: bool) -> None:
        for v in g.inputs:
            (self.name.keep if keep_signature else self.name.value)(v)
        if keep_signature:
            for v in g.outputs:
                self.name.keep(v)
        for node in order:
            for v in node.inputs:
                if v is not None and v.graph is g and v.const_value is not None and not v.is_graph_input():
                    self.name.const(v)
        for v in list(g.initializers.values()) + list(g.sparse_initializers.values()):
            if not v.is_graph_input():
                self.name.const(v)
        for node in order:
            for v in node.outputs:
                self.name.value(v)
            # Name subgraph values in the order the attributes are printed (sorted when canonical).
            attrs = sorted(node.attributes.values(), key=lambda a: a.name) if self.canonical \
                else list(node.attributes.values())
            for sub in (sub for a in attrs if a.is_graph for sub in a.graphs()):
                self.assign_names(sub, canonical_order(sub) if self.canonical else list(sub), False)
        if not keep_signature:
            for v in g.outputs:
                self.name.value(v)

    def graph(self, g: Graph, order: list[Node], indent: str, head: str) -> list[str]:
        ins = ", ".join(self.signature_value(v) for v in g.inputs)
        outs = ", ".join(self.signature_value(v) for v in g.outputs)
        lines = [f"{head}{g.name} ({ins}) => ({outs})"]
        # Initializers that are also inputs (IR < 4 defaults) are printed too, under their name.
        inits = list(g.initializers.values()) + list(g.sparse_initializers.values())
        if self.canonical:
            inits.sort(key=lambda v: self.name(v)[:1] + self.name(v)[1:].zfill(8))
        if inits:
            body = ", ".join(f"{_fmt_tensor(v.const_value, self.max_elements).split(' ', 1)[0]} "
                             f"{self.name(v)} = {self._tensor_values(v.const_value)}" for v in inits)
            lines.append(f"{indent}{_INDENT}<{body}>")
        lines.append(f"{indent}{{")
        for node in order:
            lines.extend(self.node(node, indent + _INDENT))
        lines.append(f"{indent}}}")
        return lines

    def _tensor_values(self, t) -> str:
        text = _fmt_tensor(t, self.max_elements)
        return text.split(" ", 1)[1]

    def node(self, node: Node, indent: str) -> list[str]:
        outs = ", ".join(self.name(v) for v in node.outputs)
        op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        attr_text = ""
        sub_lines: list[str] = []
        if node.attributes:
            parts = []
            for a in sorted(node.attributes.values(), key=lambda a: a.name) if self.canonical \
                    else node.attributes.values():
                parts.append(self.attr(a, indent))
            attr_text = " <" + ", ".join(parts) + ">"
        ins = ", ".join(self.name(v) for v in node.inputs)
        name = "" if self.canonical or not node.name else f"  # {node.name}"
        text = f"{indent}{outs} = {op}{attr_text} ({ins}){name}"
        return text.split("\n") + sub_lines

    def attr(self, a: Attr, indent: str) -> str:
        A = onnx.AttributeProto
        if a.ref_attr_name:
            return f"{a.name}: {_ATTR_TYPE_NAMES.get(a.type, 'undefined')} = @{a.ref_attr_name}"
        t, v = a.type, a.value
        if t == A.INT:
            val = str(v)
        elif t == A.FLOAT:
            val = str(np.float32(v))
        elif t == A.STRING:
            val = json.dumps(v if isinstance(v, str) else v.decode(errors="replace"))
        elif t == A.INTS:
            val = "[" + ", ".join(str(x) for x in v) + "]"
        elif t == A.FLOATS:
            val = "[" + ", ".join(str(np.float32(x)) for x in v) + "]"
        elif t == A.STRINGS:
            val = "[" + ", ".join(json.dumps(x if isinstance(x, str) else x.decode(errors="replace"))
                                  for x in v) + "]"
        elif t == A.TENSOR:
            val = _fmt_tensor(v, self.max_elements)
        elif t == A.GRAPH:
            val = "\n".join(self.subgraph(v, indent))
        elif t == A.GRAPHS:
            val = "[" + ", ".join("\n".join(self.subgraph(g, indent)) for g in v) + "]"
        elif t == A.TENSORS:
            val = "[" + ", ".join(_fmt_tensor(x, self.max_elements) for x in v) + "]"
        elif t == A.TYPE_PROTO:
            val = _fmt_type_proto(v)
        elif t == A.TYPE_PROTOS:
            val = "[" + ", ".join(_fmt_type_proto(x) for x in v) + "]"
        else:
            val = "<sparse>"
        return f"{a.name}: {_ATTR_TYPE_NAMES.get(t, 'undefined')} = {val}"

    def subgraph(self, g: Graph, indent: str) -> list[str]:
        order = canonical_order(g) if self.canonical else list(g)
        lines = self.graph(g, order, indent, "")
        return lines


_ATTR_TYPE_NAMES = {
    onnx.AttributeProto.INT: "int", onnx.AttributeProto.FLOAT: "float",
    onnx.AttributeProto.STRING: "string", onnx.AttributeProto.INTS: "ints",
    onnx.AttributeProto.FLOATS: "floats", onnx.AttributeProto.STRINGS: "strings",
    onnx.AttributeProto.TENSOR: "tensor", onnx.AttributeProto.GRAPH: "graph",
    onnx.AttributeProto.GRAPHS: "graphs", onnx.AttributeProto.TENSORS: "tensors",
    onnx.AttributeProto.SPARSE_TENSOR: "sparse_tensor", onnx.AttributeProto.TYPE_PROTO: "type_proto",
    onnx.AttributeProto.TYPE_PROTOS: "type_protos", onnx.AttributeProto.SPARSE_TENSORS: "sparse_tensors",
}


def print_graph(g: Graph, *, canonical: bool = True, max_elements: int = 32) -> str:
    """Text of one graph (see :func:`print_model`)."""
    p = _Printer(canonical, max_elements)
    order = canonical_order(g) if canonical else list(g)
    p.assign_names(g, order, keep_signature=True)
    return "\n".join(p.graph(g, order, "", "")) + "\n"


def print_model(model: Model, *, canonical: bool = True, max_elements: int = 32) -> str:
    """The model in ONNX text syntax; canonical by default (see the module docstring).

    Example:
        >>> print(print_model(model))  # doctest: +SKIP
        <
           ir_version: 8,
           opset_import: ["" : 17]
        >
        main (float[N] x) => (float[N] y)
        {
           y = Relu (x)
        }
    """
    opsets = ", ".join(f'"{d}" : {v}' for d, v in sorted(model.opset_imports.items()) if True)
    head = f"<\n{_INDENT}ir_version: {model.ir_version},\n{_INDENT}opset_import: [{opsets}]\n>\n"
    text = head + print_graph(model.graph, canonical=canonical, max_elements=max_elements)
    for fn in sorted(model.functions.values(), key=lambda f: f.key) if canonical else model.functions.values():
        text += _print_function(fn, canonical, max_elements)
    return text


def _print_function(fn: Function, canonical: bool, max_elements: int) -> str:
    p = _Printer(canonical, max_elements)
    order = canonical_order(fn.graph) if canonical else list(fn.graph)
    p.assign_names(fn.graph, order, keep_signature=True)
    opsets = ", ".join(f'"{d}" : {v}' for d, v in sorted(fn.opset_imports.items()))
    attrs = f" <{', '.join(fn.attributes)}>" if fn.attributes else ""
    ins = ", ".join(p.name(v) for v in fn.graph.inputs)
    outs = ", ".join(p.name(v) for v in fn.graph.outputs)
    lines = [f"<\n  domain: \"{fn.domain}\",\n  opset_import: [{opsets}]\n>",
             f"{fn.name}{attrs}({ins}) => ({outs})", "{"]
    for node in order:
        lines.extend(p.node(node, _INDENT))
    lines.append("}")
    return "\n".join(lines) + "\n"
