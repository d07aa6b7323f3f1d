"""Built-in prune passes: structured (channels, neurons, heads) and unstructured (sparse weights)."""

from __future__ import annotations

from graphopt.passes.prune.structured import PruneChannels
from graphopt.passes.prune.unstructured import PruneUnstructured

from graphopt.pipeline import Pass

PASSES: list[type[Pass]] = [PruneChannels, PruneUnstructured]

__all__ = ["PASSES", "PruneChannels", "PruneUnstructured"]
