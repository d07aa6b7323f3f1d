"""``quantize_weight_int8`` / ``int8_scale`` of ``quantize-dynamic``, now the blocked math of ``_qparams``,
against the full-size float32 formulas they replace, kept here verbatim: scales are bit-identical;
codes equal the old ones wherever the old float32 quotient was not a half that the exact quotient
is not, and equal the exact quotient rounded half to even everywhere. The emitted models carry
those codes and stay within the rounding bound of the float model."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from graphopt.passes.quant._qparams import quantize_array, weight_qparams
from graphopt.passes.quant.dynamic import (
    QuantizeDynamic,
    int8_scale,
    quantize_weight_int8,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, numpy_helper

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import run_model


# -- the previous implementation, verbatim -----------------------------------------------------------
def old_quantize_weight_int8(weight: np.ndarray, per_channel: bool, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    q_max = 63 if reduce_range else 127
    w = np.asarray(weight, dtype=np.float32)
    scale = old_int8_scale(w, per_channel, reduce_range)
    codes = np.clip(np.rint(w / scale), -q_max, q_max).astype(np.int8)
    return codes, scale


def old_int8_scale(weight: np.ndarray, per_channel: bool, reduce_range: bool) -> np.ndarray:
    q_max = 63 if reduce_range else 127
    absmax = np.abs(np.asarray(weight, dtype=np.float32))
    absmax = absmax.max(axis=0) if per_channel else absmax.max()
    return np.where(absmax > 0, absmax / np.float32(q_max), np.float32(1.0)).astype(np.float32)


# -- the exact formula ---------------------------------------------------------------------------------
def misleading_halves(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Where the float32 quotient is ``n + 0.5`` but the exact one (float64 here) is not."""
    with np.errstate(all="ignore"):
        single = np.divide(w, scale, dtype=np.float32)
        exact = w.astype(np.float64) / scale.astype(np.float64)
        return (np.abs(single - np.rint(single)) == 0.5) & (np.abs(exact - np.rint(exact)) != 0.5)


def check_against_old(weight: np.ndarray, per_channel: bool, reduce_range: bool) -> int:
    """New codes and scales against the old and the exact formulas; returns how many old codes were wrong."""
    q_max = 63 if reduce_range else 127
    with np.errstate(all="ignore"):  # a scale that underflowed to 0 divides by 0 (see below)
        old_codes, old_scale = old_quantize_weight_int8(weight, per_channel, reduce_range)
        codes, scale = quantize_weight_int8(weight, per_channel, reduce_range)
    assert scale.dtype == np.float32 and scale.shape == ((weight.shape[1],) if per_channel else ())
    assert scale.tobytes() == old_scale.tobytes()
    assert int8_scale(weight, per_channel, reduce_range).tobytes() == old_scale.tobytes()
    assert codes.dtype == np.int8 and codes.shape == weight.shape
    w = np.asarray(weight, dtype=np.float32)
    with np.errstate(all="ignore"):
        exact = np.clip(np.rint(w.astype(np.float64) / scale.astype(np.float64)), -q_max, q_max)
    # A scale that underflowed to 0 (max |w| ≤ 63·2⁻¹⁴⁹) makes 0 / 0 codes, which numpy casts as it
    # casts NaN, as static quantization does; every such code dequantizes to 0 through the scale 0.
    defined = np.broadcast_to(scale > 0, w.shape)
    assert np.array_equal(codes[defined], exact[defined])
    same = ~misleading_halves(w, np.broadcast_to(scale, w.shape)) & defined
    assert np.array_equal(codes[same], old_codes[same])
    return int((codes != old_codes).sum())


