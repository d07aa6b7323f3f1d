"""Golden-graph cases: parsing ``.onnxtest`` files, running them, checking and updating them.

The file format and the checks are described in :mod:`graphopt.testing`.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx.parser

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pipeline import PassContext, PassManager, PassRegistry, PipelineReport
from graphopt.runtime import Comparison, compare_outputs, make_session, random_inputs, run_model

__all__ = ["GoldenCase", "GoldenResult", "GoldenCaseError", "load_case", "parse_case", "run_case",
           "collect_cases", "assert_golden", "canonicalize", "CASE_SUFFIX", "DEFAULT_RTOL",
           "DEFAULT_ATOL"]

logger = logging.getLogger(__name__)

#: File name suffix of golden cases.
CASE_SUFFIX = ".onnxtest"
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5

_HEADER = re.compile(r"^#\s*([A-Z][A-Z0-9-]*)\s*(?::\s*(.*?))?\s*$")
_KEYS = {"PIPELINE", "TOLERANCE", "DESCRIPTION", "SEED", "DIMS", "NUMERIC", "EXPECT-UNCHANGED",
         "INPUT", "EXPECTED"}


class GoldenCaseError(GraphoptError):
    """A golden case file is malformed (missing section, bad header, input that does not parse)."""


@dataclass
class GoldenCase:
    """One parsed ``.onnxtest`` file.

    Attributes:
        path: where the case lives (``None`` for a case parsed from a string).
        pipeline: the pipeline string to run.
        input_text: the input model in ONNX text syntax.
        expected_text: the expected section as written, or ``None`` when absent.
        expect_unchanged: the output must equal the input canonically.
        description: one line saying what the case shows.
        rtol: relative tolerance of the numeric check.
        atol: absolute tolerance of the numeric check.
        seed: seed of the generated inputs.
        dims: values of symbolic dimensions when generating inputs.
        numeric_skip: why the numeric check is off ("" when it runs).
    """

    path: Path | None
    pipeline: str
    input_text: str
    expected_text: str | None = None
    expect_unchanged: bool = False
    description: str = ""
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    seed: int = 0
    dims: dict[str, int] = field(default_factory=dict)
    numeric_skip: str = ""

    @property
    def name(self) -> str:
        """``<folder>/<file stem>``, e.g. ``eliminate-identity/graph_output``."""
        if self.path is None:
            return "<string>"
        return f"{self.path.parent.name}/{self.path.stem}"


@dataclass
class GoldenResult:
    """What running a case found. ``ok`` is true when every check passed.

    Attributes:
        case: the case that ran.
        actual: canonical text of the pipeline's output.
        expected: canonical text it was compared with.
        structural_ok: ``actual`` matched ``expected``.
        comparison: the numeric comparison (``None`` when skipped or when a model failed to run).
        problems: verifier, checker, signature and runtime problems.
        report: the pipeline report (which passes ran and changed what).
        updated: the expected section was rewritten with ``actual``.
    """

    case: GoldenCase
    actual: str
    expected: str
    structural_ok: bool
    comparison: Comparison | None
    problems: list[str]
    report: PipelineReport
    updated: bool = False
    #: Why the expected section did not parse ("" when it did); it was then compared as
    #: whitespace-normalized canonical text.
    expected_parse_error: str = ""

    @property
    def compared_as_text(self) -> bool:
        """True when the expected section was compared as text because it did not parse."""
        return bool(self.expected_parse_error)

    @property
    def ok(self) -> bool:
        """True when the structure matched (or was updated), numbers agreed and no problems."""
        numeric_ok = self.comparison is None or self.comparison.ok
        return (self.structural_ok or self.updated) and numeric_ok and not self.problems

    def diff(self) -> str:
        """Unified diff from the expected text to the actual text."""
        actual = _normalize_whitespace(self.actual) if self.compared_as_text else self.actual
        return "".join(difflib.unified_diff(
            self.expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile="expected", tofile="actual"))

    def explain(self) -> str:
        """A readable account of every failed check (empty when ``ok``)."""
        if self.ok:
            return ""
        parts = [f"golden case {self.case.name} failed (pipeline: {self.case.pipeline})"]
        if not (self.structural_ok or self.updated):
            what = "input (EXPECT-UNCHANGED)" if self.case.expect_unchanged else "expected section"
            if self.compared_as_text:
                parts.append("the expected section does not parse as ONNX text, so it was compared "
                             f"as canonical text ({self.expected_parse_error})")
            parts.append(f"output differs from the {what}; if the change is intended, rerun "
                         f"with --update-goldens and review the diff:\n{self.diff()}")
        if self.comparison is not None and not self.comparison.ok:
            parts.append(f"outputs differ from the input model's (rtol={self.case.rtol:g}, "
                         f"atol={self.case.atol:g}): {self.comparison.summary()}")
        parts.extend(self.problems)
        return "\n".join(parts)


# -- reading cases ------------------------------------------------------------------------------
def load_case(path: str | os.PathLike[str]) -> GoldenCase:
    """Read and parse one ``.onnxtest`` file.

    Example:
        >>> case = load_case("fixtures/eliminate-identity/chain.onnxtest")  # doctest: +SKIP
        >>> case.pipeline  # doctest: +SKIP
        'eliminate-identity'
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise GoldenCaseError(f"golden case '{p}' cannot be read: {exc.strerror}") from exc
    return parse_case(text, p)


