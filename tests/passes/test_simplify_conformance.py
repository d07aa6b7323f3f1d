"""The simplification passes on every onnx backend node case: outputs must not change.

Every case of ``onnx.backend.test.case.node`` goes through ``graphopt.optimize`` with all
simplification passes. A model that comes back byte for byte unchanged computes what it did;
every other one that onnxruntime (graph optimizations off) runs is run before and after, and
the outputs must agree within the case's rtol/atol, with zero exceptions. A second sweep turns
every fed input but the first into an initializer for the cases of the ops the rules rewrite,
so that shapes, axes, pads and modes are constants and the rules get to decide.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt
from graphopt.errors import GraphoptError
from graphopt.pipeline import Instrument, PassContext, PassRecord, PassRegistry
from graphopt.runtime import compare_outputs, make_session

PIPELINE = ("inline-constant-if,eliminate-no-ops,merge-chains,eliminate-common-subexpressions,"
            "eliminate-dead-code")

#: Op types whose node cases are swept again with their parameters baked into initializers.
REWRITTEN_OPS = frozenset({"Dropout", "Cast", "CastLike", "Reshape", "Expand", "Squeeze", "Unsqueeze",
                           "Transpose", "Pad", "Slice", "Concat", "Sum", "Max", "Min", "Mean", "Mul", "Add",
                           "Sub", "Div", "Flatten", "If"})

SIMPLIFY_PASSES = ("inline-constant-if", "eliminate-no-ops", "merge-chains", "eliminate-common-subexpressions")


@dataclass
class Case:
    """One model with its feeds (one dict per data set) and tolerance."""

    name: str
    model: onnx.ModelProto
    feeds: list[dict[str, Any]]
    rtol: float
    atol: float


@dataclass
class Sweep:
    """What a sweep found: counts, failures, and how often each rewrite fired."""

    scored: int = 0
    unchanged: int = 0
    unscored: int = 0
    rewritten_cases: int = 0
    failures: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line with the counts."""
        fired = ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items()) if v)
        return (f"{self.scored} changed cases run ({self.rewritten_cases} rewritten by the simplification "
                f"passes), {len(self.failures)} failed, {self.unchanged} unchanged, {self.unscored} changed but "
                f"not run by onnxruntime; rewrites: {fired}")


class _CountRewrites(Instrument):
    """Adds up the counters of the simplification passes."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def after_pass(self, p: Any, model: Any, ctx: PassContext, record: PassRecord) -> None:
        if record.name in SIMPLIFY_PASSES:
            for key, value in record.counters.items():
                self.counters[key] = self.counters.get(key, 0) + value


def _as_value(item: Any) -> Any:
    if isinstance(item, onnx.TensorProto):
        return numpy_helper.to_array(item)
    if isinstance(item, list):
        return [_as_value(x) for x in item]
    return item


def _fed_inputs(model: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


@pytest.fixture(scope="module")
def node_cases() -> list[tuple[str, Case]]:
    """(op type, case) for every node case that ships a model and data."""
    from onnx.backend.test.case import node

    # The case generators compute expected outputs with numpy and warn about overflows on purpose.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        collected = node.collect_testcases(None)
    cases = []
    for tc in collected:
        if tc.model is None or not tc.data_sets:
            continue
        names = _fed_inputs(tc.model)
        feeds = [dict(zip(names, [_as_value(x) for x in inputs])) for inputs, _ in tc.data_sets]
        op_type = tc.model.graph.node[0].op_type if tc.model.graph.node else ""
        cases.append((op_type, Case(tc.name, tc.model, feeds, tc.rtol, tc.atol)))
    return cases


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """The built-in passes."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)  # refused models are counted, not logged
    return PassRegistry.default(plugins=False)


