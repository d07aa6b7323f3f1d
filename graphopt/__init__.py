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

__all__ = ["load", "save", "optimize", "optimize_model", "quantize", "prune", "partition",
           "GraphoptError", "__version__"]

# The quantization, pruning and partitioning front ends import more of the library (runtime
# sessions, calibration, networkx); they load on first use to keep ``import graphopt`` fast.
_LAZY_API = {
    "quantize": "graphopt._quantize",
    "prune": "graphopt._prune",
    "partition": "graphopt._partition",
}


def __getattr__(name: str) -> object:
    """Import the lazily loaded API functions (``quantize``, ``prune``, ``partition``) on first use."""
    module_name = _LAZY_API.get(name)
    if module_name is None:
        raise AttributeError(f"module 'graphopt' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(module_name), name)
