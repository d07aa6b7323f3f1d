"""``quantize-int4``: MatMulNBits packing, int4 QDQ, and onnxruntime's outputs against a numpy
dequantize-then-matmul reference and against the float model."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

from graphopt import ir
from graphopt.errors import PipelineError
from graphopt.passes.quant.int4 import (QuantizeInt4, dequantize_blockwise, pack_nibbles,
                                        quantize_blockwise_int4)
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import run_model


def _model(k: int, n: int, opset: int = 17, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])],
                          [numpy_helper.from_array(w, "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10 if opset >= 21 else 8)
    return model, w


def _quantize(proto: onnx.ModelProto, **options: object) -> tuple[ir.Model, dict[str, int]]:
    model = ir.load(proto)
    report = PassManager([QuantizeInt4(**{"min_elements": 0, **options})], PassContext()).run(model)
    return model, report.records[-1].counters


def _x(k: int) -> np.ndarray:
    return np.random.default_rng(9).standard_normal((2, 3, k)).astype(np.float32)


@pytest.mark.parametrize("k,block_size,symmetric", [(64, 32, 1), (80, 32, 1), (80, 16, 0), (40, 64, 0)])
def test_matmulnbits_output_equals_numpy_dequantize_then_matmul(k: int, block_size: int, symmetric: int) -> None:
    n = 24
    source, w = _model(k, n)
    model, counters = _quantize(source, block_size=block_size, symmetric=symmetric, accuracy_level=0)
    node = model.graph.nodes[0]
    assert (node.domain, node.op_type) == ("com.microsoft", "MatMulNBits") and counters["quantized-matmul"] == 1
    attributes = {a: node.attr(a) for a in ("K", "N", "bits", "block_size")}
    assert attributes == {"K": k, "N": n, "bits": 4, "block_size": block_size}
    blocks = -(-k // block_size)
    assert node.inputs[1].const_value.shape == (n, blocks, block_size // 2)  # type: ignore[union-attr]
    assert node.inputs[2].const_value.shape == (n * blocks,)  # type: ignore[union-attr]
    assert len(node.inputs) == (3 if symmetric else 4)
    if not symmetric:
        assert node.inputs[3].const_value.shape == (n * -(-blocks // 2),)  # type: ignore[union-attr]
    x = _x(k)
    out = run_model(ir.to_proto(model), {"x": x})["y"]
    q = quantize_blockwise_int4(w, block_size, bool(symmetric))
    dequantized = dequantize_blockwise(q)
    np.testing.assert_allclose(out, x @ dequantized, rtol=1e-5, atol=1e-4)
    # The stated bound on the weights (s/2 symmetric, s asymmetric) and hence on the outputs.
    step = np.repeat(q.scales.T, block_size, axis=0)[:k] * (0.5 if symmetric else 1.0)
    assert np.all(np.abs(w - dequantized) <= step + 1e-6)
    expected = run_model(source, {"x": x})["y"]  # onnxruntime on the float model
    assert np.all(np.abs(out - expected) <= np.abs(x) @ step + 1e-3)


def test_cpu_default_uses_int8_activations_within_their_rounding() -> None:
    """accuracy_level=4 (the CPU default) also rounds A to int8 per block: a looser, stated bound."""
    source, w = _model(64, 16)
    model, _ = _quantize(source, block_size=32)
    assert model.graph.nodes[0].attr("accuracy_level") == 4
    x = _x(64)
    out = run_model(ir.to_proto(model), {"x": x})["y"]
    reference = x @ dequantize_blockwise(quantize_blockwise_int4(w, 32, True))
    # int8 rounding of each 32-wide block of A: at most max|A_block|/254 per element.
    step = np.abs(x).reshape(2, 3, 2, 32).max(-1, keepdims=True).repeat(32, -1).reshape(2, 3, 64) / 254
    bound = step @ np.abs(dequantize_blockwise(quantize_blockwise_int4(w, 32, True)))
    assert np.all(np.abs(out - reference) <= bound + 1e-4)


def test_packing_puts_the_lower_k_in_the_low_nibble() -> None:
    codes = np.array([[[1, 2, 3, 4]]], np.uint8)
    assert pack_nibbles(codes).tolist() == [[[0x21, 0x43]]]
    source, w = _model(32, 4)
    model, _ = _quantize(source, block_size=16)
    packed = model.graph.nodes[0].inputs[1].const_value.numpy()  # type: ignore[union-attr]
    unpacked = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(4, 2, 16)
    np.testing.assert_array_equal(unpacked, quantize_blockwise_int4(w, 16, True).codes)


@pytest.mark.parametrize("symmetric", [1, 0])
def test_qdq_form_on_opset21_equals_the_reference(symmetric: int) -> None:
    source, w = _model(48, 16, opset=21)
    model, _ = _quantize(source, block_size=16, format="qdq", symmetric=symmetric)
    dq, matmul = model.graph.nodes
    assert (dq.op_type, matmul.op_type) == ("DequantizeLinear", "MatMul")
    assert dq.attr("block_size") == 16 and dq.attr("axis") == 0
    assert dq.inputs[0].const_value.dtype == (TensorProto.INT4 if symmetric else TensorProto.UINT4)  # type: ignore[union-attr]
    assert dq.inputs[1].const_value.shape == (3, 16)  # type: ignore[union-attr]
    x = _x(48)
    out = run_model(ir.to_proto(model), {"x": x})["y"]
    reference = x @ dequantize_blockwise(quantize_blockwise_int4(w, 16, bool(symmetric)))
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-4)


def test_qdq_needs_opset21() -> None:
    source, _ = _model(48, 16, opset=20)
    model, counters = _quantize(source, format="qdq")
    assert [n.op_type for n in model.graph] == ["MatMul"] and counters["quantized-matmul"] == 0


@pytest.mark.parametrize("options,message", [({"block_size": 24}, "power of two"), ({"method": "gptq"}, "method"),
                                             ({"format": "nf4"}, "format")])
def test_bad_options_name_the_option(options: dict[str, object], message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        _quantize(_model(32, 8)[0], **options)


def test_external_data_model_quantizes_and_saves_without_loading_all_at_once(tmp_path: os.PathLike) -> None:
    source, w = _model(256, 64)
    src = os.path.join(tmp_path, "big.onnx")
    onnx.save(source, src, save_as_external_data=True, all_tensors_to_one_file=True, location="big.data",
              size_threshold=0)
    model = ir.load(src)
    assert model.graph.initializers["w"].const_value.is_external()  # type: ignore[union-attr]
    PassManager([QuantizeInt4(min_elements=0, accuracy_level=0)], PassContext()).run(model)
    out_path = os.path.join(tmp_path, "q.onnx")
    ir.save(model, out_path, external_data=True)
    saved = onnx.load(out_path)
    onnx.checker.check_model(out_path)
    x = _x(256)
    out = run_model(saved, {"x": x})["y"]
    reference = x @ dequantize_blockwise(quantize_blockwise_int4(w, 32, True))
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-3)
    assert os.path.getsize(out_path) + sum(os.path.getsize(os.path.join(tmp_path, f)) for f in os.listdir(tmp_path)
                                           if f.endswith(".data") and f != "big.data") < w.nbytes / 4


def test_gptq_lowers_the_output_error_on_correlated_activations() -> None:
    """GPTQ uses the calibration activations' covariance; on correlated inputs it beats RTN."""
    k, n = 64, 32
    source, _ = _model(k, n)
    rng = np.random.default_rng(11)
    mixing = np.eye(k) + 0.9 * rng.standard_normal((k, k)) / np.sqrt(k)  # correlated features

    def sample(rows: int) -> np.ndarray:
        return (rng.standard_normal((1, rows, k)) @ mixing).astype(np.float32)

    calibration = [{"x": sample(128)} for _ in range(8)]
    held_out = sample(64)
    expected = run_model(source, {"x": held_out})["y"]
    errors = {}
    for method in ("rtn", "gptq"):
        model, counters = _quantize(source, block_size=16, method=method, calibration=calibration, accuracy_level=0)
        assert counters["quantized-matmul"] == 1
        proto = ir.to_proto(model)
        out = run_model(proto, {"x": held_out})["y"]
        errors[method] = float(np.linalg.norm(out - expected))
        node = model.graph.nodes[0]
        packed = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
        scales = node.inputs[2].const_value.numpy().reshape(n, -1)  # type: ignore[union-attr]
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1, 16).astype(np.float32)
        dequantized = ((codes - 8) * scales[..., None]).reshape(n, -1)[:, :k].T
        np.testing.assert_allclose(out, held_out @ dequantized, rtol=1e-4, atol=1e-3)  # the stored codes
    assert errors["gptq"] < 0.85 * errors["rtn"], errors


def test_gptq_without_calibration_data_says_what_to_give() -> None:
    with pytest.raises(PipelineError, match="calibration"):
        _quantize(_model(32, 8)[0], method="gptq")
