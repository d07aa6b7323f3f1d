"""Peak memory and time of ``graphopt optimize -O1`` on a model of several GB with external data.

The model is a chain of MatMul + Add layers whose float32 weights (64-256 MiB each) live in one
external data file, plus what -O1 cleans up: an Identity in the chain, an unused 64 MiB weight,
and a weight that is a byte-for-byte copy of another. The data file is written chunk by chunk
(16 MiB of random numbers at a time), so generating it never holds a whole weight in memory.

``graphopt optimize`` runs in a child process; its peak resident set size (``ru_maxrss`` of
that child, from ``os.wait4``) is compared with that of a child that only imports graphopt.
Target: peak RSS less than 1 GB above that baseline, whatever the model size (weights are
memory-mapped or streamed, never loaded whole). Then both models run in onnxruntime on a seeded
random input and must agree.

Usage::

    python bench/large_model.py                  # 3 GB model
    python bench/large_model.py --smoke          # ~0.5 GB, a quick check
    python bench/large_model.py --size-gb 5 --keep --json large.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt_bytes, fmt_seconds, print_table, write_json, write_random_float32  # noqa: E402

TARGET_RSS_OVER_BASELINE = 1_000_000_000
SMOKE_SIZE_GB = 0.5
#: Weight shapes cycled through; each layer's input size is the previous layer's output size.
_SHAPES = ((4096, 4096), (4096, 8192), (8192, 8192), (8192, 4096))
_ALIGN = 4096


def _write_random(f, shape: tuple[int, ...], seed: int) -> int:
    """Append N(0, 1/fan_in) float32 values to ``f``; returns bytes written."""
    return write_random_float32(f, int(np.prod(shape)), float(1.0 / np.sqrt(shape[0])), seed)


def _external(name: str, shape: tuple[int, ...], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key = key
        entry.value = value
    return t


def generate(folder: str, size_gb: float) -> tuple[str, int]:
    """Write ``model.onnx`` + ``model.onnx.data`` (about ``size_gb`` GB) into ``folder``."""
    location = "model.onnx.data"
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    target = int(size_gb * 1e9)
    offset = 0
    with open(os.path.join(folder, location), "wb") as f:
        def add_weight(name: str, shape: tuple[int, ...], seed: int) -> None:
            nonlocal offset
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            length = _write_random(f, shape, seed)
            inits.append(_external(name, shape, location, offset, length))
            offset += length

        # An unused weight (dead) that -O1 drops.
        add_weight("unused_weight", _SHAPES[0], seed=10_000)
        x = "x"
        layer = 0
        while offset < target or layer == 0:
            shape = _SHAPES[layer % len(_SHAPES)]
            # The first square layer of the second cycle repeats layer 0's bytes: a duplicate.
            seed = 0 if layer == len(_SHAPES) else layer
            add_weight(f"w{layer}", shape, seed)
            bias = np.random.default_rng(1000 + layer).standard_normal(shape[1]).astype(np.float32) * 0.01
            inits.append(numpy_helper.from_array(bias, f"b{layer}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{layer}"], [f"mm{layer}"], name=f"matmul{layer}"))
            nodes.append(helper.make_node("Add", [f"mm{layer}", f"b{layer}"], [f"h{layer}"], name=f"add{layer}"))
            x = f"h{layer}"
            if layer == 1:
                nodes.append(helper.make_node("Identity", [x], [f"{x}_copy"], name="identity"))
                x = f"{x}_copy"
            layer += 1
    out_dim = _SHAPES[(layer - 1) % len(_SHAPES)][1]
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(nodes, "large_chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _SHAPES[0][0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphopt-bench")
    model.ir_version = 8
    path = os.path.join(folder, "model.onnx")
    onnx.save(model, path)  # small: every weight is already external
    return path, layer


def _run_child(argv: list[str]) -> tuple[float, float, int, int, str]:
    """Run ``argv``; return (wall s, CPU s, peak RSS bytes of that child, exit code, output)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        log.seek(0)
        output = log.read().decode(errors="replace")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss * 1024, proc.returncode, output  # ru_maxrss: KiB on Linux


def _graphopt_command() -> list[str]:
    exe = shutil.which("graphopt")
    return [exe] if exe else [sys.executable, "-m", "graphopt.cli"]


