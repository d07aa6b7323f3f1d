"""``calibrate``: the calibration analysis that ``insert-qdq`` reads.

It runs the float model over calibration data (streaming, see
:func:`graphopt.runtime.calibrate`) for every activation tensor QDQ placement could quantize
on the context's target, and keeps the result in ``ctx.analyses["quant-calibration"]``. The
model is not changed. With ``cache=FILE`` the statistics are read from ``FILE`` when it holds
them for this very model, and written there otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from graphopt.passes.quant._runtime import light_proto, saved_model
from graphopt.passes.quant.insert_qdq import CALIBRATION_ANALYSIS
from graphopt.passes.quant.placement import (
    DEFAULT_OP_TYPES,
    PlacementConfig,
    plan_placement,
)

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pipeline import Pass, PassContext, PassResult
from graphopt.runtime import CalibrationResult, calibrate, open_calibration_data

__all__ = ["Calibrate", "calibrate_model", "calibration_tensors", "placement_tensors"]

logger = logging.getLogger(__name__)


def calibration_tensors(model: ir.Model, target: str = "cpu") -> list[str]:
    """Every activation tensor a QDQ placement for ``target`` may quantize, for any selection of units.

    That is each float, non-constant input and output of the ops placement knows (and of the
    Relu that may join them), so a placement that leaves some units in float (include/exclude
    lists, the accuracy budget) finds the ranges it needs.
    """
    if plan_placement(model, PlacementConfig(target=target, activation_matmul=True)).reason.startswith("the "):
        return []  # the target fuses nothing: no range is ever needed
    known = set(DEFAULT_OP_TYPES) | {"Relu"}
    names: set[str] = set()
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            continue
        for v in list(node.inputs) + list(node.outputs):
            if v is not None and v.dtype == onnx.TensorProto.FLOAT and not v.is_constant():
                names.add(v.name)
    return sorted(names)


def placement_tensors(model: ir.Model, config: PlacementConfig) -> list[str]:
    """The activation tensors the placement for ``config`` puts a QuantizeLinear on.

    Unlike :func:`calibration_tensors` (every tensor any selection of units may need), this is
    what one placement quantizes: the tensors whose ranges it reads, and the outputs of its
    pass-through units (they share their input's range, but a placement that leaves such a unit
    in float reads theirs). On BERT-base that is 49 tensors instead of 356.

    Example:
        >>> placement_tensors(model, PlacementConfig(target="cpu"))  # doctest: +SKIP
        ['input', 'conv1_out', 'pool_out']
    """
    return sorted(plan_placement(model, config).tensors)


def calibrate_model(path: str, tensors: list[str], data: Iterable[Mapping[str, np.ndarray]], *,
                    method: str = "minmax", percentile: float = 99.999, cache: str | None = None,
                    progress: Any = None) -> CalibrationResult:
    """Calibrate ``tensors`` of the model file ``path``, through the statistics cache when given.

    A cache made for another model, or lacking one of ``tensors``, is recomputed and rewritten.
    """
    if cache and os.path.exists(cache):
        try:
            cached = CalibrationResult.load(cache, model=path)
        except GraphoptError as exc:
            logger.warning("statistics cache '%s' not used: %s", cache, exc)
        else:
            if all(t in cached.ranges for t in tensors):
                logger.info("calibration statistics read from '%s' (%d tensors, %d samples)",
                            cache, len(cached.ranges), cached.samples)
                params = {"percentile": percentile} if method == "percentile" else {}
                return cached.with_method(method, **params)
            logger.info("statistics cache '%s' lacks some tensors: calibrating again", cache)
    result = calibrate(path, tensors, data, method=method, percentile=percentile, progress=progress)
    if cache:
        result.save(cache)
        logger.info("calibration statistics written to '%s'", cache)
    return result


class Calibrate(Pass):
    """Calibrate activation ranges for QDQ insertion (an analysis: the model is not changed).

    ``data`` is a folder of .npz/.npy files, one .npz, ``module:function`` or ``synthetic``
    (seeded random inputs; accuracy is not assured).

    Example:
        >>> PassManager('calibrate<data="calib/",method=entropy>,insert-qdq', ctx).run(model)  # doctest: +SKIP
    """

    name = "calibrate"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    provides = frozenset({"quant-calibration"})
    options = {"data": "synthetic", "method": "minmax", "samples": 0, "percentile": 99.999,
               "cache": "", "seed": -1}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Calibrate and store the result in ``ctx.analyses``."""
        c = self.config
        if CALIBRATION_ANALYSIS in ctx.analyses:  # still valid: no pass changed the model since
            return PassResult(False, {"tensors": 0, "samples": 0})
        tensors = calibration_tensors(model, ctx.target)
        seed = ctx.seed if int(c["seed"]) < 0 else int(c["seed"])
        with saved_model(model) as path:
            source = open_calibration_data(str(c["data"]), model=light_proto(path),
                                           samples=int(c["samples"]) or None, seed=seed)
            result = calibrate_model(path, tensors, source, method=str(c["method"]),
                                     percentile=float(c["percentile"]), cache=str(c["cache"]) or None)
        ctx.analyses.get(CALIBRATION_ANALYSIS, lambda: result)
        return PassResult(False, {"tensors": len(result.ranges), "samples": result.samples})
