"""``dedup-initializers``: store initializers with identical contents once per graph.

Two initializers are duplicates when they have the same element type, shape and bytes. Only
tensors in a group of equal ``(dtype, shape, nbytes)`` are hashed (``Tensor.digest()`` streams,
so external weights are never loaded whole), and equal digests are confirmed by comparing the
bytes, so a merge never rests on a hash alone. Readers of a duplicate read the first one (in
initializer order), and the duplicate is dropped.

Never merged: graph inputs (IR < 4 overridable weights), graph outputs, values listed as the
output of any graph, and names the model's ``training_info`` refers to. Sparse initializers are
left alone. Each graph is handled on its own: a subgraph's initializer is not merged with an
enclosing graph's.
"""

from __future__ import annotations

import logging
from typing import Iterator

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
    preserves = frozenset({"topo-sorted"})

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


def _duplicates(group: list[ir.Value]) -> Iterator[tuple[ir.Value, ir.Value]]:
    """``(kept, duplicate)`` pairs of a group with equal dtype, shape and size."""
    by_digest: dict[str, list[ir.Value]] = {}
    for value in group:
        assert isinstance(value.const_value, ir.Tensor)
        by_digest.setdefault(value.const_value.digest(), []).append(value)
    for same in by_digest.values():
        kept: list[ir.Value] = []
        for value in same:
            original = next((k for k in kept if _same_bytes(k.const_value, value.const_value)), None)
            if original is None:
                kept.append(value)
            else:
                yield original, value


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
