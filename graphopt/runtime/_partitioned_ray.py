"""The Ray backend of :class:`~graphopt.runtime.PartitionedSession`: one actor per partition.

Each partition becomes one Ray actor holding its onnxruntime session, created with the
partition's resource requests from the manifest: ``num_cpus``, ``num_gpus`` and ``memory`` go
to the matching actor options, every other key is a custom resource (``{"node_a": 1}`` pins a
partition to the nodes that offer ``node_a``). A ``cuda:K`` partition that asks for no GPU gets
``num_gpus=1``; Ray then makes its GPU the first visible one, so the session uses device 0 of
what the actor sees.

Requests run in one of two ways; in both the driver hands over the graph inputs, never sees
an intermediate, and fetches the final outputs once:

- **chained calls** (default): each request is a chain of actor calls, each given the
  ObjectRefs of the upstream outputs it reads, so Ray moves intermediates from actor to actor
  (across nodes if need be). Calls from one driver run in submission order on each actor, so
  consecutive requests pipeline across the actors. Small graph inputs read by one partition
  travel inline with the call; others are put into the object store once. (Ray's ownership
  protocol returns results under 100 KB to the process that submitted the call, the driver,
  which inlines them into the next call; larger ones stay in the producing node's object store
  and go from there to the consumer.)
- **compiled graph** (``compiled=True``): once the actors are up they are bound into a Ray
  compiled graph (``ray.dag``), one node per partition. Each actor then runs a loop reading its
  inputs from channels that upstream actors write (shared memory on one node, transfers between
  nodes), so a hop costs a channel write and read instead of a task submission; up to
  ``max_in_flight`` requests are in the graph at once, pipelining across the actors. A graph
  needs every partition to read something, so a partition without inputs falls back to chained
  calls. The price: an idle actor keeps polling its channels (about 14% of a core each,
  measured), and only model outputs can be asked for. Ray calls compiled graphs an alpha feature.

Results are copied out of Ray's buffers, so they are ordinary writable arrays.

Without a cluster address, and with none running in the process, a local Ray runtime is started
for the session (and shut down by ``close``) with at least as many logical CPUs as the
partitions request together, since a plan asking one CPU per stage must still run on a
two-core machine; a cluster that is joined schedules with its own counts.

Partition files are sent through the object store as bytes, so actors on other nodes need no
shared filesystem; a partition whose weights are stored as external data is opened from its
path, which must then be readable at the same path on every node. graphopt must be installed
where the actors run.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.runtime._inputs import ort_error_text
from graphopt.runtime._manifest import Manifest, PartitionSpec
from graphopt.runtime._partitioned import (
    _build_plan,
    _Plan,
    _session_runner,
    open_partition_session,
    parse_device,
)

__all__ = ["RAY_EXTRA", "PartitionWorker", "RayBackend", "actor_options"]

logger = logging.getLogger(__name__)

#: The optional dependency group that brings Ray.
RAY_EXTRA = "ray"

#: Graph inputs up to this size that one partition reads are passed inline with the call.
_INLINE_BYTES = 64 * 1024


def actor_options(part: PartitionSpec, device: str) -> dict[str, Any]:
    """Ray actor options from a partition's manifest ``resources`` and device.

    Example:
        >>> spec = PartitionSpec(0, "s0", "s0.onnx", resources={"num_cpus": 1, "node_a": 1})
        >>> actor_options(spec, "cpu")
        {'num_cpus': 1, 'resources': {'node_a': 1}}
    """
    resources = {key: value for key, value in part.resources.items()}
    options: dict[str, Any] = {}
    for key in ("num_cpus", "num_gpus", "memory"):
        if key in resources:
            options[key] = resources.pop(key)
    if parse_device(device)[0] == "cuda" and not options.get("num_gpus"):
        options["num_gpus"] = 1
    custom = {key: value for key, value in resources.items() if value}
    if custom:
        options["resources"] = custom
    return options


class PartitionWorker:
    """The body of a partition's Ray actor: one onnxruntime session and its runner.

    A failure to open the session is kept and reported by :meth:`ready`, so the driver can
    raise it as a one-line :class:`GraphoptError` instead of a dead-actor traceback.
    """

    def __init__(self, part: PartitionSpec, source: str | bytes, device: str, threads: int,
                 level: str) -> None:
        import ray

        self._name = part.name
        self._device = device
        self._error = ""
        self._providers: list[str] = []
        try:
            # Ray restricts the actor's visible GPUs to the ones it assigned, renumbered from 0.
            index = 0 if parse_device(device)[0] == "cuda" and ray.get_gpu_ids() else None
            session = open_partition_session(source, device=device, threads=threads, level=level,
                                             label=f"partition '{part.name}' ({part.file})",
                                             device_index=index)
            self._runner = _session_runner(session, part)
            self._providers = list(session.get_providers())
        except GraphoptError as exc:
            self._error = str(exc)

    def ready(self) -> dict[str, Any]:
        """Where the actor runs, and the error that kept its session from opening (or ``""``)."""
        import ray

        return {"error": self._error, "node": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "providers": self._providers}

    def run(self, *args: Any) -> Any:
        """Run the partition on its inputs (manifest order); one output as is, several as a tuple."""
        try:
            results = self._runner(args)
        except Exception as exc:  # onnxruntime's own exception types
            raise GraphoptError(f"partition '{self._name}' failed: {ort_error_text(exc)}") from None
        return results[0] if len(results) == 1 else tuple(results)


def _partition_source(path: os.PathLike | str) -> str | bytes:
    """The file's bytes, or its path when weights lie in external data files beside it."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(os.fspath(path), load_external_data=False)
    if any(uses_external_data(tensor) for tensor in model.graph.initializer):
        return os.fspath(path)
    with open(path, "rb") as f:
        return f.read()


