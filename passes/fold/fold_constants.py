"""``fold-constants``: evaluate constant subgraphs once, at optimization time.

A node is constant when every input is an omitted optional input, a constant (an initializer
that is not an overridable graph input, in this graph or an enclosing one) or the output of
another constant node. ``Constant`` nodes are constant by construction, and so are the
results of shape arithmetic that do not depend on symbolic dims: ``Shape`` of a value whose
shape is static, and ``Gather``/``Slice``/``Concat``/... of ``Shape`` that select static dims
only (see ``_symbolic``), including ``Shape``/``Size`` of ``ConstantOfShape(s)`` read from ``s``
(the tensor is never built). ``CastLike(c, x)`` is constant when ``c`` is and ``x``'s element
type is known (a constant's, a graph input's, or one inference proved): it is evaluated as the
``Cast`` it means, ``saturate`` included. Shapes come from ``infer-shapes``, which this pass requires.

How a graph is folded, round after round until nothing changes:

1. Connected constant subgraphs are found. Each is evaluated *as a whole*: its nodes become a
   small model whose initializers are the constants it reads and whose outputs are the values
   used outside it (or listed as graph outputs). All subgraphs of a round run in one
   onnxruntime session (optimizations off); a failing one is retried alone, then with the onnx
   reference evaluator; if both fail its nodes stay (logged at DEBUG).
2. Sizes are known before anything runs (types, onnx shape inference with data propagation on
   the subgraph, and the semantics of value-sized ops such as ``ConstantOfShape``, see
   ``_sizes``). A node that would produce a tensor over ``max-bytes``, or whose size cannot be
   bounded, is not evaluated, nor is anything that depends on it.
3. Growth rule: folding must not grow the model. For each subgraph, *growth* is the bytes of
   the new initializers minus the bytes that folding frees (initializers read only by the
   removed nodes, and the tensors of removed ``Constant`` nodes). While growth exceeds
   ``max-growth-bytes`` (1 MiB by default), the node producing the largest new initializer
   stays in the graph and is computed at run time, nodes that expand their inputs first
   (``ConstantOfShape``, ``Expand``, ``Tile``: output larger than their inputs); its value is
   still used to evaluate what depends on it. So ``ConstantOfShape`` weights stay compact while
   ``ReduceSum(ConstantOfShape(...))`` folds, and a transposed copy of a weight that is also used
   as it is (a tied embedding) is not stored twice.
4. Results are checked: the element type must be the value's declared type (float8, int4,
   bfloat16 and strings round-trip exactly; onnxruntime's raw float8 bits are reinterpreted,
   never stored as ``uint8``) and the shape must match the value's static dims.
5. Each value used outside the subgraph becomes a new initializer, named like the value, of the
   graph that holds the subgraph (a body initializer inside ``If``/``Loop``/``Scan``). A folded
   graph output is listed as an output under its own name with its declared type, the
   initializer itself being the output: onnx's checker and onnxruntime accept initializers as
   outputs of the main graph and of subgraphs, and no ``Identity`` is left behind. Models
   older than IR version 4 (where every initializer must be a graph input) are raised to IR
   version 4 so new initializers are not overridable inputs.

What never folds is listed in ``_policy``. Function bodies are not folded (a ``FunctionProto``
has no initializers, and constants there may depend on the caller's attributes), and shape
arithmetic is not folded inside ``Loop``/``Scan`` bodies (their values may change shape from
one iteration to the next).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx

from graphopt import ir
from graphopt.passes.fold._evaluate import Evaluated, EvaluationFailed, evaluate
from graphopt.passes.fold._onnx_inference import infer_shapes
from graphopt.passes.fold._policy import captured_values, why_not_foldable
from graphopt.passes.fold._proto import (LIGHT_DATA_BYTES, node_to_proto, subgraph_proto, tensor_proto_of,
                                         value_info)
from graphopt.passes.fold._rules import INFERRED_TYPE, TYPE_CONFLICT
from graphopt.passes.fold._sizes import VALUE_SIZED_OPS, semantic_bytes, type_bytes
from graphopt.passes.fold._symbolic import SymbolicValues
from graphopt.pipeline import Pass, PassContext, PassResult
from graphopt.runtime import max_ir_version

__all__ = ["FoldConstants"]

logger = logging.getLogger(__name__)

T = onnx.TensorProto
COUNTERS = ("folded-nodes", "new-initializers", "skipped-too-large", "skipped-unsupported")

#: Folding rounds per graph (each round folds what the previous one made constant).
MAX_ROUNDS = 8
#: Constants up to this many elements are read as arrays to bound value-sized ops.
_READ_ELEMENTS = 1 << 16
#: Operators whose result depends on their input's shape only, never on its values.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
#: Operators whose result :mod:`._symbolic` can compute from shapes alone.
_SYMBOLIC_OPS = frozenset({"Shape", "Size", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze",
                           "Cast", "Identity", "Add", "Sub", "Mul", "Div"})


@dataclass
class _Known:
    """A constant node whose value is known without evaluation (``Constant``, shape arithmetic)."""

    tensor: ir.Tensor


@dataclass
class _Subgraph:
    """A constant subgraph to fold.

    Attributes:
        nodes: the nodes to evaluate (graph order).
        removed: the nodes folding removes (the rest of ``nodes`` stay: their outputs are
            needed at run time and would grow the model if stored).
        boundary: the values that become initializers (read by nodes that stay, or outputs).
    """

    nodes: list[ir.Node]
    removed: list[ir.Node]
    boundary: list[ir.Value] = field(default_factory=list)

    def describe(self) -> str:
        ops = sorted({n.op_type for n in self.removed})
        shown = ", ".join(ops[:4]) + (", ..." if len(ops) > 4 else "")
        return f"{len(self.removed)} node(s) ({shown}) into {len(self.boundary)} constant(s)"


class FoldConstants(Pass):
    """Evaluate constant subgraphs and store their results as initializers.

    Options: ``max-bytes`` (largest tensor folding may create; default
    ``ctx.limits.max_fold_bytes``) and ``max-growth-bytes`` (how much one folded subgraph may
    grow the model, default 1 MiB).

    Example:
        >>> from graphopt.pipeline import PassManager, PassContext
        >>> report = PassManager("fold-constants,eliminate-dead-code", PassContext()).run(model)  # doctest: +SKIP
        >>> report.totals()["fold-constants"]["counters"]["folded-nodes"]  # doctest: +SKIP
        12
    """

    name = "fold-constants"
    opt_level = 2
    requires = frozenset({"topo-sorted", "shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    options = {"max_bytes": None, "max_growth_bytes": 1 << 20}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Fold the main graph, then every subgraph (outer constants first), then again outside."""
        max_bytes = self.config["max_bytes"]
        folder = _Folder(model, ctx, int(max_bytes if max_bytes is not None else ctx.limits.max_fold_bytes),
                         int(self.config["max_growth_bytes"]))
        folder.fold_tree(model.graph)
        counters = folder.counters()
        changed = counters["folded-nodes"] > 0
        if changed or counters["skipped-too-large"] or counters["skipped-unsupported"]:
            logger.info("fold-constants: %s", ", ".join(f"{k} {v}" for k, v in counters.items() if v))
        return PassResult(changed, counters)


