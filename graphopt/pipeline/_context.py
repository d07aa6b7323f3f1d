"""``PassContext``: every setting a pipeline run reads. No globals, no environment switches.

Passes read their configuration from the context they are given (``ctx.target``,
``ctx.limits.max_fold_bytes``...) and report rewrites through :meth:`PassContext.allow_rewrite`,
which enforces ``--bisect-limit``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphopt.pipeline._instruments import Instrument
    from graphopt.pipeline._registry import PassRegistry

__all__ = ["PassContext", "Limits", "TARGETS"]

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
        if self.bisect_limit is not None:
            logger.info("rewrite #%d (%s): %s", self.rewrites_applied, self.current_pass, description)
        return True

    def rng(self, salt: str = "") -> random.Random:
        """A random generator seeded from ``seed`` and ``salt`` (stable across runs)."""
        return random.Random(f"{self.seed}:{salt}")

    def get_registry(self) -> PassRegistry:
        """The registry in use, creating the default one (built-ins + plugins) on first use."""
        if self.registry is None:
            from graphopt.pipeline._registry import PassRegistry

            self.registry = PassRegistry.default()
        return self.registry
