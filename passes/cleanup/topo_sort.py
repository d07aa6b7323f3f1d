"""``topo-sort``: put the nodes of every graph in a topological order.

Many ONNX files in the wild list nodes out of order; several passes assume producers come before
users. Sorting is stable (an order that is already valid is kept) and covers the main graph,
every subgraph and every function body. Sorting never changes what the model computes, so it is
not a rewrite counted against ``--bisect-limit``: passes that run later rely on the order.
"""

from __future__ import annotations

import logging

from graphopt import ir
from graphopt.pipeline import Pass, PassContext, PassResult

__all__ = ["TopoSort"]

logger = logging.getLogger(__name__)


class TopoSort(Pass):
    """Sort the nodes of every graph topologically (stable); provides ``topo-sorted``.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> TopoSort().run(model, PassContext()).changed  # doctest: +SKIP
        True
    """

    name = "topo-sort"
    opt_level = 0
    provides = frozenset({"topo-sorted"})
    preserves = frozenset({"topo-sorted"})

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Sort each graph; raises ``VerificationError`` naming the graph when it has a cycle."""
        sorted_graphs = 0
        for graph in list(model.all_graphs()):
            if graph.sort():
                sorted_graphs += 1
                logger.debug("reordered the nodes of graph '%s'", graph.name)
        if sorted_graphs:
            logger.info("topo-sort: reordered %d graph(s)", sorted_graphs)
        return PassResult(sorted_graphs > 0, {"sorted-graphs": sorted_graphs})
