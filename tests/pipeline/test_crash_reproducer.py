"""The crash reproducer: what it saves, and that the saved pipeline crashes again."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

from graphopt import ir
from graphopt.errors import PassError
from graphopt.pipeline import CrashReproducer, PassContext, PassManager, PassRegistry

FILES = ["README.txt", "failing_pass.txt", "input.onnx", "passes_before.txt", "pipeline.txt", "traceback.txt"]


def with_weight(chain_text: str) -> onnx.ModelProto:
    """The chain model with a 4x4 weight (MatMul) so it can be saved with external data."""
    proto = onnx.parser.parse_model(chain_text.replace("y = Neg(e)", "m = MatMul(e, w)\n   y = Neg(m)"))
    weight = onnx.numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "w")
    proto.graph.initializer.append(weight)
    return proto


def crash(registry: PassRegistry, pipeline: str, model: ir.Model, repro: CrashReproducer,
          **ctx_fields) -> PassError:
    ctx = PassContext(registry=registry, instruments=[repro], **ctx_fields)
    with pytest.raises(PassError) as info:
        PassManager(pipeline, ctx).run(model)
    return info.value


def test_reproducer_from_a_path_saves_everything(registry: PassRegistry, chain_text: str,
                                                 tmp_path: Path) -> None:
    source = tmp_path / "model" / "net.onnx"
    source.parent.mkdir()
    onnx.save_model(with_weight(chain_text), source, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="net.weights", size_threshold=0)
    model = ir.load(source)
    repro = CrashReproducer(tmp_path / "crashes", source, "tidy-then-crash")
    err = crash(registry, "count-nodes,remove-identity,crash,count-nodes", model, repro)

    folder = Path(err.reproducer)
    assert folder.parent == tmp_path / "crashes" and folder.name.startswith("graphopt-crash-crash-")
    assert model.meta["reproducer"] == str(folder) == repro.last_folder
    assert str(err).endswith(f"; reproducer saved to {folder}")
    assert sorted(os.listdir(folder)) == sorted(FILES + ["net.weights"])
    # The input as it was, not as the passes left it.
    assert (folder / "input.onnx").read_bytes() == source.read_bytes()
    assert (folder / "net.weights").read_bytes() == (source.parent / "net.weights").read_bytes()
    assert (folder / "pipeline.txt").read_text() == "count-nodes,remove-identity,crash,count-nodes\n"
    assert (folder / "failing_pass.txt").read_text() == "crash\n"
    assert (folder / "passes_before.txt").read_text() == "count-nodes\nremove-identity\n"
    trace = (folder / "traceback.txt").read_text()
    assert trace.startswith("Traceback (most recent call last):")
    assert trace.rstrip().endswith("ZeroDivisionError: division by zero in the test pass")
    readme = (folder / "README.txt").read_text()
    assert ('    graphopt optimize input.onnx -o out.onnx '
            '--pipeline "count-nodes,remove-identity,crash,count-nodes"\n') in readme
    assert "Pass 'crash' raised ZeroDivisionError: division by zero in the test pass" in readme
    assert "Pipeline as requested: tidy-then-crash" in readme
    # The test passes are not visible to the command line: the README says so.
    assert "registered from Python" in readme and "count-nodes, crash, remove-identity" in readme


def test_rerunning_the_saved_pipeline_reproduces_the_crash(registry: PassRegistry, chain_text: str,
                                                          tmp_path: Path) -> None:
    source = tmp_path / "net.onnx"
    onnx.save_model(with_weight(chain_text), source, save_as_external_data=True,
                    location="net.weights", size_threshold=0)
    first = crash(registry, "remove-one-identity,crash", ir.load(source),
                  CrashReproducer(tmp_path / "crashes", source))
    folder = Path(first.reproducer)

    again = ir.load(folder / "input.onnx")
    assert [n.op_type for n in again.graph].count("Identity") == 4
    np.testing.assert_array_equal(again.graph.initializers["w"].const_value.numpy(),
                                  np.arange(16, dtype=np.float32).reshape(4, 4))
    pipeline = (folder / "pipeline.txt").read_text().strip()
    with pytest.raises(PassError) as info:
        PassManager(pipeline, PassContext(registry=registry)).run(again)
    assert info.value.pass_name == (folder / "failing_pass.txt").read_text().strip() == "crash"
    assert info.value.ran_before == (folder / "passes_before.txt").read_text().split()


def test_reproducer_from_a_proto_serializes_it_at_crash_time(registry: PassRegistry, chain_text: str,
                                                            tmp_path: Path) -> None:
    proto = onnx.parser.parse_model(chain_text)
    expected = proto.SerializeToString()
    model = ir.load(proto)
    err = crash(registry, "remove-identity,crash", model, CrashReproducer(tmp_path, proto, None))
    folder = Path(err.reproducer)
    assert (folder / "input.onnx").read_bytes() == expected
    assert sorted(os.listdir(folder)) == FILES
    assert (folder / "pipeline.txt").read_text() == "remove-identity,crash\n"
    assert "Pipeline as requested" not in (folder / "README.txt").read_text()


def test_reproducer_from_bytes(registry: PassRegistry, chain_text: str, tmp_path: Path, build_model) -> None:
    data = onnx.parser.parse_model(chain_text).SerializeToString()
    err = crash(registry, "crash", build_model(), CrashReproducer(tmp_path, data))
    assert (Path(err.reproducer) / "input.onnx").read_bytes() == data


def test_readme_command_carries_the_settings_that_matter(registry: PassRegistry, tmp_path: Path,
                                                         build_model) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text("from graphopt.pipeline import Pass, PassResult\n\n"
                      "class Boom(Pass):\n    name = 'boom'\n    options = {'mode': 'x'}\n\n"
                      "    def run(self, model, ctx):\n        raise KeyError(self.config['mode'])\n")
    registry.load_file(str(plugin))
    repro = CrashReproducer(tmp_path / "crashes", onnx.parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 21]> g (float x) => (float y) { y = Neg(x) }'))
    err = crash(registry, 'count-nodes,boom<mode="a b">', build_model(), repro, target="cuda",
                disabled={"remove-identity"}, bisect_limit=7, seed=3)
    readme = (Path(err.reproducer) / "README.txt").read_text()
    command = next(line.strip() for line in readme.splitlines() if line.strip().startswith("graphopt optimize"))
    assert shlex.split(command) == [
        "graphopt", "optimize", "input.onnx", "-o", "out.onnx", "--pipeline", 'count-nodes,boom<mode="a b">',
        "--target", "cuda", "--disable", "remove-identity", "--bisect-limit", "7", "--seed", "3",
        "--load-pass", str(plugin)]
    assert command == repro.command(PassContext(registry=registry, target="cuda", disabled={"remove-identity"},
                                                bisect_limit=7, seed=3))
    sys.modules.pop("graphopt_plugin_plugin", None)


def test_failing_to_write_a_reproducer_does_not_hide_the_crash(registry: PassRegistry, tmp_path: Path,
                                                              build_model, caplog: pytest.LogCaptureFixture) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    model = build_model()
    with caplog.at_level(logging.WARNING, logger="graphopt.pipeline._reproducer"):
        err = crash(registry, "crash", model, CrashReproducer(not_a_folder, tmp_path / "in.onnx"))
    assert err.reproducer is None and "reproducer" not in model.meta
    assert str(err) == ("pass 'crash' failed: ZeroDivisionError: division by zero in the test pass "
                        "(passes run before it: none)")
    assert "could not save a crash reproducer" in caplog.text


def test_no_reproducer_without_a_crash(registry: PassRegistry, tmp_path: Path, build_model) -> None:
    model = build_model()
    PassManager("remove-identity", PassContext(registry=registry,
                                                instruments=[CrashReproducer(tmp_path / "c", b"")])).run(model)
    assert not (tmp_path / "c").exists() and "reproducer" not in model.meta


def test_reproducer_refuses_the_ir_model_as_input(build_model, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not the IR Model that the passes change"):
        CrashReproducer(tmp_path, build_model())


PLUGIN = '''
from graphopt.pipeline import Pass, PassResult


class StripIdentity(Pass):
    """Remove Identity nodes."""

    name = "plugin-strip-identity"

    def run(self, model, ctx):
        removed = 0
        for node in model.graph:
            if node.op_type == "Identity" and ctx.allow_rewrite("remove Identity"):
                node.outputs[0].replace_all_uses_with(node.inputs[0])
                model.graph.remove(node)
                removed += 1
        return PassResult(removed > 0, {"removed": removed})


class Explode(Pass):
    """Crash once the Identities are gone."""

    name = "plugin-explode"

    def run(self, model, ctx):
        if not any(node.op_type == "Identity" for node in model.graph):
            raise IndexError("no Identity left to look at")
        return PassResult(False)
'''


@pytest.fixture
def restore_package_logger():
    """The command line configures the "graphopt" logger; keep that from leaking into other tests."""
    logger = logging.getLogger("graphopt")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.propagate = propagate
    logger.setLevel(level)


def test_readme_command_reproduces_the_crash_from_the_command_line(
        chain_text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_package_logger: None) -> None:
    from click.testing import CliRunner

    from graphopt.cli import cli

    plugin = tmp_path / "explode.py"
    plugin.write_text(PLUGIN)
    source = tmp_path / "net.onnx"
    onnx.save_model(onnx.parser.parse_model(chain_text), source)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    runner = CliRunner()
    first = runner.invoke(cli, ["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--pipeline",
                                "plugin-strip-identity,plugin-explode", "--load-pass", str(plugin),
                                "--crash-dir", str(tmp_path / "crashes")])
    assert first.exit_code == 2, first.output
    (folder,) = (tmp_path / "crashes").iterdir()
    assert f"reproducer saved to {folder}" in first.output
    readme = (folder / "README.txt").read_text()
    command = next(line.strip() for line in readme.splitlines() if line.strip().startswith("graphopt optimize"))
    args = shlex.split(command)
    assert args[:2] == ["graphopt", "optimize"] and args[-2:] == ["--load-pass", str(plugin)]

    monkeypatch.chdir(folder)
    again = runner.invoke(cli, args[1:])
    assert again.exit_code == 2
    assert again.output.startswith("graphopt: error: pass 'plugin-explode' failed: IndexError: no Identity "
                                   "left to look at (passes run before it: plugin-strip-identity)")
    assert not (folder / "out.onnx").exists()

    # The Python recipe of the README reproduces it too.
    start = readme.index("    from graphopt import ir")
    snippet = "\n".join(line[4:] for line in readme[start:].split("\n\n")[0].splitlines())
    with pytest.raises(PassError) as info:
        exec(snippet, {})
    assert info.value.pass_name == "plugin-explode"
    for name in list(sys.modules):
        if name.startswith("graphopt_plugin_explode"):
            del sys.modules[name]
