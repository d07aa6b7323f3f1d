"""Writing a partition plan: one ONNX model per partition, and the manifest that ties them.

Each partition model is cut out of a fresh copy of the source model: the nodes of other
partitions are removed, values it reads from them become graph inputs (typed, with the model's
symbolic dims), values others read from it become graph outputs, and unused initializers go.
Node order, attributes, subgraphs, functions and opsets stay as they were, so a partition
computes exactly what those nodes computed in the whole model.

Small values that depend only on constants and graph inputs, and small shape results of values
the partition already holds (``Shape(x)`` of a local ``x``), are recomputed: the producing nodes
are cloned into every partition that reads them instead of being sent across.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from graphopt import ir
from graphopt.analysis import SHAPE_OPS, GraphCost, PartitionPlan, peak_activation_bytes
from graphopt.errors import EmitError
from graphopt.runtime import (Manifest, PartitionSpec, TensorSpec, TransferSpec, fit_to_runtime)

__all__ = ["EmittedPartition", "emit_partitions", "resolve_partitions"]

logger = logging.getLogger(__name__)

#: Partitions holding more initializer bytes than this store them as external data.
EXTERNAL_DATA_BYTES = 256 * 1024 * 1024
#: How deep a chain of small values is followed when deciding whether to recompute it.
_MAX_RECOMPUTE_DEPTH = 32


@dataclass
class EmittedPartition:
    """A partition after recomputable reads were resolved: what it runs, reads and writes."""

    index: int
    nodes: list[int]
    cloned: list[int] = field(default_factory=list)
    graph_inputs: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _recompute_closure(cost: GraphCost, members: set[int], name: str, memo: dict[str, bool],
                       graph_inputs: set[str], depth: int = 0) -> bool:
    """True when ``name`` can be had in the partition of ``members`` without sending it.

    Adds the producing nodes to ``members`` (clones). The outputs of ``Shape``/``Size`` nodes
    whose input is elsewhere count as obtainable: they are a few bytes and are sent, so that the
    chain computed from them (masks, position ids) is recomputed rather than sent.
    """
    if name in memo:
        return memo[name]
    producer = cost.producer.get(name)
    if producer is None:
        memo[name] = name in graph_inputs
        return memo[name]
    if producer in members:
        memo[name] = True
        return True
    memo[name] = False  # guards against revisiting while deciding
    if depth > _MAX_RECOMPUTE_DEPTH or not (name in cost.recomputable or cost.is_cheap(producer)):
        return False
    reads = cost.node_reads[producer]
    if cost.node_ops[producer] in SHAPE_OPS:
        if all(_recompute_closure(cost, members, r, memo, graph_inputs, depth + 1) for r in reads):
            members.add(producer)
        memo[name] = True  # recomputed here, or sent (a few bytes)
        return True
    if not all(_recompute_closure(cost, members, r, memo, graph_inputs, depth + 1) for r in reads):
        return False
    members.add(producer)
    for w in cost.node_writes[producer]:
        memo[w] = True
    return True


def _prune(cost: GraphCost, members: set[int], planned: set[int], keep: set[str]) -> None:
    """Drop recomputable nodes whose outputs nothing in the partition reads and it need not output."""
    changed = True
    while changed:
        changed = False
        read = {r for i in members for r in cost.node_reads[i]}
        for i in sorted(members, reverse=True):
            writes = cost.node_writes[i]
            removable = all(w in cost.recomputable for w in writes) or i not in planned
            if removable and writes and not any(w in read or w in keep for w in writes):
                members.discard(i)
                changed = True


def resolve_partitions(cost: GraphCost, plan: PartitionPlan) -> list[EmittedPartition]:
    """Decide, per partition, which nodes are cloned, what it receives and what it must output.

    Raises:
        EmitError: a partition reads a value only a later partition produces (a bad plan).
    """
    owner: dict[str, int] = {}
    for p, part in enumerate(plan.partitions):
        for i in part.nodes:
            for w in cost.node_writes[i]:
                owner[w] = p
    graph_inputs = set(cost.graph_inputs)
    graph_outputs = set(cost.graph_outputs)
    members_of: list[set[int]] = []
    for part in plan.partitions:
        members = set(part.nodes)
        while True:
            before = len(members)
            memo: dict[str, bool] = {}  # afresh: what members hold has grown
            produced = {w for i in members for w in cost.node_writes[i]}
            for i in sorted(members):
                for r in cost.node_reads[i]:
                    if r not in produced and r not in graph_inputs and r in cost.producer:
                        _recompute_closure(cost, members, r, memo, graph_inputs)
            if len(members) == before:
                break
        members_of.append(members)
    # What each partition must produce for the others, then drop work nobody needs.
    wanted: dict[int, set[str]] = {p: set() for p in range(len(plan.partitions))}
    for members in members_of:
        produced = {w for i in members for w in cost.node_writes[i]}
        for i in members:
            for r in cost.node_reads[i]:
                if r not in produced and r in owner:
                    wanted[owner[r]].add(r)
    resolved: list[EmittedPartition] = []
    for p, members in enumerate(members_of):
        planned = set(plan.partitions[p].nodes)
        own = [w for i in sorted(planned) for w in cost.node_writes[i]]
        outputs = [w for w in own if w in graph_outputs or w in wanted[p]]
        _prune(cost, members, planned, set(outputs))
        produced = {w for i in members for w in cost.node_writes[i]}
        entry = EmittedPartition(index=p, nodes=sorted(members), cloned=sorted(members - planned),
                                 outputs=outputs)
        for i in entry.nodes:
            for r in cost.node_reads[i]:
                if r in produced or r in entry.graph_inputs or r in entry.received:
                    continue
                if r in graph_inputs:
                    entry.graph_inputs.append(r)
                elif r in owner:
                    if owner[r] >= p:
                        raise EmitError(f"partition {plan.partitions[p].name} reads '{r}', produced by "
                                        f"the later partition {plan.partitions[owner[r]].name}; the "
                                        "plan is not in topological order")
                    entry.received.append(r)
        resolved.append(entry)
    # A value wanted before pruning may no longer be read: outputs are what someone receives.
    received = {r for e in resolved for r in e.received}
    for entry in resolved:
        entry.outputs = [w for w in entry.outputs if w in graph_outputs or w in received]
    kept = [e for e in resolved if e.outputs]
    # Graph outputs no node writes (an initializer named as an output) come from the last partition.
    produced = {w for e in kept for w in e.outputs}
    constant_outputs = [n for n in cost.graph_outputs
                        if n not in produced and n not in graph_inputs and n not in cost.producer]
    if constant_outputs and kept:
        kept[-1].outputs.extend(dict.fromkeys(constant_outputs))
    return kept


def _weightless(tensor: ir.Tensor) -> onnx.TensorProto:
    """Tensors as typed stubs without data: inference of value types needs no weight bytes."""
    if tensor.nbytes <= 4096 and not tensor.is_external():
        return tensor.to_proto()
    return onnx.TensorProto(name=tensor.name, data_type=tensor.dtype, dims=list(tensor.shape))


def _inferred_types(model: ir.Model) -> dict[str, onnx.TypeProto]:
    """Types onnx shape inference gives the main graph's values (sequences and maps included)."""
    proto = ir.to_proto_with(model, _weightless)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types; unknown stays unknown
        logger.debug("partition: shape inference for value types failed (%s)", exc)
    g = proto.graph
    return {v.name: v.type for v in [*g.input, *g.value_info, *g.output]}


