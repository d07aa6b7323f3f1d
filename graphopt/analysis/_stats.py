"""Model statistics: node counts, op histogram, initializer counts and bytes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from graphopt.ir import Model, SparseTensor, Tensor

__all__ = ["ModelStats", "model_stats"]


@dataclass
class ModelStats:
    """Size figures of a model, across the main graph, subgraphs and functions."""

    nodes: int = 0
    ops: Counter = field(default_factory=Counter)
    initializers: int = 0
    initializer_bytes: int = 0
    functions: int = 0
    subgraphs: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"nodes": self.nodes, "ops": dict(sorted(self.ops.items())),
                "initializers": self.initializers, "initializer_bytes": self.initializer_bytes,
                "functions": self.functions, "subgraphs": self.subgraphs}


def model_stats(model: Model) -> ModelStats:
    """Count nodes (by op type, ``domain.Op`` for non-default domains) and initializer bytes.

    Example:
        >>> model_stats(model).ops.most_common(3)  # doctest: +SKIP
        [('Conv', 53), ('Relu', 49), ('Add', 16)]
    """
    stats = ModelStats(functions=len(model.functions))
    for g in model.all_graphs():
        if g is not model.graph and g.function is None:
            stats.subgraphs += 1
        for node in g:
            stats.nodes += 1
            stats.ops[f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
        for v in list(g.initializers.values()) + list(g.sparse_initializers.values()):
            stats.initializers += 1
            t = v.const_value
            if isinstance(t, (Tensor, SparseTensor)):
                stats.initializer_bytes += t.nbytes
    return stats
