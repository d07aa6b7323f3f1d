"""``fuse-softmax-conv-into-matmul``: a 1x1 Conv contracting a channel Softmax becomes a MatMul.

The Distribution Focal Loss head of YOLOv8-v11 (``DFL``) ends in::

    t = Transpose(r, perm=p)          r: [N, 4, 16, A] -> t: [N, 16, 4, A]   (p = [0, 2, 1, 3])
    s = Softmax(t, axis=1)            over the 16 bins
    y = Conv(s, W)                    W: [1, 16, 1, 1] = 0..15, the expected bin

onnxruntime's CPU Softmax on an axis other than the last transposes its input so that the axis
is last, runs, and transposes back: two strided copies around a small kernel (on NudeNet's 320n
detector it took about 5% of the whole run). Written with the softmax axis last, the 1x1 Conv
(a contraction over that axis) is a MatMul, and the only data movement left is the one
Transpose the graph already had::

    t' = Transpose(r, perm=p')        p' = [p0, p2, p3, p1]: the softmax axis moved last
    s' = Softmax(t', axis=-1)
    m  = MatMul(s', W')               W' = W[:, :, 0, 0]ᵀ: [C, M]       m: [t0, t2, t3, M]
    y  = Transpose(m, perm=[0, 3, 1, 2])                                 y: [t0, M, t2, t3]

Algebra: ``Conv1x1(s, W)[n, m, i, j] = Σ_c W[m, c]·s[n, c, i, j]`` and
``s'[n, i, j, c] = s[n, c, i, j]`` (softmax normalizes over ``c`` either way), so
``m[n, i, j, m] = Σ_c s'[n, i, j, c]·W'[c, m] = y[n, m, i, j]``. With ``M = 1`` (the DFL head) the
last Transpose only moves a unit axis: onnxruntime copies it as one block. Only the summation
order of the dot products can change (relative error around 1e-7 in float32).

The rewrite uses standard ONNX ops only (Transpose, Softmax 13+, MatMul) and loads on every
provider; it runs at ``-O3`` because its benefit is measured on onnxruntime's kernels.

Must not fire when:

* Softmax is below opset 13 (its ``axis`` flattens the input to 2-D: another function), or its
  axis is not the channel axis 1 of a rank-4 tensor;
* the Conv is not a plain 1x1 contraction: a bias, a group above 1, strides or pads other than 1
  and 0, an ``auto_pad`` other than ``NOTSET``/``VALID``, a kernel other than 1x1;
* the weight is not a constant ``[M, C, 1, 1]`` (a graph input may be overridden), or the element
  type is not float, float16 or double;
* the Transpose or Softmax output is read elsewhere or is a graph output (the engine refuses).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet, constant_value

__all__ = ["FuseSoftmaxConvIntoMatMul", "SOFTMAX_CONV_RULES", "softmax_last_permutation"]

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
_RANK = 4
#: Puts the output channels (last axis of the MatMul result) back at axis 1.
_CHANNELS_FIRST = (0, 3, 1, 2)


def _pattern(op: Any, r: Any, w: Any) -> Any:
    t = op.Transpose(r, _name="transpose")
    s = op.Softmax(t, _name="softmax")
    return op.Conv(s, w, _name="conv")


def _transpose_perm(transpose: ir.Node, rank: int) -> tuple[int, ...]:
    perm = transpose.attr("perm", None)
    return tuple(range(rank - 1, -1, -1)) if perm is None else tuple(int(p) for p in perm)


def softmax_last_permutation(perm: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """``perm`` with the entry at ``axis`` moved last (the other entries keep their order).

    Example:
        >>> softmax_last_permutation((0, 2, 1, 3), 1)
        (0, 1, 3, 2)
    """
    return tuple(p for i, p in enumerate(perm) if i != axis) + (perm[axis],)


def _conv_reason(conv: ir.Node, weight: np.ndarray | None, w: ir.Value) -> str | None:
    if len(conv.inputs) > 2:
        return "the Conv has a bias"
    if weight is None:
        kind = "a graph input (callers may override it)" if w.is_graph_input() else "not a constant"
        return f"the weight '{w.name}' is {kind}"
    if weight.ndim != _RANK or weight.shape[2:] != (1, 1):
        return f"the weight '{w.name}' has shape {list(weight.shape)}, expected [M, C, 1, 1]"
    if int(conv.attr("group", 1)) != 1:
        return f"the Conv has group {conv.attr('group', 1)}, expected 1"
    if any(int(s) != 1 for s in conv.attr("strides", ()) or ()):
        return f"the Conv has strides {list(conv.attr('strides', ()))}, expected 1"
    if any(int(p) != 0 for p in conv.attr("pads", ()) or ()):
        return f"the Conv has pads {list(conv.attr('pads', ()))}, expected 0"
    auto_pad = conv.attr("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return f"the Conv has auto_pad {auto_pad}"
    kernel = conv.attr("kernel_shape", None)
    if kernel is not None and tuple(int(k) for k in kernel) != (1, 1):
        return f"the Conv has kernel_shape {list(kernel)}, expected [1, 1]"
    return None


def _check(ctx: MatchContext, r: ir.Value, w: ir.Value, transpose: ir.Node, softmax: ir.Node,
           conv: ir.Node) -> Any:
    if r.dtype not in _FLOAT_TYPES:
        found = "unknown" if r.dtype is None else ir.dtype_name(r.dtype)
        return Failure(f"'{r.name}' has element type {found}; only float, float16 and double are rewritten")
    if r.shape is None or r.shape.rank != _RANK:
        return Failure(f"'{r.name}' is not known to have rank {_RANK}")
    if (softmax.version or 1) < 13:
        return Failure(f"Softmax opset {softmax.version} flattens to 2-D around its axis; 13 or later is needed")
    axis = int(softmax.attr("axis", -1))
    if axis + (_RANK if axis < 0 else 0) != 1:
        return Failure(f"the Softmax axis is {axis}, not the channel axis 1 the Conv contracts")
    if sorted(_transpose_perm(transpose, _RANK)) != list(range(_RANK)):
        return Failure("the Transpose perm is not a permutation of the 4 axes")
    weight = constant_value(w)
    reason = _conv_reason(conv, weight, w)
    if reason:
        return Failure(reason)
    if w.dtype != r.dtype:
        return Failure(f"the weight '{w.name}' and '{r.name}' have different element types")
    return True


def _rewrite(op: Any, r: ir.Value, w: ir.Value, transpose: ir.Node) -> Any:
    weight = constant_value(w)
    assert weight is not None, "checked"
    perm = softmax_last_permutation(_transpose_perm(transpose, _RANK), 1)
    moved = r if perm == tuple(range(_RANK)) else op.Transpose(r, perm=list(perm))
    normalized = op.Softmax(moved, axis=_RANK - 1)
    matrix = op.initializer(np.ascontiguousarray(weight[:, :, 0, 0].T), name_hint=f"{w.name}_matmul")
    return op.Transpose(op.MatMul(normalized, matrix), perm=list(_CHANNELS_FIRST))


#: The rule of :class:`FuseSoftmaxConvIntoMatMul`.
SOFTMAX_CONV_RULES = RuleSet([Rule("softmax-conv1x1-to-matmul", _pattern, _rewrite, check=_check)])


class FuseSoftmaxConvIntoMatMul(RewritePass):
    """Rewrite Transpose → Softmax(channel axis) → 1x1 Conv as Transpose → Softmax(last axis) → MatMul.

    Example:
        >>> FuseSoftmaxConvIntoMatMul().run(model, PassContext()).counters  # doctest: +SKIP
        {'softmax-conv1x1-to-matmul': 1}
    """

    name = "fuse-softmax-conv-into-matmul"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = SOFTMAX_CONV_RULES
