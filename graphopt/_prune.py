"""``graphopt.prune``: structured pruning with a report, optional reconstruction and benchmark.

The flow: load and check the model; find the channel groups; remove the least important units
(``ratio`` of each group, or the ratio found by bisection that brings the MACs under
``target_macs`` × the original); optionally re-estimate BatchNormalization statistics and refit
the layers after each pruned group on calibration data; optionally zero small weights into
sparse initializers; clean up, infer shapes and check the result; measure parameters, MACs and
(with ``bench``) latency before and after.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.ir._io import ModelSource

__all__ = ["PruneReport", "PruneResult", "count_parameters", "model_macs", "prune"]

logger = logging.getLogger(__name__)

_MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
#: Bisection steps of ``target_macs`` (the ratio is found to within 1/2**steps).
_TARGET_STEPS = 10
_MAX_RATIO = 0.95
#: Initializers up to this size keep their data when MACs are counted (Reshape shapes...).
_SKELETON_KEEP_BYTES = 1 << 16


@dataclass
class PruneReport:
    """What pruning did (see :meth:`to_dict` for the JSON form, schema ``graphopt.prune/1``)."""

    ratio: float
    heads: float | None
    criterion: str
    groups: list[dict[str, Any]]
    removed: dict[int, int]
    skipped: dict[int, str]
    layers: list[dict[str, Any]]
    params_before: int
    params_after: int
    nonzero_params_after: int
    macs_before: int
    macs_after: int
    refits: list[dict[str, Any]] = field(default_factory=list)
    batch_norms_recalibrated: int = 0
    unstructured: dict[str, int] | None = None
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mac_reduction(self) -> float:
        """``macs_before / macs_after`` (how many times fewer)."""
        return self.macs_before / self.macs_after if self.macs_after else float("inf")

    @property
    def speedup(self) -> float | None:
        """Measured latency before / after, with ``bench``."""
        if self.latency_ms_before is None or not self.latency_ms_after:
            return None
        return self.latency_ms_before / self.latency_ms_after

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        groups = []
        for g in self.groups:
            entry = dict(g)
            entry["removed"] = self.removed.get(g["id"], 0)
            if g["id"] in self.skipped:
                entry["skipped"] = self.skipped[g["id"]]
            groups.append(entry)
        return {
            "schema": "graphopt.prune/1", "ratio": self.ratio, "heads": self.heads,
            "criterion": self.criterion,
            "summary": {"groups": len(self.groups), "prunable": sum(not g["blocked"] for g in self.groups),
                        "blocked": sum(bool(g["blocked"]) for g in self.groups),
                        "pruned": len([k for k, v in self.removed.items() if v]),
                        "units_removed": sum(self.removed.values())},
            "groups": groups, "layers": self.layers,
            "params": {"before": self.params_before, "after": self.params_after,
                       "nonzero_after": self.nonzero_params_after},
            "macs": {"before": self.macs_before, "after": self.macs_after,
                     "reduction": self.mac_reduction},
            "latency_ms": {"before": self.latency_ms_before, "after": self.latency_ms_after,
                           "speedup": self.speedup},
            "reconstruction": self.refits, "batch_norms_recalibrated": self.batch_norms_recalibrated,
            "unstructured": self.unstructured, "notes": self.notes,
        }


@dataclass
class PruneResult:
    """The pruned model (``onnx.ModelProto``) and its :class:`PruneReport`."""

    model: onnx.ModelProto
    report: PruneReport


def _weightless_tensor(tensor: ir.Tensor) -> onnx.TensorProto:
    """Small tensors with data (shape constants); others as typed stubs the FLOP counter lists as
    inputs, so counting MACs never copies weight bytes."""
    if not tensor.is_external() and tensor.nbytes <= _SKELETON_KEEP_BYTES:
        return tensor.to_proto()
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.dtype, dims=list(tensor.shape))
    stub.data_location = onnx.TensorProto.EXTERNAL
    return stub


def model_macs(model: onnx.ModelProto | ir.Model, dims: Mapping[str, int] | None = None) -> int:
    """Multiply-accumulates of one inference in Conv, ConvTranspose, MatMul and Gemm nodes.

    Computed from :func:`graphopt.analysis.estimate_flops` (2 FLOPs per MAC; symbolic input dims
    bound by ``dims``, others 1). An IR model is counted from its graph and weight shapes only.
    """
    from graphopt.analysis import estimate_flops

    if isinstance(model, ir.Model):
        model = ir.to_proto_with(model, _weightless_tensor)
    report = estimate_flops(model, dims=dims)
    return sum((n.flops or 0) for n in report.nodes if n.op in _MAC_OPS) // 2


_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16})


def count_parameters(model: onnx.ModelProto | ir.Model, *, nonzero: bool = True) -> tuple[int, int]:
    """``(elements, non-zero elements)`` of the float initializers (dense and sparse) of the main
    graph; with ``nonzero=False`` the second figure is not counted (0) and no weight is read."""
    working = model if isinstance(model, ir.Model) else ir.load(model)
    total = count = 0
    tensors = [v.const_value for v in working.graph.initializers.values() if v.const_value is not None]
    tensors += [v.const_value for v in working.graph.sparse_initializers.values()
                if v.const_value is not None]
    for tensor in tensors:
        if tensor.dtype not in _FLOAT_TYPES:
            continue
        total += int(np.prod(tensor.shape, dtype=np.int64))
        if nonzero:
            count += int(np.count_nonzero(tensor.numpy()))
    return total, count


def _structured(model: ir.Model, ratio: float, heads: float | None, criterion: str, round_to: int,
                exclude: str | None) -> tuple[Any, list[Any]]:
    from graphopt.passes.prune.structured import prune_channels

    return prune_channels(model, ratio=ratio, heads=heads, criterion=criterion, round_to=round_to,
                          exclude=exclude)


def _ratio_for_target(original: onnx.ModelProto, target: float, heads: float | None, criterion: str,
                      round_to: int, exclude: str | None, dims: Mapping[str, int] | None,
                      macs_before: int) -> float:
    """The smallest ratio (to within 2**-steps) whose pruned model has at most ``target`` × the MACs."""
    if not 0 < target <= 1:
        raise GraphoptError(f"--target-macs must be a fraction of the original MACs in (0, 1] "
                            f"(got {target}); e.g. 0.5 halves them")
    goal = target * macs_before

    def macs_at(r: float) -> int:
        trial = ir.load(original)
        _structured(trial, r, heads if heads is not None else r, criterion, round_to, exclude)
        return model_macs(trial, dims)

    if macs_before <= goal:
        return 0.0
    if macs_at(_MAX_RATIO) > goal:
        raise GraphoptError(f"--target-macs {target}: even removing {_MAX_RATIO:.0%} of every prunable "
                            "group leaves more MACs (blocked groups hold the rest; see the report)")
    low, high = 0.0, _MAX_RATIO
    for _ in range(_TARGET_STEPS):
        mid = (low + high) / 2
        if macs_at(mid) <= goal:
            high = mid
        else:
            low = mid
    logger.info("target MACs %.3g x: ratio %.4f", target, high)
    return high


def _open_calibration(spec: Any, model: onnx.ModelProto, samples: int | None) -> Any:
    from graphopt.runtime import open_calibration_data

    return open_calibration_data(spec, model=model, samples=samples)


def _bench(before: onnx.ModelProto, after: onnx.ModelProto, runs: int,
           dims: Mapping[str, int] | None) -> tuple[float, float]:
    from graphopt.runtime import bench_models

    with tempfile.TemporaryDirectory(prefix="graphopt-prune-") as folder:
        paths = [os.path.join(folder, "original.onnx"), os.path.join(folder, "pruned.onnx")]
        for proto, path in zip((before, after), paths):
            onnx.save(proto, path)
        a, b = bench_models(paths, threads=1, runs=runs, warmup=max(3, runs // 10), dims=dims,
                            memory=False)
    return a.p50 * 1e3, b.p50 * 1e3


def _finish(model: ir.Model) -> None:
    from graphopt.pipeline import PassContext, PassManager

    PassManager("cleanup,infer-shapes", PassContext()).run(model)


def _check_valid(proto: onnx.ModelProto) -> None:
    # onnx shape inference types a sparse initializer as sparse_tensor and then refuses it as a
    # Conv/MatMul input, which onnxruntime accepts: check the structure only for those models.
    try:
        onnx.checker.check_model(proto, full_check=not proto.graph.sparse_initializer)
    except Exception as exc:  # noqa: BLE001 - checker and inference raise several types
        raise GraphoptError(f"the pruned model does not pass the onnx checker ({exc}); "
                            "rerun with --exclude for the layer it names and report the model") from None


def prune(model: ModelSource, *, ratio: float = 0.0, target_macs: float | None = None,
          heads: float | None = None, criterion: str = "l1", round_to: int = 1,
          exclude: str | None = None, calibration: Any = None, reconstruct: bool = False,
          recalibrate_bn: bool = False, samples: int | None = None, ridge: float = 1e-3,
          unstructured: float | None = None, bench: bool = False, bench_runs: int = 50,
          dims: Mapping[str, int] | None = None, output: str | os.PathLike | None = None) -> PruneResult:
    """Prune channels, neurons and attention heads of an ONNX model.

    Args:
        model: a path, serialized bytes or an ``onnx.ModelProto`` (never modified).
        ratio: fraction of the units of every prunable channel group to remove (``[0, 1)``).
        target_macs: instead of ``ratio``: keep at most this fraction of the original MACs (the
            ratio is found by bisection).
        heads: fraction of attention heads to remove (default: the channel ratio).
        criterion: importance of a unit: ``l1``, ``l2`` or ``bn-gamma``.
        round_to: keep a multiple of this many channels per group.
        exclude: regular expression; groups touching a matching layer or weight name stay whole.
        calibration: calibration data for ``reconstruct``/``recalibrate_bn`` (anything
            :func:`graphopt.runtime.open_calibration_data` takes: a folder, an ``.npz``,
            ``"module:function"``, a list of feed dicts...).
        reconstruct: refit the layers after pruned groups by least squares on ``calibration``.
        recalibrate_bn: re-estimate BatchNormalization statistics on ``calibration``.
        samples: use at most this many calibration samples.
        ridge: reconstruction regularization (relative to the mean diagonal of ``XᵀX``).
        unstructured: also zero this fraction of every weight and store it sparse (smaller file,
            not faster).
        bench: measure the latency (ORT_ENABLE_ALL, 1 thread) before and after.
        bench_runs: timed runs per model with ``bench``.
        dims: sizes of symbolic input dims for MACs and the benchmark (others are 1).
        output: also write the pruned model there (atomically).

    Returns:
        A :class:`PruneResult` with the pruned ``onnx.ModelProto`` and the report.

    Raises:
        GraphoptError: bad input or options, or a pruned model that fails the checker.

    Example:
        >>> import graphopt
        >>> result = graphopt.prune("resnet.onnx", ratio=0.5)  # doctest: +SKIP
        >>> result.report.mac_reduction  # doctest: +SKIP
        3.8
    """
    from graphopt._api import check_input
    from graphopt.passes.prune.reconstruct import (
        recalibrate_batch_norm,
        reconstruct_layers,
    )
    from graphopt.passes.prune.structured import check_prune_options
    from graphopt.passes.prune.unstructured import SPEED_NOTE, prune_unstructured

    if isinstance(model, ir.Model):
        raise GraphoptError("prune() takes a path, bytes or an onnx.ModelProto; run the "
                            "prune-channels pass directly on an IR Model")
    check_prune_options(ratio, heads, criterion, round_to)
    if target_macs is not None and ratio:
        raise GraphoptError("give either a ratio or target_macs (--ratio or --target-macs), not both")
    if (reconstruct or recalibrate_bn) and calibration is None:
        raise GraphoptError("reconstruction and BatchNormalization re-estimation need calibration data "
                            "(--calibration DIR|FILE.npz|module:function)")
    if exclude:
        import re

        try:
            re.compile(exclude)
        except re.error as exc:
            raise GraphoptError(f"--exclude '{exclude}' is not a valid regular expression ({exc})") from None
    working = ir.load(model)
    check_input(working)
    # The original as a proto is needed only to compare against it; a full copy of a large
    # model's weights costs seconds, so it is made only then.
    original = None
    if reconstruct or recalibrate_bn or bench or target_macs is not None:
        original = model if isinstance(model, onnx.ModelProto) else ir.to_proto(working)
    source = (_open_calibration(calibration, original, samples)
              if (reconstruct or recalibrate_bn) else None)
    macs_before = model_macs(working, dims)
    params_before, _ = count_parameters(working, nonzero=False)
    if ratio or target_macs is not None:
        # Dead nodes (a debug branch nobody reads) would otherwise block the groups they touch.
        from graphopt.pipeline import PassContext, PassManager

        PassManager("eliminate-dead-code", PassContext()).run(working)
    if target_macs is not None:
        ratio = _ratio_for_target(original, target_macs, heads, criterion, round_to, exclude, dims, macs_before)
    plan, changes = _structured(working, ratio, heads, criterion, round_to, exclude)
    notes: list[str] = []
    refits, recalibrated = [], 0
    if changes and recalibrate_bn:
        recalibrated = recalibrate_batch_norm(working, source)
    if changes and reconstruct:
        refits = [r.to_dict() for r in reconstruct_layers(original, working, plan.keep_indices(), source,
                                                          ridge=ridge)]
        if not refits:
            notes.append("reconstruction: no layer after a pruned group is a MatMul, Gemm or 1x1 Conv")
    counters = None
    if unstructured:
        counters = prune_unstructured(working, unstructured)
        notes.append(SPEED_NOTE)
    if changes or counters:
        _finish(working)
        result_proto = ir.to_proto(working)
        _check_valid(result_proto)
    else:  # nothing pruned: the model as given, bit for bit
        result_proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(working)
    macs_after = model_macs(working, dims)
    params_after, nonzero_after = count_parameters(working)
    report = PruneReport(
        ratio=ratio, heads=heads, criterion=criterion,
        groups=[g.to_dict() for g in plan.analysis.groups],
        removed={gid: len(units) for gid, units in plan.removed.items()}, skipped=dict(plan.skipped),
        layers=[c.to_dict() for c in changes], params_before=params_before, params_after=params_after,
        nonzero_params_after=nonzero_after, macs_before=macs_before, macs_after=macs_after,
        refits=refits, batch_norms_recalibrated=recalibrated, unstructured=counters, notes=notes)
    if bench:
        report.latency_ms_before, report.latency_ms_after = _bench(original, result_proto, bench_runs, dims)
    if output is not None:
        ir.save(working, output)
    logger.info("prune: %d unit(s) removed, MACs %d -> %d", plan.units_removed, macs_before, macs_after)
    return PruneResult(result_proto, report)
