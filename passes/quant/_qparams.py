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
        >>> float(p.scale), int(p.zero_point)
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
    """
    _, qmax, dtype, _ = TYPE_RANGES[qtype]
    if qtype != "int8":
        raise ValueError("weights are quantized symmetrically to int8")
    limit = 63 if reduce_range else qmax
    w = np.abs(weight.astype(np.float64))
    if axis is None:
        absmax = np.array(w.max() if w.size else 0.0)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        absmax = w.max(axis=other) if w.size else np.zeros(w.shape[axis])
    scale = np.where(absmax > 0, absmax / limit, 1.0)
    if min_scale is not None:
        scale = np.maximum(scale, np.asarray(min_scale, dtype=np.float64))
    scale = scale.astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, dtype=dtype), qtype, axis)


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
    """``round(x / s) + zp`` saturated to the integer type (or to ``±limit``)."""
    qmin, qmax, dtype, _ = TYPE_RANGES[params.qtype]
    if limit is not None:
        qmin, qmax = -limit, limit
    scale = _broadcast(params.scale.astype(np.float64), x.ndim, params.axis)
    zp = _broadcast(params.zero_point.astype(np.int64), x.ndim, params.axis)
    q = np.round(x.astype(np.float64) / scale) + zp
    return np.clip(q, qmin, qmax).astype(dtype)


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
