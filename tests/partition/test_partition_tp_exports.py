"""Tensor parallelism on transformer blocks written the way torch exports write them.

The attention reshapes of real exports take their targets from run-time shape computations:
TorchScript builds ``Concat(Unsqueeze(Gather(Shape(x), 0)), ..., [H], [D])`` and reads
``Shape`` of tensors inside the block; dynamo shares one ``Concat(Shape(x)[0:1],
Shape(x)[1:2], [-1], [D])`` between layers and transposes K through ``[B·H, S, D]``; GPT-2's
Conv1D layers flatten to 2-D around a ``Gemm`` and cut a fused QKV projection with ``Split``.
Each model here is split into shards, checked for H/N heads per shard and a Sum combine, and
run through :class:`graphopt.runtime.PartitionedSession` against the unsplit model in
onnxruntime (graph optimizations off).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir
from graphopt.passes.partition import split_tensor_parallel
from graphopt.runtime import PartitionedSession, run_model

HIDDEN, HEADS, SEQ, BATCH = 16, 4, 5, 2
HEAD = HIDDEN // HEADS
#: Partial sums add in another order than one MatMul: equal within float32 rounding.
RTOL, ATOL = 1e-4, 1e-5


class _Builder:
    """Nodes and initializers of a model under construction, with fresh names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, array: np.ndarray, node: bool = False) -> str:
        """A constant as an initializer, or as a ``Constant`` node (TorchScript style)."""
        name = self.name("c")
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def ints(self, values: list[int], node: bool = False) -> str:
        return self.const(np.array(values, np.int64), node)

    def weight(self, *shape: int) -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))

    def model(self, inputs: list[onnx.ValueInfoProto], output: str, opset: int) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [output], ["y"]))
        graph = helper.make_graph(self.nodes, "blocks", inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                                  self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)

    def gelu_erf(self, x: str) -> str:
        erf = self.op("Erf", [self.op("Div", [x, self.const(np.array(np.sqrt(2.0), np.float32), True)])])
        one = self.op("Add", [erf, self.const(np.array(1.0, np.float32), True)])
        return self.op("Mul", [self.op("Mul", [x, one]), self.const(np.array(0.5, np.float32), True)])


def _inputs(mask: bool = True) -> list[onnx.ValueInfoProto]:
    out = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    if mask:
        out.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, "seq"]))
    return out


def torchscript_bert(layers: int = 2) -> onnx.ModelProto:
    """BERT layers as TorchScript exports them: shapes from Shape -> Gather -> Unsqueeze -> Concat.

    Q/K/V reshape to ``Concat(B, S, [H], [D])`` (the head count a constant piece), the context
    reshapes back through ``Concat(Shape(ctx)[0], [-1], Shape(q)[2], Shape(v)[3])`` (shapes of
    the block's own tensors) and merges heads with ``Concat(B, S, [H·D])``.
    """
    b = _Builder(seed=1)
    x = "x"
    for _ in range(layers):
        dims = [b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [x]), b.const(np.array(i), True)], axis=0),
                                   b.ints([0], True)]) for i in (0, 1)]
        heads = []
        for _name in "qkv":
            proj = b.op("Add", [b.weight(HIDDEN), b.op("MatMul", [x, b.weight(HIDDEN, HIDDEN)])])
            shape = b.op("Concat", dims + [b.ints([HEADS], True), b.ints([HEAD], True)], axis=0)
            heads.append(b.op("Transpose", [b.op("Reshape", [proj, shape])], perm=[0, 2, 1, 3]))
        q, k, v = heads
        kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = b.op("Add", [b.op("Mul", [b.op("MatMul", [q, kt]),
                                            b.const(np.array(1 / np.sqrt(HEAD), np.float32), True)]), "mask"])
        probs = b.op("Softmax", [scores], axis=-1)
        probs = b.op("Where", [b.op("IsNaN", [probs]), b.const(np.array([0.0], np.float32), True), probs])
        ctx = b.op("MatMul", [probs, v])
        back = b.op("Concat", [
            b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [ctx]), b.const(np.array(0), True)], axis=0), b.ints([0], True)]),
            b.ints([-1], True),
            b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [q]), b.const(np.array(2), True)], axis=0), b.ints([0], True)]),
            b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [v]), b.const(np.array(3), True)], axis=0), b.ints([0], True)]),
        ], axis=0)
        ctx = b.op("Transpose", [b.op("Reshape", [ctx, back])], perm=[0, 2, 1, 3])
        merged = b.op("Reshape", [ctx, b.op("Concat", dims + [b.ints([HIDDEN], True)], axis=0)])
        out = b.op("Add", [b.op("MatMul", [merged, b.weight(HIDDEN, HIDDEN)]), b.weight(HIDDEN)])
        x = b.op("LayerNormalization", [b.op("Add", [out, x]), b.const(np.ones(HIDDEN, np.float32)),
                                        b.const(np.zeros(HIDDEN, np.float32))], axis=-1)
        hidden = b.gelu_erf(b.op("Add", [b.weight(4 * HIDDEN), b.op("MatMul", [x, b.weight(HIDDEN, 4 * HIDDEN)])]))
        out = b.op("Add", [b.weight(HIDDEN), b.op("MatMul", [hidden, b.weight(4 * HIDDEN, HIDDEN)])])
        x = b.op("Add", [out, x])
    return b.model(_inputs(), x, opset=17)


