"""Preset pipelines: ``O0``-``O3`` and the named groups they use.

Each preset is a pipeline string (see :func:`graphopt.pipeline.parse_pipeline`) built from the
named groups below, so a new family of passes is added by extending a group. ``graphopt passes
--pipeline -O2`` prints what a preset expands to.

Example:
    >>> PIPELINES["cleanup"]
    'eliminate-identity,eliminate-dead-code,dedup-initializers'
"""

from __future__ import annotations

__all__ = ["PIPELINES"]

#: Remove what does not contribute to the outputs; cheap and always safe.
CLEANUP = "eliminate-identity,eliminate-dead-code,dedup-initializers"

#: Passes that feed each other (one's removal exposes the other's work): run to a fixed point.
SIMPLIFY = "eliminate-identity,fold-constants,eliminate-dead-code"

PIPELINES: dict[str, str] = {
    "cleanup": CLEANUP,
    "simplify": SIMPLIFY,
    # O0 changes nothing a model computes; it only puts nodes in a valid order.
    "O0": "topo-sort",
    "O1": "topo-sort,cleanup",
    "O2": "topo-sort,infer-shapes,fixpoint<max=8>(simplify),dedup-initializers,eliminate-dead-code",
    "O3": "topo-sort,infer-shapes,fixpoint<max=8>(simplify),dedup-initializers,eliminate-dead-code",
}
