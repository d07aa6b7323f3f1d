"""Output sizes of constant nodes, known *before* anything is evaluated.

Folding must never materialize a tensor above the limit: ``ConstantOfShape`` of 10^12 elements
is a classic trap. Sizes come from three places and the largest wins: the value's type,
onnx shape inference on the constant subgraph (with data propagation), and the semantics of
the operators whose output size is set by the *values* of their inputs (``ConstantOfShape``,
``Expand``, ``Tile``, ``Range``, ``Resize``, ``Upsample``, ``Pad``, ``OneHot``) or by their data
(``NonZero``, ``Unique``, ``Compress``, ``NonMaxSuppression``: bounded by their input sizes).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import onnx

from graphopt import ir

__all__ = ["tensor_bytes", "type_bytes", "semantic_bytes", "VALUE_SIZED_OPS"]

#: Operators whose output size depends on input *values*: a declared type alone is not trusted.
VALUE_SIZED_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample",
                             "Pad", "OneHot", "NonZero", "Unique", "Compress", "NonMaxSuppression",
                             "CenterCropPad", "Col2Im"})

#: Bytes per element assumed for strings (their real size is only known after evaluation).
STRING_BYTES = 64


def _itemsize(dtype: int) -> int:
    if dtype == onnx.TensorProto.STRING:
        return STRING_BYTES
    try:
        return int(ir.numpy_dtype(dtype).itemsize)
    except (KeyError, TypeError, ValueError):
        return 8


def tensor_bytes(dtype: int, numel: int) -> int:
    """Bytes of ``numel`` elements of ``dtype`` (sub-byte types rounded up to whole bytes)."""
    return numel * _itemsize(dtype)


def type_bytes(t: ir.ValueType | None) -> Optional[int]:
    """Bytes of a tensor of type ``t`` when dtype and every dim are known, else ``None``."""
    if not isinstance(t, ir.TensorType) or t.shape is None or not t.shape.is_static():
        return None
    if t.dtype == onnx.TensorProto.UNDEFINED:
        return None
    numel = t.shape.numel()
    if numel is None or any(int(d) < 0 for d in t.shape.dims):  # type: ignore[arg-type]
        return None
    return tensor_bytes(t.dtype, numel)


ConstOf = Callable[[Optional[ir.Value]], Optional[np.ndarray]]
ShapeOf = Callable[[Optional[ir.Value]], Optional[tuple[int, ...]]]


def _numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= max(int(d), 0)
    return n


def _dtype_of(node: ir.Node, index: int, default: int) -> int:
    v = node.inputs[index] if len(node.inputs) > index else None
    if v is not None and v.dtype is not None:
        return v.dtype
    return default


def semantic_bytes(node: ir.Node, const_of: ConstOf, shape_of: ShapeOf) -> Optional[list[Optional[int]]]:
    """Upper bounds of the output bytes of a value-sized operator, from its constant inputs.

    ``const_of(value)`` gives a value's array when it is already known, ``shape_of(value)`` its
    static shape. Returns ``None`` when the operator is not value-sized or an input it needs
    is not known (the caller then relies on shape inference).
    """
    if node.domain not in ("", "ai.onnx"):
        return None
    rule = _RULES.get(node.op_type)
    if rule is None:
        return None
    try:
        return rule(node, const_of, shape_of)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _input(node: ir.Node, i: int) -> Optional[ir.Value]:
    return node.inputs[i] if len(node.inputs) > i else None


def _constant_of_shape(node: ir.Node, const_of: ConstOf, shape_of: ShapeOf) -> Optional[list[Optional[int]]]:
    dims = const_of(_input(node, 0))
    if dims is None:
        return None
    value = node.attr("value")
    dtype = value.dtype if isinstance(value, ir.Tensor) else onnx.TensorProto.FLOAT
    return [tensor_bytes(dtype, _numel([int(d) for d in dims.reshape(-1)]))]


def _expand(node: ir.Node, const_of: ConstOf, shape_of: ShapeOf) -> Optional[list[Optional[int]]]:
    data_shape = shape_of(_input(node, 0))
    target = const_of(_input(node, 1))
    if data_shape is None or target is None:
        return None
    shape = np.broadcast_shapes(tuple(data_shape), tuple(int(d) for d in target.reshape(-1)))
    return [tensor_bytes(_dtype_of(node, 0, onnx.TensorProto.DOUBLE), _numel(shape))]


def _tile(node: ir.Node, const_of: ConstOf, shape_of: ShapeOf) -> Optional[list[Optional[int]]]:
    data_shape = shape_of(_input(node, 0))
    repeats = const_of(_input(node, 1))
    if data_shape is None or repeats is None:
        return None
    reps = [int(r) for r in repeats.reshape(-1)]
    if len(reps) != len(data_shape):
        return None
    return [tensor_bytes(_dtype_of(node, 0, onnx.TensorProto.DOUBLE),
                         _numel([d * r for d, r in zip(data_shape, reps)]))]


def _range(node: ir.Node, const_of: ConstOf, shape_of: ShapeOf) -> Optional[list[Optional[int]]]:
    parts = [const_of(_input(node, i)) for i in range(3)]
    if any(p is None or p.size != 1 for p in parts):
        return None
    start, limit, delta = (float(p.reshape(-1)[0]) for p in parts)  # type: ignore[union-attr]
    if delta == 0 or not all(math.isfinite(x) for x in (start, limit, delta)):
        return None
    count = max(int(math.ceil((limit - start) / delta)), 0)
    return [tensor_bytes(_dtype_of(node, 0, onnx.TensorProto.DOUBLE), count)]


def _resize(node: ir.Node, const_of: ConstOf, shape_of: ShapeOf) -> Optional[list[Optional[int]]]:
    data_shape = shape_of(_input(node, 0))
    if data_shape is None:
        return None
    dtype = _dtype_of(node, 0, onnx.TensorProto.DOUBLE)
    if node.op_type == "Upsample" or (node.version or 13) < 11:
        scales_value = _input(node, 1) if len(node.inputs) > 1 else None
        scales = const_of(scales_value) if scales_value is not None else None
        if scales is None and node.attr("scales") is not None:
            scales = np.array(node.attr("scales"), dtype=np.float64)
        if scales is None:
            return None
        sizes = None
    else:
        sizes_value = _input(node, 3)
        sizes = const_of(sizes_value) if sizes_value is not None else None
        scales_value = _input(node, 2)
        scales = const_of(scales_value) if scales_value is not None else None
    if sizes is not None and sizes.size:
        return [tensor_bytes(dtype, max(_numel([int(s) for s in sizes.reshape(-1)]), _numel(data_shape)))]
    if scales is None or not scales.size:
        return None
    factors = [float(s) for s in scales.reshape(-1)]
    axes = node.attr("axes")
    full = [1.0] * len(data_shape)
    if axes:
        for a, f in zip(axes, factors):
            full[a] = f
    elif len(factors) == len(data_shape):
        full = factors
    else:
        return None
    if not all(math.isfinite(f) and f >= 0 for f in full):
        return None
    return [tensor_bytes(dtype, _numel([int(math.ceil(d * f)) for d, f in zip(data_shape, full)]))]


def _pad(node: ir.Node, const_of: ConstOf, shape_of: ShapeOf) -> Optional[list[Optional[int]]]:
    data_shape = shape_of(_input(node, 0))
    if data_shape is None:
        return None
    if (node.version or 13) < 11:
        pads = list(node.attr("pads", ()))
    else:
        p = const_of(_input(node, 1))
        if p is None:
            return None
        pads = [int(x) for x in p.reshape(-1)]
    axes_value = _input(node, 3)
    axes = list(range(len(data_shape)))
    if axes_value is not None:
        a = const_of(axes_value)
        if a is None:
            return None
        axes = [int(x) + len(data_shape) if int(x) < 0 else int(x) for x in a.reshape(-1)]
    if len(pads) != 2 * len(axes):
        return None
    shape = list(data_shape)
    for k, axis in enumerate(axes):
        shape[axis] += max(pads[k], 0) + max(pads[k + len(axes)], 0)
    return [tensor_bytes(_dtype_of(node, 0, onnx.TensorProto.DOUBLE), _numel(shape))]


def _one_hot(node: ir.Node, const_of: ConstOf, shape_of: ShapeOf) -> Optional[list[Optional[int]]]:
    indices_shape = shape_of(_input(node, 0))
    depth = const_of(_input(node, 1))
    if indices_shape is None or depth is None or depth.size != 1:
        return None
    d = int(abs(float(depth.reshape(-1)[0])))
    return [tensor_bytes(_dtype_of(node, 2, onnx.TensorProto.DOUBLE), _numel(indices_shape) * d)]


def _bounded_by_input(factor: int) -> Callable[[ir.Node, ConstOf, ShapeOf], Optional[list[Optional[int]]]]:
    """Data-dependent outputs bounded by the first input's element count (times ``factor``)."""

    def rule(node: ir.Node, const_of: ConstOf, shape_of: ShapeOf) -> Optional[list[Optional[int]]]:
        shape = shape_of(_input(node, 0))
        if shape is None:
            return None
        bound = tensor_bytes(onnx.TensorProto.INT64, _numel(shape) * max(len(shape), 1) * factor)
        return [bound] * len(node.outputs)

    return rule


def _non_max_suppression(node: ir.Node, const_of: ConstOf, shape_of: ShapeOf) -> Optional[list[Optional[int]]]:
    scores = shape_of(_input(node, 1))
    if scores is None or len(scores) != 3:
        return None
    return [tensor_bytes(onnx.TensorProto.INT64, _numel(scores) * 3)]


_RULES: dict[str, Callable[[ir.Node, ConstOf, ShapeOf], Optional[list[Optional[int]]]]] = {
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Tile": _tile,
    "Range": _range,
    "Resize": _resize,
    "Upsample": _resize,
    "Pad": _pad,
    "OneHot": _one_hot,
    "NonZero": _bounded_by_input(1),
    "Unique": _bounded_by_input(2),
    "Compress": _bounded_by_input(1),
    "NonMaxSuppression": _non_max_suppression,
}
