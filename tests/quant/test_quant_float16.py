"""``convert-float16``: the converted graph loads and runs on onnxruntime's CPU provider and agrees
with the float32 model within float16's (or bfloat16's) precision."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper as oh
import onnx.parser
import pytest
from onnx import TensorProto, numpy_helper

from graphopt import ir
from graphopt.errors import PipelineError
from graphopt.passes.quant.float16 import DEFAULT_BLOCK_OPS, FLOAT16_MAX, ConvertFloat16, to_low_precision
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.runtime import run_model

#: float16 keeps 11 significant bits; a few roundings in a row stay within 1 %.
FLOAT16_RTOL = 1e-2
#: bfloat16 keeps 8 significant bits.
BFLOAT16_RTOL = 4e-2


def _encoder(hidden: int = 32, heads: int = 4, seq: int = 8, seed: int = 0) -> onnx.ModelProto:
    """One transformer encoder layer: attention with Softmax, LayerNormalization, Erf GELU."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name: str, *shape: int, scale: float = 0.2) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    head = hidden // heads
    split = const("split", np.array([1, seq, heads, head], np.int64))
    merge = const("merge", np.array([1, seq, hidden], np.int64))
    for p in "qkv":
        nodes.append(oh.make_node("MatMul", ["x", weight(f"w{p}", hidden, hidden)], [f"{p}0"]))
        nodes.append(oh.make_node("Add", [f"{p}0", weight(f"b{p}", hidden)], [f"{p}1"]))
        nodes.append(oh.make_node("Reshape", [f"{p}1", split], [f"{p}2"]))
        perm = [0, 2, 3, 1] if p == "k" else [0, 2, 1, 3]
        nodes.append(oh.make_node("Transpose", [f"{p}2"], [f"{p}3"], perm=perm))
    nodes += [
        oh.make_node("MatMul", ["q3", "k3"], ["s0"]),
        oh.make_node("Mul", ["s0", const("scale", np.array(1 / np.sqrt(head), np.float32))], ["s1"]),
        oh.make_node("Softmax", ["s1"], ["a"], axis=-1),
        oh.make_node("MatMul", ["a", "v3"], ["c0"]),
        oh.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
        oh.make_node("Reshape", ["c1", merge], ["c2"]),
        oh.make_node("MatMul", ["c2", weight("wo", hidden, hidden)], ["o0"]),
        oh.make_node("Add", ["o0", "x"], ["r0"]),
        oh.make_node("LayerNormalization", ["r0", const("g", np.ones(hidden, np.float32)),
                                            const("be", np.zeros(hidden, np.float32))], ["h"], epsilon=1e-5),
        oh.make_node("MatMul", ["h", weight("w1", hidden, 4 * hidden)], ["f0"]),
        oh.make_node("Div", ["f0", const("sqrt2", np.array(np.sqrt(2), np.float32))], ["f1"]),
        oh.make_node("Erf", ["f1"], ["f2"]),
        oh.make_node("Add", ["f2", const("one", np.array(1, np.float32))], ["f3"]),
        oh.make_node("Mul", ["f0", "f3"], ["f4"]),
        oh.make_node("Mul", ["f4", const("half", np.array(0.5, np.float32))], ["f5"]),
        oh.make_node("MatMul", ["f5", weight("w2", 4 * hidden, hidden)], ["f6"]),
        oh.make_node("Add", ["f6", "h"], ["y"]),
    ]
    graph = oh.make_graph(nodes, "encoder", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hidden])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def _convert(proto: onnx.ModelProto, pipeline: str = "convert-float16") -> tuple[ir.Model, dict[str, int]]:
    model = ir.load(proto)
    report = PassManager(pipeline, PassContext(registry=PassRegistry.default(plugins=False))).run(model)
    return model, report.records[-1].counters


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float32) - expected).max() / np.abs(expected).max())


def test_encoder_runs_in_float16_on_cpu_within_tolerance() -> None:
    source = _encoder()
    model, counters = _convert(source)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    assert counters["converted-nodes"] > 20 and counters["kept-nodes"] == 0
    weights = [v.const_value for v in model.graph.initializers.values()]
    assert {t.dtype for t in weights if t.dtype != TensorProto.INT64} == {TensorProto.FLOAT16}  # type: ignore[union-attr]
    assert model.graph.inputs[0].dtype == model.graph.outputs[0].dtype == TensorProto.FLOAT
    x = np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)
    expected = run_model(source, {"x": x})["y"]
    actual = run_model(proto, {"x": x})["y"]
    assert actual.dtype == np.float32
    assert _relative_error(actual, expected) < FLOAT16_RTOL


