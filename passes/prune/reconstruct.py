"""Accuracy recovery without training: refit the layers after pruned groups, re-estimate BN.

**Reconstruction.** A layer whose *input* channels were pruned (the layer after each group) sees
fewer features than before. On calibration data, with ``X`` its input in the pruned model (only
the kept channels) and ``Y`` its output in the *original* model (only its kept output channels),
the weights are refit by ridge-regularized least squares with an intercept::

    [W'; b'] = argmin ‖[X 1]·[W; b] − Y‖² + λ‖W‖²,   λ = ridge · mean(diag(XᵀX))

``XᵀX`` and ``XᵀY`` are accumulated batch by batch, so memory depends on the layer width, not on
the number of samples. Layers are refit in graph order, each on the activations of the model as
already refit, so later layers correct what earlier ones could not.

Layers refit: MatMul with a constant 2-D weight (its bias is the constant ``[N]`` input of the
Add that alone reads its output, if any), Gemm (``alpha = beta = 1``), and 1×1 Conv with
``group = 1`` and no padding. Other layers (k×k convolutions) are left as pruned.

**BatchNormalization re-estimation.** Each BatchNormalization's mean and variance are replaced
by the statistics of its input over the calibration data (per channel, over every other axis),
node by node in graph order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.runtime import make_session

__all__ = ["RefitResult", "recalibrate_batch_norm", "reconstruct_layers"]

logger = logging.getLogger(__name__)

Feeds = Iterable[Mapping[str, np.ndarray]]


@dataclass
class RefitResult:
    """One refit layer: its name and the relative error before and after (on calibration data)."""

    layer: str
    error_before: float
    error_after: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"layer": self.layer, "error_before": self.error_before, "error_after": self.error_after}


def _with_outputs(model: ir.Model | onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return proto


def _session(model: ir.Model | onnx.ModelProto, names: list[str]) -> Any:
    try:
        return make_session(_with_outputs(model, names))
    except Exception as exc:
        raise GraphoptError(f"onnxruntime cannot run the model for reconstruction: {exc}") from exc


def _feed(session: Any, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in wanted}


@dataclass
class _Layer:
    node: ir.Node
    kind: str  # "matmul", "gemm", "conv1x1"
    x: str
    y: str
    out_keep: np.ndarray | None
    bias: ir.Value | None  # the constant bias the intercept goes into (None: no intercept)


def _matmul_bias(node: ir.Node) -> ir.Value | None:
    y = node.outputs[0]
    uses = y.uses()
    if len(uses) != 1 or uses[0][0].op_type != "Add":
        return None
    add = uses[0][0]
    other = add.inputs[1 - uses[0][1]]
    if other is None or not other.is_constant() or other.num_uses != 1 or len(other.const_value.shape) != 1:
        return None
    return other


def _refittable(node: ir.Node, keep: Mapping[tuple[str, int], np.ndarray]) -> _Layer | None:
    if len(node.inputs) < 2 or node.inputs[1] is None or not node.inputs[1].is_constant():
        return None
    w = node.inputs[1]
    if w.num_uses != 1:
        return None
    y = node.outputs[0]
    if node.op_type == "MatMul" and len(w.const_value.shape) == 2 and (w.name, 0) in keep:
        # The output's only shrinking axis is its last (its columns, tied to the weight's).
        out_keep = next((idx for (name, _), idx in keep.items() if name == y.name), None)
        return _Layer(node, "matmul", node.inputs[0].name, y.name, out_keep, _matmul_bias(node))
    if node.op_type == "Gemm" and (w.name, 1 if node.attr("transB", 0) else 0) in keep:
        if node.attr("transA", 0) or node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0:
            return None
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and (not c.is_constant() or c.num_uses != 1 or len(c.const_value.shape) != 1):
            return None
        return _Layer(node, "gemm", node.inputs[0].name, y.name, keep.get((y.name, 1)), c)
    if node.op_type == "Conv" and (w.name, 1) in keep:
        shape = w.const_value.shape
        if (len(shape) != 4 or shape[2:] != (1, 1) or int(node.attr("group", 1)) != 1
                or any(node.attr("pads", None) or [0]) or node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
            logger.debug("reconstruction skips %s '%s' (only 1x1 convolutions are refit)", node.op_type, node.name)
            return None
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if b is not None and (not b.is_constant() or b.num_uses != 1):
            return None
        return _Layer(node, "conv1x1", node.inputs[0].name, y.name, keep.get((y.name, 1)), b)
    return None


def _rows(layer: _Layer, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if layer.kind == "conv1x1":
        strides = layer.node.attr("strides", None) or (1, 1)
        x = x[:, :, ::strides[0], ::strides[1]]
        x = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
        y = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
        return x, y
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


def _current_weight(layer: _Layer) -> tuple[np.ndarray, np.ndarray]:
    """The layer as ``X @ W + b`` (``W`` is ``[K, N]``)."""
    node = layer.node
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    if layer.kind == "conv1x1":
        w = w[:, :, 0, 0].T
    elif layer.kind == "gemm" and node.attr("transB", 0):
        w = w.T
    if layer.kind == "matmul":
        b = np.zeros(w.shape[1])
    else:
        b = (layer.bias.const_value.numpy().astype(np.float64) if layer.bias is not None
             else np.zeros(w.shape[1]))
    return w, b


def _store(model: ir.Model, layer: _Layer, w: np.ndarray, b_delta: np.ndarray, b_full: np.ndarray) -> None:
    node = layer.node
    old = node.inputs[1]
    dtype = ir.numpy_dtype(old.const_value.dtype)
    if layer.kind == "conv1x1":
        array = w.T[:, :, None, None]
    elif layer.kind == "gemm" and node.attr("transB", 0):
        array = w.T
    else:
        array = w
    old.const_value = ir.ArrayTensor(np.ascontiguousarray(array.astype(dtype)), name=old.name)
    if layer.kind == "matmul":
        if layer.bias is not None:
            bias = layer.bias.const_value.numpy().astype(np.float64) + b_delta
            layer.bias.const_value = ir.ArrayTensor(bias.astype(dtype), name=layer.bias.name)
        return
    if layer.bias is not None:
        layer.bias.const_value = ir.ArrayTensor(b_full.astype(dtype), name=layer.bias.name)
    else:
        name = model.unique_name(f"{old.name}_bias")
        value = model.graph.add_initializer(name, ir.ArrayTensor(b_full.astype(dtype)))
        while len(node.inputs) < 2:
            node.append_input(None)
        node.append_input(value)
        layer.bias = value


def _relative_error(theta: np.ndarray, xtx: np.ndarray, xty: np.ndarray, yty: float) -> float:
    """``‖Xθ − Y‖ / ‖Y‖`` from the accumulated ``XᵀX``, ``XᵀY`` and ``YᵀY``."""
    residual = yty - 2 * float((theta * xty).sum()) + float((theta * (xtx @ theta)).sum())
    return float(np.sqrt(max(residual, 0.0) / max(yty, 1e-30)))


def reconstruct_layers(original: onnx.ModelProto, pruned: ir.Model, keep: Mapping[tuple[str, int], np.ndarray],
                       feeds: Feeds, *, ridge: float = 1e-3) -> list[RefitResult]:
    """Refit, in place, the layers of ``pruned`` whose input channels were pruned.

    Args:
        original: the model before pruning (its tensor names are those of ``pruned``).
        pruned: the model after slicing (before any renaming cleanup).
        keep: ``(tensor, axis) -> kept indices`` of the pruning plan.
        feeds: calibration feeds (re-iterable: read once per refit layer).
        ridge: regularization relative to the mean diagonal of ``XᵀX``.

    Returns:
        One :class:`RefitResult` per refit layer.
    """
    layers = [layer for node in pruned.graph if (layer := _refittable(node, keep)) is not None]
    if not layers:
        logger.info("reconstruction: no layer after a pruned group can be refit")
        return []
    reference = _session(original, [layer.y for layer in layers])
    results = []
    for layer in layers:
        current = _session(pruned, [layer.x])
        w, b = _current_weight(layer)
        k, n = w.shape
        xtx = np.zeros((k + 1, k + 1))
        xty = np.zeros((k + 1, n))
        yty = 0.0
        count = 0
        for feed in feeds:
            (x,) = current.run([layer.x], _feed(current, feed))
            (y,) = reference.run([layer.y], _feed(reference, feed))
            if layer.out_keep is not None:
                y = np.take(y, layer.out_keep, axis=1 if layer.kind == "conv1x1" else -1)
            xr, yr = _rows(layer, x.astype(np.float64), y.astype(np.float64))
            xa = np.concatenate([xr, np.ones((xr.shape[0], 1))], axis=1)
            xtx += xa.T @ xa
            xty += xa.T @ yr
            yty += float((yr ** 2).sum())
            count += xr.shape[0]
        if count == 0:
            raise GraphoptError("the calibration data is empty; give at least one sample")
        fit_intercept = layer.kind != "matmul" or layer.bias is not None
        size = k + 1 if fit_intercept else k
        a = xtx[:size, :size].copy()
        lam = ridge * float(np.mean(np.diag(a[:k, :k]))) if k else 0.0
        a[np.arange(k), np.arange(k)] += lam
        solution = np.linalg.solve(a, xty[:size])
        w_new = solution[:k]
        b_new = solution[k] if fit_intercept else np.zeros(n)

        before = _relative_error(np.vstack([w, b[None, :]])[:size], xtx[:size, :size], xty[:size], yty)
        after = _relative_error(np.vstack([w_new, b_new[None, :]])[:size], xtx[:size, :size], xty[:size], yty)
        if after >= before:
            logger.debug("reconstruction keeps '%s' (refit would not reduce the error)", layer.y)
            results.append(RefitResult(layer.node.name or layer.y, before, before))
            continue
        b_delta = b_new - b if layer.kind == "matmul" else b_new
        _store(pruned, layer, w_new, b_delta, b_new)
        results.append(RefitResult(layer.node.name or layer.y, before, after))
        logger.debug("reconstruction refit '%s': relative error %.4f -> %.4f", layer.y, before, after)
    logger.info("reconstruction: %d layer(s) refit", len(results))
    return results


def recalibrate_batch_norm(model: ir.Model, feeds: Feeds) -> int:
    """Replace each BatchNormalization's mean and variance by its input statistics; in place.

    Returns the number of BatchNormalization nodes updated.
    """
    updated = 0
    for node in list(model.graph):
        if node.op_type != "BatchNormalization" or len(node.inputs) < 5:
            continue
        mean_v, var_v = node.inputs[3], node.inputs[4]
        if not (mean_v.is_constant() and var_v.is_constant()) or mean_v.num_uses != 1 or var_v.num_uses != 1:
            continue
        x = node.inputs[0].name
        session = _session(model, [x])
        total, total_sq, count = 0.0, 0.0, 0
        for feed in feeds:
            (a,) = session.run([x], _feed(session, feed))
            a = np.moveaxis(a.astype(np.float64), 1, 0).reshape(a.shape[1], -1)
            total = total + a.sum(axis=1)
            total_sq = total_sq + (a ** 2).sum(axis=1)
            count += a.shape[1]
        if count == 0:
            raise GraphoptError("the calibration data is empty; give at least one sample")
        mean = total / count
        var = np.maximum(total_sq / count - mean ** 2, 0.0)
        dtype = ir.numpy_dtype(mean_v.const_value.dtype)
        mean_v.const_value = ir.ArrayTensor(mean.astype(dtype), name=mean_v.name)
        var_v.const_value = ir.ArrayTensor(var.astype(dtype), name=var_v.name)
        updated += 1
    logger.info("batch-norm re-estimation: %d node(s) updated", updated)
    return updated
