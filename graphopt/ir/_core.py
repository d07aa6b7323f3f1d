"""The graph IR: :class:`Value`, :class:`Node`, :class:`Graph`, :class:`Function`, :class:`Model`.

Use-def chains are kept true by every mutation method: a node's inputs are changed only through
``Node`` methods, which update the ``uses`` of the values involved. A value used inside a subgraph
but defined in an enclosing graph records that inner use like any other, so dead-code removal
never drops a value an ``If`` or ``Loop`` body still reads.

Nodes of a graph live in a doubly linked list of link boxes. Removing a node erases its box,
which keeps its links, so an iterator standing on it moves on to the next live node: removing
nodes while iterating is safe. A node inserted again gets a new box, so moving the node the
iterator stands on neither skips nor repeats the nodes after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx

from graphopt.ir._attrs import Attr
from graphopt.ir._types import OtherType, Shape, TensorType, ValueType, type_from_proto

if TYPE_CHECKING:
    from graphopt.ir._tensors import SparseTensor, Tensor

__all__ = ["Value", "Node", "Graph", "Function", "Model", "Use"]

#: A use of a value: the consuming node and the input index.
Use = tuple["Node", int]

#: A field of a loaded object not read from its proto yet (``Value._type``,
#: ``Node._metadata_props``): it is read when first asked for.
_NOT_READ = object()


class Value:
    """A named value: a graph input, an initializer, or a node output.

    Attributes:
        name: the ONNX name ("" for an omitted optional output).
        type: a :class:`TensorType`, :class:`OtherType` or ``None`` when unknown.
        const_value: the tensor of an initializer (or a folded constant), else ``None``.
        producer: the node that computes it, or ``None`` for graph inputs and initializers.
        index: the output index in ``producer``.
        graph: the graph that owns it when it is a graph input or initializer.
        meta: free-form per-value notes of passes; never written to the model.

    Example:
        >>> v = Value("x", TensorType(onnx.TensorProto.FLOAT, ["N", 3]))
        >>> v.shape.dims, v.uses()
        (('N', 3), [])
    """

    __slots__ = ("_name", "_type", "const_value", "producer", "index", "graph", "doc_string",
                 "metadata_props", "_meta", "_uses", "_loaded_type", "_type_source")

    def __init__(self, name: str = "", type: ValueType | None = None, *,
                 const_value: Tensor | SparseTensor | None = None) -> None:
        self._name = name
        # ``_NOT_READ`` while the type of a loaded value is still in ``_type_source`` (the
        # ValueInfoProto it was declared in; that slot is set only then).
        self._type: ValueType | None | object = type
        self.const_value = const_value
        self.producer: Node | None = None
        self.index: int | None = None
        self.graph: Graph | None = None
        self.doc_string = ""
        self.metadata_props: dict[str, str] | None = None
        self._meta: dict[str, Any] | None = None  # created on first use: most values never get notes
        # Ordered set of (node, input index); dict keeps insertion order.
        self._uses: dict[Use, None] = {}
        self._loaded_type: ValueType | None = None

    def __repr__(self) -> str:  # noqa: D105
        return f"Value({self.name!r}, {self.type})"

    @property
    def type(self) -> ValueType | None:
        """A :class:`TensorType`, an :class:`OtherType`, or ``None`` when unknown."""
        t = self._type
        if t is _NOT_READ:
            # Read on first use: most declared types of a loaded model are written back as is.
            info = self._type_source
            t = type_from_proto(info.type) if info.HasField("type") else None
            self._type = self._loaded_type = t
        return t  # type: ignore[return-value]

    @type.setter
    def type(self, type: ValueType | None) -> None:
        self._type = type

    @property
    def name(self) -> str:
        """The ONNX name ("" for an omitted optional output)."""
        return self._name

    @name.setter
    def name(self, name: str) -> None:
        self._name = name
        # The nodes that write or read the value must be written anew, not from the proto
        # they were read from.
        if self.producer is not None:
            self.producer._source_key = None
        for node, _ in self._uses:
            node._source_key = None
        # Keep Model.unique_name from handing out a name that a value in the model now has.
        owner = self.owning_graph()
        if name and owner is not None:
            owner._note_names((name,))

    @property
    def meta(self) -> dict[str, Any]:
        """Free-form per-value notes of passes; never written to the model."""
        meta = self._meta
        if meta is None:
            meta = self._meta = {}
        return meta

    @meta.setter
    def meta(self, meta: dict[str, Any]) -> None:
        self._meta = meta

    # -- type shortcuts --------------------------------------------------------------------------
    @property
    def dtype(self) -> int | None:
        """Element type when the value is a tensor of known type."""
        t = self.type
        if isinstance(t, TensorType):
            return t.dtype
        if self.const_value is not None:
            return self.const_value.dtype
        return None

    @property
    def shape(self) -> Shape | None:
        """Shape when known (from the type, or from the constant)."""
        t = self.type
        if isinstance(t, TensorType) and t.shape is not None:
            return t.shape
        if self.const_value is not None:
            return Shape(self.const_value.shape)
        return None

    # -- uses --------------------------------------------------------------------------------------
    def uses(self) -> list[Use]:
        """A snapshot list of ``(node, input_index)``; safe to rewire while iterating it."""
        return list(self._uses)

    def users(self) -> list[Node]:
        """The distinct nodes that read this value, in order of first use."""
        return list(dict.fromkeys(node for node, _ in self._uses))

    def has_uses(self) -> bool:
        """True when some node (in any scope) reads the value."""
        return bool(self._uses)

    @property
    def num_uses(self) -> int:
        """Number of input slots that read the value."""
        return len(self._uses)

    # -- role ----------------------------------------------------------------------------------------
    def owning_graph(self) -> Graph | None:
        """The graph whose input, initializer or node output this value is."""
        if self.producer is not None:
            return self.producer.graph
        return self.graph

    def is_graph_input(self) -> bool:
        """True when the value is listed among its graph's inputs."""
        g = self.graph
        return g is not None and any(v is self for v in g.inputs)

    def is_initializer(self) -> bool:
        """True when the value is an initializer of its graph."""
        g = self.graph
        return g is not None and g.initializers.get(self.name) is self

    def is_graph_output(self) -> bool:
        """True when the value is listed among its owning graph's outputs."""
        g = self.owning_graph()
        return g is not None and any(v is self for v in g.outputs)

    def is_constant(self) -> bool:
        """True when the value has a constant tensor that no caller can override.

        An initializer that is also a graph input (IR < 4 style) can be fed at run time, so it is
        not constant.
        """
        return self.const_value is not None and not self.is_graph_input()

    # -- rewiring ------------------------------------------------------------------------------------
    def replace_all_uses_with(self, other: Value, *, rename_graph_outputs: bool = False) -> None:
        """Make every reader of this value read ``other`` instead.

        If this value is a graph output, the call is refused unless ``rename_graph_outputs`` is
        true; then ``other`` takes over the output's name and type (through an ``Identity`` when
        ``other`` already has a name it must keep: a graph input, an initializer or another
        graph output), so the graph's signature does not change.
        """
        if other is self:
            return
        owner = self.owning_graph()
        is_output = owner is not None and any(v is self for v in owner.outputs)
        if is_output and not rename_graph_outputs:
            raise ValueError(
                f"value '{self.name}' is a graph output; pass rename_graph_outputs=True to let "
                f"'{other.name}' take its place")
        for node, i in self.uses():
            node.replace_input(i, other)
        if is_output:
            assert owner is not None
            target = other
            keeps_name = (other.producer is None or other.is_graph_output()
                          or other.owning_graph() is not owner)
            if keeps_name:
                ident = Node("", "Identity", [other], num_outputs=1)
                # The Identity must follow the node computing ``other`` when that node is in
                # this graph (it may come after the old producer); otherwise any place works.
                anchor = next((p for p in (other.producer, self.producer)
                               if p is not None and p.graph is owner), None)
                owner.insert_after(anchor, ident) if anchor is not None else owner.append(ident)
                target = ident.outputs[0]
            old_name = self.name
            model = owner.root_model()
            self.name = model.unique_name(old_name + "_old") if model is not None else old_name + "_old"
            target.name = old_name
            if target.type is None or (isinstance(self.type, TensorType) and isinstance(target.type, TensorType)
                                       and self.type.dtype == target.type.dtype) \
                    or (isinstance(self.type, OtherType) and isinstance(target.type, OtherType)):
                target.type = self.type if target.type is None else _keep_declared(self.type, target.type)
            owner.outputs[:] = [target if v is self else v for v in owner.outputs]


