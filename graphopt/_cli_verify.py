"""``graphopt verify``: check that an optimized model computes what the original computes."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from graphopt._cli_bench import counting_progress, format_number
from graphopt.cli import _common, _console, _guard
from graphopt.errors import GraphoptError

__all__ = ["verify"]

EXIT_MISMATCH = 1


@click.command("verify")
@click.argument("original", metavar="ORIGINAL", type=click.Path(dir_okay=False))
@click.argument("optimized", metavar="OPTIMIZED", type=click.Path(dir_okay=False))
@click.option("--inputs", "inputs_files", multiple=True, type=click.Path(dir_okay=False),
              metavar="FILE.npz", help="Inputs keyed by input name; repeat for several samples "
              "(default: generated, seeded).")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of generated input sets.")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Relative tolerance: |opt - orig| <= atol + rtol * |orig|.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="Absolute tolerance.")
@click.option("--dim", "dim_specs", multiple=True, metavar="NAME=SIZE",
              help="Size of a symbolic input dim (repeatable; others are 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of generated inputs.")
@click.option("--per-layer", is_flag=True,
              help="Also compare the intermediates both models name alike; name the first "
              "node whose output diverges.")
@click.option("--level", type=click.Choice(["disable", "all"]), default="disable", show_default=True,
              help="onnxruntime graph optimizations for both models (off: differences come "
              "from graphopt's rewrites only).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the comparison as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print the table only on mismatch.")
@_common
@_guard
def verify(original: str, optimized: str, inputs_files: tuple[str, ...], samples: int, rtol: float,
           atol: float, dim_specs: tuple[str, ...], seed: int, per_layer: bool, level: str,
           json_path: str | None, quiet: bool, debug: bool, verbose: bool) -> None:
    """Run ORIGINAL and OPTIMIZED on the same inputs and compare every output.

    Exit code 0 when all outputs match within tolerance, 1 on a mismatch, 2 on bad input.
    """
    from graphopt._report import check_report_path, write_report
    from graphopt.runtime import load_feeds, parse_dims, verify_models

    if json_path:
        check_report_path(json_path, "JSON output")
    dims = parse_dims(dim_specs)
    feeds = [load_feeds(path) for path in inputs_files] or None
    if feeds is not None and samples != 1:
        raise GraphoptError("--samples counts generated input sets; with --inputs each file is "
                            "one sample (drop --samples or --inputs)")
    with counting_progress(quiet) as progress:
        report = verify_models(original, optimized, feeds=feeds, samples=samples, rtol=rtol,
                               atol=atol, dims=dims, seed=seed, per_layer=per_layer, level=level,
                               progress=progress)
    if json_path:
        write_report(json_path, {"schema": "graphopt.verify/1", "command": "verify",
                                 "original": original, "optimized": optimized, "dims": dims,
                                 "seed": seed, "inputs": list(inputs_files), **report.to_dict()})
    if not (quiet and report.ok):
        _print_report(original, optimized, report)
    if not report.ok:
        raise SystemExit(EXIT_MISMATCH)


def _print_report(original: str, optimized: str, report) -> None:
    console = _console()
    runtime_note = f"onnxruntime optimizations {'off' if report.level == 'disable' else 'on'}"
    table = Table(title=f"graphopt verify: {escape(original)} vs {escape(optimized)} ({report.samples} sample"
                  f"{'s' if report.samples != 1 else ''}, rtol={report.rtol:g}, atol={report.atol:g}, "
                  f"{runtime_note})", title_justify="left")
    for col, justify in (("output", "left"), ("max abs", "right"), ("max rel", "right"),
                         ("cosine", "right"), ("top-1", "right"), ("result", "left")):
        table.add_column(col, justify=justify)
    for o in report.outputs:
        table.add_row(escape(o.name), format_number(o.max_abs), format_number(o.max_rel),
                      f"{min(o.cosine, 1.0):.6f}", "-" if o.top1 is None else f"{o.top1 * 100:.1f}%",
                      "[green]pass[/]" if o.ok else "[red]FAIL[/]")
    console.print(table)
    failures = report.failures()
    if failures:
        console.print(f"[red]FAIL[/]: {len(failures)} of {len(report.outputs)} output(s) differ: "
                      + escape(", ".join(o.name for o in failures)))
        for o in failures:
            console.print(escape(f"  {o.name}: {o.reason}"))
    else:
        console.print(f"[green]PASS[/]: all {len(report.outputs)} output(s) match within tolerance")
    if report.layers is None:
        return
    skipped = f", {report.layers_skipped} skipped (type unknown)" if report.layers_skipped else ""
    console.print(f"per-layer: {len(report.layers)} intermediate tensor(s) shared by name compared{skipped}")
    first = report.first_divergence
    if first is None:
        console.print("per-layer: no intermediate diverges")
        return
    where = escape(f"{first.op_type} node '{first.node or '(unnamed)'}', tensor '{first.tensor}'")
    console.print(f"per-layer: first divergence at {where}: max abs {format_number(first.max_abs)}, "
                  f"max rel {format_number(first.max_rel)}, cosine {min(first.cosine, 1.0):.6f}")
    if not failures:
        console.print("per-layer: every output matches, so this intermediate may only have been "
                      "renamed by a rewrite (a fused node can take over a name)")
