"""Running a partitioned model: one onnxruntime session per partition, tensors passed between them.

A folder written by ``graphopt partition`` holds one ONNX file per partition and a
``manifest.json`` (:class:`~graphopt.runtime.Manifest`). :class:`PartitionedSession` opens it
and runs it like one model:

- **local** backend: each partition gets its own ``InferenceSession`` (CPU, or CUDA device *k*
  for ``cuda:K`` partitions) and its own worker thread fed by a bounded queue. A request moves
  through the partitions as a DAG: a partition runs as soon as all of its inputs exist, so
  independent branches and tensor-parallel shards run at the same time, and consecutive
  requests (or micro-batches) overlap across pipeline stages. Tensors pass by reference, and a
  request keeps an intermediate only until its last consumer has run.
- **ray** backend: one Ray actor per partition, created with the partition's resource requests
  (``num_cpus``, ``num_gpus``, ``memory`` and custom resources from the manifest). Each
  actor receives the ObjectRefs of its upstream outputs, so intermediates travel between
  actors (and nodes) without passing through the driver; only the final outputs are fetched.
  Optionally the actors are bound into a Ray compiled graph, whose channels carry tensors from
  actor to actor. See :mod:`graphopt.runtime._partitioned_ray`.

Outputs equal the unsplit model's: bit for bit for stage and branch splits on CPU (each
partition runs the very nodes of the original, in the same order), within float rounding for
tensor-parallel splits (their partial sums are added in a different order).

Example:
    >>> with PartitionedSession("model.parts") as session:               # doctest: +SKIP
    ...     outputs = session.run({"x": x})                               # dict by output name
    ...     batches = list(session.run_many({"x": b} for b in batches))   # pipelined, in order
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.runtime._inputs import ORT_LEVELS, check_feed_arrays, check_provider, ort_error_text
from graphopt.runtime._manifest import Manifest, PartitionSpec, TensorSpec

__all__ = ["BACKENDS", "PartitionEvent", "PartitionedSession", "open_partition_session", "parse_device"]

logger = logging.getLogger(__name__)

#: Execution backends of :class:`PartitionedSession`.
BACKENDS = ("local", "ray")

#: Runs one partition: its input arrays in ``PartitionSpec.inputs`` order -> its outputs in
#: ``PartitionSpec.outputs`` order.
Runner = Callable[[Sequence[Any]], Sequence[Any]]


def parse_device(device: str) -> tuple[str, int]:
    """Split a manifest device into kind and index: ``cpu``, ``cuda`` or ``cuda:K``.

    Raises:
        GraphoptError: any other spelling.

    Example:
        >>> parse_device("cuda:1")
        ('cuda', 1)
        >>> parse_device("cpu")
        ('cpu', 0)
    """
    kind, sep, index = device.strip().lower().partition(":")
    if kind == "cpu" and not sep:
        return "cpu", 0
    if kind == "cuda" and (not sep or index.isdigit()):
        return "cuda", int(index) if sep else 0
    raise GraphoptError(f"unknown partition device '{device}'; use 'cpu', 'cuda' or 'cuda:K' "
                        "(K = CUDA device index)")


def open_partition_session(source: str | bytes, *, device: str = "cpu", threads: int = 1,
                           level: str = "disable", label: str = "partition",
                           device_index: int | None = None) -> Any:
    """An ``InferenceSession`` for one partition on its device.

    Args:
        source: the partition's model file (its external data lies beside it) or its bytes.
        device: ``cpu`` or ``cuda:K``; CUDA device *K* is chosen through the provider option
            ``device_id``.
        threads: intra-op threads of the session.
        level: onnxruntime graph optimizations, ``"disable"`` (bit-exact with the unsplit model
            run the same way) or ``"all"``.
        label: how error messages name the partition.
        device_index: overrides *K* (a scheduler such as Ray may have renumbered the visible GPUs).

    Raises:
        GraphoptError: unknown device or level, no CUDA provider in this onnxruntime, or a
            model onnxruntime refuses.
    """
    import onnxruntime as ort

    kind, index = parse_device(device)
    if level not in ORT_LEVELS:
        raise GraphoptError(f"unknown onnxruntime level '{level}'; choose one of {', '.join(ORT_LEVELS)}")
    if threads < 1:
        raise GraphoptError(f"threads must be at least 1 (got {threads})")
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all"
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Partitions already run concurrently with each other; ORT_PARALLEL inside one is slower.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    providers: list[Any] = ["CPUExecutionProvider"]
    if kind == "cuda":
        check_provider("cuda")
        index = index if device_index is None else device_index
        providers = [("CUDAExecutionProvider", {"device_id": str(index)}), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for refusals
        raise GraphoptError(f"onnxruntime cannot load {label}: {ort_error_text(exc)}") from None
    if kind == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise GraphoptError(f"the CUDA execution provider failed to start for {label} on device "
                            f"{index} (onnxruntime fell back to {session.get_providers()[0]}); check "
                            "the device index and the CUDA and cuDNN libraries")
    return session


@dataclass(frozen=True)
class PartitionEvent:
    """One partition run, recorded when a session is opened with ``trace=True`` (local backend).

    Attributes:
        request: number of the request (or micro-batch) in submission order, from 0.
        partition: the partition's name.
        start / end: ``time.perf_counter()`` around the onnxruntime call.
        thread: name of the worker thread that ran it.
        live: tensors the request still held once the partition was done (inputs whose last
            consumer has run are already dropped).
    """

    request: int
    partition: str
    start: float
    end: float
    thread: str
    live: tuple[str, ...]


@dataclass(frozen=True)
class _Plan:
    """What one request runs: the partitions needed for ``outputs`` and their dependencies."""

    outputs: tuple[str, ...]
    feeds: tuple[str, ...]
    partitions: tuple[int, ...]
    waiting: Mapping[int, int]
    successors: Mapping[int, tuple[int, ...]]
    sources: tuple[int, ...]
    uses: Mapping[str, int]
    #: The outputs asked for; ``outputs`` lists the tensors fetched, with each output the
    #: manifest assembles replaced by its parts.
    requested: tuple[str, ...] = ()
    assemble: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _build_plan(manifest: Manifest, outputs: Sequence[str]) -> _Plan:
    """Partitions that ``outputs`` need (backwards from them), with consumer counts per tensor."""
    requested = tuple(outputs)
    recipes = {name: entry for name, entry in manifest.assembled().items() if name in requested}
    outputs = list(dict.fromkeys(part for name in requested
                                 for part in (recipes[name]["parts"] if name in recipes else [name])))
    producer = {name: part.id for part in manifest.partitions for name in part.outputs}
    graph_inputs = {t.name for t in manifest.inputs}
    unknown = [name for name in outputs if name not in producer and name not in graph_inputs]
    if unknown:
        known = ", ".join(t.name for t in manifest.outputs)
        raise GraphoptError(f"'{unknown[0]}' is not a tensor of the partitioned model; ask for one "
                            f"of its outputs ({known})")
    needed: set[int] = set()
    stack = [producer[name] for name in outputs if name in producer]
    while stack:
        pid = stack.pop()
        if pid in needed:
            continue
        needed.add(pid)
        part = manifest.partitions[pid]
        stack.extend(producer[name] for name in part.inputs if name in producer)
        stack.extend(part.depends_on)
    order = tuple(sorted(needed))  # manifest ids are a topological order
    upstream = {pid: {producer[name] for name in manifest.partitions[pid].inputs if name in producer}
                | set(manifest.partitions[pid].depends_on) for pid in order}
    successors = {pid: tuple(sorted(s for s in order if pid in upstream[s])) for pid in order}
    uses: dict[str, int] = {}
    for pid in order:
        for name in manifest.partitions[pid].inputs:
            uses[name] = uses.get(name, 0) + 1
    for name in outputs:
        uses[name] = uses.get(name, 0) + 1  # held until the request is returned
    feeds = tuple(t.name for t in manifest.inputs if t.name in uses)
    return _Plan(outputs=tuple(outputs), feeds=feeds, partitions=order,
                 waiting={pid: len(upstream[pid]) for pid in order}, successors=successors,
                 sources=tuple(pid for pid in order if not upstream[pid]), uses=uses,
                 requested=requested, assemble=recipes)


def _assemble(plan: _Plan, tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The outputs asked for, in order: fetched as they are, or assembled from their parts.

    An assembled output is ``np.concatenate`` of its parts along the recorded axis: a copy of
    the same values, so the result equals the unsplit model's ``Concat`` bit for bit.
    """
    if not plan.assemble:
        return {name: tensors[name] for name in plan.requested}
    result: dict[str, np.ndarray] = {}
    for name in plan.requested:
        recipe = plan.assemble.get(name)
        if recipe is None:
            result[name] = tensors[name]
        else:
            result[name] = np.concatenate([np.asarray(tensors[part]) for part in recipe["parts"]],
                                          axis=int(recipe["axis"]))
    return result


