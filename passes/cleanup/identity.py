"""``eliminate-identity``: remove ``Identity`` nodes by letting their readers read the input.

Works in every graph (main graph, subgraphs at any depth, function bodies) and for every type an
``Identity`` carries (tensors, sequences, optionals).

When the output is an output of its graph, the input takes over the output's name and declared
type (``replace_all_uses_with(..., rename_graph_outputs=True)``), so the signature does not
change. The node must stay when that is impossible without a new ``Identity``:

* the input is a graph input, an initializer or another output of the same graph (its name is
  part of the signature or must stay unique);
* the input comes from an enclosing scope and the output is a subgraph output (ONNX requires a
  subgraph's outputs to be computed in the subgraph);
* the output is listed as the output of a *nested* graph, or the input's name is one the model's
  ``training_info`` refers to.
"""

from __future__ import annotations

import logging

from graphopt import ir
from graphopt.pipeline import Pass, PassContext, PassResult
from graphopt.passes.cleanup._scope import describe, is_default_domain, pinned_outputs, training_names

__all__ = ["EliminateIdentity"]

logger = logging.getLogger(__name__)


class EliminateIdentity(Pass):
    """Remove ``Identity`` nodes, rewiring their readers (and graph outputs) to the input.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> EliminateIdentity().run(model, PassContext()).counters  # doctest: +SKIP
        {'removed-nodes': 2, 'renamed-outputs': 1}
    """

    name = "eliminate-identity"
    opt_level = 1
    preserves = frozenset({"topo-sorted", "shapes-inferred"})

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Remove every removable ``Identity`` of every graph."""
        pinned = pinned_outputs(model)
        keep_names = training_names(model)
        removed = renamed = 0
        for graph in list(model.all_graphs()):
            own_outputs = {id(v) for v in graph.outputs}
            for node in graph:
                if node.op_type != "Identity" or not is_default_domain(node.domain):
                    continue
                if len(node.inputs) != 1 or node.inputs[0] is None or len(node.outputs) != 1:
                    continue
                source, result = node.inputs[0], node.outputs[0]
                is_output = id(result) in own_outputs
                reason = _why_kept(graph, source, result, is_output, pinned, keep_names)
                if reason:
                    logger.debug("kept %s: %s", describe(node), reason)
                    continue
                if not ctx.allow_rewrite(f"remove {describe(node)}"):
                    return PassResult(removed > 0, {"removed-nodes": removed, "renamed-outputs": renamed})
                result.replace_all_uses_with(source, rename_graph_outputs=is_output)
                graph.remove(node)
                removed += 1
                if is_output:
                    renamed += 1
                    own_outputs = {id(v) for v in graph.outputs}
                    pinned.add(id(source))  # now an output itself: a second Identity of it stays
                logger.debug("removed %s", describe(node))
        if removed:
            logger.info("eliminate-identity: removed %d Identity node(s)", removed)
        return PassResult(removed > 0, {"removed-nodes": removed, "renamed-outputs": renamed})


def _why_kept(graph: ir.Graph, source: ir.Value, result: ir.Value, is_output: bool,
              pinned: set[int], keep_names: set[str]) -> str:
    """Why this ``Identity`` must stay ("" when it can go)."""
    if not is_output and id(result) in pinned:
        return f"'{result.name}' is an output of a nested graph"
    if result.name and result.name in keep_names:
        return f"training_info refers to '{result.name}'"
    if not is_output:
        return ""
    if source.owning_graph() is not graph:
        return f"'{source.name}' comes from an enclosing scope and '{result.name}' is a graph output"
    if source.producer is None:
        return f"'{source.name}' is a graph input or initializer and '{result.name}' a graph output"
    if id(source) in pinned:
        return f"'{source.name}' and '{result.name}' are both graph outputs"
    if source.name in keep_names:
        return f"training_info refers to '{source.name}'"
    return ""
