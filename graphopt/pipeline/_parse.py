"""Pipeline strings: ``cleanup,fixpoint<max=8>(fold-constants,eliminate-dead-code),topo-sort``.

Grammar::

    pipeline := item ("," item)*
    item     := NAME options? | "fixpoint" options? "(" pipeline ")"
    options  := "<" key "=" value ("," key "=" value)* ">"

A ``NAME`` is a pass or a named pipeline (``cleanup``, ``O2``), which expands in place. Parsing
gives a tree of :class:`PassStep` and :class:`FixpointStep` whose ``str()`` is the canonical
pipeline string, so a printed pipeline can be pasted back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Union

from graphopt.errors import PipelineError

__all__ = ["PassStep", "FixpointStep", "Step", "parse_pipeline", "format_pipeline"]

_TOKEN = re.compile(r"\s*([A-Za-z0-9_.+\-]+|[<>(),=]|\"[^\"]*\")")


@dataclass
class PassStep:
    """Run one pass, with options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "<" + ",".join(f"{k}={_fmt(v)}" for k, v in self.options.items()) + ">"


@dataclass
class FixpointStep:
    """Run ``steps`` repeatedly until none changes anything, at most ``max_iterations`` rounds."""

    steps: list[Step]
    max_iterations: int | None = None

    def __str__(self) -> str:
        opts = f"<max={self.max_iterations}>" if self.max_iterations is not None else ""
        return f"fixpoint{opts}(" + ",".join(str(s) for s in self.steps) + ")"


Step = Union[PassStep, FixpointStep]


_PLAIN = re.compile(r"^[A-Za-z0-9_.+\-]+$")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    text = str(v)
    # A string that would not read back as itself (punctuation, or "3" becoming an int) is quoted.
    if isinstance(v, str) and (not _PLAIN.match(text) or _value(text) != v):
        if '"' in text:
            raise PipelineError(f"pipeline: option value {text!r} contains a double quote, "
                                "which a pipeline string cannot hold")
        return f'"{text}"'
    return text


def _value(text: str) -> Any:
    if text.startswith('"'):
        return text[1:-1]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def format_pipeline(steps: list[Step]) -> str:
    """The canonical string of a parsed pipeline."""
    return ",".join(str(s) for s in steps)


def parse_pipeline(text: str, registry: Any = None, *, _depth: int = 0) -> list[Step]:
    """Parse a pipeline string; named pipelines expand through ``registry``.

    Raises:
        PipelineError: bad syntax, an unknown pass (with near-name suggestions), or a named
            pipeline that expands into itself.

    Example:
        >>> str(parse_pipeline("fixpoint<max=4>(a-pass,b-pass),c-pass")[0])
        'fixpoint<max=4>(a-pass,b-pass)'
    """
    if _depth > 16:
        raise PipelineError("named pipelines nest more than 16 deep (do they include each other?)")
    text = text.strip()
    if not text:
        return []
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip() == "":
                break
            raise PipelineError(f"pipeline: unexpected character {text[pos]!r} at {pos} in '{text}'")
        tokens.append(m.group(1))
        pos = m.end()
    parser = _Parser(tokens, text, registry, _depth)
    steps = parser.pipeline()
    if parser.i != len(tokens):
        extra = tokens[parser.i]
        hint = " (separate passes with ',')" if _PLAIN.match(extra) else ""
        raise PipelineError(f"pipeline: unexpected '{extra}' in '{text}'{hint}")
    return steps


class _Parser:
    def __init__(self, tokens: list[str], text: str, registry: Any, depth: int) -> None:
        self.t = tokens
        self.i = 0
        self.text = text
        self.registry = registry
        self.depth = depth

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None:
            raise PipelineError(f"pipeline: unexpected end of '{self.text}'"
                                + (f" (expected '{expected}')" if expected else ""))
        if expected is not None and tok != expected:
            raise PipelineError(f"pipeline: expected '{expected}' but found '{tok}' in '{self.text}'")
        self.i += 1
        return tok

    def pipeline(self) -> list[Step]:
        steps: list[Step] = []
        while True:
            steps.extend(self.item())
            if self.peek() == ",":
                self.take(",")
                continue
            return steps

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.peek() != "<":
            return opts
        self.take("<")
        while True:
            key = self.take()
            if not _PLAIN.match(key):
                raise PipelineError(f"pipeline: expected an option name, found '{key}' in '{self.text}' "
                                    "(options look like pass<key=value,...>)")
            self.take("=")
            value = self.take()
            if value in ("<", ">", "(", ")", ",", "="):
                raise PipelineError(f"pipeline: option '{key}' has no value in '{self.text}' "
                                    "(write key=value; quote values with punctuation)")
            opts[key] = _value(value)
            if self.peek() == ",":
                self.take(",")
                continue
            self.take(">")
            return opts

    def item(self) -> list[Step]:
        name = self.take()
        if not _PLAIN.match(name):
            raise PipelineError(f"pipeline: expected a pass name, found '{name}' in '{self.text}'")
        opts = self.options()
        if name == "fixpoint":
            unknown = set(opts) - {"max"}
            if unknown:
                raise PipelineError(f"pipeline: fixpoint takes only 'max', not {', '.join(sorted(unknown))}")
            self.take("(")
            inner = self.pipeline()
            self.take(")")
            limit = opts.get("max")
            if limit is not None and (not isinstance(limit, int) or limit < 1):
                raise PipelineError(f"pipeline: fixpoint max must be a positive integer, got {limit!r}")
            return [FixpointStep(inner, limit)]
        if self.registry is not None:
            named = self.registry.pipeline(name)
            if named is not None and not self.registry.has(name):
                if opts:
                    raise PipelineError(f"pipeline: '{name}' is a named pipeline and takes no options")
                return parse_pipeline(named, self.registry, _depth=self.depth + 1)
            self.registry.get(name)  # raises with suggestions when unknown
        return [PassStep(name, opts)]
