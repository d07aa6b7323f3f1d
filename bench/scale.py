"""Scaling of load, ``eliminate-dead-code`` and save with graph size (10k, 30k, 100k nodes).

The graphs are DAGs of cheap elementwise ops over 8 interleaved chains, with a dead two-node
branch every 10 steps (see ``_models.build_scale_graph``); they are generated once and cached
in ``bench/out``. Each stage's time is the median of ``--repeat`` runs, each on a freshly
loaded model. The pass must remove exactly the dead branches. The per-node time of the largest
graph over that of the smallest shows whether the stages stay linear.

Targets: load + eliminate-dead-code + save <= 5 s at 100k nodes; per-node ratio ~1.

Usage::

    python bench/scale.py
    python bench/scale.py --sizes 10000,100000 --check-outputs --json scale.json
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import OUT_DIR, fmt_seconds, print_table, write_json  # noqa: E402
from _models import build_scale_graph  # noqa: E402

from graphopt import ir  # noqa: E402
from graphopt.pipeline import PassContext, PassManager, PassRegistry  # noqa: E402
from graphopt.runtime import compare_outputs, run_model  # noqa: E402

TARGET_TOTAL_S = 5.0
STAGES = ("load", "dce", "save")


def _graph(n: int) -> str:
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f"scale_{n}.onnx")
    if not os.path.exists(path):
        build_scale_graph(path, n)
    return path


def _dead_nodes(path: str) -> tuple[int, int]:
    """(nodes, dead nodes) of a generated graph: dead branches are the nodes named ``d...``."""
    graph = onnx.load(path).graph
    return len(graph.node), sum(1 for node in graph.node if node.name.startswith("d"))


def bench_size(n: int, repeat: int, registry: PassRegistry, out_dir: str, check_outputs: bool) -> dict:
    """Time load, eliminate-dead-code and save on the ``n``-node graph."""
    path = _graph(n)
    nodes, dead = _dead_nodes(path)
    out = os.path.join(out_dir, f"scale_{n}.opt.onnx")
    times: dict[str, list[float]] = {f"{s}{k}": [] for s in STAGES for k in ("", "_cpu")}
    for _ in range(repeat):
        gc.collect()
        clock = [(time.perf_counter(), time.process_time())]
        model = ir.load(path)
        clock.append((time.perf_counter(), time.process_time()))
        report = PassManager("eliminate-dead-code", PassContext(registry=registry)).run(model)
        clock.append((time.perf_counter(), time.process_time()))
        ir.save(model, out)
        clock.append((time.perf_counter(), time.process_time()))
        for i, stage in enumerate(STAGES):
            times[stage].append(clock[i + 1][0] - clock[i][0])
            times[stage + "_cpu"].append(clock[i + 1][1] - clock[i][1])
        removed = report.totals()["eliminate-dead-code"]["counters"].get("removed-nodes", 0)
        if removed != dead:
            raise SystemExit(f"{n} nodes: eliminate-dead-code removed {removed} nodes, expected {dead}")
        del model
    result = {"nodes": nodes, "dead": dead, **{k: statistics.median(v) for k, v in times.items()}}
    result["total"] = sum(result[s] for s in STAGES)
    result["total_cpu"] = sum(result[s + "_cpu"] for s in STAGES)
    result["us_per_node"] = result["total"] / nodes * 1e6
    if len(onnx.load(out).graph.node) != nodes - dead:
        raise SystemExit(f"{n} nodes: the saved model does not have {nodes - dead} nodes")
    if check_outputs:
        feeds = {"x": np.random.default_rng(0).standard_normal(4).astype(np.float32)}
        cmp = compare_outputs(run_model(onnx.load(path), feeds), run_model(onnx.load(out), feeds),
                              rtol=0.0, atol=0.0)
        if not cmp.ok:
            raise SystemExit(f"{n} nodes: outputs changed: {cmp.summary()}")
        result["outputs_checked"] = True
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when the largest graph misses the time target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,30000,100000", help="comma-separated node counts")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (median)")
    parser.add_argument("--check-outputs", action="store_true",
                        help="also compare onnxruntime outputs of the input and the output model")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    registry = PassRegistry.default()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            results.append(bench_size(n, args.repeat, registry, tmp, args.check_outputs))
    rows = [[f"{r['nodes']:,}", f"{r['dead']:,}", fmt_seconds(r["load"]), fmt_seconds(r["dce"]),
             fmt_seconds(r["save"]), fmt_seconds(r["total"]), fmt_seconds(r["total_cpu"]),
             f"{r['us_per_node']:.1f}"] for r in results]
    linearity = results[-1]["us_per_node"] / results[0]["us_per_node"]
    largest = results[-1]
    notes = [f"per-node time {largest['nodes']:,} / {results[0]['nodes']:,} nodes: {linearity:.2f}x (~1 = linear)",
             f"total at {largest['nodes']:,} nodes: {largest['total']:.2f} s wall, "
             f"{largest['total_cpu']:.2f} s CPU (target <= {TARGET_TOTAL_S:.0f} s)"]
    print_table(f"load -> eliminate-dead-code -> save (median of {args.repeat})",
                ["nodes", "dead", "load", "dead-code", "save", "total", "total CPU", "us/node"],
                rows, notes)
    write_json(args.json, {"benchmark": "scale", "target_total_s": TARGET_TOTAL_S,
                           "per_node_ratio": linearity, "results": results})
    return 0 if largest["total"] <= TARGET_TOTAL_S else 1


if __name__ == "__main__":
    sys.exit(main())