def _failure_text(exc: BaseException) -> str:
    """The message of the error raised inside an actor, without Ray's traceback wrapping."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return str(cause).strip().splitlines()[0]
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class _RayRequest:
    """A submitted request: output names and their ObjectRefs (or graph inputs passed through)."""

    __slots__ = ("outputs", "values")

    def __init__(self, outputs: Sequence[str], values: Mapping[str, Any]) -> None:
        self.outputs = tuple(outputs)
        self.values = [values[name] for name in outputs]


class RayBackend:
    """Runs each partition in its own Ray actor; see the module docstring.

    Raises:
        GraphoptError: Ray not installed, a cluster that cannot be joined, an actor that cannot
            be placed within ``timeout`` seconds (resources the cluster lacks), or a session
            that cannot be opened.
    """

    name = "ray"

    def __init__(self, manifest: Manifest, devices: Sequence[str], *, threads: int, level: str,
                 address: str | None, timeout: float, compiled: bool = False,
                 max_in_flight: int = 8) -> None:
        try:
            import ray
        except ImportError:
            raise GraphoptError("the ray backend needs Ray; install it with "
                                f"pip install \"graphopt[{RAY_EXTRA}]\" or use the local backend") from None
        self._ray = ray
        self._parts = list(manifest.partitions)
        self._devices = list(devices)
        self._actors: list[Any] = []
        self._infos: list[dict[str, Any]] = []
        self._owns_runtime = False
        self._graph: Any = None
        self._graph_outputs: dict[str, int] = {}
        self._graph_lock = threading.Lock()
        if not ray.is_initialized():
            # A runtime started here for this session offers as many logical CPUs as the plan
            # asks for: Ray's CPU counts only schedule, and a 4-stage plan asking one CPU per
            # stage should run on a 2-core machine. A cluster to join keeps its own counts.
            # (Ray itself joins the cluster named by RAY_ADDRESS when given no address.)
            joins = bool(address or os.environ.get("RAY_ADDRESS"))
            local_cpus = None if joins else max(os.cpu_count() or 1, math.ceil(sum(
                float(actor_options(p, d).get("num_cpus", 0)) for p, d in zip(self._parts, devices))))
            try:
                ray.init(address=address, num_cpus=local_cpus, include_dashboard=False,
                         log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
                where = f" at '{address}'" if address else ""
                raise GraphoptError(f"cannot start or join a Ray cluster{where}: {exc}") from None
            self._owns_runtime = True
        try:
            self._start_actors(manifest, threads, level, timeout)
            self._full_plan = _build_plan(manifest, [t.name for t in manifest.outputs])
            if compiled and self._full_plan.feeds and all(p.inputs for p in self._parts):
                self._compile(max_in_flight)
        except BaseException:
            self.close()
            raise

    @property
    def compiled(self) -> bool:
        """Whether requests run through a Ray compiled graph (else as chained actor calls)."""
        return self._graph is not None

    def _start_actors(self, manifest: Manifest, threads: int, level: str, timeout: float) -> None:
        ray = self._ray
        worker_class = ray.remote(PartitionWorker)
        for part, device in zip(self._parts, self._devices):
            source = _partition_source(manifest.partition_path(part))
            if isinstance(source, bytes):
                source = ray.put(source)  # resolved to bytes inside the actor's constructor
            options = actor_options(part, device)
            actor = worker_class.options(max_concurrency=1, **options).remote(part, source, device,
                                                                               threads, level)
            self._actors.append(actor)
        ready = [actor.ready.remote() for actor in self._actors]
        _, pending = ray.wait(ready, num_returns=len(ready), timeout=timeout)
        if pending:
            raise self._placement_error([ready.index(ref) for ref in pending], timeout)
        try:
            self._infos = ray.get(ready)
        except ray.exceptions.RayError as exc:
            raise GraphoptError(f"a partition's Ray actor failed to start: {_failure_text(exc)}") from None
        for info in self._infos:
            if info["error"]:
                raise GraphoptError(info["error"])
        self._methods = [actor.run.options(num_returns=len(part.outputs))
                         for actor, part in zip(self._actors, self._parts)]
        logger.info("started %d Ray actor(s) on %d node(s)", len(self._actors),
                    len({info["node"] for info in self._infos}))

    def _placement_error(self, pending: Sequence[int], timeout: float) -> GraphoptError:
        """Name a partition that did not start: one asking more than the cluster has, if any."""
        totals = self._ray.cluster_resources()
        for index in pending:
            options = actor_options(self._parts[index], self._devices[index])
            asked = {key: options[key] for key in ("num_cpus", "num_gpus", "memory") if key in options}
            asked.update(options.get("resources", {}))
            names = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
            short = [key for key, value in asked.items() if totals.get(names.get(key, key), 0) < value]
            if short:
                return GraphoptError(
                    f"partition '{self._parts[index].name}' got no Ray worker within {timeout:g} s: "
                    f"it requests {short[0]}={asked[short[0]]:g} but the cluster offers "
                    f"{totals.get(names.get(short[0], short[0]), 0):g}; add nodes that offer it or "
                    "change the manifest's resources")
        name = self._parts[pending[0]].name
        return GraphoptError(f"partition '{name}' got no Ray worker within {timeout:g} s although the "
                             "cluster has the resources it requests (busy cluster or slow worker "
                             "start); raise ray_timeout")

    def _compile(self, max_in_flight: int) -> None:
        """Bind the actors into one Ray compiled graph: channels from actor to actor."""
        from ray.dag import InputNode, MultiOutputNode

        plan = self._full_plan
        consumed = {name for part in self._parts for name in part.inputs}
        leaves: list[str] = []
        with InputNode() as source:
            nodes: dict[str, Any] = {name: source[i] for i, name in enumerate(plan.feeds)}
            for pid in plan.partitions:
                part = self._parts[pid]
                count = len(part.outputs)
                method = self._actors[pid].run.options(num_returns=count) if count > 1 else self._actors[pid].run
                bound = method.bind(*[nodes[name] for name in part.inputs])
                nodes.update(zip(part.outputs, list(bound) if count > 1 else [bound]))
                # Every result must leave the graph somewhere: unread ones are fetched and dropped.
                leaves += [name for name in part.outputs if name in plan.outputs or name not in consumed]
            graph = MultiOutputNode([nodes[name] for name in leaves])
        self._graph = graph.experimental_compile(_max_inflight_executions=max_in_flight)
        self._graph_outputs = {name: i for i, name in enumerate(leaves)}
        logger.info("compiled the %d partition actor(s) into a Ray graph", len(self._actors))

    def submit(self, feeds: Mapping[str, np.ndarray], plan: _Plan) -> _RayRequest:
        if self._graph is not None:
            inner = [name for name in plan.outputs
                     if name not in self._graph_outputs and name not in self._full_plan.feeds]
            if inner:
                raise GraphoptError(f"'{inner[0]}' is an intermediate tensor, which a Ray compiled "
                                    "graph does not return; ask for model outputs or open the "
                                    "session with ray_compiled=False")
            with self._graph_lock:
                refs = self._graph.execute(*[feeds[name] for name in self._full_plan.feeds])
            values = {name: refs[i] for name, i in self._graph_outputs.items() if name in plan.outputs}
            values.update({name: feeds[name] for name in plan.outputs if name not in values})
            return _RayRequest(plan.outputs, values)
        return self._submit_calls(feeds, plan)

    def _submit_calls(self, feeds: Mapping[str, np.ndarray], plan: _Plan) -> _RayRequest:
        ray = self._ray
        uses = dict(plan.uses)
        refs: dict[str, Any] = {}
        for name in plan.feeds:
            value = feeds[name]
            shared = uses[name] > 1 or value.nbytes > _INLINE_BYTES
            refs[name] = ray.put(value) if shared else value
        for pid in plan.partitions:
            part = self._parts[pid]
            produced = self._methods[pid].remote(*[refs[name] for name in part.inputs])
            if len(part.outputs) == 1:
                produced = [produced]
            for name in part.inputs:
                uses[name] -= 1
                if uses[name] == 0:
                    del refs[name]  # the call holds its own reference until it has run
            for name, ref in zip(part.outputs, produced):
                if uses.get(name, 0) > 0:
                    refs[name] = ref
        return _RayRequest(plan.outputs, refs)

    def wait(self, request: _RayRequest) -> dict[str, np.ndarray]:
        ray = self._ray
        positions = [i for i, value in enumerate(request.values) if not isinstance(value, np.ndarray)]
        try:
            if not positions:
                fetched = []
            elif self._graph is not None:
                with self._graph_lock:  # a compiled graph's results are read by one thread at a time
                    fetched = ray.get([request.values[i] for i in positions], timeout=-1)
            else:
                fetched = ray.get([request.values[i] for i in positions])
        except ray.exceptions.RayTaskError as exc:
            raise GraphoptError(_failure_text(exc)) from None
        except ray.exceptions.RayError as exc:
            raise GraphoptError(f"a partition's Ray actor was lost: {_failure_text(exc)}") from None
        values = list(request.values)
        for i, value in zip(positions, fetched):
            # Copies: results may be read-only views of Ray buffers that get reused.
            values[i] = np.array(value, copy=True)
        return dict(zip(request.outputs, values))

    def placement(self, manifest: Manifest) -> dict[str, str]:
        return {part.name: f"{device} (Ray node {info['node'][:12]}, pid {info['pid']})"
                for part, device, info in zip(self._parts, self._devices, self._infos)}

    def close(self) -> None:
        ray = self._ray
        if self._graph is not None:
            try:
                self._graph.teardown()
            except Exception as exc:  # the actors may already be gone
                logger.debug("could not tear the compiled graph down: %s", exc)
            self._graph = None
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # the runtime may already be gone
                logger.debug("could not kill a partition actor: %s", exc)
        self._actors.clear()
        if self._owns_runtime:
            self._owns_runtime = False
            try:
                ray.shutdown()
            except Exception as exc:  # at interpreter exit Ray may have shut itself down first
                logger.debug("could not shut Ray down: %s", exc)