class _Request:
    """One request moving through the local scheduler; its state is guarded by ``lock``."""

    __slots__ = ("done", "error", "left", "lock", "number", "plan", "tensors", "uses", "waiting")

    def __init__(self, number: int, plan: _Plan, feeds: Mapping[str, np.ndarray]) -> None:
        self.number = number
        self.plan = plan
        self.tensors: dict[str, Any] = {name: feeds[name] for name in plan.feeds}
        self.uses = dict(plan.uses)
        self.waiting = dict(plan.waiting)
        self.left = len(plan.partitions)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None
        if not self.left:
            self.done.set()

    def inputs_of(self, names: Sequence[str]) -> list[Any]:
        with self.lock:
            return [self.tensors[name] for name in names]

    def complete(self, pid: int, inputs: Sequence[str], outputs: Sequence[str],
                 results: Sequence[Any]) -> tuple[list[int], tuple[str, ...]]:
        """Store a partition's results; return the successors now ready and the live tensors."""
        ready: list[int] = []
        with self.lock:
            self.left -= 1
            if self.error is not None:  # another partition failed; the request is over
                return ready, ()
            for name, value in zip(outputs, results):
                if self.uses.get(name, 0) > 0:  # nobody reads the others
                    self.tensors[name] = value
            for name in inputs:
                self.uses[name] -= 1
                if self.uses[name] == 0:
                    del self.tensors[name]
            for successor in self.plan.successors[pid]:
                self.waiting[successor] -= 1
                if self.waiting[successor] == 0:
                    ready.append(successor)
            live = tuple(self.tensors)
            if self.left == 0:
                self.done.set()
        return ready, live

    def fail(self, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
            self.tensors.clear()
        self.done.set()


class _LocalScheduler:
    """One worker thread and one bounded queue per partition; requests flow through the DAG."""

    def __init__(self, runners: Sequence[Runner], parts: Sequence[PartitionSpec], *, queue_size: int,
                 trace: list[PartitionEvent] | None) -> None:
        self._runners = list(runners)
        self._parts = list(parts)
        self._trace = trace
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=queue_size) for _ in parts]
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True,
                                          name=f"graphopt-partition-{part.name}")
                         for i, part in enumerate(parts)]
        for thread in self._threads:
            thread.start()

    def submit(self, request: _Request) -> None:
        for pid in request.plan.sources:
            self._queues[pid].put(request)

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def _work(self, pid: int) -> None:
        q = self._queues[pid]
        runner = self._runners[pid]
        part = self._parts[pid]
        while True:
            request = q.get()
            if request is None:
                return
            if request.error is not None:
                continue
            try:
                args = request.inputs_of(part.inputs)
                start = time.perf_counter()
                results = runner(args)
                end = time.perf_counter()
            except GraphoptError as exc:
                request.fail(exc)
                continue
            except Exception as exc:  # onnxruntime's own exception types
                request.fail(GraphoptError(f"partition '{part.name}' failed: {ort_error_text(exc)}"))
                continue
            ready, live = request.complete(pid, part.inputs, part.outputs, results)
            if self._trace is not None:
                self._trace.append(PartitionEvent(request.number, part.name, start, end,
                                                  threading.current_thread().name, live))
            for successor in ready:
                self._queues[successor].put(request)