def _constant_node_tensor(node: ir.Node) -> Optional[ir.Tensor]:
    """The value of a ``Constant`` node when it needs no evaluation (not ``sparse_value``)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attributes) != 1:
        return None
    attr = next(iter(node.attributes.values()))
    if attr.ref_attr_name:
        return None
    name, value = attr.name, attr.value
    if name == "value" and isinstance(value, ir.Tensor):
        return value
    arrays = {
        "value_float": lambda: np.array(value, dtype=np.float32),
        "value_floats": lambda: np.array(value, dtype=np.float32).reshape(-1),
        "value_int": lambda: np.array(value, dtype=np.int64),
        "value_ints": lambda: np.array(value, dtype=np.int64).reshape(-1),
        "value_string": lambda: np.array(value, dtype=object),
        "value_strings": lambda: np.array(list(value), dtype=object).reshape(-1),
    }
    make = arrays.get(name)
    return ir.ArrayTensor(make()) if make is not None else None


def _in_loop_body(graph: ir.Graph) -> bool:
    """True inside a ``Loop`` or ``Scan`` body (at any depth), where shapes vary per iteration."""
    g: Optional[ir.Graph] = graph
    while g is not None and g.parent is not None:
        if g.parent.op_type in ("Loop", "Scan"):
            return True
        g = g.parent.graph
    return False


class _Folder:
    """Folding state of one pass run: limits, counters, and the nodes already reported."""

    def __init__(self, model: ir.Model, ctx: PassContext, max_bytes: int, max_growth: int) -> None:
        self.model = model
        self.ctx = ctx
        self.max_bytes = max_bytes
        self.max_growth = max_growth
        self.stopped = False
        self.folded = 0
        self.new_initializers = 0
        self.too_large: set[int] = set()
        self.unsupported: set[int] = set()
        self.ir_version = min(onnx.IR_VERSION, max_ir_version())
        # Values listed as outputs of any graph; kept alive here so identities stay unique.
        self.pinned: set[ir.Value] = {v for g in model.all_graphs() for v in g.outputs}

    def counters(self) -> dict[str, int]:
        return {"folded-nodes": self.folded, "new-initializers": self.new_initializers,
                "skipped-too-large": len(self.too_large), "skipped-unsupported": len(self.unsupported)}

    def _skip_large(self, node: ir.Node, why: str) -> None:
        if id(node) not in self.too_large:
            self.too_large.add(id(node))
            logger.debug("not folding %s: %s", _describe(node), why)

    def _skip_unsupported(self, node: ir.Node, why: str) -> None:
        if id(node) not in self.unsupported:
            self.unsupported.add(id(node))
            logger.debug("not folding %s: %s", _describe(node), why)

    # -- driver ------------------------------------------------------------------------------------
    def fold_tree(self, graph: ir.Graph) -> bool:
        """Fold ``graph``, then its subgraphs; again when they changed (an ``If`` whose taken
        branch became constant folds as a whole). Returns whether anything was folded."""
        changed = self.fold_graph(graph)
        inner = False
        for node in list(graph):
            for sub in node.subgraphs():
                if not self.stopped and node.is_live():
                    inner |= self.fold_tree(sub)
        if inner and not self.stopped:
            changed |= self.fold_graph(graph)
        return changed or inner

    def fold_graph(self, graph: ir.Graph) -> bool:
        """Fold ``graph`` round after round until a round folds nothing."""
        changed = False
        for _ in range(MAX_ROUNDS):
            if self.stopped:
                break
            subgraphs, foldable = self._plan(graph)
            if not subgraphs or not self._evaluate_and_apply(graph, subgraphs, foldable):
                break
            changed = True
        return changed

    # -- finding constant nodes --------------------------------------------------------------------
    def _candidates(self, graph: ir.Graph) -> dict[ir.Node, Optional[_Known]]:
        """Constant nodes in graph order: ``_Known`` values, or ``None`` for nodes to evaluate."""
        foldable: dict[ir.Node, Optional[_Known]] = {}
        outputs = {id(v) for v in graph.outputs}
        sym = None if _in_loop_body(graph) else SymbolicValues(self._trusted_shape)
        for node in graph:
            if not any(o.has_uses() or id(o) in outputs for o in node.outputs):
                continue  # dead: removing it is eliminate-dead-code's job
            reason = why_not_foldable(node, self.model)
            if not reason and _is_cast_like(node) and _cast_like_target(node) is None:
                reason = "the element type of CastLike's target input is not known"
            reads = _reads(node)
            constant_inputs = all(self._is_constant(v, foldable) for v in reads)
            if not reason and sym is not None and node.op_type in _SHAPE_ONLY_OPS:
                # Known from the input's shape alone: the input is never evaluated for it.
                known = self._symbolic_known(node, sym)
                if known is not None:
                    foldable[node] = known
                    continue
            if not reason and constant_inputs:
                tensor = _constant_node_tensor(node)
                if tensor is not None:
                    foldable[node] = _Known(tensor)
                    continue
                big = next((v for v in reads if v is not None
                            and self._input_bytes(v, foldable) > self.max_bytes), None)
                if big is not None:
                    self._skip_large(node, f"input '{big.name}' is larger than {self.max_bytes} bytes")
                    continue
                foldable[node] = None
            elif not reason and sym is not None and node.op_type in _SYMBOLIC_OPS:
                known = self._symbolic_known(node, sym)
                if known is not None:
                    foldable[node] = known
            elif reason and constant_inputs:
                self._skip_unsupported(node, reason)
        return foldable

    @staticmethod
    def _trusted_shape(v: ir.Value) -> Optional[ir.Shape]:
        """A shape safe to fold ``Shape`` from: a graph input's declared shape (runtimes check it),
        a constant's, or one shape inference proved; never a declared output or value_info shape."""
        if v.producer is None:
            return v.shape
        inferred = v.meta.get(INFERRED_TYPE)
        if v.meta.get(TYPE_CONFLICT) or not isinstance(inferred, ir.TensorType):
            return None
        return inferred.shape

    @staticmethod
    def _is_constant(v: ir.Value | None, foldable: dict[ir.Node, Optional[_Known]]) -> bool:
        if v is None:
            return True
        if v.producer is not None:
            return v.producer in foldable
        return v.is_constant() and isinstance(v.const_value, ir.Tensor)

    @staticmethod
    def _input_bytes(v: ir.Value, foldable: dict[ir.Node, Optional[_Known]]) -> int:
        if v.producer is not None:
            known = foldable.get(v.producer)
            return known.tensor.nbytes if known is not None else 0
        return v.const_value.nbytes if isinstance(v.const_value, ir.Tensor) else 0

    @staticmethod
    def _symbolic_known(node: ir.Node, sym: SymbolicValues) -> Optional[_Known]:
        if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            return None
        out = node.outputs[0]
        value = sym.get(out)
        if value is None or not value.is_known():
            return None
        if node.op_type in ("Shape", "Size"):
            dtype = T.INT64
        else:
            source = node.inputs[0] if node.inputs else None
            dtype = node.attr("to") if node.op_type == "Cast" else (source.dtype if source is not None else None)
        if dtype not in (T.INT64, T.INT32) or (out.dtype is not None and out.dtype != dtype):
            return None
        return _Known(ir.ArrayTensor(value.array(dtype)))

    # -- planning ------------------------------------------------------------------------------------
    def _plan(self, graph: ir.Graph) -> tuple[list[_Subgraph], dict[ir.Node, Optional[_Known]]]:
        foldable = self._candidates(graph)
        if not foldable:
            return [], foldable
        sizes = self._sizes(graph, foldable)
        excluded: set[ir.Node] = set()
        for node, known in foldable.items():
            if known is None and any(v is not None and v.producer in excluded for v in _reads(node)):
                excluded.add(node)
                continue
            if known is not None:
                continue
            for v in node.outputs:
                size = sizes.get(id(v))
                if v.name and size is None:
                    self._skip_large(node, f"the size of '{v.name}' is unknown before evaluation")
                    excluded.add(node)
                    break
                if size is not None and size > self.max_bytes:
                    self._skip_large(node, f"'{v.name}' would take {size} bytes (limit {self.max_bytes})")
                    excluded.add(node)
                    break
        kept = [n for n in foldable if n not in excluded]
        subgraphs = []
        for nodes in _connected(kept, foldable):
            sub = self._limit_growth(graph, nodes, foldable, sizes)
            if sub is not None:
                subgraphs.append(sub)
        return subgraphs, foldable

    def _sizes(self, graph: ir.Graph, foldable: dict[ir.Node, Optional[_Known]]) -> dict[int, Optional[int]]:
        """Bytes of every value the constant nodes produce (``None`` where no bound is known)."""
        to_run = [n for n, k in foldable.items() if k is None]
        inferred = self._infer_types(graph, to_run, foldable) if to_run else {}

        def shape_of(v: ir.Value | None) -> Optional[tuple[int, ...]]:
            if v is None:
                return None
            if v.producer is not None and foldable.get(v.producer) is not None:
                return tuple(foldable[v.producer].tensor.shape)  # type: ignore[union-attr]
            if v.producer is None and isinstance(v.const_value, ir.Tensor):
                return tuple(v.const_value.shape)
            for t in (inferred.get(v.name), v.type):
                if isinstance(t, ir.TensorType) and t.shape is not None and t.shape.is_static():
                    return tuple(int(d) for d in t.shape.dims)  # type: ignore[arg-type]
            return None

        def const_of(v: ir.Value | None) -> Optional[np.ndarray]:
            if v is None:
                return None
            tensor: Optional[ir.Tensor] = None
            if v.producer is not None and foldable.get(v.producer) is not None:
                tensor = foldable[v.producer].tensor  # type: ignore[union-attr]
            elif v.producer is None and v.is_constant() and isinstance(v.const_value, ir.Tensor):
                tensor = v.const_value
            if tensor is None or tensor.size > _READ_ELEMENTS or tensor.dtype == T.STRING:
                return None
            return np.asarray(tensor.numpy())

        sizes: dict[int, Optional[int]] = {}
        for node, known in foldable.items():
            if known is not None:
                sizes[id(node.outputs[0])] = known.tensor.nbytes
                continue
            semantic = semantic_bytes(node, const_of, shape_of)
            for i, v in enumerate(node.outputs):
                if not v.name:
                    sizes[id(v)] = 0  # an omitted optional output is never materialized
                    continue
                bounds = [type_bytes(inferred.get(v.name))]
                if node.op_type not in VALUE_SIZED_OPS:
                    bounds.append(type_bytes(v.type))
                if semantic is not None and i < len(semantic):
                    bounds.append(semantic[i])
                known_bounds = [b for b in bounds if b is not None]
                sizes[id(v)] = max(known_bounds) if known_bounds else None
        return sizes

    def _infer_types(self, graph: ir.Graph, nodes: list[ir.Node],
                     foldable: dict[ir.Node, Optional[_Known]]) -> dict[str, ir.TensorType]:
        """onnx shape inference (with data propagation) on the constant nodes alone."""
        outputs = [v for n in nodes for v in n.outputs if v.name]
        proto = self._model_proto(graph, nodes, outputs, foldable, light=True)
        result = infer_shapes(proto)
        if result is None:
            return {}  # sizes then come from types and operator semantics only
        types = _tensor_types(list(result.graph.value_info) + list(result.graph.output))
        # An If's outputs are those of the branch its (constant) condition takes; inference
        # only knows them when both branches agree.
        for node, node_proto in zip(nodes, result.graph.node):
            taken = self._taken_branch(node, foldable)
            if taken is None:
                continue
            branch = node.attr(taken)
            branch_proto = next((a.g for a in node_proto.attribute if a.name == taken), None)
            inner = (_tensor_types(list(branch_proto.value_info) + list(branch_proto.output))
                     if branch_proto is not None else {})
            for out, result_value in zip(node.outputs, branch.outputs):
                if type_bytes(types.get(out.name)) is not None:
                    continue
                if isinstance(result_value.const_value, ir.Tensor):
                    tensor = result_value.const_value
                    types[out.name] = ir.TensorType(tensor.dtype, tensor.shape)
                    continue
                for candidate in (inner.get(result_value.name), result_value.type):
                    if isinstance(candidate, ir.TensorType) and type_bytes(candidate) is not None:
                        types[out.name] = candidate
                        break
        return types

    @staticmethod
    def _taken_branch(node: ir.Node, foldable: dict[ir.Node, Optional[_Known]]) -> Optional[str]:
        """``"then_branch"`` or ``"else_branch"`` for an If whose condition is already known."""
        if node.op_type != "If" or not node.inputs or node.inputs[0] is None:
            return None
        cond = node.inputs[0]
        known = foldable.get(cond.producer) if cond.producer is not None else None
        tensor = known.tensor if known is not None else (cond.const_value if cond.producer is None else None)
        if not isinstance(tensor, ir.Tensor) or tensor.size != 1:
            return None
        return "then_branch" if bool(np.asarray(tensor.numpy()).reshape(-1)[0]) else "else_branch"

    def _limit_growth(self, graph: ir.Graph, nodes: list[ir.Node], foldable: dict[ir.Node, Optional[_Known]],
                      sizes: dict[int, Optional[int]]) -> Optional[_Subgraph]:
        """Apply the growth rule (see the module docstring); ``None`` when nothing is left to fold."""
        kept: set[ir.Node] = set()
        while True:
            removed = [n for n in nodes if n not in kept]
            if not removed:
                return None
            boundary = self._boundary(graph, removed)
            foreign = next((v for v in boundary if v in self.pinned and not v.is_graph_output()), None)
            if foreign is not None:
                for n in nodes:
                    self._skip_unsupported(n, f"'{foreign.name}' is listed as an output of a nested graph")
                return None
            if all(self._is_identity_of_constant_output(n, foldable) for n in removed):
                return None  # folding would give back the same Identity of a constant
            created = sum(sizes.get(id(v)) or 0 for v in boundary)
            growth = created - self._freed(removed, foldable)
            if growth <= self.max_growth:
                return _Subgraph(_ancestors(boundary, nodes, foldable), removed, boundary)
            # Keep computing the largest new initializer at run time, preferring one that an
            # expanding node makes (ConstantOfShape, Expand, Tile...): what reads it still folds.
            expanding = [v for v in boundary if (sizes.get(id(v)) or 0) > self._read_bytes(v.producer, sizes)]
            worst = max(expanding or boundary, key=lambda v: sizes.get(id(v)) or 0)
            assert worst.producer is not None
            kept.add(worst.producer)
            self._skip_large(worst.producer, f"storing '{worst.name}' ({sizes.get(id(worst))} bytes) "
                                             f"would grow the model by {growth} bytes")

    @staticmethod
    def _is_identity_of_constant_output(node: ir.Node, foldable: dict[ir.Node, Optional[_Known]]) -> bool:
        """An Identity that only gives a constant the declared type of a graph output."""
        if node.op_type != "Identity" or len(node.inputs) != 1 or node.inputs[0] is None:
            return False
        source = node.inputs[0]
        known = foldable.get(source.producer) if source.producer is not None else None
        tensor = known.tensor if known is not None else source.const_value
        return isinstance(tensor, ir.Tensor) and _needs_identity(node.outputs[0], _static_type(tensor))

    @staticmethod
    def _boundary(graph: ir.Graph, nodes: list[ir.Node]) -> list[ir.Value]:
        inside = set(nodes)
        outputs = {id(v) for v in graph.outputs}
        return [v for n in nodes for v in n.outputs
                if id(v) in outputs or any(_top(user, graph) not in inside for user, _ in v.uses())]

    @staticmethod
    def _freed(nodes: list[ir.Node], foldable: dict[ir.Node, Optional[_Known]]) -> int:
        """Bytes that folding ``nodes`` frees: their Constant tensors and initializers only they read."""
        inside = set(nodes)
        freed = 0
        seen: set[int] = set()
        for n in nodes:
            known = foldable.get(n)
            if known is not None and n.op_type == "Constant":
                freed += known.tensor.nbytes
            for v in _reads(n):
                if v is None or v.producer is not None or id(v) in seen:
                    continue
                seen.add(id(v))
                if (v.is_constant() and isinstance(v.const_value, ir.Tensor) and not v.is_graph_output()
                        and all(_top(user, n.graph) in inside for user, _ in v.uses())):
                    freed += v.const_value.nbytes
        return freed

    @staticmethod
    def _read_bytes(node: ir.Node | None, sizes: dict[int, Optional[int]]) -> int:
        if node is None:
            return 0
        total = 0
        for v in node.inputs:
            if v is None:
                continue
            if v.producer is None and isinstance(v.const_value, ir.Tensor):
                total += v.const_value.nbytes
            else:
                total += sizes.get(id(v)) or 0
        if node.op_type == "Constant":
            total += sum(sizes.get(id(v)) or 0 for v in node.outputs)
        return total

    # -- evaluation ----------------------------------------------------------------------------------
    def _model_proto(self, graph: ir.Graph, nodes: list[ir.Node], outputs: list[ir.Value],
                     foldable: dict[ir.Node, Optional[_Known]], *, light: bool) -> onnx.ModelProto:
        """A model computing ``outputs`` from ``nodes``; the constants they read are initializers.

        ``light`` lists large constants as typed inputs instead (for shape inference).
        """
        inside = set(nodes)
        model = onnx.ModelProto()
        model.ir_version = self.ir_version
        for domain, version in graph.opset_imports().items():
            model.opset_import.add(domain=domain, version=version)
        gproto = model.graph  # filled in place: large constants are copied once
        gproto.name = "constant_subgraph"
        added: set[str] = set()
        for node in nodes:
            for v in _reads(node):
                if v is None or v.producer in inside or v.name in added:
                    continue
                added.add(v.name)
                known = foldable.get(v.producer) if v.producer is not None else None
                tensor = known.tensor if known is not None else v.const_value
                assert isinstance(tensor, ir.Tensor)
                if light and tensor.nbytes > LIGHT_DATA_BYTES:
                    gproto.input.append(value_info(v.name, ir.TensorType(tensor.dtype, tensor.shape)))
                elif known is not None:
                    proto = tensor.to_proto(with_data=True)
                    copy = onnx.TensorProto()
                    copy.CopyFrom(proto)
                    copy.name = v.name
                    gproto.initializer.append(copy)
                else:
                    gproto.initializer.append(tensor_proto_of(v))
            gproto.node.append(_cast_like_as_cast(node) if _is_cast_like(node)
                               else node_to_proto(node, subgraph_proto))
        for v in outputs:
            gproto.output.append(value_info(v.name, None))
        return model

    def _run(self, graph: ir.Graph, subs: list[_Subgraph], foldable: dict[ir.Node, Optional[_Known]],
             fallback: bool) -> dict[str, Evaluated]:
        nodes = [n for s in subs for n in s.nodes if foldable[n] is None]
        outputs = [v for s in subs for v in s.boundary if foldable[v.producer] is None]  # type: ignore[index]
        if not outputs:
            return {}
        proto = self._model_proto(graph, nodes, outputs, foldable, light=False)
        expected = {v.name: (v.dtype if v.dtype not in (None, T.UNDEFINED) else None) for v in outputs}
        return evaluate(proto, expected, fallback=fallback)

    def _evaluate_and_apply(self, graph: ir.Graph, subs: list[_Subgraph],
                            foldable: dict[ir.Node, Optional[_Known]]) -> bool:
        """Evaluate the planned subgraphs and fold those whose results check out."""
        # Topological order of nodes across subgraphs is the graph order: keep it.
        order = {n: i for i, n in enumerate(graph)}
        for s in subs:
            s.nodes.sort(key=lambda n: order[n])
            s.removed.sort(key=lambda n: order[n])
        results: dict[int, dict[str, Evaluated]] = {}
        try:
            combined = self._run(graph, subs, foldable, fallback=False)
            results = {i: combined for i in range(len(subs))}
        except EvaluationFailed as exc:
            logger.debug("evaluating %d constant subgraph(s) together failed (%s); trying each alone",
                         len(subs), exc)
            for i, s in enumerate(subs):
                try:
                    results[i] = self._run(graph, [s], foldable, fallback=True)
                except EvaluationFailed as err:
                    for n in s.removed:
                        self._skip_unsupported(n, f"evaluation failed: {err}")
        progressed = False
        for i, s in enumerate(subs):
            if i not in results:
                continue
            values = self._checked_values(s, results[i], foldable)
            if values is None:
                continue
            if not self.ctx.allow_rewrite(f"fold {s.describe()}"):
                self.stopped = True
                return progressed
            self._apply(graph, s, values)
            progressed = True
        return progressed

    def _checked_values(self, sub: _Subgraph, results: dict[str, Evaluated],
                        foldable: dict[ir.Node, Optional[_Known]]) -> Optional[list[ir.Tensor]]:
        """The tensor of each boundary value, or ``None`` when one disagrees with its type."""
        tensors: list[ir.Tensor] = []
        for v in sub.boundary:
            known = foldable[v.producer]  # type: ignore[index]
            if known is not None:
                tensor: ir.Tensor = known.tensor
            else:
                result = results.get(v.name)
                if result is None:
                    return None
                tensor = ir.ArrayTensor(result.array, dtype=result.dtype)
            problem = _type_problem(v, tensor)
            if not problem and _needs_identity(v, _static_type(tensor)) and not _imports_default(v):
                problem = (f"output '{v.name}' would need an Identity, and the model does not "
                           "import the default domain")
            if problem:
                for n in sub.removed:
                    self._skip_unsupported(n, problem)
                return None
            tensors.append(tensor)
        return tensors

    def _apply(self, graph: ir.Graph, sub: _Subgraph, tensors: list[ir.Tensor]) -> None:
        for v, tensor in zip(sub.boundary, tensors):
            if _needs_identity(v, _static_type(tensor)):
                # The output's declared type is more general than the constant's: an Identity
                # of the initializer keeps it (and the name).
                init = graph.add_initializer(self.model.unique_name(v.name + "_value"), tensor)
                v.replace_all_uses_with(init, rename_graph_outputs=True)
                self.pinned.update(graph.outputs)
            else:
                # The initializer takes the value's name; a graph output stays listed under it.
                name, is_output = v.name, v.is_graph_output()
                v.name = self.model.unique_name(name + "_replaced")
                init = graph.add_initializer(name, tensor)
                for node, index in v.uses():
                    node.replace_input(index, init)
                if is_output:
                    graph.outputs[:] = [init if o is v else o for o in graph.outputs]
                    self.pinned.add(init)
            self.new_initializers += 1
        for node in reversed(sub.removed):
            graph.remove(node)
        self.folded += len(sub.removed)
        if self.model.ir_version < 4:
            logger.debug("raising the IR version from %d to 4: folded constants are initializers that "
                         "are not graph inputs", self.model.ir_version)
            self.model.ir_version = 4
        logger.debug("folded %s", sub.describe())


