"""``split-tensor-parallel``: MLP and attention blocks rewritten into N shards plus a Sum.

The algebra (Megatron-style): for a block ``y = f(x·W1)·W2`` where ``f`` works column by column,
splitting ``W1 = [W1₀ … W1ₙ₋₁]`` by columns and ``W2`` by the matching rows gives
``y = Σₛ f(x·W1ₛ)·W2ₛ``. Attention is the same split by heads: Q, K and V projections are cut by
columns (whole heads), each shard runs its heads' scores, softmax and weighted sum, and the
output projection is cut by rows. A bias of a column-split projection is cut with it; a bias of
the final projection is added once, after the Sum.

How a block is found: every ``MatMul``/``Gemm`` whose weight is a constant 2-D initializer
read by it alone is a *column split* candidate; the split (an axis of each value, sized
``full / N``) is propagated forward through ops that keep shards independent: element-wise ops
(other operands scalars, per-column constants that are sliced, or tensors of size 1 along the
split axis), ``Reshape`` with a constant shape that keeps the split on whole sub-blocks (768 ->
12 heads x 64), ``Transpose``, ``MatMul`` of two split values along a batch (head) axis, and
``Softmax`` over another axis. A candidate whose input is split along its last axis is the
*row split* that ends the block. A block is rewritten only if every split value is read inside
the block and none is a graph output; otherwise nothing of it changes.

Shard nodes are named ``tp<block>.shard<s>/...`` and combining nodes ``tp<block>.combine/...``
so that a partitioner can place each shard on its own device.

Must not fire: weights shared with other nodes or given as graph inputs, sizes that do not
divide by N, a split value that escapes the block (a graph output, a residual add), Softmax over
the split axis, Reshape shapes computed at run time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt import ir
from graphopt.analysis import graph_cost
from graphopt.pipeline import Pass, PassContext, PassResult

__all__ = ["SplitTensorParallel", "split_tensor_parallel"]

logger = logging.getLogger(__name__)

_UNARY = {"Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Sqrt", "Exp", "Neg", "Abs", "Softplus",
          "Identity", "Cast", "LeakyRelu", "Elu", "Selu", "HardSigmoid", "HardSwish", "Mish",
          "Reciprocal", "Log", "Sin", "Cos", "Clip", "IsNaN", "Not", "Floor", "Ceil", "Round",
          "Dropout"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "Less", "Greater",
           "And", "Or"}


def _const(v: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is a constant (initializer or ``Constant`` node), else None."""
    if v is None:
        return None
    if v.const_value is not None and v.is_constant():
        return v.const_value.numpy()
    p = v.producer
    if p is not None and p.domain in ("", "ai.onnx"):
        if p.op_type == "Constant":
            t = p.attr("value")
            if isinstance(t, ir.Tensor):
                return t.numpy()
        if p.op_type == "Identity":  # exports copy biases through Identity nodes
            return _const(p.inputs[0])
    return None


def _weight(node: ir.Node) -> tuple[np.ndarray, bool] | None:
    """(W as [K, N], transposed-in-graph) for a MatMul/Gemm with a private 2-D constant weight."""
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