def _run(model: onnx.ModelProto | bytes, feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    session = make_session(model, optimize=False, threads=1)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return [dict(zip(names, session.run(names, {k: v for k, v in f.items() if k in wanted}))) for f in feeds]


def _sweep(cases: list[Case], registry: PassRegistry) -> Sweep:
    """Optimize every case; run the ones that changed in onnxruntime, before and after."""
    sweep = Sweep()
    counter = _CountRewrites()
    for case in cases:
        before = sum(counter.counters.values())
        ctx = PassContext(registry=registry, instruments=[counter])
        try:
            optimized = graphopt.optimize(case.model, pipeline=PIPELINE, ctx=ctx)
        except GraphoptError as exc:
            refused: Exception | None = exc
        else:
            refused = None
            if optimized.SerializeToString() == case.model.SerializeToString():
                sweep.unchanged += 1  # the same model computes the same outputs
                continue
        try:
            reference = _run(case.model, case.feeds)
        except Exception:  # noqa: BLE001 - a model onnxruntime refuses is not scored
            sweep.unscored += 1
            continue
        sweep.scored += 1
        if refused is not None:
            sweep.failures.append(f"{case.name}: optimize refused a model onnxruntime runs: {refused}")
            continue
        if sum(counter.counters.values()) > before:
            sweep.rewritten_cases += 1
        try:
            actual = _run(optimized, case.feeds)
        except Exception as exc:  # noqa: BLE001 - any runtime failure of the output is a finding
            sweep.failures.append(f"{case.name}: onnxruntime fails on the output: {str(exc).splitlines()[0]}")
            continue
        for i, (expected, got) in enumerate(zip(reference, actual)):
            result = compare_outputs(expected, got, rtol=case.rtol, atol=case.atol)
            if not result.ok:
                sweep.failures.append(f"{case.name} (data set {i}): {result.summary()}")
                break
    sweep.counters = counter.counters
    return sweep


def _bake_parameters(case: Case) -> Case | None:
    """The case with every fed input but the first turned into an initializer (first data set)."""
    names = _fed_inputs(case.model)
    if len(names) < 2:
        return None
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    feeds = dict(case.feeds[0])
    keep = []
    for inp in model.graph.input:
        if inp.name not in names[1:]:
            keep.append(inp)
            continue
        value = feeds.pop(inp.name)
        if not isinstance(value, np.ndarray) or not inp.type.HasField("tensor_type"):
            return None
        tensor = numpy_helper.from_array(value, inp.name)
        if tensor.data_type != inp.type.tensor_type.elem_type:
            return None
        model.graph.initializer.append(tensor)
        if model.ir_version < 4:
            keep.append(inp)  # IR < 4 lists initializers as (overridable) inputs
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return Case(case.name + "[baked]", model, [feeds], case.rtol, case.atol)


def test_every_node_case_keeps_its_outputs(node_cases: list[tuple[str, Case]], registry: PassRegistry) -> None:
    """Zero mismatches over the whole node suite; the passes must also have fired somewhere."""
    sweep = _sweep([case for _, case in node_cases], registry)
    assert not sweep.failures, sweep.summary() + "\n" + "\n".join(sweep.failures[:30])
    assert sweep.scored + sweep.unchanged > 1500 and sweep.rewritten_cases > 100, sweep.summary()
    # Inference Dropouts, Casts to the same type and single-input variadics exist in the suite.
    for rule in ("drop-inference-dropout", "drop-same-type-cast", "drop-single-input-sum"):
        assert sweep.counters.get(rule, 0) > 0, sweep.summary()


def test_node_cases_with_baked_parameters(node_cases: list[tuple[str, Case]], registry: PassRegistry) -> None:
    """With constant shapes, axes and pads the rules decide on real parameters; outputs still agree."""
    baked = [b for op, case in node_cases if op in REWRITTEN_OPS and (b := _bake_parameters(case)) is not None]
    sweep = _sweep(baked, registry)
    assert not sweep.failures, sweep.summary() + "\n" + "\n".join(sweep.failures[:30])
    assert sweep.scored + sweep.unchanged > 150 and sweep.rewritten_cases > 0, sweep.summary()
