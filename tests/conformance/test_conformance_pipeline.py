"""The default pipeline (``graphopt.optimize(model, level=2)``) on every backend-suite model.

For each case: the optimized model passes ``onnx.checker.check_model`` (where the original
does), keeps the graph's input and output names and types, leaves the given proto untouched,
and, where onnxruntime runs the original correctly, computes the same outputs within the case's
rtol/atol. The ``node-baked`` suite turns every fed input of a node case into an initializer,
which makes the whole graph constant. A case that onnxruntime cannot run still goes through
the pipeline: ``optimize`` may refuse it with a ``GraphoptError``, but must not crash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
import pytest

import graphopt
from graphopt.errors import GraphoptError
from graphopt.pipeline import PassContext

from _conformance import Case, Tally, compare_runs, run_case

if TYPE_CHECKING:
    from conftest import SuiteStore


def _signature(model: onnx.ModelProto) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    graph = model.graph
    return ([(i.name, i.type.SerializeToString(deterministic=True)) for i in graph.input],
            [(o.name, o.type.SerializeToString(deterministic=True)) for o in graph.output])


def _checker_problem(optimized: onnx.ModelProto, original: onnx.ModelProto) -> str:
    try:
        onnx.checker.check_model(optimized)
    except onnx.checker.ValidationError as exc:
        try:
            onnx.checker.check_model(original)
        except onnx.checker.ValidationError:
            return ""  # the checker refuses the original as well
        return f"onnx.checker refuses the output: {str(exc).splitlines()[0]}"
    return ""


def _check_case(suites: SuiteStore, case: Case, tally: Tally) -> None:
    reference = suites.reference(case)
    before = case.model.SerializeToString()
    try:
        optimized = graphopt.optimize(case.model, level=2,
                                      ctx=PassContext(opt_level=2, registry=suites.registry))
    except GraphoptError as exc:
        if reference.outputs is None:
            tally.skip(f"{reference.skip}; optimize refused it")
        else:
            tally.fail(case, f"optimize refused a model onnxruntime runs: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - a crash is a bug whatever the model
        tally.fail(case, f"optimize crashed: {type(exc).__name__}: {exc}")
        return
    if case.model.SerializeToString() != before:
        tally.fail(case, "optimize modified the ModelProto it was given")
        return
    if _signature(optimized) != _signature(case.model):
        tally.fail(case, "graph inputs or outputs changed (names or types)")
        return
    problem = _checker_problem(optimized, case.model)
    if problem:
        tally.fail(case, problem)
        return
    if reference.outputs is None:
        tally.skip(reference.skip)
        return
    try:
        outputs = run_case(optimized.SerializeToString(), case)
    except Exception as exc:  # noqa: BLE001
        tally.fail(case, f"onnxruntime fails on the optimized model: {str(exc).splitlines()[0]}")
        return
    mismatch = compare_runs(reference.outputs, outputs, case.output_names, case.rtol, case.atol)
    if mismatch:
        tally.fail(case, f"outputs changed: {mismatch}")
        return
    tally.passed += 1


@pytest.mark.parametrize("suite", ["node", "node-baked", "model", "data", "light"])
def test_default_pipeline_keeps_outputs(suites: SuiteStore, suite: str) -> None:
    """Every case optimizes to a valid model that computes what the original computes."""
    tally = suites.tally(f"optimize -O2 [{suite}]")
    if suite == "node-baked":
        for _, baked in suites.baked():
            if isinstance(baked, str):
                tally.skip(f"not bakeable: {baked}")
            else:
                _check_case(suites, baked, tally)
    else:
        for case in suites.cases(suite):
            _check_case(suites, case, tally)
    assert not tally.failures, tally.failure_report()
    assert tally.passed > 0, tally.summary()
