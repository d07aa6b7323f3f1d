"""Validity, numbers and latency of every variant of one model, in one child process.

``compare_peers.py`` writes a JSON spec and runs::

    python bench/_peers_measure.py SPEC.json RESULT.json

For each variant (the original model first, then each tool's output) it records:

- ``checker``: ``onnx.checker.check_model`` on the file (None when it passes, else the error);
- the outputs at ORT_DISABLE_ALL on the seeded inputs compared with the original's at
  ORT_DISABLE_ALL: ``max_abs`` = max |out - ref| and ``max_rel`` = max |out - ref| / max |ref|,
  the worst output of the model (graph optimizations off on both sides, so the numbers show
  what the tool changed, not what onnxruntime's own fusions change);
- session creation time and median latency at ORT_ENABLE_ALL and ORT_DISABLE_ALL (CPU, 1 thread,
  sequential), each latency also as a ratio to the original at ORT_ENABLE_ALL. Times are CPU
  time of this process (``time.process_time``), which a busy machine inflates far less than
  wall time; wall times are recorded too (``wall_*``).

Timing is interleaved: every session of a group runs once per round, in an order that rotates
each round, so drift of the machine (frequency, other load) spreads over all variants alike.
The original at ORT_ENABLE_ALL (the anchor) is in every group; a ratio is the median over rounds
of the variant's time over the anchor's time in the same round. A second session of the
original (``aa_ratio``, an A/A test) shows the noise of a ratio. Groups exist because sessions of big models do not all
fit in memory at once; a group holds as many sessions as ``mem_budget_bytes`` allows, by an
estimate of ``session_bytes_factor`` times the model's file size per session.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["measure"]

_LEVELS = ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL")


@dataclass
class _Entry:
    label: str
    path: str
    level: str
    nbytes: int
    session: Any = None
    create_s: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def _session(path: str, level: str) -> tuple[Any, float]:
    """A CPU session at ``level``, 1 thread; returns it and the CPU seconds its creation took."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    t0 = time.process_time()
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess, time.process_time() - t0


