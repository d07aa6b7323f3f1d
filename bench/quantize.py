"""Static int8 quantization: graphopt.quantize against onnxruntime.quantization, same run.

Models (``--models``, default all):

- ``bert``: BERT-base (``transformers.BertModel`` default config, random weights, TorchScript
  export; ``bench/out/models/bert_ts.onnx``, exported on first use with the benchmark
  environment, see ``_peer_models.py``); inputs ``[CLS] ids... [SEP]``, sequence 128, batch 1.
  Target: graphopt static int8 >= 2.0x float32 speed with output cosine >= 0.99.
- ``nudenet``: NudeNet's 320n detector (YOLOv8-n, real weights) from the ``nudenet`` wheel, on
  crops of scikit-learn's sample photographs. Same target.
- ``resnet``: a ResNet-18-style CNN built here (``_quant_models.build_resnet``, weights
  initialized from image data) on crops of the same photographs. Target: graphopt per-channel
  int8 >= 2.0x float32 speed with top-1 agreement >= 99%.

Every graphopt row must also never be slower than float32.

Variants: float32; onnxruntime ``quantize_static`` (QDQ, its default settings: MinMax,
per-tensor, S8S8) and ``quantize_dynamic`` (defaults); ``graphopt.quantize`` static per-tensor
and per-channel (its defaults otherwise). Calibration uses ``--samples`` inputs (an ``.npz``
stack that every quantizer reads), accuracy is measured on separate held-out inputs.

Columns: latency (p50) and its ratio to float32 at ``ORT_ENABLE_ALL``, 1 thread (all variants
timed interleaved in one process, ``graphopt.runtime.bench_models``); cosine similarity (mean
over held-out samples, ``graphopt.runtime.output_similarity``); top-1 agreement (classifier
only); quantization wall time and peak RSS (each quantizer runs in a fresh child process;
``VmHWM``); file size; PASS/FAIL against the target.

Usage::

    bench/out/venv/bin/python bench/quantize.py                 # all models (needs OpenCV or Pillow)
    bench/out/venv/bin/python bench/quantize.py --models resnet --samples 64 --json quant.json

Exits with status 1 when a graphopt row misses its target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import OUT_DIR, fmt_bytes, print_table, write_json

MODELS = ("bert", "nudenet", "resnet")
VARIANTS = ("float32", "ort_static", "ort_dynamic", "graphopt_static", "graphopt_per_channel")
SPEED_TARGET = 2.0
COSINE_TARGET = 0.99
TOP1_TARGET = 0.99
WORK_DIR = os.path.join(OUT_DIR, "quant")

# Per model: calibration samples, held-out samples, timed runs.
_DEFAULTS = {"bert": (16, 8, 20), "nudenet": (32, 16, 60), "resnet": (64, 256, 80)}


# -- child process: one quantizer ----------------------------------------------------------------------
def _vm(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _child(kind: str, source: str, output: str, calib: str) -> None:
    """Quantize ``source`` into ``output`` with one quantizer; print wall time and peak RSS."""
    import onnxruntime.quantization as oq  # noqa: F401  (imported before the baseline)

    import graphopt

    base = _vm("VmRSS")
    start = time.perf_counter()
    if kind == "ort_static":
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                data = np.load(calib)
                self.stacks = {k: data[k] for k in data.files}
                self.index = 0

            def get_next(self) -> dict[str, np.ndarray] | None:
                n = len(next(iter(self.stacks.values())))
                if self.index >= n:
                    return None
                self.index += 1
                return {k: v[self.index - 1] for k, v in self.stacks.items()}

        quantize_static(source, output, Reader(), quant_format=QuantFormat.QDQ)
    elif kind == "ort_dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(source, output)
    elif kind in ("graphopt_static", "graphopt_per_channel"):
        import graphopt

        graphopt.quantize(source, output, calibration=calib, per_channel=kind == "graphopt_per_channel")
    else:
        raise SystemExit(f"unknown quantizer {kind}")
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "peak_rss": _vm("VmHWM"), "base_rss": base}))


def _quantize_in_child(kind: str, source: str, output: str, calib: str, timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, source, output, calib],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not os.path.exists(output):
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- models ------------------------------------------------------------------------------------------
def _prepare(model: str, samples: int, held_out: int) -> tuple[str, list[dict[str, np.ndarray]],
                                                             list[dict[str, np.ndarray]]]:
    """The float model's path, calibration feeds and held-out feeds."""
    import _quant_models as qm

    os.makedirs(WORK_DIR, exist_ok=True)
    if model == "bert":
        from _peer_models import ensure_model, model_specs

        spec = next(s for s in model_specs(["bert"], os.path.join(OUT_DIR, "models"), "") if s.name == "bert_ts")
        python = os.path.join(OUT_DIR, "venv", "bin", "python")
        path = ensure_model(spec, python if os.path.exists(python) else sys.executable)
        return path, qm.bert_feeds(samples, seed=1), qm.bert_feeds(held_out, seed=2)
    if model == "nudenet":
        import sysconfig

        path = os.path.join(sysconfig.get_paths()["purelib"], "nudenet", "320n.onnx")
        if not os.path.exists(path):
            raise SystemExit(f"{path} not found: pip install nudenet (bench/requirements-peers.txt) into "
                             "this interpreter's environment")
        return path, qm.nudenet_feeds(samples, seed=1), qm.nudenet_feeds(held_out, seed=2)
    if model == "resnet":
        path = os.path.join(WORK_DIR, "resnet18_style.onnx")
        if not os.path.exists(path):
            qm.build_resnet(path)
        return path, qm.resnet_feeds(samples, seed=1), qm.resnet_feeds(held_out, seed=2)
    raise SystemExit(f"unknown model '{model}'; choose from {', '.join(MODELS)}")


