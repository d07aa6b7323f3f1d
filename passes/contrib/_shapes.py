"""Proving what a ``Reshape`` does when its target shape is computed at run time.

Exporters write the target of a head split as ``Concat(Unsqueeze(Gather(Shape(x), 0)), ...,
[N], [D])`` or ``Concat(Shape(x, start=0, end=2), [-1], [D])``; shape inference often cannot
give the result's dims (they depend on data). This module reads such a target symbolically: each
element is an int or a reference ``(t, j)`` to dim ``j`` of some tensor ``t``
(:func:`shape_elements`), and decides when two references are the same dim
(:func:`same_dim_ref`): the same tensor and axis, provably equal known dims, or a common
*origin* (:func:`dim_origin`) reached by walking back through ops that keep that leading dim
(``MatMul`` by a 2-D weight, a bias ``Add``, unary ops, a ``Split`` of the last axis).

:class:`DimLabels` names the dims of the tensors of one match (``B``, ``S``, ``N``, ``D``...),
and :meth:`DimLabels.reshape_reason` checks that a Reshape maps an input of known labels to an
output of expected labels.
"""

from __future__ import annotations

from typing import Sequence, Union

from graphopt import ir
from graphopt.rewrite import constant_value

from graphopt.passes.contrib._common import constant_shape, same_dim, static_rank

__all__ = ["DimRef", "OriginMemo", "Element", "shape_elements", "scalar_element", "dim_origin", "same_dim_ref",
           "DimLabels", "head_sizes", "same_shape"]

#: Dim ``j`` of tensor ``t``.
DimRef = tuple[ir.Value, int]
#: Results of :func:`dim_origin` walks, by ``(tensor, axis)``. Keyed by the tensor itself, not its
#: ``id``: a memo may outlive rewrites that drop tensors, and a dropped tensor's ``id`` can be
#: reused by a new one. An entry stays true after a rewrite that keeps what every surviving
#: tensor holds (all rewrites do), so a stale entry can only hide an equality, never invent one.
OriginMemo = dict[tuple[ir.Value, int], DimRef]
#: One element of a shape tensor: a number or a reference to a dim.
Element = Union[int, DimRef]

_MAX_DEPTH = 24
#: Ops walked back from one dim at most (about 20 per transformer layer).
_MAX_ORIGIN_DEPTH = 300
#: Ops whose output has the shape of their first input.
_SHAPE_KEEPING_UNARY = frozenset({
    "Abs", "Cast", "CastLike", "Ceil", "IsInf", "IsNaN", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "Mish", "Neg", "Not",
    "Reciprocal", "Relu", "RMSNormalization", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Softmax", "Softplus",
    "Softsign", "Sqrt", "Tanh",
})
_CONTRIB_SHAPE_KEEPING = frozenset({"Gelu", "FastGelu", "BiasGelu", "SkipLayerNormalization",
                                    "SkipSimplifiedLayerNormalization", "QuickGelu"})
#: Elementwise ops with broadcasting: the output has the dims its inputs agree on.
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Mod", "And", "Or", "Xor",
                          "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "PRelu"})


