"""Many tiny nodes: the optimizer finishes, nothing recurses per node, and the result is right.

The model is a chain of units ``Identity -> Neg -> Add(1)``: each unit maps ``x`` to ``1 - x``, so
an even number of units computes ``x`` and an odd number ``1 - x``, exactly in float32 for
small integers. The protobuf is written directly (building a million NodeProtos through the
protobuf API takes longer than optimizing them).
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
import pytest
from _robust import assert_optimizes_correctly, run_cli
from onnx import TensorProto, helper

from graphopt.runtime import run_model


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def chain_model_bytes(units: int) -> bytes:
    """A serialized model with ``3 * units`` nodes in one chain from ``x`` to ``y``."""
    parts: list[bytes] = []
    prev = b"x"
    ops = (b"Identity", b"Neg", b"Add")
    count = 3 * units
    for i in range(count):
        op = ops[i % 3]
        out = b"y" if i == count - 1 else b"v%d" % i
        inputs = _field(1, prev) + (_field(1, b"one") if op == b"Add" else b"")
        parts.append(_field(1, inputs + _field(2, out) + _field(4, op)))
        prev = out
    one = onnx.numpy_helper.from_array(np.array([1.0], np.float32), "one")
    shell = helper.make_graph([], "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[one])
    graph = b"".join(parts) + shell.SerializeToString()
    model = helper.make_model(helper.make_graph([], "tmp", [], []), opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)
    model.ClearField("graph")
    return model.SerializeToString() + _field(7, graph)


def _expected(x: np.ndarray, units: int) -> np.ndarray:
    return x if units % 2 == 0 else np.float32(1) - x


def test_chain_of_3000_nodes(tmp_path):
    path, out = str(tmp_path / "chain.onnx"), str(tmp_path / "o.onnx")
    with open(path, "wb") as f:
        f.write(chain_model_bytes(1001))
    optimized = assert_optimizes_correctly(path, out)
    assert "Identity" not in {n.op_type for n in optimized.graph.node}
    x = np.array([1.0, -2.0, 3.0, 5.0], np.float32)
    assert run_model(optimized, {"x": x})["y"].tolist() == _expected(x, 1001).tolist()


@pytest.mark.slow
def test_chain_of_a_million_nodes(tmp_path):
    units = 333_334  # 1,000,002 nodes
    path, out = str(tmp_path / "chain.onnx"), str(tmp_path / "o.onnx")
    with open(path, "wb") as f:
        f.write(chain_model_bytes(units))
    start = time.perf_counter()
    code, _, stderr = run_cli("optimize", path, "-o", out, "-q")
    seconds = time.perf_counter() - start
    assert code == 0, stderr
    print(f"optimized {3 * units} nodes in {seconds:.0f} s; output {os.path.getsize(out) / 1e6:.1f} MB")
    optimized = onnx.load(out)
    assert len(optimized.graph.node) <= 2 * units
    x = np.array([1.0, -2.0, 3.0, 5.0], np.float32)
    assert run_model(optimized, {"x": x})["y"].tolist() == _expected(x, units).tolist()
