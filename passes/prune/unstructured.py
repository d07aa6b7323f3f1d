"""``prune-unstructured``: magnitude pruning of single weights, for compression only.

The smallest ``ratio`` of the weights (by ``|w|``) of every float Conv, ConvTranspose, Gemm and
MatMul weight are set to zero, and each such weight is stored as a sparse initializer
(``SparseTensorProto``: the non-zero values and their int64 linear indices) when that is smaller
than the dense tensor. onnxruntime densifies sparse initializers when it loads a model, so the
model gets smaller on disk but does not run faster; only structured pruning
(``prune-channels``) speeds it up.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import onnx
from graphopt.passes.prune.dependency import WEIGHTED_OPS
from onnx import numpy_helper

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pipeline import Pass, PassContext, PassResult

__all__ = ["SPEED_NOTE", "PruneUnstructured", "prune_unstructured"]

logger = logging.getLogger(__name__)

SPEED_NOTE = ("unstructured pruning only compresses the file: onnxruntime densifies sparse "
              "initializers at load time, so the model will not run faster (use --ratio for speed)")

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def _sparse(name: str, array: np.ndarray) -> onnx.SparseTensorProto:
    flat = array.reshape(-1)
    indices = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[indices], name)
    return onnx.helper.make_sparse_tensor(values, numpy_helper.from_array(indices), list(array.shape))


def prune_unstructured(model: ir.Model, ratio: float, ctx: PassContext | None = None) -> dict[str, int]:
    """Zero the smallest ``ratio`` of each weight and store it sparse where smaller; in place.

    Returns counters: ``weights``, ``zeroed`` (elements), ``sparse`` (weights stored sparse),
    ``dense-bytes`` and ``sparse-bytes`` (of the weights stored sparse).

    Example:
        >>> prune_unstructured(model, 0.9)["sparse"]  # doctest: +SKIP
        12
    """
    if not 0 <= ratio < 1:
        raise GraphoptError(f"the unstructured ratio must be in [0, 1) (got {ratio}); e.g. 0.8 zeroes 80% of the weights")
    graph = model.graph
    counters = {"weights": 0, "zeroed": 0, "sparse": 0, "dense-bytes": 0, "sparse-bytes": 0}
    if ratio == 0:
        return counters
    for name, value in list(graph.initializers.items()):
        if value.const_value is None or value.const_value.dtype not in _FLOATS or value.is_graph_input():
            continue
        if value.is_graph_output() or not any(n.op_type in WEIGHTED_OPS and i == 1 for n, i in value.uses()):
            continue
        if len(value.const_value.shape) < 2:
            continue
        if ctx is not None and not ctx.allow_rewrite(f"prune-unstructured: '{name}'"):
            break
        array = value.const_value.numpy().copy()
        k = int(np.floor(ratio * array.size))
        if k == 0:
            continue
        threshold_index = np.argsort(np.abs(array), axis=None, kind="stable")[:k]
        array.reshape(-1)[threshold_index] = 0
        counters["weights"] += 1
        counters["zeroed"] += k
        proto = _sparse(name, array)
        sparse_bytes = proto.values.ByteSize() + proto.indices.ByteSize()
        dense_bytes = array.nbytes
        if sparse_bytes < dense_bytes:
            del graph.initializers[name]
            value.const_value = ir.SparseTensor(proto)
            graph.sparse_initializers[name] = value
            counters["sparse"] += 1
            counters["dense-bytes"] += dense_bytes
            counters["sparse-bytes"] += sparse_bytes
        else:
            value.const_value = ir.ArrayTensor(array, name=name, dtype=value.const_value.dtype)
    logger.info("prune-unstructured: %d weight(s) pruned, %d stored sparse (%d -> %d bytes); %s",
                counters["weights"], counters["sparse"], counters["dense-bytes"], counters["sparse-bytes"],
                SPEED_NOTE)
    return counters


class PruneUnstructured(Pass):
    """Zero the smallest weights (magnitude pruning) and store them as sparse initializers.

    For compression only: onnxruntime densifies sparse initializers at load, so the model does
    not run faster. Option ``ratio``: the fraction of each weight set to zero.
    """

    name = "prune-unstructured"
    opt_level = 3
    options: ClassVar[dict[str, Any]] = {"ratio": 0.0}
    description = "magnitude pruning into sparse initializers (smaller file, not faster)"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Prune in place; counters from :func:`prune_unstructured`."""
        counters = prune_unstructured(model, float(self.config["ratio"]), ctx)
        return PassResult(changed=counters["weights"] > 0, counters=counters)