class _Analysis:
    """Split axes of values, found by forward propagation in graph order."""

    def __init__(self, model: ir.Model, shards: int, excluded: set[int],
                 shapes: dict[str, tuple]) -> None:
        self.model = model
        self.n = shards
        self.shapes = shapes
        self.axis: dict[int, int] = {}  # id(value) -> split axis
        self.role: dict[int, str] = {}  # id(node) -> entry / inner / exit
        self.excluded = excluded
        self.blocks = _Find()
        self.leaks: list[int] = []  # producers of split values read where the split cannot go

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

    def run(self) -> None:
        for node in self.model.graph:
            if id(node) in self.excluded:
                continue
            split_inputs = [v for v in node.inputs if v is not None and id(v) in self.axis]
            w = _weight(node)
            if w is not None:
                x = node.inputs[0]
                wt, trans = w
                cols = wt.shape[0] if trans else wt.shape[1]
                xs = self.shape(x)
                if x is not None and id(x) in self.axis and xs is not None and self.axis[id(x)] == len(xs) - 1:
                    self.role[id(node)] = "exit"
                    self.blocks.union(id(node), id(x.producer))
                    continue
                if not split_inputs and cols % self.n == 0 and len(node.outputs) == 1:
                    out_shape = self.shape(node.outputs[0])
                    bias = node.inputs[2] if len(node.inputs) > 2 else None
                    if out_shape is not None and (bias is None or _const(bias) is not None):
                        self.role[id(node)] = "entry"
                        self.axis[id(node.outputs[0])] = len(out_shape) - 1
                        self.blocks.union(id(node), id(node))
                        continue
            if not split_inputs:
                continue
            axis = self._propagate(node)
            if axis is None:
                self.leaks.extend(id(v.producer) for v in split_inputs)
                continue
            self.role[id(node)] = "inner"
            for v in split_inputs:
                self.blocks.union(id(node), id(v.producer))
            self.axis[id(node.outputs[0])] = axis

    def _propagate(self, node: ir.Node) -> int | None:
        """The split axis of the node's output, or None when the node cannot run per shard."""
        if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 or node.subgraphs():
            return None
        op = node.op_type
        ins = [v for v in node.inputs if v is not None]
        out_shape = self.shape(node.outputs[0])
        if out_shape is None:
            return None
        rank = len(out_shape)
        split = [v for v in ins if id(v) in self.axis]
        first = split[0]
        in_shape = self.shape(first)
        if in_shape is None:
            return None
        axis = self.axis[id(first)]
        if op in _UNARY:
            return axis if op != "Clip" or all(_const(v) is not None for v in ins[1:]) else None
        if op in _BINARY:
            out_axis = axis + rank - len(in_shape)
            full = out_shape[out_axis]
            for v in ins:
                s = self.shape(v)
                if s is None:
                    return None
                if id(v) in self.axis:
                    if self.axis[id(v)] + rank - len(s) != out_axis:
                        return None
                    continue
                d = _aligned_dim(s, rank, out_axis)
                if d != 1 and not (d == full and _const(v) is not None):
                    return None
            return out_axis
        if op == "Transpose":
            perm = node.attr("perm")
            perm = list(perm) if perm is not None else list(range(rank))[::-1]
            return perm.index(axis)
        if op == "Softmax" or op == "LogSoftmax":
            ax = node.attr("axis", -1)
            return axis if (ax % rank) != axis else None
        if op == "MatMul" and len(split) == 2 and len(ins) == 2:
            a, b = (self.shape(v) for v in ins)
            if a is None or b is None or len(a) < 3 or len(b) < 3:
                return None
            axes = [self.axis[id(v)] + rank - len(self.shape(v)) for v in ins]  # type: ignore[arg-type]
            return axes[0] if axes[0] == axes[1] and axes[0] < rank - 2 else None
        if op == "Reshape" and len(ins) == 2 and id(ins[1]) not in self.axis:
            target = _const(ins[1])
            if target is None or 0 in target.tolist():
                return None
            lead_in = int(np.prod(in_shape[:axis]))
            for b in range(rank):
                if int(np.prod(out_shape[:b])) == lead_in and out_shape[b] % self.n == 0 \
                        and int(np.prod(out_shape[b:])) == int(np.prod(in_shape[axis:])) \
                        and (in_shape[axis] % self.n == 0) and out_shape[b] > 1:
                    return b
            return None
        return None


def split_tensor_parallel(model: ir.Model, shards: int, ctx: PassContext | None = None) -> int:
    """Rewrite every splittable MLP/attention block of ``model`` into ``shards`` shards.

    Returns:
        The number of blocks rewritten.

    Example:
        >>> split_tensor_parallel(model, 2)  # doctest: +SKIP
        4
    """
    excluded: set[int] = set()
    # Concrete shapes with symbolic dims bound to 7 (unlikely to collide with real sizes).
    shapes = graph_cost(model, default_dim=7).shapes
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
    for index, block in enumerate(b for b in blocks.values() if b.exits):
        if ctx is not None and not ctx.allow_rewrite(f"split-tensor-parallel: block {index}"):
            break
        _rewrite(model, analysis, block, count, shards)
        count += 1
    logger.info("split-tensor-parallel: %d block(s) split into %d shard(s)", count, shards)
    return count


