"""``dedup-initializers``: store initializers with identical contents once per graph.

Two initializers are duplicates when they have the same element type, shape and bytes. Only
tensors in a group of equal ``(dtype, shape, nbytes)`` are compared. Large tensors are first
told apart by a fingerprint of a few kilobytes (their first, middle and last bytes), read
without loading the rest (file-backed and external weights are memory-mapped); only tensors with
equal fingerprints are hashed whole (``Tensor.digest()`` streams), and equal digests are
confirmed by comparing the bytes, so a merge never rests on a hash or a sample alone. Small
tensors (up to 12 KiB) of plain numeric types are keyed by the bytes of their arrays instead:
equal keys are equal contents. Readers of
a duplicate read the first one (in initializer order), and the duplicate is dropped.

Merging equal tensors changes no value's type or shape, so the pass preserves
``shapes-inferred`` (no ``infer-shapes`` rerun after it).

Never merged: graph inputs (IR < 4 overridable weights), graph outputs, values listed as the
output of any graph, and names the model's ``training_info`` refers to. Sparse initializers are
left alone. Each graph is handled on its own: a subgraph's initializer is not merged with an
enclosing graph's.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import onnx

from graphopt import ir
from graphopt.pipeline import Pass, PassContext, PassResult
from graphopt.passes.cleanup._scope import pinned_outputs, training_names

__all__ = ["DedupInitializers"]

logger = logging.getLogger(__name__)


class DedupInitializers(Pass):
    """Merge initializers with equal dtype, shape and bytes within each graph.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> DedupInitializers().run(model, PassContext()).counters  # doctest: +SKIP
        {'removed-initializers': 1, 'saved-bytes': 4096}
    """

    name = "dedup-initializers"
    opt_level = 1
    preserves = frozenset({"topo-sorted", "shapes-inferred"})

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Merge duplicates graph by graph."""
        pinned = pinned_outputs(model)
        keep_names = training_names(model)
        removed = saved = 0
        for graph in list(model.all_graphs()):
            inputs = {id(v) for v in graph.inputs}
            groups: dict[tuple[int, tuple[int, ...], int], list[ir.Value]] = {}
            for value in graph.initializers.values():
                tensor = value.const_value
                if (not isinstance(tensor, ir.Tensor) or id(value) in inputs or id(value) in pinned
                        or value.name in keep_names):
                    continue
                key = (tensor.dtype, tuple(tensor.shape), tensor.nbytes)
                groups.setdefault(key, []).append(value)
            for group in groups.values():
                if len(group) < 2:
                    continue
                for keep, duplicate in _duplicates(group):
                    if not ctx.allow_rewrite(f"replace initializer '{duplicate.name}' by its "
                                             f"duplicate '{keep.name}'"):
                        return _result(removed, saved)
                    duplicate.replace_all_uses_with(keep)
                    graph.remove_initializer(duplicate)
                    removed += 1
                    assert isinstance(duplicate.const_value, ir.Tensor)
                    saved += duplicate.const_value.nbytes
                    logger.debug("initializer '%s' duplicates '%s'; merged", duplicate.name, keep.name)
        if removed:
            logger.info("dedup-initializers: merged %d initializer(s), saving %d bytes", removed, saved)
        return _result(removed, saved)


def _result(removed: int, saved: int) -> PassResult:
    return PassResult(removed > 0, {"removed-initializers": removed, "saved-bytes": saved})


#: Bytes read from each of the start, middle and end of a large tensor for its fingerprint.
_SAMPLE_BYTES = 4096
#: Element types whose arrays are their raw bytes (a sample of the array is a sample of the bytes).
_SAMPLED_DTYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
})