def _static_type(tensor: ir.Tensor) -> ir.TensorType:
    return ir.TensorType(tensor.dtype, tuple(tensor.shape))


def _needs_identity(v: ir.Value, static: ir.TensorType) -> bool:
    """True for a graph output whose declared type is more general than its constant's.

    An initializer listed as an output carries one type (its own), so such an output is kept
    as an ``Identity`` of the initializer, which keeps the declared type.
    """
    return v.is_graph_output() and isinstance(v.type, ir.TensorType) and v.type != static


def _type_problem(v: ir.Value, tensor: ir.Tensor) -> str:
    """Why ``tensor`` cannot replace ``v`` ("" when its dtype and shape agree with ``v``'s type)."""
    if not isinstance(v.type, ir.TensorType):
        return ""
    declared = v.type
    if declared.dtype != T.UNDEFINED and declared.dtype != tensor.dtype:
        return (f"'{v.name}' is declared {ir.dtype_name(declared.dtype)} but evaluates to "
                f"{ir.dtype_name(tensor.dtype)}")
    if declared.shape is None:
        return ""
    shape = tuple(tensor.shape)
    dims = declared.shape.dims
    if len(dims) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
        return f"'{v.name}' is declared {declared} but evaluates to shape {list(shape)}"
    return ""


def _tensor_types(infos: list[onnx.ValueInfoProto]) -> dict[str, ir.TensorType]:
    types: dict[str, ir.TensorType] = {}
    for info in infos:
        if info.type.HasField("tensor_type"):
            tt = info.type.tensor_type
            shape = ir.Shape.from_proto(tt.shape) if tt.HasField("shape") else None
            types[info.name] = ir.TensorType(tt.elem_type, shape)
    return types


