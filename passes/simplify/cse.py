"""``eliminate-common-subexpressions``: compute each distinct expression once per scope.

Algebra: a deterministic operator applied to the same inputs with the same attributes gives
the same outputs, so a later node that repeats an earlier one (same domain, op type, overload,
attributes, inputs and present outputs) can read the earlier node's outputs instead. Two
inputs are "the same" when they are the same value, or constants (non-overridable initializers)
of equal dtype, shape and content digest, up to ``max_constant_bytes``; larger constants are
compared by identity only, so memory and time stay bounded.

Never merged:

* nodes outside the standard domains (custom ops and model-local functions may be random or
  stateful; graphopt does not know them);
* random generators (``RandomNormal``, ``RandomUniform``, their ``*Like`` forms,
  ``Multinomial``, ``Bernoulli``) and ``Dropout`` unless it provably runs in inference mode;
* nodes holding subgraphs (``If``, ``Loop``, ``Scan``...);
* a node whose output is listed as the output of another graph than its own, or whose output
  name the model's ``training_info`` refers to;
* two ``Identity`` nodes that both produce graph outputs (merging would only re-create one).

Scopes: the nodes of a subgraph merge only with nodes of the same subgraph. Parent graphs are
processed first, so values merged there make the nodes of a body that read them equal too.
When the dropped node's output is a graph output, the kept output takes its name (or an
``Identity`` keeps both names), so no output name is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any, ClassVar

from graphopt import ir
from graphopt.passes.simplify._common import (STANDARD_DOMAINS, is_default_domain, pinned_outputs,
                                              training_names)
from graphopt.pipeline import Pass, PassContext, PassResult
from graphopt.rewrite import constant_value

__all__ = ["NONDETERMINISTIC_OPS", "EliminateCommonSubexpressions"]

logger = logging.getLogger(__name__)

#: Operators of the standard domain whose outputs differ between two runs on the same inputs.
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})


def _dropout_is_inference(node: ir.Node) -> bool:
    version = node.version
    if version is None:
        return False
    if version < 7:
        return node.attr("is_test", 0) == 1
    if version < 12 or len(node.inputs) < 3 or node.inputs[2] is None:
        return True
    flag = constant_value(node.inputs[2])
    return flag is not None and flag.size == 1 and not bool(flag.reshape(-1)[0])


def _scalar_key(value: Any) -> Hashable:
    """A hashable key that tells apart values that differ, floats by their bits (NaN equals NaN)."""
    if isinstance(value, float):
        return ("f", value.hex())
    if isinstance(value, (tuple, list)):
        return tuple(_scalar_key(v) for v in value)
    return value


class _Keys:
    """Hash keys of nodes and their inputs; tensor digests are computed once per tensor."""

    def __init__(self, max_constant_bytes: int) -> None:
        self.max_constant_bytes = max_constant_bytes
        self._digests: dict[int, tuple[Any, ...] | None] = {}
        self._keep_alive: list[ir.Tensor] = []

    def tensor(self, tensor: ir.Tensor) -> tuple[Any, ...] | None:
        """``(dtype, shape, digest)`` of a small tensor, else ``None``."""
        found = self._digests.get(id(tensor), False)
        if found is not False:
            return found  # type: ignore[return-value]
        key: tuple[Any, ...] | None = None
        if tensor.nbytes <= self.max_constant_bytes:
            key = (tensor.dtype, tuple(tensor.shape), tensor.digest())
        self._digests[id(tensor)] = key
        self._keep_alive.append(tensor)  # ids stay unique while cached
        return key

    def value(self, value: ir.Value | None) -> Hashable:
        """The key of an input: small constants by content, everything else by identity."""
        if value is None:
            return None
        tensor = value.const_value
        if isinstance(tensor, ir.Tensor) and value.is_constant():
            content = self.tensor(tensor)
            if content is not None:
                return ("constant",) + content
        return ("value", id(value))

    def attribute(self, attr: ir.Attr) -> Hashable | None:
        """The key of an attribute, or ``None`` when it cannot be compared (graphs, raw protos)."""
        if attr.is_graph:
            return None
        value = attr.value
        if isinstance(value, ir.Tensor):
            content = self.tensor(value)
            if content is None:
                return None
            value_key: Hashable = ("tensor",) + content
        elif isinstance(value, (int, float, str, bytes, tuple, list)) or value is None:
            value_key = _scalar_key(value)
        else:
            return None
        return (attr.name, attr.type, attr.ref_attr_name, value_key)

    def node(self, node: ir.Node) -> Hashable | None:
        """The key under which ``node`` equals earlier nodes, or ``None`` when it must stay."""
        if node.domain not in STANDARD_DOMAINS or not node.outputs:
            return None
        if is_default_domain(node.domain):
            if node.op_type in NONDETERMINISTIC_OPS:
                return None
            if node.op_type == "Dropout" and not _dropout_is_inference(node):
                return None
        attrs = []
        for name in sorted(node.attributes):
            key = self.attribute(node.attributes[name])
            if key is None:
                return None
            attrs.append(key)
        domain = "" if node.domain == "ai.onnx" else node.domain
        return (domain, node.op_type, node.overload, tuple(attrs),
                tuple(self.value(v) for v in node.inputs), tuple(bool(v.name) for v in node.outputs))


class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same deterministic expression in the same scope.

    Counter ``merged-nodes``: nodes whose outputs now come from an equal earlier node.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> EliminateCommonSubexpressions().run(model, PassContext()).counters  # doctest: +SKIP
        {'merged-nodes': 2}
    """

    name = "eliminate-common-subexpressions"
    opt_level = 2
    requires = frozenset({"topo-sorted"})
    preserves = frozenset({"topo-sorted", "shapes-inferred"})
    options: ClassVar[dict[str, Any]] = {"max_constant_bytes": 1 << 20}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Merge duplicates graph by graph, parents before their subgraphs."""
        keys = _Keys(int(self.config["max_constant_bytes"]))
        pinned = pinned_outputs(model)
        keep_names = training_names(model)
        merged = 0
        for graph in list(model.all_graphs()):
            if graph.parent is not None and not graph.parent.is_live():
                continue
            count, stopped = self._run_graph(graph, keys, pinned, keep_names, ctx)
            merged += count
            if stopped:
                break
        if merged:
            logger.info("eliminate-common-subexpressions: merged %d node(s)", merged)
        return PassResult(merged > 0, {"merged-nodes": merged})

    def _run_graph(self, graph: ir.Graph, keys: _Keys, pinned: set[int], keep_names: set[str],
                   ctx: PassContext) -> tuple[int, bool]:
        """Merge the duplicates of one graph; returns (merged, stopped by the bisect limit)."""
        seen: dict[Hashable, ir.Node] = {}
        # Removed nodes are kept referenced until the graph is done: keys hold value ids, and a
        # freed value's id must not come back as the id of a new one.
        removed: list[ir.Node] = []
        merged = 0
        for node in graph:
            key = keys.node(node)
            if key is None:
                continue
            kept = seen.get(key)
            if kept is None:
                seen[key] = node
                continue
            reason = _why_kept(node, kept, pinned, keep_names)
            if reason:
                logger.debug("kept %s: %s", _describe(node), reason)
                continue
            if not ctx.allow_rewrite(f"merge {_describe(node)} into {_describe(kept)}"):
                return merged, True
            for old, new in zip(node.outputs, kept.outputs):
                if old.is_graph_output():
                    old.replace_all_uses_with(new, rename_graph_outputs=True)
                    pinned.add(id(new))
                elif old.has_uses():
                    old.replace_all_uses_with(new)
            graph.remove(node)
            removed.append(node)
            merged += 1
            logger.debug("merged %s into %s", _describe(node), _describe(kept))
        if removed and graph.value_info:
            gone = {id(v) for n in removed for v in n.outputs}
            graph.value_info[:] = [v for v in graph.value_info if id(v) not in gone]
        return merged, False


def _why_kept(node: ir.Node, kept: ir.Node, pinned: set[int], keep_names: set[str]) -> str:
    """Why ``node`` may not be merged into the equal ``kept`` ("" when it may)."""
    for old, new in zip(node.outputs, kept.outputs):
        own_output = old.is_graph_output()
        if id(old) in pinned and not own_output:
            return f"'{old.name}' is listed as an output of another graph"
        if old.name and old.name in keep_names:
            return f"training_info refers to '{old.name}'"
        if own_output and node.op_type == "Identity" and new.is_graph_output():
            return "both Identity outputs are graph outputs"
        if own_output and new.name in keep_names and not new.is_graph_output():
            return f"training_info refers to '{new.name}', which would take the output's name"
    return ""


def _describe(node: ir.Node) -> str:
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    return f"{op} '{node.name}'" if node.name else f"{op} -> {', '.join(v.name for v in node.outputs)}"
