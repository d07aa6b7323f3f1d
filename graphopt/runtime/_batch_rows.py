"""Can a partitioned model run on micro-batches? (Are the rows of axis 0 computed independently?)

Splitting the inputs along axis 0, running the pieces and concatenating the outputs equals one
run on the whole batch only when no node mixes rows: a Softmax or a reduction over axis 0, a
MatMul contracting it, a Transpose moving it, a Reshape folding it into other axes, or a value
computed from the batch size (``Shape(x)[0]``) all give results of the right shape but other
values. :func:`row_independence_problem` walks the partitions in order and proves row
independence with per-op rules; anything it cannot prove is refused, with the node named.

Each value has a *kind*: ``const`` (depends on no input), ``rows`` (axis 0 holds the rows of the
batch, each computed from the same rows of the inputs) or ``shape`` (integers computed from the
batch size: allowed only where they give a shape, checked on symbolic shapes with the batch dim
named :data:`ROWS`). A ``Shape`` result is ``dims`` until an entry is read: its other entries
(sequence length, hidden size) are the same in every micro-batch, so they are ``const``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import onnx

__all__ = ["ROWS", "row_independence_problem"]

logger = logging.getLogger(__name__)

#: The symbolic name given to axis 0 of every input for shape inference.
ROWS = "__graphopt_rows__"

_UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Gelu", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Identity", "Dropout", "Cast", "CastLike", "Softplus",
    "Softsign", "Mish", "ThresholdedRelu", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
    "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "IsNaN", "IsInf", "Not",
    "QuantizeLinear", "DequantizeLinear", "Shrink", "BitwiseNot",
})
_BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater",
    "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor",
})
#: Ops that work within each item of axis 0 (the data is input 0, other inputs are parameters).
_PER_ITEM = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool",
    "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization",
    "LRN", "DepthToSpace", "SpaceToDepth", "MaxRoiPool",
})
#: Ops computing shape integers from shape integers and constants.
_SHAPE_ARITHMETIC = frozenset({
    "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Add", "Sub", "Mul", "Div", "Identity",
    "Equal", "Where", "Max", "Min", "Neg", "Abs", "Mod", "Floor", "Ceil", "ReduceProd", "Reshape",
})
_REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                     "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})


class _Refuse(Exception):
    """The node may mix rows (the message says how)."""


class _Graph:
    """One partition: its nodes, constants, and symbolic shapes with axis 0 of the rows named."""

    def __init__(self, proto: onnx.ModelProto, kinds: Mapping[str, str]) -> None:
        g = proto.graph
        # Declared shapes name the batch as the model does; only inferred ones follow ROWS.
        del g.value_info[:]
        for value in g.output:
            if value.type.HasField("tensor_type"):
                value.type.tensor_type.ClearField("shape")
        for value in g.input:
            if kinds.get(value.name) == "rows" and value.type.HasField("tensor_type"):
                dims = value.type.tensor_type.shape.dim
                if len(dims):
                    dims[0].Clear()
                    dims[0].dim_param = ROWS
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - onnx raises several types; unknown shapes refuse
            logger.debug("micro-batch check: shape inference failed (%s)", exc)
            inferred = proto
        self.graph = inferred.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.shapes: dict[str, list[int | str | None]] = {}
        for info in [*self.graph.input, *self.graph.value_info, *self.graph.output]:
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
                self.shapes[info.name] = [d.dim_value if d.HasField("dim_value") else
                                          (d.dim_param or None) for d in info.type.tensor_type.shape.dim]
        self.constants: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = attr.t
        for name, tensor in self.constants.items():
            self.shapes.setdefault(name, list(tensor.dims))

    def rank(self, name: str) -> int:
        shape = self.shapes.get(name)
        if shape is None:
            raise _Refuse(f"the rank of '{name}' is unknown")
        return len(shape)

    def ints(self, name: str) -> list[int] | None:
        tensor = self.constants.get(name)
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return [int(v) for v in onnx.numpy_helper.to_array(tensor).reshape(-1).tolist()]


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _name(node: onnx.NodeProto) -> str:
    return f"'{node.name}'" if node.name else f"(output '{node.output[0] if node.output else ''}')"


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes(g: _Graph, node: onnx.NodeProto, input_index: int) -> list[int] | None:
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > input_index and node.input[input_index]:
        axes = g.ints(node.input[input_index])
        if axes is None:
            raise _Refuse(f"the axes of {node.op_type} {_name(node)} are computed at run time")
    return None if axes is None else [int(a) for a in axes]  # type: ignore[union-attr]


def _check_rows_out(g: _Graph, node: onnx.NodeProto, out: str) -> None:
    shape = g.shapes.get(out)
    if not shape or shape[0] != ROWS or ROWS in shape[1:]:
        raise _Refuse(f"{node.op_type} {_name(node)} may move the batch off axis 0 "
                      f"(output shape {shape})")


def _entries_read(g: _Graph, node: onnx.NodeProto) -> set[int] | None:
    """Which entries of a ``Shape`` result a Gather or Slice with constant indices reads."""
    length = (g.shapes.get(node.input[0]) or [None])[0]
    if not isinstance(length, int):
        return None
    if node.op_type == "Gather":
        indices = g.ints(node.input[1])
        return None if indices is None else {i % length if i < 0 else i for i in indices}
    if node.op_type == "Slice" and len(node.input) >= 3:
        starts, ends = g.ints(node.input[1]), g.ints(node.input[2])
        steps = g.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
        if not starts or not ends or steps != [1]:
            return None
        return set(range(length)[slice(starts[0], ends[0])])
    return None


def _rows_node(g: _Graph, node: onnx.NodeProto, kinds: list[str]) -> str:
    """The kind of the outputs of ``node``, at least one of whose inputs is ``rows`` or ``shape``."""
    op, ins = node.op_type, list(node.input)
    if op == "Shape" and kinds[0] == "rows":
        start = int(_attr(node, "start", 0))  # type: ignore[arg-type]
        return "dims" if start == 0 else "const"  # entry 0 of the dims is the batch size
    if kinds and kinds[0] == "dims" and all(k == "const" for k in kinds[1:]):
        entries = _entries_read(g, node)
        if entries is not None and 0 not in entries:
            return "const"  # other dims (sequence length...) are the same in every micro-batch
    kinds = ["shape" if k == "dims" else k for k in kinds]
    rows = [name for name, kind in zip(ins, kinds) if kind == "rows"]
    has_shape = "shape" in kinds
    if op in ("Shape", "Size"):
        return "shape"
    if has_shape and not rows and op in _SHAPE_ARITHMETIC:
        return "shape"
    if op in ("Reshape", "Expand") and kinds[0] in ("rows", "const") and kinds[1] in ("shape", "const"):
        if kinds[0] == "rows" and g.rank(ins[0]) != g.rank(node.output[0]) and op == "Expand":
            raise _Refuse(f"Expand {_name(node)} broadcasts the rows to a higher rank")
        if kinds[0] == "rows" and (g.shapes.get(ins[0]) or [None])[0] != ROWS:
            raise _Refuse(f"{op} {_name(node)} reads rows it cannot follow")
        _check_rows_out(g, node, node.output[0])
        return "rows"
    if op == "ConstantOfShape":
        _check_rows_out(g, node, node.output[0])
        return "rows"
    if has_shape:
        raise _Refuse(f"{op} {_name(node)} computes with the batch size")
    if op in _UNARY or op in _PER_ITEM:
        if kinds[0] != "rows" or any(k == "rows" for k in kinds[1:]):
            raise _Refuse(f"{op} {_name(node)} takes rows as a parameter")
        if op == "BatchNormalization" and len(node.output) > 1 and any(node.output[1:]):
            raise _Refuse(f"BatchNormalization {_name(node)} computes batch statistics")
        return "rows"
    out_rank = g.rank(node.output[0]) if op not in ("Split",) else None
    if op in _BROADCAST:
        if any(g.rank(name) != out_rank for name in rows):
            raise _Refuse(f"{op} {_name(node)} broadcasts rows to a higher rank")
        return "rows"
    rank = g.rank(ins[0])
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        axis = _norm(int(_attr(node, "axis", -1 if g.opset >= 13 else 1)), rank)  # type: ignore[arg-type]
        if axis == 0:
            raise _Refuse(f"{op} {_name(node)} normalizes over axis 0")
        return "rows"
    if op in ("LayerNormalization", "RMSNormalization", "LpNormalization", "ArgMax", "ArgMin", "Flatten",
              "Split", "Concat"):
        default = {"LayerNormalization": -1, "RMSNormalization": -1, "LpNormalization": -1,
                   "Flatten": 1}.get(op, 0)
        axis = _norm(int(_attr(node, "axis", default)), rank)  # type: ignore[arg-type]
        if axis == 0 or (op == "Concat" and any(k != "rows" for k in kinds)):
            raise _Refuse(f"{op} {_name(node)} works along axis 0 or joins rows with constants")
        if any(k == "rows" for k in kinds[1:]) and op not in ("Concat",):
            raise _Refuse(f"{op} {_name(node)} takes rows as a parameter")
        return "rows"
    if op in _REDUCE:
        axes = _axes(g, node, 1)
        if not axes:
            if axes is None and not _attr(node, "noop_with_empty_axes", 0):
                raise _Refuse(f"{op} {_name(node)} reduces over every axis")
            return "rows"
        if any(_norm(a, rank) == 0 for a in axes):
            raise _Refuse(f"{op} {_name(node)} reduces over axis 0")
        return "rows"
    if op == "Transpose":
        perm = list(_attr(node, "perm", range(rank - 1, -1, -1)))  # type: ignore[call-overload]
        if int(perm[0]) != 0:
            raise _Refuse(f"Transpose {_name(node)} moves axis 0")
        return "rows"
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(g, node, 1)
        if axes is None:
            raise _Refuse(f"{op} {_name(node)} has no explicit axes")
        reference = rank if op == "Squeeze" else out_rank
        if any(_norm(a, reference or 0) == 0 for a in axes):
            raise _Refuse(f"{op} {_name(node)} changes axis 0")
        return "rows"
    if op == "Slice":
        if any(k != "const" for k in kinds[1:]):
            raise _Refuse(f"Slice {_name(node)} has bounds computed at run time")
        axes = _axes(g, node, 3)
        starts = g.ints(ins[1]) or []
        if axes is None:
            axes = list(range(len(starts)))
        if any(_norm(a, rank) == 0 for a in axes):
            raise _Refuse(f"Slice {_name(node)} slices axis 0")
        return "rows"
    if op == "Pad":
        pads = _attr(node, "pads", None) or (g.ints(ins[1]) if len(ins) > 1 else None)
        if pads is None or (len(ins) > 3 and ins[3]) or pads[0] or pads[rank]:  # type: ignore[index]
            raise _Refuse(f"Pad {_name(node)} may pad axis 0")
        return "rows"
    if op == "Tile":
        repeats = g.ints(ins[1]) if kinds[1] == "const" else None
        if not repeats or repeats[0] != 1:
            raise _Refuse(f"Tile {_name(node)} may repeat axis 0")
        return "rows"
    if op == "Gather":
        axis = _norm(int(_attr(node, "axis", 0)), rank)  # type: ignore[arg-type]
        if kinds[0] == "rows" and kinds[1] == "const" and axis != 0:
            return "rows"
        if kinds[0] == "const" and kinds[1] == "rows" and axis == 0:
            return "rows"  # an embedding lookup: one output row per index row
        raise _Refuse(f"Gather {_name(node)} indexes along the rows")
    if op == "MatMul":
        ra, rb = g.rank(ins[0]), g.rank(ins[1])
        if kinds == ["rows", "const"] and ra >= 2 and ra >= rb:
            return "rows"
        if kinds == ["const", "rows"] and rb >= 3 and rb >= ra:
            return "rows"
        if kinds == ["rows", "rows"] and ra == rb == out_rank and ra >= 3:
            return "rows"
        raise _Refuse(f"MatMul {_name(node)} contracts or broadcasts axis 0")
    if op == "Gemm":
        if (kinds[0] == "rows" and kinds[1] == "const" and not _attr(node, "transA", 0)
                and (len(kinds) < 3 or kinds[2] == "const" or g.rank(ins[2]) == 2)):
            return "rows"
        raise _Refuse(f"Gemm {_name(node)} contracts axis 0")
    raise _Refuse(f"{op} {_name(node)} has no rule proving it keeps rows apart")


def row_independence_problem(protos: Sequence[onnx.ModelProto], model_inputs: Sequence[str],
                             model_outputs: Sequence[str]) -> str | None:
    """Why splitting the inputs along axis 0 could change the outputs, or ``None`` when it cannot.

    Args:
        protos: the partition models in a topological order (external data need not be loaded;
            the protos are changed: axis 0 of their row inputs is renamed).
        model_inputs: the inputs that are split along axis 0.
        model_outputs: the outputs that are joined along axis 0.

    Example:
        >>> row_independence_problem([proto], ["x"], ["y"])  # doctest: +SKIP
        "Softmax 'n1' normalizes over axis 0"
    """
    kinds: dict[str, str] = {name: "rows" for name in model_inputs}
    for proto in protos:
        g = _Graph(proto, kinds)
        local = dict(kinds)
        for name in g.constants:
            local.setdefault(name, "const")
        for value in g.graph.input:
            local.setdefault(value.name, "const")
        for node in g.graph.node:
            ins = [local.get(name, "const") if name else "const" for name in node.input]
            if all(k == "const" for k in ins):
                kind = "const"
            else:
                if node.domain not in ("", "ai.onnx"):
                    return f"{node.domain}.{node.op_type} {_name(node)} has no rule proving it keeps rows apart"
                if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                    return f"{node.op_type} {_name(node)} has subgraphs"
                try:
                    kind = _rows_node(g, node, ins)
                except _Refuse as exc:
                    return str(exc)
            for name in node.output:
                if name:
                    local[name] = kind
        for value in g.graph.output:
            kinds[value.name] = local.get(value.name, "const")
    for name in model_outputs:
        if kinds.get(name) != "rows":
            return f"output '{name}' is not computed row by row"
    return None
