"""Check that an optimized model computes what the original computes.

Both models run in onnxruntime on the same inputs (from files, or generated and seeded), with
onnxruntime's own graph optimizations off by default so that any difference comes from the
rewrites between the two files, not from the runtime. Each output is compared with
``|optimized - original| <= atol + rtol * |original|``; the report adds the max absolute and
relative errors, the cosine similarity and, for outputs whose last axis holds several values
(logits, scores), how often the argmax of a row agrees.

With ``per_layer`` the intermediate tensors that both models name alike are made extra graph
outputs in temporary copies, and the walk over the original's nodes in topological order names
the first node whose output diverges. Rewrites may reuse a name for a value that legitimately
changed (a fused node can take over the name of the node it replaced), so a divergence on an
intermediate while every output matches is a hint, not a verdict.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import onnx

from graphopt.errors import GraphoptError
from graphopt.runtime._inputs import (
    DEFAULT_DIM,
    _check_dim_names,
    check_feeds,
    generate_feeds,
    open_session,
    ort_error_text,
)
from graphopt.runtime._session import OutputDiff, compare_outputs

__all__ = ["LayerCheck", "ModelInput", "OutputCheck", "VerifyReport", "verify_models"]

logger = logging.getLogger(__name__)

#: A model as the verifier takes it: a path, serialized bytes or an ``onnx.ModelProto``.
ModelInput = Union[str, os.PathLike, bytes, onnx.ModelProto]

#: Called as ``progress(description, done, total)`` while models run.
ProgressFn = Callable[[str, int, int], None]


@dataclass
class OutputCheck:
    """How one output of the optimized model compares with the original, over all samples.

    Attributes:
        name: the output name.
        max_abs: largest absolute error.
        max_rel: largest relative error (``|error| / |original|``).
        cosine: smallest cosine similarity of a sample (1.0 = same direction).
        top1: fraction of rows whose argmax agrees, for outputs whose last axis is > 1, else ``None``.
        ok: every element within tolerance in every sample.
        reason: why it failed (empty when ``ok``).
    """

    name: str
    max_abs: float
    max_rel: float
    cosine: float
    top1: float | None
    ok: bool
    reason: str = ""


@dataclass
class LayerCheck:
    """The comparison of one intermediate tensor both models compute under the same name."""

    tensor: str
    node: str
    op_type: str
    max_abs: float
    max_rel: float
    cosine: float
    ok: bool
    reason: str = ""


@dataclass
class VerifyReport:
    """The result of :func:`verify_models`.

    Attributes:
        outputs: one :class:`OutputCheck` per output, in the original's output order.
        samples: how many input sets were run.
        rtol, atol: the tolerances used.
        level: onnxruntime graph optimization level used for both models.
        layers: with ``per_layer``, the shared intermediates in the original's topological order.
        first_divergence: the first of ``layers`` that diverges, if any.
        layers_skipped: shared intermediates left out because their type stays unknown.
    """

    outputs: list[OutputCheck]
    samples: int
    rtol: float
    atol: float
    level: str = "disable"
    layers: list[LayerCheck] | None = None
    first_divergence: LayerCheck | None = None
    layers_skipped: int = 0

    @property
    def ok(self) -> bool:
        """True when every output matched within tolerance."""
        return all(o.ok for o in self.outputs)

    def failures(self) -> list[OutputCheck]:
        """The outputs that did not match."""
        return [o for o in self.outputs if not o.ok]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (infinities become strings)."""
        data = {"ok": self.ok, "samples": self.samples, "rtol": self.rtol, "atol": self.atol,
                "level": self.level, "outputs": [asdict(o) for o in self.outputs]}
        if self.layers is not None:
            data["per_layer"] = {
                "compared": len(self.layers), "skipped_untyped": self.layers_skipped,
                "first_divergence": asdict(self.first_divergence) if self.first_divergence else None,
                "layers": [asdict(layer) for layer in self.layers]}
        return _json_safe(data)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def verify_models(original: ModelInput, optimized: ModelInput, *,
                  feeds: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                  samples: int = 1, rtol: float = 1e-4, atol: float = 1e-5,
                  dims: Mapping[str, int] | None = None, seed: int = 0, per_layer: bool = False,
                  level: str = "disable", progress: ProgressFn | None = None) -> VerifyReport:
    """Run two models on the same inputs and compare their outputs.

    Args:
        original: the reference model (path, bytes or ``ModelProto``).
        optimized: the model to check; it must have the same input and output names.
        feeds: one input set (name -> array) or a list of them; generated when ``None``.
        samples: number of generated input sets (seeds ``seed``, ``seed + 1``, ...).
        rtol, atol: an element matches when ``|opt - orig| <= atol + rtol * |orig|``.
        dims: sizes of symbolic input dims by name; the others are 1.
        seed: seed of the first generated input set.
        per_layer: also compare the intermediates both models name alike and find the first
            node of the original whose output diverges.
        level: onnxruntime graph optimizations, ``"disable"`` (default: the comparison isolates
            graphopt's rewrites) or ``"all"``.
        progress: called as ``progress(description, done, total)``.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` tells whether every output matched.

    Raises:
        GraphoptError: a model cannot be loaded, the signatures differ, or the inputs are wrong.

    Example:
        >>> report = verify_models("model.onnx", "model.opt.onnx", samples=3)  # doctest: +SKIP
        >>> report.ok, [o.max_abs for o in report.outputs]  # doctest: +SKIP
        (True, [2.384185791015625e-07])
    """
    if samples < 1:
        raise GraphoptError(f"samples must be at least 1 (got {samples})")
    dims = dict(dims or {})
    ref_sess = open_session(original, level=level, label=_label(original, "the original model"))
    opt_sess = open_session(optimized, level=level, label=_label(optimized, "the optimized model"))
    _check_signatures(ref_sess, opt_sess)
    if dims:
        _check_dim_names([ref_sess, opt_sess], dims)
    feed_sets = _feed_sets(ref_sess, feeds, samples, seed, dims)
    output_names = [o.name for o in ref_sess.get_outputs()]
    diffs: dict[str, list[OutputDiff]] = {name: [] for name in output_names}
    top1_counts: dict[str, list[int]] = {name: [0, 0] for name in output_names}
    top1_known: dict[str, bool] = {name: True for name in output_names}
    total_steps = len(feed_sets) * (2 if per_layer else 1)
    for i, feed in enumerate(feed_sets):
        expected = dict(zip(output_names, _run(ref_sess, output_names, feed, "the original model")))
        actual = dict(zip(output_names, _run(opt_sess, output_names, feed, "the optimized model")))
        cmp = compare_outputs(expected, actual, rtol=rtol, atol=atol, names=output_names)
        for d in cmp.outputs:
            diffs[d.name].append(d)
        for name in output_names:
            agree = _top1(expected[name], actual[name])
            if agree is None:
                top1_known[name] = False
            else:
                top1_counts[name][0] += agree[0]
                top1_counts[name][1] += agree[1]
        if progress is not None:
            progress("comparing outputs", i + 1, total_steps)
    outputs = [_merge(name, diffs[name],
                      top1_counts[name][0] / top1_counts[name][1]
                      if top1_known[name] and top1_counts[name][1] else None)
               for name in output_names]
    report = VerifyReport(outputs=outputs, samples=len(feed_sets), rtol=rtol, atol=atol, level=level)
    failed = [o.name for o in outputs if not o.ok]
    logger.info("verify: %d output(s) compared on %d sample(s), %d mismatch(es)",
                len(outputs), len(feed_sets), len(failed))
    if per_layer:
        _compare_layers(report, original, optimized, feed_sets, level,
                        lambda done: progress("comparing intermediates", len(feed_sets) + done,
                                              total_steps) if progress else None)
    return report


