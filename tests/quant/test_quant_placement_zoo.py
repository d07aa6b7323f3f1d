"""Placement on the onnx zoo's ShuffleNet and DenseNet shapes: no Q/DQ stays unfused.

ShuffleNet adds its residuals with a two-input ``Sum`` followed by ``Relu`` and joins its
stride-2 units with ``Concat`` + ``Relu``; DenseNet concatenates convolution outputs whose only
other readers are float (the BatchNormalization before each Conv is a per-channel Mul/Add that
cannot fold into a Conv across the Relu). Before, the Conv outputs read by these float ops were
written quantized and dequantized for them, and onnxruntime's layout pass turned each such DQ into
``DQ -> Transpose -> Q -> DQ`` (30 unfused Q/DQ in ShuffleNet, 102 in DenseNet-121). Now a two-input
``Sum`` is emitted as ``Add`` (QLinearAdd), a Relu joins Concat/Sum units (its Q has zero point 0 and
onnxruntime drops it), and a Concat whose inputs are all integer anyway becomes QLinearConcat.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from graphopt.passes.quant.insert_qdq import insert_qdq
from graphopt.passes.quant.placement import PlacementConfig, plan_placement
from onnx import TensorProto, helper, numpy_helper, version_converter

import graphopt
from graphopt import ir
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import calibrate, check_fusion, run_model

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """A zoo "light" model (weights stored as ConstantOfShape fills) with seeded random weights,
    opset 13, and its final Softmax removed so the outputs compared are the logits."""
    model = onnx.load(os.path.join(LIGHT, f"light_{name}.onnx"))
    graph = model.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, tuple[str, int]] = {}
    for node in graph.node:
        for i, name_in in enumerate(node.input):
            readers.setdefault(name_in, (node.op_type, i))
    nodes, weights = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            nodes.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        op, index = readers.get(node.output[0], ("", 0))
        if op == "Conv" and index == 1:
            array = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif op == "BatchNormalization" and index in (1, 4):  # scale, variance
            array = rng.uniform(0.5, 1.5, shape)
        elif op == "Gemm" and index == 1:
            array = rng.standard_normal(shape) / np.sqrt(shape[-1])
        else:
            array = rng.standard_normal(shape) * 0.1
        weights.append(numpy_helper.from_array(array.astype(np.float32), node.output[0]))
    softmax = [n for n in nodes if n.op_type == "Softmax" and n.output[0] == graph.output[0].name]
    if softmax:  # compare logits, not near-uniform probabilities of an untrained net
        nodes.remove(softmax[0])
        graph.output[0].name = softmax[0].input[0]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(weights)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    declared = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in declared and i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    model.ir_version = 8
    return version_converter.convert_version(model, 13)


def _images(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"gpu_0/data_0": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(n)]


def test_shufflenet_quantizes_with_nothing_unfused(tmp_path) -> None:
    proto = light_model("shufflenet")
    calib, held = _images(6, seed=1), _images(3, seed=2)
    out = graphopt.quantize(proto, calibration=calib + held, held_out=len(held), check_speed=False,
                            check_fusion=True)
    fusion = out.report["fusion"]
    assert fusion["unfused"] == 0, fusion["unfused_nodes"]
    # The 13 residual Sums became QLinearAdd (their Relu dropped), the 3 Concats QLinearConcat,
    # the shortcut AveragePools integer: the network is integer from its first Q to the head.
    assert fusion["fused"] == {"QGemm": 1, "QLinearAdd": 13, "QLinearAveragePool": 4,
                               "QLinearConcat": 3, "QLinearConv": 49}
    assert fusion["ops"].get("QuantizeLinear") == 1 and "DequantizeLinear" not in fusion["ops"]
    assert "Sum" not in out.report["ops_after"]
    # The 16 channel shuffles run as Gathers on uint8 (before: Reshape, 5-D Transpose, Reshape
    # between NHWC layout Transposes: 7.2 of 13.8 ms of kernel time, now 0.5 ms of Transposes).
    assert out.report["ops_after"].get("Gather") == 16 and "Transpose" not in out.report["ops_after"]
    # Numbers: logits of the quantized model against the float model (optimizations off).
    quantized = out.model
    for feed in held:
        expected = run_model(proto, feed)[proto.graph.output[0].name]
        actual = run_model(quantized, feed, optimize=True)[proto.graph.output[0].name]
        assert _cosine(expected, actual) >= 0.99  # 8-bit noise through 50 layers of a random net


def dense_block(stages: int = 3) -> onnx.ModelProto:
    """DenseNet's pattern: Concat of every earlier Conv output, each Conv behind a per-channel
    BatchNorm (Mul/Add) and Relu, then a transition Conv and AveragePool, and the next Conv."""
    rng = np.random.default_rng(3)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(x: str, cin: int, cout: int, name: str, k: int = 3) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [name], pads=[k // 2] * 4, name=name))
        return name

    def bn_relu(x: str, c: int, name: str) -> str:
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32), f"{name}.g"))
        inits.append(numpy_helper.from_array((rng.standard_normal((1, c, 1, 1)) * 0.1).astype(np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Mul", [x, f"{name}.g"], [f"{name}.mul"], name=f"{name}.mul"))
        nodes.append(helper.make_node("Add", [f"{name}.mul", f"{name}.b"], [f"{name}.add"], name=f"{name}.add"))
        nodes.append(helper.make_node("Relu", [f"{name}.add"], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    features, width = conv("x", 3, 8, "stem"), 8
    for i in range(stages):
        new = conv(bn_relu(features, width, f"bn{i}"), width, 4, f"conv{i}")
        nodes.append(helper.make_node("Concat", [features, new], [f"cat{i}"], axis=1, name=f"cat{i}"))
        features, width = f"cat{i}", width + 4
    trans = conv(bn_relu(features, width, "bnt"), width, 8, "trans", k=1)
    nodes.append(helper.make_node("AveragePool", [trans], ["pool"], kernel_shape=[2, 2], strides=[2, 2], name="pool"))
    nodes.append(helper.make_node("Identity", [conv("pool", 8, 4, "next")], ["y"]))
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _small_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def test_dense_concats_of_integer_inputs_become_qlinearconcat() -> None:
    proto = dense_block()
    model = ir.load(proto)
    PassManager("infer-shapes", PassContext()).run(model)
    config = PlacementConfig()
    plan = plan_placement(model, config)
    kinds = {u.id: u.kind for u in plan.units}
    # Every Concat joins although only float ops (the BatchNorm's Mul) read the last one.
    assert {k: v for k, v in kinds.items() if k.startswith("cat")} == {f"cat{i}": "elementwise" for i in range(3)}
    assert kinds["pool"] == "elementwise" and kinds["trans"] == "compute"
    assert not any(k.startswith("bn") for k in kinds)  # Mul/Add by constants stay float
    # A conv output only its Concat reads is written with the Concat's parameters (QLinearConcat
    # then copies it); the stem, also read by the first BatchNorm, keeps its own.
    assert [plan.root(f"conv{i}") for i in range(3)] == ["cat0", "cat1", "cat2"]
    assert plan.root("stem") == "stem" and "conv1" not in plan.tensor_names()
    ranges = calibrate(proto, plan.tensor_names(), _small_feeds(8, seed=1))
    emission = insert_qdq(model, ranges, config, plan=plan)
    assert emission.tensors["conv1"]["shares"] == "cat1"
    assert emission.tensors["conv1"]["scale"] == emission.tensors["cat1"]["scale"]
    quantized = ir.to_proto(model)
    fusion = check_fusion(quantized)
    assert fusion.unfused == 0, fusion.unfused_nodes
    assert fusion.fused == {"QLinearAveragePool": 1, "QLinearConcat": 3, "QLinearConv": 6}
    for feed in _small_feeds(4, seed=2):
        expected, actual = run_model(proto, feed)["y"], run_model(quantized, feed)["y"]
        assert _cosine(expected, actual) >= 0.999
        # 8-bit rounding through 6 convolutions: the largest error is 2-9% of the output range,
        # the same with the Concats left float.
        assert np.abs(expected - actual).max() <= 0.1 * np.abs(expected).max()


def shuffle_unit() -> onnx.ModelProto:
    """ShuffleNet's units: a stride-2 unit (Concat of an AveragePool shortcut and a Conv branch,
    then Relu), a residual unit (channel shuffle Reshape/Transpose/Reshape, Sum, Relu) and a Conv."""
    rng = np.random.default_rng(4)
    inits: list[onnx.TensorProto] = [numpy_helper.from_array(np.array([1, 2, 8, 8, 8], np.int64), "split_groups"),
                                     numpy_helper.from_array(np.array([1, 16, 8, 8], np.int64), "merge_groups")]
    nodes: list[onnx.NodeProto] = []

    def conv(x: str, cin: int, cout: int, name: str, stride: int = 1, group: int = 1) -> str:
        w = (rng.standard_normal((cout, cin // group, 3, 3)) * np.sqrt(2.0 / (cin // group * 9))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], pads=[1] * 4,
                                      strides=[stride] * 2, group=group, name=name))
        return name

    stem = conv("x", 3, 8, "stem")
    nodes.append(helper.make_node("Relu", [stem], ["stem.relu"], name="stem.relu"))
    nodes.append(helper.make_node("AveragePool", ["stem.relu"], ["short"], kernel_shape=[3, 3], pads=[1] * 4,
                                  strides=[2, 2], name="short"))
    branch = conv("stem.relu", 8, 8, "down", stride=2)
    nodes.append(helper.make_node("Concat", ["short", branch], ["cat"], axis=1, name="cat"))
    nodes.append(helper.make_node("Relu", ["cat"], ["cat.relu"], name="cat.relu"))
    g1 = conv("cat.relu", 16, 16, "g1", group=2)
    nodes += [helper.make_node("Reshape", [g1, "split_groups"], ["sh1"], name="shuffle.reshape"),
              helper.make_node("Transpose", ["sh1"], ["sh2"], perm=[0, 2, 1, 3, 4], name="shuffle.transpose"),
              helper.make_node("Reshape", ["sh2", "merge_groups"], ["sh3"], name="shuffle.merge")]
    g2 = conv("sh3", 16, 16, "g2", group=2)
    nodes.append(helper.make_node("Sum", ["cat.relu", g2], ["res"], name="residual"))
    nodes.append(helper.make_node("Relu", ["res"], ["res.relu"], name="residual.relu"))
    nodes.append(helper.make_node("Identity", [conv("res.relu", 16, 4, "head")], ["y"]))
    graph = helper.make_graph(nodes, "shuffle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_shuffle_sum_becomes_qlinearadd_and_relus_join() -> None:
    proto = shuffle_unit()
    model = ir.load(proto)
    PassManager("infer-shapes", PassContext()).run(model)
    config = PlacementConfig()
    plan = plan_placement(model, config)
    units = {u.id: u for u in plan.units}
    assert units["residual"].kind == "elementwise" and units["residual"].fused_relu.name == "residual.relu"
    assert units["cat"].fused_relu.name == "cat.relu"
    assert {units[n].kind for n in ("shuffle.reshape", "shuffle.transpose", "shuffle.merge")} == {"pass-through"}
    ranges = calibrate(proto, plan.tensor_names(), _small_feeds(8, seed=1))
    emission = insert_qdq(model, ranges, config, plan=plan)
    # The Relus' outputs are written with zero point 0 (onnxruntime drops the Relu before such a Q).
    assert emission.tensors["res.relu"]["zero_point"] == 0 and emission.tensors["cat.relu"]["zero_point"] == 0
    assert [n.op_type for n in model.graph if n.name == "residual"] == ["Add"]
    # The shuffle is one Gather of the channels (2 groups of 8: 0, 8, 1, 9, ...).
    gathers = [n for n in model.graph if n.op_type == "Gather"]
    assert len(gathers) == 1 and not [n for n in model.graph if n.op_type in ("Reshape", "Transpose")]
    order = gathers[0].inputs[1].const_value.numpy()
    assert order.tolist() == [c // 2 + 8 * (c % 2) for c in range(16)]
    quantized = ir.to_proto(model)
    fusion = check_fusion(quantized)
    assert fusion.unfused == 0, fusion.unfused_nodes
    assert fusion.fused == {"QLinearAdd": 1, "QLinearAveragePool": 1, "QLinearConcat": 1, "QLinearConv": 5}
    assert "Relu" not in fusion.ops
    for feed in _small_feeds(4, seed=2):
        expected, actual = run_model(proto, feed)["y"], run_model(quantized, feed)["y"]
        assert _cosine(expected, actual) >= 0.998
        assert np.abs(expected - actual).max() <= 0.1 * np.abs(expected).max()  # 8-bit, 6 layers


@pytest.mark.parametrize("inputs", [1, 3])
def test_sum_of_other_arity_stays_float(inputs: int) -> None:
    """Only a two-input Sum is an Add; one of one or three inputs keeps its float DQs."""
    names = [f"x{i}" for i in range(inputs)]
    nodes = [helper.make_node("Relu", [n], [f"r{i}"]) for i, n in enumerate(names)]
    nodes.append(helper.make_node("Sum", [f"r{i}" for i in range(inputs)], ["s"], name="sum"))
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    nodes.append(helper.make_node("Conv", ["s", "w"], ["y"], name="conv"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 4, 4]) for n in names],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], [w])
    model = ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    PassManager("infer-shapes", PassContext()).run(model)
    plan = plan_placement(model, PlacementConfig())
    assert [u.id for u in plan.units] == ["conv"]


def anchors_and_head() -> onnx.ModelProto:
    """A detector's tail: two conv outputs concatenated, their Shape read, a Sigmoid for the
    scores; and an anchor grid built from a float input through Unsqueeze/Concat/Reshape/Concat
    that only float ops read."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array((rng.standard_normal((2, 4, 3, 3)) * 0.3).astype(np.float32), f"w{i}")
             for i in range(2)]
    inits += [numpy_helper.from_array(np.array([1, 2, 64], np.int64), "flat"),
              numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"], pads=[1] * 4, name=f"conv{i}") for i in range(2)]
    nodes += [helper.make_node("Concat", ["c0", "c1"], ["cat"], axis=1, name="head.cat"),
              helper.make_node("Shape", ["cat"], ["cat_shape"], name="head.shape"),
              helper.make_node("Sigmoid", ["cat"], ["scores"], name="head.sigmoid")]
    for i in range(4):
        nodes.append(helper.make_node("Unsqueeze", [f"g{i % 2}", "axis1"], [f"u{i}"], name=f"grid.unsqueeze{i}"))
    nodes += [helper.make_node("Concat", ["u0", "u1"], ["ga"], axis=1, name="grid.cat0"),
              helper.make_node("Concat", ["u2", "u3"], ["gb"], axis=1, name="grid.cat1"),
              helper.make_node("Reshape", ["ga", "flat"], ["ra"], name="grid.flat0"),
              helper.make_node("Reshape", ["gb", "flat"], ["rb"], name="grid.flat1"),
              helper.make_node("Concat", ["ra", "rb"], ["anchors"], axis=2, name="grid.cat"),
              helper.make_node("Reshape", ["c0", "flat"], ["box"], name="box.flat"),
              helper.make_node("Concat", ["box", "box"], ["box2"], axis=2, name="box.cat"),
              helper.make_node("Sub", ["anchors", "box2"], ["boxes"], name="decode")]
    grid = [helper.make_tensor_value_info(f"g{i}", TensorProto.FLOAT, [1, 8, 8]) for i in range(2)]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4, 8, 8]),
               helper.make_tensor_value_info("cat_shape", TensorProto.INT64, [4]),
               helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 2, 128])]
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]), *grid],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _tail_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ramp = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    return [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32), "g0": ramp, "g1": ramp.transpose(0, 2, 1).copy()}
            for _ in range(n)]


