"""Symbolic values of small integer tensors: the shape arithmetic of exported models.

Exporters compute shapes at run time: ``Shape -> Gather/Slice -> Concat/Unsqueeze -> Reshape``.
Where a value is a small 1-D (or scalar) integer tensor derived from shapes, each element is
tracked as a known ``int``, a symbolic dim name (``"batch"``), or ``None``. An element that
is an ``int`` is a fact about every run of the model, so a value whose elements are all ints
can be folded to a constant, even though the tensor it was measured on is not constant.

Example: ``x: float[N, 3, 224, 224]``, ``Shape(x)`` is ``("N", 3, 224, 224)``; its
``Slice(1:)`` is ``(3, 224, 224)``: fully known, so it folds although ``N`` is symbolic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import onnx

from graphopt import ir

__all__ = ["SymValue", "SymbolicValues", "MAX_ELEMENTS"]

#: Integer tensors with more elements than this are not tracked (shapes are short).
MAX_ELEMENTS = 64

_INT_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


@dataclass(frozen=True)
class SymValue:
    """Elements of a small integer tensor (int, symbol name or ``None``); ``scalar`` for rank 0."""

    elements: tuple[ir.Dim, ...]
    scalar: bool = False

    def is_known(self) -> bool:
        """True when every element is a known integer."""
        return all(isinstance(e, int) for e in self.elements)

    def array(self, dtype: int) -> np.ndarray:
        """The known elements as an array of ONNX element type ``dtype``."""
        arr = np.array([int(e) for e in self.elements], dtype=ir.numpy_dtype(dtype))  # type: ignore[arg-type]
        return arr.reshape(()) if self.scalar else arr


def _is_default(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _const_ints(value: ir.Value | None) -> Optional[list[int]]:
    """The elements of a small constant integer tensor, flattened (``None`` when not one)."""
    if value is None or not value.is_constant() or not isinstance(value.const_value, ir.Tensor):
        return None
    tensor = value.const_value
    if tensor.dtype not in _INT_TYPES or tensor.size > MAX_ELEMENTS:
        return None
    return [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _binary(op: str, a: ir.Dim, b: ir.Dim) -> ir.Dim:
    if not isinstance(a, int) or not isinstance(b, int):
        if op == "Mul" and (a == 0 or b == 0) and (isinstance(a, int) or isinstance(b, int)):
            return 0
        if op == "Mul" and a == 1:
            return b
        if op == "Mul" and b == 1:
            return a
        if op in ("Add", "Sub") and b == 0:
            return a
        if op == "Add" and a == 0:
            return b
        return None
    if op == "Add":
        return a + b
    if op == "Sub":
        return a - b
    if op == "Mul":
        return a * b
    if op == "Div":
        if b == 0:
            return None
        q = abs(a) // abs(b)  # ONNX integer division truncates toward zero
        return q if (a >= 0) == (b >= 0) else -q
    return None


class SymbolicValues:
    """Computes (and caches) :class:`SymValue` of values, reading shapes from value types.

    ``shape_of`` says where shapes come from (by default ``Value.shape``); a graph that may run
    its nodes with varying shapes (a ``Loop`` body) must not be analysed this way.

    Example:
        >>> sym = SymbolicValues()
        >>> sym.get(shape_node.outputs[0])  # doctest: +SKIP
        SymValue(elements=('N', 3, 224, 224), scalar=False)
    """

    def __init__(self, shape_of: Callable[[ir.Value], Optional[ir.Shape]] | None = None) -> None:
        self._cache: dict[int, Optional[SymValue]] = {}
        self._shape_of = shape_of or (lambda v: v.shape)

    def get(self, value: ir.Value | None) -> Optional[SymValue]:
        """The symbolic elements of ``value``, or ``None`` when it is not a tracked tensor."""
        if value is None:
            return None
        key = id(value)
        if key not in self._cache:
            self._cache[key] = None  # guards against cycles in broken graphs
            self._cache[key] = self._compute(value)
        return self._cache[key]

    def forget(self) -> None:
        """Drop cached results (after the graph changed)."""
        self._cache.clear()

    def _compute(self, value: ir.Value) -> Optional[SymValue]:
        if value.is_constant() and isinstance(value.const_value, ir.Tensor):
            ints = _const_ints(value)
            if ints is None or len(value.const_value.shape) > 1:
                return None
            return SymValue(tuple(ints), scalar=len(value.const_value.shape) == 0)
        node = value.producer
        if node is None or not _is_default(node) or value.index != 0:
            return None
        op = node.op_type
        handler = getattr(self, "_op_" + op, None)
        if handler is None:
            return None
        result = handler(node)
        if result is not None and len(result.elements) > MAX_ELEMENTS:
            return None
        return result

    # -- producers of shape values ---------------------------------------------------------------
    def _op_Shape(self, node: ir.Node) -> Optional[SymValue]:
        shape = self._shape_of(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
        if shape is None and node.inputs and node.inputs[0] is not None:
            shape = _structural_shape(node.inputs[0])
        shape = _more_precise(shape, self._constant_of_shape_dims(node.inputs[0] if node.inputs else None))
        if shape is None:
            return None
        rank = shape.rank
        start = node.attr("start", 0)
        end = node.attr("end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return SymValue(tuple(_dim(d) for d in shape.dims[start:end]))

    def _op_Size(self, node: ir.Node) -> Optional[SymValue]:
        shape = self._shape_of(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
        shape = _more_precise(shape, self._constant_of_shape_dims(node.inputs[0] if node.inputs else None))
        if shape is None or not shape.is_static():
            return None
        return SymValue((shape.numel(),), scalar=True)

    def _op_Constant(self, node: ir.Node) -> Optional[SymValue]:
        if len(node.attributes) != 1:
            return None
        attr = next(iter(node.attributes.values()))
        if attr.ref_attr_name:
            return None
        if attr.name == "value_int":
            return SymValue((int(attr.value),), scalar=True)
        if attr.name == "value_ints" and len(attr.value) <= MAX_ELEMENTS:
            return SymValue(tuple(int(x) for x in attr.value))
        tensor = attr.value if attr.name == "value" else None
        if (not isinstance(tensor, ir.Tensor) or tensor.dtype not in _INT_TYPES
                or tensor.size > MAX_ELEMENTS or len(tensor.shape) > 1):
            return None
        ints = [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]
        return SymValue(tuple(ints), scalar=len(tensor.shape) == 0)

    def _constant_of_shape_dims(self, value: ir.Value | None) -> Optional[ir.Shape]:
        """The shape of ``ConstantOfShape(s)``'s output: the elements of ``s``, read symbolically.

        The tensor itself is never needed (it may be far too large to build). A negative
        element (an error at run time) is unknown, so nothing computed from it folds.
        """
        node = value.producer if value is not None else None
        if (node is None or not _is_default(node) or node.op_type != "ConstantOfShape"
                or not node.inputs or node.inputs[0] is None):
            return None
        dims = self.get(node.inputs[0])
        if dims is None or dims.scalar:
            return None
        return ir.Shape([_dim(d) for d in dims.elements])

    # -- element selection and assembly ----------------------------------------------------------
    def _op_Identity(self, node: ir.Node) -> Optional[SymValue]:
        return self.get(node.inputs[0])

    def _op_Cast(self, node: ir.Node) -> Optional[SymValue]:
        if node.attr("to") not in _INT_TYPES:
            return None
        return self.get(node.inputs[0])

    def _op_Gather(self, node: ir.Node) -> Optional[SymValue]:
        data = self.get(node.inputs[0])
        if data is None or data.scalar or node.attr("axis", 0) not in (0, -1):
            return None
        indices = node.inputs[1] if len(node.inputs) > 1 else None
        picks = _const_ints(indices)
        if picks is None or indices is None or indices.const_value is None:
            return None
        n = len(data.elements)
        out: list[ir.Dim] = []
        for i in picks:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                return None
            out.append(data.elements[j])
        rank = len(indices.const_value.shape)
        if rank > 1:
            return None
        return SymValue(tuple(out), scalar=rank == 0)

    def _op_Slice(self, node: ir.Node) -> Optional[SymValue]:
        data = self.get(node.inputs[0])
        if data is None or data.scalar:
            return None
        if (node.version or 13) < 10:
            starts, ends = list(node.attr("starts", ())), list(node.attr("ends", ()))
            axes = list(node.attr("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            ins = list(node.inputs) + [None] * (5 - len(node.inputs))
            starts_, ends_ = _const_ints(ins[1]), _const_ints(ins[2])
            if starts_ is None or ends_ is None:
                return None
            starts, ends = starts_, ends_
            axes_ = _const_ints(ins[3]) if ins[3] is not None else list(range(len(starts)))
            steps_ = _const_ints(ins[4]) if ins[4] is not None else [1] * len(starts)
            if axes_ is None or steps_ is None:
                return None
            axes, steps = axes_, steps_
        if len(starts) != 1 or len(ends) != 1 or len(axes) != 1 or axes[0] not in (0, -1):
            return None
        if steps[0] <= 0:
            return None  # negative steps clamp differently from Python slices
        # With a positive step, ONNX slicing of one axis matches Python's (ends clamp to the size).
        return SymValue(data.elements[slice(starts[0], ends[0], steps[0])])

    def _op_Concat(self, node: ir.Node) -> Optional[SymValue]:
        if node.attr("axis", 0) not in (0, -1):
            return None
        parts: list[ir.Dim] = []
        for v in node.inputs:
            sv = self.get(v)
            if sv is None or sv.scalar:
                return None
            parts.extend(sv.elements)
        return SymValue(tuple(parts))

    def _op_Unsqueeze(self, node: ir.Node) -> Optional[SymValue]:
        data = self.get(node.inputs[0])
        if data is None or not data.scalar:
            return None
        axes = node.attr("axes") if (node.version or 13) < 13 else _const_ints(
            node.inputs[1] if len(node.inputs) > 1 else None)
        if axes is None or list(axes) not in ([0], [-1]):
            return None
        return SymValue(data.elements)

    def _op_Squeeze(self, node: ir.Node) -> Optional[SymValue]:
        data = self.get(node.inputs[0])
        if data is None or data.scalar or len(data.elements) != 1:
            return None
        if (node.version or 13) < 13:
            axes = node.attr("axes")
        else:
            axes = _const_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else [0]
        if axes is None or list(axes) not in ([0], [-1]):
            return None
        return SymValue(data.elements, scalar=True)

    def _elementwise(self, node: ir.Node) -> Optional[SymValue]:
        if len(node.inputs) != 2:
            return None
        a, b = self.get(node.inputs[0]), self.get(node.inputs[1])
        if a is None or b is None:
            return None
        ea, eb = a.elements, b.elements
        if len(ea) == 1 and len(eb) != 1:
            ea = ea * len(eb)
        elif len(eb) == 1 and len(ea) != 1:
            eb = eb * len(ea)
        if len(ea) != len(eb):
            return None
        return SymValue(tuple(_binary(node.op_type, x, y) for x, y in zip(ea, eb)),
                        scalar=a.scalar and b.scalar)

    _op_Add = _op_Sub = _op_Mul = _op_Div = _elementwise


#: Ops whose output has the shape of their first input (the other inputs, if any, are scalars).
_SAME_SHAPE_UNARY = frozenset({"Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Identity",
                               "LeakyRelu", "Elu", "Selu", "HardSigmoid", "HardSwish", "Softplus", "Softsign",
                               "Mish", "Gelu", "Celu", "ThresholdedRelu", "Reciprocal", "Floor", "Ceil", "Sign",
                               "Sin", "Cos", "Not", "IsNaN", "Round", "Cast"})


def _structural_shape(value: ir.Value) -> Optional[ir.Shape]:
    """What an operator's definition alone says about its output's shape, when inference said nothing.

    ``Conv``: the output has the weight's rank and ``W.shape[0]`` channels on axis 1, whatever
    the input (an input of another rank is an error at run time), e.g. ``[?, M, ?]`` for a 1-D
    convolution. Other dims stay unknown. Unary elementwise ops after it keep that shape.
    """
    node = value.producer
    while node is not None and _is_default(node) and node.op_type in _SAME_SHAPE_UNARY and node.inputs \
            and node.inputs[0] is not None:
        node = node.inputs[0].producer  # these ops keep the shape of their only tensor input
    if node is None or not _is_default(node) or node.op_type != "Conv" or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if weight is None or not weight.is_constant() or not isinstance(weight.const_value, ir.Tensor):
        return None
    dims = weight.const_value.shape
    if len(dims) < 3:
        return None
    return ir.Shape([None, int(dims[0])] + [None] * (len(dims) - 2))


def _more_precise(a: Optional[ir.Shape], b: Optional[ir.Shape]) -> Optional[ir.Shape]:
    """Two facts about one shape merged, dim by dim: a known int beats a symbol beats unknown.

    Facts of different ranks contradict each other (the model fails at run time): nothing is
    known then.
    """
    if a is None or b is None:
        return a if b is None else b
    if a.rank != b.rank:
        return None

    def pick(x: ir.Dim, y: ir.Dim) -> ir.Dim:
        x, y = _dim(x), _dim(y)
        if isinstance(x, int) or (x is not None and not isinstance(y, int)):
            return x
        return y

    return ir.Shape([pick(x, y) for x, y in zip(a.dims, b.dims)])


def _dim(d: ir.Dim) -> ir.Dim:
    """A dim as an element: symbolic names are kept, negative or unknown ones are ``None``."""
    if isinstance(d, int):
        return d if d >= 0 else None
    return d or None
