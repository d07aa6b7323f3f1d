"""Estimate the floating-point operations (FLOPs) of one inference, node by node.

Shapes come from onnx shape inference on a copy of the model whose symbolic input dims are bound
to concrete sizes (given by name, default 1). Conventions, so that figures compare across models:

- A multiply-add counts as **2 FLOPs**. MatMul ``[..., M, K] x [..., K, N]``: ``2·M·K·N`` per
  batch; Gemm adds ``M·N`` for the bias ``C``; Conv ``2 · out_elements · (C_in/group) ·
  kernel_size`` plus one per output element for the bias; ConvTranspose ``2 · in_elements ·
  (C_out/group) · kernel_size`` plus the bias.
- Attention (ONNX ``Attention``, ``com.microsoft`` ``Attention`` and ``MultiHeadAttention``):
  ``2·S_kv·D`` per score for ``Q·Kᵀ``, ``2·S_kv·D_v`` for ``scores·V``, 5 per score for the
  scaled softmax, plus the input projection of ``com.microsoft.Attention``. A graph that spells
  attention out as MatMul/Softmax/MatMul is counted by those rules.
- Element-wise ops count **1 per output element** whatever the function (Add and Erf alike);
  variadic Sum/Max/Min ``n - 1`` per element, Mean ``n``; Softmax and LogSoftmax 5 per element
  (max, subtract, exp, sum, divide).
- Reductions (ReduceSum, ReduceMean, ArgMax, TopK, ...) count 1 per *input* element.
- Normalization per element: BatchNormalization 2 (per-channel scale and shift), Layer/Instance/
  Group/MeanVariance normalization 7 (mean, subtract, square, sum, normalize, scale, bias),
  RMS-style normalizations 4, the ``Skip`` variants one more for the residual add.
- Pooling: windowed pools ``out_elements · kernel_size``; global pools 1 per input element.
  Resize: nearest 0, linear ``2·2ᵏ`` and cubic ``2·4ᵏ`` per output element (k resized axes).
- Data movement (Reshape, Transpose, Gather, Concat, Slice, Cast, Pad, ...) is 0 FLOPs.

Anything else counts 0 and is listed as *not estimated*, with the reason: no formula for the op,
a shape that inference could not make concrete, a model-local function, or control flow
(If/Loop/Scan bodies run a data-dependent number of times). Only the main graph is walked.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import onnx

__all__ = ["FlopsReport", "NodeFlops", "bind_and_infer_shapes", "estimate_flops"]

logger = logging.getLogger(__name__)

#: Initializers up to this many bytes keep their data for shape inference (shape constants).
_KEEP_INITIALIZER_BYTES = 4096
_KEEP_INTEGER_INITIALIZER_BYTES = 1 << 20
_INTEGER_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8,
                            onnx.TensorProto.UINT8, onnx.TensorProto.BOOL})

Shape = tuple[int, ...]


@dataclass
class NodeFlops:
    """The estimate for one node: ``flops`` is ``None`` when it could not be estimated."""

    node: str
    op: str
    flops: int | None
    reason: str = ""


@dataclass
class FlopsReport:
    """FLOPs of one inference: total, per node, by op type, and what was not estimated.

    Attributes:
        total: the sum over the nodes that were estimated.
        nodes: one :class:`NodeFlops` per node of the main graph, in graph order.
        dims: the sizes symbolic input dims were bound to.
    """

    total: int
    nodes: list[NodeFlops]
    dims: dict[str, int] = field(default_factory=dict)

    def by_op(self) -> dict[str, int]:
        """FLOPs per op type (estimated nodes only), largest first."""
        counts: Counter = Counter()
        for n in self.nodes:
            if n.flops:
                counts[n.op] += n.flops
        return dict(counts.most_common())

    def not_estimated(self) -> dict[str, dict[str, Any]]:
        """Op types with nodes that were not estimated: ``{op: {"count": n, "reason": ...}}``."""
        out: dict[str, dict[str, Any]] = {}
        for n in self.nodes:
            if n.flops is None:
                entry = out.setdefault(n.op, {"count": 0, "reason": n.reason})
                entry["count"] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"total": self.total, "dims": dict(self.dims), "by_op": self.by_op(),
                "not_estimated": self.not_estimated()}


def _op_label(domain: str, op_type: str) -> str:
    return op_type if domain in ("", "ai.onnx") else f"{domain}.{op_type}"


# -- shapes ------------------------------------------------------------------------------------------

def _skeleton(proto: onnx.ModelProto, dims: Mapping[str, int], default_dim: int) -> onnx.ModelProto:
    """A copy fit for shape inference: inputs bound to sizes, large weights reduced to their types.

    Large initializers become typed graph inputs, so no weight bytes are copied or read (external
    data stays on disk); small ones keep their data, as Reshape and friends need their values.
    """
    skel = onnx.ModelProto()
    skel.ir_version = proto.ir_version
    skel.opset_import.extend(proto.opset_import)
    skel.functions.extend(proto.functions)
    g, src = skel.graph, proto.graph
    g.name = src.name
    g.node.extend(src.node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    init_names = {t.name for t in src.initializer} | {s.values.name for s in src.sparse_initializer}
    for inp in src.input:
        if inp.name in init_names:
            continue
        bound = g.input.add()
        bound.CopyFrom(inp)
        if bound.type.HasField("tensor_type") and bound.type.tensor_type.HasField("shape"):
            for d in bound.type.tensor_type.shape.dim:
                if d.HasField("dim_value"):
                    continue
                size = dims.get(d.dim_param, default_dim) if d.HasField("dim_param") else default_dim
                d.dim_value = size  # setting the value clears the oneof's dim_param
    for t in src.initializer:
        # Integer tensors (shapes, indices, position ids) steer shape inference through Reshape,
        # Slice and Gather, so they are kept up to a larger size than float weights.
        limit = _KEEP_INTEGER_INITIALIZER_BYTES if t.data_type in _INTEGER_TYPES else _KEEP_INITIALIZER_BYTES
        small = t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() <= limit
        if small:
            g.initializer.append(t)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for s in src.sparse_initializer:
        g.input.append(onnx.helper.make_tensor_value_info(s.values.name, s.values.data_type, list(s.dims)))
    return skel


def bind_and_infer_shapes(proto: onnx.ModelProto, *, dims: Mapping[str, int] | None = None,
                          default_dim: int = 1) -> dict[str, tuple[int | None, ...]]:
    """Shapes of the main graph's values with symbolic input dims bound to sizes.

    Args:
        proto: the model; external data need not be loaded (``onnx.load(..., load_external_data=False)``).
        dims: sizes of symbolic input dims by name.
        default_dim: size of the symbolic or unknown input dims not in ``dims``.

    Returns:
        Value name -> shape; a dim inference could not determine is ``None``. Values of
        unknown rank are left out.

    Example:
        >>> shapes = bind_and_infer_shapes(onnx.load("m.onnx", load_external_data=False),
        ...                                dims={"batch": 8})  # doctest: +SKIP
    """
    skel = _skeleton(proto, dict(dims or {}), default_dim)
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception as exc:  # inference is best effort: nodes without shapes are not estimated
        logger.info("flops: onnx shape inference failed (%s); using declared shapes only", exc)
        inferred = skel
    shapes: dict[str, tuple[int | None, ...]] = {}
    g = inferred.graph
    for info in list(g.input) + list(g.value_info) + list(g.output):
        tt = info.type.tensor_type if info.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            continue
        shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


# -- formulas ----------------------------------------------------------------------------------------

def _numel(shape: Sequence[int | None] | None) -> int | None:
    if shape is None or any(d is None for d in shape):
        return None
    return math.prod(shape)  # type: ignore[arg-type]


class _NodeView:
    """What a formula sees of a node: attributes and the shapes of its inputs and outputs."""

    def __init__(self, node: onnx.NodeProto, shapes: Mapping[str, tuple[int | None, ...]]) -> None:
        self.node = node
        self.inputs = [shapes.get(n) if n else None for n in node.input]
        self.outputs = [shapes.get(n) if n else None for n in node.output]
        self.present = [bool(n) for n in node.input]
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def inp(self, i: int) -> tuple[int | None, ...] | None:
        return self.inputs[i] if i < len(self.inputs) else None

    def has_input(self, i: int) -> bool:
        return i < len(self.present) and self.present[i]

    def out_numel(self, i: int = 0) -> int | None:
        return _numel(self.outputs[i]) if i < len(self.outputs) else None


Formula = Callable[[_NodeView], "int | None"]


def _per_output(k: int) -> Formula:
    return lambda v: None if v.out_numel() is None else k * v.out_numel()  # type: ignore[operator]


def _per_input(k: int) -> Formula:
    return lambda v: None if _numel(v.inp(0)) is None else k * _numel(v.inp(0))  # type: ignore[operator]


def _zero(v: _NodeView) -> int:
    return 0


def _variadic(extra: int) -> Formula:
    def formula(v: _NodeView) -> int | None:
        n = v.out_numel()
        return None if n is None else (len([p for p in v.present if p]) - 1 + extra) * n
    return formula


def _matmul(a_index: int, trans_attr: str | None = None) -> Formula:
    def formula(v: _NodeView) -> int | None:
        a = v.inp(a_index)
        out = v.out_numel()
        if a is None or out is None or not a:
            return None
        k = a[-2] if (trans_attr and v.attrs.get(trans_attr, 0) and len(a) >= 2) else a[-1]
        return None if k is None else 2 * out * k
    return formula


def _gemm(v: _NodeView) -> int | None:
    a, out = v.inp(0), v.outputs[0] if v.outputs else None
    if a is None or out is None or len(a) != 2 or len(out) != 2:
        return None
    k = a[0] if v.attrs.get("transA", 0) else a[1]
    m_n = _numel(out)
    if k is None or m_n is None:
        return None
    return 2 * m_n * k + (m_n if v.has_input(2) else 0)


def _conv(w_index: int, bias_index: int | None) -> Formula:
    def formula(v: _NodeView) -> int | None:
        w, out = v.inp(w_index), v.out_numel()
        per_output = _numel(w[1:]) if w is not None else None
        if out is None or per_output is None:
            return None
        has_bias = bias_index is not None and v.has_input(bias_index)
        return 2 * out * per_output + (out if has_bias else 0)
    return formula


def _conv_transpose(v: _NodeView) -> int | None:
    x, w, out = _numel(v.inp(0)), v.inp(1), v.out_numel()
    per_input = _numel(w[1:]) if w is not None else None
    if x is None or per_input is None or out is None:
        return None
    return 2 * x * per_input + (out if v.has_input(2) else 0)


def _pool(v: _NodeView) -> int | None:
    kernel = v.attrs.get("kernel_shape")
    out = v.out_numel()
    return None if out is None or not kernel else out * math.prod(kernel)


def _resize(v: _NodeView) -> int | None:
    mode = v.attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    x, y = v.inp(0), v.outputs[0] if v.outputs else None
    out = v.out_numel()
    if mode == "nearest":
        return 0
    if x is None or y is None or out is None or len(x) != len(y):
        return None
    resized = sum(1 for a, b in zip(x, y) if a != b)
    taps = 2 ** resized if mode == "linear" else 4 ** resized
    return 2 * taps * out


def _lrn(v: _NodeView) -> int | None:
    out = v.out_numel()
    return None if out is None else out * (2 * int(v.attrs.get("size", 1)) + 3)


def _attention_core(scores: int, d: int, dv: int) -> int:
    return 2 * scores * d + 2 * scores * dv + 5 * scores


def _onnx_attention(v: _NodeView) -> int | None:
    q, k, val = v.inp(0), v.inp(1), v.inp(2)
    if q is None or k is None or val is None or any(x is None for s in (q, k, val) for x in s):
        return None
    if len(q) == 4 and len(k) == 4 and len(val) == 4:
        b, h, sq, d = q
        skv, dv = k[2], val[3]
    elif len(q) == 3 and len(k) == 3 and len(val) == 3:
        heads = v.attrs.get("q_num_heads")
        kv_heads = v.attrs.get("kv_num_heads")
        if not heads or not kv_heads:
            return None
        b, sq, hidden = q
        h, d = heads, hidden // heads
        skv, dv = k[1], val[2] // kv_heads
    else:
        return None
    return _attention_core(b * h * sq * skv, d, dv)  # type: ignore[operator]


def _ms_multihead_attention(v: _NodeView) -> int | None:
    q, k, val = v.inp(0), v.inp(1), v.inp(2)
    heads = v.attrs.get("num_heads")
    if not heads or q is None or k is None or val is None or len(q) != 3 or len(k) != 3 or len(val) != 3:
        return None
    if any(x is None for s in (q, k, val) for x in s):
        return None
    b, sq, hidden = q
    return _attention_core(b * heads * sq * k[1], hidden // heads, val[2] // heads)  # type: ignore[operator]


def _ms_attention(v: _NodeView) -> int | None:
    x, w = v.inp(0), v.inp(1)
    heads = v.attrs.get("num_heads")
    if not heads or x is None or w is None or len(x) != 3 or len(w) != 2:
        return None
    if any(d is None for d in (*x, *w)):
        return None
    b, s, hidden_in = x
    sizes = v.attrs.get("qkv_hidden_sizes") or [w[1] // 3] * 3
    projection = 2 * b * s * hidden_in * w[1] + (b * s * w[1] if v.has_input(2) else 0)  # type: ignore[operator]
    return projection + _attention_core(b * heads * s * s, sizes[0] // heads, sizes[2] // heads)  # type: ignore[operator]


def _einsum(v: _NodeView) -> int | None:
    equation = v.attrs.get("equation", b"")
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    lhs = equation.split("->")[0]
    terms = lhs.split(",")
    if "." in lhs or len(terms) != len(v.inputs):
        return None
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, v.inputs):
        if shape is None or len(shape) != len(term):
            return None
        for letter, d in zip(term, shape):
            if d is None:
                return None
            sizes[letter] = max(sizes.get(letter, 1), d)
    work = math.prod(sizes.values())
    return 2 * work if len(terms) > 1 else work


_ELEMENTWISE = (
    "Add Sub Mul Div Pow Mod Neg Abs Reciprocal Sqrt Exp Log Floor Ceil Round Sign Relu LeakyRelu "
    "PRelu Elu Selu Celu Gelu Sigmoid HardSigmoid HardSwish Tanh Softplus Softsign Mish ThresholdedRelu "
    "Erf Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Clip Where Equal Less LessOrEqual "
    "Greater GreaterOrEqual And Or Xor Not BitShift BitwiseAnd BitwiseOr BitwiseXor BitwiseNot "
    "IsNaN IsInf Shrink QuantizeLinear DequantizeLinear DynamicQuantizeLinear Swish"
).split()
_ZERO = (
    "Reshape Transpose Squeeze Unsqueeze Flatten Concat Split Slice Gather GatherElements GatherND "
    "Scatter ScatterElements ScatterND Expand Tile Pad Identity Shape Size Constant ConstantOfShape "
    "Cast CastLike DepthToSpace SpaceToDepth Range NonZero Dropout EyeLike Trilu OneHot "
    "ReverseSequence Compress"
).split()
_REDUCTIONS = (
    "ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
    "ReduceLogSumExp ReduceSumSquare ArgMax ArgMin TopK Hardmax CumSum GlobalAveragePool "
    "GlobalMaxPool GlobalLpPool"
).split()

_FORMULAS: dict[tuple[str, str], Formula] = {
    **{("", op): _per_output(1) for op in _ELEMENTWISE},
    **{("", op): _zero for op in _ZERO},
    **{("", op): _per_input(1) for op in _REDUCTIONS},
    ("", "Sum"): _variadic(0), ("", "Max"): _variadic(0), ("", "Min"): _variadic(0),
    ("", "Mean"): _variadic(1),
    ("", "Softmax"): _per_output(5), ("", "LogSoftmax"): _per_output(5),
    ("", "MatMul"): _matmul(0), ("", "MatMulInteger"): _matmul(0), ("", "QLinearMatMul"): _matmul(0),
    ("", "Gemm"): _gemm,
    ("", "Conv"): _conv(1, 2), ("", "ConvInteger"): _conv(1, None), ("", "QLinearConv"): _conv(3, 8),
    ("", "ConvTranspose"): _conv_transpose,
    ("", "MaxPool"): _pool, ("", "AveragePool"): _pool, ("", "LpPool"): _pool,
    ("", "BatchNormalization"): _per_output(2),
    ("", "LayerNormalization"): _per_output(7), ("", "InstanceNormalization"): _per_output(7),
    ("", "GroupNormalization"): _per_output(7), ("", "MeanVarianceNormalization"): _per_output(7),
    ("", "RMSNormalization"): _per_output(4), ("", "LpNormalization"): _per_output(3),
    ("", "LRN"): _lrn, ("", "Resize"): _resize, ("", "Upsample"): _resize,
    ("", "Attention"): _onnx_attention, ("", "Einsum"): _einsum,
    ("com.microsoft", "FusedMatMul"): _matmul(0, "transA"),
    ("com.microsoft", "MatMulNBits"): _matmul(0),
    ("com.microsoft", "FusedConv"): _conv(1, 2), ("com.microsoft", "NhwcConv"): _conv(1, 2),
    ("com.microsoft", "FastGelu"): _per_output(1), ("com.microsoft", "BiasGelu"): _per_output(2),
    ("com.microsoft", "Gelu"): _per_output(1), ("com.microsoft", "QuickGelu"): _per_output(1),
    ("com.microsoft", "SkipLayerNormalization"): _per_output(8),
    ("com.microsoft", "SimplifiedLayerNormalization"): _per_output(4),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): _per_output(5),
    ("com.microsoft", "Attention"): _ms_attention,
    ("com.microsoft", "MultiHeadAttention"): _ms_multihead_attention,
}

_CONTROL_FLOW = {"If", "Loop", "Scan"}


def _node_estimate(node: onnx.NodeProto, shapes: Mapping[str, tuple[int | None, ...]],
                   functions: set[tuple[str, str]]) -> tuple[int | None, str]:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    if (node.domain, node.op_type) in functions:
        return None, "model-local function"
    if domain == "" and node.op_type in _CONTROL_FLOW:
        return None, "control flow (subgraph runs a data-dependent number of times)"
    formula = _FORMULAS.get((domain, node.op_type))
    if formula is None:
        return None, "no FLOP formula for this op"
    flops = formula(_NodeView(node, shapes))
    if flops is None:
        return None, "shape unknown after shape inference"
    return int(flops), ""


def estimate_flops(model: onnx.ModelProto | Any, *, dims: Mapping[str, int] | None = None,
                   default_dim: int = 1) -> FlopsReport:
    """Estimate the FLOPs of one inference (see the module notes for the conventions).

    Args:
        model: an ``onnx.ModelProto`` (external data need not be loaded) or a graphopt IR
            ``Model`` (written to a proto first, so its tensors are read).
        dims: sizes of symbolic input dims by name.
        default_dim: size of the symbolic input dims not in ``dims``.

    Returns:
        A :class:`FlopsReport`; nodes without an estimate count 0 and are listed with a reason.

    Example:
        >>> report = estimate_flops(onnx.load("m.onnx", load_external_data=False),
        ...                         dims={"batch": 1})  # doctest: +SKIP
        >>> report.total, report.not_estimated()  # doctest: +SKIP
        (1823473664, {})
    """
    if not isinstance(model, onnx.ModelProto):
        from graphopt import ir

        model = ir.to_proto(model)
    dims = dict(dims or {})
    shapes = bind_and_infer_shapes(model, dims=dims, default_dim=default_dim)
    functions = {(f.domain, f.name) for f in model.functions}
    nodes: list[NodeFlops] = []
    for node in model.graph.node:
        flops, reason = _node_estimate(node, shapes, functions)
        nodes.append(NodeFlops(node.name, _op_label(node.domain, node.op_type), flops, reason))
    total = sum(n.flops or 0 for n in nodes)
    symbolic = {d.dim_param for i in model.graph.input if i.type.HasField("tensor_type")
                for d in i.type.tensor_type.shape.dim if d.HasField("dim_param")}
    bound = {name: dims.get(name, default_dim) for name in sorted(symbolic)}
    logger.info("flops: %d estimated over %d node(s), %d not estimated", total, len(nodes),
                sum(1 for n in nodes if n.flops is None))
    return FlopsReport(total=total, nodes=nodes, dims=bound)
