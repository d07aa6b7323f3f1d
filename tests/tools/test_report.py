"""The JSON run report: every field documented in docs/report-schema.md, with true values."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

import graphopt
from graphopt import ir
from graphopt._api import optimize_model
from graphopt._report import SCHEMA_ID, ChangeTracker, build_optimize_report, model_file_bytes, write_report
from graphopt.cli import cli
from graphopt.errors import GraphoptError
from graphopt.pipeline import PassContext
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "fixtures", "examples", "tiny_cnn.onnx")
SCHEMA_DOC = os.path.join(ROOT, "docs", "report-schema.md")


# -- a small validator driven by the field tables of the schema document ---------------------------

def load_schema(path: str = SCHEMA_DOC) -> dict[str, dict[str, tuple[str, bool]]]:
    """``{object kind: {field: (type, required)}}`` from the doc's tables; top level is ``report``."""
    kinds: dict[str, dict[str, tuple[str, bool]]] = {}
    row = re.compile(r"^\|\s*`([^`]+)`\s*\|(.*)$")
    for line in open(path, encoding="utf-8"):
        m = row.match(line.strip())
        if not m:
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", m.group(2))]
        type_, required = cells[0], cells[1]
        assert required in ("yes", "no"), line
        kind, _, field = m.group(1).rpartition(".")
        kinds.setdefault(kind or "report", {})[field] = (type_, required == "yes")
    return kinds


def _check_type(value: Any, type_: str, kinds: dict, where: str, errors: list[str]) -> None:
    options = [t.strip() for t in type_.split("|")]
    failures: list[str] = []
    for option in options:
        sub: list[str] = []
        _check_one(value, option, kinds, where, sub)
        if not sub:
            return
        failures.extend(sub)
    errors.append(f"{where}: {value!r:.60} is not {type_} ({'; '.join(failures[:2])})")


def _check_one(value: Any, t: str, kinds: dict, where: str, errors: list[str]) -> None:
    simple = {"string": str, "boolean": bool, "object": dict}
    if t == "null":
        if value is not None:
            errors.append(f"{where}: not null")
    elif t == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(f"{where}: not an integer")
    elif t == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errors.append(f"{where}: not a number")
    elif t in simple:
        if not isinstance(value, simple[t]):
            errors.append(f"{where}: not {t}")
    elif t.startswith("array<") and t.endswith(">"):
        if not isinstance(value, list):
            errors.append(f"{where}: not an array")
        else:
            for i, item in enumerate(value):
                _check_type(item, t[6:-1], kinds, f"{where}[{i}]", errors)
    elif t.startswith("map<") and t.endswith(">"):
        if not isinstance(value, dict):
            errors.append(f"{where}: not a map")
        else:
            for k, item in value.items():
                if not isinstance(k, str):
                    errors.append(f"{where}: key {k!r} is not a string")
                _check_type(item, t[4:-1], kinds, f"{where}.{k}", errors)
    elif t in kinds:
        validate(value, t, kinds, where, errors)
    else:
        errors.append(f"{where}: the schema document uses an unknown type '{t}'")


def validate(data: Any, kind: str, kinds: dict, where: str = "$", errors: list[str] | None = None) -> list[str]:
    """Every problem of ``data`` as an object of ``kind``: missing, undocumented or mistyped fields."""
    errors = [] if errors is None else errors
    if not isinstance(data, dict):
        errors.append(f"{where}: not an object")
        return errors
    fields = kinds[kind]
    for name, (type_, required) in fields.items():
        if name not in data:
            if required:
                errors.append(f"{where}: required field '{name}' is missing")
            continue
        _check_type(data[name], type_, kinds, f"{where}.{name}", errors)
    for name in data:
        if name not in fields:
            errors.append(f"{where}: field '{name}' is not documented in {os.path.basename(SCHEMA_DOC)}")
    return errors


def assert_valid_report(data: dict) -> None:
    errors = validate(data, "report", load_schema())
    assert not errors, "\n".join(errors)
    assert data["schema"] == SCHEMA_ID


# -- helpers -----------------------------------------------------------------------------------------

def _optimize(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["optimize", *args], catch_exceptions=False)
    return result.exit_code, result.stderr


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _assert_same_outputs(original: str, optimized: str) -> None:
    sess = make_session(onnx.load(original))
    feeds = random_inputs(sess, seed=3)
    cmp = compare_outputs(run_model(onnx.load(original), feeds), run_model(onnx.load(optimized), feeds),
                          rtol=1e-5, atol=1e-6)
    assert cmp.ok, cmp.summary()