def _ort_outputs(path: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from graphopt.runtime import make_session

    session = make_session(path, optimize=False, threads=1)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _file_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def main(argv: list[str] | None = None) -> int:
    """Generate, optimize in a child process, measure, verify; exit 1 when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0, help="size of the weights (default 3)")
    parser.add_argument("--smoke", action="store_true", help=f"a ~{SMOKE_SIZE_GB} GB model instead")
    parser.add_argument("--keep", action="store_true", help="keep the generated and optimized models")
    parser.add_argument("--dir", help="work folder (default: a new temporary folder)")
    parser.add_argument("--skip-ort", action="store_true", help="do not compare outputs in onnxruntime")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    size_gb = SMOKE_SIZE_GB if args.smoke else args.size_gb
    work = args.dir or tempfile.mkdtemp(prefix="graphopt-large-")
    src_dir, out_dir = os.path.join(work, "in"), os.path.join(work, "out")
    os.makedirs(src_dir, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    failures: list[str] = []
    try:
        t0 = time.perf_counter()
        model_path, layers = generate(src_dir, size_gb)
        gen_s = time.perf_counter() - t0
        in_bytes = _file_bytes(src_dir)
        print(f"generated {fmt_bytes(in_bytes)} ({layers} layers) in {gen_s:.1f} s: {model_path}", flush=True)

        _, _, base_rss, rc, log = _run_child([sys.executable, "-c", "import graphopt"])
        if rc != 0:
            raise SystemExit(f"importing graphopt failed:\n{log}")
        out_path = os.path.join(out_dir, "model.opt.onnx")
        cmd = _graphopt_command() + ["optimize", model_path, "-o", out_path, "-O1"]
        wall, cpu, rss, rc, log = _run_child(cmd)
        if rc != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}):\n{log}")
        out_bytes = _file_bytes(out_dir)
        over = rss - base_rss
        if over >= TARGET_RSS_OVER_BASELINE:
            failures.append(f"peak RSS {fmt_bytes(rss)} is {fmt_bytes(over)} above the baseline")

        optimized = onnx.load(out_path, load_external_data=False)
        ops = [n.op_type for n in optimized.graph.node]
        if "Identity" in ops[:-1] or any(t.name == "unused_weight" for t in optimized.graph.initializer):
            failures.append("-O1 left the Identity or the unused weight in place")
        result = {"size_gb": size_gb, "layers": layers, "input_bytes": in_bytes,
                  "output_bytes": out_bytes, "generate_s": gen_s, "optimize_wall_s": wall, "optimize_cpu_s": cpu,
                  "baseline_rss": base_rss, "peak_rss": rss, "rss_over_baseline": over,
                  "output_initializers": len(optimized.graph.initializer), "command": cmd}

        if not args.skip_ort:
            from graphopt.runtime import compare_outputs

            feeds = {"x": np.random.default_rng(0).standard_normal((1, _SHAPES[0][0])).astype(np.float32)}
            t1 = time.perf_counter()
            expected = _ort_outputs(model_path, feeds)
            actual = _ort_outputs(out_path, feeds)
            cmp = compare_outputs(expected, actual, rtol=1e-6, atol=1e-6)
            result["ort_check_s"] = time.perf_counter() - t1
            result["max_abs_error"] = max(o.max_abs for o in cmp.outputs)
            if not cmp.ok:
                failures.append(f"outputs differ: {cmp.summary()}")
        result["failures"] = failures

        rows = [["model (weights)", fmt_bytes(in_bytes)],
                ["optimized model", fmt_bytes(out_bytes)],
                ["generate", fmt_seconds(gen_s)],
                ["graphopt optimize -O1 (wall)", fmt_seconds(wall)],
                ["graphopt optimize -O1 (CPU, user + system)", fmt_seconds(cpu)],
                ["baseline RSS (import graphopt)", fmt_bytes(base_rss)],
                ["peak RSS of optimize", fmt_bytes(rss)],
                ["peak RSS above baseline", f"{fmt_bytes(over)} (target < {fmt_bytes(TARGET_RSS_OVER_BASELINE)})"]]
        if "max_abs_error" in result:
            rows.append(["onnxruntime outputs, max abs error", f"{result['max_abs_error']:.3g}"])
        print_table(f"graphopt optimize -O1 on a {size_gb:g} GB external-data model", ["measure", "value"],
                    rows, failures or ["all checks passed"])
        write_json(args.json, {"benchmark": "large_model", "target_rss_over_baseline": TARGET_RSS_OVER_BASELINE,
                               "result": result})
    finally:
        if args.keep:
            print(f"kept {work}")
        elif not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
