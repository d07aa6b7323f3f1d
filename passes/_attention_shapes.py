"""Shapes that transformer exports compute at run time, as the attention rewrites see them.

Exporters rarely write the target of an attention ``Reshape`` as one constant. TorchScript
builds ``Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [-1], [64])``,
dynamo ``Concat(Shape(x)[0:1], Shape(x)[1:2], [-1], [64])`` or reads ``Shape(y)[:-2]`` of a
tensor of the block itself, and after constant folding a ``[0, 0, 12, 64]`` or ``[-1, 768]``
constant remains. Passes that change the head count (tensor-parallel splitting, head pruning)
need two things from such a shape:

* its value for given input shapes (:class:`ShapeEvaluator`, a small interpreter of the
  integer ops these computations use, on arrays of a few elements), to check that a rewritten
  ``Reshape`` still produces the shape it must (:func:`reshape_result` applies ONNX's ``0`` and
  ``-1`` rules);
* the constant entry that holds a given output axis (:func:`shape_piece`): an entry of a
  constant target, or of a constant input of the ``Concat`` that builds it. Rewriting that
  entry changes the head count; entries that come from ``Shape`` stay right by themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt import ir

__all__ = ["EVALUATED_OPS", "ShapeEvaluator", "ShapePiece", "constant_array", "reshape_result", "shape_piece"]

#: Largest array (elements) the evaluator computes: shape arithmetic, never activations.
MAX_ELEMENTS = 4096

_DEFAULT = ("", "ai.onnx")
#: The ops :class:`ShapeEvaluator` computes (besides ``Constant``, ``Shape`` and ``Size``).
EVALUATED_OPS = frozenset({"Identity", "Cast", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Add",
                           "Sub", "Mul", "Div", "Max", "Min", "Equal", "Less", "Greater", "And", "Or",
                           "Neg", "Abs", "Not", "Where", "Reshape", "Expand", "ConstantOfShape", "Range"})


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant value (initializer, ``Constant`` node, or an ``Identity`` of one).

    Example:
        >>> constant_array(model.graph.initializers["shape"])  # doctest: +SKIP
        array([-1, 768])
    """
    if value is None:
        return None
    if value.const_value is not None and value.is_constant():
        if isinstance(value.const_value, ir.SparseTensor):
            return None
        return value.const_value.numpy()
    producer = value.producer
    if producer is None or producer.domain not in _DEFAULT:
        return None
    if producer.op_type == "Constant":
        for name in ("value", "value_ints", "value_int", "value_floats", "value_float"):
            attr = producer.attr(name, None)
            if attr is None:
                continue
            if isinstance(attr, ir.Tensor):
                return attr.numpy()
            if isinstance(attr, ir.SparseTensor):
                return None
            dtype = np.int64 if "int" in name else np.float32
            return np.array(attr, dtype=dtype)
        return None
    if producer.op_type == "Identity":  # exports copy tied biases through Identity nodes
        return constant_array(producer.inputs[0])
    return None


def reshape_result(in_shape: Sequence[int], target: Sequence[int], allowzero: bool = False) -> tuple[int, ...] | None:
    """The shape ``Reshape(x, target)`` gives for ``x`` of ``in_shape`` (``None`` if invalid).

    Example:
        >>> reshape_result((2, 5, 384), [0, 0, -1, 64])
        (2, 5, 6, 64)
    """
    out = [int(t) for t in target]
    if not allowzero:
        for i, t in enumerate(out):
            if t == 0:
                if i >= len(in_shape):
                    return None
                out[i] = int(in_shape[i])
    total = math.prod(int(d) for d in in_shape)
    if out.count(-1) > 1 or any(t < -1 for t in out):
        return None
    if -1 in out:
        known = math.prod(t for t in out if t != -1)
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return tuple(out) if math.prod(out) == total else None


@dataclass(frozen=True)
class ShapePiece:
    """The constant entry of a shape value that holds one output axis.

    Attributes:
        value: the constant (the whole target, or the ``Concat`` input holding the entry).
        offset: index of the entry within ``value``.
        concat: the ``Concat`` node building the target (``None`` when the target is constant).
        index: which input of ``concat`` is ``value``.
    """

    value: ir.Value
    offset: int
    concat: ir.Node | None = None
    index: int = -1


def shape_piece(target: ir.Value, position: int,
                length_of: Callable[[ir.Value], int | None]) -> ShapePiece | None:
    """The constant entry of the shape ``target`` that holds entry ``position``, if any.

    Args:
        target: the shape input of a ``Reshape``.
        position: the entry (output axis) wanted.
        length_of: the length of a 1-D value that is not constant (e.g. from shape inference or
            a :class:`ShapeEvaluator`), ``None`` when unknown.

    Returns:
        The piece, or ``None`` when the entry is computed at run time.

    Example:
        >>> piece = shape_piece(reshape.inputs[1], 2, length_of)  # doctest: +SKIP
        >>> constant_array(piece.value)[piece.offset]  # doctest: +SKIP
        12
    """
    array = constant_array(target)
    if array is not None:
        return ShapePiece(target, position) if array.ndim == 1 and 0 <= position < array.size else None
    concat = target.producer
    if concat is None or concat.op_type != "Concat" or concat.domain not in _DEFAULT:
        return None
    offset = 0
    for index, piece in enumerate(concat.inputs):
        if piece is None:
            return None
        array = constant_array(piece)
        length = int(array.size) if array is not None else length_of(piece)
        if length is None:
            return None
        if offset <= position < offset + length:
            return ShapePiece(piece, position - offset, concat, index) if array is not None else None
        offset += length
    return None


