"""``quantize-dynamic``: int8 weights, activations quantized at run time, for MatMul and Gemm.

Algebra (per output column ``n``; ``s_w[n] = max_k |W[k, n]| / q_max``, ``W_q = round(W / s_w)``
clipped to ``[-q_max, q_max]``, no weight zero point)::

    Y = A · W  ≈  (s_a · (A_q - z_a)) · (s_w · W_q)  =  s_a · s_w · ((A_q - z_a) · W_q)

where ``A_q, s_a, z_a = DynamicQuantizeLinear(A)`` (uint8, computed from the range of ``A`` at
run time). ``Gemm(A, B, C, alpha, beta, transB)`` is the same with ``W = B`` or ``Bᵀ``,
``s_w · alpha`` as the scale and ``beta · C`` as a bias. Weight rounding changes each weight by
at most ``s_w / 2``; the activation rounding by at most ``s_a / 2``.

Emitted form:

* target ``cpu`` with onnxruntime's ``com.microsoft::DynamicQuantizeMatMul`` kernel (probed):
  that one node (the form onnxruntime's own optimizer fuses its dynamic-quantization output
  into, running the MLAS u8s8 GEMM with the weights prepacked once). A following
  ``Add`` of a constant ``[N]`` bias goes into its ``bias`` input.
* otherwise (target ``cuda``, or no kernel): the standard ops
  ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul(s_a · s_w)`` (opset 11 or newer), which
  onnxruntime fuses back on the CPU and every runtime can execute.

Weight scales and codes are those of static quantization (``_qparams.weight_qparams`` and
``quantize_array``): ``s_w`` is rounded to float32 once, and ``round`` is the exact quotient
``W / s_w`` rounded half to even, computed in blocks of rows (temporaries of a few hundred
kilobytes; a ``Gemm`` with ``transB`` is read in its stored layout).

``reduce_range`` (default on) quantizes weights to 7 bits (``q_max = 63``): x86 CPUs without
VNNI compute u8×s8 products in pairs summed into int16 (``vpmaddubsw``), which saturates when
``2 · 255 · 127 > 32767``; with 7-bit weights ``2 · 255 · 63 = 32130`` cannot. Per-channel
scales make every column use its full range, which is when the saturation shows (measured: max
error 9 % of the output range with 8-bit per-channel weights on an AVX2 CPU, 2 % with 7 bits).

Must not fire when:

* the weight is not a constant 2-D float32 initializer (a graph input may be overridden), is
  smaller than ``min_elements``, or is also read by a node this pass does not quantize (the
  float copy would have to stay);
* ``A`` is not float32 or its rank is unknown or below 2; a ``Gemm`` has ``transA`` or a bias
  that is not a constant broadcastable to ``[N]``;
* the node's name matches ``exclude``; the op is not in ``op_types``;
* the standard form is needed and the model's opset is below 11.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx.helper as oh
from graphopt.passes.quant._lowp_common import (
    CONTRIB_DOMAIN,
    add_weight,
    compile_exclude,
    parse_bool,
    positive_int,
    remove_if_unused,
    require_opset,
    session_loads,
    transfer_outputs,
    weight_tensor,
    whole_weights,
)
from graphopt.passes.quant._qparams import QParams, quantize_array, weight_qparams
from onnx import TensorProto

from graphopt import ir
from graphopt.errors import PipelineError
from graphopt.pipeline import Pass, PassContext, PassResult

__all__ = ["QuantizeDynamic", "dynamic_kernel_available", "int8_scale", "quantize_weight_int8"]

logger = logging.getLogger(__name__)

#: ``DynamicQuantizeLinear`` (the standard form's first op) starts at opset 11.
STANDARD_FORM_OPSET = 11
_SUPPORTED_OPS = ("MatMul", "Gemm")


def quantize_weight_int8(weight: np.ndarray, per_channel: bool, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of a ``[K, N]`` weight: ``(W_q int8, scale float32)``.

    The scale is ``[N]`` per output column (``per_channel``) or a scalar; an all-zero column
    gets scale 1 (its codes are 0 either way). Codes are ``round(W / s)`` of the exact
    quotient, half to even, clipped to ``±q_max``: the math of
    :func:`~graphopt.passes.quant._qparams.weight_qparams` and
    :func:`~graphopt.passes.quant._qparams.quantize_array` (blocks of rows, temporaries a few
    hundred kilobytes), which static quantization uses too. A weight that is not float32 is
    quantized as its float32 copy.

    Example:
        >>> q, s = quantize_weight_int8(np.array([[1.0, -2.0], [0.5, 1.0]], np.float32), True, False)
        >>> q.tolist(), [round(float(v), 4) for v in s]
        ([[127, -127], [64, 64]], [0.0079, 0.0157])
    """
    w, transposed = _row_major(weight)
    params = _int8_params(w, transposed, per_channel, reduce_range)
    codes = quantize_array(w, params, limit=_q_max(reduce_range))
    return (codes.T if transposed else codes), params.scale


