"""Scales and zero points: affine int8/uint8 parameters from calibrated ranges and weights.

Activations are asymmetric (``x ≈ (q − zp)·s``) over a range widened to contain 0, so that 0
is exact (padding, ReLU). Weights are symmetric (``zp = 0``), per output channel or per
tensor. Biases become int32 with ``s_b = s_x·s_w`` and ``zp = 0``, the form integer kernels
add into their int32 accumulators.

On x86 CPUs without VNNI, onnxruntime's U8S8 kernels add pairs of u8·s8 products in int16
and saturate; weights then use 7 bits (``reduce_range``), which keeps every pair in range.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx

__all__ = [
    "BIAS_CODE_LIMIT",
    "TYPE_RANGES",
    "QParams",
    "activation_qparams",
    "bias_min_weight_scale",
    "cpu_has_vnni",
    "elem_type_of",
    "quantize_array",
    "quantize_bias",
    "weight_qparams",
]

#: (qmin, qmax, numpy dtype, onnx element type) of each integer type quantization emits.
TYPE_RANGES: dict[str, tuple[int, int, type, int]] = {
    "uint8": (0, 255, np.uint8, onnx.TensorProto.UINT8),
    "int8": (-128, 127, np.int8, onnx.TensorProto.INT8),
}


def elem_type_of(name: str) -> int:
    """The onnx element type of ``"uint8"`` or ``"int8"``."""
    return TYPE_RANGES[name][3]


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one tensor (scalars, or 1-D arrays along ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    qtype: str
    axis: int | None = None

    @property
    def per_channel(self) -> bool:
        """True when the scale has one entry per channel."""
        return self.scale.ndim == 1

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (lists for per-channel parameters)."""
        if self.per_channel:
            return {"scale": [float(s) for s in self.scale], "zero_point": [int(z) for z in self.zero_point],
                    "axis": self.axis, "type": self.qtype}
        return {"scale": float(self.scale), "zero_point": int(self.zero_point), "type": self.qtype}


def activation_qparams(rmin: float, rmax: float, qtype: str) -> QParams:
    """Asymmetric parameters covering ``[min(rmin, 0), max(rmax, 0)]``.

    Example:
        >>> p = activation_qparams(0.0, 2.55, "uint8")
        >>> round(float(p.scale), 6), int(p.zero_point)
        (0.01, 0)
    """
    qmin, qmax, dtype, _ = TYPE_RANGES[qtype]
    rmin = min(float(rmin), 0.0)
    rmax = max(float(rmax), 0.0)
    if not (np.isfinite(rmin) and np.isfinite(rmax)):
        raise ValueError(f"range [{rmin}, {rmax}] is not finite")
    scale = (rmax - rmin) / (qmax - qmin)
    if scale <= 0.0 or not np.isfinite(scale):
        scale = 1.0
    zero_point = int(np.clip(np.round(qmin - rmin / scale), qmin, qmax))
    return QParams(np.array(scale, dtype=np.float32), np.array(zero_point, dtype=dtype), qtype)


def weight_qparams(weight: np.ndarray, qtype: str, axis: int | None, reduce_range: bool,
                   min_scale: np.ndarray | None = None) -> QParams:
    """Symmetric parameters of a weight, per channel along ``axis`` or per tensor (``None``).

    ``min_scale`` (per channel, or a scalar) raises scales that would be smaller, e.g. so
    that the int32 bias ``b / (s_x·s_w)`` of a channel with tiny weights stays in range
    (see :func:`bias_min_weight_scale`).

    The weight is read in blocks of rows in its own dtype (``max |w|`` is exact in any float
    type); only the per-channel maxima are widened to float64.

    Example:
        >>> p = weight_qparams(np.array([[1.0, -2.54], [0.5, 1.0]], np.float32), "int8", 1, False)
        >>> p.scale.tolist(), p.zero_point.tolist()
        ([0.007874015718698502, 0.019999999552965164], [0, 0])
    """
    _, qmax, dtype, _ = TYPE_RANGES[qtype]
    if qtype != "int8":
        raise ValueError("weights are quantized symmetrically to int8")
    limit = 63 if reduce_range else qmax
    weight = np.asarray(weight)
    absmax = _absmax(weight, axis)
    scale = np.where(absmax > 0, absmax / limit, 1.0)
    if min_scale is not None:
        scale = np.maximum(scale, np.asarray(min_scale, dtype=np.float64))
    scale = scale.astype(np.float32)
    # A channel of subnormal weights can underflow to a zero float32 scale, which would divide
    # 0 by 0 on quantization; like an all-zero channel it gets scale 1 (its codes round to 0).
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, dtype=dtype), qtype, axis)


