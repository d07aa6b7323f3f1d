"""Analyses over the IR: statistics, and (as the library grows) cost models and graph algorithms."""

from __future__ import annotations

from graphopt.analysis._stats import ModelStats, model_stats

__all__ = ["ModelStats", "model_stats"]

from graphopt.analysis._flops import FlopsReport, NodeFlops, bind_and_infer_shapes, estimate_flops

__all__ += ["FlopsReport", "NodeFlops", "bind_and_infer_shapes", "estimate_flops"]

from graphopt.analysis._cost import (DUPLICATE_BYTES, SHAPE_OPS, GraphCost, graph_cost,
                                     peak_activation_bytes)
from graphopt.analysis._partition import (BALANCES, DeviceModel, PartitionPlan, PlannedPartition,
                                          chain_cut_bytes, find_branches, plan_branches, plan_groups,
                                          plan_stages)

__all__ += ["DUPLICATE_BYTES", "SHAPE_OPS", "GraphCost", "graph_cost", "peak_activation_bytes", "BALANCES",
            "DeviceModel", "PartitionPlan", "PlannedPartition", "chain_cut_bytes", "find_branches",
            "plan_branches", "plan_groups", "plan_stages"]
