"""``inline-constant-if``: replace an ``If`` whose condition is a constant by the branch it takes.

Algebra: ``If(c, then, else)`` computes ``then`` when ``c`` is true and ``else`` otherwise; with
``c`` a constant the choice is made once, here. The taken branch's nodes move into the graph
that holds the ``If``, just before it (every value they read from outer scopes is visible
there and, in a topologically sorted graph, already computed); its initializers move along.
Every value the branch defines gets a fresh model-wide name (``model.unique_name``), so names
stay unique even when both branches, or nested bodies, use the same ones. The ``If``'s outputs
keep their names and declared types: a graph output is renamed onto the branch value (or kept
with an ``Identity`` when that value must keep its own name), other readers just read the
branch value, which takes over the ``If`` output's name.

Must not fire when:

* the condition is not a constant (a graph input, including an IR < 4 initializer that is also
  an input, which callers may override), or does not hold exactly one element;
* the branch's outputs do not match the ``If``'s, or the branch has inputs (invalid models);
* the branch has initializers and the enclosing graph cannot hold any (a function body, or an
  IR < 4 model where every initializer must also be a graph input); or sparse initializers;
* an ``If`` output is listed as the output of another graph, or named by ``training_info``.

Nested ``If`` nodes are handled at every depth: those moved into the parent are visited in
turn, and every remaining subgraph (also ``Loop``/``Scan`` bodies and functions) is searched.

Then, where an ``If`` is followed by other ``If`` nodes whose conditions test the shapes of its
results (exporters emit such chains for ``squeeze(-1)`` and rank checks), the nodes after it move
into both of its branches, where those conditions become constants for the next round of folding
(``sink_tails`` option, ``max_tail_nodes`` caps the moved nodes; see ``_sink_tail``). A sunk
``If`` whose else path is proven to always fail and whose then branch checks the condition
itself is replaced by its then branch (``_sink_tail.THEN_ALWAYS`` states the proof).
"""

from __future__ import annotations

import logging
from collections import deque

from graphopt import ir
from graphopt.passes.simplify._common import is_default_domain, pinned_outputs, training_names
from graphopt.passes.simplify._sink_tail import THEN_ALWAYS, sink_tails
from graphopt.pipeline import Pass, PassContext, PassManager, PassResult
from graphopt.rewrite import constant_value

__all__ = ["InlineConstantIf"]

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """The bisect limit refused a rewrite: the pass ends here."""


