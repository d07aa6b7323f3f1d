"""A cost model of one inference, node by node: FLOPs, weight bytes, activation bytes, liveness.

Partition planning needs, for every node of the main graph in topological order:

- its FLOPs (the conventions of :mod:`graphopt.analysis._flops`),
- the initializers it reads (weights are stored with every partition that reads them),
- the bytes of each value it produces, with symbolic dims bound to given or default sizes,
- where each value is last read, so that the peak of live activations of any run of nodes can be
  computed by a liveness walk.

It also marks the values that are cheap to *recompute* on both sides of a cut instead of sending
them: small results that depend only on constants and graph inputs (shape arithmetic, masks,
position ids). Shapes and element types come from onnx shape inference on a skeleton of the
model that carries no weight bytes, so a model with gigabytes of external data costs no more to
analyse than its graph.

Example:
    >>> cost = graph_cost(ir.load("bert.onnx"), dims={"batch": 1, "sequence": 128})  # doctest: +SKIP
    >>> cost.total_flops, cost.total_weight_bytes  # doctest: +SKIP
    (22353494016, 437940224)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from graphopt.analysis._flops import _node_estimate
from graphopt.ir import Model, Node, Tensor, Value, stubs_to_inputs, to_proto_with, typed_stub

__all__ = ["GraphCost", "graph_cost", "peak_activation_bytes", "DUPLICATE_BYTES", "SHAPE_OPS"]

logger = logging.getLogger(__name__)

#: Values up to this many bytes that depend only on constants and graph inputs are recomputed in
#: every partition that reads them rather than sent between partitions.
DUPLICATE_BYTES = 64 * 1024
#: Initializers up to this many bytes keep their data in the skeleton used for shape inference;
#: integer ones (index buffers such as position ids, which shape arithmetic slices) up to
#: ``_SKELETON_KEEP_INT_BYTES``.
_SKELETON_KEEP_BYTES = 4096
#: A node recomputed in several partitions reads at most this many weight bytes...
_CHEAP_WEIGHT_BYTES = 4096
#: ... and does at most this many FLOPs per output element (element-wise work, no contractions).
_CHEAP_FLOPS_PER_ELEMENT = 8
_SKELETON_KEEP_INT_BYTES = 1 << 20
_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
                  onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}

SymbolicShape = tuple["int | str | None", ...]


@dataclass
class GraphCost:
    """Per-node costs of a model's main graph, in its (topological) node order.

    Attributes:
        node_names / node_ops: name and ``domain.Op`` label per node.
        flops: FLOPs per node (0 where not estimated).
        node_weights: names of the initializers each node reads (also inside its subgraphs).
        node_reads: names of the non-initializer values each node reads (graph inputs included).
        node_writes: names of the values each node produces.
        weight_bytes: bytes per initializer.
        value_bytes: bytes per activation value (graph inputs and node outputs), dims resolved.
        value_types: ``(onnx elem type, symbolic shape)`` per value where inference knows them.
        producer: node index per produced value.
        last_use: index of the last node reading each value.
        graph_inputs / graph_outputs: names, in order.
        recomputable: values cheap enough to recompute wherever needed (see module notes).
        dims: the sizes symbolic dims were bound to.
        unknown_bytes: values whose size inference could not make concrete (counted 0).
    """

    node_names: list[str]
    node_ops: list[str]
    flops: list[int]
    node_weights: list[tuple[str, ...]]
    node_reads: list[tuple[str, ...]]
    node_writes: list[tuple[str, ...]]
    weight_bytes: dict[str, int]
    value_bytes: dict[str, int]
    value_types: dict[str, tuple[int, SymbolicShape | None]]
    producer: dict[str, int]
    last_use: dict[str, int]
    graph_inputs: list[str]
    graph_outputs: list[str]
    recomputable: set[str] = field(default_factory=set)
    dims: dict[str, int] = field(default_factory=dict)
    unknown_bytes: list[str] = field(default_factory=list)
    #: Value name -> shape with symbolic dims bound (``None`` for a dim still unknown).
    shapes: dict[str, tuple] = field(default_factory=dict)
    _unknown_set: set[str] = field(default_factory=set, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.flops)

    @property
    def total_flops(self) -> int:
        """FLOPs of one inference (estimated nodes only)."""
        return sum(self.flops)

    @property
    def total_weight_bytes(self) -> int:
        """Bytes of all initializers read by main-graph nodes (each counted once)."""
        return sum(self.weight_bytes[w] for w in {w for ws in self.node_weights for w in ws})

    def weights_of(self, nodes: Iterable[int]) -> int:
        """Bytes of the distinct initializers the given nodes read."""
        return sum(self.weight_bytes[w] for w in {w for i in nodes for w in self.node_weights[i]})

    def flops_of(self, nodes: Iterable[int]) -> int:
        """FLOPs of the given nodes."""
        return sum(self.flops[i] for i in nodes)

    def is_recomputable_node(self, index: int) -> bool:
        """True when every output of node ``index`` is recomputable (so the node may be cloned)."""
        writes = self.node_writes[index]
        return bool(writes) and all(w in self.recomputable for w in writes)

    def is_cheap(self, index: int, limit: int = DUPLICATE_BYTES) -> bool:
        """True when node ``index`` is cheap enough to run twice rather than send its outputs.

        Its outputs are known and at most ``limit`` bytes each, it reads at most
        ``_CHEAP_WEIGHT_BYTES`` of weights, and it does element-wise work (at most
        ``_CHEAP_FLOPS_PER_ELEMENT`` FLOPs per output element): shape arithmetic, masks, ids.
        """
        writes = self.node_writes[index]
        if not writes or any(w in self._unknown or self.value_bytes.get(w, 0) > limit for w in writes):
            return False
        if sum(self.weight_bytes[w] for w in self.node_weights[index]) > _CHEAP_WEIGHT_BYTES:
            return False
        elements = sum(math.prod(d for d in self.shapes.get(w, ()) if d) for w in writes)
        return self.flops[index] <= _CHEAP_FLOPS_PER_ELEMENT * max(elements, 1)

    @property
    def _unknown(self) -> set[str]:
        if len(self._unknown_set) != len(self.unknown_bytes):
            self._unknown_set = set(self.unknown_bytes)
        return self._unknown_set

    def live_profile(self) -> list[int]:
        """Bytes of activations live while each node runs, over the whole graph.

        A value is live from its producer (graph inputs: from the start) to its last reader;
        graph outputs stay live to the end. The live bytes of a run of nodes inside a partition
        never exceed this profile over the same nodes, so it bounds partition peaks from above.
        """
        n = len(self)
        delta = [0] * (n + 1)
        outputs = set(self.graph_outputs)
        for name, size in self.value_bytes.items():
            start = self.producer.get(name, 0)
            end = n - 1 if name in outputs else self.last_use.get(name, start)
            if start >= n:
                continue
            delta[start] += size
            delta[min(max(end, start), n - 1) + 1] -= size
        live, running = [], 0
        for i in range(n):
            running += delta[i]
            live.append(running)
        return live

    def cut_bytes(self) -> list[int]:
        """Bytes that cross a cut before node ``j``, for ``j`` in ``0..n`` (index = cut position).

        Counted: values produced before the cut and read after it, except graph inputs (every
        partition may read them) and recomputable values.
        """
        n = len(self)
        delta = [0] * (n + 2)
        for name, p in self.producer.items():
            if name in self.recomputable:
                continue
            last = self.last_use.get(name, -1)
            if last > p:
                size = self.value_bytes.get(name, 0)
                delta[p + 1] += size
                delta[last + 1] -= size
        out, running = [], 0
        for j in range(n + 1):
            running += delta[j]
            out.append(running)
        return out


def _reads(node: Node) -> Iterator[Value]:
    for v in node.inputs:
        if v is not None:
            yield v
    for sub in node.subgraphs():
        for inner in sub.all_nodes():
            for v in inner.inputs:
                if v is not None and v.owning_graph() is not sub and not _defined_in(v, sub):
                    yield v


def _defined_in(value: Value, graph) -> bool:
    """True when ``value`` is defined in ``graph`` or one of its nested subgraphs."""
    owner = value.owning_graph() if value.producer is None else value.producer.graph
    while owner is not None:
        if owner is graph:
            return True
        owner = owner.parent.graph if owner.parent is not None else None
    return False


def _skeleton_tensor(tensor: Tensor, name: str) -> onnx.TensorProto:
    """A tensor proto for shape inference: small constants with data, others as typed stubs."""
    limit = _SKELETON_KEEP_INT_BYTES if tensor.dtype in _INTEGER_TYPES else _SKELETON_KEEP_BYTES
    if not tensor.is_external() and tensor.nbytes <= limit:
        proto = tensor.to_proto()
        if proto.name != name:
            copy = onnx.TensorProto()
            copy.CopyFrom(proto)
            copy.name = name
            proto = copy
        return proto
    return typed_stub(tensor, name)


def type_skeleton(model: Model) -> onnx.ModelProto:
    """The model as a ``ModelProto`` without weight bytes (large initializers as typed stubs).

    Node order equals the IR's, so proto node ``i`` is IR node ``i``.
    """
    return to_proto_with(model, lambda tensor: _skeleton_tensor(tensor, tensor.name))


def _bind(proto: onnx.ModelProto, dims: Mapping[str, int], default_dim: int) -> onnx.ModelProto:
    """A copy of the skeleton whose symbolic input dims are bound and stub tensors are inputs."""
    skel = onnx.ModelProto()
    skel.CopyFrom(proto)
    g = skel.graph
    init_names = {t.name for t in g.initializer}
    for inp in g.input:
        if inp.name in init_names or not inp.type.HasField("tensor_type"):
            continue
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = dims.get(d.dim_param, default_dim) if d.HasField("dim_param") else default_dim
    stubs_to_inputs(g)
    return skel


def _unbound(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The skeleton with stub tensors as typed inputs and input dims left as declared."""
    skel = _bind(proto, {}, 1)
    declared = {i.name: i for i in proto.graph.input}
    for inp in skel.graph.input:
        if inp.name in declared:
            inp.CopyFrom(declared[inp.name])
    return skel


