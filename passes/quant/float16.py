"""``convert-float16``: run a float32 model in float16 (or bfloat16), ops that overflow kept in float32.

Algebra: every float32 tensor ``t`` the converted nodes compute becomes ``round_lowp(t)``;
float16 has an 11-bit significand (relative rounding ``2^-11 ≈ 4.9e-4`` per value) and a
largest finite value of 65504, bfloat16 an 8-bit significand (``2^-8 ≈ 3.9e-3``) and float32's
range. Values that cross between a converted node and a kept one go through a ``Cast``;
widening (low precision → float32) is exact, narrowing rounds.

Which node runs in low precision is decided from the op's ONNX schema at the model's opset:

* a type variable bound by a float32 input *and* an output (``T`` of ``Add``, ``MatMul``,
  ``LayerNormalization``) converts when the schema allows the low type for it: its inputs are
  read in low precision (initializers converted, other values cast) and its outputs become low;
* a type variable bound only by inputs (``Shape``, ``Cast``'s source, comparisons) takes the
  values as they are when all of them are low already, else reads them in float32 (exact);
* a fixed ``tensor(float)`` input (``Resize`` scales) or a type variable bound only by outputs
  (``LayerNormalization``'s ``Mean``, ``RandomNormal``) stays float32;
* ``Constant``, ``ConstantOfShape`` and ``Cast(to=float)`` produce low precision only when
  every reader reads low precision (so a value a kept op reads is never rounded first);
* ops that only move data (``Reshape``, ``Transpose``, ``Gather``...) follow their input: they
  run in low precision only when it arrives so or is a weight (narrowing an activation just to
  move it adds a rounding; a weight is converted once and shrinks the model);
* ops in ``block_ops``, ops without a schema (unless onnxruntime's provider for the target has a
  low-precision kernel for the contrib op), control-flow ops (their bodies are converted inside,
  with float32 at the body's borders), and, for bfloat16, ops the target's provider has no
  bfloat16 kernel for (probed with a one-node session) stay float32.

Initializers beyond float16's range are clipped to ±65504 (and non-zero values below the
smallest subnormal to ±2^-24) with a warning when ``max_finite_clamp=1``; with ``0`` the nodes
reading them stay float32. Graph inputs and outputs stay float32 with ``keep_io_types=1`` (a
``Cast`` at each border); otherwise the signature becomes low precision. Finally
``Cast(Cast(x: L, to=W), to=L)`` with ``W`` wider than ``L`` (float16/bfloat16 → float32,
float32 → double) is exactly ``x`` and goes; ``Cast(Cast(x: float32, to=float16), to=float32)``
rounds, so it stays.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx.defs
import onnx.helper as oh
from graphopt.passes.contrib.capabilities import provider_supports
from graphopt.passes.quant._lowp_common import CONTRIB_DOMAIN, parse_bool, session_loads
from onnx import TensorProto

from graphopt import ir
from graphopt.errors import PipelineError
from graphopt.pipeline import Pass, PassContext, PassResult
from graphopt.runtime import max_ir_version

__all__ = ["DEFAULT_BLOCK_OPS", "FLOAT16_MAX", "ConvertFloat16", "to_low_precision"]

logger = logging.getLogger(__name__)

#: Ops kept in float32 by default: overflow or lose accuracy in float16 (powers and products,
#: sums of squares, cumulative sums), index/coordinate arithmetic (Range, Resize, RoiAlign,
#: NonMaxSuppression, TopK whose indices change under ties), random ops, quantization ops
#: (their float32 scales are part of the integer kernels' contract). Follows onnxruntime's and
#: onnxconverter-common's float16 practice, plus the power and sum-of-squares reductions.
DEFAULT_BLOCK_OPS = ("Pow", "ReduceProd", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "CumSum",
                     "Range", "Resize", "Upsample", "RoiAlign", "NonMaxSuppression", "TopK",
                     "RandomUniformLike", "RandomNormalLike", "Multinomial", "QuantizeLinear",
                     "DequantizeLinear", "DynamicQuantizeLinear")
#: Largest finite float16.
FLOAT16_MAX = 65504.0
#: Smallest positive float16 (subnormal).
FLOAT16_TINY = 2.0 ** -24
_DTYPES = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
_TYPE_STR = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}
_FLOAT = TensorProto.FLOAT
#: Ops whose float output type comes from an attribute the pass can rewrite.
_ATTRIBUTE_TYPED = ("Constant", "ConstantOfShape", "Cast")
#: Ops that only move data: converted only when their input already arrives in low precision.
_DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand", "Tile",
                            "Slice", "Split", "Gather", "GatherElements", "GatherND", "Concat", "Pad",
                            "DepthToSpace", "SpaceToDepth"})
#: Exact widening casts: (narrow, wide).
_EXACT_WIDENING = {(TensorProto.FLOAT16, _FLOAT), (TensorProto.BFLOAT16, _FLOAT),
                   (TensorProto.FLOAT16, TensorProto.DOUBLE),
                   (TensorProto.BFLOAT16, TensorProto.DOUBLE), (_FLOAT, TensorProto.DOUBLE)}


def to_low_precision(array: np.ndarray, dtype: int, clamp: bool) -> np.ndarray:
    """``array`` rounded to float16 or bfloat16 (clipped into float16's range when ``clamp``).

    Example:
        >>> to_low_precision(np.array([1e5, 1e-9, 0.1], np.float32), TensorProto.FLOAT16, True).tolist()
        [65504.0, 5.960464477539063e-08, 0.0999755859375]
    """
    a = np.asarray(array, dtype=np.float32)
    if dtype == TensorProto.BFLOAT16:
        import ml_dtypes

        return a.astype(ml_dtypes.bfloat16)
    if clamp:
        a = np.clip(a, -FLOAT16_MAX, FLOAT16_MAX)
        tiny = (a != 0) & (np.abs(a) < FLOAT16_TINY)
        a = np.where(tiny, np.sign(a) * FLOAT16_TINY, a).astype(np.float32)
    with np.errstate(over="ignore"):  # unclamped values beyond the range become ±inf, as a Cast would
        return a.astype(np.float16)


def _out_of_range(array: np.ndarray) -> bool:
    finite = np.abs(array[np.isfinite(array)]) if array.size else array
    return bool(finite.size and finite.max() > FLOAT16_MAX)


@dataclass
class _Plan:
    """What one node does: the inputs it reads in low precision, the outputs it makes low."""

    convert: bool = False
    low_inputs: set[int] = field(default_factory=set)
    low_outputs: set[int] = field(default_factory=set)
    # Inputs read as they are when all of them are low, else in float32 (one group per type var).
    flexible: list[list[int]] = field(default_factory=list)
    # Inputs that must be float32 (a fixed type, or a kept node).
    f32_inputs: set[int] = field(default_factory=set)


class ConvertFloat16(Pass):
    """Convert float32 computation to float16 or bfloat16, with a block list kept in float32.

    Options: ``dtype`` (``float16`` or ``bfloat16``), ``keep_io_types`` (graph inputs and
    outputs stay float32), ``block_ops`` (op types kept in float32, separated by ``,`` (quote
    the value in a pipeline string) or ``+``; empty means
    the default list :data:`DEFAULT_BLOCK_OPS`, ``none`` means no op), ``max_finite_clamp``
    (clip initializers outside float16's range instead of keeping their readers in float32).

    Example:
        >>> from graphopt.pipeline import PassManager, PassContext
        >>> PassManager("convert-float16<keep-io-types=1>", PassContext(target="cuda")).run(model)  # doctest: +SKIP
    """

    name = "convert-float16"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    options: ClassVar[dict[str, Any]] = {"dtype": "float16", "keep_io_types": 1, "block_ops": "", "max_finite_clamp": 1}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Plan every node, then rewrite graph by graph (outer before inner)."""
        dtype_name = str(self.config["dtype"]).strip().lower()
        if dtype_name not in _DTYPES:
            raise PipelineError(f"pass '{self.name}': dtype='{dtype_name}' is unknown; use float16 or bfloat16")
        block_text = str(self.config["block_ops"]).strip()
        if not block_text:
            block = set(DEFAULT_BLOCK_OPS)
        elif block_text.lower() == "none":
            block = set()
        else:
            block = {op.strip() for op in re.split(r"[,+;]", block_text) if op.strip()}
        converter = _Converter(model, ctx, _DTYPES[dtype_name], block,
                               parse_bool(self.config["keep_io_types"], "keep_io_types", self.name),
                               parse_bool(self.config["max_finite_clamp"], "max_finite_clamp", self.name))
        counters = converter.run()
        changed = counters["converted-nodes"] + counters["converted-io"] > 0
        if changed:
            logger.info("%s: %d node(s) in %s, %d kept in float32, %d Cast(s) inserted, %d Cast pair(s) "
                        "removed", self.name, counters["converted-nodes"], dtype_name,
                        counters["kept-nodes"], counters["inserted-casts"], counters["removed-cast-pairs"])
        return PassResult(changed or counters["removed-cast-pairs"] > 0, counters)


class _Converter:
    """One run of the conversion over a model."""

    def __init__(self, model: ir.Model, ctx: PassContext, low: int, block: set[str], keep_io: bool,
                 clamp: bool) -> None:
        self.model = model
        self.ctx = ctx
        self.low = low
        self.block = block
        self.keep_io = keep_io
        self.clamp = clamp and low == TensorProto.FLOAT16
        self.plans: dict[int, _Plan] = {}
        self.low_values: set[int] = set()  # ids of values that hold low precision now
        self.casts: dict[tuple[int, int, int], ir.Value] = {}
        self.low_copies: dict[int, ir.Value] = {}
        self.overflow: dict[int, bool] = {}
        self.counters = {"converted-nodes": 0, "kept-nodes": 0, "inserted-casts": 0, "converted-initializers": 0,
                         "clamped-initializers": 0, "converted-io": 0, "removed-cast-pairs": 0}

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        """Plan every node, rewrite every graph, drop exact Cast pairs; return the counters."""
        graphs = [self.model.graph, *self.model.graph.subgraphs()]
        for graph in graphs:
            for node in graph:
                self.plans[id(node)] = self._plan(node)
        for graph in graphs:
            for node in graph:
                self._plan_attribute_typed(node)
        for graph in graphs:
            self._rewrite(graph, main=graph is self.model.graph)
        self._remove_cast_pairs(graphs)
        return self.counters

    # -- planning -----------------------------------------------------------------------------
    def _plan(self, node: ir.Node) -> _Plan:
        keep = _Plan(f32_inputs=set(range(len(node.inputs))))
        floats = [i for i, v in enumerate(node.inputs) if v is not None and v.dtype == _FLOAT]
        float_outs = [i for i, v in enumerate(node.outputs) if v.dtype == _FLOAT]
        if not floats and not float_outs:
            return _Plan()
        if node.op_type in self.block or node.subgraphs() or any(
                isinstance(v.type, ir.OtherType) for v in (*node.inputs, *node.outputs) if v is not None):
            self._note_kept(node, "blocked, control flow or non-tensor values")
            return keep
        slots = self._slots(node)
        if slots is None:
            self._note_kept(node, f"no schema with {ir.dtype_name(self.low)} for "
                                  f"{node.domain or 'ai.onnx'}::{node.op_type}")
            return keep
        in_slots, out_slots = slots
        plan = _Plan()
        by_var_in: dict[str, list[int]] = {}
        by_var_out: dict[str, list[int]] = {}
        for i, (kind, var) in enumerate(in_slots):
            if node.inputs[i] is None:
                continue
            if kind == "var":
                by_var_in.setdefault(var, []).append(i)
            elif node.inputs[i].dtype == _FLOAT:  # type: ignore[union-attr]
                plan.f32_inputs.add(i)
        for i, (kind, var) in enumerate(out_slots):
            if kind == "var":
                by_var_out.setdefault(var, []).append(i)
        for var, ins in by_var_in.items():
            if not any(node.inputs[i].dtype == _FLOAT for i in ins):  # type: ignore[union-attr]
                continue
            if any(node.inputs[i].dtype is None for i in ins):  # type: ignore[union-attr]
                self._note_kept(node, f"an input of type {var} has an unknown element type")
                return keep
            if var in by_var_out:
                if self.clamp is False and self.low == TensorProto.FLOAT16 and any(
                        self._overflows(node.inputs[i]) for i in ins):  # type: ignore[arg-type]
                    self._note_kept(node, "an initializer it reads overflows float16 (max_finite_clamp=0)")
                    return keep
                plan.low_inputs.update(ins)
                plan.low_outputs.update(by_var_out[var])
            else:
                plan.flexible.append(ins)
        if not plan.low_inputs:
            return plan  # nothing converts: only flexible and fixed inputs
        if self.low == TensorProto.BFLOAT16 and not self._kernel_loads(node, plan):
            self._note_kept(node, "the target's provider has no bfloat16 kernel for it")
            return keep
        if not self.ctx.allow_rewrite(f"run {node.op_type} '{node.name}' in {ir.dtype_name(self.low)}"):
            return keep
        plan.convert = True
        return plan

    def _note_kept(self, node: ir.Node, why: str) -> None:
        self.counters["kept-nodes"] += 1
        logger.debug("convert-float16: %s '%s' stays float32: %s", node.op_type, node.name, why)

    def _slots(self, node: ir.Node) -> tuple[list[tuple[str, str]], list[tuple[str, str]]] | None:
        """Per input and output: ``("var", T)`` for a type variable allowing the low type,
        ``("fixed", type)`` otherwise; None when the op has no usable schema."""
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain == CONTRIB_DOMAIN:
            if not provider_supports(self.ctx.target, node.op_type, dtype=self.low):
                return None
            return ([("var", "T") if v is not None and v.dtype == _FLOAT else ("fixed", "") for v in node.inputs],
                    [("var", "T") if v.dtype == _FLOAT else ("fixed", "") for v in node.outputs])
        version = node.version or self.model.opset_imports.get(domain, 0)
        try:
            schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=version, domain=domain)
        except onnx.defs.SchemaError:
            return None
        allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
        low_str = _TYPE_STR[self.low]

        def classify(params: list[Any], count: int) -> list[tuple[str, str]] | None:
            result = []
            for i in range(count):
                if i < len(params):
                    param = params[i]
                elif params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
                    param = params[-1]
                else:
                    return None
                type_str = param.type_str
                if type_str in allowed and low_str in allowed[type_str] and "tensor(float)" in allowed[type_str]:
                    result.append(("var", type_str))
                else:
                    result.append(("fixed", type_str))
            return result

        ins = classify(list(schema.inputs), len(node.inputs))
        outs = classify(list(schema.outputs), len(node.outputs))
        if ins is None or outs is None:
            return None
        return ins, outs

    def _overflows(self, value: ir.Value) -> bool:
        tensor = value.const_value if value.is_initializer() and not value.is_graph_input() else None
        if not isinstance(tensor, ir.Tensor):
            return False
        if id(value) not in self.overflow:
            self.overflow[id(value)] = _out_of_range(np.asarray(tensor.numpy(), dtype=np.float32))
        return self.overflow[id(value)]

    def _kernel_loads(self, node: ir.Node, plan: _Plan) -> bool:
        """Whether the target's provider loads this node with its float values in bfloat16."""
        def info(name: str, value: ir.Value, low: bool) -> onnx.ValueInfoProto:
            rank = value.shape.rank if value.shape is not None else None
            shape = None if rank is None else [f"d{i}" for i in range(rank)]
            return oh.make_tensor_value_info(name, self.low if low else (value.dtype or _FLOAT), shape)

        try:
            attrs = [a.to_proto() for a in node.attributes.values()]
        except Exception:  # noqa: BLE001 - an attribute the probe cannot express: keep float32
            return False
        in_names = [f"i{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
        out_names = [f"o{i}" for i in range(len(node.outputs))]
        proto = onnx.NodeProto(op_type=node.op_type, domain=node.domain, input=in_names, output=out_names)
        proto.attribute.extend(attrs)
        inputs = [info(name, v, i in plan.low_inputs)
                  for i, (name, v) in enumerate(zip(in_names, node.inputs, strict=True)) if v is not None]
        outputs = [info(name, v, i in plan.low_outputs)
                   for i, (name, v) in enumerate(zip(out_names, node.outputs, strict=True))]
        graph = oh.make_graph([proto], "probe", inputs, outputs)
        opsets = [oh.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        model = oh.make_model(graph, opset_imports=opsets, ir_version=min(self.model.ir_version, max_ir_version()))
        try:
            return session_loads(self.ctx.target, model.SerializeToString(), False)
        except LookupError:
            return True  # the provider is absent: nothing to probe, trust the schema

    def _plan_attribute_typed(self, node: ir.Node) -> None:
        """Let Constant, ConstantOfShape and Cast(to=float) produce low precision when every
        reader reads it so (their own inputs are read as they are)."""
        if node.op_type not in _ATTRIBUTE_TYPED or node.domain not in ("", "ai.onnx") or node.op_type in self.block:
            return
        out = node.outputs[0]
        if out.dtype != _FLOAT or out.is_graph_output() or not out.has_uses():
            return
        for user, index in out.uses():
            plan = self.plans.get(id(user))
            if plan is None or not plan.convert or index not in plan.low_inputs:
                return
        if node.op_type == "Cast":
            plan = _Plan(convert=True, low_outputs={0}, flexible=[[0]] if node.inputs[0] is not None else [])
        else:
            value = _attribute_tensor(node)
            if value is None:
                return
            if self.low == TensorProto.FLOAT16 and not self.clamp and _out_of_range(value):
                return
            plan = _Plan(convert=True, low_outputs={0})
        if not self.ctx.allow_rewrite(f"make {node.op_type} '{node.name}' produce {ir.dtype_name(self.low)}"):
            return
        self.plans[id(node)] = plan

    # -- rewriting ----------------------------------------------------------------------------
    def _rewrite(self, graph: ir.Graph, main: bool) -> None:
        keep_io = self.keep_io or not main
        if not keep_io:
            for value in graph.inputs:
                if value.dtype == _FLOAT and not value.is_initializer():
                    value.type = ir.TensorType(self.low, value.shape)
                    self.low_values.add(id(value))
                    self.counters["converted-io"] += 1
        for node in list(graph):
            plan = self.plans.get(id(node))
            if plan is None:
                continue
            if plan.convert and node.op_type in _DATA_MOVEMENT and not any(
                    id(node.inputs[i]) in self.low_values or _is_weight(node.inputs[i]) for i in plan.low_inputs):
                # Moving float32 data in low precision only adds a rounding (a weight is
                # converted once, ahead of time, and shrinks the model).
                plan = self.plans[id(node)] = _Plan(f32_inputs=set(range(len(node.inputs))))
                self._note_kept(node, "it only moves data and its input is float32")
            for i, value in enumerate(node.inputs):
                if value is None:
                    continue
                if i in plan.low_inputs:
                    node.replace_input(i, self._low(value, graph))
                elif i in plan.f32_inputs and id(value) in self.low_values:
                    node.replace_input(i, self._cast(value, _FLOAT, graph))
            for group in plan.flexible:
                values = [node.inputs[i] for i in group]
                if not all(id(v) in self.low_values for v in values if v is not None):
                    for i in group:
                        value = node.inputs[i]
                        if value is not None and id(value) in self.low_values:
                            node.replace_input(i, self._cast(value, _FLOAT, graph))
            if not plan.convert:
                continue
            self._convert_attributes(node)
            for i in plan.low_outputs:
                out = node.outputs[i]
                out.type = ir.TensorType(self.low, out.shape)
                self.low_values.add(id(out))
            self.counters["converted-nodes"] += 1
        for index, value in enumerate(list(graph.outputs)):
            low = id(value) in self.low_values
            if keep_io and low:
                graph.outputs[index] = self._border_cast(graph, value, _FLOAT)
            elif not keep_io and not low and value.dtype == _FLOAT:
                graph.outputs[index] = self._border_cast(graph, value, self.low)
                self.counters["converted-io"] += 1
            elif not keep_io and low:
                self.counters["converted-io"] += 1

    def _convert_attributes(self, node: ir.Node) -> None:
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            if node.attr("to") == _FLOAT:
                node.set_attr("to", self.low)
            return
        if node.op_type not in ("Constant", "ConstantOfShape"):
            return
        if node.op_type == "ConstantOfShape" and "value" not in node.attributes:
            node.set_attr("value", ir.ArrayTensor(to_low_precision(np.zeros(1, np.float32), self.low, False),
                                                  dtype=self.low))
            return
        for name, attr in list(node.attributes.items()):
            if name == "value" and isinstance(attr.value, ir.Tensor) and attr.value.dtype == _FLOAT:
                array = np.asarray(attr.value.numpy(), dtype=np.float32)
                self._warn_clamp(array, f"{node.op_type} '{node.name or node.outputs[0].name}'")
                node.set_attr("value", ir.ArrayTensor(to_low_precision(array, self.low, self.clamp), dtype=self.low))
            elif name in ("value_float", "value_floats"):
                array = np.asarray(attr.value, dtype=np.float32)
                self._warn_clamp(array, f"{node.op_type} '{node.name or node.outputs[0].name}'")
                del node.attributes[name]
                node.set_attr("value", ir.ArrayTensor(to_low_precision(array, self.low, self.clamp), dtype=self.low))

    def _warn_clamp(self, array: np.ndarray, what: str) -> None:
        if self.low == TensorProto.FLOAT16 and self.clamp and _out_of_range(array):
            self.counters["clamped-initializers"] += 1
            logger.warning("convert-float16: %s holds values beyond float16's range (max %g); clipped "
                           "to ±%g (set max-finite-clamp=0 to keep its readers in float32)", what,
                           float(np.abs(array[np.isfinite(array)]).max()), FLOAT16_MAX)

    def _low(self, value: ir.Value, graph: ir.Graph) -> ir.Value:
        """``value`` in low precision, for a reader in ``graph``."""
        if id(value) in self.low_values:
            return value
        tensor = value.const_value
        if value.is_initializer() and not value.is_graph_input() and isinstance(tensor, ir.Tensor):
            return self._low_initializer(value, tensor)
        return self._cast(value, self.low, graph)

    def _low_initializer(self, value: ir.Value, tensor: ir.Tensor) -> ir.Value:
        low = self.low
        clamp = self.clamp
        source = tensor
        every_reader_low = all(
            (plan := self.plans.get(id(user))) is not None and plan.convert and index in plan.low_inputs
            for user, index in value.uses()) and not value.is_graph_output()
        array_check = self._overflows(value)
        if array_check:
            self._warn_clamp(np.asarray(source.numpy(), np.float32), f"initializer '{value.name}'")
        converted = ir.LazyTensor(lambda: to_low_precision(source.numpy(), low, clamp), low, tuple(tensor.shape),
                                  cache=False)
        self.counters["converted-initializers"] += 1
        if every_reader_low:
            converted.name = value.name
            value.const_value = converted
            value.type = ir.TensorType(low, ir.Shape(tensor.shape))
            self.low_values.add(id(value))
            return value
        if id(value) not in self.low_copies:
            owner = value.graph
            assert owner is not None
            name = self.model.unique_name(f"{value.name}_{ir.dtype_name(low)}")
            copy = owner.add_initializer(name, converted)
            self.low_values.add(id(copy))
            self.low_copies[id(value)] = copy
        return self.low_copies[id(value)]

    def _cast(self, value: ir.Value, to: int, graph: ir.Graph) -> ir.Value:
        key = (id(value), to, id(graph))
        if key in self.casts:
            return self.casts[key]
        out = ir.Value(self.model.unique_name(f"{value.name}_{ir.dtype_name(to)}"), ir.TensorType(to, value.shape))
        cast = ir.Node("", "Cast", [value], attributes={"to": to}, outputs=[out],
                       name=self.model.unique_name(f"{value.name}_cast_{ir.dtype_name(to)}"))
        producer = value.producer
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, cast)
        else:
            graph.insert_after(None, cast)
        self.casts[key] = out
        if to == self.low:
            self.low_values.add(id(out))
        self.counters["inserted-casts"] += 1
        return out

    def _border_cast(self, graph: ir.Graph, value: ir.Value, to: int) -> ir.Value:
        """A Cast of graph output ``value`` to ``to`` that takes over the output's name."""
        name = value.name
        out = ir.Value("", ir.TensorType(to, value.shape))
        cast = ir.Node("", "Cast", [value], attributes={"to": to}, outputs=[out],
                       name=self.model.unique_name(f"{name}_cast_output"))
        if value.producer is not None and value.producer.graph is graph:
            graph.insert_after(value.producer, cast)
        else:
            graph.insert_after(None, cast)
        if value.producer is not None and not value.is_graph_input():
            value.name = self.model.unique_name(f"{name}_{ir.dtype_name(value.dtype or self.low)}")
            out.name = name
        else:
            out.name = self.model.unique_name(f"{name}_{ir.dtype_name(to)}")
        self.counters["inserted-casts"] += 1
        if to == self.low:
            self.low_values.add(id(out))
        return out

    def _remove_cast_pairs(self, graphs: list[ir.Graph]) -> None:
        for graph in graphs:
            for node in list(graph):
                if not node.is_live() or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
                    continue
                inner = node.inputs[0].producer if node.inputs and node.inputs[0] is not None else None
                if inner is None or inner.op_type != "Cast" or inner.domain not in ("", "ai.onnx"):
                    continue
                source = inner.inputs[0]
                if source is None or source.dtype is None:
                    continue
                wide, back = inner.attr("to"), node.attr("to")
                out = node.outputs[0]
                if back != source.dtype or (source.dtype, wide) not in _EXACT_WIDENING or out.is_graph_output():
                    continue
                if not self.ctx.allow_rewrite(f"remove the exact Cast pair ending in '{out.name}'"):
                    return
                out.replace_all_uses_with(source)
                graph.remove(node)
                if not inner.outputs[0].has_uses() and not inner.outputs[0].is_graph_output():
                    graph.remove(inner)
                self.counters["removed-cast-pairs"] += 1


def _is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and not value.is_graph_input()


def _attribute_tensor(node: ir.Node) -> np.ndarray | None:
    """The float values a Constant or ConstantOfShape node holds (None if not float32)."""
    attr = node.attributes.get("value")
    if attr is not None and isinstance(attr.value, ir.Tensor):
        return np.asarray(attr.value.numpy(), np.float32) if attr.value.dtype == _FLOAT else None
    if node.op_type == "ConstantOfShape" and attr is None:
        return np.zeros(1, np.float32)  # the default value is a float32 zero
    for name in ("value_float", "value_floats"):
        if name in node.attributes:
            return np.asarray(node.attributes[name].value, np.float32)
    return None
