"""``infer-shapes``: give every value the most precise type that can be proven.

Two stages:

1. onnx shape inference (``strict_mode=False``, ``data_prop=True`` where that is safe, see
   ``_onnx_inference``) on a *light* copy of the model: initializers over 8 KiB are listed as
   typed graph inputs instead of carrying their bytes, so inference on a multi-gigabyte model
   serializes only its structure. Small
   initializers keep their data, which data propagation reads (``Reshape`` targets,
   ``ConstantOfShape`` sizes). The copy leaves out intermediate ``value_info`` and declared
   output shapes, so a stale declaration cannot leak into the results.
2. graphopt's own rules (``_rules``) where onnx stops: operators onnx has no schema for
   (onnxruntime contrib ops), everything downstream of them, and ``Reshape``'s ``-1`` over
   symbolic dims.

A value's type only ever becomes more precise: an unknown element type, rank or dim is filled
in, a symbolic dim of an intermediate value may become a size; a contradiction keeps what the
model says. The types of graph inputs and outputs never change, in the main graph and in
subgraphs alike: they are signatures (the model's contract with its users, a body's contract
with its ``If``/``Loop``/``Scan``). Function bodies are not annotated (their types depend on
the call site). Annotating intermediate values changes nothing a model computes, so it is not
counted as a rewrite against ``--bisect-limit``.

The pass provides ``shapes-inferred``, which ``fold-constants`` requires. With the option
``write-value-info`` the inferred types of intermediate values are also written to the
model's ``value_info``.
"""

from __future__ import annotations

import logging
from typing import Optional

import onnx

from graphopt import ir
from graphopt.passes.fold._onnx_inference import infer_shapes
from graphopt.passes.fold._proto import light_model_proto, walk_maps
from graphopt.passes.fold._rules import (INFERRED_TYPE, TYPE_CONFLICT, contradicts, infer_node_types,
                                         refine_type)
from graphopt.passes.fold._symbolic import SymbolicValues
from graphopt.pipeline import Pass, PassContext, PassResult

__all__ = ["InferShapes"]

logger = logging.getLogger(__name__)


#: onnx names the unknown dims it creates ``unk__0``, ``unk__1``...: they say nothing.
_INVENTED_DIM = "unk__"


def _type_from_proto(proto: onnx.TypeProto) -> Optional[ir.ValueType]:
    kind = proto.WhichOneof("value")
    if kind == "tensor_type":
        tt = proto.tensor_type
        if not tt.HasField("shape"):
            return ir.TensorType(tt.elem_type, None)
        dims = [None if isinstance(d, str) and d.startswith(_INVENTED_DIM) else d
                for d in ir.Shape.from_proto(tt.shape).dims]
        return ir.TensorType(tt.elem_type, dims)
    if kind is None:
        return None
    return ir.OtherType(proto)


def _fully_typed(t: ir.ValueType | None) -> bool:
    if isinstance(t, ir.OtherType):
        return True
    return (isinstance(t, ir.TensorType) and t.dtype != onnx.TensorProto.UNDEFINED and t.shape is not None
            and all(d is not None for d in t.shape.dims))


def _forget_previous(model: ir.Model) -> None:
    """Drop notes of an earlier run: the graph may have changed since."""
    for graph in [model.graph, *model.graph.subgraphs()]:
        for node in graph:
            for v in node.outputs:
                v.meta.pop(INFERRED_TYPE, None)
                v.meta.pop(TYPE_CONFLICT, None)


