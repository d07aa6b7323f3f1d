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
from typing import Any, Callable

from graphopt.errors import GraphoptError, PassError, PipelineError
from graphopt.ir import Model
from graphopt.pipeline._context import PassContext
from graphopt.pipeline._parse import FixpointStep, PassStep, Step, format_pipeline, parse_pipeline
from graphopt.pipeline._pass import Pass, PassResult

__all__ = ["PassManager", "PassRecord", "PipelineReport", "AnalysisCache"]

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
    """Everything a pipeline run did, pass by pass."""

    pipeline: str
    records: list[PassRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

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


class AnalysisCache:
    """Results of analyses keyed by name, dropped when a pass that does not preserve them changes the model."""

    def __init__(self) -> None:
        self._results: dict[str, Any] = {}

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        """The cached result of ``name``, computing it on first use."""
        if name not in self._results:
            self._results[name] = compute()
        return self._results[name]

    def invalidate(self, keep: frozenset[str] = frozenset()) -> None:
        """Forget every analysis not in ``keep``."""
        self._results = {k: v for k, v in self._results.items() if k in keep}


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
        self.analyses = AnalysisCache()
        self._properties: set[str] = set()
        self._ran: list[str] = []
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
                cls = self.ctx.get_registry().get(s.name)
                opts = {k.replace("-", "_"): v for k, v in s.options.items()}
                opts = {**{k.replace("-", "_"): v for k, v in self.ctx.options.get(s.name, {}).items()}, **opts}
                self._instances[id(s)] = cls(**opts)

    def _instance(self, step: PassStep | Pass) -> Pass:
        if isinstance(step, Pass):
            return step
        return self._instances[id(step)]

    def run(self, model: Model) -> PipelineReport:
        """Run the pipeline on ``model`` in place and report what each pass did."""
        report = PipelineReport(self.pipeline_text)
        start = time.perf_counter()
        for inst in self.ctx.instruments:
            inst.on_pipeline_start(model, self.ctx, report)
        try:
            self._run_steps(self.steps, model, report, 0)
        finally:
            report.seconds = time.perf_counter() - start
            for inst in self.ctx.instruments:
                inst.on_pipeline_end(model, self.ctx, report)
        return report

    def _run_steps(self, steps: list[Any], model: Model, report: PipelineReport, round_: int) -> bool:
        changed = False
        for step in steps:
            if self.ctx.bisect_stopped:
                break
            if isinstance(step, FixpointStep):
                changed |= self._run_fixpoint(step, model, report)
            else:
                changed |= self._run_pass(self._instance(step), model, report, round_)
        return changed

    def _run_fixpoint(self, step: FixpointStep, model: Model, report: PipelineReport) -> bool:
        cap = step.max_iterations or self.ctx.limits.max_fixpoint_iterations
        any_change = False
        for round_ in range(1, cap + 1):
            first = len(report.records)
            changed = self._run_steps(step.steps, model, report, round_)
            any_change |= changed
            if not changed or self.ctx.bisect_stopped:
                return any_change
        still = sorted({r.name for r in report.records[first:] if r.changed})
        msg = (f"fixpoint group {step} hit its cap of {cap} rounds; still changing: "
               f"{', '.join(still)} (raise max= or report the passes that undo each other)")
        logger.warning(msg)
        report.warnings.append(msg)
        return any_change

    def _ensure_requirements(self, p: Pass, model: Model, report: PipelineReport, round_: int) -> None:
        missing = [r for r in sorted(p.requires) if r not in self._properties]
        for prop in missing:
            provider = next((cls for cls in self.ctx.get_registry().passes() if prop in cls.provides), None)
            if provider is None:
                raise PipelineError(f"pass '{p.name}' requires '{prop}', which no registered pass provides")
            self._run_pass(provider(), model, report, round_)

    def _run_pass(self, p: Pass, model: Model, report: PipelineReport, round_: int) -> bool:
        if self.ctx.is_disabled(p.name):
            logger.debug("skipping disabled pass %s", p.name)
            return False
        self._ensure_requirements(p, model, report, round_)
        for inst in self.ctx.instruments:
            inst.before_pass(p, model, self.ctx)
        self.ctx.current_pass = p.name
        t0 = time.perf_counter()
        try:
            result = p.run(model, self.ctx)
        except GraphoptError:
            raise
        except Exception as exc:
            for inst in self.ctx.instruments:
                inst.on_pass_error(p, model, self.ctx, exc, list(self._ran))
            before = ", ".join(self._ran[-8:]) or "none"
            repro = model.meta.get("reproducer")
            msg = (f"pass '{p.name}' failed: {type(exc).__name__}: {exc} "
                   f"(passes run before it: {before})")
            if repro:
                msg += f"; reproducer saved to {repro}"
            raise PassError(msg, pass_name=p.name, ran_before=list(self._ran), reproducer=repro) from exc
        finally:
            self.ctx.current_pass = ""
        seconds = time.perf_counter() - t0
        if not isinstance(result, PassResult):
            result = PassResult(bool(result))
        self._ran.append(p.name)
        record = PassRecord(p.name, result.changed, dict(result.counters), seconds, round_)
        report.records.append(record)
        if result.changed:
            self._properties &= set(p.preserves)
            self.analyses.invalidate(p.preserves)
        self._properties |= set(p.provides)
        for inst in self.ctx.instruments:
            inst.after_pass(p, model, self.ctx, record)
        logger.info("%s: %s in %.1f ms %s", p.name, "changed" if result.changed else "no change",
                    seconds * 1e3, result.counters or "")
        return result.changed


def describe(steps: list[Step]) -> str:
    """The canonical pipeline string (alias of :func:`format_pipeline`)."""
    return format_pipeline(steps)
