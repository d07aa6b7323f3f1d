"""Latency of the onnxruntime contrib fusions (``-O3``) and of ``dedup-transposed-initializers``.

Part 1 (``encoder``): a BERT-base-like encoder (hidden 768, 12 heads, FFN 3072; 4 layers by
default) written with ``onnx.helper`` exactly as ``torch.onnx.export`` (TorchScript exporter,
opset 14, dynamic batch and sequence) writes HF BERT with eager attention: head splits whose
Reshape targets are ``Concat(Unsqueeze(Gather(Shape(x), i)), ..., [12], [64])``, a decomposed
LayerNorm, the Erf Gelu, an additive mask ``(1 − mask)·−10000``. Variants: the original, ``-O2``,
``-O2`` plus each contrib pass alone, and all contrib passes, each under onnxruntime's CPU provider
with one thread at ``ORT_ENABLE_ALL`` and ``ORT_DISABLE_ALL``. Runs are interleaved (round-robin
over the variants) and the median is reported, with the ratio to the original at ``ENABLE_ALL``.

Part 2 (``dedup``): a GPT-2-like model with a tied embedding (``wte [V, H]`` for the lookup, its
transpose stored again for the LM head), vocabulary 50257 and hidden 768 by default: file size,
session creation time and latency before and after ``dedup-transposed-initializers`` (and with the
contrib fusions, which fold the Transpose into a ``FusedMatMul``).

Usage::

    python bench/contrib_latency.py encoder [--layers 4] [--seq 128] [--rounds 30] [--json out.json]
    python bench/contrib_latency.py cnn [--rounds 30]
    python bench/contrib_latency.py dedup [--vocab 50257] [--hidden 768] [--rounds 20]
    python bench/contrib_latency.py residual [--layers 24] [--seq 128] [--hidden 768] [--rounds 30]

Part 3 (``residual``): post-norm residual blocks ``LayerNorm(x + bias + skip)`` with static
shapes, as onnxruntime sees BERT's once shapes are known: the original, the same with the sum
written ``Sum`` (``contrib-residual-sum``) and ``com.microsoft::SkipLayerNormalization``
(``contrib-skip-layer-norm``), at both onnxruntime levels. At ``ENABLE_ALL`` onnxruntime fuses
the original into SkipLayerNormalization itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_bytes, fmt_seconds, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.passes.contrib import CONTRIB_PASSES  # noqa: E402

ORT_LEVELS = ("ENABLE_ALL", "DISABLE_ALL")


# -- models -------------------------------------------------------------------------------------------
class _Builder:
    """Collects nodes and initializers; names values uniquely."""

    def __init__(self, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        out = self.name(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, array: np.ndarray, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, *shape: int, scale: float = 0.02) -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), "w")

    def dim(self, x: str, axis: int) -> str:
        """``Unsqueeze(Gather(Shape(x), axis), [0])``: how the TorchScript exporter reads ``x.size(axis)``."""
        gathered = self.op("Gather", self.op("Shape", x), self.const(np.array(axis, np.int64)), axis=0)
        return self.op("Unsqueeze", gathered, self.const(np.array([0], np.int64)))

    def layer_norm(self, x: str, hidden: int) -> str:
        """The decomposed LayerNorm of opset-14 exports."""
        axes = [-1]
        mean = self.op("ReduceMean", x, axes=axes)
        d = self.op("Sub", x, mean)
        var = self.op("ReduceMean", self.op("Pow", d, self.const(np.array(2.0, np.float32))), axes=axes)
        std = self.op("Sqrt", self.op("Add", var, self.const(np.array(1e-12, np.float32))))
        n = self.op("Div", d, std)
        gamma = self.const((1 + 0.1 * self.rng.standard_normal(hidden)).astype(np.float32), "gamma")
        beta = self.const((0.1 * self.rng.standard_normal(hidden)).astype(np.float32), "beta")
        return self.op("Add", self.op("Mul", n, gamma), beta)

    def linear(self, x: str, fan_in: int, fan_out: int) -> str:
        return self.op("Add", self.op("MatMul", x, self.weight(fan_in, fan_out)), self.weight(fan_out))

    def gelu(self, x: str) -> str:
        """``x·(erf(x/√2) + 1)·½`` as the TorchScript exporter writes ``F.gelu``."""
        erf = self.op("Erf", self.op("Div", x, self.const(np.array(1.4142135, np.float32))))
        return self.op("Mul", self.op("Mul", x, self.op("Add", erf, self.const(np.array(1.0, np.float32)))),
                       self.const(np.array(0.5, np.float32)))


def build_encoder(layers: int = 4, hidden: int = 768, heads: int = 12, ffn: int = 3072, vocab: int = 30522,
                  max_positions: int = 512, seed: int = 0) -> onnx.ModelProto:
    """A BERT-base-like encoder in the TorchScript-export form (see the module docstring)."""
    b = _Builder(seed)
    head = hidden // heads
    ids, mask = "input_ids", "attention_mask"
    words = b.op("Gather", b.weight(vocab, hidden), ids)
    seq = b.dim(ids, 1)
    positions = b.op("Slice", b.const(np.arange(max_positions, dtype=np.int64)[None, :]),
                     b.const(np.array([0], np.int64)), seq, b.const(np.array([1], np.int64)))
    h = b.layer_norm(b.op("Add", words, b.op("Gather", b.weight(max_positions, hidden), positions)), hidden)
    extended = b.op("Cast", b.op("Unsqueeze", mask, b.const(np.array([1, 2], np.int64))), to=TensorProto.FLOAT)
    additive = b.op("Mul", b.op("Sub", b.const(np.array(1.0, np.float32)), extended),
                    b.const(np.array(-10000.0, np.float32)))
    n_heads, size = b.const(np.array([heads], np.int64)), b.const(np.array([head], np.int64))
    for _ in range(layers):
        q, k, v = (b.linear(h, hidden, hidden) for _ in range(3))

        def split(x: str, perm: list[int]) -> str:
            shape = b.op("Concat", b.dim(x, 0), b.dim(x, 1), n_heads, size, axis=0)
            return b.op("Transpose", b.op("Reshape", x, shape), perm=perm)

        scores = b.op("Div", b.op("MatMul", split(q, [0, 2, 1, 3]), split(k, [0, 2, 3, 1])),
                      b.const(np.array(np.sqrt(head), np.float32)))
        probs = b.op("Softmax", b.op("Add", scores, additive), axis=-1)
        context = b.op("Transpose", b.op("MatMul", probs, split(v, [0, 2, 1, 3])), perm=[0, 2, 1, 3])
        merged_shape = b.op("Concat", b.dim(context, 0), b.dim(context, 1),
                            b.const(np.array([hidden], np.int64)), axis=0)
        attention = b.linear(b.op("Reshape", context, merged_shape), hidden, hidden)
        h = b.layer_norm(b.op("Add", attention, h), hidden)
        ff = b.linear(b.gelu(b.linear(h, hidden, ffn)), ffn, hidden)
        h = b.layer_norm(b.op("Add", ff, h), hidden)
    b.nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"]))
    graph = helper.make_graph(
        b.nodes, "encoder",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        b.inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 14)])


def build_cnn(blocks: int = 3, channels: int = 64, size: int = 56, seed: int = 0) -> onnx.ModelProto:
    """A ResNet-like stack: per block Conv+Relu, Conv, residual Add, Relu; then Conv+Clip (ReLU6)."""
    b = _Builder(seed)
    x = b.op("Relu", b.op("Conv", "image", b.weight(channels, 3, 3, 3, scale=0.2), b.weight(channels), pads=[1, 1, 1, 1]))
    for _ in range(blocks):
        h = b.op("Relu", b.op("Conv", x, b.weight(channels, channels, 3, 3, scale=0.05), b.weight(channels),
                              pads=[1, 1, 1, 1]))
        h = b.op("Conv", h, b.weight(channels, channels, 3, 3, scale=0.05), b.weight(channels), pads=[1, 1, 1, 1])
        x = b.op("Relu", b.op("Add", h, x))
    y = b.op("Clip", b.op("Conv", x, b.weight(channels, channels, 1, 1, scale=0.1), b.weight(channels)),
             b.const(np.array(0.0, np.float32)), b.const(np.array(6.0, np.float32)))
    b.nodes.append(helper.make_node("Identity", [y], ["features"]))
    graph = helper.make_graph(
        b.nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, channels, size, size])], b.inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def build_tied_lm(vocab: int = 50257, hidden: int = 768, seed: int = 0) -> onnx.ModelProto:
    """GPT-2's tied embedding: ``wte [V, H]`` for the lookup and its transpose ``[H, V]`` for the head.

    Between them one LayerNorm-free block (``tanh(h·W)``) stands for the transformer.
    """
    b = _Builder(seed)
    wte = (b.rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float32)
    b.inits.append(numpy_helper.from_array(wte, "wte"))
    b.inits.append(numpy_helper.from_array(np.ascontiguousarray(wte.T), "lm_head_weight"))
    h = b.op("Gather", "wte", "input_ids")
    h = b.op("Tanh", b.op("MatMul", h, b.weight(hidden, hidden)))
    b.nodes.append(helper.make_node("MatMul", [h, "lm_head_weight"], ["logits"]))
    graph = helper.make_graph(
        b.nodes, "tied_lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])], b.inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


# -- measuring ---------------------------------------------------------------------------------------
def build_residual(layers: int = 24, seq: int = 128, hidden: int = 768, seed: int = 0) -> onnx.ModelProto:
    """``h = LayerNorm(h + bias + skip)`` repeated, static ``[1, seq, hidden]`` shapes (part 3)."""
    b = _Builder(seed)
    h = "x"
    for _ in range(layers):
        biased = b.op("Add", h, b.weight(hidden))
        summed = b.op("Add", biased, "skip")
        h = b.op("LayerNormalization", summed, b.weight(hidden), b.weight(hidden), axis=-1, epsilon=1e-12)
    b.nodes.append(helper.make_node("Identity", [h], ["y"]))
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, seq, hidden]) for n in ("x", "skip", "y")]
    graph = helper.make_graph(b.nodes, "residual", info[:2], info[2:], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def run_residual(args: argparse.Namespace) -> dict[str, Any]:
    """Part 3: residual blocks as they are, with Sum, and as SkipLayerNormalization, at both levels."""
    source = build_residual(args.layers, args.seq, args.hidden)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, args.seq, args.hidden)).astype(np.float32) for n in ("x", "skip")}
    variants = {"original": "", "contrib-residual-sum": "contrib-residual-sum",
                "contrib-skip-layer-norm": "contrib-skip-layer-norm"}
    runs: dict[str, Callable[[], Any]] = {}
    reference = None
    for name, pipeline in variants.items():
        model, _ = optimize(source, pipeline)
        for level in ORT_LEVELS:
            sess, _ = session(model, level)
            out = sess.run(None, feeds)[0]
            reference = out if reference is None else reference
            if float(np.max(np.abs(out - reference))) > 1e-3:
                raise SystemExit(f"{name} at {level}: outputs differ from the original")
            runs[f"{name}|{level}"] = (lambda s=sess: s.run(None, feeds))
    times = interleaved(runs, args.rounds)
    medians = {key: statistics.median(values) for key, values in times.items()}
    ratios = {key: paired_ratio(times, key, "original|ENABLE_ALL") for key in times}
    rows = [[name] + [v for level in ORT_LEVELS for v in (fmt_seconds(medians[f"{name}|{level}"]),
                                                          f"{ratios[f'{name}|{level}']:.3f}")]
            for name in variants]
    print_table(f"{args.layers} residual blocks [1, {args.seq}, {args.hidden}], onnxruntime CPU, 1 thread, "
                f"median of {args.rounds} interleaved rounds",
                ["variant", "ENABLE_ALL", "/orig", "DISABLE_ALL", "/orig"], rows)
    return {"residual": {"layers": args.layers, "seq": args.seq, "hidden": args.hidden, "rounds": args.rounds,
                         "median_s": medians, "ratio_to_original_enable_all": ratios}}


def optimize(model: onnx.ModelProto, pipeline: str) -> tuple[onnx.ModelProto, float]:
    """``model`` through a graphopt pipeline (``""``: unchanged); returns it and the seconds taken."""
    if not pipeline:
        return model, 0.0
    start = time.perf_counter()
    out = graphopt.optimize(model, pipeline=pipeline, level=3)
    return out, time.perf_counter() - start


def session(model: onnx.ModelProto, level: str) -> tuple[Any, float]:
    """A one-thread CPU session at ``ORT_<level>``, and the seconds its creation took."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level}")
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    data = model.SerializeToString()
    start = time.perf_counter()
    created = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return created, time.perf_counter() - start


