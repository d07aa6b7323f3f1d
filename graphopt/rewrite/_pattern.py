"""The pattern language: a pattern is a Python function over a :class:`PatternBuilder`.

``def pattern(op, x, w): return op.Relu(op.Conv(x, w))`` is called once, with a builder as ``op``
and one :class:`Var` per remaining parameter; what it returns is compiled into a
:class:`Pattern`: a tree (a DAG when a node pattern is reused) of :class:`NodePattern` whose
leaves are variables, constants and ``None`` (an omitted optional input).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Union

from graphopt.errors import GraphoptError

__all__ = ["RuleError", "Var", "PatternValue", "InputPattern", "ConstantPattern", "NodePattern", "NodeOutputPattern",
           "PatternBuilder", "Pattern", "compile_pattern", "COMMUTATIVE_OPS", "op_key", "op_label"]

#: Ops of the default domain whose inputs may be reordered freely (tried when ``commute=True``).
COMMUTATIVE_OPS = frozenset({"Add", "Mul", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal",
                             "BitwiseAnd", "BitwiseOr", "BitwiseXor"})


class RuleError(GraphoptError):
    """A rewrite rule is wrong (bad pattern, unknown binding, bad replacement) or was not found."""


def op_key(domain: str, op_type: str) -> tuple[str, str]:
    """The ``(domain, op_type)`` key of an op, with ``ai.onnx`` spelled as the default domain ``""``."""
    return ("" if domain == "ai.onnx" else domain, op_type)


def op_label(domain: str, op_type: str) -> str:
    """``Conv`` for the default domain, ``com.microsoft::FusedConv`` otherwise."""
    domain = "" if domain == "ai.onnx" else domain
    return f"{domain}::{op_type}" if domain else op_type


class Var:
    """A pattern variable: matches any present value; the same variable must bind the same value."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:  # noqa: D105
        return self.name


class ConstantPattern:
    """Matches a constant (non-overridable initializer or ``Constant`` output) whose every element equals ``value``."""

    __slots__ = ("value",)

    def __init__(self, value: int | float) -> None:
        self.value = value

    def __repr__(self) -> str:  # noqa: D105
        return repr(self.value)


#: What may stand at an input of a node pattern.
InputPattern = Union[Var, ConstantPattern, "NodeOutputPattern", None]

#: What pattern functions pass around and return: a variable or an op call's output.
PatternValue = Union[Var, "NodeOutputPattern"]


class NodePattern:
    """One op of a pattern: op type, domain, input patterns, attribute constraints, binding name."""

    __slots__ = ("domain", "op_type", "inputs", "attributes", "name", "allow_other_inputs",
                 "num_outputs", "outputs")

    def __init__(self, domain: str, op_type: str, inputs: list[InputPattern],
                 attributes: dict[str, Any], name: str | None, allow_other_inputs: bool,
                 num_outputs: int) -> None:
        self.domain = "" if domain == "ai.onnx" else domain
        self.op_type = op_type
        self.inputs = inputs
        self.attributes = attributes
        self.name = name
        self.allow_other_inputs = allow_other_inputs
        self.num_outputs = num_outputs
        self.outputs = tuple(NodeOutputPattern(self, i) for i in range(num_outputs))

    @property
    def key(self) -> tuple[str, str]:
        """``(domain, op_type)``."""
        return (self.domain, self.op_type)

    @property
    def label(self) -> str:
        """The op as written in messages."""
        return op_label(self.domain, self.op_type)

    def __repr__(self) -> str:  # noqa: D105
        parts = [_fmt_input(i) for i in self.inputs]
        if self.allow_other_inputs:
            parts.append("...")
        parts += [f"{k}={_fmt_constraint(v)}" for k, v in self.attributes.items()]
        return f"{self.label}({', '.join(parts)})"


class NodeOutputPattern:
    """Output ``index`` of a :class:`NodePattern` (what an op call in a pattern returns)."""

    __slots__ = ("node", "index")

    def __init__(self, node: NodePattern, index: int) -> None:
        self.node = node
        self.index = index

    def __repr__(self) -> str:  # noqa: D105
        return repr(self.node) if self.node.num_outputs == 1 else f"{self.node!r}[{self.index}]"


def _fmt_input(p: InputPattern) -> str:
    return "None" if p is None else repr(p)


def _fmt_constraint(v: Any) -> str:
    if callable(v):
        return getattr(v, "__name__", "<check>")
    return repr(list(v)) if isinstance(v, tuple) else repr(v)


