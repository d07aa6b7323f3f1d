"""``smooth-quant``: move activation outliers into the weights before quantization (SmoothQuant).

Algebra: for ``y = x·W`` and any positive per-channel vector ``s`` (one entry per input
channel ``j`` of ``W``), ``y = (x·diag(1/s))·(diag(s)·W)``. With

    s_j = max|x_j|^α / max|W_j,:|^(1−α)

the activation channels that carry outliers shrink and the weight rows grow, so one per-tensor
activation scale fits all channels and the per-channel weight scales absorb the difference.
``1/s`` is folded into the op that produces ``x``, so no node is added:

* ``LayerNormalization`` (last axis): ``γ' = γ/s``, ``β' = β/s``;
* ``MatMul`` with a constant 2-D weight, optionally followed by an ``Add`` of a constant
  ``[N]`` bias: ``W0'[:, j] = W0[:, j]/s_j``, ``b'_j = b_j/s_j``.

Must not fire when ``x`` is a graph output, when any reader of ``x`` is not a MatMul taking it
as the first input with a constant 2-D weight, when a weight or parameter is shared with a node
outside the group (it would change that node too), or when types are not float32. Softmax,
LayerNorm, Gelu and embeddings themselves stay in float: placement never quantizes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
from graphopt.passes.quant._runtime import channel_absmax, light_proto, saved_model

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pipeline import Pass, PassContext, PassResult
from graphopt.runtime import open_calibration_data

__all__ = ["SmoothGroup", "SmoothQuant", "apply_smoothing", "find_smooth_groups", "smooth_quant"]

logger = logging.getLogger(__name__)

_FLOAT = onnx.TensorProto.FLOAT


@dataclass
class SmoothGroup:
    """An activation ``x``, the op that produces it (where ``1/s`` folds) and the MatMuls reading it."""

    activation: ir.Value
    producer: ir.Node
    bias_add: ir.Node | None
    readers: list[ir.Node]


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None or not v.is_constant() or v.const_value is None:
        return None
    return v.const_value.numpy()


def _exclusive(v: ir.Value, owners: set[ir.Node]) -> bool:
    return all(user in owners for user, _ in v.uses()) and not v.is_graph_output()


def find_smooth_groups(model: ir.Model) -> list[SmoothGroup]:
    """Activations of the main graph that SmoothQuant can rescale, with their producer and readers."""
    groups = []
    for node in model.graph:
        for out in node.outputs:
            group = _group(out)
            if group is not None:
                groups.append(group)
    return groups


def _group(x: ir.Value) -> SmoothGroup | None:
    if x.dtype != _FLOAT or x.is_graph_output() or not x.has_uses():
        return None
    readers = []
    for user, index in x.uses():
        w = _const(user.inputs[1]) if user.op_type == "MatMul" and len(user.inputs) > 1 else None
        if index != 0 or w is None or w.ndim != 2 or user.domain not in ("", "ai.onnx"):
            return None
        if not _exclusive(user.inputs[1], {user}):
            return None
        readers.append(user)
    channels = _const(readers[0].inputs[1]).shape[0]
    producer = x.producer
    if producer is None:
        return None
    bias_add = None
    if producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
        a, b = producer.inputs
        bias = _const(b)
        inner = a.producer if a is not None else None
        if bias is None or bias.shape != (channels,) or inner is None or inner.op_type != "MatMul":
            return None
        if not _exclusive(b, {producer}) or not _exclusive(a, {producer}):
            return None
        bias_add, producer = producer, inner
    if producer.op_type == "LayerNormalization":
        if int(producer.attr("axis", -1)) not in (-1, len(x.shape or ()) - 1) or len(producer.outputs) > 1 and \
                any(o is not None and o.has_uses() for o in producer.outputs[1:]):
            return None
        params = [v for v in producer.inputs[1:3] if v is not None]
        if not params or any(_const(v) is None or _const(v).shape != (channels,) or
                             not _exclusive(v, {producer}) for v in params):
            return None
    elif producer.op_type == "MatMul":
        w0 = _const(producer.inputs[1])
        if w0 is None or w0.ndim != 2 or w0.shape[1] != channels or not _exclusive(producer.inputs[1], {producer}):
            return None
    else:
        return None
    return SmoothGroup(x, producer, bias_add, readers)


def smoothing_scales(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """``s_j = max|x_j|^α / max|W_j,:|^(1−α)``, 1 where a channel is all zeros; clipped to [1e-4, 1e4]."""
    w_absmax = np.max(np.stack([np.abs(w).max(axis=1) for w in weights]), axis=0)
    a = act_absmax.astype(np.float64)
    w = w_absmax.astype(np.float64)
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = np.power(a[ok], alpha) / np.power(w[ok], 1.0 - alpha)
    return np.clip(s, 1e-4, 1e4)


def _replace_const(model: ir.Model, node: ir.Node, index: int, array: np.ndarray, hint: str) -> None:
    old = node.inputs[index]
    new = model.graph.add_initializer(model.unique_name(hint), ir.ArrayTensor(array.astype(np.float32)))
    node.replace_input(index, new)
    if old is not None and not old.has_uses() and old.is_initializer() and not old.is_graph_input():
        model.graph.remove_initializer(old)


def apply_smoothing(model: ir.Model, group: SmoothGroup, scales: np.ndarray) -> None:
    """Fold ``1/scales`` into the group's producer and ``scales`` into its readers' weights."""
    inv = 1.0 / scales
    p = group.producer
    if p.op_type == "LayerNormalization":
        for i in (1, 2):
            if len(p.inputs) > i and p.inputs[i] is not None:
                _replace_const(model, p, i, _const(p.inputs[i]) * inv, f"{p.inputs[i].name}_smooth")
    else:
        _replace_const(model, p, 1, _const(p.inputs[1]) * inv[None, :], f"{p.inputs[1].name}_smooth")
        if group.bias_add is not None:
            b = group.bias_add.inputs[1]
            _replace_const(model, group.bias_add, 1, _const(b) * inv, f"{b.name}_smooth")
    for reader in group.readers:
        w = reader.inputs[1]
        _replace_const(model, reader, 1, _const(w) * scales[:, None], f"{w.name}_smooth")


def smooth_quant(model: ir.Model, feeds: Iterable[Mapping[str, np.ndarray]], alpha: float = 0.5,
                 ctx: PassContext | None = None) -> list[str]:
    """Apply SmoothQuant to every eligible group of ``model``; returns the smoothed activations.

    ``feeds`` (calibration samples) give the per-channel activation maxima.

    Example:
        >>> smooth_quant(model, calibration_feeds, alpha=0.5)  # doctest: +SKIP
        ['ln1_out', 'ln2_out']
    """
    if not 0.0 <= alpha <= 1.0:
        raise GraphoptError(f"SmoothQuant alpha={alpha}: use a value in [0, 1] (0.5 is typical)")
    groups = find_smooth_groups(model)
    if not groups:
        logger.info("smooth-quant: no LayerNorm/MatMul -> MatMul group to smooth")
        return []
    with saved_model(model) as path:
        maxima = channel_absmax(path, [g.activation.name for g in groups], feeds)
    done = []
    for group in groups:
        if ctx is not None and not ctx.allow_rewrite(f"smooth {group.activation.name}"):
            break
        weights = [_const(r.inputs[1]) for r in group.readers]
        scales = smoothing_scales(maxima[group.activation.name], weights, alpha)
        apply_smoothing(model, group, scales)
        done.append(group.activation.name)
        logger.debug("smooth-quant: %s (%s) scaled, max factor %.3g", group.activation.name,
                     group.producer.op_type, float(scales.max()))
    logger.info("smooth-quant: %d activation(s) smoothed (alpha=%g)", len(done), alpha)
    return done


class SmoothQuant(Pass):
    """Migrate activation outliers into MatMul weights (SmoothQuant), folded into the LayerNorm/MatMul before.

    Outputs are unchanged in float (up to rounding); run it before ``calibrate,insert-qdq``.

    Example:
        >>> PassManager('smooth-quant<alpha=0.5,data="calib/">,calibrate<data="calib/">,insert-qdq', ctx)  # doctest: +SKIP
    """

    name = "smooth-quant"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    options: ClassVar[dict[str, Any]] = {"alpha": 0.5, "data": "synthetic", "samples": 0}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Collect per-channel maxima over the data, then rescale every eligible group."""
        with saved_model(model) as path:
            source = open_calibration_data(str(self.config["data"]), model=light_proto(path),
                                           samples=int(self.config["samples"]) or None, seed=ctx.seed)
        done = smooth_quant(model, source, float(self.config["alpha"]), ctx)
        return PassResult(bool(done), {"smoothed": len(done)})
