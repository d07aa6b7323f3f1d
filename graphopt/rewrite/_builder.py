"""The builder a rule's ``rewrite`` receives: it creates detached nodes that the driver commits.

Nothing it builds is in the graph until the driver commits the rewrite (after the bisect limit
allowed it); a declined rewrite is discarded without a trace. New tensors always become new
initializers (or ``Constant`` nodes where initializers cannot live), so a tensor shared with
other nodes is never modified in place.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from graphopt.ir import ArrayTensor, Attr, Graph, Node, Shape, TensorType, Value
from graphopt.rewrite._pattern import RuleError

__all__ = ["RewriteBuilder"]

#: Version added to the opset imports when a rewrite creates the first node of a new domain.
_NEW_DOMAIN_VERSION = {"com.microsoft": 1}


def _uses_constant_nodes(graph: Graph) -> bool:
    """Function bodies have no initializers, and IR < 4 lists every initializer as an input."""
    g: Graph | None = graph
    while g is not None:
        if g.function is not None:
            return True
        if g.model is not None:
            return g.model.ir_version < 4
        g = g.parent.graph if g.parent is not None else None
    return False


class RewriteBuilder:
    """The ``op`` of a rule's ``rewrite``: ``op.OpType(*inputs, **attributes)`` creates a node.

    Inputs are :class:`~graphopt.ir.Value` or ``None`` (an omitted optional input); a numpy array
    becomes a new initializer. Attributes are Python values (``None`` is skipped) or
    :class:`~graphopt.ir.Attr` (e.g. ``**node.attributes`` copies a matched node's). Reserved
    keywords: ``_domain`` (default ``""``) and ``_outputs`` (default 1; above 1 a tuple of values
    is returned).

    Example:
        >>> def rewrite(op, x, w, conv):
        ...     w2 = op.initializer(conv_weight_scaled, name_hint="w")   # a NEW tensor
        ...     return op.Conv(x, w2, **conv.attributes)
    """

    def __init__(self, graph: Graph, rule_name: str, unique_name: Callable[[str], str]) -> None:
        self._graph = graph
        self._rule_name = rule_name
        self._unique_name = unique_name
        self._constant_nodes = _uses_constant_nodes(graph)
        #: Nodes created so far, in creation (hence topological) order.
        self.nodes: list[Node] = []
        #: Initializer values created so far (not yet in the graph).
        self.initializers: list[Value] = []

    @property
    def rule_name(self) -> str:
        """The rule whose rewrite this builder serves (recorded as ``node.meta["created_by"]``)."""
        return self._rule_name

    @property
    def graph(self) -> Graph:
        """The graph the rewrite happens in."""
        return self._graph

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: str = "", _outputs: int = 1, **attributes: Any) -> Any:
            return self.node(op_type, list(inputs), attributes, domain=_domain, num_outputs=_outputs)

        return make

    def node(self, op_type: str, inputs: list[Any], attributes: dict[str, Any] | None = None, *,
             domain: str = "", num_outputs: int = 1) -> Value | tuple[Value, ...]:
        """Create a node (the long form of ``op.OpType(...)``); returns its output(s)."""
        ins = [self._as_input(op_type, i, v) for i, v in enumerate(inputs)]
        attrs: dict[str, Attr] = {}
        for name, value in (attributes or {}).items():
            if value is None:
                continue
            attrs[name] = value if isinstance(value, Attr) else Attr.from_value(name, value)
        outputs = [Value(self._unique_name(op_type.lower())) for _ in range(num_outputs)]
        node = Node(domain, op_type, ins, attributes=attrs, outputs=outputs)
        node.meta["created_by"] = self._rule_name
        self.nodes.append(node)
        return outputs[0] if num_outputs == 1 else tuple(outputs)

    def initializer(self, array: np.ndarray, name_hint: str = "const") -> Value:
        """A NEW constant holding ``array`` (never an existing tensor changed in place).

        It is an initializer of the rewritten graph, or a ``Constant`` node in function bodies
        and IR < 4 models.
        """
        tensor = ArrayTensor(np.asarray(array))
        if self._constant_nodes:
            return self._constant_node(tensor, name_hint)
        name = self._unique_name(name_hint)
        tensor.name = name
        value = Value(name, TensorType(tensor.dtype, Shape(tensor.shape)), const_value=tensor)
        self.initializers.append(value)
        return value

    def constant(self, value: Any, dtype: Any = None, name_hint: str = "const") -> Value:
        """A ``Constant`` node holding ``np.asarray(value, dtype)``; returns its output."""
        return self._constant_node(ArrayTensor(np.asarray(value, dtype=dtype)), name_hint)

    def _constant_node(self, tensor: ArrayTensor, name_hint: str) -> Value:
        out = Value(self._unique_name(name_hint), TensorType(tensor.dtype, Shape(tensor.shape)))
        node = Node("", "Constant", [], attributes={"value": Attr.from_value("value", tensor)}, outputs=[out])
        node.meta["created_by"] = self._rule_name
        self.nodes.append(node)
        return out

    def _as_input(self, op_type: str, index: int, value: Any) -> Value | None:
        if value is None or isinstance(value, Value):
            return value
        if isinstance(value, (np.ndarray, np.generic)):
            return self.initializer(np.asarray(value))
        raise RuleError(f"rule '{self._rule_name}': input {index} of {op_type} is {value!r}; pass an "
                        "ir.Value, None, or a numpy array with an explicit dtype")

    # -- used by the driver ------------------------------------------------------------------
    def discard(self) -> None:
        """Drop everything built (the rewrite declined or was not allowed)."""
        for node in self.nodes:
            node.detach_inputs()
        self.nodes.clear()
        self.initializers.clear()

    def commit(self, anchor: Node) -> None:
        """Insert the new nodes just before ``anchor`` and register new initializers and domains."""
        graph = self._graph
        for value in self.initializers:
            value.graph = graph
            graph.initializers[value.name] = value
        imports = graph.opset_imports()
        for node in self.nodes:
            graph.insert_before(anchor, node)
            domain = "" if node.domain == "ai.onnx" else node.domain
            if domain and domain not in imports and graph.root_model() is not None:
                imports[domain] = _NEW_DOMAIN_VERSION.get(domain, 1)
