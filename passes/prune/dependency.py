"""Channel-dependency analysis: which channels of which tensors must be removed together.

A *slot* is one axis of one tensor (``(value, axis)``) whose size may shrink; every index along
it is an *element*. Walking producer→consumer edges, per-op rules *tie* elements of two slots
(a union-find over elements) and the slots themselves (a union-find over slots):

* Conv: output channels ↔ rows of ``W`` and the bias; input channels ↔ columns of ``W``. A
  grouped or depthwise Conv ties each group's input channels to its output channels, so whole
  groups go (the ``group`` attribute shrinks). ConvTranspose likewise (``W`` is ``[C_in, C_out, k]``).
* BatchNormalization, InstanceNormalization, per-channel Mul/Add/PRelu and per-channel
  QuantizeLinear/DequantizeLinear scales: the parameter is sliced along the channel.
* Element-wise ops unify their inputs (a residual Add makes one group of both branches).
* Concat/Split/Slice on the channel axis map indices with offsets; Flatten/Reshape map a channel
  to the block of elements it becomes (``c → c·P … c·P+P-1``), which covers Flatten after global
  pooling, the split of a projection into attention heads (``[B,S,H·D] → [B,S,H,D]``: the ``D``
  columns of a head become one element of the head axis) and the merge back.
* MatMul/Gemm: columns of the producer weight, rows of the consumer weight; the batch axes of a
  MatMul between two activations (attention scores) tie the head axes of Q, K and V.

A group is *blocked*, with the reason recorded, when one of its slots is a graph input or output,
is read by a shape computation or an op without a rule, or needs a rewrite that cannot be done
(a Reshape whose shape is computed at run time, a strided Slice...). Only whole union-find
classes of elements are ever removed, so every tensor of a group is sliced consistently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt import ir

__all__ = ["ChannelAnalysis", "ChannelGroup", "GroupSlot", "analyze_channels", "constant_array", "static_shapes"]

logger = logging.getLogger(__name__)

#: Ops that keep every axis of their first input and ignore the channel meaning of the others.
_UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Gelu", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Identity", "Dropout", "Cast", "Softplus",
    "Softsign", "Mish", "ThresholdedRelu", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
    "Swish", "IsNaN", "IsInf", "Not", "CastLike",
})
#: Element-wise ops with multidirectional broadcasting.
_BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal",
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
})
_POOL = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOL = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
_REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                     "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
_SHAPE_OPS = frozenset({"Shape", "Size"})
#: Ops whose constant second input is a weight that output channels come from.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})

Dim = Any  # int, str (symbolic) or None (unknown)

#: Initializers up to this size keep their data for shape inference (shape constants).
_LIGHT_BYTES = 4096


@dataclass
class GroupSlot:
    """One tensor axis of a group: ``keep`` indices are chosen per element class.

    Attributes:
        value: the tensor's name.
        axis: the axis that shrinks.
        size: its length before pruning.
        classes: for each index, the id of its element class within the group.
        constant: the tensor is a constant (it will be sliced).
    """

    value: str
    axis: int
    size: int
    classes: np.ndarray
    constant: bool


@dataclass
class ChannelGroup:
    """Channels that must be removed together.

    Attributes:
        id: the group's number (stable for one model).
        slots: the tensor axes of the group.
        num_classes: how many independent units (channels, or heads) can be removed.
        blocked: why the group cannot be pruned (empty: prunable).
        kind: ``"channels"`` or ``"heads"`` (the group passes through the batch axes of a
            MatMul between activations: attention heads).
        layers: names of the weighted nodes (Conv, Gemm, MatMul) whose weights the group slices.
    """

    id: int
    slots: list[GroupSlot]
    num_classes: int
    blocked: list[str] = field(default_factory=list)
    kind: str = "channels"
    layers: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        """True when nothing blocks the group and it has at least two classes."""
        return not self.blocked and self.num_classes >= 2

    def describe(self) -> str:
        """A short text: the first few slots."""
        names = [f"{s.value}[{s.axis}]" for s in self.slots[:4]]
        more = f" +{len(self.slots) - 4}" if len(self.slots) > 4 else ""
        return ", ".join(names) + more

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"id": self.id, "kind": self.kind, "units": self.num_classes,
                "slots": [{"tensor": s.value, "axis": s.axis, "size": s.size} for s in self.slots],
                "layers": list(self.layers), "blocked": list(self.blocked)}


@dataclass
class Rewrite:
    """A node whose attributes or shape constants depend on the pruned sizes."""

    kind: str  # "reshape", "split", "slice", "group"
    node: ir.Node
    axis: int = 0
    start: int = 0
    rank: int = 0
    target: tuple[str, int] | None = None


@dataclass
class ChannelAnalysis:
    """The result of :func:`analyze_channels`.

    Attributes:
        groups: every group found, prunable or not.
        rewrites: nodes to update after slicing (Reshape shapes, Split sizes, Slice bounds,
            Conv ``group``).
    """

    groups: list[ChannelGroup]
    rewrites: list[Rewrite]

    def prunable(self) -> list[ChannelGroup]:
        """The groups nothing blocks."""
        return [g for g in self.groups if g.prunable]

    def blocked(self) -> list[ChannelGroup]:
        """The groups that cannot be pruned, each with its reasons."""
        return [g for g in self.groups if g.blocked]


def _symbolic_dims(t: onnx.TypeProto) -> tuple[Dim, ...] | None:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and not d.dim_param.startswith("unk__"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _stub_large(tensor: ir.Tensor) -> onnx.TensorProto:
    """Small tensors with their data (shape constants); larger ones as typed stubs."""
    if not tensor.is_external() and tensor.nbytes <= _LIGHT_BYTES:
        return tensor.to_proto()
    return ir.typed_stub(tensor)


def _shape_skeleton(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a proto for shape inference without copying weight bytes: initializers over
    ``_LIGHT_BYTES`` become typed graph inputs (inference needs their types only)."""
    proto = ir.to_proto_with(model, _stub_large)
    ir.stubs_to_inputs(proto.graph)
    return proto


