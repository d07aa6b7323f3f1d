"""Constant folding and shape inference: ``fold-constants`` and ``infer-shapes``."""

from __future__ import annotations

from graphopt.passes.fold.fold_constants import FoldConstants
from graphopt.passes.fold.infer_shapes import InferShapes

__all__ = ["FoldConstants", "InferShapes"]
