"""Matching a compiled :class:`Pattern` at a node, and the safety checks done before a rewrite.

The matcher reads the IR and never changes it. It explores every way to match (commuted inputs
of commutative ops when asked) with backtracking generators; when nothing matches it returns the
reason of the attempt that got furthest, which is what the why-not tracer shows.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from graphopt.ir import Node, Tensor, Value
from graphopt.rewrite._pattern import (COMMUTATIVE_OPS, ConstantPattern, InputPattern, NodeOutputPattern,
                                       NodePattern, Pattern, Var, op_key, op_label)

__all__ = ["Match", "MatchSearch", "match_pattern", "unsafe_reason", "constant_value", "describe_value",
           "describe_node", "attribute_value"]


@dataclass
class Match:
    """A successful match of a pattern at ``root``.

    Attributes:
        root: the node the pattern's root matched.
        bindings: variable name -> :class:`~graphopt.ir.Value`, and ``_name`` -> :class:`~graphopt.ir.Node`.
        nodes: the matched nodes, producers before users (root last), each once.
        outputs: the root outputs that the rewrite replaces.
    """

    root: Node
    bindings: dict[str, Any]
    nodes: list[Node]
    outputs: tuple[Value, ...]


def constant_value(value: Value | None) -> np.ndarray | None:
    """The array of a value that no caller can change, else ``None``.

    A value is constant when it is an initializer that is not also a graph input (IR < 4 models
    let callers override those), or the output of a ``Constant`` node.

    Example:
        >>> constant_value(graph.initializers["w"]).shape  # doctest: +SKIP
        (64, 3, 3, 3)
    """
    if value is None:
        return None
    if value.const_value is not None:
        if isinstance(value.const_value, Tensor) and not value.is_graph_input():
            return value.const_value.numpy()
        return None
    node = value.producer
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for name, attr in node.attributes.items():
        if attr.ref_attr_name:
            return None
        if name == "value" and isinstance(attr.value, Tensor):
            return attr.value.numpy()
        if name == "value_float":
            return np.array(attr.value, dtype=np.float32)
        if name == "value_floats":
            return np.array(attr.value, dtype=np.float32)
        if name == "value_int":
            return np.array(attr.value, dtype=np.int64)
        if name == "value_ints":
            return np.array(attr.value, dtype=np.int64)
    return None


def describe_value(value: Value | None) -> str:
    """How a value reads in a reason: ``MatMul ('x')``, ``graph input 'x'``, ``initializer 'w'``."""
    if value is None:
        return "nothing"
    if value.producer is not None:
        return f"{op_label(value.producer.domain, value.producer.op_type)} ('{value.name}')"
    if value.is_graph_input():
        return f"graph input '{value.name}'"
    if value.is_initializer():
        return f"initializer '{value.name}'"
    return f"outer-scope value '{value.name}'"


def describe_node(node: Node) -> str:
    """``Conv 'conv1'`` when the node has a name, else ``Conv -> 'y'`` (its first output)."""
    label = op_label(node.domain, node.op_type)
    if node.name:
        return f"{label} '{node.name}'"
    if node.outputs:
        return f"{label} -> '{node.outputs[0].name}'"
    return label


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, list):
        return _fmt(tuple(value))
    if isinstance(value, Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, float):
        return str(np.float32(value))  # attributes hold float32: print 0.2, not 0.20000000298023224
    return repr(value)


@functools.lru_cache(maxsize=4096)
def _schema_default(domain: str, op_type: str, version: int | None, name: str) -> tuple[bool, Any]:
    """(found, value) of the default the op's schema declares for attribute ``name``."""
    try:
        if version is None:
            schema = onnx.defs.get_schema(op_type, domain)
        else:
            schema = onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return (False, None)
    attr = schema.attributes.get(name)
    if attr is None or attr.default_value.type == onnx.AttributeProto.UNDEFINED:
        return (False, None)
    value = onnx.helper.get_attribute_value(attr.default_value)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, list):
        value = tuple(v.decode(errors="replace") if isinstance(v, bytes) else v for v in value)
    return (True, value)


def attribute_value(node: Node, name: str) -> Any:
    """The attribute's value, its schema default when absent, else ``None``."""
    attr = node.attributes.get(name)
    if attr is not None:
        return attr.value
    found, value = _schema_default(op_key(node.domain, node.op_type)[0], node.op_type, node.version, name)
    return value if found else None


def _attr_equal(expected: Any, actual: Any) -> bool:
    if actual is None:
        return expected is None
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(expected) != len(actual):
            return False
        return all(_attr_equal(e, a) for e, a in zip(expected, actual))
    if isinstance(expected, np.ndarray):
        return isinstance(actual, Tensor) and np.array_equal(actual.numpy(), expected)
    if isinstance(actual, float) and isinstance(expected, (int, float)) and not isinstance(expected, bool):
        # Attributes hold float32 values; compare the constraint at the same precision.
        return float(np.float32(expected)) == actual
    if isinstance(actual, bytes) and isinstance(expected, str):
        return actual == expected.encode()
    return bool(expected == actual)