def _keep_declared(declared: ValueType | None, new: ValueType) -> ValueType:
    """The output's declared type, refined by the new value's where the declared dim is unknown."""
    if not isinstance(declared, TensorType) or not isinstance(new, TensorType):
        return declared if declared is not None else new
    if declared.shape is None or new.shape is None or declared.shape.rank != new.shape.rank:
        return declared
    dims = [d if d is not None else n for d, n in zip(declared.shape.dims, new.shape.dims)]
    if tuple(dims) == declared.shape.dims:
        return declared
    return TensorType(declared.dtype, Shape(dims))


class Node:
    """An operator application.

    Inputs are a tuple of :class:`Value` or ``None`` (an omitted optional input); change them only
    with :meth:`replace_input`, :meth:`set_inputs` or :meth:`append_input`, which keep use lists
    true. Outputs are created with the node. A node read from a model reads its attributes on
    first access and is written back as read until something about it changes.

    Example:
        >>> x = Value("x")
        >>> relu = Node("", "Relu", [x])
        >>> x.uses() == [(relu, 0)]
        True
    """

    __slots__ = ("name", "domain", "op_type", "overload", "_inputs", "_outputs", "_attrs",
                 "doc_string", "_metadata_props", "_meta", "graph", "_link", "_source",
                 "_source_key", "_encoded", "_read_attribute")

    def __init__(self, domain: str, op_type: str, inputs: Sequence[Value | None] = (), *,
                 attributes: Iterable[Attr] | dict[str, Any] = (), num_outputs: int = 1,
                 outputs: Sequence[Value] | None = None, name: str = "", overload: str = "",
                 doc_string: str = "") -> None:
        self.name = name
        self.domain = domain
        self.op_type = op_type
        self.overload = overload
        self.doc_string = doc_string
        self._metadata_props: dict[str, str] | None | object = None
        self._meta: dict[str, Any] | None = None  # created on first use
        self.graph: Graph | None = None
        self._link: _Link | None = None  # the node's box in its graph's list; None when detached
        # A node read from a model keeps its NodeProto (``_source``): saving writes it back as is
        # while ``_source_key`` (name, op_type, domain, overload, doc_string as read) still
        # matches; changing inputs, outputs, attributes or a value name clears the key. Fields
        # graphopt does not model (device_configurations) are taken from it when it is not.
        self._source: onnx.NodeProto | None = None
        self._source_key: tuple[str, str, str, str, str] | None = None
        self._encoded: bytes | None = None  # ``_source`` encoded, when the loader had it so
        # Set while the attributes of a loaded node are still unread (``_attrs`` is then None).
        self._read_attribute: Callable[[onnx.AttributeProto], Attr] | None = None
        self._attrs: dict[str, Attr] | None
        if isinstance(attributes, dict):
            self._attrs = {
                k: (v if isinstance(v, Attr) else Attr.from_value(k, v)) for k, v in attributes.items()}
        else:
            self._attrs = {a.name: a for a in attributes}
        self._inputs: tuple[Value | None, ...] = tuple(inputs)
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses[(self, i)] = None
        if outputs is None:
            outputs = [Value() for _ in range(num_outputs)]
        self._outputs: tuple[Value, ...] = tuple(outputs)
        for i, v in enumerate(self._outputs):
            if v.producer is not None and v.producer is not self:
                raise ValueError(f"value '{v.name}' already has a producer ({v.producer.op_type})")
            v.producer = self
            v.index = i
        for a in self._attrs.values():
            for g in a.graphs():
                g.parent = self

    @classmethod
    def _from_source(cls, source: onnx.NodeProto, key: tuple[str, str, str, str, str],
                     outputs: list[Value],
                     read_attribute: Callable[[onnx.AttributeProto], Attr] | None,
                     encoded: bytes | None = None) -> Node:
        """A node read from ``source``; ``key`` is its (name, op_type, domain, overload, doc_string).

        ``encoded``, if given, is ``source.SerializeToString()``: saving writes it while the node
        is unchanged. The loader sets the inputs once every value of the graph exists. With
        ``read_attribute``, the attributes are read from ``source`` when first asked for;
        without it, the caller sets ``_attrs`` (attributes holding subgraphs are read at load:
        their outer-scope reads are uses). Skips ``__init__``: loading builds one node per
        ``NodeProto``.
        """
        node = cls.__new__(cls)
        node.name, node.op_type, node.domain, node.overload, node.doc_string = key
        node._metadata_props = _NOT_READ
        node._meta = None
        node.graph = None
        node._link = None
        node._inputs = ()
        node._outputs = tuple(outputs)
        for i, v in enumerate(outputs):
            v.producer = node
            v.index = i
        node._attrs = None
        node._read_attribute = read_attribute
        node._source = source
        node._source_key = key
        node._encoded = encoded
        return node

    def __repr__(self) -> str:  # noqa: D105
        ins = ", ".join(v.name if v is not None else "" for v in self._inputs)
        outs = ", ".join(v.name for v in self._outputs)
        dom = f"{self.domain}." if self.domain else ""
        return f"Node({outs} = {dom}{self.op_type}({ins}))"

    # -- inputs and outputs ---------------------------------------------------------------------------
    @property
    def inputs(self) -> tuple[Value | None, ...]:
        """The input values (``None`` where an optional input is omitted)."""
        return self._inputs

    @property
    def outputs(self) -> tuple[Value, ...]:
        """The output values."""
        return self._outputs

    def replace_input(self, index: int, value: Value | None) -> None:
        """Set input ``index`` to ``value``, updating both values' use lists."""
        # Uses are keyed by the non-negative slot; normalize (and range-check) negative indices.
        index = range(len(self._inputs))[index]
        old = self._inputs[index]
        if old is value:
            return
        self._source_key = None
        if old is not None:
            old._uses.pop((self, index), None)
        ins = list(self._inputs)
        ins[index] = value
        self._inputs = tuple(ins)
        if value is not None:
            value._uses[(self, index)] = None

    def replace_input_with(self, old: Value, new: Value | None) -> None:
        """Replace every occurrence of ``old`` among the inputs with ``new``."""
        for i, v in enumerate(self._inputs):
            if v is old:
                self.replace_input(i, new)

    def set_inputs(self, values: Sequence[Value | None]) -> None:
        """Replace the whole input list."""
        self._source_key = None
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.pop((self, i), None)
        self._inputs = tuple(values)
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses[(self, i)] = None

    def append_input(self, value: Value | None) -> None:
        """Add an input at the end."""
        self.set_inputs(list(self._inputs) + [value])

    def set_outputs(self, outputs: Sequence[Value]) -> None:
        """Replace the output list (old outputs lose their producer)."""
        self._source_key = None
        for v in self._outputs:
            if v.producer is self:
                v.producer = None
                v.index = None
        self._outputs = tuple(outputs)
        for i, v in enumerate(self._outputs):
            v.producer = self
            v.index = i

    def detach_inputs(self) -> None:
        """Drop this node's uses, and those of every node in its subgraphs (used on removal)."""
        self._source_key = None
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.pop((self, i), None)
        self._inputs = tuple(None for _ in self._inputs)
        for g in self.subgraphs():
            for inner in g:
                inner.detach_inputs()

    # -- attributes -----------------------------------------------------------------------------
    @property
    def attributes(self) -> dict[str, Attr]:
        """The attributes by name (a live dict; :meth:`set_attr` also records subgraphs).

        A loaded node reads its attributes from its proto on first access.
        """
        attrs = self._attrs
        if attrs is None:
            read = self._read_attribute
            assert read is not None and self._source is not None
            attrs = {}
            for proto in self._source.attribute:
                a = read(proto)
                attrs[a.name] = a
            self._attrs = attrs
            self._read_attribute = None
        return attrs

    @attributes.setter
    def attributes(self, attributes: dict[str, Attr]) -> None:
        self._attrs = attributes
        self._read_attribute = None
        self._source_key = None

    @property
    def metadata_props(self) -> dict[str, str] | None:
        """The ONNX ``metadata_props`` of the node (``None`` when it has none)."""
        props = self._metadata_props
        if props is _NOT_READ:
            assert self._source is not None
            entries = self._source.metadata_props
            props = self._metadata_props = {p.key: p.value for p in entries} if entries else None
        return props  # type: ignore[return-value]

    @metadata_props.setter
    def metadata_props(self, props: dict[str, str] | None) -> None:
        self._metadata_props = props

    @property
    def meta(self) -> dict[str, Any]:
        """Free-form per-node notes of passes (e.g. ``created_by``); never written to the model."""
        meta = self._meta
        if meta is None:
            meta = self._meta = {}
        return meta

    @meta.setter
    def meta(self, meta: dict[str, Any]) -> None:
        self._meta = meta

    def attr(self, name: str, default: Any = None) -> Any:
        """The Python value of attribute ``name``, or ``default`` when absent.

        Example:
            >>> Node("", "Concat", [], attributes={"axis": 1}).attr("axis")
            1
        """
        a = self.attributes.get(name)
        return default if a is None else a.value

    def set_attr(self, name: str, value: Any, type: int | None = None) -> None:
        """Set (or replace) attribute ``name``."""
        attr = value if isinstance(value, Attr) else Attr.from_value(name, value, type)
        self.attributes[name] = attr
        self._source_key = None
        for g in attr.graphs():
            g.parent = self
            if self.graph is not None:
                self.graph._note_names(_graph_names(g))

    def subgraphs(self) -> list[Graph]:
        """Graphs held in this node's attributes (If branches, Loop/Scan bodies...)."""
        attrs = self._attrs
        if attrs is None:
            return []  # unread attributes hold no graph: the loader reads graph attributes at once
        out: list[Graph] = []
        for a in attrs.values():
            if a.is_graph:
                out.extend(a.graphs())
        return out

    # -- context ---------------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The opset version of this node's domain, from the model or function that holds it."""
        g = self.graph
        imports = g.opset_imports() if g is not None else {}
        if self.domain in ("", "ai.onnx"):
            # The default domain may be imported under either spelling.
            return imports.get("", imports.get("ai.onnx"))
        return imports.get(self.domain)

    def is_live(self) -> bool:
        """True while the node belongs to a graph."""
        return self._link is not None


