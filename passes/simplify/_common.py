"""Facts about nodes and values that several simplification rules read: opsets, axes, shapes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphopt import ir
# Shared with the cleanup passes: which values a pass may never drop or rename.
from graphopt.passes.cleanup._scope import is_default_domain, pinned_outputs, training_names
from graphopt.rewrite import constant_value

__all__ = [
    "AXES_ABSENT",
    "INT_MAX",
    "STANDARD_DOMAINS",
    "axes_given",
    "broadcast_keeps_shape",
    "dims_of",
    "int_list",
    "is_default_domain",
    "is_full_shape_of",
    "node_axes",
    "normalize_axes",
    "pinned_outputs",
    "training_names",
]

#: Domains whose operator semantics the simplification passes know.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})

#: Slice ``ends`` at or above this value read "to the end of the axis" whatever its length.
INT_MAX = 2**31 - 1

#: What :func:`node_axes` returns when the node has no axes at all (attribute and input absent).
AXES_ABSENT: tuple[int, ...] = ()


def int_list(value: ir.Value | None) -> list[int] | None:
    """The elements of a constant integer tensor of rank 0 or 1, else ``None``.

    Example:
        >>> int_list(shape_initializer)  # doctest: +SKIP
        [0, -1, 64]
    """
    array = constant_value(value)
    if array is None or array.ndim > 1 or not np.issubdtype(array.dtype, np.integer):
        return None
    return [int(v) for v in array.reshape(-1)]


def dims_of(value: ir.Value | None) -> tuple[ir.Dim, ...] | None:
    """The dims of a tensor value of known rank (ints, symbolic names or ``None``), else ``None``."""
    if value is None:
        return None
    shape = value.shape
    return None if shape is None else tuple(shape.dims)


def node_axes(node: ir.Node, *, input_since: int, input_index: int = 1,
              attribute: str = "axes") -> tuple[int, ...] | None:
    """The ``axes`` of a node in the form its opset uses: an attribute before ``input_since``, an input after.

    Returns the axes, :data:`AXES_ABSENT` (an empty tuple) when the node gives none at all, or
    ``None`` when they are not known (an input that is not a constant, an unknown opset, or the
    form of another opset: an axes input before ``input_since``, an attribute from it on).
    Callers that must tell "absent" from "given but empty" check the node themselves.
    """
    version = node.version
    if version is None:
        return None
    has_input = len(node.inputs) > input_index and node.inputs[input_index] is not None
    if version < input_since:
        if has_input:
            return None
        axes = node.attr(attribute)
        if axes is None:
            return AXES_ABSENT
        return tuple(int(a) for a in axes)
    if attribute in node.attributes:
        return None
    if not has_input:
        return AXES_ABSENT
    source = node.inputs[input_index]
    values = int_list(source)
    return None if values is None else tuple(values)


def axes_given(node: ir.Node, *, input_since: int, input_index: int = 1, attribute: str = "axes") -> bool:
    """True when the node states its axes (attribute or input present, possibly empty)."""
    version = node.version or 0
    if version < input_since:
        return attribute in node.attributes
    return len(node.inputs) > input_index and node.inputs[input_index] is not None


def normalize_axes(axes: Sequence[int], rank: int | None) -> list[int] | None:
    """Axes made non-negative for a tensor of ``rank``; ``None`` when out of range or unknowable.

    Negative axes need the rank; without it only non-negative axes are accepted.
    """
    out: list[int] = []
    for a in axes:
        if a < 0:
            if rank is None:
                return None
            a += rank
        if a < 0 or (rank is not None and a >= rank):
            return None
        out.append(a)
    return out


def broadcast_keeps_shape(dims: Sequence[ir.Dim], other: Sequence[int]) -> bool:
    """True when broadcasting a tensor of ``dims`` with a static shape ``other`` gives ``dims`` back.

    ``other`` may not add dimensions, and each of its dims must be 1 or equal a known dim.
    """
    if len(other) > len(dims):
        return False
    for d, o in zip(dims[len(dims) - len(other):], other):
        if o == 1:
            continue
        if not isinstance(d, int) or d != o:
            return False
    return True


def is_full_shape_of(shape: ir.Value, x: ir.Value) -> bool:
    """True when ``shape`` is computed as ``Shape(x)`` over every axis of ``x``."""
    node = shape.producer
    if node is None or node.op_type != "Shape" or not is_default_domain(node.domain):
        return False
    if not node.inputs or node.inputs[0] is not x:
        return False
    start = node.attr("start", 0)
    if start != 0 and not (start < 0 and (rank := _rank(x)) is not None and start <= -rank):
        return False
    end = node.attr("end")
    if end is None:
        return True
    rank = _rank(x)
    return rank is not None and end >= rank


def _rank(value: ir.Value) -> int | None:
    dims = dims_of(value)
    return None if dims is None else len(dims)

