"""Cases of the onnx backend test suites, their onnxruntime baselines, and proto diffs.

A :class:`Case` is one model with its data sets (feeds by input name, expected outputs in graph
output order) and the tolerance the suite states for it. A case is *scored* only when
onnxruntime (graph optimizations off) loads and runs the original model and agrees with the
suite's expected outputs; every other case is skipped with the reason, and counted.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import numpy_helper

from graphopt.runtime import compare_outputs, make_session

__all__ = ["Case", "DataSet", "Reference", "Tally", "node_cases", "model_cases", "data_dir_cases",
           "light_cases", "baked_case", "first_difference", "run_case", "reference_of",
           "compare_runs", "DATA_DIR"]

DATA_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")

#: The onnx runner's tolerances when a data folder states none.
_DEFAULT_RTOL = 1e-3
_DEFAULT_ATOL = 1e-7


@dataclass
class DataSet:
    """Feeds by graph input name and the suite's expected outputs, in graph output order."""

    feeds: dict[str, Any]
    expected: list[Any]


@dataclass
class Case:
    """One model of a backend suite with its data sets and tolerance."""

    suite: str
    name: str
    model: onnx.ModelProto
    data_sets: list[DataSet]
    rtol: float = _DEFAULT_RTOL
    atol: float = _DEFAULT_ATOL
    path: str | None = None

    @property
    def id(self) -> str:
        """``suite/name``, unique over all suites."""
        return f"{self.suite}/{self.name}"

    @property
    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        return [o.name for o in self.model.graph.output]


@dataclass
class Reference:
    """onnxruntime's outputs on the original model, or why the case is not scored."""

    outputs: list[dict[str, Any]] | None = None
    skip: str = ""


