"""``eliminate-no-ops``: remove nodes whose output provably equals their (first) input.

Algebra: each rule replaces ``y = op(x, ...)`` by ``x`` where ``op`` is the identity map on the
values *and* the type of ``x``; the replacement must have ``y``'s element type and shape.

* ``Dropout`` in inference mode is the identity (opset 7-11 always; opset 12+ when
  ``training_mode`` is absent or a constant false; opset < 7 when ``is_test=1``); in training
  mode with a constant ``ratio`` of 0 it keeps every element and scales by 1/(1-0). Its
  ``mask`` output must be unused. Never for ``training_mode`` true or not constant.
* ``Cast(x, to=T)`` and ``CastLike(x, like)`` when ``x`` already has element type ``T``.
* ``Reshape(x, s)`` when ``s`` resolves to the dims of ``x`` dim by dim: each entry equals the
  known dim, or is 0 (copy, unless ``allowzero=1``), or is the single -1 (the element count
  forces it to the remaining dim); also ``Reshape(x, Shape(x))``. Never on symbolic dims that a
  literal must equal.
* ``Expand(x, s)`` when ``broadcast(shape(x), s) == shape(x)``: ``s`` has no more dims than
  ``x``, each 1 or equal to the known dim; also ``Expand(x, Shape(x))``.
* ``Unsqueeze`` with an empty axes list (attribute before opset 13, input from 13). ``Squeeze``
  without axes (or an empty axes input, which onnxruntime reads the same way) removes every
  dim of size 1, so it is the identity only when every dim is known and none is 1.
* ``Transpose`` whose ``perm`` is ``0..n-1`` (or absent on a tensor of rank <= 1).
* ``Pad`` in ``constant`` mode with all pads 0 (attribute before opset 11, input from 11).
* ``Slice`` over every listed axis from its start to its end with step 1: starts clamp to 0
  (0, or at most ``-dim``), ends clamp to the dim (at least the dim, or at least ``INT_MAX``).
* ``Concat``, ``Sum``, ``Max``, ``Min``, ``Mean`` of a single input.
* ``ReduceMean``, ``ReduceMax``, ``ReduceMin``, ``ReduceSum``, ``ReduceProd`` over axes whose
  dims are all known to be 1 (each output element is the one input element it covers, exactly):
  with ``keepdims=1`` the identity, with ``keepdims=0`` the ``Squeeze`` of those axes (the one
  rule here whose result is not ``x`` itself). Never for ``ReduceL1``/``ReduceL2``
  (``|x|``), ``ReduceSumSquare`` (``x*x``), ``ReduceLogSum``/``ReduceLogSumExp`` (rounding),
  for axes computed at run time, for empty axes (all axes, or none with
  ``noop_with_empty_axes``), nor when a reduced dim is unknown or symbolic.
* ``x*1``, ``1*x``, ``x+0``, ``0+x``, ``x-0``, ``x/1`` (opset 7+ broadcasting) when the
  constant is all ones or zeros *and* broadcasting keeps the shape of ``x``: ``x * ones(2, 3)``
  with ``x`` of shape ``[3]`` is a broadcast, not a no-op. ``0 - x`` and ``1 / x`` are not
  no-ops. ``x + 0.0`` differs from ``x`` only in the sign of a zero result (``-0 + 0 = +0``),
  which compares equal; onnxruntime's own no-op elimination makes the same choice.

A constant is a ``Constant`` output or an initializer that is not a graph input (IR < 4
models let callers override those). The driver replaces the root's output with ``x``; when the
output is a graph output its name and type stay (an ``Identity`` is kept where ``x`` must keep
its own name).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.passes.simplify._common import (INT_MAX, axes_given, broadcast_keeps_shape, dims_of, int_list,
                                              is_full_shape_of, node_axes, normalize_axes)
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

__all__ = ["NO_OP_RULES", "EliminateNoOps"]

CheckResult = Any  # True, None or a Failure


def _keep_input(op: Any, x: ir.Value) -> ir.Value:
    """The rewrite of every no-op rule: the node's output is its input."""
    return x


# -- Dropout -----------------------------------------------------------------------------------
def _dropout_pattern(op: Any, x: Any) -> Any:
    return op.Dropout(x, _allow_other_inputs=True, _name="node")