def _label(source: ModelInput, fallback: str) -> str:
    return f"'{os.fspath(source)}'" if isinstance(source, (str, os.PathLike)) else fallback


def _check_signatures(ref: Any, opt: Any) -> None:
    for kind, a, b in (("input", ref.get_inputs(), opt.get_inputs()),
                       ("output", ref.get_outputs(), opt.get_outputs())):
        names_a, names_b = [x.name for x in a], [x.name for x in b]
        if set(names_a) != set(names_b):
            only_a = sorted(set(names_a) - set(names_b))
            only_b = sorted(set(names_b) - set(names_a))
            parts = ([f"only the original has {kind}(s) {', '.join(only_a)}"] if only_a else []) + \
                    ([f"only the optimized model has {kind}(s) {', '.join(only_b)}"] if only_b else [])
            raise GraphoptError(f"the models' {kind}s differ: {'; '.join(parts)}; verify compares "
                                "models with the same input and output names")
        types_b = {x.name: x.type for x in b}
        for x in a:
            if types_b[x.name] != x.type:
                raise GraphoptError(f"{kind} '{x.name}' is {x.type} in the original but "
                                    f"{types_b[x.name]} in the optimized model")


def _feed_sets(session: Any, feeds: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
               samples: int, seed: int, dims: Mapping[str, int]) -> list[dict[str, np.ndarray]]:
    if feeds is None:
        return [generate_feeds(session, seed=seed + i, dims=dims, default_dim=DEFAULT_DIM,
                               check_dims=False) for i in range(samples)]
    sets = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    if not sets:
        raise GraphoptError("no input sets given")
    return [check_feeds(session, f, source=f"input set {i}" if len(sets) > 1 else "the given inputs")
            for i, f in enumerate(sets)]


def _run(session: Any, names: list[str], feed: Mapping[str, np.ndarray], label: str) -> list[Any]:
    try:
        return session.run(names, dict(feed))
    except Exception as exc:  # onnxruntime raises its own types for run-time failures
        raise GraphoptError(f"onnxruntime failed to run {label}: {ort_error_text(exc)}") from None


