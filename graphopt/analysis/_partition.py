"""Partition planning: pipeline stages cut from a topological order, and parallel branches.

**Stages.** Nodes stay in the graph's topological order and each stage is a contiguous run of it,
so stage ``k`` reads only graph inputs and outputs of stages before it: stages never form a
cycle. The search has two steps:

1. The smallest bottleneck ``B`` (the cost of the slowest stage) for which ``K`` stages fit: a
   bisection on ``B`` with a greedy check (extend a stage while its cost stays under ``B`` and
   its memory, weights plus peak live activations, stays under the budget).
2. Among the splits whose every stage costs at most ``B + tolerance·total/K`` and fits the budget, the
   one sending the fewest bytes across cuts: a dynamic program over cut positions,
   ``best[k][j] = cut_bytes[j] + min(best[k-1][i] for i in [lo(j), j))``, where the stages
   ending at ``j`` that fit start at ``lo(j)`` or later (a two-pointer window, so the program
   runs in ``O(K·n)`` with a sliding minimum). Among the splits sending those fewest bytes, a
   bisection on the cap picks one with the lowest slowest stage.

A stage's cost is its FLOPs (``balance="flops"``), its memory (``"memory"``), or a roofline
latency (``"latency"``: per node ``max(FLOPs / peak FLOP/s, bytes moved / memory bandwidth)``).
Values recomputable from constants and graph inputs (:class:`GraphCost.recomputable`) are
cloned into the stages that need them and cost nothing at a cut.

**Branches.** Nodes through which every path from the graph inputs to the outputs passes (the
dominators of a virtual sink, found with networkx) split the graph into a chain of regions;
removing them, the weakly connected components inside one region are independent branches
(the towers of a multi-tower model, the members of an ensemble, the heads of a multi-head
model). Each branch becomes a partition that may run concurrently with its siblings; the
pieces between parallel regions become stages.

Example:
    >>> plan = plan_stages(graph_cost(model), stages=4)  # doctest: +SKIP
    >>> [round(p.flops / plan.total_flops, 2) for p in plan.partitions]  # doctest: +SKIP
    [0.25, 0.25, 0.25, 0.25]
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from graphopt.analysis._cost import GraphCost, peak_activation_bytes
from graphopt.errors import GraphoptError

__all__ = ["BALANCES", "DeviceModel", "PartitionPlan", "PlannedPartition", "chain_cut_bytes",
           "find_branches", "plan_branches", "plan_groups", "plan_stages"]

logger = logging.getLogger(__name__)

BALANCES = ("flops", "memory", "latency")


@dataclass(frozen=True)
class DeviceModel:
    """A device as the cost model sees it: peak FLOP/s, memory bandwidth, link bandwidth (B/s).

    The defaults describe one modern x86 CPU socket running fp32 at a realistic rate; pass your
    own to predict throughput on hardware that is not at hand.
    """

    name: str = "cpu"
    flops_per_second: float = 200e9
    memory_bandwidth: float = 50e9
    link_bandwidth: float = 10e9

    @classmethod
    def for_device(cls, device: str) -> DeviceModel:
        """A default model for ``cpu`` or ``cuda[:K]`` (an A100-class GPU over PCIe 4)."""
        if device.startswith("cuda"):
            return cls(device, 19.5e12, 1.5e12, 25e9)
        return cls(device)

    def seconds(self, flops: float, moved_bytes: float) -> float:
        """Roofline time of work of ``flops`` touching ``moved_bytes``."""
        return max(flops / self.flops_per_second, moved_bytes / self.memory_bandwidth)


@dataclass
class PlannedPartition:
    """One partition of a plan.

    Attributes:
        name: ``stage0``, ``branch1``...
        kind: ``stage`` or ``branch`` (as in the manifest).
        nodes: indices into the :class:`GraphCost` node order (clones of recomputable nodes
            are added at emission).
        device: where it should run.
        flops / weight_bytes / peak_activation_bytes: its costs.
        bytes_in: bytes it receives from other partitions per run.
        bytes_out: bytes it sends to other partitions per run.
        depends_on: indices of the partitions it reads from.
    """

    name: str
    kind: str
    nodes: list[int]
    device: str = "cpu"
    flops: int = 0
    weight_bytes: int = 0
    peak_activation_bytes: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    depends_on: list[int] = field(default_factory=list)

    @property
    def memory_bytes(self) -> int:
        """Weights plus peak live activations."""
        return self.weight_bytes + self.peak_activation_bytes


@dataclass
class PartitionPlan:
    """The result of planning: partitions in a topological order, and the plan's figures.

    Attributes:
        partitions: the partitions; every one reads only graph inputs and earlier partitions.
        strategy: ``stages``, ``memory-budget``, ``devices`` or ``branches``.
        balance: what was balanced (``flops``, ``memory``, ``latency``).
        total_flops / total_weight_bytes: of the whole model.
        cut_bytes: bytes crossing between partitions per run.
        memory_budget: the per-partition budget, if any.
        dims: sizes the symbolic dims were bound to.
    """

    partitions: list[PlannedPartition]
    strategy: str
    balance: str
    total_flops: int
    total_weight_bytes: int
    cut_bytes: int
    memory_budget: int | None = None
    dims: dict[str, int] = field(default_factory=dict)

    @property
    def bottleneck_flops(self) -> int:
        """FLOPs of the heaviest partition."""
        return max((p.flops for p in self.partitions), default=0)

    def balance_ratio(self) -> float:
        """Heaviest partition's FLOPs over an even share (1.0 = perfectly balanced)."""
        k = len(self.partitions)
        return self.bottleneck_flops / (self.total_flops / k) if self.total_flops and k else 1.0

    def predicted_throughput(self, devices: Sequence[DeviceModel] | None = None) -> dict[str, float]:
        """Predicted steady-state pipeline throughput (runs per second) and one run's latency.

        Each partition runs on its own device (``devices[i]``, or a default model of the
        partition's device); a stage's time is its roofline time plus receiving its inputs over
        the device link. Stages overlap on consecutive runs, so throughput is one over the
        slowest stage; branches of one region run concurrently.
        """
        times = []
        for i, part in enumerate(self.partitions):
            device = devices[i % len(devices)] if devices else DeviceModel.for_device(part.device)
            moved = part.weight_bytes + part.peak_activation_bytes
            times.append(device.seconds(part.flops, moved) + part.bytes_in / device.link_bandwidth)
        slowest = max(times, default=0.0)
        single = DeviceModel.for_device(self.partitions[0].device if self.partitions else "cpu")
        unsplit = single.seconds(self.total_flops, self.total_weight_bytes)
        return {"runs_per_second": 1.0 / slowest if slowest else math.inf,
                "slowest_stage_seconds": slowest, "latency_seconds": sum(times),
                "unsplit_runs_per_second": 1.0 / unsplit if unsplit else math.inf}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (node indices left out)."""
        parts = []
        for p in self.partitions:
            d = asdict(p)
            d["nodes"] = len(p.nodes)
            parts.append(d)
        return {"strategy": self.strategy, "balance": self.balance, "total_flops": self.total_flops,
                "total_weight_bytes": self.total_weight_bytes, "cut_bytes": self.cut_bytes,
                "memory_budget": self.memory_budget, "dims": dict(self.dims),
                "bottleneck_flops": self.bottleneck_flops, "balance_ratio": self.balance_ratio(),
                "partitions": parts}


# -- stage costs ---------------------------------------------------------------------------------

def _node_costs(cost: GraphCost, balance: str, device: DeviceModel) -> list[float]:
    if balance == "flops":
        return [float(f) for f in cost.flops]
    if balance == "latency":
        out = []
        for i in range(len(cost)):
            moved = (sum(cost.weight_bytes[w] for w in cost.node_weights[i])
                     + sum(cost.value_bytes.get(v, 0) for v in cost.node_reads[i])
                     + sum(cost.value_bytes.get(v, 0) for v in cost.node_writes[i]))
            out.append(device.seconds(cost.flops[i], moved))
        return out
    return [0.0] * len(cost)


class _Window:
    """A run ``[start, end)`` of the node order with its cost and memory, grown and shrunk by one."""

    def __init__(self, cost: GraphCost, node_cost: list[float], live: list[int], by_memory: bool) -> None:
        self.cost = cost
        self.node_cost = node_cost
        self.live = live
        self.by_memory = by_memory
        self.reset(0)

    def reset(self, start: int) -> None:
        self.start = self.end = start
        self.total = 0.0
        self.weights: Counter = Counter()
        self.weight_total = 0
        self.peak: deque[int] = deque()  # indices with decreasing live bytes (sliding maximum)

    def push(self) -> None:
        j = self.end
        self.end += 1
        self.total += self.node_cost[j]
        for w in self.cost.node_weights[j]:
            if self.weights[w] == 0:
                self.weight_total += self.cost.weight_bytes[w]
            self.weights[w] += 1
        while self.peak and self.live[self.peak[-1]] <= self.live[j]:
            self.peak.pop()
        self.peak.append(j)

    def pop(self) -> None:
        i = self.start
        self.start += 1
        self.total -= self.node_cost[i]
        for w in self.cost.node_weights[i]:
            self.weights[w] -= 1
            if self.weights[w] == 0:
                self.weight_total -= self.cost.weight_bytes[w]
        if self.peak and self.peak[0] == i:
            self.peak.popleft()

    @property
    def memory(self) -> int:
        return self.weight_total + (self.live[self.peak[0]] if self.peak else 0)

    @property
    def value(self) -> float:
        return float(self.memory) if self.by_memory else self.total


def _greedy_count(window: _Window, n: int, cap: float, budget: float) -> int:
    """Fewest stages with every stage's cost <= cap and memory <= budget (inf when impossible)."""
    count = 0
    window.reset(0)
    while window.start < n:
        count += 1
        window.push()
        if window.value > cap or window.memory > budget:
            return math.inf  # type: ignore[return-value]
        while window.end < n:
            window.push()
            if window.value > cap or window.memory > budget:
                # undo the last push by restarting the window at the node that did not fit
                window.reset(window.end - 1)
                break
        else:
            break
    return count


