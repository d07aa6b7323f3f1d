"""``split-tensor-parallel``: MLP and attention blocks rewritten into N shards plus a Sum.

The algebra (Megatron-style): for a block ``y = f(x·W1)·W2`` where ``f`` works column by column,
splitting ``W1 = [W1₀ … W1ₙ₋₁]`` by columns and ``W2`` by the matching rows gives
``y = Σₛ f(x·W1ₛ)·W2ₛ``. Attention is the same split by heads: Q, K and V projections are cut by
columns (whole heads), each shard runs its heads' scores, softmax and weighted sum, and the
output projection is cut by rows. A bias of a column-split projection is cut with it; a bias of
the final projection is added once, after the Sum.

How a block is found: every ``MatMul``/``Gemm`` whose weight is a constant 2-D initializer
read by it alone is a *column split* candidate. A split is described per value by an axis and
an *outer* factor ``O``: the axis is laid out as ``[O, N, rest]`` and shard ``s`` holds block
``s`` of the ``N`` (``O = 1`` for a plain projection or heads; ``O = 3`` for a fused QKV
projection that a ``Split`` cuts into Q, K and V; ``O = batch`` once heads are merged into the
batch axis as ``[B·H, S, D]``). The split is propagated forward through ops that keep shards
independent: element-wise ops (other operands scalars, per-column constants that are sliced, or
tensors of size 1 along the split axis), ``Transpose``, ``Split`` into ``O`` equal parts,
``Reshape``, ``MatMul`` of two split values along a batch (head) axis, and ``Softmax`` over
another axis. A candidate whose input is split along its last axis is the *row split* that ends
the block.

Reshape targets are usually computed at run time (``Concat(Shape(x)[0:2], [-1, 64])``,
``Shape`` of a tensor of the block itself, ``[0, 0, 12, 64]``, ``[-1, 768]``). ``Shape`` of a
split value and the integer ops after it are *shard-local*: they are cloned into every shard and
give that shard's sizes. For each ``Reshape`` the target a shard would compute is evaluated
(:class:`~graphopt.passes._attention_shapes.ShapeEvaluator`, symbolic dims bound to a probe
size) and must give the shard's part of the output shape; if it does not, the constant entry
holding the split axis (the constant piece of the ``Concat``, or the entry of a constant target)
is divided by N for the shard, and the check is made again. A shard-local value read outside
its block (``Shape(h)[0:2]`` feeding a reshape after the output projection) is allowed when it
is the same in every shard; readers then take shard 0's. A block is rewritten only if every
split value is read inside the block, none is a graph output, and every check passed; otherwise
nothing of it changes.

Shard nodes are named ``tp<block>.shard<s>/...`` and combining nodes ``tp<block>.combine/...``
so that a partitioner can place each shard on its own device.

Must not fire: weights shared with other nodes or given as graph inputs, sizes that do not
divide by N, a split value that escapes the block (a graph output, a residual add), Softmax over
the split axis, a Reshape whose target for a shard cannot be evaluated or fixed by one constant.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt import ir
from graphopt.analysis import graph_cost
from graphopt.passes._attention_shapes import (EVALUATED_OPS, ShapeEvaluator, ShapePiece, constant_array,
                                               reshape_result, shape_piece)
from graphopt.pipeline import Pass, PassContext, PassResult

__all__ = ["SplitTensorParallel", "split_tensor_parallel"]

logger = logging.getLogger(__name__)

_UNARY = {"Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Sqrt", "Exp", "Neg", "Abs", "Softplus",
          "Identity", "Cast", "LeakyRelu", "Elu", "Selu", "HardSigmoid", "HardSwish", "Mish",
          "Reciprocal", "Log", "Sin", "Cos", "Clip", "IsNaN", "Not", "Floor", "Ceil", "Round",
          "Dropout"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "Less", "Greater",
           "And", "Or"}
#: Ops that shard-local shape computations may use (what the shape evaluator computes).
_SHAPE_LOCAL = EVALUATED_OPS | {"Shape", "Size"}
#: Ops followed from a column-split projection to a ``Split`` that cuts a fused QKV output.
_TO_SPLIT = {"Add", "Reshape", "Identity", "Cast"}
#: Probe sizes of symbolic input dims: distinct primes, unlikely to collide with hidden or head
#: sizes or with one another (so a target mixing up batch and sequence cannot pass by chance).
_PROBE_DIMS = (7, 11, 13, 17, 19, 23, 29, 31)

_Split = tuple[int, int]  # (axis, outer factor)
_LOCAL = "local"


def _const(v: ir.Value | None) -> np.ndarray | None:
    return constant_array(v)


def _weight(node: ir.Node) -> tuple[ir.Tensor, bool] | None:
    """(W, transposed-in-graph) for a MatMul/Gemm with a private 2-D constant weight."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if w is None or not w.is_initializer() or not w.is_constant() or w.num_uses != 1 or w.is_graph_output():
        return None
    if node.op_type == "Gemm" and (node.attr("transA", 0) or node.attr("alpha", 1.0) != 1.0
                                   or node.attr("beta", 1.0) != 1.0):
        return None
    if len(w.const_value.shape) != 2:
        return None
    trans = node.op_type == "Gemm" and bool(node.attr("transB", 0))
    return w.const_value, trans  # type: ignore[return-value]


