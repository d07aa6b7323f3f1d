"""Load -> save is lossless on every model of the onnx backend suites, and outputs do not change.

For each case: ``ir.load`` -> ``ir.to_proto`` equals the original field by field (a failure names
the first differing field), a sample also goes through ``ir.save`` -> ``onnx.load``, the
verifier finds nothing, the input proto is left untouched, and, where onnxruntime runs the
original correctly, the round-tripped model gives bit-identical outputs (NaN equals NaN).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import pytest

from graphopt import ir

from _conformance import Case, Tally, compare_runs, first_difference, run_case

if TYPE_CHECKING:
    from conftest import SuiteStore

#: Every n-th case of a proto suite also goes through a file; data folders always do.
SAVE_EVERY = 10

#: Fewer cases than this means the suite did not load (not that it is small).
MIN_CASES = {"node": 1500, "model": 20, "data": 100, "light": 9}


def _structural_problem(case: Case, index: int, folder: str) -> tuple[str, onnx.ModelProto | None]:
    """What is wrong with the round trip of ``case`` (and the round-tripped proto)."""
    original = case.model
    before = original.SerializeToString()
    try:
        model = ir.load(case.path) if case.path else ir.load(original)
    except Exception as exc:  # noqa: BLE001 - any exception is a failure to report with the case
        return f"ir.load raised {type(exc).__name__}: {exc}", None
    problems = ir.find_problems(model)
    if problems:
        return f"verifier: {problems[0]}" + (f" (+{len(problems) - 1})" if len(problems) > 1 else ""), None
    back = ir.to_proto(model)
    if back != original:
        return f"to_proto differs at {first_difference(original, back)}", None
    if original.SerializeToString() != before:
        return "ir.load modified the proto it was given", None
    if case.path or index % SAVE_EVERY == 0:
        path = os.path.join(folder, f"case{index}.onnx")
        ir.save(model, path)
        saved = onnx.load(path)
        os.unlink(path)
        if saved != original:
            return f"ir.save output differs at {first_difference(original, saved)}", None
    return "", back


def _check_suite(suites: SuiteStore, suite: str, folder: str) -> Tally:
    tally = suites.tally(f"round trip [{suite}]", skip_label="not run in onnxruntime")
    cases = suites.cases(suite)
    assert len(cases) >= MIN_CASES[suite], f"only {len(cases)} {suite} cases found"
    for index, case in enumerate(cases):
        problem, back = _structural_problem(case, index, folder)
        if problem:
            tally.fail(case, problem)
            continue
        reference = suites.reference(case)
        if reference.outputs is None:
            tally.skip(reference.skip)
            continue
        try:
            outputs = run_case(back.SerializeToString(), case)
        except Exception as exc:  # noqa: BLE001
            tally.fail(case, f"onnxruntime fails on the round-tripped model: {exc}")
            continue
        mismatch = compare_runs(reference.outputs, outputs, case.output_names, rtol=0.0, atol=0.0)
        if mismatch:
            tally.fail(case, f"outputs changed: {mismatch}")
            continue
        tally.passed += 1
    return tally


@pytest.mark.parametrize("suite", ["node", "model", "data", "light"])
def test_round_trip_is_lossless_and_keeps_outputs(suites: SuiteStore, suite: str, tmp_path: Path) -> None:
    """Every case round-trips exactly; scored cases run to identical outputs."""
    tally = _check_suite(suites, suite, str(tmp_path))
    assert not tally.failures, tally.failure_report()
    assert tally.passed > 0, tally.summary()
