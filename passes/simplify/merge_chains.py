"""``merge-chains``: collapse two layout or type conversions in a row into one (or none).

Algebra, with the intermediate read by nothing else (the driver refuses shared intermediates
and intermediates that are graph outputs):

* ``Transpose(Transpose(x, p1), p2) = Transpose(x, p)`` with ``p[i] = p1[p2[i]]`` (output dim
  ``i`` is dim ``p2[i]`` of the middle, which is dim ``p1[p2[i]]`` of ``x``); an identity ``p``
  leaves ``x``. An absent ``perm`` reverses the dims, so it needs the rank.
* ``Reshape(r(x), s) = Reshape(x, s)`` for any reshape-like ``r`` (``Reshape``, ``Flatten``,
  ``Squeeze``, ``Unsqueeze``): a reshape depends only on the element order, which ``r`` keeps,
  and on its target ``s``. Must not fire when ``s`` has a 0 entry and ``allowzero`` is 0: that
  entry copies a dim of ``r(x)``, not of ``x``. ``s`` must be a constant.
* ``Flatten(Reshape(x, s))`` is ``Reshape(x, [a, b])`` when the result's shape ``[a, b]`` is
  known and has no 0 (a 0 in the new target would copy a dim of ``x``).
* ``Unsqueeze(Unsqueeze(x, a1), a2) = Unsqueeze(x, a)``: the second call keeps the middle's dims
  in order in the slots it does not name, so inner axis ``k`` lands on the ``k``-th free slot of
  ``a2``; ``a`` is ``a2`` plus those slots. Axes are an attribute before opset 13 and an input
  from 13; the merged node uses the form of its opset.
* ``Squeeze(Unsqueeze(x, a), a) = x`` (the inserted dims are the removed ones) and
  ``Unsqueeze(Squeeze(x, a), a) = x`` (``Squeeze`` only removes dims of size 1, which come back).
  A ``Squeeze`` without axes removes every 1 and is left alone. The result is ``x`` itself, so
  these two also fire when the intermediate has other readers (it stays for them).
* ``Unsqueeze(Squeeze(x, a), b)`` with as many axes in ``b`` as in ``a`` and every dim of ``x``
  at ``a`` known to be 1 moves only dims of size 1, so the element order is unchanged: it is
  ``Transpose(x, p)`` (``p`` puts the squeezed dims at ``b``, the others in order in the
  remaining slots) and, where the result's shape can be written as a target, a ``Reshape``
  (no copy in onnxruntime, where a Transpose copies): a known dim as itself, an unknown dim
  that keeps its position as 0, at most one other unknown dim as -1 (not with a known 0 dim,
  which would leave -1 undetermined). Must not fire when a squeezed dim is not known to be 1
  (then ``Squeeze`` is a check the model relies on) or when the intermediate has other readers
  (two nodes would still run).
* ``Unsqueeze(Gather(x, i, axis=a), [a]) = Slice(x, [i], [i + 1], [a])`` for a constant scalar
  index ``i``: the gather drops axis ``a``, the unsqueeze puts it back with size 1; ``i = -1``
  slices to the end (``i + 1 = 0`` would be empty). Needs opset 13 (axes as inputs), the dim of
  ``x`` at ``a`` known with ``-dim <= i < dim`` (out of range, Gather fails but Slice would
  clamp), and the unsqueeze to restore exactly axis ``a``. Never for a 1-D index tensor (the
  gathered axis stays), index values computed at run time, or a 1-D ``x``: shape arithmetic
  (``Unsqueeze(Gather(Shape(x), i))``) stays in the form the symbolic folder and the fusion
  patterns read.
* ``Cast(Cast(x, T1), T2) = Cast(x, T2)`` when every value of ``x``'s type is exact in ``T1``
  (``float32 -> float64 -> float32`` merges, and then is no cast at all). Must not fire when
  ``T1`` loses information: ``float32 -> int32 -> float32`` truncates, ``int32 -> float32 ->
  int32`` rounds large values. Strings (formatting depends on the width), 8-bit floats and
  4-bit/2-bit integers are never merged.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx

from graphopt import ir
from graphopt.passes.simplify._common import dims_of, int_list, node_axes, normalize_axes
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet, constant_value

__all__ = ["MERGE_CHAIN_RULES", "MergeChains", "is_exact_widening"]

CheckResult = Any  # True, None or a Failure

_T = onnx.TensorProto

#: For each element type, the types that hold each of its values exactly.
_EXACT_IN: dict[int, frozenset[int]] = {
    _T.BOOL: frozenset({_T.INT8, _T.UINT8, _T.INT16, _T.UINT16, _T.INT32, _T.UINT32, _T.INT64, _T.UINT64,
                        _T.FLOAT16, _T.BFLOAT16, _T.FLOAT, _T.DOUBLE}),
    _T.UINT8: frozenset({_T.INT16, _T.UINT16, _T.INT32, _T.UINT32, _T.INT64, _T.UINT64, _T.FLOAT16,
                         _T.BFLOAT16, _T.FLOAT, _T.DOUBLE}),
    _T.INT8: frozenset({_T.INT16, _T.INT32, _T.INT64, _T.FLOAT16, _T.BFLOAT16, _T.FLOAT, _T.DOUBLE}),
    _T.UINT16: frozenset({_T.INT32, _T.UINT32, _T.INT64, _T.UINT64, _T.FLOAT, _T.DOUBLE}),
    _T.INT16: frozenset({_T.INT32, _T.INT64, _T.FLOAT, _T.DOUBLE}),
    _T.UINT32: frozenset({_T.INT64, _T.UINT64, _T.DOUBLE}),
    _T.INT32: frozenset({_T.INT64, _T.DOUBLE}),
    _T.FLOAT16: frozenset({_T.FLOAT, _T.DOUBLE}),
    _T.BFLOAT16: frozenset({_T.FLOAT, _T.DOUBLE}),
    _T.FLOAT: frozenset({_T.DOUBLE}),
}

#: Element types a merged Cast may end in (strings, 8-bit floats and packed ints are left alone).
_MERGEABLE_TARGETS = frozenset({_T.BOOL, _T.UINT8, _T.INT8, _T.UINT16, _T.INT16, _T.UINT32, _T.INT32,
                                _T.UINT64, _T.INT64, _T.FLOAT16, _T.BFLOAT16, _T.FLOAT, _T.DOUBLE})


def is_exact_widening(source: int, middle: int) -> bool:
    """True when every value of element type ``source`` is exactly representable in ``middle``.

    Example:
        >>> is_exact_widening(onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
        True
        >>> is_exact_widening(onnx.TensorProto.FLOAT, onnx.TensorProto.INT32)
        False
    """
    return middle in _EXACT_IN.get(source, frozenset())


# -- Transpose ---------------------------------------------------------------------------------
def _perm(node: ir.Node, rank: int | None) -> tuple[int, ...] | None:
    perm = node.attr("perm")
    if perm is not None:
        return tuple(int(p) for p in perm)
    return None if rank is None else tuple(reversed(range(rank)))


def _rank(value: ir.Value) -> int | None:
    dims = dims_of(value)
    return None if dims is None else len(dims)


def _composed_perm(x: ir.Value, inner: ir.Node, outer: ir.Node) -> tuple[int, ...] | None:
    first = _perm(inner, _rank(x))
    second = _perm(outer, None if first is None else len(first))
    if first is None or second is None or len(first) != len(second):
        return None
    if sorted(first) != list(range(len(first))) or sorted(second) != list(range(len(second))):
        return None
    return tuple(first[i] for i in second)


def _check_transposes(ctx: MatchContext, x: ir.Value, inner: ir.Node, outer: ir.Node) -> CheckResult:
    if _composed_perm(x, inner, outer) is None:
        return Failure("a perm is absent on a tensor of unknown rank, or the perms do not compose")
    return True


def _merge_transposes(op: Any, x: ir.Value, inner: ir.Node, outer: ir.Node) -> ir.Value | None:
    perm = _composed_perm(x, inner, outer)
    if perm is None:
        return None
    if perm == tuple(range(len(perm))):
        return x
    return op.Transpose(x, perm=list(perm))


# -- Reshape after a reshape-like op -----------------------------------------------------------
def _check_outer_reshape(ctx: MatchContext, shape: ir.Value, outer: ir.Node) -> CheckResult:
    if (outer.version or 0) < 5:
        return Failure("Reshape before opset 5 takes its shape as an attribute")
    spec = int_list(shape)
    if spec is None:
        return Failure("the outer target shape is not a constant")
    if not outer.attr("allowzero", 0) and 0 in spec:
        return Failure(f"target {spec} copies a dim of the intermediate (0 entry)")
    return True


def _reshape_input(op: Any, x: ir.Value, shape: ir.Value, outer: ir.Node) -> ir.Value:
    return op.Reshape(x, shape, **outer.attributes)


def _reshape_after(inner_op: str) -> Rule:
    if inner_op == "Reshape":
        def pattern(op: Any, x: Any, inner_shape: Any, shape: Any) -> Any:
            return op.Reshape(op.Reshape(x, inner_shape), shape, _name="outer")
    else:
        def pattern(op: Any, x: Any, shape: Any) -> Any:  # type: ignore[misc]
            inner = getattr(op, inner_op)(x, _allow_other_inputs=True)
            return op.Reshape(inner, shape, _name="outer")
    return Rule(f"merge-{inner_op.lower()}-reshape", pattern, _reshape_input, check=_check_outer_reshape)


def _flatten_dims(outer: ir.Node) -> list[int] | None:
    dims = dims_of(outer.outputs[0])
    if dims is None or len(dims) != 2 or not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    return [int(d) for d in dims]  # type: ignore[arg-type]


def _check_reshape_flatten(ctx: MatchContext, outer: ir.Node) -> CheckResult:
    if (outer.version or 0) < 5:
        return Failure("Reshape needs opset 5")
    if _flatten_dims(outer) is None:
        return Failure("the shape of the Flatten output is not known, or has a 0")
    return True


def _reshape_to_flat(op: Any, x: ir.Value, outer: ir.Node) -> ir.Value | None:
    dims = _flatten_dims(outer)
    if dims is None:
        return None
    return op.Reshape(x, op.initializer(np.array(dims, dtype=np.int64), name_hint="shape"))


# -- Squeeze / Unsqueeze -----------------------------------------------------------------------
def _given_axes(node: ir.Node) -> tuple[int, ...] | None:
    axes = node_axes(node, input_since=13)
    return axes if axes else None  # absent, empty or unknown: not merged here


def _merged_unsqueeze_axes(x: ir.Value, inner: ir.Node, outer: ir.Node) -> list[int] | None:
    first, second = _given_axes(inner), _given_axes(outer)
    if first is None or second is None:
        return None
    rank = _rank(x)
    middle_rank = None if rank is None else rank + len(first)
    final_rank = None if middle_rank is None else middle_rank + len(second)
    n1 = normalize_axes(first, middle_rank)
    n2 = normalize_axes(second, final_rank)
    if n1 is None or n2 is None or len(set(n1)) != len(n1) or len(set(n2)) != len(n2):
        return None
    taken = set(n2)
    free = (k for k in itertools.count() if k not in taken)
    slots = list(itertools.islice(free, max(n1) + 1))
    return sorted(taken | {slots[a] for a in n1})


def _check_unsqueezes(ctx: MatchContext, x: ir.Value, inner: ir.Node, outer: ir.Node) -> CheckResult:
    if _merged_unsqueeze_axes(x, inner, outer) is None:
        return Failure("axes are not constants, empty, repeated, or negative on a tensor of unknown rank")
    return True


def _unsqueeze(op: Any, x: ir.Value, axes: list[int], version: int) -> ir.Value:
    if version >= 13:
        return op.Unsqueeze(x, op.initializer(np.array(axes, dtype=np.int64), name_hint="axes"))
    return op.Unsqueeze(x, axes=axes)


def _merge_unsqueezes(op: Any, x: ir.Value, inner: ir.Node, outer: ir.Node) -> ir.Value | None:
    axes = _merged_unsqueeze_axes(x, inner, outer)
    if axes is None or outer.version is None:
        return None
    return _unsqueeze(op, x, axes, outer.version)


def _same_axes(first: ir.Node, second: ir.Node, rank: int | None) -> bool:
    a, b = _given_axes(first), _given_axes(second)
    if a is None or b is None or len(a) != len(b):
        return False
    na, nb = normalize_axes(a, rank), normalize_axes(b, rank)
    return na is not None and nb is not None and len(set(na)) == len(na) and set(na) == set(nb)


def _inner_of(y: ir.Value, op_type: str) -> ir.Node | None:
    """The default-domain ``op_type`` node producing ``y``, whatever else reads ``y``."""
    node = y.producer
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    return node if node.inputs[0] is not None else None


def _check_unsqueeze_squeeze(ctx: MatchContext, y: ir.Value, outer: ir.Node) -> CheckResult:
    inner = _inner_of(y, "Unsqueeze")
    if inner is None:
        return Failure("the input of Squeeze is not an Unsqueeze")
    rank = _rank(inner.inputs[0])
    axes = _given_axes(inner)
    full = None if rank is None or axes is None else rank + len(axes)
    if not _same_axes(inner, outer, full):
        return Failure("Squeeze does not remove exactly the dims Unsqueeze added")
    return True


def _check_squeeze_unsqueeze(ctx: MatchContext, y: ir.Value, outer: ir.Node) -> CheckResult:
    inner = _inner_of(y, "Squeeze")
    if inner is None:
        return Failure("the input of Unsqueeze is not a Squeeze")
    if not _same_axes(inner, outer, _rank(inner.inputs[0])):
        return Failure("Unsqueeze does not restore exactly the dims Squeeze removed")
    return True


def _inner_input(op: Any, y: ir.Value) -> ir.Value:
    producer = y.producer
    assert producer is not None and producer.inputs[0] is not None
    return producer.inputs[0]


def _unit_move_perm(x: ir.Value, inner: ir.Node, outer: ir.Node) -> list[int] | None:
    """The ``perm`` of ``Transpose(x)`` equal to ``Unsqueeze(Squeeze(x, a), b)``, or ``None``."""
    dims = dims_of(x)
    first, second = _given_axes(inner), _given_axes(outer)
    if dims is None or first is None or second is None or len(first) != len(second):
        return None
    removed = normalize_axes(first, len(dims))
    inserted = normalize_axes(second, len(dims))
    if removed is None or inserted is None or len(set(removed)) != len(removed) \
            or len(set(inserted)) != len(inserted) or any(dims[a] != 1 for a in removed):
        return None
    kept = iter(i for i in range(len(dims)) if i not in set(removed))
    moved = iter(sorted(removed))
    slots = set(inserted)
    return [next(moved) if i in slots else next(kept) for i in range(len(dims))]


def _check_unit_move(ctx: MatchContext, x: ir.Value, inner: ir.Node, outer: ir.Node) -> CheckResult:
    if _same_axes(inner, outer, _rank(x)):
        return Failure("the axes are the same (cancel-squeeze-unsqueeze)")
    if _unit_move_perm(x, inner, outer) is None:
        return Failure("the axes differ in number, are not constants, or a squeezed dim is not known to be 1")
    return True


def _reshape_target(dims: tuple[ir.Dim, ...], perm: list[int]) -> list[int] | None:
    """The ``Reshape`` target of ``Transpose(x, perm)`` for ``x`` of ``dims``, or ``None``."""
    target: list[int] = []
    for i, source in enumerate(perm):
        dim = dims[source]
        if isinstance(dim, int):
            target.append(dim)
        elif source == i:
            target.append(0)  # copies the dim at the same position
        elif -1 in target:
            return None
        else:
            target.append(-1)
    return None if -1 in target and 0 in [d for d in dims if isinstance(d, int)] else target


def _unit_move(op: Any, x: ir.Value, inner: ir.Node, outer: ir.Node) -> ir.Value | None:
    perm = _unit_move_perm(x, inner, outer)
    dims = dims_of(x)
    if perm is None or dims is None:
        return None
    target = _reshape_target(dims, perm)
    if target is None:
        return op.Transpose(x, perm=perm)
    return op.Reshape(x, op.initializer(np.array(target, dtype=np.int64), name_hint="shape"))


# -- Gather of one index, then Unsqueeze -------------------------------------------------------
def _gather_slice(x: ir.Value, index: ir.Value, inner: ir.Node, outer: ir.Node) -> tuple[int, int] | None:
    """``(i, axis)`` when ``Unsqueeze(Gather(x, i))`` is ``Slice(x, i:i+1, axis)``, else ``None``."""
    if (outer.version or 0) < 13 or (inner.version or 0) < 13:
        return None
    position = constant_value(index)
    dims = dims_of(x)
    if position is None or position.ndim != 0 or not np.issubdtype(position.dtype, np.integer) \
            or dims is None or len(dims) < 2:
        return None
    gathered = normalize_axes([inner.attr("axis", 0)], len(dims))
    restored = normalize_axes(list(_given_axes(outer) or ()), len(dims))
    if gathered is None or restored != gathered:
        return None
    size, i = dims[gathered[0]], int(position)
    if not isinstance(size, int) or not -size <= i < size:
        return None
    return i, gathered[0]


def _check_gather_unsqueeze(ctx: MatchContext, x: ir.Value, index: ir.Value, inner: ir.Node,
                            outer: ir.Node) -> CheckResult:
    if _gather_slice(x, index, inner, outer) is None:
        return Failure("not a constant scalar index in range of a known dim of a tensor of rank >= 2, "
                       "unsqueezed back on its axis (opset 13+)")
    return True


def _gather_to_slice(op: Any, x: ir.Value, index: ir.Value, inner: ir.Node, outer: ir.Node) -> ir.Value | None:
    found = _gather_slice(x, index, inner, outer)
    if found is None:
        return None
    i, axis = found
    end = np.iinfo(np.int64).max if i == -1 else i + 1
    return op.Slice(x, op.initializer(np.array([i], dtype=np.int64), name_hint="starts"),
                    op.initializer(np.array([end], dtype=np.int64), name_hint="ends"),
                    op.initializer(np.array([axis], dtype=np.int64), name_hint="axes"))


# -- Cast --------------------------------------------------------------------------------------
def _check_casts(ctx: MatchContext, x: ir.Value, inner: ir.Node, outer: ir.Node) -> CheckResult:
    source, middle, target = x.dtype, inner.attr("to"), outer.attr("to")
    if not isinstance(middle, int) or not isinstance(target, int):
        return Failure("a Cast names its type as a string (opset < 6)")
    if source is None:
        return Failure(f"the element type of '{x.name}' is unknown")
    if target not in _MERGEABLE_TARGETS:
        return Failure(f"target type {ir.dtype_name(target)} is not merged")
    if source != middle and not is_exact_widening(source, middle):
        return Failure(f"{ir.dtype_name(source)} -> {ir.dtype_name(middle)} loses information")
    return True


def _merge_casts(op: Any, x: ir.Value, outer: ir.Node) -> ir.Value:
    if x.dtype == outer.attr("to"):
        return x
    return op.Cast(x, **outer.attributes)


#: Every rule of ``merge-chains``; their names are the pass's counters.
MERGE_CHAIN_RULES = RuleSet([
    Rule("merge-transpose-transpose",
         lambda op, x: op.Transpose(op.Transpose(x, _name="inner"), _name="outer"),
         _merge_transposes, check=_check_transposes),
    *(_reshape_after(inner) for inner in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")),
    Rule("merge-reshape-flatten",
         lambda op, x, shape: op.Flatten(op.Reshape(x, shape), _name="outer"),
         _reshape_to_flat, check=_check_reshape_flatten),
    Rule("merge-unsqueeze-unsqueeze",
         lambda op, x: op.Unsqueeze(op.Unsqueeze(x, _allow_other_inputs=True, _name="inner"),
                                    _allow_other_inputs=True, _name="outer"),
         _merge_unsqueezes, check=_check_unsqueezes),
    # The cancels match the outer node alone: their result is the inner node's input, so the
    # inner node may keep other readers.
    Rule("cancel-unsqueeze-squeeze",
         lambda op, y: op.Squeeze(y, _allow_other_inputs=True, _name="outer"),
         _inner_input, check=_check_unsqueeze_squeeze),
    Rule("cancel-squeeze-unsqueeze",
         lambda op, y: op.Unsqueeze(y, _allow_other_inputs=True, _name="outer"),
         _inner_input, check=_check_squeeze_unsqueeze),
    Rule("squeeze-unsqueeze-to-reshape",
         lambda op, x: op.Unsqueeze(op.Squeeze(x, _allow_other_inputs=True, _name="inner"),
                                    _allow_other_inputs=True, _name="outer"),
         _unit_move, check=_check_unit_move),
    Rule("gather-unsqueeze-to-slice",
         lambda op, x, index: op.Unsqueeze(op.Gather(x, index, _name="inner"), _allow_other_inputs=True,
                                           _name="outer"),
         _gather_to_slice, check=_check_gather_unsqueeze),
    Rule("merge-cast-cast",
         lambda op, x: op.Cast(op.Cast(x, _name="inner"), _name="outer"),
         _merge_casts, check=_check_casts),
])


class MergeChains(RewritePass):
    """Merge back-to-back Transposes, reshapes, Unsqueezes and widening Casts into one node.

    Counters are the number of chains each rule merged, by rule name.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> MergeChains().run(model, PassContext()).counters  # doctest: +SKIP
        {'merge-transpose-transpose': 1}
    """

    name = "merge-chains"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    # Not "shapes-inferred": a merged chain (a Reshape, Transpose or Slice in place of two nodes)
    # can give the nodes after it more precise shapes, which the next rules read.
    preserves = frozenset({"topo-sorted"})
    rules = MERGE_CHAIN_RULES
