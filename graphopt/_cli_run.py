"""``graphopt run``: run a partitioned model folder (written by ``graphopt partition``) on given inputs."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import click
import numpy as np
from rich.markup import escape
from rich.table import Table

from graphopt.cli import _common, _console, _guard
from graphopt.errors import GraphoptError

__all__ = ["run"]

EXIT_MISMATCH = 1


@click.command("run")
@click.argument("outdir", metavar="OUTDIR", type=click.Path())
@click.option("--inputs", "inputs_path", required=True, type=click.Path(dir_okay=False),
              metavar="FILE.npz", help="Inputs keyed by input name (numpy.savez).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one onnxruntime session and thread per partition; ray: one Ray actor "
              "per partition (pip install \"graphopt[ray]\").")
@click.option("--output", "output_path", type=click.Path(dir_okay=False), metavar="FILE.npz",
              help="Write the outputs, keyed by output name.")
@click.option("--micro-batches", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Split the inputs along axis 0 and pipeline the pieces through the stages.")
@click.option("--compare", "original", type=click.Path(dir_okay=False), metavar="ORIGINAL.onnx",
              help="Also run the unsplit model and compare every output (exit 1 on a mismatch).")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="With --compare: |run - original| <= atol + rtol * |original|.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="With --compare: absolute tolerance.")
@click.option("--device", "device_specs", multiple=True, metavar="PARTITION=DEVICE",
              help="Run a partition on another device than the manifest says (cpu, cuda:K; repeatable).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Intra-op threads of each partition's onnxruntime session.")
@click.option("--level", type=click.Choice(["disable", "all"]), default="disable", show_default=True,
              help="onnxruntime graph optimizations in every session (off: bit-exact with the "
              "unsplit model run the same way).")
@click.option("--ray-address", metavar="ADDRESS",
              help="Ray cluster to join (default: start a local one for this run).")
@click.option("--ray-compiled", is_flag=True,
              help="With --backend ray: bind the actors into a Ray compiled graph (channels "
              "between actors instead of chained calls).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing unless --compare finds a mismatch.")
@_common
@_guard
def run(outdir: str, inputs_path: str, backend: str, output_path: str | None, micro_batches: int,
        original: str | None, rtol: float, atol: float, device_specs: tuple[str, ...], threads: int,
        level: str, ray_address: str | None, ray_compiled: bool, quiet: bool, debug: bool,
        verbose: bool) -> None:
    """Run the partitioned model in OUTDIR on the inputs in FILE.npz and summarize its outputs.

    Exit code 0 on success, 1 when --compare finds an output outside tolerance, 2 on bad input.
    """
    from graphopt._report import check_report_path
    from graphopt.runtime import Manifest, PartitionedSession, load_feeds

    manifest = Manifest.load(outdir)
    if output_path:
        check_report_path(output_path, "outputs file")
        if os.path.abspath(output_path) == os.path.abspath(inputs_path):
            raise GraphoptError("--output is the inputs file; choose another path")
    feeds = load_feeds(inputs_path)
    devices = _parse_devices(device_specs)
    reference_session = _open_original(original, level) if original else None
    with PartitionedSession(manifest, backend=backend, devices=devices, threads=threads, level=level,
                            micro_batches=micro_batches, ray_address=ray_address,
                            ray_compiled=ray_compiled) as session:
        start = time.perf_counter()
        outputs = session.run(feeds)
        seconds = time.perf_counter() - start
    if output_path:
        _save_npz_atomic(output_path, outputs)
    comparison, exact = None, {}
    if reference_session is not None:
        comparison, exact = _compare(reference_session, original or "", feeds, outputs, rtol, atol)
    if not quiet or (comparison is not None and not comparison.ok):
        _print_summary(outdir, backend, manifest, outputs, seconds, micro_batches, comparison,
                       exact, output_path, rtol, atol)
    if comparison is not None and not comparison.ok:
        raise SystemExit(EXIT_MISMATCH)


def _parse_devices(specs: tuple[str, ...]) -> dict[str, str]:
    devices: dict[str, str] = {}
    for spec in specs:
        name, sep, device = spec.partition("=")
        if not sep or not name.strip() or not device.strip():
            raise GraphoptError(f"--device '{spec}' is not PARTITION=DEVICE (for example "
                                "--device stage1=cuda:0)")
        devices[name.strip()] = device.strip()
    return devices


def _open_original(path: str, level: str) -> Any:
    from graphopt.runtime import open_session

    return open_session(path, level=level, label=f"the original model '{path}'")


def _compare(session: Any, path: str, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
             rtol: float, atol: float) -> tuple[Any, dict[str, bool]]:
    from graphopt.runtime import check_feeds, compare_outputs
    from graphopt.runtime._inputs import ort_error_text

    names = [o.name for o in session.get_outputs()]
    missing = [name for name in names if name not in outputs]
    if missing:
        raise GraphoptError(f"the partitioned model has no output '{missing[0]}' of the original "
                            f"'{path}'; compare with the model that was partitioned")
    checked = check_feeds(session, feeds, source=f"the inputs for '{path}'")
    try:
        expected = dict(zip(names, session.run(names, checked)))
    except Exception as exc:  # onnxruntime's own exception types
        raise GraphoptError(f"onnxruntime cannot run the original model '{path}': "
                            f"{ort_error_text(exc)}") from None
    comparison = compare_outputs(expected, outputs, rtol=rtol, atol=atol, names=names)
    exact = {name: _bit_exact(expected[name], outputs[name]) for name in names}
    return comparison, exact


def _bit_exact(expected: Any, actual: Any) -> bool:
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.dtype != actual.dtype or expected.shape != actual.shape:
        return False
    return bool(np.array_equal(expected, actual, equal_nan=expected.dtype.kind in "fc"))


def _save_npz_atomic(path: str, outputs: Mapping[str, np.ndarray]) -> None:
    """Write the outputs through a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{name: np.asarray(value) for name, value in outputs.items()})
        os.replace(tmp, path)
    except OSError as exc:
        raise GraphoptError(f"cannot write outputs file '{path}': {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _print_summary(outdir: str, backend: str, manifest: Any, outputs: Mapping[str, np.ndarray],
                   seconds: float, micro_batches: int, comparison: Any, exact: Mapping[str, bool],
                   output_path: str | None, rtol: float, atol: float) -> None:
    console = _console()
    batches = f", {micro_batches} micro-batches" if micro_batches > 1 else ""
    table = Table(title=f"graphopt run: {escape(outdir)} ({len(manifest.partitions)} partitions, "
                  f"{backend} backend{batches}, {seconds * 1e3:.2f} ms)", title_justify="left")
    columns = ["output", "dtype", "shape", "min", "max", "mean"]
    if comparison is not None:
        columns += ["max abs diff", "result"]
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < 3 or column == "result" else "right")
    diffs = {o.name: o for o in comparison.outputs} if comparison is not None else {}
    for name, value in outputs.items():
        array = np.asarray(value)
        numeric = array.dtype.kind in "biuf" and array.size > 0
        cells = [escape(name), str(array.dtype), str(list(array.shape)),
                 *((f"{array.min():.6g}", f"{array.max():.6g}", f"{array.astype(np.float64).mean():.6g}")
                   if numeric else ("-", "-", "-"))]
        if comparison is not None:
            diff = diffs.get(name)
            if diff is None:
                cells += ["-", "not in original"]
            else:
                verdict = ("[green]bit-exact[/]" if exact.get(name) else
                           "[green]within tolerance[/]" if diff.ok else "[red]FAIL[/]")
                cells += [f"{diff.max_abs:.3g}", verdict]
        table.add_row(*cells)
    console.print(table)
    if output_path:
        console.print(f"outputs written to {escape(output_path)}")
    if comparison is None:
        return
    if comparison.ok:
        console.print(f"[green]PASS[/]: every output matches the original (rtol={rtol:g}, atol={atol:g})")
    else:
        console.print(f"[red]FAIL[/]: {escape(comparison.summary())}")