# -- tests ---------------------------------------------------------------------------------------------

def test_schema_document_tables_are_well_formed():
    kinds = load_schema()
    assert {"report", "model", "pass", "changes", "node", "seconds", "optimize"} <= set(kinds)
    assert kinds["report"]["command"] == ("string", True)
    for kind, fields in kinds.items():
        for name, (type_, _) in fields.items():
            errors: list[str] = []
            _check_type(None, type_, kinds, f"{kind}.{name}", errors)  # exercises every type name
            assert not any("unknown type" in e for e in errors), errors


def test_schema_document_example_validates():
    text = open(SCHEMA_DOC, encoding="utf-8").read()
    example = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    assert_valid_report(json.loads(example))


def test_validator_catches_missing_undocumented_and_mistyped_fields():
    good = json.loads(re.search(r"```json\n(.*?)```", open(SCHEMA_DOC).read(), re.S).group(1))
    kinds = load_schema()
    bad = json.loads(json.dumps(good))
    del bad["input"]["nodes"]
    bad["passes"][0]["seconds"] = "fast"
    bad["surprise"] = 1
    errors = validate(bad, "report", kinds)
    assert any("'nodes' is missing" in e for e in errors)
    assert any("passes[0].seconds" in e for e in errors)
    assert any("'surprise' is not documented" in e for e in errors)


def test_optimize_report_matches_the_models_written(tmp_path):
    out, rep = str(tmp_path / "out.onnx"), str(tmp_path / "r.json")
    code, stderr = _optimize(EXAMPLE, "-o", out, "--report", rep, "-q")
    assert code == 0, stderr
    data = json.load(open(rep))
    assert_valid_report(data)
    src, dst = onnx.load(EXAMPLE), onnx.load(out)
    assert data["command"] == "optimize" and data["target"] == "cpu"
    assert data["graphopt_version"] == graphopt.__version__
    assert data["input"]["path"] == EXAMPLE and data["output"]["path"] == out
    assert data["input"]["bytes"] == os.path.getsize(EXAMPLE)
    assert data["output"]["bytes"] == os.path.getsize(out)
    assert data["input"]["nodes"] == len(src.graph.node) and data["output"]["nodes"] == len(dst.graph.node)
    assert Counter(data["input"]["ops"]) == _ops(src) and Counter(data["output"]["ops"]) == _ops(dst)
    assert data["input"]["initializers"] == len(src.graph.initializer)
    assert data["output"]["initializers"] == len(dst.graph.initializer)
    assert data["output"]["initializer_bytes"] == sum(
        onnx.numpy_helper.to_array(t).nbytes for t in dst.graph.initializer)
    # the pass records are those of the pipeline that ran, and their counters add up
    assert data["pipeline"] and {p["name"] for p in data["passes"]} >= {"eliminate-identity", "eliminate-dead-code"}
    assert all(p["seconds"] >= 0 for p in data["passes"])
    secs = data["seconds"]
    assert secs["total"] == pytest.approx(secs["load"] + secs["passes"] + secs["save"])
    assert secs["passes"] >= sum(p["seconds"] for p in data["passes"]) * 0.99
    # changes: op deltas agree with the histograms, node counts with the files
    ch = data["changes"]
    delta = _ops(dst)
    delta.subtract(_ops(src))
    assert ch["ops_removed"] == {op: -d for op, d in sorted(delta.items()) if d < 0}
    assert ch["ops_added"] == {op: d for op, d in sorted(delta.items()) if d > 0}
    assert ch["nodes_removed"] - ch["nodes_added"] == len(src.graph.node) - len(dst.graph.node)
    assert ch["nodes_kept"] + ch["nodes_modified"] + ch["nodes_added"] == len(dst.graph.node)
    removed = {n["name"]: n for n in ch["removed"]}
    assert removed["export_identity"]["op"] == "Identity"
    assert removed["export_identity"]["inputs"] == ["input"] and removed["export_identity"]["graph"] == "main"
    # conv1 read the Identity's output: it is now rewired to the graph input, or replaced (fused)
    conv1_before = [n.get("inputs_before", n["inputs"]) for n in ch["removed"] + ch["modified"]
                    if n["name"] == "conv1"]
    assert conv1_before and conv1_before[0][0] == "input_copy"
    readers = [n for n in ch["modified"] + ch["added"] if "input" in n["inputs"]]
    assert readers and all(n["op"] == "Conv" for n in readers)
    assert not ch["truncated"]
    ids = [n["id"] for key in ("removed", "added", "modified", "context") for n in ch[key]]
    assert len(ids) == len(set(ids)), "node ids must be unique"
    assert data["optimize"]["level"] == 2 and data["optimize"]["pipeline_option"] is None
    _assert_same_outputs(EXAMPLE, out)


