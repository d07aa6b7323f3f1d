"""graphopt and its peers side by side: optimize time, memory, size, validity, numbers, latency.

Peers: onnxruntime's offline optimizer (ORT_ENABLE_BASIC, ORT_ENABLE_EXTENDED), onnxruntime's
transformer optimizer (transformer models), onnxsim, onnxslim, onnxoptimizer, the onnxscript
optimizer and its onnxruntime fusions (``optimize_for_ort``); graphopt at -O2 and -O3 through its
CLI. Models: the light zoo inside the onnx package, silero-vad, NudeNet 320n, BERT-base and GPT-2
(random weights from default configs; TorchScript and dynamo exports). See ``_peer_models.py``,
``_peers_tools.py`` and ``_peers_measure.py`` for what exactly is run and measured.

Per model and tool:

- ``opt CPU`` / ``opt wall``: median CPU time (user + system, all threads) and wall time of
  ``--repeat`` runs (``--repeat-big`` on models over 100 MB) of the tool as a child process (interpreter start and imports included, as
  a user waits for it; CPU time is what counts on a busy machine); ``RSS``: the child's peak
  resident memory;
- ``nodes`` (all graphs, subgraphs included), ``size`` (file plus external data);
- ``valid``: ``onnx.checker`` passes and onnxruntime loads and runs the output;
- ``max abs`` / ``max rel``: worst output difference from the original, both at ORT_DISABLE_ALL,
  same seeded inputs (rel = max|diff| / max|original|);
- ``lat ALL`` / ``lat OFF``: median latency under onnxruntime CPU, 1 thread, batch 1, at
  ORT_ENABLE_ALL and ORT_DISABLE_ALL, as a ratio to the ORIGINAL at ORT_ENABLE_ALL (so < 1 is
  faster than letting onnxruntime optimize the original at load); all variants of a model are
  timed interleaved in one process, as CPU time of that process (one intra-op thread computes
  on the calling thread, so waiting for a core is not counted); ``sess ALL`` / ``sess OFF``:
  session creation (CPU) time. The original's row shows its own latency in ms.

A tool failing on a model is a row with its error; it never stops the run.

Set-up (once; a virtual environment under bench/out, on top of the main one)::

    python bench/compare_peers.py --setup

Usage::

    bench/out/venv/bin/python bench/compare_peers.py --quick            # light zoo, 1 run each
    bench/out/venv/bin/python bench/compare_peers.py --json out.json    # everything
    bench/out/venv/bin/python bench/compare_peers.py --models silero,bert --tools onnxsim,graphopt-O3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import BENCH_DIR, OUT_DIR, fmt_bytes, fmt_seconds, print_table, write_json
from _peer_models import (
    GROUPS,
    ModelSpec,
    ensure_model,
    make_feeds,
    model_specs,
    site_packages,
)
from _peers_tools import TOOLS, Tool, parse_report, tool_command

VENV_DIR = os.path.join(OUT_DIR, "venv")
REQUIREMENTS = os.path.join(BENCH_DIR, "requirements-peers.txt")
ORIGINAL = "original"


@dataclass
class ChildRun:
    """One finished child process."""

    returncode: int
    wall_s: float
    cpu_s: float
    max_rss_bytes: int
    stdout: str
    stderr: str
    timed_out: bool


@dataclass
class Row:
    """One tool on one model (or the original model itself)."""

    tool: str
    path: str | None = None
    error: str | None = None
    opt_times_s: list[float] = field(default_factory=list)
    opt_s: float | None = None
    opt_cpu_times_s: list[float] = field(default_factory=list)
    opt_cpu_s: float | None = None
    max_rss_bytes: int | None = None
    inner: dict[str, float] = field(default_factory=dict)
    nodes: int | None = None
    top_nodes: int | None = None
    nbytes: int | None = None
    digest: str | None = None
    measured: dict[str, Any] = field(default_factory=dict)


def run_child(cmd: list[str], timeout: float) -> ChildRun:
    """Run ``cmd``; wall time and peak RSS of exactly that child (``os.wait4``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(proc.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
                        out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                        killed.is_set())


def _error_line(run: ChildRun) -> str:
    if run.timed_out:
        return f"timed out after {run.wall_s:.0f} s"
    lines = [ln.strip() for ln in (run.stderr or run.stdout).splitlines() if ln.strip()]
    # The last line of a traceback names the exception; skip trailing noise lines.
    for line in reversed(lines):
        if not line.startswith(("warnings.warn", "[", "@@peers")):
            return f"exit {run.returncode}: {line[:240]}"
    return f"exit {run.returncode}"


def model_bytes(path: str) -> int:
    """File size plus the external data files it refers to."""
    total = os.path.getsize(path)
    model = onnx.load(path, load_external_data=False)
    seen: set[str] = set()
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and location not in seen:
                seen.add(location)
                full = os.path.join(os.path.dirname(path), location)
                if os.path.exists(full):
                    total += os.path.getsize(full)
    return total


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors: list[onnx.TensorProto] = []
    for graph in _all_graphs(model):
        tensors.extend(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    tensors.append(attr.t)
    return tensors


def _all_graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    graphs: list[onnx.GraphProto] = []
    todo = [model.graph]
    while todo:
        graph = todo.pop()
        graphs.append(graph)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    todo.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    todo.extend(attr.graphs)
    return graphs


def node_counts(path: str) -> tuple[int, int]:
    """(nodes of the main graph, nodes of every graph incl. subgraphs and functions)."""
    model = onnx.load(path, load_external_data=False)
    total = sum(len(g.node) for g in _all_graphs(model)) + sum(len(f.node) for f in model.functions)
    return len(model.graph.node), total


def _digest(path: str) -> str:
    h = hashlib.sha256()
    for p in [path, *sorted(_external_files(path))]:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _external_files(path: str) -> set[str]:
    model = onnx.load(path, load_external_data=False)
    files = set()
    for tensor in _all_tensors(model):
        for e in tensor.external_data:
            if e.key == "location":
                files.add(os.path.join(os.path.dirname(path), e.value))
    return {f for f in files if os.path.exists(f)}


def _remove_output(path: str) -> None:
    if os.path.exists(path):
        for f in _external_files(path):
            os.unlink(f)
        os.unlink(path)


def run_tool(tool: Tool, spec: ModelSpec, src: str, dst: str, args: argparse.Namespace) -> Row:
    """Run ``tool`` ``args.repeat`` times on ``src``; a failure becomes the row's error."""
    row = Row(tool.name, dst)
    cmd = tool_command(tool, src, dst, args.python, spec.transformer)
    rss = []
    repeat = args.repeat if os.path.getsize(src) < 100e6 else args.repeat_big
    for _ in range(repeat):
        _remove_output(dst)
        run = run_child(cmd, args.timeout)
        if run.returncode != 0 or not os.path.exists(dst):
            row.error = _error_line(run) if run.returncode != 0 else "wrote no output"
            row.path = None
            return row
        row.opt_times_s.append(run.wall_s)
        row.opt_cpu_times_s.append(run.cpu_s)
        report = parse_report(run.stderr)
        # ru_maxrss of a child starts at its parent's peak; the child's own VmHWM does not.
        rss.append(report.pop("peak_rss_bytes", None) or run.max_rss_bytes)
        row.inner = report
    row.opt_s = statistics.median(row.opt_times_s)
    row.opt_cpu_s = statistics.median(row.opt_cpu_times_s)
    row.max_rss_bytes = max(rss)
    return row


def bench_model(spec: ModelSpec, tools: list[Tool], args: argparse.Namespace) -> dict[str, Any]:
    """Every tool on one model, then the measurement child; returns the model's JSON record."""
    record: dict[str, Any] = {"model": spec.name, "group": spec.group, "rows": []}
    try:
        src = ensure_model(spec, args.python)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be had is reported, not fatal
        record["error"] = str(exc)
        return record
    work = os.path.join(args.out_dir, "runs", spec.name)
    os.makedirs(work, exist_ok=True)
    feeds = make_feeds(src, spec, seed=args.seed)
    feeds_path = os.path.join(work, "feeds.npz")
    np.savez(feeds_path, **feeds)
    record.update(path=src, inputs={k: [str(v.dtype), list(v.shape)] for k, v in feeds.items()})

    original = Row(ORIGINAL, src)
    rows = [original]
    for tool in tools:
        if tool.transformer_only and spec.transformer is None:
            continue
        dst = os.path.join(work, f"{tool.name}.onnx")
        print(f"  {spec.name}: {tool.name} ...", end="", flush=True, file=sys.stderr)
        row = run_tool(tool, spec, src, dst, args)
        print(f" {fmt_seconds(row.opt_s) if row.opt_s is not None else row.error}", file=sys.stderr)
        rows.append(row)
    for row in rows:
        if row.path is None:
            continue
        try:
            row.top_nodes, row.nodes = node_counts(row.path)
            row.nbytes = model_bytes(row.path)
            row.digest = _digest(row.path)
        except Exception as exc:  # noqa: BLE001 - an unreadable output is that tool's failure
            row.error = f"unreadable output: {type(exc).__name__}: {exc}"[:300]
            row.path = None

    # Identical files are measured once.
    unique: dict[str, Row] = {}
    for row in rows:
        if row.path is not None and row.digest not in unique:
            unique[row.digest] = row
    spec_json = {
        "feeds": feeds_path,
        "variants": [{"label": r.tool, "path": r.path, "nbytes": r.nbytes} for r in unique.values()],
        "warmup": args.warmup, "min_rounds": args.min_rounds, "max_rounds": args.max_rounds,
        "budget_s": args.latency_budget, "create_repeat": args.create_repeat,
        "min_rounds_big": args.min_rounds_big,
        "mem_budget_bytes": _memory_budget(args.mem_budget_gb), "session_bytes_factor": 2.5,
    }
    spec_path = os.path.join(work, "measure.json")
    result_path = os.path.join(work, "measured.json")
    with open(spec_path, "w") as f:
        json.dump(spec_json, f)
    print(f"  {spec.name}: measuring {len(unique)} variants ...", file=sys.stderr, flush=True)
    run = run_child([args.python, os.path.join(BENCH_DIR, "_peers_measure.py"), spec_path, result_path],
                    args.measure_timeout)
    if run.returncode != 0:
        record["measure_error"] = _error_line(run)
        measured: dict[str, Any] = {}
    else:
        with open(result_path) as f:
            payload = json.load(f)
        measured = payload["results"]
        record["measure_groups"] = payload["groups"]
    for row in rows:
        if row.path is not None:
            row.measured = measured.get(unique[row.digest].tool, {})
            if unique[row.digest] is not row:
                row.measured = {**row.measured, "same_file_as": unique[row.digest].tool}
    for row in rows:
        record["rows"].append(_row_json(row))
    if not args.keep_outputs:
        for row in rows[1:]:
            if row.path is not None and row.nbytes is not None and row.nbytes > 20e6:
                _remove_output(row.path)
    return record


def _memory_budget(cap_gb: float) -> float:
    """``cap_gb``, or half of the memory available now when that is less."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return cap_gb * 1e9
    return min(cap_gb * 1e9, available / 2)


def _row_json(row: Row) -> dict[str, Any]:
    data = {"tool": row.tool, "error": row.error, "opt_s": row.opt_s, "opt_times_s": row.opt_times_s,
            "opt_cpu_s": row.opt_cpu_s, "opt_cpu_times_s": row.opt_cpu_times_s,
            "max_rss_bytes": row.max_rss_bytes, "inner_s": row.inner, "nodes": row.nodes,
            "top_nodes": row.top_nodes, "bytes": row.nbytes}
    data.update(row.measured)
    data["valid"] = _validity(data)
    return data


def _validity(d: dict[str, Any]) -> str:
    if d.get("error"):
        return "failed"
    problems = []
    if d.get("checker"):
        problems.append("checker")
    if d.get("error_DISABLE") or d.get("error_ALL"):
        problems.append("ort")
    elif "lat_ALL_s" not in d and "max_abs" not in d:
        problems.append("unmeasured")
    if d.get("numbers_note") and d.get("max_abs") is None:
        problems.append("outputs")
    return "ok" if not problems else "+".join(problems)


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.1e}"


def _fmt_ratio(d: dict[str, Any], key: str, show_abs: bool = False) -> str:
    ratio = d.get(f"ratio_{key}")
    if ratio is None:
        return "-"
    if show_abs:
        return f"{d[f'lat_{key}_s'] * 1e3:.2f} ms"
    return f"{ratio:.2f}"


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms" if x < 10 else f"{x:.1f} s"


def print_model_table(record: dict[str, Any], rtol: float) -> None:
    """One table per model; the original's latency is shown in ms, others as ratios to it."""
    if record.get("error"):
        print_table(record["model"], ["error"], [[record["error"]]])
        return
    cols = ["tool", "opt CPU", "opt wall", "RSS", "nodes", "size", "valid", "max abs", "max rel",
            "lat ALL", "lat OFF", "sess ALL", "sess OFF"]
    rows = []
    notes = []
    for d in record["rows"]:
        if d.get("error"):
            rows.append([d["tool"], "-", "-", "-", "-", "-", "failed", "-", "-", "-", "-", "-", "-"])
            notes.append(f"{d['tool']}: {str(d['error'])[:200]}")
            continue
        original = d["tool"] == ORIGINAL
        rel = d.get("max_rel")
        rel_cell = _fmt_num(rel) + (" !" if rel is not None and rel > rtol else "")
        nodes = "-" if d["nodes"] is None else (str(d["nodes"]) if d["nodes"] == d["top_nodes"]
                                               else f"{d['top_nodes']}/{d['nodes']}")
        rows.append([
            d["tool"], "-" if original else fmt_seconds(d["opt_cpu_s"]),
            "-" if original else fmt_seconds(d["opt_s"]),
            "-" if original else fmt_bytes(d["max_rss_bytes"]), nodes,
            fmt_bytes(d["bytes"]), d["valid"], "-" if original else _fmt_num(d.get("max_abs")),
            "-" if original else rel_cell, _fmt_ratio(d, "ALL", original), _fmt_ratio(d, "DISABLE"),
            _fmt_ms(d.get("create_ALL_s")), _fmt_ms(d.get("create_DISABLE_s")),
        ])
        if original and d.get("aa_ratio") is not None:
            notes.append(f"original: A/A ratio {d['aa_ratio']:.3f} (a second session of the original at "
                         f"ORT_ENABLE_ALL; its distance from 1 is the noise of the ratios)")
        for key in ("checker", "error_ALL", "error_DISABLE", "numbers_note", "same_file_as"):
            if d.get(key):
                notes.append(f"{d['tool']}: {key}: {str(d[key])[:160]}")
    if record.get("measure_error"):
        notes.append(f"measurement failed: {record['measure_error']}")
    title = f"{record['model']}  (lat: ratio to the original at ORT_ENABLE_ALL, 1 thread; nodes main/all graphs)"
    print_table(title, cols, rows, notes)


#: Metrics of the losses table (lower is better) and the relative margin a peer must win by.
_LOWER_IS_BETTER = {"lat ALL": ("ratio_ALL", 0.03), "lat OFF": ("ratio_DISABLE", 0.03),
                    "opt CPU": ("opt_cpu_s", 0.05), "RSS": ("max_rss_bytes", 0.05),
                    "size": ("bytes", 0.05)}


def _usable(d: dict[str, Any], rtol: float) -> bool:
    """A row that may win a metric: ran, valid, numbers kept within ``rtol``."""
    return (not d.get("error") and d.get("valid") == "ok" and d.get("max_rel") is not None
            and d["max_rel"] <= rtol)


def losses(records: list[dict[str, Any]], rtol: float) -> list[list[str]]:
    """Per model and metric where the best valid peer beats the best graphopt row.

    A latency loss counts only beyond the model's noise: 3 %, or twice the A/A ratio's distance
    from 1 when that is larger.
    """
    out = []
    for rec in records:
        rows = [d for d in rec.get("rows", []) if d["tool"] != ORIGINAL and _usable(d, rtol)]
        ours = [d for d in rows if d["tool"].startswith("graphopt")]
        peers = [d for d in rows if not d["tool"].startswith("graphopt")]
        failed = [d["tool"] for d in rec.get("rows", []) if d["tool"].startswith("graphopt") and not _usable(d, rtol)]
        for tool in failed:
            d = next(x for x in rec["rows"] if x["tool"] == tool)
            why = (d.get("error") or d.get("valid")) if d.get("valid") != "ok" else f"max rel {_fmt_num(d.get('max_rel'))}"
            out.append([rec["model"], "validity", tool, str(why)[:60], "", ""])
        if not ours or not peers:
            continue
        original = next((d for d in rec["rows"] if d["tool"] == ORIGINAL), {})
        noise = abs(1 - original["aa_ratio"]) if original.get("aa_ratio") else 0.0
        for metric, (key, margin) in _LOWER_IS_BETTER.items():
            if metric.startswith("lat"):
                margin = max(margin, 2 * noise)
            mine = [d for d in ours if d.get(key) is not None]
            theirs = [d for d in peers if d.get(key) is not None]
            if not mine or not theirs:
                continue
            best_ours = min(mine, key=lambda d: d[key])
            best_peer = min(theirs, key=lambda d: d[key])
            if best_peer[key] < best_ours[key] * (1 - margin):
                fmt = _metric_formatter(metric)
                out.append([rec["model"], metric, best_ours["tool"], fmt(best_ours[key]),
                            best_peer["tool"], fmt(best_peer[key])])
    return out


def _metric_formatter(metric: str) -> Any:
    if metric.startswith("lat"):
        return lambda v: f"{v:.3f}"
    if metric in ("opt CPU", "sess ALL", "sess OFF"):
        return fmt_seconds
    if metric in ("RSS", "size"):
        return fmt_bytes
    return str


# ---------------------------------------------------------------------------------------------
# Set-up and main


def setup_venv() -> None:
    """Create bench/out/venv on top of the current interpreter and install the peers into it."""
    if not os.path.exists(os.path.join(VENV_DIR, "bin", "python")):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", VENV_DIR], check=True)
    subprocess.run([os.path.join(VENV_DIR, "bin", "python"), "-m", "pip", "install", "-r", REQUIREMENTS],
                   check=True)


def _default_python() -> str:
    venv_python = os.path.join(VENV_DIR, "bin", "python")
    return venv_python if os.path.exists(venv_python) else sys.executable


def _parse_list(text: str, allowed: list[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create bench/out/venv with the peers and exit")
    parser.add_argument("--models", default=",".join(GROUPS), help=f"model groups ({','.join(GROUPS)})")
    parser.add_argument("--only", default="", help="comma list of model names within the groups")
    parser.add_argument("--tools", default=",".join(t.name for t in TOOLS), help="comma list of tools")
    parser.add_argument("--quick", action="store_true", help="light models, 1 optimize run, short latency")
    parser.add_argument("--repeat", type=int, default=None, help="optimize runs per tool (median; default 3)")
    parser.add_argument("--repeat-big", type=int, default=1,
                        help="optimize runs per tool on models over 100 MB (each takes seconds to a minute)")
    parser.add_argument("--latency-budget", type=float, default=None,
                        help="seconds of interleaved timing per session group (default 10)")
    parser.add_argument("--min-rounds", type=int, default=None, help="timed rounds at least (default 10)")
    parser.add_argument("--min-rounds-big", type=int, default=5,
                        help="timed rounds at least for models over 100 MB")
    parser.add_argument("--max-rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per session (default 2)")
    parser.add_argument("--create-repeat", type=int, default=None,
                        help="session creations per variant under 50 MB (median; default 3)")
    parser.add_argument("--mem-budget-gb", type=float, default=8.0,
                        help="memory for the sessions timed together")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per optimize run")
    parser.add_argument("--measure-timeout", type=float, default=1800, help="seconds per model's measurement")
    parser.add_argument("--rtol", type=float, default=1e-3, help="max rel difference still counted correct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--python", default=None, help="interpreter with the peers (default: bench/out/venv)")
    parser.add_argument("--out-dir", default=OUT_DIR)
    parser.add_argument("--keep-outputs", action="store_true", help="keep optimized models over 20 MB")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every number to FILE")
    args = parser.parse_args(argv)
    if args.setup:
        setup_venv()
        return 0
    if args.quick:
        args.models = "light" if args.models == ",".join(GROUPS) else args.models
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.repeat_big = min(args.repeat_big, args.repeat)
    args.latency_budget = args.latency_budget if args.latency_budget is not None else (1.0 if args.quick else 10.0)
    args.min_rounds = args.min_rounds or (3 if args.quick else 10)
    args.min_rounds_big = min(args.min_rounds_big, args.min_rounds)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.create_repeat = args.create_repeat or (1 if args.quick else 3)
    args.python = args.python or _default_python()
    groups = _parse_list(args.models, list(GROUPS), "model group")
    tool_names = _parse_list(args.tools, [t.name for t in TOOLS], "tool")
    tools = [t for t in TOOLS if t.name in tool_names]
    specs = model_specs(groups, os.path.join(args.out_dir, "models"), site_packages(args.python))
    if args.only:
        wanted = set(args.only.split(","))
        specs = [s for s in specs if s.name in wanted]

    if any(t.graphopt_level is not None for t in tools):
        _precompile_graphopt(args.python)
    t0 = time.perf_counter()
    records = []
    for spec in specs:
        record = bench_model(spec, tools, args)
        records.append(record)
        print_model_table(record, args.rtol)
        if args.json:  # keep what is done so far if a later model takes the machine down
            _write(args, records, time.perf_counter() - t0)
    lost = losses(records, args.rtol)
    print_table("Where graphopt loses (best graphopt row vs best valid peer; latency beyond noise, "
                "others by > 5 %)",
                ["model", "metric", "graphopt", "value", "peer", "value"], lost or [["-", "none", "", "", "", ""]])
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    _write(args, records, time.perf_counter() - t0)
    return 0


def _precompile_graphopt(python: str) -> None:
    """Compile graphopt's modules to bytecode, as ``pip install`` does, before its runs are timed.

    An editable install leaves no bytecode behind, and with ``PYTHONDONTWRITEBYTECODE`` set every
    run would compile about 200 modules again (0.45-0.5 s of CPU), which no installed copy pays.
    The peers in the venv were installed by pip and are compiled already.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folders = [os.path.join(root, name) for name in ("graphopt", "passes")]
    subprocess.run([python, "-m", "compileall", "-q", *folders], check=False, stdout=subprocess.DEVNULL)


def _tool_versions(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; names = ['onnx', 'onnxruntime', 'onnxsim', 'onnxslim', "
            "'onnxoptimizer', 'onnxscript', 'onnx-ir', 'torch', 'transformers', 'silero-vad', 'nudenet', "
            "'graphopt', 'numpy']\nout = {}\nfor n in names:\n    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def _write(args: argparse.Namespace, records: list[dict[str, Any]], seconds: float) -> None:
    if not args.json:
        return
    config = {k: v for k, v in vars(args).items() if k not in ("json", "setup")}
    write_json(args.json, {"benchmark": "compare_peers", "config": config,
                           "versions": _tool_versions(args.python), "seconds": seconds,
                           "models": records, "losses": losses(records, args.rtol)})


if __name__ == "__main__":
    sys.exit(main())
