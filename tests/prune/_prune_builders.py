"""Small models for the pruning tests, built with onnx.helper and seeded numpy weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Builder", "bert", "channel_ops_net", "concat_net", "grouped_net", "mlp", "mobilenet", "qdq_weight_net", "resnet"]


class Builder:
    """Collects nodes and initializers; names are unique and readable."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def init(self, array: Any, prefix: str = "w", dtype: Any = np.float32) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array).astype(dtype), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str | None = None, **attrs: Any) -> str:
        out = self.name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1) -> str:
        w = self.init(self.rng.normal(0, np.sqrt(2 / (cin // group * k * k)), (cout, cin // group, k, k)), "convw")
        b = self.init(self.rng.normal(0, 0.1, cout), "convb")
        return self.node("Conv", [x, w, b], "conv", kernel_shape=[k, k], pads=[k // 2] * 4,
                         strides=[stride, stride], group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        return self.node("BatchNormalization", [x, self.init(r.uniform(0.5, 1.5, c), "gamma"),
                                                self.init(r.normal(0, 0.1, c), "beta"),
                                                self.init(r.normal(0, 0.1, c), "mean"),
                                                self.init(r.uniform(0.5, 1.5, c), "var")], "bn")

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], "relu")

    def linear(self, x: str, k: int, n: int, prefix: str = "fc") -> str:
        w = self.init(self.rng.normal(0, 1 / np.sqrt(k), (k, n)), f"{prefix}_w")
        b = self.init(self.rng.normal(0, 0.02, n), f"{prefix}_b")
        return self.node("Add", [self.node("MatMul", [x, w], f"{prefix}_mm"), b], f"{prefix}_out")

    def gemm(self, x: str, k: int, n: int, out: str = "y") -> str:
        w = self.init(self.rng.normal(0, 1 / np.sqrt(k), (k, n)), "fcw")
        b = self.init(self.rng.normal(0, 0.1, n), "fcb")
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [out], name="fc"))
        return out

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 9
        onnx.checker.check_model(model, full_check=True)
        return model


def _image(channels: int, hw: int, batch: int = 1) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, hw, hw])


def _logits(classes: int, batch: int = 1) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])


def resnet(width: int = 16, blocks: int = 2, hw: int = 16, classes: int = 10, seed: int = 0,
           stages: int = 1) -> onnx.ModelProto:
    """Stem conv, residual basic blocks (conv-bn-relu-conv-bn + identity), downsampling stages
    with a 1x1 projection shortcut, global pool, flatten, Gemm."""
    b = Builder(seed)
    x = b.relu(b.bn(b.conv("x", 3, width), width))
    c = width
    for stage in range(stages):
        if stage:
            short = b.bn(b.conv(x, c, 2 * c, k=1, stride=2), 2 * c)
            y = b.relu(b.bn(b.conv(x, c, 2 * c, stride=2), 2 * c))
            y = b.bn(b.conv(y, 2 * c, 2 * c), 2 * c)
            c *= 2
            x = b.relu(b.node("Add", [short, y], "add"))
        for _ in range(blocks):
            y = b.relu(b.bn(b.conv(x, c, c), c))
            y = b.bn(b.conv(y, c, c), c)
            x = b.relu(b.node("Add", [x, y], "add"))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "gap")], "flat")
    b.gemm(x, c, classes)
    return b.model([_image(3, hw)], [_logits(classes)])


def mobilenet(width: int = 16, expand: int = 4, blocks: int = 2, hw: int = 16, classes: int = 10,
              seed: int = 0, stages: int = 1) -> onnx.ModelProto:
    """Stem conv; inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 project, residual
    when shapes match); 1x1 head conv, global pool, flatten, Gemm."""
    b = Builder(seed)
    lo = b.init(np.array(0.0), "lo")
    hi = b.init(np.array(6.0), "hi")

    def relu6(v: str) -> str:
        return b.node("Clip", [v, lo, hi], "relu6")

    x = relu6(b.bn(b.conv("x", 3, width, stride=2), width))
    c = width
    for stage in range(stages):
        for i in range(blocks):
            out_c = c * 2 if stage and i == 0 else c
            stride = 2 if stage and i == 0 else 1
            e = c * expand
            y = relu6(b.bn(b.conv(x, c, e, k=1), e))
            y = relu6(b.bn(b.conv(y, e, e, k=3, stride=stride, group=e), e))
            y = b.bn(b.conv(y, e, out_c, k=1), out_c)
            x = b.node("Add", [x, y], "add") if out_c == c and stride == 1 else y
            c = out_c
    x = relu6(b.bn(b.conv(x, c, 4 * c, k=1), 4 * c))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "gap")], "flat")
    b.gemm(x, 4 * c, classes)
    return b.model([_image(3, hw)], [_logits(classes)])


