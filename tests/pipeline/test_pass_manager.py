"""The pass manager: fixed points, requirements, analyses, disabled passes, errors."""

from __future__ import annotations

import logging
from typing import Callable

import pytest

from graphopt import ir
from graphopt.errors import PassError, PipelineError, UnsupportedModelError
from graphopt.pipeline import (AnalysisCache, FunctionPass, Instrument, Pass, PassContext, PassManager,
                               PassRegistry, PassResult, function_pass)


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


class ToggleDoc(Pass):
    """Flip the doc string of the first node on every run: it never settles."""

    name = "toggle-doc"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        node = next(iter(model.graph))
        node.doc_string = "" if node.doc_string else "x"
        return PassResult(True, {"toggled": 1})


class SortNodes(Pass):
    """Provide the 'sorted' property by topologically sorting the main graph."""

    name = "sort-nodes"
    provides = frozenset({"sorted"})

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return PassResult(model.graph.sort())


class NeedsSorted(Pass):
    """Require 'sorted'; change nothing."""

    name = "needs-sorted"
    requires = frozenset({"sorted"})

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return PassResult(False)


class UseNodeCount(Pass):
    """Read the 'node-count' analysis from the context's cache."""

    name = "use-node-count"
    computed: list[int] = []

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        def compute() -> int:
            type(self).computed.append(len(model.graph))
            return len(model.graph)

        return PassResult(False, {"nodes": ctx.analyses.get("node-count", compute)})


class RenameFirstNode(Pass):
    """Change the model (a node name), preserving nothing."""

    name = "rename-first-node"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        node = next(iter(model.graph))
        node.name = node.name + "'"
        return PassResult(True)


class RenameFirstNodeKeepingCount(RenameFirstNode):
    """Change the model, preserving the node-count analysis and the 'sorted' property."""

    name = "rename-keeping-count"
    preserves = frozenset({"node-count", "sorted"})


class RejectsModel(Pass):
    """Refuse the model with a user-facing error."""

    name = "rejects-model"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        raise UnsupportedModelError("graph 'chain' uses a float8 weight; convert it first")


@pytest.fixture
def reg(registry: PassRegistry) -> PassRegistry:
    for cls in (ToggleDoc, SortNodes, NeedsSorted, UseNodeCount, RenameFirstNode,
                RenameFirstNodeKeepingCount, RejectsModel):
        registry.register(cls)
    return registry


def test_passes_run_in_order_and_report_what_they_did(reg: PassRegistry, build_model) -> None:
    model = build_model()
    report = PassManager("count-nodes,remove-identity,count-nodes", PassContext(registry=reg)).run(model)
    assert [(r.name, r.changed, r.counters) for r in report.records] == [
        ("count-nodes", False, {"nodes": 6}),
        ("remove-identity", True, {"removed": 4}),
        ("count-nodes", False, {"nodes": 2}),
    ]
    assert op_types(model) == ["Relu", "Neg"]
    assert report.changed
    assert report.totals()["count-nodes"] == {"runs": 2, "changed": 0, "seconds": pytest.approx(
        report.records[0].seconds + report.records[2].seconds), "counters": {"nodes": 8}}
    ir.verify(model)


def test_fixpoint_reruns_until_nothing_changes(reg: PassRegistry, build_model) -> None:
    model = build_model()
    report = PassManager("fixpoint<max=10>(remove-one-identity,count-nodes)", PassContext(registry=reg)).run(model)
    runs = [(r.name, r.round, r.changed) for r in report.records if r.name == "remove-one-identity"]
    # Four Identities: four rounds remove one each, the fifth finds nothing and ends the group.
    assert runs == [("remove-one-identity", k, k <= 4) for k in range(1, 6)]
    assert op_types(model) == ["Relu", "Neg"]
    assert report.warnings == []


def test_fixpoint_round_skips_a_pass_when_nothing_changed_since_it_found_nothing(reg: PassRegistry,
                                                                                 build_model) -> None:
    """count-nodes found nothing after round 1's last change: round 2 does not run it again."""
    model = build_model()
    report = PassManager("fixpoint<max=5>(remove-identity,count-nodes)", PassContext(registry=reg)).run(model)
    assert [(r.name, r.round, r.changed) for r in report.records] == [
        ("remove-identity", 1, True), ("count-nodes", 1, False), ("remove-identity", 2, False)]
    assert op_types(model) == ["Relu", "Neg"]
    assert report.warnings == []