def static_shapes(model: ir.Model) -> dict[str, tuple[Dim, ...]]:
    """Shapes of the main graph's tensors by name (onnx shape inference with data propagation).

    Dims are ints, symbolic names, or ``None`` when unknown.
    """
    shapes: dict[str, tuple[Dim, ...]] = {
        name: tuple(int(d) for d in v.const_value.shape)
        for name, v in model.graph.initializers.items() if v.const_value is not None}
    proto = _shape_skeleton(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types; known shapes still count
        logger.debug("shape inference failed: %s", exc)
    g = proto.graph
    for info in list(g.input) + list(g.value_info) + list(g.output):
        dims = _symbolic_dims(info.type)
        if dims is not None and info.name not in shapes:
            shapes[info.name] = dims
    return shapes


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant value (initializer or ``Constant`` node output), else ``None``."""
    if value is None:
        return None
    producer = value.producer
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        tensor = producer.attr("value", None)
        if tensor is not None and not isinstance(tensor, (int, float, str, tuple)):
            return tensor.numpy()
        ints = producer.attr("value_ints", None)
        if ints is not None:
            return np.array(ints, dtype=np.int64)
        single = producer.attr("value_int", None)
        return None if single is None else np.array(single, dtype=np.int64)
    if not value.is_constant() or isinstance(value.const_value, ir.SparseTensor):
        return None
    return value.const_value.numpy()


_const = constant_array


def _is_constant(value: ir.Value | None) -> bool:
    """Like ``constant_array(value) is not None`` without reading the tensor."""
    if value is None:
        return False
    producer = value.producer
    if producer is not None:
        return producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")
    return value.is_constant() and not isinstance(value.const_value, ir.SparseTensor)


def _is_weight(value: ir.Value | None) -> bool:
    """A constant, or a constant dequantized by a DequantizeLinear (a QDQ weight)."""
    if value is not None and value.producer is not None and value.producer.op_type == "DequantizeLinear":
        return _is_constant(value.producer.inputs[0])
    return _is_constant(value)


class _Block(Exception):
    """Raised by a rule: the slot's group cannot be pruned."""


class _Analyzer:
    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.shapes = static_shapes(model)
        self.slot_of: dict[tuple[int, int], int] = {}
        self.slot_value: list[ir.Value] = []
        self.slot_axis: list[int] = []
        self.slot_base: list[int] = []
        self.slot_parent: list[int] = []
        self.num_elements = 0
        self.element_ties: list[np.ndarray] = []  # k×2 arrays of tied element ids
        self.reasons: dict[int, list[str]] = {}
        self.heads: set[int] = set()
        self.visited: set[tuple[int, int]] = set()
        self.queue: list[int] = []
        self.rewrites: list[Rewrite] = []
        self.rewrite_keys: set[tuple[str, int, int, int]] = set()
        self.current: ir.Node | None = None

    # -- union-find --------------------------------------------------------------------------------
    @staticmethod
    def _find(parent: list[int], i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def _union(self, parent: list[int], a: int, b: int) -> None:
        ra, rb = self._find(parent, a), self._find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    # -- shapes and slots --------------------------------------------------------------------------
    def shape(self, value: ir.Value | None) -> tuple[Dim, ...] | None:
        if value is None:
            return None
        if value.name in self.shapes:
            return self.shapes[value.name]
        s = value.shape
        return None if s is None else tuple(s.dims)

    def rank(self, value: ir.Value | None) -> int:
        s = self.shape(value)
        if s is None:
            raise _Block(f"the rank of '{value.name if value else '?'}' is unknown")
        return len(s)

    def dim(self, value: ir.Value, axis: int) -> Dim:
        s = self.shape(value)
        if s is None or not -len(s) <= axis < len(s):
            return None
        return s[axis]

    def slot(self, value: ir.Value, axis: int) -> int:
        """The id of slot ``(value, axis)``, created (and queued) on first use."""
        rank = self.rank(value)
        axis = axis % rank if rank else 0
        key = (id(value), axis)
        if key in self.slot_of:
            return self.slot_of[key]
        size = self.dim(value, axis)
        if not isinstance(size, int):
            raise _Block(f"the size of axis {axis} of '{value.name}' is not static")
        sid = len(self.slot_value)
        self.slot_of[key] = sid
        self.slot_value.append(value)
        self.slot_axis.append(axis)
        self.slot_base.append(self.num_elements)
        self.slot_parent.append(sid)
        self.num_elements += size
        self.queue.append(sid)
        return sid

    def size(self, sid: int) -> int:
        end = self.slot_base[sid + 1] if sid + 1 < len(self.slot_base) else self.num_elements
        return end - self.slot_base[sid]

    def tie(self, sid: int, value: ir.Value | None, axis: int, pairs: np.ndarray | None = None) -> None:
        """Tie slot ``sid`` to ``(value, axis)``; ``pairs`` (k×2) maps indices, identity if None."""
        if value is None:
            return
        other = self.slot(value, axis)
        if self.current is not None and self.current.op_type in ("Reshape", "Flatten"):
            # The mapping is complete from this side; from the other side it may be ambiguous.
            self.visited.add((id(self.current), other))
        self._union(self.slot_parent, sid, other)
        if pairs is None:
            n, m = self.size(sid), self.size(other)
            if n != m:
                raise _Block(f"'{self.slot_value[sid].name}' and '{value.name}' have different channel "
                             f"counts ({n} vs {m})")
            pairs = np.stack([np.arange(n), np.arange(n)], axis=1)
        offsets = np.array([self.slot_base[sid], self.slot_base[other]], dtype=np.int64)
        self.element_ties.append(np.asarray(pairs, dtype=np.int64).reshape(-1, 2) + offsets)

    def block(self, sid: int, reason: str) -> None:
        reasons = self.reasons.setdefault(sid, [])
        if reason not in reasons:
            reasons.append(reason)

    def note_rewrite(self, kind: str, node: ir.Node, axis: int = 0, start: int = 0, rank: int = 0,
                     target: tuple[str, int] | None = None) -> None:
        key = (kind, id(node), axis, start)
        if key not in self.rewrite_keys:
            self.rewrite_keys.add(key)
            self.rewrites.append(Rewrite(kind, node, axis, start, rank, target))

    # -- walking ----------------------------------------------------------------------------------
    def seed(self) -> None:
        for node in self.graph:
            if (node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHTED_OPS
                    or len(node.inputs) < 2 or not _is_weight(node.inputs[1])):
                continue
            try:  # output channels: axis 1 of a convolution, the last axis of a product
                self.slot(node.outputs[0], 1 if node.op_type in ("Conv", "ConvTranspose") else -1)
            except _Block as exc:
                logger.debug("no channel slot at %s '%s': %s", node.op_type, node.name, exc)
            self.drain()

    def drain(self) -> None:
        while self.queue:
            sid = self.queue.pop()
            self.visit(sid)

    def visit(self, sid: int) -> None:
        value, axis = self.slot_value[sid], self.slot_axis[sid]
        if value.is_graph_output():
            self.block(sid, f"reaches graph output '{value.name}'")
        if value.is_graph_input():
            self.block(sid, f"comes from graph input '{value.name}'")
        if value.const_value is not None and isinstance(value.const_value, ir.SparseTensor):
            self.block(sid, f"'{value.name}' is a sparse initializer")
        if value.producer is None and value.const_value is None and not value.is_graph_input():
            self.block(sid, f"'{value.name}' is defined outside the graph")
        if value.producer is not None:
            self.apply(sid, value.producer, ("out", value.index or 0), axis)
        for node, index in value.uses():
            if node.graph is not self.graph:
                self.block(sid, f"'{value.name}' is read inside a subgraph")
                continue
            self.apply(sid, node, ("in", index), axis)

    def apply(self, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
        key = (id(node), sid)
        if key in self.visited:
            return
        self.visited.add(key)
        try:
            rule = _RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if node.op_type in _SHAPE_OPS:
                raise _Block(f"read by a shape computation ({node.op_type} '{node.name}')")
            if rule is None:
                verb = "read" if port[0] == "in" else "produced"
                raise _Block(f"{verb} by {node.op_type} '{node.name}', which has no channel rule")
            self.current = node
            rule(self, sid, node, port, axis)
        except _Block as exc:
            self.block(sid, str(exc))
        except (ValueError, IndexError, TypeError, KeyError, AttributeError) as exc:  # never prune around it
            self.block(sid, f"{node.op_type} '{node.name}' could not be analysed ({exc})")
        finally:
            self.current = None

    # -- result -----------------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        members: dict[int, list[int]] = {}
        for sid in range(len(self.slot_value)):
            members.setdefault(self._find(self.slot_parent, sid), []).append(sid)
        labels = _components(self.num_elements, self.element_ties)
        groups: list[ChannelGroup] = []
        for root in sorted(members):
            sids = members[root]
            # element classes numbered in order of first appearance, slot after slot
            roots = np.concatenate([labels[self.slot_base[sid]:self.slot_base[sid] + self.size(sid)]
                                    for sid in sids])
            _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
            rank = np.empty(len(first), dtype=np.int64)
            rank[np.argsort(first, kind="stable")] = np.arange(len(first))
            all_classes = rank[inverse.reshape(-1)]
            num_classes = len(first)
            slots: list[GroupSlot] = []
            reasons: list[str] = []
            start = 0
            for sid in sids:
                n = self.size(sid)
                classes, start = all_classes[start:start + n], start + n
                value = self.slot_value[sid]
                slots.append(GroupSlot(value.name, self.slot_axis[sid], n, classes,
                                       constant=value.const_value is not None))
                for reason in self.reasons.get(sid, []):
                    if reason not in reasons:
                        reasons.append(reason)
            layers = sorted({n.name or n.outputs[0].name for sid in sids
                             for n, index in self.slot_value[sid].uses()
                             if index == 1 and n.op_type in WEIGHTED_OPS and _is_weight(self.slot_value[sid])})
            kind = "heads" if any(sid in self.heads for sid in sids) else "channels"
            groups.append(ChannelGroup(len(groups), slots, num_classes, reasons, kind, layers))
        return groups


def _components(count: int, ties: list[np.ndarray]) -> np.ndarray:
    """Connected components of ``count`` elements under the tied pairs: for each element, the
    smallest element of its component.

    Vectorized union-find (hooking roots onto the smaller label, then pointer jumping), so a
    Flatten into a 25088-wide Gemm costs array operations, not Python loops over elements.
    """
    labels = np.arange(count, dtype=np.int64)
    if not ties:
        return labels
    edges = np.concatenate(ties)
    a, b = edges[:, 0], edges[:, 1]
    while True:
        la, lb = labels[a], labels[b]
        low = np.minimum(la, lb)
        hooked = labels.copy()
        np.minimum.at(hooked, la, low)
        np.minimum.at(hooked, lb, low)
        while True:  # pointer jumping until every label is a root
            jumped = hooked[hooked]
            if np.array_equal(jumped, hooked):
                break
            hooked = jumped
        if np.array_equal(hooked, labels):
            return labels
        labels = hooked


# -- rules ------------------------------------------------------------------------------------------
# A rule gets the analyzer, the slot id, the node, the port the slot sits on (("in", i) or
# ("out", i)) and the slot's axis (normalized); it ties related slots or raises _Block.

def _norm(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise _Block(f"axis {axis} out of range for rank {rank}")
    return axis % rank


def _rule_unary(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    if side == "out" and index > 0 or side == "in" and index > 0:
        raise _Block(f"{node.op_type} '{node.name}': channel slot on a secondary input or output")
    if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].has_uses():
        raise _Block(f"Dropout '{node.name}' mask is used")
    an.tie(sid, node.outputs[0] if side == "in" else node.inputs[0], axis)


def _rule_broadcast(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    out = node.outputs[0]
    r = an.rank(out)
    side, index = port
    out_axis = axis if side == "out" else axis + r - an.rank(node.inputs[index])
    n = an.size(sid)
    if side == "in":
        an.tie(sid, out, out_axis)
    for j, v in enumerate(node.inputs):
        if v is None or (side == "in" and j == index):
            continue
        rv = an.rank(v)
        ax = out_axis - (r - rv)
        if ax < 0:
            continue
        d = an.dim(v, ax)
        if d == 1 and n != 1:
            continue
        an.tie(sid, v, ax)


def _rule_qdq(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    if node.attr("block_size", 0):
        raise _Block(f"{node.op_type} '{node.name}' is block-quantized")
    x, y = node.inputs[0], node.outputs[0]
    rank = an.rank(x)
    q_axis = _norm(int(node.attr("axis", 1)), rank)
    params = [v for v in node.inputs[1:3] if v is not None]
    if side == "in" and index > 0:
        if axis != 0:
            raise _Block(f"{node.op_type} '{node.name}': unexpected parameter axis")
        axis = q_axis
        an.tie(sid, x, axis)
    if side == "in" and index == 0:
        an.tie(sid, y, axis)
    if side == "out":
        an.tie(sid, x, axis)
    for p in params:
        if an.rank(p) == 1 and an.dim(p, 0) not in (1, None) and axis == q_axis:
            an.tie(sid, p, 0)


def _rule_norm(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    params = node.inputs[1:5] if node.op_type == "BatchNormalization" else node.inputs[1:3]
    if any(o.has_uses() for o in node.outputs[1:]):
        raise _Block(f"{node.op_type} '{node.name}' is in training mode (statistics outputs used)")
    if side == "in" and index > 0:
        axis = 1
        an.tie(sid, node.inputs[0], 1)
    else:
        an.tie(sid, node.outputs[0] if side == "in" else node.inputs[0], axis)
    if axis == 1:
        for p in params:
            an.tie(sid, p, 0)
    elif node.op_type == "InstanceNormalization" and axis != 0:
        raise _Block(f"InstanceNormalization '{node.name}' normalizes over axis {axis}")


def _rule_layer_norm(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    rank = an.rank(node.inputs[0])
    first = _norm(int(node.attr("axis", -1)), rank)
    if index > 0 or axis >= first:
        raise _Block(f"{node.op_type} '{node.name}' normalizes over the channel axis")
    an.tie(sid, node.outputs[0] if side == "in" else node.inputs[0], axis)


def _rule_softmax(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    rank = an.rank(node.inputs[0])
    version = node.version or 13
    sm_axis = _norm(int(node.attr("axis", -1 if version >= 13 else 1)), rank)
    if version < 13 and sm_axis != rank - 1:
        raise _Block(f"{node.op_type} '{node.name}' (opset < 13) flattens from axis {sm_axis}")
    if axis == sm_axis:
        raise _Block(f"{node.op_type} '{node.name}' normalizes over the channel axis")
    side, _ = port
    an.tie(sid, node.outputs[0] if side == "in" else node.inputs[0], axis)


def _rule_transpose(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    rank = an.rank(node.inputs[0])
    perm = list(node.attr("perm", None) or reversed(range(rank)))
    side, _ = port
    if side == "in":
        an.tie(sid, node.outputs[0], perm.index(axis))
    else:
        an.tie(sid, node.inputs[0], perm[axis])


def _factor_signature(dims: Sequence[Dim]) -> tuple[int, tuple[str, ...]] | None:
    product, names = 1, []
    for d in dims:
        if isinstance(d, int):
            product *= d
        elif isinstance(d, str):
            names.append(d)
        else:
            return None
    return product, tuple(sorted(names))


def _map_axis(src: Sequence[Dim], axis: int, dst: Sequence[Dim]) -> tuple[int, np.ndarray] | None:
    """Where axis ``axis`` of a tensor of shape ``src`` goes when reshaped to ``dst``.

    Returns ``(dst_axis, pairs)``: index ``i`` of the source axis corresponds to index ``j`` of
    the destination axis for every pair; or ``None`` when the channel axis is mixed with others.
    """
    pre = _factor_signature(src[:axis])
    n = src[axis]
    if pre is None or not isinstance(n, int):
        return None
    candidates = [b for b in range(len(dst)) if _factor_signature(dst[:b]) == pre]
    for b in candidates:  # leading 1-dims make several candidates: an exact match wins
        if dst[b] == n:
            return b, np.stack([np.arange(n), np.arange(n)], axis=1)
    for b in candidates:
        m = dst[b]
        if not isinstance(m, int) or m <= 0 or m == n:
            continue
        if n % m == 0 and b + 1 < len(dst) and dst[b + 1] == n // m:
            # the axis splits: [.., n, ..] -> [.., m, n/m, ..] (a projection into heads)
            i = np.arange(n)
            return b, np.stack([i, i // (n // m)], axis=1)
        if m % n == 0:  # the axis merges with the following ones: [.., n, p..] -> [.., n·P, ..]
            inner = m // n
            rest, k = 1, axis + 1
            while rest < inner and k < len(src) and isinstance(src[k], int):
                rest *= src[k]
                k += 1
            if rest == inner:
                i = np.repeat(np.arange(n), inner)
                return b, np.stack([i, np.arange(m)], axis=1)
    return None


def _rule_reshape(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    if side == "in" and index == 1:
        raise _Block(f"used as the shape of Reshape '{node.name}'")
    x, y = node.inputs[0], node.outputs[0]
    sx, sy = an.shape(x), an.shape(y)
    if sx is None or sy is None:
        raise _Block(f"Reshape '{node.name}' has unknown shapes")
    mapped = _map_axis(sx, axis, sy) if side == "in" else _map_axis(sy, axis, sx)
    if mapped is None:
        raise _Block(f"{node.op_type} '{node.name}' mixes the channel axis with other axes")
    other_axis, pairs = mapped
    if side == "in":
        an.tie(sid, y, other_axis, pairs)
        out_axis = other_axis
    else:
        an.tie(sid, x, other_axis, pairs)
        out_axis = axis
    if node.op_type == "Reshape":
        shape = _const(node.inputs[1])
        if shape is not None:
            entry = int(shape[out_axis])
            an.note_rewrite("reshape", node, out_axis)
        else:
            concat, index, offset = _shape_piece(an, node, out_axis)
            entry = int(_const(concat.inputs[index]).reshape(-1)[offset])
            an.note_rewrite("shape-piece", concat, offset, index, target=(y.name, out_axis))
        in_axis = other_axis if side == "out" else axis
        if entry == 0 and (in_axis != out_axis or an.dim(x, in_axis) != an.dim(y, out_axis)):
            raise _Block(f"Reshape '{node.name}' copies a dim (0) that pruning would change")


def _shape_piece(an: _Analyzer, reshape: ir.Node, position: int) -> tuple[ir.Node, int, int]:
    """The constant input of the Concat that builds a Reshape's shape and holds entry ``position``.

    Exporters build shapes at run time as ``Concat(batch, seq, const H, const D)``; only the
    constant pieces depend on the channel count, so those can be rewritten.
    """
    concat = reshape.inputs[1].producer
    if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
        raise _Block(f"the shape of Reshape '{reshape.name}' is computed at run time")
    offset = 0
    for index, piece in enumerate(concat.inputs):
        length = an.dim(piece, 0) if an.rank(piece) == 1 else None
        if not isinstance(length, int):
            break
        if offset <= position < offset + length:
            if _const(piece) is None:
                break
            return concat, index, position - offset
        offset += length
    raise _Block(f"the shape of Reshape '{reshape.name}' is computed at run time and its entry "
                 f"{position} is not a constant piece")


def _rule_squeeze(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    if index > 0:
        raise _Block(f"used as the axes of {node.op_type} '{node.name}'")
    x, y = node.inputs[0], node.outputs[0]
    rx, ry = an.rank(x), an.rank(y)
    axes_v = node.attr("axes", None)
    if axes_v is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        c = _const(node.inputs[1])
        if c is None:
            raise _Block(f"the axes of {node.op_type} '{node.name}' are computed at run time")
        axes_v = c.tolist()
    if node.op_type == "Unsqueeze":
        axes = sorted(_norm(int(a), ry) for a in axes_v or ())
        kept = [a for a in range(ry) if a not in axes]  # output axes that come from the input
    else:
        if axes_v is None:
            sx = an.shape(x)
            axes = [a for a, d in enumerate(sx or ()) if d == 1]
        else:
            axes = sorted(_norm(int(a), rx) for a in axes_v)
        kept = [a for a in range(rx) if a not in axes]  # input axes that stay
    if node.op_type == "Unsqueeze":
        an.tie(sid, y, kept[axis]) if side == "in" else an.tie(sid, x, kept.index(axis))
    else:
        if side == "in" and axis in axes:
            raise _Block(f"{node.op_type} '{node.name}' removes the channel axis")
        an.tie(sid, y, kept.index(axis)) if side == "in" else an.tie(sid, x, kept[axis])


def _rule_concat(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    y = node.outputs[0]
    rank = an.rank(y)
    cat = _norm(int(node.attr("axis", 0)), rank)
    side, index = port
    if axis != cat:
        for v in [*node.inputs, y]:
            if v is not None and not (side == "in" and v is node.inputs[index]):
                an.tie(sid, v, axis)
        return
    offsets, off = [], 0
    for v in node.inputs:
        d = an.dim(v, cat)
        if not isinstance(d, int):
            raise _Block(f"Concat '{node.name}' has an input of unknown size")
        offsets.append(off)
        off += d
    if side == "in":
        n = an.size(sid)
        i = np.arange(n)
        an.tie(sid, y, cat, np.stack([i, i + offsets[index]], axis=1))
    else:
        for v, o in zip(node.inputs, offsets):
            n = an.dim(v, cat)
            i = np.arange(n)
            an.tie(sid, v, cat, np.stack([i + o, i], axis=1))


def _split_sizes(an: _Analyzer, node: ir.Node, axis: int) -> list[int]:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        c = _const(node.inputs[1])
        if c is None:
            raise _Block(f"the split sizes of Split '{node.name}' are computed at run time")
        return [int(s) for s in c.tolist()]
    if node.attr("split", None) is not None:
        return [int(s) for s in node.attr("split")]
    total = an.dim(node.inputs[0], axis)
    k = len(node.outputs)
    if not isinstance(total, int) or total % k:
        raise _Block(f"Split '{node.name}' splits unevenly")
    return [total // k] * k


def _rule_split(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    if side == "in" and index > 0:
        raise _Block(f"used as the sizes of Split '{node.name}'")
    x = node.inputs[0]
    rank = an.rank(x)
    split_axis = _norm(int(node.attr("axis", 0)), rank)
    if axis != split_axis:
        for v in [x, *node.outputs]:
            if not (side == "in" and v is x) and not (side == "out" and v is node.outputs[index]):
                an.tie(sid, v, axis)
        return
    sizes = _split_sizes(an, node, split_axis)
    offsets = np.cumsum([0] + sizes[:-1])
    an.note_rewrite("split", node, split_axis)
    if side == "in":
        for out, o, s in zip(node.outputs, offsets, sizes):
            i = np.arange(s)
            an.tie(sid, out, axis, np.stack([i + o, i], axis=1))
    else:
        i = np.arange(sizes[index])
        an.tie(sid, x, axis, np.stack([i, i + offsets[index]], axis=1))


def _rule_slice(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    if side == "in" and index > 0:
        raise _Block(f"used as a bound of Slice '{node.name}'")
    x, y = node.inputs[0], node.outputs[0]
    rank = an.rank(x)
    consts = [_const(v) if i < len(node.inputs) else None for i, v in
              enumerate(list(node.inputs[1:5]) + [None] * (5 - len(node.inputs)), start=1)]
    if (node.version or 13) < 10:
        raise _Block(f"Slice '{node.name}' (opset < 10) keeps its bounds in attributes")
    starts, ends, axes, steps = consts[0], consts[1], consts[2], consts[3]
    given = [v for v in node.inputs[1:] if v is not None]
    if starts is None or ends is None or any(_const(v) is None for v in given):
        raise _Block(f"the bounds of Slice '{node.name}' are computed at run time")
    axes_l = [_norm(int(a), rank) for a in (axes.tolist() if axes is not None else range(len(starts)))]
    if axis not in axes_l:
        an.tie(sid, y if side == "in" else x, axis)
        return
    k = axes_l.index(axis)
    step = int(steps[k]) if steps is not None else 1
    if step != 1:
        raise _Block(f"Slice '{node.name}' steps over the channel axis")
    n = an.dim(x, axis)
    start, stop, _ = slice(int(starts[k]), int(ends[k])).indices(n)
    i = np.arange(max(stop - start, 0))
    an.note_rewrite("slice", node, axis, start, rank)
    if side == "in":
        an.tie(sid, y, axis, np.stack([i + start, i], axis=1))
    else:
        an.tie(sid, x, axis, np.stack([i, i + start], axis=1))


def _rule_pool(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    if axis > 1:
        raise _Block(f"{node.op_type} '{node.name}' pools over the channel axis")
    if len(node.outputs) > 1 and node.outputs[1].has_uses():
        raise _Block(f"{node.op_type} '{node.name}' indices output is used")
    if index > 0:
        raise _Block(f"{node.op_type} '{node.name}': channel slot on a secondary input or output")
    an.tie(sid, node.outputs[0] if side == "in" else node.inputs[0], axis)


def _reduce_axes(an: _Analyzer, node: ir.Node, rank: int) -> list[int] | None:
    axes = node.attr("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        c = _const(node.inputs[1])
        if c is None:
            raise _Block(f"the axes of {node.op_type} '{node.name}' are computed at run time")
        axes = c.tolist()
    if not axes:
        return None if node.attr("noop_with_empty_axes", 0) else list(range(rank))
    return sorted(_norm(int(a), rank) for a in axes)


def _rule_reduce(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    if side == "in" and index > 0:
        raise _Block(f"used as the axes of {node.op_type} '{node.name}'")
    rank = an.rank(node.inputs[0])
    axes = _reduce_axes(an, node, rank) or []
    keep = int(node.attr("keepdims", 1))
    remaining = [a for a in range(rank) if keep or a not in axes]
    if side == "in":
        if axis in axes:
            raise _Block(f"{node.op_type} '{node.name}' reduces over the channel axis")
        an.tie(sid, node.outputs[0], remaining.index(axis))
    else:
        in_axis = remaining[axis]
        if in_axis in axes:
            raise _Block(f"{node.op_type} '{node.name}' reduces over the channel axis")
        an.tie(sid, node.inputs[0], in_axis)


def _rule_pad(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    if side == "in" and index > 0:
        raise _Block(f"used as a parameter of Pad '{node.name}'")
    rank = an.rank(node.inputs[0])
    pads = node.attr("pads", None)
    if pads is None:
        c = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        if c is None:
            raise _Block(f"the pads of Pad '{node.name}' are computed at run time")
        pads = c.tolist()
    axes_in = len(node.inputs) > 3 and node.inputs[3] is not None
    if axes_in:
        raise _Block(f"Pad '{node.name}' names its axes")
    if int(pads[axis]) != 0 or int(pads[axis + rank]) != 0:
        raise _Block(f"Pad '{node.name}' pads the channel axis")
    an.tie(sid, node.outputs[0] if side == "in" else node.inputs[0], axis)


def _conv_ties(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int,
               w_in: int, w_out: int, pairs: np.ndarray | None = None) -> None:
    """Ties of a convolution whose weight holds input channels on ``w_in`` and output channels
    on ``w_out``; ``pairs`` (input channel, output channel) when groups tie them."""
    side, index = port
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    op = node.op_type
    if side == "in" and index == 0:
        if axis == 0:
            an.tie(sid, y, 0)
        elif axis != 1:
            raise _Block(f"{op} '{node.name}' convolves over the channel axis")
        elif pairs is None:
            an.tie(sid, w, w_in)
        else:
            an.tie(sid, y, 1, pairs)
    elif side == "in" and index == 1:
        if axis == w_out:
            an.tie(sid, y, 1)
        elif axis == w_in and pairs is None:
            an.tie(sid, x, 1)
        else:
            raise _Block(f"{op} '{node.name}': the weight is sliced along a kernel axis")
    elif side == "in" and index == 2:
        an.tie(sid, y, 1)
    else:
        if axis == 0:
            an.tie(sid, x, 0)
            return
        if axis != 1:
            raise _Block(f"{op} '{node.name}' output sliced along a spatial axis")
        an.tie(sid, w, w_out)
        if b is not None:
            an.tie(sid, b, 0)
        if pairs is not None:
            an.tie(sid, x, 1, pairs[:, ::-1])


def _rule_conv(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    group = int(node.attr("group", 1))
    sw = an.shape(node.inputs[1])
    if sw is None or not all(isinstance(d, int) for d in sw[:2]):
        raise _Block(f"Conv '{node.name}' has a weight of unknown shape")
    m, k_in = int(sw[0]), int(sw[1])
    k_out = m // group
    pairs = None
    if group > 1:  # input channel c <-> every output channel of its group
        an.note_rewrite("group", node)
        c = np.repeat(np.arange(k_in * group), k_out)
        pairs = np.stack([c, (c // k_in) * k_out + np.tile(np.arange(k_out), k_in * group)], axis=1)
    _conv_ties(an, sid, node, port, axis, w_in=1, w_out=0, pairs=pairs)


def _rule_conv_transpose(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    if int(node.attr("group", 1)) != 1:
        raise _Block(f"grouped ConvTranspose '{node.name}' is not pruned")
    if node.attr("output_shape", None) is not None:
        raise _Block(f"ConvTranspose '{node.name}' has an explicit output_shape")
    _conv_ties(an, sid, node, port, axis, w_in=0, w_out=1)


def _rule_matmul(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    a, b = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    ra, rb, ry = an.rank(a), an.rank(b), an.rank(y)
    if ra < 2 or rb < 2:
        raise _Block(f"MatMul '{node.name}' has a vector operand")
    activations = not _is_constant(a) and not _is_constant(b)
    if side == "in" and index == 0:
        if axis == ra - 1:
            an.tie(sid, b, rb - 2)
        elif axis == ra - 2:
            an.tie(sid, y, ry - 2)
        else:
            _matmul_batch(an, sid, node, axis + ry - ra, activations)
    elif side == "in" and index == 1:
        if axis == rb - 2:
            an.tie(sid, a, ra - 1)
        elif axis == rb - 1:
            an.tie(sid, y, ry - 1)
        else:
            _matmul_batch(an, sid, node, axis + ry - rb, activations)
    else:
        if axis == ry - 1:
            an.tie(sid, b, rb - 1)
        elif axis == ry - 2:
            an.tie(sid, a, ra - 2)
        else:
            _matmul_batch(an, sid, node, axis, activations)


def _matmul_batch(an: _Analyzer, sid: int, node: ir.Node, y_axis: int, activations: bool) -> None:
    y = node.outputs[0]
    ry = an.rank(y)
    n = an.size(sid)
    for v in [*node.inputs, y]:
        rv = an.rank(v)
        ax = y_axis - (ry - rv)
        if ax < 0 or an.dim(v, ax) == 1 and n != 1:
            continue
        an.tie(sid, v, ax)
    if activations:
        an.heads.add(sid)


def _rule_gemm(an: _Analyzer, sid: int, node: ir.Node, port: tuple[str, int], axis: int) -> None:
    side, index = port
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    ka = 0 if node.attr("transA", 0) else 1
    kb = 1 if node.attr("transB", 0) else 0
    ma, nb = 1 - ka, 1 - kb

    def tie_c(y_axis: int) -> None:
        if c is None:
            return
        rc = an.rank(c)
        ax = y_axis - (2 - rc)
        if ax >= 0 and an.dim(c, ax) != 1:
            an.tie(sid, c, ax)

    if side == "in" and index == 0:
        if axis == ka:
            an.tie(sid, b, kb)
        else:
            an.tie(sid, y, 0)
            tie_c(0)
    elif side == "in" and index == 1:
        if axis == kb:
            an.tie(sid, a, ka)
        else:
            an.tie(sid, y, 1)
            tie_c(1)
    elif side == "in":
        y_axis = axis + 2 - an.rank(c)
        an.tie(sid, y, y_axis)
        if y_axis == 1:
            an.tie(sid, b, nb)
        else:
            an.tie(sid, a, ma)
    else:
        if axis == 1:
            an.tie(sid, b, nb)
        else:
            an.tie(sid, a, ma)
        tie_c(axis)


_RULES: dict[str, Any] = {
    **{op: _rule_unary for op in _UNARY},
    **{op: _rule_broadcast for op in _BROADCAST},
    **{op: _rule_pool for op in _POOL | _GLOBAL_POOL},
    **{op: _rule_reduce for op in _REDUCE},
    "QuantizeLinear": _rule_qdq, "DequantizeLinear": _rule_qdq,
    "BatchNormalization": _rule_norm, "InstanceNormalization": _rule_norm,
    "LayerNormalization": _rule_layer_norm, "RMSNormalization": _rule_layer_norm,
    "Softmax": _rule_softmax, "LogSoftmax": _rule_softmax, "Hardmax": _rule_softmax,
    "Transpose": _rule_transpose, "Reshape": _rule_reshape, "Flatten": _rule_reshape,
    "Squeeze": _rule_squeeze, "Unsqueeze": _rule_squeeze, "Concat": _rule_concat,
    "Split": _rule_split, "Slice": _rule_slice, "Pad": _rule_pad,
    "Conv": _rule_conv, "ConvTranspose": _rule_conv_transpose, "MatMul": _rule_matmul,
    "Gemm": _rule_gemm,
}


def analyze_channels(model: ir.Model) -> ChannelAnalysis:
    """Find the channel groups of the main graph of ``model`` (which is not changed).

    Example:
        >>> analysis = analyze_channels(model)  # doctest: +SKIP
        >>> [(g.describe(), g.blocked) for g in analysis.groups]  # doctest: +SKIP
        [('conv1_out[1], conv1.W[0], conv1.B[0], conv2.W[1]', [])]
    """
    an = _Analyzer(model)
    an.seed()
    groups = an.groups()
    logger.info("channel analysis: %d group(s), %d prunable, %d blocked", len(groups),
                sum(g.prunable for g in groups), sum(bool(g.blocked) for g in groups))
    for g in groups:
        if g.blocked:
            logger.debug("group %d (%s) blocked: %s", g.id, g.describe(), "; ".join(g.blocked))
    return ChannelAnalysis(groups, an.rewrites)

