"""Checks the contrib fusions share: target kernels, element types, shapes and scalar constants.

Every helper that decides whether a rule may fire returns ``None`` when the fact holds and a
short reason otherwise, so checks read ``reason = ...; if reason: return Failure(reason)`` and
``graphopt why-not`` shows the reason.
"""

from __future__ import annotations

from typing import Any, Sequence

import onnx

from graphopt import ir
from graphopt.rewrite import MatchContext, constant_value

from graphopt.passes.contrib.capabilities import CONTRIB_DOMAIN, provider_supports

__all__ = ["CONTRIB_DOMAIN", "kernel_reason", "float32_reason", "scalar_constant", "static_rank",
           "same_dim", "same_shape_reason", "last_dim", "vector_constant_reason", "dims_text",
           "contrib_attr", "constant_shape"]

#: The element types the fusions rewrite (kernel support is then checked per target).
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def kernel_reason(ctx: MatchContext, op_type: str, value: ir.Value) -> str | None:
    """Why ``com.microsoft::op_type`` cannot be emitted for ``value``'s element type on the target.

    Example:
        >>> kernel_reason(ctx, "BiasAdd", x)  # doctest: +SKIP
        "target 'cpu' has no com.microsoft::BiasAdd kernel for float"
    """
    dtype = value.dtype
    if dtype is None:
        return f"the element type of '{value.name}' is unknown"
    if dtype not in _FLOAT_TYPES:
        return f"'{value.name}' has element type {ir.dtype_name(dtype)}; only float and float16 are fused"
    if not provider_supports(ctx.target, op_type, CONTRIB_DOMAIN, dtype):
        return f"target '{ctx.target}' has no {CONTRIB_DOMAIN}::{op_type} kernel for {ir.dtype_name(dtype)}"
    return None


def float32_reason(value: ir.Value) -> str | None:
    """Why ``value`` is not known to be a float32 tensor."""
    if value.dtype != onnx.TensorProto.FLOAT:
        found = "unknown" if value.dtype is None else ir.dtype_name(value.dtype)
        return f"'{value.name}' has element type {found}, expected float"
    return None


def static_rank(value: ir.Value) -> int | None:
    """The rank of ``value`` when its shape is known (dims may be symbolic)."""
    shape = value.shape
    return None if shape is None else shape.rank


def constant_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of the array :func:`constant_value` would return for ``value``, without decoding it.

    Rule checks often ask only "is this constant 2-D?"; decoding a 9 MB weight to answer costs
    milliseconds, and such checks run thousands of times per model.

    Example:
        >>> constant_shape(graph.initializers["w"])  # doctest: +SKIP
        (768, 768)
    """
    if value is None:
        return None
    tensor = value.const_value
    if tensor is not None:
        return tuple(tensor.shape) if isinstance(tensor, ir.Tensor) and not value.is_graph_input() else None
    node = value.producer
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        if attr is not None and not attr.ref_attr_name and isinstance(attr.value, ir.Tensor) \
                and len(node.attributes) == 1:
            return tuple(attr.value.shape)
    array = constant_value(value)  # other Constant forms hold a few numbers
    return None if array is None else tuple(array.shape)


def scalar_constant(value: ir.Value, rank: int | None) -> float | None:
    """The number in a one-element float constant that cannot widen a rank-``rank`` operand.

    ``x * c`` keeps the shape of ``x`` only when ``c`` has no more dims than ``x``; with the rank
    of ``x`` unknown, only a rank-0 constant is safe.
    """
    array = constant_value(value)
    if array is None or array.size != 1 or array.dtype.kind != "f":
        return None
    if array.ndim > (0 if rank is None else rank):
        return None
    return float(array.reshape(-1)[0])


def same_dim(a: ir.Dim, b: ir.Dim) -> bool:
    """True when two dims are provably equal: equal sizes or the same symbol (never unknown)."""
    return a is not None and b is not None and a == b


def same_shape_reason(a: ir.Value, b: ir.Value) -> str | None:
    """Why ``a`` and ``b`` are not provably of one shape (same rank, every dim provably equal).

    Dims unknown to shape inference are compared by where they come from (see
    :func:`graphopt.passes.contrib._shapes.same_shape`).
    """
    from graphopt.passes.contrib._shapes import same_shape

    sa, sb = a.shape, b.shape
    if sa is None or sb is None:
        missing = a if sa is None else b
        return f"the shape of '{missing.name}' is unknown"
    if not same_shape(a, b):
        return f"'{a.name}' {dims_text(sa.dims)} and '{b.name}' {dims_text(sb.dims)} may differ in shape"
    return None


def last_dim(value: ir.Value) -> int | None:
    """The last dim of ``value`` when its shape is known and that dim is a number."""
    shape = value.shape
    if shape is None or shape.rank == 0:
        return None
    dim = shape.dims[-1]
    return dim if isinstance(dim, int) else None


def vector_constant_reason(value: ir.Value | None, size: int | None, what: str) -> str | None:
    """Why ``value`` is not a constant 1-D tensor of ``size`` elements."""
    if value is None:
        return f"{what} is missing"
    array = constant_value(value)
    if array is None:
        kind = "a graph input (callers may override it)" if value.is_graph_input() else "not a constant"
        return f"{what} '{value.name}' is {kind}"
    if array.ndim != 1 or size is None or array.shape[0] != size:
        expected = "?" if size is None else size
        return f"{what} '{value.name}' has shape {list(array.shape)}, expected [{expected}]"
    return None


def dims_text(dims: Sequence[Any]) -> str:
    """``[N,128,768]`` for messages (unknown dims as ``?``)."""
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def contrib_attr(node: ir.Node, name: str, default: Any) -> Any:
    """An attribute of a contrib node (onnx has no schema for them, so defaults are given here)."""
    return node.attr(name, default)


