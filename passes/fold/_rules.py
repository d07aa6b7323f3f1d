"""graphopt's own type rules, for the nodes onnx shape inference leaves untyped.

onnx stops at operators it has no schema for (onnxruntime's ``com.microsoft`` contrib ops) and
at everything downstream of them, and it cannot resolve ``Reshape``'s ``-1`` over symbolic
dims. These rules cover the operators transformer and CNN exports are made of: elementwise ops
with broadcasting, ``MatMul``, ``Transpose``, ``Reshape`` (``0`` and ``-1`` included),
``Concat``, ``Gather``, ``Squeeze``/``Unsqueeze``, ``Shape`` and common contrib ops.

Every rule returns a type per output (``None`` where it knows nothing); callers only use a
result where it is more precise than what the value already has.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional, Sequence

import onnx

from graphopt import ir
from graphopt.passes.fold._symbolic import SymbolicValues

__all__ = ["infer_node_types", "broadcast_shapes", "refine_type", "contradicts",
           "INFERRED_TYPE", "TYPE_CONFLICT"]

#: ``Value.meta`` key: the type shape inference proved for a node output (declared types of
#: outputs and value_info are not checked by runtimes and may be stale).
INFERRED_TYPE = "inferred_type"
#: ``Value.meta`` key: set when inference contradicts the value's declared type.
TYPE_CONFLICT = "type_conflict"

T = onnx.TensorProto
Types = list[Optional[ir.TensorType]]

_UNARY_SAME = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Ceil", "Celu", "Clip",
    "Cos", "Cosh", "CumSum", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "Hardmax", "Identity", "InstanceNormalization", "LRN", "LayerNormalization",
    "LeakyRelu", "Log", "LogSoftmax", "LpNormalization", "MeanVarianceNormalization", "Mish", "Neg",
    "Not", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin",
    "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Trilu",
    "BatchNormalization", "GroupNormalization", "RMSNormalization", "Swish",
})
_BROADCAST_SAME = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean",
                             "Mod", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitShift"})
_BROADCAST_BOOL = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And",
                             "Or", "Xor"})
#: onnxruntime contrib ops whose first output has the type of their first input.
_CONTRIB_SAME = frozenset({"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd",
                           "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
                           "SimplifiedLayerNormalization", "LayerNormalization", "BiasSoftmax",
                           "BiasDropout", "RotaryEmbedding", "GemmaRotaryEmbedding"})


def _tensor(v: ir.Value | None) -> Optional[ir.TensorType]:
    if v is None:
        return None
    if isinstance(v.type, ir.TensorType):
        if v.type.shape is None and v.const_value is not None:
            return ir.TensorType(v.type.dtype, ir.Shape(v.const_value.shape))
        return v.type
    if v.const_value is not None and isinstance(v.const_value, ir.Tensor):
        return ir.TensorType(v.const_value.dtype, ir.Shape(v.const_value.shape))
    return None


def _dims(t: Optional[ir.TensorType]) -> Optional[tuple[ir.Dim, ...]]:
    return t.shape.dims if t is not None and t.shape is not None else None


def _merge_dim(a: ir.Dim, b: ir.Dim) -> ir.Dim:
    """One broadcast dim from two (``None`` when it depends on values unknown here)."""
    if a == b:
        return a
    if a == 1:
        return b
    if b == 1:
        return a
    if isinstance(a, int) and a != 1:
        return a  # the other is a symbol or unknown: it must be 1 or equal to a
    if isinstance(b, int) and b != 1:
        return b
    return None


def broadcast_shapes(shapes: Sequence[Optional[tuple[ir.Dim, ...]]]) -> Optional[tuple[ir.Dim, ...]]:
    """Multidirectional (numpy) broadcasting of dim tuples; ``None`` if any rank is unknown.

    Example:
        >>> broadcast_shapes([("N", 1, 4), (3, 1)])
        ('N', 3, 4)
    """
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes), default=0)  # type: ignore[arg-type]
    out: list[ir.Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]  # type: ignore[arg-type]
        d = dims[0]
        for other in dims[1:]:
            d = _merge_dim(d, other)
        out.append(d)
    return tuple(out)


def _const_list(v: ir.Value | None) -> Optional[list[int]]:
    if v is None or not v.is_constant() or not isinstance(v.const_value, ir.Tensor):
        return None
    if v.const_value.dtype not in (T.INT64, T.INT32) or v.const_value.size > 64:
        return None
    return [int(x) for x in v.const_value.numpy().reshape(-1)]


def _axes(node: ir.Node, index: int) -> Optional[list[int]]:
    """Axes from the attribute (old opsets) or from constant input ``index``."""
    if "axes" in node.attributes:
        return list(node.attr("axes"))
    if len(node.inputs) > index and node.inputs[index] is not None:
        return _const_list(node.inputs[index])
    return None


class _Rules:
    def __init__(self, sym: SymbolicValues) -> None:
        self.sym = sym

    def infer(self, node: ir.Node) -> Types:
        ins = [_tensor(v) for v in node.inputs]
        if node.domain in ("", "ai.onnx"):
            op = node.op_type
            if op in _UNARY_SAME:
                return [ins[0] if ins else None]
            if op in _BROADCAST_SAME:
                return self._broadcast(ins, ins[0].dtype if ins and ins[0] else None)
            if op in _BROADCAST_BOOL:
                return self._broadcast(ins, T.BOOL)
            rule: Optional[Callable[[ir.Node, Types], Types]] = getattr(self, "_" + op, None)
            return rule(node, ins) if rule is not None else []
        if node.domain == "com.microsoft":
            if node.op_type in _CONTRIB_SAME:
                return [ins[0] if ins else None]
            if node.op_type == "FusedMatMul":
                return self._FusedMatMul(node, ins)
            if node.op_type == "FusedConv":
                return self._Conv(node, ins)
        return []

    # -- elementwise -------------------------------------------------------------------------------
    @staticmethod
    def _broadcast(ins: Types, dtype: Optional[int], start: int = 0) -> Types:
        if dtype is None:
            return [None]
        shape = broadcast_shapes([_dims(t) for t in ins[start:]])
        return [ir.TensorType(dtype, shape)]

    def _Where(self, node: ir.Node, ins: Types) -> Types:
        dtype = ins[1].dtype if len(ins) > 1 and ins[1] is not None else None
        return self._broadcast(ins, dtype)

    def _Cast(self, node: ir.Node, ins: Types) -> Types:
        return [ir.TensorType(node.attr("to"), ins[0].shape if ins and ins[0] else None)]

    def _CastLike(self, node: ir.Node, ins: Types) -> Types:
        if len(ins) < 2 or ins[1] is None:
            return [None]
        return [ir.TensorType(ins[1].dtype, ins[0].shape if ins[0] else None)]

    # -- linear algebra ----------------------------------------------------------------------------
    @staticmethod
    def _matmul(a: Optional[ir.TensorType], b: Optional[ir.TensorType],
                dtype: Optional[int] = None) -> Types:
        if a is None or b is None:
            return [None]
        dtype = dtype or a.dtype
        da, db = _dims(a), _dims(b)
        if da is None or db is None or not da or not db:
            return [ir.TensorType(dtype, None)]
        a_vec, b_vec = len(da) == 1, len(db) == 1
        ma = (1,) + da if a_vec else da
        mb = db + (1,) if b_vec else db
        batch = broadcast_shapes([ma[:-2], mb[:-2]])
        if batch is None:
            return [ir.TensorType(dtype, None)]
        dims = list(batch) + ([] if a_vec else [ma[-2]]) + ([] if b_vec else [mb[-1]])
        return [ir.TensorType(dtype, dims)]

    def _MatMul(self, node: ir.Node, ins: Types) -> Types:
        return self._matmul(ins[0], ins[1] if len(ins) > 1 else None)

    def _FusedMatMul(self, node: ir.Node, ins: Types) -> Types:
        if node.attr("transBatchA", 0) or node.attr("transBatchB", 0):
            return [None]
        a = ins[0]
        b = ins[1] if len(ins) > 1 else None
        if a is not None and node.attr("transA", 0):
            a = _swap_last(a)
        if b is not None and node.attr("transB", 0):
            b = _swap_last(b)
        return self._matmul(a, b)

    def _Gemm(self, node: ir.Node, ins: Types) -> Types:
        a = ins[0]
        b = ins[1] if len(ins) > 1 else None
        if a is None or b is None or _dims(a) is None or _dims(b) is None:
            return [ir.TensorType(a.dtype, None)] if a is not None else [None]
        m = a.shape.dims[1 if node.attr("transA", 0) else 0]  # type: ignore[union-attr]
        n = b.shape.dims[0 if node.attr("transB", 0) else 1]  # type: ignore[union-attr]
        return [ir.TensorType(a.dtype, (m, n))]

    # -- layout ------------------------------------------------------------------------------------
    def _Transpose(self, node: ir.Node, ins: Types) -> Types:
        a = ins[0]
        if a is None or _dims(a) is None:
            return [a and ir.TensorType(a.dtype, None)]
        dims = a.shape.dims  # type: ignore[union-attr]
        perm = node.attr("perm") or tuple(reversed(range(len(dims))))
        if sorted(perm) != list(range(len(dims))):
            return [None]
        return [ir.TensorType(a.dtype, [dims[p] for p in perm])]

    def _Reshape(self, node: ir.Node, ins: Types) -> Types:
        a = ins[0]
        if a is None or len(node.inputs) < 2:
            return [None]
        target = self.sym.get(node.inputs[1])
        if target is None or target.scalar:
            return [ir.TensorType(a.dtype, None)]
        allow_zero = node.attr("allowzero", 0)
        in_dims = _dims(a)
        out: list[ir.Dim] = []
        for i, d in enumerate(target.elements):
            if d == 0 and not allow_zero:
                out.append(in_dims[i] if in_dims is not None and i < len(in_dims) else None)
            elif isinstance(d, int) and d < -1:
                return [ir.TensorType(a.dtype, None)]
            else:
                out.append(d)
        if out.count(-1) > 1:
            return [ir.TensorType(a.dtype, None)]
        if -1 in out:
            out[out.index(-1)] = _solve_minus_one(in_dims, [d for d in out if d != -1])
        return [ir.TensorType(a.dtype, out)]

    def _Flatten(self, node: ir.Node, ins: Types) -> Types:
        a = ins[0]
        dims = _dims(a)
        if a is None or dims is None:
            return [a and ir.TensorType(a.dtype, None)]
        axis = node.attr("axis", 1)
        axis = axis + len(dims) if axis < 0 else axis
        return [ir.TensorType(a.dtype, [_product(dims[:axis]), _product(dims[axis:])])]

    def _Concat(self, node: ir.Node, ins: Types) -> Types:
        known = [t for t in ins if t is not None]
        if not known or len(known) != len(ins):
            return [ir.TensorType(known[0].dtype, None)] if known else [None]
        shapes = [_dims(t) for t in ins]
        if any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:  # type: ignore[arg-type]
            return [ir.TensorType(known[0].dtype, None)]
        rank = len(shapes[0])  # type: ignore[arg-type]
        axis = node.attr("axis", 0)
        axis = axis + rank if axis < 0 else axis
        out: list[ir.Dim] = []
        for i in range(rank):
            column = [s[i] for s in shapes]  # type: ignore[index]
            if i == axis:
                out.append(sum(column) if all(isinstance(d, int) for d in column) else None)  # type: ignore[arg-type]
            else:
                out.append(next((d for d in column if isinstance(d, int)),
                                next((d for d in column if d is not None), None)))
        return [ir.TensorType(known[0].dtype, out)]

    def _Gather(self, node: ir.Node, ins: Types) -> Types:
        data = ins[0]
        indices = ins[1] if len(ins) > 1 else None
        if data is None:
            return [None]
        dd, di = _dims(data), _dims(indices)
        if dd is None or di is None:
            return [ir.TensorType(data.dtype, None)]
        axis = node.attr("axis", 0)
        axis = axis + len(dd) if axis < 0 else axis
        return [ir.TensorType(data.dtype, list(dd[:axis]) + list(di) + list(dd[axis + 1:]))]

    def _Unsqueeze(self, node: ir.Node, ins: Types) -> Types:
        a = ins[0]
        axes = _axes(node, 1)
        if a is None or _dims(a) is None or axes is None:
            return [a and ir.TensorType(a.dtype, None)]
        rank = len(a.shape.dims) + len(axes)  # type: ignore[union-attr]
        norm = sorted(x + rank if x < 0 else x for x in axes)
        dims = list(a.shape.dims)  # type: ignore[union-attr]
        for x in norm:
            dims.insert(x, 1)
        return [ir.TensorType(a.dtype, dims)]

    def _Squeeze(self, node: ir.Node, ins: Types) -> Types:
        a = ins[0]
        dims = _dims(a)
        if a is None or dims is None:
            return [a and ir.TensorType(a.dtype, None)]
        axes = _axes(node, 1)
        if axes is None:
            if "axes" in node.attributes or (len(node.inputs) > 1 and node.inputs[1] is not None):
                return [ir.TensorType(a.dtype, None)]  # axes computed at run time
            if not all(isinstance(d, int) for d in dims):
                return [ir.TensorType(a.dtype, None)]
            return [ir.TensorType(a.dtype, [d for d in dims if d != 1])]
        norm = {x + len(dims) if x < 0 else x for x in axes}
        return [ir.TensorType(a.dtype, [d for i, d in enumerate(dims) if i not in norm])]

    # -- convolution, reductions, recurrent layers --------------------------------------------------
    def _Conv(self, node: ir.Node, ins: Types) -> Types:
        """``[N, M, *spatial]``: ``M`` is the weight's first dim, each spatial dim
        ``floor((in + pads - dilation * (kernel - 1) - 1) / stride) + 1`` (``ceil(in / stride)``
        for ``SAME_*`` auto-padding)."""
        x = ins[0] if ins else None
        w = ins[1] if len(ins) > 1 else None
        if x is None:
            return [None]
        xd, wd = _dims(x), _dims(w)
        rank = len(xd) if xd is not None else len(wd) if wd is not None else None
        if rank is None or rank < 3 or (wd is not None and len(wd) != rank):
            return [ir.TensorType(x.dtype, None)]
        spatial = rank - 2
        out: list[ir.Dim] = [xd[0] if xd is not None else None, wd[0] if wd is not None else None]
        kernel = node.attr("kernel_shape") or (wd[2:] if wd is not None else None)
        strides = node.attr("strides") or (1,) * spatial
        dilations = node.attr("dilations") or (1,) * spatial
        pads = node.attr("pads") or (0,) * (2 * spatial)
        auto_pad = node.attr("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        for i in range(spatial):
            d = xd[2 + i] if xd is not None else None
            k = kernel[i] if kernel is not None else None
            if not isinstance(d, int) or not isinstance(k, int):
                out.append(None)
            elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out.append(-(-d // strides[i]))
            else:
                total = 0 if auto_pad == "VALID" else pads[i] + pads[i + spatial]
                out.append((d + total - dilations[i] * (k - 1) - 1) // strides[i] + 1)
        return [ir.TensorType(x.dtype, out)]

    def _reduce(self, node: ir.Node, ins: Types, axes_input_since: int) -> Types:
        x = ins[0] if ins else None
        dims = _dims(x)
        if x is None or dims is None:
            return [x and ir.TensorType(x.dtype, None)]
        version = node.version or 0
        if version >= axes_input_since:
            given = len(node.inputs) > 1 and node.inputs[1] is not None
            axes = self._int_list(node.inputs[1]) if given else []
        else:
            axes = list(node.attr("axes") or [])
        if axes is None:
            return [ir.TensorType(x.dtype, None)]
        if not axes:
            if version >= axes_input_since and node.attr("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(len(dims)))
        norm = {a + len(dims) if a < 0 else a for a in axes}
        keep = node.attr("keepdims", 1)
        out = [1 if i in norm else d for i, d in enumerate(dims)] if keep else \
            [d for i, d in enumerate(dims) if i not in norm]
        return [ir.TensorType(x.dtype, out)]

    def _int_list(self, value: ir.Value | None) -> Optional[list[int]]:
        """A constant's elements, or a tracked small integer tensor whose elements are all known."""
        found = _const_list(value)
        if found is not None:
            return found
        sym = self.sym.get(value)
        return [int(e) for e in sym.elements] if sym is not None and sym.is_known() else None  # type: ignore[arg-type]

    def _ReduceMean(self, node: ir.Node, ins: Types) -> Types:
        return self._reduce(node, ins, 18)

    _ReduceMax = _ReduceMin = _ReduceProd = _ReduceL1 = _ReduceL2 = _ReduceLogSum = _ReduceMean
    _ReduceLogSumExp = _ReduceSumSquare = _ReduceMean

    def _ReduceSum(self, node: ir.Node, ins: Types) -> Types:
        return self._reduce(node, ins, 13)

    def _recurrent(self, node: ir.Node, ins: Types, gates: int) -> Types:
        """``Y``: ``[seq, dirs, batch, hidden]``; ``Y_h``/``Y_c``: ``[dirs, batch, hidden]``
        (``layout=1``: batch first in both)."""
        x = ins[0] if ins else None
        if x is None:
            return [None] * len(node.outputs)
        xd = _dims(x)
        w = _dims(ins[1]) if len(ins) > 1 else None
        direction = node.attr("direction", "forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        dirs = 2 if direction == "bidirectional" else 1
        hidden = node.attr("hidden_size")
        if hidden is None and w is not None and len(w) == 3 and isinstance(w[1], int):
            hidden = w[1] // gates
        layout = node.attr("layout", 0)
        if xd is not None and len(xd) == 3:
            seq, batch = (xd[1], xd[0]) if layout else (xd[0], xd[1])
        else:
            seq = batch = None
        if layout:
            y = [batch, seq, dirs, hidden]
            state = [batch, dirs, hidden]
        else:
            y = [seq, dirs, batch, hidden]
            state = [dirs, batch, hidden]
        types: Types = [ir.TensorType(x.dtype, y), ir.TensorType(x.dtype, state)]
        if gates == 4:
            types.append(ir.TensorType(x.dtype, state))
        return types[:len(node.outputs)]

    def _LSTM(self, node: ir.Node, ins: Types) -> Types:
        return self._recurrent(node, ins, 4)

    def _GRU(self, node: ir.Node, ins: Types) -> Types:
        return self._recurrent(node, ins, 3)

    def _RNN(self, node: ir.Node, ins: Types) -> Types:
        return self._recurrent(node, ins, 1)

    def _Shape(self, node: ir.Node, ins: Types) -> Types:
        sv = self.sym.get(node.outputs[0])
        if sv is not None:
            return [ir.TensorType(T.INT64, (len(sv.elements),))]
        return [ir.TensorType(T.INT64, (None,))]

    def _Size(self, node: ir.Node, ins: Types) -> Types:
        return [ir.TensorType(T.INT64, ())]

    def _Constant(self, node: ir.Node, ins: Types) -> Types:
        if len(node.attributes) != 1:
            return [None]
        attr = next(iter(node.attributes.values()))
        if attr.ref_attr_name:
            return [None]
        value = attr.value
        if attr.name == "value" and isinstance(value, ir.Tensor):
            return [ir.TensorType(value.dtype, tuple(value.shape))]
        if attr.name == "sparse_value" and isinstance(value, onnx.SparseTensorProto):
            return [ir.TensorType(value.values.data_type, tuple(value.dims))]
        scalars = {"value_float": T.FLOAT, "value_int": T.INT64, "value_string": T.STRING}
        lists = {"value_floats": T.FLOAT, "value_ints": T.INT64, "value_strings": T.STRING}
        if attr.name in scalars:
            return [ir.TensorType(scalars[attr.name], ())]
        if attr.name in lists:
            return [ir.TensorType(lists[attr.name], (len(value),))]
        return [None]


def _swap_last(t: ir.TensorType) -> ir.TensorType:
    dims = _dims(t)
    if dims is None or len(dims) < 2:
        return t
    return ir.TensorType(t.dtype, list(dims[:-2]) + [dims[-1], dims[-2]])


def _product(dims: Sequence[ir.Dim]) -> ir.Dim:
    n = 1
    for d in dims:
        if not isinstance(d, int):
            return d if len(dims) == 1 else None
        n *= d
    return n


def _solve_minus_one(in_dims: Optional[tuple[ir.Dim, ...]], known_out: list[ir.Dim]) -> ir.Dim:
    """The ``-1`` of a Reshape: input size over the other output dims, symbols cancelled."""
    if in_dims is None or any(d is None for d in in_dims) or any(d is None for d in known_out):
        return None
    in_syms = Counter(d for d in in_dims if isinstance(d, str))
    out_syms = Counter(d for d in known_out if isinstance(d, str))
    if out_syms - in_syms:
        return None  # an output symbol the input does not have
    left = in_syms - out_syms
    in_n = _product([d for d in in_dims if isinstance(d, int)])
    out_n = _product([d for d in known_out if isinstance(d, int)])
    if not isinstance(in_n, int) or not isinstance(out_n, int) or out_n == 0:
        return None
    if not left:
        return in_n // out_n if in_n % out_n == 0 else None
    if sum(left.values()) == 1 and in_n == out_n:
        return next(iter(left))
    return None


def infer_node_types(node: ir.Node, sym: SymbolicValues) -> Types:
    """Types of ``node``'s outputs by graphopt's rules (a shorter list, or ``None`` entries, where unknown).

    Example:
        >>> infer_node_types(matmul_node, SymbolicValues())  # doctest: +SKIP
        [float[N,128,64]]
    """
    try:
        return _Rules(sym).infer(node)
    except (IndexError, TypeError, ValueError, AttributeError):
        return []  # a malformed node: leave its outputs as they are


def refine_type(old: ir.ValueType | None, new: ir.ValueType | None, *,
                symbols_to_sizes: bool = True) -> ir.ValueType | None:
    """``old`` improved by ``new`` where ``new`` is more precise; ``None`` when nothing improves.

    The element type must agree (a disagreement keeps ``old``). A missing shape takes ``new``'s;
    per dim, an unknown dim takes a symbol or a size, and (with ``symbols_to_sizes``) a
    symbol takes a size.

    Example:
        >>> refine_type(ir.TensorType(1, ["N", None]), ir.TensorType(1, ["N", 4]))
        float[N,4]
    """
    if new is None or not isinstance(new, ir.TensorType):
        return None
    if old is None:
        return new if new.dtype != T.UNDEFINED else None
    if not isinstance(old, ir.TensorType):
        return None
    if old.dtype != new.dtype and old.dtype != T.UNDEFINED:
        return None
    dtype = new.dtype if old.dtype == T.UNDEFINED else old.dtype
    if new.shape is None:
        return ir.TensorType(dtype, old.shape) if dtype != old.dtype else None
    if old.shape is None:
        return ir.TensorType(dtype, new.shape)
    if old.shape.rank != new.shape.rank:
        return None
    dims: list[ir.Dim] = []
    for a, b in zip(old.shape.dims, new.shape.dims):
        if isinstance(a, int):
            if isinstance(b, int) and b != a:
                return None  # contradiction: keep what the model says
            dims.append(a)
        elif isinstance(a, str):
            dims.append(b if isinstance(b, int) and symbols_to_sizes else a)
        else:
            dims.append(b)
    if tuple(dims) == old.shape.dims and dtype == old.dtype:
        return None
    return ir.TensorType(dtype, dims)


def contradicts(old: ir.ValueType | None, new: ir.ValueType | None) -> bool:
    """True when two tensor types cannot both be right (element type, rank or a size differs).

    Example:
        >>> contradicts(ir.TensorType(1, [5]), ir.TensorType(1, [3]))
        True
    """
    if not isinstance(old, ir.TensorType) or not isinstance(new, ir.TensorType):
        return False
    if T.UNDEFINED not in (old.dtype, new.dtype) and old.dtype != new.dtype:
        return True
    if old.shape is None or new.shape is None:
        return False
    if old.shape.rank != new.shape.rank:
        return True
    return any(isinstance(a, int) and isinstance(b, int) and a != b
               for a, b in zip(old.shape.dims, new.shape.dims))