class _Link:
    """A node's place in a graph's node list; erased (never reused) when the node is removed."""

    __slots__ = ("node", "prev", "next", "erased")

    def __init__(self, node: Node, prev: _Link | None = None) -> None:
        self.node = node
        self.prev = prev
        self.next: _Link | None = None
        self.erased = False


def _graph_names(g: Graph) -> Iterator[str]:
    """Every value name a graph defines: inputs, initializers and node outputs, recursively."""
    for v in g.inputs:
        yield v.name
    yield from g.initializers
    yield from g.sparse_initializers
    for node in g:
        yield from _defined_names(node)


def _defined_names(node: Node) -> Iterator[str]:
    """The names of a node's outputs and of every value defined in its subgraphs."""
    for v in node.outputs:
        yield v.name
    for sub in node.subgraphs():
        yield from _graph_names(sub)


class Graph:
    """A graph: inputs, outputs, initializers and an ordered list of nodes.

    Iterating a graph yields its nodes in order; removing nodes during the iteration is safe.

    Example:
        >>> g = Graph(name="g")
        >>> x = g.add_input("x", TensorType(onnx.TensorProto.FLOAT, [2]))
        >>> relu = g.append(Node("", "Relu", [x]))
        >>> g.outputs.append(relu.outputs[0]); len(g)
        1
    """

    __slots__ = ("name", "inputs", "outputs", "initializers", "sparse_initializers", "value_info",
                 "doc_string", "metadata_props", "quantization_annotation", "parent", "model",
                 "function", "_head", "_tail", "_len", "_infos", "_explicit", "_sparse_order")

    def __init__(self, name: str = "", *, doc_string: str = "") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.initializers: dict[str, Value] = {}
        self.sparse_initializers: dict[str, Value] = {}
        self.value_info: list[Value] = []
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] | None = None
        self.quantization_annotation: list[onnx.TensorAnnotation] = []
        self.parent: Node | None = None
        self.model: Model | None = None
        self.function: Function | None = None
        self._head: _Link | None = None
        self._tail: _Link | None = None
        self._len = 0
        # Original ValueInfoProtos by (role, value), re-emitted verbatim while unchanged.
        self._infos: dict[tuple[str, Value], onnx.ValueInfoProto] = {}
        self._explicit: tuple[str, ...] = ()
        self._sparse_order: list[str] = []

    def __repr__(self) -> str:  # noqa: D105
        return f"Graph({self.name!r}, {self._len} nodes)"

    # -- node list ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Node]:
        link = self._head
        while link is not None:
            if not link.erased:
                yield link.node
            link = link.next  # an erased box keeps its links: the walk goes on from it

    def __reversed__(self) -> Iterator[Node]:
        link = self._tail
        while link is not None:
            if not link.erased:
                yield link.node
            link = link.prev
            while link is not None and link.erased:
                link = link.prev

    @property
    def nodes(self) -> list[Node]:
        """A snapshot list of the nodes, in order."""
        return list(self)

    def _new_link(self, node: Node) -> _Link:
        if node._link is not None:
            raise ValueError(f"{node!r} already belongs to a graph; remove it first")
        link = _Link(node)
        node._link = link
        node.graph = self
        self._note_names(_defined_names(node))
        return link

    def _check_anchor(self, anchor: Node) -> _Link:
        if anchor.graph is not self or anchor._link is None:
            raise ValueError(f"anchor {anchor!r} is not in graph '{self.name}'")
        return anchor._link

    def _note_names(self, names: Iterable[str]) -> None:
        """Add names now defined in this graph to the model's name cache, if it was built."""
        model = self.root_model()
        if model is not None and model._names is not None:
            model._names.update(names)

    def append(self, node: Node) -> Node:
        """Add ``node`` at the end; returns it."""
        link = self._new_link(node)
        link.prev = self._tail
        if self._tail is not None:
            self._tail.next = link
        else:
            self._head = link
        self._tail = link
        self._len += 1
        return node

    def extend(self, nodes: Iterable[Node]) -> None:
        """Append several nodes."""
        for n in nodes:
            self.append(n)

    def _append_loaded(self, nodes: list[Node]) -> None:
        """Append nodes just read from a proto, which belong to no graph yet.

        No name bookkeeping: while a model is being read it has no name cache to update
        (``Model.unique_name`` builds it on first use).
        """
        tail = self._tail
        for node in nodes:
            link = node._link = _Link(node, tail)
            node.graph = self
            if tail is not None:
                tail.next = link
            else:
                self._head = link
            tail = link
        self._tail = tail
        self._len += len(nodes)

    def insert_before(self, anchor: Node | None, node: Node) -> Node:
        """Insert ``node`` just before ``anchor`` (at the end when ``anchor`` is ``None``)."""
        if anchor is None:
            return self.append(node)
        at = self._check_anchor(anchor)
        link = self._new_link(node)
        link.prev = at.prev
        link.next = at
        if at.prev is not None:
            at.prev.next = link
        else:
            self._head = link
        at.prev = link
        self._len += 1
        return node

    def insert_after(self, anchor: Node | None, node: Node) -> Node:
        """Insert ``node`` just after ``anchor`` (at the start when ``anchor`` is ``None``)."""
        if anchor is None:
            if self._head is None:
                return self.append(node)
            return self.insert_before(self._head.node, node)
        at = self._check_anchor(anchor)
        if at.next is None:
            return self.append(node)
        return self.insert_before(at.next.node, node)

    def remove(self, node: Node, *, force: bool = False) -> None:
        """Unlink ``node`` from the graph and drop its (and its subgraphs') uses of values.

        Refused when an output is still read or is a graph output, unless ``force`` is true.
        The node's erased link box keeps its links, so iterators standing on it continue.
        """
        link = node._link
        if node.graph is not self or link is None:
            raise ValueError(f"{node!r} is not in graph '{self.name}'")
        if not force:
            for out in node.outputs:
                if out.has_uses():
                    user = out.uses()[0][0]
                    raise ValueError(f"cannot remove {node!r}: output '{out.name}' is still used by {user!r}")
                if any(v is out for v in self.outputs):
                    raise ValueError(f"cannot remove {node!r}: output '{out.name}' is a graph output")
        node.detach_inputs()
        prev, nxt = link.prev, link.next
        if prev is not None:
            prev.next = nxt
        else:
            self._head = nxt
        if nxt is not None:
            nxt.prev = prev
        else:
            self._tail = prev
        link.erased = True
        node._link = None
        node.graph = None
        self._len -= 1

    def _relink(self, order: list[Node]) -> None:
        """Replace the node order with ``order`` (the same nodes), used by sorting."""
        prev: _Link | None = None
        head: _Link | None = None
        for n in order:
            link = n._link
            assert link is not None and n.graph is self
            link.prev = prev
            link.next = None
            if prev is not None:
                prev.next = link
            else:
                head = link
            prev = link
        self._head = head
        self._tail = prev
        self._len = len(order)

    # -- values -----------------------------------------------------------------------------------
    def add_input(self, name: str, type: ValueType | None = None) -> Value:
        """Create and append a graph input."""
        v = Value(name, type)
        v.graph = self
        self.inputs.append(v)
        self._note_names((name,))
        return v

    def add_initializer(self, name: str, tensor: Tensor) -> Value:
        """Create an initializer value holding ``tensor`` (its name is set to ``name``)."""
        if name in self.initializers:
            raise ValueError(f"graph '{self.name}' already has an initializer named '{name}'")
        tensor.name = name
        v = Value(name, TensorType(tensor.dtype, Shape(tensor.shape)), const_value=tensor)
        v.graph = self
        self.initializers[name] = v
        self._note_names((name,))
        return v

    def remove_initializer(self, value: Value) -> None:
        """Drop an initializer (it must be unused, and not a graph input or output)."""
        if value.has_uses():
            raise ValueError(f"initializer '{value.name}' is still used")
        # Dropping the default of an input (IR < 4) or an output's value changes the signature.
        if any(v is value for v in self.inputs) or any(v is value for v in self.outputs):
            raise ValueError(f"initializer '{value.name}' is a graph input or output of graph "
                             f"'{self.name}'; remove it from there first")
        for table in (self.initializers, self.sparse_initializers):
            if table.get(value.name) is value:
                del table[value.name]
                return
        for key, v in list(self.initializers.items()):
            if v is value:
                del self.initializers[key]
                return
        raise ValueError(f"'{value.name}' is not an initializer of graph '{self.name}'")

    def rename_initializer(self, value: Value, new_name: str) -> None:
        """Rename an initializer, keeping the table keyed by name."""
        items = [(new_name if v is value else k, v) for k, v in self.initializers.items()]
        self.initializers = dict(items)
        value.name = new_name
        if value.const_value is not None:
            value.const_value.name = new_name

    # -- structure -----------------------------------------------------------------------------
    def root_model(self) -> Model | None:
        """The model this graph belongs to, walking up through parent nodes."""
        g: Graph | None = self
        while g is not None:
            if g.model is not None:
                return g.model
            if g.function is not None:
                return g.function.model
            g = g.parent.graph if g.parent is not None else None
        return None

    def opset_imports(self) -> dict[str, int]:
        """Opset imports in force: the enclosing function's, else the model's."""
        g: Graph | None = self
        while g is not None:
            if g.function is not None:
                return g.function.opset_imports
            if g.model is not None:
                return g.model.opset_imports
            g = g.parent.graph if g.parent is not None else None
        return {}

    def all_nodes(self) -> Iterator[Node]:
        """Every node of this graph and of all nested subgraphs, outer before inner."""
        # Walks the links itself (as __iter__ does): one generator per graph, not two.
        link = self._head
        while link is not None:
            if not link.erased:
                node = link.node
                yield node
                if node._attrs is not None:  # unread attributes hold no graph
                    for sub in node.subgraphs():
                        yield from sub.all_nodes()
            link = link.next

    def subgraphs(self) -> Iterator[Graph]:
        """Every nested subgraph (recursively)."""
        for node in self:
            if node._attrs is None:
                continue  # unread attributes hold no graph (see Node.subgraphs)
            for sub in node.subgraphs():
                yield sub
                yield from sub.subgraphs()

    def constant_inputs(self) -> dict[str, Value]:
        """Initializers and sparse initializers by name."""
        return {**self.initializers, **self.sparse_initializers}

    def sort(self) -> bool:
        """Sort the nodes topologically, keeping the current order where it is already valid.

        Returns whether the order changed. Raises :class:`~graphopt.errors.VerificationError`
        when the graph has a cycle. Subgraphs are not sorted here (passes recurse).
        """
        from graphopt.errors import VerificationError

        nodes = list(self)
        index = {n: i for i, n in enumerate(nodes)}
        # Dependencies through values produced in this graph, including those read by
        # subgraphs of a node (an outer value read inside an If branch must come first).
        deps: dict[Node, set[Node]] = {}
        for n in nodes:
            d: set[Node] = set()
            for v in _reads(n):
                p = v.producer
                while p is not None and p.graph is not self:
                    p = p.graph.parent if p.graph is not None else None
                if p is not None and p is not n and p in index:
                    d.add(p)
            deps[n] = d
        users: dict[Node, list[Node]] = {n: [] for n in nodes}
        pending = {n: len(d) for n, d in deps.items()}
        for n, d in deps.items():
            for p in d:
                users[p].append(n)
        import heapq

        ready = [index[n] for n in nodes if pending[n] == 0]
        heapq.heapify(ready)
        order: list[Node] = []
        while ready:
            n = nodes[heapq.heappop(ready)]
            order.append(n)
            for u in users[n]:
                pending[u] -= 1
                if pending[u] == 0:
                    heapq.heappush(ready, index[u])
        if len(order) != len(nodes):
            stuck = [n for n in nodes if pending[n] > 0]
            names = ", ".join(f"{n.op_type}('{n.name}')" if n.name else repr(n) for n in stuck[:3])
            raise VerificationError([f"graph '{self.name}' has a cycle through {len(stuck)} node(s): {names}"])
        changed = order != nodes
        if changed:
            self._relink(order)
        return changed