def test_without_keep_io_types_the_signature_is_float16() -> None:
    source = _encoder()
    model, counters = _convert(source, "convert-float16<keep-io-types=0>")
    assert model.graph.inputs[0].dtype == model.graph.outputs[0].dtype == TensorProto.FLOAT16
    assert counters["converted-io"] == 2
    x = np.random.default_rng(2).standard_normal((1, 8, 32)).astype(np.float32)
    actual = run_model(ir.to_proto(model), {"x": x.astype(np.float16)})["y"]
    assert actual.dtype == np.float16
    assert _relative_error(actual, run_model(source, {"x": x})["y"]) < FLOAT16_RTOL


def test_bfloat16_keeps_what_the_cpu_provider_cannot_run_and_loads() -> None:
    source = _encoder()
    model, counters = _convert(source, "convert-float16<dtype=bfloat16>")
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    x = np.random.default_rng(3).standard_normal((1, 8, 32)).astype(np.float32)
    actual = run_model(proto, {"x": x})["y"]  # loads: no bfloat16 node without a CPU kernel
    assert _relative_error(actual, run_model(source, {"x": x})["y"]) < BFLOAT16_RTOL
    low = [n for n in model.graph if any(o.dtype == TensorProto.BFLOAT16 for o in n.outputs) and n.op_type != "Cast"]
    assert counters["converted-nodes"] == len(low)


def test_block_list_keeps_ops_in_float32_with_casts_at_the_borders() -> None:
    source = _encoder()
    model, _ = _convert(source, 'convert-float16<block-ops="Softmax,LayerNormalization">')
    kept = [n for n in model.graph if n.op_type in ("Softmax", "LayerNormalization")]
    assert kept and all(v.dtype == TensorProto.FLOAT for n in kept for v in (*n.inputs, *n.outputs) if v is not None
                        and v.dtype in (TensorProto.FLOAT, TensorProto.FLOAT16))
    assert all(n.inputs[0].producer is not None and n.inputs[0].producer.op_type == "Cast" for n in kept)  # type: ignore[union-attr]
    assert "Pow" in DEFAULT_BLOCK_OPS and "TopK" in DEFAULT_BLOCK_OPS
    x = np.random.default_rng(2).standard_normal((1, 8, 32)).astype(np.float32)
    actual = run_model(ir.to_proto(model), {"x": x})["y"]
    assert _relative_error(actual, run_model(source, {"x": x})["y"]) < FLOAT16_RTOL


def test_clamp_clips_initializers_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    proto = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
        g (float[3] x) => (float[3] y) <float[3] big = {1e6, -1e6, 1e-9}> { y = Add(x, big) }''')
    with caplog.at_level(logging.WARNING):
        model, counters = _convert(proto)
    assert "beyond float16's range" in caplog.text and counters["clamped-initializers"] == 1
    values = model.graph.nodes[1].inputs[1].const_value.numpy()  # type: ignore[union-attr]
    assert values.tolist() == [FLOAT16_MAX, -FLOAT16_MAX, 2.0 ** -24]
    assert to_low_precision(np.array([1e6], np.float32), TensorProto.FLOAT16, False).tolist() == [np.inf]


def test_loop_body_converts_with_float32_borders() -> None:
    proto = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x, int64 n) => (float[2] y) <float[2] w = {0.5, 1.5}> {
          t = Constant<value = bool {1}>()
          y = Loop(n, t, x) <body = body (int64 i, bool c, float[2] s) => (bool c2, float[2] s2) {
              c2 = Identity(c)
              m = Mul(s, w)
              s2 = Add(m, w)
          }>
        }''')
    model, counters = _convert(proto)
    proto_out = ir.to_proto(model)
    onnx.checker.check_model(proto_out)
    body = model.graph.nodes[-1].attributes["body"].value
    assert [n.op_type for n in body] == ["Cast", "Identity", "Mul", "Add", "Cast"]
    feeds = {"x": np.array([1.0, -2.0], np.float32), "n": np.array(3, np.int64)}
    np.testing.assert_allclose(run_model(proto_out, feeds)["y"], run_model(proto, feeds)["y"], rtol=FLOAT16_RTOL)
    assert counters["converted-nodes"] == 2


def test_unknown_dtype_option_names_the_choices() -> None:
    with pytest.raises(PipelineError, match="float16 or bfloat16"):
        ConvertFloat16(dtype="fp8").run(ir.load(_encoder()), PassContext())
