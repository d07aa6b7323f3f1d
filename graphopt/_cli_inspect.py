"""``graphopt inspect``: what a model holds, what it costs, and whether the runtime can run it."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from typing import Any, Iterator

import click
import onnx
from rich.markup import escape
from rich.table import Table

from graphopt import ir
from graphopt._cli_bench import format_number
from graphopt.cli import _common, _console, _guard, _human_bytes
from graphopt.errors import GraphoptError

__all__ = ["RUNTIME_DOMAINS", "inspect_cmd", "inspect_model"]

#: Operator domains onnxruntime implements; nodes of other domains need a model-local function
#: or a custom-op library.
RUNTIME_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def _op_label(domain: str, op_type: str) -> str:
    return op_type if domain in ("", "ai.onnx") else f"{domain}.{op_type}"


def _type_text(value: Any) -> tuple[str, list[Any] | None]:
    t = value.type
    if isinstance(t, ir.TensorType):
        shape = None if t.shape is None else list(t.shape.dims)
        return ir.dtype_name(t.dtype), shape
    return (str(t) if t is not None else "unknown"), None


def _signature(values: list[Any]) -> list[dict[str, Any]]:
    out = []
    for v in values:
        dtype, shape = _type_text(v)
        out.append({"name": v.name, "dtype": dtype, "shape": shape})
    return out


def _graphs_of_model(model: Any) -> Iterator[Any]:
    """The main graph and its subgraphs (not function bodies)."""
    yield model.graph
    yield from model.graph.subgraphs()


def _subgraph_holders(graph: Any, path: str) -> Iterator[dict[str, Any]]:
    for node in graph:
        for attr in node.attributes.values():
            subs = attr.value if isinstance(attr.value, (list, tuple)) else [attr.value]
            for sub in subs:
                if isinstance(sub, ir.Graph):
                    yield {"node": node.name, "op": _op_label(node.domain, node.op_type),
                           "attribute": attr.name, "graph": sub.name, "nodes": len(sub), "in": path}
                    yield from _subgraph_holders(sub, f"{path}/{node.name or node.op_type}.{attr.name}")


def _parameters(model: Any) -> dict[str, Any]:
    """Initializer counts and bytes, each attributed to the op type of its first consumer."""
    by_op: dict[str, list[int]] = {}
    total = [0, 0, 0]
    for g in _graphs_of_model(model):
        for v in list(g.initializers.values()) + list(g.sparse_initializers.values()):
            t = v.const_value
            if t is None:
                continue
            params, nbytes = math.prod(t.shape), t.nbytes
            users = v.users()
            key = _op_label(users[0].domain, users[0].op_type) if users else "(unused)"
            entry = by_op.setdefault(key, [0, 0, 0])
            for acc in (entry, total):
                acc[0] += 1
                acc[1] += params
                acc[2] += nbytes
    rows = [{"op": op, "tensors": e[0], "params": e[1], "bytes": e[2]}
            for op, e in sorted(by_op.items(), key=lambda kv: (-kv[1][2], kv[0]))]
    return {"tensors": total[0], "params": total[1], "bytes": total[2], "by_op": rows}


def _external_data(model: Any, model_path: str) -> dict[str, Any]:
    files: dict[str, list[int]] = {}
    for g in model.all_graphs():
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor):
                entry = files.setdefault(t.path, [0, 0])
                entry[0] += 1
                entry[1] += t.length
    folder = os.path.dirname(os.path.abspath(model_path))
    rows = [{"file": os.path.relpath(path, folder), "tensors": n, "bytes": nbytes,
             "file_bytes": os.path.getsize(path)} for path, (n, nbytes) in sorted(files.items())]
    return {"files": rows, "tensors": sum(r["tensors"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows)}


def _functions(model: Any) -> list[dict[str, Any]]:
    calls = Counter((n.domain, n.op_type) for n in model.all_nodes())
    return [{"function": f"{f.domain}::{f.name}" + (f":{f.overload}" if f.overload else ""),
             "nodes": len(f.graph), "calls": calls.get((f.domain, f.name), 0)}
            for f in model.functions.values()]


# -- runtime support ---------------------------------------------------------------------------------

_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_NOT_REGISTERED = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")
_NO_SCHEMA = re.compile(r'In Node, \("([^"]*)", (\w+), "([^"]*)", -?\d+\).*?No Op registered for (\w+)')
_BAD_TYPE = re.compile(r"of operator \((\w+)\) in node \(([^)]*)\) is invalid")


def _unknown_domain_nodes(model: Any) -> list[dict[str, Any]]:
    local = {(f.domain, f.name) for f in model.functions.values()}
    out = []
    for node in model.all_nodes():
        if node.domain not in RUNTIME_DOMAINS and (node.domain, node.op_type) not in local:
            out.append({"node": node.name, "op": _op_label(node.domain, node.op_type),
                        "reason": f"domain '{node.domain}' is unknown to onnxruntime (needs a "
                                  "custom-op library)"})
    return out


def _nodes_matching(model: Any, domain: str | None, op_type: str, name: str | None,
                    reason: str) -> list[dict[str, Any]]:
    default = ("", "ai.onnx")

    def same_domain(d: str) -> bool:
        return domain is None or d == domain or (domain in default and d in default)

    found = [n for n in model.all_nodes()
             if n.op_type == op_type and same_domain(n.domain) and (name is None or n.name == name)]
    if not found:
        return [{"node": name or "", "op": _op_label(domain or "", op_type), "reason": reason}]
    return [{"node": n.name, "op": _op_label(n.domain, n.op_type), "reason": reason} for n in found]


def _failing_nodes(model: Any, message: str) -> list[dict[str, Any]]:
    """The node(s) an onnxruntime load error names, found in the model."""
    m = _NO_KERNEL.search(message)
    if m:
        return _nodes_matching(model, None, m.group(1), m.group(3),
                               f"no CPU kernel for {m.group(1)}-{m.group(2)} with these input types")
    m = _NOT_REGISTERED.search(message)
    if m:
        return _nodes_matching(model, m.group(1), m.group(2), None, "op not registered in onnxruntime")
    m = _NO_SCHEMA.search(message)
    if m:
        return _nodes_matching(model, m.group(3), m.group(2), m.group(1) or None,
                               "op not registered in onnxruntime for this opset")
    m = _BAD_TYPE.search(message)
    if m:
        return _nodes_matching(model, None, m.group(1), m.group(2) or None,
                               "input type not supported by the op")
    return []


def _check_cpu(model: Any, path: str) -> dict[str, Any]:
    from graphopt.runtime import make_session
    from graphopt.runtime._inputs import ort_error_text

    result: dict[str, Any] = {"provider": "cpu", "checked": True, "loads": True, "error": None,
                              "unsupported": [], "note": ""}
    try:
        make_session(path, target="cpu", optimize=False)
    except Exception as exc:  # onnxruntime raises its own exception types for refusals
        message = ort_error_text(exc)
        result["loads"] = False
        result["error"] = message
        result["unsupported"] = _failing_nodes(model, str(exc))
        result["note"] = ("onnxruntime stops at the first problem; fix it and inspect again to "
                          "find any further one")
    return result


def _check_cuda(model: Any, path: str, dims: dict[str, int]) -> dict[str, Any]:
    import onnxruntime as ort

    result: dict[str, Any] = {"provider": "cuda", "checked": False, "loads": None, "error": None,
                              "unsupported": [], "note": ""}
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        result["note"] = ("not checked: the CUDA execution provider is not available in this "
                          f"onnxruntime ({', '.join(available)}); nodes CUDA cannot run can only be "
                          "found where onnxruntime-gpu and a GPU are present")
        return result
    from graphopt.runtime._inputs import generate_feeds, ort_error_text

    with tempfile.TemporaryDirectory(prefix="graphopt-inspect-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        so.log_severity_level = 3
        try:
            sess = ort.InferenceSession(path, so, providers=["CUDAExecutionProvider",
                                                             "CPUExecutionProvider"])
            if sess.get_providers()[0] != "CUDAExecutionProvider":
                result["note"] = ("not checked: the CUDA execution provider failed to start "
                                  "(check the CUDA and cuDNN libraries onnxruntime-gpu needs)")
                return result
            sess.run(None, generate_feeds(sess, dims=dims, check_dims=False))
            profile = sess.end_profiling()
        except Exception as exc:  # onnxruntime raises its own exception types
            result.update(checked=True, loads=False, error=ort_error_text(exc),
                          unsupported=_failing_nodes(model, str(exc)))
            return result
        with open(profile) as f:
            events = json.load(f)
    result.update(checked=True, loads=True)
    seen: set[tuple[str, str]] = set()
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or "provider" not in args or args.get("op_name", "").startswith("Memcpy"):
            continue
        name = e.get("name", "").rsplit("_kernel_time", 1)[0]
        key = (name, args["op_name"])
        if args["provider"] != "CUDAExecutionProvider" and key not in seen:
            seen.add(key)
            result["unsupported"].append({"node": name, "op": args["op_name"],
                                          "reason": f"runs on {args['provider']} (no CUDA kernel)"})
    result["note"] = "node placement read from an onnxruntime profile of one run"
    return result


# -- the whole picture ---------------------------------------------------------------------------------

def inspect_model(path: str, *, provider: str = "cpu", dims: dict[str, int] | None = None) -> dict[str, Any]:
    """Everything ``graphopt inspect`` reports about a model file, as a JSON-ready dict.

    Raises:
        GraphoptError: the file cannot be read as an ONNX model.

    Example:
        >>> info = inspect_model("model.onnx", dims={"batch": 1})  # doctest: +SKIP
        >>> info["flops"]["total"], info["parameters"]["params"]  # doctest: +SKIP
        (3633315840, 25557032)
    """
    from graphopt.analysis import estimate_flops

    dims = dict(dims or {})
    model = ir.load(path)
    graph = model.graph
    symbolic = {d for v in graph.inputs for d in (_type_text(v)[1] or []) if isinstance(d, str)}
    unknown = sorted(set(dims) - symbolic)
    if unknown:
        raise GraphoptError(f"--dim {unknown[0]}: the model has no symbolic input dim of that name "
                            f"(its symbolic dims: {', '.join(sorted(symbolic)) or 'none'})")
    ops = Counter((n.domain or "ai.onnx", n.op_type) for g in _graphs_of_model(model) for n in g)
    holders = list(_subgraph_holders(graph, graph.name or "main"))
    flops = estimate_flops(onnx.load(path, load_external_data=False), dims=dims)
    runtime = _check_cpu(model, path) if provider == "cpu" else _check_cuda(model, path, dims)
    runtime["unknown_domains"] = _unknown_domain_nodes(model)
    initializer_inputs = [v for v in graph.inputs if v.name in graph.initializers]
    external = _external_data(model, path)
    file_bytes = os.path.getsize(path) + sum(f["file_bytes"] for f in external["files"])
    return {
        "schema": "graphopt.inspect/1",
        "model": {"path": path, "file_bytes": file_bytes, "ir_version": model.ir_version,
                  "opset_imports": {(d or "ai.onnx"): v for d, v in sorted(model.opset_imports.items())},
                  "producer": model.producer_name, "producer_version": model.producer_version,
                  "domain": model.domain, "model_version": model.model_version, "graph": graph.name,
                  "nodes": len(graph), "nodes_all_graphs": sum(1 for _ in model.all_nodes())},
        "inputs": _signature([v for v in graph.inputs if v not in initializer_inputs]),
        "overridable_initializers": [v.name for v in initializer_inputs],
        "outputs": _signature(graph.outputs),
        "ops": [{"domain": d, "op": op, "count": c}
                for (d, op), c in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))],
        "parameters": _parameters(model),
        "flops": flops.to_dict(),
        "external_data": external,
        "subgraphs": {"count": len(holders), "holders": holders},
        "functions": _functions(model),
        "runtime": runtime,
    }


# -- the command --------------------------------------------------------------------------------------

@click.command("inspect")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Execution provider whose support is checked.")
@click.option("--dim", "dim_specs", multiple=True, metavar="NAME=SIZE",
              help="Size of a symbolic input dim for the FLOP estimate (repeatable; others are 1).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write everything as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="With --json, print nothing.")
@_common
@_guard
def inspect_cmd(model_path: str, provider: str, dim_specs: tuple[str, ...], json_path: str | None,
            quiet: bool, debug: bool, verbose: bool) -> None:
    """Describe MODEL: signature, ops, parameters, FLOPs, external data, subgraphs, functions,
    and the nodes the execution provider cannot run."""
    from graphopt._report import check_report_path, write_report
    from graphopt.runtime import parse_dims

    if json_path:
        check_report_path(json_path, "JSON output")
    if not os.path.exists(model_path):
        raise GraphoptError(f"model file '{model_path}' does not exist")
    info = inspect_model(model_path, provider=provider, dims=parse_dims(dim_specs))
    if json_path:
        write_report(json_path, info)
        if quiet:
            return
    _print(info)


def _shape_text(shape: list[Any] | None) -> str:
    return "?" if shape is None else "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _print(info: dict[str, Any]) -> None:
    console = _console()
    m = info["model"]
    console.print(f"[bold]{escape(m['path'])}[/]  {_human_bytes(m['file_bytes'])}")
    console.print(f"IR version {m['ir_version']}; opsets: "
                  + ", ".join(f"{d} {v}" for d, v in m["opset_imports"].items()))
    producer = escape(" ".join(x for x in (m["producer"], m["producer_version"]) if x) or "(not recorded)")
    console.print(f"producer: {producer}; graph '{escape(m['graph'])}': {m['nodes']} nodes"
                  + (f" ({m['nodes_all_graphs']} with subgraphs and functions)"
                     if m["nodes_all_graphs"] != m["nodes"] else ""))

    sig = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        sig.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            sig.add_row(kind[:-1], escape(v["name"]), v["dtype"], escape(_shape_text(v["shape"])))
    console.print(sig)
    if info["overridable_initializers"]:
        console.print(f"{len(info['overridable_initializers'])} initializer(s) are also graph inputs "
                      "(overridable at run time)")

    ops = Table(title=f"ops ({sum(o['count'] for o in info['ops'])} nodes, main graph and subgraphs)",
                title_justify="left")
    for col, justify in (("domain", "left"), ("op", "left"), ("count", "right")):
        ops.add_column(col, justify=justify)
    for o in info["ops"]:
        ops.add_row(escape(o["domain"]), escape(o["op"]), str(o["count"]))
    console.print(ops)

    p = info["parameters"]
    params = Table(title=f"parameters: {p['params']:,} in {p['tensors']} initializer(s), "
                   f"{_human_bytes(p['bytes'])} (by the op type of their first consumer)",
                   title_justify="left")
    for col, justify in (("op", "left"), ("tensors", "right"), ("params", "right"), ("bytes", "right")):
        params.add_column(col, justify=justify)
    for row in p["by_op"]:
        params.add_row(escape(row["op"]), str(row["tensors"]), f"{row['params']:,}",
                       _human_bytes(row["bytes"]))
    console.print(params)

    f = info["flops"]
    bound = ", ".join(f"{k}={v}" for k, v in f["dims"].items())
    flops = Table(title=f"estimated FLOPs per inference: {f['total']:,} ({format_number(float(f['total']))})"
                  + (f" with {bound}" if bound else ""), title_justify="left")
    flops.add_column("op")
    flops.add_column("FLOPs", justify="right")
    flops.add_column("share", justify="right")
    for op, n in f["by_op"].items():
        flops.add_row(escape(op), f"{n:,}", f"{n / f['total'] * 100:.1f}%" if f["total"] else "-")
    console.print(flops)
    for op, e in f["not_estimated"].items():
        console.print(f"  not estimated: {escape(op)} x{e['count']} ({e['reason']})")

    ext = info["external_data"]
    if ext["files"]:
        console.print(f"external data: {ext['tensors']} tensor(s), {_human_bytes(ext['bytes'])} in "
                      f"{len(ext['files'])} file(s)")
        for row in ext["files"]:
            console.print(f"  {escape(row['file'])}: {row['tensors']} tensor(s), "
                          f"{_human_bytes(row['bytes'])} "
                          f"(file {_human_bytes(row['file_bytes'])})")
    else:
        console.print("external data: none (all weights inside the model file)")

    subs = info["subgraphs"]
    console.print(f"subgraphs: {subs['count']}")
    for h in subs["holders"]:
        console.print(escape(f"  {h['op']} node '{h['node'] or '(unnamed)'}' attribute {h['attribute']}: "
                             f"graph '{h['graph']}', {h['nodes']} nodes (in {h['in']})"))
    console.print(f"model-local functions: {len(info['functions'])}")
    for fn in info["functions"]:
        console.print(escape(f"  {fn['function']}: {fn['nodes']} nodes, called {fn['calls']} time(s)"))

    rt = info["runtime"]
    console.print(f"runtime ({rt['provider']}): " + (
        "not checked" if not rt["checked"] else
        "onnxruntime loads the model" + ("" if rt["unsupported"] else ", every node has a kernel")
        if rt["loads"] else "onnxruntime cannot load the model"))
    if rt["error"]:
        console.print(f"  onnxruntime: {escape(rt['error'])}")
    problems = (("cannot run", rt["unsupported"]), ("unknown to the runtime", rt["unknown_domains"]))
    for label, entries in problems:
        for n in entries:
            console.print(f"  [red]{label}[/]: "
                          + escape(f"{n['op']} node '{n['node'] or '(unnamed)'}': {n['reason']}"))
    if rt["note"]:
        console.print(f"  note: {escape(rt['note'])}")