def _reads(node: ir.Node) -> list[Optional[ir.Value]]:
    """What a node reads: its inputs, and what its subgraphs read from enclosing scopes.

    ``CastLike`` reads only its first input: of the second it needs the element type, which
    is known statically (:func:`_cast_like_target`), so ``CastLike(constant, x)`` is constant.
    """
    if _is_cast_like(node):
        return [node.inputs[0]]
    return list(node.inputs) + (captured_values(node) if node.subgraphs() else [])


def _is_cast_like(node: ir.Node) -> bool:
    return node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2


def _cast_like_target(node: ir.Node) -> Optional[int]:
    """The element type ``CastLike`` converts to: its second input's, where that is trusted.

    A constant's and a graph input's (runtimes check inputs) are; a computed value's only when
    shape inference proved it, never a declared output or value_info type (those may be stale).
    """
    target = node.inputs[1]
    if target is None:
        return None
    if target.producer is None:
        if isinstance(target.const_value, ir.Tensor):
            return target.const_value.dtype
        dtype = target.dtype
    else:
        inferred = target.meta.get(INFERRED_TYPE)
        if target.meta.get(TYPE_CONFLICT) or not isinstance(inferred, ir.TensorType):
            return None
        dtype = inferred.dtype
    return dtype if dtype not in (None, T.UNDEFINED) else None