#: Elements per block when large arrays are processed block by block along their first axis
#: (256 KiB of float32: a block and its temporaries stay in a core's L2 cache).
_BLOCK_ELEMENTS = 64 * 1024


def _row_blocks(shape: tuple[int, ...]) -> list[slice]:
    """Slices of the first axis holding about :data:`_BLOCK_ELEMENTS` elements each (at least one row)."""
    rows = shape[0]
    row_elements = int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, _BLOCK_ELEMENTS // max(row_elements, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _absmax(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """``max |weight|`` per channel along ``axis`` (or over all elements), as float64.

    ``max(max(w), -min(w))`` equals ``max(|w|)`` without an ``|w|`` temporary; reducing in the
    weight's own dtype and widening the maxima afterwards equals widening first, since
    widening is monotone and symmetric. NaN propagates as in ``np.max``.
    """
    other = tuple(i for i in range(weight.ndim) if i != axis)
    if weight.size == 0:
        return np.array(0.0) if axis is None else np.zeros(weight.shape[axis])
    per_channel = len(other) < weight.ndim
    if weight.ndim == 0:
        blocks: list[np.ndarray] = [weight.reshape(1)]
    else:
        blocks = [weight[rows] for rows in _row_blocks(weight.shape)]
    if per_channel and axis == 0:
        return np.concatenate([_block_absmax(block, other) for block in blocks])
    axes = other if per_channel else None
    result = _block_absmax(blocks[0], axes)
    for block in blocks[1:]:
        np.maximum(result, _block_absmax(block, axes), out=result)
    return result


def _block_absmax(block: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    """``max |block|`` over ``axes`` (all when ``None``) as float64, from its max and min."""
    high = np.asarray(block.max(axis=axes), dtype=np.float64)
    low = np.asarray(block.min(axis=axes), dtype=np.float64)
    return np.asarray(np.maximum(high, np.negative(low)))


#: Largest int32 bias code allowed: half of the int32 range, leaving the other half to the
#: sum of products the kernel accumulates on top of it.
BIAS_CODE_LIMIT = 2**30


def bias_min_weight_scale(bias: np.ndarray, input_scale: np.ndarray, per_channel: bool) -> np.ndarray:
    """The smallest weight scale(s) that keep ``round(b / (s_x·s_w))`` within :data:`BIAS_CODE_LIMIT`.

    A channel whose weights are tiny next to its bias would otherwise get a bias code beyond
    int32 and be clipped, changing the output by far more than quantization noise.

    Example:
        >>> float(bias_min_weight_scale(np.array([1.0]), np.array(0.01), False))
        9.313225746154785e-08
    """
    needed = np.abs(bias.astype(np.float64)) / (float(input_scale) * BIAS_CODE_LIMIT)
    return needed if per_channel else np.array(needed.max() if needed.size else 0.0)


def _broadcast(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if values.ndim == 0 or axis is None:
        return values
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)


def quantize_array(x: np.ndarray, params: QParams, *, limit: int | None = None) -> np.ndarray:
    """``round(x / s) + zp`` saturated to the integer type (or to ``±limit``).

    The quotient is the exact ``x / s`` rounded half to even, as if computed in float64.
    Large arrays are quantized block by block along their first axis into the result, so
    temporaries stay small. A float32 (or float16) ``x`` with a float32 scale is divided in
    float32: the float32 quotient, a monotone rounding of the exact one, rounds to the same
    integer unless it lands exactly on a half (``n + 0.5``) that the exact quotient is not;
    only those elements (and non-finite ones) are recomputed in float64.

    Example:
        >>> p = QParams(np.array(0.5, np.float32), np.array(0, np.int8), "int8")
        >>> quantize_array(np.array([0.25, 0.75, -70.0], np.float32), p).tolist()
        [0, 2, -128]
    """
    qmin, qmax, dtype, _ = TYPE_RANGES[params.qtype]
    if limit is not None:
        qmin, qmax = -limit, limit
    x = np.asarray(x)
    scale = _broadcast(np.asarray(params.scale), x.ndim, params.axis)
    zero_point = _broadcast(np.asarray(params.zero_point), x.ndim, params.axis)
    shape = np.broadcast_shapes(x.shape, scale.shape, zero_point.shape)
    out = np.empty(shape, dtype=dtype)
    single_precision = (x.dtype in _SINGLE_PRECISION_INPUTS and scale.dtype in _SINGLE_PRECISION_INPUTS
                        and zero_point.dtype in _SMALL_ZERO_POINTS)
    bounds = (qmin, qmax)
    if x.ndim == 0 or shape != x.shape:
        # One block; a 0-d result is written through a 1-element view (0-d arrays have no nonzero()).
        _quantize_block(x, scale, zero_point, bounds, out.reshape(-1) if out.ndim == 0 else out, single_precision)
        return out
    scale_rows = scale.ndim == x.ndim and scale.shape[0] != 1
    zero_rows = zero_point.ndim == x.ndim and zero_point.shape[0] != 1
    for rows in _row_blocks(x.shape):
        _quantize_block(x[rows], scale[rows] if scale_rows else scale,
                        zero_point[rows] if zero_rows else zero_point, bounds, out[rows], single_precision)
    return out


#: Dtypes of inputs and scales whose values float32 holds exactly (the float32 path's premise).
_SINGLE_PRECISION_INPUTS = (np.dtype(np.float32), np.dtype(np.float16))
#: Zero point dtypes whose values float32 holds exactly.
_SMALL_ZERO_POINTS = (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.uint16))


def _quantize_block(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bounds: tuple[int, int],
                    out: np.ndarray, single_precision: bool) -> None:
    """Quantize one block of ``x`` into ``out`` (same shape); see :func:`quantize_array`."""
    if not single_precision:
        out[...] = _quantize_exact(x, scale, zero_point, bounds)
        return
    # Overflow and inf - inf here only mark elements that the float64 way recomputes (and warns about).
    with np.errstate(over="ignore", invalid="ignore"):
        codes = np.divide(x, scale, out=np.empty(out.shape, np.float32), dtype=np.float32)
        rounded = np.rint(codes, out=np.empty(out.shape, np.float32))
        # |q - rint(q)| < 0.5 fails exactly on halves, NaN and infinities: those take the float64 way.
        np.subtract(codes, rounded, out=codes)
    np.abs(codes, out=codes)
    settled = np.less(codes, 0.5)
    unsettled = None if settled.all() else np.nonzero(~settled)
    if unsettled is not None:
        rounded[unsettled] = 0.0
    if zero_point.size and zero_point.any():
        np.add(rounded, zero_point.astype(np.float32), out=rounded)
    np.clip(rounded, bounds[0], bounds[1], out=rounded)
    out[...] = rounded
    if unsettled is not None:
        shape = out.shape
        out[unsettled] = _quantize_exact(np.broadcast_to(x, shape)[unsettled],
                                         np.broadcast_to(scale, shape)[unsettled],
                                         np.broadcast_to(zero_point, shape)[unsettled], bounds)


def _quantize_exact(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bounds: tuple[int, int]) -> np.ndarray:
    """``clip(round(x / s) + zp)`` in float64 (exact rounding of the quotient), cast to the code dtype later."""
    q = np.divide(x, scale.astype(np.float64), dtype=np.float64)
    np.rint(q, out=q)
    np.add(q, zero_point.astype(np.int64), out=q)
    return np.clip(q, bounds[0], bounds[1], out=q)


def quantize_bias(bias: np.ndarray, input_scale: np.ndarray, weight: QParams) -> tuple[np.ndarray, np.ndarray]:
    """The int32 bias and its scale ``s_x·s_w`` (per channel when the weight is)."""
    scale = (input_scale.astype(np.float64) * weight.scale.astype(np.float64)).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    q = np.round(bias.astype(np.float64) / safe)
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32), scale


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """True when this x86 CPU has VNNI (int8 dot products without int16 saturation)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return True  # unknown platform (ARM, macOS): no AVX2 saturation issue to avoid
    if "avx2" not in flags:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags
