"""The JSON run report (schema ``graphopt.report/1``), shared by every command that transforms a model.

A report says what went in, what came out, which passes ran and what they did, and what changed
in the graph. The fields are documented in ``docs/report-schema.md``; the HTML report
(:mod:`graphopt._report_html`) is a view of the same dict.

What changed is found by identity: :class:`ChangeTracker` records every node (and a signature of
its inputs, outputs and attributes) when the pipeline starts; afterwards a node that is no longer
in the model was removed, a node that was not there was added, and a node whose signature differs
was modified. Node lists are capped (``node_limit``) so a report of a huge model stays small.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator

import onnx

from graphopt.errors import GraphoptError
from graphopt.ir import Graph, Model, Node, Tensor
from graphopt.pipeline import Instrument, PassContext, PipelineReport

if TYPE_CHECKING:
    from graphopt._api import OptimizeOutcome

__all__ = [
    "SCHEMA_ID", "DEFAULT_NODE_LIMIT", "ChangeTracker", "build_optimize_report", "write_report",
    "check_report_path", "model_file_bytes", "write_text_atomic",
]

logger = logging.getLogger(__name__)

#: Identifies the report format; bumped only when a field changes meaning or disappears.
SCHEMA_ID = "graphopt.report/1"
#: How many node summaries each list of the ``changes`` section holds at most.
DEFAULT_NODE_LIMIT = 200

# (node, graph label, input names, output names, attribute signature) at pipeline start.
_Entry = tuple[Node, str, tuple[str, ...], tuple[str, ...], int]


def _op_label(node: Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _attr_signature(node: Node) -> int:
    """A hash that changes when an attribute is added, dropped or given another value."""
    parts = []
    for name, attr in sorted(node.attributes.items()):
        value = attr.value
        if isinstance(value, (Tensor, Graph)) or attr.is_graph:
            value = id(value)  # replacing a tensor or body creates a new object
        elif isinstance(value, list):
            value = tuple(id(v) for v in value)
        parts.append((name, attr.type, value))
    try:
        return hash(tuple(parts))
    except TypeError:  # an unhashable attribute value: compare its text instead
        return hash(repr(parts))


def _walk(model: Model) -> Iterator[tuple[str, Graph]]:
    """Every graph of the model with a readable label, iteratively (bodies may nest deeply)."""
    stack: list[tuple[str, Graph]] = [("main", model.graph)]
    stack.extend((f"function {f.domain}.{f.name}".replace(" .", " "), f.graph)
                 for f in reversed(list(model.functions.values())))
    while stack:
        label, g = stack.pop()
        yield label, g
        nested = []
        for i, node in enumerate(g):
            for attr_name, attr in node.attributes.items():
                if attr.is_graph:
                    who = node.name or f"{node.op_type}#{i}"
                    nested.extend((f"{label}/{who}.{attr_name}", sub) for sub in attr.graphs())
        stack.extend(reversed(nested))


def _names(values: Any) -> tuple[str, ...]:
    return tuple(v.name if v is not None else "" for v in values)


class ChangeTracker(Instrument):
    """Remembers the nodes of the model when the pipeline starts, to report what changed.

    Put it in ``PassContext.instruments`` before running; pass it to
    :func:`build_optimize_report` afterwards. Only the first pipeline run is recorded (a pass
    that runs a nested pipeline does not reset it).

    Example:
        >>> tracker = ChangeTracker()
        >>> ctx = PassContext(instruments=[tracker])  # doctest: +SKIP
        >>> PassManager("O2", ctx).run(model)  # doctest: +SKIP
        >>> tracker.diff(model)["nodes_removed"]  # doctest: +SKIP
        3
    """

    def __init__(self) -> None:
        self.entries: list[_Entry] | None = None
        self.external_files: set[str] = set()

    def on_pipeline_start(self, model: Model, ctx: PassContext, report: PipelineReport) -> None:
        """Record every node once, before the first pass."""
        if self.entries is None:
            self.snapshot(model)

    def snapshot(self, model: Model) -> None:
        """Record the nodes of ``model`` as the "before" state."""
        entries: list[_Entry] = []
        for label, g in _walk(model):
            for node in g:
                entries.append((node, label, _names(node.inputs), _names(node.outputs),
                                _attr_signature(node)))
            for v in g.initializers.values():
                t = v.const_value
                if isinstance(t, Tensor) and t.is_external():
                    path = getattr(t, "path", None)
                    if path:
                        self.external_files.add(path)
        self.entries = entries

    def diff(self, model: Model, *, node_limit: int = DEFAULT_NODE_LIMIT) -> dict[str, Any]:
        """The node part of the ``changes`` section: counts and capped node summaries."""
        if self.entries is None:
            raise GraphoptError("the change tracker saw no pipeline run; add it to "
                                "PassContext.instruments before running the pipeline")
        before = {id(e[0]): e for e in self.entries}
        after: dict[int, tuple[Node, str]] = {}
        for label, g in _walk(model):
            for node in g:
                after[id(node)] = (node, label)
        ids: dict[int, str] = {id(e[0]): f"n{i}" for i, e in enumerate(self.entries)}
        removed = [e for e in self.entries if id(e[0]) not in after]
        added: list[tuple[Node, str]] = []
        modified: list[tuple[_Entry, Node, str]] = []
        kept = 0
        for key, (node, label) in after.items():
            entry = before.get(key)
            if entry is None:
                ids[key] = f"a{len(added)}"
                added.append((node, label))
            elif (entry[2], entry[3], entry[4]) != (_names(node.inputs), _names(node.outputs),
                                                    _attr_signature(node)):
                modified.append((entry, node, label))
            else:
                kept += 1
        # Context: unchanged nodes that feed a changed node or read what a changed node wrote.
        changed_inputs: set[str] = set()
        changed_outputs: set[str] = set()
        for e in removed:
            changed_inputs.update(e[2])
            changed_outputs.update(e[3])
        for node, _ in added:
            changed_inputs.update(_names(node.inputs))
            changed_outputs.update(_names(node.outputs))
        for e, node, _ in modified:
            changed_inputs.update(e[2] + _names(node.inputs))
            changed_outputs.update(e[3] + _names(node.outputs))
        changed_inputs.discard("")
        changed_outputs.discard("")
        context = []
        modified_ids = {id(m[1]) for m in modified}
        for key, (node, label) in after.items():
            if len(context) >= node_limit:
                break
            if key in before and key not in modified_ids:
                ins, outs = _names(node.inputs), _names(node.outputs)
                if changed_inputs.intersection(outs) or changed_outputs.intersection(ins):
                    context.append(_summary(ids[key], label, node, ins, outs))
        return {
            "nodes_added": len(added),
            "nodes_removed": len(removed),
            "nodes_modified": len(modified),
            "nodes_kept": kept,
            "node_limit": node_limit,
            "truncated": max(len(added), len(removed), len(modified)) > node_limit,
            "removed": [_summary(ids[id(e[0])], e[1], e[0], e[2], e[3]) for e in removed[:node_limit]],
            "added": [_summary(ids[id(n)], label, n, _names(n.inputs), _names(n.outputs))
                      for n, label in added[:node_limit]],
            "modified": [dict(_summary(ids[id(n)], label, n, _names(n.inputs), _names(n.outputs)),
                              inputs_before=list(e[2]), outputs_before=list(e[3]))
                         for e, n, label in modified[:node_limit]],
            "context": context,
        }


def _summary(node_id: str, label: str, node: Node, inputs: tuple[str, ...],
             outputs: tuple[str, ...]) -> dict[str, Any]:
    return {"id": node_id, "op": _op_label(node), "name": node.name, "graph": label,
            "inputs": list(inputs), "outputs": list(outputs)}


def model_file_bytes(path: str | os.PathLike) -> int:
    """Size of a model file plus the external data files it references (each counted once).

    Only files inside the model's folder are counted, as graphopt reads no others.
    """
    path = os.fspath(path)
    total = os.path.getsize(path)
    proto = onnx.load_model(path, load_external_data=False)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    files: set[str] = set()
    for tensor in _proto_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        full = os.path.realpath(os.path.join(folder, location))
        if location and os.path.commonpath([folder, full]) == folder and os.path.isfile(full):
            files.add(full)
    return total + sum(os.path.getsize(f) for f in files)


def _proto_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a model proto: initializers and attribute tensors, in every graph."""
    graphs: list[onnx.GraphProto] = [proto.graph]
    nodes: list[onnx.NodeProto] = [n for f in proto.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for sparse in g.sparse_initializer:
                yield sparse.values
                yield sparse.indices
            nodes.extend(g.node)
            continue
        node = nodes.pop()
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)


