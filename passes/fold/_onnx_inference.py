"""onnx shape inference, guarded against its data propagation's memory trap.

With ``data_prop=True`` onnx propagates the *values* of small integer tensors (so ``Reshape``
targets computed from ``Shape`` resolve). Its propagation also expands any 1-D tensor it meets,
one dimension object per element: ``Gather``, ``Slice``, ``Cast`` or ``Unsqueeze`` of a
``Range``/``Tile`` output of 4 * 10^9 elements runs out of memory (measured with onnx 1.23).
So inference first runs without data propagation, which is safe; data propagation follows only
when no 1-D value longer than :data:`DATA_PROP_MAX_LENGTH` appears.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

import onnx

__all__ = ["infer_shapes", "DATA_PROP_MAX_LENGTH"]

logger = logging.getLogger(__name__)

#: 1-D values longer than this keep onnx's data propagation off.
DATA_PROP_MAX_LENGTH = 1 << 16


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    pending = [graph]
    while pending:
        g = pending.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    pending.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    pending.extend(attr.graphs)


def _longest_vector(model: onnx.ModelProto) -> int:
    """The length of the longest 1-D tensor value the (inferred) model declares."""
    longest = 0
    for g in _graphs(model.graph):
        for info in list(g.input) + list(g.value_info) + list(g.output):
            tt = info.type.tensor_type
            if info.type.HasField("tensor_type") and tt.HasField("shape") and len(tt.shape.dim) == 1:
                longest = max(longest, tt.shape.dim[0].dim_value)
        for t in g.initializer:
            if len(t.dims) == 1:
                longest = max(longest, t.dims[0])
    return longest


def infer_shapes(model: onnx.ModelProto) -> Optional[onnx.ModelProto]:
    """``onnx.shape_inference.infer_shapes`` (non-strict), with data propagation when it is safe.

    Returns ``None`` when inference fails altogether.

    Example:
        >>> inferred = infer_shapes(light_proto)  # doctest: +SKIP
    """
    try:
        encoded = model.SerializeToString()  # once for both runs (each would encode it again)
        first = onnx.shape_inference.infer_shapes(encoded, check_type=False, strict_mode=False, data_prop=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several exception types
        logger.debug("onnx shape inference failed: %s", exc)
        return None
    longest = _longest_vector(first)
    if longest > DATA_PROP_MAX_LENGTH:
        logger.debug("onnx data propagation left off: a 1-D value has %d elements", longest)
        return first
    try:
        return onnx.shape_inference.infer_shapes(encoded, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        logger.debug("onnx shape inference with data propagation failed: %s", exc)
        return first
