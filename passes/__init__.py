"""graphopt's built-in pass library (installed as ``graphopt.passes``).

Every pass here is written with the public API only (``graphopt.ir``, ``graphopt.pipeline``,
``graphopt.rewrite``), exactly as a plugin pass would be. ``PASSES`` lists the pass classes the
default registry loads; ``PIPELINES`` holds the ``O0``-``O3`` presets and named groups.

Example:
    >>> from graphopt.passes import PASSES
    >>> "eliminate-dead-code" in {p.name for p in PASSES}
    True
"""

from __future__ import annotations

from graphopt.passes.cleanup import DedupInitializers, EliminateDeadCode, EliminateIdentity, TopoSort
from graphopt.passes.cleanup.dedup_transposed import DedupTransposedInitializers
from graphopt.passes.contrib import CONTRIB_PASSES
from graphopt.passes.fold import FoldConstants, InferShapes
from graphopt.passes.fusion import FUSION_PASSES
from graphopt.passes.partition import PASSES as PARTITION_PASSES
from graphopt.passes.pipelines import PIPELINES
from graphopt.passes.prune import PASSES as PRUNE_PASSES
from graphopt.passes.quant import PASSES as QUANT_PASSES
from graphopt.passes.simplify import (EliminateCommonSubexpressions, EliminateNoOps, InlineConstantIf,
                                      MergeChains)
from graphopt.pipeline import Pass

PASSES: list[type[Pass]] = [
    # cleanup
    TopoSort,
    EliminateIdentity,
    EliminateDeadCode,
    DedupInitializers,
    DedupTransposedInitializers,
    # fold
    InferShapes,
    FoldConstants,
    # simplify
    InlineConstantIf,
    EliminateNoOps,
    MergeChains,
    EliminateCommonSubexpressions,
    # fusion (standard ONNX ops)
    *FUSION_PASSES,
    # fusion (onnxruntime contrib ops, where the target has the kernels)
    *CONTRIB_PASSES,
    # quantization, pruning, partitioning
    *QUANT_PASSES,
    *PRUNE_PASSES,
    *PARTITION_PASSES,
]

__all__ = ["PASSES", "PIPELINES"]
