"""QDQ placement and emission: only fusable units, per-channel axes, int32 biases, opsets, fusion check."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from graphopt.passes.quant.insert_qdq import insert_qdq
from graphopt.passes.quant.placement import PlacementConfig, plan_placement
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import calibrate, check_fusion, make_session, run_model


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def cnn_model(opset: int = 13, batch: int | str = 1) -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Relu-Conv + residual Add-Relu, GlobalAveragePool, Flatten, Gemm."""
    rng = np.random.default_rng(0)
    inits = [_init(rng, "w1", (8, 3, 3, 3)), _init(rng, "b1", (8,)), _init(rng, "w2", (8, 8, 3, 3)),
             _init(rng, "b2", (8,)), _init(rng, "w3", (8, 8, 3, 3)), _init(rng, "b3", (8,)),
             _init(rng, "wf", (10, 8)), _init(rng, "bf", (10,))]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=pads, name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=pads, name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=pads, name="conv3"),
        helper.make_node("Add", ["c3", "p1"], ["a3"], name="residual"),
        helper.make_node("Relu", ["a3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 15 else 8
    return model


def mlp_model(opset: int = 13) -> onnx.ModelProto:
    """MatMul(+bias)-Relu-MatMul and a Gemm with transB=0, all with constant weights."""
    rng = np.random.default_rng(1)
    inits = [_init(rng, "w1", (16, 32)), _init(rng, "b1", (32,)), _init(rng, "w2", (32, 12)),
             _init(rng, "w3", (12, 6)), _init(rng, "b3", (6,))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="act1"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
        helper.make_node("Gemm", ["m2", "w3", "b3"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _feeds(shape: tuple[int, ...], n: int = 6, seed: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _quantize(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], config: PlacementConfig,
              **kwargs) -> tuple[ir.Model, object]:
    model = ir.load(proto)
    PassManager("infer-shapes", PassContext()).run(model)
    plan = plan_placement(model, config)
    ranges = calibrate(proto, plan.tensor_names(), feeds)
    emission = insert_qdq(model, ranges, config, plan=plan, **kwargs)
    return model, emission


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _nodes(model: ir.Model, op: str) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op]


def test_cnn_every_qdq_fuses_and_outputs_stay_close() -> None:
    proto = cnn_model()
    feeds = _feeds((1, 3, 16, 16))
    model, emission = _quantize(proto, feeds, PlacementConfig())
    kinds = {u.id: u.kind for u in emission.placement.units}
    assert kinds == {"conv1": "compute", "pool": "pass-through", "conv2": "compute", "conv3": "compute",
                     "residual": "elementwise", "gap": "elementwise", "flatten": "pass-through", "fc": "compute"}
    # Relu after conv1/conv2/residual joins its unit: the Q reads the Relu output.
    q_inputs = {n.inputs[0].name for n in _nodes(model, "QuantizeLinear")}
    assert {"r1", "r2", "r3"} <= q_inputs and "c1" not in q_inputs
    quantized = ir.to_proto(model)
    report = check_fusion(quantized)
    assert report.unfused == 0, report.unfused_nodes
    assert report.fused == {"QGemm": 1, "QLinearAdd": 1, "QLinearConv": 3, "QLinearGlobalAveragePool": 1}
    assert report.boundary_quantize == 1  # the model input
    for feed in feeds[:3]:
        expected = run_model(proto, feed)["y"]
        actual = run_model(quantized, feed)["y"]
        assert _cosine(expected, actual) > 0.999
        assert np.abs(expected - actual).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("trans_b, axis", [(1, 0), (0, 1)])
def test_per_channel_axis_follows_the_op(trans_b: int, axis: int) -> None:
    proto = cnn_model()
    if not trans_b:
        fc = next(n for n in proto.graph.node if n.name == "fc")
        del fc.attribute[:]
        wf = next(t for t in proto.graph.initializer if t.name == "wf")
        wf.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(wf).T.copy(), "wf"))
    model, _ = _quantize(proto, _feeds((1, 3, 16, 16)), PlacementConfig())
    weight_dq = {}
    for n in _nodes(model, "DequantizeLinear"):
        if n.inputs[0].is_constant() and n.inputs[0].dtype == TensorProto.INT8:
            weight_dq[n.outputs[0].uses()[0][0].name] = n
    assert weight_dq["conv1"].attr("axis") == 0
    assert weight_dq["conv1"].inputs[1].const_value.numpy().shape == (8,)
    assert weight_dq["fc"].attr("axis") == axis
    assert weight_dq["fc"].inputs[1].const_value.numpy().shape == (10,)
    mlp, _ = _quantize(mlp_model(), _feeds((4, 16)), PlacementConfig())
    mm = {n.outputs[0].uses()[0][0].name: n for n in _nodes(mlp, "DequantizeLinear")
          if n.inputs[0].dtype == TensorProto.INT8}
    assert mm["mm1"].attr("axis") == 1 and mm["mm1"].inputs[1].const_value.numpy().shape == (32,)
    assert mm["head"].attr("axis") == 1  # Gemm with transB=0: columns of B are output channels
    assert _relative_error(proto, ir.to_proto(model), _feeds((1, 3, 16, 16), 2)) < _NOISE


def test_bias_is_int32_with_scale_input_times_weight() -> None:
    model, _ = _quantize(cnn_model(), _feeds((1, 3, 16, 16)), PlacementConfig())
    conv = next(n for n in model.graph if n.op_type == "Conv" and n.name == "conv1")
    x_dq, w_dq, b_dq = (v.producer for v in conv.inputs)
    assert b_dq.inputs[0].dtype == TensorProto.INT32
    s_x = x_dq.inputs[1].const_value.numpy()
    s_w = w_dq.inputs[1].const_value.numpy()
    s_b = b_dq.inputs[1].const_value.numpy()
    np.testing.assert_allclose(s_b, s_x * s_w, rtol=1e-6)
    assert not b_dq.inputs[2].const_value.numpy().any()
    bias = numpy_helper.to_array(next(t for t in cnn_model().graph.initializer if t.name == "b1"))
    np.testing.assert_allclose(b_dq.inputs[0].const_value.numpy() * s_b, bias, atol=s_b.max())


def test_matmul_units_fuse_to_integer_kernels() -> None:
    proto = mlp_model()
    feeds = _feeds((4, 16))
    model, emission = _quantize(proto, feeds, PlacementConfig())
    assert [u.id for u in emission.placement.units] == ["mm1", "mm2", "head"]
    report = check_fusion(ir.to_proto(model))
    assert report.unfused == 0
    assert report.fused_total == 3 and "QGemm" in report.fused
    assert _cosine(run_model(proto, feeds[0])["y"], run_model(ir.to_proto(model), feeds[0])["y"]) > 0.999


def test_s8s8_leaves_matmul_in_float_and_cuda_places_nothing() -> None:
    model = ir.load(mlp_model())
    PassManager("infer-shapes", PassContext()).run(model)
    plan = plan_placement(model, PlacementConfig(activation_type="int8"))
    assert "mm1" not in {u.id for u in plan.units}
    reasons = {uid: why for uid, _, why in plan.skipped}
    assert "S8S8 MatMul" in reasons["mm1"]
    assert "head" in {u.id for u in plan.units}  # QGemm takes int8 activations
    cuda = plan_placement(model, PlacementConfig(target="cuda"))
    assert not cuda.units and "cuda" in cuda.reason


def test_include_and_exclude_lists() -> None:
    model = ir.load(cnn_model())
    PassManager("infer-shapes", PassContext()).run(model)
    only = plan_placement(model, PlacementConfig(include=("conv.*",)))
    assert {u.id for u in only.units} == {"conv1", "conv2", "conv3"}
    without = plan_placement(model, PlacementConfig(exclude=("fc", "conv2")))
    assert "fc" not in {u.id for u in without.units} and "conv2" not in {u.id for u in without.units}
    assert ("conv2", "Conv", "excluded") in without.skipped
    convs = plan_placement(model, PlacementConfig(op_types=("Conv",)))
    assert {u.op_type for u in convs.units} == {"Conv"}


@pytest.mark.parametrize("opset", [10, 11, 13, 21])
def test_opsets_load_in_onnxruntime(opset: int, caplog: pytest.LogCaptureFixture) -> None:
    proto = cnn_model(opset)
    feeds = _feeds((1, 3, 16, 16), 4)
    with caplog.at_level(logging.INFO, logger="graphopt.passes.quant.placement"):
        model, _ = _quantize(proto, feeds, PlacementConfig())
    quantized = ir.to_proto(model)
    onnx.checker.check_model(quantized)
    make_session(quantized)  # loads
    dqs = _nodes(model, "DequantizeLinear")
    with_axis = [n for n in dqs if "axis" in n.attributes]
    if opset == 10:
        assert not with_axis and "per-tensor" in caplog.text
        assert all(n.inputs[1].const_value.numpy().ndim == 0 for n in dqs)
    elif opset < 13:
        # The default domain has no axis before opset 13: per-channel weights and biases use
        # com.microsoft's DequantizeLinear, which onnxruntime loads and fuses.
        assert with_axis and all(n.domain == "com.microsoft" for n in with_axis)
        assert model.opset_imports["com.microsoft"] == 1
        assert all(n.domain == "" for n in dqs if "axis" not in n.attributes)
    else:
        assert with_axis and all(n.domain == "" for n in with_axis)
    assert check_fusion(quantized).unfused == 0
    expected = run_model(proto, feeds[0])["y"]
    assert _cosine(expected, run_model(quantized, feeds[0])["y"]) > 0.999


def test_symbolic_batch_dim() -> None:
    proto = cnn_model(batch="N")
    feeds = _feeds((2, 3, 16, 16), 4)
    model, _ = _quantize(proto, feeds, PlacementConfig())
    quantized = ir.to_proto(model)
    assert quantized.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.random.default_rng(9).standard_normal((3, 3, 16, 16)).astype(np.float32)
    expected = run_model(proto, {"x": x})["y"]
    actual = run_model(quantized, {"x": x})["y"]
    assert actual.shape == (3, 10) and _cosine(expected, actual) > 0.999


def _projections_model() -> onnx.ModelProto:
    """x read by three MatMuls (query/key/value projections)."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(3)]
    graph = helper.make_graph(nodes, "proj", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [4, 8]) for i in range(3)],
                              [_init(rng, f"w{i}", (16, 8)) for i in range(3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_dedicated_pairs_give_each_reader_its_own_quantize() -> None:
    feeds = _feeds((4, 16))
    shared, _ = _quantize(_projections_model(), feeds, PlacementConfig())
    dedicated, _ = _quantize(_projections_model(), feeds, PlacementConfig(), pairs="dedicated")
    assert len(_nodes(shared, "QuantizeLinear")) == 1
    assert len(_nodes(dedicated, "QuantizeLinear")) == 3
    for model in (shared, dedicated):
        activation_dqs = [n for n in _nodes(model, "DequantizeLinear") if not n.inputs[0].is_constant()]
        assert len(activation_dqs) == 3 and all(n.outputs[0].num_uses == 1 for n in activation_dqs)
        report = check_fusion(ir.to_proto(model))
        assert report.unfused == 0 and report.fused == {"MatMulIntegerToFloat": 3}
        out = run_model(ir.to_proto(model), feeds[0])
        ref = run_model(_projections_model(), feeds[0])
        assert all(_cosine(ref[k], out[k]) > 0.999 for k in ref)


def _qdq_pair_model() -> onnx.ModelProto:
    """A Q->DQ round trip before a float Softmax, and a weight DQ feeding a float Add: 3 unfused."""
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
         helper.make_node("Softmax", ["xd"], ["p"], axis=-1),
         helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
         helper.make_node("Add", ["p", "wd"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.uint8), "z"),
         numpy_helper.from_array(np.arange(4, dtype=np.uint8), "wq")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_fusion_check_counts_unfused_nodes() -> None:
    report = check_fusion(_qdq_pair_model())
    assert report.unfused_quantize == 1
    assert report.unfused_dequantize == 2
    assert report.unfused == 3 and report.fused_total == 0
    assert "3 Q/DQ node(s) unfused" in report.summary()


def test_insert_qdq_runs_as_a_pipeline_pass() -> None:
    proto = cnn_model()
    model = ir.load(proto)
    ctx = PassContext(opt_level=3)
    report = PassManager('calibrate<data=synthetic,samples=4>,insert-qdq<op-types="Conv,MaxPool">', ctx).run(model)
    names = [r.name for r in report.records]
    assert names.index("calibrate") < names.index("insert-qdq")
    insert = next(r for r in report.records if r.name == "insert-qdq")
    assert insert.changed and insert.counters["units"] == 4
    assert {n.op_type for n in model.graph} >= {"QuantizeLinear", "DequantizeLinear"}
    assert not any(n.inputs[0].name == "f" for n in _nodes(model, "QuantizeLinear"))  # Gemm not selected
    quantized = ir.to_proto(model)
    feed = _feeds((1, 3, 16, 16), 1)[0]
    assert _cosine(run_model(proto, feed)["y"], run_model(quantized, feed)["y"]) > 0.99


def _one_node_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "unit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _relative_error(proto: onnx.ModelProto, quantized: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    """Largest |float - quantized| over the largest |float| output, over ``feeds``."""
    worst = 0.0
    for feed in feeds:
        expected = run_model(proto, feed)["y"]
        actual = run_model(quantized, feed)["y"]
        worst = max(worst, float(np.abs(expected - actual).max() / np.abs(expected).max()))
    return worst


# Quantization noise of these small units stays below 3% of the output range (8-bit activations,
# 7- or 8-bit weights); the bugs these tests reproduce gave 50% or left the unit unfused.
_NOISE = 0.05


def test_conv_channel_with_tiny_weights_keeps_its_bias() -> None:
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    w[1] *= 1e-7  # a nearly dead channel: its output is its bias
    proto = _one_node_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
                            [numpy_helper.from_array(w, "w"), _init(rng, "b", (4,), 1.0)], [1, 3, 8, 8])
    feeds = _feeds((1, 3, 8, 8), 4)
    model, _ = _quantize(proto, feeds, PlacementConfig())
    bias_dq = next(n for n in _nodes(model, "DequantizeLinear") if n.inputs[0].dtype == TensorProto.INT32)
    assert np.abs(bias_dq.inputs[0].const_value.numpy().astype(np.int64)).max() <= 2**30
    quantized = ir.to_proto(model)
    assert check_fusion(quantized).fused == {"QLinearConv": 1}
    assert _relative_error(proto, quantized, feeds) < _NOISE


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_with_bias_fuses_and_matches_float(trans_b: int) -> None:
    rng = np.random.default_rng(5)
    proto = _one_node_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=0.5, transB=trans_b, name="gemm")],
        [_init(rng, "w", (6, 16) if trans_b else (16, 6)), _init(rng, "b", (6,), 1.0)], [4, 16])
    feeds = _feeds((4, 16), 4)
    model, _ = _quantize(proto, feeds, PlacementConfig())
    gemm = _nodes(model, "Gemm")[0]
    assert gemm.attr("alpha", 1.0) == 1.0  # folded into the quantized weight
    quantized = ir.to_proto(model)
    report = check_fusion(quantized)
    assert report.unfused == 0 and report.fused == {"QGemm": 1}
    assert _relative_error(proto, quantized, feeds) < _NOISE


@pytest.mark.parametrize("group, w_shape", [(2, (8, 2, 3, 3)), (4, (4, 1, 3, 3))])
def test_grouped_and_depthwise_conv_scales_per_output_channel(group: int, w_shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(6)
    proto = _one_node_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, pads=[1, 1, 1, 1], name="conv")],
        [_init(rng, "w", w_shape), _init(rng, "b", (w_shape[0],))], [1, 4, 8, 8])
    feeds = _feeds((1, 4, 8, 8), 4)
    model, _ = _quantize(proto, feeds, PlacementConfig())
    w_dq = next(n for n in _nodes(model, "DequantizeLinear") if n.inputs[0].dtype == TensorProto.INT8)
    assert w_dq.attr("axis") == 0 and w_dq.inputs[1].const_value.numpy().shape == (w_shape[0],)
    quantized = ir.to_proto(model)
    assert check_fusion(quantized).fused == {"QLinearConv": 1}
    assert _relative_error(proto, quantized, feeds) < _NOISE


def test_weight_shared_with_a_float_reader_stays_float_there() -> None:
    rng = np.random.default_rng(7)
    proto = _one_node_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
         helper.make_node("Add", ["c", "s"], ["y"])], [_init(rng, "w", (4, 3, 3, 3))], [1, 3, 8, 8])
    feeds = _feeds((1, 3, 8, 8), 4)
    model, _ = _quantize(proto, feeds, PlacementConfig())
    reduce = _nodes(model, "ReduceSum")[0]
    assert reduce.inputs[0].name == "w" and reduce.inputs[0].dtype == TensorProto.FLOAT
    assert _relative_error(proto, ir.to_proto(model), feeds) < _NOISE


def test_weight_that_is_a_graph_input_stays_float_and_says_why() -> None:
    """IR < 4 models list initializers as inputs: a caller may feed other weights, so no QDQ."""
    proto = cnn_model()
    for name in ("w1", "w2"):
        proto.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    feeds = _feeds((1, 3, 16, 16), 4)
    model, emission = _quantize(proto, feeds, PlacementConfig(op_types=("Conv",)))
    reasons = {uid: why for uid, _, why in emission.placement.skipped}
    assert "graph input" in reasons["conv1"] and "graph input" in reasons["conv2"]
    assert [u.id for u in emission.placement.units] == ["conv3"]
    conv1 = next(n for n in model.graph if n.name == "conv1")
    assert conv1.inputs[1].name == "w1"  # still the overridable float input
    other = {"w1": (np.random.default_rng(1).standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)}
    expected = run_model(proto, {**feeds[0], **other})["y"]
    actual = run_model(ir.to_proto(model), {**feeds[0], **other})["y"]
    assert _cosine(expected, actual) > 0.999  # the override still reaches the Conv
    only_inputs = ir.load(proto)
    PassManager("infer-shapes", PassContext()).run(only_inputs)
    plan = plan_placement(only_inputs, PlacementConfig(op_types=("Conv",), include=("conv1", "conv2")))
    assert not plan.units and "graph input" in plan.reason


@pytest.mark.parametrize("mode, joins", [("nearest", True), ("linear", True), ("cubic", False)])
def test_cubic_resize_is_not_an_integer_pass_through(mode: str, joins: bool) -> None:
    """Cubic interpolation overshoots its input's range; with the input's scale it was clipped (19% error)."""
    rng = np.random.default_rng(11)
    proto = _one_node_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1"),
         helper.make_node("Resize", ["c", "", "scales"], ["r"], mode=mode, name="resize"),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")],
        [_init(rng, "w", (4, 3, 3, 3)), _init(rng, "w2", (4, 4, 1, 1)),
         numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")], [1, 3, 8, 8])
    feeds = _feeds((1, 3, 8, 8), 4)
    model, emission = _quantize(proto, feeds, PlacementConfig())
    assert ("resize" in {u.id for u in emission.placement.units}) is joins
    quantized = ir.to_proto(model)
    assert check_fusion(quantized).unfused == 0
    assert _relative_error(proto, quantized, feeds) < _NOISE
