"""``PassContext``: every setting a pipeline run reads. No globals, no environment switches.

Passes read their configuration from the context they are given (``ctx.target``,
``ctx.limits.max_fold_bytes``...) and report rewrites through :meth:`PassContext.allow_rewrite`,
which enforces ``--bisect-limit``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from graphopt.pipeline._instruments import Instrument
    from graphopt.pipeline._registry import PassRegistry

__all__ = ["PassContext", "Limits", "TARGETS", "AnalysisCache"]

logger = logging.getLogger(__name__)

#: Targets graphopt can emit for: onnxruntime's CPU and CUDA execution providers.
TARGETS = ("cpu", "cuda")


@dataclass
class Limits:
    """Size limits that keep passes from blowing up a model or memory."""

    #: A folded constant larger than this is not materialized (bytes).
    max_fold_bytes: int = 16 * 1024 * 1024
    #: Fixed-point groups without an explicit ``max`` stop after this many rounds.
    max_fixpoint_iterations: int = 8
    #: The greedy rewrite driver stops after this many rewrites per pass run.
    max_rewrites: int = 1_000_000


class AnalysisCache:
    """Results of analyses keyed by name, kept until a pass that does not preserve them changes the model.

    Passes reach it as ``ctx.analyses``; the pass manager drops every result a changing pass
    does not list in its ``preserves``.

    Example:
        >>> cache = AnalysisCache()
        >>> cache.get("node-count", lambda: 3)
        3
        >>> cache.invalidate()
        >>> "node-count" in cache
        False
    """

    def __init__(self) -> None:
        self._results: dict[str, Any] = {}

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        """The cached result of ``name``, computing it on first use."""
        if name not in self._results:
            self._results[name] = compute()
        return self._results[name]

    def __contains__(self, name: str) -> bool:
        """True when a result for ``name`` is cached."""
        return name in self._results

    def invalidate(self, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Forget every analysis not in ``keep``."""
        self._results = {k: v for k, v in self._results.items() if k in keep}


@dataclass
class PassContext:
    """Configuration and shared state of one pipeline run.

    Attributes:
        opt_level: 0-3; passes above it are skipped by the preset pipelines.
        target: ``"cpu"`` or ``"cuda"``: which execution provider the output is for.
        enabled: pass names to run even when the level would skip them.
        disabled: pass names never to run.
        limits: size and iteration limits.
        instruments: observers called around every pass (timing, dumps, verification).
        seed: seed of every random choice (generated inputs, sampling).
        bisect_limit: apply at most this many rewrites in the whole run (``None``: no limit).
        registry: where pass names are looked up (built-ins plus plugins by default).
        options: free-form settings for plugin passes, keyed by pass name.
        rewrites_applied: rewrites granted by :meth:`allow_rewrite` in the current run.
        bisect_stopped: True once ``bisect_limit`` refused a rewrite or cut the pipeline short.
        current_pass: name of the pass running now (set by the pass manager).
        passes_run: names of the passes that completed in the current run, in order (set by the
            pass manager; during a pass's hooks it does not yet include that pass).
        last_rewrite: ``"<pass>: <description>"`` of the last rewrite granted (for bisecting).
        analyses: cached analysis results, invalidated by the pass manager.

    Example:
        >>> ctx = PassContext(opt_level=3, target="cpu", disabled={"dedup-initializers"})
        >>> ctx.is_disabled("dedup-initializers")
        True
    """

    opt_level: int = 2
    target: str = "cpu"
    enabled: set[str] = field(default_factory=set)
    disabled: set[str] = field(default_factory=set)
    limits: Limits = field(default_factory=Limits)
    instruments: list[Instrument] = field(default_factory=list)
    seed: int = 0
    bisect_limit: int | None = None
    registry: PassRegistry | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    rewrites_applied: int = 0
    bisect_stopped: bool = False
    #: Name of the pass running now (set by the pass manager; used in messages and metadata).
    current_pass: str = ""
    passes_run: list[str] = field(default_factory=list)
    last_rewrite: str = ""
    analyses: AnalysisCache = field(default_factory=AnalysisCache)

    def __post_init__(self) -> None:
        from graphopt.errors import PipelineError

        if self.target not in TARGETS:
            raise PipelineError(f"unknown target '{self.target}'; choose one of {', '.join(TARGETS)}")
        if not 0 <= self.opt_level <= 3:
            raise PipelineError(f"opt level must be 0-3, got {self.opt_level}")

    def is_disabled(self, pass_name: str) -> bool:
        """True when the user disabled ``pass_name``."""
        return pass_name in self.disabled

    def allow_rewrite(self, description: str = "") -> bool:
        """Ask to apply one more rewrite; False once ``bisect_limit`` rewrites were applied.

        Every pass calls this before each individual change it makes, so ``--bisect-limit N``
        can stop a run right after the N-th change and find the one that breaks a model.
        """
        if self.bisect_limit is not None and self.rewrites_applied >= self.bisect_limit:
            if not self.bisect_stopped:
                logger.info("bisect limit %d reached in %s; skipping: %s", self.bisect_limit,
                            self.current_pass, description)
                self.bisect_stopped = True
            return False
        self.rewrites_applied += 1
        self.last_rewrite = f"{self.current_pass}: {description}" if description else self.current_pass
        if self.bisect_limit is not None:
            logger.info("rewrite #%d (%s): %s", self.rewrites_applied, self.current_pass, description)
        return True

    def bisect_limit_reached(self) -> bool:
        """True once ``bisect_limit`` rewrites were granted: nothing more may change the model."""
        return self.bisect_limit is not None and self.rewrites_applied >= self.bisect_limit

    def rng(self, salt: str = "") -> random.Random:
        """A random generator seeded from ``seed`` and ``salt`` (stable across runs)."""
        return random.Random(f"{self.seed}:{salt}")

    def get_registry(self) -> PassRegistry:
        """The registry in use, creating the default one (built-ins + plugins) on first use."""
        if self.registry is None:
            from graphopt.pipeline._registry import PassRegistry

            self.registry = PassRegistry.default()
        return self.registry