def _check_dropout(ctx: MatchContext, node: ir.Node) -> CheckResult:
    version = node.version
    if version is None:
        return Failure("the opset of Dropout is unknown")
    if version < 7:
        return True if node.attr("is_test", 0) == 1 else Failure("is_test is 0 (training mode)")
    if version < 12:
        return True
    mode = node.inputs[2] if len(node.inputs) > 2 else None
    if mode is None:
        return True
    flag = ctx.constant(mode)
    if flag is None or flag.size != 1:
        return Failure("training_mode is not a constant")
    if not bool(flag.reshape(-1)[0]):
        return True
    ratio = ctx.constant(node.inputs[1]) if node.inputs[1] is not None else None
    if ratio is not None and ratio.size == 1 and float(ratio.reshape(-1)[0]) == 0.0:
        return True  # ratio 0 drops nothing and scales by 1
    return Failure("training_mode is true")


# -- Cast, CastLike ----------------------------------------------------------------------------
def _check_cast(ctx: MatchContext, x: ir.Value, node: ir.Node) -> CheckResult:
    to = node.attr("to")
    if not isinstance(to, int):
        return Failure("Cast names its type as a string (opset < 6)")
    if x.dtype is None:
        return Failure(f"element type of '{x.name}' is unknown")
    if x.dtype != to:
        return Failure("Cast changes the element type")
    return True


def _check_cast_like(ctx: MatchContext, x: ir.Value, like: ir.Value) -> CheckResult:
    if x.dtype is None or like.dtype is None:
        return Failure("an element type is unknown")
    return True if x.dtype == like.dtype else Failure("CastLike changes the element type")


# -- Reshape, Expand ---------------------------------------------------------------------------
def reshape_is_identity(dims: tuple[ir.Dim, ...], spec: list[int], allowzero: bool) -> bool:
    """True when ``Reshape`` of a tensor with ``dims`` to ``spec`` returns the same shape.

    Example:
        >>> reshape_is_identity(("N", 4), [0, 4], allowzero=False)
        True
        >>> reshape_is_identity(("N", 4), [3, 4], allowzero=False)
        False
    """
    if len(spec) != len(dims):
        return False
    inferred = 0
    for d, s in zip(dims, spec):
        if s == 0 and not allowzero:
            continue  # copies the input dim
        if s == -1:
            inferred += 1  # forced to the remaining dim by the element count
            continue
        if not isinstance(d, int) or d != s:
            return False
    return inferred <= 1


def _check_reshape(ctx: MatchContext, x: ir.Value, shape: ir.Value, node: ir.Node) -> CheckResult:
    if (node.version or 0) < 5:
        return Failure("Reshape before opset 5 takes its shape as an attribute")
    if is_full_shape_of(shape, x):
        return True
    spec = int_list(shape)
    if spec is None:
        return Failure("the target shape is not a constant")
    dims = dims_of(x)
    if dims is None:
        return Failure(f"the rank of '{x.name}' is unknown")
    allowzero = bool(node.attr("allowzero", 0))
    if not reshape_is_identity(dims, spec, allowzero):
        return Failure(f"target {spec} may differ from the input shape {list(dims)}")
    return True


def _check_expand(ctx: MatchContext, x: ir.Value, shape: ir.Value) -> CheckResult:
    if is_full_shape_of(shape, x):
        return True
    spec = int_list(shape)
    if spec is None:
        return Failure("the target shape is not a constant")
    dims = dims_of(x)
    if dims is None:
        return Failure(f"the rank of '{x.name}' is unknown")
    if not broadcast_keeps_shape(dims, spec):
        return Failure(f"expanding {list(dims)} to {spec} changes the shape")
    return True


# -- Squeeze, Unsqueeze ------------------------------------------------------------------------
def _check_unsqueeze(ctx: MatchContext, node: ir.Node) -> CheckResult:
    if not axes_given(node, input_since=13):
        return Failure("Unsqueeze has no axes")
    axes = node_axes(node, input_since=13)
    if axes is None:
        return Failure("the axes are not a constant, or in the form of another opset")
    return True if not axes else Failure("Unsqueeze adds dims")


def _check_squeeze(ctx: MatchContext, x: ir.Value, node: ir.Node) -> CheckResult:
    axes = node_axes(node, input_since=13)
    if axes is None:
        return Failure("the axes are not a constant, or in the form of another opset")
    if axes:
        return Failure("Squeeze removes the dims it names")
    # No axes (or an empty list): every dim of size 1 goes.
    dims = dims_of(x)
    if dims is None or not all(isinstance(d, int) for d in dims):
        return Failure(f"the dims of '{x.name}' are not all known; one may be 1")
    if any(d == 1 for d in dims):
        return Failure(f"'{x.name}' has a dim of size 1, which Squeeze removes")
    return True


# -- Transpose ---------------------------------------------------------------------------------
def _check_transpose(ctx: MatchContext, x: ir.Value, node: ir.Node) -> CheckResult:
    perm = node.attr("perm")
    if perm is None:
        dims = dims_of(x)
        if dims is not None and len(dims) <= 1:
            return True
        return Failure("no perm (reverses the dims) on a tensor of rank other than 0 or 1")
    if tuple(perm) == tuple(range(len(perm))):
        return True
    return Failure(f"perm {list(perm)} moves dims")