def _ints(array: np.ndarray | None) -> list[int] | None:
    return None if array is None else [int(x) for x in np.asarray(array).reshape(-1)]


class ShapeEvaluator:
    """Values of small integer tensors computed from shapes, for given shapes of the tensors read.

    Args:
        shape_of: the (concrete) shape of a value as seen by this evaluation, ``None`` if unknown.
        value_of: an override for the value of some tensors (checked before anything else);
            returns ``None`` to fall through.

    Example:
        >>> evaluator = ShapeEvaluator(lambda v: shapes.get(v.name))  # doctest: +SKIP
        >>> evaluator.value(reshape.inputs[1])  # doctest: +SKIP
        array([7, 7, -1, 64])
    """

    def __init__(self, shape_of: Callable[[ir.Value], tuple[int, ...] | None],
                 value_of: Callable[[ir.Value], np.ndarray | None] | None = None) -> None:
        self.shape_of = shape_of
        self.value_of = value_of
        self._memo: dict[int, np.ndarray | None] = {}

    def value(self, v: ir.Value | None, depth: int = 0) -> np.ndarray | None:
        """The value of ``v``, or ``None`` when it is not a small shape computation."""
        if v is None:
            return None
        key = id(v)
        if key in self._memo:
            return self._memo[key]
        result = self._compute(v, depth)
        if result is not None and result.size > MAX_ELEMENTS:
            result = None
        self._memo[key] = result
        return result

    def _compute(self, v: ir.Value, depth: int) -> np.ndarray | None:
        if self.value_of is not None:
            given = self.value_of(v)
            if given is not None:
                return given
        array = constant_array(v)
        if array is not None:
            return array if array.size <= MAX_ELEMENTS else None
        node = v.producer
        if node is None or node.domain not in _DEFAULT or depth > 64 or len(node.outputs) != 1:
            return None
        op = node.op_type
        if op in ("Shape", "Size"):
            shape = self.shape_of(node.inputs[0])
            if shape is None or any(not isinstance(d, int) for d in shape):
                return None
            if op == "Size":
                return np.array(math.prod(shape), dtype=np.int64)
            rank = len(shape)
            start, end = node.attr("start", 0), node.attr("end", None)
            return np.array(shape[slice(start, rank if end is None else end)], dtype=np.int64)
        if op not in EVALUATED_OPS:
            return None
        args = [self.value(x, depth + 1) if x is not None else None for x in node.inputs]
        present = [a for a, x in zip(args, node.inputs) if x is not None]
        if any(a is None for a in present):
            return None
        try:
            return _apply(node, args)
        except (ValueError, IndexError, TypeError, ZeroDivisionError, OverflowError):
            return None


def _apply(node: ir.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    """One integer shape op on numpy arrays (``None`` for ops outside the set)."""
    op = node.op_type
    x = args[0] if args else None
    if op in ("Identity", "Cast") and x is not None:
        if op == "Cast":
            return np.asarray(x).astype(ir.numpy_dtype(int(node.attr("to"))))
        return x
    if op == "Gather" and x is not None and args[1] is not None:
        return np.take(x, args[1].astype(np.int64), axis=int(node.attr("axis", 0)))
    if op in ("Unsqueeze", "Squeeze") and x is not None:
        axes = _ints(args[1]) if len(args) > 1 and args[1] is not None else node.attr("axes", None)
        if op == "Unsqueeze":
            rank = x.ndim + len(axes or ())
            for a in sorted(int(a) % rank for a in axes or ()):
                x = np.expand_dims(x, a)
            return x
        return np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in axes))
    if op == "Concat":
        return np.concatenate([a for a in args if a is not None], axis=int(node.attr("axis", 0)))
    if op == "Slice" and x is not None:
        starts, ends = _ints(args[1]), _ints(args[2])
        axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts or [])))
        steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(axes)
        index = [slice(None)] * x.ndim
        for s, e, a, st in zip(starts or [], ends or [], axes, steps):
            index[a % x.ndim] = slice(s, e, st)
        return x[tuple(index)]
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum,
              "Min": np.minimum, "Equal": np.equal, "Less": np.less, "Greater": np.greater,
              "And": np.logical_and, "Or": np.logical_or}
    if op in binary and len(args) == 2:
        return np.asarray(binary[op](args[0], args[1]))
    if op == "Div" and len(args) == 2:
        a, b = np.asarray(args[0]), np.asarray(args[1])
        if a.dtype.kind in "iu":
            return (np.trunc(a / b)).astype(a.dtype)  # ONNX integer division truncates
        return a / b
    if op in ("Neg", "Abs", "Not") and x is not None:
        return {"Neg": np.negative, "Abs": np.abs, "Not": np.logical_not}[op](x)
    if op == "Where" and len(args) == 3:
        return np.where(args[0], args[1], args[2])
    if op == "Reshape" and x is not None and args[1] is not None:
        shape = reshape_result(x.shape, _ints(args[1]) or [], bool(node.attr("allowzero", 0)))
        return None if shape is None else x.reshape(shape)
    if op == "Expand" and x is not None and args[1] is not None:
        return x * np.ones(tuple(_ints(args[1]) or ()), dtype=x.dtype)
    if op == "ConstantOfShape" and x is not None:
        fill = node.attr("value", None)
        array = fill.numpy().reshape(-1) if isinstance(fill, ir.Tensor) else np.zeros(1, np.float32)
        return np.full(tuple(_ints(x) or ()), array[0], dtype=array.dtype)
    if op == "Range" and len(args) == 3:
        return np.arange(args[0], args[1], args[2])
    return None
