"""Rules (pattern + check + rewrite) and rule sets indexed by the root op of their patterns."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from graphopt.ir import Graph, Model, Node, Value
from graphopt.rewrite._matcher import Match, MatchSearch, constant_value, unsafe_reason
from graphopt.rewrite._pattern import Pattern, RuleError, compile_pattern, op_key

if TYPE_CHECKING:
    from graphopt.pipeline import Limits, PassContext

__all__ = ["Failure", "MatchContext", "Rule", "RuleSet", "rule"]


class Failure:
    """A failed check with its reason; falsy, so ``if not result`` reads naturally.

    Example:
        >>> def check(ctx, w):
        ...     if w.num_uses > 1:
        ...         return Failure("weight is shared")
        ...     return True
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:  # noqa: D105
        return f"Failure({self.reason!r})"


class MatchContext:
    """What a rule's ``check(ctx, **bindings)`` receives as ``ctx``.

    Attributes:
        pass_context: the :class:`~graphopt.pipeline.PassContext` of the run.
        match: the match being checked (root, bindings, matched nodes).
        graph: the graph that holds the match.
        model: the model, when the graph belongs to one.
    """

    __slots__ = ("pass_context", "match", "graph", "model")

    def __init__(self, pass_context: PassContext, match: Match, graph: Graph) -> None:
        self.pass_context = pass_context
        self.match = match
        self.graph = graph
        self.model: Model | None = graph.root_model()

    @property
    def root(self) -> Node:
        """The node the pattern's root matched."""
        return self.match.root

    @property
    def nodes(self) -> list[Node]:
        """The matched nodes, producers first, root last."""
        return self.match.nodes

    @property
    def target(self) -> str:
        """The target of the run (``"cpu"`` or ``"cuda"``)."""
        return self.pass_context.target

    @property
    def opt_level(self) -> int:
        """The optimization level of the run."""
        return self.pass_context.opt_level

    @property
    def limits(self) -> Limits:
        """Size limits of the run (e.g. ``limits.max_fold_bytes``)."""
        return self.pass_context.limits

    def constant(self, value: Value | None) -> np.ndarray | None:
        """The array of ``value`` when it is a constant no caller can override, else ``None``."""
        return constant_value(value)

    def is_used_outside(self, value: Value) -> bool:
        """True when ``value`` is read by a node outside the match or is a graph output."""
        inside = set(self.match.nodes)
        return value.is_graph_output() or any(u not in inside for u, _ in value.uses())


class _Binder:
    """Which bindings a ``check`` or ``rewrite`` function takes, resolved once per rule."""

    __slots__ = ("takes_all", "names")

    def __init__(self, fn: Callable[..., Any], pattern: Pattern, rule_name: str, role: str) -> None:
        params = list(inspect.signature(fn).parameters.values())
        if not params:
            raise RuleError(f"rule '{rule_name}': {role} must take the {'ctx' if role == 'check' else 'op'} "
                            "argument first")
        rest = params[1:]
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest)
        available = set(pattern.binding_names)
        names: list[str] = []
        for p in rest:
            if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
                continue
            if p.name in available:
                names.append(p.name)
            elif p.default is inspect.Parameter.empty:
                known = ", ".join(pattern.binding_names) or "none"
                raise RuleError(f"rule '{rule_name}': {role} parameter '{p.name}' is not a pattern "
                                f"variable or _name (known: {known})")
        self.names = names

    def arguments(self, bindings: dict[str, Any]) -> dict[str, Any]:
        if self.takes_all:
            return dict(bindings)
        return {n: bindings[n] for n in self.names}


