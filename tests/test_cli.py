"""The command line end to end: the summary, reports, instruments, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

import graphopt
from graphopt import ir
from graphopt.cli import cli
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "fixtures", "examples", "tiny_cnn.onnx")


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _assert_same_outputs(original: str, optimized: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    sess = make_session(onnx.load(original))
    feeds = random_inputs(sess, seed=1, dims={"batch": 2})
    expected = run_model(onnx.load(original), feeds)
    actual = run_model(onnx.load(optimized), feeds)
    cmp = compare_outputs(expected, actual, rtol=rtol, atol=atol)
    assert cmp.ok, cmp.summary()


def _write(tmp_path, text: str, name: str = "m.onnx") -> str:
    path = str(tmp_path / name)
    onnx.save(onnx.parser.parse_model(text), path)
    return path


def test_optimize_example_prints_summary_and_keeps_outputs(tmp_path):
    out = str(tmp_path / "out.onnx")
    before = _digest(EXAMPLE)
    code, stdout, stderr = _run("optimize", EXAMPLE, "-o", out)
    assert code == 0, stderr
    assert "nodes" in stdout and "before" in stdout and "after" in stdout
    assert _digest(EXAMPLE) == before, "the input file must never change"
    optimized = onnx.load(out)
    onnx.checker.check_model(optimized, full_check=True)
    ops = [n.op_type for n in optimized.graph.node]
    assert "Identity" not in ops and "Sigmoid" not in ops, ops
    names = {t.name for t in optimized.graph.initializer}
    assert "unused.weight" not in names
    assert not ({"conv2.weight", "conv3.weight"} <= names), "duplicate weight must be stored once"
    assert [o.name for o in optimized.graph.output] == ["logits"]
    assert [i.name for i in optimized.graph.input] == ["input"]
    _assert_same_outputs(EXAMPLE, out)


def test_optimize_O0_keeps_the_graph(tmp_path):
    out = str(tmp_path / "out.onnx")
    code, _, stderr = _run("optimize", EXAMPLE, "-o", out, "-O0", "-q")
    assert code == 0, stderr
    assert len(onnx.load(out).graph.node) == len(onnx.load(EXAMPLE).graph.node)
    _assert_same_outputs(EXAMPLE, out)


def test_report_json_has_passes_and_stats(tmp_path):
    out, rep = str(tmp_path / "out.onnx"), str(tmp_path / "r.json")
    code, _, stderr = _run("optimize", EXAMPLE, "-o", out, "--report", rep, "-q")
    assert code == 0, stderr
    data = json.loads(open(rep).read())
    assert data["schema"] == "graphopt.report/1"
    assert data["input"]["nodes"] > data["output"]["nodes"]
    assert any(p["changed"] for p in data["passes"])
    assert {p["name"] for p in data["passes"]} >= {"eliminate-dead-code", "eliminate-identity"}


def test_time_passes_and_stats_tables(tmp_path):
    code, stdout, stderr = _run("optimize", EXAMPLE, "-o", str(tmp_path / "o.onnx"), "--time-passes", "--stats")
    assert code == 0, stderr
    assert "eliminate-dead-code" in stdout and "removed-nodes" in stdout


def test_dump_ir_writes_one_file_per_changing_pass(tmp_path):
    dump = tmp_path / "dump"
    code, _, stderr = _run("optimize", EXAMPLE, "-o", str(tmp_path / "o.onnx"), "--dump-ir", str(dump), "-q")
    assert code == 0, stderr
    files = sorted(os.listdir(dump))
    assert files[0].startswith("000"), files
    assert len(files) >= 2
    assert "Identity" in (dump / files[0]).read_text()
    assert "Identity" not in (dump / files[-1]).read_text()


@pytest.mark.parametrize("mode", ["structural", "numeric"])
def test_verify_each(tmp_path, mode):
    out = str(tmp_path / "o.onnx")
    code, _, stderr = _run("optimize", EXAMPLE, "-o", out, f"--verify-each={mode}", "-q")
    assert code == 0, stderr
    _assert_same_outputs(EXAMPLE, out)


def test_bisect_limit_stops_after_n_rewrites(tmp_path):
    out = str(tmp_path / "o.onnx")
    code, stdout, stderr = _run("optimize", EXAMPLE, "-o", out, "--bisect-limit", "1")
    assert code == 0, stderr
    assert "1 rewrite(s) applied" in stdout and "stopped" in stdout
    full = str(tmp_path / "full.onnx")
    _run("optimize", EXAMPLE, "-o", full, "-q")
    assert len(onnx.load(out).graph.node) == len(onnx.load(EXAMPLE).graph.node) - 1
    assert len(onnx.load(full).graph.node) < len(onnx.load(out).graph.node)
    _assert_same_outputs(EXAMPLE, out)


def test_pipeline_option_and_disable(tmp_path):
    out = str(tmp_path / "o.onnx")
    code, _, stderr = _run("optimize", EXAMPLE, "-o", out, "--pipeline", "eliminate-identity", "-q")
    assert code == 0, stderr
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "Identity" not in ops and "Sigmoid" in ops
    out2 = str(tmp_path / "o2.onnx")
    code, _, stderr = _run("optimize", EXAMPLE, "-o", out2, "--disable", "eliminate-identity", "-q")
    assert code == 0, stderr
    ops2 = [n.op_type for n in onnx.load(out2).graph.node]
    assert "Identity" in ops2 and "Sigmoid" not in ops2
    _assert_same_outputs(EXAMPLE, out)
    _assert_same_outputs(EXAMPLE, out2)


def test_passes_lists_builtins_and_prints_presets():
    code, stdout, _ = _run("passes")
    assert code == 0
    for name in ("eliminate-dead-code", "eliminate-identity", "dedup-initializers", "topo-sort"):
        assert name in stdout
    code, stdout, _ = _run("passes", "--pipeline", "-O2")
    assert code == 0
    text = stdout.strip()
    assert "eliminate-dead-code" in text
    from graphopt.pipeline import PassRegistry, format_pipeline, parse_pipeline

    reg = PassRegistry.default()
    assert format_pipeline(parse_pipeline(text, reg)) == text, "printed pipeline must parse back"


def test_print_is_canonical():
    code, stdout, _ = _run("print", EXAMPLE)
    assert code == 0
    assert "export_identity" not in stdout  # node names dropped
    assert stdout.startswith("<")
    assert "Conv" in stdout


def test_load_pass_file_runs_by_name(tmp_path):
    plugin = tmp_path / "my_pass.py"
    plugin.write_text(
        "from graphopt.pipeline import Pass, PassResult\n"
        "class DropDocStrings(Pass):\n"
        "    name = 'drop-doc-strings'\n"
        "    def run(self, model, ctx):\n"
        "        n = 0\n"
        "        for node in model.all_nodes():\n"
        "            if node.doc_string and ctx.allow_rewrite('doc'):\n"
        "                node.doc_string = ''\n"
        "                n += 1\n"
        "        return PassResult(n > 0, {'cleared': n})\n")
    src = onnx.load(EXAMPLE)
    src.graph.node[1].doc_string = "exported from somewhere"
    inp = str(tmp_path / "in.onnx")
    onnx.save(src, inp)
    out = str(tmp_path / "out.onnx")
    code, stdout, stderr = _run("optimize", inp, "-o", out, "--load-pass", str(plugin),
                                "--pipeline", "drop-doc-strings", "--stats")
    assert code == 0, stderr
    assert "cleared=1" in stdout
    assert all(not n.doc_string for n in onnx.load(out).graph.node)
    _assert_same_outputs(inp, out)


# -- bad input: one line, exit 2, nothing written, input untouched ------------------------------

def _assert_user_error(tmp_path, args: list[str], fragment: str, out: str | None = None) -> str:
    before = {p: _digest(p) for p in args if os.path.isfile(p)}
    code, stdout, stderr = _run(*args)
    assert code == 2, (code, stdout, stderr)
    lines = [ln for ln in stderr.strip().splitlines() if ln]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert fragment.lower() in stderr.lower(), stderr
    if out is not None:
        assert not os.path.exists(out)
        assert not [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".tmp")]
    for p, d in before.items():
        assert _digest(p) == d
    return stderr


def test_missing_file(tmp_path):
    out = str(tmp_path / "o.onnx")
    _assert_user_error(tmp_path, ["optimize", str(tmp_path / "nope.onnx"), "-o", out], "does not exist", out)


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 20)
    out = str(tmp_path / "o.onnx")
    _assert_user_error(tmp_path, ["optimize", str(bad), "-o", out], "not", out)


def test_truncated_model(tmp_path):
    data = open(EXAMPLE, "rb").read()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: len(data) // 2])
    out = str(tmp_path / "o.onnx")
    _assert_user_error(tmp_path, ["optimize", str(bad), "-o", out], "onnx", out)


def test_graph_with_cycle(tmp_path):
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { a = Add(x, b)  b = Relu(a)  y = Relu(b) }""")
    path = str(tmp_path / "cycle.onnx")
    onnx.save(m, path)
    out = str(tmp_path / "o.onnx")
    _assert_user_error(tmp_path, ["optimize", path, "-o", out], "cycle", out)


