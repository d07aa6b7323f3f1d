"""``insert-qdq``: static quantization in QDQ form around the node units the target fuses.

Every activation tensor a chosen unit reads gets one ``QuantizeLinear`` (its calibrated range
gives scale and zero point) and one ``DequantizeLinear`` per quantized reader: onnxruntime fuses
a DQ into a kernel only when the kernel is its sole reader. Float readers of the same tensor
share one extra DQ. Weights are stored as int8 with symmetric scales, per output channel where
the opset allows (``axis`` from the op: 0 for Conv, the column axis for MatMul/Gemm); a bias
becomes int32 with scale ``s_x·s_w`` so the kernel adds it into its accumulator.

Legal forms by opset:

* opset >= 13: ``DequantizeLinear(axis=...)`` of the default domain;
* opset 11-12: the default domain has no ``axis``; per-channel weights and biases use
  ``com.microsoft.DequantizeLinear``, which onnxruntime loads and fuses the same way;
* opset 10: per-tensor only (placement already chose it and logged why).

A channel shuffle whose nodes are all quantized pass-through units is emitted as one ``Gather``
of the channels (``_shuffle``): onnxruntime runs it on integers without the 5-D Transpose.

Outputs of the model keep their names, types and shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from graphopt.passes.quant._qparams import (
    QParams,
    activation_qparams,
    bias_min_weight_scale,
    cpu_has_vnni,
    elem_type_of,
    quantize_array,
    quantize_bias,
    weight_qparams,
)
from graphopt.passes.quant._shuffle import channel_shuffle_indices
from graphopt.passes.quant.placement import (
    NodeUnit,
    Placement,
    PlacementConfig,
    plan_placement,
)

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pipeline import Pass, PassContext, PassResult

__all__ = ["CALIBRATION_ANALYSIS", "Emission", "InsertQdq", "insert_qdq", "split_names"]

logger = logging.getLogger(__name__)

#: Name under which the calibration analysis keeps its result in ``ctx.analyses``.
CALIBRATION_ANALYSIS = "quant-calibration"
_MS_DOMAIN = "com.microsoft"
#: Ops that read only a tensor's dims (any element type).
_SHAPE_READERS = ("Shape", "Size")


@dataclass
class Emission:
    """What :func:`insert_qdq` wrote: parameters per tensor, units, counts."""

    placement: Placement
    #: Activation tensor name -> {"range": [min, max], "scale", "zero_point", "type"}.
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Weight name -> QParams summary.
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Unit id -> float tensor the unit computes (present in both models; for SQNR).
    unit_outputs: dict[str, str] = field(default_factory=dict)
    #: Unit id -> float tensors it quantizes on the way in (before their Q; for SQNR).
    unit_inputs: dict[str, list[str]] = field(default_factory=dict)
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    per_channel_form: str = ""
    notes: list[str] = field(default_factory=list)


def split_names(value: Any) -> tuple[str, ...]:
    """``"a,b"``, ``["a", "b"]`` or ``None`` as a tuple of names."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(s.strip() for s in value.split(",") if s.strip())
    return tuple(str(v) for v in value)


def _range_of(ranges: Any, name: str) -> tuple[float, float]:
    if hasattr(ranges, "range"):
        found = ranges.range(name)
    else:
        found = ranges.get(name)
    if found is None:
        raise GraphoptError(f"no calibrated range for tensor '{name}'; calibrate the model again "
                            "(the statistics cache may belong to another model)")
    lo, hi = found
    return float(lo), float(hi)