def _min_bottleneck(window: _Window, n: int, k: int, budget: float, upper: float) -> float:
    lo, hi = 0.0, upper
    if _greedy_count(window, n, hi, budget) > k:
        return math.inf
    for _ in range(60):
        if hi - lo <= max(1e-9 * hi, 1e-12):
            break
        mid = (lo + hi) / 2
        if _greedy_count(window, n, mid, budget) <= k:
            hi = mid
        else:
            lo = mid
    return hi


def _window_starts(window: _Window, n: int, cap: float, budget: float) -> list[int]:
    """``lo[j]``: the earliest start of a run ending before ``j`` that fits (``j`` itself if none)."""
    lo = [0] * (n + 1)
    window.reset(0)
    for j in range(1, n + 1):
        window.push()
        while window.start < j and (window.value > cap or window.memory > budget):
            window.pop()
        lo[j] = window.start if (window.value <= cap and window.memory <= budget) else j
    return lo


def _tightest_cap(window: _Window, n: int, k: int, budget: float, cut: list[int], cuts: list[int],
                  best: float, slack: float, steps: int = 12) -> list[int]:
    """Among the splits sending as few bytes as ``cuts``, one with the lowest bottleneck cap.

    The fewest-bytes program is indifferent between splits that send the same bytes; a
    bisection on the cap between ``best`` and ``best + slack`` keeps the bytes and lowers the
    slowest stage as far as the cuts allow.
    """
    sent = sum(cut[c] for c in cuts)
    low, high = best, best + slack
    for _ in range(steps):
        if high - low <= 1e-6 * max(best, 1.0):
            break
        middle = (low + high) / 2
        found = _fewest_cut_bytes(n, k, _window_starts(window, n, middle + 1e-9 * max(best, 1.0), budget), cut)
        if found is not None and sum(cut[c] for c in found) <= sent:
            cuts, high = found, middle
        else:
            low = middle
    return cuts