def test_opset_newer_than_supported(tmp_path):
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Relu(x) }""")
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    path = str(tmp_path / "new.onnx")
    onnx.save(m, path)
    out = str(tmp_path / "o.onnx")
    _assert_user_error(tmp_path, ["optimize", path, "-o", out], "opset", out)


def test_unknown_domain_not_imported(tmp_path):
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { t = Relu(x) y = Identity(t) }""")
    m.graph.node[0].domain = "com.example.unknown"
    path = str(tmp_path / "dom.onnx")
    onnx.save(m, path)
    out = str(tmp_path / "o.onnx")
    _assert_user_error(tmp_path, ["optimize", path, "-o", out], "com.example.unknown", out)


def test_unknown_op_in_imported_custom_domain_is_kept_opaque(tmp_path):
    path = _write(tmp_path, """
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[2] x) => (float[2] y) { t = Identity(x)  y = com.example.Mystery(t) }""")
    out = str(tmp_path / "o.onnx")
    code, _, stderr = _run("optimize", path, "-o", out, "-q")
    assert code == 0, stderr
    nodes = onnx.load(out).graph.node
    assert [(n.domain, n.op_type) for n in nodes] == [("com.example", "Mystery")]
    assert nodes[0].input == ["x"]


def test_missing_external_data(tmp_path):
    model = graphopt.load(EXAMPLE)
    path = str(tmp_path / "ext.onnx")
    ir.save(model, path, external_data=True)
    os.remove(path + ".data")
    out = str(tmp_path / "o.onnx")
    _assert_user_error(tmp_path, ["optimize", path, "-o", out], "external data", out)