def test_fixpoint_round_reruns_a_pass_after_any_later_change(reg: PassRegistry, build_model) -> None:
    """count-nodes runs before each change, so every round runs it again and sees the new graph."""
    report = PassManager("fixpoint<max=10>(count-nodes,remove-one-identity)",
                         PassContext(registry=reg)).run(build_model())
    counts = [r.counters["nodes"] for r in report.records if r.name == "count-nodes"]
    assert counts == [6, 5, 4, 3, 2]


class ProvideA(Pass):
    """Provide 'a' without changing anything."""

    name = "provide-a"
    provides = frozenset({"a"})

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return PassResult(False)


class ProvideB(ProvideA):
    """Provide 'b' without changing anything."""

    name = "provide-b"
    provides = frozenset({"b"})


class NeedsAB(NeedsSorted):
    """Require 'a' and 'b'."""

    name = "needs-ab"
    requires = frozenset({"a", "b"})


def test_every_provider_runs_though_none_changes_anything(reg: PassRegistry, build_model) -> None:
    """Providers are built per requirement; one that changed nothing never stands in for another."""
    for cls in (ProvideA, ProvideB, NeedsAB):
        reg.register(cls)
    report = PassManager("fixpoint<max=6>(needs-ab,remove-one-identity)", PassContext(registry=reg)).run(build_model())
    names = [r.name for r in report.records]
    assert names[:4] == ["provide-a", "provide-b", "needs-ab", "remove-one-identity"]
    # Each of the five rounds follows a change (the first: the start), so each provides both again.
    assert names.count("provide-a") == names.count("provide-b") == names.count("needs-ab") == 5
    assert not report.warnings


def test_fixpoint_without_max_uses_the_context_limit(reg: PassRegistry, build_model) -> None:
    ctx = PassContext(registry=reg)
    ctx.limits.max_fixpoint_iterations = 3
    report = PassManager("fixpoint(remove-one-identity)", ctx).run(build_model())
    assert len(report.records) == 3
    assert "cap of 3 rounds" in report.warnings[0]


def test_fixpoint_cap_warning_names_the_passes_that_kept_changing(reg: PassRegistry, build_model,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="graphopt.pipeline._manager"):
        report = PassManager("fixpoint<max=3>(toggle-doc,remove-identity,count-nodes)",
                             PassContext(registry=reg)).run(build_model())
    assert [r.name for r in report.records].count("toggle-doc") == 3
    assert len(report.warnings) == 1
    warning = report.warnings[0]
    assert "hit its cap of 3 rounds" in warning
    # remove-identity changed only in round 1, so only toggle-doc kept changing.
    assert "still changing: toggle-doc (" in warning
    assert warning in caplog.text


def test_requirement_runs_the_registered_provider_first(reg: PassRegistry, build_model) -> None:
    report = PassManager("needs-sorted,count-nodes,needs-sorted", PassContext(registry=reg)).run(build_model())
    # The provider runs once: count-nodes changes nothing, so 'sorted' still holds.
    assert [r.name for r in report.records] == ["sort-nodes", "needs-sorted", "count-nodes", "needs-sorted"]


def test_a_change_that_does_not_preserve_a_property_reruns_its_provider(reg: PassRegistry, build_model) -> None:
    report = PassManager("needs-sorted,rename-keeping-count,needs-sorted,rename-first-node,needs-sorted",
                         PassContext(registry=reg)).run(build_model())
    assert [r.name for r in report.records] == [
        "sort-nodes", "needs-sorted", "rename-keeping-count", "needs-sorted",
        "rename-first-node", "sort-nodes", "needs-sorted"]


def test_requirement_without_provider_is_an_error(registry: PassRegistry, build_model) -> None:
    registry.register(NeedsSorted)
    with pytest.raises(PipelineError, match="pass 'needs-sorted' requires 'sorted', which no registered pass provides"):
        PassManager("needs-sorted", PassContext(registry=registry)).run(build_model())


def test_requirement_whose_provider_is_disabled_skips_the_pass_with_a_warning(reg: PassRegistry,
                                                                               build_model) -> None:
    report = PassManager("needs-sorted,count-nodes",
                         PassContext(registry=reg, disabled={"sort-nodes"})).run(build_model())
    assert [r.name for r in report.records] == ["count-nodes"]
    assert report.warnings == ["skipping pass 'needs-sorted': it requires 'sorted', and its provider(s) "
                               "sort-nodes are disabled"]


