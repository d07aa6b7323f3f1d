"""The HTML run report: self-contained, with the sections, charts and graph view it promises."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from html.parser import HTMLParser

import onnx
import onnx.parser
import pytest
from click.testing import CliRunner

from graphopt._api import optimize_model
from graphopt._report import ChangeTracker, build_optimize_report
from graphopt._report_html import render_html
from graphopt.cli import cli
from graphopt.pipeline import PassContext
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "fixtures", "examples", "tiny_cnn.onnx")


class _Page(HTMLParser):
    """Collects elements (tag, attributes, enclosing section id) and text per section."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.section: str | None = None
        self.text: dict[str | None, list[str]] = {}
        self.scripts = 0
        self.svg: str | None = None
        self.svg_nodes: dict[str, set[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.section = a.get("id")
        if tag == "svg":
            self.svg = a.get("id")
            self.svg_nodes.setdefault(self.svg or "", set())
        if tag == "g" and "data-id" in a and self.svg:
            self.svg_nodes[self.svg].add(a["data-id"])
        if tag == "script":
            self.scripts += 1
        self.elements.append((tag, a, self.section))

    def handle_data(self, data: str) -> None:
        self.text.setdefault(self.section, []).append(data)

    def find(self, tag: str, cls: str | None = None, section: str | None = None) -> list[dict[str, str]]:
        return [a for t, a, s in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())
                and (section is None or s == section)]


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _run_with_html(tmp_path, source: str = EXAMPLE, *extra: str) -> tuple[str, dict, str]:
    out, rep, page = str(tmp_path / "out.onnx"), str(tmp_path / "r.json"), str(tmp_path / "r.html")
    result = CliRunner().invoke(cli, ["optimize", source, "-o", out, "--report", rep, "--html", page, "-q", *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return open(page, encoding="utf-8").read(), json.load(open(rep)), out


def _assert_no_network(p: _Page, page: str) -> None:
    for tag, attrs, _ in p.elements:
        for key in ("src", "href", "xlink:href", "action", "data"):
            value = attrs.get(key, "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), (tag, key, value)
        assert not (tag == "link" and attrs.get("rel") == "stylesheet"), "styles must be inline"
    assert "@import" not in page and "url(" not in page


def test_html_report_sections_charts_and_no_network_assets(tmp_path):
    page, data, out = _run_with_html(tmp_path)
    p = _parse(page)
    assert page.startswith("<!DOCTYPE html>")
    sections = [a.get("id") for a in p.find("section")]
    assert sections == ["summary", "passes", "ops", "sizes", "changes", "warnings"]
    _assert_no_network(p, page)
    assert p.scripts == 0
    # per-pass table: one row per pass name, with its summed counters
    pass_text = " ".join(p.text["passes"])
    for name in {r["name"] for r in data["passes"]}:
        assert name in pass_text
    assert "removed-nodes=" in pass_text
    # op histogram: one bar per op and series, with the true counts
    src, dst = onnx.load(EXAMPLE), onnx.load(out)
    for series, model in (("before", src), ("after", dst)):
        bars = p.find("rect", series, section="ops")
        counts = {b["data-op"]: int(b["data-count"]) for b in bars}
        expected = Counter(n.op_type for n in model.graph.node)
        assert {op: c for op, c in counts.items() if c} == dict(expected), series
        assert set(counts) == {n.op_type for m in (src, dst) for n in m.graph.node}
        widths = {b["data-op"]: float(b["width"]) for b in bars}
        assert widths["Identity"] == (0 if series == "after" else pytest.approx(widths["Relu"]))
    # size chart: nodes, initializer bytes and file size, before and after
    sizes = {(b["data-metric"], s): int(b["data-value"]) for s in ("before", "after")
             for b in p.find("rect", s, section="sizes")}
    assert sizes[("nodes", "before")] == len(src.graph.node) and sizes[("nodes", "after")] == len(dst.graph.node)
    assert sizes[("file_bytes", "before")] == os.path.getsize(EXAMPLE)
    assert sizes[("file_bytes", "after")] == os.path.getsize(out)
    assert sizes[("initializer_bytes", "after")] == data["output"]["initializer_bytes"]
    # graph view: removed nodes drawn before, modified ones on both sides, edges between them
    removed = {a["data-id"] for a in p.find("g", "removed", section="changes")}
    assert removed == {n["id"] for n in data["changes"]["removed"]}
    assert removed <= p.svg_nodes["graph-before"] and not removed & p.svg_nodes["graph-after"]
    assert len(p.find("g", "modified", section="changes")) == 2 * data["changes"]["nodes_modified"]
    assert p.find("path", "edge", section="changes"), "the graph view must draw edges"
    listing = " ".join(p.text["changes"])
    assert "export_identity" in listing and "input_copy" in listing
    sess = make_session(src)
    feeds = random_inputs(sess, seed=2)
    assert compare_outputs(run_model(src, feeds), run_model(dst, feeds), rtol=1e-5, atol=1e-6).ok


def test_html_escapes_names_from_the_model(tmp_path):
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { t = Identity(x)  y = Relu(t) }""")
    proto.graph.node[0].name = '<script>alert("x")</script>'
    path = str(tmp_path / "evil.onnx")
    onnx.save(proto, path)
    page, data, out = _run_with_html(tmp_path, path)
    p = _parse(page)
    assert p.scripts == 0 and "<script>" not in page
    assert '<script>alert("x")</script>' in " ".join(p.text["changes"])
    assert data["changes"]["removed"][0]["name"] == '<script>alert("x")</script>'
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Relu"]


def test_large_change_is_summarized(tmp_path):
    chain = "  ".join(f"t{i + 1} = Identity(t{i})" for i in range(400))
    proto = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] t0) => (float[2] y) {{ {chain}  y = Relu(t400) }}""")
    tracker = ChangeTracker()
    outcome = optimize_model(proto, ctx=PassContext(opt_level=2, instruments=[tracker]))
    data = build_optimize_report(outcome, input_path=None, output_path=None, target="cpu", tracker=tracker)
    page = render_html(data, max_graph_nodes=60)
    p = _parse(page)
    drawn = p.find("g", "node", section="changes")
    assert 0 < len(drawn) <= 120, "each of the two panels draws at most max_graph_nodes nodes"
    text = " ".join(p.text["changes"])
    assert "400 node(s) removed" in text and "only in the list below" in text
    assert "at most 200 nodes" in text, "the report's own cap is explained"
    assert len(page) < 400_000
    assert [n.op_type for n in outcome.model.graph] == ["Relu"]


def _png_pixels_vary(png: bytes) -> bool:
    """Decode an 8-bit RGB(A) PNG with zlib and tell whether it has more than a few colours."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        chunk = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color = header[0], header[1], header[2], header[3]
    assert depth == 8 and color in (2, 6), header
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    colours = set()
    for row in range(0, height, max(1, height // 200)):
        line = raw[row * (stride + 1) + 1:(row + 1) * (stride + 1)]
        # filtered bytes still differ wherever the picture does; sample them
        colours.update(line[i:i + channels] for i in range(0, len(line), channels * 7))
        if len(colours) > 50:
            return True
    return False


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_html_report_renders_in_headless_chromium(tmp_path):
    page, _, _ = _run_with_html(tmp_path)
    html_path, png = tmp_path / "r.html", tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,1600",
           html_path.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert png.exists(), "chromium wrote no screenshot"
    data = png.read_bytes()
    assert len(data) > 20_000, f"screenshot of {len(data)} bytes looks blank"
    assert _png_pixels_vary(data), "screenshot is a flat image"
