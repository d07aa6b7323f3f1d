"""Instruments: time, statistics, IR dumps, verification after each pass, bisecting."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnx.parser
import pytest

from graphopt import ir
from graphopt.errors import PassError, PipelineError, VerificationError
from graphopt.pipeline import (DumpIR, Instrument, Pass, PassContext, PassManager, PassRegistry,
                               PassResult, PassStatistics, TimePasses, VerifyEach)
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


class Sleep(Pass):
    """Take a measurable amount of time and change nothing."""

    name = "sleep"
    options = {"ms": 30}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        time.sleep(self.config["ms"] / 1000)
        return PassResult(False)


class CorruptUses(Pass):
    """Bug: clear the use list of the graph input behind the IR's back."""

    name = "corrupt-uses"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        model.graph.inputs[0]._uses.clear()
        return PassResult(True)


class MoveLastFirst(Pass):
    """Bug: move the last node to the front, before the values it reads are computed."""

    name = "move-last-first"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        g = model.graph
        last = g.nodes[-1]
        inputs = last.inputs
        g.remove(last, force=True)
        last.set_inputs(inputs)
        g.insert_before(g.nodes[0], last)
        return PassResult(True)


class SortGraph(Pass):
    """Sort the main graph topologically."""

    name = "sort-graph"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return PassResult(model.graph.sort())


class ReluToSigmoid(Pass):
    """Bug: a 'fusion' that changes the numbers (Relu becomes Sigmoid)."""

    name = "relu-to-sigmoid"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        n = 0
        for node in model.graph:
            if node.op_type == "Relu" and ctx.allow_rewrite("Relu -> Sigmoid"):
                node.op_type = "Sigmoid"
                n += 1
        return PassResult(n > 0, {"rewritten": n})


class ScaleBeforeNeg(Pass):
    """Insert ``Mul(x, 1 + eps)`` before the Neg: a change of ``eps`` relative error."""

    name = "scale-before-neg"
    options = {"eps": 1e-6}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        g = model.graph
        neg = next(n for n in g if n.op_type == "Neg")
        scale = g.add_initializer(model.unique_name("scale"),
                                  ir.ArrayTensor(np.array(1 + self.config["eps"], np.float32)))
        mul = ir.Node("", "Mul", [neg.inputs[0], scale], outputs=[ir.Value(model.unique_name("scaled"))])
        g.insert_before(neg, mul)
        neg.replace_input(0, mul.outputs[0])
        return PassResult(True)


class RenameOp(Pass):
    """Bug: turn the Neg into an operator that does not exist."""

    name = "unknown-op"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        next(n for n in model.graph if n.op_type == "Neg").op_type = "NoSuchOp"
        return PassResult(True)


class ClaimsNoChange(ReluToSigmoid):
    """Bug: changes numbers but says it changed nothing (structural checks still run)."""

    name = "claims-no-change"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        super().run(model, ctx)
        return PassResult(False)


@pytest.fixture
def reg(registry: PassRegistry) -> PassRegistry:
    for cls in (Sleep, CorruptUses, MoveLastFirst, SortGraph, ReluToSigmoid, ScaleBeforeNeg, RenameOp,
                ClaimsNoChange):
        registry.register(cls)
    return registry


def run_pipeline(reg: PassRegistry, pipeline: str, model: ir.Model, *instruments: Instrument,
                 **ctx_fields) -> tuple:
    ctx = PassContext(registry=reg, instruments=list(instruments), **ctx_fields)
    return PassManager(pipeline, ctx).run(model), ctx


# -- TimePasses / PassStatistics ------------------------------------------------------------------
def test_time_passes_sums_seconds_and_runs(reg: PassRegistry, build_model) -> None:
    timer = TimePasses()
    report, _ = run_pipeline(reg, "count-nodes,sleep<ms=30>,remove-identity,count-nodes", build_model(), timer)
    assert timer.runs == {"count-nodes": 2, "sleep": 1, "remove-identity": 1}
    totals = report.totals()
    for name, seconds in timer.seconds.items():
        assert seconds == pytest.approx(totals[name]["seconds"])
    assert timer.seconds["sleep"] >= 0.03
    rows = timer.rows()
    assert rows[0][:2] == ("sleep", 1)
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
    assert sum(r[3] for r in rows) == pytest.approx(1.0)
    assert timer.total_seconds == pytest.approx(sum(timer.seconds.values()))
    assert TimePasses.COLUMNS == ("pass", "runs", "seconds", "share")