def _fingerprint(tensor: ir.Tensor) -> bytes | None:
    """The first, middle and last 4 KiB of a large tensor's bytes; ``None`` for small tensors.

    Equal tensors have equal fingerprints, so tensors whose fingerprints differ need no hashing.

    Example:
        >>> t = ir.ArrayTensor(np.arange(8192, dtype=np.float32))
        >>> len(_fingerprint(t))
        12288
    """
    if tensor.dtype not in _SAMPLED_DTYPES or tensor.nbytes <= 3 * _SAMPLE_BYTES:
        return None  # hashing it whole costs no more than sampling
    flat = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
    middle = (flat.size - _SAMPLE_BYTES) // 2
    return b"".join((flat[:_SAMPLE_BYTES].tobytes(), flat[middle:middle + _SAMPLE_BYTES].tobytes(),
                     flat[-_SAMPLE_BYTES:].tobytes()))


def _small_contents(tensor: ir.Tensor) -> bytes | None:
    """The bytes of a small tensor's array, its exact identity within a (dtype, shape) group;
    ``None`` for tensors that are large or of a type without a plain numpy array.

    Constant folding leaves hundreds of small constants (shape vectors, scalars), many of them
    equal: keying them by their bytes finds the duplicates in one pass, where hashing each one's
    encoding and then comparing the encodings would encode every tensor twice.
    """
    if tensor.dtype not in _SAMPLED_DTYPES or tensor.nbytes > 3 * _SAMPLE_BYTES:
        return None
    return np.ascontiguousarray(tensor.numpy()).tobytes()


def _duplicates(group: list[ir.Value]) -> Iterator[tuple[ir.Value, ir.Value]]:
    """``(kept, duplicate)`` pairs of a group with equal dtype, shape and size.

    Pairs come by the kept value's position in ``group``, then the duplicate's: the same order
    whatever the fingerprints, so the rewiring (and the uses' order) does not depend on them.
    """
    by_contents: dict[bytes, list[ir.Value]] = {}
    by_fingerprint: dict[bytes | None, list[ir.Value]] = {}
    for value in group:
        assert isinstance(value.const_value, ir.Tensor)
        contents = _small_contents(value.const_value)
        if contents is not None:
            by_contents.setdefault(contents, []).append(value)
        else:
            by_fingerprint.setdefault(_fingerprint(value.const_value), []).append(value)
    position = {id(v): i for i, v in enumerate(group)}
    pairs: list[tuple[ir.Value, ir.Value]] = [(same[0], value) for same in by_contents.values() for value in same[1:]]
    for candidates in by_fingerprint.values():
        if len(candidates) < 2:
            continue  # nothing shares its fingerprint: no duplicate, no hashing
        by_digest: dict[str, list[ir.Value]] = {}
        for value in candidates:
            assert isinstance(value.const_value, ir.Tensor)
            by_digest.setdefault(value.const_value.digest(), []).append(value)
        for same in by_digest.values():
            kept: list[ir.Value] = []
            for value in same:
                original = next((k for k in kept if _same_bytes(k.const_value, value.const_value)), None)
                if original is None:
                    kept.append(value)
                else:
                    pairs.append((original, value))
    pairs.sort(key=lambda pair: (position[id(pair[0])], position[id(pair[1])]))
    yield from pairs


def _same_bytes(a: ir.Tensor, b: ir.Tensor) -> bool:
    """Compare two byte streams chunk by chunk (chunk boundaries may differ)."""
    left, right = _chunks(a), _chunks(b)
    buf_a = buf_b = b""
    while True:
        if not buf_a:
            buf_a = next(left, b"")
        if not buf_b:
            buf_b = next(right, b"")
        if not buf_a or not buf_b:
            return not buf_a and not buf_b  # equal only if both streams ended together
        n = min(len(buf_a), len(buf_b))
        if buf_a[:n] != buf_b[:n]:
            return False
        buf_a, buf_b = buf_a[n:], buf_b[n:]


def _chunks(tensor: ir.Tensor) -> Iterator[bytes]:
    return (bytes(chunk) for chunk in tensor.iter_bytes() if len(chunk))
