"""The pass manager: runs a parsed pipeline over a model, with instruments around every pass.

Requirements are met on demand: a pass that ``requires`` a property (e.g. ``topo-sorted``) that
no earlier pass ``provides`` and kept gets the registered pass that provides it run first. A
pass that changed the model invalidates every property and cached analysis it does not
``preserve``. Fixed-point groups rerun until a round changes nothing, and warn, naming the
passes that kept changing, when they hit their cap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from graphopt.errors import GraphoptError, PassError, PipelineError
from graphopt.ir import Model
from graphopt.pipeline._context import AnalysisCache, PassContext
from graphopt.pipeline._parse import FixpointStep, PassStep, Step, format_pipeline, parse_pipeline
from graphopt.pipeline._pass import Pass, PassResult

__all__ = ["PassManager", "PassRecord", "PipelineReport", "AnalysisCache", "describe_ran_before"]

logger = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """One pass execution: name, whether it changed the model, counters, seconds."""

    name: str
    changed: bool
    counters: dict[str, int]
    seconds: float
    round: int = 0


@dataclass
class PipelineReport:
    """Everything a pipeline run did, pass by pass.

    Attributes:
        pipeline: the canonical pipeline string that ran.
        records: one :class:`PassRecord` per pass execution, in order.
        warnings: fixed-point caps hit, passes skipped, the bisect limit stopping the run.
        seconds: wall time of the whole run.
        rewrites_applied: rewrites the passes applied (granted by ``ctx.allow_rewrite``).
        bisect_limit: the ``--bisect-limit`` in force, if any.
        bisect_stopped: True when the bisect limit refused a rewrite or skipped later passes.
        last_rewrite: ``"<pass>: <description>"`` of the last rewrite applied.
    """

    pipeline: str
    records: list[PassRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rewrites_applied: int = 0
    bisect_limit: int | None = None
    bisect_stopped: bool = False
    last_rewrite: str = ""

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per pass name: runs, times changed, total seconds and summed counters."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.records:
            t = out.setdefault(r.name, {"runs": 0, "changed": 0, "seconds": 0.0, "counters": {}})
            t["runs"] += 1
            t["changed"] += int(r.changed)
            t["seconds"] += r.seconds
            for k, v in r.counters.items():
                t["counters"][k] = t["counters"].get(k, 0) + v
        return out

    @property
    def changed(self) -> bool:
        """True when any pass changed the model."""
        return any(r.changed for r in self.records)


def describe_ran_before(names: list[str], *, last: int = 8) -> str:
    """``"a, b, c"`` for the passes that ran before a failure (the last ``last`` of them).

    Example:
        >>> describe_ran_before(["a", "b"])
        'a, b'
        >>> describe_ran_before([])
        'none'
    """
    if not names:
        return "none"
    shown = ", ".join(names[-last:])
    return f"{len(names) - last} earlier, then {shown}" if len(names) > last else shown


class PassManager:
    """Runs a pipeline (a string or a list of pass instances) with a :class:`PassContext`.

    Example:
        >>> pm = PassManager("eliminate-identity,eliminate-dead-code", PassContext())  # doctest: +SKIP
        >>> report = pm.run(model)  # doctest: +SKIP
        >>> [r.name for r in report.records]  # doctest: +SKIP
        ['eliminate-identity', 'eliminate-dead-code']
    """

    def __init__(self, pipeline: str | list[Step] | list[Pass], ctx: PassContext | None = None) -> None:
        self.ctx = ctx or PassContext()
        registry = self.ctx.get_registry()
        if isinstance(pipeline, str):
            self.steps: list[Step | Pass] = list(parse_pipeline(pipeline, registry))
        else:
            self.steps = list(pipeline)
        self._instances: dict[int, Pass] = {}
        #: The context's analysis cache (``ctx.analyses``), kept here for convenience.
        self.analyses: AnalysisCache = self.ctx.analyses
        self._properties: set[str] = set()
        # A pass that changed nothing needs no rerun (in a fixed-point group's next round) while
        # no pass has changed the model since: ``_changes`` counts changing runs, ``_clean_at``
        # holds that count after each pass instance's last run that changed nothing (with the
        # instance, so that its id is not reused by another while the entry exists).
        self._changes = 0
        self._clean_at: dict[int, tuple[Pass, int]] = {}
        # Build every pass up front so option errors surface before any work is done.
        self._materialize(self.steps)

    @property
    def pipeline_text(self) -> str:
        """The pipeline as a canonical string."""
        return ",".join(str(s) if not isinstance(s, Pass) else repr(s) for s in self.steps)

    def _materialize(self, steps: list[Any]) -> None:
        for s in steps:
            if isinstance(s, FixpointStep):
                self._materialize(s.steps)
            elif isinstance(s, PassStep):
                self._instances[id(s)] = self._build(self.ctx.get_registry().get(s.name), s.options)

    def _build(self, cls: type[Pass], options: dict[str, Any]) -> Pass:
        """An instance of ``cls`` with ``ctx.options[name]`` overridden by the pipeline's options."""
        defaults = {k.replace("-", "_"): v for k, v in self.ctx.options.get(cls.name, {}).items()}
        return cls(**{**defaults, **{k.replace("-", "_"): v for k, v in options.items()}})

    def _instance(self, step: PassStep | Pass) -> Pass:
        if isinstance(step, Pass):
            return step
        return self._instances[id(step)]

    def run(self, model: Model) -> PipelineReport:
        """Run the pipeline on ``model`` in place and report what each pass did.

        Raises:
            PassError: a pass raised an unexpected exception, or an instrument (``VerifyEach``)
                found that a pass broke the model; it names the pass and those that ran before.
            GraphoptError: a pass rejected the model or its configuration (passed on unchanged).
        """
        ctx = self.ctx
        # A top-level run starts afresh. A pipeline run from inside a pass shares the outer run's
        # state and instruments, which see its passes but not a second start or end.
        nested = bool(ctx.current_pass)
        if not nested:
            ctx.rewrites_applied = 0
            ctx.bisect_stopped = False
            ctx.last_rewrite = ""
            ctx.passes_run = []
            ctx.analyses.invalidate()
        self._properties = set()
        self._changes = 0
        self._clean_at = {}
        report = PipelineReport(self.pipeline_text, bisect_limit=ctx.bisect_limit)
        start = time.perf_counter()
        for inst in ctx.instruments if not nested else ():
            inst.on_pipeline_start(model, ctx, report)
        try:
            self._run_steps(self.steps, model, report, 0)
        finally:
            report.seconds = time.perf_counter() - start
            report.rewrites_applied = ctx.rewrites_applied
            report.bisect_stopped = ctx.bisect_stopped
            report.last_rewrite = ctx.last_rewrite
            if ctx.bisect_stopped:
                msg = (f"bisect limit {ctx.bisect_limit} reached: {ctx.rewrites_applied} rewrite(s) "
                       f"applied, the last in {ctx.last_rewrite or 'none'}; later rewrites and passes "
                       "were skipped")
                logger.info(msg)  # asked for, so not a warning; the report still says it
                report.warnings.append(msg)
            for inst in ctx.instruments if not nested else ():
                inst.on_pipeline_end(model, ctx, report)
        return report

    def _bisect_cut(self) -> bool:
        """True (and remembered in the context) once the bisect limit forbids further passes."""
        if self.ctx.bisect_limit_reached():
            self.ctx.bisect_stopped = True
            return True
        return False

    def _run_steps(self, steps: list[Any], model: Model, report: PipelineReport, round_: int) -> bool:
        changed = False
        for step in steps:
            if self._bisect_cut():
                break
            if isinstance(step, FixpointStep):
                changed |= self._run_fixpoint(step, model, report)
            else:
                changed |= self._run_pass(self._instance(step), model, report, round_)
        return changed

    def _run_fixpoint(self, step: FixpointStep, model: Model, report: PipelineReport) -> bool:
        cap = step.max_iterations or self.ctx.limits.max_fixpoint_iterations
        any_change = False
        first = len(report.records)
        for round_ in range(1, cap + 1):
            first = len(report.records)
            changed = self._run_steps(step.steps, model, report, round_)
            any_change |= changed
            if not changed:
                return any_change
            if self._bisect_cut():  # another round would follow, but may not change anything
                return any_change
        still = sorted({r.name for r in report.records[first:] if r.changed})
        msg = (f"fixpoint group {step} hit its cap of {cap} rounds; still changing: "
               f"{', '.join(still)} (raise max= or report the passes that undo each other)")
        logger.warning(msg)
        report.warnings.append(msg)
        return any_change

    def _ensure_requirements(self, p: Pass, model: Model, report: PipelineReport, round_: int) -> bool:
        """Run providers of the properties ``p`` requires; False when one cannot be provided."""
        for prop in sorted(p.requires):
            if prop in self._properties:
                continue
            providers = [cls for cls in self.ctx.get_registry().passes() if prop in cls.provides]
            if not providers:
                raise PipelineError(f"pass '{p.name}' requires '{prop}', which no registered pass "
                                    "provides (load the plugin that provides it)")
            usable = [cls for cls in providers if not self.ctx.is_disabled(cls.name)]
            if not usable:
                msg = (f"skipping pass '{p.name}': it requires '{prop}', and its provider(s) "
                       f"{', '.join(c.name for c in providers)} are disabled")
                logger.warning(msg)
                report.warnings.append(msg)
                return False
            self._run_pass(self._build(usable[0], {}), model, report, round_)
            if prop not in self._properties:
                if self.ctx.bisect_stopped:
                    return False
                raise PipelineError(f"pass '{usable[0].name}' ran but did not provide '{prop}' "
                                    f"that pass '{p.name}' requires")
        return True

    def _run_pass(self, p: Pass, model: Model, report: PipelineReport, round_: int) -> bool:
        ctx = self.ctx
        if ctx.is_disabled(p.name):
            logger.debug("skipping disabled pass %s", p.name)
            return False
        clean = self._clean_at.get(id(p))
        if clean is not None and clean[0] is p and clean[1] == self._changes:
            # Same pass, same options, same model as when it last found nothing to do.
            logger.debug("skipping %s: nothing changed since its last run, which changed nothing", p.name)
            return False
        if self._bisect_cut() or not self._ensure_requirements(p, model, report, round_):
            return False
        before = list(ctx.passes_run)
        outer_pass = ctx.current_pass
        try:
            for inst in ctx.instruments:
                inst.before_pass(p, model, ctx)
            ctx.current_pass = p.name
            t0 = time.perf_counter()
            try:
                result = p.run(model, ctx)
            except GraphoptError:
                raise
            except Exception as exc:
                model.meta.pop("reproducer", None)
                for inst in ctx.instruments:
                    inst.on_pass_error(p, model, ctx, exc, list(before))
                repro = model.meta.get("reproducer")
                msg = (f"pass '{p.name}' failed: {type(exc).__name__}: {exc} "
                       f"(passes run before it: {describe_ran_before(before)})")
                if repro:
                    msg += f"; reproducer saved to {repro}"
                raise PassError(msg, pass_name=p.name, ran_before=before, reproducer=repro) from exc
            finally:
                ctx.current_pass = outer_pass
            seconds = time.perf_counter() - t0
            if not isinstance(result, PassResult):
                result = PassResult(bool(result))
            record = PassRecord(p.name, result.changed, dict(result.counters), seconds, round_)
            report.records.append(record)
            if result.changed:
                self._properties &= set(p.preserves)
                ctx.analyses.invalidate(p.preserves)
                self._changes += 1
            else:
                self._clean_at[id(p)] = (p, self._changes)
            self._properties |= set(p.provides)
            for inst in ctx.instruments:
                inst.after_pass(p, model, ctx, record)
        except PassError as exc:
            if not exc.ran_before:  # raised by an instrument or a nested run: add the history
                exc.ran_before = before
            raise
        ctx.passes_run.append(p.name)
        logger.info("%s: %s in %.1f ms %s", p.name, "changed" if result.changed else "no change",
                    seconds * 1e3, result.counters or "")
        return result.changed


def describe(steps: list[Step]) -> str:
    """The canonical pipeline string (alias of :func:`format_pipeline`)."""
    return format_pipeline(steps)
