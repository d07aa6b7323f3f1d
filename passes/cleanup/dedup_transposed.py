"""``dedup-transposed-initializers``: a large weight that is a transpose or reshape of another is stored once.

GPT-2 exports keep the tied embedding twice: ``wte [V, H]`` for the token lookup and its
transpose ``[H, V]`` for the language-model head (154 MB of a 652 MB file). This pass finds such
pairs and stores one of them: a reshaped copy becomes ``Reshape(original, shape)``, and the matrix
products that read a transposed copy read the original instead (``Gemm`` with ``transB``).

Equality is exact, bit for bit (``-0.0`` differs from ``0.0``, a NaN equals only the same NaN), so
the outputs cannot change. Deciding it stays cheap and memory-bounded:

1. only initializers of at least ``min-bytes`` (1 MiB by default) with the same element type and
   element count are paired, and a transpose is tried only for the permutations that map one
   shape onto the other (for a ``[V, H]``/``[H, V]`` pair that is just the swap);
2. within such a group, only weights with the same first and last element (bit for bit) are
   paired: a transpose keeps the elements at index ``(0, ..., 0)`` and ``(d0-1, ..., dn-1)`` in
   place and a reshape keeps the flat order, so these two numbers, read once per weight, are
   equal for every related pair and tell nearly all unrelated weights apart (BERT-base's 48
   ``768x768`` projections would otherwise make 1128 pairs);
3. ``samples`` seeded random elements are compared first, which rejects unrelated weights after
   reading a few dozen numbers;
4. the full comparison walks the pair in slabs of about ``chunk-bytes`` (1 MiB: a slab stays in
   the CPU cache), each a contiguous block of one array and a run of rows of the other, read
   through a transposed view, so no transposed copy is ever built and each page is read once
   (GPT-2's 154 MB pair compares in about 0.1 s).

A transposed pair is stored once only where the matrix products reading the duplicate absorb
the transpose, so that no Transpose runs at inference time (at ``ORT_DISABLE_ALL`` a Transpose of
GPT-2's 154 MB head weight made the model 2.5x slower): the duplicate's every reader must be the
second input of a ``Gemm`` (its ``transB`` flips) or of a float ``MatMul`` with a 2-D right
operand, which becomes ``Gemm(A, W, transB=1)`` (``A`` of rank 2) or
``Reshape(Gemm(Reshape(A, [-1, K]), W, transB=1), leading dims of A + [N])`` (the leading dims
from ``A``'s static shape, or from ``Shape(A)`` at run time; opset 10 or later). Of a pair, the
one whose readers absorb is replaced; when neither's do, both stay. A reshaped pair (a
``Reshape`` costs no copy) is always stored once: the new node sits at the start of the graph
and its output keeps the duplicate's name.

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

__all__ = ["DedupTransposedInitializers", "corner_key", "transposition_of", "same_bits"]

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


def corner_key(array: np.ndarray) -> bytes:
    """The bits of the first and the last element of ``array``: equal for an array, its
    transposes (any axis permutation) and its reshapes, so only arrays with equal keys can be related.

    Example:
        >>> w = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> corner_key(w) == corner_key(np.ascontiguousarray(w.T)) == corner_key(w.reshape(3, 2))
        True
        >>> corner_key(w) == corner_key(w[::-1].copy())
        False
    """
    if array.size == 0:
        return b""
    if array.ndim == 0:
        array = array.reshape(1)  # its one element is both its first and its last
    corners = tuple(np.array([0, d - 1]) for d in array.shape)  # reads two elements, not the array
    return _bits(np.ascontiguousarray(array[corners])).tobytes()


def _chunks(total_rows: int, row_bytes: int, chunk_bytes: int) -> Iterator[slice]:
    rows = max(1, chunk_bytes // max(1, row_bytes))
    for start in range(0, total_rows, rows):
        yield slice(start, min(total_rows, start + rows))


def same_bits(view: np.ndarray, target: np.ndarray, chunk_bytes: int) -> bool:
    """True when ``view`` and ``target`` (same shape) hold the same bits, compared chunk by chunk.

    ``view`` may be a transposed or reshaped view of another array. The chunks are slabs along
    the axis on which ``view`` has its largest stride, so each chunk of ``view`` is one contiguous
    block of the array it views, and ``target``'s part is read in runs of whole rows: every page
    of either array is read once (chunking along a transposed view's first axis would sweep the
    whole of the other array once per chunk). Slabs are compared in place, without copies.
    """
    if view.shape != target.shape:
        return False
    if target.ndim == 0:
        return bool(_bits(np.ascontiguousarray(view)) == _bits(np.ascontiguousarray(target)))
    axis = max(range(view.ndim), key=lambda a: (abs(view.strides[a]) if view.shape[a] > 1 else -1, -a))
    slab_bytes = target.itemsize * (target.size // max(1, target.shape[axis]))
    lead = (slice(None),) * axis
    for part in _chunks(target.shape[axis], slab_bytes, chunk_bytes):
        if not np.array_equal(_bits(view[lead + (part,)]), _bits(target[lead + (part,)])):
            return False
    return True


def transposition_of(original: np.ndarray, duplicate: np.ndarray, *, samples: int = 64,
                     chunk_bytes: int = 1 << 20, rng: random.Random | None = None) -> tuple[str, tuple[int, ...]] | None:
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
        if not _samples_agree(view, duplicate, positions):
            continue
        # The same question either way round; view the array with the longer first axis, so the
        # other is read in long runs (for a [50257, 768] / [768, 50257] pair: rows of 1 KiB per
        # MiB chunk instead of 20 bytes).
        if duplicate.shape[0] > original.shape[0]:
            same = same_bits(duplicate.transpose(_inverse(perm)), original, chunk_bytes)
        else:
            same = same_bits(view, duplicate, chunk_bytes)
        if same:
            return "transpose", perm
    if original.shape == duplicate.shape:
        return None
    flat_original, flat_duplicate = original.reshape(-1), duplicate.reshape(-1)
    positions = _sample_positions((original.size,), samples, rng)
    if _samples_agree(flat_original, flat_duplicate, positions) \
            and same_bits(original.reshape(duplicate.shape), duplicate, chunk_bytes):
        return "reshape", tuple(duplicate.shape)
    return None


#: Element types of ``Gemm`` (every opset from 11 on), the products a transpose is folded into.
_GEMM_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16})


def _absorbs_transpose(value: ir.Value, perm: tuple[int, ...]) -> bool:
    """True when every reader of ``value`` is a product that can read its transpose instead (see above)."""
    if perm != (1, 0):
        return False
    uses = value.uses()
    return bool(uses) and all(_absorbing_reader(node, index) for node, index in uses)


def _absorbing_reader(node: ir.Node, index: int) -> bool:
    if node.domain not in ("", "ai.onnx") or index != 1 or (node.version or 0) < 11:
        return False
    if node.op_type == "Gemm":
        return True
    if node.op_type != "MatMul" or node.inputs[0] is None or node.inputs[1] is None:
        return False
    if node.inputs[1].dtype not in _GEMM_TYPES:  # MatMul's operands share one element type
        return False
    shape = node.inputs[0].shape
    return shape is None or shape.rank >= 1


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
        chunk_bytes: bytes compared per step of the full comparison (default 1 MiB).

    Example:
        >>> DedupTransposedInitializers().run(model, PassContext()).counters  # doctest: +SKIP
        {'removed-initializers': 1, 'saved-bytes': 154389504, 'transposes': 1, 'reshapes': 0}
    """

    name = "dedup-transposed-initializers"
    opt_level = 2
    preserves = frozenset({"topo-sorted"})
    options = {"min_bytes": 1 << 20, "samples": 64, "chunk_bytes": 1 << 20}

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

        # A relation implies equal corner keys, so pairs across keys are never compared; within
        # a key the pairs keep the group's order (the outcome does not depend on the keys).
        by_key: dict[bytes, list[ir.Value]] = {}
        for value in group:
            assert isinstance(value.const_value, ir.Tensor)
            # Not cached: a weight alone with its key is never read again (file weights are
            # memory-mapped, so this reads two elements).
            by_key.setdefault(corner_key(value.const_value.numpy()), []).append(value)
        pairs = [(first, second) for same in by_key.values()
                 for i, first in enumerate(same) for second in same[i + 1:]]
        position = {id(v): i for i, v in enumerate(group)}
        pairs.sort(key=lambda pair: (position[id(pair[0])], position[id(pair[1])]))
        replaced: set[int] = set()
        for first, second in pairs:
            if id(first) in replaced or id(second) in replaced:
                continue
            relation = transposition_of(array(first), array(second), samples=int(self.config["samples"]),
                                        chunk_bytes=int(self.config["chunk_bytes"]), rng=rng)
            if relation is None:
                continue
            kind, detail = relation
            kept, duplicate = first, second
            if kind == "transpose":
                if _absorbs_transpose(second, detail):
                    pass
                elif _absorbs_transpose(first, _inverse(detail)):
                    kept, duplicate, detail = second, first, _inverse(detail)
                else:
                    logger.debug("'%s' is a transpose of '%s', kept: a reader cannot absorb the transpose",
                                 second.name, first.name)
                    continue
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
        if kind == "transpose":
            for reader, _ in duplicate.uses():
                _read_transposed(graph, reader, kept, model)
            graph.remove_initializer(duplicate)
            logger.debug("initializer '%s' is a transpose of '%s'; its products read that one", name, kept.name)
            return
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