def _fewest_cut_bytes(n: int, k: int, lo: list[int], cut: list[int]) -> list[int] | None:
    """Cut positions (k-1 of them) minimizing the bytes crossing, each run starting at >= lo[end]."""
    inf = math.inf
    prev = [inf] * (n + 1)
    prev[0] = 0.0
    choice: list[list[int]] = []
    for _ in range(k):
        cur = [inf] * (n + 1)
        arg = [-1] * (n + 1)
        window: deque[int] = deque()  # candidate starts i with increasing prev[i]
        nxt = 0
        for j in range(1, n + 1):
            while nxt <= j - 1:
                while window and prev[window[-1]] >= prev[nxt]:
                    window.pop()
                window.append(nxt)
                nxt += 1
            while window and window[0] < lo[j]:
                window.popleft()
            if window and prev[window[0]] < inf and lo[j] < j:
                cur[j] = prev[window[0]] + (cut[j] if j < n else 0)
                arg[j] = window[0]
        choice.append(arg)
        prev = cur
    if prev[n] == inf:
        return None
    cuts, j = [], n
    for layer in range(k - 1, -1, -1):
        i = choice[layer][j]
        cuts.append(i)
        j = i
    cuts.reverse()
    return cuts[1:]  # the first run starts at 0


def plan_stages(cost: GraphCost, stages: int | None = None, *, memory_budget: int | None = None,
                devices: Sequence[str] | None = None, balance: str = "flops",
                tolerance: float = 0.05, device_model: DeviceModel | None = None) -> PartitionPlan:
    """Cut the node order into pipeline stages (see the module notes).

    Args:
        cost: the model's :class:`GraphCost`.
        stages: number of stages; default: ``len(devices)``, or the fewest that fit
            ``memory_budget``.
        memory_budget: bytes each stage may hold (weights + peak live activations).
        devices: device per stage (``cpu``, ``cuda:0``...); sets the stage count if
            ``stages`` is not given.
        balance: ``flops``, ``memory`` or ``latency``.
        tolerance: how far above the best bottleneck (as a fraction of an even share) a split
            may go to send fewer bytes.
        device_model: the device figures for ``balance="latency"``.

    Raises:
        GraphoptError: no split satisfies the request (a node alone over the budget, more
            stages than nodes, bad arguments).

    Example:
        >>> plan = plan_stages(cost, memory_budget=1 << 30)  # doctest: +SKIP
    """
    if balance not in BALANCES:
        raise GraphoptError(f"unknown balance '{balance}'; use one of {', '.join(BALANCES)}")
    n = len(cost)
    if n == 0:
        raise GraphoptError("the model has no nodes to partition")
    devices = list(devices or [])
    if stages is None and devices:
        stages = len(devices)
    budget = float(memory_budget) if memory_budget else math.inf
    node_cost = _node_costs(cost, balance, device_model or DeviceModel())
    live = cost.live_profile()
    window = _Window(cost, node_cost, live, by_memory=balance == "memory")
    if budget < math.inf:
        for i in range(n):
            window.reset(i)
            window.push()
            if window.memory > budget:
                raise GraphoptError(
                    f"node '{cost.node_names[i] or cost.node_ops[i]}' (#{i}) alone needs "
                    f"{window.memory / 1e6:.1f} MB (weights + activations), over the memory budget "
                    f"of {budget / 1e6:.1f} MB; raise --memory-budget")
    if stages is None:
        if budget == math.inf:
            raise GraphoptError("give a stage count, a memory budget or a device list")
        stages = _greedy_count(window, n, math.inf, budget)
        strategy = "memory-budget"
    else:
        strategy = "devices" if devices else ("memory-budget" if memory_budget else "stages")
    if stages < 1:
        raise GraphoptError(f"the stage count must be at least 1 (got {stages})")
    if stages > n:
        raise GraphoptError(f"cannot cut {n} node(s) into {stages} stages; ask for at most {n}")
    if devices and len(devices) != stages:
        raise GraphoptError(f"{len(devices)} device(s) given for {stages} stages; give one device per stage")
    upper = (sum(node_cost) if balance != "memory" else float(cost.total_weight_bytes + max(live, default=0))) + 1.0
    best = _min_bottleneck(window, n, stages, budget, upper)
    if best == math.inf:
        raise GraphoptError(f"{stages} stage(s) cannot hold the model under a memory budget of "
                            f"{budget / 1e6:.1f} MB each; use more stages or a larger budget")
    cut = cost.cut_bytes()
    cuts = None
    share = (sum(node_cost) / stages) if balance != "memory" else best
    for slack in (tolerance, tolerance / 2, 0.0):
        lo = _window_starts(window, n, best + slack * share + 1e-9 * max(best, 1.0), budget)
        cuts = _fewest_cut_bytes(n, stages, lo, cut)
        if cuts is not None:
            break
    if cuts is None:  # cannot happen when the bisection succeeded; a clear error all the same
        raise GraphoptError(f"no split into {stages} stages found within the memory budget")
    cuts = _tightest_cap(window, n, stages, budget, cut, cuts, best, share * tolerance)
    bounds = [0, *cuts, n]
    runs = [list(range(bounds[k], bounds[k + 1])) for k in range(stages)]
    plan = _make_plan(cost, runs, ["stage"] * stages, devices or ["cpu"] * stages, strategy, balance,
                      memory_budget)
    logger.info("partition: %d stage(s) over %d node(s), bottleneck %.3g of %.3g FLOPs, %d byte(s) "
                "cross cuts", stages, n, plan.bottleneck_flops, plan.total_flops, plan.cut_bytes)
    return plan


