"""``graphopt.partition``: split a model into pipeline stages, parallel branches or tensor shards.

The model is costed (:func:`graphopt.analysis.graph_cost`), a plan is searched
(:func:`graphopt.analysis.plan_stages`, :func:`~graphopt.analysis.plan_branches`, or the shards
the ``split-tensor-parallel`` pass made), and each partition is written as its own ONNX model
beside a ``manifest.json`` (:class:`graphopt.runtime.Manifest`) that
:class:`graphopt.runtime.PartitionedSession` and ``graphopt run`` execute.

The output folder appears whole or not at all: everything is written into a temporary folder
next to it and renamed into place at the end.

Example:
    >>> result = graphopt.partition("bert.onnx", "bert.parts", stages=4,
    ...                             dims={"batch": 1, "sequence": 128})  # doctest: +SKIP
    >>> [p.name for p in result.manifest.partitions]  # doctest: +SKIP
    ['stage0', 'stage1', 'stage2', 'stage3']
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import onnx

from graphopt import ir
from graphopt.analysis import (BALANCES, DeviceModel, GraphCost, PartitionPlan, chain_cut_bytes,
                               graph_cost, plan_branches, plan_groups, plan_stages)
from graphopt.errors import GraphoptError
from graphopt.runtime import Manifest

__all__ = ["PartitionResult", "parse_size", "partition"]

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}
_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")
#: Node names the ``split-tensor-parallel`` pass gives its shards and combining nodes.
_SHARD_NAME = re.compile(r"^tp(\d+)\.shard(\d+)/")
_COMBINE_NAME = re.compile(r"^tp(\d+)\.combine/")
#: A source model file above this size, cut into more partitions than ``_CHEAP_RELOADS``, is
#: rewritten once with external data (see ``_Source``).
_INLINE_SOURCE_BYTES = 16 * 1024 * 1024
_CHEAP_RELOADS = 4
#: Partitions holding more weight bytes than this store them as external data.
EXTERNAL_DATA_BYTES = 256 * 1024 * 1024
#: Column blocks of a split heavy node hold about this fraction of an even share each: fine
#: enough that the stages around them can end at chain points (one tensor crossing).
_HEAVY_PIECE_SHARE = 1 / 16


def parse_size(text: str | int | float) -> int:
    """Bytes from ``2GB``, ``512MB``, ``1.5GiB``, ``1000`` (GB = 10⁹, GiB = 2³⁰).

    Raises:
        GraphoptError: the text is not a size.

    Example:
        >>> parse_size("2GB"), parse_size("512MiB")
        (2000000000, 536870912)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise GraphoptError(f"memory budget must be positive (got {text})")
        return int(text)
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else ""
    if not match or unit not in _UNITS:
        raise GraphoptError(f"'{text}' is not a size; write it like 2GB, 512MB or 1.5GiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise GraphoptError(f"memory budget must be positive (got '{text}')")
    return size


@dataclass
class PartitionResult:
    """What :func:`partition` made.

    Attributes:
        plan: the partition plan (costs per partition, bytes crossing).
        manifest: the written manifest (``None`` with ``plan_only``).
        output_dir: the folder written (``None`` with ``plan_only``).
        throughput: predicted pipeline throughput (see :meth:`PartitionPlan.predicted_throughput`).
        chain_cut_bytes: bytes a straight chain cut would send for as many stages (stage plans).
        assemble: model outputs joined from partition outputs after the run (the manifest's
            ``assemble`` entries; with ``split_heavy``, also known with ``plan_only``).
    """

    plan: PartitionPlan
    manifest: Manifest | None
    output_dir: str | None
    throughput: dict[str, float]
    chain_cut_bytes: int | None = None
    assemble: list[dict] = field(default_factory=list)


def _check_devices(devices: Sequence[str] | str | None) -> list[str]:
    if devices is None:
        return []
    if isinstance(devices, str):
        devices = [d for d in devices.split(",")]
    out = [d.strip() for d in devices]
    bad = [d for d in out if not _DEVICE.match(d)]
    if bad or not out:
        raise GraphoptError(f"device '{bad[0] if bad else ''}' is not cpu or cuda:K; write devices "
                            "like cpu,cuda:0,cuda:1")
    return out


class _Source:
    """The model to partition, reloadable as fresh IR copies (one per partition written).

    A model whose weights are inline in a large file is parsed whole by every load; when many
    partitions are to be cut from it, it is first saved once into the work folder with its
    weights as external data, so that every later load parses the graph only and maps the
    weights lazily. Models given in memory are saved that way from the start.
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto | ir.Model | bytes,
                 workdir: str) -> None:
        self.workdir = workdir
        self.name = os.path.basename(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else ""
        self.path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else ""
        self.versions = 0
        if not self.path or not os.path.isfile(self.path):
            self.replace(model if isinstance(model, ir.Model) else ir.load(model))

    def prepare(self, loads: int) -> None:
        """Make ``loads`` later loads cheap (see the class notes)."""
        if self.versions == 0 and loads > _CHEAP_RELOADS and os.path.getsize(self.path) > _INLINE_SOURCE_BYTES:
            self.replace(ir.load(self.path))

    def replace(self, model: ir.Model) -> None:
        """Partition ``model`` from now on (written to the work folder, weights external)."""
        self.versions += 1
        self.path = os.path.join(self.workdir, f"source{self.versions}.onnx")
        ir.save(model, self.path, external_data=True)

    def load(self) -> ir.Model:
        """A fresh IR copy."""
        return ir.load(self.path)


def _split_heavy_nodes(model: ir.Model, cost: GraphCost, stages: int) -> tuple[int, list[dict]]:
    """Column-split the nodes heavier than half an even share into blocks of about a quarter.

    Returns the number of nodes split and the ``assemble`` recipes of the split outputs that
    were graph outputs: their Concat is removed, the slices become graph outputs, and the
    runtime joins them after the run (so they never cross between partitions).
    """
    from graphopt.passes.partition import split_columns
    from graphopt.passes.partition.split_heavy import detach_output_concat

    share = cost.total_flops / stages
    nodes = model.graph.nodes
    count = 0
    assemble: list[dict] = []
    for index, flops in enumerate(cost.flops):
        if share and flops > share / 2:
            pieces = min(int(math.ceil(flops / (share * _HEAVY_PIECE_SHARE))), 64)
            name = nodes[index].outputs[0].name if len(nodes[index].outputs) == 1 else None
            if not split_columns(model, nodes[index], pieces):
                continue
            count += 1
            joined = next((v for v in model.graph.outputs if v.name == name), None)
            if joined is not None and joined.producer is not None and joined.producer.op_type == "Concat":
                recipe = detach_output_concat(model, joined.producer)
                if recipe is not None:
                    assemble.append(recipe)
    logger.info("partition: %d heavy node(s) split into column blocks, %d assembled from graph "
                "outputs after the run", count, len(assemble))
    return count, assemble


def _tensor_parallel_plan(cost: GraphCost, devices: list[str]) -> PartitionPlan:
    group_of: dict[int, tuple[object, str]] = {}
    for i, name in enumerate(cost.node_names):
        shard = _SHARD_NAME.match(name)
        if shard:
            group_of[i] = ((int(shard.group(1)), int(shard.group(2))), "shard")
        elif _COMBINE_NAME.match(name):
            group_of[i] = (None, "combine")
    if not any(kind == "shard" for _, kind in group_of.values()):
        raise GraphoptError("no MatMul/Gemm block could be split for tensor parallelism (an MLP "
                            "MatMul -> activation -> MatMul with constant 2-D weights, or attention "
                            "heads); use --stages instead")
    return plan_groups(cost, group_of, devices=devices, strategy="tensor-parallel")


def partition(model: str | os.PathLike | onnx.ModelProto | ir.Model, output_dir: str | os.PathLike | None = None,
              *, stages: int | None = None, memory_budget: int | str | None = None,
              devices: Sequence[str] | str | None = None, balance: str = "flops",
              tensor_parallel: int | None = None, branches: bool = False, split_heavy: bool = False,
              dims: Mapping[str, int] | None = None, default_dim: int = 1, plan_only: bool = False,
              overwrite: bool = False, tolerance: float = 0.05,
              device_models: Sequence[DeviceModel] | None = None,
              external_data_bytes: int = EXTERNAL_DATA_BYTES,
              progress: Callable[[int, int], None] | None = None) -> PartitionResult:
    """Split ``model`` into partitions and write them with a manifest into ``output_dir``.

    Choose one strategy: ``stages`` (K pipeline stages), ``memory_budget`` (the fewest stages
    under a per-stage budget; combinable with ``stages``), ``devices`` (one stage per device),
    ``branches`` (independent subgraphs run concurrently) or ``tensor_parallel`` (MLP and
    attention blocks split into N shards).

    Args:
        model: a path, ``ModelProto`` or IR model (never modified).
        output_dir: folder to create (must not exist unless ``overwrite``); not needed with
            ``plan_only``.
        stages: number of pipeline stages.
        memory_budget: bytes per partition (weights + peak activations), or a size text
            (``"2GB"``).
        devices: one device per stage (``["cpu", "cuda:0"]`` or ``"cpu,cuda:0"``).
        balance: what stages balance: ``flops``, ``memory`` or ``latency``.
        tensor_parallel: number of shards for tensor parallelism.
        branches: partition independent branches.
        split_heavy: with a stage count, first split single MatMul/Gemm nodes heavier than half
            an even share into column blocks (joined by a Concat) so stages can balance. When
            that Concat made a graph output, it is dropped: the blocks' outputs go to the
            caller and the manifest's ``assemble`` joins them after the run; otherwise the
            blocks' outputs may cross stages to reach the Concat.
        dims: sizes of symbolic input dims for the cost model.
        default_dim: size of the other symbolic dims.
        plan_only: plan and return without writing anything.
        overwrite: replace an existing ``output_dir``.
        tolerance: how far above the best bottleneck a stage plan may go to send fewer bytes.
        device_models: device figures for the throughput prediction.
        external_data_bytes: partitions holding more weight bytes than this store them in an
            external data file beside the partition model.
        progress: called with (partitions written, partitions).

    Returns:
        A :class:`PartitionResult`.

    Raises:
        GraphoptError: bad arguments, an unplannable request, or an output that cannot be written.
    """
    if balance not in BALANCES:
        raise GraphoptError(f"unknown balance '{balance}'; use one of {', '.join(BALANCES)}")
    device_list = _check_devices(devices)
    budget = parse_size(memory_budget) if memory_budget is not None else None
    chosen = [name for name, given in (("--stages/--memory-budget", stages is not None or budget is not None),
                                       ("--tensor-parallel", tensor_parallel is not None),
                                       ("--branches", branches)) if given]
    if len(chosen) > 1:
        raise GraphoptError(f"choose one strategy, not {' and '.join(chosen)} (--devices combines "
                            "with any of them)")
    if not chosen and not device_list:
        raise GraphoptError("give --stages K, --memory-budget SIZE, --devices LIST, --branches or "
                            "--tensor-parallel N")
    if stages is not None and stages < 1:
        raise GraphoptError(f"--stages must be at least 1 (got {stages})")
    if tensor_parallel is not None and tensor_parallel < 2:
        raise GraphoptError(f"--tensor-parallel must be at least 2 (got {tensor_parallel})")
    out_path: str | None = None
    if not plan_only:
        if output_dir is None:
            raise GraphoptError("give an output folder (-o OUTDIR) or ask for --plan-only")
        out_path = os.path.abspath(os.fspath(output_dir))
        if os.path.exists(out_path) and not overwrite and (not os.path.isdir(out_path) or os.listdir(out_path)):
            raise GraphoptError(f"output folder '{output_dir}' already exists; choose another or pass "
                                "--force to replace it")
        if not os.path.isdir(os.path.dirname(out_path)):
            raise GraphoptError(f"cannot create '{output_dir}': folder '{os.path.dirname(out_path)}' "
                                "does not exist")
    with tempfile.TemporaryDirectory(prefix="graphopt-partition-") as workdir:
        source = _Source(model, workdir)
        current = source.load()
        if tensor_parallel is not None:
            from graphopt.passes.partition import split_tensor_parallel

            rewritten = split_tensor_parallel(current, tensor_parallel)
            if not rewritten:
                raise GraphoptError("no MatMul/Gemm block could be split for tensor parallelism (an "
                                    "MLP MatMul -> activation -> MatMul with constant 2-D weights "
                                    "whose inner size divides by the shard count); use --stages")
            source.replace(current)
            current = source.load()
        cost = graph_cost(current, dims=dims, default_dim=default_dim)
        count = stages or len(device_list) or None
        assemble: list[dict] = []
        output_cost = cost  # types of the model's outputs, assembled ones included
        if split_heavy and count and tensor_parallel is None and not branches:
            split, assemble = _split_heavy_nodes(current, cost, count)
            if split:
                source.replace(current)
                current = source.load()
                cost = graph_cost(current, dims=dims, default_dim=default_dim)
        del current
        baseline = None
        if tensor_parallel is not None:
            plan = _tensor_parallel_plan(cost, device_list)
        elif branches:
            plan = plan_branches(cost, devices=device_list or None)
        else:
            plan = plan_stages(cost, stages, memory_budget=budget, devices=device_list or None,
                               balance=balance, tolerance=tolerance)
            baseline = chain_cut_bytes(cost, len(plan.partitions))
        throughput = plan.predicted_throughput(device_models)
        if plan_only:
            return PartitionResult(plan=plan, manifest=None, output_dir=None, throughput=throughput,
                                   chain_cut_bytes=baseline, assemble=assemble)
        assert out_path is not None
        meta = {"predicted_throughput": throughput, "chain_cut_bytes": baseline,
                "tensor_parallel": tensor_parallel}
        manifest = _write(source, cost, plan, out_path, overwrite=overwrite, progress=progress,
                          external_data_bytes=external_data_bytes, meta=meta, assemble=assemble,
                          output_cost=output_cost)
    return PartitionResult(plan=plan, manifest=manifest, output_dir=out_path, throughput=throughput,
                           chain_cut_bytes=baseline, assemble=assemble)


def _write(source: _Source, cost: GraphCost, plan: PartitionPlan, out_path: str, *, overwrite: bool,
           progress: Callable[[int, int], None] | None, external_data_bytes: int, meta: dict,
           assemble: Sequence[dict] = (), output_cost: GraphCost | None = None) -> Manifest:
    """Emit into a temporary sibling folder, then rename it to ``out_path``."""
    from graphopt.passes.partition import emit_partitions

    parent = os.path.dirname(out_path)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)}.", suffix=".tmp", dir=parent)
    try:
        source.prepare(len(plan.partitions))
        manifest = emit_partitions(source.load, cost, plan, staging, source_model=source.name,
                                   meta=meta, external_data_bytes=external_data_bytes, progress=progress,
                                   assemble=assemble, output_cost=output_cost)
        os.chmod(staging, 0o777 & ~_umask())
        if os.path.exists(out_path):
            if not overwrite and (not os.path.isdir(out_path) or os.listdir(out_path)):
                raise GraphoptError(f"output folder '{out_path}' appeared while partitioning; "
                                    "nothing was written")
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(out_path, old)  # moved aside, removed once the new folder is in place
            os.replace(staging, out_path)
            if os.path.isdir(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.unlink(old)
        else:
            os.replace(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest.base_dir = out_path
    return manifest


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