class _Failure:
    """The furthest-reaching failure seen while exploring alternatives.

    Reasons are kept as callables and formatted only when asked for: the driver tries far more
    candidates than anyone reads reasons of.
    """

    __slots__ = ("progress", "_reason")

    def __init__(self) -> None:
        self.progress = -1
        self._reason: Callable[[], str] = lambda: "no match"

    def note(self, progress: int, reason: Callable[[], str]) -> None:
        if progress > self.progress:
            self.progress = progress
            self._reason = reason

    @property
    def reason(self) -> str:
        return self._reason()


@dataclass(frozen=True)
class _State:
    values: dict[str, Value]
    nodes: dict[int, Node]  # id(NodePattern) -> Node

    @property
    def progress(self) -> int:
        return len(self.values) + len(self.nodes)


def _join(path: str, index: int) -> str:
    return f"{path} > input {index}" if path else f"input {index}"


def _prefix(path: str) -> str:
    return f"{path}: " if path else ""


class _Matcher:
    def __init__(self, pattern: Pattern, commute: bool, root_graph: Any) -> None:
        self.pattern = pattern
        self.commute = commute
        self.root_graph = root_graph
        self.failure = _Failure()

    def fail(self, state: _State, reason: Callable[[], str]) -> Iterator[_State]:
        self.failure.note(state.progress, reason)
        return iter(())

    def match_node(self, np_: NodePattern, node: Node, state: _State, path: str) -> Iterator[_State]:
        if len(node.outputs) < np_.num_outputs:
            yield from self.fail(state, lambda: f"{_prefix(path)}{np_.label} has {len(node.outputs)} output(s), "
                                        f"the pattern uses {np_.num_outputs}")
            return
        for name, expected in np_.attributes.items():
            actual = attribute_value(node, name)
            if callable(expected):
                ok = bool(expected(actual))
                if not ok:
                    yield from self.fail(state, lambda: f"{_prefix(path)}attribute '{name}': {_fmt(actual)} "
                                                f"rejected by {getattr(expected, '__name__', 'constraint')}")
                    return
            elif not _attr_equal(expected, actual):
                found = "absent" if actual is None else _fmt(actual)
                yield from self.fail(state, lambda: f"{_prefix(path)}attribute '{name}': expected "
                                            f"{_fmt(expected)}, found {found}")
                return
        actual_inputs = list(node.inputs)
        while actual_inputs and actual_inputs[-1] is None:
            actual_inputs.pop()
        n = len(np_.inputs)
        if not np_.allow_other_inputs and len(actual_inputs) > n:
            yield from self.fail(state, lambda: f"{_prefix(path)}{np_.label} has {len(actual_inputs)} inputs, "
                                        f"the pattern expects {n}")
            return
        padded = actual_inputs[:n] + [None] * max(0, n - len(actual_inputs))
        state = _State(state.values, {**state.nodes, id(np_): node})
        orders: list[tuple[int, ...]] = [tuple(range(n))]
        if self.commute and np_.domain == "" and np_.op_type in COMMUTATIVE_OPS and 2 <= n <= 4:
            orders = list(itertools.permutations(range(n)))
        for order in orders:
            # Pattern input order[i] is matched against actual input i.
            yield from self._match_inputs(np_, [np_.inputs[j] for j in order], padded, 0, state, path)

    def _match_inputs(self, np_: NodePattern, patterns: list[InputPattern], actual: list[Value | None],
                      i: int, state: _State, path: str) -> Iterator[_State]:
        if i == len(patterns):
            yield state
            return
        for st in self.match_value(patterns[i], actual[i], state, _join(path, i)):
            yield from self._match_inputs(np_, patterns, actual, i + 1, st, path)

    def match_value(self, p: InputPattern, value: Value | None, state: _State, path: str) -> Iterator[_State]:
        if p is None:
            if value is None:
                yield state
            else:
                yield from self.fail(state, lambda: f"{path}: expected nothing (an omitted input), found "
                                            f"{describe_value(value)}")
            return
        if value is None:
            yield from self.fail(state, lambda: f"{path}: expected {_fmt_pattern(p)}, found nothing")
            return
        if isinstance(p, Var):
            bound = state.values.get(p.name)
            if bound is None:
                yield _State({**state.values, p.name: value}, state.nodes)
            elif bound is value:
                yield state
            else:
                yield from self.fail(state, lambda: f"variable '{p.name}' bound to two different values "
                                            f"('{bound.name}' and '{value.name}')")
            return
        if isinstance(p, ConstantPattern):
            array = constant_value(value)
            if array is None:
                yield from self.fail(state, lambda: f"{path}: expected constant {p.value!r}, found "
                                            f"{describe_value(value)}")
            elif array.size == 0 or not np.all(array == p.value):
                yield from self.fail(state, lambda: f"{path}: expected constant {p.value!r}, found a constant "
                                            f"with other values ('{value.name}')")
            else:
                yield state
            return
        assert isinstance(p, NodeOutputPattern)
        np_ = p.node
        producer = value.producer
        if producer is None or op_key(producer.domain, producer.op_type) != np_.key:
            yield from self.fail(state, lambda: f"{path}: expected {np_.label}, found {describe_value(value)}")
            return
        if producer.graph is not self.root_graph:
            yield from self.fail(state, lambda: f"{path}: {describe_value(value)} comes from an enclosing graph")
            return
        if value.index != p.index:
            yield from self.fail(state, lambda: f"{path}: expected output {p.index} of {np_.label}, found "
                                        f"output {value.index}")
            return
        bound = state.nodes.get(id(np_))
        if bound is not None:
            if bound is producer:
                yield state
            else:
                yield from self.fail(state, lambda: f"{path}: {np_.label} bound to two different nodes")
            return
        yield from self.match_node(np_, producer, state, path)