class _Emitter:
    def __init__(self, model: ir.Model, plan: Placement, config: PlacementConfig,
                 reduce_range: bool, pairs: str) -> None:
        self.model = model
        self.graph = model.graph
        self.plan = plan
        self.config = config
        self.reduce_range = reduce_range
        self.pairs = pairs
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        self.params: dict[str, QParams] = {}
        self.weight_cache: dict[tuple[str, int | None], tuple[ir.Value, ir.Value, ir.Value, QParams]] = {}
        self.emission = Emission(plan)
        #: Names of tensors a quantized unit writes through a Q.
        self.written_by_units: set[str] = set()

    # -- small builders --------------------------------------------------------------------------
    def _init(self, hint: str, array: np.ndarray) -> ir.Value:
        name = self.model.unique_name(hint)
        return self.graph.add_initializer(name, ir.ArrayTensor(np.array(array, copy=True, order="C")))

    def _value(self, hint: str, dtype: int, like: ir.Value | None) -> ir.Value:
        shape = like.shape if like is not None else None
        return ir.Value(self.model.unique_name(hint), ir.TensorType(dtype, shape))

    def _dq_node(self, x: ir.Value, scale: ir.Value, zp: ir.Value, axis: int | None, like: ir.Value,
                 hint: str) -> ir.Node:
        attrs: dict[str, Any] = {}
        domain = ""
        if axis is not None:
            attrs["axis"] = axis
            if self.opset < 13:
                domain = _MS_DOMAIN
                self.model.opset_imports.setdefault(_MS_DOMAIN, 1)
        out = self._value(f"{hint}_dequantized", onnx.TensorProto.FLOAT, like)
        self.emission.dequantize_nodes += 1
        return ir.Node(domain, "DequantizeLinear", [x, scale, zp], attributes=attrs, outputs=[out],
                       name=self.model.unique_name(f"{hint}_DequantizeLinear"))

    # -- activations -----------------------------------------------------------------------------
    def activation_params(self, name: str, ranges: Any) -> QParams:
        """Scale and zero point of activation ``name`` (a pass-through output shares its input's)."""
        root = self.plan.root(name)
        if root not in self.params:
            lo, hi = _range_of(ranges, root)
            self.params[root] = activation_qparams(lo, hi, self.config.activation_type)
            self.emission.tensors[root] = {"range": [lo, hi], **self.params[root].to_dict()}
        if name != root:
            self.emission.tensors[name] = {**self.emission.tensors[root], "shares": root}
        return self.params[root]

    def quantize_tensor(self, value: ir.Value, params: QParams, readers: dict[tuple[int, int], None]) -> None:
        """Q after ``value``; a dedicated DQ per quantized reader, one shared DQ for float readers
        of a tensor a unit writes. With ``pairs="dedicated"`` each quantized reader of a tensor
        no unit writes gets its own Q/DQ pair instead (a unit's output keeps one Q: its kernel
        fuses only with a single Q reading it)."""
        scale = self._init(f"{value.name}_scale", params.scale)
        zp = self._init(f"{value.name}_zero_point", params.zero_point)
        uses = value.uses()
        written = value.name in self.written_by_units
        dedicated = self.pairs == "dedicated" and not written
        main: list[ir.Node] = []

        def main_q() -> ir.Value:
            if not main:
                out = self._value(f"{value.name}_quantized", elem_type_of(params.qtype), value)
                q = ir.Node("", "QuantizeLinear", [value, scale, zp], outputs=[out],
                            name=self.model.unique_name(f"{value.name}_QuantizeLinear"))
                self.graph.insert_after(value.producer, q)  # at the start for a graph input
                self.emission.quantize_nodes += 1
                main.append(q)
            return main[0].outputs[0]

        if written:
            main_q()
        shared: ir.Node | None = None
        for user, index in uses:
            if (id(user), index) in readers:
                source = self._dedicated_q(value, scale, zp, params, user) if dedicated else main_q()
                dq = self._dq_node(source, scale, zp, None, value, value.name)
                self.graph.insert_before(user, dq)
                user.replace_input(index, dq.outputs[0])
            elif (written and user.graph is self.graph and user.op_type in _SHAPE_READERS
                  and user.domain in ("", "ai.onnx")):
                # Shape/Size read only the dims: the integer tensor has the same, no DQ to compute.
                user.replace_input(index, main_q())
            elif written and user.graph is self.graph:
                # The unit writing ``value`` fuses only when the Q is its only reader: float
                # readers take a DQ. Float readers of other tensors keep reading the float value
                # (no DQ to compute, and no DQ -> float op that onnxruntime might fuse unasked).
                if shared is None:
                    shared = self._dq_node(main_q(), scale, zp, None, value, value.name)
                    self.graph.insert_after(main[0], shared)
                user.replace_input(index, shared.outputs[0])
            # Readers in subgraphs keep the float value: they are never fused.
        if written and value.is_graph_output():
            # The kernel writes integers: the graph output becomes the DQ of its Q, under the
            # output's own name and type, so the model's signature does not change.
            if shared is None:
                shared = self._dq_node(main_q(), scale, zp, None, value, value.name)
                self.graph.insert_after(main[0], shared)
            name, declared = value.name, value.type
            value.name = self.model.unique_name(f"{name}_float")
            shared.outputs[0].name = name
            shared.outputs[0].type = declared
            self.graph.outputs[:] = [shared.outputs[0] if v is value else v for v in self.graph.outputs]

    def _dedicated_q(self, value: ir.Value, scale: ir.Value, zp: ir.Value, params: QParams,
                     user: ir.Node) -> ir.Value:
        out = self._value(f"{value.name}_quantized", elem_type_of(params.qtype), value)
        q = ir.Node("", "QuantizeLinear", [value, scale, zp], outputs=[out],
                    name=self.model.unique_name(f"{value.name}_QuantizeLinear"))
        self.graph.insert_before(user, q)
        self.emission.quantize_nodes += 1
        return out

    # -- weights and biases ----------------------------------------------------------------------
    def quantize_weight(self, unit: NodeUnit, input_params: QParams | None = None) -> QParams:
        """Replace the unit's weight by DQ(int8 weight); return the weight's parameters.

        A Gemm's ``alpha`` is folded into the quantized weight (``alpha`` becomes 1):
        onnxruntime fuses a Gemm with a bias into QGemm only when ``alpha`` is 1. With a bias,
        weight scales are raised where the int32 bias would not fit (``input_params`` gives
        the input scale).
        """
        node = unit.node
        w = node.inputs[unit.weight]
        alpha = float(node.attr("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        min_scale = None
        if unit.bias is not None and input_params is not None:
            bias = node.inputs[unit.bias].const_value.numpy()
            min_scale = bias_min_weight_scale(bias, input_params.scale, unit.weight_axis is not None)
        key = (w.name, unit.weight_axis, alpha, None if min_scale is None else min_scale.tobytes())
        if key not in self.weight_cache:
            array = w.const_value.numpy()
            if alpha != 1.0:
                array = array.astype(np.float64) * alpha
            params = weight_qparams(array, self.config.weight_type, unit.weight_axis, self.reduce_range,
                                    min_scale=min_scale)
            q = quantize_array(array, params, limit=63 if self.reduce_range else 127)
            q_init = self._init(f"{w.name}_quantized", q)
            scale = self._init(f"{w.name}_scale", params.scale)
            zp = self._init(f"{w.name}_zero_point", params.zero_point)
            self.weight_cache[key] = (q_init, scale, zp, params)
            summary = params.to_dict()
            if params.per_channel:
                summary = {"axis": params.axis, "type": params.qtype, "channels": int(params.scale.size),
                           "scale_min": float(params.scale.min()), "scale_max": float(params.scale.max())}
            self.emission.weights[w.name] = {**summary, "shape": list(array.shape)}
        q_init, scale, zp, params = self.weight_cache[key]
        dq = self._dq_node(q_init, scale, zp, params.axis if params.per_channel else None, w, w.name)
        self.graph.insert_before(node, dq)
        node.replace_input(unit.weight, dq.outputs[0])
        if alpha != 1.0:
            node.set_attr("alpha", 1.0)
        return params

    def quantize_bias(self, unit: NodeUnit, input_params: QParams, weight_params: QParams) -> None:
        """Replace the unit's bias by DQ(int32 bias) with scale ``s_x·s_w``."""
        node = unit.node
        b = node.inputs[unit.bias]
        q, scale = quantize_bias(b.const_value.numpy(), input_params.scale, weight_params)
        q_init = self._init(f"{b.name}_quantized", q)
        scale_init = self._init(f"{b.name}_scale", scale)
        zp_init = self._init(f"{b.name}_zero_point", np.zeros(scale.shape, dtype=np.int32))
        axis = 0 if scale.ndim == 1 else None
        dq = self._dq_node(q_init, scale_init, zp_init, axis, b, b.name)
        self.graph.insert_before(node, dq)
        node.replace_input(unit.bias, dq.outputs[0])


def insert_qdq(model: ir.Model, ranges: Any, config: PlacementConfig, *, plan: Placement | None = None,
               reduce_range: bool | None = None, pairs: str = "shared",
               ctx: PassContext | None = None) -> Emission:
    """Quantize ``model`` in place around the units placement picks; return what was written.

    Args:
        model: the float model (its main graph is quantized).
        ranges: calibrated ranges: a mapping ``name -> (min, max)`` or an object with
            ``.range(name)`` (a calibration result).
        config: target, types, per-channel and selection.
        plan: a placement computed before (default: computed here).
        reduce_range: 7-bit weights (default: when the CPU lacks VNNI).
        pairs: ``"shared"`` (one Q per tensor, a DQ per reader) or ``"dedicated"`` (a Q/DQ pair
            per reader).
        ctx: asked before each unit is quantized (``--bisect-limit``).

    Example:
        >>> emission = insert_qdq(model, {"x": (-1.0, 1.0)}, PlacementConfig())  # doctest: +SKIP
    """
    if pairs not in ("shared", "dedicated"):
        raise GraphoptError(f"pairs must be 'shared' or 'dedicated', not '{pairs}'")
    if plan is None:
        plan = plan_placement(model, config)
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    emitter = _Emitter(model, plan, config, reduce_range, pairs)
    emission = emitter.emission
    units = [u for u in plan.units if ctx is None or ctx.allow_rewrite(f"quantize {u.op_type} {u.id}")]
    if ctx is not None and len(units) < len(plan.units):
        emission.notes.append(f"bisect limit: {len(plan.units) - len(units)} unit(s) left float")
    units = _shuffles_as_gather(model, units)
    # Readers that take a dedicated DQ: (node, input index) of every quantized unit input.
    readers: dict[tuple[int, int], None] = {}
    for u in units:
        for i in u.activations:
            readers[(id(u.node), i)] = None
    tensors = {}
    for u in units:
        for i in u.activations:
            tensors[u.node.inputs[i].name] = u.node.inputs[i]
        if u.output_required and u.output is not None:
            for out in (u.output, *u.extra_outputs):
                tensors[out.name] = out
    emitter.written_by_units = {out.name for u in units if u.output_required and u.output is not None
                                for out in (u.output, *u.extra_outputs)}
    # Parameters first (biases need the input scale), then the graph surgery.
    params = {name: emitter.activation_params(name, ranges) for name in tensors}
    for u in units:
        if u.op_type == "Sum":
            # Sum of two tensors is Add (same broadcasting from opset 8); only Add has a QDQ unit.
            u.node.op_type = "Add"
        if u.weight is not None:
            input_params = params[u.node.inputs[u.activations[0]].name]
            wp = emitter.quantize_weight(u, input_params)
            if u.bias is not None:
                emitter.quantize_bias(u, input_params, wp)
        out = u.output if u.output is not None else u.node.outputs[0]
        emission.unit_outputs[u.id] = out.name
        emission.unit_inputs[u.id] = [u.node.inputs[i].name for i in u.activations]
    for name, value in tensors.items():
        emitter.quantize_tensor(value, params[name], readers)
    if any(u.weight_axis is not None for u in units):
        emission.per_channel_form = ("com.microsoft.DequantizeLinear(axis)" if emitter.opset < 13
                                     else "DequantizeLinear(axis)")
    _drop_unused_initializers(model)
    logger.info("insert-qdq: %d unit(s) quantized, %d QuantizeLinear, %d DequantizeLinear",
                len(units), emission.quantize_nodes, emission.dequantize_nodes)
    return emission


def _shuffles_as_gather(model: ir.Model, units: list[NodeUnit]) -> list[NodeUnit]:
    """Channel shuffles whose three nodes are all quantized pass-through units become one Gather
    unit (see :mod:`graphopt.passes.quant._shuffle`); the shuffle's output keeps its name, so its
    parameters (shared with the shuffle's input) are found as before."""
    chosen = {id(u.node) for u in units}
    replaced: set[int] = set()
    result: list[NodeUnit] = []
    graph = model.graph
    for unit in units:
        if id(unit.node) in replaced:
            continue
        found = None
        if unit.kind == "pass-through" and unit.op_type == "Reshape" and unit.node.graph is graph:
            found = channel_shuffle_indices(unit.node)
        if found is None or not all(id(n) in chosen for n in found[0]) or found[0][2].outputs[0].is_graph_output():
            result.append(unit)
            continue
        chain, indices = found
        final = chain[2].outputs[0]
        name = final.name
        index_value = graph.add_initializer(model.unique_name(f"{name}_channel_order"), ir.ArrayTensor(indices))
        out = ir.Value(model.unique_name(f"{name}_gathered"), final.type)
        gather = ir.Node("", "Gather", [chain[0].inputs[0], index_value], attributes={"axis": 1}, outputs=[out],
                         name=model.unique_name(f"{unit.id}_channel_shuffle"))
        graph.insert_before(chain[0], gather)
        final.replace_all_uses_with(out)
        for node in reversed(chain):
            graph.remove(node)
        out.name = name
        replaced.update(id(n) for n in chain)
        logger.debug("channel shuffle %s -> Gather over %d channels", unit.id, indices.size)
        result.append(NodeUnit(unit.id, gather, "pass-through", (0,), output=out, output_required=True))
    return result


def _drop_unused_initializers(model: ir.Model) -> None:
    graph = model.graph
    for value in list(graph.initializers.values()):
        if not value.has_uses() and not value.is_graph_output() and not value.is_graph_input():
            graph.remove_initializer(value)


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class InsertQdq(Pass):
    """Insert QuantizeLinear/DequantizeLinear around the node units the target fuses into integer kernels.

    Reads calibrated ranges from the ``calibrate`` analysis (``ctx.analyses["quant-calibration"]``),
    run automatically before it when the pipeline has not. List options take a quoted
    comma-separated string.

    Example:
        >>> PassManager('calibrate<data="calib/">,insert-qdq<op-types="Conv,MatMul">', ctx).run(model)  # doctest: +SKIP
    """

    name = "insert-qdq"
    opt_level = 3
    requires = frozenset({"quant-calibration", "shapes-inferred"})
    options = {"activation_type": "uint8", "weight_type": "int8", "per_channel": True,
               "op_types": "", "include": "", "exclude": "", "pairs": "shared",
               "reduce_range": "auto", "activation_matmul": False}
    #: What the last run wrote (read by :func:`graphopt.quantize` for its report).
    emission: Emission | None = None

    def placement_config(self, ctx: PassContext) -> PlacementConfig:
        """The placement settings these options and ``ctx.target`` describe."""
        c = self.config
        for key, allowed in (("activation_type", ("uint8", "int8")), ("weight_type", ("int8",))):
            if c[key] not in allowed:
                raise GraphoptError(f"insert-qdq: {key.replace('_', '-')} must be one of "
                                    f"{', '.join(allowed)}, not '{c[key]}'")
        return PlacementConfig(target=ctx.target, activation_type=c["activation_type"],
                               weight_type=c["weight_type"], per_channel=_bool(c["per_channel"]),
                               op_types=split_names(c["op_types"]) or None,
                               include=split_names(c["include"]), exclude=split_names(c["exclude"]),
                               activation_matmul=_bool(c["activation_matmul"]))

    def reduce_range(self) -> bool | None:
        """7-bit weights: ``auto`` (None) decides by the CPU."""
        value = self.config["reduce_range"]
        if isinstance(value, str) and value.lower() == "auto":
            return None
        return _bool(value)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Place, then insert Q/DQ with the calibrated ranges."""
        config = self.placement_config(ctx)
        ranges = ctx.analyses.get(CALIBRATION_ANALYSIS, lambda: None)
        if ranges is None:
            raise GraphoptError("insert-qdq needs calibrated ranges: run the 'calibrate' pass first "
                                "(e.g. 'calibrate<data=\"calib/\">,insert-qdq')")
        plan = plan_placement(model, config)
        if not plan.units:
            logger.info("insert-qdq: nothing to quantize (%s)", plan.reason)
            return PassResult(False, {"units": 0})
        emission = insert_qdq(model, ranges, config, plan=plan, reduce_range=self.reduce_range(),
                              pairs=str(self.config["pairs"]), ctx=ctx)
        self.emission = emission
        return PassResult(emission.quantize_nodes > 0,
                          {"units": len(emission.unit_outputs), "quantize-nodes": emission.quantize_nodes,
                           "dequantize-nodes": emission.dequantize_nodes})

