"""``graphopt.quantize``: calibrate, place QDQ for the target, check fusion, accuracy and speed.

Static flow (``mode="static"``):

1. load, check, and optimize the float model (``-O2`` by default: BatchNormalization folded
   into Conv, fusions, dead code) so QDQ goes around the ops that will really run;
2. open the calibration data and set held-out samples apart for the evaluation;
3. optionally SmoothQuant (outlier channels folded into the LayerNorm/MatMul before);
4. calibrate (streaming; through a statistics cache when given) the tensors the placement
   quantizes, then insert QDQ around the units the target fuses;
5. evaluate on held-out samples; with ``max_drop``, fall the most sensitive units back to
   float until the drop fits the budget (ranges a fallback placement needs are calibrated
   then);
6. count the Q/DQ onnxruntime left unfused in the graph the evaluation's session optimized;
   time the quantized model against the float model with those same sessions
   (ORT_ENABLE_ALL, one thread) and warn loudly when it is slower;
7. save (atomically; external data as the input had it, or when large) and report.

Every model goes to onnxruntime as a file with external data (the optimized float copy, each
quantized candidate): onnxruntime reads the weights itself, so no step copies them into
Python or builds a protobuf over 2 GB, whatever the model's size.

Other modes dispatch to the passes ``quantize-dynamic``, ``quantize-int4`` and
``convert-float16``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.ir._io import EXTERNAL_DATA_THRESHOLD, ModelSource
from graphopt.pipeline import PassContext, PassManager

__all__ = ["MODES", "REPORT_SCHEMA", "QuantizationError", "QuantizeOutcome", "quantize"]

logger = logging.getLogger(__name__)

#: Quantization modes and what they do.
MODES = ("static", "dynamic", "int4", "float16", "bfloat16")
#: Identifies the JSON report format.
REPORT_SCHEMA = "graphopt.quantize/1"
#: Held-out samples used when ``held_out`` is left to graphopt: a fifth of the data, at most 16.
_AUTO_HELD_OUT_FRACTION = 0.2
_AUTO_HELD_OUT_MAX = 16
#: Units ranked by measuring each alone; above this count the cheaper SQNR ranking is used.
_SOLO_RANKING_MAX_UNITS = 24
#: Speed-ups under this count as slower than float32 (timings on a shared CPU vary by ~2%).
_SLOWER_THRESHOLD = 0.98
#: Wall time the speed check's timed runs aim at (the float model's time per run, counted for
#: both models; never fewer than 5 runs each).
_SPEED_CHECK_SECONDS = 5.0
#: Held-out samples the per-unit SQNR is measured on.
_SQNR_SAMPLES = 4
#: Float models with more weight bytes than this do not keep their onnxruntime session open
#: between the reference run and the speed check (it would sit beside calibration's session).
_KEEP_FLOAT_SESSION_BYTES = 1 << 30


class QuantizationError(GraphoptError):
    """Quantization cannot meet what was asked (fusion check, accuracy budget, target)."""


@dataclass
class QuantizeOutcome:
    """What :func:`quantize` produced.

    Attributes:
        model: the quantized ``onnx.ModelProto`` (``None`` when written to ``output``, or when
            it is over 2 GB: read it from ``output``).
        report: the JSON-ready report (schema ``graphopt.quantize/1``).
        ir_model: the quantized model in graphopt's IR (read back from ``output`` when written
            there; ``None`` when it is over 2 GB and no ``output`` was given).
        warnings: what the user must know (synthetic data, slower than float32, budget missed).
    """

    model: onnx.ModelProto | None
    report: dict[str, Any]
    ir_model: ir.Model | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def slower(self) -> bool:
        """True when the quantized model measured slower than the float32 one."""
        return bool(self.report.get("latency", {}).get("slower"))


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise GraphoptError(f"{name}={value!r} is not supported; choose one of "
                            f"{', '.join(str(a) for a in allowed)}")


def _names(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(s.strip() for s in value.split(",") if s.strip())
    return tuple(str(v) for v in value)


def quantize(model: ModelSource, output: str | os.PathLike | None = None, *,
             calibration: Any = None, mode: str = "static", method: str = "minmax",
             per_channel: bool = True, activation_type: str = "uint8", weight_type: str = "int8",
             target: str = "cpu", op_types: Iterable[str] | str | None = None,
             include: Iterable[str] | str | None = None, exclude: Iterable[str] | str | None = None,
             max_drop: float | None = None, metric: str | Callable[..., Any] | None = None,
             held_out: float | None = None, smoothquant_alpha: float | None = None,
             stats_cache: str | os.PathLike | None = None, check_fusion: bool = False,
             report: str | os.PathLike | None = None, progress: Callable[[str, int, int | None], None] | None = None,
             samples: int | None = None, seed: int = 0, dims: dict[str, int] | None = None,
             percentile: float = 99.999, pairs: str = "shared", reduce_range: bool | None = None,
             activation_matmul: bool = False, level: int = 2, check_speed: bool = True,
             speed_runs: int = 50, block_size: int = 32, int4_format: str = "matmulnbits",
             keep_io_types: bool = True, external_data: bool | None = None) -> QuantizeOutcome:
    """Quantize an ONNX model for a target and report what was done.

    Args:
        model: a path, serialized bytes or an ``onnx.ModelProto`` (never modified).
        output: write the quantized model here (atomically; external data when large).
        calibration: a folder of .npz/.npy files, one .npz, ``"module:function"``, a callable
            or list of feed dicts, or ``"synthetic"`` (seeded random inputs; warns that
            accuracy is not assured). Required by ``mode="static"``.
        mode: ``static`` (QDQ), ``dynamic``, ``int4`` (weight-only), ``float16``, ``bfloat16``.
        method: calibration method: ``minmax``, ``percentile``, ``entropy``, ``mse``.
        per_channel: per-output-channel weight scales (per-tensor on opset 10).
        activation_type: ``uint8`` (fuses everything on x86) or ``int8`` (MatMul stays float).
        weight_type: ``int8``.
        target: ``cpu`` or ``cuda``.
        op_types: op types to quantize (default: every type the target fuses).
        include: node-name patterns; only matching units are quantized.
        exclude: node-name patterns kept in float.
        max_drop: accuracy budget: the largest drop of the evaluation metric allowed; the most
            sensitive units fall back to float until it holds.
        metric: ``"cosine"`` (default: drop = 1 − cosine), ``"top1"`` (drop in percentage
            points of top-1 disagreement), or ``"module:function"``/a callable
            ``metric(reference, candidate) -> float`` (higher is better; each argument is a
            list, per held-out sample, of dicts output name -> array; drop = metric(ref, ref)
            − metric(ref, quantized)).
        held_out: samples set apart for the evaluation (a count, or a fraction in (0, 1));
            default: a fifth of the data (at most 16) when there are 5 samples or more, else
            the evaluation reuses the calibration samples (said in the report).
        smoothquant_alpha: apply SmoothQuant with this migration strength (e.g. 0.5).
        stats_cache: read calibration statistics from this file when it holds them for this
            model; write them there otherwise.
        check_fusion: raise :class:`QuantizationError` when onnxruntime leaves any Q/DQ unfused.
        report: write the JSON report to this path.
        progress: called as ``progress(step, done, total)`` (calibration samples).
        samples: use at most this many calibration samples (synthetic: how many to make).
        seed: seed of synthetic data.
        dims: sizes of symbolic input dims for synthetic data and timing.
        percentile: for ``method="percentile"``.
        pairs: ``shared`` (one Q per tensor) or ``dedicated`` (a Q/DQ pair per reader).
        reduce_range: 7-bit weights (default: on CPUs without VNNI, to avoid saturation).
        activation_matmul: also quantize MatMuls of two activations (attention).
        level: the graphopt ``-O`` level run before quantizing (0 skips it).
        check_speed: time quantized against float32 (ORT_ENABLE_ALL, one thread).
        speed_runs: timed runs per model for the speed check.
        block_size: for ``int4``.
        int4_format: ``matmulnbits`` or ``qdq`` for ``int4``.
        keep_io_types: for ``float16``/``bfloat16``: inputs and outputs stay float32.
        external_data: with ``output``, force or forbid external data (default: as the input
            model stores its weights, and external when the result exceeds ~1.8 GB).

    Returns:
        A :class:`QuantizeOutcome` with the model and the report.

    Raises:
        GraphoptError: bad input or options; :class:`QuantizationError` when the fusion check
            fails or nothing can be quantized for the target.

    Example:
        >>> out = graphopt.quantize("model.onnx", calibration="calib/", max_drop=0.01)  # doctest: +SKIP
        >>> out.report["fusion"]["unfused"], out.report["accuracy"]["cosine"]  # doctest: +SKIP
        (0, 0.9993)
    """
    from graphopt._api import check_input
    from graphopt.analysis import model_stats
    from graphopt.runtime import fit_to_runtime

    _check_choice("mode", mode, MODES)
    _check_choice("target", target, ("cpu", "cuda"))
    _check_choice("method", method, ("minmax", "percentile", "entropy", "mse"))
    _check_choice("activation_type", activation_type, ("uint8", "int8"))
    _check_choice("weight_type", weight_type, ("int8",))
    _check_choice("pairs", pairs, ("shared", "dedicated"))
    if max_drop is not None and (not isinstance(max_drop, (int, float)) or max_drop < 0 or math.isnan(max_drop)):
        raise GraphoptError(f"max_drop={max_drop!r}: give a non-negative number (e.g. 0.01)")
    if mode == "static" and calibration is None:
        raise GraphoptError("static quantization needs calibration data: give calibration= a folder of "
                            ".npz files, one .npz, 'module:function', or 'synthetic'")
    if mode != "static" and max_drop is not None:
        raise GraphoptError(f"max_drop applies to static quantization; mode '{mode}' has no calibration")
    if isinstance(model, ir.Model):
        raise GraphoptError("quantize() takes a path, bytes or an onnx.ModelProto, not an IR Model")
    if output is not None:
        _check_output(model, output)
    if report is not None:
        from graphopt._report import check_report_path

        check_report_path(report, "report")
    started = time.perf_counter()
    source_ir = ir.load(model)
    check_input(source_ir)
    input_external = _uses_external_data(source_ir)
    before = model_stats(source_ir)
    opset = source_ir.opset_imports.get("", source_ir.opset_imports.get("ai.onnx", 0))
    if opset < 10 and mode == "static":
        raise GraphoptError(f"the model uses opset {opset}; QuantizeLinear/DequantizeLinear need opset "
                            "10 or newer (convert it with onnx.version_converter first)")
    rep: dict[str, Any] = {"schema": REPORT_SCHEMA, "mode": mode, "target": target,
                           "input": model if isinstance(model, (str, os.PathLike)) else "<in memory>",
                           "opset": opset, "warnings": []}
    rep["input"] = os.fspath(rep["input"]) if isinstance(rep["input"], os.PathLike) else rep["input"]
    warnings: list[str] = rep["warnings"]
    # int4 converts MatMul only (MatMulNBits has no Gemm form): keep MatMul+Add from becoming Gemm.
    keep_matmul = {"fuse-matmul-add-into-gemm"} if mode == "int4" else set()
    ctx = PassContext(opt_level=min(max(level, 0), 3), target=target, seed=seed, disabled=keep_matmul)
    with tempfile.TemporaryDirectory(prefix="graphopt-quantize-") as tmp:
        if level > 0:
            # At most O2: O3's contrib fusions (FusedMatMul, ...) hide the ops QDQ goes around.
            PassManager(f"O{min(level, 2)},infer-shapes", ctx).run(source_ir)
        else:
            PassManager("topo-sort,infer-shapes", ctx).run(source_ir)
        fit_to_runtime(source_ir)
        float_path = os.path.join(tmp, "float.onnx")
        # Weights as external data, whatever the size: every later step (calibration, sessions
        # that fetch intermediate tensors, QDQ insertion, checks) then opens the structure alone
        # and leaves the weights in this one file, so no step copies them or builds a protobuf
        # over 2 GB.
        ir.save(source_ir, float_path, external_data=True)
        runner: _Runner | None = None
        if mode == "static":
            quant_ir, quant_path, timing_feed, runner = _static(source_ir, float_path, tmp, rep, warnings, ctx,
                                           calibration=calibration, method=method, per_channel=per_channel,
                                           activation_type=activation_type, weight_type=weight_type,
                                           target=target, op_types=op_types, include=include,
                                           exclude=exclude, max_drop=max_drop, metric=metric,
                                           held_out=held_out, smoothquant_alpha=smoothquant_alpha,
                                           stats_cache=stats_cache, progress=progress, samples=samples,
                                           seed=seed, dims=dims, percentile=percentile, pairs=pairs,
                                           reduce_range=reduce_range, activation_matmul=activation_matmul)
        else:
            timing_feed = None
            quant_ir, quant_path = _other_mode(mode, float_path, tmp, rep, ctx, op_types=op_types,
                                               exclude=exclude, per_channel=per_channel,
                                               block_size=block_size, int4_format=int4_format,
                                               keep_io_types=keep_io_types)
            _lowp_accuracy(rep, warnings, float_path, quant_path, dims, seed)
        after = model_stats(quant_ir)
        rep["size"] = _sizes(before.initializer_bytes, after.initializer_bytes, float_path, quant_path)
        rep["ops_after"] = dict(sorted(after.ops.items()))
        _fusion(rep, quant_path, target, mode, runner)
        if not (check_speed and target == "cpu"):
            rep.pop("_float_run_seconds", None)
        else:
            _speed(rep, warnings, float_path, quant_path, dims, seed, speed_runs, timing_feed, runner)
        if runner is not None:
            runner.close()
        rep["seconds"] = round(time.perf_counter() - started, 3)
        logged = rep.pop("_logged", [])
        for w in warnings:
            if w not in logged:  # said once already, where it arose
                logger.warning("%s", w)
        if check_fusion and rep.get("fusion", {}).get("unfused", 0):
            fused = rep["fusion"]
            if report is not None:
                _write(report, rep)
            raise QuantizationError(
                f"fusion check failed: onnxruntime left {fused['unfused']} Q/DQ node(s) unfused "
                f"({', '.join(fused['unfused_nodes'][:3])}...); exclude those units or change "
                "activation/weight types (see the report)")
        proto: onnx.ModelProto | None = None
        result_ir: ir.Model | None = None
        if output is not None:
            if external_data is None:  # as the input was, or external when too large for one file
                external_data = input_external or after.initializer_bytes > EXTERNAL_DATA_THRESHOLD
            ir.save(quant_ir, output, external_data=external_data)
            rep["output"] = os.fspath(output)
            result_ir = ir.load(output)  # the temporary files the model read from go away below
        else:
            try:
                proto = ir.to_proto(quant_ir)
            except GraphoptError:
                warnings.append("the quantized model is over 2 GB: pass output= to write it with external data")
            else:
                result_ir = ir.load(proto)
        if report is not None:
            _write(report, rep)
    return QuantizeOutcome(proto, rep, result_ir, list(warnings))


def _uses_external_data(model: ir.Model) -> bool:
    """True when some initializer of ``model`` lives in an external data file."""
    return any(v.const_value is not None and v.const_value.is_external()
               for g in model.all_graphs() for v in g.initializers.values())


def _write(path: str | os.PathLike, rep: dict[str, Any]) -> None:
    from graphopt._report import write_report

    write_report(path, rep)


def _check_output(model: Any, output: str | os.PathLike) -> None:
    out = os.path.abspath(os.fspath(output))
    if isinstance(model, (str, os.PathLike)):
        src = os.path.abspath(os.fspath(model))
        same = out == src
        try:
            same = same or (os.path.exists(out) and os.path.samefile(src, out))
        except OSError:
            pass
        if same:
            raise GraphoptError("the output path is the input file; graphopt never overwrites its input "
                                "(choose another output)")
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise GraphoptError(f"cannot write the model to '{output}': folder '{folder}' does not exist")
    if os.path.isdir(out):
        raise GraphoptError(f"cannot write the model to '{output}': it is a folder (give a file name)")


def _sizes(before: int, after: int, float_path: str, quant_path: str) -> dict[str, Any]:
    from graphopt._report import model_file_bytes

    fb, qb = model_file_bytes(float_path), model_file_bytes(quant_path)
    return {"weights_before": before, "weights_after": after, "file_before": fb, "file_after": qb,
            "ratio": round(qb / fb, 4) if fb else None}


# ---- static ---------------------------------------------------------------------------------------
def _static(float_ir: ir.Model, float_path: str, tmp: str, rep: dict[str, Any], warnings: list[str],
            ctx: PassContext, *, calibration: Any, method: str, per_channel: bool, activation_type: str,
            weight_type: str, target: str, op_types: Any, include: Any, exclude: Any,
            max_drop: float | None, metric: Any, held_out: float | None,
            smoothquant_alpha: float | None, stats_cache: Any, progress: Any, samples: int | None,
            seed: int, dims: dict[str, int] | None, percentile: float, pairs: str,
            reduce_range: bool | None, activation_matmul: bool
            ) -> tuple[ir.Model, str, dict[str, np.ndarray] | None, _Runner]:
    from graphopt.passes.quant.calibration import calibrate_model, placement_tensors
    from graphopt.passes.quant.placement import PlacementConfig, plan_placement
    from graphopt.passes.quant.smoothquant import smooth_quant
    from graphopt.runtime import open_calibration_data, split_held_out

    config = PlacementConfig(target=target, activation_type=activation_type, weight_type=weight_type,
                             per_channel=per_channel, op_types=_names(op_types) or None,
                             include=_names(include), exclude=_names(exclude),
                             activation_matmul=activation_matmul)
    plan = plan_placement(float_ir, config)
    if not plan.units:
        raise QuantizationError(f"nothing to quantize for target '{target}': {plan.reason}")
    opset = rep["opset"]
    if per_channel and opset < 11:
        note = (f"per-channel weights need DequantizeLinear with an axis, which opset {opset} lacks: "
                "weights use per-tensor scales (convert the model to opset 13 for per-channel)")
        rep.setdefault("notes", []).append(note)
        logger.warning("%s", note)
    light = onnx.load(float_path, load_external_data=False)
    source = open_calibration_data(calibration, model=light, samples=samples, seed=seed, dims=dims)
    if source.synthetic:
        # open_calibration_data logged it already: the report and the outcome carry it, the log
        # says it once.
        synthetic_warning = ("calibrated on synthetic (random) inputs: accuracy is not assured; give "
                             "real calibration data")
        warnings.append(synthetic_warning)
        rep.setdefault("_logged", []).append(synthetic_warning)
    total = len(source)
    held: list[dict[str, np.ndarray]]
    evaluation_on = "held-out samples"
    if held_out is None:
        held_out = min(_AUTO_HELD_OUT_MAX, int(total * _AUTO_HELD_OUT_FRACTION)) if total >= 5 else 0
    if held_out and not source.one_shot:
        calib_source, held = split_held_out(source, held_out)
    else:
        calib_source = source
        held = [f for _, f in zip(range(8), source)] if not source.one_shot else []
        evaluation_on = "calibration samples (too few samples to hold some out)" if held else "none"
    rep["calibration"] = {"source": source.description, "synthetic": bool(source.synthetic),
                          "samples": len(calib_source), "held_out": len(held) if evaluation_on.startswith("held") else 0,
                          "evaluation_on": evaluation_on, "method": method,
                          **({"percentile": percentile} if method == "percentile" else {})}
    from graphopt.analysis import model_stats

    runner = _Runner(float_path, tmp, keep_float=model_stats(float_ir).initializer_bytes <= _KEEP_FLOAT_SESSION_BYTES)
    if held:
        runner.float_session()  # opened before the clock starts: the runs alone are timed
    t0 = time.perf_counter()
    reference = runner.reference(held) if held else []
    if held:  # one float run's time bounds how many timed runs the speed check can afford
        rep["_float_run_seconds"] = (time.perf_counter() - t0) / len(held)
    if smoothquant_alpha is not None:
        smoothed = smooth_quant(float_ir, calib_source, float(smoothquant_alpha), ctx)
        rep["smoothquant"] = {"alpha": float(smoothquant_alpha), "smoothed": smoothed}
        ir.save(float_ir, float_path)
        float_ir = ir.load(float_path)
        PassManager("infer-shapes", PassContext()).run(float_ir)
    # Only the tensors this placement quantizes are observed (the session fetches nothing else);
    # a fallback that needs another range calibrates it then (_Ranges).
    tensors = placement_tensors(float_ir, config)

    def calib_progress(done: int, total_runs: int | None) -> None:
        if progress is not None:
            progress("calibrating", done, total_runs)

    cache = os.fspath(stats_cache) if stats_cache else None
    result = calibrate_model(float_path, tensors, calib_source, method=method, percentile=percentile,
                             cache=cache, progress=calib_progress)
    ranges = _Ranges(result, float_path, calib_source, method, percentile, cache)
    evaluate = _evaluator(metric, reference, runner)
    build = _Builder(float_path, tmp, ranges, config, pairs, reduce_range)
    quant_ir, quant_path, emission = build(())
    drop = evaluate(quant_path, held) if held else None
    fallbacks: list[dict[str, Any]] = []
    if max_drop is not None and held and drop is not None and drop > max_drop:
        quant_ir, quant_path, emission, drop = _fall_back(build, evaluate, held, reference, emission,
                                                          drop, float(max_drop), fallbacks)
    if max_drop is not None and not held:
        warnings.append("no samples to evaluate the accuracy budget on: max_drop was not checked")
    rep["quantization"] = {"activation_type": activation_type, "weight_type": weight_type,
                           "per_channel": bool(per_channel and opset >= 11),
                           "per_channel_form": emission.per_channel_form or None, "pairs": pairs,
                           "reduce_range": build.reduce_range_used, "op_types": list(config.op_types or []),
                           "include": list(config.include), "exclude": list(config.exclude)}
    rep["tensors"] = emission.tensors
    rep["weights"] = emission.weights
    rep["fallbacks"] = fallbacks
    rep["calibration"]["tensors"] = len(ranges.result.ranges)
    sqnr = _unit_sqnr(float_path, quant_path, emission.unit_outputs, held[:_SQNR_SAMPLES]) if held else {}
    rep["units"] = _unit_rows(emission, sqnr, fallbacks)
    rep["qdq_nodes"] = {"quantize": emission.quantize_nodes, "dequantize": emission.dequantize_nodes}
    if held:
        cand = evaluate.outputs(quant_path, held)  # the run that measured the drop, not another
        rep["accuracy"] = _accuracy(reference, cand, metric, drop, max_drop, evaluate.label)
        if max_drop is not None and drop is not None and drop > max_drop:
            warnings.append(f"accuracy budget not met: {evaluate.label} drop {drop:.4g} > {max_drop:g} "
                            "with every rankable unit in float")
    timing_feed = held[0] if held else next(iter(calib_source), None)
    return quant_ir, quant_path, timing_feed, runner


class _Ranges:
    """Calibrated ranges that grow on demand.

    Calibration observes only the tensors the requested placement quantizes. A fallback's
    placement (units excluded, or one unit alone while ranking) can quantize a tensor that was
    not observed, e.g. the output of a pass-through op whose unit is left out: such ranges are
    calibrated when first needed, all missing ones in one more pass over the data.
    """

    def __init__(self, result: Any, float_path: str, source: Any, method: str, percentile: float,
                 cache: str | None) -> None:
        self.result = result
        self.float_path = float_path
        self.source = source
        self.method = method
        self.percentile = percentile
        self.cache = cache

    def ensure(self, names: Iterable[str]) -> None:
        """Calibrate those of ``names`` that have no range yet."""
        from graphopt.passes.quant.calibration import calibrate_model

        missing = [n for n in dict.fromkeys(names) if n not in self.result.ranges]
        if not missing:
            return
        logger.info("calibrating %d more tensor(s) for a fallback placement", len(missing))
        extra = calibrate_model(self.float_path, missing, self.source, method=self.method,
                                percentile=self.percentile)
        if extra.samples == self.result.samples:
            self.result = self.result.merged(extra)
        else:  # the first ranges came from a cache of other data: calibrate all on this data
            self.result = calibrate_model(self.float_path, [*self.result.ranges, *missing], self.source,
                                          method=self.method, percentile=self.percentile)
        if self.cache:
            self.result.save(self.cache)

    def range(self, name: str) -> tuple[float, float]:
        """``(rmin, rmax)`` of ``name``, calibrated now if needed."""
        self.ensure([name])
        return self.result.range(name)


class _Builder:
    """Builds a quantized copy of the float model with some units excluded."""

    def __init__(self, float_path: str, tmp: str, result: _Ranges, config: Any, pairs: str,
                 reduce_range: bool | None) -> None:
        from graphopt.passes.quant._qparams import cpu_has_vnni

        self.float_path = float_path
        self.tmp = tmp
        self.result = result
        self.config = config
        self.pairs = pairs
        self.reduce_range = reduce_range
        self.reduce_range_used = (not cpu_has_vnni()) if reduce_range is None else bool(reduce_range)
        self.count = 0

    def __call__(self, excluded: Sequence[str], only: Sequence[str] | None = None) -> tuple[ir.Model, str, Any]:
        from dataclasses import replace

        from graphopt.passes.quant.insert_qdq import insert_qdq
        from graphopt.passes.quant.placement import plan_placement
        from graphopt.runtime import fit_to_runtime

        model = ir.load(self.float_path)
        PassManager("infer-shapes", PassContext()).run(model)  # placement reads value types
        config = replace(self.config, exclude=tuple(self.config.exclude) + tuple(excluded),
                         include=tuple(only) if only is not None else self.config.include)
        self.result.ensure(plan_placement(model, config).tensor_names())  # one pass for all missing
        emission = insert_qdq(model, self.result, config, reduce_range=self.reduce_range, pairs=self.pairs)
        fit_to_runtime(model)
        self.count += 1
        path = os.path.join(self.tmp, f"quant{self.count}.onnx")
        if self.count > 1:  # an earlier candidate's weights: no longer needed
            _remove_model(os.path.join(self.tmp, f"quant{self.count - 1}.onnx"))
        ir.save(model, path, external_data=True)
        return model, path, emission


def _remove_model(path: str) -> None:
    for name in (path, path + ".data"):
        if os.path.exists(name):
            os.unlink(name)


class _Runner:
    """onnxruntime sessions the static flow shares, each opened once.

    The float model's session (``ORT_ENABLE_ALL``, one thread) gives the reference outputs and
    then the float side of the speed check. The session of the quantized candidate being
    evaluated gives its outputs, the graph onnxruntime optimized it into (written as the
    session is made: the fusion check reads it) and the quantized side of the speed check. A
    float model over ``_KEEP_FLOAT_SESSION_BYTES`` of weights does not keep its session
    between those uses, to bound memory.
    """

    def __init__(self, float_path: str, tmp: str, *, keep_float: bool) -> None:
        self.float_path = float_path
        self.tmp = tmp
        self.keep_float = keep_float
        self._float: Any = None
        #: (model path, session, optimized graph path or None)
        self._quant: tuple[str, Any, str | None] | None = None
        self._count = 0

    def float_session(self) -> Any:
        """The float model's session (opened now if needed)."""
        from graphopt.runtime import session_on_file

        if self._float is None:
            self._float = session_on_file(self.float_path, optimize=True)
        return self._float

    def reference(self, feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        """The float model's outputs on ``feeds`` (a failure names the data as the likely cause)."""
        outputs = _session_outputs(self.float_session(), feeds, source=True)
        if not self.keep_float:
            self._float = None
        return outputs

    def quant_session(self, path: str, *, graph: bool = True) -> Any:
        """The session of the quantized model ``path``; with ``graph``, its optimized graph is
        written too (for :meth:`fusion`)."""
        from graphopt.runtime import session_on_file

        if self._quant is not None and self._quant[0] == path and (self._quant[2] or not graph):
            return self._quant[1]
        self._drop_quant()
        optimized = None
        if graph:
            self._count += 1
            folder = os.path.join(self.tmp, f"optimized{self._count}")
            os.makedirs(folder)
            optimized = os.path.join(folder, "optimized.onnx")
        session = session_on_file(path, optimize=True, optimized_model_path=optimized)
        self._quant = (path, session, optimized)
        return session

    def fusion(self, path: str) -> Any:
        """What onnxruntime fused in the quantized model ``path`` (its session's optimized graph)."""
        from graphopt.runtime import fusion_report

        self.quant_session(path, graph=True)
        _, _, optimized = self._quant or (None, None, None)
        if optimized is None:
            raise GraphoptError(f"onnxruntime wrote no optimized graph for '{path}'")
        return fusion_report(optimized)

    def time(self, path: str, feed: dict[str, np.ndarray], warmup: int, runs: int
             ) -> tuple[list[float], list[float]]:
        """Latencies of the float and the quantized model on ``feed``, timed interleaved."""
        sessions = [self.float_session(), self.quant_session(path)]
        feeds = [{k: v for k, v in feed.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
        for _ in range(warmup):
            for session, f in zip(sessions, feeds):
                session.run(None, f)
        latencies: list[list[float]] = [[], []]
        clock = time.perf_counter
        for r in range(runs):
            for k in range(2):
                i = (r + k) % 2  # alternate which model runs first
                t0 = clock()
                sessions[i].run(None, feeds[i])
                latencies[i].append(clock() - t0)
        return latencies[0], latencies[1]

    def _drop_quant(self) -> None:
        if self._quant is not None and self._quant[2] is not None:
            import shutil

            shutil.rmtree(os.path.dirname(self._quant[2]), ignore_errors=True)
        self._quant = None

    def close(self) -> None:
        """Release the sessions."""
        self._float = None
        self._drop_quant()


def _session_outputs(session: Any, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str] | None = None,
                     *, source: bool = False) -> list[dict[str, Any]]:
    """Outputs (``names``, default all) of ``session`` per feed; with ``source`` (the user's float
    model), a failure to run is the data's fault and becomes a one-line :class:`GraphoptError`."""
    from graphopt.runtime._inputs import ort_error_text

    names = list(names) if names is not None else [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    results = []
    for feed in feeds:
        try:
            values = session.run(names, {k: v for k, v in feed.items() if k in wanted})
        except Exception as exc:  # onnxruntime's errors share no base class
            if not source:
                raise
            raise GraphoptError(f"onnxruntime cannot run the float model on the sample inputs: "
                                f"{ort_error_text(exc)} (check the calibration data's shapes; symbolic "
                                "dims take --dim NAME=SIZE)") from None
        results.append(dict(zip(names, values)))
    return results


def _run(path: str, feeds: Sequence[dict[str, np.ndarray]], extra: Sequence[str] = (), *,
         source: bool = False, optimize: bool = True) -> list[dict[str, Any]]:
    """Outputs of the model at ``path`` per feed; with ``source`` (the user's float model), a
    failure to run is the data's fault and becomes a one-line :class:`GraphoptError`."""
    from graphopt.passes.quant._runtime import run_outputs
    from graphopt.runtime._inputs import ort_error_text

    try:
        return run_outputs(path, feeds, extra, optimize=optimize)
    except GraphoptError:
        raise
    except Exception as exc:  # onnxruntime's errors share no base class
        if not source:
            raise
        raise GraphoptError(f"onnxruntime cannot run the float model on the sample inputs: {ort_error_text(exc)} "
                            "(check the calibration data's shapes; symbolic dims take --dim NAME=SIZE)") from None


def _flat(outputs: list[dict[str, Any]]) -> list[np.ndarray]:
    return [np.asarray(v) for sample in outputs for v in sample.values()]


class _Evaluation:
    """``drop(quantized model path, feeds)`` for the chosen metric.

    The outputs of the latest evaluation are kept: the report's accuracy reads them instead of
    running the model again.
    """

    def __init__(self, fn: Callable[[list[dict[str, Any]]], float], label: str, runner: _Runner) -> None:
        self.fn = fn
        self.label = label
        self.runner = runner
        self._last: tuple[str, int, list[dict[str, Any]]] | None = None

    def __call__(self, path: str, feeds: Sequence[dict[str, np.ndarray]], *, candidate: bool = True) -> float:
        """The drop of the model at ``path``; ``candidate=False`` for a model that is only ranked
        (its optimized graph is not needed for the fusion check)."""
        return float(self.fn(self.outputs(path, feeds, graph=candidate)))

    def outputs(self, path: str, feeds: Sequence[dict[str, np.ndarray]], *, graph: bool = True
                ) -> list[dict[str, Any]]:
        """The outputs of the quantized model ``path`` on ``feeds`` (run once per model)."""
        if self._last is not None and self._last[:2] == (path, id(feeds)):
            return self._last[2]
        outputs = _session_outputs(self.runner.quant_session(path, graph=graph), feeds)
        self._last = (path, id(feeds), outputs)
        return outputs


def _evaluator(metric: Any, reference: list[dict[str, Any]], runner: _Runner) -> _Evaluation:
    from graphopt.runtime import load_metric, output_similarity

    if metric is None or metric == "cosine":
        return _Evaluation(lambda cand: 1.0 - float(output_similarity(_flat(reference), _flat(cand))["cosine"]),
                           "cosine", runner)
    if metric == "top1":
        def top1(cand: list[dict[str, Any]]) -> float:
            agreement = output_similarity(_flat(reference), _flat(cand))["top1_agreement"]
            if agreement is None:
                raise GraphoptError("metric 'top1' needs outputs with a class axis; use 'cosine' or a "
                                    "module:function metric")
            return 100.0 * (1.0 - float(agreement))
        return _Evaluation(top1, "top-1 points", runner)
    fn = load_metric(metric) if isinstance(metric, str) else metric
    if not callable(fn):
        raise GraphoptError(f"metric {metric!r} is not callable; give 'cosine', 'top1' or module:function")
    baseline = float(fn(reference, reference))
    name = metric if isinstance(metric, str) else getattr(fn, "__name__", "metric")
    return _Evaluation(lambda cand: baseline - float(fn(reference, cand)), str(name), runner)


def _fall_back(build: _Builder, evaluate: _Evaluation, held: list[dict[str, np.ndarray]],
               reference: list[dict[str, Any]], emission: Any, drop: float, max_drop: float,
               fallbacks: list[dict[str, Any]]) -> tuple[ir.Model, str, Any, float]:
    """Fall units back to float, most sensitive first, until ``drop <= max_drop``."""
    rankable = [u for u in emission.placement.units if u.kind != "pass-through"]
    scores: dict[str, float] = {}
    how: str
    if len(rankable) <= _SOLO_RANKING_MAX_UNITS:
        how = f"{evaluate.label} drop with only this unit quantized"
        for unit in rankable:
            _, path, _ = build((), only=(unit.id,))
            scores[unit.id] = evaluate(path, held, candidate=False)
        order = sorted(rankable, key=lambda u: -scores[u.id])
    else:
        how = ("noise-to-signal ratio the unit adds in the fully quantized model (its output's "
               "minus its input's, from SQNR; higher is more sensitive)")
        first_path = os.path.join(build.tmp, f"quant{build.count}.onnx")
        tensors = dict(emission.unit_outputs)
        for uid, names in emission.unit_inputs.items():
            tensors.update({f"{uid}\0in{i}": name for i, name in enumerate(names)})
        sqnr = _unit_sqnr(build.float_path, first_path, tensors, held[:_SQNR_SAMPLES])

        def nsr(key: str) -> float:
            return 10.0 ** (-sqnr.get(key, float("inf")) / 10.0)

        for unit in rankable:
            inputs = [nsr(f"{unit.id}\0in{i}") for i in range(len(emission.unit_inputs.get(unit.id, [])))]
            scores[unit.id] = nsr(unit.id) - (max(inputs) if inputs else 0.0)
        order = sorted(rankable, key=lambda u: -scores[u.id])
    logger.info("accuracy budget: drop %.4g > %.4g; ranking %d unit(s) by %s", drop, max_drop,
                len(rankable), how)
    excluded: list[str] = []
    model, path = None, ""
    step = 1
    position = 0
    while drop > max_drop and position < len(order):
        batch = order[position:position + step]
        position += len(batch)
        before = drop
        excluded.extend(u.id for u in batch)
        model, path, emission = build(tuple(excluded))
        drop = evaluate(path, held) if emission.unit_outputs else 0.0
        for rank, unit in enumerate(batch, start=position - len(batch) + 1):
            fallbacks.append({
                "unit": unit.id, "op_type": unit.op_type, "rank": rank, "sensitivity": _num(scores[unit.id]),
                "ranked_by": how,
                "reason": (f"sensitivity rank {rank} of {len(order)} ({how}: {_num(scores[unit.id])}); "
                           f"{evaluate.label} drop {before:.4g} exceeded the budget {max_drop:g}"),
                "drop_after": round(drop, 6)})
        step = min(step * 2, 8) if len(order) > _SOLO_RANKING_MAX_UNITS else 1
    if model is None:
        model, path, emission = build(tuple(excluded))
    logger.info("accuracy budget: %d unit(s) fell back to float; drop now %.4g", len(excluded), drop)
    return model, path, emission, drop


def _num(x: float) -> float | str:
    return round(float(x), 6) if math.isfinite(x) else str(x)


def _unit_sqnr(float_path: str, quant_path: str, unit_outputs: dict[str, str],
               feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """SQNR (dB) of each unit's float output: quantized model against float model.

    Both models run without onnxruntime's optimizations (every requested tensor exists as
    written), one sample at a time: signal and noise are summed as they come, so memory holds
    one sample's tensors, not all of them.
    """
    from graphopt.runtime import session_on_file

    if not unit_outputs or not feeds:
        return {}
    names = sorted(set(unit_outputs.values()))
    ref_session = session_on_file(float_path, names)
    cand_session = session_on_file(quant_path, names)
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for feed in feeds:
        ref = _session_outputs(ref_session, [feed], names)[0]
        cand = _session_outputs(cand_session, [feed], names)[0]
        for name in names:
            a = np.asarray(ref[name], np.float64)
            b = np.asarray(cand[name], np.float64)
            signal[name] += float((a * a).sum())
            noise[name] += float(((a - b) ** 2).sum())
        del ref, cand
    return {uid: float("inf") if noise[name] == 0 else 10.0 * math.log10(max(signal[name], 1e-30) / noise[name])
            for uid, name in unit_outputs.items()}


def _unit_rows(emission: Any, sqnr: dict[str, float], fallbacks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for unit in emission.placement.units:
        rows.append({"unit": unit.id, "op_type": unit.op_type, "kind": unit.kind, "status": "quantized",
                     "sqnr_db": _num(sqnr[unit.id]) if unit.id in sqnr else None,
                     "weight_axis": unit.weight_axis,
                     "fused_relu": unit.fused_relu is not None})
    fell = {f["unit"]: f for f in fallbacks}
    for uid, op, reason in emission.placement.skipped:
        row = {"unit": uid, "op_type": op, "kind": "candidate", "status": "float",
               "reason": fell[uid]["reason"] if uid in fell else reason, "sqnr_db": None}
        if uid in fell:
            row["status"] = "fallback"
        rows.append(row)
    return rows


def _accuracy(reference: list[dict[str, Any]], cand: list[dict[str, Any]], metric: Any, drop: float | None,
              max_drop: float | None, label: str) -> dict[str, Any]:
    from graphopt.runtime import output_similarity

    sim = output_similarity(_flat(reference), _flat(cand))
    out = {"metric": label, "drop": None if drop is None else round(drop, 6), "max_drop": max_drop,
           "met": None if max_drop is None or drop is None else bool(drop <= max_drop),
           "samples": len(reference)}
    for key in ("cosine", "cosine_min", "sqnr_db", "top1_agreement", "max_abs"):
        value = sim.get(key)
        out[key] = _num(value) if isinstance(value, float) else value
    return out


# ---- other modes ---------------------------------------------------------------------------------
def _other_mode(mode: str, float_path: str, tmp: str, rep: dict[str, Any], ctx: PassContext, *,
                op_types: Any, exclude: Any, per_channel: bool, block_size: int, int4_format: str,
                keep_io_types: bool) -> tuple[ir.Model, str]:
    from graphopt.pipeline import PassStep
    from graphopt.runtime import fit_to_runtime

    if mode == "dynamic":
        opts: dict[str, Any] = {"per-channel": 1 if per_channel else 0}
        if op_types:
            opts["op-types"] = ",".join(_names(op_types))
        if exclude:
            opts["exclude"] = "|".join(_names(exclude))
        step = PassStep("quantize-dynamic", opts)
    elif mode == "int4":
        step = PassStep("quantize-int4", {"block-size": int(block_size), "format": int4_format})
    else:
        step = PassStep("convert-float16", {"dtype": mode, "keep-io-types": 1 if keep_io_types else 0})
    pipeline = str(step)
    model = ir.load(float_path)
    result = PassManager(pipeline, ctx).run(model)
    fit_to_runtime(model)
    rep["pipeline"] = pipeline
    rep["passes"] = [{"name": r.name, "changed": r.changed, "counters": dict(r.counters)} for r in result.records]
    if not any(r.changed for r in result.records if r.name == step.name):
        what = {"dynamic": "no MatMul/Gemm with a constant 2-D float32 weight of at least 4096 elements",
                "int4": "no MatMul with a constant 2-D float weight of at least 16384 elements"}.get(
                    mode, "no op that converts on this target")
        rep["warnings"].append(f"mode {mode}: nothing was converted ({what}); the output is the optimized "
                               "float32 model")
    path = os.path.join(tmp, "quantized.onnx")
    ir.save(model, path)
    return model, path


# ---- checks after emission -----------------------------------------------------------------------
def _lowp_accuracy(rep: dict[str, Any], warnings: list[str], float_path: str, quant_path: str,
                   dims: dict[str, int] | None, seed: int, samples: int = 2) -> None:
    """Compare a dynamic/int4/float16 model with the float one on seeded random inputs.

    These modes need no calibration data, so nothing else would notice outputs that a float16
    overflow turned into inf/NaN: the report gets ``accuracy`` and a warning says so.
    """
    from graphopt.runtime import make_session, output_similarity, random_inputs

    session = make_session(float_path)
    try:
        feeds = [random_inputs(session, seed=seed + i, dims=dims or {}) for i in range(samples)]
    except (GraphoptError, TypeError, ValueError) as exc:  # inputs random data cannot stand for
        rep["accuracy"] = {"skipped": f"no random inputs for this model ({exc})"}
        return
    finally:
        del session
    # onnxruntime's optimizations would run float16 ops without a CPU kernel in float32 and drop
    # the casts around them, hiding the overflow a GPU meets: compare the model as written.
    declared = {i.name: i.type.tensor_type.elem_type
                for i in onnx.load(quant_path, load_external_data=False).graph.input}
    # With keep_io_types off the converted model takes float16/bfloat16 inputs.
    as_declared = [{k: v.astype(onnx.helper.tensor_dtype_to_np_dtype(declared[k]))
                    if declared.get(k) else v for k, v in feed.items()} for feed in feeds]
    reference = _run(float_path, feeds, source=True, optimize=False)
    candidate = _run(quant_path, as_declared, optimize=False)
    ref, cand = _flat(reference), _flat(candidate)
    broken = sum(1 for r, c in zip(ref, cand)
                 if c.dtype.kind == "f" and np.isfinite(r).all() and not np.isfinite(c).all())
    sim = output_similarity([np.nan_to_num(r) for r in ref], [np.nan_to_num(c) for c in cand])
    rep["accuracy"] = {"on": f"{samples} seeded random input(s)", "non_finite_outputs": broken,
                       **{k: _num(v) if isinstance(v, float) else v
                          for k, v in sim.items() if k in ("cosine", "cosine_min", "sqnr_db", "top1_agreement", "max_abs")}}
    if broken:
        warnings.append(f"the {rep['mode']} model gives inf/NaN outputs where float32 gives finite ones "
                        f"({broken} of {len(ref)} output arrays): an activation overflows; keep the ops "
                        "that produce it in float32 (block-ops of convert-float16) or use another mode")
    elif isinstance(sim.get("cosine_min"), float) and sim["cosine_min"] < 0.99:
        warnings.append(f"the {rep['mode']} model's outputs differ from float32 (cosine {sim['cosine_min']:.4f} "
                        "on random inputs): check it on real data before use")


def _fusion(rep: dict[str, Any], quant_path: str, target: str, mode: str, runner: _Runner | None = None) -> None:
    from graphopt.runtime import check_fusion

    # Static mode reads the graph its evaluation session wrote (no second session of the model).
    report = runner.fusion(quant_path) if runner is not None else check_fusion(quant_path, target=target)
    rep["fusion"] = report.to_dict()
    if report.unfused:
        msg = (f"onnxruntime left {report.unfused} Q/DQ node(s) unfused (each costs time): "
               + ", ".join(report.unfused_nodes[:5]))
        rep["warnings"].append(msg)


def _speed(rep: dict[str, Any], warnings: list[str], float_path: str, quant_path: str,
           dims: dict[str, int] | None, seed: int, runs: int, feed: dict[str, np.ndarray] | None,
           runner: _Runner | None = None) -> None:
    from graphopt.runtime import bench_models

    estimate = rep.pop("_float_run_seconds", None)
    if estimate:  # large models get fewer (still interleaved) runs, at least 5 of each
        runs = int(min(runs, max(5, _SPEED_CHECK_SECONDS / (2 * max(estimate, 1e-6)))))
    runs = max(runs, 5)
    warmup = max(3, runs // 10)
    if runner is not None and feed is not None:
        # The sessions that computed the accuracy (the settings of bench_models: ORT_ENABLE_ALL,
        # one thread), already warm when the float one was kept.
        float_lat, quant_lat = runner.time(quant_path, feed, 1 if runner.keep_float else warmup, runs)
        float_s, quant_s = float(np.percentile(float_lat, 50)), float(np.percentile(quant_lat, 50))
    else:
        # A real sample when there is one: generated ids can fall outside an embedding table.
        fb, qb = bench_models([float_path, quant_path], threads=1, level="all", warmup=warmup, runs=runs,
                              dims=None if feed is not None else dims, seed=seed, memory=False, feeds=feed)
        float_s, quant_s = fb.p50, qb.p50
    speedup = float_s / quant_s if quant_s > 0 else float("inf")
    slower = speedup < _SLOWER_THRESHOLD
    rep["latency"] = {"float_ms": round(float_s * 1e3, 4), "quantized_ms": round(quant_s * 1e3, 4),
                      "speedup": round(speedup, 3), "slower": slower, "runs": runs,
                      "threads": 1, "level": "ORT_ENABLE_ALL"}
    if slower:
        warnings.append(f"SLOWER THAN FLOAT32: the quantized model runs at {speedup:.2f}x the float32 "
                        f"latency ({quant_s * 1e3:.3f} ms vs {float_s * 1e3:.3f} ms, onnxruntime CPU, 1 "
                        "thread); Q/DQ overhead outweighs the integer kernels here: keep the float "
                        "model, or quantize only the large MatMul/Conv units (op_types/include)")