def _make_plan(cost: GraphCost, runs: list[list[int]], kinds: list[str], devices: list[str],
               strategy: str, balance: str, memory_budget: int | None) -> PartitionPlan:
    owner: dict[str, int] = {}
    for p, run in enumerate(runs):
        for i in run:
            for name in cost.node_writes[i]:
                owner[name] = p
    parts: list[PlannedPartition] = []
    counters: dict[str, int] = {}
    for p, run in enumerate(runs):
        kind = kinds[p]
        name = f"{kind}{counters.get(kind, 0)}"
        counters[kind] = counters.get(kind, 0) + 1
        inside = {w for i in run for w in cost.node_writes[i]}
        reads = {r for i in run for r in cost.node_reads[i]} - inside
        received = [r for r in reads if r in owner and r not in cost.recomputable]
        outputs = {w for w in inside if w in set(cost.graph_outputs)}
        part = PlannedPartition(name=name, kind=kind, nodes=run, device=devices[p],
                                flops=cost.flops_of(run), weight_bytes=cost.weights_of(run))
        part.depends_on = sorted({owner[r] for r in received})
        if part.depends_on and part.depends_on[-1] >= p:  # an invariant of every planner here
            later = runs[part.depends_on[-1]][0]
            raise GraphoptError(f"partition {name} reads from a later partition (node "
                                f"'{cost.node_names[later] or cost.node_ops[later]}'); the partitions "
                                "would form a cycle")
        part.bytes_in = sum(cost.value_bytes.get(r, 0) for r in received)
        for r in received:  # every receiver gets its own copy
            parts[owner[r]].bytes_out += cost.value_bytes.get(r, 0)
        parts.append(part)
        part.peak_activation_bytes = peak_activation_bytes(cost, run, keep=outputs)
    cut_total = sum(p.bytes_in for p in parts)
    return PartitionPlan(partitions=parts, strategy=strategy, balance=balance,
                         total_flops=cost.total_flops, total_weight_bytes=cost.total_weight_bytes,
                         cut_bytes=cut_total, memory_budget=memory_budget, dims=dict(cost.dims))