def bert(hidden: int = 64, heads: int = 4, ff: int = 128, layers: int = 1, seq: int = 8,
         seed: int = 0, zero_shape: bool = False, dynamic: bool = False,
         fused_qkv: bool = False) -> onnx.ModelProto:
    """A BERT-style encoder on an embedded input ``x [1, S, hidden]``: MatMul+Add Q/K/V,
    Reshape to heads, Transpose, scaled QKᵀ, Softmax, ·V, merge heads, output projection,
    residual + LayerNorm, Erf-GELU MLP, residual + LayerNorm.

    ``zero_shape``: Reshape shapes ``[0, 0, H, D]``; ``dynamic``: input ``[batch, seq, hidden]``
    and shapes built at run time as ``Concat(Shape(x)[0:2], [H, D])`` (TorchScript style);
    ``fused_qkv``: one ``[hidden, 3·hidden]`` projection split into Q, K and V (GPT-2 style)."""
    b = Builder(seed)
    d = hidden // heads
    split = b.init(np.array([0, 0, heads, d] if zero_shape else [1, seq, heads, d]), "split_shape", np.int64)
    merge = b.init(np.array([0, 0, hidden] if zero_shape else [1, seq, hidden]), "merge_shape", np.int64)
    if dynamic:
        lead = b.node("Slice", [b.node("Shape", ["x"], "xs"), b.init(np.array([0]), "s0", np.int64),
                                b.init(np.array([2]), "s2", np.int64)], "lead")
        split = b.node("Concat", [lead, b.init(np.array([heads, d]), "hd", np.int64)], "split_shape", axis=0)
        merge = b.node("Concat", [lead, b.init(np.array([hidden]), "hid", np.int64)], "merge_shape", axis=0)
    scale = b.init(np.array(1 / np.sqrt(d)), "scale")
    sqrt2 = b.init(np.array(np.sqrt(2.0)), "sqrt2")
    one = b.init(np.array(1.0), "one")
    half = b.init(np.array(0.5), "half")
    x = "x"
    for layer in range(layers):
        parts: dict[str, str] = {}
        if fused_qkv:
            qkv = b.linear(x, hidden, 3 * hidden, f"l{layer}_qkv")
            names = [b.name(f"l{layer}_{n}") for n in "qkv"]
            b.nodes.append(helper.make_node("Split", [qkv, b.init(np.array([hidden] * 3), "qkv_sizes", np.int64)],
                                            names, axis=-1, name=f"l{layer}_split"))
            parts = dict(zip("qkv", names))

        def proj(name: str, x: str = x, layer: int = layer, parts: dict[str, str] = parts) -> str:
            flat = parts[name] if parts else b.linear(x, hidden, hidden, f"l{layer}_{name}")
            return b.node("Reshape", [flat, split], f"{name}_heads")

        q = b.node("Transpose", [proj("q")], "qt", perm=[0, 2, 1, 3])
        k = b.node("Transpose", [proj("k")], "kt", perm=[0, 2, 3, 1])
        v = b.node("Transpose", [proj("v")], "vt", perm=[0, 2, 1, 3])
        scores = b.node("Mul", [b.node("MatMul", [q, k], "qk"), scale], "scaled")
        probs = b.node("Softmax", [scores], "probs", axis=-1)
        ctx = b.node("Transpose", [b.node("MatMul", [probs, v], "ctx")], "ctxt", perm=[0, 2, 1, 3])
        ctx = b.node("Reshape", [ctx, merge], "merged")
        attn = b.linear(ctx, hidden, hidden, f"l{layer}_o")
        x = _layer_norm(b, b.node("Add", [x, attn], "res"), hidden)
        h = b.linear(x, hidden, ff, f"l{layer}_ff1")
        erf = b.node("Erf", [b.node("Div", [h, sqrt2], "gdiv")], "erf")
        h = b.node("Mul", [b.node("Mul", [h, b.node("Add", [erf, one], "gadd")], "gmul"), half], "gelu")
        h = b.linear(h, ff, hidden, f"l{layer}_ff2")
        x = _layer_norm(b, b.node("Add", [x, h], "res"), hidden)
    b.nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    dims: list[Any] = ["batch", "seq", hidden] if dynamic else [1, seq, hidden]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
    return b.model(io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])


def _layer_norm(b: Builder, x: str, hidden: int) -> str:
    gamma = b.init(b.rng.uniform(0.8, 1.2, hidden), "ln_g")
    beta = b.init(b.rng.normal(0, 0.02, hidden), "ln_b")
    return b.node("LayerNormalization", [x, gamma, beta], "ln", axis=-1)


def concat_net(seed: int = 0) -> onnx.ModelProto:
    """Two convs concatenated on the channel axis, then a conv reading the concatenation."""
    b = Builder(seed)
    a = b.relu(b.conv("x", 3, 4))
    c = b.relu(b.conv("x", 3, 6))
    cat = b.node("Concat", [a, c], "cat", axis=1)
    y = b.conv(cat, 10, 5)
    b.nodes.append(helper.make_node("ReduceMean", [y], ["y"], name="out", axes=[2, 3], keepdims=0))
    return b.model([_image(3, 8)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])


