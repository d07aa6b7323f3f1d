"""graphopt's own type rules for Conv, FusedConv, reductions and recurrent layers.

Each case is checked against onnx's shape inference on the same node (what onnx does well is
the reference), then the rules are shown to type a node onnx leaves untyped (a contrib op)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from graphopt.passes.fold._rules import infer_node_types
from graphopt.passes.fold._symbolic import SymbolicValues

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.runtime import compare_outputs, run_model

CASES = {
    "conv_pads_strides": ("float[2,3,17] x", "float[8,3,5] w",
                          "y = Conv<pads = [1, 2], strides = [2]>(x, w)", 17),
    "conv_dilations_2d": ("float[1,4,20,9] x", "float[6,2,3,3] w",
                          "y = Conv<dilations = [2, 1], group = 2>(x, w)", 17),
    "conv_same_upper": ("float[1,2,10,11] x", "float[5,2,3,3] w",
                        "y = Conv<auto_pad = \"SAME_UPPER\", strides = [2, 3]>(x, w)", 17),
    "conv_valid": ("float[1,2,10] x", "float[5,2,4] w",
                   "y = Conv<auto_pad = \"VALID\", strides = [3]>(x, w)", 17),
    "conv_symbolic_batch": ("float[N,2,10] x", "float[5,2,4] w", "y = Conv(x, w)", 17),
    "reduce_mean_attr": ("float[N,3,1] x", "float[1] w", "y = ReduceMean<axes = [-1], keepdims = 0>(x)", 13),
    "reduce_mean_input": ("float[N,3,4] x", "int64[1] w", "y = ReduceMean(x, w)", 18),
    "reduce_sum_all": ("float[N,3,4] x", "float[1] w", "y = ReduceSum<keepdims = 0>(x)", 13),
    "reduce_max_keep": ("float[2,3,4] x", "float[1] w", "y = ReduceMax<axes = [0, 2]>(x)", 13),
    "lstm_forward": ("float[5,N,8] x", "float[1,16,8] w",
                     "y, h, c = LSTM<hidden_size = 4>(x, w, r)", 17),
    "lstm_bidirectional_batch_first": ("float[N,5,8] x", "float[2,16,8] w",
                                       "y, h, c = LSTM<hidden_size = 4, direction = \"bidirectional\", layout = 1>(x, w, r2)", 17),
    "gru": ("float[5,N,8] x", "float[1,12,8] w", "y, h = GRU<hidden_size = 4>(x, w, g)", 17),
}


def _model(x_decl: str, w_decl: str, body: str, opset: int) -> onnx.ModelProto:
    w_name = w_decl.split()[-1]
    constant = "  w = Constant<value = int64[1] {1}>()\n" if w_decl.startswith("int64") else ""
    inputs = x_decl if constant else f"{x_decl}, {w_decl}"
    outputs = ", ".join(f"float {o.strip()}" for o in body.split("=")[0].split(","))
    text = f"""
<ir_version: 8, opset_import: ["" : {opset}]>
g ({inputs}) => ({outputs})
  <float[1,16,4] r = {{{", ".join(["0.1"] * 64)}}}, float[2,16,4] r2 = {{{", ".join(["0.1"] * 128)}}},
   float[1,12,4] g = {{{", ".join(["0.1"] * 48)}}}>
{{
{constant}  {body}
}}
"""
    assert w_name == "w"
    model = onnx.parser.parse_model(text)
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")  # declared without a shape: inference decides
    return model


def _onnx_types(model: onnx.ModelProto) -> dict[str, ir.TensorType]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    found = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = info.type.tensor_type
        if tt.HasField("shape"):
            found[info.name] = ir.TensorType(tt.elem_type, ir.Shape.from_proto(tt.shape))
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_agrees_with_onnx(case: str) -> None:
    """Every output type of the rule equals onnx's inference on the same node."""
    proto = _model(*CASES[case])
    expected = _onnx_types(proto)
    model = ir.load(proto)
    node = next(n for n in model.graph if n.op_type != "Constant")
    types = infer_node_types(node, SymbolicValues())
    assert len(types) == len(node.outputs)
    for out, got in zip(node.outputs, types):
        assert got is not None, out.name
        assert got.dtype == expected[out.name].dtype
        assert tuple(got.shape.dims) == tuple(expected[out.name].shape.dims), (case, out.name)


def test_unknown_input_rank_gives_weight_rank_and_channels() -> None:
    """A Conv input of unknown shape still yields rank and output channels from the weight."""
    model = ir.load(_model("float[N,2,10] x", "float[5,2,4] w", "y = Conv(x, w)", 17))
    node = next(n for n in model.graph if n.op_type == "Conv")
    node.inputs[0].type = ir.TensorType(onnx.TensorProto.FLOAT, None)
    (got,) = infer_node_types(node, SymbolicValues())
    assert tuple(got.shape.dims) == (None, 5, None)


def test_fused_conv_after_contrib_is_typed_and_its_tail_simplified() -> None:
    """onnx cannot type com.microsoft.FusedConv; the rule does, so the Squeeze/ReduceMean/Unsqueeze
    chain after it (silero-vad's decoder tail) reduces to one Squeeze. Numbers are unchanged."""
    text = """
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
g (float[N,4,1] x) => (float[N,1] y)
  <float[1,4,1] w = {0.5, -1.0, 2.0, 0.25}, float[1] b = {0.1}>
{
  c = com.microsoft.FusedConv<activation = "Sigmoid", kernel_shape = [1]>(x, w, b)
  one = Constant<value = int64[1] {1}>()
  s = Squeeze(c, one)
  m = ReduceMean<axes = [1], keepdims = 0>(s)
  y = Unsqueeze(m, one)
}
"""
    source = onnx.parser.parse_model(text)
    model = ir.load(source)
    ctx = PassContext(registry=PassRegistry.default(plugins=False))
    PassManager("topo-sort,infer-shapes,fixpoint<max=4>(simplify)", ctx).run(model)
    ops = [n.op_type for n in model.graph if n.op_type != "Constant"]
    assert ops == ["FusedConv", "Squeeze"]
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4, 1)).astype(np.float32)}
    result = compare_outputs(run_model(source, feeds), run_model(ir.to_proto(model), feeds), rtol=0, atol=0)
    assert result.ok, result.summary()
