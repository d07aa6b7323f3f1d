"""Tensor parallelism: MLP blocks split by columns then rows, attention by heads, joined by a Sum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.passes.partition import SplitTensorParallel, split_tensor_parallel
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import Manifest, make_session, run_model

HIDDEN, HEADS, SEQ = 16, 4, 5


def run_partitions(folder: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    manifest = Manifest.load(folder)
    env = dict(feeds)
    for part in manifest.partitions:
        session = make_session(str(manifest.partition_path(part)))
        env.update(zip(part.outputs, session.run(part.outputs, {k: env[k] for k in part.inputs})))
    return {t.name: env[t.name] for t in manifest.outputs}


def _w(rng: np.random.Generator, name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def block_model(*, attention: bool = True, mlp: bool = True, layers: int = 2, seed: int = 0) -> onnx.ModelProto:
    """Pre-norm transformer layers over ``x[batch, SEQ, HIDDEN]`` with an additive mask input."""
    rng = np.random.default_rng(seed)
    d = HIDDEN // HEADS
    inits = [numpy_helper.from_array(np.array([-1, SEQ, HEADS, d], np.int64), "heads_shape"),
             numpy_helper.from_array(np.array([-1, SEQ, HIDDEN], np.int64), "hidden_shape"),
             numpy_helper.from_array(np.array(1 / np.sqrt(d), np.float32), "scale"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2")]
    nodes = []
    x = "x"
    for i in range(layers):
        p = f"l{i}_"
        if attention:
            for name in ("q", "k", "v"):
                inits += [_w(rng, p + f"w{name}", HIDDEN, HIDDEN), _w(rng, p + f"b{name}", HIDDEN)]
                nodes += [helper.make_node("MatMul", [x, p + f"w{name}"], [p + f"{name}m"]),
                          helper.make_node("Add", [p + f"{name}m", p + f"b{name}"], [p + f"{name}b"]),
                          helper.make_node("Reshape", [p + f"{name}b", "heads_shape"], [p + f"{name}r"])]
            inits += [_w(rng, p + "wo", HIDDEN, HIDDEN), _w(rng, p + "bo", HIDDEN)]
            nodes += [helper.make_node("Transpose", [p + "qr"], [p + "qt"], perm=[0, 2, 1, 3]),
                      helper.make_node("Transpose", [p + "kr"], [p + "kt"], perm=[0, 2, 3, 1]),
                      helper.make_node("Transpose", [p + "vr"], [p + "vt"], perm=[0, 2, 1, 3]),
                      helper.make_node("MatMul", [p + "qt", p + "kt"], [p + "s"]),
                      helper.make_node("Mul", [p + "s", "scale"], [p + "ss"]),
                      helper.make_node("Add", [p + "ss", "mask"], [p + "sm"]),
                      helper.make_node("Softmax", [p + "sm"], [p + "pr"], axis=-1),
                      helper.make_node("MatMul", [p + "pr", p + "vt"], [p + "ctx"]),
                      helper.make_node("Transpose", [p + "ctx"], [p + "ct"], perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [p + "ct", "hidden_shape"], [p + "cr"]),
                      helper.make_node("MatMul", [p + "cr", p + "wo"], [p + "o"]),
                      helper.make_node("Add", [p + "o", p + "bo"], [p + "ob"]),
                      helper.make_node("Add", [p + "ob", x], [p + "res1"])]
            x = p + "res1"
        if mlp:
            inits += [_w(rng, p + "w1", HIDDEN, 4 * HIDDEN), _w(rng, p + "b1", 4 * HIDDEN),
                      _w(rng, p + "w2", 4 * HIDDEN, HIDDEN), _w(rng, p + "b2", HIDDEN)]
            # GELU spelled out as exports write it: x * 0.5 * (1 + erf(x / sqrt(2)))
            nodes += [helper.make_node("MatMul", [x, p + "w1"], [p + "f"]),
                      helper.make_node("Add", [p + "f", p + "b1"], [p + "fb"]),
                      helper.make_node("Div", [p + "fb", "sqrt2"], [p + "fd"]),
                      helper.make_node("Erf", [p + "fd"], [p + "fe"]),
                      helper.make_node("Add", [p + "fe", "one"], [p + "f1"]),
                      helper.make_node("Mul", [p + "fb", p + "f1"], [p + "fm"]),
                      helper.make_node("Mul", [p + "fm", "half"], [p + "gelu"]),
                      helper.make_node("MatMul", [p + "gelu", p + "w2"], [p + "g"]),
                      helper.make_node("Add", [p + "g", p + "b2"], [p + "gb"]),
                      helper.make_node("Add", [p + "gb", x], [p + "res2"])]
            x = p + "res2"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])]
    if attention:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, SEQ]))
    graph = helper.make_graph(nodes, "blocks", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def feeds_for(model: onnx.ModelProto, batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    feeds = {"x": rng.standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)}
    if any(i.name == "mask" for i in model.graph.input):
        mask = np.zeros((batch, 1, 1, SEQ), np.float32)
        mask[:, :, :, -1] = -10000.0
        feeds["mask"] = mask
    return feeds


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("shards", [2, 4])
def test_mlp_and_attention_split_equals_unsplit(shards: int) -> None:
    proto = block_model()
    model = ir.load(proto)
    assert split_tensor_parallel(model, shards) == 4  # 2 layers x (attention, MLP)
    names = [n.name for n in model.graph]
    # per shard: q, k, v (MatMul, Add, Reshape, Transpose) + scores, scale, mask, softmax, context,
    # transpose, reshape + the partial output projection
    assert sum(1 for n in names if n.startswith("tp0.shard")) == shards * 20
    assert [n for n in names if "combine" in n].count("tp0.combine/Sum") == 1
    shard_w1 = model.graph.initializers["l0_w1.shard0"].const_value
    assert shard_w1.shape == (HIDDEN, 4 * HIDDEN // shards)
    assert model.graph.initializers["l0_w2.shard0"].const_value.shape == (4 * HIDDEN // shards, HIDDEN)
    assert "l0_w1" not in model.graph.initializers  # the unsplit weights are gone
    heads_shape = [v for k, v in model.graph.initializers.items() if k.startswith("Reshape.shape.shard")
                   or "shape.shard" in k]
    assert any(list(v.const_value.numpy()) == [-1, SEQ, HEADS // shards, HIDDEN // HEADS] for v in heads_shape)
    ir.verify(model)
    feeds = feeds_for(proto)
    expected = run_model(proto, feeds)["y"]
    got = run_model(ir.to_proto(model), feeds)["y"]
    # partial sums add in another order: equal within float32 rounding of values up to ~20
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_partition_writes_shards_and_combines(tmp_path: Path) -> None:
    proto = block_model(layers=1)
    result = graphopt.partition(proto, tmp_path / "tp", tensor_parallel=2, devices="cuda:0,cuda:1")
    manifest = result.manifest
    kinds = [p.kind for p in manifest.partitions]
    assert kinds.count("shard") == 4 and kinds.count("combine") == 2
    shards = [p for p in manifest.partitions if p.kind == "shard"]
    assert [p.device for p in shards] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert all(p.resources["num_gpus"] == 1.0 for p in shards)
    # the two shards of a block read the same inputs and feed only the combining partition
    assert shards[0].inputs == shards[1].inputs
    feeds = feeds_for(proto)
    np.testing.assert_allclose(run_partitions(tmp_path / "tp", feeds)["y"], run_model(proto, feeds)["y"],
                               rtol=1e-4, atol=1e-4)
    # each shard holds half of its block's weights
    weights = {p.name: p.weight_bytes for p in shards}
    assert weights["shard0"] == weights["shard1"]


def test_pass_runs_in_a_pipeline() -> None:
    model = ir.load(block_model(attention=False))
    report = PassManager([SplitTensorParallel(shards=2)], PassContext()).run(model)
    assert report.records[0].changed and report.records[0].counters == {"blocks": 2}
    assert _ops(model).count("Sum") == 2


def _shared_weight_model() -> onnx.ModelProto:
    proto = block_model(attention=False, layers=1)
    # the first MLP weight is also read by a second consumer: it cannot be split in place
    proto.graph.node.append(helper.make_node("ReduceSum", ["l0_w1"], ["w1_sum"], keepdims=0))
    proto.graph.output.append(helper.make_tensor_value_info("w1_sum", TensorProto.FLOAT, []))
    return proto


def _leaking_model() -> onnx.ModelProto:
    proto = block_model(attention=False, layers=1)
    # the hidden activation of the MLP is a graph output: shards would not produce it whole
    proto.graph.output.append(helper.make_tensor_value_info("l0_gelu", TensorProto.FLOAT, ["batch", SEQ, 4 * HIDDEN]))
    return proto


def _softmax_over_split_axis() -> onnx.ModelProto:
    proto = block_model(attention=False, layers=1)
    for node in proto.graph.node:
        if node.name == "" and node.op_type == "Erf":
            node.op_type = "Softmax"
            node.attribute.append(helper.make_attribute("axis", -1))
    return proto


@pytest.mark.parametrize("make", [_shared_weight_model, _leaking_model, _softmax_over_split_axis],
                         ids=["shared-weight", "split-value-is-output", "softmax-over-split-axis"])
def test_must_not_fire(make) -> None:
    proto = make()
    onnx.checker.check_model(proto)
    model = ir.load(proto)
    before = ir.print_model(model)
    assert split_tensor_parallel(model, 2) == 0
    assert ir.print_model(model) == before


def test_sizes_that_do_not_divide_are_left_alone() -> None:
    model = ir.load(block_model(attention=True, mlp=False, layers=1))
    assert split_tensor_parallel(model, 3) == 0  # 4 heads, 16 columns: not divisible by 3
    with pytest.raises(GraphoptError, match="tensor parallelism"):
        graphopt.partition(block_model(attention=True, mlp=False, layers=1), plan_only=True,
                           tensor_parallel=3)