def test_time_passes_accumulates_over_runs_until_reset(reg: PassRegistry, build_model) -> None:
    timer = TimePasses()
    for _ in range(2):
        run_pipeline(reg, "sleep<ms=5>", build_model(), timer)
    assert timer.runs == {"sleep": 2} and timer.seconds["sleep"] >= 0.01
    timer.reset()
    assert timer.rows() == []


def test_pass_statistics_sums_counters_per_pass(reg: PassRegistry, build_model) -> None:
    stats = PassStatistics()
    run_pipeline(reg, "count-nodes,remove-one-identity,remove-identity,count-nodes", build_model(), stats)
    assert stats.counters == {"count-nodes": {"nodes": 6 + 2}, "remove-one-identity": {"removed": 1},
                              "remove-identity": {"removed": 3}}
    assert stats.rows() == [("count-nodes", "nodes", 8), ("remove-identity", "removed", 3),
                            ("remove-one-identity", "removed", 1)]


# -- DumpIR ----------------------------------------------------------------------------------------
def test_dump_ir_writes_the_input_and_each_change(reg: PassRegistry, build_model, tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    model = build_model()
    original = ir.print_model(model)
    dump = DumpIR(folder)
    run_pipeline(reg, "count-nodes,remove-one-identity,count-nodes,remove-identity,count-nodes", model, dump)
    names = sorted(os.listdir(folder))
    assert names == ["000-input.txt", "002-remove-one-identity.txt", "004-remove-identity.txt"]
    assert dump.files == [str(folder / n) for n in names]
    texts = [(folder / n).read_text() for n in names]
    assert texts[0] == original + ("" if original.endswith("\n") else "\n")
    assert texts[-1].strip() == ir.print_model(model).strip()
    # Consecutive files differ by exactly what each pass did.
    assert [t.count("Identity") for t in texts] == [4, 3, 0]
    for text in texts:  # each dump is valid ONNX text
        parsed = ir.load(onnx.parser.parse_model(text))
        assert ir.print_model(parsed).strip() == text.strip()


def test_dump_ir_removes_stale_dumps_only(reg: PassRegistry, build_model, tmp_path: Path) -> None:
    (tmp_path / "007-old-pass.txt").write_text("stale")
    (tmp_path / "notes.txt").write_text("mine")
    run_pipeline(reg, "count-nodes", build_model(), DumpIR(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["000-input.txt", "notes.txt"]


# -- VerifyEach: structural ---------------------------------------------------------------------------
def test_verify_each_passes_sound_pipelines(reg: PassRegistry, build_model) -> None:
    verify = VerifyEach()
    report, _ = run_pipeline(reg, "remove-one-identity,remove-identity,count-nodes", build_model(), verify)
    assert len(report.records) == 3


def test_verify_each_names_the_pass_that_corrupts_use_lists(reg: PassRegistry, build_model) -> None:
    with pytest.raises(PassError) as info:
        run_pipeline(reg, "count-nodes,remove-identity,corrupt-uses,count-nodes", build_model(), VerifyEach())
    err = info.value
    assert err.pass_name == "corrupt-uses"
    assert err.ran_before == ["count-nodes", "remove-identity"]
    assert str(err) == ("verify-each: pass 'corrupt-uses' broke an IR invariant: main graph: use list of "
                        "'x' misses input 0 of Relu node (passes run before it: count-nodes, remove-identity)")
    assert isinstance(err.__cause__, VerificationError)


def test_verify_each_names_the_pass_that_breaks_the_order(reg: PassRegistry, build_model) -> None:
    with pytest.raises(PassError) as info:
        run_pipeline(reg, "remove-identity,move-last-first", build_model(), VerifyEach())
    assert info.value.pass_name == "move-last-first"
    assert "reads 'a' before it is computed (nodes are not in topological order)" in str(info.value)
    assert "passes run before it: remove-identity" in str(info.value)


def test_without_verify_each_the_corruption_goes_unnoticed(reg: PassRegistry, build_model) -> None:
    model = build_model()
    run_pipeline(reg, "remove-identity,move-last-first", model)
    with pytest.raises(VerificationError):
        ir.verify(model)


def test_verify_each_does_not_blame_passes_for_problems_of_the_input(
        reg: PassRegistry, build_model, caplog: pytest.LogCaptureFixture) -> None:
    unsorted = build_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 4] x) => (float[N, 4] y) {
           y = Neg(a)
           a = Relu(x)
        }
    """)
    with caplog.at_level(logging.WARNING, logger="graphopt.pipeline._instruments"):
        with pytest.raises(PassError) as info:
            run_pipeline(reg, "count-nodes,sort-graph,count-nodes,move-last-first", unsorted, VerifyEach())
    assert "the input model already has 1 problem(s)" in caplog.text
    # count-nodes kept the input's problem and sort-graph fixed it; move-last-first broke it again.
    assert info.value.pass_name == "move-last-first"
    assert info.value.ran_before == ["count-nodes", "sort-graph", "count-nodes"]


def test_verify_each_rejects_unknown_modes() -> None:
    with pytest.raises(PipelineError, match="verify-each mode 'exact' is unknown; choose structural or numeric"):
        VerifyEach(mode="exact")


# -- VerifyEach: numeric -----------------------------------------------------------------------------
def test_numeric_verify_names_the_pass_that_changes_numbers(reg: PassRegistry, build_model) -> None:
    verify = VerifyEach(mode="numeric")
    with pytest.raises(PassError) as info:
        run_pipeline(reg, "remove-one-identity,remove-identity,relu-to-sigmoid,count-nodes", build_model(), verify)
    err = info.value
    assert err.pass_name == "relu-to-sigmoid"
    assert err.ran_before == ["remove-one-identity", "remove-identity"]
    message = str(err)
    assert message.startswith("verify-each=numeric: pass 'relu-to-sigmoid' changed output 'y': max abs error ")
    assert "exceeds atol=1e-05 + rtol=0.0001*|expected|" in message
    assert message.endswith("(passes run before it: remove-one-identity, remove-identity)")
    assert verify.numeric_checks == 3 and verify.numeric_skipped is None


def test_numeric_verify_compares_with_the_input_on_seeded_inputs(reg: PassRegistry, chain_text: str,
                                                                 build_model) -> None:
    # The reference is onnxruntime on the original model with the documented seeded inputs.
    proto = onnx.parser.parse_model(chain_text)
    feeds = random_inputs(make_session(proto), seed=3, default_dim=2)
    assert feeds["x"].shape == (2, 4)
    model = build_model()
    verify = VerifyEach(mode="numeric", seed=3)
    run_pipeline(reg, "remove-identity", model, verify)
    assert verify._feeds is not None and np.array_equal(verify._feeds["x"], feeds["x"])
    after = run_model(ir.to_proto(model), feeds)
    assert compare_outputs(run_model(proto, feeds), after, rtol=0, atol=0).ok


def test_numeric_verify_honours_the_tolerance(reg: PassRegistry, build_model) -> None:
    loose = VerifyEach(mode="numeric", rtol=1e-4, atol=1e-5)
    run_pipeline(reg, "scale-before-neg<eps=1e-6>", build_model(), loose)
    assert loose.numeric_checks == 1
    strict = VerifyEach(mode="numeric", rtol=1e-8, atol=0.0)
    with pytest.raises(PassError, match="pass 'scale-before-neg' changed output 'y'"):
        run_pipeline(reg, "scale-before-neg<eps=1e-6>", build_model(), strict)


def test_numeric_verify_reports_a_model_onnxruntime_cannot_load(reg: PassRegistry, build_model) -> None:
    with pytest.raises(PassError) as info:
        run_pipeline(reg, "remove-identity,unknown-op", build_model(), VerifyEach(mode="numeric"))
    assert info.value.pass_name == "unknown-op"
    assert str(info.value).startswith("verify-each=numeric: after pass 'unknown-op' onnxruntime cannot load "
                                      "the model: ")
    assert "NoSuchOp" in str(info.value)


def test_structural_checks_run_even_when_a_pass_claims_no_change(reg: PassRegistry, build_model) -> None:
    # Numeric checks follow changes only; the structure is checked after every pass.
    verify = VerifyEach(mode="numeric")
    run_pipeline(reg, "claims-no-change", build_model(), verify)
    assert verify.numeric_checks == 0
    with pytest.raises(PassError, match="pass 'corrupt-uses' broke an IR invariant"):
        run_pipeline(reg, "corrupt-uses", build_model(), verify)


CUSTOM_OP_TEXT = """
<ir_version: 10, opset_import: ["" : 21, "test.custom" : 1]>
g (float[N, 4] x) => (float[N, 4] y) {
   a = Relu(x)
   b = Identity(a)
   c = test.custom.Mystery(b)
   y = Neg(c)
}
"""


def test_numeric_verify_skips_models_onnxruntime_cannot_run(reg: PassRegistry, build_model,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    verify = VerifyEach(mode="numeric")
    with caplog.at_level(logging.INFO, logger="graphopt.pipeline._instruments"):
        report, _ = run_pipeline(reg, "remove-identity,relu-to-sigmoid", build_model(CUSTOM_OP_TEXT), verify)
    assert [r.changed for r in report.records] == [True, True]
    assert verify.numeric_skipped is not None
    assert verify.numeric_skipped.startswith("onnxruntime cannot run the input model: ")
    skips = [r for r in caplog.records if "numeric checks skipped" in r.getMessage()]
    assert len(skips) == 1 and skips[0].levelno == logging.INFO
    # Structural checks still run.
    with pytest.raises(PassError, match="pass 'move-last-first' broke an IR invariant"):
        run_pipeline(reg, "move-last-first", build_model(CUSTOM_OP_TEXT), VerifyEach(mode="numeric"))


def test_numeric_verify_skips_unseeded_random_operators(reg: PassRegistry, build_model) -> None:
    verify = VerifyEach(mode="numeric")
    run_pipeline(reg, "relu-to-sigmoid", build_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 4] x) => (float[2, 4] y) {
           r = RandomNormalLike(x)
           a = Add(x, r)
           y = Relu(a)
        }
    """), verify)
    assert verify.numeric_skipped == "the model has random operators without a seed: RandomNormalLike"