def interleaved(runs: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """CPU seconds of each callable per round, timed round-robin so drifts hit every variant alike.

    With one intra-op thread onnxruntime computes on the calling thread, so the process CPU time
    of a run is its cost; unlike wall time it does not count the time a busy machine gives to
    other processes.
    """
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)
    return cpu


def paired_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``time(name) / time(base)`` in the same round (robust to drift)."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def run_encoder(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: the encoder (or, with ``cnn``, the ResNet-like stack) under each variant and ORT level."""
    rng = np.random.default_rng(0)
    if args.part == "cnn":
        source = build_cnn()
        feeds = {"image": rng.standard_normal((1, 3, 56, 56)).astype(np.float32)}
        title = "ResNet-like CNN (7 Conv, 64 channels, 56x56)"
        passes = ["contrib-fused-conv"]
    else:
        source = build_encoder(layers=args.layers)
        feeds = {"input_ids": rng.integers(0, 30522, (1, args.seq)).astype(np.int64),
                 "attention_mask": np.ones((1, args.seq), np.int64)}
        feeds["attention_mask"][0, int(args.seq * 0.9):] = 0
        title = f"BERT-base-like encoder, {args.layers} layers, batch 1, sequence {args.seq}"
        passes = [c.name for c in CONTRIB_PASSES if c.name != "contrib-fused-conv"]
    variants = {"original": "", "-O2": "O2"}
    for name in passes:
        variants[f"-O2 + {name}"] = f"O2,{name},eliminate-dead-code"
    if len(passes) > 1:
        variants["-O2 + all contrib"] = "O2," + ",".join(passes) + ",eliminate-dead-code"
    variants["-O3"] = "O3"
    models, optimize_s, counts = {}, {}, {}
    for name, pipeline in variants.items():
        models[name], optimize_s[name] = optimize(source, pipeline)
        counts[name] = len(models[name].graph.node)
    reference = None
    runs: dict[str, Callable[[], Any]] = {}
    create_s: dict[str, float] = {}
    for level in ORT_LEVELS:
        for name, model in models.items():
            sess, created = session(model, level)
            create_s[f"{name}|{level}"] = created
            out = sess.run(None, feeds)[0]
            if reference is None:
                reference = out
            error = float(np.max(np.abs(out - reference)))
            if error > 1e-3:
                raise SystemExit(f"{name} at {level}: outputs differ from the original by {error:g}")
            runs[f"{name}|{level}"] = (lambda s=sess: s.run(None, feeds))
    times = interleaved(runs, args.rounds)
    medians = {key: statistics.median(values) for key, values in times.items()}
    ratios = {key: paired_ratio(times, key, "original|ENABLE_ALL") for key in times}
    rows = []
    for name in variants:
        row = [name, counts[name]]
        for level in ORT_LEVELS:
            key = f"{name}|{level}"
            row += [fmt_seconds(medians[key]), f"{ratios[key]:.3f}"]
        row.append(fmt_seconds(create_s[f"{name}|ENABLE_ALL"]))
        rows.append(row)
    print_table(f"{title}, onnxruntime CPU, 1 thread, median CPU time of {args.rounds} interleaved rounds",
                ["variant", "nodes", "ENABLE_ALL", "/orig", "DISABLE_ALL", "/orig", "session (ALL)"], rows,
                notes=["/orig: median over rounds of (latency / the original model's latency at ORT_ENABLE_ALL "
                       "in the same round)"])
    return {args.part: {"layers": args.layers, "seq": args.seq, "rounds": args.rounds,
                        "median_s": medians, "ratio_to_original_enable_all": ratios, "nodes": counts, "session_s": create_s, "optimize_s": optimize_s}}


