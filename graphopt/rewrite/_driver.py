"""The greedy worklist driver that applies a rule set to a model.

Per graph (the main graph, then every subgraph and function body), the worklist starts with the
nodes whose ``(domain, op_type)`` some rule's pattern starts at, in graph order. For each node
the rules indexed under its op are tried, higher benefit first: match, safety, check, rewrite.
The first that fires is committed, and then the new nodes, the users of the replacement values
and the neighbours of removed nodes go back on the worklist (removing a node can make a value
single-use and so enable a match that the safety check refused before).

Two guards keep it honest: ``ctx.limits.max_rewrites`` caps the rewrites of one call (rules that
undo each other would otherwise loop; the warning names them), and ``ctx.allow_rewrite`` is
asked before each commit, so ``--bisect-limit`` stops right after the N-th rewrite.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from typing import TYPE_CHECKING, Iterable

from graphopt.ir import Graph, Model, Node, TensorType, Value
from graphopt.rewrite._builder import RewriteBuilder
from graphopt.rewrite._matcher import Match, describe_node
from graphopt.rewrite._pattern import RuleError
from graphopt.rewrite._rule import Rule, RuleSet, as_rule_set

if TYPE_CHECKING:
    from graphopt.pipeline import PassContext

__all__ = ["apply_rules"]

logger = logging.getLogger(__name__)

#: How many of the latest rewrites the cap warning looks at to name the rules still firing.
_RECENT = 64


def apply_rules(target: Model | Graph, rules: Rule | RuleSet | Iterable[Rule | RuleSet],
                ctx: PassContext | None = None) -> dict[str, int]:
    """Apply ``rules`` greedily to a model (or one graph) in place, subgraphs and functions included.

    Args:
        target: a :class:`~graphopt.ir.Model` (main graph, every nested subgraph and every
            function body) or a :class:`~graphopt.ir.Graph` (it and its nested subgraphs).
        rules: a :class:`Rule`, a :class:`RuleSet` or a list of rules.
        ctx: the pass context (bisect limit, ``limits.max_rewrites``); a default one if ``None``.

    Returns:
        How many times each rule was applied, by rule name (rules that never fired are absent).

    Example:
        >>> counts = apply_rules(model, [double_relu], PassContext())  # doctest: +SKIP
        >>> counts                                                     # doctest: +SKIP
        {'double-relu': 2}
    """
    if ctx is None:
        from graphopt.pipeline import PassContext

        ctx = PassContext()
    driver = _Driver(as_rule_set(rules), ctx, target)
    driver.run()
    counts = dict(driver.counts)
    if counts:
        logger.info("applied %d rewrite(s): %s", sum(counts.values()),
                    ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return counts


class _Names:
    """Fresh value names: the model's registry, or a set built from a detached graph.

    Each hint keeps its own counter, so asking for "relu" a thousand times costs a thousand
    lookups, not the half million a probe from "relu" upwards would.
    """

    def __init__(self, target: Model | Graph) -> None:
        model = target if isinstance(target, Model) else target.root_model()
        self._model = model
        self._next: dict[str, int] = {}
        self._taken: set[str] | None = None
        if model is None:
            assert isinstance(target, Graph)
            taken: set[str] = set()
            for g in [target, *target.subgraphs()]:
                taken.update(v.name for v in g.inputs)
                taken.update(g.initializers)
                for n in g:
                    taken.update(v.name for v in n.outputs)
            self._taken = taken

    def __call__(self, hint: str) -> str:
        k = self._next.get(hint, 0)
        self._next[hint] = k + 1
        candidate = hint if k == 0 else f"{hint}_{k}"
        if self._model is not None:
            return self._model.unique_name(candidate)
        assert self._taken is not None
        name, j = candidate, 0
        while name in self._taken:
            j += 1
            name = f"{candidate}_{j}"
        self._taken.add(name)
        return name


class _Stop(Exception):
    """Raised inside the driver when the bisect limit or the rewrite cap ends the run."""


class _Driver:
    def __init__(self, rules: RuleSet, ctx: PassContext, target: Model | Graph) -> None:
        self.rules = rules
        self.ctx = ctx
        self.target = target
        self.names = _Names(target)
        self.counts: Counter[str] = Counter()
        self.total = 0
        self.recent: deque[str] = deque(maxlen=_RECENT)
        self.keys = rules.root_keys()

    def run(self) -> None:
        if isinstance(self.target, Model):
            queue = deque([self.target.graph, *(f.graph for f in self.target.functions.values())])
        else:
            queue = deque([self.target])
        try:
            while queue:
                graph = queue.popleft()
                if graph.parent is not None and not graph.parent.is_live():
                    continue  # its node was rewritten away
                self.run_graph(graph)
                for node in graph:
                    queue.extend(node.subgraphs())
        except _Stop:
            pass

    # -- one graph -------------------------------------------------------------------------------
    def run_graph(self, graph: Graph) -> None:
        from graphopt.rewrite._pattern import op_key

        work: deque[Node] = deque()
        queued: set[Node] = set()

        def push(node: Node | None) -> None:
            if (node is not None and node not in queued and node.graph is graph and node.is_live()
                    and op_key(node.domain, node.op_type) in self.keys):
                queued.add(node)
                work.append(node)

        for node in graph:
            push(node)
        while work:
            node = work.popleft()
            queued.discard(node)
            if not node.is_live() or node.graph is not graph:
                continue
            for rule in self.rules.rules_for(node):
                touched = self.try_rule(rule, node, graph)
                if touched is not None:
                    for n in touched:
                        push(n)
                    break

    def try_rule(self, rule: Rule, node: Node, graph: Graph) -> list[Node] | None:
        """Apply ``rule`` at ``node`` if it fires; returns the nodes to revisit, or ``None``."""
        debug = logger.isEnabledFor(logging.DEBUG)
        found = rule.find_match(node, self.ctx, explain=debug)
        if isinstance(found, str):
            if debug:
                logger.debug("%s at %s: not applied: %s", rule.name, describe_node(node), found)
            return None
        if self.total >= self.ctx.limits.max_rewrites:
            self.warn_cap(graph)
            raise _Stop
        builder = RewriteBuilder(graph, rule.name, self.names)
        tensors = {v: v.const_value for v in found.bindings.values()
                   if isinstance(v, Value) and v.const_value is not None}
        result = rule.call_rewrite(builder, found)
        for value, tensor in tensors.items():
            if value.const_value is not tensor:
                builder.discard()
                raise RuleError(f"rule '{rule.name}' replaced the tensor of '{value.name}' in place; "
                                "create a new one with op.initializer(array) instead")
        replacements = self.replacements(rule, found, result, builder)
        if replacements is None:
            builder.discard()
            return None
        if not self.ctx.allow_rewrite(f"{rule.name} at {node}"):
            builder.discard()
            raise _Stop
        touched = self.commit(found, replacements, builder, graph)
        self.total += 1
        self.counts[rule.name] += 1
        self.recent.append(rule.name)
        if debug:
            logger.debug("%s at %s: applied", rule.name, describe_node(node))
        return touched

    def replacements(self, rule: Rule, found: Match, result: object,
                     builder: RewriteBuilder) -> list[Value] | None:
        """The validated replacement values, or ``None`` when the rewrite declined or is unsound."""
        if result is None:
            logger.debug("%s at %s: rewrite declined", rule.name, describe_node(found.root))
            return None
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(values) != len(found.outputs) or not all(isinstance(v, Value) for v in values):
            raise RuleError(f"rule '{rule.name}': rewrite must return {len(found.outputs)} ir.Value(s) "
                            f"(one per root output), got {result!r}")
        if all(new is old for new, old in zip(values, found.outputs)):
            return None  # nothing would change
        for slot, new in enumerate(values):
            if new in found.outputs and new is not found.outputs[slot]:
                raise RuleError(f"rule '{rule.name}': rewrite returns root output '{new.name}' in place "
                                f"of output {slot}; return new values or the bindings")
        olds = set(found.outputs)
        for node in builder.nodes:
            if any(v in olds for v in node.inputs):
                raise RuleError(f"rule '{rule.name}': the replacement reads the output it replaces "
                                f"(through {node.op_type}); build it from the bindings instead")
        for old, new in zip(found.outputs, values):
            problem = _type_conflict(old, new)
            if problem:
                logger.warning("rule '%s' at %s not applied: %s", rule.name, describe_node(found.root), problem)
                return None
        return values

    def commit(self, found: Match, values: list[Value], builder: RewriteBuilder, graph: Graph) -> list[Node]:
        root = found.root
        builder.commit(root)
        # Ordered (not a set) so that the worklist, and so the result, is the same on every run.
        inputs = list(dict.fromkeys(v for n in found.nodes for v in n.inputs if v is not None))
        touched: list[Node] = list(builder.nodes)
        for old, new in zip(found.outputs, values):
            if new is old:
                continue
            if new.type is None and old.type is not None:
                new.type = old.type  # the replacement computes the same tensor
            was_output = old.is_graph_output()
            old.replace_all_uses_with(new, rename_graph_outputs=True)
            if was_output:
                for out in graph.outputs:
                    p = out.producer
                    if p is not None and out is not new and p.op_type == "Identity" and p.inputs[0] is new \
                            and "created_by" not in p.meta:
                        p.meta["created_by"] = builder.rule_name
                        touched.append(p)
            touched.extend(new.users())
        for node in reversed(found.nodes):
            if node.is_live() and not any(o.has_uses() or o.is_graph_output() for o in node.outputs):
                graph.remove(node)
        for v in inputs:
            if v.producer is not None:
                touched.append(v.producer)
            touched.extend(v.users())
        return touched

    def warn_cap(self, graph: Graph) -> None:
        firing = ", ".join(sorted(set(self.recent)))
        logger.warning("rewrite limit of %d reached (ctx.limits.max_rewrites) in graph '%s'; rules still "
                       "firing: %s; they may undo each other", self.ctx.limits.max_rewrites, graph.name, firing)


def _type_conflict(old: Value, new: Value) -> str:
    """A description of why ``new`` cannot stand for ``old`` by their known types, else ``""``."""
    if not isinstance(old.type, TensorType) or not isinstance(new.type, TensorType):
        return ""
    if old.type.dtype != new.type.dtype:
        return f"replacement of '{old.name}' has type {new.type}, expected {old.type}"
    a, b = old.type.shape, new.type.shape
    if a is not None and b is not None and a.is_static() and b.is_static() and a.dims != b.dims:
        return f"replacement of '{old.name}' has shape {list(b.dims)}, expected {list(a.dims)}"
    return ""
