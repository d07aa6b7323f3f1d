"""Dynamic int8, int4 weight-only and float16 conversion: latency, size and accuracy.

Part ``dynamic``: a BERT-base-shaped encoder (``bench/_models.build_bert_base``; 2 layers, a
reduced vocabulary by default) and a stack of large MatMuls (``[1, 128, 768] · [768, 3072]``
and back), each as float32, after graphopt's ``quantize-dynamic`` and after
``onnxruntime.quantization.quantize_dynamic`` (its defaults: per-tensor int8 weights). All
variants run in one process, interleaved (``graphopt.runtime.bench_models``), onnxruntime CPU,
1 thread, ``ORT_ENABLE_ALL``. Accuracy is the cosine similarity and largest absolute difference
of the outputs against float32 on the same inputs.

Part ``int4``: an LLM-shaped MatMul stack (hidden 1024, FFN 4096, 4 layers by default):
file size before and after ``quantize-int4`` in both formats, the largest difference between
onnxruntime's output and a numpy dequantize-then-matmul reference (must be float rounding), and
the difference from the float model.

Part ``float16``: the BERT-shaped encoder through ``convert-float16`` (inputs and outputs kept
float32): loads and runs on the CPU provider, largest relative difference against float32.

Usage::

    python bench/quantize_lowp.py                     # all parts
    python bench/quantize_lowp.py dynamic --runs 30 --json lowp.json
    python bench/quantize_lowp.py int4 float16

Exits with status 1 when graphopt's dynamic model is not at least 1.8x faster than float32 on
the large MatMul stack or a numeric check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_bytes, fmt_seconds, print_table, write_json  # noqa: E402
from _models import build_bert_base  # noqa: E402

from graphopt import ir  # noqa: E402
from graphopt.passes.quant.int4 import dequantize_blockwise, quantize_blockwise_int4  # noqa: E402
from graphopt.pipeline import PassContext, PassManager  # noqa: E402
from graphopt.runtime import bench_models, make_session  # noqa: E402

SPEEDUP_TARGET = 1.8


def _run_pipeline(source: str, pipeline: str, target_path: str, target: str = "cpu") -> str:
    model = ir.load(source)
    PassManager(pipeline, PassContext(target=target)).run(model)
    ir.save(model, target_path)
    return target_path


def _matmul_stack(path: str, *, seq: int, hidden: int, ffn: int, layers: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        for j, (k, n) in enumerate(((hidden, ffn), (ffn, hidden))):
            w, b = f"w{i}_{j}", f"b{i}_{j}"
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), w))
            inits.append(numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), b))
            nodes.append(helper.make_node("MatMul", [x, w], [f"{w}_mm"], name=f"mm{i}_{j}"))
            nodes.append(helper.make_node("Add", [f"{w}_mm", b], [f"{w}_add"], name=f"add{i}_{j}"))
            act = "Relu" if j == 0 else "Identity"
            nodes.append(helper.make_node(act, [f"{w}_add"], [f"{w}_out"], name=f"act{i}_{j}"))
            x = f"{w}_out"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "matmul_stack",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def _outputs(path: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = make_session(onnx.load(path), optimize=True)
    return np.asarray(session.run(None, feeds)[0], dtype=np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _bert_feeds(seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"input_ids": rng.integers(0, vocab, (1, seq), dtype=np.int64),
            "token_type_ids": np.zeros((1, seq), np.int64)}


def dynamic(args: argparse.Namespace, tmp: str) -> tuple[list[dict[str, Any]], bool]:
    from onnxruntime.quantization import quantize_dynamic

    rows: list[dict[str, Any]] = []
    ok = True
    models = {
        "bert": (build_bert_base(os.path.join(tmp, "bert.onnx"), layers=args.layers, vocab=args.vocab,
                                 seq_len=args.seq), _bert_feeds(args.seq, args.vocab)),
        "matmul-stack": (_matmul_stack(os.path.join(tmp, "stack.onnx"), seq=args.seq, hidden=768, ffn=3072,
                                       layers=2),
                         {"x": np.random.default_rng(1).standard_normal((1, args.seq, 768)).astype(np.float32)}),
    }
    for label, (source, feeds) in models.items():
        ours = _run_pipeline(source, "quantize-dynamic", os.path.join(tmp, f"{label}.dyn.onnx"))
        theirs = os.path.join(tmp, f"{label}.ortq.onnx")
        quantize_dynamic(source, theirs)
        paths = [source, ours, theirs]
        results = bench_models(paths, threads=1, level="all", warmup=args.warmup, runs=args.runs,
                               feeds=feeds, memory=False)
        reference = _outputs(source, feeds)
        base = results[0].p50
        names = ("float32", "graphopt quantize-dynamic", "ort quantize_dynamic")
        for name, path, result in zip(names, paths, results, strict=True):
            out = _outputs(path, feeds)
            rows.append({"model": label, "variant": name, "p50_s": result.p50, "speedup": base / result.p50,
                         "file_bytes": result.file_bytes, "cosine": _cosine(reference, out),
                         "max_abs_diff": float(np.abs(out - reference).max())})
        if label == "matmul-stack" and base / results[1].p50 < SPEEDUP_TARGET:
            ok = False
    print_table("quantize-dynamic (onnxruntime CPU, 1 thread, ORT_ENABLE_ALL, interleaved)",
                ["model", "variant", "p50", "speedup", "size", "cosine", "max |diff|"],
                [[r["model"], r["variant"], fmt_seconds(r["p50_s"]), f"{r['speedup']:.2f}x", fmt_bytes(r["file_bytes"]),
                  f"{r['cosine']:.5f}", f"{r['max_abs_diff']:.4f}"] for r in rows],
                notes=[f"target: graphopt >= {SPEEDUP_TARGET}x on the matmul stack"])
    return rows, ok


def int4(args: argparse.Namespace, tmp: str) -> tuple[list[dict[str, Any]], bool]:
    source = _matmul_stack(os.path.join(tmp, "llm.onnx"), seq=1, hidden=1024, ffn=4096, layers=args.int4_layers)
    x = np.random.default_rng(2).standard_normal((1, 8, 1024)).astype(np.float32)
    proto = onnx.load(source)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    # The numpy reference: every weight replaced by its dequantized int4 version, run as float32.
    reference_model = onnx.load(source)
    for t in reference_model.graph.initializer:
        if t.name.startswith("w"):
            t.CopyFrom(numpy_helper.from_array(
                dequantize_blockwise(quantize_blockwise_int4(weights[t.name], 32, True)), t.name))
    float_out = make_session(proto).run(None, {"x": x})[0]
    reference = make_session(reference_model).run(None, {"x": x})[0]
    rows: list[dict[str, Any]] = []
    ok = True
    variants = {"matmulnbits (accuracy-level 4, cpu default)": "quantize-int4",
                "matmulnbits (accuracy-level 0)": "quantize-int4<accuracy-level=0>",
                "qdq (opset 21)": "quantize-int4<format=qdq>"}
    paths = [source]
    for label, pipeline in variants.items():
        model = ir.load(source)
        if "qdq" in pipeline:
            model.opset_imports[""] = 21
            model.ir_version = 10
        PassManager(pipeline, PassContext()).run(model)
        path = os.path.join(tmp, f"llm.{len(paths)}.onnx")
        ir.save(model, path)
        paths.append(path)
        out = make_session(onnx.load(path)).run(None, {"x": x})[0]
        vs_reference = float(np.abs(out - reference).max())
        exact = "level 4" not in label  # int8 activations round A as well
        if exact:
            ok &= vs_reference <= 1e-3 * float(np.abs(reference).max())
        rows.append({"variant": label, "pipeline": pipeline, "float_bytes": os.path.getsize(source),
                     "bytes": os.path.getsize(path), "max_diff_vs_dequant_reference": vs_reference,
                     "max_diff_vs_float": float(np.abs(out - float_out).max()),
                     "output_max_abs": float(np.abs(float_out).max()), "cosine_vs_float": _cosine(float_out, out)})
    for rows_m in (1, 32):
        feeds = {"x": np.random.default_rng(3).standard_normal((1, rows_m, 1024)).astype(np.float32)}
        results = bench_models(paths, threads=1, level="all", warmup=args.warmup, runs=args.runs, feeds=feeds,
                               memory=False)
        for row, result in zip(rows, results[1:], strict=True):
            row[f"p50_s_m{rows_m}"] = result.p50
            row[f"speedup_m{rows_m}"] = results[0].p50 / result.p50
    print_table("quantize-int4 (block 32, symmetric, RTN; LLM-shaped MatMul stack; onnxruntime CPU, 1 thread)",
                ["variant", "size", "ratio", "max |diff| vs dequant ref", "cosine vs float", "M=1 speedup",
                 "M=32 speedup"],
                [[r["variant"], fmt_bytes(r["bytes"]), f"{r['bytes'] / r['float_bytes']:.3f}",
                  f"{r['max_diff_vs_dequant_reference']:.2e}", f"{r['cosine_vs_float']:.5f}",
                  f"{r['speedup_m1']:.2f}x", f"{r['speedup_m32']:.2f}x"] for r in rows],
                notes=[f"float32: {fmt_bytes(rows[0]['float_bytes'])}; "
                       f"output max |y| = {rows[0]['output_max_abs']:.1f}; "
                       "dequant ref = the float model with every weight replaced by its int4 value (ORT, "
                       "optimizations off); speedups at ORT_ENABLE_ALL, interleaved"])
    return rows, ok


def float16(args: argparse.Namespace, tmp: str) -> tuple[list[dict[str, Any]], bool]:
    source = build_bert_base(os.path.join(tmp, "bert16.onnx"), layers=args.layers, vocab=args.vocab, seq_len=args.seq)
    feeds = _bert_feeds(args.seq, args.vocab)
    reference = make_session(onnx.load(source)).run(None, feeds)[0]
    rows: list[dict[str, Any]] = []
    ok = True
    for pipeline in ("convert-float16", "convert-float16<block-ops=none>"):
        path = _run_pipeline(source, pipeline, os.path.join(tmp, "bert16.out.onnx"))
        out = make_session(onnx.load(path)).run(None, feeds)[0].astype(np.float32)
        rel = float(np.abs(out - reference).max() / np.abs(reference).max())
        ok &= rel < 2e-2
        rows.append({"pipeline": pipeline, "float_bytes": os.path.getsize(source), "bytes": os.path.getsize(path),
                     "max_rel_diff": rel, "cosine": _cosine(reference, out)})
    print_table("convert-float16 (BERT-shaped encoder; runs on onnxruntime CPU)",
                ["pipeline", "float32 size", "float16 size", "max |diff| / max |ref|", "cosine"],
                [[r["pipeline"], fmt_bytes(r["float_bytes"]), fmt_bytes(r["bytes"]), f"{r['max_rel_diff']:.2e}",
                  f"{r['cosine']:.6f}"] for r in rows])
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help="dynamic, int4, float16 (default: all)")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers of the BERT-shaped model")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--int4-layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    args = parser.parse_args(argv)
    unknown = set(args.parts) - {"dynamic", "int4", "float16"}
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from dynamic, int4, float16")
    payload: dict[str, Any] = {"args": vars(args)}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for part in dict.fromkeys(args.parts or ["dynamic", "int4", "float16"]):
            rows, part_ok = {"dynamic": dynamic, "int4": int4, "float16": float16}[part](args, tmp)
            payload[part] = rows
            ok &= part_ok
    payload["ok"] = ok
    write_json(args.json, payload)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