def test_output_is_input_refused(tmp_path):
    copy = str(tmp_path / "m.onnx")
    shutil.copy(EXAMPLE, copy)
    _assert_user_error(tmp_path, ["optimize", copy, "-o", copy], "input")


def test_output_folder_missing(tmp_path):
    out = str(tmp_path / "no" / "such" / "o.onnx")
    _assert_user_error(tmp_path, ["optimize", EXAMPLE, "-o", out], "does not exist")


def test_unknown_pass_suggests(tmp_path):
    out = str(tmp_path / "o.onnx")
    err = _assert_user_error(tmp_path, ["optimize", EXAMPLE, "-o", out, "--pipeline", "eliminate-dead-cod"],
                             "unknown pass", out)
    assert "eliminate-dead-code" in err


def test_bad_pipeline_syntax(tmp_path):
    out = str(tmp_path / "o.onnx")
    _assert_user_error(tmp_path, ["optimize", EXAMPLE, "-o", out, "--pipeline", "fixpoint<max=2>(topo-sort"],
                       "pipeline", out)


def test_internal_error_in_pass_names_pass_and_saves_reproducer(tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text(
        "from graphopt.pipeline import Pass\n"
        "class Broken(Pass):\n"
        "    name = 'broken-pass'\n"
        "    def run(self, model, ctx):\n"
        "        raise RuntimeError('boom')\n")
    out = str(tmp_path / "o.onnx")
    crash = tmp_path / "crash"
    crash.mkdir()
    code, _, stderr = _run("optimize", EXAMPLE, "-o", out, "--load-pass", str(plugin),
                           "--pipeline", "eliminate-identity,broken-pass", "--crash-dir", str(crash))
    assert code == 2, stderr
    assert "broken-pass" in stderr and "boom" in stderr and "eliminate-identity" in stderr
    assert "Traceback" not in stderr
    assert not os.path.exists(out)
    saved = [os.path.join(crash, d) for d in os.listdir(crash)]
    assert len(saved) == 1 and os.path.exists(os.path.join(saved[0], "input.onnx"))


def test_console_script_runs(tmp_path):
    out = str(tmp_path / "o.onnx")
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", EXAMPLE, "-o", out],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nodes" in proc.stdout
    _assert_same_outputs(EXAMPLE, out)
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(tmp_path / "x.onnx"), "-o", out],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_emitted_ir_version_is_accepted_by_onnxruntime(tmp_path):
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 21]>
        g (float[2] x) => (float[2] y) { t = Identity(x)  y = Relu(t) }""")
    m.ir_version = 14  # what onnx 1.23 stamps on new models
    path = str(tmp_path / "ir14.onnx")
    onnx.save(m, path)
    out = str(tmp_path / "o.onnx")
    code, _, stderr = _run("optimize", path, "-o", out, "-q")
    assert code == 0, stderr
    emitted = onnx.load(out)
    from graphopt.runtime import runtime_limits

    assert emitted.ir_version <= runtime_limits().max_ir_version
    onnx.checker.check_model(emitted)
    x = np.array([-1.0, 2.0], np.float32)
    assert run_model(emitted, {"x": x})["y"].tolist() == [0.0, 2.0]


def test_python_api_never_mutates_proto():
    proto = onnx.load(EXAMPLE)
    before = proto.SerializeToString()
    out = graphopt.optimize(proto, level=3)
    assert proto.SerializeToString() == before
    assert len(out.graph.node) < len(proto.graph.node)
    onnx.checker.check_model(out)


def test_output_files_get_the_usual_permissions(tmp_path):
    out, rep = str(tmp_path / "o.onnx"), str(tmp_path / "r.json")
    code, _, stderr = _run("optimize", EXAMPLE, "-o", out, "--report", rep, "-q")
    assert code == 0, stderr
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (out, rep):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, oct(os.stat(path).st_mode)
