"""Instruments: observers the pass manager calls around every pass.

Subclass :class:`Instrument` and override the hooks you need; put instances in
``PassContext.instruments``. The built-in ones back the command-line switches:

- :class:`TimePasses` (``--time-passes``): seconds and runs per pass.
- :class:`PassStatistics` (``--stats``): counters summed per pass.
- :class:`DumpIR` (``--dump-ir DIR``): the canonical IR before the first pass and after each pass
  that changed something, one numbered file each.
- :class:`VerifyEach` (``--verify-each[=structural|numeric]``): IR invariants, and optionally the
  outputs in onnxruntime, checked after every pass; the first pass that breaks them is named.
- :class:`~graphopt.pipeline.CrashReproducer`: the input model, pipeline and traceback saved
  when a pass crashes.

Example:
    >>> from graphopt.pipeline import PassContext, PassManager, TimePasses, VerifyEach
    >>> timer = TimePasses()
    >>> ctx = PassContext(instruments=[timer, VerifyEach()])
    >>> PassManager("cleanup", ctx).run(model)  # doctest: +SKIP
    >>> timer.rows()  # doctest: +SKIP
    [('eliminate-dead-code', 1, 0.0012, 0.8), ...]
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any

from graphopt import ir
from graphopt.errors import PassError, VerificationError
from graphopt.pipeline._manager import describe_ran_before

if TYPE_CHECKING:
    import numpy as np

    from graphopt.ir import Model
    from graphopt.pipeline._context import PassContext
    from graphopt.pipeline._manager import PassRecord, PipelineReport
    from graphopt.pipeline._pass import Pass

__all__ = ["Instrument", "TimePasses", "PassStatistics", "DumpIR", "VerifyEach", "VERIFY_MODES"]

logger = logging.getLogger(__name__)

#: The modes of :class:`VerifyEach`.
VERIFY_MODES = ("structural", "numeric")

#: Operators whose outputs differ from run to run unless they carry a ``seed`` attribute.
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Multinomial", "Bernoulli"})


class Instrument:
    """Base class: every hook does nothing."""

    def on_pipeline_start(self, model: Model, ctx: PassContext, report: PipelineReport) -> None:
        """Called once before the first pass."""

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        """Called before each pass runs."""

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None:
        """Called after each pass that returned normally."""

    def on_pass_error(self, p: Pass, model: Model, ctx: PassContext, exc: BaseException,
                      ran_before: list[str]) -> None:
        """Called when a pass raised an unexpected exception."""

    def on_pipeline_end(self, model: Model, ctx: PassContext, report: PipelineReport) -> None:
        """Called once after the last pass (also after a failure)."""


class TimePasses(Instrument):
    """Total seconds and number of runs per pass name (``--time-passes``).

    Times accumulate over every pipeline run the instrument observes; only the passes' own
    ``run`` is timed, not other instruments.

    Example:
        >>> timer = TimePasses()
        >>> ctx = PassContext(instruments=[timer])  # doctest: +SKIP
        >>> PassManager("cleanup", ctx).run(model)  # doctest: +SKIP
        >>> for name, runs, seconds, share in timer.rows():  # doctest: +SKIP
        ...     print(f"{name:30} {runs:3} {seconds * 1e3:8.2f} ms {share:6.1%}")
    """

    #: Column titles matching the tuples of :meth:`rows`.
    COLUMNS = ("pass", "runs", "seconds", "share")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.runs: dict[str, int] = {}

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None:
        """Add the pass's time to its total."""
        self.seconds[record.name] = self.seconds.get(record.name, 0.0) + record.seconds
        self.runs[record.name] = self.runs.get(record.name, 0) + 1

    @property
    def total_seconds(self) -> float:
        """Seconds spent in all passes."""
        return sum(self.seconds.values())

    def rows(self) -> list[tuple[str, int, float, float]]:
        """``(pass, runs, seconds, share of the total)`` per pass, slowest first."""
        total = self.total_seconds
        order = sorted(self.seconds, key=lambda name: (-self.seconds[name], name))
        return [(name, self.runs[name], self.seconds[name], self.seconds[name] / total if total else 0.0)
                for name in order]

    def reset(self) -> None:
        """Forget every recorded time."""
        self.seconds.clear()
        self.runs.clear()


