"""Models fused before quantization (onnxruntime contrib ops such as MultiHeadAttention, as the
onnxruntime transformer optimizer or ``graphopt -O3`` write them) quantize as fully as unfused ones.

onnx's type inference stops at contrib ops, so every value after the first fused attention had no
element type and placement left those MatMuls float ("not float32"): 3 of 12 projections
quantized. Conv/MatMul/Gemm share one type for data, weight and output, so a float32 weight now
proves the activation's type.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from graphopt.passes.quant.placement import PlacementConfig, plan_placement
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import run_model


class _Graph:
    """A small onnx.helper graph builder (unique names, constants as initializers)."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        name = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, *shape: int) -> str:
        return self.const(self.rng.standard_normal(shape) / np.sqrt(shape[0]))

    def dim(self, x: str, axis: int) -> str:
        gathered = self.op("Gather", self.op("Shape", x), self.const(axis, np.int64), axis=0)
        return self.op("Unsqueeze", gathered, self.const([0], np.int64))

    def split_heads(self, x: str, heads: int, size: int, perm: list[int]) -> str:
        shape = self.op("Concat", self.dim(x, 0), self.dim(x, 1), self.const([heads], np.int64),
                        self.const([size], np.int64), axis=0)
        return self.op("Transpose", self.op("Reshape", x, shape), perm=perm)

    def merge_heads(self, context: str, hidden: int) -> str:
        t = self.op("Transpose", context, perm=[0, 2, 1, 3])
        shape = self.op("Concat", self.dim(t, 0), self.dim(t, 1), self.const([hidden], np.int64), axis=0)
        return self.op("Reshape", t, shape)


def bert_encoder(layers: int = 2, hidden: int = 32, heads: int = 4, ffn: int = 64) -> onnx.ModelProto:
    """HF BERT (eager attention) as the TorchScript exporter writes it, with LayerNormalization."""
    g = _Graph()
    size = hidden // heads

    def layer_norm(x: str) -> str:
        return g.op("LayerNormalization", x, g.const(1 + g.rng.standard_normal(hidden) * 0.1),
                    g.const(g.rng.standard_normal(hidden) * 0.1), axis=-1)

    h = layer_norm(g.op("Gather", g.const(g.rng.standard_normal((64, hidden))), "input_ids"))
    mask = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2], np.int64)), to=TensorProto.FLOAT)
    mask = g.op("Mul", g.op("Sub", g.const(1.0), mask), g.const(-10000.0))
    for _ in range(layers):
        q, k, v = (g.op("Add", g.op("MatMul", h, g.weight(hidden, hidden)), g.const(g.rng.standard_normal(hidden) * 0.1))
                   for _ in range(3))
        scores = g.op("MatMul", g.split_heads(q, heads, size, [0, 2, 1, 3]), g.split_heads(k, heads, size, [0, 2, 3, 1]))
        probs = g.op("Softmax", g.op("Add", g.op("Div", scores, g.const(np.sqrt(size))), mask), axis=-1)
        context = g.op("MatMul", probs, g.split_heads(v, heads, size, [0, 2, 1, 3]))
        out = g.op("MatMul", g.merge_heads(context, hidden), g.weight(hidden, hidden))
        h = layer_norm(g.op("Add", g.op("Add", out, g.const(np.zeros(hidden))), h))
        up = g.op("Add", g.op("MatMul", h, g.weight(hidden, ffn)), g.const(g.rng.standard_normal(ffn) * 0.1))
        erf = g.op("Erf", g.op("Div", up, g.const(1.4142135)))
        act = g.op("Mul", g.op("Mul", up, g.op("Add", erf, g.const(1.0))), g.const(0.5))
        h = layer_norm(g.op("Add", g.op("MatMul", act, g.weight(ffn, hidden)), h))
    g.nodes.append(helper.make_node("Identity", [h], ["out"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "S"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(g.nodes, "bert", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", hidden])], g.inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int, seed: int, seq: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        mask = np.ones((1, seq), np.int64)
        mask[0, seq - rng.integers(0, 4):] = 0  # some padding
        feeds.append({"input_ids": rng.integers(0, 64, (1, seq)).astype(np.int64), "attention_mask": mask})
    return feeds


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def prefused_encoder() -> onnx.ModelProto:
    """The encoder with its attention cores already fused into MultiHeadAttention (no value_info)."""
    model = ir.load(bert_encoder())
    PassManager("O2,infer-shapes,contrib-attention,eliminate-dead-code", PassContext(opt_level=3)).run(model)
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]  # as a file written by another tool may come: no intermediate types
    assert [n.op_type for n in proto.graph.node if n.domain == "com.microsoft"] == ["MultiHeadAttention"] * 2
    return proto


def test_projections_after_a_contrib_op_are_quantized() -> None:
    proto = prefused_encoder()
    reference = bert_encoder()
    held = _feeds(3, seed=2)
    out = graphopt.quantize(proto, calibration=_feeds(8, seed=1) + held, held_out=len(held),
                            check_speed=False, check_fusion=True)
    # Q, K, V, output and both FFN projections of both layers: 12 integer kernels (before: 3).
    assert out.report["fusion"]["fused"] == {"MatMulIntegerToFloat": 12}
    assert out.report["fusion"]["unfused"] == 0
    assert not [u for u in out.report["units"] if u["status"] != "quantized"]
    for feed in held:
        expected = run_model(reference, feed)["out"]  # the unfused float model, optimizations off
        actual = run_model(out.model, feed, optimize=True)["out"]
        assert _cosine(expected, actual) >= 0.999  # 8-bit activations and 7-bit weights, 2 layers


def test_unknown_types_without_a_float_weight_stay_float() -> None:
    """The rule needs the weight's type: a MatMul of two untyped activations is not assumed float."""
    model = ir.load(prefused_encoder())
    PassManager("infer-shapes", PassContext()).run(model)
    mha = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert mha and all(n.outputs[0].dtype is None for n in mha)  # what inference leaves
    plan = plan_placement(model, PlacementConfig(activation_matmul=True))
    assert len([u for u in plan.units if u.op_type == "MatMul"]) == 12
    for node in mha:
        reader = node.outputs[0].uses()[0][0]
        reader.replace_input(1, node.outputs[0])  # MatMul(untyped, untyped)
    plan = plan_placement(model, PlacementConfig(activation_matmul=True))
    skipped = {uid: why for uid, _, why in plan.skipped}
    assert [skipped.get(n.outputs[0].uses()[0][0].name) for n in mha] == ["not float32"] * 2
