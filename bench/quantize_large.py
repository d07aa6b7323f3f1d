"""Static int8 quantization of a float model over 2 GB: time, peak memory, accuracy.

The model is a chain of ``MatMul -> Relu`` layers (the last without Relu) whose float32
weights (``hidden x hidden``, N(0, 2/hidden)) live in one external data file, written 16 MiB at
a time, so generating it never holds a weight in memory. The default, 9 layers of 8192 x 8192,
is 2.42 GB: over the 2 GiB limit of one protobuf message.

``graphopt quantize`` (static, ``--calibration`` an ``.npz`` stack of seeded N(0, 1) samples)
runs in a child process: its wall time and peak RSS (``ru_maxrss`` from ``os.wait4``) are
measured. Then the output must load in onnxruntime (graph optimizations off and on) and its
outputs on fresh inputs must match the float model's within the cosine bound (``--cosine``,
default 0.99, the accuracy the quantization benchmarks hold int8 models to), and the report
must show every MatMul fused into an integer kernel with no Q/DQ left unfused.

Usage::

    python bench/quantize_large.py                   # 2.42 GB model (needs ~9 GB of disk)
    python bench/quantize_large.py --smoke           # 4 layers of 2048 x 2048 (67 MB), seconds
    python bench/quantize_large.py --layers 12 --json large_quant.json --keep

Exits with status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt_bytes, print_table, write_json, write_random_float32

#: Default shape: 9 x 8192 x 8192 float32 = 2.42 GB of weights.
DEFAULT_HIDDEN = 8192
DEFAULT_LAYERS = 9
SMOKE_HIDDEN = 2048
SMOKE_LAYERS = 4
#: Output cosine (quantized vs float32, fresh inputs) the model must keep.
COSINE_BOUND = 0.99
_ALIGN = 4096


def _write_random(f: Any, rows: int, cols: int, seed: int) -> int:
    """Append N(0, 2/rows) float32 values (He initialization: Relu keeps the scale)."""
    return write_random_float32(f, rows * cols, float(np.sqrt(2.0 / rows)), seed)


def _external(name: str, shape: tuple[int, ...], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)
    return t


def build_model(folder: str, *, hidden: int = DEFAULT_HIDDEN, layers: int = DEFAULT_LAYERS, rows: int = 8,
                seed: int = 0) -> str:
    """Write ``model.onnx`` + ``model.onnx.data`` (``layers`` MatMuls of ``hidden x hidden``) to ``folder``.

    Returns the model's path. Input ``x`` and output ``y`` are ``[rows, hidden]`` float32.
    """
    location = "model.onnx.data"
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    offset = 0
    x = "x"
    with open(os.path.join(folder, location), "wb") as f:
        for layer in range(layers):
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            length = _write_random(f, hidden, hidden, seed + layer)
            inits.append(_external(f"w{layer}", (hidden, hidden), location, offset, length))
            offset += length
            out = "y" if layer == layers - 1 else f"mm{layer}"
            nodes.append(helper.make_node("MatMul", [x, f"w{layer}"], [out], name=f"matmul{layer}"))
            if layer < layers - 1:
                nodes.append(helper.make_node("Relu", [out], [f"h{layer}"], name=f"relu{layer}"))
                x = f"h{layer}"
    graph = helper.make_graph(nodes, "large_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphopt-bench")
    model.ir_version = 8
    path = os.path.join(folder, "model.onnx")
    onnx.save(model, path)  # small: every weight is already external
    return path


def make_inputs(count: int, *, hidden: int, rows: int = 8, seed: int = 1) -> np.ndarray:
    """``count`` seeded N(0, 1) inputs stacked as ``[count, rows, hidden]``."""
    return np.random.default_rng(seed).standard_normal((count, rows, hidden), dtype=np.float32)


def run_child(argv: list[str]) -> tuple[float, int, int, str]:
    """Run ``argv``; return (wall s, peak RSS bytes of that child, exit code, output)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        log.seek(0)
        output = log.read().decode(errors="replace")
    return wall, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), output  # ru_maxrss: KiB


def graphopt_command() -> list[str]:
    """How to run the ``graphopt`` CLI with this interpreter."""
    exe = shutil.which("graphopt")
    return [exe] if exe else [sys.executable, "-m", "graphopt.cli"]


