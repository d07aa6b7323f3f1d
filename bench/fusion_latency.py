"""Node counts and onnxruntime latency of light-zoo CNNs before and after graphopt's fusions.

Models: ``light_*.onnx`` from the onnx package (``onnx/backend/test/data/light``). Those files
store every weight as ``ConstantOfShape`` of an IR-3 initializer that is also a graph input,
which a caller may override, so no optimizer may treat them as constants. Each model is first
brought to the form an exporter writes today: weights become seeded random initializers
(He-scaled conv/gemm weights, BatchNormalization scale and variance in [0.5, 1.5]), the
initializers leave the graph inputs, IR version 8; a final Softmax is dropped so the compared
outputs are logits (random weights saturate the softmax, which would hide differences).

Each prepared model goes through ``graphopt.optimize(pipeline=...)`` (default
``fold-constants,fusions,eliminate-dead-code``); the outputs of both are compared on seeded
inputs (onnxruntime, optimizations off) before anything is timed. Latency is the median of
``--runs`` interleaved runs (``graphopt.runtime.bench_models``), onnxruntime CPU, one
thread, at ``ORT_DISABLE_ALL`` and ``ORT_ENABLE_ALL``.

Usage::

    python bench/fusion_latency.py                          # resnet50, inception_v2, densenet121
    python bench/fusion_latency.py --models shufflenet --runs 50
    python bench/fusion_latency.py --json fusion.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import OUT_DIR, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.runtime import bench_models, compare_outputs, make_session, random_inputs, run_model  # noqa: E402

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
DEFAULT_MODELS = ("resnet50", "inception_v2", "densenet121")
DEFAULT_PIPELINE = "fold-constants,fusions,eliminate-dead-code"
#: Folding BatchNormalization into weights changes float32 rounding in every layer.
RTOL, ATOL = 1e-3, 1e-5


def prepare_light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """``light_<name>.onnx`` with seeded random initializers instead of overridable ConstantOfShape weights."""
    model = onnx.load(os.path.join(LIGHT_DIR, f"light_{name}.onnx"))
    rng = np.random.default_rng(seed)
    graph = model.graph
    shapes = {t.name: t for t in graph.initializer}
    roles: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            roles.update(zip(node.input[1:5], ("scale", "bias", "mean", "var")))
        elif node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            roles[node.input[1]] = "weight"
    nodes, weights = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            nodes.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(shapes[node.input[0]]))
        role = roles.get(node.output[0])
        if role == "weight":
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            array = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif role in ("scale", "var"):
            array = rng.uniform(0.5, 1.5, shape)
        else:
            array = rng.standard_normal(shape) * 0.1
        weights.append(numpy_helper.from_array(array.astype(np.float32), node.output[0]))
    for node in nodes:
        if node.op_type == "Softmax" and list(node.output) == [o.name for o in graph.output]:
            nodes.remove(node)
            graph.output[0].name = node.input[0]
            break
    used = {i for n in nodes for i in n.input}
    kept = [t for t in list(graph.initializer) + weights if t.name in used]
    inputs = [i for i in graph.input if i.name not in shapes and i.name not in {t.name for t in kept}]
    del graph.node[:], graph.initializer[:], graph.input[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept)
    graph.input.extend(inputs)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _max_relative_difference(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, ref in expected.items():
        scale = float(np.max(np.abs(ref))) or 1.0
        worst = max(worst, float(np.max(np.abs(ref - actual[name]))) / scale)
    return worst


def main(argv: list[str] | None = None) -> int:
    """Prepare, optimize, check and time each model; print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="light zoo names (resnet50, inception_v2, densenet121, shufflenet, ...)")
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model and level")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    folder = os.path.join(OUT_DIR, "fusion")
    os.makedirs(folder, exist_ok=True)
    rows, records = [], []
    for name in args.models:
        original = prepare_light_model(name)
        t0 = time.perf_counter()
        fused = graphopt.optimize(original, pipeline=args.pipeline)
        optimize_seconds = time.perf_counter() - t0
        session = make_session(original)
        feeds = random_inputs(session, seed=0)
        names = [o.name for o in session.get_outputs()]
        expected = dict(zip(names, session.run(names, feeds)))
        actual = run_model(fused, feeds)
        comparison = compare_outputs(expected, actual, rtol=RTOL, atol=ATOL, names=names)
        if not comparison.ok:
            print(f"{name}: outputs differ after optimization: {comparison.summary()}", file=sys.stderr)
            return 1
        paths = [os.path.join(folder, f"{name}.onnx"), os.path.join(folder, f"{name}.fused.onnx")]
        onnx.save(original, paths[0])
        onnx.save(fused, paths[1])
        timings = {}
        for level in ("disable", "all"):
            before, after = bench_models(paths, threads=1, level=level, runs=args.runs,
                                         warmup=args.warmup, memory=False)
            timings[level] = (before.p50, after.p50)
        record = {
            "model": name, "nodes_before": len(original.graph.node), "nodes_after": len(fused.graph.node),
            "max_relative_difference": _max_relative_difference(expected, actual),
            "optimize_seconds": optimize_seconds,
            "p50_ms": {level: {"original": a * 1e3, "fused": b * 1e3} for level, (a, b) in timings.items()},
        }
        records.append(record)
        (d0, d1), (a0, a1) = timings["disable"], timings["all"]
        rows.append([name, f"{record['nodes_before']} -> {record['nodes_after']}",
                     f"{record['max_relative_difference']:.1e}",
                     f"{d0 * 1e3:.1f}", f"{d1 * 1e3:.1f}", f"{d0 / d1:.2f}x",
                     f"{a0 * 1e3:.1f}", f"{a1 * 1e3:.1f}", f"{a0 / a1:.2f}x"])
    print_table(f"graphopt fusions ({args.pipeline}); onnxruntime CPU, 1 thread, median of {args.runs} runs",
                ["model", "nodes", "rel diff", "off: orig", "fused", "gain", "all: orig", "fused", "gain"], rows,
                notes=["rel diff: max |difference| / max |output| of the logits on seeded random inputs",
                       "off / all: ORT_DISABLE_ALL / ORT_ENABLE_ALL; times are p50 in ms; gain = orig / fused"])
    write_json(args.json, {"pipeline": args.pipeline, "runs": args.runs, "results": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