def _reads(node: Node) -> Iterator[Value]:
    """Values a node reads: its inputs and the outer-scope values its subgraphs read."""
    for v in node.inputs:
        if v is not None:
            yield v
    for sub in node.subgraphs():
        for inner in sub.all_nodes():
            for v in inner.inputs:
                if v is not None:
                    yield v


class Function:
    """A model-local function (``FunctionProto``): a body graph plus attributes and opsets."""

    __slots__ = ("domain", "name", "overload", "graph", "attributes", "attribute_defaults",
                 "opset_imports", "doc_string", "metadata_props", "model", "_explicit")

    def __init__(self, domain: str, name: str, graph: Graph, *, overload: str = "",
                 attributes: Sequence[str] = (), attribute_defaults: Sequence[Attr] = (),
                 opset_imports: dict[str, int] | None = None, doc_string: str = "") -> None:
        self.domain = domain
        self.name = name
        self.overload = overload
        self.graph = graph
        graph.function = self
        self.attributes = list(attributes)
        self.attribute_defaults = list(attribute_defaults)
        self.opset_imports: dict[str, int] = dict(opset_imports or {})
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] | None = None
        self.model: Model | None = None
        self._explicit: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        """``(domain, name, overload)``: how nodes refer to the function."""
        return (self.domain, self.name, self.overload)

    def __repr__(self) -> str:  # noqa: D105
        return f"Function({self.domain}::{self.name}, {len(self.graph)} nodes)"


