"""graphopt: compiler-style graph optimization for ONNX models.

Load a model into graphopt's IR, transform it with a pass manager, and emit ONNX that
onnxruntime runs on its CPU and CUDA execution providers.

Example:
    >>> import graphopt
    >>> optimized = graphopt.optimize("model.onnx", level=2)   # doctest: +SKIP
    >>> graphopt.optimize("model.onnx", output="model.opt.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

from graphopt._api import load, optimize, optimize_model, save
from graphopt.errors import GraphoptError

__version__ = "0.1.0"

__all__ = ["load", "save", "optimize", "optimize_model", "GraphoptError", "__version__"]
