"""``dedup-transposed-initializers``: exact detection, memory-bounded comparison, what stays, numbers."""

from __future__ import annotations

import os
import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir
from graphopt.passes.cleanup import dedup_transposed
from graphopt.passes.cleanup.dedup_transposed import (DedupTransposedInitializers, corner_key, same_bits,
                                                    transposition_of)
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.runtime import compare_outputs, run_model


def tied_model(vocab: int = 300, hidden: int = 64, ir_version: int = 8, differ: bool = False) -> onnx.ModelProto:
    """Gather from wte [V, H]; LM head MatMul by the stored transpose [H, V]."""
    rng = np.random.default_rng(0)
    wte = rng.standard_normal((vocab, hidden)).astype(np.float32)
    head = np.ascontiguousarray(wte.T)
    if differ:
        head[hidden - 1, vocab - 1] += 1.0
    nodes = [helper.make_node("Gather", ["wte", "ids"], ["h"]), helper.make_node("MatMul", ["h", "head"], ["logits"])]
    inits = [numpy_helper.from_array(wte, "wte"), numpy_helper.from_array(head, "head")]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])]
    if ir_version < 4:
        inputs += [helper.make_tensor_value_info("wte", TensorProto.FLOAT, [vocab, hidden]),
                   helper.make_tensor_value_info("head", TensorProto.FLOAT, [hidden, vocab])]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", vocab])], inits)
    return helper.make_model(graph, ir_version=ir_version, opset_imports=[helper.make_opsetid("", 17 if ir_version >= 4 else 9)])


def _run(model: onnx.ModelProto, pipeline: str = "dedup-transposed-initializers", **ctx: object) -> tuple[ir.Model, dict]:
    graph = ir.load(model)
    report = PassManager(pipeline, PassContext(registry=PassRegistry.default(plugins=False), **ctx)).run(graph)
    ir.verify(graph)
    return graph, report.totals().get("dedup-transposed-initializers", {}).get("counters", {})


def _logits(model: onnx.ModelProto) -> np.ndarray:
    ids = np.random.default_rng(1).integers(0, 300, (2, 5)).astype(np.int64)
    return run_model(model, {"ids": ids})["logits"]


def test_tied_embedding_is_stored_once_and_outputs_are_identical(tmp_path: object) -> None:
    source = tied_model()  # 76.8 kB per copy: above min-bytes=0, below the 1 MiB default
    graph, counters = _run(source, "dedup-transposed-initializers<min-bytes=0>")
    assert counters == {"removed-initializers": 1, "saved-bytes": 300 * 64 * 4, "transposes": 1, "reshapes": 0}
    assert set(graph.graph.initializers) - {"wte"} <= {"wte_rows", "zero", "minus_one", "wte_cols"}
    assert "Transpose" not in [n.op_type for n in graph.graph]  # the product reads wte transposed
    gemm = next(n for n in graph.graph if n.op_type == "Gemm")
    assert gemm.inputs[1].name == "wte" and gemm.attr("transB") == 1
    assert graph.graph.outputs[0].name == "logits" and graph.graph.outputs[0].producer.op_type == "Reshape"
    output = ir.to_proto(graph)
    np.testing.assert_array_equal(_logits(source), _logits(output))
    path = os.path.join(str(tmp_path), "out.onnx")
    ir.save(graph, path)
    assert os.path.getsize(path) < source.ByteSize() * 0.6


def test_default_threshold_is_one_mebibyte() -> None:
    _, small = _run(tied_model())
    assert not small.get("removed-initializers")
    _, large = _run(tied_model(vocab=4200, hidden=64))  # 1.07 MB per copy
    assert large["removed-initializers"] == 1


@pytest.mark.parametrize("differ", [True])
def test_a_single_different_element_keeps_both(differ: bool) -> None:
    graph, counters = _run(tied_model(differ=differ), "dedup-transposed-initializers<min-bytes=0,samples=1>")
    assert not counters.get("removed-initializers")
    assert set(graph.graph.initializers) == {"wte", "head"}


def test_a_different_middle_element_keeps_both() -> None:
    """Equal corners pass the prefilter; with no samples the full comparison alone must refuse."""
    source = tied_model()
    head = numpy_helper.to_array(source.graph.initializer[1]).copy()
    head[31, 150] = np.nextafter(head[31, 150], np.float32(np.inf))
    source.graph.initializer[1].CopyFrom(numpy_helper.from_array(head, "head"))
    graph, counters = _run(source, "dedup-transposed-initializers<min-bytes=0,samples=0>")
    assert not counters.get("removed-initializers")
    assert set(graph.graph.initializers) == {"wte", "head"}