def _collect(model: ir.Model, analysis: _Analysis) -> dict[int, _Block]:
    blocks: dict[int, _Block] = {}
    bad_roots = {analysis.blocks.find(x) for x in analysis.leaks}
    for node in model.graph:
        role = analysis.role.get(id(node))
        if role not in ("entry", "inner", "exit"):
            continue
        root = analysis.blocks.find(id(node))
        block = blocks.setdefault(root, _Block())
        getattr(block, {"entry": "entries", "inner": "inner", "exit": "exits"}[role]).append(node)
        if root in bad_roots:
            block.valid = False
    for block in blocks.values():
        members = {id(n) for n in block.entries + block.inner + block.exits}
        for node in block.entries + block.inner:
            for out in node.outputs:
                if out.is_graph_output() or any(id(u) not in members for u in out.users()):
                    block.valid = False
        if not block.exits and block.entries:
            # a lone column split (no row split after it) is left alone, and is no block
            block.valid = True
            block.inner = []
    return blocks


def _slice(array: np.ndarray, axis: int, s: int, n: int) -> np.ndarray:
    size = array.shape[axis] // n
    index = [slice(None)] * array.ndim
    index[axis] = slice(s * size, (s + 1) * size)
    return np.ascontiguousarray(array[tuple(index)])


def _rewrite(model: ir.Model, analysis: _Analysis, block: _Block, number: int, n: int) -> None:
    g = model.graph
    order = block.entries + block.inner
    order_ids = {id(x) for x in order}
    nodes_in_order = [x for x in g if id(x) in order_ids]
    anchor = next(x for x in g if id(x) in {id(e) for e in block.exits})
    partials: dict[int, list[ir.Value]] = {id(e): [] for e in block.exits}

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

    for s in range(n):
        mapping: dict[int, ir.Value] = {}
        prefix = f"tp{number}.shard{s}/"
        for node in nodes_in_order:
            inputs: list[ir.Value | None] = []
            out_shape = analysis.shape(node.outputs[0])
            for v in node.inputs:
                inputs.append(mapping.get(id(v), v) if v is not None else None)
            attrs = {k: a for k, a in node.attributes.items()}
            role = analysis.role[id(node)]
            if role == "entry":
                wt, trans = _weight(node)  # type: ignore[misc]
                array = wt.numpy()
                inputs[1] = const_value(f"{node.inputs[1].name}.shard{s}", _slice(array, 0 if trans else 1, s, n))
                if len(inputs) > 2 and inputs[2] is not None:
                    bias = _const(node.inputs[2])
                    axis = bias.ndim - 1  # type: ignore[union-attr]
                    if bias.shape and bias.shape[axis] != 1:  # type: ignore[union-attr]
                        inputs[2] = const_value(f"{node.inputs[2].name}.shard{s}", _slice(bias, axis, s, n))  # type: ignore[arg-type]
            elif node.op_type == "Reshape":
                target = _const(node.inputs[1]).copy()  # type: ignore[union-attr]
                b = analysis.axis[id(node.outputs[0])]
                if target[b] != -1:
                    target[b] = target[b] // n
                inputs[1] = const_value(f"{node.name or 'reshape'}.shape.shard{s}", target)
            elif node.op_type in _BINARY and out_shape is not None:
                rank, axis = len(out_shape), analysis.axis[id(node.outputs[0])]
                for i, v in enumerate(node.inputs):
                    if v is None or id(v) in analysis.axis:
                        continue
                    s_shape = analysis.shape(v)
                    if s_shape is not None and _aligned_dim(s_shape, rank, axis) not in (1,):
                        array = _const(v)
                        local_axis = axis - (rank - len(s_shape))
                        inputs[i] = const_value(f"{v.name or 'c'}.shard{s}", _slice(array, local_axis, s, n))  # type: ignore[arg-type]
            clone = ir.Node(node.domain, node.op_type, inputs, attributes=attrs,
                            num_outputs=len(node.outputs), name=node_name(prefix, node.name or node.op_type))
            for old, new in zip(node.outputs, clone.outputs):
                new.name = model.unique_name(f"{old.name}.shard{s}")
                mapping[id(old)] = new
            g.insert_before(anchor, clone)
        for exit_node in block.exits:
            wt, trans = _weight(exit_node)  # type: ignore[misc]
            array = wt.numpy()
            w_s = const_value(f"{exit_node.inputs[1].name}.shard{s}", _slice(array, 1 if trans else 0, s, n))
            x = mapping[id(exit_node.inputs[0])]
            attrs = {k: a for k, a in exit_node.attributes.items()}
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
    for node in [*block.exits, *reversed(nodes_in_order)]:
        weights = [v for v in node.inputs if v is not None and v.is_initializer()]
        g.remove(node, force=True)
        for w in weights:
            if not w.has_uses() and not w.is_graph_input() and not w.is_graph_output():
                g.remove_initializer(w)


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