def cosine_against_float(float_path: str, quant_path: str, inputs: np.ndarray) -> tuple[float, float]:
    """Smallest per-sample output cosine of the quantized model against float32, with onnxruntime's
    optimizations off (the model as written) and on (the fused integer kernels)."""
    from graphopt.runtime import session_on_file

    reference = session_on_file(float_path)
    expected = [reference.run(None, {"x": x})[0] for x in inputs]
    del reference
    worst = []
    for optimize in (False, True):
        session = session_on_file(quant_path, optimize=optimize)
        cos = []
        for x, e in zip(inputs, expected):
            a = session.run(None, {"x": x})[0].ravel().astype(np.float64)
            b = e.ravel().astype(np.float64)
            cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        worst.append(min(cos))
        del session
    return worst[0], worst[1]


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def measure(work: str, *, hidden: int, layers: int, rows: int, samples: int, cosine_bound: float
            ) -> tuple[dict[str, Any], list[str]]:
    """Build, quantize in a child process, verify; the results and the failed checks."""
    src, out = os.path.join(work, "in"), os.path.join(work, "out")
    os.makedirs(src, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    model_path = build_model(src, hidden=hidden, layers=layers, rows=rows)
    build_s = time.perf_counter() - t0
    in_bytes = _folder_bytes(src)
    print(f"built {fmt_bytes(in_bytes)} ({layers} x {hidden}x{hidden} MatMul) in {build_s:.1f} s", flush=True)
    calib = os.path.join(work, "calib.npz")
    np.savez(calib, x=make_inputs(samples, hidden=hidden, rows=rows, seed=1))
    quant_path, report_path = os.path.join(out, "model.int8.onnx"), os.path.join(work, "report.json")
    _, base_rss, rc, log = run_child([sys.executable, "-c", "import graphopt, onnxruntime"])
    if rc != 0:
        raise SystemExit(f"importing graphopt failed:\n{log}")
    cmd = graphopt_command() + ["quantize", model_path, "-o", quant_path, "--calibration", calib,
                                "--report", report_path, "--quiet"]
    print("running:", " ".join(cmd), flush=True)
    wall, rss, rc, log = run_child(cmd)
    if rc != 0:
        raise SystemExit(f"graphopt quantize failed (exit {rc}):\n{log[-4000:]}")
    with open(report_path) as f:
        report = json.load(f)
    out_bytes = _folder_bytes(out)
    failures: list[str] = []
    fused = report["fusion"]["fused"]
    if report["fusion"]["unfused"] or fused.get("MatMulIntegerToFloat", 0) + fused.get("QLinearMatMul", 0) != layers:
        failures.append(f"fusion: {fused}, {report['fusion']['unfused']} unfused (every MatMul should fuse)")
    proto = onnx.load(quant_path, load_external_data=False)
    external = any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    cos_plain, cos_opt = cosine_against_float(model_path, quant_path,
                                              make_inputs(4, hidden=hidden, rows=rows, seed=7))
    for label, value in (("optimizations off", cos_plain), ("ORT_ENABLE_ALL", cos_opt)):
        if value < cosine_bound:
            failures.append(f"output cosine {value:.5f} ({label}) below {cosine_bound}")
    result = {"hidden": hidden, "layers": layers, "rows": rows, "calibration_samples": samples,
              "input_bytes": in_bytes, "output_bytes": out_bytes, "output_external_data": external,
              "build_s": build_s, "quantize_wall_s": wall, "peak_rss": rss, "baseline_rss": base_rss,
              "report_seconds": report["seconds"], "fusion": fused, "unfused": report["fusion"]["unfused"],
              "report_cosine": report.get("accuracy", {}).get("cosine"), "cosine_fresh_plain": cos_plain,
              "cosine_fresh_optimized": cos_opt, "cosine_bound": cosine_bound,
              "latency": report.get("latency"), "command": cmd}
    return result, failures


def main(argv: list[str] | None = None) -> int:
    """Build, quantize, measure and verify; exit 1 when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN, help="weight rows and columns")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="MatMul layers")
    parser.add_argument("--rows", type=int, default=8, help="rows of the input (tokens)")
    parser.add_argument("--samples", type=int, default=8, help="calibration samples")
    parser.add_argument("--cosine", type=float, default=COSINE_BOUND, help="output cosine the result must keep")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_LAYERS} layers of {SMOKE_HIDDEN}x{SMOKE_HIDDEN} instead (seconds)")
    parser.add_argument("--dir", help="work folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated and quantized models")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    hidden, layers = (SMOKE_HIDDEN, SMOKE_LAYERS) if args.smoke else (args.hidden, args.layers)
    work = args.dir or tempfile.mkdtemp(prefix="graphopt-quant-large-")
    os.makedirs(work, exist_ok=True)
    try:
        result, failures = measure(work, hidden=hidden, layers=layers, rows=args.rows, samples=args.samples,
                                   cosine_bound=args.cosine)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    lat = result["latency"] or {}
    rows = [["model", f"{layers} x MatMul {hidden}x{hidden} (+Relu), input [{args.rows}, {hidden}]"],
            ["float32 weights", fmt_bytes(result["input_bytes"])],
            ["int8 output", (f"{fmt_bytes(result['output_bytes'])} "
                             f"({'external data' if result['output_external_data'] else 'one file'})")],
            ["quantize wall time", f"{result['quantize_wall_s']:.1f} s (report: {result['report_seconds']:.1f} s)"],
            ["peak RSS", f"{fmt_bytes(result['peak_rss'])} (import alone: {fmt_bytes(result['baseline_rss'])})"],
            ["fused", f"{result['fusion']}, {result['unfused']} Q/DQ unfused"],
            ["cosine vs float32", (f"{result['cosine_fresh_plain']:.5f} (opt off), "
                                   f"{result['cosine_fresh_optimized']:.5f} (ORT_ENABLE_ALL), "
                                   f"report {result['report_cosine']}; bound {args.cosine}")],
            ["latency (1 thread)", (f"{lat.get('float_ms', '-')} -> {lat.get('quantized_ms', '-')} ms "
                                    f"({lat.get('speedup', '-')}x)")],
            ["result", "PASS" if not failures else "FAIL: " + "; ".join(failures)]]
    print_table(f"graphopt quantize (static int8), {fmt_bytes(result['input_bytes'])} float32 model", ["", ""], rows)
    write_json(args.json, {"benchmark": "quantize_large", "result": result, "failures": failures})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