def _fmt_pattern(p: InputPattern) -> str:
    if isinstance(p, Var):
        return f"a value for '{p.name}'"
    if isinstance(p, ConstantPattern):
        return f"constant {p.value!r}"
    if isinstance(p, NodeOutputPattern):
        return p.node.label
    return "nothing"


class MatchSearch:
    """Every way ``pattern`` matches with its root at ``node``, lazily; then why none (more) did.

    Iterate it for :class:`Match` objects (written input order before commuted ones). After the
    iteration, :attr:`reason` tells why the furthest failed attempt failed.

    Example:
        >>> search = MatchSearch(rule.pattern, node, commute=True)  # doctest: +SKIP
        >>> first = next(iter(search), None)                        # doctest: +SKIP
    """

    def __init__(self, pattern: Pattern, node: Node, *, commute: bool = False) -> None:
        self.pattern = pattern
        self.node = node
        self.commute = commute
        self._matcher = _Matcher(pattern, commute, node.graph)

    @property
    def reason(self) -> str:
        """Why the furthest-reaching failed attempt did not match."""
        return self._matcher.failure.reason

    def __iter__(self) -> Iterator[Match]:
        root, node, pattern = self.pattern.root, self.node, self.pattern
        if op_key(node.domain, node.op_type) != root.key:
            self._matcher.failure.note(0, lambda: f"expected {root.label}, found {op_label(node.domain, node.op_type)}")
            return
        for state in self._matcher.match_node(root, node, _State({}, {}), ""):
            bindings: dict[str, Any] = dict(state.values)
            nodes: list[Node] = []
            seen: set[Node] = set()
            for np_ in pattern.nodes:
                matched = state.nodes[id(np_)]
                if np_.name is not None:
                    bindings[np_.name] = matched
                if matched not in seen:
                    seen.add(matched)
                    nodes.append(matched)
            if nodes[-1] is not node:  # the root's node may also match an inner pattern op; keep it last
                nodes.remove(node)
                nodes.append(node)
            yield Match(node, bindings, nodes, node.outputs[:root.num_outputs])


def match_pattern(pattern: Pattern, node: Node, *, commute: bool = False) -> Match | str:
    """The first structural match of ``pattern`` at ``node``, or the reason there is none.

    Safety and the rule's check are not applied here; see :meth:`Rule.find_match` for that.
    """
    search = MatchSearch(pattern, node, commute=commute)
    for found in search:
        return found
    return search.reason


def unsafe_reason(match: Match) -> str | None:
    """Why replacing the match would change other computations, or ``None`` when it is safe.

    Every output of a matched non-root node (an intermediate) must be read only by matched nodes
    (or by nodes that die with the match, see :func:`_dies_with`) and must not be a graph output;
    root outputs beyond those the pattern replaces must be unused.
    """
    inside = set(match.nodes)
    dying: dict[Node, bool] = {}
    for node in match.nodes:
        is_root = node is match.root
        outputs = node.outputs[len(match.outputs):] if is_root else node.outputs
        for value in outputs:
            kind = f"output {value.index} of the root" if is_root else "intermediate"
            if value.is_graph_output():
                return f"{kind} '{value.name}' is a graph output"
            for user, _ in value.uses():
                if user not in inside and not _dies_with(user, inside, dying):
                    return f"{kind} '{value.name}' is used outside the match by {describe_node(user)}"
    return None


def _dies_with(node: Node, inside: set[Node], memo: dict[Node, bool], depth: int = 0) -> bool:
    """True when every output of ``node`` is read only by the match or by nodes that die with it.

    Such readers (typically ``Shape`` nodes computing a matched Reshape's target from an
    intermediate, or nodes already dead) lose their last reader when the match is replaced, so
    they keep no intermediate alive in a computation that matters; dead-code removal drops them.
    """
    if node in memo:
        return memo[node]
    memo[node] = False  # a cycle, or a walk cut short, counts as a live reader
    if depth > 16 or not node.outputs:
        return False
    for out in node.outputs:
        if out.is_graph_output():
            return False
        for user, _ in out.uses():
            if user not in inside and not _dies_with(user, inside, memo, depth + 1):
                return False
    memo[node] = True
    return True