def run_dedup(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: file size, session creation and latency of the tied-embedding model."""
    source = build_tied_lm(vocab=args.vocab, hidden=args.hidden)
    variants = {"original": "", "dedup-transposed": "dedup-transposed-initializers",
                "dedup-transposed + contrib-fused-matmul":
                    "dedup-transposed-initializers,contrib-fused-matmul,eliminate-dead-code"}
    feeds = {"input_ids": np.random.default_rng(0).integers(0, args.vocab, (1, args.seq)).astype(np.int64)}
    rows, result = [], {}
    runs: dict[str, Callable[[], Any]] = {}
    info: dict[str, tuple[int, float, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        reference = None
        for name, pipeline in variants.items():
            model, seconds = optimize(source, pipeline)
            path = os.path.join(folder, f"{len(info)}.onnx")
            onnx.save(model, path)
            created: dict[str, float] = {}
            for level in ORT_LEVELS:
                sess, created[level] = session(model, level)
                out = sess.run(None, feeds)[0]
                reference = out if reference is None else reference
                if not np.array_equal(out, reference) and float(np.max(np.abs(out - reference))) > 1e-4:
                    raise SystemExit(f"{name} at {level}: outputs differ from the original")
                runs[f"{name}|{level}"] = (lambda s=sess: s.run(None, feeds))
            info[name] = (os.path.getsize(path), seconds, created)
            del model
        medians = {key: statistics.median(values) for key, values in interleaved(runs, args.rounds, warmup=1).items()}
    for name, (size, seconds, created) in info.items():
        row = [name, fmt_bytes(size), fmt_seconds(seconds)]
        for level in ORT_LEVELS:
            row += [fmt_seconds(created[level]), fmt_seconds(medians[f"{name}|{level}"])]
        rows.append(row)
        result[name] = {"bytes": size, "optimize_s": seconds, "session_s": created,
                        "median_s": {lvl: medians[f"{name}|{lvl}"] for lvl in ORT_LEVELS}}
    print_table(f"tied embedding, vocabulary {args.vocab}, hidden {args.hidden}, sequence {args.seq}, "
                f"onnxruntime CPU, 1 thread, median CPU time of {args.rounds} interleaved rounds",
                ["variant", "file", "optimize", "session ALL", "run ALL", "session DISABLE", "run DISABLE"], rows)
    return {"dedup": result}


def main() -> None:
    """Parse arguments and run the chosen part."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["encoder", "cnn", "dedup", "residual"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.part == "dedup":
        result = run_dedup(args)
    elif args.part == "residual":
        result = run_residual(args)
    else:
        result = run_encoder(args)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
