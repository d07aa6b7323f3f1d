"""Column splits of single heavy MatMul/Gemm nodes, so that pipeline stages can balance.

A node heavier than an even share of the model (GPT-2's LM head: 31% of all FLOPs) caps how
well any split that keeps nodes whole can balance. ``split_columns`` rewrites
``y = x·W (+ C)`` into ``y = Concat(x·W₀ (+ C₀), …, x·Wₖ₋₁ (+ Cₖ₋₁))`` along the last axis, with
``W`` cut into column blocks: every output element is the same dot product over the same
inner dimension, so the result is unchanged (bit-exact under onnxruntime's CPU kernels, which
accumulate over the inner dimension in the same order whatever the column count). The pieces
can then go to different stages, at the price of sending their slices of ``y`` to the stage
that holds the Concat.

Must not fire: a weight that is not a private constant 2-D initializer, a Gemm with
``transA``, ``alpha`` or ``beta`` other than 1, fewer columns than pieces.

When the joining Concat produces a graph output that no node reads, ``detach_output_concat``
removes it: the slices become graph outputs and the returned recipe (a manifest ``assemble``
entry) tells the runtime to concatenate them after the run. The slices must reach the caller
anyway, so they no longer cross between partitions on their way to a Concat.
"""

from __future__ import annotations

import logging

import numpy as np

from graphopt import ir

__all__ = ["detach_output_concat", "split_columns"]

logger = logging.getLogger(__name__)


def split_columns(model: ir.Model, node: ir.Node, pieces: int) -> bool:
    """Split ``node`` (MatMul or Gemm with a private constant weight) into ``pieces`` column blocks.

    Returns:
        True when the node was rewritten; False when it does not qualify (nothing changes).

    Example:
        >>> split_columns(model, lm_head, 4)  # doctest: +SKIP
        True
    """
    from graphopt.passes.partition.tensor_parallel import _weight  # same qualification rules

    found = _weight(node)
    if found is None or pieces < 2 or len(node.outputs) != 1:
        return False
    weight, trans = found
    columns = weight.shape[0] if trans else weight.shape[1]
    if columns < pieces:
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    bias_array = None
    if bias is not None:
        if bias.const_value is None or not bias.is_constant():
            return False
        bias_array = bias.const_value.numpy()
        if bias_array.ndim == 0 or bias_array.shape[-1] not in (1, columns):
            return False
    g = model.graph
    array = weight.numpy()
    bounds = np.linspace(0, columns, pieces + 1).astype(int)
    outs: list[ir.Value] = []
    label = node.name or node.op_type
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        block = np.ascontiguousarray(array[lo:hi] if trans else array[:, lo:hi])
        w = g.add_initializer(model.unique_name(f"{node.inputs[1].name}.cols{k}"), ir.ArrayTensor(block))
        inputs: list[ir.Value | None] = [node.inputs[0], w]
        if bias_array is not None:
            piece = bias_array if bias_array.shape[-1] == 1 else np.ascontiguousarray(bias_array[..., lo:hi])
            inputs.append(g.add_initializer(model.unique_name(f"{bias.name}.cols{k}"), ir.ArrayTensor(piece)))  # type: ignore[union-attr]
        part = ir.Node(node.domain, node.op_type, inputs, attributes=dict(node.attributes),
                       name=f"{label}/cols{k}")
        part.outputs[0].name = model.unique_name(f"{node.outputs[0].name}.cols{k}")
        g.insert_before(node, part)
        outs.append(part.outputs[0])
    concat = ir.Node("", "Concat", outs, attributes={"axis": -1}, name=f"{label}/concat")
    concat.outputs[0].name = model.unique_name(f"{node.outputs[0].name}.joined")
    g.insert_before(node, concat)
    node.outputs[0].replace_all_uses_with(concat.outputs[0], rename_graph_outputs=True)
    old_weight, old_bias = node.inputs[1], bias
    g.remove(node, force=True)
    for v in (old_weight, old_bias):
        if v is not None and v.is_initializer() and not v.has_uses() and not v.is_graph_input():
            g.remove_initializer(v)
    logger.debug("split-columns: %s into %d column blocks", label, pieces)
    return True


def detach_output_concat(model: ir.Model, concat: ir.Node) -> dict[str, object] | None:
    """Remove ``concat`` when it makes a graph output nobody reads; its inputs become graph outputs.

    The parts take the output's place in the graph's output list, in order. Nothing changes
    when the Concat's output is read by a node or listed twice, or when a part is a graph input,
    an initializer, an output already, or repeated (the runtime could not tell them apart).

    Returns:
        The recipe ``{"output": name, "op": "concat", "axis": int, "parts": [names]}`` for the
        manifest's ``assemble`` list, or ``None`` when nothing changed.

    Example:
        >>> detach_output_concat(model, model.graph.outputs[0].producer)  # doctest: +SKIP
        {'output': 'logits', 'op': 'concat', 'axis': -1, 'parts': ['logits.cols0', 'logits.cols1']}
    """
    g = model.graph
    if concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx") or len(concat.outputs) != 1:
        return None
    out = concat.outputs[0]
    positions = [k for k, v in enumerate(g.outputs) if v is out]
    parts = list(concat.inputs)
    if len(positions) != 1 or out.has_uses() or not parts:
        return None
    if any(p is None or p.producer is None or p.is_graph_output() or p.is_graph_input()
           or p.is_initializer() for p in parts):
        return None
    names = [p.name for p in parts]  # type: ignore[union-attr]
    if len(set(names)) != len(names) or out.name in names:
        return None
    axis_value = concat.attr("axis")
    if not isinstance(axis_value, int) or isinstance(axis_value, bool):
        return None
    position = positions[0]
    g.outputs[position:position + 1] = parts  # type: ignore[list-item]
    g.remove(concat, force=True)
    logger.debug("split-columns: %s assembled from %d graph outputs after the run", out.name, len(parts))
    return {"output": out.name, "op": "concat", "axis": axis_value, "parts": names}