def _is_default(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _ints(value: ir.Value | None) -> list[int] | None:
    shape = constant_shape(value)
    if shape is None or len(shape) > 1:
        return None  # not a constant, or a weight: answered without decoding it
    array = constant_value(value)
    if array is None or array.dtype.kind not in "iu" or array.ndim > 1:
        return None
    return [int(v) for v in array.reshape(-1)]


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _axes(node: ir.Node) -> list[int] | None:
    """Axes of Unsqueeze/Squeeze: the attribute (opset < 13) or the second input."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return _ints(node.inputs[1])
    axes = node.attr("axes", None)
    return None if axes is None else [int(a) for a in axes]


def shape_elements(value: ir.Value | None, depth: int = 0) -> list[Element] | None:
    """The elements of a 1-D int64 shape tensor, or ``None`` when they cannot be read.

    Example:
        >>> shape_elements(concat_of_shape_gathers)  # doctest: +SKIP
        [(Value('x'), 0), (Value('x'), 1), 12, 64]
    """
    if value is None or depth > _MAX_DEPTH:
        return None
    ints = _ints(value)
    if ints is not None:
        array = constant_value(value)
        return ints if array is not None and array.ndim == 1 else None
    node = value.producer
    if node is None or not _is_default(node):
        return None
    op = node.op_type
    if op == "Concat" and node.attr("axis", 0) in (0, -1):
        out: list[Element] = []
        for part in node.inputs:
            elements = shape_elements(part, depth + 1)
            if elements is None:
                return None
            out.extend(elements)
        return out
    if op == "Shape":
        return _shape_of(node)
    if op == "Slice":
        return _slice(node, depth)
    if op in ("Unsqueeze", "Reshape") and node.inputs[0] is not None:
        if op == "Unsqueeze" and _axes(node) not in ([0], [-1]):
            return None
        if op == "Reshape" and _ints(node.inputs[1]) not in ([1], [-1]):
            return None
        element = scalar_element(node.inputs[0], depth + 1)
        return None if element is None else [element]
    if op == "Cast" and node.inputs[0] is not None:
        return shape_elements(node.inputs[0], depth + 1)
    if op == "Gather" and node.attr("axis", 0) == 0:
        indices = constant_value(node.inputs[1])
        source = shape_elements(node.inputs[0], depth + 1)
        if indices is None or source is None or indices.ndim != 1:
            return None
        try:
            return [source[int(i)] for i in indices]
        except IndexError:
            return None
    return None


def scalar_element(value: ir.Value | None, depth: int = 0) -> Element | None:
    """A 0-D (or one-element) int tensor read as an element: a number or a dim reference."""
    if value is None or depth > _MAX_DEPTH:
        return None
    shape = constant_shape(value)
    if shape is not None and _count(shape) != 1:
        return None  # a constant of several elements (never decoded: it may be a weight)
    array = constant_value(value) if shape is not None else None
    if array is not None:
        return int(array.reshape(-1)[0]) if array.size == 1 and array.dtype.kind in "iu" else None
    node = value.producer
    if node is None or not _is_default(node):
        return None
    if node.op_type == "Gather" and node.attr("axis", 0) == 0:
        index = constant_value(node.inputs[1])
        source = shape_elements(node.inputs[0], depth + 1)
        if index is None or index.size != 1 or source is None:
            return None
        try:
            return source[int(index.reshape(-1)[0])]
        except IndexError:
            return None
    if node.op_type in ("Squeeze", "Reshape", "Cast") and node.inputs[0] is not None:
        source = shape_elements(node.inputs[0], depth + 1)
        return source[0] if source is not None and len(source) == 1 else None
    return None


def _shape_of(node: ir.Node) -> list[Element] | None:
    source = node.inputs[0]
    rank = static_rank(source) if source is not None else None
    if source is None or rank is None:
        return None
    start, end = int(node.attr("start", 0)), node.attr("end", None)
    stop = rank if end is None else int(end)
    start, stop = (start + rank if start < 0 else start), (stop + rank if stop < 0 else stop)
    return [(source, j) for j in range(max(0, start), min(rank, stop))]


def _slice(node: ir.Node, depth: int) -> list[Element] | None:
    source = shape_elements(node.inputs[0], depth + 1)
    starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2]) if len(node.inputs) > 2 else None
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if source is None or starts is None or ends is None or axes not in ([0], [-1]) or steps != [1]:
        return None
    n = len(source)
    start, end = starts[0], ends[0]
    start = max(0, start + n if start < 0 else min(start, n))
    end = max(0, end + n if end < 0 else min(end, n))
    return source[start:end]


def dim_origin(value: ir.Value, axis: int, memo: OriginMemo | None = None) -> DimRef:
    """Walk back from dim ``axis`` of ``value`` through ops that keep it; return where it starts.

    Followed: unary shape-keeping ops, ``MatMul`` by a constant 2-D weight (every axis but the
    last), broadcasting elementwise ops whose non-constant inputs have that dim from one origin
    (constants too short to reach ``axis`` do not count), reductions over other axes (``keepdims=1``), ``Split``
    along another axis, ``Gather``, ``Transpose`` (to the permuted axis), ``Reshape`` (to the dim
    its target names, or the same input dim for a ``0``), and the batch and sequence dims of an
    attention op's output (its query's).

    Args:
        memo: results of earlier walks (makes repeated walks linear); see :data:`OriginMemo`.
    """
    return _origin(value, axis, {} if memo is None else memo, 0)


def _origin(value: ir.Value, axis: int, memo: OriginMemo, depth: int) -> DimRef:
    key = (value, axis)
    found = memo.get(key)
    if found is not None:
        return found
    memo[key] = (value, axis)  # provisional: a cycle or a cut walk ends here
    step = _step(value, axis, memo, depth) if depth < _MAX_ORIGIN_DEPTH else None
    result = (value, axis) if step is None else _origin(step[0], step[1], memo, depth + 1)
    memo[key] = result
    return result


def _step(value: ir.Value, axis: int, memo: OriginMemo, depth: int) -> DimRef | None:
    node = value.producer
    rank = static_rank(value)
    if node is None or rank is None or not 0 <= axis < rank:
        return None
    source = _kept_from(node, value, axis, rank)
    if source is not None:
        return source, axis
    moved = _moved_from(node, value, axis, rank)
    if moved is not None:
        return moved
    if not _is_default(node):
        return None
    if node.op_type in _ELEMENTWISE:
        return _broadcast_origin(node, axis, rank, memo, depth)
    if node.op_type.startswith("Reduce") and node.attr("keepdims", 1) == 1 and node.inputs[0] is not None:
        axes = _reduce_axes(node, rank)
        return (node.inputs[0], axis) if axes is not None and axis not in axes else None
    if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[1] is not None:
        return _gathered(node, axis)
    return None


def _broadcast_origin(node: ir.Node, axis: int, rank: int, memo: OriginMemo,
                      depth: int) -> DimRef | None:
    """The origin of an elementwise output dim: constants too short to reach ``axis`` are ignored,
    and every other input must have the full rank and that dim from one origin."""
    origin: DimRef | None = None
    for value in node.inputs:
        if value is None:
            return None
        shape = constant_shape(value)
        if shape is not None and len(shape) <= rank - axis - 1:
            continue
        if static_rank(value) != rank:
            return None
        found = _origin(value, axis, memo, depth + 1)
        if origin is None:
            origin = found
        elif not (origin[0] is found[0] and origin[1] == found[1]):
            return None
    return origin


def _reduce_axes(node: ir.Node, rank: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = _ints(node.inputs[1])
    else:
        attr = node.attr("axes", None)
        axes = None if attr is None else [int(a) for a in attr]
    if axes is None:
        return None  # all axes (or unknown ones)
    return [a + rank if a < 0 else a for a in axes]


def _gathered(node: ir.Node, axis: int) -> DimRef | None:
    """Output dims of ``Gather``: ``data[:g] + indices + data[g+1:]``."""
    data, indices = node.inputs[0], node.inputs[1]
    data_rank, index_rank = static_rank(data), static_rank(indices)
    if data_rank is None or index_rank is None:
        return None
    g = int(node.attr("axis", 0))
    g = g + data_rank if g < 0 else g
    if axis < g:
        return data, axis
    if axis < g + index_rank:
        return indices, axis - g
    return data, axis - index_rank + 1


def _kept_from(node: ir.Node, value: ir.Value, axis: int, rank: int) -> ir.Value | None:
    first = node.inputs[0] if node.inputs else None
    if first is None:
        return None
    op = node.op_type
    if not _is_default(node):
        return first if node.domain == "com.microsoft" and op in _CONTRIB_SHAPE_KEEPING and value.index == 0 else None
    if op in _SHAPE_KEEPING_UNARY and value.index == 0:
        return first if static_rank(first) == rank else None
    if op == "MatMul" and axis < rank - 1:
        weight = constant_shape(node.inputs[1])
        return first if weight is not None and len(weight) == 2 and static_rank(first) == rank else None
    if op == "Split":
        split_axis = int(node.attr("axis", 0))
        split_axis = split_axis + rank if split_axis < 0 else split_axis
        return first if split_axis != axis and static_rank(first) == rank else None
    return None


def _moved_from(node: ir.Node, value: ir.Value, axis: int, rank: int) -> DimRef | None:
    """Where dim ``axis`` of ``value`` comes from when the op moves or names it (Transpose, Reshape...)."""
    op = node.op_type
    first = node.inputs[0] if node.inputs else None
    if first is None:
        return None
    if node.domain == "com.microsoft" and op in ("MultiHeadAttention", "Attention") and axis < 2 \
            and value.index == 0:
        return first, axis  # [batch, sequence] of the query (or input)
    if not _is_default(node):
        return None
    if op == "Transpose":
        perm = node.attr("perm", None)
        perm = tuple(reversed(range(rank))) if perm is None else tuple(perm)
        return (first, perm[axis]) if len(perm) == rank else None
    if op == "Reshape":
        elements = shape_elements(node.inputs[1] if len(node.inputs) > 1 else None)
        if elements is None or len(elements) != rank:
            return None
        element = elements[axis]
        if isinstance(element, tuple):
            return element
        if element == 0 and not node.attr("allowzero", 0):
            return first, axis
    return None


def same_dim_ref(a: DimRef, b: DimRef, memo: OriginMemo | None = None) -> bool:
    """True when two dim references provably hold the same size."""
    if a[0] is b[0] and a[1] == b[1]:
        return True
    if _known_equal(a, b):
        return True
    memo = {} if memo is None else memo
    origin_a, origin_b = dim_origin(a[0], a[1], memo), dim_origin(b[0], b[1], memo)
    return (origin_a[0] is origin_b[0] and origin_a[1] == origin_b[1]) or _known_equal(origin_a, origin_b)


def _known_equal(a: DimRef, b: DimRef) -> bool:
    sa, sb = a[0].shape, b[0].shape
    if sa is None or sb is None or not (0 <= a[1] < sa.rank and 0 <= b[1] < sb.rank):
        return False
    return same_dim(sa.dims[a[1]], sb.dims[b[1]])


class DimLabels:
    """Names for the dims of the tensors of one match, and checks of Reshapes between them.

    Args:
        labels: ``{value: ("B", "S", "H")}``: the dims each known tensor has, by name.
        sizes: the static size of a name when known (``{"N": 12, "D": 64, "H": 768}``).
        memo: dim origins already walked (see :func:`dim_origin` and :data:`OriginMemo`),
            shared with the caller's other proofs about the same match.

    Example:
        >>> labels = DimLabels({q: ("B", "S", "H")}, {"N": 12, "D": 64, "H": 768})  # doctest: +SKIP
        >>> labels.reshape_reason(q_reshape, ("B", "S", "H"), ("B", "S", "N", "D"))   # doctest: +SKIP
    """

    def __init__(self, labels: dict[ir.Value, tuple[str, ...]], sizes: dict[str, int],
                 memo: OriginMemo | None = None) -> None:
        self.labels = labels
        self.sizes = sizes
        self._memo: OriginMemo = {} if memo is None else memo

    def is_dim(self, ref: DimRef, name: str) -> bool:
        """True when the dim ``ref`` points at is provably the dim called ``name``."""
        tensor, axis = ref
        shape = tensor.shape
        if name in self.sizes and shape is not None and axis < shape.rank and shape.dims[axis] == self.sizes[name]:
            return True
        for known, names in self.labels.items():
            for j, label in enumerate(names):
                if label == name and same_dim_ref(ref, (known, j), self._memo):
                    return True
        return False

    def reshape_reason(self, node: ir.Node, source: Sequence[str], target: Sequence[str]) -> str | None:
        """Why ``node`` (a Reshape) may not turn a tensor with dims ``source`` into dims ``target``.

        Every target element must be provably its dim: a number equal to the dim's static size,
        a reference to the same dim, ``0`` copying it from the same position of the input
        (``allowzero=0``), or one ``-1`` when all the others are proven (the element count
        fixes it, since ``source`` and ``target`` name the same total).
        """
        elements = shape_elements(node.inputs[1] if len(node.inputs) > 1 else None)
        if elements is None:
            return self._inferred_reason(node, target)
        if len(elements) != len(target):
            return f"the Reshape target has {len(elements)} dims, expected {len(target)}"
        allowzero = int(node.attr("allowzero", 0))
        wildcard = 0
        for i, (element, name) in enumerate(zip(elements, target)):
            if isinstance(element, tuple):
                if not self.is_dim(element, name):
                    return f"Reshape target element {i} is not provably the {name} dim"
            elif element == -1:
                wildcard += 1
            elif element == 0 and not allowzero:
                if i >= len(source) or source[i] != name:
                    return f"Reshape target element {i} copies an input dim that is not {name}"
            elif self.sizes.get(name) != element:
                return f"Reshape target element {i} is {element}, expected the {name} dim"
        if wildcard > 1:
            return "the Reshape target has more than one -1"
        return None

    def _inferred_reason(self, node: ir.Node, target: Sequence[str]) -> str | None:
        """Fall back on inferred shapes: every output dim provably equal to the named dim."""
        shape = node.outputs[0].shape
        if shape is None or shape.rank != len(target):
            return "the Reshape target cannot be read and its output shape is unknown"
        for j, name in enumerate(target):
            dim = shape.dims[j]
            if isinstance(dim, int) and self.sizes.get(name) == dim:
                continue
            if not self.is_dim((node.outputs[0], j), name):
                return f"the Reshape output dim {j} is not provably the {name} dim"
        return None


def head_sizes(x: ir.Value, reshape: ir.Node) -> tuple[int, int] | str:
    """``(N, D)``: heads and head size of a split ``[B, S, H] -> [B, S, N, D]``, read from the target.

    ``D`` must be a number in the target (or a static output dim); ``N`` is a number there or
    ``H / D`` for a ``-1``.
    """
    elements = shape_elements(reshape.inputs[1] if len(reshape.inputs) > 1 else None)
    out = reshape.outputs[0].shape
    hidden = x.shape.dims[-1] if x.shape is not None and x.shape.rank else None
    heads: int | None = None
    size: int | None = None
    if elements is not None and len(elements) == 4:
        if isinstance(elements[3], int) and elements[3] > 0:
            size = elements[3]
        if isinstance(elements[2], int) and elements[2] > 0:
            heads = elements[2]
    if out is not None and out.rank == 4:
        heads = heads or (out.dims[2] if isinstance(out.dims[2], int) else None)
        size = size or (out.dims[3] if isinstance(out.dims[3], int) else None)
    if size is not None and heads is None and isinstance(hidden, int) and hidden % size == 0:
        heads = hidden // size
    if heads is None or size is None:
        return f"the head count and size of the split of '{x.name}' are not static"
    if isinstance(hidden, int) and hidden != heads * size:
        return f"'{x.name}' has hidden size {hidden}, not {heads}x{size}"
    return heads, size



def same_shape(a: ir.Value, b: ir.Value) -> bool:
    """True when ``a`` and ``b`` provably have one shape: same known rank, every dim provably equal."""
    ra, rb = static_rank(a), static_rank(b)
    if ra is None or ra != rb:
        return False
    sa, sb = a.shape, b.shape
    assert sa is not None and sb is not None
    memo: OriginMemo = {}
    return all(same_dim(x, y) or same_dim_ref((a, i), (b, i), memo) for i, (x, y) in enumerate(zip(sa.dims, sb.dims)))