def parse_case(text: str, path: Path | None = None) -> GoldenCase:
    """Parse the text of a case (see the module docstring for the format)."""
    where = str(path) if path is not None else "<string>"
    headers: dict[str, str] = {}
    section = "header"
    input_lines: list[str] = []
    expected_lines: list[str] = []
    has_expected = False
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line.strip())
        key = m.group(1) if m and (m.group(1) in _KEYS or section == "header") else None
        if key == "INPUT" and section == "header":
            section = "input"
            continue
        if key == "EXPECTED" and section == "input":
            section = "expected"
            has_expected = True
            continue
        if section == "header":
            if key is None:
                if line.strip() and not line.strip().startswith("#"):
                    raise GoldenCaseError(f"{where}:{lineno}: text before '# INPUT'; header lines "
                                          "look like '# PIPELINE: <passes>'")
                continue
            if key not in _KEYS or key in ("INPUT", "EXPECTED"):
                raise GoldenCaseError(f"{where}:{lineno}: unknown header '{key}'; use one of "
                                      f"{', '.join(sorted(_KEYS - {'INPUT', 'EXPECTED'}))}")
            assert m is not None
            headers[key] = m.group(2) or ""
        elif section == "input":
            input_lines.append(line)
        else:
            expected_lines.append(line)
    if section == "header":
        raise GoldenCaseError(f"{where}: no '# INPUT' line; put the input model after it")
    if "PIPELINE" not in headers or not headers["PIPELINE"].strip():
        raise GoldenCaseError(f"{where}: missing '# PIPELINE: <passes>' header")
    unchanged = "EXPECT-UNCHANGED" in headers
    expected = "\n".join(expected_lines).strip("\n") + "\n" if has_expected else None
    if unchanged and expected is not None and expected.strip():
        raise GoldenCaseError(f"{where}: '# EXPECT-UNCHANGED' case has an '# EXPECTED' section; "
                              "keep one of the two")
    rtol, atol = _tolerance(headers.get("TOLERANCE", ""), where)
    numeric = headers.get("NUMERIC", "").strip()
    skip = ""
    if numeric:
        word, _, reason = numeric.partition(" ")
        if word != "skip" or not reason.strip():
            raise GoldenCaseError(f"{where}: '# NUMERIC:' takes 'skip <reason>', got '{numeric}'")
        skip = reason.strip()
    return GoldenCase(
        path=path, pipeline=headers["PIPELINE"].strip(), input_text="\n".join(input_lines).strip("\n") + "\n",
        expected_text=None if unchanged else expected, expect_unchanged=unchanged,
        description=headers.get("DESCRIPTION", "").strip(), rtol=rtol, atol=atol,
        seed=_int(headers.get("SEED", "0"), "SEED", where), dims=_dims(headers.get("DIMS", ""), where),
        numeric_skip=skip)


