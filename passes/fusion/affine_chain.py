"""``fuse-affine-chain``: consecutive multiplications and additions by constants become one of each.

The pass also holds the BatchNormalization rules (see :mod:`.batch_norm`): a per-channel Mul/Add
after a BatchNormalization folds into its scale and bias; another constant that merges without
growing splits it into ``Mul`` + ``Add``, which these rules then merge.

Algebra (``a``, ``b``, ``c`` constants; broadcasting is associative, so every form has the
shape ``broadcast(x, a, b, c)``)::

    (x·a)·c = x·(a·c)        (x + a) + c = x + (a + c)        (x·a + b)·c = x·(a·c) + b·c

The last turns three nodes into two and puts the multiplication first, so a chain such as
the ``Mul``/``Add`` pair of a decomposed BatchNormalization followed by another per-channel
``Mul``/``Add`` pair (Caffe2 exports write BN this way) collapses to a single pair.

Must not fire when:

* a constant is not a constant (graph inputs may be overridden) or holds a non-finite value
  (``inf·0`` and ``inf − inf`` make reassociation change results);
* the combined constant would hold more elements than the larger of the two it replaces
  (``[C,1,1]`` times ``[W]`` is ``[C,1,W]``: folding would grow the model);
* an intermediate is read outside the pattern or is a graph output (the engine refuses);
* the element type is not float, float16 or double (integer overflow does not reassociate).

Rounding changes by about one unit in the last place per merged operation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet, constant_value

from graphopt.passes.fusion._common import (cast_like, combined_size_reason, element_type, float_reason,
                                            not_constant_reason, typed)
from graphopt.passes.fusion.batch_norm import BATCH_NORM_RULES

__all__ = ["FuseAffineChain", "AFFINE_CHAIN_RULES"]


def _mul_mul(op: Any, x: Any, a: Any, c: Any) -> Any:
    return op.Mul(op.Mul(x, a), c)


def _add_add(op: Any, x: Any, a: Any, c: Any) -> Any:
    return op.Add(op.Add(x, a), c)


def _affine_mul(op: Any, x: Any, a: Any, b: Any, c: Any) -> Any:
    return op.Mul(op.Add(op.Mul(x, a), b), c)


def _constants(x: ir.Value, *values: ir.Value) -> list[np.ndarray] | str:
    """The float64 arrays of ``values``, or why the chain cannot be folded."""
    reason = float_reason(x)
    if reason:
        return reason
    arrays = []
    for value in values:
        array = constant_value(value)
        if array is None:
            return not_constant_reason(value, "the operand")
        if element_type(value) != element_type(x):
            return f"'{value.name}' and '{x.name}' have different element types"
        as_float = array.astype(np.float64)
        if not np.all(np.isfinite(as_float)):
            return f"'{value.name}' holds a non-finite value"
        arrays.append(as_float)
    return arrays


def _growth_reason(first: np.ndarray, second: np.ndarray) -> str | None:
    return combined_size_reason(first.shape, second.shape)


def _check_pair(ctx: MatchContext, x: ir.Value, a: ir.Value, c: ir.Value) -> Any:
    arrays = _constants(x, a, c)
    if isinstance(arrays, str):
        return Failure(arrays)
    reason = _growth_reason(*arrays)
    return Failure(reason) if reason else True


def _check_affine(ctx: MatchContext, x: ir.Value, a: ir.Value, b: ir.Value, c: ir.Value) -> Any:
    arrays = _constants(x, a, b, c)
    if isinstance(arrays, str):
        return Failure(arrays)
    scale, shift, factor = arrays
    reason = _growth_reason(scale, factor) or _growth_reason(shift, factor)
    return Failure(reason) if reason else True


def _folded(x: ir.Value, *values: ir.Value) -> list[np.ndarray]:
    arrays = _constants(x, *values)
    assert not isinstance(arrays, str), arrays
    return arrays


def _rewrite_mul_mul(op: Any, x: ir.Value, a: ir.Value, c: ir.Value) -> ir.Value:
    first, second = _folded(x, a, c)
    return op.Mul(x, op.initializer(cast_like(first * second, x), name_hint="scale"))


def _rewrite_add_add(op: Any, x: ir.Value, a: ir.Value, c: ir.Value) -> ir.Value:
    first, second = _folded(x, a, c)
    return op.Add(x, op.initializer(cast_like(first + second, x), name_hint="shift"))


def _rewrite_affine(op: Any, x: ir.Value, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    scale, shift, factor = _folded(x, a, b, c)
    scaled = typed(op.Mul(x, op.initializer(cast_like(scale * factor, x), name_hint="scale")), x)
    return op.Add(scaled, op.initializer(cast_like(shift * factor, x), name_hint="shift"))


AFFINE_CHAIN_RULES = RuleSet([
    BATCH_NORM_RULES,
    Rule("merge-mul-mul", _mul_mul, _rewrite_mul_mul, check=_check_pair, commute=True),
    Rule("merge-add-add", _add_add, _rewrite_add_add, check=_check_pair, commute=True),
    Rule("merge-affine-mul", _affine_mul, _rewrite_affine, check=_check_affine, commute=True, benefit=2),
])


class FuseAffineChain(RewritePass):
    """Merge chains of Mul/Add by constants into one Mul and one Add (or into the BatchNormalization they follow).

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> FuseAffineChain().run(model, PassContext()).counters  # doctest: +SKIP
        {'batch-norm-absorbs-mul-add': 62}
    """

    name = "fuse-affine-chain"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = AFFINE_CHAIN_RULES
