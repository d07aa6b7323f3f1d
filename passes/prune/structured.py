"""``prune-channels``: structured pruning of channels, neurons and attention heads.

For every channel group of :func:`~graphopt.passes.prune.dependency.analyze_channels` that
nothing blocks, the least important units (:mod:`~graphopt.passes.prune.importance`) are
removed: ``ratio`` of them in channel groups, ``heads`` of them in attention-head groups. Every
tensor of the group is sliced along its axis with the same kept indices; the nodes whose
attributes or shape constants depend on the sizes (Conv ``group``, Reshape shapes, Split sizes,
Slice bounds) are rewritten; value shapes are updated. Graph inputs and outputs never change
(groups that reach them are blocked), so the pruned model has the same signature.

Pruning changes what the model computes; with ``ratio=0`` (and ``heads=0``) the pass changes
nothing. Removing units whose weights are all zero leaves the outputs unchanged, which the
tests use to check the slicing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from graphopt.passes.prune.dependency import (
    WEIGHTED_OPS,
    ChannelAnalysis,
    ChannelGroup,
    analyze_channels,
    constant_array,
)
from graphopt.passes.prune.importance import CRITERIA, group_importance

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pipeline import Pass, PassContext, PassResult

__all__ = [
    "LayerChange",
    "PruneChannels",
    "PrunePlan",
    "apply_plan",
    "check_prune_options",
    "plan_pruning",
    "prune_channels",
]

logger = logging.getLogger(__name__)


@dataclass
class LayerChange:
    """How the weight of one Conv/ConvTranspose/Gemm/MatMul changed."""

    layer: str
    op: str
    weight: str
    before: tuple[int, ...]
    after: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"layer": self.layer, "op": self.op, "weight": self.weight,
                "before": list(self.before), "after": list(self.after)}


@dataclass
class PrunePlan:
    """Which units of which groups go.

    Attributes:
        analysis: the channel analysis the plan is for.
        removed: group id -> sorted unit (class) ids to remove.
        skipped: group id -> why a prunable group was left alone (``--exclude``...).
    """

    analysis: ChannelAnalysis
    removed: dict[int, list[int]] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)

    @property
    def units_removed(self) -> int:
        """Total number of units removed."""
        return sum(len(v) for v in self.removed.values())

    def keep_indices(self) -> dict[tuple[str, int], np.ndarray]:
        """``(tensor, axis) -> kept indices`` for every slot that shrinks."""
        keep: dict[tuple[str, int], np.ndarray] = {}
        for group in self.analysis.groups:
            gone = self.removed.get(group.id)
            if not gone:
                continue
            for slot in group.slots:
                mask = ~np.isin(slot.classes, gone)
                if not mask.all():
                    keep[(slot.value, slot.axis)] = np.nonzero(mask)[0]
        return keep


def _round_keep(keep: int, total: int, round_to: int) -> int:
    if round_to <= 1 or total <= round_to:
        return keep
    rounded = round(keep / round_to) * round_to
    return min(total, max(round_to, rounded))


def _excluded(group: ChannelGroup, pattern: re.Pattern[str] | None) -> str | None:
    if pattern is None:
        return None
    for name in [*group.layers, *(s.value for s in group.slots if s.constant)]:
        if pattern.search(name):
            return f"excluded: '{name}' matches --exclude"
    return None


def plan_pruning(model: ir.Model, analysis: ChannelAnalysis, *, ratio: float, heads: float | None = None,
                 criterion: str = "l1", round_to: int = 1, exclude: str | None = None) -> PrunePlan:
    """Choose the units to remove in each prunable group.

    Args:
        model: the model ``analysis`` was made for.
        analysis: from :func:`analyze_channels`.
        ratio: fraction of units removed in each channel group (0 <= ratio < 1).
        heads: fraction of heads removed in attention-head groups (default: ``ratio``).
        criterion: ``l1``, ``l2`` or ``bn-gamma``.
        round_to: keep a multiple of this many units (when the group has more).
        exclude: a regular expression; groups touching a layer or weight it matches stay whole.
    """
    check_prune_options(ratio, heads, criterion, round_to)
    pattern = re.compile(exclude) if exclude else None
    plan = PrunePlan(analysis)
    for group in analysis.prunable():
        reason = _excluded(group, pattern)
        if reason:
            plan.skipped[group.id] = reason
            continue
        if not group.layers:
            plan.skipped[group.id] = "no weight to shrink"
            continue
        fraction = (ratio if heads is None else heads) if group.kind == "heads" else ratio
        total = group.num_classes
        keep = total - int(np.floor(fraction * total + 1e-9))
        if group.kind != "heads":
            keep = _round_keep(keep, total, round_to)
        keep = max(1, keep)
        if keep >= total:
            continue
        scores = group_importance(model, group, criterion)
        order = np.argsort(scores, kind="stable")
        removed = set(order[: total - keep].tolist())
        # Every tensor of the group keeps at least one index (a Concat input, a Split output).
        for slot in group.slots:
            present = set(np.unique(slot.classes).tolist())
            if present <= removed:
                best = max(present, key=lambda c: scores[c])
                removed.discard(best)
        if removed:
            plan.removed[group.id] = sorted(removed)
            logger.debug("group %d (%s): removing %d of %d unit(s)", group.id, group.describe(),
                         len(removed), total)
    return plan


def check_prune_options(ratio: float, heads: float | None, criterion: str, round_to: int) -> None:
    """Raise :class:`GraphoptError` with a one-line fix for an out-of-range pruning option."""
    if not 0 <= ratio < 1:
        raise GraphoptError(f"the pruning ratio must be in [0, 1) (got {ratio}); e.g. 0.5 removes half the channels")
    if heads is not None and not 0 <= heads < 1:
        raise GraphoptError(f"the head ratio must be in [0, 1) (got {heads}); e.g. 0.25 removes a quarter of the heads")
    if criterion not in CRITERIA:
        raise GraphoptError(f"unknown importance criterion '{criterion}' (choose {', '.join(CRITERIA)})")
    if round_to < 1:
        raise GraphoptError(f"round-to must be at least 1 (got {round_to})")


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        for v in node.outputs:
            if v.name:
                values[v.name] = v
    return values


def _weight_shapes(graph: ir.Graph) -> list[tuple[ir.Node, str, tuple[int, ...]]]:
    found = []
    for node in graph:
        if node.op_type in WEIGHTED_OPS and len(node.inputs) > 1 and node.inputs[1] is not None:
            w = node.inputs[1]
            if w.const_value is not None:
                found.append((node, w.name, tuple(w.const_value.shape)))
    return found


def _new_constant(model: ir.Model, hint: str, array: np.ndarray) -> ir.Value:
    name = model.unique_name(f"{hint}_pruned")
    return model.graph.add_initializer(name, ir.ArrayTensor(array))


def apply_plan(model: ir.Model, plan: PrunePlan, ctx: PassContext | None = None) -> list[LayerChange]:
    """Slice every tensor of the planned groups and fix the nodes that depend on the sizes.

    Returns the weights that changed, layer by layer.
    """
    keep = plan.keep_indices()
    if not keep:
        return []
    graph = model.graph
    values = _values_by_name(graph)
    before = _weight_shapes(graph)
    old_sizes: dict[tuple[str, int], int] = {}
    for group in plan.analysis.groups:
        for slot in group.slots:
            old_sizes[(slot.value, slot.axis)] = slot.size
    new_sizes = {key: len(idx) for key, idx in keep.items()}

    def size(name: str, axis: int) -> int:
        return new_sizes.get((name, axis), old_sizes.get((name, axis), -1))

    by_value: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (name, axis), idx in keep.items():
        by_value.setdefault(name, []).append((axis, idx))
    # One rewrite for the whole plan: stopping half-way through a group would break the model.
    if ctx is not None and not ctx.allow_rewrite(f"prune-channels: {len(plan.removed)} group(s)"):
        return []
    for name, cuts in by_value.items():
        value = values[name]
        if value.const_value is not None:
            array = value.const_value.numpy()
            for axis, idx in cuts:
                array = np.take(array, idx, axis=axis)
            value.const_value = ir.ArrayTensor(np.ascontiguousarray(array), name=name,
                                               dtype=value.const_value.dtype)
            value.type = ir.TensorType(value.const_value.dtype, ir.Shape(array.shape))
        elif isinstance(value.type, ir.TensorType) and value.type.shape is not None:
            dims = list(value.type.shape.dims)
            for axis, idx in cuts:
                dims[axis] = len(idx)
            value.type = ir.TensorType(value.type.dtype, ir.Shape(dims))
    for rw in plan.analysis.rewrites:
        node = rw.node
        if rw.kind == "group":
            w = node.inputs[1]
            old, new = old_sizes.get((w.name, 0)), new_sizes.get((w.name, 0))
            if old and new is not None:
                node.set_attr("group", int(node.attr("group", 1)) * new // old)
        elif rw.kind == "reshape":
            y = node.outputs[0]
            if (y.name, rw.axis) not in new_sizes:
                continue
            shape = constant_array(node.inputs[1]).copy()
            if shape[rw.axis] > 0:
                shape[rw.axis] = new_sizes[(y.name, rw.axis)]
                node.replace_input(1, _new_constant(model, node.inputs[1].name, shape))
        elif rw.kind == "shape-piece" and rw.target in new_sizes:
            piece = node.inputs[rw.start]  # a new constant: other readers keep the old one
            array = constant_array(piece).copy()
            if array.reshape(-1)[rw.axis] > 0:
                array.reshape(-1)[rw.axis] = new_sizes[rw.target]
                node.replace_input(rw.start, _new_constant(model, piece.name or "shape", array))
        elif rw.kind == "split":
            _rewrite_split(model, node, rw.axis, size)
        elif rw.kind == "slice":
            _rewrite_slice(model, node, rw.axis, rw.start, rw.rank, keep)
    changes = []
    for node, weight, shape in before:
        now = tuple(node.inputs[1].const_value.shape)
        if now != shape:
            changes.append(LayerChange(node.name or node.outputs[0].name, node.op_type, weight, shape, now))
    logger.info("prune-channels: %d unit(s) removed in %d group(s), %d weight(s) sliced",
                plan.units_removed, len(plan.removed), len(changes))
    return changes


def _rewrite_split(model: ir.Model, node: ir.Node, axis: int, size: Any) -> None:
    sizes = np.array([size(out.name, axis) for out in node.outputs], dtype=np.int64)
    if (node.version or 13) >= 13:
        split = _new_constant(model, node.name or "split", sizes)
        if len(node.inputs) > 1:
            node.replace_input(1, split)
        else:
            node.append_input(split)
        if "num_outputs" in node.attributes:
            attrs = dict(node.attributes)
            attrs.pop("num_outputs")
            node.attributes = attrs
    else:
        node.set_attr("split", tuple(int(s) for s in sizes))


def _rewrite_slice(model: ir.Model, node: ir.Node, axis: int, start: int, rank: int,
                   keep: dict[tuple[str, int], np.ndarray]) -> None:
    x, y = node.inputs[0], node.outputs[0]
    axes_value = node.inputs[3] if len(node.inputs) > 3 else None
    axes = ([int(a) % rank for a in constant_array(axes_value).tolist()] if axes_value is not None
            else list(range(len(constant_array(node.inputs[1])))))
    k = axes.index(axis)
    kept_in = keep.get((x.name, axis))
    new_start = int(np.sum(kept_in < start)) if kept_in is not None else start
    out_keep = keep.get((y.name, axis))
    length = len(out_keep) if out_keep is not None else None
    if kept_in is None and out_keep is None:
        return
    starts = constant_array(node.inputs[1]).copy()
    ends = constant_array(node.inputs[2]).copy()
    if length is None:  # the output is unchanged: only its position in the input moves
        old_start, old_end, _ = slice(int(starts[k]), int(ends[k])).indices(10 ** 12)
        length = old_end - old_start
    starts[k] = new_start
    ends[k] = new_start + length
    node.replace_input(1, _new_constant(model, node.inputs[1].name, starts))
    node.replace_input(2, _new_constant(model, node.inputs[2].name, ends))


def prune_channels(model: ir.Model, *, ratio: float, heads: float | None = None, criterion: str = "l1",
                   round_to: int = 1, exclude: str | None = None,
                   ctx: PassContext | None = None) -> tuple[PrunePlan, list[LayerChange]]:
    """Analyse, plan and apply structured pruning on ``model`` in place.

    Example:
        >>> plan, changes = prune_channels(model, ratio=0.5)  # doctest: +SKIP
        >>> changes[0].before, changes[0].after  # doctest: +SKIP
        ((64, 3, 3, 3), (32, 3, 3, 3))
    """
    check_prune_options(ratio, heads, criterion, round_to)
    analysis = analyze_channels(model)
    plan = plan_pruning(model, analysis, ratio=ratio, heads=heads, criterion=criterion,
                        round_to=round_to, exclude=exclude)
    changes = apply_plan(model, plan, ctx)
    return plan, changes


class PruneChannels(Pass):
    """Remove the least important channels, neurons and attention heads (structured pruning).

    Options: ``ratio`` (fraction of each channel group), ``heads`` (fraction of attention
    heads; negative: same as ``ratio``), ``criterion`` (``l1``, ``l2``, ``bn-gamma``),
    ``round_to`` (keep multiples of N units), ``exclude`` (regex of layers left whole).
    Not part of any ``-O`` preset: it changes what the model computes.
    """

    name = "prune-channels"
    opt_level = 3
    options: ClassVar[dict[str, Any]] = {"ratio": 0.0, "heads": -1.0, "criterion": "l1", "round_to": 1, "exclude": ""}
    description = "structured pruning of channels, neurons and attention heads"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Prune in place; counters: groups, blocked groups, units removed, weights sliced."""
        heads = float(self.config["heads"])
        plan, changes = prune_channels(
            model, ratio=float(self.config["ratio"]), heads=None if heads < 0 else heads,
            criterion=str(self.config["criterion"]), round_to=int(self.config["round_to"]),
            exclude=str(self.config["exclude"]) or None, ctx=ctx)
        groups = plan.analysis.groups
        return PassResult(changed=bool(changes), counters={
            "groups": len(groups), "blocked-groups": sum(bool(g.blocked) for g in groups),
            "units-removed": plan.units_removed, "weights-sliced": len(changes)})