def edge_weight(k: int, n: int, seed: int) -> np.ndarray:
    """A weight whose columns hit the edge cases (zeros, constants, extremes, halves)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * np.exp(rng.uniform(-8, 8, size=(1, n)))
    w[:, 0] = 0.0                                   # zero column: scale 1
    w[:, 1] = -0.0
    w[:, 2] = 3.25                                  # constant column: every code is q_max
    w[:, 3] = rng.standard_normal(k) * 1e30         # huge
    w[:, 4] = rng.standard_normal(k) * 1e-30        # tiny
    w[:, 5] = rng.integers(-126, 127, k) / 2.0      # exact halves once the scale is 1/2 (max 63.5)
    w[0, 5] = 63.5
    w[0, 6:] = 0.0                                  # a zero row
    return w.astype(np.float32)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("reduce_range", [True, False])
def test_edge_weights_match_old_formula_where_it_was_exact(per_channel: bool, reduce_range: bool) -> None:
    weight = edge_weight(45, 17, seed=1)
    check_against_old(weight, per_channel, reduce_range)
    check_against_old(np.ascontiguousarray(weight.T).T, per_channel, reduce_range)  # a transB view
    check_against_old(weight.astype(np.float64), per_channel, reduce_range)  # quantized as its float32 copy


@pytest.mark.parametrize("shape", [(300, 700), (3, 70_000), (70_000, 3)])
def test_weights_over_several_blocks_match_old_formula(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0])
    weight = (rng.standard_normal(shape) * rng.uniform(0.01, 2.0, size=(1, shape[1]))).astype(np.float32)
    for per_channel, reduce_range in ((True, True), (False, False)):
        check_against_old(weight, per_channel, reduce_range)
        check_against_old(np.ascontiguousarray(weight.T).T, per_channel, reduce_range)


def test_quotients_float32_rounds_onto_halves_take_the_exact_value() -> None:
    """Column max 1: s = fl32(1/127). These float32 quotients are exact halves, the exact ones are not."""
    w = np.array([1.0, -0.9960629940032959, -0.9803149700164795, 0.5, -0.25], np.float32)[:, None]
    scale = np.float32(1) / np.float32(127)
    assert [float(v) for v in w[1:3, 0] / scale] == [-126.5, -124.5]  # what the old code rounded half to even
    codes, s = quantize_weight_int8(w, True, False)
    assert s.tolist() == [float(scale)]
    # exact quotients -126.50000071 and -124.50000166 -> -127, -125 (old: -126, -124)
    assert codes.ravel().tolist() == [127, -127, -125, 64, -32]
    assert old_quantize_weight_int8(w, True, False)[0].ravel().tolist() == [127, -126, -124, 64, -32]


def test_one_implementation_with_static_weight_quantization() -> None:
    """The dynamic pass's weights are exactly static quantization's symmetric int8 weights."""
    weight = edge_weight(40, 12, seed=2)
    for per_channel in (True, False):
        for reduce_range in (True, False):
            params = weight_qparams(weight, "int8", 1 if per_channel else None, reduce_range)
            codes, scale = quantize_weight_int8(weight, per_channel, reduce_range)
            assert scale.tobytes() == params.scale.tobytes()
            assert np.array_equal(codes, quantize_array(weight, params, limit=63 if reduce_range else 127))


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_int8(np.zeros(4, np.float32), True, False)


def test_peak_memory_stays_near_the_result() -> None:
    """Old: three float32 copies of the weight; new: the int8 result plus block temporaries."""
    weight = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB
    for view in (weight, np.ascontiguousarray(weight.T).T):
        tracemalloc.start()
        try:
            codes, _ = quantize_weight_int8(view, True, True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < codes.nbytes + 2**21, peak


_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(weight=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=30), elements=_float32),
       per_channel=st.booleans(), reduce_range=st.booleans(), transposed=st.booleans())
def test_property_random_weights_match_old_formula_where_it_was_exact(weight: np.ndarray, per_channel: bool,
                                                                      reduce_range: bool, transposed: bool) -> None:
    check_against_old(np.ascontiguousarray(weight.T).T if transposed else weight, per_channel, reduce_range)


def test_codes_old_formula_got_wrong_are_few_and_all_at_misleading_halves() -> None:
    weight = (np.random.default_rng(5).standard_normal((512, 4096)) * 0.02).astype(np.float32)
    assert check_against_old(weight, True, False) < 50
    assert check_against_old(weight, False, True) < 50


def _gemm_model(w: np.ndarray, trans_b: bool) -> onnx.ModelProto:
    k = w.shape[1] if trans_b else w.shape[0]
    n = w.shape[0] if trans_b else w.shape[1]
    bias = np.linspace(-1, 1, n, dtype=np.float32)
    node = oh.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=int(trans_b), alpha=0.5)
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "c")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("trans_b", [False, True])
def test_pass_emits_the_exact_codes_and_matches_the_float_model(target: str, trans_b: bool) -> None:
    k, n = 72, 40
    weight = np.random.default_rng(3).standard_normal((k, n)).astype(np.float32) * 0.1
    weight[:, 0] = 0.0
    weight[:, 1] = np.float32(1.0)
    weight[:3, 1] = np.array([-0.7380952835083008, -0.547619104385376, 0.5], np.float32)  # misleading halves at s = 1/63
    stored = np.ascontiguousarray(weight.T) if trans_b else weight
    source = _gemm_model(stored, trans_b)
    model = ir.load(source)
    report = PassManager([QuantizeDynamic(min_elements=0)], PassContext(target=target)).run(model)  # 7-bit weights
    assert report.records[-1].counters["quantized-gemm"] == 1
    ops = [node.op_type for node in model.graph]
    assert ops == (["DynamicQuantizeMatMul"] if target == "cpu" else
                   ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul", "Add"])
    codes_node = model.graph.nodes[0 if target == "cpu" else 1]
    codes = codes_node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
    expected_codes, expected_scale = quantize_weight_int8(weight, True, True)
    assert np.array_equal(codes, expected_codes)
    # exact quotients -46.50000018, -34.50000158 -> -47, -35 (old float32: -46.5, -34.5 -> -46, -34)
    assert codes[:3, 1].tolist() == [-47, -35, 31]
    assert old_quantize_weight_int8(weight, True, True)[0][:3, 1].tolist() == [-46, -34, 31]
    scale_value = codes_node.inputs[2] if target == "cpu" else model.graph.nodes[3].inputs[1]
    assert scale_value.const_value.numpy().tobytes() == (expected_scale * np.float32(0.5)).tobytes()  # type: ignore[union-attr]
    x = np.random.default_rng(4).standard_normal((5, k)).astype(np.float32)
    out = run_model(ir.to_proto(model), {"x": x})["y"]
    expected = run_model(source, {"x": x})["y"]  # onnxruntime on the float model
    # Rounding bound per term: |x|·s_w/2 + s_a/2·|w| + s_a·s_w/4, times alpha.
    s_a = (max(x.max(), 0) - min(x.min(), 0)) / 255
    bound = 0.5 * (np.abs(x) @ np.broadcast_to(expected_scale / 2, weight.shape)
                   + (s_a / 2) * np.abs(weight).sum(0) + k * s_a * expected_scale / 4)
    assert np.all(np.abs(out - expected) <= bound + 1e-5)