class Model:
    """A whole model: main graph, local functions, opset imports and metadata.

    Example:
        >>> m = Model(Graph("main"), ir_version=10, opset_imports={"": 21})
        >>> m.opset_imports
        {'': 21}
    """

    __slots__ = ("graph", "ir_version", "opset_imports", "producer_name", "producer_version",
                 "domain", "model_version", "doc_string", "metadata_props", "functions",
                 "training_info", "configuration", "base_dir", "meta", "_names", "_name_counters",
                 "_explicit")

    def __init__(self, graph: Graph, *, ir_version: int = 10, opset_imports: dict[str, int] | None = None,
                 producer_name: str = "", producer_version: str = "", domain: str = "",
                 model_version: int = 0, doc_string: str = "") -> None:
        self.graph = graph
        graph.model = self
        self.ir_version = ir_version
        self.opset_imports: dict[str, int] = dict(opset_imports or {})
        self.producer_name = producer_name
        self.producer_version = producer_version
        self.domain = domain
        self.model_version = model_version
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}
        self.functions: dict[tuple[str, str, str], Function] = {}
        self.training_info: list[onnx.TrainingInfoProto] = []
        self.configuration: list[Any] = []
        self.base_dir: str | None = None
        self.meta: dict[str, Any] = {}
        self._names: set[str] | None = None
        self._name_counters: dict[str, int] = {}
        self._explicit: tuple[str, ...] = ()

    def __repr__(self) -> str:  # noqa: D105
        return f"Model(ir={self.ir_version}, opsets={self.opset_imports}, {len(self.graph)} nodes)"

    def add_function(self, function: Function) -> None:
        """Register a model-local function."""
        function.model = self
        self.functions[function.key] = function
        if self._names is not None:
            self._names.update(_graph_names(function.graph))

    def all_graphs(self) -> Iterator[Graph]:
        """The main graph, its subgraphs, and every function body with its subgraphs."""
        yield self.graph
        yield from self.graph.subgraphs()
        for f in self.functions.values():
            yield f.graph
            yield from f.graph.subgraphs()

    def all_nodes(self) -> Iterator[Node]:
        """Every node in every graph of the model."""
        for g in self.all_graphs():
            yield from g

    def unique_name(self, hint: str = "v") -> str:
        """A value name not used anywhere in the model, derived from ``hint``.

        Names that appear later are seen too: nodes, inputs, initializers, subgraphs and
        functions added through the IR's methods, and values renamed by assigning ``Value.name``.
        """
        if self._names is None:
            names: set[str] = set()
            for g in self.all_graphs():
                names.update(v.name for v in g.inputs)
                names.update(g.initializers)
                names.update(g.sparse_initializers)
                for n in g:
                    names.update(v.name for v in n.outputs)
            self._names = names
        hint = hint or "v"
        name = hint
        # Resume numbering where the last call with this hint stopped: linear, not quadratic.
        k = self._name_counters.get(hint, 0)
        while name in self._names:
            k += 1
            name = f"{hint}_{k}"
        self._name_counters[hint] = k
        self._names.add(name)
        return name

    def forget_names(self) -> None:
        """Drop the cache behind :meth:`unique_name` (after bulk renames from outside)."""
        self._names = None
        self._name_counters = {}


def tensor_type_of(array: np.ndarray) -> TensorType:
    """The :class:`TensorType` of a numpy array."""
    return TensorType(onnx.helper.np_dtype_to_tensor_dtype(array.dtype), Shape(array.shape))


__all__ += ["tensor_type_of", "OtherType"]
