"""The crash reproducer: when a pass crashes, save what it takes to make it crash again.

On an unexpected exception in a pass, :class:`CrashReproducer` writes a new folder holding the
pipeline's *input* model (not the half-transformed one), the pipeline, the failing pass, the
passes run before it, the traceback and a README with the command that reproduces the crash.
The pass manager puts the folder's path in the :class:`~graphopt.errors.PassError` message.

The input costs nothing until a crash: a path is copied (with its external data) only then, and
a ``ModelProto`` is serialized only then (the IR never mutates the proto it was loaded from).
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shlex
import shutil
import tempfile
import traceback
from typing import TYPE_CHECKING, Union

import onnx

from graphopt.pipeline._instruments import Instrument
from graphopt.pipeline._manager import describe_ran_before

if TYPE_CHECKING:
    from graphopt.ir import Model
    from graphopt.pipeline._context import PassContext
    from graphopt.pipeline._manager import PipelineReport
    from graphopt.pipeline._pass import Pass

__all__ = ["CrashReproducer", "ReproducerInput"]

logger = logging.getLogger(__name__)

#: What :class:`CrashReproducer` accepts as the pipeline's input model.
ReproducerInput = Union[onnx.ModelProto, bytes, str, os.PathLike]

#: Characters that a double-quoted shell word cannot hold literally.
_SHELL_UNSAFE_IN_QUOTES = frozenset('"$`\\!')


class CrashReproducer(Instrument):
    """Save a self-contained reproducer when a pass raises an unexpected exception.

    Args:
        folder: where reproducer folders are created (``graphopt-crash-<pass>-XXXX`` inside it).
        input_model: the pipeline's input, as a path to the ``.onnx`` file (copied with its
            external data at crash time) or an ``onnx.ModelProto`` / serialized bytes (written at
            crash time). Not an IR ``Model``: that is the object the passes change.
        pipeline: the pipeline as the user asked for it (e.g. ``"O2"``); the README shows it next
            to the canonical pipeline that actually ran, which is what ``pipeline.txt`` holds.

    After a crash, ``model.meta["reproducer"]`` and :attr:`last_folder` hold the folder's path.

    Example:
        >>> repro = CrashReproducer("crashes", "model.onnx", "O2")
        >>> ctx = PassContext(instruments=[repro])  # doctest: +SKIP
        >>> PassManager("O2", ctx).run(ir.load("model.onnx"))  # doctest: +SKIP
        graphopt.errors.PassError: pass 'fold-constants' failed: ...; reproducer saved to crashes/...
    """

    def __init__(self, folder: str | os.PathLike[str], input_model: ReproducerInput,
                 pipeline: str | None = None) -> None:
        from graphopt.ir import Model

        if isinstance(input_model, Model):
            raise TypeError("CrashReproducer needs the pipeline's input as a path, bytes or an "
                            "onnx.ModelProto, not the IR Model that the passes change")
        if not isinstance(input_model, (onnx.ModelProto, bytes, bytearray, str, os.PathLike)):
            raise TypeError(f"CrashReproducer cannot save an input of type {type(input_model).__name__}")
        self.folder = os.path.abspath(os.fspath(folder))
        self.input_model: onnx.ModelProto | bytes | str = (
            os.path.abspath(os.fspath(input_model)) if isinstance(input_model, (str, os.PathLike))
            else input_model if isinstance(input_model, onnx.ModelProto) else bytes(input_model))
        self.requested_pipeline = pipeline
        #: The folder written by the last crash (``None`` before any).
        self.last_folder: str | None = None
        self._pipeline_text = pipeline or ""

    def on_pipeline_start(self, model: Model, ctx: PassContext, report: PipelineReport) -> None:
        """Remember the canonical pipeline that runs (nothing is copied now)."""
        self._pipeline_text = report.pipeline or self.requested_pipeline or ""

    def on_pass_error(self, p: Pass, model: Model, ctx: PassContext, exc: BaseException,
                      ran_before: list[str]) -> None:
        """Write the reproducer folder and record it in ``model.meta["reproducer"]``."""
        try:
            folder = self._write(p, model, ctx, exc, ran_before)
        except Exception as err:  # never hide the pass's own failure behind ours
            logger.warning("could not save a crash reproducer in %s: %s: %s", self.folder,
                           type(err).__name__, err)
            return
        self.last_folder = folder
        model.meta["reproducer"] = folder
        logger.info("crash reproducer for pass %s saved to %s", p.name, folder)

    # -- writing -------------------------------------------------------------------------------------
    def _write(self, p: Pass, model: Model, ctx: PassContext, exc: BaseException,
               ran_before: list[str]) -> str:
        os.makedirs(self.folder, exist_ok=True)
        folder = tempfile.mkdtemp(prefix=f"graphopt-crash-{p.name}-", dir=self.folder)
        notes = self._save_input(folder, model)
        pipeline = self._pipeline_text
        files = {
            "pipeline.txt": pipeline + "\n",
            "failing_pass.txt": p.name + "\n",
            "passes_before.txt": "".join(name + "\n" for name in ran_before),
            "traceback.txt": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        }
        for name, text in files.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
        readme = self._readme(p, ctx, exc, ran_before, notes)
        with open(os.path.join(folder, "README.txt"), "w", encoding="utf-8") as f:
            f.write(readme)
        return folder

    def _save_input(self, folder: str, model: Model) -> list[str]:
        """Write ``input.onnx`` (and its external data); return notes for the README."""
        target = os.path.join(folder, "input.onnx")
        source = self.input_model
        if isinstance(source, str):
            shutil.copyfile(source, target)
            proto = onnx.load(source, load_external_data=False)
            base_dir: str | None = os.path.dirname(source)
        else:
            data = source.SerializeToString() if isinstance(source, onnx.ModelProto) else source
            with open(target, "wb") as f:
                f.write(data)
            proto = source if isinstance(source, onnx.ModelProto) else onnx.load_from_string(data)
            base_dir = model.base_dir
        return _copy_external_data(proto, base_dir, folder)

    def command(self, ctx: PassContext) -> str:
        """The ``graphopt optimize`` command line that reruns the pipeline on ``input.onnx``."""
        args = ["graphopt", "optimize", "input.onnx", "-o", "out.onnx", "--pipeline",
                _shell_quote(self._pipeline_text)]
        if ctx.target != "cpu":
            args += ["--target", ctx.target]
        for name in sorted(ctx.disabled):
            args += ["--disable", shlex.quote(name)]
        if ctx.bisect_limit is not None:
            args += ["--bisect-limit", str(ctx.bisect_limit)]
        if ctx.seed != 0:
            args += ["--seed", str(ctx.seed)]
        for path in _plugin_files(ctx):
            args += ["--load-pass", shlex.quote(path)]
        return " ".join(args)

    def _python_snippet(self, ctx: PassContext) -> list[str]:
        """Python lines that rerun the pipeline with the same settings."""
        settings = [f"target={ctx.target!r}"]
        if ctx.disabled:
            settings.append(f"disabled={sorted(ctx.disabled)!r}")
        if ctx.bisect_limit is not None:
            settings.append(f"bisect_limit={ctx.bisect_limit}")
        if ctx.seed != 0:
            settings.append(f"seed={ctx.seed}")
        lines = ["from graphopt import ir",
                 "from graphopt.pipeline import PassContext, PassManager, PassRegistry",
                 "model = ir.load('input.onnx')",
                 "pipeline = open('pipeline.txt').read().strip()",
                 "registry = PassRegistry.default()"]
        lines += [f"registry.load_file({path!r})" for path in _plugin_files(ctx)]
        settings.append("registry=registry")
        lines.append(f"PassManager(pipeline, PassContext({', '.join(settings)})).run(model)")
        return lines

    def _readme(self, p: Pass, ctx: PassContext, exc: BaseException, ran_before: list[str],
                notes: list[str]) -> str:
        registry = ctx.get_registry()
        from_python = sorted({cls.name for cls in registry.passes()
                              if not _reachable_from_cli(registry.origin(cls.name))}
                             & _names_in(self._pipeline_text))
        lines = [
            "graphopt crash reproducer",
            "",
            f"Pass '{p.name}' raised {type(exc).__name__}: {exc}",
            f"Passes run before it: {describe_ran_before(ran_before, last=len(ran_before) or 1)}",
            f"Pipeline that ran: {self._pipeline_text}",
        ]
        if self.requested_pipeline and self.requested_pipeline != self._pipeline_text:
            lines.append(f"Pipeline as requested: {self.requested_pipeline}")
        lines += [
            "",
            "Reproduce, from this folder:",
            "",
            f"    {self.command(ctx)}",
            "",
            "or from Python:",
            "",
            *(f"    {line}" for line in self._python_snippet(ctx)),
        ]
        if from_python:
            lines += ["", "These passes were registered from Python, not from a plugin the command line "
                      f"finds; register them first (PassContext(registry=...)): {', '.join(from_python)}"]
        lines += [""] + notes + [
            "Files: input.onnx (the pipeline's input), pipeline.txt, failing_pass.txt, "
            "passes_before.txt, traceback.txt.",
            "",
            f"Versions: graphopt {_version('graphopt')}, onnx {onnx.__version__}, "
            f"onnxruntime {_version('onnxruntime')}, Python {platform.python_version()}",
            "",
        ]
        return "\n".join(lines)


def _copy_external_data(proto: onnx.ModelProto, base_dir: str | None, folder: str) -> list[str]:
    """Copy (or hard-link) the external data files ``proto`` names next to ``input.onnx``."""
    notes: list[str] = []
    locations = sorted(_external_locations(proto))
    if not locations:
        return notes
    if base_dir is None:
        return [f"The input refers to external data ({', '.join(locations)}) from an unknown folder; "
                "copy those files next to input.onnx.", ""]
    root = os.path.realpath(base_dir)
    for location in locations:
        source = os.path.realpath(os.path.join(root, location))
        if os.path.commonpath([root, source]) != root or not os.path.isfile(source):
            notes += [f"External data file '{location}' is missing or outside the model's folder; "
                      "it was not copied.", ""]
            continue
        dest = os.path.join(folder, os.path.normpath(location))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.link(source, dest)
        except OSError:
            shutil.copyfile(source, dest)
    return notes


def _external_locations(proto: onnx.ModelProto) -> set[str]:
    """Every external-data ``location`` named by a tensor anywhere in ``proto``."""
    found: set[str] = set()

    def tensor(t: onnx.TensorProto) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in t.external_data if e.key == "location")

    def sparse(s: onnx.SparseTensorProto) -> None:
        tensor(s.values)
        tensor(s.indices)

    def node(n: onnx.NodeProto) -> None:
        for a in n.attribute:
            if a.HasField("t"):
                tensor(a.t)
            if a.HasField("sparse_tensor"):
                sparse(a.sparse_tensor)
            if a.HasField("g"):
                graph(a.g)
            for t in a.tensors:
                tensor(t)
            for s in a.sparse_tensors:
                sparse(s)
            for g in a.graphs:
                graph(g)

    def graph(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            sparse(s)
        for n in g.node:
            node(n)

    graph(proto.graph)
    for f in proto.functions:
        for n in f.node:
            node(n)
    for info in proto.training_info:
        graph(info.initialization)
        graph(info.algorithm)
    return found


def _shell_quote(text: str) -> str:
    """``"text"`` when double quotes keep it literal (the readable form), else single-quoted."""
    if not any(c in _SHELL_UNSAFE_IN_QUOTES for c in text):
        return f'"{text}"'
    return shlex.quote(text)


def _reachable_from_cli(origin: str) -> bool:
    """True when the command line finds a pass of this origin (built in, plugin or a file)."""
    return (origin == "graphopt" or origin.startswith("graphopt.") or origin.startswith("plugin ")
            or origin.endswith(".py"))


def _plugin_files(ctx: PassContext) -> list[str]:
    """Python files passes were loaded from (``--load-pass``), as absolute paths."""
    registry = ctx.get_registry()
    files = {os.path.abspath(registry.origin(cls.name)) for cls in registry.passes()
             if registry.origin(cls.name).endswith(".py") and os.path.isfile(registry.origin(cls.name))}
    return sorted(files)


def _names_in(pipeline: str) -> set[str]:
    """The pass names a pipeline string mentions (a superset is fine: used to filter)."""
    return set(re.findall(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*", pipeline))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