def _ort_symbolic_inference(skel: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference, or ``None`` when it cannot infer every value.

    Its ``infer_shapes`` entry point saves the half-inferred model as
    ``sym_shape_infer_temp.onnx`` plus external-data files into the current directory before
    raising; the same steps are run here without that write, so a partition never litters the
    user's folder.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_opset

    opset = get_opset(skel)
    if not opset or opset < 7:
        return None
    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
    inference._preprocess(skel)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_ if complete else None


def _infer(skel: onnx.ModelProto) -> dict[str, tuple[int, tuple]]:
    """Types of every value: onnxruntime's symbolic shape inference, else onnx's.

    onnxruntime's tool follows shape arithmetic through Slice/Range/Where on index buffers (as
    transformer exports compute position ids) where onnx's data propagation stops.
    """
    inferred = None
    try:
        inferred = _ort_symbolic_inference(skel)
    except Exception as exc:  # the tool raises on ops it does not know: fall back to onnx
        logger.debug("cost: onnxruntime symbolic shape inference failed (%s)", exc)
    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(skel, check_type=False, strict_mode=False,
                                                         data_prop=True)
        except Exception as exc:  # best effort, as for FLOPs: unknown values count 0 bytes
            logger.info("cost: onnx shape inference failed (%s); using declared types only", exc)
            inferred = skel
    out: dict[str, tuple[int, tuple]] = {}
    g = inferred.graph
    for info in list(g.input) + list(g.value_info) + list(g.output):
        if not info.type.HasField("tensor_type"):
            continue
        tt = info.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                          for d in tt.shape.dim)
        out[info.name] = (tt.elem_type, shape)
    for t in g.initializer:
        out[t.name] = (t.data_type, tuple(t.dims))
    return out