def _input_bytes(path: str | None, tracker: ChangeTracker | None) -> int | None:
    if path is None or not os.path.isfile(path):
        return None
    total = os.path.getsize(path)
    if tracker is not None:
        total += sum(os.path.getsize(f) for f in tracker.external_files if os.path.isfile(f))
    return total


def _model_section(path: str | None, nbytes: int | None, stats: Any) -> dict[str, Any]:
    return {"path": path, "bytes": nbytes, **stats.to_dict()}


def _op_changes(before: Counter, after: Counter) -> tuple[dict[str, int], dict[str, int]]:
    added = {op: after[op] - before.get(op, 0) for op in sorted(after) if after[op] > before.get(op, 0)}
    removed = {op: before[op] - after.get(op, 0) for op in sorted(before) if before[op] > after.get(op, 0)}
    return added, removed


def build_optimize_report(outcome: OptimizeOutcome, *, input_path: str | None, output_path: str | None,
                          target: str, level: int | None = None, pipeline_option: str | None = None,
                          enable: tuple[str, ...] | list[str] = (), disable: tuple[str, ...] | list[str] = (),
                          tracker: ChangeTracker | None = None, node_limit: int = DEFAULT_NODE_LIMIT,
                          created: datetime.datetime | None = None) -> dict[str, Any]:
    """The ``graphopt.report/1`` dict of an ``optimize`` run.

    Args:
        outcome: what :func:`graphopt.optimize_model` returned.
        input_path: the input model file (``None`` when the model came from memory).
        output_path: the written model (``None`` when nothing was written).
        target: the execution provider the output is for.
        level: the ``-O`` level; ``pipeline_option``: the ``--pipeline`` text, if given.
        enable, disable: the ``--enable`` / ``--disable`` passes.
        tracker: the :class:`ChangeTracker` that watched the run; without it the node lists of
            ``changes`` are empty and its node counts are ``null``.
        node_limit: most node summaries per list in ``changes``.
        created: the report's timestamp (default: now, UTC).

    Example:
        >>> data = build_optimize_report(outcome, input_path="m.onnx", output_path="o.onnx",
        ...                              target="cpu", tracker=tracker)  # doctest: +SKIP
        >>> data["changes"]["ops_removed"]  # doctest: +SKIP
        {'Identity': 2}
    """
    rep = outcome.report
    ops_added, ops_removed = _op_changes(outcome.before.ops, outcome.after.ops)
    if tracker is not None:
        nodes = tracker.diff(outcome.model, node_limit=node_limit)
    else:
        nodes = {"nodes_added": None, "nodes_removed": None, "nodes_modified": None, "nodes_kept": None,
                 "node_limit": node_limit, "truncated": False, "removed": [], "added": [],
                 "modified": [], "context": []}
    out_bytes = model_file_bytes(output_path) if output_path and os.path.isfile(output_path) else None
    stamp = created or datetime.datetime.now(datetime.timezone.utc)
    total = outcome.load_seconds + rep.seconds + outcome.save_seconds
    return {
        "schema": SCHEMA_ID,
        "graphopt_version": _version(),
        "command": "optimize",
        "created": stamp.isoformat(timespec="seconds"),
        "input": _model_section(input_path, _input_bytes(input_path, tracker), outcome.before),
        "output": _model_section(output_path, out_bytes, outcome.after),
        "target": target,
        "pipeline": rep.pipeline,
        "passes": [{"name": r.name, "round": r.round, "changed": r.changed, "seconds": r.seconds,
                    "counters": dict(r.counters)} for r in rep.records],
        "warnings": list(rep.warnings),
        "emit": list(outcome.emit_changes),
        "changes": {"ops_added": ops_added, "ops_removed": ops_removed, **nodes},
        "seconds": {"load": outcome.load_seconds, "passes": rep.seconds, "save": outcome.save_seconds,
                    "total": total},
        "optimize": {
            "level": level,
            "pipeline_option": pipeline_option,
            "enable": list(enable),
            "disable": list(disable),
            "rewrites_applied": rep.rewrites_applied,
            "bisect_limit": rep.bisect_limit,
            "bisect_stopped": rep.bisect_stopped,
        },
    }


def _version() -> str:
    from graphopt import __version__  # the package imports this module's users: import late

    return __version__


def check_report_path(path: str | os.PathLike, what: str = "report") -> None:
    """Refuse, before any work is done, a report path whose folder does not exist."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GraphoptError(f"cannot write {what} '{path}': folder '{folder}' does not exist "
                            "(create it or choose another path)")
    if os.path.isdir(path):
        raise GraphoptError(f"cannot write {what} '{path}': it is a folder (give a file name)")


def write_text_atomic(path: str | os.PathLike, text: str, what: str = "report") -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    path = os.fspath(path)
    check_report_path(path, what)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    mask = os.umask(0o022)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)  # mkstemp's owner-only mode is not what a report file should have
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise GraphoptError(f"cannot write {what} '{path}': {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_report(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write a report dict as indented JSON, atomically (no partial file on failure).

    Raises:
        GraphoptError: the folder does not exist or the file cannot be written.

    Example:
        >>> write_report("report.json", data)  # doctest: +SKIP
    """
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n", "report")
