"""Progress bars: drawn on a terminal, silent with --quiet or when stderr is not a terminal."""

from __future__ import annotations

import io
import os
import time

import onnx
from click.testing import CliRunner
from rich.console import Console

import graphopt
from graphopt import ir
from graphopt._api import optimize_model
from graphopt._progress import ProgressDisplay
from graphopt.cli import cli
from graphopt.pipeline import PassContext, PassRegistry, PassResult, function_pass
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "fixtures", "examples", "tiny_cnn.onnx")


def _terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=120), buffer


def test_disabled_display_hands_out_nothing():
    with ProgressDisplay(enabled=False) as display:
        with display.bytes_step("loading") as advance:
            assert advance is None
        assert display.pass_instrument() is None
        assert not display.visible


def test_quiet_or_not_a_terminal_is_silent():
    assert not ProgressDisplay.for_stderr(quiet=True).enabled
    # under pytest stderr is captured, as it is in a pipe or a CI log
    assert not ProgressDisplay.for_stderr(quiet=False).enabled


def test_cli_writes_no_control_codes_when_stderr_is_not_a_terminal(tmp_path):
    out = str(tmp_path / "o.onnx")
    result = CliRunner().invoke(cli, ["optimize", EXAMPLE, "-o", out], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "\x1b[" not in result.stderr and result.stderr == ""


def test_pass_progress_is_drawn_on_a_terminal(tmp_path):
    @function_pass("slow-identity-count", opt_level=1)
    def slow(model, ctx):
        time.sleep(0.6)  # long enough for several refreshes of the display
        return PassResult(False, {"identities": sum(n.op_type == "Identity" for n in model.graph)})

    registry = PassRegistry.default()
    registry.register(slow)
    console, buffer = _terminal()
    out = str(tmp_path / "o.onnx")
    with ProgressDisplay(enabled=True, console=console, delay=0) as display:
        outcome = optimize_model(EXAMPLE, pipeline="slow-identity-count,eliminate-identity",
                                 ctx=PassContext(registry=registry), output=out, progress=display)
        assert display.visible
    drawn = buffer.getvalue()
    assert "pass slow-identity-count" in drawn
    assert "\x1b[" in drawn, "a terminal gets a live display"
    assert [r.name for r in outcome.report.records] == ["slow-identity-count", "eliminate-identity"]
    assert not any(type(i).__name__ == "PassProgress" for i in PassContext().instruments)
    src, dst = onnx.load(EXAMPLE), onnx.load(out)
    feeds = random_inputs(make_session(src), seed=0)
    assert compare_outputs(run_model(src, feeds), run_model(dst, feeds), rtol=1e-6, atol=1e-6).ok


def test_fast_runs_never_show_the_display():
    console, buffer = _terminal()
    with ProgressDisplay(enabled=True, console=console, delay=30) as display:
        optimize_model(EXAMPLE, level=1, progress=display)
        assert not display.visible
    assert buffer.getvalue() == ""


def test_load_and_save_report_bytes(tmp_path):
    model = graphopt.load(EXAMPLE)
    path = str(tmp_path / "ext.onnx")
    written: list[tuple[int, int]] = []
    ir.save(model, path, external_data=True, size_threshold=64, progress=lambda d, t: written.append((d, t)))
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert len(written) > 1 and all(t == total for _, t in written)
    assert [d for d, _ in written] == sorted(d for d, _ in written), "progress only moves forward"
    assert written[-1][0] == total
    read: list[tuple[int, int]] = []
    loaded = ir.load(path, progress=lambda d, t: read.append((d, t)))
    assert read[-1] == (os.path.getsize(path), os.path.getsize(path))
    assert ir.print_model(loaded) == ir.print_model(model)
