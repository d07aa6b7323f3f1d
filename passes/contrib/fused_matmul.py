"""``contrib-fused-matmul``: ``MatMul`` with transposed inputs and/or a scalar scale becomes ``FusedMatMul``.

Algebra: ``FusedMatMul(A, B, transA=a, transB=b, alpha=α) = α · op_a(A) @ op_b(B)`` where
``op_1`` swaps the last two axes (``Transpose`` with ``perm = [0, 1, ..., n-1, n-2]``) and
``op_0`` is the identity. The rules fold one step at a time, so any mix of them composes:

* ``MatMul(Transpose(A, swap), B)`` → ``FusedMatMul(A, B, transA=1)`` (likewise for ``B``);
* ``FusedMatMul(Transpose(A, swap), B, transA=t)`` → ``FusedMatMul(A, B, transA=1-t)``
  (two swaps cancel);
* ``Mul(MatMul(A, B), c)``, ``Mul(c, MatMul(A, B))`` → ``alpha = c``; ``Div(MatMul(A, B), c)``
  → ``alpha = 1/c``; the same for a ``FusedMatMul`` (``alpha`` multiplies);
* ``MatMul(Mul(A, c), B)`` and ``MatMul(A, Mul(B, c))`` (``Div`` too) → ``alpha = c``
  (scaling commutes with a matrix product);
* ``Reshape(Gemm(Reshape(A, [-1, K]), W, transB=t, alpha=α), A.shape[:-1] + [N])`` →
  ``FusedMatMul(A, W, transB=t, alpha=α)`` (``W`` 2-D, no bias): a matrix product over the
  last axis of ``A`` broadcasts over its leading axes, so flattening them around a ``Gemm`` is
  the same product. TorchScript exports write linear layers on 3-D inputs this way, and
  ``dedup-transposed-initializers`` writes a language-model head that reads the tied embedding
  so; the final Reshape then copies the whole output when it is a graph output (the
  ``[1, 128, 50257]`` logits: 2-4 % of GPT-2's run time at onnxruntime's CPU provider).

Rounding: ``α·(A@B)`` and ``(A@B)/c`` round differently in the last bit; that is the only
change in the numbers.

Must not fire when:

* the target has no ``FusedMatMul`` kernel for the element type;
* the Transpose is not exactly a swap of the last two axes (``transBatch`` forms are not
  emitted), or the rank of its input is unknown or below 2;
* the scale is not a one-element float constant, or has more dims than the product (it would
  broadcast the result to a higher rank), or is zero for ``Div``;
* a ``FusedMatMul`` already uses ``transBatchA``/``transBatchB``;
* the flattened ``Gemm`` has a bias ``C`` or ``transA=1``, ``W`` is not 2-D with static dims, or
  the Reshapes are not provably ``[prod(lead), K]`` and ``lead + [N]`` with ``lead`` the leading
  dims of ``A`` (``A`` of known rank, last dim ``K`` static);
* an intermediate (the transposed or scaled input, the unscaled product) is read elsewhere or
  is a graph output (the engine refuses; the intermediate would have to be kept anyway).
"""

from __future__ import annotations

from typing import Any, Callable

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet

from graphopt.passes.contrib._common import (CONTRIB_DOMAIN, contrib_attr, kernel_reason, scalar_constant,
                                             static_rank)
from graphopt.passes.contrib._shapes import DimLabels

__all__ = ["ContribFusedMatMul", "FUSED_MATMUL_RULES", "is_last_two_swap"]


def is_last_two_swap(perm: Any, rank: int | None) -> bool:
    """True when ``perm`` swaps the last two axes of a rank-``rank`` tensor and keeps the rest.

    Example:
        >>> is_last_two_swap((0, 2, 1), 3), is_last_two_swap((1, 0, 2), 3)
        (True, False)
    """
    if perm is None or rank is None or rank < 2 or len(perm) != rank:
        return False
    return tuple(perm) == tuple(range(rank - 2)) + (rank - 1, rank - 2)


def _flags(node: ir.Node) -> dict[str, Any]:
    """transA, transB and alpha of a MatMul (defaults) or FusedMatMul."""
    if node.op_type == "MatMul":
        return {"transA": 0, "transB": 0, "alpha": 1.0}
    return {"transA": int(contrib_attr(node, "transA", 0)), "transB": int(contrib_attr(node, "transB", 0)),
            "alpha": float(contrib_attr(node, "alpha", 1.0))}


def _product_reason(ctx: MatchContext, mm: ir.Node) -> str | None:
    reason = kernel_reason(ctx, "FusedMatMul", mm.outputs[0])
    if reason:
        return reason
    if mm.op_type == "FusedMatMul" and (contrib_attr(mm, "transBatchA", 0) or contrib_attr(mm, "transBatchB", 0)):
        return "the FusedMatMul uses transBatchA/transBatchB"
    return None