def chain_cut_bytes(cost: GraphCost, stages: int) -> int:
    """Bytes a straight chain cut sends for ``stages`` stages: the baseline plans are held to.

    For each of the ``stages - 1`` points where the running FLOPs reach an even share, the
    nearest *chain point* (a cut that only one non-recomputable tensor crosses, as between two
    blocks of a transformer) is taken; the result is the sum of their bytes.
    """
    n = len(cost)
    cut = cost.cut_bytes()
    delta = [0] * (n + 2)
    for name, p in cost.producer.items():
        last = cost.last_use.get(name, -1)
        if name not in cost.recomputable and last > p:
            delta[p + 1] += 1
            delta[last + 1] -= 1
    crossing, running = [], 0
    for j in range(n + 1):
        running += delta[j]
        crossing.append(running)
    chain = [j for j in range(1, n) if crossing[j] == 1]
    total, running, targets = cost.total_flops, 0, []
    share = 1
    for j in range(n):
        running += cost.flops[j]
        while share < stages and running >= total * share / stages:
            targets.append(j + 1)
            share += 1
    out = 0
    for t in targets:
        if chain:
            nearest = min(chain, key=lambda c: (abs(c - t), c))
            out += cut[nearest]
        else:
            out += cut[t]
    return out


# -- branches ------------------------------------------------------------------------------------