def _value_type(cost: GraphCost, model: ir.Model, name: str,
                inferred: dict[str, onnx.TypeProto]) -> ir.TensorType | ir.OtherType:
    """The type a value crossing partitions is declared with; ``inferred`` caches the non-tensor
    types (filled on first need)."""
    elem, shape = cost.value_types.get(name, (0, None))
    if elem:
        return ir.TensorType(elem, None if shape is None else ir.Shape(list(shape)))
    if not inferred:
        inferred.update(_inferred_types(model))
    proto = inferred.get(name)
    if proto is not None and proto.WhichOneof("value") not in (None, "tensor_type"):
        return ir.OtherType(proto)  # a sequence, optional or map crossing partitions
    raise EmitError(f"the element type of '{name}' is unknown, so it cannot become a partition "
                    "input or output; run shape inference on the model first (graphopt optimize)")


def _tensor_spec(cost: GraphCost, name: str) -> TensorSpec:
    elem, shape = cost.value_types.get(name, (0, None))
    dtype = np.dtype(ir.numpy_dtype(elem)).name if elem else "unknown"
    return TensorSpec(name=name, dtype=dtype, shape=None if shape is None else list(shape))


def _model_outputs(cost: GraphCost, assemble: Sequence[Mapping[str, Any]],
                   output_cost: GraphCost) -> list[TensorSpec]:
    """The model's outputs in their original order: an assembled output where its parts are."""
    first_part = {r["parts"][0]: r for r in assemble}
    other_parts = {part for r in assemble for part in r["parts"][1:]}
    missing = [part for r in assemble for part in r["parts"] if part not in cost.graph_outputs]
    if missing:
        raise EmitError(f"assembled output parts {missing} are not outputs of the partitioned model")
    specs: list[TensorSpec] = []
    for name in cost.graph_outputs:
        if name in first_part:
            specs.append(_tensor_spec(output_cost, str(first_part[name]["output"])))
        elif name not in other_parts:
            specs.append(_tensor_spec(cost, name))
    return specs


