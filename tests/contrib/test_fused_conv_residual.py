"""``contrib-fused-conv`` residual forms: ``Add`` and a two-input ``Sum`` go into FusedConv's ``Z``.

Goldens: ``fixtures/contrib-fused-conv/residual_*``. Here: the refusals named by why-not (a
three-input Sum, ``Z`` being the Conv output itself) and a Caffe2-style ResNet block
(Conv → BatchNormalization → Sum with the shortcut → Relu) at ``-O3`` against onnxruntime on the
original with its optimizations off (rtol 1e-5, atol 1e-5: only the order in which the bias, the
shortcut and the products are summed changes).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.parser
import pytest
from onnx import TensorProto, numpy_helper

from graphopt import ir
from graphopt.passes.contrib.fused_conv import FUSED_CONV_RULES
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.rewrite import format_why_not, why_not
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """Built-in passes only."""
    return PassRegistry.default(plugins=False)


def _why_not(text: str, rule_name: str, registry: PassRegistry) -> str:
    model = ir.load(onnx.parser.parse_model(text))
    ctx = PassContext(registry=registry)
    PassManager("infer-shapes", ctx).run(model)
    rule = FUSED_CONV_RULES.get(rule_name)
    assert rule is not None
    return format_why_not(why_not(model, rule, ctx))


def test_sum_of_three_inputs_is_not_a_residual(registry: PassRegistry) -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,2,5,5] x, float[1,3,5,5] z, float[1,3,5,5] u) => (float[1,3,5,5] y)
       <float[3,2,1,1] w = {0.5,-0.25,0.75,1.5,-1.0,0.125}> {
       c = Conv (x, w)
       s = Sum (c, z, u)
       y = Relu (s)
    }
    """
    model = ir.load(onnx.parser.parse_model(text))
    PassManager("infer-shapes,contrib-fused-conv", PassContext(registry=registry)).run(model)
    assert [n.op_type for n in model.graph] == ["Conv", "Sum", "Relu"]


def test_self_residual_is_refused_with_a_reason(registry: PassRegistry) -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,2,5,5] x) => (float[1,3,5,5] y) <float[3,2,1,1] w = {0.5,-0.25,0.75,1.5,-1.0,0.125}> {
       c = Conv (x, w)
       s = Sum (c, c)
       y = Relu (s)
    }
    """
    assert "Z is the Conv output itself" in _why_not(text, "fused-conv-sum-relu", registry)


def _caffe2_resnet_block() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    channels = 8

    def tensor(name: str, *shape: int, scale: float = 0.3, offset: float = 0.0) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale + offset).astype(np.float32), name)

    inits = [tensor("w1", channels, channels, 3, 3), tensor("w2", channels, channels, 3, 3)]
    for i in (1, 2):
        inits += [tensor(f"g{i}", channels, offset=1.0), tensor(f"b{i}", channels), tensor(f"m{i}", channels),
                  numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), f"v{i}")]
    nodes = [
        oh.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        oh.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"]),
        oh.make_node("Relu", ["n1"], ["r1"]),
        oh.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        oh.make_node("BatchNormalization", ["c2", "g2", "b2", "m2", "v2"], ["n2"]),
        oh.make_node("Sum", ["n2", "x"], ["s"]),
        oh.make_node("Relu", ["s"], ["y"]),
    ]
    # Static spatial dims: onnx shape inference leaves a padded Conv's symbolic H, W unknown, and
    # Z must provably have the Conv output's shape.
    dims = ["N", channels, 7, 5]
    graph = oh.make_graph(nodes, "resnet_block", [oh.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, dims)], initializer=inits)
    return oh.make_model(graph, ir_version=8, opset_imports=[oh.make_opsetid("", 9)])


def test_caffe2_resnet_block_fuses_both_convs_at_o3(registry: PassRegistry) -> None:
    source = _caffe2_resnet_block()
    model = ir.load(source)
    report = PassManager("O3", PassContext(registry=registry)).run(model)
    output = ir.to_proto(model)
    assert [n.op_type for n in output.graph.node] == ["FusedConv", "FusedConv"]
    assert len(output.graph.node[1].input) == 4 and output.graph.node[1].input[3] == "x"
    assert report.totals()["contrib-fused-conv"]["counters"].get("fused-conv-sum-relu") == 1
    session = make_session(source)
    feeds = random_inputs(session, seed=0, dims={"N": 2})
    expected = dict(zip(["y"], session.run(None, feeds)))
    comparison = compare_outputs(expected, run_model(output, feeds), rtol=1e-5, atol=1e-5)
    assert comparison.ok, comparison.summary()