def _dataflow(cost: GraphCost) -> Any:
    """Nodes (non-recomputable) as a networkx DiGraph with a virtual source and sink."""
    import networkx as nx  # imported on first use: ``import graphopt.analysis`` stays light

    g = nx.DiGraph()
    source, sink = "source", "sink"
    g.add_nodes_from([source, sink])
    outputs = set(cost.graph_outputs)
    for i in range(len(cost)):
        if cost.is_recomputable_node(i):
            continue
        g.add_node(i)
        preds = {cost.producer[r] for r in cost.node_reads[i]
                 if r in cost.producer and r not in cost.recomputable}
        for p in preds:
            g.add_edge(p, i)
        if not preds:
            g.add_edge(source, i)
        if any(w in outputs for w in cost.node_writes[i]):
            g.add_edge(i, sink)
    for i in list(g.nodes):
        if i not in (source, sink) and g.out_degree(i) == 0:
            g.add_edge(i, sink)  # dead ends still end somewhere
    return g


def find_branches(cost: GraphCost, *, min_fraction: float = 0.01) -> list[list[list[int]]]:
    """Independent branches: per parallel region, the node lists of its branches.

    A region is the part of the graph between two consecutive nodes every input-to-output path
    passes through; it is parallel when removing those nodes leaves several weakly connected
    pieces each holding at least ``min_fraction`` of the model's FLOPs (lighter pieces join the
    lightest branch). Recomputable nodes are left out (they are cloned where needed).

    Example:
        >>> [len(b) for b in find_branches(cost)[0]]  # doctest: +SKIP
        [12, 12, 12]
    """
    import networkx as nx

    g = _dataflow(cost)
    idom = nx.immediate_dominators(g, "source")
    chain: set[Any] = set()
    v = "sink"
    while v != "source":
        v = idom[v]
        chain.add(v)
    chain.discard("source")
    rest = g.subgraph([v for v in g.nodes if v not in chain and v not in ("source", "sink")])
    chain_positions = sorted(chain)
    regions: dict[int, list[list[int]]] = {}
    for comp in nx.weakly_connected_components(rest):
        nodes = sorted(comp)
        region = sum(1 for c in chain_positions if c < nodes[0])
        regions.setdefault(region, []).append(nodes)
    total = cost.total_flops or 1
    out: list[list[list[int]]] = []
    for region in sorted(regions):
        comps = regions[region]
        heavy = [c for c in comps if cost.flops_of(c) >= min_fraction * total]
        light = [c for c in comps if cost.flops_of(c) < min_fraction * total]
        if len(heavy) < 2:
            continue
        for c in light:
            lightest = min(heavy, key=cost.flops_of)
            lightest.extend(c)
            lightest.sort()
        out.append(sorted(heavy, key=lambda c: c[0]))
    logger.info("partition: %d parallel region(s) with %s branch(es)", len(out),
                [len(r) for r in out])
    return out


def plan_branches(cost: GraphCost, *, devices: Sequence[str] | None = None,
                  min_fraction: float = 0.01) -> PartitionPlan:
    """Partitions from parallel branches: a stage between regions, one partition per branch.

    The k-th branch of a region runs on ``devices[k % len(devices)]``, stages on the first
    (default: all ``cpu``).

    Raises:
        GraphoptError: the model has no independent branches.
    """
    regions = find_branches(cost, min_fraction=min_fraction)
    if not regions:
        raise GraphoptError(f"the model has no two independent branches each holding {min_fraction:.0%} "
                            "or more of its FLOPs (lighter side branches are not worth a partition); "
                            "use --stages or --memory-budget instead")
    group_of: dict[int, tuple[Any, str]] = {}
    for r, branches in enumerate(regions):
        for b, nodes in enumerate(branches):
            for i in nodes:
                group_of[i] = ((r, b), "branch")
    return plan_groups(cost, group_of, devices=devices, strategy="branches")