class PatternBuilder:
    """The ``op`` a pattern function receives: ``op.OpType(*inputs, **constraints)`` builds a node pattern.

    Keyword arguments starting with ``_`` configure the node pattern:

    - ``_domain``: the op's domain (default ``""``, the ONNX domain).
    - ``_name``: bind the matched :class:`~graphopt.ir.Node` under this name for ``check``/``rewrite``.
    - ``_allow_other_inputs``: ignore inputs after the ones given (default ``False``: they must be absent).
    - ``_outputs``: number of outputs the pattern uses; above 1 the call returns a tuple.

    Every other keyword is an attribute constraint: a value the attribute must equal (lists and
    tuples are the same; an absent attribute takes its schema default) or a callable that gets the
    value (``None`` if absent without default) and returns whether it is acceptable.

    Example:
        >>> def pattern(op, x):
        ...     first, second = op.Split(x, axis=0, _outputs=2)
        ...     return op.Concat(first, second, axis=0)
    """

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: str = "", _name: str | None = None,
                 _allow_other_inputs: bool = False, _outputs: int = 1,
                 **attributes: Any) -> NodeOutputPattern | tuple[NodeOutputPattern, ...]:
            ins = [_as_input(op_type, i, v) for i, v in enumerate(inputs)]
            if not isinstance(_outputs, int) or _outputs < 1:
                raise RuleError(f"pattern op {op_type}: _outputs must be a positive int, got {_outputs!r}")
            node = NodePattern(_domain, op_type, ins, attributes, _name, _allow_other_inputs, _outputs)
            return node.outputs[0] if _outputs == 1 else node.outputs

        return make


def _as_input(op_type: str, index: int, value: Any) -> InputPattern:
    if value is None or isinstance(value, (Var, NodeOutputPattern, ConstantPattern)):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ConstantPattern(value)
    if isinstance(value, tuple):
        raise RuleError(f"pattern op {op_type} input {index}: got a tuple of outputs; unpack the "
                        "multi-output op first (a, b = op.Split(x, _outputs=2))")
    raise RuleError(f"pattern op {op_type} input {index}: {value!r} is not a pattern variable, "
                    "an op call, a number or None")


class Pattern:
    """A compiled pattern: the root node pattern, its outputs, variables and named nodes.

    Attributes:
        root: the node pattern whose output(s) the pattern function returned.
        outputs: the root outputs the rewrite replaces (all outputs of the root).
        variables: variable names, in parameter order.
        node_names: ``_name`` bindings.
        nodes: every node pattern, inputs before users (root last).
    """

    __slots__ = ("root", "outputs", "variables", "node_names", "nodes", "function")

    def __init__(self, root: NodePattern, variables: list[str], node_names: list[str],
                 nodes: list[NodePattern], function: Callable[..., Any]) -> None:
        self.root = root
        self.outputs = root.outputs
        self.variables = variables
        self.node_names = node_names
        self.nodes = nodes
        self.function = function

    @property
    def root_key(self) -> tuple[str, str]:
        """``(domain, op_type)`` of the root: the key under which the driver indexes the rule."""
        return self.root.key

    @property
    def binding_names(self) -> list[str]:
        """Every name ``check`` and ``rewrite`` may take: variables and named nodes."""
        return self.variables + self.node_names

    def __repr__(self) -> str:  # noqa: D105
        return repr(self.root)


def compile_pattern(function: Callable[..., Any]) -> Pattern:
    """Call a pattern function with a builder and fresh variables; check and return the :class:`Pattern`.

    Raises:
        RuleError: the function returns something other than the output(s) of one op call, uses
            a ``_name`` twice or for a variable, or declares a variable it never uses.
    """
    params = list(inspect.signature(function).parameters.values())
    if not params:
        raise RuleError(f"pattern {function.__qualname__} must take the op builder as first parameter")
    names = [p.name for p in params[1:]]
    variables = [Var(n) for n in names]
    out = function(PatternBuilder(), *variables)
    where = f"pattern {function.__qualname__}"
    if isinstance(out, NodeOutputPattern):
        if out.node.num_outputs != 1:
            raise RuleError(f"{where} returns one output of a {out.node.num_outputs}-output op; "
                            "return all of its outputs (a tuple) or build it with _outputs=1")
        root = out.node
    elif isinstance(out, tuple) and out and all(isinstance(o, NodeOutputPattern) for o in out):
        root = out[0].node
        if tuple(out) != root.outputs:
            raise RuleError(f"{where} returns a tuple that is not exactly the outputs of one op, in "
                            "order; a pattern has a single root op")
    else:
        raise RuleError(f"{where} must return an op call (or the output tuple of one), got {out!r}")
    nodes = _post_order(root)
    used_vars: set[str] = set()
    node_names: list[str] = []
    for np_ in nodes:
        for p in np_.inputs:
            if isinstance(p, Var):
                used_vars.add(p.name)
        if np_.name is not None:
            if np_.name in names or np_.name in node_names:
                raise RuleError(f"{where}: _name '{np_.name}' is used twice or shadows a variable")
            node_names.append(np_.name)
    unused = [n for n in names if n not in used_vars]
    if unused:
        raise RuleError(f"{where}: variable(s) {', '.join(unused)} are not used by the pattern; "
                        "remove the parameter(s)")
    return Pattern(root, names, node_names, nodes, function)


def _post_order(root: NodePattern) -> list[NodePattern]:
    order: list[NodePattern] = []
    seen: set[int] = set()
    stack: list[tuple[NodePattern, int]] = [(root, 0)]
    seen.add(id(root))
    while stack:
        node, i = stack.pop()
        if i < len(node.inputs):
            stack.append((node, i + 1))
            p = node.inputs[i]
            if isinstance(p, NodeOutputPattern) and id(p.node) not in seen:
                seen.add(id(p.node))
                stack.append((p.node, 0))
        else:
            order.append(node)
    return order