# -- bisect --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit, ran", [
    (0, []),
    (1, ["remove-one-identity"]),
    (3, ["remove-one-identity", "remove-identity"]),
    (4, ["remove-one-identity", "remove-identity"]),
])
def test_bisect_limit_applies_exactly_n_rewrites_then_stops(reg: PassRegistry, build_model, limit: int,
                                                            ran: list[str]) -> None:
    model = build_model()
    report, ctx = run_pipeline(reg, "remove-one-identity,remove-identity,count-nodes", model,
                               bisect_limit=limit)
    assert op_types(model).count("Identity") == 4 - limit
    assert [r.name for r in report.records] == ran
    assert report.rewrites_applied == ctx.rewrites_applied == limit
    assert report.bisect_limit == limit
    assert report.bisect_stopped and ctx.bisect_stopped
    assert report.warnings[-1].startswith(f"bisect limit {limit} reached: {limit} rewrite(s) applied")
    ir.verify(model)


def test_bisect_report_names_the_last_rewrite(reg: PassRegistry, build_model) -> None:
    report, _ = run_pipeline(reg, "remove-one-identity,remove-identity", build_model(), bisect_limit=2)
    # The first Identity went in remove-one-identity, so the second one now reads 'a'.
    assert report.last_rewrite == "remove-identity: remove Identity reading 'a'"
    assert "the last in remove-identity: remove Identity reading 'a'" in report.warnings[-1]