def test_report_counts_external_data_bytes(tmp_path):
    src = str(tmp_path / "ext.onnx")
    ir.save(graphopt.load(EXAMPLE), src, external_data=True)
    out, rep = str(tmp_path / "out.onnx"), str(tmp_path / "r.json")
    code, stderr = _optimize(src, "-o", out, "--report", rep, "-q")
    assert code == 0, stderr
    data = json.load(open(rep))
    assert_valid_report(data)
    assert data["input"]["bytes"] == os.path.getsize(src) + os.path.getsize(src + ".data")
    assert os.path.exists(out + ".data"), "an input with external data keeps it"
    assert data["output"]["bytes"] == os.path.getsize(out) + os.path.getsize(out + ".data")
    assert model_file_bytes(out) == data["output"]["bytes"]
    _assert_same_outputs(src, out)


def test_report_names_nodes_inside_subgraphs(tmp_path):
    path = str(tmp_path / "if.onnx")
    onnx.save(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[2] x) => (float[2] y) {
            y = If(c) <then_branch = t () => (float[2] a) { i = Identity(x)  a = Relu(i) },
                       else_branch = e () => (float[2] b) { b = Neg(x) }>
        }"""), path)
    out, rep = str(tmp_path / "out.onnx"), str(tmp_path / "r.json")
    code, stderr = _optimize(path, "-o", out, "--report", rep, "-q")
    assert code == 0, stderr
    data = json.load(open(rep))
    assert_valid_report(data)
    assert data["input"]["subgraphs"] == 2 and data["input"]["nodes"] == 4
    removed = data["changes"]["removed"]
    assert [(n["op"], n["graph"]) for n in removed] == [("Identity", "main/If#0.then_branch")]
    feeds = {"c": np.array(True), "x": np.array([-1.0, 2.0], np.float32)}
    assert run_model(onnx.load(out), feeds)["y"].tolist() == [0.0, 2.0]


def test_node_lists_are_capped_but_counts_complete(tmp_path):
    chain = "  ".join(f"t{i + 1} = Identity(t{i})" for i in range(300))
    proto = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] t0) => (float[2] y) {{ {chain}  y = Relu(t300) }}""")
    tracker = ChangeTracker()
    ctx = PassContext(opt_level=2, instruments=[tracker])
    outcome = optimize_model(proto, ctx=ctx)
    data = build_optimize_report(outcome, input_path=None, output_path=None, target="cpu", level=2,
                                 tracker=tracker, node_limit=50)
    assert_valid_report(data)
    ch = data["changes"]
    assert ch["nodes_removed"] == 300 and len(ch["removed"]) == 50 and ch["truncated"]
    assert ch["ops_removed"] == {"Identity": 300}
    assert data["input"]["path"] is None and data["input"]["bytes"] is None
    assert [n.op_type for n in outcome.model.graph] == ["Relu"]
    x = np.array([-3.0, 4.0], np.float32)
    assert run_model(ir.to_proto(outcome.model), {"t0": x})["y"].tolist() == [0.0, 4.0]


def test_report_without_tracker_has_null_node_counts():
    outcome = optimize_model(onnx.load(EXAMPLE), level=1)
    data = build_optimize_report(outcome, input_path=None, output_path=None, target="cpu")
    assert_valid_report(data)
    assert data["changes"]["nodes_removed"] is None and data["changes"]["removed"] == []
    assert data["changes"]["ops_removed"].get("Identity") == 2


def test_report_folder_missing_fails_before_writing_the_model(tmp_path):
    out = str(tmp_path / "out.onnx")
    code, stderr = _optimize(EXAMPLE, "-o", out, "--report", str(tmp_path / "no" / "r.json"))
    assert code == 2 and "does not exist" in stderr and len(stderr.strip().splitlines()) == 1
    assert not os.path.exists(out), "a refused report path must not leave a lone output model"


def test_write_report_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")

    class Unserializable:
        def __str__(self) -> str:
            raise RuntimeError("cannot print")

    with pytest.raises(RuntimeError):
        write_report(str(path), {"x": Unserializable()})
    assert path.read_text() == "old", "a failed write must leave the previous file untouched"
    assert sorted(os.listdir(tmp_path)) == ["r.json"], "no temporary file may stay behind"
    write_report(str(path), {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    with pytest.raises(GraphoptError, match="is a folder"):
        write_report(str(tmp_path), {"x": 1})
