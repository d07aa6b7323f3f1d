"""Checks and array helpers the fusion rules share: dtypes, opsets, constants, broadcasting.

Every helper that decides whether a rule may fire returns ``None`` when the fact holds and a
short reason otherwise, so checks read ``reason = ...; if reason: return Failure(reason)`` and
the why-not tracer shows the reason.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx

from graphopt import ir
from graphopt.rewrite import MatchContext, constant_value

__all__ = ["FLOAT_DTYPES", "element_type", "default_opset", "opset_reason", "float_reason",
           "not_constant_reason", "exclusive_constant", "optional_constant", "checked_constant",
           "static_rank", "channel_vector", "scalar_constant", "close_to", "cast_like", "typed",
           "combined_size_reason", "normalized_dims", "reduce_axes", "over_normalized_axes",
           "batch_norm_reason", "batch_norm_affine", "bias_shape_reason"]

#: Element types the fusions rewrite: folding changes rounding, which is acceptable for floats only.
FLOAT_DTYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def default_opset(ctx: MatchContext) -> int | None:
    """The default-domain opset in force in the matched graph (model or function imports)."""
    imports = ctx.graph.opset_imports()
    return imports.get("", imports.get("ai.onnx"))


def opset_reason(ctx: MatchContext, minimum: int, emitted: str) -> str | None:
    """Why ``emitted`` cannot be created here: the default-domain opset is below ``minimum``."""
    version = default_opset(ctx)
    if version is None:
        return f"the default-domain opset is unknown, {emitted} needs opset {minimum}"
    if version < minimum:
        return f"{emitted} needs opset {minimum}, the graph imports opset {version}"
    return None


def element_type(value: ir.Value) -> int | None:
    """The element type of ``value``, read from its constant when it has no type.

    ``Constant`` outputs in function bodies carry no type: shapes are not inferred there.
    """
    if value.dtype is not None:
        return value.dtype
    array = constant_value(value)
    if array is None:
        return None
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, ValueError, TypeError):
        return None


def float_reason(value: ir.Value) -> str | None:
    """Why ``value`` is not a float32/float16/double tensor (``None`` when it is)."""
    dtype = element_type(value)
    if dtype is None:
        return f"the element type of '{value.name}' is unknown"
    if dtype not in FLOAT_DTYPES:
        return f"'{value.name}' has element type {ir.dtype_name(dtype)}; only float, float16 and double fold"
    return None


def not_constant_reason(value: ir.Value, what: str) -> str:
    """Why ``value`` (known not to be constant) is not: a graph input callers may override, or computed."""
    kind = "a graph input (callers may override it)" if value.is_graph_input() else "not a constant"
    return f"{what} '{value.name}' is {kind}"


def exclusive_constant(value: ir.Value, what: str) -> np.ndarray | str:
    """The array of a constant that only one node reads, or the reason it cannot be replaced.

    A fused weight is a new tensor. When another node still reads the old one, both would be
    stored, so a shared weight is left alone rather than doubling its storage.
    """
    array = constant_value(value)
    if array is None:
        return not_constant_reason(value, what)
    if value.num_uses > 1:
        return (f"{what} '{value.name}' is shared with {value.num_uses - 1} other use(s); a folded copy "
                "would store it twice")
    return array


def optional_constant(value: ir.Value | None, what: str) -> np.ndarray | str | None:
    """``None`` for an omitted input, the array of a constant, or the reason it is not constant."""
    if value is None:
        return None
    array = constant_value(value)
    return not_constant_reason(value, what) if array is None else array


def static_rank(value: ir.Value) -> int | None:
    """The rank of ``value`` when its shape is known (dims may be symbolic)."""
    shape = value.shape
    return None if shape is None else shape.rank


def channel_vector(array: np.ndarray, channels: int, rank: int, axis: int = 1) -> np.ndarray | None:
    """``array`` as a length-``channels`` vector when it broadcasts only along ``axis`` of a rank-``rank`` tensor.

    The array, left-padded with 1s to ``rank`` dims, must be 1 everywhere except at ``axis``,
    where it is ``channels`` or 1 (a scalar broadcasts to every channel). Anything of a higher
    rank, or varying along another axis, gives ``None``.

    Example:
        >>> channel_vector(np.ones((3, 1, 1)), channels=3, rank=4).shape
        (3,)
        >>> channel_vector(np.ones((1, 3, 2, 1)), channels=3, rank=4) is None
        True
    """
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + tuple(array.shape)
    for i, dim in enumerate(shape):
        if i == axis:
            if dim not in (1, channels):
                return None
        elif dim != 1:
            return None
    flat = array.reshape(-1)
    return np.broadcast_to(flat, (channels,)).copy() if flat.size == 1 else flat.copy()


def scalar_constant(value: ir.Value, rank: int | None) -> float | None:
    """The number held by a one-element constant that cannot widen a rank-``rank`` operand.

    ``x * c`` keeps the shape of ``x`` only when ``c`` has no more dims than ``x``; with the rank
    of ``x`` unknown, only a rank-0 constant is safe.
    """
    array = constant_value(value)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    if array.ndim > (0 if rank is None else rank):
        return None
    return float(array.reshape(-1)[0])


def close_to(actual: float | None, expected: float, rtol: float) -> bool:
    """``actual`` is a number within ``rtol`` (relative) of ``expected``."""
    return actual is not None and abs(actual - expected) <= rtol * abs(expected)


def checked_constant(value: ir.Value) -> np.ndarray:
    """The array of a value that the rule's check already found constant (for ``rewrite``)."""
    array = constant_value(value)
    if array is None:
        raise AssertionError(f"'{value.name}' was checked to be a constant")
    return array