def _cut_out(model: ir.Model, cost: GraphCost, entry: EmittedPartition) -> ir.Model:
    """Turn a fresh copy of the whole model into the partition ``entry`` describes (in place)."""
    g = model.graph
    nodes = g.nodes
    if len(nodes) != len(cost):
        raise EmitError(f"the model changed while it was partitioned ({len(nodes)} nodes, the plan has "
                        f"{len(cost)}); partition a saved copy")
    keep = set(entry.nodes)
    by_name = {v.name: v for i in entry.nodes for v in nodes[i].outputs}
    inferred: dict[str, onnx.TypeProto] = {}
    g.outputs[:] = [by_name[name] if name in by_name else g.initializers[name] for name in entry.outputs]
    for name in entry.outputs:
        if name not in by_name:
            continue
        v = by_name[name]
        if v.type is None or v.shape is None:
            v.type = _value_type(cost, model, name, inferred)
    received: list[ir.Value] = []
    for name in entry.received:
        old = nodes[cost.producer[name]].outputs[[v.name for v in nodes[cost.producer[name]].outputs].index(name)]
        value_type = _value_type(cost, model, name, inferred)  # before the rename below
        old.name = model.unique_name(name + "__sent")
        new = g.add_input(name, value_type)
        old.replace_all_uses_with(new)
        received.append(new)
    for i in range(len(nodes) - 1, -1, -1):
        if i not in keep:
            g.remove(nodes[i], force=True)
    wanted = set(entry.graph_inputs)
    # (an input naming an initializer is an IR-3 weight: kept while the partition reads it)
    g.inputs[:] = [v for v in g.inputs if v.name in wanted or any(v is r for r in received)
                   or (v.name in g.initializers and v.has_uses())]
    input_ids = {id(v) for v in g.inputs}
    for v in list(g.initializers.values()):
        if not v.has_uses() and id(v) not in input_ids and not any(v is o for o in g.outputs):
            g.remove_initializer(v)
    fit_to_runtime(model)
    return model


