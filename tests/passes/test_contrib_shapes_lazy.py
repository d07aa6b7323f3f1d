"""The contrib shape proofs answer from tensor headers, and the attention rules build lazily.

Rule checks ask "is this constant 2-D?" or "is it a one-element int?" thousands of times per
model; answering by decoding a multi-megabyte weight made ``contrib-attention`` take seconds on
BERT. Weights here are ``LazyTensor``s whose values cannot be computed: any decode fails the test.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx

from graphopt import ir
from graphopt.passes.contrib._common import constant_shape
from graphopt.passes.contrib._shapes import dim_origin, same_dim_ref, scalar_element, shape_elements
from graphopt.passes.contrib.attention import ContribAttention, attention_rules

FLOAT = onnx.TensorProto.FLOAT


def _undecodable(shape: tuple[int, ...]) -> ir.LazyTensor:
    def fail() -> np.ndarray:
        raise AssertionError("the weight was decoded")

    return ir.LazyTensor(fail, FLOAT, shape)


def _projection_graph() -> tuple[ir.Graph, ir.Value, ir.Value, ir.Value]:
    """``h = x @ w + b`` then ``g = Relu(h)``: dims 0 and 1 of ``g`` come from ``x``."""
    graph = ir.Graph("g")
    x = graph.add_input("x", ir.TensorType(FLOAT, ["B", "S", 8]))
    w = graph.add_initializer("w", _undecodable((8, 8)))
    b = graph.add_initializer("b", _undecodable((8,)))
    mm = ir.Node("", "MatMul", [x, w])
    mm.outputs[0].type = ir.TensorType(FLOAT, ["B", "S", 8])
    add = ir.Node("", "Add", [mm.outputs[0], b])
    add.outputs[0].type = ir.TensorType(FLOAT, ["B", "S", 8])
    relu = ir.Node("", "Relu", [add.outputs[0]])
    relu.outputs[0].type = ir.TensorType(FLOAT, [None, None, 8])
    graph.extend([mm, add, relu])
    return graph, x, w, relu.outputs[0]


def test_constant_shape_reads_the_header_only() -> None:
    graph, x, w, _ = _projection_graph()
    assert constant_shape(w) == (8, 8)
    assert constant_shape(x) is None
    assert constant_shape(None) is None
    small = graph.add_initializer("small", ir.ArrayTensor(np.array([2, 3], dtype=np.int64)))
    assert constant_shape(small) == (2,)


def test_dim_origin_walks_through_weights_without_decoding_them() -> None:
    _, x, w, out = _projection_graph()
    assert dim_origin(out, 0) == (x, 0)
    assert dim_origin(out, 1) == (x, 1)
    assert dim_origin(out, 2) == (out.producer.inputs[0], 2)  # the last dim is the weight's, not x's
    assert same_dim_ref((out, 0), (x, 0))
    assert not same_dim_ref((out, 0), (x, 1))
    assert shape_elements(w) is None and scalar_element(w) is None


def test_scalar_elements_are_still_read() -> None:
    graph = ir.Graph("g")
    one = graph.add_initializer("one", ir.ArrayTensor(np.array(7, dtype=np.int64)))
    pair = graph.add_initializer("pair", ir.ArrayTensor(np.array([4, 5], dtype=np.int64)))
    assert scalar_element(one) == 7
    assert scalar_element(pair) is None
    assert shape_elements(pair) == [4, 5]


def test_attention_rules_are_built_on_first_use_only() -> None:
    code = ("import graphopt.passes, graphopt.cli; from graphopt.passes.contrib import attention; "
            "print(attention.attention_rules.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
    names = ContribAttention.rule_set().names
    assert ContribAttention.rule_set() is attention_rules()
    assert len(names) == 82 and "mha-div-add" in names and "attention-key-transposes" in names
