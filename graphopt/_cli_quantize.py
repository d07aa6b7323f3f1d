"""``graphopt quantize``: int8 QDQ for the target (or dynamic, int4, float16), with checks and a report."""

from __future__ import annotations

import os

import click
from rich.markup import escape
from rich.table import Table

from graphopt._cli_bench import counting_progress
from graphopt.cli import _common, _console, _guard
from graphopt.errors import GraphoptError

__all__ = ["quantize"]


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(part.strip() for v in values for part in v.split(",") if part.strip())


@click.command("quantize")
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the quantized model.")
@click.option("--calibration", metavar="DATA",
              help="Calibration data: a folder of .npz/.npy files, one .npz, MODULE:FUNCTION, or "
              "'synthetic' (random; accuracy not assured). Required by --mode static.")
@click.option("--synthetic", is_flag=True, help="Same as --calibration synthetic.")
@click.option("--mode", type=click.Choice(["static", "dynamic", "int4", "float16", "bfloat16"]),
              default="static", show_default=True, help="What to quantize to.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="minmax",
              show_default=True, help="Calibration method.")
@click.option("--percentile", type=click.FloatRange(0, 100, min_open=True), default=99.999,
              show_default=True, help="For --method percentile.")
@click.option("--samples", type=click.IntRange(min=1), help="Use at most N calibration samples.")
@click.option("--held-out", "held_out", type=click.FloatRange(min=0),
              help="Samples kept for evaluation: a count, or a fraction below 1 (default: 20%, <= 16).")
@click.option("--per-channel/--per-tensor", default=True, show_default=True,
              help="Weight scales per output channel.")