def _emit(op: Any, a: ir.Value, b: ir.Value, flags: dict[str, Any]) -> Any:
    return op.FusedMatMul(a, b, _domain=CONTRIB_DOMAIN, alpha=float(flags["alpha"]),
                          transA=int(flags["transA"]), transB=int(flags["transB"]))


# -- transposed inputs ---------------------------------------------------------------------------
def _transpose_pattern(root: str, side: int) -> Callable[..., Any]:
    domain = CONTRIB_DOMAIN if root == "FusedMatMul" else ""

    def pattern(op: Any, x: Any, other: Any) -> Any:
        t = op.Transpose(x, _name="transpose")
        inputs = (t, other) if side == 0 else (other, t)
        return getattr(op, root)(*inputs, _domain=domain, _name="mm")

    pattern.__qualname__ = f"{root.lower()}_transposed_{'a' if side == 0 else 'b'}"
    return pattern


def _transpose_check(side: int) -> Callable[..., Any]:
    def check(ctx: MatchContext, x: ir.Value, transpose: ir.Node, mm: ir.Node) -> Any:
        reason = _product_reason(ctx, mm)
        if reason:
            return Failure(reason)
        rank = static_rank(x)
        perm = transpose.attr("perm", None)
        if perm is None and rank is not None:
            perm = tuple(reversed(range(rank)))  # the default reverses the axes
        if not is_last_two_swap(perm, rank):
            return Failure(f"the Transpose (perm={list(perm) if perm is not None else '?'}) of input {side} is not "
                           f"a swap of the last two axes of a tensor of rank {rank if rank is not None else '?'}")
        return True

    return check


def _transpose_rewrite(side: int) -> Callable[..., Any]:
    key = "transA" if side == 0 else "transB"

    def rewrite(op: Any, x: ir.Value, other: ir.Value, mm: ir.Node) -> Any:
        flags = _flags(mm)
        flags[key] = 1 - flags[key]
        return _emit(op, x, other, flags) if side == 0 else _emit(op, other, x, flags)

    return rewrite


# -- scaled output -------------------------------------------------------------------------------
def _scaled_output_pattern(root: str, scale_op: str) -> Callable[..., Any]:
    domain = CONTRIB_DOMAIN if root == "FusedMatMul" else ""

    def pattern(op: Any, a: Any, b: Any, c: Any) -> Any:
        mm = getattr(op, root)(a, b, _domain=domain, _name="mm")
        return getattr(op, scale_op)(mm, c, _name="scale")

    pattern.__qualname__ = f"{scale_op.lower()}_{root.lower()}"
    return pattern


def _scale_factor(scale: ir.Node, c: ir.Value, rank: int | None) -> float | str:
    value = scalar_constant(c, rank)
    if value is None:
        return (f"the scale '{c.name}' is not a one-element float constant with at most "
                f"{rank if rank is not None else 0} dim(s)")
    if scale.op_type == "Div":
        if value == 0.0:
            return f"the divisor '{c.name}' is zero"
        return 1.0 / value
    return value


def _scaled_output_check(ctx: MatchContext, c: ir.Value, mm: ir.Node, scale: ir.Node) -> Any:
    reason = _product_reason(ctx, mm)
    if reason:
        return Failure(reason)
    factor = _scale_factor(scale, c, static_rank(mm.outputs[0]))
    return Failure(factor) if isinstance(factor, str) else True


def _scaled_output_rewrite(op: Any, a: ir.Value, b: ir.Value, c: ir.Value, mm: ir.Node, scale: ir.Node) -> Any:
    flags = _flags(mm)
    factor = _scale_factor(scale, c, static_rank(mm.outputs[0]))
    assert not isinstance(factor, str), "checked"
    flags["alpha"] *= factor
    return _emit(op, a, b, flags)


# -- scaled input --------------------------------------------------------------------------------
def _scaled_input_pattern(root: str, scale_op: str, side: int) -> Callable[..., Any]:
    domain = CONTRIB_DOMAIN if root == "FusedMatMul" else ""

    def pattern(op: Any, x: Any, c: Any, other: Any) -> Any:
        s = getattr(op, scale_op)(x, c, _name="scale")
        inputs = (s, other) if side == 0 else (other, s)
        return getattr(op, root)(*inputs, _domain=domain, _name="mm")

    pattern.__qualname__ = f"{root.lower()}_{scale_op.lower()}_{'a' if side == 0 else 'b'}"
    return pattern


def _scaled_input_check(ctx: MatchContext, x: ir.Value, c: ir.Value, mm: ir.Node, scale: ir.Node) -> Any:
    reason = _product_reason(ctx, mm)
    if reason:
        return Failure(reason)
    factor = _scale_factor(scale, c, static_rank(x))
    return Failure(factor) if isinstance(factor, str) else True


def _scaled_input_rewrite(side: int) -> Callable[..., Any]:
    def rewrite(op: Any, x: ir.Value, c: ir.Value, other: ir.Value, mm: ir.Node, scale: ir.Node) -> Any:
        flags = _flags(mm)
        factor = _scale_factor(scale, c, static_rank(x))
        assert not isinstance(factor, str), "checked"
        flags["alpha"] *= factor
        return _emit(op, x, other, flags) if side == 0 else _emit(op, other, x, flags)

    return rewrite