class InferShapes(Pass):
    """Infer element types and shapes (static and symbolic) of every value; provides ``shapes-inferred``.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> InferShapes().run(model, PassContext()).counters  # doctest: +SKIP
        {'typed-values': 41, 'value-info-added': 0}
    """

    name = "infer-shapes"
    opt_level = 2
    requires = frozenset({"topo-sorted"})
    provides = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    options = {"write_value_info": False}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Copy onnx's inferred types onto the IR, then apply graphopt's rules where it stopped."""
        _forget_previous(model)
        state = _Annotator(model)
        for value, inferred in _onnx_inference(model):
            state.refine(value, inferred)
        for graph in [model.graph, *model.graph.subgraphs()]:
            sym = SymbolicValues()
            for node in graph:
                outputs = [o for o in node.outputs if o.name]
                if not outputs or all(_fully_typed(o.meta.get(INFERRED_TYPE)) for o in outputs):
                    continue
                for out, inferred in zip(node.outputs, infer_node_types(node, sym)):
                    if out.name and inferred is not None:
                        state.refine(out, inferred)
        added = _write_value_info(model, ctx) if self.config["write_value_info"] else 0
        counters = {"typed-values": state.typed, "value-info-added": added}
        if state.typed or added:
            logger.info("infer-shapes: %s", ", ".join(f"{k} {v}" for k, v in counters.items() if v))
        return PassResult(bool(state.typed or added), counters)


class _Annotator:
    """Applies type refinements to intermediate values (never to graph inputs or outputs)."""

    def __init__(self, model: ir.Model) -> None:
        self.typed = 0
        self.signature = {v for g in model.all_graphs() for v in g.outputs}

    def refine(self, value: ir.Value, inferred: ir.ValueType) -> None:
        if value.producer is None:
            return  # graph inputs and initializers: the model's contract and its constants
        # What inference proved is noted apart from the declared type: runtimes do not check
        # declared output and value_info shapes, so they may be stale, and a pass that turns
        # a shape into a constant (fold-constants) must only trust a proven one.
        known = value.meta.get(INFERRED_TYPE)
        if known is None and isinstance(inferred, ir.TensorType) and inferred == value.type:
            # The common case on a rerun: inference confirms the type the value has. Nothing to
            # refine or contradict (the general path below reaches the same result).
            value.meta[INFERRED_TYPE] = inferred
            return
        value.meta[INFERRED_TYPE] = refine_type(known, inferred) or known or inferred
        if value in self.signature:
            return  # a graph output keeps its declared type
        if contradicts(value.type, inferred):
            logger.debug("'%s': declared %s, inferred %s; keeping the declaration", value.name,
                         value.type, inferred)
            value.meta[TYPE_CONFLICT] = True
            return
        if isinstance(inferred, ir.OtherType):
            better: Optional[ir.ValueType] = inferred if value.type is None else None
        else:
            better = refine_type(value.type, inferred)
        if better is None:
            return
        logger.debug("'%s': %s -> %s", value.name, value.type, better)
        value.type = better
        self.typed += 1


def _onnx_inference(model: ir.Model) -> list[tuple[ir.Value, ir.ValueType]]:
    """Types onnx shape inference finds for node outputs, on the light copy of ``model``."""
    try:
        # Inside the try: a model nested deeper than protobuf allows cannot become a proto.
        proto, pmap = light_model_proto(model)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own types; graphopt's rules still run
        logger.debug("the model cannot be written for onnx shape inference: %s", exc)
        return []
    result = infer_shapes(proto)
    if result is None:
        return []  # graphopt's rules still run
    found: list[tuple[ir.Value, ir.ValueType]] = []
    for graph_map, graph_proto in walk_maps(pmap, result.graph):
        by_name = {v.name: v for n in graph_map.nodes for v in n.outputs if v.name}
        for info in list(graph_proto.value_info) + list(graph_proto.output):
            value = by_name.get(info.name)
            inferred = _type_from_proto(info.type) if value is not None else None
            if value is not None and inferred is not None:
                found.append((value, inferred))
    return found


def _write_value_info(model: ir.Model, ctx: PassContext) -> int:
    """List typed intermediate values in their graph's ``value_info``; returns how many were added."""
    added = 0
    for graph in [model.graph, *model.graph.subgraphs()]:
        listed = set(graph.value_info) | set(graph.outputs)
        missing = [v for n in graph for v in n.outputs if v.name and v.type is not None and v not in listed]
        if not missing or not ctx.allow_rewrite(f"record {len(missing)} value_info entries of graph '{graph.name}'"):
            continue
        graph.value_info.extend(missing)
        added += len(missing)
    return added
