"""The HTML run report: one self-contained file rendered from a ``graphopt.report/1`` dict.

Everything is inline: CSS, and SVG charts drawn here in Python; the page loads nothing from the
network and runs no script. It shows the run summary, the per-pass table (time and counters),
the op histogram before and after, the sizes before and after, and a graph view of what changed:
the removed nodes with their neighbourhood before the run, the added ones after it. Large
changes are cut at ``max_graph_nodes`` drawn nodes; the lists say how many more there are.
"""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Any, Iterable

from graphopt._report import write_text_atomic

__all__ = ["render_html", "write_html", "MAX_GRAPH_NODES", "MAX_CHART_OPS"]

#: Most nodes drawn in each panel of the graph view.
MAX_GRAPH_NODES = 80
#: Most op types drawn in the histogram (the rest are summed as "other ops").
MAX_CHART_OPS = 40

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d2330;
       background: #fafbfc; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
section { background: #fff; border: 1px solid #e1e4e8; border-radius: 6px; padding: 12px 16px;
          margin-bottom: 16px; overflow-x: auto; }
table { border-collapse: collapse; } th, td { padding: 3px 10px; text-align: left;
        border-bottom: 1px solid #eaecef; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
.meta { color: #57606a; } .warn { color: #9a6700; }
.legend span { display: inline-block; margin-right: 14px; }
.swatch { display: inline-block; width: 11px; height: 11px; margin-right: 4px; vertical-align: -1px; }
.before { fill: #8c959f; background: #8c959f; } .after { fill: #2da44e; background: #2da44e; }
.removed { background: #ffebe9; } .added { background: #dafbe1; } .modified { background: #fff8c5; }
.swatch.context { background: #f6f8fa; border: 1px solid #8c959f; width: 9px; height: 9px; }
svg text { font: 11px system-ui, sans-serif; fill: #1d2330; }
svg .node rect { stroke-width: 1.2; } svg .node.removed rect { fill: #ffebe9; stroke: #cf222e; }
svg .node.added rect { fill: #dafbe1; stroke: #1a7f37; } svg .node.modified rect { fill: #fff8c5; stroke: #9a6700; }
svg .node.context rect { fill: #f6f8fa; stroke: #8c959f; } svg .edge { fill: none; stroke: #8c959f; }
.panels { display: flex; gap: 16px; flex-wrap: wrap; } .panel h3 { font-size: 14px; margin: 4px 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    if before == 0:
        return "" if after == 0 else "new"
    return f"{(after - before) / before * 100:+.1f}%"


# -- charts ---------------------------------------------------------------------------------------

def op_histogram_svg(before: dict[str, int], after: dict[str, int], *, max_ops: int = MAX_CHART_OPS) -> str:
    """A horizontal grouped bar chart: one row per op, a grey bar before and a green bar after.

    Every bar is a ``<rect class="bar before|after" data-op=... data-count=...>``.
    """
    ops = sorted(set(before) | set(after), key=lambda o: (-max(before.get(o, 0), after.get(o, 0)), o))
    rows: list[tuple[str, int, int]] = [(o, before.get(o, 0), after.get(o, 0)) for o in ops[:max_ops]]
    if len(ops) > max_ops:
        rest = ops[max_ops:]
        rows.append((f"{len(rest)} other ops", sum(before.get(o, 0) for o in rest),
                     sum(after.get(o, 0) for o in rest)))
    if not rows:
        return '<p class="meta">The model has no nodes.</p>'
    label_w, bar_w, row_h = 190, 460, 26
    top = max(max(b, a) for _, b, a in rows) or 1
    height = row_h * len(rows) + 10
    parts = [f'<svg class="chart" id="op-chart" '
             f'width="{label_w + bar_w + 60}" height="{height}" role="img" '
             f'aria-label="op histogram before and after">']
    for i, (op, b, a) in enumerate(rows):
        y = 5 + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(op)}</text>')
        for j, (series, count) in enumerate((("before", b), ("after", a))):
            w = max(bar_w * count / top, 0 if count == 0 else 1)
            yy = y + 2 + j * 11
            parts.append(f'<rect class="bar {series}" data-op="{_e(op)}" data-count="{count}" '
                         f'x="{label_w}" y="{yy}" width="{w:.1f}" height="10">'
                         f'<title>{_e(op)} {series}: {count}</title></rect>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{yy + 9}">{count}</text>')
    parts.append("</svg>")
    return "".join(parts)


def size_chart_svg(metrics: list[tuple[str, str, float | None, float | None]]) -> str:
    """Paired bars per metric (``(key, label, before, after)``), each pair scaled to its larger value.

    Every bar is a ``<rect class="bar before|after" data-metric=... data-value=...>``.
    """
    shown = [m for m in metrics if m[2] is not None and m[3] is not None]
    label_w, bar_w, row_h = 150, 360, 34
    parts = [f'<svg class="chart" id="size-chart" '
             f'width="{label_w + bar_w + 110}" height="{row_h * len(shown) + 10}" role="img" '
             f'aria-label="sizes before and after">']
    for i, (key, label, before, after) in enumerate(shown):
        assert before is not None and after is not None
        y = 5 + i * row_h
        top = max(before, after) or 1
        parts.append(f'<text x="{label_w - 6}" y="{y + 18}" text-anchor="end">{_e(label)}</text>')
        for j, (series, value) in enumerate((("before", before), ("after", after))):
            w = bar_w * value / top
            yy = y + 3 + j * 14
            text = _human_bytes(value) if key.endswith("bytes") else f"{value:.0f}"
            parts.append(f'<rect class="bar {series}" data-metric="{_e(key)}" data-value="{value:.0f}" '
                         f'x="{label_w}" y="{yy}" width="{w:.1f}" height="12">'
                         f'<title>{_e(label)} {series}: {_e(text)}</title></rect>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{yy + 10}">{_e(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def graph_svg(nodes: list[dict[str, Any]], status: dict[str, str], *, svg_id: str,
              max_nodes: int = MAX_GRAPH_NODES, per_row: int = 5) -> tuple[str, int]:
    """Draw node summaries as boxes, one block per connected cluster, each in topological layers.

    Returns the SVG and the number of nodes left out (beyond ``max_nodes``). Each box is a
    ``<g class="node <status>" data-id=... data-op=...>``, each edge a ``<path class="edge">``.
    """
    rank = {"removed": 0, "added": 0, "modified": 1, "context": 2}
    ranked = sorted(nodes, key=lambda n: rank.get(status.get(n["id"], "context"), 3))
    drawn, left_out = ranked[:max_nodes], max(0, len(ranked) - max_nodes)
    drawn.sort(key=lambda n: _id_order(n["id"]))
    producer: dict[str, str] = {}
    for n in drawn:
        for v in n["outputs"]:
            if v:
                producer[v] = n["id"]
    preds: dict[str, list[str]] = defaultdict(list)
    for n in drawn:
        for v in n["inputs"]:
            p = producer.get(v)
            if p is not None and p != n["id"] and p not in preds[n["id"]]:
                preds[n["id"]].append(p)
    ids = [n["id"] for n in drawn]
    layer = _layers(ids, preds)
    box_w, box_h, gap_x, gap_y, gap_block, pad = 150, 34, 16, 26, 22, 10
    pos: dict[str, tuple[float, float]] = {}
    y0, width = pad, 0.0
    for block in _clusters(ids, preds):
        rows: list[list[str]] = []
        by_layer: dict[int, list[str]] = defaultdict(list)
        for i in block:
            by_layer[layer[i]].append(i)
        for k in sorted(by_layer):
            # Order a layer by where its producers stand, which keeps edges from crossing.
            members = sorted(by_layer[k], key=lambda i: (
                sum(pos[p][0] for p in preds[i] if p in pos) / max(1, sum(p in pos for p in preds[i]))
                if any(p in pos for p in preds[i]) else 1e9))
            for start in range(0, len(members), per_row):
                row = members[start:start + per_row]
                rows.append(row)
                for c, i in enumerate(row):
                    pos[i] = (pad + c * (box_w + gap_x), y0 + (len(rows) - 1) * (box_h + gap_y))
        width = max(width, pad * 2 + max(len(r) for r in rows) * (box_w + gap_x))
        y0 += len(rows) * (box_h + gap_y) - gap_y + gap_block
    height = y0 - gap_block + pad if drawn else pad * 2
    parts = [f'<svg class="graph" id="{_e(svg_id)}" width="{width:.0f}" height="{height:.0f}" '
             'role="img" aria-label="graph view">']
    for n in drawn:
        x2, y2 = pos[n["id"]]
        for v in n["inputs"]:
            p = producer.get(v)
            if p is None or p == n["id"]:
                continue
            x1, y1 = pos[p]
            sx, sy, ex, ey = x1 + box_w / 2, y1 + box_h, x2 + box_w / 2, y2
            mid = (sy + ey) / 2
            parts.append(f'<path class="edge" data-from="{_e(p)}" data-to="{_e(n["id"])}" '
                         f'd="M{sx:.0f},{sy:.0f} C{sx:.0f},{mid:.0f} {ex:.0f},{mid:.0f} {ex:.0f},{ey:.0f}">'
                         f'<title>{_e(v)}</title></path>')
    for n in drawn:
        x, y = pos[n["id"]]
        kind = status.get(n["id"], "context")
        tip = (f"{n['op']} {n['name']}\n{kind} in {n['graph']}\ninputs: {', '.join(n['inputs'])}\n"
               f"outputs: {', '.join(n['outputs'])}")
        name = n["name"] if len(n["name"]) <= 22 else n["name"][:21] + "\u2026"
        parts.append(f'<g class="node {kind}" data-id="{_e(n["id"])}" data-op="{_e(n["op"])}">'
                     f'<title>{_e(tip)}</title><rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="4"/>'
                     f'<text x="{x + 6}" y="{y + 14}" font-weight="600">{_e(n["op"])}</text>'
                     f'<text x="{x + 6}" y="{y + 28}" class="meta">{_e(name)}</text></g>')
    parts.append("</svg>")
    return "".join(parts), left_out


def _id_order(node_id: str) -> tuple[int, int]:
    """``n<k>`` (nodes before the run, in graph order) first, then ``a<k>`` (added ones)."""
    kind, num = node_id[:1], node_id[1:]
    return (0 if kind == "n" else 1, int(num) if num.isdigit() else 0)


def _clusters(ids: list[str], preds: dict[str, list[str]]) -> list[list[str]]:
    """Connected groups of ``ids`` (edges in either direction), each in the order of ``ids``."""
    root = {i: i for i in ids}

    def find(i: str) -> str:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for i in ids:
        for p in preds.get(i, ()):
            root[find(i)] = find(p)
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _layers(ids: list[str], preds: dict[str, list[str]]) -> dict[str, int]:
    """Longest-path layering (Kahn's order); nodes on a cycle, if any, go after the rest."""
    succ: dict[str, list[str]] = defaultdict(list)
    pending = {i: len(preds.get(i, ())) for i in ids}
    for i in ids:
        for p in preds.get(i, ()):
            succ[p].append(i)
    layer = {i: 0 for i in ids}
    ready = [i for i in ids if pending[i] == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for s in succ[i]:
            layer[s] = max(layer[s], layer[i] + 1)
            pending[s] -= 1
            if pending[s] == 0:
                ready.append(s)
    if seen < len(ids):
        last = max(layer.values(), default=0) + 1
        for i in ids:
            if pending[i] > 0:
                layer[i] = last
    return layer


# -- page -----------------------------------------------------------------------------------------

def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], *, numeric: set[int] = frozenset(),
           table_id: str = "", row_classes: Iterable[str] | None = None) -> str:
    heads = "".join(f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                    for i, h in enumerate(headers))
    classes = list(row_classes) if row_classes is not None else None
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                        for i, c in enumerate(row))
        cls = f' class="{_e(classes[r])}"' if classes else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{heads}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary_section(data: dict[str, Any]) -> str:
    b, a = data["input"], data["output"]
    rows = [("nodes", b["nodes"], a["nodes"], _change(b["nodes"], a["nodes"])),
            ("initializers", b["initializers"], a["initializers"], _change(b["initializers"], a["initializers"])),
            ("initializer bytes", _human_bytes(b["initializer_bytes"]), _human_bytes(a["initializer_bytes"]),
             _change(b["initializer_bytes"], a["initializer_bytes"])),
            ("file size", _human_bytes(b["bytes"]), _human_bytes(a["bytes"]), _change(b["bytes"], a["bytes"])),
            ("subgraphs", b["subgraphs"], a["subgraphs"], _change(b["subgraphs"], a["subgraphs"])),
            ("functions", b["functions"], a["functions"], _change(b["functions"], a["functions"]))]
    secs = data["seconds"]
    timing = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in secs.items())
    return (f'<section id="summary"><h2>Summary</h2>'
            f'{_table(["", "before", "after", "change"], rows, numeric={1, 2, 3}, table_id="summary-table")}'
            f'<p class="meta">Time: {_e(timing)}</p></section>')


def _passes_section(data: dict[str, Any]) -> str:
    totals: dict[str, dict[str, Any]] = {}
    for r in data["passes"]:
        t = totals.setdefault(r["name"], {"runs": 0, "changed": 0, "seconds": 0.0, "counters": {}})
        t["runs"] += 1
        t["changed"] += int(r["changed"])
        t["seconds"] += r["seconds"]
        for k, v in r["counters"].items():
            t["counters"][k] = t["counters"].get(k, 0) + v
    rows = [(name, t["runs"], t["changed"], f"{t['seconds'] * 1e3:.2f}",
             ", ".join(f"{k}={v}" for k, v in sorted(t["counters"].items()) if v) or "-")
            for name, t in totals.items()]
    runs = [(i + 1, r["name"], r["round"], "yes" if r["changed"] else "no", f"{r['seconds'] * 1e3:.2f}",
             ", ".join(f"{k}={v}" for k, v in sorted(r["counters"].items())) or "-")
            for i, r in enumerate(data["passes"])]
    body = (_table(["pass", "runs", "changed", "ms", "counters"], rows, numeric={1, 2, 3}, table_id="pass-table")
            if rows else '<p class="meta">No pass ran.</p>')
    every = _table(["#", "pass", "round", "changed", "ms", "counters"], runs, numeric={0, 2, 4},
                   table_id="pass-runs")
    details = (f"<details><summary>Every pass execution ({len(runs)})</summary>{every}</details>"
               if runs else "")
    pipeline = _e(data["pipeline"]) or "(empty pipeline)"
    return (f'<section id="passes"><h2>Passes</h2><p class="meta mono">{pipeline}</p>'
            f"{body}{details}</section>")


def _legend() -> str:
    return ('<p class="legend"><span><i class="swatch before"></i>before</span>'
            '<span><i class="swatch after"></i>after</span></p>')


def _charts_sections(data: dict[str, Any]) -> str:
    b, a = data["input"], data["output"]
    ops = f'<section id="ops"><h2>Ops before and after</h2>{_legend()}{op_histogram_svg(b["ops"], a["ops"])}</section>'
    metrics = [("nodes", "nodes", b["nodes"], a["nodes"]),
               ("initializer_bytes", "initializer bytes", b["initializer_bytes"], a["initializer_bytes"]),
               ("file_bytes", "file size", b["bytes"], a["bytes"])]
    sizes = f'<section id="sizes"><h2>Sizes</h2>{_legend()}{size_chart_svg(metrics)}</section>'
    return ops + sizes


def _changes_section(data: dict[str, Any], max_nodes: int) -> str:
    ch = data["changes"]

    def counts(d: dict[str, int], sign: str) -> str:
        return ", ".join(f"{op} {sign}{n}" for op, n in d.items()) or "none"

    head = (f'<p>Ops removed: <span class="mono">{_e(counts(ch["ops_removed"], "-"))}</span><br>'
            f'Ops added: <span class="mono">{_e(counts(ch["ops_added"], "+"))}</span></p>')
    if ch["nodes_removed"] is None:
        return (f'<section id="changes"><h2>What changed</h2>{head}'
                '<p class="meta">Nodes were not tracked in this run.</p></section>')
    head += (f'<p>{ch["nodes_removed"]} node(s) removed, {ch["nodes_added"]} added, '
             f'{ch["nodes_modified"]} rewired or modified, {ch["nodes_kept"]} unchanged.</p>')
    if not (ch["removed"] or ch["added"] or ch["modified"]):
        return (f'<section id="changes"><h2>What changed</h2>{head}'
                '<p class="meta">The graph did not change.</p></section>')
    status: dict[str, str] = {}
    for key, kind in (("removed", "removed"), ("added", "added"), ("modified", "modified"), ("context", "context")):
        for n in ch[key]:
            status.setdefault(n["id"], kind)
    before_nodes = list(ch["removed"]) + [
        dict(n, inputs=n.get("inputs_before", n["inputs"]), outputs=n.get("outputs_before", n["outputs"]))
        for n in ch["modified"]] + list(ch["context"])
    after_nodes = list(ch["added"]) + list(ch["modified"]) + list(ch["context"])
    before_svg, before_left = graph_svg(before_nodes, status, svg_id="graph-before", max_nodes=max_nodes)
    after_svg, after_left = graph_svg(after_nodes, status, svg_id="graph-after", max_nodes=max_nodes)
    more = []
    if before_left or after_left:
        more.append(f"The drawing shows {max_nodes} nodes per side; {before_left} before and {after_left} after "
                    "are only in the list below.")
    if ch["truncated"]:
        more.append(f"The report lists at most {ch['node_limit']} nodes of each kind; the counts above are complete.")
    legend = ('<p class="legend"><span><i class="swatch removed"></i>removed</span>'
              '<span><i class="swatch added"></i>added</span><span><i class="swatch modified"></i>rewired</span>'
              '<span><i class="swatch context"></i>unchanged neighbour</span></p>')
    panels = (f'<div class="panels"><div class="panel"><h3>Before</h3>{before_svg}</div>'
              f'<div class="panel"><h3>After</h3>{after_svg}</div></div>')
    rows, classes = [], []
    for key, label in (("removed", "removed"), ("added", "added"), ("modified", "rewired")):
        for n in ch[key]:
            ins = ", ".join(n["inputs"])
            if key == "modified" and n.get("inputs_before") != n["inputs"]:
                ins = f"{', '.join(n.get('inputs_before', []))} \u2192 {ins}"
            rows.append((label, n["op"], n["name"], n["graph"], ins, ", ".join(n["outputs"])))
            classes.append(key)
    listing = _table(["", "op", "name", "graph", "inputs", "outputs"], rows, table_id="changed-nodes",
                     row_classes=classes)
    notes = "".join(f'<p class="meta">{_e(m)}</p>' for m in more)
    return f'<section id="changes"><h2>What changed</h2>{head}{legend}{panels}{notes}{listing}</section>'


def _messages_section(data: dict[str, Any]) -> str:
    items = [f'<li class="warn">warning: {_e(w)}</li>' for w in data["warnings"]]
    items += [f"<li>emit: {_e(c)}</li>" for c in data["emit"]]
    body = f"<ul>{''.join(items)}</ul>" if items else '<p class="meta">No warnings.</p>'
    return f'<section id="warnings"><h2>Warnings and emit changes</h2>{body}</section>'


def render_html(data: dict[str, Any], *, max_graph_nodes: int = MAX_GRAPH_NODES) -> str:
    """The HTML page of a ``graphopt.report/1`` dict, as one string with no external assets.

    Example:
        >>> page = render_html(build_optimize_report(outcome, ...))  # doctest: +SKIP
        >>> page.startswith("<!DOCTYPE html>")  # doctest: +SKIP
        True
    """
    inp, out = data["input"], data["output"]
    title = f"graphopt {data['command']}: {inp.get('path') or 'model'} \u2192 {out.get('path') or 'model'}"
    facts = " \u00b7 ".join(_e(x) for x in (f"graphopt {data['graphopt_version']}", f"target {data['target']}",
                                              data["created"], f"schema {data['schema']}"))
    header = f'<header><h1>{_e(title)}</h1><p class="meta">{facts}</p></header>'
    body = (header + _summary_section(data) + _passes_section(data) + _charts_sections(data)
            + _changes_section(data, max_graph_nodes) + _messages_section(data))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def write_html(path: str, data: dict[str, Any]) -> None:
    """Render ``data`` and write it to ``path`` atomically.

    Raises:
        GraphoptError: the folder does not exist or the file cannot be written.
    """
    write_text_atomic(path, render_html(data), "HTML report")
