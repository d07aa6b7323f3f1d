"""``dedup-transposed-initializers``: a large weight that is a transpose or reshape of another is stored once.

GPT-2 exports keep the tied embedding twice: ``wte [V, H]`` for the token lookup and its
transpose ``[H, V]`` for the language-model head (154 MB of a 652 MB file). This pass finds such
pairs and replaces the duplicate by ``Transpose(original, perm)`` or ``Reshape(original, shape)``.

Equality is exact, bit for bit (``-0.0`` differs from ``0.0``, a NaN equals only the same NaN), so
the outputs cannot change. Deciding it stays cheap and memory-bounded:

1. only initializers of at least ``min-bytes`` (1 MiB by default) with the same element type and
   element count are paired, and a transpose is tried only for the permutations that map one
   shape onto the other (for a ``[V, H]``/``[H, V]`` pair that is just the swap);
2. ``samples`` seeded random elements are compared first, which rejects unrelated weights after
   reading a few dozen numbers;
3. the full comparison walks the duplicate in chunks of about ``chunk-bytes`` along its first
   axis, reading the original through a transposed view, so no transposed copy is ever built.

Which one stays: when the duplicate's every reader is the second input of a ``MatMul`` or
``Gemm`` and the permutation swaps the last two axes, that one is replaced (``Gemm`` has
``transB``, and the contrib fusions fold the Transpose into a ``FusedMatMul``); otherwise the
later initializer is replaced. The new node sits at the start of the graph and its output keeps
the duplicate's name.

Cost: the Transpose runs at inference time. onnxruntime at ``ORT_ENABLE_ALL`` folds it back into
a constant when the session is created (the memory is then spent at load time, the file stays
small); at ``ORT_DISABLE_ALL`` it runs on every call unless a matrix product absorbs it.

Never touched: graph inputs (IR < 4 overridable weights), graph outputs, values listed as the
output of any graph, names the model's ``training_info`` refers to, sparse initializers, string
and sub-byte (float8, int4) tensors. Identical copies are left to ``dedup-initializers``.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from typing import Iterator

import numpy as np
import onnx

from graphopt import ir
from graphopt.pipeline import Pass, PassContext, PassResult
from graphopt.passes.cleanup._scope import pinned_outputs, training_names

__all__ = ["DedupTransposedInitializers", "transposition_of", "same_bits"]

logger = logging.getLogger(__name__)

#: Permutations are enumerated only up to this rank (6! = 720 candidates at most).
MAX_PERMUTED_RANK = 6

#: Element types compared bit for bit (a numpy view of equal item size exists).
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SUPPORTED = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
})


def _bits(array: np.ndarray) -> np.ndarray:
    """The array viewed as unsigned integers of its item size (exact comparison, NaN included)."""
    return array.view(_BITS[array.dtype.itemsize])


def _candidate_perms(source: tuple[int, ...], target: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Non-identity permutations ``p`` with ``source[p[i]] == target[i]`` for every axis."""
    rank = len(source)
    if rank < 2 or rank != len(target) or rank > MAX_PERMUTED_RANK or sorted(source) != sorted(target):
        return []
    identity = tuple(range(rank))
    return [p for p in itertools.permutations(range(rank))
            if p != identity and all(source[p[i]] == target[i] for i in range(rank))]


def _sample_positions(shape: tuple[int, ...], count: int, rng: random.Random) -> tuple[np.ndarray, ...]:
    """``count`` seeded positions as one index array per axis (for a single fancy-indexing read)."""
    gen = np.random.default_rng(rng.getrandbits(64))
    return tuple(gen.integers(0, d, size=count) for d in shape)


def _samples_agree(a: np.ndarray, b: np.ndarray, positions: tuple[np.ndarray, ...]) -> bool:
    """True when ``a`` and ``b`` hold the same bits at every sampled position."""
    return bool(np.array_equal(_bits(np.ascontiguousarray(a[positions])),
                               _bits(np.ascontiguousarray(b[positions]))))