def test_anchor_grids_stay_float_and_shape_reads_the_integer_tensor() -> None:
    proto = anchors_and_head()
    model = ir.load(proto)
    PassManager("infer-shapes", PassContext()).run(model)
    config = PlacementConfig()
    plan = plan_placement(model, config)
    # The Concats of conv outputs join (the box Concat through a Reshape) although only float
    # ops read them; the grid's Unsqueeze/Concat/Reshape chain, whose units would only justify
    # each other, stays float.
    assert {u.id for u in plan.units} == {"conv0", "conv1", "head.cat", "box.flat", "box.cat"}
    ranges = calibrate(proto, plan.tensor_names(), _tail_feeds(6, seed=1))
    insert_qdq(model, ranges, config, plan=plan)
    shape_node = next(n for n in model.graph if n.op_type == "Shape")
    assert shape_node.inputs[0].producer.op_type == "QuantizeLinear"  # no DQ computed for its dims
    quantized = ir.to_proto(model)
    fusion = check_fusion(quantized)
    assert fusion.unfused == 0, fusion.unfused_nodes
    assert fusion.fused == {"QLinearConcat": 2, "QLinearConv": 2}
    for feed in _tail_feeds(3, seed=1):  # calibrated inputs: rounding error only, no clipping
        expected, actual = run_model(proto, feed), run_model(quantized, feed)
        assert np.array_equal(expected["cat_shape"], actual["cat_shape"])
        np.testing.assert_allclose(actual["scores"], expected["scores"], atol=0.05)  # 8-bit input and logits
        # Only the conv outputs carry 8-bit error; the anchor coordinates (0..63) stay exact.
        grid = np.concatenate([feed["g0"][:, None], feed["g1"][:, None]], axis=1).reshape(1, 2, 64)
        conv_part = np.concatenate([grid, grid], axis=2) - expected["boxes"]
        box_error = np.abs(actual["boxes"] - expected["boxes"]).max()
        assert box_error <= 0.05 * np.abs(conv_part).max()