def _known_type(value: ir.Value) -> int:
    dtype = element_type(value)
    if dtype is None:
        raise AssertionError(f"the element type of '{value.name}' was checked to be known")
    return dtype


def typed(value: ir.Value, like: ir.Value, shape: ir.Shape | None = None) -> ir.Value:
    """Give ``value``, built by a rewrite, the element type of ``like`` (and ``shape``); return it.

    The driver types only the value that replaces the pattern's root; an intermediate built
    by the rewrite would otherwise stay untyped, and refused by the next rule's dtype check,
    until shapes are inferred again.
    """
    value.type = ir.TensorType(_known_type(like), shape)
    return value


def cast_like(array: np.ndarray, like: ir.Value) -> np.ndarray:
    """``array`` (computed in float64) rounded to the element type of ``like``."""
    return np.asarray(array).astype(ir.numpy_dtype(_known_type(like)))


def combined_size_reason(first: Sequence[int], second: Sequence[int]) -> str | None:
    """Why constants of shapes ``first`` and ``second`` should not be combined into one (``None``: fine).

    Their elementwise product or sum has the broadcast shape, which must not hold more
    elements than the larger of the two: ``[C,1,1]`` with ``[W]`` would be ``[C,1,W]``.
    """
    try:
        shape = np.broadcast_shapes(tuple(first), tuple(second))
    except ValueError:
        return f"constants of shapes {list(first)} and {list(second)} do not broadcast"
    size = int(np.prod(shape))
    if size > max(int(np.prod(first)), int(np.prod(second))):
        return f"combining shapes {list(first)} and {list(second)} would store {size} elements"
    return None


# -- BatchNormalization ------------------------------------------------------------------------
def batch_norm_reason(bn: ir.Node) -> str | None:
    """Why ``bn`` is not an inference-mode, per-channel BatchNormalization (``None`` when it is).

    Opset 14+ ``training_mode=1`` updates running statistics and normalizes with the batch's
    own; opset < 7 ``is_test=0`` is training too; opset 7-8 ``spatial=0`` keeps statistics per
    element rather than per channel. None of those is an affine map of the input.
    """
    version = bn.version
    if version is None:
        return "the opset of BatchNormalization is unknown"
    if bn.attr("training_mode", 0) != 0:
        return "BatchNormalization runs in training mode (training_mode=1)"
    if version < 7 and bn.attr("is_test", 0) != 1:
        return "BatchNormalization runs in training mode (is_test=0)"
    if version < 9 and bn.attr("spatial", 1) != 1:
        return "BatchNormalization has spatial=0 (per-element statistics)"
    return None


