"""Cleanup passes: dead code, ``Identity`` nodes, duplicate initializers, node order."""

from __future__ import annotations

from graphopt.passes.cleanup.dead_code import EliminateDeadCode
from graphopt.passes.cleanup.dedup import DedupInitializers
from graphopt.passes.cleanup.identity import EliminateIdentity
from graphopt.passes.cleanup.topo_sort import TopoSort

__all__ = ["EliminateDeadCode", "EliminateIdentity", "DedupInitializers", "TopoSort"]
