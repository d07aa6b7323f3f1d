"""Importance of the removable units (element classes) of a channel group.

Each weight a group slices (a constant of rank ≥ 2 read by Conv, ConvTranspose, Gemm or MatMul)
scores every index along the sliced axis: ``l1`` sums ``|w|`` over the other axes, ``l2`` takes
the Euclidean norm. Scores are divided by their mean within that weight, so a layer with large
weights does not drown the others, then summed over the group per unit. ``bn-gamma`` uses
``|γ|`` of the group's BatchNormalization scales (network slimming) and falls back to ``l1``
when the group has none. A unit whose weights are all zero scores exactly 0.
"""

from __future__ import annotations

import logging

import numpy as np
from graphopt.passes.prune.dependency import WEIGHTED_OPS, ChannelGroup

from graphopt import ir

__all__ = ["CRITERIA", "group_importance"]

logger = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn-gamma")


#: Elements of a weight scored at a time: a large weight (VGG's 400 MB fc6) is read in blocks
#: instead of being copied whole into temporaries.
_BLOCK_ELEMENTS = 1 << 22


def _weight_scores(array: np.ndarray, axis: int, criterion: str) -> np.ndarray:
    others = tuple(a for a in range(array.ndim) if a != axis)
    scores = np.zeros(array.shape[axis], dtype=np.float64)
    step = max(1, _BLOCK_ELEMENTS // max(1, array[0].size))
    for start in range(0, array.shape[0], step):
        block = array[start:start + step]
        part = (np.square(block) if criterion == "l2" else np.abs(block)).sum(axis=others, dtype=np.float64)
        if axis == 0:
            scores[start:start + len(block)] = part
        else:
            scores += part
    return np.sqrt(scores) if criterion == "l2" else scores


def _is_weight(value: ir.Value) -> bool:
    """Read as the weight of a Conv/Gemm/MatMul, directly or through a DequantizeLinear (QDQ)."""
    for node, index in value.uses():
        if node.op_type in WEIGHTED_OPS and index == 1:
            return True
        if node.op_type == "DequantizeLinear" and index == 0 and _is_weight(node.outputs[0]):
            return True
    return False


def _is_bn_scale(value: ir.Value) -> bool:
    return any(node.op_type == "BatchNormalization" and index == 1 for node, index in value.uses())


def group_importance(model: ir.Model, group: ChannelGroup, criterion: str = "l1") -> np.ndarray:
    """One score per unit of ``group`` (higher: more important).

    Example:
        >>> scores = group_importance(model, analysis.groups[0], "l2")  # doctest: +SKIP
        >>> scores.argsort()[:2]  # the two units to remove first  # doctest: +SKIP
        array([3, 0])
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion '{criterion}' (choose {', '.join(CRITERIA)})")
    values = model.graph.initializers
    scores = np.zeros(group.num_classes)
    picked = 0
    wanted = _is_bn_scale if criterion == "bn-gamma" else _is_weight
    for slot in group.slots:
        value = values.get(slot.value)
        if value is None or value.const_value is None or not wanted(value):
            continue
        array = value.const_value.numpy()
        if criterion != "bn-gamma" and array.ndim < 2:
            continue
        per_index = _weight_scores(array, slot.axis, criterion)
        mean = per_index.mean()
        if mean > 0:
            per_index = per_index / mean
        np.add.at(scores, slot.classes, per_index)
        picked += 1
    if picked == 0 and criterion == "bn-gamma":
        logger.debug("group %d has no BatchNormalization scale; using l1", group.id)
        return group_importance(model, group, "l1")
    return scores
