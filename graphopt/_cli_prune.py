"""``graphopt prune``: structured pruning of channels, neurons and attention heads."""

from __future__ import annotations

import os

import click
from rich.markup import escape
from rich.table import Table

from graphopt.cli import _common, _console, _guard
from graphopt.errors import GraphoptError

__all__ = ["prune"]


@click.command("prune")
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the pruned model.")
@click.option("--ratio", type=float, default=None,
              help="Fraction of the channels of every prunable group to remove, e.g. 0.5.")
@click.option("--target-macs", type=float, default=None, metavar="F",
              help="Instead of --ratio: keep at most F x the original MACs (0 < F <= 1).")
@click.option("--heads", type=float, default=None, metavar="R",
              help="Fraction of attention heads to remove (default: the channel ratio).")
@click.option("--criterion", type=click.Choice(["l1", "l2", "bn-gamma"]), default="l1",
              show_default=True, help="Importance of a channel, summed over its group.")
@click.option("--round-to", type=int, default=1, show_default=True, metavar="N",
              help="Keep a multiple of N channels per group.")
@click.option("--exclude", metavar="REGEX", default=None,
              help="Leave whole the groups touching a layer or weight whose name matches.")
@click.option("--calibration", metavar="DATA", default=None,
              help="Calibration data: a folder of .npz/.npy, one .npz, or module:function.")
@click.option("--reconstruct", is_flag=True,
              help="Refit the layer after each pruned group by least squares on the calibration data.")
@click.option("--recalibrate-bn", is_flag=True,
              help="Re-estimate BatchNormalization statistics on the calibration data.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Use at most this many calibration samples.")
@click.option("--unstructured", type=float, default=None, metavar="R",
              help="Also zero the smallest R of each weight, stored sparse (smaller file, NOT faster).")
@click.option("--bench", is_flag=True, help="Measure latency before and after (ORT_ENABLE_ALL, 1 thread).")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed runs per model with --bench.")
@click.option("--dim", "dim_specs", multiple=True, metavar="NAME=SIZE",
              help="Size of a symbolic input dim for MACs and --bench (repeatable; others are 1).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the report as JSON (schema graphopt.prune/1).")
