"""The public Python API: ``graphopt.load``, ``graphopt.save`` and ``graphopt.optimize``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterable

import onnx

from graphopt import ir
from graphopt._progress import ProgressDisplay
from graphopt.analysis import ModelStats, model_stats
from graphopt.errors import EmitError, GraphoptError, UnsupportedModelError, VerificationError
from graphopt.ir import Model
from graphopt.ir._io import ModelSource
from graphopt.pipeline import PassContext, PassManager, PipelineReport
from graphopt.runtime import fit_to_runtime

__all__ = ["load", "save", "optimize", "optimize_model", "OptimizeOutcome", "check_input", "resolve_pipeline"]

logger = logging.getLogger(__name__)


def load(source: ModelSource, *, base_dir: str | None = None) -> Model:
    """Load a model (path, bytes or ``onnx.ModelProto``) into graphopt's IR.

    Example:
        >>> import graphopt
        >>> model = graphopt.load("fixtures/examples/tiny_cnn.onnx")
        >>> sorted({n.op_type for n in model.graph})[:3]
        ['Add', 'BatchNormalization', 'Conv']
    """
    return ir.load(source, base_dir=base_dir)


def save(model: Model, path: str | os.PathLike, *, external_data: bool | None = None,
         location: str | None = None) -> None:
    """Write an IR model to ``path`` atomically (see :func:`graphopt.ir.save`)."""
    ir.save(model, path, external_data=external_data, location=location)


def check_input(model: Model) -> None:
    """Refuse models graphopt cannot optimize safely, with a one-line reason.

    Sorts graphs that are merely out of order; raises on cycles, dangling references, opsets
    newer than the installed onnx, nodes in domains the model does not import, and default-domain
    ops that do not exist at the model's opset (a corrupt or misspelled op type).
    """
    newest = onnx.defs.onnx_opset_version()
    default = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if default is not None and default > newest:
        raise UnsupportedModelError(
            f"the model imports opset {default} of the default domain; the installed onnx "
            f"{onnx.__version__} knows up to opset {newest} (upgrade onnx)")
    for g in model.all_graphs():
        g.sort()
    problems = ir.find_problems(model)
    if problems:
        raise VerificationError([f"invalid input model: {problems[0]}"] + problems[1:])
    _check_default_domain_ops(model)


def _check_default_domain_ops(model: Model) -> None:
    # Passes rely on the standard semantics of default-domain ops: an op unknown at the imported
    # opset cannot be reasoned about, and onnxruntime would refuse the model anyway.
    known: dict[tuple[str, int], bool] = {}
    for g in model.all_graphs():
        imports = g.opset_imports()
        version = imports.get("", imports.get("ai.onnx"))
        if version is None:
            continue
        for node in g:
            if node.domain not in ("", "ai.onnx") or (node.domain, node.op_type, node.overload) in model.functions:
                continue
            key = (node.op_type, version)
            if key not in known:
                try:
                    onnx.defs.get_schema(node.op_type, version, "")
                    known[key] = True
                except onnx.defs.SchemaError:
                    known[key] = False
            if not known[key]:
                who = f"node '{node.name}'" if node.name else f"a {node.op_type!r} node"
                raise UnsupportedModelError(
                    f"{who} uses op '{node.op_type}', which opset {version} of the default ONNX "
                    "domain does not define (misspelled, corrupt, or from a newer opset; give "
                    "custom ops their own domain)")


def resolve_pipeline(ctx: PassContext, *, level: int, pipeline: str | None,
                     enable: Iterable[str] = ()) -> str:
    """The pipeline string to run: ``pipeline`` if given, else the ``O<level>`` preset, plus ``enable``."""
    registry = ctx.get_registry()
    text = pipeline if pipeline is not None else registry.pipeline(f"O{level}")
    if text is None:
        raise GraphoptError(f"no preset pipeline for -O{level}")
    extra = [p for p in enable if p]
    for name in extra:
        registry.get(name)
    return ",".join(x for x in [text] + extra if x)


@dataclass
class OptimizeOutcome:
    """What :func:`optimize_model` did: the model, the pipeline report, stats before and after."""

    model: Model
    report: PipelineReport
    before: ModelStats
    after: ModelStats
    emit_changes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    save_seconds: float = 0.0


def optimize_model(source: ModelSource, *, level: int = 2, pipeline: str | None = None,
                   target: str = "cpu", enable: Iterable[str] = (), disable: Iterable[str] = (),
                   ctx: PassContext | None = None, output: str | os.PathLike | None = None,
                   external_data: bool | None = None,
                   progress: ProgressDisplay | None = None) -> OptimizeOutcome:
    """Load, check, optimize, fit to the runtime and (optionally) save; return everything.

    This is :func:`optimize` with the report and statistics the CLI prints. ``progress`` (a
    :class:`~graphopt._progress.ProgressDisplay`) shows loading, the passes and saving.
    """
    if isinstance(source, Model):
        raise GraphoptError("optimize() takes a path, bytes or an onnx.ModelProto; "
                            "run a PassManager directly on an IR Model")
    t0 = time.perf_counter()
    with _bytes_step(progress, "loading") as advance:
        model = ir.load(source, progress=advance)
    load_seconds = time.perf_counter() - t0
    if ctx is None:
        ctx = PassContext(opt_level=level, target=target)
    ctx.disabled |= set(disable)
    check_input(model)
    before = model_stats(model)
    text = resolve_pipeline(ctx, level=level, pipeline=pipeline, enable=enable)
    shown = progress.pass_instrument() if progress is not None else None
    if shown is not None:
        ctx.instruments.append(shown)
    try:
        report = PassManager(text, ctx).run(model)
    finally:
        if shown is not None:
            ctx.instruments.remove(shown)
    emit_changes = fit_to_runtime(model)
    after = model_stats(model)
    t1 = time.perf_counter()
    if output is not None:
        with _bytes_step(progress, "saving") as advance:
            ir.save(model, output, external_data=external_data, progress=advance)
    return OptimizeOutcome(model, report, before, after, emit_changes, load_seconds,
                           time.perf_counter() - t1)


def _bytes_step(progress: ProgressDisplay | None, description: str) -> ContextManager[Any]:
    return progress.bytes_step(description) if progress is not None else contextlib.nullcontext(None)


def optimize(model: ModelSource, *, level: int = 2, pipeline: str | None = None, target: str = "cpu",
             enable: Iterable[str] = (), disable: Iterable[str] = (), output: str | os.PathLike | None = None,
             ctx: PassContext | None = None, external_data: bool | None = None) -> onnx.ModelProto | None:
    """Optimize an ONNX model and return it as a new ``onnx.ModelProto``.

    Args:
        model: a path, serialized bytes or an ``onnx.ModelProto`` (never modified).
        level: preset pipeline ``O0``-``O3`` used when ``pipeline`` is not given.
        pipeline: a pipeline string, e.g. ``"eliminate-identity,eliminate-dead-code"``.
        target: ``"cpu"`` or ``"cuda"``: the onnxruntime execution provider the output is for.
        enable: passes to add after the preset pipeline.
        disable: passes never to run.
        output: write the result to this path (atomically, external data for large models) and
            return ``None`` instead of a proto.
        ctx: a full :class:`~graphopt.pipeline.PassContext` (overrides ``level``/``target``).
        external_data: with ``output``, force (True) or forbid (False) external data.

    Raises:
        GraphoptError: bad input (unreadable, invalid, unsupported) or bad configuration.

    Example:
        >>> import graphopt, onnx
        >>> optimized = graphopt.optimize("fixtures/examples/tiny_cnn.onnx", level=2)
        >>> onnx.checker.check_model(optimized)
    """
    outcome = optimize_model(model, level=level, pipeline=pipeline, target=target, enable=enable,
                             disable=disable, ctx=ctx, output=output, external_data=external_data)
    if output is not None:
        return None
    try:
        return ir.to_proto(outcome.model)
    except EmitError:
        raise EmitError("the optimized model is over 2 GB; pass output= to write it with external data") from None