class _LocalBackend:
    """Partitions as onnxruntime sessions in this process, scheduled by :class:`_LocalScheduler`."""

    name = "local"

    def __init__(self, manifest: Manifest, devices: Sequence[str], *, threads: int, level: str,
                 queue_size: int, trace: list[PartitionEvent] | None) -> None:
        runners: list[Runner] = []
        self._devices = list(devices)
        for part, device in zip(manifest.partitions, devices):
            path = manifest.partition_path(part)
            session = open_partition_session(str(path), device=device, threads=threads, level=level,
                                             label=f"partition '{part.name}' ({part.file})")
            runners.append(_session_runner(session, part))
        self._numbers = itertools.count()
        self._scheduler = _LocalScheduler(runners, manifest.partitions, queue_size=queue_size, trace=trace)

    def submit(self, feeds: Mapping[str, np.ndarray], plan: _Plan) -> _Request:
        request = _Request(next(self._numbers), plan, feeds)
        self._scheduler.submit(request)
        return request

    def wait(self, request: _Request) -> dict[str, np.ndarray]:
        request.done.wait()
        if request.error is not None:
            raise request.error
        return {name: request.tensors[name] for name in request.plan.outputs}

    def placement(self, manifest: Manifest) -> dict[str, str]:
        return {part.name: f"{device} (thread graphopt-partition-{part.name})"
                for part, device in zip(manifest.partitions, self._devices)}

    def close(self) -> None:
        self._scheduler.close()


