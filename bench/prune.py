"""Structured pruning: MACs and onnxruntime latency before and after ``graphopt.prune``.

Models are built here with onnx.helper and seeded random weights:

- ``resnet``: ResNet-style CNN (3 stages of 2 basic blocks, 32/64/128 channels, 1x1 projection
  shortcuts at the downsampling blocks, 64x64 input); 50% of the channels of every group.
- ``mobilenet``: MobileNetV2-style CNN (inverted residual blocks: 1x1 expand x4, 3x3
  depthwise, 1x1 project; 3 stages, 32/64/128 channels, 96x96 input); 50% of the channels.
- ``bert``: BERT-style encoder (4 layers, hidden 256, 8 heads, MLP 1024, sequence 128; MatMul+Add
  projections, Reshape/Transpose heads, Erf-GELU, LayerNormalization); 25% of the heads and
  25% of the MLP neurons.

Targets (exit code 1 if one is missed): CNNs ``MACs >= 2x fewer`` and ``latency >= 1.8x
faster``; BERT ``latency >= 1.3x faster``; every pruned model passes the onnx checker (full).
Latency: ``--runs`` interleaved runs (``graphopt.runtime.bench_models``), onnxruntime CPU,
ORT_ENABLE_ALL, 1 thread; the speedup is the median of the per-round ratios (each round runs
both models back to back), p50s are shown too. MACs: Conv/MatMul/Gemm multiply-adds (``graphopt.analysis``).

Usage::

    python bench/prune.py                    # all three models
    python bench/prune.py --models bert --runs 30 --json prune.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_info, print_table, write_json

import graphopt
from graphopt.analysis import estimate_flops
from graphopt.runtime import bench_models


def model_macs(model: onnx.ModelProto) -> int:
    """Multiply-adds of Conv, MatMul and Gemm nodes (2 FLOPs each in ``estimate_flops``)."""
    report = estimate_flops(model)
    return sum(n.flops or 0 for n in report.nodes if n.op in ("Conv", "ConvTranspose", "MatMul", "Gemm")) // 2


class _Builder:
    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def init(self, array: Any, prefix: str, dtype: Any = np.float32) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array).astype(dtype), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str, **attrs: Any) -> str:
        out = self.name(prefix)
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1) -> str:
        w = self.init(self.rng.normal(0, np.sqrt(2 / (cin // group * k * k)), (cout, cin // group, k, k)), "convw")
        b = self.init(self.rng.normal(0, 0.05, cout), "convb")
        return self.node("Conv", [x, w, b], "conv", kernel_shape=[k, k], pads=[k // 2] * 4,
                         strides=[stride, stride], group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        return self.node("BatchNormalization", [x, self.init(r.uniform(0.5, 1.5, c), "gamma"),
                                                self.init(r.normal(0, 0.1, c), "beta"),
                                                self.init(r.normal(0, 0.1, c), "mean"),
                                                self.init(r.uniform(0.5, 1.5, c), "var")], "bn")

    def linear(self, x: str, k: int, n: int, prefix: str) -> str:
        w = self.init(self.rng.normal(0, 1 / np.sqrt(k), (k, n)), f"{prefix}_w")
        b = self.init(self.rng.normal(0, 0.02, n), f"{prefix}_b")
        return self.node("Add", [self.node("MatMul", [x, w], f"{prefix}_mm"), b], f"{prefix}_out")

    def head(self, x: str, c: int, classes: int) -> None:
        x = self.node("Flatten", [self.node("GlobalAveragePool", [x], "gap")], "flat")
        w = self.init(self.rng.normal(0, 1 / np.sqrt(c), (c, classes)), "fcw")
        b = self.init(self.rng.normal(0, 0.05, classes), "fcb")
        self.nodes.append(helper.make_node("Gemm", [x, w, b], ["y"], name="fc"))

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        model = helper.make_model(helper.make_graph(self.nodes, "g", inputs, outputs, self.inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        onnx.checker.check_model(model, full_check=True)
        return model


def resnet(widths: tuple[int, ...] = (32, 64, 128), blocks: int = 2, hw: int = 64) -> onnx.ModelProto:
    """ResNet-style CNN with identity and projection shortcuts."""
    b = _Builder(0)
    x = b.node("Relu", [b.bn(b.conv("x", 3, widths[0]), widths[0])], "relu")
    c = widths[0]
    for stage, width in enumerate(widths):
        for i in range(blocks):
            stride = 2 if stage and i == 0 else 1
            y = b.node("Relu", [b.bn(b.conv(x, c, width, stride=stride), width)], "relu")
            y = b.bn(b.conv(y, width, width), width)
            short = x if stride == 1 and c == width else b.bn(b.conv(x, c, width, k=1, stride=stride), width)
            x = b.node("Relu", [b.node("Add", [short, y], "add")], "relu")
            c = width
    b.head(x, c, 10)
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, hw, hw])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])


def mobilenet(widths: tuple[int, ...] = (32, 64, 128), expand: int = 4, blocks: int = 2,
              hw: int = 96) -> onnx.ModelProto:
    """MobileNetV2-style CNN with depthwise convolutions and inverted residuals."""
    b = _Builder(1)
    lo, hi = b.init(np.array(0.0), "lo"), b.init(np.array(6.0), "hi")

    def relu6(v: str) -> str:
        return b.node("Clip", [v, lo, hi], "relu6")

    x = relu6(b.bn(b.conv("x", 3, widths[0], stride=2), widths[0]))
    c = widths[0]
    for stage, width in enumerate(widths):
        for i in range(blocks):
            stride = 2 if stage and i == 0 else 1
            e = c * expand
            y = relu6(b.bn(b.conv(x, c, e, k=1), e))
            y = relu6(b.bn(b.conv(y, e, e, k=3, stride=stride, group=e), e))
            y = b.bn(b.conv(y, e, width, k=1), width)
            x = b.node("Add", [x, y], "add") if stride == 1 and c == width else y
            c = width
    x = relu6(b.bn(b.conv(x, c, 4 * c, k=1), 4 * c))
    b.head(x, 4 * c, 10)
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, hw, hw])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])


def bert(hidden: int = 256, heads: int = 8, ff: int = 1024, layers: int = 4, seq: int = 128) -> onnx.ModelProto:
    """BERT-style encoder on an embedded input (TorchScript-export style attention)."""
    b = _Builder(2)
    d = hidden // heads
    split = b.init(np.array([1, seq, heads, d]), "split_shape", np.int64)
    merge = b.init(np.array([1, seq, hidden]), "merge_shape", np.int64)
    scale, sqrt2 = b.init(np.array(1 / np.sqrt(d)), "scale"), b.init(np.array(np.sqrt(2.0)), "sqrt2")
    one, half = b.init(np.array(1.0), "one"), b.init(np.array(0.5), "half")

    def layer_norm(v: str) -> str:
        return b.node("LayerNormalization", [v, b.init(b.rng.uniform(0.8, 1.2, hidden), "ln_g"),
                                             b.init(b.rng.normal(0, 0.02, hidden), "ln_b")], "ln", axis=-1)

    x = "x"
    for layer in range(layers):
        def proj(name: str, perm: list[int], x: str = x, layer: int = layer) -> str:
            heads_view = b.node("Reshape", [b.linear(x, hidden, hidden, f"l{layer}_{name}"), split], f"{name}_h")
            return b.node("Transpose", [heads_view], f"{name}_t", perm=perm)

        q, k, v = proj("q", [0, 2, 1, 3]), proj("k", [0, 2, 3, 1]), proj("v", [0, 2, 1, 3])
        probs = b.node("Softmax", [b.node("Mul", [b.node("MatMul", [q, k], "qk"), scale], "sc")], "p", axis=-1)
        ctx = b.node("Transpose", [b.node("MatMul", [probs, v], "ctx")], "ctxt", perm=[0, 2, 1, 3])
        attn = b.linear(b.node("Reshape", [ctx, merge], "merged"), hidden, hidden, f"l{layer}_o")
        x = layer_norm(b.node("Add", [x, attn], "res"))
        h = b.linear(x, hidden, ff, f"l{layer}_ff1")
        erf = b.node("Erf", [b.node("Div", [h, sqrt2], "gd")], "erf")
        h = b.node("Mul", [b.node("Mul", [h, b.node("Add", [erf, one], "ga")], "gm"), half], "gelu")
        x = layer_norm(b.node("Add", [x, b.linear(h, ff, hidden, f"l{layer}_ff2")], "res"))
    b.nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hidden])])


#: name -> (builder, prune options, MAC target (x fewer) or None, latency target (x faster))
CASES: dict[str, tuple[Callable[[], onnx.ModelProto], dict[str, Any], float | None, float]] = {
    "resnet": (resnet, {"ratio": 0.5}, 2.0, 1.8),
    "mobilenet": (mobilenet, {"ratio": 0.5}, 2.0, 1.8),
    "bert": (bert, {"ratio": 0.25, "heads": 0.25}, None, 1.3),
}


def main(argv: list[str] | None = None) -> int:
    """Run the cases; print a table; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model (interleaved)")
    parser.add_argument("--json", dest="json_path", help="write the results as JSON")
    args = parser.parse_args(argv)
    rows, results, missed = [], [], []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-prune-") as folder:
        for name in args.models:
            build, options, mac_target, latency_target = CASES[name]
            original = build()
            pruned = graphopt.prune(original, **options).model
            onnx.checker.check_model(pruned, full_check=True)
            paths = [os.path.join(folder, f"{name}.onnx"), os.path.join(folder, f"{name}.pruned.onnx")]
            onnx.save(original, paths[0])
            onnx.save(pruned, paths[1])
            macs = [model_macs(original), model_macs(pruned)]
            before, after = bench_models(paths, threads=1, level="all", runs=args.runs,
                                         warmup=max(5, args.runs // 10), memory=False)
            # Runs alternate between the two models: the median of the per-round ratios cancels
            # the slow periods a shared machine goes through better than a ratio of medians.
            rounds = np.asarray(before.latencies) / np.asarray(after.latencies)
            mac_x, speed_x = macs[0] / macs[1], float(np.median(rounds))
            ok_macs = mac_target is None or mac_x >= mac_target
            ok_speed = speed_x >= latency_target
            if not (ok_macs and ok_speed):
                missed.append(name)
            option_text = ", ".join(f"{k}={v}" for k, v in options.items())
            rows.append([name, option_text, f"{macs[0] / 1e6:.1f}M", f"{macs[1] / 1e6:.1f}M",
                         f"{mac_x:.2f}x" + ("" if mac_target is None else f" (>= {mac_target}x)"),
                         f"{before.p50 * 1e3:.2f}", f"{after.p50 * 1e3:.2f}",
                         f"{speed_x:.2f}x (>= {latency_target}x)", "ok" if ok_macs and ok_speed else "MISSED"])
            results.append({"model": name, "options": options, "macs_before": macs[0], "macs_after": macs[1],
                            "mac_reduction": mac_x, "p50_ms_before": before.p50 * 1e3,
                            "p50_ms_after": after.p50 * 1e3, "p50_ratio": before.p50 / after.p50,
                            "speedup": speed_x,
                            "targets": {"mac_reduction": mac_target, "speedup": latency_target},
                            "ok": ok_macs and ok_speed})
    print_table("graphopt prune: onnxruntime CPU, ORT_ENABLE_ALL, 1 thread, interleaved runs",
                ["model", "pruning", "MACs before", "MACs after", "MACs", "p50 ms before", "p50 ms after",
                 "speedup (median per round)", "target"], rows, notes=["every pruned model passes onnx.checker (full_check)"])
    write_json(args.json_path, {"bench": "prune", "runs": args.runs, "machine": machine_info(),
                                "results": results})
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
