"""Helpers shared by the rewrite-engine tests: load ONNX text, rewrite, and compare in onnxruntime.

Every rewrite test checks the graph it produced and, through :func:`rewrite_and_compare`, that
onnxruntime (graph optimizations off) gives the same outputs for the original and the rewritten
model on seeded inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import onnx.parser
import pytest

from graphopt import ir
from graphopt.pipeline import PassContext
from graphopt.rewrite import apply_rules
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

#: Default tolerance of the numeric comparisons: rewrites here are exact or reassociate one add.
RTOL = 1e-5
ATOL = 1e-6


@dataclass
class Rewritten:
    """The result of one rewrite test run."""

    model: ir.Model
    counts: dict[str, int]
    original: onnx.ModelProto

    def ops(self) -> list[str]:
        """Op types of the main graph, in order."""
        return [n.op_type for n in self.model.graph]

    def text(self) -> str:
        """The canonical text of the rewritten model."""
        return ir.print_model(self.model)


def parse(text: str) -> onnx.ModelProto:
    """Parse ONNX text and run the onnx checker on it (so the test model itself is valid)."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return proto


def assert_same_outputs(original: onnx.ModelProto, rewritten: ir.Model, *, rtol: float = RTOL,
                        atol: float = ATOL, feeds: Mapping[str, np.ndarray] | None = None) -> None:
    """Run both models in onnxruntime (optimizations off) and compare every output."""
    proto = ir.to_proto(rewritten)
    onnx.checker.check_model(proto)
    if feeds is None:
        feeds = random_inputs(make_session(original), seed=0)
    expected = run_model(original, feeds)
    actual = run_model(proto, feeds)
    assert list(actual) == list(expected), "output names changed"
    comparison = compare_outputs(expected, actual, rtol=rtol, atol=atol)
    assert comparison.ok, comparison.summary()


def rewrite_and_compare(text: str, rules: Any, ctx: PassContext | None = None, *, rtol: float = RTOL,
                        atol: float = ATOL, feeds: Mapping[str, np.ndarray] | None = None) -> Rewritten:
    """Load ``text``, apply ``rules``, verify the IR and compare outputs with the original."""
    original = parse(text)
    model = ir.load(original)
    counts = apply_rules(model, rules, ctx or PassContext())
    ir.verify(model)
    assert_same_outputs(original, model, rtol=rtol, atol=atol, feeds=feeds)
    return Rewritten(model, counts, original)


@pytest.fixture
def rewrite() -> Callable[..., Rewritten]:
    """:func:`rewrite_and_compare` as a fixture."""
    return rewrite_and_compare


@pytest.fixture
def same_outputs() -> Callable[..., None]:
    """:func:`assert_same_outputs` as a fixture."""
    return assert_same_outputs


@pytest.fixture(name="parse")
def parse_fixture() -> Callable[[str], onnx.ModelProto]:
    """:func:`parse` as a fixture."""
    return parse


@pytest.fixture
def load() -> Callable[[str], ir.Model]:
    """Parse ONNX text (checked) into the IR."""
    return lambda text: ir.load(parse(text))