@dataclass
class _Block:
    entries: list[ir.Node] = field(default_factory=list)
    inner: list[ir.Node] = field(default_factory=list)
    exits: list[ir.Node] = field(default_factory=list)
    valid: bool = True


class _Find:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _aligned_dim(shape: tuple, rank: int, axis: int) -> Any:
    """The dim of ``shape`` aligned (numpy broadcasting) with ``axis`` of a rank-``rank`` value."""
    offset = rank - len(shape)
    return 1 if axis < offset else shape[axis - offset]


def _map_split(in_shape: tuple, split: _Split, out_shape: tuple, n: int) -> _Split | None:
    """Where a split of ``in_shape`` lands after a reshape to ``out_shape`` (``None``: mixed).

    The flat layout of the input is ``[P, n, inner]`` with ``P`` everything before the shard
    blocks; an output axis ``b`` holds the split when the dims before it divide ``P`` and the
    rest of its own size times the dims after it make ``inner``.
    """
    axis, outer = split
    if in_shape[axis] % (outer * n):
        return None
    before = math.prod(in_shape[:axis]) * outer
    inner = in_shape[axis] // (outer * n) * math.prod(in_shape[axis + 1:])
    for b in range(len(out_shape)):
        pre = math.prod(out_shape[:b])
        if pre == 0 or before % pre:
            continue
        outer_b = before // pre
        if out_shape[b] <= 1 or out_shape[b] % (outer_b * n):
            continue
        if out_shape[b] // (outer_b * n) * math.prod(out_shape[b + 1:]) == inner:
            return b, outer_b
    return None


