"""Target-aware QDQ placement: which node units get QuantizeLinear/DequantizeLinear.

A node unit is what onnxruntime turns into one integer kernel when it finds
``DequantizeLinear`` on every input and (where the kernel needs it) ``QuantizeLinear`` on the
output. Placement only picks units the target provider really fuses; a Q/DQ pair anywhere else
is a float round trip that costs time and accuracy.

onnxruntime's CPU provider on x86 (its QDQ selectors and actions):

* ``Conv`` (constant weight, optional constant bias) → ``QLinearConv``; needs Q on the output.
  U8 and S8 activations both fuse; a ``Relu`` right after joins the unit: the Q behind it has
  zero point at the type's minimum and onnxruntime drops the Relu.
* ``MatMul`` with a constant 2-D weight → ``MatMulIntegerToFloat`` (float output) or
  ``QLinearMatMul`` (with Q on the output). U8 activations only: with S8S8 onnxruntime leaves
  the MatMul unfused on x86.
* ``Gemm`` (constant B, ``transA=0``, C absent or a constant 1-D bias with ``beta=1``) → ``QGemm``.
* ``Add``, ``Mul`` → ``QLinearAdd``/``QLinearMul`` (a two-input ``Sum`` is emitted as
  ``Add``); ``Concat`` → ``QLinearConcat``; ``GlobalAveragePool``/``AveragePool`` → their
  QLinear forms: only when every input is already quantized and the output feeds quantized
  units, else the boundary conversions cost more than the integer kernel saves. A ``Relu``
  after them joins the unit as after a Conv. A ``Concat`` whose inputs integer kernels write
  joins even when only float ops read it (one DQ after it instead of one per input), and an
  input only the Concat reads is written with the Concat's parameters, so QLinearConcat copies
  it instead of requantizing.
* ``Sigmoid`` → ``QLinearSigmoid`` (a lookup table): with ``QLinearMul`` a SiLU (``x·σ(x)``)
  between two convolutions stays integer instead of a DQ, two float ops and a Q.
* ``MaxPool``, ``Reshape``, ``Flatten``, ``Transpose``, ``Squeeze``, ``Unsqueeze``, ``Resize``,
  ``Split`` (a Q on every output): onnxruntime drops a DQ/Q pair with equal parameters around
  them; placed (with the input's parameters) only between quantized tensors.
* With int8 (S8S8) activations only Conv and Gemm units are placed: onnxruntime rewrites S8
  pairs to U8 before fusing, and a quantized tensor read by several units then stays unfused.

The CUDA provider fuses none of these; placement then returns no unit and says why.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt import ir
from graphopt.errors import GraphoptError

__all__ = [
    "COMPUTE_OPS",
    "DEFAULT_OP_TYPES",
    "ELEMENTWISE_OPS",
    "PASS_THROUGH_OPS",
    "RELU_JOINS",
    "OVERRIDABLE_WEIGHT",
    "NodeUnit",
    "Placement",
    "PlacementConfig",
    "plan_placement",
    "unit_id",
]

logger = logging.getLogger(__name__)

#: Ops with weights that become integer matrix kernels.
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
#: Ops with a QLinear contrib kernel on the CPU provider (quantized only between quantized tensors).
ELEMENTWISE_OPS = ("Add", "Mul", "Sum", "Concat", "GlobalAveragePool", "AveragePool", "Sigmoid")
#: Elementwise ops a following Relu joins: onnxruntime drops a Relu whose only reader is a Q with
#: the zero point at the type's minimum (the Q clips at 0 anyway).
RELU_JOINS = ("Add", "Mul", "Sum", "Concat", "GlobalAveragePool", "AveragePool")
#: Ops that onnxruntime runs on integers once the DQ/Q pair around them is dropped.
PASS_THROUGH_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Split")
#: What ``op_types=None`` quantizes.
DEFAULT_OP_TYPES = COMPUTE_OPS + ELEMENTWISE_OPS + PASS_THROUGH_OPS

_FLOAT = onnx.TensorProto.FLOAT


@dataclass
class PlacementConfig:
    """What to quantize, for which target.

    Attributes:
        target: ``"cpu"`` or ``"cuda"``.
        activation_type: ``"uint8"`` (fuses everything on x86) or ``"int8"``.
        weight_type: ``"int8"``.
        per_channel: per-output-channel weight scales where the opset allows it.
        op_types: op types to quantize (``None``: :data:`DEFAULT_OP_TYPES`).
        include: node-name patterns (regular expressions, full match); when given, only
            matching units are quantized.
        exclude: node-name patterns (or unit ids) that stay in float.
        activation_matmul: also quantize MatMuls of two activations (attention scores); off
            by default: their inputs are rarely quantized already and softmax probabilities
            lose most of their precision in 8 bits.
    """

    target: str = "cpu"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    op_types: tuple[str, ...] | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    activation_matmul: bool = False


@dataclass
class NodeUnit:
    """One group of nodes that becomes one integer kernel.

    Attributes:
        id: stable name (the anchor node's name, else ``<op>_<position>``).
        node: the anchor node (Conv, MatMul, ...).
        kind: ``"compute"``, ``"elementwise"`` or ``"pass-through"``.
        activations: input indices of ``node`` that take quantized activations.
        weight: input index of the constant weight (compute units).
        weight_axis: channel axis of the weight for per-channel scales (``None``: per tensor).
        bias: input index of the bias quantized to int32 (``None``: no bias).
        output: the value whose Q the kernel writes (after a fused Relu), or ``None``.
        fused_relu: the Relu node that joins the unit.
        output_required: the kernel needs Q on its output to fuse at all.
    """

    id: str
    node: ir.Node
    kind: str
    activations: tuple[int, ...]
    weight: int | None = None
    weight_axis: int | None = None
    bias: int | None = None
    output: ir.Value | None = None
    fused_relu: ir.Node | None = None
    output_required: bool = False
    #: Further outputs written quantized with the parameters of ``output`` (Split).
    extra_outputs: tuple[ir.Value, ...] = ()

    @property
    def op_type(self) -> str:
        """The anchor's op type."""
        return self.node.op_type


@dataclass
class Placement:
    """Chosen units, the activation tensors to quantize, and what stayed float and why."""

    units: list[NodeUnit] = field(default_factory=list)
    #: Activation tensors that get a QuantizeLinear, by name.
    tensors: dict[str, ir.Value] = field(default_factory=dict)
    #: Tensor name -> the tensor whose parameters it shares (pass-through outputs).
    shares: dict[str, str] = field(default_factory=dict)
    #: (unit id, op type, reason) of candidates left in float.
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    #: Why the whole model was left alone, if it was.
    reason: str = ""

    def tensor_names(self) -> list[str]:
        """Names of the activation tensors that need a calibrated range."""
        return sorted(name for name in self.tensors if name not in self.shares)

    def root(self, name: str) -> str:
        """The tensor whose range and parameters ``name`` uses."""
        seen = set()
        while name in self.shares and name not in seen:
            seen.add(name)
            name = self.shares[name]
        return name


def unit_id(node: ir.Node, position: int) -> str:
    """A stable identifier of the unit anchored at ``node`` (its name, else op and position)."""
    return node.name or f"{node.op_type}_{position}"


def _is_float(v: ir.Value | None) -> bool:
    return v is not None and v.dtype == _FLOAT


def _const_array(v: ir.Value | None) -> np.ndarray | None:
    if v is None or not v.is_constant() or v.const_value is None:
        return None
    try:
        return v.const_value.numpy()
    except (GraphoptError, OSError, ValueError):  # an unreadable lazy tensor: not a constant here
        return None


#: Why a weight that is an overridable graph input stays float.
OVERRIDABLE_WEIGHT = ("the weight is also a graph input, which callers may override (models of IR "
                      "version < 4 list every initializer as an input: drop them from the inputs)")


def _overridable(v: ir.Value | None) -> bool:
    return v is not None and v.is_graph_input() and v.const_value is not None


def _matches(patterns: Iterable[str], uid: str) -> bool:
    return any(p == uid or re.fullmatch(p, uid) for p in patterns)


def _fusable_relu(out: ir.Value) -> ir.Node | None:
    """The Relu that is the only reader of ``out`` (and ``out`` is not a graph output)."""
    if out.is_graph_output():
        return None
    users = out.uses()
    if len(users) != 1:
        return None
    node = users[0][0]
    if node.op_type == "Relu" and node.domain in ("", "ai.onnx"):
        return node
    return None


def _compute_unit(node: ir.Node, uid: str, config: PlacementConfig, per_channel: bool) -> NodeUnit | str:
    """The unit anchored at a Conv/MatMul/Gemm, or why it stays float."""
    op = node.op_type
    inputs = node.inputs
    x = inputs[0] if inputs else None
    # Conv/MatMul/Gemm take one type T for data, weight and output: a float32 weight proves an
    # activation whose type inference could not give (it stops at contrib ops such as
    # MultiHeadAttention in models fused before quantization).
    weight_is_float = len(inputs) > 1 and _is_float(inputs[1]) and inputs[1].is_constant()
    if not all(_is_float(v) or (v is not None and v.dtype is None and weight_is_float)
               for v in (x, node.outputs[0])):
        return "not float32"
    if x.is_constant():
        return "its data input is a constant (fold it first)"
    if len(inputs) > 1 and _overridable(inputs[1]):
        return OVERRIDABLE_WEIGHT
    if op == "Conv":
        w = _const_array(inputs[1] if len(inputs) > 1 else None)
        if w is None or w.ndim not in (3, 4, 5):
            return "the weight is not a constant 3-D to 5-D tensor"
        bias = inputs[2] if len(inputs) > 2 else None
        if bias is not None and (_const_array(bias) is None or _const_array(bias).shape != (w.shape[0],)):
            return "the bias is not a constant vector"
        relu = _fusable_relu(node.outputs[0])
        out = relu.outputs[0] if relu is not None else node.outputs[0]
        return NodeUnit(uid, node, "compute", (0,), weight=1, weight_axis=0 if per_channel else None,
                        bias=2 if bias is not None else None, output=out, fused_relu=relu,
                        output_required=True)
    if op == "MatMul":
        if config.activation_type == "int8" and config.target == "cpu":
            return "onnxruntime's CPU provider leaves S8S8 MatMul unfused on x86 (use uint8 activations)"
        b = inputs[1]
        w = _const_array(b)
        if w is None:
            if not config.activation_matmul:
                return "both inputs are activations (enable activation MatMuls to quantize it)"
            if not _is_float(b):
                return "not float32"
            return NodeUnit(uid, node, "compute", (0, 1), output=node.outputs[0])
        if w.ndim != 2:
            return f"the weight has rank {w.ndim}; integer MatMul kernels take a 2-D weight"
        return NodeUnit(uid, node, "compute", (0,), weight=1, weight_axis=1 if per_channel else None,
                        output=node.outputs[0])
    if op == "Gemm":
        if int(node.attr("transA", 0)):
            return "transA=1 is not fused into QGemm"
        w = _const_array(inputs[1])
        if w is None or w.ndim != 2:
            return "B is not a constant matrix"
        n = w.shape[0] if int(node.attr("transB", 0)) else w.shape[1]
        c = inputs[2] if len(inputs) > 2 else None
        if c is not None:
            cv = _const_array(c)
            if cv is None or cv.shape != (n,) or float(node.attr("beta", 1.0)) != 1.0:
                return "C is not a constant bias vector with beta=1"
        axis = (0 if int(node.attr("transB", 0)) else 1) if per_channel else None
        return NodeUnit(uid, node, "compute", (0,), weight=1, weight_axis=axis,
                        bias=2 if c is not None else None, output=node.outputs[0])
    return f"{op} is not a compute op"


def plan_placement(model: ir.Model, config: PlacementConfig) -> Placement:
    """Choose the node units of ``model``'s main graph to quantize for ``config.target``.

    Example:
        >>> plan = plan_placement(model, PlacementConfig(target="cpu"))  # doctest: +SKIP
        >>> [u.op_type for u in plan.units]  # doctest: +SKIP
        ['Conv', 'Conv', 'Add', 'Gemm']
    """
    plan = Placement()
    if config.target != "cpu":
        plan.reason = (f"the {config.target} provider fuses no QDQ unit into integer kernels "
                       "(use mode float16/bfloat16 or int4 for GPU targets)")
        return plan
    if config.weight_type != "int8":
        plan.reason = "onnxruntime's CPU kernels take int8 weights (weight_type='int8')"
        return plan
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    per_channel = config.per_channel and opset >= 11
    if config.per_channel and not per_channel:
        logger.info("opset %d has no per-channel DequantizeLinear (in any domain onnxruntime "
                    "fuses): weights use per-tensor scales", opset)
    allowed = set(config.op_types or DEFAULT_OP_TYPES)
    graph = model.graph
    nodes = list(graph)
    ids = {node: unit_id(node, i) for i, node in enumerate(nodes)}
    chosen: dict[ir.Node, NodeUnit] = {}
    quantized: dict[str, ir.Value] = {}
    fused_relus: set[ir.Node] = set()

    def wanted(node: ir.Node) -> str | None:
        uid = ids[node]
        if node.op_type not in allowed:
            return "op type not selected"
        if config.include and not _matches(config.include, uid):
            return "not in the include list"
        if _matches(config.exclude, uid):
            return "excluded"
        return None

    for node in nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in COMPUTE_OPS:
            continue
        why = wanted(node)
        if why is not None:
            if why != "op type not selected":
                plan.skipped.append((ids[node], node.op_type, why))
            continue
        unit = _compute_unit(node, ids[node], config, per_channel)
        if isinstance(unit, str):
            plan.skipped.append((ids[node], node.op_type, unit))
            logger.debug("%s %s stays float: %s", node.op_type, ids[node], unit)
            continue
        chosen[node] = unit
        if unit.fused_relu is not None:
            fused_relus.add(unit.fused_relu)
        for i in unit.activations:
            quantized[node.inputs[i].name] = node.inputs[i]
        if unit.output_required and unit.output is not None:
            quantized[unit.output.name] = unit.output

    # Elementwise and pass-through units join only between quantized tensors. Start from every
    # candidate and drop those whose neighbours are not quantized until none changes: the
    # largest consistent set (a chain Add -> GlobalAveragePool -> Flatten -> Gemm joins whole).
    candidates: dict[ir.Node, NodeUnit] = {}
    # With int8 activations onnxruntime (1.31, x86) converts S8 QDQ to U8 pairs before fusing,
    # which fails for a Q read by several DQs: MaxPool/Add/... units then leave their
    # neighbours unfused (measured). Only compute units are placed.
    between_allowed = config.activation_type == "uint8"
    for node in nodes if between_allowed else ():
        if node in chosen or node in fused_relus or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in ELEMENTWISE_OPS or node.op_type in PASS_THROUGH_OPS:
            if wanted(node) is None:
                unit = _between_candidate(node, ids[node], opset)
                if unit is not None:
                    candidates[node] = unit
    changed = True
    while changed:
        changed = False
        units_now = {**chosen, **candidates}
        for node, unit in list(candidates.items()):
            if not _between_ok(unit, units_now):
                del candidates[node]
                units_now.pop(node)
                changed = True
    for node, unit in candidates.items():
        chosen[node] = unit
        if unit.fused_relu is not None:
            fused_relus.add(unit.fused_relu)
        for i in unit.activations:
            quantized[node.inputs[i].name] = node.inputs[i]
        for out in (unit.output, *unit.extra_outputs):
            quantized[out.name] = out
            if unit.kind == "pass-through":
                plan.shares[out.name] = node.inputs[0].name

    # A Gemm/MatMul output gets Q only when a quantized unit reads it (QLinearMatMul, QGemm with
    # integer output); otherwise the float-output kernels fuse without it.
    for unit in chosen.values():
        if unit.kind == "compute" and not unit.output_required and unit.output is not None:
            if any(_reads_quantized(user, idx, chosen) for user, idx in unit.output.uses()):
                quantized[unit.output.name] = unit.output
                unit.output_required = True
            else:
                unit.output = None
    plan.units = [chosen[n] for n in nodes if n in chosen]
    plan.tensors = quantized
    _share_concat_parameters(plan)
    if not plan.units and not plan.reason:
        plan.reason = "no node unit the target fuses into integer kernels"
        reasons = Counter(why for _, _, why in plan.skipped)
        if reasons:
            why, count = reasons.most_common(1)[0]
            plan.reason += f" ({count} of {len(plan.skipped)} candidate(s): {why})"
    logger.info("QDQ placement: %d unit(s), %d tensor(s) quantized, %d candidate(s) left float",
                len(plan.units), len(quantized), len(plan.skipped))
    return plan


def _share_concat_parameters(plan: Placement) -> None:
    """Concat inputs that only the Concat reads are written with the Concat's parameters.

    QLinearConcat requantizes every input to the output's scale and zero point; an input that
    already has them is copied (measured 5-6x faster than requantizing). The unit writing such
    an input then rounds once, to the output's scale, instead of twice: no precision is lost.
    Inputs with other readers, graph outputs and pass-through outputs (which share their own
    input's parameters) keep theirs, and so do outputs of units with a fused Relu: onnxruntime
    drops that Relu only before a Q whose zero point is the type's minimum.
    """
    writers = {unit.output.name: unit for unit in plan.units
               if unit.output is not None and unit.output_required and unit.kind != "pass-through"
               and unit.fused_relu is None}
    for unit in plan.units:
        if unit.op_type != "Concat" or unit.kind != "elementwise":
            continue
        for i in unit.activations:
            value = unit.node.inputs[i]
            if (value.name in plan.shares or value.name not in writers or value.is_graph_output()
                    or value.num_uses != 1 or writers[value.name] is unit):
                continue
            plan.shares[value.name] = unit.output.name
            logger.debug("%s writes '%s' with the parameters of Concat %s", writers[value.name].id,
                         value.name, unit.id)


def _reads_quantized(user: ir.Node, index: int, chosen: dict[ir.Node, NodeUnit]) -> bool:
    unit = chosen.get(user)
    return unit is not None and index in unit.activations


def _between_candidate(node: ir.Node, uid: str, opset: int) -> NodeUnit | None:
    """The elementwise or pass-through unit ``node`` would form, if its types allow one."""
    op = node.op_type
    if op == "MaxPool" and opset < 12:
        return None  # integer MaxPool exists from opset 12: earlier, the DQ/Q pair would stay
    if op == "Resize" and str(node.attr("mode", "nearest")) not in ("nearest", "linear"):
        # Cubic weights are negative near the taps: results overshoot the input's range, which
        # the input's parameters would clip (measured 19% of the output range).
        return None
    out = node.outputs[0]
    if (len(node.outputs) != 1 and op != "Split") or not all(_is_float(o) for o in node.outputs):
        return None
    if op in PASS_THROUGH_OPS:
        x = node.inputs[0]
        if not _is_float(x) or x.is_constant():
            return None
        # Split: onnxruntime runs it on integers when every output has a Q with the input's
        # parameters, so all outputs are written quantized.
        return NodeUnit(uid, node, "pass-through", (0,), output=out, output_required=True,
                        extra_outputs=tuple(node.outputs[1:]))
    activations = tuple(i for i, v in enumerate(node.inputs) if v is not None)
    if op in ("GlobalAveragePool", "AveragePool", "Sigmoid"):
        activations = (0,)
    if op in ("Add", "Mul", "Sum") and len(activations) != 2:
        return None  # a two-input Sum is an Add (emitted as one): QLinearAdd takes two inputs
    if not activations or any(not _is_float(node.inputs[i]) or node.inputs[i].is_constant()
                              for i in activations):
        return None
    relu = _fusable_relu(out) if op in RELU_JOINS else None
    final = relu.outputs[0] if relu is not None else out
    return NodeUnit(uid, node, "elementwise", activations, output=final, fused_relu=relu,
                    output_required=True)


def _quantized_source(value: ir.Value, reader: ir.Node, units: dict[ir.Node, NodeUnit]) -> bool:
    """True when ``value`` gets a Q anyway: a unit writes it quantized or another unit reads it so."""
    for unit in units.values():
        if unit.output_required and (unit.output is value or value in unit.extra_outputs):
            return True
    return any(user is not reader and _reads_quantized(user, idx, units) for user, idx in value.uses())


def _between_ok(unit: NodeUnit, units: dict[ir.Node, NodeUnit]) -> bool:
    """An elementwise/pass-through unit pays off: a quantized unit reads its output and, for
    elementwise units, every input is quantized for another reason already."""
    outs = (unit.output, *unit.extra_outputs)
    read_quantized = any(_reads_quantized(user, idx, units) for out in outs for user, idx in out.uses())
    if unit.kind == "pass-through":
        return read_quantized
    if unit.op_type == "Concat" and not read_quantized:
        # Inputs that are integer anyway: one DQ after a QLinearConcat replaces one DQ per input
        # (and onnxruntime's layout pass would wrap each of those DQs in a Transpose-Q-DQ chain).
        # Only inputs an integer kernel writes count: a chain of pass-through units quantizing
        # a float tensor just for this Concat (anchor grids of detectors) would be a new Q.
        return all(_written_by_kernel(unit.node.inputs[i], unit.node, units) for i in unit.activations)
    return read_quantized and all(_quantized_source(unit.node.inputs[i], unit.node, units)
                                  for i in unit.activations)


def _written_by_kernel(value: ir.Value, reader: ir.Node, units: dict[ir.Node, NodeUnit],
                      seen: dict[str, bool] | None = None, depth: int = 0) -> bool:
    """True when ``value`` is integer because of a compute unit: one writes it (possibly through
    pass-through and elementwise units whose inputs are so too), or one other than ``reader``
    reads it quantized. Elementwise and pass-through units that only justify each other (a
    float tensor quantized for a Concat that only float ops read) do not count."""
    seen = {} if seen is None else seen
    if value.name in seen:
        return seen[value.name]
    seen[value.name] = False  # a cycle of justifications proves nothing
    found = any(user is not reader and user in units and units[user].kind == "compute"
                and idx in units[user].activations for user, idx in value.uses())
    if not found and depth < 64:
        for unit in units.values():
            if unit.output_required and (unit.output is value or value in unit.extra_outputs):
                found = unit.kind == "compute" or all(
                    _written_by_kernel(unit.node.inputs[i], unit.node, units, seen, depth + 1)
                    for i in unit.activations)
                break
    seen[value.name] = found
    return found