def test_bisect_limit_above_the_rewrites_needed_changes_nothing(reg: PassRegistry, build_model) -> None:
    model = build_model()
    report, _ = run_pipeline(reg, "remove-one-identity,remove-identity,count-nodes", model, bisect_limit=5)
    assert [r.name for r in report.records] == ["remove-one-identity", "remove-identity", "count-nodes"]
    assert report.rewrites_applied == 4 and not report.bisect_stopped and report.warnings == []
    assert op_types(model) == ["Relu", "Neg"]


def test_bisect_limit_stops_a_fixpoint_group_without_a_cap_warning(reg: PassRegistry, build_model) -> None:
    model = build_model()
    report, _ = run_pipeline(reg, "fixpoint<max=2>(remove-one-identity,count-nodes),count-nodes", model,
                             bisect_limit=2)
    # Round 2's rewrite is the last one allowed: nothing runs after it.
    assert [r.name for r in report.records] == ["remove-one-identity", "count-nodes", "remove-one-identity"]
    assert op_types(model).count("Identity") == 2
    assert len(report.warnings) == 1 and report.warnings[0].startswith("bisect limit 2 reached")


def test_bisect_finds_the_rewrite_that_breaks_the_numbers(reg: PassRegistry, build_model) -> None:
    # The use the limit exists for: the smallest N whose output differs points at the bad rewrite.
    pipeline = "remove-identity,relu-to-sigmoid"
    broken = [n for n in range(0, 7) if _output_changes(reg, pipeline, build_model, n)]
    assert broken[0] == 5
    report, _ = run_pipeline(reg, pipeline, build_model(), bisect_limit=broken[0])
    assert report.last_rewrite == "relu-to-sigmoid: Relu -> Sigmoid"


def _output_changes(reg: PassRegistry, pipeline: str, build_model, limit: int) -> bool:
    original = build_model()
    model = build_model()
    run_pipeline(reg, pipeline, model, bisect_limit=limit)
    feeds = {"x": np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)}
    return not compare_outputs(run_model(ir.to_proto(original), feeds), run_model(ir.to_proto(model), feeds)).ok
