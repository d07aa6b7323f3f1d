"""Tests of the golden-test harness (``graphopt.testing``): format, checks, updates, pytest plugin.

A harness that cannot fail is worse than none, so most tests here feed it a broken pass and
check that the right check catches it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from graphopt import ir
from graphopt.pipeline import Pass, PassContext, PassRegistry, PassResult
from graphopt.testing import (DEFAULT_ATOL, DEFAULT_RTOL, GoldenCaseError, canonicalize, collect_cases,
                              load_case, parse_case, run_case)
from graphopt.testing.pytest_plugin import case_id

pytest_plugins = ["pytester"]

MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) {
  t = Identity(x)
  y = Relu(t)
}
"""

EXPECTED = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) {
  y = Relu(x)
}
"""


def _case_text(pipeline: str, model: str = MODEL, expected: str | None = EXPECTED,
               headers: str = "") -> str:
    text = f"# PIPELINE: {pipeline}\n{headers}# INPUT\n{model}"
    if expected is not None:
        text += f"# EXPECTED\n{expected}"
    return text


def _write(folder: Path, text: str, name: str = "case.onnxtest") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _registry(*extra: type[Pass]) -> PassRegistry:
    registry = PassRegistry.default(plugins=False)
    for cls in extra:
        registry.register(cls)
    return registry


class ReluToAbs(Pass):
    """A wrong pass: Relu and Abs differ on negative inputs."""

    name = "relu-to-abs"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Abs"
        return PassResult(True)


class RenameOutput(Pass):
    """A wrong pass: it renames the graph output."""

    name = "rename-output"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        model.graph.outputs[0].name = "renamed"
        return PassResult(True)


class Unsort(Pass):
    """A wrong pass: it moves the last node to the front."""

    name = "unsort"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        last = model.graph.nodes[-1]
        inputs = list(last.inputs)
        model.graph.remove(last, force=True)  # drops its inputs: put them back
        last.set_inputs(inputs)
        model.graph.insert_before(model.graph.nodes[0], last)
        return PassResult(True)


class AddTiny(Pass):
    """Adds 1e-6 to the output: within a loose tolerance, outside a tight one."""

    name = "add-tiny"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        out = graph.outputs[0]
        tiny = graph.add_initializer("tiny", ir.ArrayTensor(np.array(1e-6, np.float32)))
        add = graph.append(ir.Node("", "Add", [out, tiny]))
        result = add.outputs[0]
        result.name, result.type = out.name, out.type
        out.name = "before_tiny"
        graph.outputs[0] = result
        return PassResult(True)


# -- format ------------------------------------------------------------------------------------
def test_parse_case_reads_every_header() -> None:
    case = parse_case(_case_text("eliminate-identity", headers=(
        "# DESCRIPTION: one line\n# TOLERANCE: rtol=1e-3 atol=1e-7\n# SEED: 7\n# DIMS: N=5 T=2\n"
        "# a free comment line\n")))
    assert case.pipeline == "eliminate-identity"
    assert case.description == "one line"
    assert (case.rtol, case.atol, case.seed, case.dims) == (1e-3, 1e-7, 7, {"N": 5, "T": 2})
    assert case.expected_text is not None and "Relu(x)" in case.expected_text
    assert not case.expect_unchanged and case.numeric_skip == ""
    defaults = parse_case(_case_text("eliminate-identity"))
    assert (defaults.rtol, defaults.atol) == (DEFAULT_RTOL, DEFAULT_ATOL) == (1e-4, 1e-5)


@pytest.mark.parametrize("text, message", [
    ("# PIPELINE: x\n# DESCRIPTION: no model\n", "no '# INPUT' line"),
    ("# DESCRIPTION: d\n# INPUT\n" + MODEL, "missing '# PIPELINE"),
    ("# PIPELNE: x\n# INPUT\n" + MODEL, "unknown header 'PIPELNE'"),
    (_case_text("x", headers="# EXPECT-UNCHANGED\n"), "keep one of the two"),
    (_case_text("x", headers="# TOLERANCE: rtol=abc\n"), "is not a number"),
    (_case_text("x", headers="# TOLERANCE: eps=1\n"), "bad TOLERANCE"),
    (_case_text("x", headers="# NUMERIC: skip\n"), "'skip <reason>'"),
    (_case_text("x", headers="# DIMS: N\n"), "bad DIMS"),
    ("# PIPELINE: x\nstray text\n# INPUT\n" + MODEL, "text before '# INPUT'"),
])
def test_malformed_cases_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(GoldenCaseError, match=message.replace("(", r"\(").replace("*", r"\*")):
        parse_case(text, Path("bad.onnxtest"))


def test_input_that_does_not_parse_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, _case_text("eliminate-identity", model="g (float x) => (\n"))
    with pytest.raises(GoldenCaseError, match="INPUT section does not parse"):
        run_case(path)


def test_collect_cases_and_ids(tmp_path: Path) -> None:
    (tmp_path / "b-pass").mkdir()
    (tmp_path / "a-pass").mkdir()
    _write(tmp_path / "b-pass", _case_text("x"), "z.onnxtest")
    _write(tmp_path / "a-pass", _case_text("x"), "y.onnxtest")
    _write(tmp_path / "a-pass", "not a case", "notes.txt")
    cases = collect_cases(tmp_path)
    assert [case_id(tmp_path)(p) for p in cases] == ["a-pass/y", "b-pass/z"]


@pytest.mark.parametrize("text", [
    MODEL,
    '<ir_version: 8, opset_import: ["" : 17]>\n'
    "g (bool c, float[] unknown_rank, float scalar) => (float y) { y = Add(scalar, scalar) }",
    '<ir_version: 3, opset_import: ["" : 8]>\n'
    "g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1, 2}, float[2] k = {3, 4}>"
    "{ a = Add(x, w)  y = Mul(a, k) }",
    '<ir_version: 8, opset_import: ["" : 17, "local" : 1]>\n'
    "g (float[2] x, bool c) => (float[2] y) {\n"
    "  a = local.F(x)\n"
    "  y = If(c) <then_branch = t () => (float[2] p) { p = Neg(a) },"
    " else_branch = e () => (float[2] q) { q = Abs(a) }>\n"
    "}\n"
    '<domain: "local", opset_import: ["" : 17]>\nF (u) => (v) { v = Relu(u) }\n',
])
def test_canonical_text_is_a_fixpoint(text: str) -> None:
    once = canonicalize(text)
    assert canonicalize(once) == once


# -- checks --------------------------------------------------------------------------------------
def test_passing_case_reports_what_ran(tmp_path: Path) -> None:
    result = run_case(_write(tmp_path, _case_text("eliminate-identity")))
    assert result.ok, result.explain()
    assert result.structural_ok and result.comparison is not None and result.comparison.ok
    assert result.report.totals()["eliminate-identity"]["counters"]["removed-nodes"] == 1
    assert result.explain() == ""


def test_structural_difference_fails_with_a_diff(tmp_path: Path) -> None:
    result = run_case(_write(tmp_path, _case_text("topo-sort")))  # the Identity stays
    assert not result.ok and not result.structural_ok
    assert result.comparison is not None and result.comparison.ok
    assert "-   y = Relu (x)" in result.diff()
    assert "--update-goldens" in result.explain()


def test_numeric_difference_fails_even_when_the_structure_matches(tmp_path: Path) -> None:
    expected = EXPECTED.replace("Relu(x)", "Abs(t)").replace("{", "{\n  t = Identity(x)")
    path = _write(tmp_path, _case_text("relu-to-abs", expected=expected))
    result = run_case(path, registry=_registry(ReluToAbs))
    assert result.structural_ok
    assert result.comparison is not None and not result.comparison.ok
    assert not result.ok and "outputs differ from the input model's" in result.explain()


def test_tolerance_header_is_applied(tmp_path: Path) -> None:
    model = '<ir_version: 8, opset_import: ["" : 17]>\ng (float[4] x) => (float[4] y) { y = Relu(x) }\n'
    registry = _registry(AddTiny)
    loose = _write(tmp_path, _case_text("add-tiny", model=model, expected=None,
                                        headers="# TOLERANCE: rtol=0 atol=1e-5\n"), "loose.onnxtest")
    tight = _write(tmp_path, _case_text("add-tiny", model=model, expected=None,
                                        headers="# TOLERANCE: rtol=0 atol=1e-9\n"), "tight.onnxtest")
    assert run_case(loose, registry=registry, update=True).ok
    result = run_case(tight, registry=registry, update=True)
    assert result.updated and not result.ok
    assert result.comparison is not None and "atol=1e-09" in result.comparison.summary()


def test_signature_change_is_a_problem(tmp_path: Path) -> None:
    path = _write(tmp_path, _case_text("rename-output", expected=None))
    result = run_case(path, registry=_registry(RenameOutput), update=True)
    assert not result.ok
    assert any("signature: graph output names changed" in p for p in result.problems)


def test_invalid_output_is_caught_by_verifier_and_checker(tmp_path: Path) -> None:
    path = _write(tmp_path, _case_text("unsort", expected=None))
    result = run_case(path, registry=_registry(Unsort), update=True)
    assert not result.ok
    assert any(p.startswith("ir.verify:") and "topological order" in p for p in result.problems)
    assert any(p.startswith("onnx.checker:") for p in result.problems)


def test_model_onnxruntime_cannot_run_needs_numeric_skip(tmp_path: Path) -> None:
    model = ('<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>\n'
             "g (float[2] x) => (float[2] y) { y = com.example.Mystery(x) }\n")
    plain = _write(tmp_path, _case_text("topo-sort", model=model, expected=None,
                                        headers="# EXPECT-UNCHANGED\n"), "plain.onnxtest")
    result = run_case(plain)
    assert not result.ok and "onnxruntime cannot run the INPUT model" in result.explain()
    skipped = _write(tmp_path, _case_text("topo-sort", model=model, expected=None, headers=(
        "# EXPECT-UNCHANGED\n# NUMERIC: skip no kernel for com.example.Mystery\n")), "skip.onnxtest")
    result = run_case(skipped)
    assert result.ok, result.explain()
    assert result.comparison is None and result.case.numeric_skip == "no kernel for com.example.Mystery"


def test_digest_sections_are_compared_as_text(tmp_path: Path) -> None:
    values = ", ".join(str(i % 7) for i in range(64))
    model = (f'<ir_version: 8, opset_import: ["" : 17]>\n'
             f"g (float[8,8] x) => (float[8,8] y) <float[8,8] w = {{{values}}}> {{ y = MatMul(x, w) }}\n")
    path = _write(tmp_path, _case_text("topo-sort", model=model, expected=None))
    assert run_case(path, update=True).updated
    assert "<float[8,8] c0 = <" in path.read_text()
    result = run_case(path)
    assert result.ok and result.compared_as_text
    path.write_text(path.read_text().replace("MatMul (x, c0)", "MatMul (c0, x)"))
    result = run_case(path)
    assert not result.ok and "does not parse as ONNX text" in result.explain()


# -- updates -------------------------------------------------------------------------------------
def test_update_rewrites_only_the_expected_section(tmp_path: Path) -> None:
    header = "# DESCRIPTION: keep me\n"
    path = _write(tmp_path, _case_text("eliminate-identity", expected=None, headers=header))
    missing = run_case(path)
    assert not missing.ok
    updated = run_case(path, update=True)
    assert updated.updated and updated.ok
    text = path.read_text()
    assert text.startswith("# PIPELINE: eliminate-identity\n# DESCRIPTION: keep me\n# INPUT\n" + MODEL)
    assert text.count("# EXPECTED") == 1 and text.endswith(updated.actual)
    again = run_case(path)
    assert again.ok and not again.updated and path.read_text() == text
    # A stale expected section is replaced, not appended to.
    path.write_text(text.replace("y = Relu (x)", "y = Neg (x)"))
    assert run_case(path, update=True).updated
    assert path.read_text() == text


def test_update_never_touches_expect_unchanged_cases(tmp_path: Path) -> None:
    path = _write(tmp_path, _case_text("eliminate-identity", expected=None, headers="# EXPECT-UNCHANGED\n"))
    before = path.read_text()
    result = run_case(path, update=True)
    assert not result.ok and not result.updated
    assert "EXPECT-UNCHANGED" in result.explain()
    assert path.read_text() == before


def test_pytest_plugin_update_goldens_option(pytester: pytest.Pytester,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Inner sessions need no third-party pytest plugins (re-importing them is slow).
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    fixtures = pytester.mkdir("fixtures")
    case = _write(fixtures, _case_text("eliminate-identity", expected=None))
    pytester.makeconftest(
        "from graphopt.testing.pytest_plugin import pytest_addoption, update_goldens  # noqa: F401\n")
    pytester.makepyfile(test_cases=textwrap.dedent("""
        from pathlib import Path
        import pytest
        from graphopt.testing import assert_golden, collect_cases
        from graphopt.testing.pytest_plugin import case_id

        FIXTURES = Path(__file__).parent / "fixtures"

        @pytest.mark.parametrize("path", collect_cases(FIXTURES), ids=case_id(FIXTURES))
        def test_golden(path, update_goldens):
            assert_golden(path, update=update_goldens)
    """))
    updating = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--update-goldens")
    updating.assert_outcomes(passed=1)
    expected = load_case(case).expected_text
    assert expected is not None and "y = Relu (x)" in expected
    checking = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    checking.assert_outcomes(passed=1)
    case.write_text(case.read_text().replace("y = Relu (x)", "y = Neg (x)"))
    failing = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    failing.assert_outcomes(failed=1)
    failing.stdout.fnmatch_lines(["*--update-goldens*"])