def batch_norm_affine(bn: ir.Node, channels: int | None = None) -> tuple[np.ndarray, np.ndarray] | str:
    """``(scale, shift)`` in float64 with ``bn(x) = x·scale + shift`` per channel, or why not.

    ``scale = γ/√(σ²+ε)`` and ``shift = β − μ·scale``. The four parameters must be constant
    vectors of one length (``channels`` when given) and the result finite.
    """
    reason = batch_norm_reason(bn)
    if reason:
        return reason
    params = []
    for index, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")):
        value = bn.inputs[index] if len(bn.inputs) > index else None
        array = constant_value(value)
        if value is None or array is None:
            name = "missing" if value is None else f"'{value.name}'"
            return f"BatchNormalization {what} {name} is not a constant"
        if array.ndim != 1:
            return f"BatchNormalization {what} '{value.name}' has shape {list(array.shape)}, expected [C]"
        params.append(array.astype(np.float64))
    gamma, beta, mean, var = params
    size = gamma.shape[0]
    if any(p.shape[0] != size for p in params) or (channels is not None and size != channels):
        expected = size if channels is None else channels
        return f"BatchNormalization parameters do not all have {expected} channel(s)"
    epsilon = float(bn.attr("epsilon", 1e-5))
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(var + epsilon)
        shift = beta - mean * scale
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return "BatchNormalization statistics give a non-finite scale (variance + epsilon <= 0?)"
    return scale, shift


def bias_shape_reason(bias_shape: Sequence[int], rows: ir.Dim, cols: int) -> str | None:
    """Why a constant of ``bias_shape`` added to an ``[rows, cols]`` product is not a Gemm ``C``.

    Gemm's ``C`` broadcasts one way, to ``[M, N]``; the sum keeps the product's shape only when
    the bias has at most 2 dims, its last is 1 or ``N`` and its first (of 2) 1 or a known ``M``.
    """
    shape = tuple(bias_shape)
    if len(shape) > 2:
        return f"bias of shape {list(shape)} has more than 2 dims"
    if shape and shape[-1] not in (1, cols):
        return f"bias of shape {list(shape)} does not broadcast to {cols} column(s)"
    if len(shape) == 2 and shape[0] != 1 and shape[0] != rows:
        return f"bias of shape {list(shape)} needs {shape[0]} rows; the product has {rows!r}"
    return None


# -- normalizations ----------------------------------------------------------------------------
def normalized_dims(x: ir.Value, axis: int) -> tuple[int, ...] | str:
    """The static dims of ``x`` from ``axis`` (negative counts from the end) to its last, or why not.

    LayerNormalization and RMSNormalization take a scale of exactly this shape.
    """
    shape = x.shape
    if shape is None:
        return f"the rank of '{x.name}' is not known"
    rank = shape.rank
    if not -rank <= axis < rank:
        return f"axis {axis} is out of range for rank {rank}"
    tail = shape.dims[axis % rank:]
    if not all(isinstance(d, int) for d in tail):
        return f"the normalized dims {list(tail)} of '{x.name}' are not static"
    return tuple(int(d) for d in tail)  # type: ignore[arg-type]


def reduce_axes(node: ir.Node, rank: int) -> list[int] | str:
    """The sorted, non-negative axes a ``keepdims=1`` ReduceMean reduces, or why they are not known."""
    version = node.version
    if version is None:
        return "the opset of ReduceMean is unknown"
    if node.attr("keepdims", 1) != 1:
        return "ReduceMean has keepdims=0"
    if version < 18:
        axes = node.attr("axes")
        values = None if axes is None else [int(a) for a in axes]
    else:
        source = node.inputs[1] if len(node.inputs) > 1 else None
        array = constant_value(source) if source is not None else None
        values = None if array is None else [int(a) for a in array.reshape(-1)]
    if not values:
        return "ReduceMean axes are absent, empty or not a constant"
    if any(not -rank <= a < rank for a in values):
        return f"ReduceMean axes {values} are out of range for rank {rank}"
    return sorted({a % rank for a in values})


def over_normalized_axes(array: np.ndarray, rank: int, dims: tuple[int, ...]) -> np.ndarray | None:
    """``array`` broadcast to ``dims``, when it varies only along the last ``len(dims)`` of ``rank`` axes.

    ``LN(x)·γ`` folds into the LayerNormalization scale only when ``γ`` neither widens the
    output (more dims than ``x``) nor varies along a leading, non-normalized axis.

    Example:
        >>> over_normalized_axes(np.ones((1, 1, 4)), 3, (4,)).shape
        (4,)
        >>> over_normalized_axes(np.ones((2, 1, 4)), 3, (4,)) is None
        True
    """
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + tuple(array.shape)
    lead = rank - len(dims)
    if any(d != 1 for d in shape[:lead]):
        return None
    try:
        return np.broadcast_to(array.reshape(shape[lead:]), dims).copy()
    except ValueError:
        return None