def test_preserved_analyses_stay_cached(reg: PassRegistry, build_model) -> None:
    UseNodeCount.computed = []
    ctx = PassContext(registry=reg)
    report = PassManager("use-node-count,count-nodes,rename-keeping-count,use-node-count,"
                         "rename-first-node,remove-identity,use-node-count", ctx).run(build_model())
    # Computed once for the first use, kept through a no-change pass and a preserving change,
    # recomputed after rename-first-node (which does not preserve it) and remove-identity.
    assert UseNodeCount.computed == [6, 2]
    assert [r.counters["nodes"] for r in report.records if r.name == "use-node-count"] == [6, 6, 2]


def test_analysis_cache_is_fresh_for_each_run(reg: PassRegistry, build_model) -> None:
    UseNodeCount.computed = []
    pm = PassManager("use-node-count", PassContext(registry=reg))
    pm.run(build_model())
    model = build_model()
    model.graph.remove(model.graph.nodes[-1], force=True)
    report = pm.run(model)
    assert UseNodeCount.computed == [6, 5]
    assert report.records[0].counters == {"nodes": 5}
    assert pm.analyses is pm.ctx.analyses


def test_analysis_cache_api() -> None:
    cache = AnalysisCache()
    calls: list[str] = []
    assert cache.get("a", lambda: calls.append("a") or 1) == 1
    assert cache.get("a", lambda: calls.append("a") or 2) == 1
    cache.get("b", lambda: 3)
    cache.invalidate(frozenset({"b"}))
    assert "a" not in cache and "b" in cache
    assert calls == ["a"]


def test_disabled_passes_are_skipped(reg: PassRegistry, build_model) -> None:
    model = build_model()
    report = PassManager("remove-identity,count-nodes", PassContext(registry=reg, disabled={"remove-identity"})).run(model)
    assert [r.name for r in report.records] == ["count-nodes"]
    assert op_types(model).count("Identity") == 4


def test_properties_do_not_leak_between_runs(reg: PassRegistry, build_model) -> None:
    pm = PassManager("needs-sorted", PassContext(registry=reg))
    pm.run(build_model())
    report = pm.run(build_model())
    assert [r.name for r in report.records] == ["sort-nodes", "needs-sorted"]


def test_function_pass_decorator_makes_a_registrable_pass(registry: PassRegistry, build_model) -> None:
    @function_pass("neg-to", opt_level=2, provides=("no-neg",), options={"op": "Identity"})
    def neg_to(model: ir.Model, ctx: PassContext, op: str) -> dict[str, int]:
        """Replace every Neg by another unary operator (a test pass)."""
        replaced = 0
        for node in model.graph:
            if node.op_type == "Neg":
                node.op_type = op
                replaced += 1
        return {"replaced": replaced}

    assert issubclass(neg_to, FunctionPass) and neg_to.name == "neg-to"
    assert neg_to.__name__ == "NegToPass"
    assert neg_to.opt_level == 2 and neg_to.provides == frozenset({"no-neg"})
    assert neg_to.description == "Replace every Neg by another unary operator (a test pass)."
    registry.register(neg_to)
    model = build_model()
    report = PassManager("neg-to<op=Abs>,neg-to", PassContext(registry=registry)).run(model)
    assert [(r.changed, r.counters) for r in report.records] == [(True, {"replaced": 1}),
                                                                  (False, {"replaced": 0})]
    assert op_types(model) == ["Relu"] + ["Identity"] * 4 + ["Abs"]


@pytest.mark.parametrize("returned, changed, counters", [
    (PassResult(True, {"a": 1}), True, {"a": 1}),
    ((False, {"a": 2}), False, {"a": 2}),
    ({"a": 0, "b": 0}, False, {"a": 0, "b": 0}),
    ({"a": 0, "b": 3}, True, {"a": 0, "b": 3}),
    (True, True, {}),
    (None, False, {}),
])
def test_function_pass_return_forms(returned: object, changed: bool, counters: dict, build_model) -> None:
    @function_pass("returns-something")
    def fn(model: ir.Model, ctx: PassContext) -> object:
        return returned

    assert fn().run(build_model(), PassContext(registry=PassRegistry())) == PassResult(changed, counters)


def test_pass_instances_can_be_given_directly(reg: PassRegistry, build_model) -> None:
    pm = PassManager([reg.get("remove-identity")(), reg.get("count-nodes")()], PassContext(registry=reg))
    assert pm.pipeline_text == "remove-identity,count-nodes"
    report = pm.run(build_model())
    assert report.records[1].counters == {"nodes": 2}


