"""``contrib-fused-conv``: ``Conv`` + activation (+ a residual ``Add``) becomes ``com.microsoft::FusedConv``.

Algebra: ``FusedConv(x, W, B, Z, activation=f, activation_params=p) = f_p(Conv(x, W, B) + Z)``,
computed in one kernel (the activation runs on each output tile while it is still in cache).
The activations and their parameters:

=============  =========================================  ==============================
activation     function                                   ``activation_params``
=============  =========================================  ==============================
Relu           max(y, 0)                                  —
Sigmoid        1 / (1 + e^-y)                             —
Tanh           tanh(y)                                    —
LeakyRelu      y if y >= 0 else α·y                       [α] (default 0.01)
Clip           min(max(y, lo), hi)                        [lo, hi] (absent bounds: ±float max)
HardSigmoid    max(0, min(1, α·y + β))                    [α, β] (defaults 0.2, 0.5)
=============  =========================================  ==============================

The residual form ``f(Add(Conv(x, W, B), Z))`` (or a two-input ``Sum``, as Caffe2 exports
write it: ResNet, ShuffleNet) passes ``Z`` as the fourth input; the kernel adds it elementwise
before the activation, so ``Z`` must have exactly the Conv output's shape (no broadcasting).

Must not fire when:

* the target has no ``FusedConv`` kernel for the element type, or its kernel does not take the
  activation (onnxruntime's CUDA kernel takes only ``Relu``);
* the Conv output (or the sum) is read by another node or is a graph output (the engine
  refuses: the activation-free value would be lost);
* ``Clip``'s bounds are not constants (they would be read at run time) or are not scalars;
* ``Z`` is not provably of the Conv output's shape, or the Conv already has four inputs;
* ``Z`` is the Conv output itself (``Add(c, c)``): the Conv would have to stay and run twice.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet, constant_value

from graphopt.passes.contrib._common import CONTRIB_DOMAIN, kernel_reason, same_shape_reason
from graphopt.passes.contrib.capabilities import fused_conv_activations

__all__ = ["ContribFusedConv", "FUSED_CONV_RULES", "activation_params"]

#: Activations whose node has no inputs besides ``x``, with their parameter attributes and defaults.
_ATTRIBUTE_ACTIVATIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "Relu": (),
    "Sigmoid": (),
    "Tanh": (),
    "LeakyRelu": (("alpha", 0.01),),
    "HardSigmoid": (("alpha", 0.2), ("beta", 0.5)),
}
_FLOAT_MAX = float(np.finfo(np.float32).max)


def activation_params(act: ir.Node) -> list[float] | str:
    """The ``activation_params`` of ``FusedConv`` for the activation node ``act``, or why none.

    Example:
        >>> activation_params(leaky_relu_node)  # doctest: +SKIP
        [0.1]
    """
    if act.op_type in _ATTRIBUTE_ACTIVATIONS:
        return [float(act.attr(name, default)) for name, default in _ATTRIBUTE_ACTIVATIONS[act.op_type]]
    if act.op_type != "Clip":
        return f"{act.op_type} is not an activation FusedConv knows"
    if (act.version or 1) < 11:
        return [float(act.attr("min", -_FLOAT_MAX)), float(act.attr("max", _FLOAT_MAX))]
    bounds: list[float] = []
    for index, default in ((1, -_FLOAT_MAX), (2, _FLOAT_MAX)):
        value = act.inputs[index] if len(act.inputs) > index else None
        if value is None:
            bounds.append(default)
            continue
        array = constant_value(value)
        if array is None or array.size != 1 or array.ndim > 0 and array.shape != (1,):
            what = "min" if index == 1 else "max"
            return f"Clip {what} '{value.name}' is not a constant scalar"
        bounds.append(float(array.reshape(-1)[0]))
    return bounds


def _activation_reason(ctx: MatchContext, conv: ir.Node, act: ir.Node) -> list[float] | str:
    output = conv.outputs[0]
    reason = kernel_reason(ctx, "FusedConv", output)
    if reason:
        return reason
    if act.op_type not in fused_conv_activations(ctx.target):
        return f"target '{ctx.target}''s FusedConv kernel does not take activation {act.op_type}"
    if len(conv.inputs) > 3:
        return "the Conv has more than three inputs"
    return activation_params(act)


def _check(ctx: MatchContext, conv: ir.Node, act: ir.Node) -> Any:
    params = _activation_reason(ctx, conv, act)
    return Failure(params) if isinstance(params, str) else True


def _check_residual(ctx: MatchContext, conv: ir.Node, act: ir.Node, z: ir.Value) -> Any:
    params = _activation_reason(ctx, conv, act)
    if isinstance(params, str):
        return Failure(params)
    if z is conv.outputs[0]:
        return Failure("Z is the Conv output itself: the Conv would stay and run twice")
    reason = same_shape_reason(z, conv.outputs[0])
    if reason:
        return Failure(f"Z must have the Conv output's shape: {reason}")
    return True


def _fused(op: Any, conv: ir.Node, act: ir.Node, z: ir.Value | None) -> Any:
    params = activation_params(act)
    assert not isinstance(params, str), "checked"
    inputs = list(conv.inputs) + [None] * (3 - len(conv.inputs))
    if z is not None:
        inputs.append(z)
    return op.FusedConv(*inputs, _domain=CONTRIB_DOMAIN, **conv.attributes, activation=act.op_type,
                        activation_params=params or None)


def _rewrite(op: Any, conv: ir.Node, act: ir.Node) -> Any:
    return _fused(op, conv, act, None)


def _rewrite_residual(op: Any, conv: ir.Node, act: ir.Node, z: ir.Value) -> Any:
    return _fused(op, conv, act, z)


def _activation_pattern(activation: str, residual: str | None) -> Callable[..., Any]:
    extra = activation == "Clip"

    if residual:
        def pattern(op: Any, x: Any, z: Any) -> Any:
            conv = op.Conv(x, _allow_other_inputs=True, _name="conv")
            total = getattr(op, residual)(conv, z)
            return getattr(op, activation)(total, _allow_other_inputs=extra, _name="act")
    else:
        def pattern(op: Any, x: Any) -> Any:  # type: ignore[misc]
            conv = op.Conv(x, _allow_other_inputs=True, _name="conv")
            return getattr(op, activation)(conv, _allow_other_inputs=extra, _name="act")
    pattern.__qualname__ = f"{activation.lower()}_{residual.lower() + '_' if residual else ''}conv"
    return pattern


def _rules() -> RuleSet:
    rules = []
    for activation in ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid"):
        name = activation.lower()
        # The residual forms first: they take the Add (or two-input Sum) into the kernel too.
        for residual in ("Add", "Sum"):
            rules.append(Rule(f"fused-conv-{residual.lower()}-{name}", _activation_pattern(activation, residual),
                              _rewrite_residual, check=_check_residual, benefit=2, commute=True))
        rules.append(Rule(f"fused-conv-{name}", _activation_pattern(activation, None), _rewrite, check=_check))
    return RuleSet(rules)


#: The rules of :class:`ContribFusedConv`: ``fused-conv-<activation>``, ``fused-conv-add-<activation>`` and
#: ``fused-conv-sum-<activation>``.
FUSED_CONV_RULES = _rules()


class ContribFusedConv(RewritePass):
    """Fuse Conv + activation (+ residual Add) into com.microsoft FusedConv where the target has it.

    Example:
        >>> ContribFusedConv().run(model, PassContext(target="cpu")).counters  # doctest: +SKIP
        {'fused-conv-relu': 12}
    """

    name = "contrib-fused-conv"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = FUSED_CONV_RULES
