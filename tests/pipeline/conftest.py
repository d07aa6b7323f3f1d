"""Small models and test passes shared by the pipeline-layer tests.

The passes here are registered on fresh registries only; the tests never depend on the built-in
pass library.
"""

from __future__ import annotations

from typing import Callable

import onnx
import onnx.parser
import pytest

from graphopt import ir
from graphopt.pipeline import Pass, PassContext, PassRegistry, PassResult

CHAIN_TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
chain (float[N, 4] x) => (float[N, 4] y) {
   a = Relu(x)
   b = Identity(a)
   c = Identity(b)
   d = Identity(c)
   e = Identity(d)
   y = Neg(e)
}
"""


class RemoveIdentity(Pass):
    """Bypass and remove Identity nodes whose output is not a graph output."""

    name = "remove-identity"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        removed = 0
        for node in model.graph:
            if node.op_type != "Identity" or node.outputs[0].is_graph_output():
                continue
            if not ctx.allow_rewrite(f"remove Identity reading '{node.inputs[0].name}'"):
                break
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            model.graph.remove(node)
            removed += 1
        return PassResult(removed > 0, {"removed": removed})


class RemoveOneIdentity(Pass):
    """Remove a single Identity per run (so a fixed-point group needs several rounds)."""

    name = "remove-one-identity"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        for node in model.graph:
            if node.op_type == "Identity" and ctx.allow_rewrite("remove one Identity"):
                node.outputs[0].replace_all_uses_with(node.inputs[0])
                model.graph.remove(node)
                return PassResult(True, {"removed": 1})
        return PassResult(False, {"removed": 0})


class CountNodes(Pass):
    """Change nothing; count the nodes of the main graph."""

    name = "count-nodes"
    preserves = frozenset({"sorted", "node-count"})

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return PassResult(False, {"nodes": len(model.graph)})


class Crash(Pass):
    """Raise an unexpected exception (a bug in a pass)."""

    name = "crash"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        raise ZeroDivisionError("division by zero in the test pass")


TEST_PASSES: list[type[Pass]] = [RemoveIdentity, RemoveOneIdentity, CountNodes, Crash]


@pytest.fixture
def chain_text() -> str:
    """ONNX text of a Relu, four Identities and a Neg on a ``float[N, 4]`` input."""
    return CHAIN_TEXT


@pytest.fixture
def build_model() -> Callable[..., ir.Model]:
    """``build_model(text=CHAIN_TEXT)``: parse ONNX text and load it into the IR."""

    def build(text: str = CHAIN_TEXT) -> ir.Model:
        return ir.load(onnx.parser.parse_model(text))

    return build


@pytest.fixture
def registry() -> PassRegistry:
    """A fresh registry holding only the test passes of this file."""
    reg = PassRegistry()
    for cls in TEST_PASSES:
        reg.register(cls)
    return reg


@pytest.fixture
def make_ctx(registry: PassRegistry) -> Callable[..., PassContext]:
    """``make_ctx(**fields)``: a PassContext on the test registry."""

    def make(**fields) -> PassContext:
        return PassContext(registry=registry, **fields)

    return make