@dataclass
class Tally:
    """Counts of one suite run: passed, skipped by reason, failures with details."""

    suite: str
    skip_label: str = "skipped"
    passed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        """Count a skipped case under ``reason`` (its category, not the case's details)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def fail(self, case: Case, message: str) -> None:
        """Record a failing case."""
        self.failures.append(f"{case.id}: {message}")

    @property
    def total(self) -> int:
        """Every case seen."""
        return self.passed + sum(self.skipped.values()) + len(self.failures)

    def summary(self) -> str:
        """One line: passed/failed/skipped counts with skip reasons."""
        skips = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items(), key=lambda x: -x[1]))
        skipped = sum(self.skipped.values())
        return (f"{self.suite}: {self.total} cases, {self.passed} passed, {len(self.failures)} failed, "
                f"{skipped} {self.skip_label}" + (f" ({skips})" if skips else ""))

    def failure_report(self, limit: int = 40) -> str:
        """The failures, one per line (the first ``limit``), under the summary."""
        lines = [self.summary()] + self.failures[:limit]
        if len(self.failures) > limit:
            lines.append(f"... and {len(self.failures) - limit} more")
        return "\n".join(lines)


# -- loading the suites ------------------------------------------------------------------------


def _as_value(item: Any) -> Any:
    """Test-case values may be ``TensorProto`` objects; the runner decodes them like this."""
    if isinstance(item, onnx.TensorProto):
        return numpy_helper.to_array(item)
    if isinstance(item, list):
        return [_as_value(x) for x in item]
    return item


def _runtime_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _from_test_cases(suite: str, test_cases: Iterable[Any]) -> list[Case]:
    cases = []
    for tc in test_cases:
        if tc.model is None:
            continue
        names = _runtime_inputs(tc.model)
        data_sets = [DataSet(dict(zip(names, [_as_value(x) for x in inputs])),
                             [_as_value(x) for x in outputs])
                     for inputs, outputs in (tc.data_sets or [])]
        cases.append(Case(suite, tc.name, tc.model, data_sets, tc.rtol, tc.atol))
    return cases


def _quietly(fn: Callable[[], Any]) -> Any:
    # The case generators compute expected outputs with numpy and warn about overflows on purpose.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn()


def node_cases() -> list[Case]:
    """Every case of ``onnx.backend.test.case.node`` (one single-node model each)."""
    from onnx.backend.test.case import node

    return _from_test_cases("node", _quietly(lambda: node.collect_testcases(None)))


def model_cases() -> list[Case]:
    """The cases of ``onnx.backend.test.case.model`` that ship a model (the rest are URLs)."""
    from onnx.backend.test.case import model

    return _from_test_cases("model", _quietly(model.collect_testcases))


def _read_value(path: str, type_proto: onnx.TypeProto) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def _tolerance(folder: str) -> tuple[float, float]:
    meta = os.path.join(folder, "data.json")
    if not os.path.exists(meta):
        return _DEFAULT_RTOL, _DEFAULT_ATOL
    with open(meta) as f:
        data = json.load(f)
    return data.get("rtol", _DEFAULT_RTOL), data.get("atol", _DEFAULT_ATOL)


def data_dir_cases(kinds: Iterable[str] = ("node", "simple", "pytorch-converted",
                                           "pytorch-operator")) -> list[Case]:
    """The model folders under ``onnx/backend/test/data/<kind>`` (``model.onnx`` + data sets).

    Kinds that the installed onnx does not ship (wheels leave out ``node``) are absent.
    """
    cases = []
    for kind in kinds:
        for folder in sorted(glob.glob(os.path.join(DATA_DIR, kind, "*"))):
            path = os.path.join(folder, "model.onnx")
            if not os.path.exists(path):
                continue
            model = onnx.load(path)
            names = _runtime_inputs(model)
            by_name = {i.name: i.type for i in model.graph.input}
            data_sets = []
            for ds in sorted(glob.glob(os.path.join(folder, "test_data_set_*"))):
                n_in = len(glob.glob(os.path.join(ds, "input_*.pb")))
                n_out = len(glob.glob(os.path.join(ds, "output_*.pb")))
                feeds = {names[i]: _read_value(os.path.join(ds, f"input_{i}.pb"), by_name[names[i]])
                         for i in range(n_in)}
                expected = [_read_value(os.path.join(ds, f"output_{i}.pb"), model.graph.output[i].type)
                            for i in range(n_out)]
                data_sets.append(DataSet(feeds, expected))
            rtol, atol = _tolerance(folder)
            cases.append(Case(f"data/{kind}", os.path.basename(folder), model, data_sets, rtol, atol, path))
    return cases


def light_cases() -> list[Case]:
    """The light model zoo (``data/light/*.onnx``, the models ``data/real`` points to).

    Their inputs are the onnx runner's deterministic dummy data; the expected output is the
    ``*_output_0.pb`` file next to the model.
    """
    from onnx.backend.test.runner import Runner

    tolerances = {}
    for meta in glob.glob(os.path.join(DATA_DIR, "real", "*", "data.json")):
        with open(meta) as f:
            data = json.load(f)
        tolerances[os.path.basename(data.get("url", ""))] = (
            data.get("rtol", _DEFAULT_RTOL), data.get("atol", _DEFAULT_ATOL))
    cases = []
    for path in sorted(glob.glob(os.path.join(DATA_DIR, "light", "*.onnx"))):
        model = onnx.load(path)
        stem = os.path.splitext(path)[0]
        expected_path = stem + "_output_0.pb"
        if not os.path.exists(expected_path):
            continue
        inits = {t.name for t in model.graph.initializer}
        feeds = {i.name: Runner.generate_dummy_data(i, seed=0, name=path, random=False)
                 for i in model.graph.input if i.name not in inits}
        expected = [_read_value(expected_path, model.graph.output[0].type)]
        rtol, atol = tolerances.get(os.path.basename(path), (_DEFAULT_RTOL, _DEFAULT_ATOL))
        cases.append(Case("light", os.path.basename(stem), model, [DataSet(feeds, expected)],
                          rtol, atol, path))
    return cases


def baked_case(case: Case) -> Case | str:
    """The case with every fed graph input turned into an initializer (first data set).

    The whole graph becomes constant. For IR < 4 the input stays listed too (that is how such
    models declare initializers), which keeps it overridable. Returns a skip reason when an input
    cannot be an initializer (sequence, optional, or no data).
    """
    if not case.data_sets:
        return "no data set"
    ds = case.data_sets[0]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    keep = []
    for inp in model.graph.input:
        value = ds.feeds.get(inp.name)
        if inp.name not in ds.feeds:
            keep.append(inp)
            continue
        if not isinstance(value, np.ndarray) or not inp.type.HasField("tensor_type"):
            return "input is not a tensor"
        try:
            tensor = numpy_helper.from_array(value, inp.name)
        except (TypeError, ValueError):
            return "input dtype has no tensor encoding"
        if tensor.data_type != inp.type.tensor_type.elem_type:
            return "input dtype has no tensor encoding"
        model.graph.initializer.append(tensor)
        if model.ir_version < 4:
            keep.append(inp)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    kept = {i.name for i in keep}
    baked = {t.name for t in model.graph.initializer}
    feeds = {k: v for k, v in ds.feeds.items() if k in kept and k not in baked}
    return Case(case.suite + "-baked", case.name, model, [DataSet(feeds, ds.expected)],
                case.rtol, case.atol)


# -- running ----------------------------------------------------------------------------------


def run_case(model: onnx.ModelProto | bytes, case: Case) -> list[dict[str, Any]]:
    """Run ``model`` in onnxruntime (optimizations off, 1 thread) on every data set of ``case``."""
    session = make_session(model, optimize=False, threads=1)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    results = []
    for ds in case.data_sets:
        outs = session.run(names, {k: v for k, v in ds.feeds.items() if k in wanted})
        results.append(dict(zip(names, outs)))
    return results


def compare_runs(expected: list[dict[str, Any]], actual: list[dict[str, Any]], names: list[str],
                 rtol: float, atol: float) -> str:
    """Compare runs data set by data set; returns the first mismatch ("" when all agree)."""
    for i, (e, a) in enumerate(zip(expected, actual)):
        result = compare_outputs(e, a, rtol=rtol, atol=atol, names=names)
        if not result.ok:
            return f"data set {i}: {result.summary()}"
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


#: How onnxruntime's refusals read, and the skip reason each stands for (first match wins).
_REFUSALS = (
    ("Unsupported model IR version", "IR version too new for onnxruntime"),
    ("ValidateOpsetForDomain", "opset too new for onnxruntime"),
    ("NOT_IMPLEMENTED", "onnxruntime has no kernel"),
    ("is not a registered function/op", "onnxruntime has no kernel"),
    ("can't be converted to MLDataType", "onnxruntime cannot take the input dtype"),
    ("Unable to handle object of type", "onnxruntime cannot take the input kind"),
    ("No corresponding Numpy type", "onnxruntime cannot return the output dtype"),
    ("INVALID_GRAPH", "onnxruntime rejects the graph"),
)


def _refusal_reason(message: str) -> str:
    for needle, reason in _REFUSALS:
        if needle in message:
            return reason
    return "onnxruntime fails to load or run it"


def reference_of(case: Case) -> Reference:
    """onnxruntime's outputs on the original model, when it runs the case correctly."""
    if not case.data_sets:
        return Reference(skip="no data set")
    try:
        session_runs = run_case(case.model, case)
    except Exception as exc:  # noqa: BLE001 - anything onnxruntime refuses makes the case unscored
        return Reference(skip=_refusal_reason(str(exc)))
    names = case.output_names
    expected = [dict(zip(names, ds.expected)) for ds in case.data_sets]
    try:
        mismatch = compare_runs(expected, session_runs, names, case.rtol, case.atol)
    except (TypeError, ValueError):
        mismatch = "outputs not comparable"
    if mismatch:
        return Reference(skip="onnxruntime disagrees with the expected outputs")
    return Reference(outputs=session_runs)


# -- proto diffs --------------------------------------------------------------------------------


def first_difference(a: Message, b: Message, path: str = "") -> str | None:
    """The path of the first field where two protos differ (``None`` when equal).

    Example: ``graph.node[3].attribute[0].t.raw_data`` or ``graph.doc_string (only in a)``.
    """
    if a == b:
        return None
    fields_a = {f.number: (f, v) for f, v in a.ListFields()}
    fields_b = {f.number: (f, v) for f, v in b.ListFields()}
    for number in sorted(set(fields_a) | set(fields_b)):
        fa = fields_a.get(number)
        fb = fields_b.get(number)
        desc = (fa or fb)[0]  # type: ignore[index]
        p = f"{path}.{desc.name}" if path else desc.name
        if fa is None or fb is None:
            return f"{p} (only in the {'original' if fb is None else 'copy'})"
        va, vb = fa[1], fb[1]
        if va == vb:
            continue
        is_message = desc.type == FieldDescriptor.TYPE_MESSAGE
        if desc.is_repeated:
            for i, (x, y) in enumerate(zip(va, vb)):
                if x != y:
                    return first_difference(x, y, f"{p}[{i}]") if is_message else f"{p}[{i}]"
            return f"{p} (length {len(va)} != {len(vb)})"
        if is_message:
            return first_difference(va, vb, p)
        return p
    return f"{path or '<root>'} (unknown fields differ)"