def int8_scale(weight: np.ndarray, per_channel: bool, reduce_range: bool) -> np.ndarray:
    """The scales :func:`quantize_weight_int8` uses: ``max |W[:, n]| / q_max`` (1 for zeros).

    Example:
        >>> int8_scale(np.array([[1.0, 0.0], [-2.54, 0.0]], np.float32), True, False).tolist()
        [0.019999999552965164, 1.0]
    """
    return _int8_params(*_row_major(weight), per_channel, reduce_range).scale


def _q_max(reduce_range: bool) -> int:
    """Largest weight code: 63 with 7-bit weights (``reduce_range``), else 127."""
    return 63 if reduce_range else 127


def _row_major(weight: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(w, transposed)``: the float32 ``[K, N]`` weight, or its transpose when that one is row-major.

    A column-major weight (the ``Bᵀ`` view of a ``Gemm`` with ``transB``) is read in blocks of
    its stored rows, which is several times faster than blocks of rows of the view.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"int8 weight quantization takes a 2-D [K, N] weight, got shape {list(w.shape)}")
    if not w.flags.c_contiguous and w.T.flags.c_contiguous:
        return w.T, True
    return w, False


def _int8_params(weight: np.ndarray, transposed: bool, per_channel: bool, reduce_range: bool) -> QParams:
    """Symmetric int8 parameters per output column (axis 1, or 0 of a ``transposed`` ``[N, K]``) or per tensor.

    ``weight_qparams`` divides the float64 maximum by ``q_max`` and rounds to float32 once;
    that equals the float32 division of the float32 maximum (rounding a float64 quotient of
    float32 values to float32 is the correctly rounded float32 quotient).
    """
    axis = (0 if transposed else 1) if per_channel else None
    return weight_qparams(weight, "int8", axis, reduce_range)


def _probe_model() -> bytes:
    nodes = [oh.make_node("DynamicQuantizeMatMul", ["A", "B", "s", "", "bias"], ["Y"], domain=CONTRIB_DOMAIN)]
    graph = oh.make_graph(
        nodes, "probe", [oh.make_tensor_value_info("A", TensorProto.FLOAT, [2, 4])],
        [oh.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.ones((4, 3), np.int8), "B"),
         onnx.numpy_helper.from_array(np.full(3, 0.5, np.float32), "s"),
         onnx.numpy_helper.from_array(np.zeros(3, np.float32), "bias")])
    model = oh.make_model(graph, ir_version=8, opset_imports=[oh.make_opsetid("", 17),
                                                              oh.make_opsetid(CONTRIB_DOMAIN, 1)])
    return model.SerializeToString()


@functools.cache
def dynamic_kernel_available(target: str) -> bool:
    """True when ``target``'s provider runs ``com.microsoft::DynamicQuantizeMatMul`` (probed).

    Only the CPU provider has that kernel; a target whose provider is absent gets the
    standard-op form.
    """
    if target != "cpu":
        return False
    try:
        return session_loads(target, _probe_model())
    except LookupError:
        return False


@dataclass
class _Candidate:
    node: ir.Node
    a: ir.Value
    weight: ir.Value
    trans_b: bool
    alpha: float
    bias: np.ndarray | None  # beta * C of a Gemm, as [N]