def _cast_like_as_cast(node: ir.Node) -> onnx.NodeProto:
    """``CastLike(c, x)`` as the ``Cast(c)`` it means: ``to`` is ``x``'s element type.

    The other attributes (``saturate`` for float8 targets, ``round_mode``) have the same names
    and meaning on ``Cast``, which onnx defines ``CastLike`` as, so the runtime computes the
    exact values the model would (saturation of float8 included).
    """
    target = _cast_like_target(node)
    assert target is not None, "planned only with a known target type"
    proto = onnx.NodeProto()
    proto.op_type = "Cast"
    if node.name:
        proto.name = node.name
    proto.input.append(node.inputs[0].name)  # type: ignore[union-attr]
    proto.output.extend(v.name for v in node.outputs)
    proto.attribute.append(onnx.helper.make_attribute("to", target))
    for attr in node.attributes.values():
        proto.attribute.append(attr.to_proto(None))
    return proto


def _top(user: ir.Node, graph: Optional[ir.Graph]) -> ir.Node:
    """The node of ``graph`` that holds ``user`` (``user`` itself when it is in ``graph``)."""
    node: Optional[ir.Node] = user
    while node is not None and node.graph is not graph and node.graph is not None:
        node = node.graph.parent
    return node if node is not None else user


def _imports_default(v: ir.Value) -> bool:
    graph = v.owning_graph()
    imports = graph.opset_imports() if graph is not None else {}
    return "" in imports or "ai.onnx" in imports


