"""Constants that would hold 10^12 elements: never materialized, the output still valid and correct.

Each run is a separate process with a cap on its address space and a time limit, so a folding
attempt fails fast instead of exhausting the machine; the process reports its peak memory.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import onnx
import onnx.parser
import pytest
from _robust import ROOT

from graphopt.runtime import run_model

HUGE = 1_000_000  # each dimension: 10^6 x 10^6 = 10^12 elements, 4 TB of float32

_CHILD = """
import json, sys
from graphopt.cli import main
code = 0
try:
    main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code or 0
# VmHWM belongs to this process's own address space; ru_maxrss would also count the RSS of the
# forking pytest process (a fork starts with the parent's pages), whatever this child did.
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "peak_mb": peak_kb / 1024}, f)
"""


def _limit_memory() -> None:
    limit = 8 * 1024**3  # far above what optimizing a tiny model needs, far below 4 TB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _optimize_in_child(tmp_path, model: onnx.ModelProto) -> tuple[dict, float, str]:
    src, out, stats = str(tmp_path / "huge.onnx"), str(tmp_path / "out.onnx"), str(tmp_path / "stats.json")
    onnx.save(model, src)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, stats, "optimize", src, "-o", out, "-O3", "-q"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_limit_memory)
    seconds = time.perf_counter() - start
    assert os.path.exists(stats), proc.stderr[-2000:]
    result = json.load(open(stats))
    assert result["code"] == 0, proc.stderr[-2000:]
    assert seconds < 120, f"optimizing a 3-node model took {seconds:.0f} s"
    assert result["peak_mb"] < 1500, f"peak memory {result['peak_mb']:.0f} MB: was the constant materialized?"
    assert os.path.getsize(out) < 100_000, "the huge constant must not be written into the output"
    optimized = onnx.load(out)
    onnx.checker.check_model(optimized, full_check=True)
    return result, seconds, out


def _never_taken_branch(inner: str) -> onnx.ModelProto:
    """``y = c ? x + reduce(huge) : -x``: onnxruntime runs it with ``c = False`` in no memory."""
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[3] x) => (float[3] y) {{
            y = If(c) <then_branch = t () => (float[3] a) {{
                    s = Constant<value = int64[2] {{{HUGE}, {HUGE}}}>()
                    {inner}
                    a = Add(x, r)
                }},
                else_branch = e () => (float[3] b) {{ b = Neg(x) }}>
        }}""")


@pytest.mark.parametrize("kind,inner", [
    ("constant-of-shape", "big = ConstantOfShape<value = float[1] {1.0}>(s)  r = ReduceSum<keepdims = 0>(big)"),
    ("expand", "two = Constant<value = float[1] {2.0}>()  big = Expand(two, s)  r = ReduceMax<keepdims = 0>(big)"),
], ids=["constant-of-shape", "expand"])
def test_huge_constant_in_a_branch_is_not_materialized(tmp_path, kind, inner):
    model = _never_taken_branch(inner)
    _, _, out = _optimize_in_child(tmp_path, model)
    x = np.array([1.0, -2.0, 3.5], np.float32)
    feeds = {"c": np.array(False), "x": x}
    assert run_model(model, feeds)["y"].tolist() == run_model(onnx.load(out), feeds)["y"].tolist() == (-x).tolist()
    optimized = onnx.load(out)
    then = next(a.g for n in optimized.graph.node if n.op_type == "If" for a in n.attribute
                if a.name == "then_branch")
    if {"ConstantOfShape", "Expand"} & {n.op_type for n in then.node}:
        # Left alone: the huge op still reads the same [10^6, 10^6] shape, and is still reduced.
        assert _shape_feeding(then, optimized.graph) == [HUGE, HUGE]
        assert {"ReduceSum", "ReduceMax"} & {n.op_type for n in then.node}
    else:
        # Folded to a scalar without materializing: then the taken branch runs, and must be right.
        expected = x + (np.float32(HUGE) * HUGE if kind == "constant-of-shape" else np.float32(2.0))
        got = run_model(optimized, {"c": np.array(True), "x": x})["y"]
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def _shape_feeding(graph: onnx.GraphProto, outer: onnx.GraphProto) -> list[int]:
    """The constant value of the shape input of the ConstantOfShape or Expand in ``graph``."""
    huge = next(n for n in graph.node if n.op_type in ("ConstantOfShape", "Expand"))
    name = huge.input[0] if huge.op_type == "ConstantOfShape" else huge.input[1]
    for g in (graph, outer):
        for t in g.initializer:
            if t.name == name:
                return onnx.numpy_helper.to_array(t).tolist()
        for n in g.node:
            if n.op_type == "Constant" and n.output[0] == name:
                return onnx.numpy_helper.to_array(n.attribute[0].t).tolist()
    raise AssertionError(f"the shape '{name}' of the huge op is no longer a constant")


@pytest.mark.parametrize("kind,producer", [
    ("constant-of-shape", "big = ConstantOfShape<value = float[1] {1.0}>(s)"),
    ("expand", "one = Constant<value = float[1] {1.0}>()  big = Expand(one, s)"),
], ids=["constant-of-shape", "expand"])
def test_shape_of_a_huge_constant_stays_correct(tmp_path, kind, producer):
    """``Shape(huge)`` may be folded to ``[10^6, 10^6]`` without computing ``huge``; or left alone."""
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[2] x) => (int64[2] y) {{
            s = Constant<value = int64[2] {{{HUGE}, {HUGE}}}>()
            {producer}
            shape = Shape(big)
            y = Add(shape, x)
        }}""")
    _, _, out = _optimize_in_child(tmp_path, model)
    optimized = onnx.load(out)
    ops = [n.op_type for n in optimized.graph.node]
    if "ConstantOfShape" in ops or "Expand" in ops:
        # Left alone: the huge op must still get its shape from the same [10^6, 10^6] constant.
        assert _shape_feeding(optimized.graph, optimized.graph) == [HUGE, HUGE]
        assert "Shape" in ops
    else:
        # Folded: small enough for onnxruntime to run, and right.
        x = np.array([1, -5], np.int64)
        assert run_model(optimized, {"x": x})["y"].tolist() == [HUGE + 1, HUGE - 5]