class QuantizeDynamic(Pass):
    """Quantize large MatMul/Gemm weights to int8; activations are quantized at run time.

    Options: ``op_types`` (``MatMul`` and/or ``Gemm``, separated by ``,`` (quoted in a pipeline
    string) or ``+``), ``per_channel`` (one scale per
    output column), ``exclude`` (regex on node names), ``min_elements`` (smaller weights stay
    float), ``reduce_range`` (7-bit weights, safe from int16 saturation on CPUs without VNNI).

    Example:
        >>> from graphopt.pipeline import PassManager, PassContext
        >>> PassManager("quantize-dynamic<min-elements=0>", PassContext()).run(model)  # doctest: +SKIP
    """

    name = "quantize-dynamic"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    options: ClassVar[dict[str, Any]] = {"op_types": "MatMul,Gemm", "per_channel": 1, "exclude": "",
                                         "min_elements": 4096, "reduce_range": 1}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Quantize every eligible node of every graph (weights shared by several nodes once)."""
        op_types = {t.strip() for t in re.split(r"[,+;]", str(self.config["op_types"])) if t.strip()}
        unknown = op_types - set(_SUPPORTED_OPS)
        if unknown:
            raise PipelineError(f"pass '{self.name}': op_types {sorted(unknown)} are not supported; "
                                f"use a subset of {','.join(_SUPPORTED_OPS)}")
        per_channel = parse_bool(self.config["per_channel"], "per_channel", self.name)
        reduce_range = parse_bool(self.config["reduce_range"], "reduce_range", self.name)
        min_elements = positive_int(self.config["min_elements"], "min_elements", self.name)
        exclude = compile_exclude(str(self.config["exclude"]), self.name)
        contrib = dynamic_kernel_available(ctx.target)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        counters = {"quantized-matmul": 0, "quantized-gemm": 0, "fused-bias": 0, "int8-bytes": 0}
        if not contrib and opset < STANDARD_FORM_OPSET:
            logger.info("%s: opset %d is below %d, which DynamicQuantizeLinear needs on target %s; "
                        "nothing quantized", self.name, opset, STANDARD_FORM_OPSET, ctx.target)
            return PassResult(False, counters)
        for graph in [model.graph, *model.graph.subgraphs()]:
            candidates = [c for n in list(graph) if (c := self._candidate(n, op_types, exclude, min_elements))]
            whole = whole_weights([c.weight for c in candidates])
            quantized: dict[tuple[int, bool, float], tuple[ir.Value, ir.Value]] = {}
            for cand in candidates:
                if id(cand.weight) not in whole:
                    logger.debug("%s: weight '%s' is also read by other nodes; kept float", self.name,
                                 cand.weight.name)
                    continue
                if not ctx.allow_rewrite(f"quantize {cand.node.op_type} '{cand.node.name}' to int8 (dynamic)"):
                    break
                if contrib:
                    require_opset(model, CONTRIB_DOMAIN, 1)
                key = (id(cand.weight), cand.trans_b, cand.alpha)
                if key not in quantized:
                    quantized[key] = self._weights(model, graph, cand, per_channel, reduce_range, counters)
                w_q, scale = quantized[key]
                self._emit(model, graph, cand, w_q, scale, contrib, counters)
                counters["quantized-gemm" if cand.node.op_type == "Gemm" else "quantized-matmul"] += 1
            for cand in candidates:
                remove_if_unused(cand.weight)
        if _changed(counters):
            logger.info("%s: %d MatMul, %d Gemm quantized (%s form), %d bias(es) fused", self.name,
                        counters["quantized-matmul"], counters["quantized-gemm"],
                        "DynamicQuantizeMatMul" if contrib else "standard-op", counters["fused-bias"])
        return PassResult(_changed(counters), counters)

    # -- selection ----------------------------------------------------------------------------
    def _candidate(self, node: ir.Node, op_types: set[str], exclude: Any, min_elements: int) -> _Candidate | None:
        if node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
            return None
        reason = _reason(node, exclude, min_elements)
        if reason:
            logger.debug("%s: %s '%s' kept float: %s", self.name, node.op_type, node.name, reason)
            return None
        trans_b = node.op_type == "Gemm" and bool(node.attr("transB", 0))
        alpha = float(node.attr("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        bias = _gemm_bias(node) if node.op_type == "Gemm" else None
        assert node.inputs[0] is not None and node.inputs[1] is not None
        return _Candidate(node, node.inputs[0], node.inputs[1], trans_b, alpha, bias)

    # -- emission -----------------------------------------------------------------------------
    def _weights(self, model: ir.Model, graph: ir.Graph, cand: _Candidate, per_channel: bool,
                 reduce_range: bool, counters: dict[str, int]) -> tuple[ir.Value, ir.Value]:
        tensor = weight_tensor(cand.weight)
        assert tensor is not None
        k, n = tensor.shape[::-1] if cand.trans_b else tensor.shape

        trans_b, alpha = cand.trans_b, np.float32(cand.alpha)

        def codes() -> np.ndarray:
            w = tensor.numpy()
            return quantize_weight_int8(w.T if trans_b else w, per_channel, reduce_range)[0]

        def scales() -> np.ndarray:
            w = tensor.numpy()
            return (int8_scale(w.T if trans_b else w, per_channel, reduce_range) * alpha).astype(np.float32)

        w_q = add_weight(graph, model, f"{cand.weight.name}_quantized", codes, TensorProto.INT8, (k, n))
        scale = add_weight(graph, model, f"{cand.weight.name}_scale", scales, TensorProto.FLOAT,
                           (n,) if per_channel else ())
        counters["int8-bytes"] += k * n
        return w_q, scale

    def _emit(self, model: ir.Model, graph: ir.Graph, cand: _Candidate, w_q: ir.Value, scale: ir.Value,
              contrib: bool, counters: dict[str, int]) -> None:
        node = cand.node
        n = w_q.const_value.shape[1] if isinstance(w_q.const_value, ir.Tensor) else 0
        base = node.name or node.outputs[0].name
        old_bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        bias: ir.Value | None = None
        if cand.bias is not None:
            values = cand.bias
            bias = add_weight(graph, model, f"{base}_bias", lambda: values, TensorProto.FLOAT, (n,))
        fused = _bias_add(node, n) if contrib and cand.bias is None else None
        if fused is not None:
            add, old_bias, values = fused
            tensor = weight_tensor(old_bias)
            bias = old_bias if tensor is not None and tuple(tensor.shape) == (n,) else add_weight(
                graph, model, f"{base}_bias", lambda: values, TensorProto.FLOAT, (n,))
            transfer_outputs(add, [cand.a, w_q, scale, None, bias], op_type="DynamicQuantizeMatMul",
                             domain=CONTRIB_DOMAIN, name=node.name)
            graph.remove(node, force=True)
            counters["fused-bias"] += 1
        elif contrib:
            inputs = [cand.a, w_q, scale] + ([None, bias] if bias is not None else [])
            transfer_outputs(node, inputs, op_type="DynamicQuantizeMatMul", domain=CONTRIB_DOMAIN)
        else:
            self._emit_standard(model, graph, cand, w_q, scale, bias)
        if old_bias is not None and old_bias is not bias:
            remove_if_unused(old_bias)

    def _emit_standard(self, model: ir.Model, graph: ir.Graph, cand: _Candidate, w_q: ir.Value,
                       scale: ir.Value, bias: ir.Value | None) -> None:
        node = cand.node
        base = node.name or node.outputs[0].name
        a_q, a_scale, a_zero = (ir.Value(model.unique_name(f"{base}_{s}"))
                                for s in ("a_quantized", "a_scale", "a_zero_point"))
        dql = ir.Node("", "DynamicQuantizeLinear", [cand.a], outputs=[a_q, a_scale, a_zero], name=f"{base}_dql")
        acc = ir.Value(model.unique_name(f"{base}_int32"))
        mmi = ir.Node("", "MatMulInteger", [a_q, w_q, a_zero], outputs=[acc], name=f"{base}_matmulinteger")
        acc_f = ir.Value(model.unique_name(f"{base}_int32_float"))
        cast = ir.Node("", "Cast", [acc], attributes={"to": TensorProto.FLOAT}, outputs=[acc_f], name=f"{base}_cast")
        combined = ir.Value(model.unique_name(f"{base}_combined_scale"))
        mul_scale = ir.Node("", "Mul", [a_scale, scale], outputs=[combined], name=f"{base}_scale_mul")
        for extra in (dql, mmi, cast, mul_scale):
            graph.insert_before(node, extra)
        if bias is None:
            transfer_outputs(node, [acc_f, combined], op_type="Mul", name=f"{base}_output_mul")
            return
        scaled = ir.Value(model.unique_name(f"{base}_scaled"))
        graph.insert_before(node, ir.Node("", "Mul", [acc_f, combined], outputs=[scaled], name=f"{base}_output_mul"))
        transfer_outputs(node, [scaled, bias], op_type="Add", name=f"{base}_bias_add")


def _changed(counters: dict[str, int]) -> bool:
    return counters["quantized-matmul"] + counters["quantized-gemm"] > 0


def _reason(node: ir.Node, exclude: Any, min_elements: int) -> str:
    """Why ``node`` is not quantized ("" when it is eligible on its own)."""
    if exclude is not None and node.name and exclude.search(node.name):
        return "its name matches exclude"
    a = node.inputs[0] if node.inputs else None
    b = node.inputs[1] if len(node.inputs) > 1 else None
    if a is None or a.dtype != TensorProto.FLOAT:
        return "input A is not float32"
    if a.shape is None or a.shape.rank < 2:
        return "the rank of input A is unknown or below 2"
    tensor = weight_tensor(b)
    if tensor is None:
        return "B is not a constant initializer"
    if tensor.dtype != TensorProto.FLOAT or len(tensor.shape) != 2:
        return f"B is not a 2-D float32 weight (shape {list(tensor.shape)})"
    if tensor.shape[0] * tensor.shape[1] < min_elements:
        return f"B has {tensor.shape[0] * tensor.shape[1]} elements, fewer than min_elements={min_elements}"
    if node.op_type == "Gemm":
        if node.attr("transA", 0):
            return "Gemm has transA=1"
        if len(node.inputs) > 2 and node.inputs[2] is not None and _gemm_bias(node) is None:
            return "the Gemm bias C is not a constant broadcastable to [N]"
    return ""


def _gemm_bias(node: ir.Node) -> np.ndarray | None:
    """``beta · C`` as ``[N]`` when ``C`` is a constant that broadcasts along rows, else None."""
    tensor = weight_tensor(node.inputs[1])
    assert tensor is not None
    n = tensor.shape[0] if node.attr("transB", 0) else tensor.shape[1]
    c_value = node.inputs[2] if len(node.inputs) > 2 else None
    if c_value is None:
        return None
    c_tensor = weight_tensor(c_value)
    if c_tensor is None or c_tensor.dtype != TensorProto.FLOAT:
        return None
    c = c_tensor.numpy()
    if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or (c.ndim >= 1 and c.shape[-1] not in (1, n)):
        return None
    beta = np.float32(node.attr("beta", 1.0))
    return np.broadcast_to(c.reshape(-1) * beta, (n,)).astype(np.float32)


def _bias_add(node: ir.Node, n: int) -> tuple[ir.Node, ir.Value, np.ndarray] | None:
    """The ``Add(Y, bias[N])`` reading a MatMul's only use, and the bias, if it can be fused."""
    out = node.outputs[0]
    if out.is_graph_output() or out.num_uses != 1:
        return None
    add, index = out.uses()[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.graph is not node.graph:
        return None
    other = add.inputs[1 - index]
    tensor = weight_tensor(other)
    if tensor is None or tensor.dtype != TensorProto.FLOAT:
        return None
    shape = tuple(tensor.shape)
    rank = out.shape.rank if out.shape is not None else None
    if not shape or shape[-1] != n or any(d != 1 for d in shape[:-1]) or rank is None or len(shape) > rank:
        return None
    assert other is not None
    return add, other, tensor.numpy().reshape(n).astype(np.float32)