@click.option("--activation-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True)
@click.option("--weight-type", type=click.Choice(["int8"]), default="int8", show_default=True)
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Execution provider the output is for.")
@click.option("--op-types", "op_types", multiple=True, metavar="OPS",
              help="Op types to quantize, comma-separated (repeatable).")
@click.option("--include", multiple=True, metavar="PATTERN", help="Quantize only these nodes (regex; repeatable).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Keep these nodes in float (regex; repeatable).")
@click.option("--max-drop", type=click.FloatRange(min=0), metavar="X",
              help="Accuracy budget: fall the most sensitive units back to float until the drop <= X.")
@click.option("--metric", metavar="METRIC",
              help="Evaluation: cosine (default), top1, or MODULE:FUNCTION(reference, candidate).")
@click.option("--smoothquant", "smoothquant_alpha", type=click.FloatRange(0, 1), metavar="ALPHA",
              help="SmoothQuant migration strength (e.g. 0.5) for transformer models.")
@click.option("--activation-matmul", is_flag=True, help="Also quantize MatMuls of two activations.")
@click.option("--pairs", type=click.Choice(["shared", "dedicated"]), default="shared", show_default=True,
              help="One Q per tensor (shared) or a Q/DQ pair per reader.")
@click.option("--stats-cache", type=click.Path(dir_okay=False), metavar="FILE",
              help="Reuse calibration statistics from FILE (written there when absent).")
@click.option("--check-fusion", is_flag=True,
              help="Fail (exit 2, no output written) if onnxruntime leaves any Q/DQ unfused.")
@click.option("--no-speed-check", is_flag=True, help="Do not time the result against float32.")
@click.option("--block-size", type=click.IntRange(min=16), default=32, show_default=True, help="For --mode int4.")
@click.option("--int4-format", type=click.Choice(["matmulnbits", "qdq"]), default="matmulnbits",
              show_default=True, help="For --mode int4.")
@click.option("--dim", "dim_specs", multiple=True, metavar="NAME=SIZE",
              help="Size of a symbolic input dim for synthetic data and timing (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of synthetic data.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the JSON report (schema graphopt.quantize/1).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary; warnings still print.")
@_common
@_guard
def quantize(input_path: str, output: str, calibration: str | None, synthetic: bool, mode: str, method: str,
             percentile: float, samples: int | None, held_out: float | None, per_channel: bool,
             activation_type: str, weight_type: str, target: str, op_types: tuple[str, ...],
             include: tuple[str, ...], exclude: tuple[str, ...], max_drop: float | None,
             metric: str | None, smoothquant_alpha: float | None, activation_matmul: bool, pairs: str,
             stats_cache: str | None, check_fusion: bool, no_speed_check: bool, block_size: int,
             int4_format: str, dim_specs: tuple[str, ...], seed: int, report_path: str | None,
             quiet: bool, debug: bool, verbose: bool) -> None:
    """Quantize the ONNX model IN for the target and write it to OUTPUT.

    Static mode places QDQ only around node units the target fuses into integer kernels,
    then checks in onnxruntime that they fused, evaluates accuracy on held-out samples and
    times the result against float32. Exit code 2 on bad input or a failed --check-fusion.
    """
    from graphopt._quantize import quantize as run_quantize
    from graphopt.runtime import parse_dims

    if not os.path.exists(input_path):
        raise GraphoptError(f"model file '{input_path}' does not exist")
    if synthetic:
        if calibration not in (None, "synthetic"):
            raise GraphoptError("--synthetic and --calibration DATA contradict each other (give one)")
        calibration = "synthetic"
    if mode == "static" and calibration is None:
        raise GraphoptError("static quantization needs calibration data: --calibration DIR|FILE.npz|"
                            "MODULE:FUNCTION, or --synthetic (accuracy not assured)")
    if held_out is not None and held_out >= 1 and held_out != int(held_out):
        raise GraphoptError(f"--held-out {held_out}: give a whole count or a fraction below 1")
    held = None if held_out is None else (int(held_out) if held_out >= 1 else float(held_out))
    dims = parse_dims(dim_specs)
    with counting_progress(quiet) as progress:
        outcome = run_quantize(
            input_path, output, calibration=calibration, mode=mode, method=method, percentile=percentile,
            samples=samples, held_out=held, per_channel=per_channel, activation_type=activation_type,
            weight_type=weight_type, target=target, op_types=_split(op_types) or None,
            include=_split(include) or None, exclude=_split(exclude) or None, max_drop=max_drop,
            metric=metric, smoothquant_alpha=smoothquant_alpha, activation_matmul=activation_matmul,
            pairs=pairs, stats_cache=stats_cache, check_fusion=check_fusion,
            check_speed=not no_speed_check, block_size=block_size, int4_format=int4_format,
            dims=dims, seed=seed, report=report_path, progress=progress)
    rep = outcome.report
    if quiet:
        return
    _console().print(_summary(input_path, output, rep))


def _summary(input_path: str, output: str, rep: dict) -> Table:
    table = Table(title=f"graphopt quantize: {escape(os.path.basename(input_path))} -> "
                  f"{escape(os.path.basename(output))} ({rep['mode']}, {rep['target']})", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", justify="left")
    units = rep.get("units", [])
    if units:
        quantized = sum(1 for u in units if u["status"] == "quantized")
        table.add_row("units", f"{quantized} quantized, {len(units) - quantized} float")
    fusion = rep.get("fusion")
    if fusion:
        kinds = ", ".join(f"{n} {op}" for op, n in fusion["fused"].items()) or "none"
        table.add_row("fused", f"{fusion['fused_total']} integer kernel(s): {escape(kinds)}")
        table.add_row("unfused Q/DQ", str(fusion["unfused"]))
    acc = rep.get("accuracy")
    if acc and "skipped" in acc:
        table.add_row("accuracy", escape(f"not checked: {acc['skipped']}"))
    elif acc:
        top1 = acc.get("top1_agreement")
        text = f"cosine {acc['cosine']}, SQNR {acc['sqnr_db']} dB"
        if acc.get("non_finite_outputs"):
            text += f", INF/NAN in {acc['non_finite_outputs']} output(s)"
        if top1 is not None:
            text += f", top-1 agreement {top1 * 100:.1f}%"
        if acc.get("max_drop") is not None:
            text += f"; {acc['metric']} drop {acc['drop']} (budget {acc['max_drop']}: " \
                    f"{'met' if acc['met'] else 'NOT met'})"
        table.add_row("accuracy", escape(text))
    if rep.get("fallbacks"):
        table.add_row("fell back", escape(", ".join(f["unit"] for f in rep["fallbacks"])))
    size = rep.get("size")
    if size:
        table.add_row("size", f"{size['file_before']:,} -> {size['file_after']:,} bytes ({size['ratio']}x)")
    lat = rep.get("latency")
    if lat:
        flag = " [red]SLOWER than float32[/]" if lat["slower"] else ""
        table.add_row("latency", f"{lat['float_ms']:.3f} -> {lat['quantized_ms']:.3f} ms "
                      f"({lat['speedup']:.2f}x, 1 thread){flag}")
    return table
