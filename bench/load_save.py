"""Load + save time: ``onnx.load`` + ``onnx.save`` against ``graphopt.ir.load`` + ``graphopt.ir.save``.

Models: the light model zoo shipped with onnx (``onnx/backend/test/data/light``) and a
BERT-base-sized encoder with random float32 weights (~440 MB, generated once and cached in
``bench/out``). Each timing is the median of ``--repeat`` runs, both libraries measured in
turn on a warm page cache. Before timing, the graphopt output is checked to equal the input
field by field (``onnx.load(out) == onnx.load(in)``).

Target: graphopt load+save <= 1.5x onnx load+save.

Usage::

    python bench/load_save.py                 # light zoo + BERT-base
    python bench/load_save.py --no-bert       # light zoo only (seconds)
    python bench/load_save.py --json out.json
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import OUT_DIR, fmt_bytes, fmt_seconds, median_time, print_table, write_json  # noqa: E402
from _models import build_bert_base  # noqa: E402

from graphopt import ir  # noqa: E402

TARGET_RATIO = 1.5


def _models(with_bert: bool) -> list[tuple[str, str]]:
    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    models = [(os.path.splitext(os.path.basename(p))[0], p)
              for p in sorted(glob.glob(os.path.join(light, "*.onnx")))]
    if with_bert:
        os.makedirs(OUT_DIR, exist_ok=True)
        path = os.path.join(OUT_DIR, "bert_base.onnx")
        if not os.path.exists(path):
            print(f"generating {path} (once) ...", flush=True)
            build_bert_base(path)
        models.append(("bert_base", path))
    return models


def bench_model(name: str, path: str, out_dir: str, repeat: int) -> dict:
    """Time both libraries on one model; check the graphopt output equals the input."""
    out_onnx = os.path.join(out_dir, f"{name}.onnx.onnx")
    out_go = os.path.join(out_dir, f"{name}.graphopt.onnx")
    ir.save(ir.load(path), out_go)
    if onnx.load(out_go) != onnx.load(path):
        raise SystemExit(f"{name}: graphopt load+save changed the model (not lossless)")

    def onnx_load():
        return onnx.load(path)

    def go_load():
        return ir.load(path)

    proto = onnx_load()
    model = go_load()
    result = {"model": name, "bytes": os.path.getsize(path)}
    timings = {
        "onnx_load": onnx_load, "graphopt_load": go_load,
        "onnx_save": lambda: onnx.save(proto, out_onnx), "graphopt_save": lambda: ir.save(model, out_go),
    }
    for key, fn in timings.items():
        result[key], result[key + "_cpu"] = median_time(fn, repeat)
    for kind in ("", "_cpu"):
        for lib in ("onnx", "graphopt"):
            result[f"{lib}_total{kind}"] = result[f"{lib}_load{kind}"] + result[f"{lib}_save{kind}"]
        result["ratio" + kind] = result[f"graphopt_total{kind}"] / result[f"onnx_total{kind}"]
    for p in (out_onnx, out_go):
        os.unlink(p)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when a model misses the target ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing (median)")
    parser.add_argument("--no-bert", action="store_true", help="skip the ~440 MB BERT-base model")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _models(not args.no_bert):
            r = bench_model(name, path, tmp, args.repeat)
            results.append(r)
            rows.append([name, fmt_bytes(r["bytes"]), fmt_seconds(r["onnx_load"]),
                         fmt_seconds(r["graphopt_load"]), fmt_seconds(r["onnx_save"]),
                         fmt_seconds(r["graphopt_save"]), f"{r['ratio']:.2f}x", f"{r['ratio_cpu']:.2f}x"])
    worst = max(r["ratio"] for r in results)
    print_table("load + save: onnx vs graphopt (wall time, median of %d)" % args.repeat,
                ["model", "size", "onnx load", "graphopt load", "onnx save", "graphopt save",
                 "ratio", "CPU ratio"],
                rows, [f"worst wall ratio {worst:.2f}x (target <= {TARGET_RATIO}x); graphopt's save "
                       "writes a temporary file and renames it into place, onnx.save writes in place"])
    write_json(args.json, {"benchmark": "load_save", "target_ratio": TARGET_RATIO, "results": results})
    return 0 if worst <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
