"""``partition-stages``: annotate every node with the pipeline stage a plan puts it in.

The pass plans stages with :func:`graphopt.analysis.plan_stages` and records the result in
``node.meta["partition"]`` (stage index) and ``node.meta["partition_name"]``, without changing
the graph: later passes, instruments and ``graphopt partition`` read the annotation. The plan
itself is kept in ``model.meta["partition_plan"]``.
"""

from __future__ import annotations

import logging

from graphopt import ir
from graphopt.analysis import graph_cost, plan_stages
from graphopt.pipeline import Pass, PassContext, PassResult

__all__ = ["PartitionStages"]

logger = logging.getLogger(__name__)


class PartitionStages(Pass):
    """Annotate nodes with their pipeline stage (``node.meta["partition"]``); the graph is unchanged.

    Options: ``stages`` (count), ``memory_budget`` (bytes per stage, 0 = none), ``balance``
    (``flops``, ``memory``, ``latency``), ``default_dim`` (size of symbolic dims).
    """

    name = "partition-stages"
    opt_level = 3
    options = {"stages": 2, "memory_budget": 0, "balance": "flops", "default_dim": 1}
    description = "annotate nodes with the pipeline stage of a balanced cut (no graph change)"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Plan and annotate; counters: ``stages``, ``annotated``."""
        budget = int(self.config.get("memory_budget", 0)) or None
        cost = graph_cost(model, default_dim=int(self.config.get("default_dim", 1)))
        plan = plan_stages(cost, int(self.config.get("stages", 2)) if not budget else None,
                           memory_budget=budget, balance=str(self.config.get("balance", "flops")))
        nodes = model.graph.nodes
        annotated = 0
        for index, part in enumerate(plan.partitions):
            for i in part.nodes:
                nodes[i].meta["partition"] = index
                nodes[i].meta["partition_name"] = part.name
                annotated += 1
        model.meta["partition_plan"] = plan
        logger.info("partition-stages: %d node(s) annotated over %d stage(s)", annotated, len(plan.partitions))
        return PassResult(changed=False, counters={"stages": len(plan.partitions), "annotated": annotated})