def _model_with_unrelated_weights(count: int) -> onnx.ModelProto:
    """The tied pair plus ``count`` unrelated [64, 300] weights of the same size, each read by a MatMul."""
    source = tied_model()
    rng = np.random.default_rng(7)
    for i in range(count):
        other = rng.standard_normal((64, 300)).astype(np.float32)
        source.graph.initializer.append(numpy_helper.from_array(other, f"w{i}"))
        source.graph.node.append(helper.make_node("MatMul", ["h", f"w{i}"], [f"y{i}"]))
        source.graph.output.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["B", "S", 300]))
    return source


def test_only_weights_with_equal_corners_are_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unrelated weights of equal size differ in their first or last element: no pair of them is compared."""
    compared: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = dedup_transposed.transposition_of

    def spy(original: np.ndarray, duplicate: np.ndarray, **kwargs: object) -> object:
        compared.append((original.shape, duplicate.shape))
        return real(original, duplicate, **kwargs)

    monkeypatch.setattr(dedup_transposed, "transposition_of", spy)
    source = _model_with_unrelated_weights(4)
    graph, counters = _run(source, "dedup-transposed-initializers<min-bytes=0>")
    assert compared == [((300, 64), (64, 300))]  # 6 weights, 15 pairs: only wte/head is compared
    assert counters["removed-initializers"] == 1
    assert set(graph.graph.initializers) >= {"wte", "w0", "w1", "w2", "w3"} and "head" not in graph.graph.initializers
    ids = np.random.default_rng(1).integers(0, 300, (2, 5)).astype(np.int64)
    expected, actual = run_model(source, {"ids": ids}), run_model(ir.to_proto(graph), {"ids": ids})
    assert set(expected) == set(actual)
    for name in expected:
        np.testing.assert_array_equal(expected[name], actual[name])


def test_corner_key_is_invariant_under_transposes_and_reshapes() -> None:
    w = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    key = corner_key(w)
    for perm in [(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]:
        assert corner_key(np.ascontiguousarray(w.transpose(perm))) == key
    assert corner_key(w.reshape(12, 5)) == corner_key(w.reshape(-1)) == key
    assert corner_key(w[::-1].copy()) != key
    assert corner_key(-np.zeros((2, 2), np.float32)) != corner_key(np.zeros((2, 2), np.float32))  # bits, not values
    assert corner_key(np.float32(3.0).reshape(())) == corner_key(np.array([3.0], np.float32))
    assert corner_key(np.zeros((0, 4), np.float32)) == b""


def test_overridable_weights_of_ir3_models_stay() -> None:
    graph, counters = _run(tied_model(ir_version=3), "dedup-transposed-initializers<min-bytes=0>")
    assert not counters.get("removed-initializers")
    assert len(graph.graph.initializers) == 2


def test_transpose_without_an_absorbing_reader_keeps_both() -> None:
    """A transposed weight read by anything but a matrix product's B would need a Transpose at run time."""
    source = tied_model()
    source.graph.node[1].op_type = "Add"  # Add(h [B,S,64], head [64,300]) cannot absorb a transpose
    source.graph.node[1].input[:] = ["head", "head"]
    del source.graph.output[:]
    source.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [64, 300]))
    graph, counters = _run(source, "dedup-transposed-initializers<min-bytes=0>")
    assert not counters.get("removed-initializers")
    assert set(graph.graph.initializers) == {"wte", "head"}


def test_static_rank2_product_becomes_one_gemm() -> None:
    """A MatMul whose left operand is known to be a matrix becomes Gemm(A, W, transB=1), nothing else."""
    rng = np.random.default_rng(0)
    wte = rng.standard_normal((300, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["wte", "ids"], ["h"]), helper.make_node("MatMul", ["h", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 300])],
                              [numpy_helper.from_array(wte, "wte"), numpy_helper.from_array(np.ascontiguousarray(wte.T), "head")],
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [4, 64])])
    source = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    model, counters = _run(source, "dedup-transposed-initializers<min-bytes=0>")
    assert counters["removed-initializers"] == 1
    assert [n.op_type for n in model.graph] == ["Gather", "Gemm"]
    ids = np.array([0, 5, 299, 7], dtype=np.int64)
    np.testing.assert_allclose(run_model(source, {"ids": ids})["logits"],
                               run_model(ir.to_proto(model), {"ids": ids})["logits"], rtol=1e-5, atol=1e-5)


def test_bisect_limit_is_honoured() -> None:
    graph, counters = _run(tied_model(), "dedup-transposed-initializers<min-bytes=0>", bisect_limit=0)
    assert not counters.get("removed-initializers")
    assert len(graph.graph.initializers) == 2


