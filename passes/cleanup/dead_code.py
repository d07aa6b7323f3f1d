"""``eliminate-dead-code``: remove everything no graph output depends on.

What goes, in every graph of the model (main graph, ``If``/``Loop``/``Scan`` bodies at any depth,
function bodies):

* nodes none of whose outputs is read (in any scope) or listed as an output of a graph. A
  subgraph's outputs are its roots: a body's signature never changes. A value read only inside
  a subgraph is a use like any other, so its outer producer stays; removing a node drops its
  subgraphs' uses, which can free outer producers in turn (a worklist follows them);
* initializers and sparse initializers nothing reads, unless they are graph inputs (IR < 4
  models list overridable weights as inputs: the signature is the user's contract) or outputs;
* model-local functions no node calls, transitively (calls inside function bodies, their
  subgraphs and attribute defaults count);
* opset imports no remaining node or function uses, in the model and in each function; the
  default domain is always kept;
* ``value_info`` entries whose producer is gone or that name no value of their graph (or of an
  enclosing scope), and repeated entries for the same value.

Graph inputs are never removed.

Purity: every operator is treated as free of side effects, including random generators and
operators of unknown custom domains. ONNX defines no side-effecting operators, and an unknown
operator is opaque but pure, as onnxruntime and the onnx optimizers treat it: if nothing reads
its outputs it cannot influence the model's outputs. The one exception is a node with no
outputs at all, which can only exist for an effect outside the graph; it is kept.

Anything the model's ``training_info`` names (training graphs read inference initializers by
name) is kept too.

The pass preserves ``shapes-inferred``: what it removes feeds nothing that stays, so every
remaining value keeps the ancestors its inferred type was derived from (a rerun of
``infer-shapes`` would find the same types; the fixed-point group of ``-O2`` no longer pays one
after each removal).
"""

from __future__ import annotations

import logging

from graphopt import ir
from graphopt.pipeline import Pass, PassContext, PassResult
from graphopt.passes.cleanup._scope import (describe, is_default_domain, pinned_outputs,
                                            training_domains, training_names)

__all__ = ["EliminateDeadCode"]

logger = logging.getLogger(__name__)

COUNTERS = ("removed-nodes", "removed-initializers", "removed-functions", "removed-opsets",
            "removed-value-info")