@click.option("--show-groups", is_flag=True, help="List every channel group, not only the blocked ones.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@_common
@_guard
def prune(input_path: str, output: str, ratio: float | None, target_macs: float | None,
          heads: float | None, criterion: str, round_to: int, exclude: str | None,
          calibration: str | None, reconstruct: bool, recalibrate_bn: bool, samples: int | None,
          unstructured: float | None, bench: bool, runs: int, dim_specs: tuple[str, ...],
          json_path: str | None, show_groups: bool, quiet: bool, debug: bool, verbose: bool) -> None:
    """Remove channels, neurons and attention heads of the ONNX model IN; write OUTPUT.

    Examples: graphopt prune m.onnx -o m.pruned.onnx --ratio 0.5 --bench;
    graphopt prune bert.onnx -o b.onnx --ratio 0.25 --heads 0.25;
    graphopt prune m.onnx -o p.onnx --ratio 0.25 --calibration calib.npz --reconstruct
    """
    from graphopt._prune import prune as run_prune
    from graphopt._report import check_report_path, write_report
    from graphopt.cli import _same_file
    from graphopt.runtime import parse_dims

    if not os.path.exists(input_path):
        raise GraphoptError(f"model file '{input_path}' does not exist")
    if _same_file(input_path, output) or os.path.abspath(input_path) == os.path.abspath(output):
        raise GraphoptError("the output path is the input file; graphopt never overwrites its input "
                            "(choose another -o)")
    check_report_path(output, "output model")
    if json_path:
        check_report_path(json_path, "JSON report")
    if ratio is not None and target_macs is not None:
        raise GraphoptError("give --ratio or --target-macs, not both")
    if ratio is None and target_macs is None and unstructured is None and heads is None:
        raise GraphoptError("say how much to prune: --ratio R, --target-macs F, --heads R or --unstructured R")
    dims = parse_dims(dim_specs)
    result = run_prune(input_path, ratio=ratio or 0.0, target_macs=target_macs, heads=heads,
                       criterion=criterion, round_to=round_to, exclude=exclude, calibration=calibration,
                       reconstruct=reconstruct, recalibrate_bn=recalibrate_bn, samples=samples,
                       unstructured=unstructured, bench=bench, bench_runs=runs, dims=dims,
                       output=output)
    report = result.report
    if json_path:
        write_report(json_path, {"command": "prune", "input": input_path, "output": output,
                                 **report.to_dict()})
    if not quiet:
        _print_report(input_path, output, report, show_groups)


def _fmt(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _print_report(input_path: str, output: str, report, show_groups: bool) -> None:
    console = _console()
    data = report.to_dict()
    summary = data["summary"]
    console.print(f"graphopt prune: {escape(input_path)} -> {escape(output)}: {summary['groups']} channel "
                  f"group(s), {summary['prunable']} prunable, {summary['blocked']} blocked; "
                  f"{summary['units_removed']} unit(s) removed in {summary['pruned']} group(s)"
                  + (f" (ratio {report.ratio:.3f})" if report.ratio else ""))
    groups = [g for g in data["groups"] if show_groups or g["blocked"] or g.get("skipped")]
    if groups:
        table = Table(title="channel groups", title_justify="left")
        for col, justify in (("id", "right"), ("kind", "left"), ("units", "right"), ("removed", "right"),
                             ("tensors", "left"), ("status", "left")):
            table.add_column(col, justify=justify)
        for g in groups:
            slots = ", ".join(f"{s['tensor']}[{s['axis']}]" for s in g["slots"][:3])
            if len(g["slots"]) > 3:
                slots += f" +{len(g['slots']) - 3}"
            status = ("blocked: " + "; ".join(g["blocked"]) if g["blocked"]
                      else g.get("skipped") or "pruned")
            table.add_row(str(g["id"]), g["kind"], str(g["units"]), str(g["removed"]), escape(slots),
                          escape(status))
        console.print(table)
    if report.layers:
        table = Table(title="layers", title_justify="left")
        for col, justify in (("layer", "left"), ("op", "left"), ("weight before", "right"),
                             ("weight after", "right")):
            table.add_column(col, justify=justify)
        for layer in report.layers:
            table.add_row(escape(layer["layer"]), layer["op"], "x".join(map(str, layer["before"])),
                          "x".join(map(str, layer["after"])))
        console.print(table)
    table = Table(title="totals", title_justify="left")
    for col, justify in (("", "left"), ("before", "right"), ("after", "right"), ("ratio", "right")):
        table.add_column(col, justify=justify)
    table.add_row("parameters", _fmt(report.params_before), _fmt(report.params_after),
                  f"{report.params_before / max(report.params_after, 1):.2f}x")
    if report.unstructured:
        table.add_row("non-zero parameters", _fmt(report.params_before), _fmt(report.nonzero_params_after),
                      f"{report.params_before / max(report.nonzero_params_after, 1):.2f}x")
    table.add_row("MACs", _fmt(report.macs_before), _fmt(report.macs_after), f"{report.mac_reduction:.2f}x")
    if report.latency_ms_before is not None:
        table.add_row("latency p50 (ms)", f"{report.latency_ms_before:.3f}", f"{report.latency_ms_after:.3f}",
                      f"{report.speedup:.2f}x")
    console.print(table)
    for refit in report.refits:
        console.print(escape(f"reconstruction: {refit['layer']}: relative error "
                             f"{refit['error_before']:.4f} -> {refit['error_after']:.4f}"))
    if report.batch_norms_recalibrated:
        console.print(f"BatchNormalization statistics re-estimated: {report.batch_norms_recalibrated} node(s)")
    for note in report.notes:
        console.print(f"[yellow]note[/]: {escape(note)}")
