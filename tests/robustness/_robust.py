"""Helpers of the robustness tests: run the CLI, and check that bad input fails cleanly."""

from __future__ import annotations

import hashlib
import os

import onnx
from click.testing import CliRunner

from graphopt.cli import cli
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "fixtures", "examples", "tiny_cnn.onnx")


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``graphopt ARGS`` in-process; return (exit code, stdout, stderr)."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def tree(folder: str) -> dict[str, str]:
    """Every file under ``folder`` (symlinks not followed) with a digest of its bytes."""
    out: dict[str, str] = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            if os.path.islink(path):
                out[path] = "link:" + os.readlink(path)
            else:
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_user_error(model_path: str, fragment: str, *extra: str) -> str:
    """``graphopt optimize MODEL`` must fail with exit 2 and one clear line, writing nothing.

    The output goes next to the model; every file in the model's folder must be unchanged
    afterwards (no output, no temporary file, no write anywhere else in the folder).
    """
    folder = os.path.dirname(os.path.abspath(model_path))
    out = os.path.join(folder, "optimized.onnx")
    before = tree(folder)
    code, stdout, stderr = run_cli("optimize", model_path, "-o", out, *extra)
    assert code == 2, (code, stdout, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("graphopt: error: ") and "Traceback" not in stderr, stderr
    assert fragment.lower() in stderr.lower(), stderr
    assert tree(folder) == before, "a failed run must not write or change any file"
    return lines[0]


def assert_optimizes_correctly(model_path: str, out: str, *extra: str, rtol: float = 1e-5,
                               atol: float = 1e-6) -> onnx.ModelProto:
    """``graphopt optimize`` succeeds, and the output computes what the input computes."""
    code, _, stderr = run_cli("optimize", model_path, "-o", out, "-q", *extra)
    assert code == 0, stderr
    src, dst = onnx.load(model_path), onnx.load(out)
    onnx.checker.check_model(dst)
    assert [(i.name, i.type) for i in dst.graph.input] == [(i.name, i.type) for i in src.graph.input]
    assert [o.name for o in dst.graph.output] == [o.name for o in src.graph.output]
    feeds = random_inputs(make_session(src), seed=0)
    cmp = compare_outputs(run_model(src, feeds), run_model(dst, feeds), rtol=rtol, atol=atol)
    assert cmp.ok, cmp.summary()
    return dst
