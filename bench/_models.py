"""Model generators for the benchmarks: a BERT-base-sized encoder and synthetic large graphs.

Every generator writes to a path and returns it; the scripts cache results under ``bench/out``.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_bert_base", "build_scale_graph"]

_OPSET = 17


def _weight(rng: np.random.Generator, name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape, dtype=np.float32) * 0.02), name)


def build_bert_base(path: str, *, layers: int = 12, hidden: int = 768, heads: int = 12,
                    intermediate: int = 3072, vocab: int = 30522, max_positions: int = 512,
                    seq_len: int = 128, seed: int = 0) -> str:
    """Write a BERT-base-shaped encoder (random float32 weights, ~440 MB inline) to ``path``.

    Same structure and parameter count as an exported BERT-base: embeddings + LayerNorm, then
    per layer Q/K/V projections, scaled dot-product attention, output projection, residual +
    LayerNorm, a GELU (Erf form) feed-forward block, residual + LayerNorm.
    """
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = [
        _weight(rng, "word_embeddings", vocab, hidden),
        _weight(rng, "position_embeddings", max_positions, hidden),
        _weight(rng, "token_type_embeddings", 2, hidden),
        numpy_helper.from_array(np.arange(seq_len, dtype=np.int64)[None, :], "position_ids"),
        numpy_helper.from_array(np.array([0, 0, heads, head_dim], dtype=np.int64), "split_heads_shape"),
        numpy_helper.from_array(np.array([0, 0, hidden], dtype=np.int64), "merge_heads_shape"),
        numpy_helper.from_array(np.array(1.0 / np.sqrt(head_dim), dtype=np.float32), "attn_scale"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(np.sqrt(2.0), dtype=np.float32), "sqrt2"),
    ]

    def layer_norm(x: str, prefix: str) -> str:
        inits.append(numpy_helper.from_array(np.ones(hidden, np.float32), f"{prefix}.gamma"))
        inits.append(numpy_helper.from_array(np.zeros(hidden, np.float32), f"{prefix}.beta"))
        nodes.append(helper.make_node("LayerNormalization", [x, f"{prefix}.gamma", f"{prefix}.beta"],
                                      [f"{prefix}.out"], axis=-1, epsilon=1e-12, name=prefix))
        return f"{prefix}.out"

    def linear(x: str, prefix: str, n_in: int, n_out: int) -> str:
        inits.append(_weight(rng, f"{prefix}.weight", n_in, n_out))
        inits.append(numpy_helper.from_array(np.zeros(n_out, np.float32), f"{prefix}.bias"))
        nodes.append(helper.make_node("MatMul", [x, f"{prefix}.weight"], [f"{prefix}.mm"], name=f"{prefix}.matmul"))
        nodes.append(helper.make_node("Add", [f"{prefix}.mm", f"{prefix}.bias"], [f"{prefix}.out"], name=f"{prefix}.add"))
        return f"{prefix}.out"

    nodes += [
        helper.make_node("Gather", ["word_embeddings", "input_ids"], ["emb.word"], name="emb.word"),
        helper.make_node("Gather", ["position_embeddings", "position_ids"], ["emb.pos"], name="emb.pos"),
        helper.make_node("Gather", ["token_type_embeddings", "token_type_ids"], ["emb.type"], name="emb.type"),
        helper.make_node("Add", ["emb.word", "emb.pos"], ["emb.sum0"], name="emb.add0"),
        helper.make_node("Add", ["emb.sum0", "emb.type"], ["emb.sum"], name="emb.add1"),
    ]
    h = layer_norm("emb.sum", "emb.ln")
    for i in range(layers):
        p = f"layer{i}"

        def heads_of(x: str, perm: list[int], name: str) -> str:
            nodes.append(helper.make_node("Reshape", [x, "split_heads_shape"], [f"{name}.r"], name=f"{name}.reshape"))
            nodes.append(helper.make_node("Transpose", [f"{name}.r"], [f"{name}.t"], perm=perm, name=f"{name}.transpose"))
            return f"{name}.t"

        q = heads_of(linear(h, f"{p}.q", hidden, hidden), [0, 2, 1, 3], f"{p}.qh")
        k = heads_of(linear(h, f"{p}.k", hidden, hidden), [0, 2, 3, 1], f"{p}.kh")
        v = heads_of(linear(h, f"{p}.v", hidden, hidden), [0, 2, 1, 3], f"{p}.vh")
        nodes += [
            helper.make_node("MatMul", [q, k], [f"{p}.scores"], name=f"{p}.qk"),
            helper.make_node("Mul", [f"{p}.scores", "attn_scale"], [f"{p}.scaled"], name=f"{p}.scale"),
            helper.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], axis=-1, name=f"{p}.softmax"),
            helper.make_node("MatMul", [f"{p}.probs", v], [f"{p}.ctx"], name=f"{p}.pv"),
            helper.make_node("Transpose", [f"{p}.ctx"], [f"{p}.ctx_t"], perm=[0, 2, 1, 3], name=f"{p}.ctx_t"),
            helper.make_node("Reshape", [f"{p}.ctx_t", "merge_heads_shape"], [f"{p}.ctx_m"], name=f"{p}.merge"),
        ]
        attn = linear(f"{p}.ctx_m", f"{p}.o", hidden, hidden)
        nodes.append(helper.make_node("Add", [attn, h], [f"{p}.res1"], name=f"{p}.res1"))
        h1 = layer_norm(f"{p}.res1", f"{p}.ln1")
        ff = linear(h1, f"{p}.ff1", hidden, intermediate)
        nodes += [  # GELU, Erf form: x * 0.5 * (1 + erf(x / sqrt(2)))
            helper.make_node("Div", [ff, "sqrt2"], [f"{p}.g.div"], name=f"{p}.g.div"),
            helper.make_node("Erf", [f"{p}.g.div"], [f"{p}.g.erf"], name=f"{p}.g.erf"),
            helper.make_node("Add", [f"{p}.g.erf", "one"], [f"{p}.g.add"], name=f"{p}.g.add"),
            helper.make_node("Mul", [ff, f"{p}.g.add"], [f"{p}.g.mul"], name=f"{p}.g.mul"),
            helper.make_node("Mul", [f"{p}.g.mul", "half"], [f"{p}.gelu"], name=f"{p}.g.half"),
        ]
        ff2 = linear(f"{p}.gelu", f"{p}.ff2", intermediate, hidden)
        nodes.append(helper.make_node("Add", [ff2, h1], [f"{p}.res2"], name=f"{p}.res2"))
        h = layer_norm(f"{p}.res2", f"{p}.ln2")
    nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="output"))
    graph = helper.make_graph(
        nodes, "bert_base",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq_len]),
         helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, [1, seq_len])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [1, seq_len, hidden])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)],
                              producer_name="graphopt-bench")
    model.ir_version = 8
    tmp = path + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, path)
    return path


def build_scale_graph(path: str, n_nodes: int, *, width: int = 8, dead_every: int = 10,
                      seed: int = 0) -> str:
    """Write a DAG of about ``n_nodes`` cheap elementwise nodes, some in dead branches.

    ``width`` parallel chains advance together; every step mixes two chains (Add) so the graph
    is a DAG, not a set of independent chains. Every ``dead_every``-th step grows a short
    branch (Neg -> Abs) whose result nothing reads. Shapes are tiny ([4]): the graph, not the
    arithmetic, is what is measured.
    """
    rng = np.random.default_rng(seed)
    unary = ("Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Exp", "Identity")
    nodes: list[onnx.NodeProto] = []
    heads = ["x"] * width
    k = 0
    step = 0
    while len(nodes) < n_nodes:
        for lane in range(width):
            if len(nodes) >= n_nodes:
                break
            op = unary[int(rng.integers(len(unary)))]
            out = f"v{k}"
            k += 1
            if lane % 2 == 1:
                nodes.append(helper.make_node("Add", [heads[lane], heads[lane - 1]], [out], name=f"n{k}"))
            else:
                nodes.append(helper.make_node(op, [heads[lane]], [out], name=f"n{k}"))
            heads[lane] = out
        step += 1
        if step % dead_every == 0 and len(nodes) + 2 <= n_nodes:
            src = heads[step % width]
            nodes.append(helper.make_node("Neg", [src], [f"dead{k}a"], name=f"d{k}a"))
            nodes.append(helper.make_node("Abs", [f"dead{k}a"], [f"dead{k}b"], name=f"d{k}b"))
    # One output that depends on every lane, so only the dead branches are dead.
    acc = heads[0]
    for lane in range(1, width):
        nodes.append(helper.make_node("Add", [acc, heads[lane]], [f"out{lane}"], name=f"o{lane}"))
        acc = f"out{lane}"
    nodes.append(helper.make_node("Identity", [acc], ["y"], name="out"))
    graph = helper.make_graph(nodes, f"scale_{n_nodes}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    onnx.save(model, path)
    return path
