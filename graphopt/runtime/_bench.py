"""Benchmark models in onnxruntime: latency, throughput, session creation, memory, energy.

How each figure is taken, so that a comparison between models is honest:

- **Latency** is the wall time of one ``session.run`` (``time.perf_counter``), inputs already in
  host memory; with the CUDA provider it includes the copies to and from the device. Models are
  timed *interleaved*: each round runs every model once, the order rotating from round to round,
  so drifting clock speeds, noisy neighbours and thermal throttling hit all models alike instead
  of whichever happened to run last. Warm-up runs (not timed) come first, also interleaved.
- **Throughput** is sequential single-stream throughput: timed runs divided by the time they
  took (one request at a time, batch size as given by the inputs).
- **Session creation** is the time ``InferenceSession`` takes to load and prepare the model:
  the fastest of up to three creations, interleaved across models, after a small session has
  warmed up onnxruntime itself (models that take over a second are created once).
- **Peak memory** is measured in a fresh child process per model, so one model's allocations
  never count towards another's: the child imports onnxruntime, records its resident set size
  (RSS), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), creates the session and
  runs it a few times, then reads the peak (``VmHWM`` in ``/proc/self/status``). The figure is
  the peak minus the RSS before the session existed: what creating and running the model
  costs, weights and arena included. Where ``/proc`` is missing the child uses
  ``resource.getrusage`` (peak since the child started, less exact); where neither exists the
  figure is left out. The method used is recorded with the figure.
- **Energy** (optional, with codecarbon) runs each model alone for a fixed time under a
  codecarbon tracker and divides by the number of inferences; the result says whether the CPU
  and GPU power were measured (RAPL, NVML, powermetrics) or estimated from the processor's
  thermal design power (TDP) and its load.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.runtime._inputs import (
    DEFAULT_DIM,
    _check_dim_names,
    check_feeds,
    check_provider,
    generate_feeds,
    open_session,
    ort_error_text,
)

__all__ = ["ENERGY_EXTRA", "BenchResult", "EnergyResult", "bench_models", "model_size_on_disk"]

logger = logging.getLogger(__name__)

#: The optional dependency group that brings codecarbon.
ENERGY_EXTRA = "energy"

_SESSION_REPEATS = 3
_SESSION_REPEAT_LIMIT = 1.0  # seconds

#: Called as ``progress(description, done, total)``.
ProgressFn = Callable[[str, int, int], None]

# How codecarbon names the ways it obtains CPU power: read from hardware counters, or modelled.
_MEASURED_CPU_MODES = {"intel_rapl": "RAPL", "intel_power_gadget": "Intel Power Gadget",
                       "apple_powermetrics": "powermetrics", "windows_emi": "Windows EMI"}


@dataclass
class EnergyResult:
    """Energy and emissions of one model per 1000 inferences, as codecarbon reports them.

    Attributes:
        kwh_per_1000: energy in kWh per 1000 inferences.
        co2_kg_per_1000: emissions in kg CO2-equivalent per 1000 inferences.
        inferences: how many runs the tracked window held.
        seconds: how long the window lasted.
        measured: True only when every power figure that counts came from hardware counters.
        method: how each component's power was obtained, e.g. ``CPU: estimated from TDP x load``.
        country: the country whose grid carbon intensity was used (``None``: codecarbon's default).
    """

    kwh_per_1000: float
    co2_kg_per_1000: float
    inferences: int
    seconds: float
    measured: bool
    method: str
    country: str | None = None


@dataclass
class BenchResult:
    """The figures of one benchmarked model (times in seconds, sizes in bytes).

    Attributes:
        path: the model file.
        file_bytes: the model file plus the external data files it uses.
        session_seconds: time to create the onnxruntime session.
        latencies: every timed run, in order.
        peak_memory_bytes: peak RSS growth of creating and running the session (``None``: not measured).
        memory_method: how the peak was measured.
        energy: with ``energy=True``, the :class:`EnergyResult`.
    """

    path: str
    file_bytes: int
    session_seconds: float
    latencies: list[float]
    peak_memory_bytes: int | None = None
    memory_method: str = "not measured"
    energy: EnergyResult | None = None
    provider: str = "cpu"
    threads: int = 1
    level: str = "all"

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile of the latencies (linear interpolation), in seconds."""
        return float(np.percentile(np.asarray(self.latencies), q))

    @property
    def p50(self) -> float:
        """Median latency in seconds."""
        return self.percentile(50)

    @property
    def p90(self) -> float:
        """90th percentile latency in seconds."""
        return self.percentile(90)

    @property
    def p99(self) -> float:
        """99th percentile latency in seconds."""
        return self.percentile(99)

    @property
    def mean(self) -> float:
        """Mean latency in seconds."""
        return float(np.mean(self.latencies))

    @property
    def throughput(self) -> float:
        """Inferences per second, one request at a time."""
        total = float(np.sum(self.latencies))
        return len(self.latencies) / total if total > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (latencies in milliseconds)."""
        return {
            "path": self.path, "file_bytes": self.file_bytes,
            "session_ms": self.session_seconds * 1e3,
            "latency_ms": {"p50": self.p50 * 1e3, "p90": self.p90 * 1e3, "p99": self.p99 * 1e3,
                           "mean": self.mean * 1e3, "min": min(self.latencies) * 1e3,
                           "max": max(self.latencies) * 1e3},
            "runs": len(self.latencies),
            "throughput_per_s": self.throughput,
            "peak_memory_bytes": self.peak_memory_bytes, "memory_method": self.memory_method,
            "energy": asdict(self.energy) if self.energy is not None else None,
        }


def model_size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of a model file plus the external data files its tensors use (each file once).

    Raises:
        GraphoptError: the model or one of its external data files cannot be read.
    """
    from graphopt import ir

    path = os.fspath(path)
    model = ir.load(path)
    files: set[str] = set()
    for g in model.all_graphs():
        for v in g.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                files.add(v.const_value.path)
    return os.path.getsize(path) + sum(os.path.getsize(f) for f in files)


def bench_models(paths: Sequence[str | os.PathLike], *, threads: int = 1, provider: str = "cpu",
                 level: str = "all", warmup: int = 10, runs: int = 100,
                 dims: Mapping[str, int] | None = None, feeds: Mapping[str, Any] | None = None,
                 seed: int = 0, memory: bool = True, energy: bool = False,
                 energy_seconds: float = 10.0, energy_country: str | None = None,
                 progress: ProgressFn | None = None) -> list[BenchResult]:
    """Benchmark one or more models, timing their runs interleaved in this process.

    Args:
        paths: model files (external data is read from next to each).
        threads: onnxruntime intra-op threads.
        provider: ``"cpu"`` or ``"cuda"``.
        level: onnxruntime graph optimizations, ``"all"`` (as in production) or ``"disable"``.
        warmup: untimed runs per model before timing.
        runs: timed runs per model.
        dims: sizes of symbolic input dims by name (others are 1).
        feeds: inputs by name, used for every model (default: generated per model, same seed).
        seed: seed of generated inputs.
        memory: measure peak memory in a child process per model.
        energy: estimate energy and CO2 per 1000 inferences with codecarbon.
        energy_seconds: how long each model runs under the energy tracker.
        energy_country: ISO 3166 alpha-3 code of the grid (default: codecarbon's own default).
        progress: called as ``progress(description, done, total)``.

    Returns:
        One :class:`BenchResult` per path, in order.

    Raises:
        GraphoptError: a missing or unloadable model, an unavailable provider, bad inputs, or
            ``energy`` without codecarbon installed.

    Example:
        >>> a, b = bench_models(["model.onnx", "model.opt.onnx"], runs=200)  # doctest: +SKIP
        >>> f"{b.p50 / a.p50:.2f}x"  # doctest: +SKIP
        '0.81x'
    """
    if not paths:
        raise GraphoptError("no model to benchmark")
    if warmup < 0 or runs < 1:
        raise GraphoptError(f"need runs >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    if threads < 1:
        raise GraphoptError(f"threads must be at least 1 (got {threads})")
    check_provider(provider)
    tracker_cls = _codecarbon_tracker() if energy else None
    if tracker_cls is not None and energy_country:
        energy_country = _checked_country(energy_country)
    paths = [os.fspath(p) for p in paths]
    for path in paths:
        if not os.path.isfile(path):
            raise GraphoptError(f"model file '{path}' does not exist"
                                if not os.path.exists(path) else f"'{path}' is not a model file")
    sizes = [model_size_on_disk(p) for p in paths]
    _warm_runtime(provider)
    sessions, created = _create_sessions(paths, provider, level, threads)
    dims = dict(dims or {})
    if dims:
        _check_dim_names(sessions, dims)
    feed_sets = [check_feeds(s, feeds, source=f"inputs for '{p}'") if feeds is not None else
                 generate_feeds(s, seed=seed, dims=dims, default_dim=DEFAULT_DIM, check_dims=False)
                 for s, p in zip(sessions, paths)]
    latencies = _interleaved(sessions, paths, feed_sets, warmup, runs, progress)
    results = [BenchResult(path=p, file_bytes=size, session_seconds=t, latencies=lat,
                           provider=provider, threads=threads, level=level)
               for p, size, t, lat in zip(paths, sizes, created, latencies)]
    if memory:
        for i, (result, feed) in enumerate(zip(results, feed_sets)):
            if progress is not None:
                progress("measuring memory", i, len(results))
            result.peak_memory_bytes, result.memory_method = _measure_memory(
                result.path, feed, provider=provider, level=level, threads=threads,
                warmup=min(warmup, 3))
        if progress is not None:
            progress("measuring memory", len(results), len(results))
    if tracker_cls is not None:
        for i, (result, session, feed) in enumerate(zip(results, sessions, feed_sets)):
            if progress is not None:
                progress("measuring energy", i, len(results))
            result.energy = _measure_energy(tracker_cls, session, feed, energy_seconds, energy_country)
        if progress is not None:
            progress("measuring energy", len(results), len(results))
    for r in results:
        logger.info("bench %s: p50 %.3f ms, %.1f inferences/s", r.path, r.p50 * 1e3, r.throughput)
    return results


def _warm_runtime(provider: str) -> None:
    """Create and run a tiny session so the first model does not pay onnxruntime's start-up."""
    import onnx

    h = onnx.helper
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "warm",
                     [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=7)
    session = open_session(model.SerializeToString(), provider=provider, label="a warm-up model")
    session.run(None, {"x": np.zeros(1, np.float32)})


def _create_sessions(paths: list[str], provider: str, level: str, threads: int
                     ) -> tuple[list[Any], list[float]]:
    """Sessions for every model and the fastest of up to three interleaved creations of each.

    The first sessions of a process pay for one-time set-up (kernel registries, thread pools);
    repeating creation round-robin and keeping the minimum keeps that off any one model. A
    model whose creation takes over a second is not created again: the noise is small then.
    """
    sessions: list[Any] = [None] * len(paths)
    best = [float("inf")] * len(paths)
    for _ in range(_SESSION_REPEATS):
        for i, path in enumerate(paths):
            if best[i] > _SESSION_REPEAT_LIMIT and sessions[i] is not None:
                continue
            sessions[i] = None  # free the previous copy before building the next
            t0 = time.perf_counter()
            sessions[i] = open_session(path, provider=provider, level=level, threads=threads)
            best[i] = min(best[i], time.perf_counter() - t0)
    return sessions, best


def _run_once(session: Any, feed: Mapping[str, np.ndarray], path: str) -> None:
    try:
        session.run(None, feed)
    except Exception as exc:  # onnxruntime raises its own types for run-time failures
        raise GraphoptError(f"onnxruntime failed to run '{path}': {ort_error_text(exc)}") from None


def _interleaved(sessions: list[Any], paths: list[str], feed_sets: list[dict[str, np.ndarray]],
                 warmup: int, runs: int, progress: ProgressFn | None) -> list[list[float]]:
    n = len(sessions)
    for r in range(warmup):
        for k in range(n):
            i = (r + k) % n
            _run_once(sessions[i], feed_sets[i], paths[i])
    latencies: list[list[float]] = [[] for _ in sessions]
    clock = time.perf_counter
    for r in range(runs):
        for k in range(n):
            i = (r + k) % n  # rotate the order so no model always runs right after the same one
            session, feed = sessions[i], feed_sets[i]
            t0 = clock()
            try:
                session.run(None, feed)
            except Exception as exc:  # onnxruntime raises its own types for run-time failures
                raise GraphoptError(f"onnxruntime failed to run '{paths[i]}': "
                                    f"{ort_error_text(exc)}") from None
            latencies[i].append(clock() - t0)
        if progress is not None and (r + 1 == runs or r % 10 == 0):
            progress("timing", r + 1, runs)
    return latencies


# -- memory ------------------------------------------------------------------------------------------

def _measure_memory(path: str, feed: Mapping[str, np.ndarray], *, provider: str, level: str,
                    threads: int, warmup: int) -> tuple[int | None, str]:
    """Peak RSS growth of creating and running the model, in a fresh child process."""
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        feeds_path = os.path.join(tmp, "feeds.npz")
        np.savez(feeds_path, **feed)
        job = {"path": os.path.abspath(path), "feeds": feeds_path, "provider": provider,
               "level": level, "threads": threads, "runs": warmup + 2}
        code = "from graphopt.runtime._bench import _memory_child; _memory_child()"
        try:
            proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), text=True,
                                  capture_output=True, timeout=3600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            logger.warning("memory measurement of '%s' failed: %s", path, exc)
            return None, f"not measured ({exc})"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        logger.warning("memory measurement of '%s' failed: %s", path, tail)
        return None, f"not measured (child process failed: {tail})"
    answer = json.loads(lines[-1])
    return answer["peak_bytes"], answer["method"]


def _read_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _memory_child() -> None:
    """Body of the memory-measuring child: reads a job as JSON on stdin, answers on stdout."""
    job = json.loads(sys.stdin.read())
    import onnxruntime  # noqa: F401  (its import cost is not the model's)

    feed = dict(np.load(job["feeds"], allow_pickle=False))
    before = _read_status_kb("VmRSS")
    method = "peak RSS growth (/proc VmHWM after clear_refs)"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        method = "peak RSS since child start (/proc VmHWM; peak reset not allowed)"
    rusage_before = None
    if before is None:
        try:
            import resource

            rusage_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            method = "peak RSS growth (getrusage ru_maxrss)"
        except ImportError:
            method = "not measured (no /proc and no resource module on this platform)"
    session = open_session(job["path"], provider=job["provider"], level=job["level"],
                           threads=job["threads"])
    for _ in range(job["runs"]):
        session.run(None, feed)
    peak: int | None = None
    if before is not None:
        hwm = _read_status_kb("VmHWM")
        peak = max(0, hwm - before) if hwm is not None else None
    elif rusage_before is not None:
        import resource

        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        peak = max(0, after - rusage_before) * scale
    print(json.dumps({"peak_bytes": peak, "method": method}))


# -- energy ------------------------------------------------------------------------------------------

def _codecarbon_tracker() -> Any:
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError:
        raise GraphoptError(f'--energy needs codecarbon, which is not installed; install it with: '
                            f'pip install "graphopt[{ENERGY_EXTRA}]"') from None
    return OfflineEmissionsTracker


def _checked_country(country: str) -> str:
    """The country code upper-cased, refused when codecarbon has no grid data for it.

    codecarbon silently falls back to a world average for codes it does not know, which would
    make the CO2 figure claim a country it does not describe.
    """
    code = country.strip().upper()
    try:
        from codecarbon.input import DataSource

        known = DataSource().get_global_energy_mix_data()
    except Exception:  # an older or newer codecarbon without this table: let it decide
        return code
    if code not in known:
        raise GraphoptError(f"--energy-country '{country}': codecarbon has no grid data for it; "
                            "give an ISO 3166 alpha-3 code such as USA, FRA or DEU")
    return code


def _power_sources(tracker: Any) -> tuple[bool, str]:
    """Whether codecarbon measured the power it used, and how, from the hardware it tracked."""
    parts: list[str] = []
    measured = True
    for hw in getattr(tracker, "_hardware", []):
        kind = type(hw).__name__
        if kind == "CPU":
            mode = getattr(hw, "_mode", "unknown")
            if mode in _MEASURED_CPU_MODES:
                parts.append(f"CPU: measured ({_MEASURED_CPU_MODES[mode]})")
            else:
                measured = False
                parts.append("CPU: estimated from TDP x CPU load (no power counters readable)")
        elif kind == "GPU":
            parts.append("GPU: measured (NVML)")
        elif kind == "AppleSiliconChip":
            parts.append(f"{getattr(hw, 'chip_part', 'chip')}: measured (powermetrics)")
        elif kind == "RAM":
            parts.append("RAM: estimated from memory size")
        else:
            measured = False
            parts.append(f"{kind}: unknown method")
    if not parts:
        return False, "unknown (codecarbon did not say which hardware it tracked)"
    return measured, "; ".join(parts)


def _measure_energy(tracker_cls: Any, session: Any, feed: Mapping[str, np.ndarray], seconds: float,
                    country: str | None) -> EnergyResult:
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    options: dict[str, Any] = {"measure_power_secs": 1, "save_to_file": False, "log_level": "error",
                               "tracking_mode": "process", "allow_multiple_runs": True}
    if country:
        options["country_iso_code"] = country
    try:
        tracker = tracker_cls(**options)
    except Exception as exc:  # codecarbon validates its own options (e.g. the country code)
        raise GraphoptError(f"codecarbon refused its settings: {exc}") from None
    tracker.start()
    count = 0
    t0 = time.perf_counter()
    try:
        while True:
            session.run(None, feed)
            count += 1
            if time.perf_counter() - t0 >= seconds:
                break
    finally:
        emissions = tracker.stop()
    elapsed = time.perf_counter() - t0
    data = getattr(tracker, "final_emissions_data", None)
    kwh = float(getattr(data, "energy_consumed", 0.0) or 0.0)
    co2 = float(emissions or 0.0)
    measured, method = _power_sources(tracker)
    return EnergyResult(kwh_per_1000=kwh / count * 1000, co2_kg_per_1000=co2 / count * 1000,
                        inferences=count, seconds=elapsed, measured=measured, method=method,
                        country=country)