def _top1(expected: Any, actual: Any) -> tuple[int, int] | None:
    """(rows whose argmax agrees, rows) for numeric outputs whose last axis is > 1."""
    if not isinstance(expected, np.ndarray) or not isinstance(actual, np.ndarray):
        return None
    if expected.ndim == 0 or expected.shape[-1] <= 1 or expected.shape != actual.shape:
        return None
    if expected.dtype.kind not in "fiuc" or expected.size == 0:
        return None
    rows_e = expected.reshape(-1, expected.shape[-1])
    rows_a = actual.reshape(-1, actual.shape[-1])
    if expected.dtype.kind == "c":
        rows_e, rows_a = np.abs(rows_e), np.abs(rows_a)
    agree = np.argmax(rows_e, axis=1) == np.argmax(rows_a, axis=1)
    return int(agree.sum()), int(agree.size)


def _merge(name: str, diffs: list[OutputDiff], top1: float | None) -> OutputCheck:
    bad = next((d for d in diffs if not d.ok), None)
    return OutputCheck(name=name, max_abs=max(d.max_abs for d in diffs),
                       max_rel=max(d.max_rel for d in diffs), cosine=min(d.cosine for d in diffs),
                       top1=top1, ok=bad is None, reason=bad.reason if bad else "")


# -- per-layer comparison ---------------------------------------------------------------------------

def _compare_layers(report: VerifyReport, original: ModelInput, optimized: ModelInput,
                    feed_sets: list[dict[str, np.ndarray]], level: str,
                    step: Callable[[int], None]) -> None:
    from graphopt import ir

    ref_model = _typed_ir(original)
    opt_model = _typed_ir(optimized)
    ref_model.graph.sort()
    ref_values = {v.name: (n, v) for n in ref_model.graph for v in n.outputs if v.name}
    opt_values = {v.name: v for n in opt_model.graph for v in n.outputs if v.name}
    shared: list[str] = []
    skipped = 0
    for name, (_, value) in ref_values.items():
        other = opt_values.get(name)
        if other is None:
            continue
        if not isinstance(value.type, ir.TensorType) or not isinstance(other.type, ir.TensorType):
            skipped += 1
            continue
        shared.append(name)
    report.layers_skipped = skipped
    logger.info("verify: %d intermediate tensor(s) shared by name, %d skipped (type unknown)",
                len(shared), skipped)
    diffs: dict[str, list[OutputDiff]] = {name: [] for name in shared}
    if not shared:
        report.layers = []
        return
    tmp = tempfile.mkdtemp(prefix="graphopt-verify-")
    try:
        ref_path = _with_outputs(ref_model, shared, os.path.join(tmp, "original.onnx"))
        opt_path = _with_outputs(opt_model, shared, os.path.join(tmp, "optimized.onnx"))
        ref_sess = open_session(ref_path, level=level, label="the original model (per-layer copy)")
        opt_sess = open_session(opt_path, level=level, label="the optimized model (per-layer copy)")
        for i, feed in enumerate(feed_sets):
            expected = dict(zip(shared, _run(ref_sess, shared, feed, "the original model")))
            actual = dict(zip(shared, _run(opt_sess, shared, feed, "the optimized model")))
            for d in compare_outputs(expected, actual, rtol=report.rtol, atol=report.atol,
                                     names=shared).outputs:
                diffs[d.name].append(d)
            del expected, actual
            step(i + 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    layers: list[LayerCheck] = []
    for name in shared:  # ref_values follows the original's topological order
        node = ref_values[name][0]
        merged = _merge(name, diffs[name], None)
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        layers.append(LayerCheck(tensor=name, node=node.name, op_type=op, max_abs=merged.max_abs,
                                 max_rel=merged.max_rel, cosine=merged.cosine, ok=merged.ok,
                                 reason=merged.reason))
    report.layers = layers
    report.first_divergence = next((layer for layer in layers if not layer.ok), None)
    if report.first_divergence is not None:
        d = report.first_divergence
        logger.info("verify: first divergence at %s node '%s', tensor '%s'", d.op_type, d.node, d.tensor)


def _typed_ir(source: ModelInput):
    """The model in graphopt's IR, with value types filled in by onnx shape inference."""
    from graphopt import ir

    base_dir = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        base_dir = os.path.dirname(os.path.abspath(path))
        proto = onnx.load(path, load_external_data=False)
    elif isinstance(source, bytes):
        proto = onnx.ModelProto()
        proto.ParseFromString(source)
    else:
        proto = source
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception as exc:  # inference is best effort: untyped values are skipped
        logger.info("verify: onnx shape inference failed (%s); comparing typed values only", exc)
    return ir.load(proto, base_dir=base_dir)


def _with_outputs(model: Any, names: list[str], path: str) -> str:
    """Save a copy of ``model`` whose graph also outputs the values ``names``."""
    from graphopt import ir

    graph = model.graph
    present = {v.name for v in graph.outputs}
    by_name = {v.name: v for n in graph for v in n.outputs}
    for name in names:
        if name not in present:
            value = by_name[name]
            # Only the element type: an inferred shape that disagrees with the run would make
            # onnxruntime warn about it, and the comparison checks shapes anyway.
            value.type = ir.TensorType(value.type.dtype)
            graph.outputs.append(value)
    ir.save(model, path)
    return path