def test_concat_input_behind_a_fused_relu_keeps_its_zero_point() -> None:
    """Sharing the Concat's parameters would give the Relu's Q a zero point above 0 (the other
    input is negative): onnxruntime would then keep the Relu and leave its Conv unfused."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), f"w{i}")
             for i in range(2)]
    inits.append(numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2"))
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1] * 4, name="conv_a"),
             helper.make_node("Conv", ["x", "w1"], ["b"], pads=[1] * 4, name="conv_b"),
             helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             helper.make_node("Concat", ["a", "rb"], ["cat"], axis=1, name="cat"),
             helper.make_node("Conv", ["cat", "w2"], ["y"], name="conv_c")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    model = ir.load(proto)
    PassManager("infer-shapes", PassContext()).run(model)
    config = PlacementConfig()
    plan = plan_placement(model, config)
    assert plan.root("a") == "cat" and plan.root("rb") == "rb"
    feeds = [{"x": np.random.default_rng(s).standard_normal((1, 3, 8, 8)).astype(np.float32)} for s in range(6)]
    emission = insert_qdq(model, calibrate(proto, plan.tensor_names(), feeds), config, plan=plan)
    assert emission.tensors["rb"]["zero_point"] == 0 and emission.tensors["cat"]["zero_point"] > 0
    quantized = ir.to_proto(model)
    fusion = check_fusion(quantized)
    assert fusion.unfused == 0 and fusion.fused == {"QLinearConcat": 1, "QLinearConv": 3}
    assert "Relu" not in fusion.ops and "Conv" not in fusion.ops
    for feed in feeds:  # calibrated inputs: rounding error only
        expected, actual = run_model(proto, feed)["y"], run_model(quantized, feed)["y"]
        assert _cosine(expected, actual) >= 0.999
        assert np.abs(expected - actual).max() <= 0.05 * np.abs(expected).max()


@pytest.mark.parametrize(("split", "perm", "merged", "expected"), [
    ([1, 3, 2, 2, 2], [0, 2, 1, 3, 4], [1, 6, 2, 2], [0, 2, 4, 1, 3, 5]),  # 3 groups of 2
    ([0, 2, -1, 2, 2], [0, 2, 1, 3, 4], [1, -1, 2, 2], [0, 3, 1, 4, 2, 5]),  # 0 and -1 targets
    ([1, 6, 2, 2], [0, 1, 3, 2], [1, 6, 2, 2], None),  # swaps H and W: not a channel permutation
    ([1, 2, 3, 4], [0, 2, 1, 3], [1, 6, 2, 2], [0, 3, 1, 4, 2, 5]),  # H and W merged: still a shuffle
    ([1, 3, 4, 2], [0, 2, 1, 3], [1, 6, 2, 2], None),  # mixes channels with rows
])
def test_channel_shuffle_is_proven_on_index_arrays(split: list[int], perm: list[int], merged: list[int],
                                                   expected: list[int] | None) -> None:
    from graphopt.passes.quant._shuffle import channel_shuffle_indices

    inits = [numpy_helper.from_array(np.array(split, np.int64), "split"),
             numpy_helper.from_array(np.array(merged, np.int64), "merged")]
    nodes = [helper.make_node("Reshape", ["x", "split"], ["r"], name="split"),
             helper.make_node("Transpose", ["r"], ["t"], perm=perm, name="swap"),
             helper.make_node("Reshape", ["t", "merged"], ["m"], name="merge"),
             helper.make_node("Relu", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    model = ir.load(proto)
    PassManager("infer-shapes", PassContext()).run(model)
    found = channel_shuffle_indices(next(iter(model.graph)))
    if expected is None:
        assert found is None
        return
    chain, indices = found
    assert [n.name for n in chain] == ["split", "swap", "merge"] and indices.tolist() == expected
    x = np.random.default_rng(0).standard_normal((1, 6, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(run_model(proto, {"x": x})["y"], np.maximum(x[:, indices], 0))