def dynamo_bert(layers: int = 2) -> onnx.ModelProto:
    """BERT layers as dynamo exports them: one shared ``Concat(Shape[0:1], Shape[1:2], [-1], [D])``.

    K is transposed through ``[B·H, S, D]`` (``Reshape`` to ``[-1, S, D]``, ``Transpose``,
    ``Reshape`` back with ``Shape(k)[:-2]``), the merge reshape has ``allowzero=1``.
    """
    b = _Builder(seed=2)
    batch = b.op("Shape", ["x"], start=0, end=1)
    seq = b.op("Shape", ["x"], start=1, end=2)
    minus_one = b.ints([-1])
    split_shape = b.op("Concat", [batch, seq, minus_one, b.ints([HEAD])], axis=0)
    merge_shape = b.op("Concat", [batch, seq, minus_one], axis=0)
    x = "x"
    for _ in range(layers):
        heads = []
        for _name in "qkv":
            proj = b.op("Add", [b.op("MatMul", [x, b.weight(HIDDEN, HIDDEN)]), b.weight(HIDDEN)])
            heads.append(b.op("Transpose", [b.op("Reshape", [proj, split_shape], allowzero=1)], perm=[0, 2, 1, 3]))
        q, k, v = heads
        kshape = b.op("Shape", [k], start=0)
        last = b.op("Slice", [kshape, minus_one, b.ints([2**63 - 1])])
        second = b.op("Slice", [kshape, b.ints([-2]), minus_one])
        lead = b.op("Slice", [kshape, b.ints([-(2**63)]), b.ints([-2])])
        flat = b.op("Reshape", [k, b.op("Concat", [minus_one, second, last], axis=0)])
        kt = b.op("Reshape", [b.op("Transpose", [flat], perm=[0, 2, 1]), b.op("Concat", [lead, last, second], axis=0)])
        scale = b.const(np.array(1 / np.sqrt(np.sqrt(HEAD)), np.float32))
        scores = b.op("Add", [b.op("MatMul", [b.op("Mul", [q, scale]), b.op("Mul", [kt, scale])]), "mask"])
        ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
        merged = b.op("Reshape", [b.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape], allowzero=1)
        out = b.op("Add", [b.op("MatMul", [merged, b.weight(HIDDEN, HIDDEN)]), b.weight(HIDDEN)])
        x = b.op("LayerNormalization", [b.op("Add", [out, x]), b.const(np.ones(HIDDEN, np.float32)),
                                        b.const(np.zeros(HIDDEN, np.float32))], axis=-1)
        hidden = b.gelu_erf(b.op("Add", [b.op("MatMul", [x, b.weight(HIDDEN, 4 * HIDDEN)]), b.weight(4 * HIDDEN)]))
        x = b.op("Add", [b.op("Add", [b.op("MatMul", [hidden, b.weight(4 * HIDDEN, HIDDEN)]), b.weight(HIDDEN)]), x])
    return b.model(_inputs(), x, opset=18)