def _itemsize(elem_type: int) -> float:
    if elem_type == onnx.TensorProto.STRING or elem_type == 0:
        return 0.0
    try:
        return float(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 0.5 if elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else 1.0


def graph_cost(model: Model, *, dims: Mapping[str, int] | None = None, default_dim: int = 1,
               duplicate_bytes: int = DUPLICATE_BYTES) -> GraphCost:
    """Cost every node of ``model``'s main graph (see the module notes).

    Args:
        model: the IR model (weights are not read; external data stays on disk).
        dims: sizes of symbolic input dims by name.
        default_dim: size of symbolic input dims not in ``dims``.
        duplicate_bytes: values up to this size that depend only on constants and graph inputs
            are marked recomputable.

    Returns:
        A :class:`GraphCost`.
    """
    dims = dict(dims or {})
    proto = type_skeleton(model)
    bound = _infer(_bind(proto, dims, default_dim))
    # Symbolic types (dims as the model declares them) for the inputs partitions will declare.
    symbolic = _infer(_unbound(proto))

    shapes = {name: tuple(d if isinstance(d, int) else None for d in shape)
              for name, (_, shape) in bound.items() if shape is not None}
    functions = {(f.domain, f.name) for f in proto.functions}

    graph = model.graph
    initializer_names = set(graph.initializers)
    cost = GraphCost(node_names=[], node_ops=[], flops=[], node_weights=[], node_reads=[],
                     node_writes=[], weight_bytes={}, value_bytes={}, value_types={}, producer={},
                     last_use={}, graph_inputs=[v.name for v in graph.inputs if v.name not in initializer_names],
                     graph_outputs=[v.name for v in graph.outputs])
    for name, v in graph.initializers.items():
        t = v.const_value
        cost.weight_bytes[name] = t.nbytes if isinstance(t, Tensor) else 0

    def size_of(name: str) -> int:
        elem, shape = bound.get(name, (0, None))
        if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
            cost.unknown_bytes.append(name)
            return 0
        return int(math.ceil(_itemsize(elem) * math.prod(shape)))

    for name in cost.graph_inputs:
        cost.value_bytes[name] = size_of(name)
    for index, (node, pnode) in enumerate(zip(graph, proto.graph.node)):
        flops, _ = _node_estimate(pnode, shapes, functions)
        cost.flops.append(flops or 0)
        cost.node_names.append(node.name)
        cost.node_ops.append(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
        weights: list[str] = []
        reads: list[str] = []
        for v in _reads(node):
            if v.is_initializer() and v.owning_graph() is graph:
                if v.name not in weights:
                    weights.append(v.name)
            elif v.name and v.name not in reads:
                reads.append(v.name)
                cost.last_use[v.name] = index
        cost.node_weights.append(tuple(weights))
        cost.node_reads.append(tuple(reads))
        writes = tuple(out.name for out in node.outputs if out.name)
        cost.node_writes.append(writes)
        for name in writes:
            cost.producer[name] = index
            cost.value_bytes[name] = size_of(name)
    for name in set(cost.value_bytes) | set(cost.weight_bytes):
        if name in symbolic:
            cost.value_types[name] = symbolic[name]
        elif name in bound:
            cost.value_types[name] = bound[name]
    cost.shapes = shapes
    cost.recomputable = _recomputable(cost, duplicate_bytes)
    cost.dims = {d.dim_param: dims.get(d.dim_param, default_dim)
                 for i in proto.graph.input if i.type.HasField("tensor_type")
                 for d in i.type.tensor_type.shape.dim if d.HasField("dim_param")}
    logger.info("cost: %d node(s), %d FLOPs, %d weight bytes, %d recomputable value(s), "
                "%d value(s) of unknown size", len(cost), cost.total_flops, cost.total_weight_bytes,
                len(cost.recomputable), len(cost.unknown_bytes))
    return cost


#: Ops whose output depends only on their input's shape: the shape source of a mask or ids chain.
SHAPE_OPS = {"Shape", "Size"}


def _recomputable(cost: GraphCost, limit: int) -> set[str]:
    """Values recomputed wherever they are read instead of being sent between partitions.

    A value qualifies when its producer is cheap (:meth:`GraphCost.is_cheap`), or computes from
    initializers alone with element-wise work (a transpose or an ``Identity`` of a weight), and
    every value it reads is a graph input, a recomputable value, or the output of a ``Shape``
    or ``Size`` node (a few bytes, sent where needed).
    """
    sources = set(cost.graph_inputs)
    sources.update(w for i, op in enumerate(cost.node_ops) if op in SHAPE_OPS for w in cost.node_writes[i])
    out: set[str] = set()
    for index, writes in enumerate(cost.node_writes):
        constant_only = not cost.node_reads[index] and bool(writes) and \
            cost.flops[index] <= _CHEAP_FLOPS_PER_ELEMENT * max(
                sum(math.prod(d for d in cost.shapes.get(w, ()) if d) for w in writes), 1)
        if not (constant_only or cost.is_cheap(index, limit)):
            continue
        if all(r in out or r in sources for r in cost.node_reads[index]):
            out.update(writes)
    return out


def peak_activation_bytes(cost: GraphCost, nodes: Sequence[int], *,
                          keep: Iterable[str] = ()) -> int:
    """Peak bytes of live activations while ``nodes`` run in the given order (a liveness walk).

    Values read from outside the run are live from the start until their last read in the run;
    values produced are live until their last read in the run, or to the end if listed in
    ``keep`` (the run's outputs). Weights are not counted.

    Example:
        >>> peak_activation_bytes(cost, range(len(cost)), keep=cost.graph_outputs)  # doctest: +SKIP
    """
    keep = set(keep)
    last: dict[str, int] = {}
    produced: set[str] = set()
    for step, i in enumerate(nodes):
        for name in cost.node_reads[i]:
            last[name] = step
        produced.update(cost.node_writes[i])
    live = sum(cost.value_bytes.get(name, 0) for name in last if name not in produced)
    peak = live
    for step, i in enumerate(nodes):
        for name in cost.node_writes[i]:
            live += cost.value_bytes.get(name, 0)
        peak = max(peak, live)
        for name in cost.node_reads[i]:
            if last[name] == step and name not in keep:
                live -= cost.value_bytes.get(name, 0)
        for name in cost.node_writes[i]:
            if name not in last and name not in keep:  # never read in the run
                live -= cost.value_bytes.get(name, 0)
    return peak
