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
  A ``Squeeze`` without axes removes every 1 and is left alone.
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
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

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


def _check_unsqueeze_squeeze(ctx: MatchContext, x: ir.Value, inner: ir.Node, outer: ir.Node) -> CheckResult:
    rank = _rank(x)
    axes = _given_axes(inner)
    full = None if rank is None or axes is None else rank + len(axes)
    if not _same_axes(inner, outer, full):
        return Failure("Squeeze does not remove exactly the dims Unsqueeze added")
    return True


def _check_squeeze_unsqueeze(ctx: MatchContext, x: ir.Value, inner: ir.Node, outer: ir.Node) -> CheckResult:
    if not _same_axes(inner, outer, _rank(x)):
        return Failure("Unsqueeze does not restore exactly the dims Squeeze removed")
    return True


def _keep_x(op: Any, x: ir.Value) -> ir.Value:
    return x


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
    Rule("cancel-unsqueeze-squeeze",
         lambda op, x: op.Squeeze(op.Unsqueeze(x, _allow_other_inputs=True, _name="inner"),
                                  _allow_other_inputs=True, _name="outer"),
         _keep_x, check=_check_unsqueeze_squeeze),
    Rule("cancel-squeeze-unsqueeze",
         lambda op, x: op.Unsqueeze(op.Squeeze(x, _allow_other_inputs=True, _name="inner"),
                                    _allow_other_inputs=True, _name="outer"),
         _keep_x, check=_check_squeeze_unsqueeze),
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
    preserves = frozenset({"topo-sorted", "shapes-inferred"})
    rules = MERGE_CHAIN_RULES
