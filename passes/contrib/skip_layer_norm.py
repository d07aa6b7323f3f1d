"""``contrib-skip-layer-norm``: a residual ``Add`` and the normalization after it become one contrib op.

Algebra (normalizing over the last axis of ``s = a + b (+ bias)``, ``H`` wide)::

    SkipLayerNormalization(a, b, γ, β, bias)        = (s − mean(s)) / √(var(s) + ε) · γ + β
    SkipSimplifiedLayerNormalization(a, b, γ, bias) = s / √(mean(s²) + ε) · γ

Both also return the sum ``s`` as their fourth output (``input_skip_bias_sum``), so a sum that
feeds the next residual connection too (pre-norm blocks: GPT-2, LLaMA) is read from there and the
``Add`` goes away.

Normalizations recognized (``x`` the sum):

* ``LayerNormalization(x, γ, β)`` (opset 17+), ``RMSNormalization(x, γ)`` (opset 23+), both
  with ``axis = −1`` and ``stash_type = 1``;
* the decomposed forms of exports at any opset: ``d = x − ReduceMean(x)``,
  ``(d / √(ReduceMean(d²) + ε))·γ + β`` with ``d²`` as ``Pow(d, 2)`` or ``d·d`` and the
  division as ``Div`` or a product with ``Reciprocal``; and ``(x / √(ReduceMean(x²) + ε))·γ``
  with the division as ``Div``, ``·Reciprocal(·)`` or ``·(1 / ·)``.

With the option ``fuse-bias`` (on by default), ``a = MatMul(...) + bias`` with a constant ``[H]``
bias that nothing else reads moves the bias into the op's fifth input.

Must not fire when:

* the target has no kernel for the element type;
* ``a`` and ``b`` are not provably of one shape (the op does not broadcast its ``skip`` on every
  provider) or are not 3-D (``[batch, sequence, hidden]``) with a known hidden size;
* ``γ``/``β``/``bias`` are not constant vectors ``[H]``, ``ε`` is not a non-negative scalar
  constant, the exponent is not 2;
* the normalization is not over the last axis only, or ReduceMean drops the reduced axis;
* the sum is a graph output, or an intermediate of the normalization is read elsewhere (the
  engine refuses), or the normalization's ``Mean``/``InvStdDev`` outputs are read.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from graphopt import ir
from graphopt.pipeline import PassContext, PassResult
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet, apply_rules, constant_value

from graphopt.passes.contrib._common import (CONTRIB_DOMAIN, kernel_reason, last_dim, same_shape_reason,
                                             scalar_constant, static_rank, vector_constant_reason)

__all__ = ["ContribSkipLayerNorm", "skip_layer_norm_rules", "SUM_KEY"]

logger = logging.getLogger(__name__)

#: ``node.meta`` key of an emitted Skip*Normalization node: the sum value it replaces.
SUM_KEY = "contrib-skip-sum"

_LAYER_NORM = "SkipLayerNormalization"
_RMS_NORM = "SkipSimplifiedLayerNormalization"

Pattern = Callable[..., Any]


# -- patterns (x, the normalized value, is a variable: the Add that makes it stays outside) -------
def _std_layer_norm(op: Any, x: Any, gamma: Any) -> Any:
    return op.LayerNormalization(x, gamma, _allow_other_inputs=True, _name="norm")


def _std_rms_norm(op: Any, x: Any, gamma: Any) -> Any:
    return op.RMSNormalization(x, gamma, _name="norm")


def _square(op: Any, v: Any, two: Any, form: str) -> Any:
    return op.Pow(v, two) if form == "pow" else op.Mul(v, v)


def _decomposed_layer_norm(square: str, divide: str) -> Pattern:
    def core(op: Any, x: Any, two: Any, eps: Any) -> Any:
        d = op.Sub(x, op.ReduceMean(x, _allow_other_inputs=True, _name="mean"))
        var = op.ReduceMean(_square(op, d, two, square), _allow_other_inputs=True, _name="var")
        std = op.Sqrt(op.Add(var, eps))
        return op.Div(d, std) if divide == "div" else op.Mul(d, op.Reciprocal(std))

    if square == "pow":
        def pattern(op: Any, x: Any, two: Any, eps: Any, gamma: Any, beta: Any) -> Any:
            return op.Add(op.Mul(core(op, x, two, eps), gamma), beta)
    else:
        def pattern(op: Any, x: Any, eps: Any, gamma: Any, beta: Any) -> Any:  # type: ignore[misc]
            return op.Add(op.Mul(core(op, x, None, eps), gamma), beta)
    pattern.__qualname__ = f"layer_norm_{square}_{divide}"
    return pattern


def _decomposed_rms_norm(square: str, divide: str) -> Pattern:
    def core(op: Any, x: Any, two: Any, eps: Any, one: Any) -> Any:
        ms = op.ReduceMean(_square(op, x, two, square), _allow_other_inputs=True, _name="var")
        rms = op.Sqrt(op.Add(ms, eps))
        if divide == "div":
            return op.Div(x, rms)
        if divide == "reciprocal":
            return op.Mul(x, op.Reciprocal(rms))
        return op.Mul(x, op.Div(one, rms))

    if square == "pow" and divide == "one-over":
        def pattern(op: Any, x: Any, two: Any, eps: Any, one: Any, gamma: Any) -> Any:
            return op.Mul(core(op, x, two, eps, one), gamma)
    elif square == "pow":
        def pattern(op: Any, x: Any, two: Any, eps: Any, gamma: Any) -> Any:  # type: ignore[misc]
            return op.Mul(core(op, x, two, eps, None), gamma)
    elif divide == "one-over":
        def pattern(op: Any, x: Any, eps: Any, one: Any, gamma: Any) -> Any:  # type: ignore[misc]
            return op.Mul(core(op, x, None, eps, one), gamma)
    else:
        def pattern(op: Any, x: Any, eps: Any, gamma: Any) -> Any:  # type: ignore[misc]
            return op.Mul(core(op, x, None, eps, None), gamma)
    pattern.__qualname__ = f"rms_norm_{square}_{divide.replace('-', '_')}"
    return pattern


# -- checks ------------------------------------------------------------------------------------------
def _reduce_reason(node: ir.Node, rank: int) -> str | None:
    """Why a ReduceMean does not reduce exactly the last axis of a rank-``rank`` input, keeping it."""
    if node.attr("keepdims", 1) != 1:
        return "ReduceMean drops the reduced axis (keepdims=0)"
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_value(node.inputs[1])
        if array is None:
            return f"the axes '{node.inputs[1].name}' of ReduceMean are not a constant"
        axes = [int(a) for a in array.reshape(-1)]
    else:
        axes = list(node.attr("axes", ()) or ())
    if [a % rank for a in axes] != [rank - 1]:
        return f"ReduceMean reduces axes {axes}, not the last axis of a rank-{rank} tensor"
    return None


def _sum_operands(ctx: MatchContext, x: ir.Value, emitted: str) -> tuple[ir.Value, ir.Value, int] | str:
    """``(a, b, H)`` for a sum ``x = Add(a, b)`` that the op can take, or why it cannot."""
    add = x.producer
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.graph is not ctx.graph:
        return f"the normalized value '{x.name}' is not made by an Add (no residual connection)"
    if x.is_graph_output():
        return f"the sum '{x.name}' is a graph output"
    a, b = add.inputs[0], add.inputs[1]
    if a is None or b is None:
        return "the Add has a missing input"
    reason = kernel_reason(ctx, emitted, x)
    if reason:
        return reason
    reason = same_shape_reason(a, b)  # then the sum has that shape too
    if reason:
        return f"the residual operands must have one shape: {reason}"
    if static_rank(x) != 3:
        return f"the sum '{x.name}' is not 3-D ([batch, sequence, hidden])"
    hidden = last_dim(x)
    if hidden is None:
        return f"the hidden size (last dim) of '{x.name}' is unknown"
    return a, b, hidden


def _epsilon(eps: ir.Value) -> float | str:
    value = scalar_constant(eps, 3)
    if value is None or value < 0:
        return f"epsilon '{eps.name}' is not a non-negative scalar constant"
    return value


def _two_reason(two: ir.Value | None) -> str | None:
    if two is not None and scalar_constant(two, 3) != 2.0:
        return f"the exponent '{two.name}' is not 2"
    return None


def _params_reason(hidden: int, gamma: ir.Value, beta: ir.Value | None) -> str | None:
    reason = vector_constant_reason(gamma, hidden, "the scale γ")
    if reason is None and beta is not None:
        reason = vector_constant_reason(beta, hidden, "the shift β")
    return reason


def _std_reason(ctx: MatchContext, x: ir.Value, norm: ir.Node, emitted: str) -> tuple[ir.Value, ir.Value, int] | str:
    operands = _sum_operands(ctx, x, emitted)
    if isinstance(operands, str):
        return operands
    if norm.attr("axis", -1) not in (-1, 2):
        return f"{norm.op_type} normalizes from axis {norm.attr('axis', -1)}, not the last axis"
    if norm.attr("stash_type", 1) != 1:
        return f"{norm.op_type} has stash_type={norm.attr('stash_type', 1)}"
    return operands


def _check_std_layer_norm(ctx: MatchContext, x: ir.Value, gamma: ir.Value, norm: ir.Node) -> Any:
    operands = _std_reason(ctx, x, norm, _LAYER_NORM)
    if isinstance(operands, str):
        return Failure(operands)
    beta = norm.inputs[2] if len(norm.inputs) > 2 else None
    reason = _params_reason(operands[2], gamma, beta)
    return Failure(reason) if reason else True


def _check_std_rms_norm(ctx: MatchContext, x: ir.Value, gamma: ir.Value, norm: ir.Node) -> Any:
    operands = _std_reason(ctx, x, norm, _RMS_NORM)
    if isinstance(operands, str):
        return Failure(operands)
    reason = _params_reason(operands[2], gamma, None)
    return Failure(reason) if reason else True


def _check_decomposed(emitted: str) -> Callable[..., Any]:
    def check(ctx: MatchContext, x: ir.Value, eps: ir.Value, gamma: ir.Value, var: ir.Node,
              beta: ir.Value | None = None, mean: ir.Node | None = None, two: ir.Value | None = None,
              one: ir.Value | None = None) -> Any:
        operands = _sum_operands(ctx, x, emitted)
        if isinstance(operands, str):
            return Failure(operands)
        for node in (mean, var):
            reason = node is not None and _reduce_reason(node, 3)
            if reason:
                return Failure(reason)
        if isinstance(_epsilon(eps), str):
            return Failure(str(_epsilon(eps)))
        reason = _two_reason(two) or _params_reason(operands[2], gamma, beta)
        if reason:
            return Failure(reason)
        if one is not None and scalar_constant(one, 3) != 1.0:
            return Failure(f"the numerator '{one.name}' is not 1")
        return True

    return check


# -- rewrites ----------------------------------------------------------------------------------------
def _bias_split(value: ir.Value, hidden: int) -> tuple[ir.Value, ir.Value] | None:
    """``(m, bias)`` when ``value = Add(m, bias)`` with a constant ``[H]`` bias read only here."""
    add = value.producer
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or value.num_uses != 1 \
            or value.is_graph_output():
        return None
    for m, bias in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        if m is None or bias is None or vector_constant_reason(bias, hidden, "bias") is not None:
            continue
        if bias.dtype == value.dtype and same_shape_reason(m, value) is None:
            return m, bias
    return None


def _emit(op: Any, x: ir.Value, emitted: str, gamma: ir.Value, beta: ir.Value | None, epsilon: float,
          fuse_bias: bool) -> Any:
    add = x.producer
    assert add is not None
    a, b = add.inputs[0], add.inputs[1]
    hidden = last_dim(x)
    assert a is not None and b is not None and hidden is not None, "checked"
    bias = None
    if fuse_bias:
        for first, second in ((a, b), (b, a)):
            split = _bias_split(first, hidden)
            if split is not None:
                (a, bias), b = split, second
                break
    if emitted == _LAYER_NORM:
        inputs = [a, b, gamma, beta, bias]
    else:
        inputs = [a, b, gamma, bias]
    while inputs[-1] is None:
        inputs.pop()
    outputs = op.node(emitted, inputs, {"epsilon": float(epsilon)}, domain=CONTRIB_DOMAIN, num_outputs=4)
    outputs[1].name = ""  # mean and inverse standard deviation: training outputs, never read
    outputs[2].name = ""
    outputs[0].type = outputs[3].type = x.type  # the normalized value and the sum: the sum's type
    node = outputs[0].producer
    node.meta[SUM_KEY] = x
    return outputs[0]


def _rewrites(fuse_bias: bool) -> dict[str, Callable[..., Any]]:
    def std_layer_norm(op: Any, x: ir.Value, gamma: ir.Value, norm: ir.Node) -> Any:
        beta = norm.inputs[2] if len(norm.inputs) > 2 else None
        return _emit(op, x, _LAYER_NORM, gamma, beta, float(norm.attr("epsilon", 1e-5)), fuse_bias)

    def std_rms_norm(op: Any, x: ir.Value, gamma: ir.Value, norm: ir.Node) -> Any:
        return _emit(op, x, _RMS_NORM, gamma, None, float(norm.attr("epsilon", 1e-5)), fuse_bias)

    def layer_norm(op: Any, x: ir.Value, eps: ir.Value, gamma: ir.Value, beta: ir.Value) -> Any:
        epsilon = _epsilon(eps)
        assert not isinstance(epsilon, str), "checked"
        return _emit(op, x, _LAYER_NORM, gamma, beta, epsilon, fuse_bias)

    def rms_norm(op: Any, x: ir.Value, eps: ir.Value, gamma: ir.Value) -> Any:
        epsilon = _epsilon(eps)
        assert not isinstance(epsilon, str), "checked"
        return _emit(op, x, _RMS_NORM, gamma, None, epsilon, fuse_bias)

    return {"std_layer_norm": std_layer_norm, "std_rms_norm": std_rms_norm, "layer_norm": layer_norm,
            "rms_norm": rms_norm}


def skip_layer_norm_rules(fuse_bias: bool = True) -> RuleSet:
    """The rules of :class:`ContribSkipLayerNorm` (with or without moving a bias Add into the op)."""
    rewrite = _rewrites(fuse_bias)
    rules = [
        Rule("skip-layer-norm", _std_layer_norm, rewrite["std_layer_norm"], check=_check_std_layer_norm),
        Rule("skip-rms-norm", _std_rms_norm, rewrite["std_rms_norm"], check=_check_std_rms_norm),
    ]
    for square in ("pow", "mul"):
        for divide in ("div", "reciprocal"):
            rules.append(Rule(f"skip-layer-norm-decomposed-{square}-{divide}", _decomposed_layer_norm(square, divide),
                              rewrite["layer_norm"], check=_check_decomposed(_LAYER_NORM), commute=True))
        for divide in ("div", "reciprocal", "one-over"):
            rules.append(Rule(f"skip-rms-norm-decomposed-{square}-{divide}", _decomposed_rms_norm(square, divide),
                              rewrite["rms_norm"], check=_check_decomposed(_RMS_NORM), commute=True))
    return RuleSet(rules)


_RULES = {True: skip_layer_norm_rules(True), False: skip_layer_norm_rules(False)}


def _finish(model: ir.Model, ctx: PassContext) -> int:
    """Read shared sums from the fused ops' fourth output and drop the Adds they replace.

    Returns how many sums are now read from a fused op.
    """
    shared = 0
    for graph in model.all_graphs():
        reordered = False
        for node in graph:
            x = node.meta.pop(SUM_KEY, None)
            if x is None:
                continue
            total = node.outputs[3]
            add = x.producer
            if add is not None and add.is_live() and x.has_uses() and not x.is_graph_output() \
                    and ctx.allow_rewrite(f"read the sum '{x.name}' from the fused {node.op_type}"):
                x.replace_all_uses_with(total)
                shared += 1
                reordered = True
            if not total.has_uses() and not total.is_graph_output():
                node.set_outputs(node.outputs[:1])  # only the normalized value is read
            _remove_dead_producers(graph, add)
        if reordered:
            graph.sort()  # readers of the sum may come before the fused op
    return shared


def _remove_dead_producers(graph: ir.Graph, add: ir.Node | None) -> None:
    """Remove the sum's Add, and a bias Add that fed only it, once nothing reads them."""
    producers = [v.producer for v in add.inputs if v is not None] if add is not None else []
    if _remove_if_dead(graph, add):
        for producer in producers:
            _remove_if_dead(graph, producer)


def _remove_if_dead(graph: ir.Graph, node: ir.Node | None) -> bool:
    if node is None or not node.is_live() or node.graph is not graph or node.op_type != "Add":
        return False
    if any(o.has_uses() or o.is_graph_output() for o in node.outputs):
        return False
    graph.remove(node)
    return True


class ContribSkipLayerNorm(RewritePass):
    """Fuse a residual Add and the LayerNorm/RMSNorm after it into com.microsoft Skip*Normalization.

    Options:
        fuse_bias: also move a constant bias Add on one operand into the op.

    Example:
        >>> ContribSkipLayerNorm().run(model, PassContext()).counters  # doctest: +SKIP
        {'skip-layer-norm': 24, 'shared-sums': 0}
    """

    name = "contrib-skip-layer-norm"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    options = {"fuse_bias": True}
    rules = _RULES[True]

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Apply the rules, then read shared sums from the fused ops."""
        counts = apply_rules(model, _RULES[bool(self.config["fuse_bias"])], ctx)
        shared = _finish(model, ctx)
        if shared:
            logger.info("contrib-skip-layer-norm: %d sum(s) read from the fused op's fourth output", shared)
        changed = sum(counts.values()) > 0
        return PassResult(changed, {**counts, "shared-sums": shared})