def _local_shape(shape: tuple, split: _Split, n: int) -> tuple:
    axis = split[0]
    return tuple(d // n if i == axis else d for i, d in enumerate(shape))


@dataclass
class _ReshapePlan:
    """How a shard rewrites one Reshape's target: nothing, or one constant entry divided by N."""

    piece: ShapePiece | None = None


class _Analysis:
    """Split axes of values, found by forward propagation in graph order."""

    def __init__(self, model: ir.Model, shards: int, excluded: set[int],
                 shapes: dict[str, tuple]) -> None:
        self.model = model
        self.n = shards
        self.shapes = shapes
        self.split: dict[int, _Split] = {}  # id(value) -> (axis, outer)
        self.local: set[int] = set()  # id(value) of shard-local shape values
        self.role: dict[int, str] = {}  # id(node) -> entry / inner / local / exit
        self.excluded = excluded
        self.blocks = _Find()
        self.leaks: list[int] = []  # producers of split values read where the split cannot go
        self.reshapes: dict[int, _ReshapePlan] = {}
        self.escapes: list[tuple[ir.Node, int, ir.Value]] = []  # (reader, input, local value)
        self.entry_outer: dict[int, int] = {}
        self.full = ShapeEvaluator(self.shape)
        self.shard = ShapeEvaluator(self.local_shape_of)

    def shape(self, v: ir.Value | None) -> tuple | None:
        if v is None:
            return None
        if v.const_value is not None:
            return tuple(v.const_value.shape)
        c = _const(v)
        if c is not None:
            return tuple(c.shape)
        s = self.shapes.get(v.name)
        return s if s is not None and all(isinstance(d, int) for d in s) else None

    def local_shape_of(self, v: ir.Value) -> tuple | None:
        """The shape of ``v`` in one shard."""
        shape = self.shape(v)
        if shape is not None and id(v) in self.split:
            return _local_shape(shape, self.split[id(v)], self.n)
        if shape is None and id(v) in self.local:
            array = self.shard.value(v)
            return None if array is None else tuple(array.shape)
        return shape

    def run(self) -> None:
        for node in self.model.graph:
            if id(node) in self.excluded:
                continue
            split_inputs = [v for v in node.inputs if v is not None and id(v) in self.split]
            local_inputs = [v for v in node.inputs if v is not None and id(v) in self.local]
            w = _weight(node)
            if w is not None and not local_inputs:
                x = node.inputs[0]
                wt, trans = w
                cols = wt.shape[0] if trans else wt.shape[1]
                xs = self.shape(x)
                if x is not None and id(x) in self.split and xs is not None \
                        and self.split[id(x)] == (len(xs) - 1, 1):
                    self.role[id(node)] = "exit"
                    self.blocks.union(id(node), id(x.producer))
                    continue
                if not split_inputs and len(node.outputs) == 1:
                    outer = self._entry_outer(node)
                    out_shape = self.shape(node.outputs[0])
                    bias = node.inputs[2] if len(node.inputs) > 2 else None
                    if cols % (self.n * outer) == 0 and out_shape is not None \
                            and (bias is None or _const(bias) is not None):
                        self.role[id(node)] = "entry"
                        self.entry_outer[id(node)] = outer
                        self.split[id(node.outputs[0])] = (len(out_shape) - 1, outer)
                        self.blocks.union(id(node), id(node))
                        continue
            if split_inputs:
                result = self._propagate(node)
                if result is None:
                    logger.debug("split-tensor-parallel: %s '%s' stops the split", node.op_type, node.name)
                    self.leaks.extend(id(v.producer) for v in split_inputs)
                    self.leaks.extend(id(v.producer) for v in local_inputs)
                    continue
                self.role[id(node)] = "inner"
                for v in split_inputs + local_inputs:
                    self.blocks.union(id(node), id(v.producer))
                if result == _LOCAL:
                    self.local.update(id(o) for o in node.outputs)
                else:
                    for out, split in zip(node.outputs, result):
                        self.split[id(out)] = split
                continue
            if not local_inputs:
                continue
            if node.domain in ("", "ai.onnx") and node.op_type in _SHAPE_LOCAL and not node.subgraphs() \
                    and all(v is None or id(v) in self.local or self.full.value(v) is not None
                            for v in node.inputs):  # shape arithmetic only, never activations
                self.role[id(node)] = "local"
                for v in local_inputs:
                    self.blocks.union(id(node), id(v.producer))
                self.local.update(id(o) for o in node.outputs)
                continue
            for index, v in enumerate(node.inputs):
                if v is None or id(v) not in self.local:
                    continue
                if self._invariant(v):
                    self.escapes.append((node, index, v))
                else:
                    self.leaks.append(id(v.producer))

    def _invariant(self, v: ir.Value) -> bool:
        """True when the shard-local value ``v`` is the same in every shard as in the whole model."""
        full, local = self.full.value(v), self.shard.value(v)
        return full is not None and local is not None and full.shape == local.shape \
            and bool(np.array_equal(full, local))

    def _entry_outer(self, node: ir.Node) -> int:
        """How many equal parts a later ``Split`` cuts this projection's columns into (else 1)."""
        v = node.outputs[0]
        for _ in range(4):
            users = v.users()
            if len(users) != 1 or v.is_graph_output():
                return 1
            user = users[0]
            if user.domain not in ("", "ai.onnx"):
                return 1
            if user.op_type == "Split" and user.inputs[0] is v:
                shape = self.shape(v)
                if shape is None or user.attr("axis", 0) % len(shape) != len(shape) - 1:
                    return 1
                sizes = _split_sizes(user)
                parts = len(user.outputs)
                if sizes is not None and len(set(sizes)) != 1:
                    return 1
                return parts
            if user.op_type not in _TO_SPLIT or user.inputs[0] is not v:
                return 1
            v = user.outputs[0]
        return 1

    def _propagate(self, node: ir.Node) -> list[_Split] | str | None:
        """The splits of the node's outputs, ``"local"`` for shape reads, or None (cannot shard)."""
        if node.domain not in ("", "ai.onnx") or node.subgraphs():
            return None
        op = node.op_type
        ins = [v for v in node.inputs if v is not None]
        split = [v for v in ins if id(v) in self.split]
        first = split[0]
        if op in ("Shape", "Size") and node.inputs[0] is first:
            return _LOCAL
        if op == "Split":
            return self._split_rule(node, first)
        if len(node.outputs) != 1:
            return None
        if op == "Reshape":
            return self._reshape_rule(node)
        if any(id(v) in self.local for v in ins):
            return None
        out_shape = self.shape(node.outputs[0])
        in_shape = self.shape(first)
        if out_shape is None or in_shape is None:
            return None
        rank = len(out_shape)
        axis, outer = self.split[id(first)]
        if op in _UNARY:
            return [(axis, outer)] if op != "Clip" or all(_const(v) is not None for v in ins[1:]) else None
        if op in _BINARY:
            out_axis = axis + rank - len(in_shape)
            full = out_shape[out_axis]
            for v in ins:
                s = self.shape(v)
                if s is None:
                    return None
                if id(v) in self.split:
                    if (self.split[id(v)][0] + rank - len(s), self.split[id(v)][1]) != (out_axis, outer):
                        return None
                    continue
                d = _aligned_dim(s, rank, out_axis)
                if d != 1 and not (d == full and _const(v) is not None):
                    return None
            return [(out_axis, outer)]
        if op == "Transpose":
            perm = node.attr("perm")
            perm = list(perm) if perm is not None else list(range(rank))[::-1]
            return [(perm.index(axis), outer)]
        if op == "Softmax" or op == "LogSoftmax":
            ax = node.attr("axis", -1)
            return [(axis, outer)] if (ax % rank) != axis else None
        if op == "MatMul" and len(split) == 2 and len(ins) == 2:
            a, b = (self.shape(v) for v in ins)
            if a is None or b is None or len(a) < 3 or len(b) < 3:
                return None
            aligned = [(self.split[id(v)][0] + rank - len(s), self.split[id(v)][1])
                       for v, s in zip(ins, (a, b))]
            return [aligned[0]] if aligned[0] == aligned[1] and aligned[0][0] < rank - 2 else None
        return None

    def _split_rule(self, node: ir.Node, first: ir.Value) -> list[_Split] | None:
        """A Split along the split axis into ``k`` equal parts of an outer factor divisible by k."""
        shape = self.shape(first)
        if shape is None or node.inputs[0] is not first or any(id(v) in self.split for v in node.inputs[1:] if v):
            return None
        axis, outer = self.split[id(first)]
        k = len(node.outputs)
        sizes = _split_sizes(node)
        if node.attr("axis", 0) % len(shape) != axis or outer % k or (sizes is not None and len(set(sizes)) != 1):
            return None
        if len(node.inputs) > 1 and node.inputs[1] is not None and sizes is None:
            return None
        return [(axis, outer // k)] * k

    def _reshape_rule(self, node: ir.Node) -> list[_Split] | None:
        """Map the split through a Reshape and plan the shard's target (see the module notes)."""
        x, target = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        if x is None or target is None or id(x) not in self.split or id(target) in self.split:
            return None
        in_shape, out_shape = self.shape(x), self.shape(node.outputs[0])
        if in_shape is None or out_shape is None:
            return None
        mapped = _map_split(in_shape, self.split[id(x)], out_shape, self.n)
        if mapped is None:
            return None
        local_in = _local_shape(in_shape, self.split[id(x)], self.n)
        expected = _local_shape(out_shape, mapped, self.n)
        allowzero = bool(node.attr("allowzero", 0))
        value = self.shard.value(target)
        if value is None or value.ndim != 1:
            return None
        if reshape_result(local_in, value.tolist(), allowzero) == expected:
            self.reshapes[id(node)] = _ReshapePlan()
            return [mapped]
        b = mapped[0]
        piece = shape_piece(target, b, self._length)
        if piece is None:
            return None
        entry = int(_const(piece.value).reshape(-1)[piece.offset])  # type: ignore[union-attr]
        if entry <= 0 or entry % self.n:
            return None
        patched = value.copy()
        patched[b] = entry // self.n
        if reshape_result(local_in, patched.tolist(), allowzero) != expected:
            return None
        self.reshapes[id(node)] = _ReshapePlan(piece)
        return [mapped]

    def _length(self, v: ir.Value) -> int | None:
        array = self.shard.value(v)
        if array is not None and array.ndim == 1:
            return int(array.size)
        shape = self.shape(v)
        return shape[0] if shape is not None and len(shape) == 1 else None


def _split_sizes(node: ir.Node) -> list[int] | None:
    """The sizes of a Split (input or attribute), ``None`` when it splits into equal parts."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = _const(node.inputs[1])
        return None if sizes is None else [int(s) for s in sizes.reshape(-1)]
    attr = node.attr("split", None)
    return None if attr is None else [int(s) for s in attr]


def split_tensor_parallel(model: ir.Model, shards: int, ctx: PassContext | None = None) -> int:
    """Rewrite every splittable MLP/attention block of ``model`` into ``shards`` shards.

    Returns:
        The number of blocks rewritten.

    Example:
        >>> split_tensor_parallel(model, 2)  # doctest: +SKIP
        4
    """
    excluded: set[int] = set()
    symbols = sorted({d for v in model.graph.inputs if v.shape is not None for d in v.shape.dims
                      if isinstance(d, str)})
    probes = {name: _PROBE_DIMS[i % len(_PROBE_DIMS)] for i, name in enumerate(symbols)}
    shapes = graph_cost(model, dims=probes, default_dim=_PROBE_DIMS[-1]).shapes
    for _ in range(16):  # blocks that leak are dropped and the split is propagated again
        analysis = _Analysis(model, shards, excluded, shapes)
        analysis.run()
        blocks = _collect(model, analysis)
        bad = [b for b in blocks.values() if not b.valid]
        if not bad:
            break
        for b in bad:
            excluded.update(id(n) for n in b.entries)
    else:
        return 0
    count = 0
    attention = 0
    for index, block in enumerate(b for b in blocks.values() if b.exits):
        if ctx is not None and not ctx.allow_rewrite(f"split-tensor-parallel: block {index}"):
            break
        if any(n.op_type == "MatMul" and all(id(v) in analysis.split for v in n.inputs if v is not None)
               for n in block.inner):
            attention += 1
        _rewrite(model, analysis, block, count, shards)
        count += 1
    if count:
        model.graph.sort()
    logger.info("split-tensor-parallel: %d block(s) split into %d shard(s) (%d attention, %d MLP)",
                count, shards, attention, count - attention)
    return count


def _collect(model: ir.Model, analysis: _Analysis) -> dict[int, _Block]:
    blocks: dict[int, _Block] = {}
    bad_roots = {analysis.blocks.find(x) for x in analysis.leaks}
    for node in model.graph:
        role = analysis.role.get(id(node))
        if role not in ("entry", "inner", "local", "exit"):
            continue
        root = analysis.blocks.find(id(node))
        block = blocks.setdefault(root, _Block())
        getattr(block, {"entry": "entries", "inner": "inner", "local": "inner", "exit": "exits"}[role]).append(node)
        if root in bad_roots:
            block.valid = False
    escaping = {id(v) for _, _, v in analysis.escapes}
    for block in blocks.values():
        members = {id(n) for n in block.entries + block.inner + block.exits}
        for node in block.entries + block.inner:
            for out in node.outputs:
                escapes = id(out) not in escaping and any(id(u) not in members for u in out.users())
                if out.is_graph_output() or escapes:
                    block.valid = False
        if not block.exits and block.entries:
            # a lone column split (no row split after it) is left alone, and is no block
            block.valid = True
            block.inner = []
    return blocks


def _slice(array: np.ndarray, axis: int, s: int, n: int, outer: int = 1) -> np.ndarray:
    """Block ``s`` of ``n`` of ``axis`` laid out as ``[outer, n, rest]``."""
    size = array.shape[axis]
    shaped = array.reshape(array.shape[:axis] + (outer, n, size // (outer * n)) + array.shape[axis + 1:])
    index: list[slice | int] = [slice(None)] * shaped.ndim
    index[axis + 1] = s
    part = shaped[tuple(index)]
    return np.ascontiguousarray(part.reshape(array.shape[:axis] + (size // n,) + array.shape[axis + 1:]))


def _rewrite(model: ir.Model, analysis: _Analysis, block: _Block, number: int, n: int) -> None:
    g = model.graph
    order_ids = {id(x) for x in block.entries + block.inner}
    nodes_in_order = [x for x in g if id(x) in order_ids]
    anchor = next(x for x in g if id(x) in {id(e) for e in block.exits})
    partials: dict[int, list[ir.Value]] = {id(e): [] for e in block.exits}
    shard0: dict[int, ir.Value] = {}
    clones: list[ir.Node] = []

    def const_value(name: str, array: np.ndarray) -> ir.Value:
        return g.add_initializer(model.unique_name(name), ir.ArrayTensor(array))

    used_names = {x.name for x in g if x.name}

    def node_name(prefix: str, label: str) -> str:
        base = prefix + label
        name, k = base, 0
        while name in used_names:
            k += 1
            name = f"{base}_{k}"
        used_names.add(name)
        return name

    def patched_target(piece: ShapePiece, s: int, mapping: dict[int, ir.Value],
                       patched: dict[tuple[int, int, int], ir.Value]) -> ir.Value:
        """Shard ``s``'s target of a Reshape whose split entry is a constant divided by N."""
        key = (id(piece.concat) if piece.concat is not None else id(piece.value), piece.index, piece.offset)
        if key in patched:
            return patched[key]
        array = _const(piece.value).copy()  # type: ignore[union-attr]
        flat = array.reshape(-1)
        flat[piece.offset] = flat[piece.offset] // n
        new_piece = const_value(f"{piece.value.name or 'shape'}.shard{s}", flat.reshape(array.shape))
        if piece.concat is None:
            patched[key] = new_piece
            return new_piece
        inputs = [mapping.get(id(v), v) if v is not None else None for v in piece.concat.inputs]
        inputs[piece.index] = new_piece
        concat = ir.Node(piece.concat.domain, "Concat", inputs, attributes=dict(piece.concat.attributes.items()),
                         name=node_name(f"tp{number}.shard{s}/", piece.concat.name or "Concat"))
        concat.outputs[0].name = model.unique_name(f"{piece.concat.outputs[0].name}.shard{s}")
        g.insert_before(anchor, concat)
        clones.append(concat)
        patched[key] = concat.outputs[0]
        return concat.outputs[0]

    for s in range(n):
        mapping: dict[int, ir.Value] = {}
        patched: dict[tuple[int, int, int], ir.Value] = {}  # one rewritten target per shared shape
        prefix = f"tp{number}.shard{s}/"
        for node in nodes_in_order:
            inputs: list[ir.Value | None] = [mapping.get(id(v), v) if v is not None else None for v in node.inputs]
            attrs = dict(node.attributes.items())
            role = analysis.role[id(node)]
            out_split = analysis.split.get(id(node.outputs[0]))
            if role == "entry":
                wt, trans = _weight(node)  # type: ignore[misc]
                outer = analysis.entry_outer[id(node)]
                inputs[1] = const_value(f"{node.inputs[1].name}.shard{s}",
                                        _slice(wt.numpy(), 0 if trans else 1, s, n, outer))
                if len(inputs) > 2 and inputs[2] is not None:
                    bias = _const(node.inputs[2])
                    axis = bias.ndim - 1  # type: ignore[union-attr]
                    if bias.shape and bias.shape[axis] != 1:  # type: ignore[union-attr]
                        inputs[2] = const_value(f"{node.inputs[2].name}.shard{s}",
                                                _slice(bias, axis, s, n, outer))  # type: ignore[arg-type]
            elif node.op_type == "Reshape" and id(node) in analysis.reshapes:
                piece = analysis.reshapes[id(node)].piece
                if piece is not None:
                    inputs[1] = patched_target(piece, s, mapping, patched)
            elif node.op_type == "Split" and out_split is not None:
                sizes = _split_sizes(node)
                if sizes is not None and len(node.inputs) > 1 and node.inputs[1] is not None:
                    inputs[1] = const_value(f"{node.inputs[1].name or 'split'}.shard{s}",
                                            np.array([x // n for x in sizes], np.int64))
                elif sizes is not None:
                    attrs["split"] = ir.Attr.from_value("split", tuple(x // n for x in sizes))
            elif node.op_type in _BINARY and out_split is not None:
                out_shape = analysis.shape(node.outputs[0])
                rank, (axis, outer) = len(out_shape), out_split  # type: ignore[arg-type]
                for i, v in enumerate(node.inputs):
                    if v is None or id(v) in analysis.split:
                        continue
                    s_shape = analysis.shape(v)
                    if s_shape is not None and _aligned_dim(s_shape, rank, axis) != 1:
                        local_axis = axis - (rank - len(s_shape))
                        inputs[i] = const_value(f"{v.name or 'c'}.shard{s}",
                                                _slice(_const(v), local_axis, s, n, outer))  # type: ignore[arg-type]
            clone = ir.Node(node.domain, node.op_type, inputs, attributes=attrs,
                            num_outputs=len(node.outputs), name=node_name(prefix, node.name or node.op_type))
            for old, new in zip(node.outputs, clone.outputs):
                new.name = model.unique_name(f"{old.name}.shard{s}")
                mapping[id(old)] = new
            g.insert_before(anchor, clone)
            clones.append(clone)
        if s == 0:
            shard0 = dict(mapping)
        for exit_node in block.exits:
            wt, trans = _weight(exit_node)  # type: ignore[misc]
            w_s = const_value(f"{exit_node.inputs[1].name}.shard{s}", _slice(wt.numpy(), 1 if trans else 0, s, n))
            x = mapping[id(exit_node.inputs[0])]
            attrs = dict(exit_node.attributes.items())
            partial = ir.Node(exit_node.domain, exit_node.op_type, [x, w_s], attributes=attrs,
                              name=node_name(prefix, exit_node.name or exit_node.op_type))
            partial.outputs[0].name = model.unique_name(f"{exit_node.outputs[0].name}.partial{s}")
            g.insert_before(anchor, partial)
            partials[id(exit_node)].append(partial.outputs[0])
    for exit_node in block.exits:
        combine = f"tp{number}.combine/"
        total = ir.Node("", "Sum", partials[id(exit_node)], name=node_name(combine, "Sum"))
        total.outputs[0].name = model.unique_name(f"{exit_node.outputs[0].name}.sum")
        g.insert_before(exit_node, total)
        result = total.outputs[0]
        bias = exit_node.inputs[2] if len(exit_node.inputs) > 2 else None
        if bias is not None:
            add = ir.Node("", "Add", [result, bias], name=node_name(combine, "Add"))
            add.outputs[0].name = model.unique_name(f"{exit_node.outputs[0].name}.biased")
            g.insert_before(exit_node, add)
            result = add.outputs[0]
        old = exit_node.outputs[0]
        old.replace_all_uses_with(result, rename_graph_outputs=True)
    # Shape values every shard computes alike are read by later nodes from shard 0.
    for reader, index, value in analysis.escapes:
        if id(value) in shard0 and reader.is_live() and reader.inputs[index] is value:
            reader.replace_input(index, shard0[id(value)])
    read: list[ir.Value] = []
    for node in [*block.exits, *reversed(nodes_in_order)]:
        read.extend(v for v in node.inputs if v is not None)
        g.remove(node, force=True)
    for v in read:
        _drop_unused_constant(g, v)
    # Shape computations cloned into shards that read none of them (escaping values only).
    for clone in reversed(clones):
        if not any(o.has_uses() or o.is_graph_output() for o in clone.outputs):
            g.remove(clone)


def _drop_unused_constant(g: ir.Graph, v: ir.Value) -> None:
    """Remove what only the removed block read: an unused initializer, or an unused producer of
    constants or shape arithmetic (``Constant``, an ``Identity`` of a weight, a ``Concat`` of
    shape pieces whose head count the shards rewrote), and then its own unused inputs."""
    if v.has_uses() or v.is_graph_output() or v.is_graph_input():
        return
    if v.is_initializer():
        if v.name in g.initializers:
            g.remove_initializer(v)
        return
    producer = v.producer
    if producer is None or not producer.is_live() or producer.graph is not g or producer.domain not in ("", "ai.onnx") \
            or producer.op_type not in _SHAPE_LOCAL | {"Constant"} or producer.subgraphs() \
            or any(o.has_uses() or o.is_graph_output() for o in producer.outputs):
        return
    inputs = [x for x in producer.inputs if x is not None]
    g.remove(producer)
    for x in inputs:
        _drop_unused_constant(g, x)


class SplitTensorParallel(Pass):
    """Split MLP and attention blocks into ``shards`` tensor-parallel shards combined by a Sum."""

    name = "split-tensor-parallel"
    opt_level = 3
    options = {"shards": 2}
    description = "split MLP (columns then rows) and attention (by heads) blocks into N shards + Sum"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Rewrite the blocks; counters: ``blocks``."""
        shards = int(self.config.get("shards", 2))
        count = split_tensor_parallel(model, shards, ctx)
        return PassResult(changed=count > 0, counters={"blocks": count})