def _chunks(total_rows: int, row_bytes: int, chunk_bytes: int) -> Iterator[slice]:
    rows = max(1, chunk_bytes // max(1, row_bytes))
    for start in range(0, total_rows, rows):
        yield slice(start, min(total_rows, start + rows))


def same_bits(view: np.ndarray, target: np.ndarray, chunk_bytes: int) -> bool:
    """True when ``view`` and ``target`` (same shape) hold the same bits, compared chunk by chunk.

    ``view`` may be a transposed or reshaped view of another array: only one chunk of it is
    materialized at a time.
    """
    if view.shape != target.shape:
        return False
    if target.ndim == 0:
        return bool(_bits(np.ascontiguousarray(view)) == _bits(np.ascontiguousarray(target)))
    row_bytes = target.itemsize * (target.size // max(1, target.shape[0]))
    for part in _chunks(target.shape[0], row_bytes, chunk_bytes):
        if not np.array_equal(_bits(np.ascontiguousarray(view[part])), _bits(np.ascontiguousarray(target[part]))):
            return False
    return True


def transposition_of(original: np.ndarray, duplicate: np.ndarray, *, samples: int = 64,
                     chunk_bytes: int = 16 << 20, rng: random.Random | None = None) -> tuple[str, tuple[int, ...]] | None:
    """How ``duplicate`` derives from ``original``: ``("transpose", perm)``, ``("reshape", shape)`` or ``None``.

    Example:
        >>> w = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> transposition_of(w, np.ascontiguousarray(w.T))
        ('transpose', (1, 0))
        >>> transposition_of(w, w.reshape(3, 2))
        ('reshape', (3, 2))
    """
    if original.dtype != duplicate.dtype or original.size != duplicate.size:
        return None
    rng = rng or random.Random(0)
    if original.shape == duplicate.shape:
        positions = _sample_positions(duplicate.shape, samples, rng)
        if _samples_agree(original, duplicate, positions) and same_bits(original, duplicate, chunk_bytes):
            return None  # an identical copy: dedup-initializers stores it once without any node
    for perm in _candidate_perms(original.shape, duplicate.shape):
        view = original.transpose(perm)
        positions = _sample_positions(duplicate.shape, samples, rng)
        if _samples_agree(view, duplicate, positions) and same_bits(view, duplicate, chunk_bytes):
            return "transpose", perm
    if original.shape == duplicate.shape:
        return None
    flat_original, flat_duplicate = original.reshape(-1), duplicate.reshape(-1)
    positions = _sample_positions((original.size,), samples, rng)
    if _samples_agree(flat_original, flat_duplicate, positions) \
            and same_bits(original.reshape(duplicate.shape), duplicate, chunk_bytes):
        return "reshape", tuple(duplicate.shape)
    return None


def _absorbs_transpose(value: ir.Value, perm: tuple[int, ...]) -> bool:
    """True when every reader of ``value`` takes it as the right operand of a matrix product."""
    rank = len(perm)
    if perm != tuple(range(rank - 2)) + (rank - 1, rank - 2):
        return False
    uses = value.uses()
    return bool(uses) and all(node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and index == 1
                              for node, index in uses)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return tuple(inverse)


class DedupTransposedInitializers(Pass):
    """Store a large weight once when another weight is its transpose or reshape.

    Options:
        min_bytes: only weights of at least this size (default 1 MiB) are considered.
        samples: elements compared before a full comparison (default 64).
        chunk_bytes: bytes compared per step of the full comparison (default 16 MiB).

    Example:
        >>> DedupTransposedInitializers().run(model, PassContext()).counters  # doctest: +SKIP
        {'removed-initializers': 1, 'saved-bytes': 154389504, 'transposes': 1, 'reshapes': 0}
    """

    name = "dedup-transposed-initializers"
    opt_level = 2
    preserves = frozenset({"topo-sorted"})
    options = {"min_bytes": 1 << 20, "samples": 64, "chunk_bytes": 16 << 20}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Pair equal-size large initializers graph by graph and replace the duplicates."""
        counters = {"removed-initializers": 0, "saved-bytes": 0, "transposes": 0, "reshapes": 0}
        pinned = pinned_outputs(model)
        keep_names = training_names(model)
        rng = ctx.rng(self.name)
        for graph in list(model.all_graphs()):
            if graph.function is not None:
                continue
            inputs = {id(v) for v in graph.inputs}
            groups: dict[tuple[int, int], list[ir.Value]] = {}
            for value in graph.initializers.values():
                tensor = value.const_value
                if (not isinstance(tensor, ir.Tensor) or tensor.dtype not in _SUPPORTED
                        or tensor.nbytes < int(self.config["min_bytes"]) or id(value) in inputs
                        or id(value) in pinned or value.name in keep_names or not value.has_uses()):
                    continue
                groups.setdefault((tensor.dtype, math.prod(tensor.shape)), []).append(value)
            for group in groups.values():
                if len(group) > 1 and not self._dedup_group(graph, group, ctx, rng, counters):
                    return self._result(counters)
        return self._result(counters)

    def _result(self, counters: dict[str, int]) -> PassResult:
        if counters["removed-initializers"]:
            logger.info("dedup-transposed-initializers: %d duplicate(s) replaced, %d bytes saved",
                        counters["removed-initializers"], counters["saved-bytes"])
        return PassResult(counters["removed-initializers"] > 0, counters)

    def _dedup_group(self, graph: ir.Graph, group: list[ir.Value], ctx: PassContext, rng: random.Random,
                     counters: dict[str, int]) -> bool:
        """Replace duplicates inside one group; False when the bisect limit stopped the pass."""
        arrays: dict[int, np.ndarray] = {}

        def array(value: ir.Value) -> np.ndarray:
            if id(value) not in arrays:
                assert isinstance(value.const_value, ir.Tensor)
                arrays[id(value)] = value.const_value.numpy()
            return arrays[id(value)]

        replaced: set[int] = set()
        for i, first in enumerate(group):
            for second in group[i + 1:]:
                if id(first) in replaced or id(second) in replaced:
                    continue
                relation = transposition_of(array(first), array(second), samples=int(self.config["samples"]),
                                            chunk_bytes=int(self.config["chunk_bytes"]), rng=rng)
                if relation is None:
                    continue
                kind, detail = relation
                kept, duplicate = first, second
                if kind == "transpose" and _absorbs_transpose(first, _inverse(detail)) \
                        and not _absorbs_transpose(second, detail):
                    kept, duplicate, detail = second, first, _inverse(detail)
                if not ctx.allow_rewrite(f"replace initializer '{duplicate.name}' by {kind} of '{kept.name}'"):
                    return False
                self._replace(graph, kept, duplicate, kind, detail)
                replaced.add(id(duplicate))
                counters["removed-initializers"] += 1
                counters["saved-bytes"] += duplicate.const_value.nbytes if duplicate.const_value else 0
                counters["transposes" if kind == "transpose" else "reshapes"] += 1
        return True

    @staticmethod
    def _replace(graph: ir.Graph, kept: ir.Value, duplicate: ir.Value, kind: str, detail: tuple[int, ...]) -> None:
        tensor = duplicate.const_value
        assert isinstance(tensor, ir.Tensor)
        name = duplicate.name
        model = graph.root_model()
        out = ir.Value(model.unique_name(f"{name}_dedup") if model else f"{name}_dedup",
                       ir.TensorType(tensor.dtype, ir.Shape(tensor.shape)))
        if kind == "transpose":
            node = ir.Node("", "Transpose", [kept], attributes={"perm": ir.Attr.from_value("perm", list(detail))},
                           outputs=[out])
        else:
            shape_name = model.unique_name(f"{name}_shape") if model else f"{name}_shape"
            shape = graph.add_initializer(shape_name, ir.ArrayTensor(np.array(detail, dtype=np.int64)))
            node = ir.Node("", "Reshape", [kept, shape], outputs=[out])
        node.meta["created_by"] = "dedup-transposed-initializers"
        first = next(iter(graph), None)
        graph.insert_before(first, node)
        duplicate.replace_all_uses_with(out)
        graph.remove_initializer(duplicate)
        out.name = name
        logger.debug("initializer '%s' is a %s of '%s'; stored once", name, kind, kept.name)
