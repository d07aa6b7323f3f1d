"""Unit tests of ``infer-shapes``: the types it gives values, and what it must never touch.

Types of intermediate values are not printed in golden files, so they are checked here. The
pass changes no computation; tests that write ``value_info`` also check that onnxruntime
(optimizations off) still computes the same outputs.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx.parser
import pytest

from graphopt import ir
from graphopt.passes.fold import InferShapes
from graphopt.passes.fold._onnx_inference import DATA_PROP_MAX_LENGTH, infer_shapes
from graphopt.passes.fold._rules import INFERRED_TYPE, broadcast_shapes, refine_type
from graphopt.pipeline import PassContext
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

FLOAT = onnx.TensorProto.FLOAT
INT64 = onnx.TensorProto.INT64
HEAD = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>\n'


def _infer(text: str, **options: object) -> tuple[ir.Model, dict[str, int]]:
    model = ir.load(onnx.parser.parse_model(HEAD + text))
    result = InferShapes(**options).run(model, PassContext())
    return model, result.counters


def _types(model: ir.Model) -> dict[str, str]:
    return {v.name: str(v.type) for g in model.all_graphs() for n in g for v in n.outputs if v.name}


# -- onnx inference, then graphopt's rules ---------------------------------------------------------
def test_onnx_types_reach_intermediate_values() -> None:
    model, counters = _infer("""
        g (float[N,4] x, float[4,8] w) => (float[N,8] y) {
           a = Relu (x)
           b = MatMul (a, w)
           y = Sigmoid (b)
        }""")
    assert _types(model) == {"a": "float[N,4]", "b": "float[N,8]", "y": "float[N,8]"}
    assert counters["typed-values"] == 2  # y is a graph output: declared, not counted


def test_rules_type_what_follows_a_contrib_op() -> None:
    model, _ = _infer("""
        g (float[B,S,64] x, float[64,32] w, float[64] gamma, float[64] beta) => (float[S,B,32] y)
           <int64[1] zero = {0}, int64[1] at = {32}, int64[1] two = {2}>
        {
           g = com.microsoft.Gelu (x)
           n, mean, inv = com.microsoft.SkipLayerNormalization (g, x, gamma, beta)
           m = com.microsoft.FusedMatMul (n, w)
           t = Transpose <perm = [1, 0, 2]> (m)
           u = Unsqueeze (t, zero)
           s = Squeeze (u, zero)
           cat = Concat <axis = 2> (s, s)
           y = Slice (cat, zero, at, two)
        }""")
    types = _types(model)
    assert types["g"] == "float[B,S,64]" and types["n"] == "float[B,S,64]"
    assert types["m"] == "float[B,S,32]"
    assert types["t"] == "float[S,B,32]"
    assert types["u"] == "float[1,S,B,32]" and types["s"] == "float[S,B,32]"
    assert types["cat"] == "float[S,B,64]"


def test_reshape_zero_and_minus_one_over_symbolic_dims() -> None:
    model, _ = _infer("""
        g (float[B,S,768] x) => (float[B,S,12,64] y) <int64[4] heads = {0, 0, 12, -1},
                                                       int64[2] flat = {-1, 768}, int64[3] back = {0, -1, 64}> {
           a = com.microsoft.Gelu (x)
           y = Reshape (a, heads)
           f = Reshape (a, flat)
           b = Reshape (y, back)
        }""")
    types = _types(model)
    assert types["f"] == "float[?,768]"  # B*S has no name: unknown, not invented
    assert types["b"] == "float[B,?,64]"
    assert model.graph.nodes[1].outputs[0].meta[INFERRED_TYPE] == ir.TensorType(FLOAT, ["B", "S", 12, 64])


def test_reshape_target_computed_from_shape() -> None:
    model, _ = _infer("""
        g (float[B,S,768] x) => (float[B,S,768] y) <int64[2] tail = {12, 64}, int64[1] i01 = {0}, int64[1] two = {2}> {
           a = com.microsoft.FastGelu (x)
           s = Shape (a)
           bs = Slice (s, i01, two)
           target = Concat <axis = 0> (bs, tail)
           r = Reshape (a, target)
           y = Identity (x)
        }""")
    assert _types(model)["r"] == "float[B,S,12,64]"


def test_broadcasting_and_gather_on_shape() -> None:
    model, _ = _infer("""
        g (float[N,1,4] x, float[3,1] b, int64[2] idx) => (float[N,3,4] y) {
           g = com.microsoft.BiasGelu (x, x)
           y = Add (g, b)
           s = Shape (g)
           d = Gather (s, idx)
           m = Equal (g, b)
        }""")
    types = _types(model)
    assert types["d"] == "int64[2]" and types["m"] == "bool[N,3,4]"
    assert model.graph.nodes[1].outputs[0].meta[INFERRED_TYPE] == ir.TensorType(FLOAT, ["N", 3, 4])


@pytest.mark.parametrize("a, b, expected", [
    (("N", 1, 4), (3, 1), ("N", 3, 4)),
    ((1,), ("S",), ("S",)),
    (("A",), ("B",), (None,)),
    ((None, 5), (7, 1), (7, 5)),
])
def test_broadcast_shapes(a: tuple, b: tuple, expected: tuple) -> None:
    assert broadcast_shapes([a, b]) == expected


def test_matmul_rank_one_operands() -> None:
    model, _ = _infer("""
        g (float[K] v, float[B,K,M] w, float[B,M,K] u) => (float[B,M] y) {
           a = com.microsoft.Gelu (v)
           y = MatMul (a, w)
           z = MatMul (u, a)
        }""")
    assert _types(model)["z"] == "float[B,M]"


# -- what the pass must not do -------------------------------------------------------------------
def test_graph_inputs_and_outputs_keep_their_declared_types() -> None:
    model, counters = _infer("""
        g (float[N,4] x) => (float[?,?] y, float[N,?] z) {
           y = Relu (x)
           z = Neg (y)
        }""")
    assert str(model.graph.inputs[0].type) == "float[N,4]"
    assert [str(v.type) for v in model.graph.outputs] == ["float[?,?]", "float[N,?]"]
    assert model.graph.outputs[0].meta[INFERRED_TYPE] == ir.TensorType(FLOAT, ["N", 4])
    assert counters["typed-values"] == 0


def test_types_only_become_more_precise() -> None:
    model, _ = _infer("""
        g (float[5,4] x, float[N,4] z) => (float[5,4] y, float[N,4] w) <float[?,4] a, float[7,4] b, float[7,4] c> {
           a = Relu (x)
           b = Abs (a)
           y = Neg (b)
           c = Relu (z)
           w = Neg (c)
        }""")
    a, b, c = (model.graph.nodes[i].outputs[0] for i in (0, 1, 3))
    assert str(a.type) == "float[5,4]"  # refined
    assert str(b.type) == "float[7,4]" and b.meta["type_conflict"] is True  # contradiction: kept, noted
    # [N,4] does not contradict the declared [7,4] (N may be 7) but does not prove it either:
    assert str(c.type) == "float[7,4]" and c.meta[INFERRED_TYPE] == ir.TensorType(FLOAT, ["N", 4])


def test_refine_type_rules() -> None:
    t = ir.TensorType
    assert refine_type(t(FLOAT, ["N", None]), t(FLOAT, ["N", 4])) == t(FLOAT, ["N", 4])
    assert refine_type(t(FLOAT, ["N", 4]), t(FLOAT, [3, 4])) == t(FLOAT, [3, 4])
    assert refine_type(t(FLOAT, ["N", 4]), t(FLOAT, [3, 4]), symbols_to_sizes=False) is None
    assert refine_type(t(FLOAT, [2, 4]), t(FLOAT, [3, 4])) is None
    assert refine_type(t(FLOAT, [2, 4]), t(INT64, [2, 4])) is None
    assert refine_type(t(FLOAT, None), t(FLOAT, [2])) == t(FLOAT, [2])
    assert refine_type(t(FLOAT, [2]), t(FLOAT, None)) is None


def test_invented_dims_are_dropped() -> None:
    # onnx names dims it cannot know "unk__0"...: they carry nothing and must not spread.
    model, _ = _infer("""
        g (float[N,4] x, int64[2] shape) => (float[N,4] y) {
           r = Reshape (x, shape)
           y = Identity (x)
        }""")
    assert all(not (isinstance(d, str) and d.startswith("unk__"))
               for d in model.graph.nodes[0].outputs[0].type.shape.dims)


def test_subgraph_values_are_typed_and_signatures_kept() -> None:
    model, _ = _infer("""
        g (bool c, float[N,4] x) => (float[N,4] y) {
           y = If (c) <
              then_branch = then_g () => (float[N,4] t) { a = Relu (x)\n t = Neg (a) },
              else_branch = else_g () => (float[N,4] e) { e = Abs (x) }
           >
        }""")
    branch = model.graph.nodes[0].attr("then_branch")
    assert str(branch.nodes[0].outputs[0].type) == "float[N,4]"


def test_write_value_info_option_keeps_the_numbers() -> None:
    text = """
        g (float[N,4] x, float[4,8] w) => (float[N,8] y) {
           a = Relu (x)
           b = MatMul (a, w)
           y = Sigmoid (b)
        }"""
    source = onnx.parser.parse_model(HEAD + text)
    model, counters = _infer(text, write_value_info=True)
    assert counters["value-info-added"] == 2
    out = ir.to_proto(model)
    assert {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in out.graph.value_info} == {"a": ["N", 4], "b": ["N", 8]}
    onnx.checker.check_model(out)
    feeds = random_inputs(make_session(source), seed=0, dims={"N": 3})
    assert compare_outputs(run_model(source, feeds), run_model(out, feeds), rtol=0, atol=0).ok


# -- cost ----------------------------------------------------------------------------------------------
def test_weights_are_never_read() -> None:
    # 64 weights of 16 MB that would raise if read: inference needs only their types.
    def refuse() -> np.ndarray:
        raise AssertionError("infer-shapes read a weight's bytes")

    graph = ir.Graph("big")
    x = graph.add_input("x", ir.TensorType(FLOAT, ["N", 2048]))
    h = x
    for i in range(64):
        w = graph.add_initializer(f"w{i}", ir.LazyTensor(refuse, FLOAT, (2048, 2048)))
        mm = graph.append(ir.Node("", "MatMul", [h, w]))
        act = graph.append(ir.Node("", "Relu", [mm.outputs[0]]))
        mm.outputs[0].name, act.outputs[0].name = f"m{i}", f"r{i}"
        h = act.outputs[0]
    graph.outputs.append(h)
    h.type = ir.TensorType(FLOAT, ["N", 2048])
    model = ir.Model(graph, ir_version=8, opset_imports={"": 17})
    start = time.perf_counter()
    counters = InferShapes().run(model, PassContext()).counters
    assert time.perf_counter() - start < 5
    assert counters["typed-values"] == 127
    assert str(graph.nodes[-2].outputs[0].type) == "float[N,2048]"


def test_data_propagation_stays_off_when_a_huge_vector_appears() -> None:
    # onnx's data propagation expands 1-D values element by element: Gather of 4 * 10^9
    # elements would exhaust memory. The guard runs inference without it.
    proto = onnx.parser.parse_model(HEAD + """
        g (float[4] x) => (float[4] y) <int64 start = {0}, int64 limit = {4000000000}, int64 step = {1},
                                        int64[1] first = {0}> {
           big = Range (start, limit, step)
           head = Gather (big, first)
           y = Identity (x)
        }""")
    start = time.perf_counter()
    inferred = infer_shapes(proto)
    assert time.perf_counter() - start < 5
    assert inferred is not None
    big = next(v for v in inferred.graph.value_info if v.name == "big")
    assert big.type.tensor_type.shape.dim[0].dim_value == 4_000_000_000 > DATA_PROP_MAX_LENGTH
