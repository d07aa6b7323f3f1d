"""The example plugin (examples/graphopt-example-plugin) works as a third-party package would.

The plugin is "installed" into a temporary site folder: its source folder plus a dist-info
folder whose ``entry_points.txt`` is generated from the entry points its ``pyproject.toml``
declares (building a wheel would need the network or the ``wheel`` package). graphopt must then
find its pass by name through entry points, in-process and from the CLI in a subprocess, and the
pass must rewrite the graph without changing the numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx.parser
import pytest

from graphopt import ir
from graphopt.pipeline import ENTRY_POINT_GROUP, PassContext, PassManager, PassRegistry
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model
from graphopt.testing import assert_golden, collect_cases

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "examples" / "graphopt-example-plugin"
PLUGIN_MODULE = "graphopt_example_plugin"
PASS_NAME = "fold-double-negation"

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y, float[N,3] z) {
  r = Relu(x)
  a = Neg(r)
  b = Neg(a)
  z = Sigmoid(b)
  c = Neg(z)
  y = Neg(c)
}
"""


def _install(site: Path) -> None:
    """Make ``site`` look like a site-packages folder holding the plugin's distribution."""
    meta = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    project = meta["project"]
    dist_info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n",
        encoding="utf-8")
    lines = []
    for group, points in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {target}" for name, target in points.items())
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugin installed into a temporary site folder that is on ``sys.path``."""
    site = tmp_path / "site"
    _install(site)
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    for name in [m for m in sys.modules if m == PLUGIN_MODULE or m.startswith(PLUGIN_MODULE + ".")]:
        del sys.modules[name]


def _model_file(folder: Path) -> Path:
    path = folder / "in.onnx"
    onnx.save(onnx.parser.parse_model(MODEL_TEXT), str(path))
    return path


def _assert_folded_and_equal(source: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("Neg") == 0, ops
    # y = -(-z) and z is itself a graph output: y becomes a copy of z, keeping both names.
    assert sorted(ops) == ["Identity", "Relu", "Sigmoid"], ops
    assert [o.name for o in optimized.graph.output] == ["y", "z"]
    assert [i.name for i in optimized.graph.input] == ["x"]
    onnx.checker.check_model(optimized)
    feeds = random_inputs(make_session(source), seed=0, dims={"N": 4})
    expected = run_model(source, feeds)
    actual = run_model(optimized, feeds)
    comparison = compare_outputs(expected, actual, rtol=0.0, atol=0.0)  # the rewrite is exact
    assert comparison.ok, comparison.summary()
    np.testing.assert_array_equal(actual["y"], actual["z"])


def test_pyproject_declares_the_entry_point() -> None:
    meta = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["name"] == "graphopt-example-plugin"
    assert "graphopt" in meta["project"]["dependencies"]
    assert meta["project"]["entry-points"][ENTRY_POINT_GROUP] == {"example": PLUGIN_MODULE}


def test_default_registry_finds_the_plugin_pass(plugin_site: Path) -> None:
    registry = PassRegistry.default()
    cls = registry.get(PASS_NAME)
    assert cls.__module__.startswith(PLUGIN_MODULE)
    assert "plugin" in registry.origin(PASS_NAME)
    assert not PassRegistry.default(plugins=False).has(PASS_NAME)

    source = onnx.parser.parse_model(MODEL_TEXT)
    model = ir.load(source)
    report = PassManager(f"{PASS_NAME},eliminate-dead-code", PassContext(registry=registry)).run(model)
    assert report.totals()[PASS_NAME]["counters"] == {"double-negation": 2}
    ir.verify(model)
    _assert_folded_and_equal(source, ir.to_proto(model))


def test_cli_runs_the_plugin_pass_by_name(plugin_site: Path, tmp_path: Path) -> None:
    source_path = _model_file(tmp_path)
    out_path = tmp_path / "out.onnx"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(plugin_site), str(PLUGIN_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, "-m", "graphopt.cli", "optimize", str(source_path), "-o", str(out_path),
         "--pipeline", PASS_NAME, "-q"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _assert_folded_and_equal(onnx.load(str(source_path)), onnx.load(str(out_path)))


def test_cli_without_the_plugin_names_the_unknown_pass(tmp_path: Path) -> None:
    if importlib.util.find_spec(PLUGIN_MODULE) is not None:
        pytest.skip("the example plugin is installed in this environment")
    source_path = _model_file(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "graphopt.cli", "optimize", str(source_path), "-o",
         str(tmp_path / "out.onnx"), "--pipeline", PASS_NAME],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"unknown pass '{PASS_NAME}'" in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("path", collect_cases(PLUGIN_DIR / "fixtures"), ids=lambda p: p.stem)
def test_plugin_goldens(plugin_site: Path, path: Path) -> None:
    assert_golden(path, registry=PassRegistry.default())