def _connected(nodes: list[ir.Node], foldable: dict[ir.Node, Optional[_Known]]) -> list[list[ir.Node]]:
    """Weakly connected groups of ``nodes`` (edges: one evaluates with another's output), in order."""
    parent = {n: n for n in nodes}

    def find(n: ir.Node) -> ir.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in nodes:
        for v in _reads(n) if foldable[n] is None else ():
            if v is not None and v.producer in parent:
                a, b = find(n), find(v.producer)  # type: ignore[arg-type]
                if a is not b:
                    parent[a] = b
    groups: dict[ir.Node, list[ir.Node]] = {}
    for n in nodes:
        groups.setdefault(find(n), []).append(n)
    return list(groups.values())


def _ancestors(values: list[ir.Value], nodes: list[ir.Node],
               foldable: dict[ir.Node, Optional[_Known]]) -> list[ir.Node]:
    """The nodes of ``nodes`` that ``values`` are computed from (their producers included), in order.

    A node whose value is known needs nothing: the walk stops there.
    """
    inside = set(nodes)
    found: set[ir.Node] = set()
    pending = [v.producer for v in values if v.producer in inside]
    while pending:
        n = pending.pop()
        if n is None or n in found:
            continue
        found.add(n)
        if foldable[n] is None:
            pending.extend(v.producer for v in _reads(n) if v is not None and v.producer in inside)
    return [n for n in nodes if n in found]


def _describe(node: ir.Node) -> str:
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    return f"{op} '{node.name}'" if node.name else f"{op} -> {', '.join(v.name for v in node.outputs)}"