def test_crash_names_the_pass_and_the_passes_before_it(reg: PassRegistry, build_model) -> None:
    with pytest.raises(PassError) as info:
        PassManager("count-nodes,remove-identity,crash,count-nodes", PassContext(registry=reg)).run(build_model())
    err = info.value
    assert err.pass_name == "crash"
    assert err.ran_before == ["count-nodes", "remove-identity"]
    assert str(err) == ("pass 'crash' failed: ZeroDivisionError: division by zero in the test pass "
                        "(passes run before it: count-nodes, remove-identity)")
    assert isinstance(err.__cause__, ZeroDivisionError)
    assert err.reproducer is None


def test_long_histories_are_shortened_in_the_message(reg: PassRegistry, build_model) -> None:
    with pytest.raises(PassError) as info:
        PassManager(",".join(["count-nodes"] * 10 + ["crash"]), PassContext(registry=reg)).run(build_model())
    assert len(info.value.ran_before) == 10
    assert "(passes run before it: 2 earlier, then count-nodes, count-nodes," in str(info.value)


def test_user_errors_from_a_pass_propagate_unchanged(reg: PassRegistry, build_model) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        PassManager("count-nodes,rejects-model", PassContext(registry=reg)).run(build_model())
    assert str(info.value) == "graph 'chain' uses a float8 weight; convert it first"


def test_pass_errors_raised_inside_a_pass_get_the_history(reg: PassRegistry, build_model) -> None:
    @function_pass("raises-pass-error")
    def raises(model: ir.Model, ctx: PassContext) -> bool:
        raise PassError("pass 'raises-pass-error' found a broken invariant", pass_name="raises-pass-error",
                        ran_before=[])

    reg.register(raises)
    with pytest.raises(PassError) as info:
        PassManager("count-nodes,raises-pass-error", PassContext(registry=reg)).run(build_model())
    assert str(info.value) == "pass 'raises-pass-error' found a broken invariant"
    assert info.value.ran_before == ["count-nodes"]


def test_nested_pipeline_shares_the_run_state(reg: PassRegistry, build_model) -> None:
    @function_pass("nested")
    def nested(model: ir.Model, ctx: PassContext) -> bool:
        inner = PassManager("remove-identity", ctx).run(model)
        return inner.changed

    class Starts(Instrument):
        def __init__(self) -> None:
            self.events: list[str] = []

        def on_pipeline_start(self, model: ir.Model, ctx: PassContext, report: object) -> None:
            self.events.append("start")

        def after_pass(self, p: Pass, model: ir.Model, ctx: PassContext, record: object) -> None:
            self.events.append(p.name)

        def on_pipeline_end(self, model: ir.Model, ctx: PassContext, report: object) -> None:
            self.events.append("end")

    reg.register(nested)
    starts = Starts()
    ctx = PassContext(registry=reg, bisect_limit=3, instruments=[starts])
    report = PassManager("count-nodes,nested", ctx).run(build_model())
    assert ctx.passes_run == ["count-nodes", "remove-identity", "nested"]
    assert report.rewrites_applied == 3 and report.bisect_stopped
    assert ctx.current_pass == ""
    # Instruments see the inner passes, but only one start and one end.
    assert starts.events == ["start", "count-nodes", "remove-identity", "nested", "end"]


def test_ctx_run_state_is_reset_between_runs(reg: PassRegistry, build_model) -> None:
    ctx = PassContext(registry=reg, bisect_limit=2)
    pm = PassManager("remove-identity", ctx)
    first = pm.run(build_model())
    second = pm.run(build_model())
    assert first.rewrites_applied == second.rewrites_applied == 2
    assert ctx.passes_run == ["remove-identity"]


def test_context_rejects_bad_settings() -> None:
    with pytest.raises(PipelineError, match="unknown target 'tpu'; choose one of cpu, cuda"):
        PassContext(target="tpu")
    with pytest.raises(PipelineError, match="opt level must be 0-3, got 5"):
        PassContext(opt_level=5)


def test_registry_get_is_used_for_unknown_names(make_ctx: Callable[..., PassContext]) -> None:
    with pytest.raises(PipelineError, match="unknown pass 'remove-identities'; did you mean remove-identity"):
        PassManager("remove-identities", make_ctx())