def _tolerance(text: str, where: str) -> tuple[float, float]:
    values = {"rtol": DEFAULT_RTOL, "atol": DEFAULT_ATOL}
    for part in text.split():
        key, sep, val = part.partition("=")
        if not sep or key not in values:
            raise GoldenCaseError(f"{where}: bad TOLERANCE '{text}'; write 'rtol=1e-5 atol=1e-6'")
        try:
            values[key] = float(val)
        except ValueError:
            raise GoldenCaseError(f"{where}: TOLERANCE {key}='{val}' is not a number") from None
    return values["rtol"], values["atol"]


def _int(text: str, key: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise GoldenCaseError(f"{where}: {key} '{text}' is not an integer") from None


def _dims(text: str, where: str) -> dict[str, int]:
    dims: dict[str, int] = {}
    for part in text.replace(",", " ").split():
        key, sep, val = part.partition("=")
        if not sep:
            raise GoldenCaseError(f"{where}: bad DIMS '{text}'; write 'N=3 T=5'")
        dims[key] = _int(val, f"DIMS {key}", where)
    return dims


def collect_cases(folder: str | os.PathLike[str]) -> list[Path]:
    """Every ``*.onnxtest`` file under ``folder`` (recursively), sorted; use it to parametrize.

    Example:
        >>> @pytest.mark.parametrize("path", collect_cases("fixtures"), ids=str)  # doctest: +SKIP
        ... def test_golden(path, update_goldens):
        ...     assert_golden(path, update=update_goldens)
    """
    root = Path(folder)
    return sorted(root.rglob(f"*{CASE_SUFFIX}"))


# -- canonical text -----------------------------------------------------------------------------
def _parse_model(text: str, what: str) -> onnx.ModelProto:
    try:
        return onnx.parser.parse_model(text)
    except Exception as exc:  # onnx.parser raises its own ParseError with a message in bytes
        message = " ".join(str(exc).split())
        raise GoldenCaseError(f"{what} does not parse as ONNX text: {message[:300]}") from exc


def canonicalize(text: str) -> str:
    """Canonical form of a model written in ONNX text syntax.

    Text that ``onnx.parser`` reads is parsed and printed with ``ir.print_model(canonical=True)``;
    text it cannot read (e.g. with tensor digests) is taken as canonical already and only its
    whitespace is normalized.

    Example:
        >>> canonicalize('<ir_version: 8, opset_import: ["" : 17]> g (float x) => (float y) '
        ...              '{ t = Neg(x) y = Neg(t) }').splitlines()[-3]
        '   v0 = Neg (x)'
    """
    try:
        proto = onnx.parser.parse_model(text)
    except Exception:
        return _normalize_whitespace(text)
    return ir.print_model(ir.load(proto), canonical=True)


def _normalize_whitespace(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
        line = " ".join(line.split())
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


# -- running cases ------------------------------------------------------------------------------
def run_case(case: GoldenCase | str | os.PathLike[str], registry: PassRegistry | None = None,
             update: bool = False, *, ctx: PassContext | None = None) -> GoldenResult:
    """Run a case's pipeline on its input and check structure, numbers and validity.

    Args:
        case: a :class:`GoldenCase` or the path of a case file.
        registry: where pass names are looked up (default: built-ins plus installed plugins).
        update: rewrite the case file's expected section with the actual output when they
            differ (never for ``EXPECT-UNCHANGED`` cases, whose reference is the input).
        ctx: the context to run with (default: a fresh one with the case's seed).

    Example:
        >>> result = run_case("fixtures/eliminate-identity/chain.onnxtest")  # doctest: +SKIP
        >>> result.ok, result.report.totals()["eliminate-identity"]["counters"]  # doctest: +SKIP
        (True, {'removed-nodes': 1, 'renamed-outputs': 0})
    """
    if not isinstance(case, GoldenCase):
        case = load_case(case)
    source = _parse_model(case.input_text, f"{case.name}: the INPUT section")
    model = ir.load(source)
    if ctx is None:
        ctx = PassContext(seed=case.seed, registry=registry or PassRegistry.default())
    elif registry is not None:
        ctx.registry = registry
    report = PassManager(case.pipeline, ctx).run(model)

    actual = ir.print_model(model, canonical=True)
    problems: list[str] = []
    structural_ok, expected, updated, parse_error = _check_structure(case, actual, update)
    problems.extend(f"ir.verify: {p}" for p in ir.find_problems(model))
    output = ir.to_proto(model)
    try:
        onnx.checker.check_model(output)
    except onnx.checker.ValidationError as exc:
        problems.append(f"onnx.checker: {' '.join(str(exc).split())[:500]}")
    problems.extend(_signature_problems(source, output))
    comparison = None
    if not case.numeric_skip:
        comparison = _compare_numerically(case, source, output, problems)
    return GoldenResult(case, actual, expected, structural_ok, comparison, problems, report, updated,
                        parse_error)


def _check_structure(case: GoldenCase, actual: str, update: bool) -> tuple[bool, str, bool, str]:
    """``(matched, canonical expected text, file updated, why the expected text did not parse)``."""
    parse_error = ""
    if case.expect_unchanged:
        expected = canonicalize(case.input_text)
        return expected == actual, expected, False, parse_error
    if case.expected_text is None or not case.expected_text.strip():
        matched = False
        expected = ""
    else:
        try:
            proto = onnx.parser.parse_model(case.expected_text)
        except Exception as exc:  # onnx.parser's ParseError: digests and the like do not parse
            expected = _normalize_whitespace(case.expected_text)
            matched = expected == _normalize_whitespace(actual)
            parse_error = " ".join(str(exc).replace("\\n", " ").split())[:300]
        else:
            expected = ir.print_model(ir.load(proto), canonical=True)
            matched = expected == actual
    if matched or not update:
        if not matched and not expected:
            logger.warning("%s has no expected section; run with --update-goldens", case.name)
        return matched, expected, False, parse_error
    if case.path is None:
        raise GoldenCaseError("cannot update a golden case that was not read from a file")
    _write_expected(case.path, actual)
    case.expected_text = actual
    logger.info("updated the expected section of %s", case.path)
    return False, expected, True, parse_error


def _write_expected(path: Path, actual: str) -> None:
    """Replace everything after the ``# EXPECTED`` line (adding one if needed), atomically."""
    lines = path.read_text(encoding="utf-8").splitlines()
    cut = next((i for i, line in enumerate(lines) if line.strip() == "# EXPECTED"), None)
    head = lines if cut is None else lines[:cut]
    while head and not head[-1].strip():
        head.pop()
    text = "\n".join(head) + "\n# EXPECTED\n" + actual
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _signature_problems(source: onnx.ModelProto, output: onnx.ModelProto) -> list[str]:
    problems = []
    for kind in ("input", "output"):
        before = [(v.name, v.type.SerializeToString(deterministic=True)) for v in getattr(source.graph, kind)]
        after = [(v.name, v.type.SerializeToString(deterministic=True)) for v in getattr(output.graph, kind)]
        if before != after:
            names_before = [n for n, _ in before]
            names_after = [n for n, _ in after]
            what = "names" if names_before != names_after else "types"
            problems.append(f"signature: graph {kind} {what} changed: {names_before} -> {names_after}")
    return problems


def _compare_numerically(case: GoldenCase, source: onnx.ModelProto, output: onnx.ModelProto,
                         problems: list[str]) -> Comparison | None:
    try:
        session = make_session(source)
        feeds = random_inputs(session, seed=case.seed, dims=case.dims)
        names = [o.name for o in session.get_outputs()]
        expected = dict(zip(names, session.run(names, feeds), strict=True))
    except Exception as exc:  # onnxruntime's errors have no common base class
        problems.append(f"onnxruntime cannot run the INPUT model ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]}); fix the case or add "
                        "'# NUMERIC: skip <reason>'")
        return None
    try:
        actual = run_model(output, feeds)
    except Exception as exc:  # same: any runtime failure of the output is a finding
        problems.append(f"onnxruntime cannot run the OUTPUT model ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]})")
        return None
    return compare_outputs(expected, actual, rtol=case.rtol, atol=case.atol, names=names)


def assert_golden(path: str | os.PathLike[str] | GoldenCase, registry: PassRegistry | None = None,
                  update: bool = False) -> GoldenResult:
    """Run a case and raise ``AssertionError`` explaining every failed check.

    Example:
        >>> assert_golden("fixtures/eliminate-identity/chain.onnxtest")  # doctest: +SKIP
    """
    result = run_case(path, registry=registry, update=update)
    if not result.ok:
        raise AssertionError(result.explain())
    return result