# -- a Gemm between a flatten and an unflatten -----------------------------------------------------
def _flat_gemm_pattern(op: Any, a: Any, w: Any, flat_shape: Any, shape: Any) -> Any:
    flat = op.Reshape(a, flat_shape, _name="flatten")
    return op.Reshape(op.Gemm(flat, w, _name="gemm"), shape, _name="unflatten")


def _flat_gemm_reason(a: ir.Value, w: ir.Value, flatten: ir.Node, gemm: ir.Node, unflatten: ir.Node) -> str | None:
    """Why ``unflatten(Gemm(flatten(a), w))`` may not be the product of ``a`` by ``w`` over its last axis."""
    if int(gemm.attr("transA", 0)):
        return "the Gemm transposes its flattened input (transA=1)"
    rank = static_rank(a)
    if rank is None or rank < 2:
        return f"'{a.name}' is not known to have at least 2 dims"
    w_shape = w.shape
    if w_shape is None or w_shape.rank != 2 or not all(isinstance(d, int) for d in w_shape.dims):
        return f"the Gemm weight '{w.name}' is not known to be 2-D with static dims"
    k, n = (w_shape.dims[1], w_shape.dims[0]) if int(gemm.attr("transB", 0)) else w_shape.dims
    a_dims = a.shape.dims
    if a_dims[-1] != k:
        return f"the last dim of '{a.name}' is not provably {k}, the Gemm's inner dim"
    lead = ("M",) if rank == 2 else tuple(f"L{i}" for i in range(rank - 1))
    sizes = {"K": k, "N": n}
    for name, dim in zip(lead, a_dims[:-1]):
        if isinstance(dim, int):
            sizes[name] = dim
    if rank > 2 and all(isinstance(d, int) for d in a_dims[:-1]):
        count = 1
        for d in a_dims[:-1]:
            count *= d
        sizes["M"] = count
    labels = DimLabels({a: (*lead, "K")}, sizes)
    reason = labels.reshape_reason(flatten, (*lead, "K"), ("M", "K"))
    if reason:
        return f"the first Reshape does not flatten '{a.name}' to [-1, {k}]: {reason}"
    reason = labels.reshape_reason(unflatten, ("M", "N"), (*lead, "N"))
    if reason:
        return f"the last Reshape does not restore the leading dims of '{a.name}': {reason}"
    return None


def _flat_gemm_check(ctx: MatchContext, a: ir.Value, w: ir.Value, flatten: ir.Node, gemm: ir.Node,
                     unflatten: ir.Node) -> Any:
    reason = kernel_reason(ctx, "FusedMatMul", gemm.outputs[0]) or _flat_gemm_reason(a, w, flatten, gemm, unflatten)
    return Failure(reason) if reason else True


def _flat_gemm_rewrite(op: Any, a: ir.Value, w: ir.Value, gemm: ir.Node) -> Any:
    flags = {"transA": 0, "transB": int(gemm.attr("transB", 0)), "alpha": float(gemm.attr("alpha", 1.0))}
    return _emit(op, a, w, flags)


def _rules() -> RuleSet:
    rules: list[Rule] = [Rule("fused-matmul-flattened-gemm", _flat_gemm_pattern, _flat_gemm_rewrite,
                              check=_flat_gemm_check)]
    for root in ("MatMul", "FusedMatMul"):
        prefix = "fused-matmul" if root == "MatMul" else "fused-matmul-fold"
        for side, label in ((0, "a"), (1, "b")):
            rules.append(Rule(f"{prefix}-transpose-{label}", _transpose_pattern(root, side),
                              _transpose_rewrite(side), check=_transpose_check(side)))
        for scale_op in ("Mul", "Div"):
            rules.append(Rule(f"{prefix}-{scale_op.lower()}-output", _scaled_output_pattern(root, scale_op),
                              _scaled_output_rewrite, check=_scaled_output_check, commute=scale_op == "Mul"))
            for side, label in ((0, "a"), (1, "b")):
                rules.append(Rule(f"{prefix}-{scale_op.lower()}-{label}", _scaled_input_pattern(root, scale_op, side),
                                  _scaled_input_rewrite(side), check=_scaled_input_check,
                                  commute=scale_op == "Mul"))
    return RuleSet(rules)


#: The rules of :class:`ContribFusedMatMul`.
FUSED_MATMUL_RULES = _rules()


class ContribFusedMatMul(RewritePass):
    """Fold last-two-axes Transposes and scalar scales into com.microsoft FusedMatMul.

    Example:
        >>> ContribFusedMatMul().run(model, PassContext()).counters  # doctest: +SKIP
        {'fused-matmul-transpose-b': 1, 'fused-matmul-fold-div-output': 1}
    """

    name = "contrib-fused-matmul"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = FUSED_MATMUL_RULES
