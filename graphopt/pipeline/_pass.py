"""The pass-authoring API: :class:`Pass`, :class:`PassResult` and the :func:`function_pass` decorator.

A pass has a kebab-case ``name``, an ``opt_level`` (the lowest ``-O`` level whose preset
pipeline includes it), the properties it ``requires`` before it runs (e.g. ``"topo-sorted"``),
the properties it ``provides`` and the analyses it ``preserves``. ``run(model, ctx)`` changes the
model in place and returns a :class:`PassResult`: whether anything changed, plus counters.

Built-in passes are written with exactly this API; a plugin pass looks the same.

Example:
    >>> from graphopt.pipeline import Pass, PassResult
    >>> class DropDocStrings(Pass):
    ...     name = "drop-doc-strings"
    ...     opt_level = 3
    ...     def run(self, model, ctx):
    ...         n = 0
    ...         for node in model.all_nodes():
    ...             if node.doc_string:
    ...                 node.doc_string = ""
    ...                 n += 1
    ...         return PassResult(changed=n > 0, counters={"cleared": n})
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from graphopt.ir import Model
    from graphopt.pipeline._context import PassContext

__all__ = ["Pass", "PassResult", "function_pass", "FunctionPass", "NAME_PATTERN"]

#: Pass names are kebab-case: lowercase words joined by dashes.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass
class PassResult:
    """What a pass did: ``changed`` and named counters (e.g. ``{"removed-nodes": 3}``)."""

    changed: bool
    counters: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.changed


class Pass:
    """Base class of every pass.

    Subclasses set the class attributes and implement :meth:`run`. Options given in a pipeline
    string (``fold-constants<max-bytes=1024>``) arrive as keyword arguments of ``__init__``
    (dashes turned into underscores); declare them in ``options`` with their defaults.
    """

    name: ClassVar[str] = ""
    opt_level: ClassVar[int] = 1
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[frozenset[str]] = frozenset()
    #: Option names (underscored) and default values this pass accepts.
    options: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.options)
        if unknown:
            from graphopt.errors import PipelineError

            allowed = ", ".join(sorted(k.replace("_", "-") for k in self.options)) or "none"
            raise PipelineError(f"pass '{self.name}' has no option(s) "
                                f"{', '.join(sorted(k.replace('_', '-') for k in unknown))}; "
                                f"it accepts: {allowed}")
        self.config: dict[str, Any] = {**self.options, **options}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and not NAME_PATTERN.match(cls.name):
            raise ValueError(f"pass name '{cls.name}' must be kebab-case (e.g. 'fold-constants')")
        # Only the class's own docstring describes it (not an intermediate base's).
        if not cls.__dict__.get("description") and cls.__dict__.get("__doc__"):
            cls.description = cls.__doc__.strip().splitlines()[0]

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Transform ``model`` in place; return what changed."""
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    def __repr__(self) -> str:  # noqa: D105
        opts = {k: v for k, v in self.config.items() if self.options.get(k) != v}
        if not opts:
            return self.name
        from graphopt.pipeline._parse import PassStep

        # The pipeline syntax, so a pipeline of pass instances prints as a string that parses back.
        return str(PassStep(self.name, {k.replace("_", "-"): v for k, v in opts.items()}))


class FunctionPass(Pass):
    """A pass made from a plain function by :func:`function_pass`."""

    fn: ClassVar[Callable[..., Any]]

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Call the wrapped function and normalize its return value."""
        out = type(self).fn(model, ctx, **self.config)
        if isinstance(out, PassResult):
            return out
        if isinstance(out, tuple):
            return PassResult(bool(out[0]), dict(out[1]))
        if isinstance(out, dict):
            return PassResult(any(out.values()), out)
        return PassResult(bool(out))


def function_pass(name: str, *, opt_level: int = 1, requires: tuple[str, ...] = (),
                  provides: tuple[str, ...] = (), preserves: tuple[str, ...] = (),
                  options: dict[str, Any] | None = None) -> Callable[[Callable[..., Any]], type[Pass]]:
    """Turn ``fn(model, ctx, **options)`` into a :class:`Pass` subclass.

    The function returns a :class:`PassResult`, a ``(changed, counters)`` tuple, a counters dict
    (changed when any counter is non-zero) or a bool.

    Example:
        >>> @function_pass("count-relus", opt_level=3)
        ... def count_relus(model, ctx):
        ...     return PassResult(False, {"relus": sum(n.op_type == "Relu" for n in model.all_nodes())})
    """

    def wrap(fn: Callable[..., Any]) -> type[Pass]:
        attrs = {
            "name": name, "opt_level": opt_level, "requires": frozenset(requires),
            "provides": frozenset(provides), "preserves": frozenset(preserves),
            "options": dict(options or {}), "fn": staticmethod(fn),
            "description": (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
            "__doc__": fn.__doc__, "__module__": fn.__module__,
        }
        cls = type(_class_name(name), (FunctionPass,), attrs)
        return cls

    return wrap


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-")) + "Pass"