# -- Pad ---------------------------------------------------------------------------------------
def _check_pad(ctx: MatchContext, node: ir.Node) -> CheckResult:
    version = node.version or 0
    if version < 2:
        return Failure("Pad before opset 2 is not handled")
    mode = node.attr("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode(errors="replace")
    if mode != "constant":
        return Failure(f"mode is '{mode}'")
    if (version < 11 and len(node.inputs) > 1) or (version >= 11 and "pads" in node.attributes):
        return Failure(f"Pad has the form of another opset than {version}")
    if version < 11:
        pads = node.attr("pads")
        pads = None if pads is None else [int(p) for p in pads]
    else:
        pads = int_list(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None:
        return Failure("the pads are not known constants")
    return True if all(p == 0 for p in pads) else Failure(f"pads {pads} are not all zero")


# -- Slice -------------------------------------------------------------------------------------
def _slice_parameters(node: ir.Node) -> tuple[list[int], list[int], list[int] | None, list[int] | None] | str:
    """(starts, ends, axes or None, steps or None), or why they are not known constants."""
    version = node.version or 0
    if (version < 10 and len(node.inputs) > 1) or (version >= 10 and "starts" in node.attributes):
        return f"Slice has the form of another opset than {version}"
    if version < 10:
        starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes")
        if starts is None or ends is None:
            return "starts or ends are missing"
        return ([int(v) for v in starts], [int(v) for v in ends],
                None if axes is None else [int(v) for v in axes], None)
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = int_list(ins[1]), int_list(ins[2])
    if starts is None or ends is None:
        return "starts or ends are not constants"
    axes = int_list(ins[3]) if ins[3] is not None else None
    steps = int_list(ins[4]) if ins[4] is not None else None
    if (ins[3] is not None and axes is None) or (ins[4] is not None and steps is None):
        return "axes or steps are not constants"
    return starts, ends, axes, steps


def _check_slice(ctx: MatchContext, x: ir.Value, node: ir.Node) -> CheckResult:
    params = _slice_parameters(node)
    if isinstance(params, str):
        return Failure(params)
    starts, ends, axes, steps = params
    if len(starts) != len(ends):
        return Failure("starts and ends differ in length")
    dims = dims_of(x)
    if dims is None:
        return Failure(f"the rank of '{x.name}' is unknown")
    axes_list = list(range(len(starts))) if axes is None else axes
    normalized = normalize_axes(axes_list, len(dims))
    if normalized is None or len(normalized) != len(starts):
        return Failure("axes are out of range")
    if steps is not None and any(s != 1 for s in steps):
        return Failure("a step is not 1")
    for axis, start, end in zip(normalized, starts, ends):
        dim = dims[axis]
        known = isinstance(dim, int)
        start_ok = start == 0 or start <= -INT_MAX or (known and start <= -dim)
        end_ok = end >= INT_MAX or (known and end >= dim)
        if not (start_ok and end_ok):
            return Failure(f"axis {axis}: [{start}, {end}) may not cover the dim {dim}")
    return True


# -- arithmetic identities ---------------------------------------------------------------------
def _identity_constant(ctx: MatchContext, x: ir.Value, c: ir.Value, node: ir.Node, unit: int) -> CheckResult:
    if (node.version or 0) < 7:
        return Failure("broadcasting before opset 7 follows other rules")
    array = ctx.constant(c)
    if array is None:
        return Failure(f"'{c.name}' is not a constant")
    if array.dtype == np.bool_ or not np.all(array == unit):
        return Failure(f"'{c.name}' is not all {unit}")
    if x.dtype is not None and c.dtype is not None and x.dtype != c.dtype:
        return Failure("the element types differ")
    dims = dims_of(x)
    if dims is None:
        return Failure(f"the rank of '{x.name}' is unknown")
    if not broadcast_keeps_shape(dims, array.shape):
        return Failure(f"broadcasting with shape {list(array.shape)} changes the shape {list(dims)}")
    return True


def _check_ones(ctx: MatchContext, x: ir.Value, c: ir.Value, node: ir.Node) -> CheckResult:
    return _identity_constant(ctx, x, c, node, 1)


def _check_zeros(ctx: MatchContext, x: ir.Value, c: ir.Value, node: ir.Node) -> CheckResult:
    return _identity_constant(ctx, x, c, node, 0)


# -- Reductions over dims of size 1 -----------------------------------------------------------
#: Reductions whose value over a single element is that element, exactly.
_UNIT_EXACT_REDUCTIONS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd")


def _unit_reduce_axes(x: ir.Value, node: ir.Node) -> list[int] | None:
    """The non-negative reduced axes of ``node`` when each is a known dim of size 1, else ``None``."""
    since = 13 if node.op_type == "ReduceSum" else 18
    axes = node_axes(node, input_since=since)
    dims = dims_of(x)
    if not axes or dims is None:
        return None
    norm = normalize_axes(axes, len(dims))
    if norm is None or len(set(norm)) != len(norm) or any(dims[a] != 1 for a in norm):
        return None
    return sorted(norm)


def _check_unit_reduce(ctx: MatchContext, x: ir.Value, node: ir.Node) -> CheckResult:
    if _unit_reduce_axes(x, node) is None:
        return Failure(f"the axes are not constants, are empty, or a reduced dim of '{x.name}' is not known to be 1")
    return True


def _unit_reduce(op: Any, x: ir.Value, node: ir.Node) -> ir.Value | None:
    axes = _unit_reduce_axes(x, node)
    if axes is None or node.version is None:
        return None
    if node.attr("keepdims", 1):
        return x
    if node.version >= 13:
        return op.Squeeze(x, op.initializer(np.array(axes, dtype=np.int64), name_hint="axes"))
    return op.Squeeze(x, axes=axes)


def _unit_reduce_rule(op_type: str) -> Rule:
    def pattern(op: Any, x: Any) -> Any:
        return getattr(op, op_type)(x, _allow_other_inputs=True, _name="node")

    return Rule(f"drop-unit-{op_type.lower()}", pattern, _unit_reduce, check=_check_unit_reduce)


def _single_input_rule(op_type: str) -> Rule:
    def pattern(op: Any, x: Any) -> Any:
        return getattr(op, op_type)(x)

    return Rule(f"drop-single-input-{op_type.lower()}", pattern, _keep_input)


#: Every rule of ``eliminate-no-ops``; their names are the pass's counters.
NO_OP_RULES = RuleSet([
    Rule("drop-inference-dropout", _dropout_pattern, _keep_input, check=_check_dropout),
    Rule("drop-same-type-cast", lambda op, x: op.Cast(x, _name="node"), _keep_input, check=_check_cast),
    Rule("drop-same-type-castlike", lambda op, x, like: op.CastLike(x, like), _keep_input,
         check=_check_cast_like),
    Rule("drop-identity-reshape", lambda op, x, shape: op.Reshape(x, shape, _name="node"), _keep_input,
         check=_check_reshape),
    Rule("drop-identity-expand", lambda op, x, shape: op.Expand(x, shape), _keep_input, check=_check_expand),
    Rule("drop-empty-unsqueeze", lambda op, x: op.Unsqueeze(x, _allow_other_inputs=True, _name="node"),
         _keep_input, check=_check_unsqueeze),
    Rule("drop-noop-squeeze", lambda op, x: op.Squeeze(x, _allow_other_inputs=True, _name="node"),
         _keep_input, check=_check_squeeze),
    Rule("drop-identity-transpose", lambda op, x: op.Transpose(x, _name="node"), _keep_input,
         check=_check_transpose),
    Rule("drop-zero-pad", lambda op, x: op.Pad(x, _allow_other_inputs=True, _name="node"), _keep_input,
         check=_check_pad),
    Rule("drop-full-slice", lambda op, x: op.Slice(x, _allow_other_inputs=True, _name="node"), _keep_input,
         check=_check_slice),
    Rule("drop-mul-by-one", lambda op, x, c: op.Mul(x, c, _name="node"), _keep_input, check=_check_ones,
         commute=True),
    Rule("drop-add-zero", lambda op, x, c: op.Add(x, c, _name="node"), _keep_input, check=_check_zeros,
         commute=True),
    Rule("drop-sub-zero", lambda op, x, c: op.Sub(x, c, _name="node"), _keep_input, check=_check_zeros),
    Rule("drop-div-by-one", lambda op, x, c: op.Div(x, c, _name="node"), _keep_input, check=_check_ones),
    *(_single_input_rule(op_type) for op_type in ("Concat", "Sum", "Max", "Min", "Mean")),
    *(_unit_reduce_rule(op_type) for op_type in _UNIT_EXACT_REDUCTIONS),
])


class EliminateNoOps(RewritePass):
    """Remove nodes that return their input unchanged (inference Dropout, same-type Cast, x*1, ...).

    Counters are the number of nodes each rule removed, by rule name.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> EliminateNoOps().run(model, PassContext()).counters  # doctest: +SKIP
        {'drop-inference-dropout': 1, 'drop-mul-by-one': 2}
    """

    name = "eliminate-no-ops"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted", "shapes-inferred"})
    rules = NO_OP_RULES