def emit_partitions(load_model: Callable[[], ir.Model], cost: GraphCost, plan: PartitionPlan,
                    out_dir: str | os.PathLike, *, source_model: str = "",
                    meta: dict | None = None, external_data_bytes: int = EXTERNAL_DATA_BYTES,
                    progress: Callable[[int, int], None] | None = None,
                    assemble: Sequence[Mapping[str, Any]] = (),
                    output_cost: GraphCost | None = None) -> Manifest:
    """Write every partition of ``plan`` into ``out_dir`` and return the (saved) manifest.

    Args:
        load_model: returns a fresh IR copy of the model the plan was made for (each partition
            is cut out of its own copy; external data stays memory-mapped).
        cost: the model's cost (its node order is the plan's).
        plan: the partitions.
        out_dir: an existing folder; receives ``<name>.onnx`` (+ ``.data``) and ``manifest.json``.
        source_model: recorded in the manifest.
        meta: extra entries for the manifest's ``meta``.
        external_data_bytes: partitions with more weight bytes store them externally.
        progress: called with (partitions written, partitions).
        assemble: model outputs the runtime joins from graph outputs of ``cost``'s model after
            the run (recipes of ``detach_output_concat``): each replaces its parts in the
            manifest's model outputs and is recorded in the manifest's ``assemble``.
        output_cost: the cost of the model before its output Concats were removed, for the
            types of the assembled outputs (default: ``cost``).

    Raises:
        EmitError: a value crossing partitions has no known type, or a file cannot be written.
    """
    resolved = resolve_partitions(cost, plan)
    new_id = {entry.index: position for position, entry in enumerate(resolved)}
    producer_of = {name: new_id[e.index] for e in resolved for name in e.outputs}
    specs: list[PartitionSpec] = []
    sent_to: dict[str, list[int]] = {}
    counters: dict[str, int] = {}
    for position, entry in enumerate(resolved):
        part = plan.partitions[entry.index]
        # Partitions whose work was all recomputed elsewhere are gone: number the rest anew.
        name = f"{part.kind}{counters.get(part.kind, 0)}"
        counters[part.kind] = counters.get(part.kind, 0) + 1
        model = _cut_out(load_model(), cost, entry)
        weights = cost.weights_of(entry.nodes)
        file = f"{name}.onnx"
        ir.save(model, os.path.join(os.fspath(out_dir), file), external_data=weights > external_data_bytes,
                location=f"{file}.data")
        del model
        for r in entry.received + entry.graph_inputs:
            sent_to.setdefault(r, []).append(position)
        device = part.device
        resources = {"num_cpus": 1.0, "num_gpus": 1.0 if device.startswith("cuda") else 0.0}
        specs.append(PartitionSpec(
            id=position, name=name, file=file, kind=part.kind,
            inputs=entry.graph_inputs + entry.received, outputs=list(entry.outputs), device=device,
            resources=resources, weight_bytes=weights,
            peak_activation_bytes=peak_activation_bytes(cost, entry.nodes, keep=entry.outputs),
            flops=float(cost.flops_of(entry.nodes)),
            depends_on=sorted({producer_of[r] for r in entry.received})))
        logger.debug("partition: wrote %s (%d node(s), %d cloned)", file, len(entry.nodes), len(entry.cloned))
        if progress is not None:
            progress(position + 1, len(resolved))
    transfers = [TransferSpec(tensor=name, source=producer_of.get(name, -1), targets=targets,
                              bytes=cost.value_bytes.get(name, 0))
                 for name, targets in sent_to.items()]
    cut = sum(t.bytes * len(t.targets) for t in transfers if t.source >= 0)
    manifest = Manifest(
        partitions=specs, inputs=[_tensor_spec(cost, n) for n in cost.graph_inputs],
        outputs=_model_outputs(cost, assemble, output_cost or cost), transfers=transfers,
        assemble=[{"output": str(r["output"]), "op": str(r["op"]), "axis": int(r["axis"]),
                   "parts": [str(part) for part in r["parts"]]} for r in assemble],
        strategy=plan.strategy, source_model=source_model,
        meta={"balance": plan.balance, "dims": dict(plan.dims), "total_flops": plan.total_flops,
              "total_weight_bytes": plan.total_weight_bytes, "cut_bytes": cut,
              "memory_budget": plan.memory_budget,
              "cloned_nodes": {spec.name: len(e.cloned) for spec, e in zip(specs, resolved)},
              **(meta or {})})
    manifest.save(out_dir)
    logger.info("partition: wrote %d partition(s) to %s, %d byte(s) cross partitions per run",
                len(specs), out_dir, cut)
    return manifest
