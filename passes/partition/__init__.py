"""Built-in partition passes: stage annotation, tensor-parallel splitting, and partition emission."""

from __future__ import annotations

from graphopt.pipeline import Pass
from graphopt.passes.partition._emit import EmittedPartition, emit_partitions, resolve_partitions
from graphopt.passes.partition.split_heavy import split_columns
from graphopt.passes.partition.stages import PartitionStages
from graphopt.passes.partition.tensor_parallel import SplitTensorParallel, split_tensor_parallel

PASSES: list[type[Pass]] = [PartitionStages, SplitTensorParallel]

__all__ = ["PASSES", "EmittedPartition", "PartitionStages", "SplitTensorParallel",
           "emit_partitions", "resolve_partitions", "split_columns", "split_tensor_parallel"]
