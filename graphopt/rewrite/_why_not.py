"""The why-not tracer: a rule's match, safety and check run at every candidate node, nothing changed.

A candidate is every node whose ``(domain, op_type)`` is the pattern root's. For each one the
tracer reports ``None`` (it would fire) or the first reason it does not: the input, attribute or
binding that did not match, the intermediate used outside the match, or the check's reason.
Nothing is changed and the rewrite itself is not run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from graphopt.ir import Graph, Model, Node
from graphopt.rewrite._matcher import describe_node
from graphopt.rewrite._pattern import RuleError, op_key, op_label
from graphopt.rewrite._rule import Rule

if TYPE_CHECKING:
    from graphopt.pipeline import PassContext, PassRegistry

__all__ = ["WhyNot", "why_not", "format_why_not", "find_rule"]


@dataclass
class WhyNot:
    """The verdict of one rule at one candidate node.

    Attributes:
        rule: the rule's name.
        node: the candidate node (its op is the pattern root's).
        reason: why the rule does not fire there, or ``None`` when it would.
        where: ``""`` for the main graph, else the function or subgraph holding the node.
    """

    rule: str
    node: Node
    reason: str | None
    where: str = ""

    @property
    def fires(self) -> bool:
        """True when the rule would fire at this node."""
        return self.reason is None

    def __str__(self) -> str:
        place = f" in {self.where}" if self.where else ""
        verdict = "fires" if self.reason is None else f"does not fire: {self.reason}"
        return f"{describe_node(self.node)}{place}: {verdict}"


def _graphs(target: Model | Graph) -> Iterator[tuple[Graph, str]]:
    if isinstance(target, Model):
        yield target.graph, ""
        yield from _nested(target.graph, "")
        for fn in target.functions.values():
            label = f"function {op_label(fn.domain, fn.name)}"
            yield fn.graph, label
            yield from _nested(fn.graph, label)
    else:
        yield target, ""
        yield from _nested(target, "")


def _nested(graph: Graph, where: str) -> Iterator[tuple[Graph, str]]:
    for node in graph:
        for name, attr in node.attributes.items():
            for sub in attr.graphs():
                label = f"{where + ' > ' if where else ''}{describe_node(node)} {name}"
                yield sub, label
                yield from _nested(sub, label)


def why_not(target: Model | Graph, rule: Rule, ctx: PassContext | None = None) -> list[WhyNot]:
    """Explain, for every candidate node of ``rule``, whether it fires and if not why.

    Args:
        target: the model (all graphs, subgraphs and function bodies) or one graph.
        rule: the rule to trace.
        ctx: the pass context handed to the rule's check (a default one if ``None``).

    Example:
        >>> for entry in why_not(model, fuse_conv_bn):           # doctest: +SKIP
        ...     print(entry)
        Conv 'conv1': does not fire: intermediate 'c1' is used outside the match by Add 'skip'
    """
    if ctx is None:
        from graphopt.pipeline import PassContext

        ctx = PassContext()
    key = rule.root_key
    out: list[WhyNot] = []
    for graph, where in _graphs(target):
        for node in graph:
            if op_key(node.domain, node.op_type) != key:
                continue
            found = rule.find_match(node, ctx)
            reason = found if isinstance(found, str) else None
            out.append(WhyNot(rule.name, node, reason, where))
    return out


def format_why_not(entries: list[WhyNot]) -> str:
    """One line per candidate: ``Conv 'conv1': does not fire: <reason>`` or ``...: fires``."""
    if not entries:
        return "no candidate: no node has the op type of the pattern's root"
    return "\n".join(str(e) for e in entries)


def find_rule(registry: PassRegistry, name: str) -> Rule:
    """The rule called ``name`` among the rules of the registry's rewrite passes.

    Raises:
        RuleError: no registered rewrite pass has such a rule (near names are suggested).

    Example:
        >>> rule = find_rule(PassRegistry.default(), "fuse-conv-bn")  # doctest: +SKIP
    """
    from graphopt.rewrite._pass import RewritePass

    known: dict[str, Rule] = {}
    for cls in registry.passes():
        if isinstance(cls, type) and issubclass(cls, RewritePass):
            for r in cls.rule_set():
                known.setdefault(r.name, r)
    if name in known:
        return known[name]
    if not known:
        raise RuleError(f"unknown rule '{name}': no registered pass is a rewrite pass with rules")
    near = difflib.get_close_matches(name, list(known), n=3)
    hint = (f"did you mean {', '.join(near)}?" if near
            else f"known rules: {', '.join(sorted(known)[:20])}{' ...' if len(known) > 20 else ''}")
    raise RuleError(f"unknown rule '{name}'; {hint}")