def _session_runner(session: Any, part: PartitionSpec) -> Runner:
    """Check that a partition's model matches the manifest; return the function that runs it."""
    session_inputs = [i.name for i in session.get_inputs()]
    session_outputs = {o.name for o in session.get_outputs()}
    extra = [name for name in session_inputs if name not in part.inputs]
    if extra:
        raise GraphoptError(f"partition '{part.name}' ({part.file}) reads '{extra[0]}', which its "
                            f"manifest entry does not list as an input; regenerate the partitions")
    missing = [name for name in part.outputs if name not in session_outputs]
    if missing:
        raise GraphoptError(f"partition '{part.name}' ({part.file}) has no output '{missing[0]}' "
                            "that the manifest promises; regenerate the partitions")
    positions = [part.inputs.index(name) for name in session_inputs]
    output_names = list(part.outputs)
    run = session.run

    def runner(args: Sequence[Any]) -> Sequence[Any]:
        return run(output_names, {name: args[i] for name, i in zip(session_inputs, positions)})

    return runner


def _check_feeds(specs: Sequence[TensorSpec], feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check names, element types, ranks and fixed dims of feeds against the manifest's inputs."""
    if not isinstance(feeds, Mapping):
        raise GraphoptError(f"feeds must be a mapping of input name to array, not {type(feeds).__name__}")
    declared: dict[str, tuple[np.dtype | None, Sequence[Any] | None, str]] = {}
    for spec in specs:
        try:
            dtype: np.dtype | None = np.dtype(spec.dtype)
        except TypeError:
            dtype = None  # a type numpy does not name (bfloat16...): onnxruntime checks it
        declared[spec.name] = (dtype, spec.shape, spec.dtype)
    return check_feed_arrays(declared, feeds, model="the partitioned model")


def _split_batch(feeds: Mapping[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """Split every input along axis 0 into ``parts`` micro-batches."""
    sizes = {name: (array.shape[0] if array.ndim else None) for name, array in feeds.items()}
    batch = {size for size in sizes.values()}
    if len(batch) != 1 or None in batch:
        raise GraphoptError(f"micro_batches={parts} splits every input along axis 0, but the inputs "
                            f"have axis-0 sizes {sizes}; use micro_batches=1")
    (size,) = batch
    if size < parts:
        raise GraphoptError(f"micro_batches={parts} needs a batch of at least {parts} on axis 0 "
                            f"(the inputs have {size})")
    bounds = np.linspace(0, size, parts + 1).astype(int)
    return [{name: array[lo:hi] for name, array in feeds.items()} for lo, hi in zip(bounds, bounds[1:])]


def _check_row_independent(manifest: Manifest) -> None:
    """Refuse micro-batches unless every node provably computes each row of axis 0 on its own."""
    import onnx

    from graphopt.runtime._batch_rows import row_independence_problem

    protos = [onnx.load(str(manifest.partition_path(part)), load_external_data=False)
              for part in manifest.partitions]
    recipes = manifest.assembled()
    ranks = {t.name: len(t.shape) for t in manifest.outputs if t.shape is not None}
    for name, recipe in recipes.items():
        axis = int(recipe["axis"])
        if axis == 0 or (name in ranks and axis == -ranks[name]):
            raise GraphoptError(f"micro-batches would change the outputs: output '{name}' is assembled "
                                "along axis 0; run with micro_batches=1 (--micro-batches 1)")
    joined = [part for t in manifest.outputs
              for part in (recipes[t.name]["parts"] if t.name in recipes else [t.name])]
    problem = row_independence_problem(protos, [t.name for t in manifest.inputs], joined)
    if problem:
        raise GraphoptError(f"micro-batches would change the outputs: {problem}; run with "
                            "micro_batches=1 (--micro-batches 1)")


def _join_batches(chunks: Sequence[Mapping[str, Any]], sizes: Sequence[int],
                  names: Sequence[str]) -> dict[str, np.ndarray]:
    """Concatenate micro-batch outputs along axis 0, refusing outputs that do not keep the batch."""
    joined: dict[str, np.ndarray] = {}
    for name in names:
        pieces = [np.asarray(chunk[name]) for chunk in chunks]
        if any(piece.ndim == 0 or piece.shape[0] != size for piece, size in zip(pieces, sizes)):
            raise GraphoptError(f"output '{name}' does not keep the batch on axis 0, so micro-batch "
                                "results cannot be joined; use micro_batches=1")
        joined[name] = np.concatenate(pieces, axis=0)
    return joined


class PartitionedSession:
    """Run the partitions of a ``graphopt partition`` folder as one model.

    Args:
        manifest_or_dir: a :class:`Manifest`, its folder, or its ``manifest.json``.
        backend: ``"local"`` (threads and onnxruntime sessions in this process) or ``"ray"``
            (one Ray actor per partition; needs ``pip install "graphopt[ray]"``).
        devices: per-partition device overrides, by partition name (``{"stage1": "cuda:0"}``);
            other partitions run on the manifest's ``device``.
        threads: intra-op threads of each partition's onnxruntime session.
        level: onnxruntime graph optimizations in each session: ``"disable"`` (default; outputs
            are bit-exact with the unsplit model run the same way) or ``"all"``.
        micro_batches: :meth:`run` splits its inputs along axis 0 into this many micro-batches
            and pipelines them through the stages (every input and output must carry the batch
            on axis 0).
        queue_size: bound of each partition's input queue (local backend).
        max_in_flight: requests :meth:`run_many` keeps submitted at once (default: twice the
            number of partitions, enough to keep every stage busy).
        trace: record a :class:`PartitionEvent` per partition run in :attr:`trace` (local backend).
        ray_address: address of the Ray cluster to join; without it an initialized Ray is
            reused, otherwise a local one is started (and shut down by :meth:`close`).
        ray_timeout: seconds to wait for every actor to start (resources must be available).
        ray_compiled: bind the actors into a Ray compiled graph (channels from actor to actor:
            about 3x less overhead per hop on an idle machine, but each idle actor polls its
            channels, ~14% of a core here); by default requests are chained actor calls passing
            ObjectRefs. Either way the driver fetches only final outputs.

    Raises:
        GraphoptError: a missing or malformed manifest, an unknown backend or device, CUDA
            without a CUDA provider, a partition file that does not match its manifest entry,
            Ray missing or actors that cannot be placed.

    Example:
        >>> with PartitionedSession("bert.parts", micro_batches=4) as session:  # doctest: +SKIP
        ...     logits = session.run({"input_ids": ids})["logits"]
    """

    def __init__(self, manifest_or_dir: Manifest | str | os.PathLike, *, backend: str = "local",
                 devices: Mapping[str, str] | None = None, threads: int = 1, level: str = "disable",
                 micro_batches: int = 1, queue_size: int = 2, max_in_flight: int | None = None,
                 trace: bool = False, ray_address: str | None = None, ray_timeout: float = 60.0,
                 ray_compiled: bool = False) -> None:
        self._closed = True
        manifest = manifest_or_dir if isinstance(manifest_or_dir, Manifest) else Manifest.load(manifest_or_dir)
        if isinstance(manifest_or_dir, Manifest):
            manifest.validate(check_files=True)
        if backend not in BACKENDS:
            raise GraphoptError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        if micro_batches < 1:
            raise GraphoptError(f"micro_batches must be at least 1 (got {micro_batches})")
        if queue_size < 1:
            raise GraphoptError(f"queue_size must be at least 1 (got {queue_size})")
        names = {part.name for part in manifest.partitions}
        unknown = sorted(set(devices or {}) - names)
        if unknown:
            raise GraphoptError(f"devices names partition '{unknown[0]}', which the manifest does not "
                                f"have (partitions: {', '.join(p.name for p in manifest.partitions)})")
        device_list = [(devices or {}).get(part.name, part.device) for part in manifest.partitions]
        for device in device_list:
            parse_device(device)
        if micro_batches > 1:
            _check_row_independent(manifest)
        self.manifest = manifest
        self.backend = backend
        self.micro_batches = micro_batches
        self.max_in_flight = max_in_flight or 2 * max(1, len(manifest.partitions))
        #: Partition runs recorded when ``trace=True`` (local backend), in completion order.
        self.trace: list[PartitionEvent] = []
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._lock = threading.Lock()
        if backend == "local":
            self._backend: Any = _LocalBackend(manifest, device_list, threads=threads, level=level,
                                               queue_size=queue_size, trace=self.trace if trace else None)
        else:
            from graphopt.runtime._partitioned_ray import RayBackend

            self._backend = RayBackend(manifest, device_list, threads=threads, level=level,
                                       address=ray_address, timeout=ray_timeout,
                                       compiled=ray_compiled, max_in_flight=self.max_in_flight)
        # Workers and actors stop with the session even if close() is never called.
        self._finalizer = weakref.finalize(self, self._backend.close)
        self._closed = False
        logger.info("opened %d partition(s) of %s on the %s backend", len(manifest.partitions),
                    manifest.source_model or manifest.base_dir, backend)

    @property
    def input_names(self) -> list[str]:
        """Names of the model's inputs, in manifest order."""
        return [t.name for t in self.manifest.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the model's outputs, in manifest order (the order :meth:`run` returns them)."""
        return [t.name for t in self.manifest.outputs]

    def placement(self) -> dict[str, str]:
        """Where each partition runs, by partition name (device and thread, or Ray node and pid)."""
        self._check_open()
        return self._backend.placement(self.manifest)

    def run(self, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model once; returns ``{output name: array}`` in manifest output order.

        Unlike ``InferenceSession.run(output_names, feeds)`` the feeds come first and the
        result is a dict; ``list(result.values())`` gives onnxruntime's list form.

        Args:
            feeds: an array for every model input, by name.
            outputs: the outputs wanted (default: all); only the partitions they need run
                (on the Ray backend with a compiled graph every partition runs).

        Raises:
            GraphoptError: a missing, unknown or mistyped input, or a partition that fails.
        """
        self._check_open()
        checked = _check_feeds(self.manifest.inputs, feeds)
        plan = self._plan(outputs)
        if self.micro_batches == 1:
            return _assemble(plan, self._backend.wait(self._backend.submit(checked, plan)))
        chunks = _split_batch(checked, self.micro_batches)
        results = list(self._stream(chunks, plan))
        sizes = [next(iter(chunk.values())).shape[0] for chunk in chunks]
        return _join_batches(results, sizes, plan.requested)

    def run_many(self, requests: Iterable[Mapping[str, Any]],
                 outputs: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Run many requests pipelined across the partitions; yields their outputs in order.

        Up to ``max_in_flight`` requests are in the pipeline at once, so while stage 2 works on
        request *i*, stage 1 already works on request *i+1*. The iterator is lazy: requests are
        read and submitted as results are taken.

        Example:
            >>> results = list(session.run_many({"x": batch} for batch in batches))  # doctest: +SKIP
        """
        self._check_open()
        plan = self._plan(outputs)
        checked = (_check_feeds(self.manifest.inputs, feeds) for feeds in requests)
        return self._stream(checked, plan)

    def close(self) -> None:
        """Stop the worker threads or Ray actors (and a Ray runtime this session started)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer()
        logger.info("closed the partitioned session (%s backend)", self.backend)

    def __enter__(self) -> PartitionedSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise GraphoptError("the partitioned session is closed; open a new PartitionedSession")

    def _plan(self, outputs: Sequence[str] | None) -> _Plan:
        key = tuple(outputs) if outputs is not None else tuple(self.output_names)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _build_plan(self.manifest, key)
        return plan

    def _stream(self, requests: Iterable[Mapping[str, np.ndarray]], plan: _Plan) -> Iterator[dict[str, np.ndarray]]:
        pending: deque[Any] = deque()
        for feeds in requests:
            self._check_open()
            pending.append(self._backend.submit(feeds, plan))
            if len(pending) >= self.max_in_flight:
                yield _assemble(plan, self._backend.wait(pending.popleft()))
        while pending:
            yield _assemble(plan, self._backend.wait(pending.popleft()))