def gpt2_conv1d(layers: int = 2, split_input: bool = True, width_from_block: bool = False) -> onnx.ModelProto:
    """GPT-2 layers as TorchScript exports Conv1D: Reshape to 2-D, Gemm, Reshape back.

    The fused QKV projection (``[HIDDEN, 3·HIDDEN]``) is cut by ``Split`` (sizes as an input,
    or ``num_outputs`` in opset 18); heads come from ``[0, 0, H, D]``, the merge from
    ``[0, 0, H·D]`` and the flattening from a ``[-1, HIDDEN]`` constant that the next entry
    reshape shares; the output projection reshapes back with ``Shape`` of a tensor of the block
    (with ``width_from_block``, its width too: a value each shard computes differently, read
    after the Sum).
    """
    b = _Builder(seed=3)
    flat_shape = b.ints([-1, HIDDEN])
    buffer = b.const(np.where(np.tril(np.ones((32, 32), bool)), 0.0, -1e4).astype(np.float32)[None, None])
    seq = b.op("Shape", ["x"], start=1, end=2)
    x = "x"

    def back_shape(of: str, width: int, from_block: bool = False) -> str:
        dims = [b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [of]), b.const(np.array(i), True)], axis=0),
                                   b.ints([0], True)]) for i in ((0, 1, 2) if from_block else (0, 1))]
        return b.op("Concat", dims + ([] if from_block else [b.ints([width], True)]), axis=0)

    for _ in range(layers):
        normed = b.op("LayerNormalization", [x, b.const(np.ones(HIDDEN, np.float32)),
                                             b.const(np.zeros(HIDDEN, np.float32))], axis=-1)
        qkv = b.op("Gemm", [b.op("Reshape", [normed, flat_shape]), b.weight(HIDDEN, 3 * HIDDEN),
                            b.weight(3 * HIDDEN)])
        qkv = b.op("Reshape", [qkv, back_shape(normed, 3 * HIDDEN)])
        if split_input:
            parts = b.op("Split", [qkv, b.ints([HIDDEN] * 3)], n_out=3, axis=2)
        else:
            parts = b.op("Split", [qkv], n_out=3, axis=2, num_outputs=3)
        q, k, v = (b.op("Transpose", [b.op("Reshape", [p, b.ints([0, 0, HEADS, HEAD])])], perm=[0, 2, 1, 3])
                   for p in parts)
        scores = b.op("Div", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                              b.const(np.array(np.sqrt(HEAD), np.float32))])
        # the causal mask: a slice of a [1, 1, 32, 32] buffer, as GPT-2's ``bias`` buffer is read
        causal = b.op("Slice", [buffer, b.ints([0, 0]), b.op("Concat", [seq, seq], axis=0), b.ints([2, 3])])
        probs = b.op("Softmax", [b.op("Add", [scores, causal])], axis=-1)
        ctx = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        merged = b.op("Reshape", [ctx, b.ints([0, 0, HIDDEN])])
        out = b.op("Gemm", [b.op("Reshape", [merged, flat_shape]), b.weight(HIDDEN, HIDDEN), b.weight(HIDDEN)])
        x = b.op("Add", [x, b.op("Reshape", [out, back_shape(merged, HIDDEN, width_from_block)])])
        normed = b.op("LayerNormalization", [x, b.const(np.ones(HIDDEN, np.float32)),
                                             b.const(np.zeros(HIDDEN, np.float32))], axis=-1)
        fc = b.op("Gemm", [b.op("Reshape", [normed, flat_shape]), b.weight(HIDDEN, 4 * HIDDEN), b.weight(4 * HIDDEN)])
        fc = b.op("Reshape", [fc, back_shape(normed, 4 * HIDDEN)])
        cube = b.op("Mul", [b.op("Pow", [fc, b.const(np.array(3.0, np.float32))]),
                            b.const(np.array(0.044715, np.float32))])
        inner = b.op("Mul", [b.op("Add", [fc, cube]), b.const(np.array(np.sqrt(2 / np.pi), np.float32))])
        act = b.op("Mul", [b.op("Mul", [fc, b.const(np.array(0.5, np.float32))]),
                           b.op("Add", [b.op("Tanh", [inner]), b.const(np.array(1.0, np.float32))])])
        proj = b.op("Gemm", [b.op("Reshape", [act, b.ints([-1, 4 * HIDDEN])]), b.weight(4 * HIDDEN, HIDDEN),
                             b.weight(HIDDEN)])
        x = b.op("Add", [x, b.op("Reshape", [proj, back_shape(act, HIDDEN)])])
    return b.model(_inputs(mask=False), x, opset=17 if split_input else 18)


