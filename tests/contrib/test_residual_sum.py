"""contrib-residual-sum: the residual Add before LayerNormalization is written Sum on the CPU target.

Checked against onnxruntime itself: before the pass its CPU provider fuses the block into
``SkipLayerNormalization`` at ``ORT_ENABLE_ALL``, after it keeps ``LayerNormalization``, and the
outputs are bit for bit those of the original model (ORT optimizations off).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir
from graphopt.passes.contrib.residual_sum import RESIDUAL_SUM_RULES
from graphopt.pipeline import PassContext, PassManager
from graphopt.rewrite import apply_rules
from graphopt.runtime import compare_outputs, run_model

HIDDEN = 16


def _post_norm_block(layers: int = 3) -> onnx.ModelProto:
    """BERT-style post-norm residuals: ``h = LayerNorm(MatMul(h, W) + b + h)``, static shapes."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    h = "x"
    for i in range(layers):
        for name, shape in ((f"w{i}", (HIDDEN, HIDDEN)), (f"b{i}", (HIDDEN,)), (f"g{i}", (HIDDEN,)),
                            (f"beta{i}", (HIDDEN,))):
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name))
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"biased{i}"]),
                  helper.make_node("Add", [f"biased{i}", h], [f"sum{i}"]),
                  helper.make_node("LayerNormalization", [f"sum{i}", f"g{i}", f"beta{i}"], [f"h{i}"], axis=-1,
                                   epsilon=1e-5)]
        h = f"h{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(nodes, "post_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def _ort_fused_ops(model: onnx.ModelProto) -> set[str]:
    """The op types onnxruntime's CPU provider runs after its own ORT_ENABLE_ALL optimizations."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = path
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(path).graph.node}


def test_onnxruntime_keeps_layer_norm_after_the_pass() -> None:
    """The block ORT fuses into SkipLayerNormalization is left to LayerNormalization, outputs equal."""
    source = _post_norm_block()
    assert "SkipLayerNormalization" in _ort_fused_ops(source)
    model = ir.load(source)
    report = PassManager("contrib-residual-sum", PassContext(opt_level=3)).run(model)
    ir.verify(model)
    output = ir.to_proto(model)
    assert report.totals()["contrib-residual-sum"]["counters"] == {"residual-add-as-sum": 3}
    assert [n.op_type for n in output.graph.node].count("Sum") == 3
    fused = _ort_fused_ops(output)
    assert "SkipLayerNormalization" not in fused and "LayerNormalization" in fused
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 8, HIDDEN)).astype(np.float32)}
    comparison = compare_outputs(run_model(source, feeds), run_model(output, feeds, optimize=True), rtol=0, atol=0)
    assert comparison.ok, comparison.summary()


def test_cuda_target_keeps_the_add() -> None:
    """On the CUDA target the fused kernel pays: nothing changes, and the reason names the target."""
    model = ir.load(_post_norm_block(layers=1))
    assert apply_rules(model, RESIDUAL_SUM_RULES, PassContext(opt_level=3, target="cuda")) == {}
    assert all(n.op_type != "Sum" for n in model.graph)
    rule = RESIDUAL_SUM_RULES.get("residual-add-as-sum")
    assert rule is not None
    reasons = [rule.find_match(n, PassContext(target="cuda")) for n in model.graph if n.op_type == "Add"]
    assert any(isinstance(r, str) and "target 'cuda'" in r for r in reasons)
