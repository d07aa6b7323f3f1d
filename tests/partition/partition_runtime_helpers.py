"""Small models and hand-made partition folders for the partitioned-runtime tests.

Partition files are cut from a whole model with ``onnx.utils.extract_model``, so each holds
exactly the original's nodes between its inputs and outputs, and a :class:`Manifest` is written
next to them the way ``graphopt partition`` writes one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils
from onnx import TensorProto, helper, numpy_helper

from graphopt.runtime import Manifest, PartitionSpec, TensorSpec, TransferSpec

__all__ = [
    "PartSpec",
    "branch_model",
    "chain_model",
    "mlp_model",
    "sharded_linear_model",
    "write_partitions",
]

#: (name, kind, inputs, outputs) of one partition to cut.
PartSpec = tuple[str, str, Sequence[str], Sequence[str]]


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    # IR 10 / opset 17: what the installed onnxruntime accepts, whatever onnx writes by default.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def mlp_model(layers: int = 3, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    """``x[N, width]`` through ``layers`` × (MatMul, Add, Relu); hidden outputs named ``h{i}``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for i in range(layers):
        inits += [_init(f"w{i}", rng.standard_normal((width, width)).astype(np.float32)),
                  _init(f"b{i}", rng.standard_normal(width).astype(np.float32))]
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]
        current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    return _model(graph)


def branch_model(width: int = 64, depth: int = 2, seed: int = 1) -> onnx.ModelProto:
    """Two independent MatMul-Tanh branches on ``x`` (ending in ``left``/``right``) added into ``y``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for side in ("left", "right"):
        current = "x"
        for i in range(depth):
            weight = f"{side}_w{i}"
            inits.append(_init(weight, (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)))
            out = side if i == depth - 1 else f"{side}_h{i}"
            nodes += [helper.make_node("MatMul", [current, weight], [f"{side}_m{i}"]),
                      helper.make_node("Tanh", [f"{side}_m{i}"], [out])]
            current = out
    nodes.append(helper.make_node("Add", ["left", "right"], ["y"]))
    graph = helper.make_graph(nodes, "branches",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    return _model(graph)


def sharded_linear_model(width: int = 32, out: int = 24, shards: int = 2,
                         seed: int = 2) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """``y = x @ W + b`` whole, and split row-wise into ``shards`` partial products summed up.

    Returns ``(whole, sharded)``: the sharded model's shard ``k`` computes
    ``p{k} = Slice(x, cols k) @ W[rows k]`` and ``y = Sum(p0..) + b``.
    """
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((width, out)).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])
    whole = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["xw"]),
                               helper.make_node("Add", ["xw", "b"], ["y"])], "linear",
                              [x_info], [y_info], [_init("W", weight), _init("b", bias)])
    nodes, inits = [], [_init("b", bias)]
    bounds = np.linspace(0, width, shards + 1).astype(int)
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        inits += [_init(f"W{k}", weight[lo:hi]), _init(f"lo{k}", np.array([lo], np.int64)),
                  _init(f"hi{k}", np.array([hi], np.int64)), _init(f"axis{k}", np.array([1], np.int64))]
        nodes += [helper.make_node("Slice", ["x", f"lo{k}", f"hi{k}", f"axis{k}"], [f"x{k}"]),
                  helper.make_node("MatMul", [f"x{k}", f"W{k}"], [f"p{k}"])]
    nodes += [helper.make_node("Sum", [f"p{k}" for k in range(shards)], ["psum"]),
              helper.make_node("Add", ["psum", "b"], ["y"])]
    sharded = helper.make_graph(nodes, "linear_sharded", [x_info], [y_info], inits)
    return _model(whole), _model(sharded)


def chain_model(links: int, size: int = 16, seed: int = 3) -> onnx.ModelProto:
    """``x[1, size]`` through ``links`` Adds of small constants; link ``i`` ends in ``t{i}``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for i in range(links):
        inits.append(_init(f"c{i}", rng.standard_normal(size).astype(np.float32)))
        out = "y" if i == links - 1 else f"t{i}"
        nodes.append(helper.make_node("Add", [current, f"c{i}"], [out]))
        current = out
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])], inits)
    return _model(graph)


def _tensor_specs(values: Sequence[onnx.ValueInfoProto]) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        shape: list[Any] = [d.dim_param if d.HasField("dim_param") else d.dim_value
                            for d in tensor_type.shape.dim]
        specs.append(TensorSpec(value.name, dtype, shape))
    return specs


def write_partitions(model: onnx.ModelProto, folder: str | os.PathLike, parts: Sequence[PartSpec], *,
                     resources: dict[str, dict[str, float]] | None = None,
                     devices: dict[str, str] | None = None, strategy: str = "stages") -> Manifest:
    """Cut ``model`` into the given partitions under ``folder`` and save their manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    whole = folder / "whole.onnx"
    onnx.save(model, whole)
    produced: dict[str, int] = {}
    specs: list[PartitionSpec] = []
    for index, (name, kind, inputs, outputs) in enumerate(parts):
        file = f"{name}.onnx"
        onnx.utils.extract_model(str(whole), str(folder / file), list(inputs), list(outputs))
        specs.append(PartitionSpec(
            id=index, name=name, file=file, kind=kind, inputs=list(inputs), outputs=list(outputs),
            device=(devices or {}).get(name, "cpu"), resources=dict((resources or {}).get(name, {})),
            depends_on=sorted({produced[t] for t in inputs if t in produced})))
        for tensor in outputs:
            produced[tensor] = index
    whole.unlink()
    transfers = []
    for tensor, source in produced.items():
        targets = [p.id for p in specs if tensor in p.inputs]
        if targets:
            transfers.append(TransferSpec(tensor, source, targets))
    manifest = Manifest(partitions=specs, inputs=_tensor_specs(model.graph.input),
                        outputs=_tensor_specs(model.graph.output), transfers=transfers,
                        strategy=strategy, source_model="model.onnx")
    manifest.save(folder)
    return Manifest.load(folder)