def _feeds(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)}
    if any(i.name == "mask" for i in proto.graph.input):
        mask = np.zeros((BATCH, 1, 1, SEQ), np.float32)
        mask[0, :, :, -2:] = -10000.0
        feeds["mask"] = mask
    return feeds


def _head_counts(model: ir.Model, shard: int) -> list[int]:
    """Heads per attention of one shard: axis 1 of its 4-D score MatMuls (from a run of the model)."""
    proto = ir.to_proto(model)
    weights = {t.name for t in proto.graph.initializer}
    scores = [n.output[0] for n in proto.graph.node
              if n.op_type == "MatMul" and f".shard{shard}/" in n.name and not any(i in weights for i in n.input)]
    del proto.graph.output[:]
    proto.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in scores)
    outputs = run_model(proto, _feeds(proto))
    return [outputs[name].shape[1] for name in scores if outputs[name].ndim == 4]


CASES = {
    "torchscript-bert": torchscript_bert,
    "dynamo-bert": dynamo_bert,
    "gpt2-conv1d-split-sizes": lambda: gpt2_conv1d(split_input=True),
    "gpt2-conv1d-num-outputs": lambda: gpt2_conv1d(split_input=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_and_mlp_split_with_runtime_shapes(case: str) -> None:
    proto = CASES[case]()
    onnx.checker.check_model(proto, full_check=True)
    model = ir.load(proto)
    assert split_tensor_parallel(model, 2) == 4  # 2 layers x (attention, MLP)
    ir.verify(model)
    names = [n.name for n in model.graph]
    assert sum(1 for n in names if n.startswith("tp0.combine/Sum")) == 1
    assert all(n.op_type == "Sum" and len(n.inputs) == 2 for n in model.graph if n.name.endswith("combine/Sum"))
    # every shard runs H/N heads: 2 score and 2 context MatMuls per layer, each over 2 heads
    assert _head_counts(model, 0) == [HEADS // 2] * 4
    assert _head_counts(model, 1) == [HEADS // 2] * 4
    feeds = _feeds(proto)
    expected = run_model(proto, feeds)["y"]
    np.testing.assert_allclose(run_model(ir.to_proto(model), feeds)["y"], expected, rtol=RTOL, atol=ATOL)


def test_head_count_constants_are_rewritten_per_shard() -> None:
    """The ``[H]`` piece of a run-time Concat and ``[0, 0, H, D]`` constants get H/N in each shard."""
    model = ir.load(torchscript_bert(layers=1))
    split_tensor_parallel(model, 2)
    concats = [n for n in model.graph if n.op_type == "Concat" and ".shard" in n.name]
    pieces = sorted(tuple(v.const_value.numpy().tolist()) for n in concats for v in n.inputs
                    if v.const_value is not None)
    assert pieces.count((HEADS // 2,)) == 6  # q, k, v reshapes in 2 shards
    assert pieces.count((HIDDEN // 2,)) == 2  # the merge reshape's H*D in 2 shards
    gpt = ir.load(gpt2_conv1d(layers=1))
    split_tensor_parallel(gpt, 2)
    constants = [tuple(v.const_value.numpy().tolist()) for v in gpt.graph.initializers.values()
                 if ".shard" in v.name and v.const_value.numpy().dtype == np.int64]
    assert constants.count((0, 0, HEADS // 2, HEAD)) == 6  # q, k, v in 2 shards
    assert constants.count((3 * HIDDEN // 2,)) == 2  # the fused QKV's width in its Concat piece
    assert constants.count((0, 0, HIDDEN // 2)) == 2
    assert constants.count((-1, HIDDEN // 2)) == 2
    assert constants.count((HIDDEN // 2,) * 3) == 2  # Split sizes
    # the fused QKV weight keeps, per shard, its heads' Q, K and V columns
    whole = next(t for t in ir.load(gpt2_conv1d(layers=1)).graph.initializers.values()
                 if t.const_value.shape == (HIDDEN, 3 * HIDDEN)).const_value.numpy()
    shard1 = [t for t in gpt.graph.initializers.values() if t.const_value.shape == (HIDDEN, 3 * HIDDEN // 2)]
    half = HIDDEN // 2
    np.testing.assert_array_equal(shard1[1].const_value.numpy(),
                                  np.concatenate([whole[:, p * HIDDEN + half:(p + 1) * HIDDEN] for p in range(3)], axis=1))


@pytest.mark.parametrize("case,shards", [("torchscript-bert", 2), ("dynamo-bert", 4), ("gpt2-conv1d-num-outputs", 2)])
def test_partitioned_run_equals_unsplit(tmp_path: Path, case: str, shards: int) -> None:
    proto = CASES[case]()
    result = graphopt.partition(proto, tmp_path / "tp", tensor_parallel=shards)
    kinds = [p.kind for p in result.manifest.partitions]
    assert kinds.count("shard") == 4 * shards and kinds.count("combine") == 4
    by_id = {p.id: p for p in result.manifest.partitions}
    for part in result.manifest.partitions:  # shards of a block never wait for one another
        if part.kind == "shard":
            assert all(by_id[d].kind != "shard" for d in part.depends_on)
    feeds = _feeds(proto)
    with PartitionedSession(tmp_path / "tp", backend="local") as session:
        got = session.run(feeds)["y"]
    np.testing.assert_allclose(got, run_model(proto, feeds)["y"], rtol=RTOL, atol=ATOL)


def _head_count_from_outside() -> onnx.ModelProto:
    """A head count read from the hidden size at run time (``Shape(x)[2] / 4``): no constant to fix."""
    proto = torchscript_bert(layers=1)
    graph = proto.graph
    for node in graph.node:
        if node.op_type == "Concat" and len(node.input) == 4 and node.input[1].startswith("unsqueeze"):
            shape = helper.make_node("Shape", ["x"], ["x_shape"])
            gather = helper.make_node("Gather", ["x_shape", "two"], ["hidden"], axis=0)
            div = helper.make_node("Div", ["hidden", "head_size"], ["heads"])
            graph.node.insert(0, div)
            graph.node.insert(0, gather)
            graph.node.insert(0, shape)
            graph.initializer.extend([numpy_helper.from_array(np.array([2], np.int64), "two"),
                                      numpy_helper.from_array(np.array([HEAD], np.int64), "head_size")])
            node.input[2] = "heads"
            break
    return proto


@pytest.mark.parametrize("build", [
    # the head count arrives from outside the block: no shard can fix its Reshape shapes
    _head_count_from_outside,
    # ``Shape(merged)[2]`` read after the Sum is H·D in the whole model but H·D/N in a shard
    lambda: gpt2_conv1d(layers=1, width_from_block=True),
], ids=["unfixable-shape", "shape-differs-per-shard"])
def test_attention_whose_shapes_cannot_be_sharded_is_left_whole(build: Callable[[], onnx.ModelProto]) -> None:
    proto = build()
    onnx.checker.check_model(proto)
    model = ir.load(proto)
    assert split_tensor_parallel(model, 2) == 1  # the MLP only
    assert not any(n.name.startswith("tp") and n.op_type == "Softmax" for n in model.graph)
    feeds = _feeds(proto)
    np.testing.assert_allclose(run_model(ir.to_proto(model), feeds)["y"], run_model(proto, feeds)["y"],
                               rtol=RTOL, atol=ATOL)