def _feeds_for(sess: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    wanted = [i.name for i in sess.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise RuntimeError(f"the model asks for inputs the original does not have: {missing}")
    return {n: feeds[n] for n in wanted}


def _run(sess: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _compare(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, Any]:
    """Worst max-abs and max-rel difference over the outputs (matched by name, else position)."""
    note = None
    if list(ref) == list(out):
        pairs = [(ref[n], out[n]) for n in ref]
    elif len(ref) == len(out):
        note = "output names changed"
        pairs = list(zip(ref.values(), out.values()))
    else:
        return {"max_abs": None, "max_rel": None, "numbers_note": f"{len(out)} outputs, original has {len(ref)}"}
    worst_abs = 0.0
    worst_rel = 0.0
    for expected, actual in pairs:
        expected = np.asarray(expected)
        actual = np.asarray(actual)
        if expected.shape != actual.shape:
            return {"max_abs": None, "max_rel": None,
                    "numbers_note": f"output shape {actual.shape}, original {expected.shape}"}
        if expected.dtype == object or expected.size == 0:
            same = bool(np.array_equal(expected, actual))
            worst_abs = max(worst_abs, 0.0 if same else float("inf"))
            continue
        e = expected.astype(np.float64)
        a = actual.astype(np.float64)
        both_nan = np.isnan(e) & np.isnan(a)
        diff = np.where(both_nan, 0.0, np.abs(a - e))
        diff = np.where(np.isnan(diff), np.inf, diff)
        d = float(diff.max())
        scale = float(np.nanmax(np.abs(e))) if np.isfinite(e).any() else 0.0
        worst_abs = max(worst_abs, d)
        worst_rel = max(worst_rel, d / scale if scale > 0 else (0.0 if d == 0 else float("inf")))
    return {"max_abs": worst_abs, "max_rel": worst_rel, "numbers_note": note}


def _groups(entries: list[_Entry], anchor_bytes: float, budget: float, factor: float) -> list[list[_Entry]]:
    groups: list[list[_Entry]] = []
    current: list[_Entry] = []
    used = factor * anchor_bytes
    for entry in entries:
        cost = factor * entry.nbytes
        if current and used + cost > budget:
            groups.append(current)
            current = []
            used = factor * anchor_bytes
        current.append(entry)
        used += cost
    if current:
        groups.append(current)
    return groups


def _time_group(anchor: _Entry, group: list[_Entry], feeds: dict[str, np.ndarray],
                spec: dict[str, Any]) -> None:
    """Interleaved rounds over the anchor and ``group``.

    Each run records wall and CPU time (``time.process_time``: with one intra-op thread
    onnxruntime computes on the calling thread, so CPU time does not count the time the
    process waited for a core on a busy machine). Each member's ``ratios`` are its CPU time
    over the anchor's CPU time of the same round.
    """
    members = [anchor, *group]
    min_rounds = spec["min_rounds"] if max(m.nbytes for m in members) < 100e6 else spec["min_rounds_big"]
    member_feeds = [_feeds_for(m.session, feeds) for m in members]
    for m, f in zip(members, member_feeds):
        for _ in range(spec["warmup"]):
            m.session.run(None, f)
    start = time.perf_counter()
    rounds = 0
    while rounds < spec["max_rounds"]:
        if rounds >= min_rounds and time.perf_counter() - start >= spec["budget_s"]:
            break
        shift = rounds % len(members)
        cpu_this_round: dict[int, float] = {}
        for i in range(len(members)):
            k = (i + shift) % len(members)
            m = members[k]
            t0 = time.perf_counter()
            c0 = time.process_time()
            m.session.run(None, member_feeds[k])
            cpu_this_round[k] = time.process_time() - c0
            m.times.append(time.perf_counter() - t0)
            m.cpu.append(cpu_this_round[k])
        for k, m in enumerate(members[1:], start=1):
            m.ratios.append(cpu_this_round[k] / cpu_this_round[0])
        rounds += 1


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure every variant of ``spec`` (see the module docstring); returns results by label."""
    import onnx

    feeds = dict(np.load(spec["feeds"], allow_pickle=False))
    variants: list[dict[str, Any]] = spec["variants"]
    results: dict[str, dict[str, Any]] = {v["label"]: {} for v in variants}
    for v in variants:
        try:
            onnx.checker.check_model(v["path"])
            results[v["label"]]["checker"] = None
        except Exception as exc:  # noqa: BLE001 - any checker complaint is a finding, not a crash
            results[v["label"]]["checker"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    original = variants[0]
    ref_sess, _ = _session(original["path"], "ORT_DISABLE_ALL")
    ref = _run(ref_sess, _feeds_for(ref_sess, feeds))
    del ref_sess

    entries: list[_Entry] = []
    for v in variants:
        for level in _LEVELS:
            if v is original and level == "ORT_ENABLE_ALL":
                continue
            entries.append(_Entry(v["label"], v["path"], level, v["nbytes"]))
    anchor = _Entry(original["label"], original["path"], "ORT_ENABLE_ALL", original["nbytes"])
    # A second session of the original at ORT_ENABLE_ALL: its ratio to the anchor (an A/A
    # test) shows how much of a ratio is noise.
    control = _Entry("control", original["path"], "ORT_ENABLE_ALL", original["nbytes"])
    groups = _groups(entries, anchor.nbytes, spec["mem_budget_bytes"], spec["session_bytes_factor"])
    for gi, group in enumerate(groups):
        anchor.session, dt = _session(anchor.path, anchor.level)
        anchor.create_s.append(dt)
        live = []
        if gi == 0:
            control.session, _ = _session(control.path, control.level)
            live.append(control)
        for entry in group:
            res = results[entry.label]
            key = "ALL" if entry.level == "ORT_ENABLE_ALL" else "DISABLE"
            try:
                for _ in range(spec["create_repeat"] if entry.nbytes < 50e6 else 1):
                    entry.session = None
                    entry.session, dt = _session(entry.path, entry.level)
                    entry.create_s.append(dt)
                out = _run(entry.session, _feeds_for(entry.session, feeds))
            except Exception as exc:  # noqa: BLE001 - a variant that fails to load or run is a result
                res[f"error_{key}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                entry.session = None
                continue
            res[f"create_{key}_s"] = statistics.median(entry.create_s)
            cmp = _compare(ref, out)
            if key == "DISABLE":
                res.update(cmp)
            else:
                res["max_abs_at_ALL"] = cmp["max_abs"]
            live.append(entry)
        anchor_wall_before = len(anchor.times)
        _time_group(anchor, live, feeds, spec)
        anchor_wall = statistics.median(anchor.times[anchor_wall_before:])
        for entry in live:
            if entry is control:
                continue
            key = "ALL" if entry.level == "ORT_ENABLE_ALL" else "DISABLE"
            res = results[entry.label]
            res[f"lat_{key}_s"] = statistics.median(entry.cpu)
            res[f"ratio_{key}"] = statistics.median(entry.ratios)
            res[f"wall_{key}_s"] = statistics.median(entry.times)
            res[f"wall_ratio_{key}"] = statistics.median(entry.times) / anchor_wall
            res[f"rounds_{key}"] = len(entry.times)
            entry.session = None
        anchor.session = None
        control.session = None
        gc.collect()
    for _ in range((spec["create_repeat"] if anchor.nbytes < 50e6 else 1) - len(anchor.create_s)):
        anchor.session, dt = _session(anchor.path, anchor.level)
        anchor.create_s.append(dt)
        anchor.session = None
    orig = results[original["label"]]
    orig.update({"max_abs": 0.0, "max_rel": 0.0, "numbers_note": None,
                 "create_ALL_s": statistics.median(anchor.create_s),
                 "lat_ALL_s": statistics.median(anchor.cpu), "ratio_ALL": 1.0,
                 "wall_ALL_s": statistics.median(anchor.times), "wall_ratio_ALL": 1.0,
                 "rounds_ALL": len(anchor.times),
                 "aa_ratio": statistics.median(control.ratios) if control.ratios else None})
    return {"results": results, "groups": [[f"{e.label}@{e.level}" for e in g] for g in groups]}


def _main() -> None:
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    payload = measure(spec)
    with open(out_path, "w") as f:
        json.dump(payload, f, indent=1)


if __name__ == "__main__":
    _main()