def test_o3_folds_the_transpose_into_the_product() -> None:
    """At -O3 the product reads wte transposed in place (transB): no Transpose runs at all.

    The product is the Gemm this pass writes, or the contrib FusedMatMul that -O3's contrib
    group may make of it; either way it reads ``wte`` itself with ``transB=1``.
    """
    source = tied_model(vocab=4200, hidden=64)
    graph, counters = _run(source, "O3")
    assert counters["removed-initializers"] == 1
    assert "Transpose" not in [n.op_type for n in graph.graph]
    products = [n for n in graph.graph if n.op_type in ("Gemm", "FusedMatMul")]
    assert len(products) == 1 and products[0].inputs[1].name == "wte" and products[0].attr("transB") == 1
    ids = np.random.default_rng(1).integers(0, 4200, (2, 5)).astype(np.int64)
    expected = run_model(source, {"ids": ids})
    actual = run_model(ir.to_proto(graph), {"ids": ids})
    assert compare_outputs(expected, actual, rtol=1e-5, atol=1e-5).ok


# -- the comparison itself --------------------------------------------------------------------------
def test_transposition_of_finds_permutations_and_reshapes() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4, 5)).astype(np.float32)
    assert transposition_of(w, np.ascontiguousarray(w.transpose(2, 0, 1))) == ("transpose", (2, 0, 1))
    assert transposition_of(w, w.reshape(12, 5)) == ("reshape", (12, 5))
    assert transposition_of(w, np.ascontiguousarray(w.transpose(1, 0, 2))[::-1].copy()) is None
    assert transposition_of(w, w.astype(np.float64)) is None
    assert transposition_of(w, w.copy()) is None  # equal shapes belong to dedup-initializers


def test_square_weights_try_every_matching_permutation() -> None:
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert transposition_of(w, np.ascontiguousarray(w.T)) == ("transpose", (1, 0))
    symmetric = w + w.T
    assert transposition_of(symmetric, symmetric.copy()) is None


def test_comparison_is_bitwise() -> None:
    zeros = np.zeros((2, 3), np.float32)
    assert transposition_of(zeros, -np.zeros((3, 2), np.float32)) is None
    nan = np.full((2, 3), np.nan, np.float32)
    assert transposition_of(nan, np.ascontiguousarray(nan.T)) == ("transpose", (1, 0))


@pytest.mark.parametrize("perm", [(1, 0, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0), (0, 2, 1)])
def test_slab_comparison_finds_every_difference(perm: tuple[int, ...]) -> None:
    """Slabs follow the view's outermost axis; a change anywhere (one-element chunks) is still seen."""
    w = np.random.default_rng(0).standard_normal((4, 5, 6)).astype(np.float32)
    target = np.ascontiguousarray(w.transpose(perm))
    assert same_bits(w.transpose(perm), target, chunk_bytes=1)
    for index in [(0, 0, 0), (1, 2, 3), tuple(d - 1 for d in target.shape)]:
        changed = target.copy()
        changed[index] = np.nextafter(changed[index], np.float32(np.inf))
        assert not same_bits(w.transpose(perm), changed, chunk_bytes=1)
        assert not same_bits(w.transpose(perm), changed, chunk_bytes=1 << 20)


def test_chunked_comparison_sees_a_late_difference() -> None:
    """With one-row chunks and no lucky sample, the last element still decides."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    other = np.ascontiguousarray(w.T)
    other[-1, -1] = np.nextafter(other[-1, -1], np.float32(np.inf))
    assert not same_bits(w.T, other, chunk_bytes=1)
    assert same_bits(w.T, np.ascontiguousarray(w.T), chunk_bytes=1)
    assert transposition_of(w, other, samples=0, chunk_bytes=1, rng=random.Random(0)) is None
    # The duplicate with the longer first axis is the one viewed transposed: same answers.
    wide = np.ascontiguousarray(w.T)
    assert transposition_of(wide, np.ascontiguousarray(wide.T), samples=0, chunk_bytes=1) == ("transpose", (1, 0))
    changed = np.ascontiguousarray(wide.T)
    changed[-1, -1] = np.nextafter(changed[-1, -1], np.float32(np.inf))
    assert transposition_of(wide, changed, samples=0, chunk_bytes=1) is None


def test_pass_options_are_declared() -> None:
    assert DedupTransposedInitializers.options == {"min_bytes": 1 << 20, "samples": 64, "chunk_bytes": 1 << 20}
    assert DedupTransposedInitializers.opt_level == 2
