"""``graphopt bench``: latency, throughput, memory and size of models, side by side."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Any, Callable, Iterator

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from graphopt.cli import _common, _console, _guard, _human_bytes

__all__ = ["bench", "counting_progress", "format_number"]


def format_number(x: float) -> str:
    """A compact number for tables: ``0``, ``3.1e-07``, ``0.0123``, ``12.3``, ``inf``."""
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e6:
        return f"{x:.2e}"
    return f"{x:.4g}"


@contextlib.contextmanager
def counting_progress(quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A ``progress(description, done, total)`` callback drawing a bar on stderr, or ``None``.

    The bar is drawn only when neither ``--quiet`` is given nor stdout or stderr is redirected,
    so tables piped to a file and CI logs stay clean.
    """
    console = Console(stderr=True)
    if quiet or not console.is_terminal or not sys.stdout.isatty():
        yield None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=True)
    tasks: dict[str, Any] = {}

    def update(description: str, done: int, total: int) -> None:
        if description not in tasks:
            tasks[description] = bar.add_task(description, total=total)
        bar.update(tasks[description], completed=done, total=total)

    with bar:
        yield update


@click.command("bench")
@click.argument("models", metavar="MODEL [MODEL ...]", nargs=-1, required=True,
                type=click.Path(dir_okay=False))
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider.")
@click.option("--level", type=click.Choice(["all", "disable"]), default="all", show_default=True,
              help="onnxruntime graph optimizations.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed runs per model first.")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True,
              help="Timed runs per model (interleaved across models).")
@click.option("--dim", "dim_specs", multiple=True, metavar="NAME=SIZE",
              help="Size of a symbolic input dim (repeatable; others are 1).")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), metavar="FILE.npz",
              help="Inputs keyed by input name, for every model (default: generated, seeded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of generated inputs.")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure peak memory (a child process per model).")
@click.option("--energy", is_flag=True,
              help="Estimate energy and CO2 per 1000 inferences (needs codecarbon: "
              'pip install "graphopt[energy]").')
@click.option("--energy-seconds", type=click.FloatRange(min=1.0), default=10.0, show_default=True,
              help="How long each model runs under the energy tracker.")
@click.option("--energy-country", metavar="ISO3",
              help="Country of the power grid for CO2 (ISO 3166 alpha-3, e.g. FRA; default: codecarbon's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the results as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; with --json, no table either.")
@_common
@_guard
def bench(models: tuple[str, ...], threads: int, provider: str, level: str, warmup: int, runs: int,
          dim_specs: tuple[str, ...], inputs_file: str | None, seed: int, memory: bool, energy: bool,
          energy_seconds: float, energy_country: str | None, json_path: str | None, quiet: bool,
          debug: bool, verbose: bool) -> None:
    """Benchmark one or more models; several are timed interleaved and shown side by side.

    Ratios compare each model with the first one (below 1.00x: less time, memory or bytes).
    """
    import graphopt
    from graphopt._report import check_report_path, write_report
    from graphopt.runtime import bench_models, load_feeds, parse_dims

    if json_path:
        check_report_path(json_path, "JSON output")
    dims = parse_dims(dim_specs)
    feeds = load_feeds(inputs_file) if inputs_file else None
    with counting_progress(quiet) as progress:
        results = bench_models(list(models), threads=threads, provider=provider, level=level,
                               warmup=warmup, runs=runs, dims=dims, feeds=feeds, seed=seed,
                               memory=memory, energy=energy, energy_seconds=energy_seconds,
                               energy_country=energy_country, progress=progress)
    if json_path:
        first = results[0]
        entries = []
        for r in results:
            entry = r.to_dict()
            entry["ratios"] = {k: _ratio(v(r), v(first)) for k, v in _RATIO_FIGURES.items()}
            entries.append(entry)
        write_report(json_path, {
            "schema": "graphopt.bench/1", "command": "bench", "graphopt_version": graphopt.__version__,
            "settings": {"threads": threads, "provider": provider, "level": level, "warmup": warmup,
                         "runs": runs, "dims": dims, "inputs": inputs_file, "seed": seed,
                         "interleaved": True},
            "models": entries})
    if quiet and json_path:
        return
    console = _console()
    console.print(_table(results, provider, threads, level, runs))
    methods = sorted({r.memory_method for r in results})
    if memory:
        console.print("peak memory: " + "; ".join(methods) + ", one fresh process per model")
    if energy:
        for r in results:
            e = r.energy
            if e is None:
                continue
            kind = "MEASURED" if e.measured else "ESTIMATE"
            grid = e.country or ("codecarbon's default grid (world average unless configured; "
                                 "set --energy-country)")
            console.print(f"energy {escape(os.path.basename(r.path))}: {kind} — {escape(e.method)}; "
                          f"{e.inferences} inferences in {e.seconds:.1f} s; CO2 for {grid}")


_RATIO_FIGURES: dict[str, Callable[[Any], float | None]] = {
    "latency_p50": lambda r: r.p50, "latency_p90": lambda r: r.p90, "latency_p99": lambda r: r.p99,
    "latency_mean": lambda r: r.mean, "throughput": lambda r: r.throughput,
    "session": lambda r: r.session_seconds, "peak_memory": lambda r: r.peak_memory_bytes,
    "file_size": lambda r: r.file_bytes,
}


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds * 1e3:.0f} ms"


def _table(results: list, provider: str, threads: int, level: str, runs: int) -> Table:
    title = (f"graphopt bench: {provider}, {threads} thread{'s' if threads != 1 else ''}, onnxruntime "
             f"optimizations {'on' if level == 'all' else 'off'}, {runs} runs"
             + (" each, interleaved" if len(results) > 1 else ""))
    table = Table(title=title, title_justify="left")
    table.add_column("")
    names = [os.path.basename(r.path) for r in results]
    if len(set(names)) < len(names):
        names = [r.path for r in results]
    for i, name in enumerate(names):
        table.add_column(escape(name), justify="right")
        if i > 0:
            table.add_column(escape(f"vs {names[0]}"), justify="right")
    rows: list[tuple[str, Callable[[Any], float | None], Callable[[float], str]]] = [
        ("latency p50", lambda r: r.p50, _ms), ("latency p90", lambda r: r.p90, _ms),
        ("latency p99", lambda r: r.p99, _ms), ("latency mean", lambda r: r.mean, _ms),
        ("throughput", lambda r: r.throughput, lambda v: f"{v:,.1f}/s"),
        ("session creation", lambda r: r.session_seconds, _ms),
        ("peak memory", lambda r: r.peak_memory_bytes, _human_bytes),
        ("file size", lambda r: r.file_bytes, _human_bytes),
    ]
    if any(r.energy is not None for r in results):
        rows += [("energy / 1000 inf.", lambda r: r.energy.kwh_per_1000 * 1e3 if r.energy else None,
                  lambda v: f"{v:.4g} Wh"),
                 ("CO2 / 1000 inf.", lambda r: r.energy.co2_kg_per_1000 * 1e3 if r.energy else None,
                  lambda v: f"{v:.4g} g")]
    first = results[0]
    for label, get, fmt in rows:
        cells = [label]
        for i, r in enumerate(results):
            value = get(r)
            cells.append("n/a" if value is None else fmt(value))
            if i > 0:
                ratio = _ratio(value, get(first))
                cells.append("-" if ratio is None else f"{ratio:.2f}x")
        table.add_row(*cells)
    return table