class Rule:
    """A rewrite rule: replace what ``pattern`` matches with what ``rewrite`` builds, if ``check`` agrees.

    Args:
        name: the rule's name (used in counters, logs, ``node.meta["created_by"]`` and why-not).
        pattern: ``pattern(op, *variables)`` returning an op call of the pattern builder.
        rewrite: ``rewrite(op, **bindings)`` building the replacement with a real builder and
            returning the new value (a tuple for a multi-output root), or ``None`` to decline.
        check: optional ``check(ctx, **bindings)``; ``True``/``None`` accept, ``False``, a string
            or a :class:`Failure` reject (the string is the reason why-not reports).
        benefit: rules with a higher benefit are tried first at a node.
        commute: also try reordered inputs of commutative ops (Add, Mul, Max, Min, Sum, Mean,
            And, Or, Xor, Equal, BitwiseAnd/Or/Xor).

    ``check`` and ``rewrite`` take only the bindings they name (or all with ``**kwargs``).

    Example:
        >>> double_relu = Rule("double-relu", lambda op, x: op.Relu(op.Relu(x)),
        ...                    lambda op, x: op.Relu(x))
        >>> double_relu.root_key
        ('', 'Relu')
    """

    def __init__(self, name: str, pattern: Callable[..., Any], rewrite: Callable[..., Any],
                 check: Callable[..., Any] | None = None, benefit: int = 1, commute: bool = False) -> None:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise RuleError(f"rule name {name!r} must be a non-empty string without spaces")
        self.name = name
        self.pattern_function = pattern
        try:
            self.pattern: Pattern = compile_pattern(pattern)
        except RuleError as exc:
            raise RuleError(f"rule '{name}': {exc}") from None
        self.rewrite = rewrite
        self.check = check
        self.benefit = benefit
        self.commute = commute
        self._rewrite_args = _Binder(rewrite, self.pattern, name, "rewrite")
        self._check_args = _Binder(check, self.pattern, name, "check") if check is not None else None

    def __repr__(self) -> str:  # noqa: D105
        return f"Rule({self.name!r}: {self.pattern!r})"

    @property
    def root_key(self) -> tuple[str, str]:
        """``(domain, op_type)`` of the pattern's root op."""
        return self.pattern.root_key

    def find_match(self, node: Node, pass_context: PassContext, *, explain: bool = True) -> Match | str:
        """The first match at ``node`` that is safe and passes ``check``, or why there is none.

        Structural matches are tried in order (written input order, then commuted ones); the
        reason returned is that of the first match rejected by safety or check, else the
        structural reason (left empty, to save formatting it, when ``explain`` is false).
        """
        search = MatchSearch(self.pattern, node, commute=self.commute)
        rejected: str | None = None
        for found in search:
            reason = unsafe_reason(found) or self.check_reason(found, pass_context)
            if reason is None:
                return found
            rejected = rejected or reason
        if rejected is not None:
            return rejected
        return search.reason if explain else ""

    def check_reason(self, match: Match, pass_context: PassContext) -> str | None:
        """Run ``check`` on a match: ``None`` when it accepts, else the reason it gave."""
        if self.check is None or self._check_args is None:
            return None
        ctx = MatchContext(pass_context, match, match.root.graph)  # type: ignore[arg-type]
        result = self.check(ctx, **self._check_args.arguments(match.bindings))
        if result is None or result is True:
            return None
        if isinstance(result, Failure):
            return f"check failed: {result.reason}"
        if isinstance(result, str):
            return f"check failed: {result}" if result else "check failed"
        return None if result else "check failed"

    def call_rewrite(self, builder: Any, match: Match) -> Any:
        """Call ``rewrite`` with the builder and the bindings it takes."""
        return self.rewrite(builder, **self._rewrite_args.arguments(match.bindings))


def rule(name: str, pattern: Callable[..., Any], *, check: Callable[..., Any] | None = None,
         benefit: int = 1, commute: bool = False) -> Callable[[Callable[..., Any]], Rule]:
    """Decorator form of :class:`Rule`: the decorated function is the rewrite.

    Example:
        >>> @rule("mul-by-one", lambda op, x: op.Mul(x, 1.0), commute=True)
        ... def drop_mul_by_one(op, x):
        ...     return op.Identity(x)
        >>> drop_mul_by_one.name
        'mul-by-one'
    """

    def wrap(rewrite: Callable[..., Any]) -> Rule:
        return Rule(name, pattern, rewrite, check, benefit, commute)

    return wrap


class RuleSet:
    """An ordered collection of uniquely named rules, indexed by the root op of their patterns.

    The driver looks candidates up by ``(domain, op_type)``, so a node is only ever matched
    against the rules whose pattern can start there, higher benefit first.

    Example:
        >>> rules = RuleSet([double_relu])              # doctest: +SKIP
        >>> [r.name for r in rules.rules_for(relu_node)]  # doctest: +SKIP
        ['double-relu']
    """

    def __init__(self, rules: Iterable[Rule | RuleSet]) -> None:
        self._rules: list[Rule] = []
        names: set[str] = set()
        for item in rules:
            for r in (item if isinstance(item, RuleSet) else [item]):
                if not isinstance(r, Rule):
                    raise RuleError(f"{r!r} is not a Rule")
                if r.name in names:
                    raise RuleError(f"two rules are named '{r.name}'; rename one")
                names.add(r.name)
                self._rules.append(r)
        index: dict[tuple[str, str], list[Rule]] = {}
        for r in self._rules:
            index.setdefault(r.root_key, []).append(r)
        for bucket in index.values():
            bucket.sort(key=lambda r: -r.benefit)  # stable: declaration order among equals
        self._index = index

    def __iter__(self) -> Iterator[Rule]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:  # noqa: D105
        return f"RuleSet({[r.name for r in self._rules]})"

    @property
    def names(self) -> list[str]:
        """Rule names in order."""
        return [r.name for r in self._rules]

    def get(self, name: str) -> Rule | None:
        """The rule called ``name``, or ``None``."""
        return next((r for r in self._rules if r.name == name), None)

    def root_keys(self) -> set[tuple[str, str]]:
        """The ``(domain, op_type)`` keys some rule's pattern starts at."""
        return set(self._index)

    def rules_for(self, node: Node) -> list[Rule]:
        """The rules whose pattern root has ``node``'s op type and domain, higher benefit first."""
        return self._index.get(op_key(node.domain, node.op_type), [])


def as_rule_set(rules: Rule | RuleSet | Iterable[Rule | RuleSet]) -> RuleSet:
    """Accept a rule, a rule set or an iterable of either."""
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, Rule):
        return RuleSet([rules])
    return RuleSet(rules)
