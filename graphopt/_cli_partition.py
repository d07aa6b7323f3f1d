"""``graphopt partition``: split a model into stages, branches or tensor-parallel shards."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from graphopt._cli_bench import counting_progress
from graphopt.cli import _common, _console, _guard
from graphopt.errors import GraphoptError

__all__ = ["partition"]


@click.command("partition")
@click.argument("model", metavar="IN", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False), metavar="OUTDIR",
              help="Folder to create: one ONNX model per partition and manifest.json.")
@click.option("--stages", type=int, metavar="K", help="Number of pipeline stages.")
@click.option("--memory-budget", metavar="SIZE",
              help="Bytes each stage may hold, weights plus peak activations (2GB, 512MB, 1.5GiB); "
              "alone: the fewest stages that fit.")
@click.option("--devices", metavar="LIST", help="One stage per device (cpu,cuda:0,cuda:1); with "
              "--branches or --tensor-parallel, the devices branches or shards are spread over.")
@click.option("--balance", type=click.Choice(["flops", "memory", "latency"]), default="flops",
              show_default=True, help="What stages balance.")
@click.option("--tensor-parallel", type=int, metavar="N",
              help="Split MLP (columns then rows) and attention (by heads) blocks into N shards.")
@click.option("--branches", is_flag=True, help="One partition per independent branch (multi-tower, "
              "ensembles), run concurrently.")
@click.option("--split-heavy", is_flag=True, help="With --stages/--devices: split single MatMul/Gemm "
              "nodes heavier than half a stage into column blocks first (better balance). A split "
              "graph output (an LM head's logits) goes to the caller in slices that the runtime "
              "concatenates; other split outputs' slices may cross stages.")
@click.option("--dim", "dim_specs", multiple=True, metavar="NAME=SIZE",
              help="Size of a symbolic input dim for the cost model (repeatable).")
@click.option("--default-dim", type=click.IntRange(min=1), default=1, show_default=True,
              help="Size of the symbolic dims not given with --dim.")
@click.option("--plan-only", is_flag=True, help="Print the plan and predicted throughput; write nothing.")
@click.option("--device-tflops", type=click.FloatRange(min=0, min_open=True), metavar="T",
              help="Peak TFLOP/s per device for the throughput prediction (default: per device kind).")
@click.option("--link-gbs", type=click.FloatRange(min=0, min_open=True), metavar="G",
              help="GB/s between devices for the throughput prediction.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the plan as JSON.")
@click.option("--force", is_flag=True, help="Replace OUTDIR if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_common
@_guard
def partition(model: str, output_dir: str | None, stages: int | None, memory_budget: str | None,
              devices: str | None, balance: str, tensor_parallel: int | None, branches: bool,
              split_heavy: bool, dim_specs: tuple[str, ...], default_dim: int, plan_only: bool,
              device_tflops: float | None, link_gbs: float | None, json_path: str | None,
              force: bool, quiet: bool, debug: bool, verbose: bool) -> None:
    """Split IN into partitions written to OUTDIR with a manifest.json.

    Choose one of --stages, --memory-budget, --devices, --branches, --tensor-parallel (--stages
    and --memory-budget combine). The output folder appears whole or not at all. Exit code 0 on
    success, 2 on bad input.
    """
    from graphopt._partition import partition as run_partition
    from graphopt._report import check_report_path, write_report
    from graphopt.analysis import DeviceModel
    from graphopt.runtime import parse_dims

    if json_path:
        check_report_path(json_path, "JSON output")
    if not plan_only and not output_dir:
        raise GraphoptError("give an output folder with -o OUTDIR, or --plan-only to print the plan")
    dims = parse_dims(dim_specs)
    device_models = None
    if device_tflops or link_gbs:
        kinds = [d.strip() for d in devices.split(",")] if devices else ["cpu"]
        device_models = []
        for kind in kinds:
            base = DeviceModel.for_device(kind)
            device_models.append(DeviceModel(
                kind, device_tflops * 1e12 if device_tflops else base.flops_per_second,
                base.memory_bandwidth, link_gbs * 1e9 if link_gbs else base.link_bandwidth))
    with counting_progress(quiet or plan_only) as progress:
        result = run_partition(
            model, output_dir, stages=stages, memory_budget=memory_budget, devices=devices,
            balance=balance, tensor_parallel=tensor_parallel, branches=branches,
            split_heavy=split_heavy, dims=dims,
            default_dim=default_dim, plan_only=plan_only, overwrite=force,
            device_models=device_models,
            progress=(lambda done, total: progress("writing partitions", done, total)) if progress else None)
    if json_path:
        write_report(json_path, {"schema": "graphopt.partition-plan/1", "command": "partition",
                                 "model": model, "output": result.output_dir,
                                 "plan": result.plan.to_dict(), "throughput": result.throughput,
                                 "chain_cut_bytes": result.chain_cut_bytes})
    if not quiet:
        _print_plan(model, result)


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:,.2f} s"
    return f"{s * 1e3:,.3g} ms" if s >= 1e-3 else f"{s * 1e6:,.3g} µs"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def _print_plan(model: str, result) -> None:
    plan = result.plan
    console = _console()
    if not console.is_terminal:
        console.width = max(console.width, 132)  # piped into a file: room for every column
    dims = ", ".join(f"{k}={v}" for k, v in plan.dims.items()) or "static"
    table = Table(title=f"graphopt partition: {escape(model)} ({plan.strategy}, balance {plan.balance}, "
                  f"dims {escape(dims)})", title_justify="left")
    for col in ("partition", "kind", "nodes", "weight MB", "peak act MB", "GFLOPs", "device",
                "MB received", "MB sent", "after"):
        table.add_column(col, justify="left" if col in ("partition", "kind", "device", "after") else "right")
    for p in plan.partitions:
        table.add_row(p.name, p.kind, str(len(p.nodes)), _mb(p.weight_bytes), _mb(p.peak_activation_bytes),
                      f"{p.flops / 1e9:,.3f}", p.device, _mb(p.bytes_in), _mb(p.bytes_out),
                      ",".join(plan.partitions[d].name for d in p.depends_on) or "-")
    console.print(table)
    budget = f", budget {_mb(plan.memory_budget)} MB per partition" if plan.memory_budget else ""
    console.print(f"total: {plan.total_flops / 1e9:,.3f} GFLOPs, {_mb(plan.total_weight_bytes)} MB of "
                  f"weights; slowest partition {plan.balance_ratio():.3f}x an even share; "
                  f"{_mb(plan.cut_bytes)} MB cross partitions per run{budget}")
    for recipe in result.assemble:
        console.print(f"output {escape(recipe['output'])} is assembled after the run from "
                      f"{len(recipe['parts'])} column slices (concat on axis {recipe['axis']}); "
                      "the slices go to the caller, not across partitions")
    if result.chain_cut_bytes is not None:
        console.print(f"a straight chain cut into {len(plan.partitions)} stages would send "
                      f"{_mb(result.chain_cut_bytes)} MB")
    t = result.throughput
    console.print(f"predicted on {len(plan.partitions)} device(s) (cost model): "
                  f"{t['runs_per_second']:,.1f} runs/s pipelined (slowest stage "
                  f"{_seconds(t['slowest_stage_seconds'])}), latency {_seconds(t['latency_seconds'])}; "
                  f"unsplit on one device {t['unsplit_runs_per_second']:,.1f} runs/s")
    if result.manifest is not None:
        console.print(f"wrote {len(result.manifest.partitions)} partition(s) and manifest.json to "
                      f"{escape(str(result.output_dir))}")
