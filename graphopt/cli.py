"""The ``graphopt`` command line.

Every user mistake (missing file, invalid model, unknown pass...) ends in a one-line message
on stderr and exit code 2, with no traceback unless ``--debug``; nothing is written then.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import traceback
from typing import Any, Callable

import click
from rich.console import Console
from rich.table import Table

from graphopt.errors import GraphoptError

__all__ = ["main", "cli"]

logger = logging.getLogger("graphopt")

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _setup_logging(debug: bool, verbose: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("graphopt: %(levelname)s: %(message)s"))
    root = logging.getLogger("graphopt")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn graphopt errors into one-line messages and exit codes; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        root = logging.getLogger("graphopt")
        saved = (list(root.handlers), root.level, root.propagate)
        _setup_logging(debug, bool(kwargs.get("verbose")))
        try:
            return fn(*args, **kwargs)
        except GraphoptError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"graphopt: error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("graphopt: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("graphopt: error: out of memory", err=True)
            sys.exit(EXIT_INTERNAL_ERROR)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug in graphopt: say so plainly, offer the traceback
            if debug:
                traceback.print_exc()
            click.echo(f"graphopt: internal error: {type(exc).__name__}: {exc} "
                       "(this is a bug in graphopt; rerun with --debug for the traceback)", err=True)
            sys.exit(EXIT_INTERNAL_ERROR)
        finally:
            # Commands may run in-process (tests, notebooks): leave logging as it was.
            root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]

    return wrapper


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="Log what each pass did.")(fn)
    return fn


class _Commands(click.Group):
    """A group whose tool commands (verify, bench, inspect...) are imported on first use.

    They live in their own modules, which import helpers from this one: loading them lazily
    avoids a circular import and keeps ``graphopt optimize`` start-up fast.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: D102
        return sorted(set(super().list_commands(ctx)) | {name for name, _, _ in _TOOL_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:  # noqa: D102
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        import importlib

        for command_name, module_name, attribute in _TOOL_COMMANDS:
            if command_name == name:
                return getattr(importlib.import_module(module_name), attribute)
        return None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="graphopt")
def cli() -> None:
    """graphopt: compiler-style graph optimization for ONNX models."""


def _registry(load_pass: tuple[str, ...]):
    from graphopt.pipeline import PassRegistry

    registry = PassRegistry.default()
    for path in load_pass:
        registry.load_file(path)
    return registry


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


@cli.command()
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the optimized model.")
@click.option("-O", "level", type=click.IntRange(0, 3), default=2, show_default=True,
              help="Preset pipeline: -O0 (nothing) to -O3 (everything, target-specific).")
@click.option("--pipeline", help="A pipeline string instead of the -O preset.")
@click.option("--enable", multiple=True, metavar="PASS", help="Also run PASS (repeatable).")
@click.option("--disable", multiple=True, metavar="PASS", help="Never run PASS (repeatable).")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Execution provider the output is for.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write a JSON report of the run (schema graphopt.report/1).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write a self-contained HTML report: pass table, charts, what changed.")
@click.option("--time-passes", is_flag=True, help="Print time per pass.")
@click.option("--stats", is_flag=True, help="Print the counters of every pass.")
@click.option("--dump-ir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the canonical IR after each pass that changed something.")
@click.option("--verify-each", type=click.Choice(["structural", "numeric"]), is_flag=False,
              flag_value="structural", default=None,
              help="Verify the IR (or the outputs, =numeric) after every pass.")
@click.option("--bisect-limit", type=click.IntRange(min=0), metavar="N",
              help="Stop after the N-th rewrite (find the one that breaks a model).")
@click.option("--load-pass", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Load passes from a Python file (repeatable).")
@click.option("--crash-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where a crash reproducer is saved (default: a new temp folder).")
@click.option("--external-data/--no-external-data", default=None,
              help="Store large weights in a separate file (default: automatic).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of generated inputs.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success; no progress bars.")
@_common
@_guard
def optimize(input_path: str, output: str, level: int, pipeline: str | None, enable: tuple[str, ...],
             disable: tuple[str, ...], target: str, report_path: str | None, html_path: str | None,
             time_passes: bool, stats: bool, dump_ir: str | None, verify_each: str | None, bisect_limit: int | None,
             load_pass: tuple[str, ...], crash_dir: str | None, external_data: bool | None, seed: int,
             quiet: bool, debug: bool, verbose: bool) -> None:
    """Optimize the ONNX model IN and write it to OUTPUT."""
    from graphopt._api import optimize_model
    from graphopt._progress import ProgressDisplay
    from graphopt._report import ChangeTracker, build_optimize_report, check_report_path
    from graphopt.pipeline import PassContext

    if not os.path.exists(input_path):
        raise GraphoptError(f"model file '{input_path}' does not exist")
    if _same_file(input_path, output) or os.path.abspath(input_path) == os.path.abspath(output):
        raise GraphoptError("the output path is the input file; graphopt never overwrites its input "
                            "(choose another -o)")
    for path, what in ((report_path, "report"), (html_path, "HTML report")):
        if path:  # refuse before any work, so a bad report path never leaves a lone output
            check_report_path(path, what)
    registry = _registry(load_pass)
    ctx = PassContext(opt_level=level, target=target, seed=seed, bisect_limit=bisect_limit,
                      registry=registry)
    instruments = _instruments(ctx, input_path, pipeline, level, time_passes, stats, dump_ir,
                               verify_each, crash_dir)
    tracker = ChangeTracker() if (report_path or html_path) else None
    if tracker is not None:
        ctx.instruments.append(tracker)
    with ProgressDisplay.for_stderr(quiet=quiet) as progress:
        outcome = optimize_model(input_path, level=level, pipeline=pipeline, target=target,
                                 enable=enable, disable=disable, ctx=ctx, output=output,
                                 external_data=external_data, progress=progress)
    if report_path or html_path:
        _write_reports(report_path, html_path, build_optimize_report(
            outcome, input_path=input_path, output_path=output, target=target, level=level,
            pipeline_option=pipeline, enable=enable, disable=disable, tracker=tracker))
    if quiet:
        return
    console = _console()
    console.print(_summary_table(input_path, output, outcome))
    if time_passes or stats:
        console.print(_pass_table(outcome.report, show_counters=stats))
    # Other report warnings were already logged to stderr as they happened.
    if bisect_limit is not None:
        console.print(f"bisect: {ctx.rewrites_applied} rewrite(s) applied"
                      + (f", stopped at the limit of {bisect_limit}" if ctx.bisect_stopped else ""))
    if dump_ir:
        console.print(f"IR dumps written to {dump_ir}")
    del instruments


def _instruments(ctx, input_path: str, pipeline: str | None, level: int, time_passes: bool,
                 stats: bool, dump_ir: str | None, verify_each: str | None, crash_dir: str | None) -> list:
    from graphopt import pipeline as pl

    made: list = []
    if dump_ir:
        os.makedirs(dump_ir, exist_ok=True)
        made.append(pl.DumpIR(dump_ir))
    if verify_each:
        made.append(pl.VerifyEach(mode=verify_each, seed=ctx.seed))
    text = pipeline if pipeline is not None else f"O{level}"
    made.append(pl.CrashReproducer(crash_dir or tempfile.gettempdir(), input_path, text))
    ctx.instruments.extend(made)
    return made


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _file_size(path: str) -> int:
    size = os.path.getsize(path) if os.path.exists(path) else 0
    data = path + ".data"
    if os.path.exists(data):
        size += os.path.getsize(data)
    return size


def _summary_table(input_path: str, output: str, outcome) -> Table:
    b, a = outcome.before, outcome.after
    table = Table(title=f"graphopt: {os.path.basename(input_path)} -> {os.path.basename(output)}",
                  title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")

    def row(label: str, x: float, y: float, fmt: Callable[[float], str] = lambda v: f"{v:.0f}") -> None:
        change = f"{(y - x) / x * 100:+.1f}%" if x else ("" if x == y else "new")
        table.add_row(label, fmt(x), fmt(y), change)

    row("nodes", b.nodes, a.nodes)
    row("initializers", b.initializers, a.initializers)
    row("initializer bytes", b.initializer_bytes, a.initializer_bytes, _human_bytes)
    in_size = _file_size(input_path)
    out_size = _file_size(output)
    if out_size:
        row("file size", in_size, out_size, _human_bytes)
    ops = set(b.ops) | set(a.ops)
    changes = sorted(((a.ops.get(o, 0) - b.ops.get(o, 0), o) for o in ops), key=lambda t: (t[0], t[1]))
    for delta, op in [c for c in changes if c[0] != 0][:8]:
        table.add_row(f"  {op}", str(b.ops.get(op, 0)), str(a.ops.get(op, 0)), f"{delta:+d}")
    totals = outcome.report.totals()
    for name, t in totals.items():
        label = f"pass {name}" + (f" x{t['runs']}" if t["runs"] > 1 else "")
        what = ", ".join(f"{k}={v}" for k, v in t["counters"].items() if v) or (
            "changed" if t["changed"] else "no change")
        table.add_row(label, "", f"{t['seconds'] * 1e3:.1f} ms", what)
    table.add_row("total time", "", f"{(outcome.load_seconds + outcome.report.seconds + outcome.save_seconds) * 1e3:.0f} ms", "")
    for change in outcome.emit_changes:
        table.add_row("emit", "", "", change)
    return table


def _pass_table(report, *, show_counters: bool) -> Table:
    table = Table(title="passes", title_justify="left")
    table.add_column("pass")
    table.add_column("runs", justify="right")
    table.add_column("changed", justify="right")
    table.add_column("ms", justify="right")
    if show_counters:
        table.add_column("counters")
    for name, t in report.totals().items():
        cells = [name, str(t["runs"]), str(t["changed"]), f"{t['seconds'] * 1e3:.2f}"]
        if show_counters:
            cells.append(", ".join(f"{k}={v}" for k, v in sorted(t["counters"].items())))
        table.add_row(*cells)
    return table


def _write_reports(report_path: str | None, html_path: str | None, data: dict[str, Any]) -> None:
    from graphopt._report import write_report
    from graphopt._report_html import write_html

    if report_path:
        write_report(report_path, data)
    if html_path:
        write_html(html_path, data)


@cli.command("passes")
@click.option("--pipeline", "pipeline", metavar="NAME|STR",
              help="Print the expanded pipeline for -O0..-O3, a named pipeline, or a pipeline string.")
@click.option("--load-pass", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Load passes from a Python file (repeatable).")
@_common
@_guard
def passes_cmd(pipeline: str | None, load_pass: tuple[str, ...], debug: bool, verbose: bool) -> None:
    """List the registered passes, or print a pipeline."""
    from graphopt.pipeline import format_pipeline, parse_pipeline

    registry = _registry(load_pass)
    if pipeline is not None:
        named = registry.pipeline(pipeline)
        text = named if named is not None else pipeline
        click.echo(format_pipeline(parse_pipeline(text, registry)))
        return
    table = Table(title="graphopt passes", title_justify="left")
    for col in ("pass", "level", "requires", "description", "from"):
        table.add_column(col)
    for cls in registry.passes():
        table.add_row(cls.name, f"O{cls.opt_level}", ",".join(sorted(cls.requires)),
                      cls.description, registry.origin(cls.name))
    console = _console()
    console.print(table)
    named = Table(title="pipelines", title_justify="left")
    named.add_column("name")
    named.add_column("pipeline")
    for name, text in sorted(registry.pipelines().items()):
        named.add_row(("-" + name) if name[:1] == "O" and name[1:].isdigit() else name, text or "(empty)")
    console.print(named)


@cli.command("print")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--raw", is_flag=True, help="Keep node and value names (not canonical).")
@click.option("--max-elements", type=int, default=32, show_default=True,
              help="Tensors with more values are shown as a digest.")
@_common
@_guard
def print_cmd(model_path: str, raw: bool, max_elements: int, debug: bool, verbose: bool) -> None:
    """Print MODEL in canonical ONNX text."""
    from graphopt import ir

    model = ir.load(model_path)
    click.echo(ir.print_model(model, canonical=not raw, max_elements=max_elements), nl=False)


@cli.command("why-not")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--rule", "rule_name", required=True, help="The rewrite rule to explain.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Execution provider the rules check kernels against.")
@click.option("--prepare", default="topo-sort,infer-shapes", show_default=True, metavar="PIPELINE",
              help="Pipeline run before tracing, so rules see shapes and types as they would in -O2.")
@click.option("--load-pass", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Load passes from a Python file (repeatable).")
@_common
@_guard
def why_not_cmd(model_path: str, rule_name: str, target: str, prepare: str,
                load_pass: tuple[str, ...], debug: bool, verbose: bool) -> None:
    """Explain, for each candidate node of MODEL, why rule RULE does or does not fire."""
    from graphopt import ir
    from graphopt._api import check_input
    from graphopt.pipeline import PassContext, PassManager
    from graphopt.rewrite import find_rule, format_why_not, why_not

    registry = _registry(load_pass)
    rule = find_rule(registry, rule_name)
    model = ir.load(model_path)
    check_input(model)
    ctx = PassContext(registry=registry, target=target)
    if prepare:
        PassManager(prepare, ctx).run(model)
    results = why_not(model, rule, PassContext(registry=registry, target=target))
    if not results:
        click.echo(f"rule '{rule_name}': no candidate nodes in {model_path}")
        return
    click.echo(format_why_not(results))


# (command name, module, click command attribute): commands kept in their own files.
_TOOL_COMMANDS: list[tuple[str, str, str]] = [
    ("verify", "graphopt._cli_verify", "verify"),
    ("bench", "graphopt._cli_bench", "bench"),
    ("inspect", "graphopt._cli_inspect", "inspect_cmd"),
    ("quantize", "graphopt._cli_quantize", "quantize"),
    ("prune", "graphopt._cli_prune", "prune"),
    ("partition", "graphopt._cli_partition", "partition"),
    ("run", "graphopt._cli_run", "run"),
]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``graphopt`` console script."""
    cli.main(args=argv, prog_name="graphopt", standalone_mode=True)


if __name__ == "__main__":
    main()
