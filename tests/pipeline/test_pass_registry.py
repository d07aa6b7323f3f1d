"""The pass registry: registration, plugin files (--load-pass) and entry-point plugins."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import pytest

from graphopt import ir
from graphopt.errors import PipelineError
from graphopt.pipeline import ENTRY_POINT_GROUP, Pass, PassContext, PassManager, PassRegistry, PassResult

PLUGIN_SOURCE = '''
"""A plugin module: passes plus a named pipeline, written only against the public API."""

from graphopt.pipeline import Pass, PassResult, function_pass


class MarkGraph(Pass):
    """Set the main graph's doc string."""

    name = "{prefix}-mark-graph"
    options = {{"text": "marked"}}

    def run(self, model, ctx):
        model.graph.doc_string = self.config["text"]
        return PassResult(True, {{"marked": 1}})


@function_pass("{prefix}-count-ops")
def count_ops(model, ctx):
    """Count the nodes."""
    return PassResult(False, {{"ops": len(model.graph)}})


class ExtraPass(Pass):
    """Exported on its own, not through PASSES."""

    name = "{prefix}-extra"

    def run(self, model, ctx):
        return PassResult(False)


def more_passes():
    return [ExtraPass]


PASSES = [MarkGraph, count_ops]
PIPELINES = {{"{prefix}-all": "{prefix}-mark-graph<text=hello>,{prefix}-count-ops"}}
'''


class Local(Pass):
    """A pass registered from Python."""

    name = "local"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return PassResult(False)


def test_register_and_look_up() -> None:
    reg = PassRegistry()
    reg.register(Local)
    assert reg.get("local") is Local and reg.has("local") and not reg.has("other")
    assert reg.passes() == [Local]
    assert reg.origin("local") == __name__
    reg.register(Local)  # the same class again is harmless


def test_two_passes_with_one_name_are_refused() -> None:
    reg = PassRegistry()
    reg.register(Local)
    other = type("Other", (Pass,), {"name": "local", "run": Local.run})
    with pytest.raises(PipelineError, match=r"two passes are named 'local' \(.* and .*\); rename one"):
        reg.register(other, origin="plugin x")
    reg.register(other, replace=True)
    assert reg.get("local") is other


def test_register_refuses_what_is_not_a_named_pass() -> None:
    with pytest.raises(PipelineError, match="is not a Pass subclass with a name"):
        PassRegistry().register(Pass)
    with pytest.raises(PipelineError, match="is not a Pass subclass with a name"):
        PassRegistry().register(int)  # type: ignore[arg-type]


def test_load_file_registers_passes_and_pipelines(tmp_path: Path, build_model) -> None:
    plugin = tmp_path / "my-plugin.py"
    plugin.write_text(PLUGIN_SOURCE.format(prefix="file"))
    reg = PassRegistry()
    assert reg.load_file(str(plugin)) == 2
    assert {cls.name for cls in reg.passes()} == {"file-mark-graph", "file-count-ops"}
    assert reg.origin("file-mark-graph") == str(plugin)
    assert reg.pipeline("file-all") == "file-mark-graph<text=hello>,file-count-ops"
    model = build_model()
    report = PassManager("file-all", PassContext(registry=reg)).run(model)
    assert [(r.name, r.counters) for r in report.records] == [("file-mark-graph", {"marked": 1}),
                                                              ("file-count-ops", {"ops": 6})]
    assert model.graph.doc_string == "hello"
    sys.modules.pop("graphopt_plugin_my_plugin", None)


def test_load_file_without_pass_list_finds_pass_classes(tmp_path: Path) -> None:
    plugin = tmp_path / "bare.py"
    plugin.write_text(textwrap.dedent('''
        from graphopt.pipeline import Pass, PassResult

        class Bare(Pass):
            name = "bare-pass"

            def run(self, model, ctx):
                return PassResult(False)
    '''))
    reg = PassRegistry()
    assert reg.load_file(str(plugin)) == 1 and reg.has("bare-pass")
    sys.modules.pop("graphopt_plugin_bare", None)


def test_load_file_errors_are_clear(tmp_path: Path) -> None:
    reg = PassRegistry()
    with pytest.raises(PipelineError, match="--load-pass: file '.*missing.py' does not exist"):
        reg.load_file(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(PipelineError, match="importing '.*broken.py' failed: ModuleNotFoundError"):
        reg.load_file(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(PipelineError, match="'.*empty.py' defines no Pass subclass with a name"):
        reg.load_file(str(empty))
    for name in ("broken", "empty"):
        sys.modules.pop(f"graphopt_plugin_{name}", None)


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real installed distribution on sys.path whose entry points name the plugin module."""
    module = "graphopt_test_plugin_pkg"
    (tmp_path / f"{module}.py").write_text(PLUGIN_SOURCE.format(prefix="ep"))
    dist = tmp_path / "graphopt_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: graphopt-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""
        [{ENTRY_POINT_GROUP}]
        bundle = {module}
        single = {module}:ExtraPass
        [other.group]
        ignored = {module}:MarkGraph
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield dist
    sys.modules.pop(module, None)


def test_entry_point_plugins_are_found(installed_plugin: Path, build_model) -> None:
    reg = PassRegistry()
    assert reg.load_entry_points() >= 3
    assert {"ep-mark-graph", "ep-count-ops", "ep-extra"} <= {cls.name for cls in reg.passes()}
    assert reg.origin("ep-extra") == "plugin single (graphopt_test_plugin_pkg:ExtraPass)"
    assert reg.pipeline("ep-all") == "ep-mark-graph<text=hello>,ep-count-ops"
    model = build_model()
    PassManager("ep-mark-graph<text=plugged>", PassContext(registry=reg)).run(model)
    assert model.graph.doc_string == "plugged"


def test_entry_point_to_a_factory_function(installed_plugin: Path) -> None:
    (installed_plugin / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nfactory = graphopt_test_plugin_pkg:more_passes\n")
    reg = PassRegistry()
    reg.load_entry_points()
    assert not reg.has("ep-mark-graph")
    assert reg.origin("ep-extra") == "plugin factory (graphopt_test_plugin_pkg:more_passes)"


def test_broken_entry_point_is_a_warning(installed_plugin: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open(installed_plugin / "entry_points.txt", "a") as f:
        f.write(f"\n[{ENTRY_POINT_GROUP}]\nbroken = graphopt_no_such_module_xyz\n")
    reg = PassRegistry()
    with caplog.at_level(logging.WARNING, logger="graphopt.pipeline._registry"):
        reg.load_entry_points()
    assert reg.has("ep-mark-graph")
    assert "cannot load graphopt plugin broken (graphopt_no_such_module_xyz)" in caplog.text


def test_entry_point_clashing_with_a_known_pass_is_an_error(installed_plugin: Path) -> None:
    reg = PassRegistry()
    clash = type("Clash", (Pass,), {"name": "ep-extra", "run": Local.run})
    reg.register(clash, origin="graphopt")
    with pytest.raises(PipelineError, match="two passes are named 'ep-extra'"):
        reg.load_entry_points()


def test_entry_point_exporting_something_else_is_an_error(installed_plugin: Path) -> None:
    with open(installed_plugin / "entry_points.txt", "a") as f:
        f.write(f"\n[{ENTRY_POINT_GROUP}]\nwrong = graphopt_test_plugin_pkg:PIPELINES\n")
    with pytest.raises(PipelineError, match="plugin wrong .* exports .*not a Pass class"):
        PassRegistry().load_entry_points()
