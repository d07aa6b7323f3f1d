"""``fuse-pad``: fold a zero-valued constant ``Pad`` into the ``pads`` of the Conv or AveragePool it feeds.

Algebra: ``Conv`` pads its input with zeros, so ``Conv(Pad(x, p, value=0), pads=q)`` equals
``Conv(x, pads=p+q)`` when ``p`` touches only the spatial axes (batch and channel pads would
change the output's shape, not its borders). ``AveragePool`` with ``count_include_pad=1``
averages padded zeros like real ones, so the same holds for it; one with
``count_include_pad=0`` and no pads of its own becomes ``count_include_pad=1`` (it had no
padded cells to leave out before).

Must not fire when:

* the Pad is not ``constant`` mode, its value is not a constant zero, its pads or axes are not
  constants, a pad is negative (a crop), or it pads the batch or channel axis;
* the Conv/AveragePool uses ``auto_pad`` other than ``NOTSET`` (its pads are computed, not added);
* AveragePool: ``count_include_pad=0`` with pads of its own (padded zeros would be counted
  differently), ``ceil_mode=1`` (the last window may run past the padded input), or a
  combined pad as large as the kernel (onnxruntime rejects it);
* MaxPool is never fused: its padding is ``-inf``, which a Pad only reproduces with an
  explicit ``-inf`` value, and exporters do not write that;
* the Pad output has other readers or is a graph output (the engine refuses);
* the element type is not float, float16 or double.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import ir
from graphopt.rewrite import Failure, MatchContext, RewritePass, Rule, RuleSet, constant_value

from graphopt.passes.fusion._common import float_reason, opset_reason

__all__ = ["FusePad", "PAD_RULES", "spatial_pads"]


def _pad_conv(op: Any, x: Any, w: Any) -> Any:
    padded = op.Pad(x, _allow_other_inputs=True, _name="pad")
    return op.Conv(padded, w, _allow_other_inputs=True, _name="conv")


def _pad_average_pool(op: Any, x: Any) -> Any:
    return op.AveragePool(op.Pad(x, _allow_other_inputs=True, _name="pad"), _name="pool")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def spatial_pads(pad: ir.Node, rank: int) -> list[int] | str:
    """The pads a zero, constant-mode ``pad`` adds to the spatial axes of a rank-``rank`` input.

    Returns ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`` over axes ``2..rank-1`` (the
    layout of Conv's ``pads``), or the reason the Pad cannot be folded.

    Example:
        >>> spatial_pads(pad_node, 4)  # doctest: +SKIP
        [1, 1, 1, 1]
    """
    version = pad.version
    if version is None or version < 2:
        return "the Pad opset is unknown or below 2"
    if _text(pad.attr("mode", "constant")) != "constant":
        return f"Pad mode is '{_text(pad.attr('mode'))}', not 'constant'"
    if version < 11:
        pads = [int(p) for p in pad.attr("pads", ())]
        value = float(pad.attr("value", 0.0))
        axes = list(range(rank))
    else:
        pads_array = constant_value(pad.inputs[1] if len(pad.inputs) > 1 else None)
        if pads_array is None:
            return "the Pad pads are not a constant"
        pads = [int(p) for p in pads_array.reshape(-1)]
        fill = _optional_input(pad, 2)
        value = 0.0
        if fill is not None:
            fill_array = constant_value(fill)
            if fill_array is None or fill_array.size > 1:
                return "the Pad value is not a constant scalar"
            value = float(fill_array.reshape(-1)[0]) if fill_array.size else 0.0
        axes_value = _optional_input(pad, 3)
        if axes_value is None:
            axes = list(range(rank))
        else:
            axes_array = constant_value(axes_value)
            if axes_array is None:
                return "the Pad axes are not a constant"
            axes = [int(a) + rank if int(a) < 0 else int(a) for a in axes_array.reshape(-1)]
    if value != 0.0:
        return f"the Pad value is {value:g}, not 0"
    if len(pads) != 2 * len(axes) or any(not 0 <= a < rank for a in axes):
        return f"the Pad pads/axes do not fit a rank-{rank} input"
    begin = dict.fromkeys(range(rank), 0)
    end = dict.fromkeys(range(rank), 0)
    for i, axis in enumerate(axes):
        begin[axis] += pads[i]
        end[axis] += pads[i + len(axes)]
    if any(p < 0 for p in list(begin.values()) + list(end.values())):
        return "the Pad has a negative pad (a crop)"
    if begin[0] or end[0] or begin[1] or end[1]:
        return "the Pad pads the batch or channel axis"
    return [begin[a] for a in range(2, rank)] + [end[a] for a in range(2, rank)]


def _own_pads(node: ir.Node, spatial: int) -> list[int]:
    pads = node.attr("pads")
    return [0] * (2 * spatial) if pads is None else [int(p) for p in pads]


def _auto_pad_reason(node: ir.Node) -> str | None:
    auto_pad = _text(node.attr("auto_pad", "NOTSET"))
    if auto_pad != "NOTSET":
        return f"{node.op_type} uses auto_pad={auto_pad}"
    return None


def _conv_rank(w: ir.Value) -> int | None:
    shape = w.shape
    return None if shape is None or shape.rank < 3 else shape.rank


def _check_conv(ctx: MatchContext, x: ir.Value, w: ir.Value, pad: ir.Node, conv: ir.Node) -> Any:
    reason = float_reason(x) or _auto_pad_reason(conv)
    if reason:
        return Failure(reason)
    rank = _conv_rank(w)
    if rank is None:
        return Failure(f"the rank of the weight '{w.name}' is not known")
    pads = spatial_pads(pad, rank)
    return Failure(pads) if isinstance(pads, str) else True


def _with_pads(node: ir.Node, pads: list[int], **overrides: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {k: v for k, v in node.attributes.items() if k not in overrides and k != "pads"}
    attributes["pads"] = pads
    attributes.update(overrides)
    return attributes


def _rewrite_conv(op: Any, x: ir.Value, w: ir.Value, pad: ir.Node, conv: ir.Node) -> ir.Value:
    rank = _conv_rank(w)
    assert rank is not None
    extra = spatial_pads(pad, rank)
    assert not isinstance(extra, str), extra
    pads = [int(a + b) for a, b in zip(_own_pads(conv, rank - 2), extra)]
    return op.node("Conv", [x, *conv.inputs[1:]], _with_pads(conv, pads))


def _check_pool(ctx: MatchContext, x: ir.Value, pad: ir.Node, pool: ir.Node) -> Any:
    reason = float_reason(x) or _auto_pad_reason(pool) or opset_reason(ctx, 7, "AveragePool(count_include_pad)")
    if reason:
        return Failure(reason)
    kernel = [int(k) for k in pool.attr("kernel_shape", ())]
    if not kernel:
        return Failure("AveragePool has no kernel_shape")
    if pool.attr("ceil_mode", 0) != 0:
        return Failure("AveragePool uses ceil_mode=1")
    own = _own_pads(pool, len(kernel))
    if pool.attr("count_include_pad", 0) != 1 and any(own):
        return Failure("AveragePool has pads of its own and count_include_pad=0")
    extra = spatial_pads(pad, len(kernel) + 2)
    if isinstance(extra, str):
        return Failure(extra)
    combined = np.add(own, extra)
    if any(p >= kernel[i % len(kernel)] for i, p in enumerate(combined)):
        return Failure(f"combined pads {combined.tolist()} reach the kernel size {kernel}")
    return True


def _rewrite_pool(op: Any, x: ir.Value, pad: ir.Node, pool: ir.Node) -> ir.Value:
    kernel = [int(k) for k in pool.attr("kernel_shape", ())]
    extra = spatial_pads(pad, len(kernel) + 2)
    assert not isinstance(extra, str), extra
    pads = [int(a + b) for a, b in zip(_own_pads(pool, len(kernel)), extra)]
    return op.node("AveragePool", [x], _with_pads(pool, pads, count_include_pad=1))


PAD_RULES = RuleSet([
    Rule("pad-conv", _pad_conv, _rewrite_conv, check=_check_conv),
    Rule("pad-average-pool", _pad_average_pool, _rewrite_pool, check=_check_pool),
])


class FusePad(RewritePass):
    """Fold a zero-valued constant Pad of the spatial axes into the pads of the Conv/AveragePool it feeds.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> FusePad().run(model, PassContext()).counters  # doctest: +SKIP
        {'pad-conv': 1}
    """

    name = "fuse-pad"
    opt_level = 2
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    rules = PAD_RULES
