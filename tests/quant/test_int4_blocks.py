"""Block-wise int4 weights computed tile by tile (``quantize_blockwise_int4``, ``block_params_int4``,
``pack_blockwise_int4``, ``qdq_codes_int4``) against the full-size float32 formulas they replace,
kept here verbatim: scales are bit-identical; codes and zero points equal the old ones wherever
the old float32 quotient was not a half that the exact quotient is not, and equal the exact
quotient rounded half to even everywhere. Memory stays near the size of the result."""

from __future__ import annotations

import tracemalloc
import warnings

import ml_dtypes
import numpy as np
import onnx.helper as oh
import pytest
from graphopt.passes.quant.int4 import (
    QuantizeInt4,
    block_params_int4,
    dequantize_blockwise,
    pack_blockwise_int4,
    pack_nibbles,
    qdq_codes_int4,
    quantize_blockwise_int4,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, numpy_helper

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import run_model


# -- the previous implementation, verbatim -----------------------------------------------------------
def old_grouped(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``weight [K, N]`` as ``[N, blocks, block_size]``, ``K`` padded with zeros."""
    w = np.asarray(weight, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    return padded.T.reshape(n, blocks, block_size)


def old_block_params(grouped: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    n, blocks = grouped.shape[:2]
    if symmetric:
        absmax = np.abs(grouped).max(axis=-1)
        return (np.where(absmax > 0, absmax / np.float32(7), np.float32(1)).astype(np.float32),
                np.full((n, blocks), 8, np.uint8))
    low = np.minimum(grouped.min(axis=-1), np.float32(0))
    high = np.maximum(grouped.max(axis=-1), np.float32(0))
    scales = np.where(high > low, (high - low) / np.float32(15), np.float32(1)).astype(np.float32)
    return scales, np.clip(np.rint(-low / scales), 0, 15).astype(np.uint8)


def old_quantize(weight: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grouped = old_grouped(weight, block_size)
    scales, zero = old_block_params(grouped, symmetric)
    codes = np.clip(np.rint(grouped / scales[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    return codes, scales, zero


def old_qdq_codes(codes: np.ndarray, k: int, symmetric: bool) -> np.ndarray:
    n = codes.shape[0]
    shifted = codes.astype(np.int16) - (8 if symmetric else 0)
    return shifted.reshape(n, -1)[:, :k].T.astype(ml_dtypes.int4 if symmetric else ml_dtypes.uint4)


# -- the exact formula ---------------------------------------------------------------------------------
def misleading_halves(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Where the float32 quotient is ``n + 0.5`` but the exact one (float64 here) is not."""
    with np.errstate(all="ignore"):  # a zero denominator: no half either way
        single = np.divide(numerator.astype(np.float32), denominator.astype(np.float32), dtype=np.float32)
        exact = numerator.astype(np.float64) / denominator.astype(np.float64)
        return (np.abs(single - np.rint(single)) == 0.5) & (np.abs(exact - np.rint(exact)) != 0.5)


def check_against_old(weight: np.ndarray, block_size: int, symmetric: bool) -> int:
    """Every new function against the old formulas and the exact one; returns how many old codes were wrong."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # the old formulas divide by scales that underflow to 0
        old_codes, old_scales, old_zeros = old_quantize(weight, block_size, symmetric)
        grouped = old_grouped(weight, block_size)
    new = quantize_blockwise_int4(weight, block_size, symmetric)
    k = weight.shape[0]
    assert new.k == k and new.block_size == block_size
    assert new.scales.dtype == np.float32 and new.scales.tobytes() == old_scales.tobytes()
    assert new.zero_points.dtype == np.uint8 and new.codes.dtype == np.uint8
    assert new.codes.shape == old_codes.shape
    # Zero points: the exact quotient, rounded half to even.
    divisor = np.where(old_scales > 0, old_scales, np.float32(1))
    low = np.minimum(grouped.min(axis=-1), 0)
    if symmetric:
        assert (new.zero_points == 8).all()
        zero_flips = np.zeros(old_zeros.shape, bool)
    else:
        exact_zero = np.clip(np.rint(-low.astype(np.float64) / divisor), 0, 15)
        assert np.array_equal(new.zero_points, exact_zero)
        zero_flips = misleading_halves(-low, old_scales)
        same = ~zero_flips & (old_scales > 0)  # a scale that underflowed to 0 gave the old zero point -low / 0
        assert np.array_equal(new.zero_points[same], old_zeros[same])
    # Codes: the exact quotient rounded half to even, plus the zero point.
    exact = np.clip(np.rint(grouped.astype(np.float64) / divisor[..., None]) + new.zero_points[..., None], 0, 15)
    assert np.array_equal(new.codes, exact)
    # Old codes agree except at misleading halves, in blocks whose zero point both agree on and whose scale
    # did not underflow to 0 (there the old codes came from w / 0).
    flips = misleading_halves(grouped, np.broadcast_to(old_scales[..., None], grouped.shape))
    comparable = ~flips & ~zero_flips[..., None] & (old_scales > 0)[..., None]
    assert np.array_equal(new.codes[comparable], old_codes[comparable])
    # The emitted forms: packed (MatMulNBits) and [K, N] int4 (DequantizeLinear), from the same codes.
    assert np.array_equal(block_params_int4(weight, block_size, symmetric)[0], new.scales)
    assert np.array_equal(block_params_int4(weight, block_size, symmetric)[1], new.zero_points)
    assert np.array_equal(pack_blockwise_int4(weight, block_size, symmetric), pack_nibbles(new.codes))
    qdq = qdq_codes_int4(weight, block_size, symmetric)
    expected_qdq = old_qdq_codes(new.codes, k, symmetric)
    assert qdq.dtype == expected_qdq.dtype and qdq.shape == (k, weight.shape[1])
    assert np.array_equal(qdq.astype(np.int8), expected_qdq.astype(np.int8))
    return int((new.codes != old_codes).sum())


def edge_weight(k: int, n: int, seed: int, dtype: type = np.float32) -> np.ndarray:
    """A weight whose columns hit the edge cases (zeros, constants, extremes, subnormals, halves)."""
    rng = np.random.default_rng(seed)
    huge, tiny = (1e30, 1e-30) if dtype == np.float32 else (1e4, 1e-4)
    w = rng.standard_normal((k, n)) * np.exp(rng.uniform(-6, 6, size=(1, n)))
    w[:, 0] = 0.0                                       # zero blocks: scale 1
    w[:, 1] = 2.5                                       # constant blocks
    w[:, 2] = -1e-3
    w[:, 3] = rng.standard_normal(k) * huge
    w[:, 4] = rng.standard_normal(k) * tiny
    w[:, 5] = rng.integers(-3, 4, k) * 2.0 ** -149      # subnormal: the symmetric scale underflows to 0
    w[:, 6] = rng.integers(-14, 15, k) / 2.0            # exact halves once the scale is 1
    w[::4, 6] = 7.0
    w[:, 7] = np.where(np.arange(k) % 2, 3.0, -3.0)    # asymmetric range [-3, 3]: zero point 7.4999998
    w[: min(k, 5), 8:] = 0.0                            # zero rows
    return w.astype(dtype)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,n,block_size", [(64, 12, 16), (100, 12, 32), (37, 9, 16), (33, 10, 2), (35, 10, 3),
                                            (40, 11, 64), (300, 10, 128)])
def test_edge_weights_match_old_formula_where_it_was_exact(k: int, n: int, block_size: int, symmetric: bool) -> None:
    check_against_old(edge_weight(k, n, seed=k + n + block_size), block_size, symmetric)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,n,block_size", [(96, 5000, 32), (130, 2100, 64), (50, 70_000, 16)])
def test_weights_over_several_tiles_match_old_formula(k: int, n: int, block_size: int, symmetric: bool) -> None:
    rng = np.random.default_rng(k)
    weight = (rng.standard_normal((k, n)) * rng.uniform(0.01, 2.0, size=(1, n))).astype(np.float32)
    weight[:, -1] = 0.0
    check_against_old(weight, block_size, symmetric)


def test_float16_weight_is_quantized_as_its_float32_copy() -> None:
    weight = edge_weight(48, 16, seed=1, dtype=np.float16)
    for symmetric in (True, False):
        check_against_old(weight, 16, symmetric)
        a = quantize_blockwise_int4(weight, 16, symmetric)
        b = quantize_blockwise_int4(weight.astype(np.float32), 16, symmetric)
        assert np.array_equal(a.codes, b.codes) and a.scales.tobytes() == b.scales.tobytes()


def test_quotients_float32_rounds_onto_halves_take_the_exact_value() -> None:
    """A block whose max |w| is 1: s = fl32(1/7). These float32 quotients are exact halves, the exact ones are not."""
    w = np.array([1.0, -0.6428571939468384, -0.2142857164144516, -0.9285714626312256, 0.5, 0.0, 0.25, -0.5],
                 np.float32)[:, None]
    scale = np.float32(1) / np.float32(7)
    assert [float(v) for v in w[1:4, 0] / scale] == [-4.5, -1.5, -6.5]  # what the old code rounded half to even
    q = quantize_blockwise_int4(w, 8, True)
    assert q.scales.tolist() == [[float(scale)]]
    # exact quotients -4.50000016, -1.49999995, -6.49999995 -> -5, -1, -6 (old: -4, -2, -6)
    assert (q.codes[0, 0].astype(int) - 8).tolist() == [7, -5, -1, -6, 3, 0, 2, -3]
    old_codes = old_quantize(w, 8, True)[0]
    assert (old_codes[0, 0].astype(int) - 8).tolist() == [7, -4, -2, -6, 3, 0, 2, -3]
    assert qdq_codes_int4(w, 8, True).astype(np.int8).ravel().tolist() == [7, -5, -1, -6, 3, 0, 2, -3]


def test_zero_point_float32_rounds_onto_a_half_takes_the_exact_value() -> None:
    """Range [-3, 3]: s = fl32(6/15) = 0.4000000059604645; -low/s is 7.49999989 (float32 rounds it to 7.5)."""
    w = np.array([[-3.0], [3.0], [0.0], [1.0]], np.float32)
    scales, zeros = block_params_int4(w, 4, False)
    assert scales.tolist() == [[0.4000000059604645]] and zeros.tolist() == [[7]]
    assert old_block_params(old_grouped(w, 4), False)[1].tolist() == [[8]]
    q = quantize_blockwise_int4(w, 4, False)
    assert q.codes.ravel().tolist() == [0, 14, 7, 9]  # round(w / s) = -7, 7, 0, 2 (2.49999996), + 7
    assert np.abs(dequantize_blockwise(q) - w).max() <= float(scales.max())  # the stated asymmetric bound
    # Range [-0.20000002, 1]: -low/s = 2.50000005 -> 3 (old: 2.5 -> 2).
    w = np.array([[-0.20000001788139343], [1.0]], np.float32)
    assert block_params_int4(w, 2, False)[1].tolist() == [[3]]
    assert old_block_params(old_grouped(w, 2), False)[1].tolist() == [[2]]


def test_scale_underflowing_to_zero_gives_codes_equal_to_the_zero_point() -> None:
    """max |w| = 3·2⁻¹⁴⁹: max/7 rounds to 0 in float32. The old codes came from w / 0 (±inf, NaN cast);
    now every code is the zero point, and both dequantize to 0 through the stored scale 0."""
    w = (np.array([3, -2, 0, 1], np.float64) * 2.0 ** -149).astype(np.float32)[:, None]
    q = quantize_blockwise_int4(w, 4, True)
    assert q.scales.tolist() == [[0.0]] and q.codes.ravel().tolist() == [8, 8, 8, 8]
    assert np.array_equal(dequantize_blockwise(q), np.zeros_like(w))
    q = quantize_blockwise_int4(w, 4, False)  # (3 + 2)·2⁻¹⁴⁹ / 15 rounds to 0 too (old zero point: -low / 0 -> 15)
    assert q.scales.tolist() == [[0.0]] and q.zero_points.tolist() == [[0]] and q.codes.ravel().tolist() == [0] * 4
    assert np.array_equal(dequantize_blockwise(q), np.zeros_like(w))


def test_padding_rows_are_the_zero_point_in_every_form() -> None:
    w = np.random.default_rng(3).standard_normal((20, 6)).astype(np.float32) + 1.0
    for symmetric in (True, False):
        q = quantize_blockwise_int4(w, 16, symmetric)
        assert np.array_equal(q.codes[:, 1, 4:], np.repeat(q.zero_points[:, 1:], 12, axis=1))
        packed = pack_blockwise_int4(w, 16, symmetric)
        assert np.array_equal(np.stack([packed & 0xF, packed >> 4], -1).reshape(q.codes.shape), q.codes)
    odd = pack_blockwise_int4(w, 3, True)  # an odd block gets a zero high nibble, as pack_nibbles pads
    assert odd.shape == (6, 7, 2) and np.array_equal(odd, pack_nibbles(quantize_blockwise_int4(w, 3, True).codes))


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise_int4(np.zeros((4, 4, 4), np.float32), 2, True)
    with pytest.raises(ValueError, match="block_size"):
        block_params_int4(np.zeros((4, 4), np.float32), 0, True)


def test_peak_memory_stays_near_the_result() -> None:
    """Old: ~2.7x the weight in float32 temporaries; new: the result plus tile temporaries."""
    weight = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB
    for function, result_bytes in ((pack_blockwise_int4, weight.size // 2), (qdq_codes_int4, weight.size),
                                   (block_params_int4, weight.size // 32 * 5)):
        tracemalloc.start()
        try:
            function(weight, 32, False)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < result_bytes + 2**21, (function.__name__, peak)


_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(weight=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40), elements=_float32),
       block_size=st.integers(1, 20), symmetric=st.booleans())
def test_property_random_weights_match_old_formula_where_it_was_exact(weight: np.ndarray, block_size: int,
                                                                      symmetric: bool) -> None:
    check_against_old(weight, block_size, symmetric)


def test_codes_old_formula_got_wrong_are_few_and_all_at_misleading_halves() -> None:
    """On 2M normal weights a handful of old codes differ; check_against_old proves each is a misleading half."""
    weight = (np.random.default_rng(5).standard_normal((512, 4096)) * 0.02).astype(np.float32)
    assert check_against_old(weight, 32, True) < 50
    assert check_against_old(weight, 32, False) < 200


@pytest.mark.parametrize("fmt,opset", [("matmulnbits", 17), ("qdq", 21)])
@pytest.mark.parametrize("symmetric", [1, 0])
def test_pass_emits_the_exact_codes_and_matches_the_float_model(fmt: str, opset: int, symmetric: int) -> None:
    k, n = 72, 40  # K not a multiple of the block
    w = edge_weight(k, n, seed=2)
    w[:, 3] = 0.5  # keep the float model's output finite
    w[:, 4:6] = 0.1
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])],
                          [numpy_helper.from_array(w, "w")])
    source = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10 if opset >= 21 else 8)
    model = ir.load(source)
    report = PassManager([QuantizeInt4(min_elements=0, block_size=16, format=fmt, symmetric=symmetric,
                                       accuracy_level=0)], PassContext()).run(model)
    assert report.records[-1].counters["quantized-matmul"] == 1
    q = quantize_blockwise_int4(w, 16, bool(symmetric))
    first = model.graph.nodes[0]
    stored = first.inputs[0].const_value.numpy() if fmt == "qdq" else first.inputs[1].const_value.numpy()  # type: ignore[union-attr]
    if fmt == "qdq":
        assert first.op_type == "DequantizeLinear"
        assert np.array_equal(stored.astype(np.int8), qdq_codes_int4(w, 16, bool(symmetric)).astype(np.int8))
    else:
        assert first.op_type == "MatMulNBits"
        assert np.array_equal(stored, pack_nibbles(q.codes))
    x = np.random.default_rng(4).standard_normal((3, k)).astype(np.float32)
    out = run_model(ir.to_proto(model), {"x": x})["y"]
    dequantized = dequantize_blockwise(q)
    np.testing.assert_allclose(out, x @ dequantized, rtol=1e-5, atol=1e-4)
    step = np.repeat(q.scales.T, 16, axis=0)[:k] * (0.5 if symmetric else 1.0)
    expected = run_model(source, {"x": x})["y"]  # onnxruntime on the float model
    assert np.all(np.abs(out - expected) <= np.abs(x) @ step + 1e-3)