def _read_transposed(graph: ir.Graph, reader: ir.Node, kept: ir.Value, model: ir.Model | None) -> None:
    """Make ``reader`` (a Gemm or MatMul reading the transpose of ``kept`` as B) read ``kept``."""
    def fresh(hint: str) -> str:
        return model.unique_name(hint) if model is not None else hint

    if reader.op_type == "Gemm":
        reader.replace_input(1, kept)
        reader.set_attr("transB", 1 - int(reader.attr("transB", 0)))
        return
    left, out = reader.inputs[0], reader.outputs[0]
    assert left is not None and isinstance(kept.const_value, ir.Tensor)
    rows, depth = kept.const_value.shape
    dims = list(left.shape.dims) if left.shape is not None else None
    new_nodes: list[ir.Node] = []
    if dims is not None and len(dims) == 2:
        gemm = ir.Node("", "Gemm", [left, kept], attributes={"transB": 1}, outputs=[ir.Value(fresh(out.name), out.type)])
        new_nodes.append(gemm)
        result = gemm.outputs[0]
    else:
        flat_shape = graph.add_initializer(fresh(f"{kept.name}_rows"), ir.ArrayTensor(np.array([-1, depth], np.int64)))
        flat = ir.Node("", "Reshape", [left, flat_shape], outputs=[ir.Value(fresh(f"{out.name}_flat_in"))])
        gemm = ir.Node("", "Gemm", [flat.outputs[0], kept], attributes={"transB": 1},
                       outputs=[ir.Value(fresh(f"{out.name}_flat"))])
        new_nodes += [flat, gemm]
        if dims is not None and all(isinstance(d, int) and d >= 0 for d in dims):
            target = graph.add_initializer(fresh(f"{out.name}_shape"),
                                           ir.ArrayTensor(np.array([*dims[:-1], rows], np.int64)))
        else:
            shape = ir.Node("", "Shape", [left], outputs=[ir.Value(fresh(f"{out.name}_in_shape"))])
            starts = graph.add_initializer(fresh("zero"), ir.ArrayTensor(np.array([0], np.int64)))
            ends = graph.add_initializer(fresh("minus_one"), ir.ArrayTensor(np.array([-1], np.int64)))
            lead = ir.Node("", "Slice", [shape.outputs[0], starts, ends], outputs=[ir.Value(fresh(f"{out.name}_lead"))])
            width = graph.add_initializer(fresh(f"{kept.name}_cols"), ir.ArrayTensor(np.array([rows], np.int64)))
            concat = ir.Node("", "Concat", [lead.outputs[0], width], attributes={"axis": 0},
                             outputs=[ir.Value(fresh(f"{out.name}_shape"))])
            new_nodes += [shape, lead, concat]
            target = concat.outputs[0]
        back = ir.Node("", "Reshape", [gemm.outputs[0], target], outputs=[ir.Value(fresh(out.name), out.type)])
        new_nodes.append(back)
        result = back.outputs[0]
    for new in new_nodes:
        new.meta["created_by"] = "dedup-transposed-initializers"
        graph.insert_before(reader, new)
    out.replace_all_uses_with(result, rename_graph_outputs=True)
    graph.remove(reader, force=True)
    if not result.is_graph_output():
        old_name = out.name
        out.name = fresh(old_name + "_old")
        result.name = old_name
