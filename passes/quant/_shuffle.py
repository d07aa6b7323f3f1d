"""Channel shuffles on integers: ``Reshape → Transpose → Reshape`` as one ``Gather`` on channels.

ShuffleNet-style channel shuffles split the channel axis, swap two axes and merge them back:
``[N, C, H, W] → [N, g, C/g, H, W] → [N, C/g, g, H, W] → [N, C, H, W]``. Between QLinearConvs
onnxruntime runs them on uint8 in NCHW while the convolutions run in NHWC, so each shuffle costs
a 5-D uint8 Transpose and the layout Transposes around it (measured on ShuffleNet: 34 Transposes,
7.2 of 13.8 ms). The same permutation as ``Gather(x, indices, axis=1)`` with constant indices is
one op onnxruntime also runs on integers (a DQ/Q pair around it is dropped): a ``Conv → shuffle →
Conv`` block of 48 channels at 28x28 ran in 0.155 ms instead of 0.406 ms.

The permutation is not assumed from the shapes: the chain is applied to index arrays, and the
rewrite happens only when the result provably moves whole channels and leaves every batch and
spatial position where it was.
"""

from __future__ import annotations

import logging

import numpy as np

from graphopt import ir

__all__ = ["channel_shuffle_indices"]

logger = logging.getLogger(__name__)

#: Largest tensor (elements) the permutation is proven on.
_MAX_PROOF_ELEMENTS = 1 << 22


def _static_dims(value: ir.Value) -> tuple[int, ...] | None:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape.dims):
        return None
    return tuple(int(d) for d in shape.dims)


def _reshape_target(node: ir.Node, source: tuple[int, ...]) -> tuple[int, ...] | None:
    """The static shape a Reshape with a constant target gives ``source`` (0 copies, -1 infers)."""
    target = node.inputs[1] if len(node.inputs) > 1 else None
    if target is None or not target.is_constant() or target.const_value is None:
        return None
    dims = [int(d) for d in target.const_value.numpy().reshape(-1)]
    if not int(node.attr("allowzero", 0)):
        dims = [source[i] if d == 0 and i < len(source) else d for i, d in enumerate(dims)]
    if dims.count(-1) > 1 or any(d < -1 for d in dims):
        return None
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1]))
        total = int(np.prod(source))
        if known == 0 or total % known:
            return None
        dims[dims.index(-1)] = total // known
    return tuple(dims) if int(np.prod(dims)) == int(np.prod(source)) else None


def channel_shuffle_indices(first: ir.Node) -> tuple[list[ir.Node], np.ndarray] | None:
    """The ``Reshape → Transpose → Reshape`` chain starting at ``first`` and the channel indices
    of the ``Gather(axis=1)`` it equals, or ``None`` when it is not a pure channel permutation.

    Example:
        >>> nodes, indices = channel_shuffle_indices(reshape_node)  # doctest: +SKIP
        >>> indices.tolist()  # 2 groups of 3 channels
        [0, 3, 1, 4, 2, 5]
    """
    chain = [first]
    for op in ("Transpose", "Reshape"):
        out = chain[-1].outputs[0]
        if out.is_graph_output() or len(out.uses()) != 1:
            return None
        user = out.uses()[0][0]
        if user.op_type != op or user.domain not in ("", "ai.onnx") or user.graph is not first.graph:
            return None
        chain.append(user)
    source = _static_dims(first.inputs[0])
    if source is None or len(source) != 4 or int(np.prod(source)) > _MAX_PROOF_ELEMENTS:
        return None
    split = _reshape_target(first, source)
    if split is None:
        return None
    perm = chain[1].attr("perm", None)
    perm = tuple(int(p) for p in perm) if perm is not None else tuple(reversed(range(len(split))))
    if sorted(perm) != list(range(len(split))):
        return None
    swapped = tuple(split[p] for p in perm)
    merged = _reshape_target(chain[2], swapped)
    if merged != source:
        return None
    n, c, h, w = source
    channel = np.broadcast_to(np.arange(c, dtype=np.int64).reshape(1, c, 1, 1), source)
    place = np.broadcast_to(np.arange(n * h * w, dtype=np.int64).reshape(n, 1, h, w), source)

    def apply(array: np.ndarray) -> np.ndarray:
        return array.reshape(split).transpose(perm).reshape(merged)

    moved_channel, moved_place = apply(channel), apply(place)
    if not np.array_equal(moved_place, place):
        return None  # a batch or spatial position moves: not a channel permutation
    indices = moved_channel[0, :, 0, 0].copy()
    if not np.array_equal(moved_channel, np.broadcast_to(indices.reshape(1, c, 1, 1), source)):
        return None
    return chain, indices