class InlineConstantIf(Pass):
    """Inline the taken branch of every ``If`` whose condition is a constant, at every depth.

    Counters: ``inlined-ifs`` (``If`` nodes replaced, sunk ones whose else path always fails
    included), ``moved-nodes`` (branch nodes moved out) and ``sunk-tails`` (``If`` nodes whose
    following nodes moved into their branches).

    Options:
        sink_tails: move the nodes after an ``If`` into its branches when later ``If`` conditions
            test the shapes of its results (default true).
        max_tail_nodes: the most nodes such a move may copy (default 256).

    Example:
        >>> from graphopt.pipeline import PassContext
        >>> InlineConstantIf().run(model, PassContext()).counters  # doctest: +SKIP
        {'inlined-ifs': 2, 'moved-nodes': 7}
    """

    name = "inline-constant-if"
    opt_level = 2
    requires = frozenset({"topo-sorted"})
    preserves = frozenset({"topo-sorted"})
    options = {"sink_tails": True, "max_tail_nodes": 256}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Inline constant ``If`` nodes in the main graph, every subgraph and every function body."""
        state = _Inliner(model, ctx)
        roots = [model.graph] + [f.graph for f in model.functions.values()]
        sunk = 0
        try:
            for graph in roots:
                state.run_graph(graph)
            if self.config["sink_tails"]:
                sunk = self._sink(model, ctx, state)
                if sunk:
                    for graph in roots:
                        state.run_graph(graph)  # the sunk Ifs whose then branch always runs
        except _Stop:
            pass
        if state.inlined or sunk:
            logger.info("inline-constant-if: inlined %d If node(s), moved %d node(s), sank %d tail(s)",
                        state.inlined, state.moved, sunk)
        return PassResult(state.inlined > 0 or sunk > 0,
                          {"inlined-ifs": state.inlined, "moved-nodes": state.moved, "sunk-tails": sunk})

    def _sink(self, model: ir.Model, ctx: PassContext, state: _Inliner) -> int:
        """Sink the tails of ``If`` nodes in every graph (functions excepted); how many were sunk."""
        pinned = pinned_outputs(model)
        stopped: list[bool] = []

        def allow(description: str) -> bool:
            if ctx.allow_rewrite(description):
                return True
            stopped.append(True)
            return False

        def prove(scratch: ir.Model) -> None:
            # A private context: the scratch copy must not count against the bisect limit.
            PassManager(_PROOF_PIPELINE, PassContext(opt_level=2, registry=ctx.get_registry())).run(scratch)

        sunk = 0
        for graph in list(model.all_graphs()):
            if stopped:
                break
            sunk += sink_tails(model, graph, max_tail_nodes=int(self.config["max_tail_nodes"]), pinned=pinned,
                               keep_names=state.keep_names, allow=allow, prove=prove)
        return sunk


#: What simplifies the scratch copy in which a sunk ``If``'s else path is proven to fail.
_PROOF_PIPELINE = ("topo-sort,infer-shapes,fixpoint<max=4>(inline-constant-if<sink-tails=false>,fold-constants,"
                   "eliminate-dead-code,infer-shapes)")


class _Inliner:
    def __init__(self, model: ir.Model, ctx: PassContext) -> None:
        self.model = model
        self.ctx = ctx
        self.pinned = pinned_outputs(model)
        self.keep_names = training_names(model)
        self.inlined = 0
        self.moved = 0

    def run_graph(self, graph: ir.Graph) -> None:
        """Inline in ``graph`` (including Ifs moved into it), then search its subgraphs."""
        work = deque(n for n in graph if _is_if(n))
        while work:
            node = work.popleft()
            if not node.is_live() or node.graph is not graph:
                continue
            moved = self.inline(node, graph)
            if moved:
                work.extend(n for n in moved if _is_if(n))
        for node in graph:
            for sub in node.subgraphs():
                self.run_graph(sub)

    def inline(self, node: ir.Node, graph: ir.Graph) -> list[ir.Node]:
        """Replace ``node`` by its taken branch; returns the moved nodes ([] when it must stay)."""
        branch, reason = self.taken_branch(node, graph)
        if branch is None:
            logger.debug("kept %s: %s", _describe(node), reason)
            return []
        if not self.ctx.allow_rewrite(f"inline the taken branch of {_describe(node)}"):
            raise _Stop
        model = self.model
        for value in list(branch.initializers.values()):
            del branch.initializers[value.name]
            new_name = model.unique_name(value.name)
            value.name = new_name
            if value.const_value is not None:
                value.const_value.name = new_name
            value.graph = graph
            graph.initializers[new_name] = value
        moved = list(branch)
        for inner in moved:
            _move(inner, branch, graph, anchor=node)
            for out in inner.outputs:
                if out.name:
                    out.name = model.unique_name(out.name)
        local = {id(v) for n in moved for v in n.outputs}
        graph.value_info.extend(v for v in branch.value_info if id(v) in local)
        branch.value_info.clear()
        results = list(branch.outputs)
        branch.outputs.clear()
        # A branch value that replaces an If output (not a graph output) takes the output's name.
        renames: dict[int, tuple[ir.Value, str]] = {}
        for old, new in zip(node.outputs, results):
            if old.is_graph_output():
                old.replace_all_uses_with(new, rename_graph_outputs=True)
                continue
            if not old.has_uses():
                continue
            old.replace_all_uses_with(new)
            if new.type is None:
                new.type = old.type
            if id(new) in local and old.name:
                renames.setdefault(id(new), (new, old.name))
        gone = {id(v) for v in node.outputs}
        graph.remove(node)
        graph.value_info[:] = [v for v in graph.value_info if id(v) not in gone]
        for value, name in renames.values():
            if not value.is_graph_output():
                value.name = name
        self.inlined += 1
        self.moved += len(moved)
        logger.debug("inlined %d node(s) of %s", len(moved), _describe(node))
        return moved

    def taken_branch(self, node: ir.Node, graph: ir.Graph) -> tuple[ir.Graph | None, str]:
        """The branch to inline, or ``None`` and why the ``If`` stays."""
        cond = constant_value(node.inputs[0]) if node.inputs else None
        if cond is None and node.meta.get(THEN_ALWAYS):
            attr = "then_branch"  # every run that succeeds takes it (see _sink_tail)
        elif cond is None:
            return None, "the condition is not a constant"
        elif cond.size != 1:
            return None, f"the condition has {cond.size} elements"
        else:
            attr = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
        branch = node.attr(attr)
        if not isinstance(branch, ir.Graph):
            return None, f"{attr} is missing"
        if branch.inputs:
            return None, f"{attr} has inputs"
        if len(branch.outputs) != len(node.outputs):
            return None, f"{attr} has {len(branch.outputs)} outputs, the If {len(node.outputs)}"
        if branch.sparse_initializers:
            return None, f"{attr} has sparse initializers"
        if branch.initializers and not _holds_initializers(graph):
            return None, f"{attr} has initializers, which the enclosing graph cannot hold"
        for out in node.outputs:
            if id(out) in self.pinned and not out.is_graph_output() and self._listed_elsewhere(out):
                return None, f"'{out.name}' is listed as an output of another graph"
            if out.name and out.name in self.keep_names:
                return None, f"training_info refers to '{out.name}'"
        return branch, ""


    def _listed_elsewhere(self, value: ir.Value) -> bool:
        """True when a graph other than the value's own lists it as an output.

        ``self.pinned`` was taken before any inlining and only over-approximates (inlined
        branches no longer list their outputs), so a hit in it is confirmed here.
        """
        owner = value.owning_graph()
        return any(g is not owner and any(v is value for v in g.outputs) for g in self.model.all_graphs())


def _is_if(node: ir.Node) -> bool:
    return node.op_type == "If" and is_default_domain(node.domain)


def _holds_initializers(graph: ir.Graph) -> bool:
    """False inside function bodies and in IR < 4 models (initializers must be inputs there)."""
    g: ir.Graph | None = graph
    while g is not None:
        if g.function is not None:
            return False
        if g.model is not None:
            return g.model.ir_version >= 4
        g = g.parent.graph if g.parent is not None else None
    return False


def _move(node: ir.Node, source: ir.Graph, dest: ir.Graph, anchor: ir.Node) -> None:
    """Move ``node`` (with its subgraphs and their reads intact) from ``source`` to just before ``anchor``."""
    attributes = node.attributes
    inputs = list(node.inputs)
    # Removing a node detaches the reads of its subgraphs too; hide them while it is unlinked.
    node.attributes = {k: a for k, a in attributes.items() if not a.is_graph}
    source.remove(node, force=True)
    node.attributes = attributes
    node.set_inputs(inputs)
    dest.insert_before(anchor, node)


def _describe(node: ir.Node) -> str:
    return f"If '{node.name}'" if node.name else f"If -> {', '.join(v.name for v in node.outputs)}"
