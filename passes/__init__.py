"""graphopt's built-in pass library (installed as ``graphopt.passes``).

Every pass here is written with the public API only (``graphopt.ir``, ``graphopt.pipeline``,
``graphopt.rewrite``), exactly as a plugin pass would be.
"""

from __future__ import annotations

from graphopt.passes.pipelines import PIPELINES

PASSES: list = []

__all__ = ["PASSES", "PIPELINES"]