def plan_groups(cost: GraphCost, group_of: dict[int, tuple[Any, str]], *,
                devices: Sequence[str] | None = None, strategy: str = "branches",
                balance: str = "flops") -> PartitionPlan:
    """Partitions from node groups that run side by side, with stages for the nodes between.

    ``group_of`` maps node index -> (group key, kind): the nodes of one key form one partition
    of that kind. Groups whose first nodes meet in the order with no other node between them
    are emitted together (siblings: branches of a region, shards of a block); the other nodes
    gather into ``stage`` partitions between them (kind ``combine`` for a stage holding a node
    whose group kind is ``combine``). The k-th sibling runs on ``devices[k % len(devices)]``,
    stages on ``devices[0]`` (default ``cpu``).
    """
    n = len(cost)
    devices = list(devices or ["cpu"])
    members: dict[Any, list[int]] = {}
    for i in sorted(group_of):
        members.setdefault(group_of[i][0], []).append(i)
    runs: list[list[int]] = []
    kinds: list[str] = []
    placed: list[str] = []
    current: list[int] = []
    current_kind = "stage"
    emitted: set[Any] = set()
    taken: set[int] = set()  # stage nodes already placed (by the sibling scan below)

    def close_stage() -> None:
        nonlocal current, current_kind
        if current:
            runs.append(current)
            kinds.append(current_kind)
            placed.append(devices[0])
        current, current_kind = [], "stage"

    for i in range(n):
        key, kind = group_of.get(i, (None, "stage"))
        if kind in ("stage", "combine"):
            if i not in taken:
                current.append(i)
                taken.add(i)
            if kind == "combine":
                current_kind = "combine"
            continue
        if key in emitted:
            continue
        close_stage()
        # siblings: every group whose first node comes before the next non-group node; the
        # k-th sibling runs on the k-th device
        # (recomputable nodes between them do not count: they are cloned where needed)
        j, sibling_index = i, 0
        while j < n and (group_of.get(j, (None, "stage"))[1] not in ("stage", "combine")
                         or (j not in group_of and cost.is_recomputable_node(j))):
            if j not in group_of:
                if j not in taken:
                    current.append(j)
                    taken.add(j)
                j += 1
                continue
            sibling = group_of[j][0]
            if sibling not in emitted:
                runs.append(list(members[sibling]))
                kinds.append(group_of[j][1])
                placed.append(devices[sibling_index % len(devices)])
                sibling_index += 1
                emitted.add(sibling)
            j += 1
    close_stage()
    runs, kinds, placed = _fix_order(cost, runs, kinds, placed)
    return _make_plan(cost, runs, kinds, placed, strategy, balance, None)


def _fix_order(cost: GraphCost, runs: list[list[int]], kinds: list[str],
               placed: list[str]) -> tuple[list[list[int]], list[str], list[str]]:
    """Move stage nodes that read a later partition's output into the first stage after it.

    Branch partitions are emitted at their first node, so a stage node placed before a region
    may read that region's output only through a mistake of the walk; this keeps every
    partition reading earlier ones only.
    """
    owner: dict[str, int] = {}
    for p, run in enumerate(runs):
        for i in run:
            for w in cost.node_writes[i]:
                owner[w] = p
    changed = True
    while changed:
        changed = False
        for p, run in enumerate(runs):
            for i in list(run):
                later = [owner[r] for r in cost.node_reads[i]
                         if owner.get(r, p) > p and r not in cost.recomputable]  # those are cloned
                if later:
                    target = max(later)
                    dest = next((q for q in range(target + 1, len(runs))
                                 if kinds[q] in ("stage", "combine")), None)
                    if dest is None:
                        runs.append([])
                        kinds.append("stage")
                        placed.append(placed[0])
                        dest = len(runs) - 1
                    run.remove(i)
                    runs[dest].append(i)
                    runs[dest].sort()
                    for w in cost.node_writes[i]:
                        owner[w] = dest
                    changed = True
    keep = [k for k, run in enumerate(runs) if run]
    return [runs[k] for k in keep], [kinds[k] for k in keep], [placed[k] for k in keep]
