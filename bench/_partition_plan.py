"""Plan quality of ``graphopt partition``: balance and bytes crossing cuts, per stage count.

For a model and K stages: the slowest stage's FLOPs over an even share (``total / K``; 1.0 is
perfect), the bytes the plan sends across cuts per run, and the bytes a straight chain cut
sends (cuts where a single tensor crosses, nearest to the even-share points). Used by
``bench/partition.py``; runnable alone:

    python bench/_partition_plan.py bench/out/models/bert_ts.onnx --stages 2,4,8 [--split-heavy]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Mapping, Sequence

__all__ = ["plan_quality", "DEFAULT_DIMS"]

#: Sizes the symbolic dims of the transformer exports are bound to.
DEFAULT_DIMS = {"batch": 1, "batch_size": 1, "sequence": 128, "sequence_length": 128, "seq": 128}


def plan_quality(model_path: str, stages: Sequence[int] = (2, 4, 8), *,
                 dims: Mapping[str, int] | None = None, default_dim: int = 1,
                 split_heavy: bool = False) -> list[dict[str, Any]]:
    """Plan ``model_path`` for each stage count and measure the plan (nothing is written).

    With ``split_heavy``, single MatMul/Gemm nodes heavier than half a stage are first split
    into column blocks (``graphopt partition --split-heavy``); a split graph output (GPT-2's
    logits) is assembled by the runtime from its slices, which do not count as crossing cuts.

    Returns:
        One dict per K: ``model``, ``stages``, ``split_heavy``, ``balance_ratio`` (slowest stage
        FLOPs / (total / K)), ``slowest_gflops``, ``total_gflops``, ``cut_bytes``,
        ``chain_cut_bytes``, ``cut_ok`` (cut bytes <= chain cut bytes), ``balance_ok`` (ratio
        <= 1.10), ``heaviest_node_share`` (the largest single node's FLOPs / (total / K) in the
        unsplit graph: a ratio below it is impossible without splitting a node),
        ``plan_seconds``.
    """
    import graphopt
    from graphopt import ir
    from graphopt.analysis import chain_cut_bytes, graph_cost, plan_stages

    dims = dict(dims if dims is not None else DEFAULT_DIMS)
    model = ir.load(model_path)
    cost = graph_cost(model, dims=dims, default_dim=default_dim)
    rows = []
    heaviest = max(cost.flops, default=0)
    for k in stages:
        start = time.perf_counter()
        if split_heavy:
            result = graphopt.partition(model_path, stages=k, split_heavy=True, plan_only=True,
                                        dims=dims, default_dim=default_dim)
            plan, chain = result.plan, chain_cut_bytes(cost, k)
        else:
            plan = plan_stages(cost, k)
            chain = chain_cut_bytes(cost, k)
        seconds = time.perf_counter() - start
        share = cost.total_flops / k if cost.total_flops else 1.0
        rows.append({
            "model": os.path.basename(model_path), "stages": k, "split_heavy": split_heavy,
            "balance_ratio": plan.balance_ratio(), "slowest_gflops": plan.bottleneck_flops / 1e9,
            "total_gflops": cost.total_flops / 1e9, "cut_bytes": plan.cut_bytes,
            "chain_cut_bytes": chain, "cut_ok": plan.cut_bytes <= chain,
            "balance_ok": plan.balance_ratio() <= 1.10,
            "heaviest_node_share": heaviest / share if share else 0.0, "plan_seconds": seconds,
        })
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan quality of the given models."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--stages", default="2,4,8")
    parser.add_argument("--split-heavy", action="store_true",
                        help="split nodes heavier than half a stage into column blocks first")
    args = parser.parse_args(argv)
    stages = [int(s) for s in args.stages.split(",")]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import print_table

    rows = [r for path in args.models for r in plan_quality(path, stages, split_heavy=args.split_heavy)]
    print_table("partition plan quality", ["model", "K", "slowest / (total/K)", "heaviest node / (total/K)",
                                           "cut MB", "chain cut MB", "plan s"],
                [[r["model"], r["stages"], f"{r['balance_ratio']:.3f}", f"{r['heaviest_node_share']:.3f}",
                  f"{r['cut_bytes'] / 1e6:.3f}", f"{r['chain_cut_bytes'] / 1e6:.3f}",
                  f"{r['plan_seconds']:.2f}"] for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
