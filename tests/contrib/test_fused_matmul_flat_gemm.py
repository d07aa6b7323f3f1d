"""contrib-fused-matmul on a flattened Gemm: the language-model head of a tied embedding.

``dedup-transposed-initializers`` stores GPT-2's tied embedding once and writes the head as
``Reshape(Gemm(Reshape(x, [-1, H]), wte, transB=1), lead + [V])``; at ``-O3`` the flattened
Gemm becomes one ``FusedMatMul`` on the 3-D input, so no Reshape copies the logits. Checked
end to end on a small model: the graph, the numbers against onnxruntime on the original model
(optimizations off), and that the fused model loads with onnxruntime's optimizations on.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import compare_outputs, run_model

VOCAB, HIDDEN = 40, 8
PIPELINE = ("topo-sort,infer-shapes,dedup-transposed-initializers<min_bytes=0>,contrib-fused-matmul,"
            "eliminate-dead-code")


def _tied_lm_head() -> onnx.ModelProto:
    """Token lookup in ``wte [V, H]``, a LayerNorm, and a head reading the stored transpose ``[H, V]``."""
    rng = np.random.default_rng(0)
    wte = (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(wte, "wte"), numpy_helper.from_array(np.ascontiguousarray(wte.T), "head"),
             numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "beta")]
    nodes = [helper.make_node("Gather", ["wte", "input_ids"], ["embedded"]),
             helper.make_node("LayerNormalization", ["embedded", "gamma", "beta"], ["normed"], axis=-1),
             helper.make_node("MatMul", ["normed", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", VOCAB])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_tied_head_becomes_one_fused_matmul() -> None:
    """The head reads wte through FusedMatMul(transB=1) and writes the logits itself; numbers kept."""
    source = _tied_lm_head()
    model = ir.load(source)
    report = PassManager(PIPELINE, PassContext(opt_level=3)).run(model)
    ir.verify(model)
    output = ir.to_proto(model)
    counters = report.totals()["contrib-fused-matmul"]["counters"]
    assert counters == {"fused-matmul-flattened-gemm": 1}
    producer = {o: n for n in output.graph.node for o in n.output}["logits"]
    assert (producer.domain, producer.op_type) == ("com.microsoft", "FusedMatMul")
    assert producer.input[1] == "wte" and helper.get_attribute_value(
        next(a for a in producer.attribute if a.name == "transB")) == 1
    assert {n.op_type for n in output.graph.node} == {"Gather", "LayerNormalization", "FusedMatMul"}
    assert {t.name for t in output.graph.initializer} == {"wte", "gamma", "beta"}
    feeds = {"input_ids": np.random.default_rng(1).integers(0, VOCAB, (2, 5)).astype(np.int64)}
    expected = run_model(source, feeds)
    for optimize in (False, True):
        comparison = compare_outputs(expected, run_model(output, feeds, optimize=optimize), rtol=1e-5, atol=1e-5)
        assert comparison.ok, comparison.summary()


def test_cuda_target_has_the_kernel_too() -> None:
    """FusedMatMul is in the CUDA column of the capability table: the head fuses for cuda as well."""
    model = ir.load(_tied_lm_head())
    report = PassManager(PIPELINE, PassContext(opt_level=3, target="cuda")).run(model)
    assert report.totals()["contrib-fused-matmul"]["counters"] == {"fused-matmul-flattened-gemm": 1}