class PassStatistics(Instrument):
    """Counters summed per pass name (``--stats``), over every run it observes.

    Example:
        >>> stats = PassStatistics()
        >>> ctx = PassContext(instruments=[stats])  # doctest: +SKIP
        >>> PassManager("cleanup", ctx).run(model)  # doctest: +SKIP
        >>> stats.counters["eliminate-dead-code"]  # doctest: +SKIP
        {'removed-nodes': 3}
    """

    #: Column titles matching the tuples of :meth:`rows`.
    COLUMNS = ("pass", "counter", "value")

    def __init__(self) -> None:
        self.counters: dict[str, dict[str, int]] = {}

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None:
        """Add the pass's counters to its sums."""
        sums = self.counters.setdefault(record.name, {})
        for key, value in record.counters.items():
            sums[key] = sums.get(key, 0) + value

    def rows(self) -> list[tuple[str, str, int]]:
        """``(pass, counter, value)`` sorted by pass and counter name."""
        return [(name, key, value) for name in sorted(self.counters)
                for key, value in sorted(self.counters[name].items())]

    def reset(self) -> None:
        """Forget every recorded counter."""
        self.counters.clear()


class DumpIR(Instrument):
    """Write the canonical IR text before the first pass and after every pass that changed it.

    ``folder/000-input.txt`` holds the input; ``folder/NNN-<pass>.txt`` the model after the
    NNN-th pass run (counting every pass, so numbers show where in the run a change happened).
    A diff of two consecutive files shows exactly what one pass did. Dumps of an earlier run in
    the same folder (files named like these) are removed at the start, so no stale file mixes in.

    Example:
        >>> ctx = PassContext(instruments=[DumpIR("dumps")])  # doctest: +SKIP
        >>> PassManager("cleanup", ctx).run(model)  # doctest: +SKIP
        >>> sorted(os.listdir("dumps"))  # doctest: +SKIP
        ['000-input.txt', '002-eliminate-dead-code.txt']
    """

    _DUMP_NAME = re.compile(r"^\d{3,}-[a-z0-9][a-z0-9-]*\.txt$")

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = os.fspath(folder)
        #: Paths written in the current run, in order.
        self.files: list[str] = []

    def on_pipeline_start(self, model: Model, ctx: PassContext, report: PipelineReport) -> None:
        """Clear dumps of an earlier run and write the input model."""
        os.makedirs(self.folder, exist_ok=True)
        stale = [f for f in os.listdir(self.folder) if self._DUMP_NAME.match(f)]
        for name in stale:
            os.remove(os.path.join(self.folder, name))
        if stale:
            logger.info("dump-ir: removed %d dump(s) of an earlier run from %s", len(stale), self.folder)
        self.files = []
        self._write("000-input.txt", model, "the input")

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None:
        """Write the model when the pass changed it."""
        if record.changed:
            index = len(ctx.passes_run) + 1
            self._write(f"{index:03d}-{p.name}.txt", model, f"pass '{p.name}'")

    def _write(self, name: str, model: Model, what: str) -> None:
        try:
            text = ir.print_model(model)
        except Exception as exc:  # the model may be broken; the dump should still say so
            logger.warning("dump-ir: cannot print the model after %s: %s", what, exc)
            text = f"# cannot print the model after {what}: {type(exc).__name__}: {exc}\n"
        path = os.path.join(self.folder, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        self.files.append(path)
        logger.debug("dump-ir: wrote %s", path)


class VerifyEach(Instrument):
    """Check the model after every pass and name the first pass that breaks it.

    ``mode="structural"`` runs :func:`graphopt.ir.verify` after every pass (problems the input
    already had are not blamed on a pass). ``mode="numeric"`` also runs the input model once in
    onnxruntime (graph optimizations off, seeded inputs, symbolic dimensions set to 2) and,
    after every pass that changed something, runs the model again and compares the outputs
    within ``rtol``/``atol``. When onnxruntime cannot run the input (a custom operator, an IR
    version it does not know, random operators without a seed) numeric checks are skipped with
    one INFO message and structural checks go on.

    Raises:
        PassError: from the pass manager, naming the pass, what broke and the passes before it.

    Example:
        >>> ctx = PassContext(instruments=[VerifyEach(mode="numeric", rtol=1e-3)])  # doctest: +SKIP
        >>> PassManager("O2", ctx).run(model)  # doctest: +SKIP
    """

    def __init__(self, mode: str = "structural", *, rtol: float = 1e-4, atol: float = 1e-5,
                 seed: int = 0) -> None:
        if mode not in VERIFY_MODES:
            from graphopt.errors import PipelineError

            raise PipelineError(f"verify-each mode '{mode}' is unknown; choose {' or '.join(VERIFY_MODES)}")
        self.mode = mode
        self.rtol = rtol
        self.atol = atol
        self.seed = seed
        #: Why numeric checks are off for the current run (``None`` while they are on).
        self.numeric_skipped: str | None = None
        #: Passes checked numerically in the current run.
        self.numeric_checks = 0
        self._baseline: set[str] = set()
        self._feeds: dict[str, np.ndarray] | None = None
        self._expected: dict[str, Any] | None = None

    # -- hooks -------------------------------------------------------------------------------------
    def on_pipeline_start(self, model: Model, ctx: PassContext, report: PipelineReport) -> None:
        """Note the input's own problems and, in numeric mode, compute reference outputs."""
        self._baseline = set(ir.find_problems(model))
        if self._baseline:
            logger.warning("verify-each: the input model already has %d problem(s) (e.g. %s); only "
                           "new ones are blamed on passes", len(self._baseline), sorted(self._baseline)[0])
        self._feeds = self._expected = None
        self.numeric_skipped = None
        self.numeric_checks = 0
        if self.mode == "numeric":
            self._reference(model, ctx)

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> None:
        """Verify the IR; in numeric mode compare outputs when the pass changed the model."""
        problems = ir.find_problems(model)
        new = [problem for problem in problems if problem not in self._baseline]
        if new:
            more = f" (and {len(new) - 1} more)" if len(new) > 1 else ""
            raise PassError(f"verify-each: pass '{p.name}' broke an IR invariant: {new[0]}{more} "
                            f"(passes run before it: {describe_ran_before(ctx.passes_run)})",
                            pass_name=p.name, ran_before=list(ctx.passes_run)) from VerificationError(new)
        self._baseline = set(problems)  # a pass may also fix problems of the input
        if record.changed and self._expected is not None:
            self._compare(p, model, ctx)

    # -- numeric -----------------------------------------------------------------------------------
    def _skip_numeric(self, reason: str) -> None:
        self.numeric_skipped = reason
        logger.info("verify-each: numeric checks skipped (%s); structural checks continue", reason)

    def _reference(self, model: Model, ctx: PassContext) -> None:
        unseeded = sorted({n.op_type for n in model.all_nodes()
                           if n.op_type in _RANDOM_OPS and n.domain in ("", "ai.onnx")
                           and n.attr("seed") is None})
        if unseeded:
            self._skip_numeric(f"the model has random operators without a seed: {', '.join(unseeded)}")
            return
        from graphopt.runtime import make_session, random_inputs

        try:
            session = make_session(ir.to_proto(model), target=ctx.target)
            feeds = random_inputs(session, seed=self.seed, default_dim=2)
            expected = _run(session, feeds)
        except Exception as exc:  # onnxruntime refuses the input: nothing to compare against
            self._skip_numeric(f"onnxruntime cannot run the input model: {_first_line(exc)}")
            return
        self._feeds, self._expected = feeds, expected

    def _compare(self, p: Pass, model: Model, ctx: PassContext) -> None:
        from graphopt.runtime import compare_outputs, make_session

        assert self._feeds is not None and self._expected is not None
        before = describe_ran_before(ctx.passes_run)

        def fail(what: str, cause: BaseException | None = None) -> PassError:
            err = PassError(f"verify-each=numeric: {what} (passes run before it: {before})",
                            pass_name=p.name, ran_before=list(ctx.passes_run))
            err.__cause__ = cause
            return err

        try:
            session = make_session(ir.to_proto(model), target=ctx.target)
        except Exception as exc:
            raise fail(f"after pass '{p.name}' onnxruntime cannot load the model: {_first_line(exc)}",
                       exc) from exc
        wanted = [i.name for i in session.get_inputs()]
        missing = [name for name in wanted if name not in self._feeds]
        if missing:
            raise fail(f"pass '{p.name}' added graph input(s) {', '.join(missing)}; the model's "
                       "inputs must not change")
        try:
            actual = _run(session, {k: self._feeds[k] for k in wanted})
        except Exception as exc:
            raise fail(f"after pass '{p.name}' onnxruntime fails to run the model: {_first_line(exc)}",
                       exc) from exc
        self.numeric_checks += 1
        comparison = compare_outputs(self._expected, actual, rtol=self.rtol, atol=self.atol)
        bad = comparison.first_failure()
        if bad is not None:
            others = [o.name for o in comparison.outputs if not o.ok and o is not bad]
            also = f" (also {', '.join(others)})" if others else ""
            raise fail(f"pass '{p.name}' changed output '{bad.name}': {bad.reason}{also}; compared "
                       f"with the input model on seeded inputs (seed={self.seed})")
        logger.debug("verify-each: outputs unchanged after %s", p.name)


def _run(session: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