def grouped_net(seed: int = 0) -> onnx.ModelProto:
    """conv (8 out) -> grouped conv (group 4, 8 -> 12) -> conv."""
    b = Builder(seed)
    a = b.relu(b.conv("x", 3, 8))
    g = b.relu(b.conv(a, 8, 12, group=4))
    y = b.conv(g, 12, 5)
    b.nodes.append(helper.make_node("ReduceMean", [y], ["y"], name="out", axes=[2, 3], keepdims=0))
    return b.model([_image(3, 8)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])


def mlp(weights: list[np.ndarray], biases: list[np.ndarray]) -> onnx.ModelProto:
    """A ReLU MLP ``x [N, K] -> logits`` from given layer weights ``[K, N]`` (MatMul + Add)."""
    b = Builder(0)
    x = "x"
    for i, (w, c) in enumerate(zip(weights, biases)):
        mm = b.node("MatMul", [x, b.init(w, f"w{i}_")], f"mm{i}_")
        x = b.node("Add", [mm, b.init(c, f"b{i}_")], f"z{i}_")
        if i < len(weights) - 1:
            x = b.relu(x)
    b.nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weights[0].shape[0]])]
    return b.model(io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weights[-1].shape[1]])])


def channel_ops_net(seed: int = 0) -> onnx.ModelProto:
    """Conv -> InstanceNormalization -> per-channel Mul -> PRelu -> per-channel QDQ -> Split
    (3, 5) -> Concat (swapped) -> Slice [1:7] -> ConvTranspose -> Relu -> Conv; and a second
    branch Conv -> Flatten (no pooling: 16 elements per channel) -> Gemm."""
    b = Builder(seed)
    r = b.rng
    h = b.conv("x", 3, 8)
    h = b.node("InstanceNormalization", [h, b.init(r.uniform(0.5, 1.5, 8), "in_g"),
                                         b.init(r.normal(0, 0.1, 8), "in_b")], "inorm")
    h = b.node("Mul", [h, b.init(r.uniform(0.5, 1.5, (8, 1, 1)), "scale")], "mul")
    h = b.node("PRelu", [h, b.init(r.uniform(0.1, 0.3, (8, 1, 1)), "slope")], "prelu")
    q_scale = b.init(r.uniform(0.01, 0.05, 8), "q_scale")
    q_zero = b.init(np.zeros(8), "q_zero", np.int8)
    h = b.node("QuantizeLinear", [h, q_scale, q_zero], "q", axis=1)
    h = b.node("DequantizeLinear", [h, q_scale, q_zero], "dq", axis=1)
    first, second = b.name("split_a"), b.name("split_b")
    b.nodes.append(helper.make_node("Split", [h, b.init(np.array([3, 5]), "sizes", np.int64)],
                                    [first, second], axis=1, name="split"))
    h = b.node("Concat", [second, first], "cat", axis=1)
    h = b.node("Slice", [h, b.init(np.array([1]), "starts", np.int64), b.init(np.array([7]), "ends", np.int64),
                         b.init(np.array([1]), "axes", np.int64)], "slice")
    wt = b.init(r.normal(0, 0.3, (6, 4, 2, 2)), "convt_w")
    h = b.node("ConvTranspose", [h, wt, b.init(r.normal(0, 0.1, 4), "convt_b")], "convt",
               kernel_shape=[2, 2], strides=[2, 2])
    y = b.conv(b.relu(h), 4, 2)
    b.nodes.append(helper.make_node("ReduceMean", [y], ["y"], name="out", axes=[2, 3], keepdims=0))
    f = b.node("Flatten", [b.relu(b.conv("x", 3, 4, stride=2))], "flat")
    b.gemm(f, 4 * 16, 5, out="z")
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 5])]
    return b.model([_image(3, 8)], outputs)


def qdq_weight_net(seed: int = 0) -> onnx.ModelProto:
    """Conv whose weight is an int8 tensor dequantized per output channel, then Relu and a
    float Conv."""
    b = Builder(seed)
    w = b.rng.integers(-100, 100, (6, 3, 3, 3))
    scale = b.init(b.rng.uniform(0.005, 0.02, 6), "w_scale")
    wq = b.node("DequantizeLinear", [b.init(w, "w_q", np.int8), scale, b.init(np.zeros(6), "w_zero", np.int8)],
                "w_dq", axis=0)
    h = b.node("Conv", ["x", wq, b.init(b.rng.normal(0, 0.1, 6), "bias")], "conv", kernel_shape=[3, 3], pads=[1] * 4)
    y = b.conv(b.relu(h), 6, 2)
    b.nodes.append(helper.make_node("ReduceMean", [y], ["y"], name="out", axes=[2, 3], keepdims=0))
    return b.model([_image(3, 8)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
