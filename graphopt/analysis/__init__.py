"""Analyses over the IR: statistics, and (as the library grows) cost models and graph algorithms."""

from __future__ import annotations

from graphopt.analysis._stats import ModelStats, model_stats

__all__ = ["ModelStats", "model_stats"]

from graphopt.analysis._flops import FlopsReport, NodeFlops, bind_and_infer_shapes, estimate_flops

__all__ += ["FlopsReport", "NodeFlops", "bind_and_infer_shapes", "estimate_flops"]
