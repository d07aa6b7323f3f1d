"""Rule sets as passes: subclass :class:`RewritePass` or call :func:`rule_set_pass`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from graphopt.pipeline import Pass, PassResult
from graphopt.rewrite._driver import apply_rules
from graphopt.rewrite._rule import Rule, RuleSet, as_rule_set

if TYPE_CHECKING:
    from graphopt.ir import Model
    from graphopt.pipeline import PassContext

__all__ = ["RewritePass", "rule_set_pass"]


class RewritePass(Pass):
    """A pass that applies its class attribute ``rules`` with the greedy driver.

    Its counters are the number of applications of each rule that fired, by rule name.

    Example:
        >>> class DoubleRelu(RewritePass):
        ...     \"\"\"Collapse Relu(Relu(x)).\"\"\"
        ...     name = "collapse-double-relu"
        ...     rules = [Rule("double-relu", lambda op, x: op.Relu(op.Relu(x)), lambda op, x: op.Relu(x))]
    """

    opt_level: ClassVar[int] = 2
    rules: ClassVar[RuleSet | Iterable[Rule]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Pass fills an empty description from the docstring; without this reset every subclass
        # would inherit the description of RewritePass itself.
        if "description" not in cls.__dict__:
            cls.description = ""
        super().__init_subclass__(**kwargs)
        if not cls.description and cls.name:
            cls.description = "apply rules: " + ", ".join(cls.rule_set().names)

    @classmethod
    def rule_set(cls) -> RuleSet:
        """The class's rules as a :class:`RuleSet` (built once per class)."""
        cached = cls.__dict__.get("_compiled_rule_set")
        if cached is None or cached[0] is not cls.rules:
            cached = (cls.rules, as_rule_set(cls.rules))
            cls._compiled_rule_set = cached  # type: ignore[attr-defined]
        return cached[1]

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Apply the rules to every graph of ``model``; counters are per-rule application counts."""
        counts = apply_rules(model, self.rule_set(), ctx)
        return PassResult(changed=sum(counts.values()) > 0, counters=counts)


def rule_set_pass(name: str, rules: RuleSet | Iterable[Rule], *, opt_level: int = 2,
                  description: str = "") -> type[Pass]:
    """Make a :class:`RewritePass` subclass called ``name`` that applies ``rules``.

    The class is attributed to the calling module, so ``PassRegistry.load_module`` finds it.

    Example:
        >>> CollapseRelu = rule_set_pass("collapse-double-relu", [double_relu],  # doctest: +SKIP
        ...                              description="Collapse Relu(Relu(x)).")
        >>> registry.register(CollapseRelu)                                        # doctest: +SKIP
    """
    rule_set = as_rule_set(rules)
    caller = sys._getframe(1).f_globals.get("__name__", __name__)
    attrs = {
        "name": name, "opt_level": opt_level, "rules": rule_set,
        "description": description, "__doc__": description or None, "__module__": caller,
    }
    class_name = "".join(part.capitalize() for part in name.split("-")) + "Pass"
    return type(class_name, (RewritePass,), attrs)