def _outputs(path: str, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    from graphopt.runtime import make_session

    with open(path, "rb") as f:
        session = make_session(f.read(), optimize=True, threads=1)
    return [session.run(None, feed) for feed in feeds]


def _accuracy(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]], classifier: bool
              ) -> dict[str, Any]:
    from graphopt.runtime import output_similarity

    # The first output of each sample (BERT: last_hidden_state; detector: boxes+scores; CNN: logits).
    sim = output_similarity([r[0] for r in reference], [c[0] for c in candidate])
    return {"cosine": sim["cosine"], "cosine_min": sim["cosine_min"], "sqnr_db": sim["sqnr_db"],
            "top1": sim["top1_agreement"] if classifier else None}


def _judge(model: str, variant: str, row: dict[str, Any]) -> str:
    """PASS/FAIL against the target; onnxruntime rows are judged too, for reference."""
    if variant == "float32":
        return ""
    if "error" in row:
        return "FAIL"
    speed = row["speedup"]
    if model == "resnet" and variant == "graphopt_static":
        return "PASS" if speed >= 1.0 else "FAIL"  # the target is per-channel; this must only not slow down
    if model == "resnet":
        ok = speed >= SPEED_TARGET and (row["top1"] or 0) >= TOP1_TARGET
    else:
        ok = speed >= SPEED_TARGET and row["cosine"] >= COSINE_TARGET
    if variant.startswith("graphopt") and speed < 1.0:
        ok = False
    return "PASS" if ok else "FAIL"


def bench_model(model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from graphopt.runtime import bench_models, model_size_on_disk

    samples, held, runs = _DEFAULTS[model]
    samples = args.samples or samples
    runs = args.runs or runs
    float_path, calib_feeds, held_feeds = _prepare(model, samples, held)
    os.makedirs(WORK_DIR, exist_ok=True)
    calib = os.path.join(WORK_DIR, f"{model}_calib_{samples}.npz")
    np.savez(calib, **{k: np.stack([f[k] for f in calib_feeds]) for k in calib_feeds[0]})
    paths = {"float32": float_path}
    info: dict[str, dict[str, Any]] = {"float32": {}}
    for variant in VARIANTS[1:]:
        if args.variants and variant not in args.variants:
            continue
        out = os.path.join(WORK_DIR, f"{model}_{variant}.onnx")
        if os.path.exists(out):
            os.unlink(out)
        print(f"[{model}] quantizing: {variant}", file=sys.stderr, flush=True)
        info[variant] = _quantize_in_child(variant, float_path, out, calib, args.timeout)
        if "error" not in info[variant]:
            paths[variant] = out
        else:
            print(f"[{model}] {variant} failed: {info[variant]['error']}", file=sys.stderr, flush=True)
    print(f"[{model}] accuracy on {len(held_feeds)} held-out inputs", file=sys.stderr, flush=True)
    reference = _outputs(float_path, held_feeds)
    for variant, path in paths.items():
        info[variant].update(_accuracy(reference, reference if variant == "float32" else _outputs(path, held_feeds),
                                       classifier=model == "resnet"))
    print(f"[{model}] timing {len(paths)} variants, {runs} runs each", file=sys.stderr, flush=True)
    names = list(paths)
    results = bench_models([paths[n] for n in names], threads=1, level="all", warmup=3, runs=runs,
                           feeds=held_feeds[0], memory=False)
    p50 = {n: r.p50 for n, r in zip(names, results)}
    rows = []
    for variant in VARIANTS:
        if variant not in info:
            continue
        row: dict[str, Any] = {"model": model, "variant": variant, **info[variant]}
        if variant in p50:
            row.update(latency_ms=p50[variant] * 1e3, speedup=p50["float32"] / p50[variant],
                       file_bytes=model_size_on_disk(paths[variant]))
        row["verdict"] = _judge(model, variant, row)
        rows.append(row)
    return rows


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--variants", default="", help=f"comma-separated subset of {','.join(VARIANTS[1:])}")
    parser.add_argument("--samples", type=int, default=0, help="calibration samples (default per model)")
    parser.add_argument("--runs", type=int, default=0, help="timed runs per variant (default per model)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one quantizer")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "SOURCE", "OUTPUT", "CALIB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    args.variants = [v for v in args.variants.split(",") if v]
    rows: list[dict[str, Any]] = []
    for model in [m for m in args.models.split(",") if m]:
        rows += bench_model(model, args)
    table = [[r["model"], r["variant"], _cell(r.get("latency_ms"), ".1f"), _cell(r.get("speedup"), ".2f") + "x",
              _cell(r.get("cosine"), ".4f"), _cell(r.get("top1"), ".3f"), _cell(r.get("wall_s"), ".1f"),
              fmt_bytes(r["peak_rss"]) if r.get("peak_rss") else "-",
              fmt_bytes(r["file_bytes"]) if r.get("file_bytes") else "-",
              r.get("error", "")[:80] or r["verdict"]] for r in rows]
    print_table("int8 quantization vs float32 (onnxruntime CPU, ORT_ENABLE_ALL, 1 thread)",
                ["model", "variant", "p50 ms", "speed vs fp32", "cosine", "top-1", "quantize s", "peak RSS",
                 "file", "result"], table,
                notes=[(f"targets: bert/nudenet static int8 >= {SPEED_TARGET}x and cosine >= {COSINE_TARGET}; "
                        f"resnet per-channel >= {SPEED_TARGET}x and top-1 >= {TOP1_TARGET:.0%}; graphopt never "
                        "slower than float32. Peak RSS: the quantizing child process (VmHWM).")])
    write_json(args.json, {"benchmark": "quantize", "rows": rows})
    failed = [r for r in rows if r["variant"].startswith("graphopt") and r["verdict"] != "PASS"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