class EliminateDeadCode(Pass):
    """Remove unused nodes, initializers, functions, opset imports and stale value_info.

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> result = EliminateDeadCode().run(model, PassContext())  # doctest: +SKIP
        >>> result.counters["removed-nodes"]  # doctest: +SKIP
        3
    """

    name = "eliminate-dead-code"
    opt_level = 1
    preserves = frozenset({"topo-sorted", "shapes-inferred"})

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Remove dead nodes first (which frees initializers and functions), then the rest."""
        counters = dict.fromkeys(COUNTERS, 0)
        keep_names = training_names(model)
        counters["removed-nodes"] = _remove_dead_nodes(model, ctx, keep_names)
        counters["removed-initializers"] = _remove_unused_initializers(model, ctx, keep_names)
        counters["removed-functions"] = _remove_unused_functions(model, ctx)
        counters["removed-opsets"] = _remove_unused_opsets(model, ctx)
        counters["removed-value-info"] = _remove_stale_value_info(model, ctx)
        changed = any(counters.values())
        if changed:
            logger.info("eliminate-dead-code: %s",
                        ", ".join(f"{k} {v}" for k, v in counters.items() if v))
        return PassResult(changed, counters)


# -- nodes --------------------------------------------------------------------------------------
def _is_dead(node: ir.Node, pinned: set[int], keep_names: set[str]) -> bool:
    if not node.outputs:
        return False  # no outputs: it exists only for an effect outside the graph
    for out in node.outputs:
        if out.has_uses() or id(out) in pinned or (out.name and out.name in keep_names):
            return False
    return True


def _reads(node: ir.Node) -> list[ir.Value]:
    """Values a node reads: its inputs and what the nodes of its subgraphs read."""
    values = [v for v in node.inputs if v is not None]
    for sub in node.subgraphs():
        values.extend(v for inner in sub.all_nodes() for v in inner.inputs if v is not None)
    return values


def _remove_dead_nodes(model: ir.Model, ctx: PassContext, keep_names: set[str]) -> int:
    pinned = pinned_outputs(model)
    # Outer nodes come before the nodes of their subgraphs and producers before users, so
    # popping from the end visits users first: one sweep removes whole dead chains, and the
    # worklist catches producers freed later (e.g. by a dead node inside a subgraph).
    worklist: list[ir.Node] = []
    for g in [model.graph] + [f.graph for f in model.functions.values()]:
        worklist.extend(g.all_nodes())
    removed = 0
    while worklist:
        node = worklist.pop()
        if not node.is_live() or not _is_dead(node, pinned, keep_names):
            continue
        if not ctx.allow_rewrite(f"remove unused {describe(node)}"):
            break
        reads = _reads(node)
        graph = node.graph
        assert graph is not None
        graph.remove(node)
        removed += 1
        logger.debug("removed unused %s", describe(node))
        for v in reads:
            producer = v.producer
            if producer is not None and producer.is_live() and not v.has_uses():
                worklist.append(producer)
    return removed


# -- initializers -------------------------------------------------------------------------------
def _remove_unused_initializers(model: ir.Model, ctx: PassContext, keep_names: set[str]) -> int:
    pinned = pinned_outputs(model)
    removed = 0
    for g in model.all_graphs():
        inputs = {id(v) for v in g.inputs}
        for table in (g.initializers, g.sparse_initializers):
            for value in list(table.values()):
                if (value.has_uses() or id(value) in inputs or id(value) in pinned
                        or value.name in keep_names):
                    continue
                if not ctx.allow_rewrite(f"remove unused initializer '{value.name}'"):
                    return removed
                g.remove_initializer(value)
                removed += 1
                logger.debug("removed unused initializer '%s' of graph '%s'", value.name, g.name)
    return removed


# -- functions ----------------------------------------------------------------------------------
def _called_functions(model: ir.Model) -> set[tuple[str, str, str]]:
    """Keys of the local functions reachable from the main graph (and training graphs)."""
    functions = model.functions
    reached: set[tuple[str, str, str]] = set()
    pending: list[ir.Graph] = [model.graph]
    training_ops = _training_ops(model)
    for key in functions:
        if (key[0], key[1]) in training_ops:
            reached.add(key)
            pending.append(functions[key].graph)
    while pending:
        graph = pending.pop()
        for node in graph.all_nodes():
            key = (node.domain, node.op_type, node.overload)
            if key in functions and key not in reached:
                reached.add(key)
                fn = functions[key]
                pending.append(fn.graph)
                pending.extend(g for a in fn.attribute_defaults for g in a.graphs())
    return reached


def _training_ops(model: ir.Model) -> set[tuple[str, str]]:
    ops: set[tuple[str, str]] = set()
    for info in model.training_info:
        for graph in (info.initialization, info.algorithm):
            ops.update((n.domain, n.op_type) for n in graph.node)
    return ops


def _remove_unused_functions(model: ir.Model, ctx: PassContext) -> int:
    reached = _called_functions(model)
    removed = 0
    for key in list(model.functions):
        if key in reached:
            continue
        if not ctx.allow_rewrite(f"remove unused function {key[0]}::{key[1]}"):
            break
        del model.functions[key]
        removed += 1
        logger.debug("removed unused function %s::%s", key[0], key[1])
    return removed


# -- opset imports ------------------------------------------------------------------------------
def _node_domains(graph: ir.Graph) -> set[str]:
    return {node.domain for node in graph.all_nodes()}


def _remove_unused_opsets(model: ir.Model, ctx: PassContext) -> int:
    used = _node_domains(model.graph) | training_domains(model)
    for fn in model.functions.values():
        # Kept at model level as well: checkers and runtimes resolve a function's domain, and
        # sometimes its body's, against the model's imports.
        used.add(fn.domain)
        used |= _node_domains(fn.graph)
    removed = _prune_imports(model.opset_imports, used, ctx, "model")
    for fn in model.functions.values():
        removed += _prune_imports(fn.opset_imports, _node_domains(fn.graph), ctx,
                                  f"function {fn.domain}::{fn.name}")
    return removed


def _prune_imports(imports: dict[str, int], used: set[str], ctx: PassContext, where: str) -> int:
    removed = 0
    for domain in list(imports):
        if is_default_domain(domain) or domain in used or len(imports) == 1:
            continue  # the last import stays: ONNX requires at least one (e.g. all nodes folded)
        if not ctx.allow_rewrite(f"remove unused opset import '{domain}' of the {where}"):
            break
        del imports[domain]
        removed += 1
        logger.debug("removed unused opset import '%s' of the %s", domain, where)
    return removed


# -- value_info ---------------------------------------------------------------------------------
def _remove_stale_value_info(model: ir.Model, ctx: PassContext) -> int:
    removed = 0
    for g in model.all_graphs():
        if not g.value_info:
            continue
        kept: list[ir.Value] = []
        seen: set[int] = set()
        outer: set[str] | None = None
        for v in g.value_info:
            stale = id(v) in seen or not _describes_local_value(g, v)
            if stale and v.producer is None and v.graph is None and v.name:
                # Not a value of this graph: keep it when it names a value of an enclosing scope.
                if outer is None:
                    outer = _enclosing_names(g)
                stale = id(v) in seen or v.name not in outer
            if stale and ctx.allow_rewrite(f"remove stale value_info '{v.name}' of graph '{g.name}'"):
                removed += 1
                logger.debug("removed stale value_info '%s' of graph '%s'", v.name, g.name)
                continue
            kept.append(v)
            seen.add(id(v))
        g.value_info[:] = kept
    return removed


def _describes_local_value(g: ir.Graph, v: ir.Value) -> bool:
    if v.producer is not None:
        return v.producer.is_live() and v.producer.graph is g
    if v.graph is g:
        return (g.initializers.get(v.name) is v or g.sparse_initializers.get(v.name) is v
                or any(x is v for x in g.inputs))
    return False


def _enclosing_names(g: ir.Graph) -> set[str]:
    """Names of the values defined in the graphs that enclose ``g`` (not ``g`` itself)."""
    names: set[str] = set()
    parent = g.parent
    while parent is not None and parent.graph is not None:
        outer = parent.graph
        names.update(v.name for v in outer.inputs)
        names.update(outer.initializers)
        names.update(outer.sparse_initializers)
        names.update(v.name for n in outer for v in n.outputs if v.name)
        parent = outer.parent
    return names
