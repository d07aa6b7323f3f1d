"""Fusion passes beyond the goldens: float16, function bodies, properties, registration, helpers.

Every test that changes a model checks the graph (which nodes are left) and the numbers
(onnxruntime, its optimizations off, on the original and the fused model).
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir
from graphopt.passes.fusion import FUSION_PASSES
from graphopt.passes.fusion._common import channel_vector, over_normalized_axes
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

FUSION_MODULES = ["affine_chain", "batch_norm", "conv_affine", "conv_bn", "gelu", "layer_norm", "linear_bn",
                  "matmul_add", "pad", "rms_norm"]


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """The built-in passes only."""
    return PassRegistry.default(plugins=False)


def _optimize(proto: onnx.ModelProto, pipeline: str, registry: PassRegistry,
              ctx: PassContext | None = None) -> tuple[onnx.ModelProto, ir.Model]:
    model = ir.load(proto)
    PassManager(pipeline, ctx or PassContext(registry=registry)).run(model)
    ir.verify(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    return out, model


def _assert_same_outputs(original: onnx.ModelProto, fused: onnx.ModelProto, rtol: float, atol: float,
                         seed: int = 0) -> None:
    session = make_session(original)
    feeds = random_inputs(session, seed=seed)
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feeds)))
    comparison = compare_outputs(expected, run_model(fused, feeds), rtol=rtol, atol=atol, names=names)
    assert comparison.ok, comparison.summary()


def _conv_bn_model(dtype: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)

    def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(array.astype(np_dtype), name)

    inits = [tensor("w", rng.standard_normal((4, 3, 3, 3)) * 0.3), tensor("b", rng.standard_normal(4) * 0.1),
             tensor("scale", rng.uniform(0.5, 1.5, 4)), tensor("bias", rng.standard_normal(4) * 0.1),
             tensor("mean", rng.standard_normal(4) * 0.1), tensor("var", rng.uniform(0.5, 1.5, 4))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", dtype, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_float16_conv_bn_folds_in_float16(registry: PassRegistry) -> None:
    """A float16 Conv + BN folds; the folded tensors are float16 and the outputs agree to float16 precision."""
    original = _conv_bn_model(TensorProto.FLOAT16)
    fused, model = _optimize(original, "fuse-bn-into-conv,eliminate-dead-code", registry)
    assert [n.op_type for n in model.graph] == ["Conv"]
    assert {v.const_value.dtype for v in model.graph.initializers.values()} == {TensorProto.FLOAT16}
    # float16 keeps 11 significant bits (relative step ~1e-3); the two paths round differently
    # at every step of a 27-term dot product, so agreement is to a few float16 steps.
    _assert_same_outputs(original, fused, rtol=1e-2, atol=1e-2)


def test_float32_conv_bn_folds_with_default_tolerance(registry: PassRegistry) -> None:
    """Folding a float32 BN into a Conv agrees with the original to rtol 1e-4, atol 1e-5."""
    original = _conv_bn_model(TensorProto.FLOAT, seed=3)
    fused, model = _optimize(original, "fuse-bn-into-conv,eliminate-dead-code", registry)
    assert [n.op_type for n in model.graph] == ["Conv"]
    assert len(model.graph.initializers) == 2  # the folded weight and bias; the old ones are gone
    _assert_same_outputs(original, fused, rtol=1e-4, atol=1e-5)


FUNCTION_MODEL = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[1,2,4,4] x) => (float[1,3,4,4] y) {
  y = local.ConvBn(x)
}
<domain: "local", opset_import: ["" : 17]>
ConvBn (x) => (y) {
  w = Constant<value = float[3,2,1,1] {0.5, -1.0, 0.25, 2.0, -0.75, 1.5}>()
  scale = Constant<value = float[3] {1.5, 0.5, 2.0}>()
  bias = Constant<value = float[3] {0.1, -0.2, 0.3}>()
  mean = Constant<value = float[3] {0.05, 0.4, -0.3}>()
  var = Constant<value = float[3] {0.8, 1.2, 0.3}>()
  c = Conv(x, w)
  y = BatchNormalization(c, scale, bias, mean, var)
}
"""


def test_function_body_folds_with_constant_nodes(registry: PassRegistry) -> None:
    """Inside a function (no initializers there) the folded weight and bias are Constant nodes."""
    original = onnx.parser.parse_model(FUNCTION_MODEL)
    fused, model = _optimize(original, "fuse-bn-into-conv,eliminate-dead-code", registry)
    (function,) = model.functions.values()
    assert sorted(n.op_type for n in function.graph) == ["Constant", "Constant", "Conv"]
    _assert_same_outputs(original, fused, rtol=1e-4, atol=1e-5)


def test_bisect_limit_stops_after_the_first_fusion(registry: PassRegistry) -> None:
    """With ``bisect_limit=1`` exactly one of two foldable Conv + BN pairs is fused."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,2,4,4] x) => (float[1,2,4,4] y)
      <float[2,2,1,1] w1 = {1, 2, 3, 4}, float[2,2,1,1] w2 = {4, 3, 2, 1},
       float[2] s = {1.5, 0.5}, float[2] b = {0.1, 0.2}, float[2] m = {0.3, -0.1}, float[2] v = {1.0, 2.0}>
    {
      c1 = Conv(x, w1)
      n1 = BatchNormalization(c1, s, b, m, v)
      c2 = Conv(n1, w2)
      y = BatchNormalization(c2, s, b, m, v)
    }
    """
    original = onnx.parser.parse_model(text)
    ctx = PassContext(registry=registry, bisect_limit=1)
    fused, model = _optimize(original, "fuse-bn-into-conv", registry, ctx)
    assert [n.op_type for n in model.graph] == ["Conv", "Conv", "BatchNormalization"]
    _assert_same_outputs(original, fused, rtol=1e-4, atol=1e-5)


# -- a property: conv-mul fires exactly for per-channel constants, and then keeps the numbers --
#: Constant shapes that broadcast against the [1, 3, 4, 4] Conv output, per channel or not.
_SHAPES = [(), (1,), (3, 1, 1), (1, 3, 1, 1), (1, 1, 1, 1), (1, 3, 4, 4), (4,), (4, 1), (1, 1, 4), (3, 4, 4),
           (1, 1, 3, 1, 1)]


def _per_channel(shape: tuple[int, ...]) -> bool:
    """Does a constant of ``shape`` hold one value per channel of a [1, 3, 4, 4] tensor?"""
    if len(shape) > 4:
        return False
    padded = (1,) * (4 - len(shape)) + shape
    return padded[0] == 1 and padded[1] in (1, 3) and padded[2:] == (1, 1)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from(_SHAPES), op=st.sampled_from(["Mul", "Add"]), first=st.booleans(),
       seed=st.integers(0, 2**16))
def test_conv_mul_add_fires_only_for_per_channel_constants(registry: PassRegistry, shape: tuple[int, ...],
                                                         op: str, first: bool, seed: int) -> None:
    """Per-channel constants fold into the Conv; any other broadcast leaves the graph alone; numbers agree."""
    rng = np.random.default_rng(seed)
    out_shape = list(np.broadcast_shapes((1, 3, 4, 4), shape))
    operands = ["k", "c"] if first else ["c", "k"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node(op, operands, ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
         numpy_helper.from_array(rng.uniform(-2, 2, shape).astype(np.float32), "k")])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    original.ir_version = 8
    fused, model = _optimize(original, "fuse-mul-add-into-conv,eliminate-dead-code", registry)
    ops = [n.op_type for n in model.graph]
    assert ops == (["Conv"] if _per_channel(shape) else ["Conv", op])
    _assert_same_outputs(original, fused, rtol=1e-4, atol=1e-5, seed=seed)


# -- registration and documentation ----------------------------------------------------------
def test_fusions_group_runs_in_o2_and_o3(registry: PassRegistry) -> None:
    """Every fusion pass is registered, in the ``fusions`` group, inside O2's and O3's fixed point."""
    group = registry.pipeline("fusions")
    assert group is not None
    assert group.split(",") == [p.name for p in FUSION_PASSES]
    for level in ("O2", "O3"):
        preset = registry.pipeline(level)
        assert preset is not None and "fixpoint<max=8>(simplify,fusions)" in preset
    for cls in FUSION_PASSES:
        assert registry.get(cls.name) is cls
        assert cls.requires == frozenset({"shapes-inferred"})


@pytest.mark.parametrize("module_name", FUSION_MODULES)
def test_each_fusion_module_states_its_algebra_and_limits(module_name: str) -> None:
    """Each fusion module opens with the identity that makes it legal and when it must not fire."""
    module = importlib.import_module(f"graphopt.passes.fusion.{module_name}")
    doc = inspect.getdoc(module) or ""
    assert "Algebra" in doc and "Must not fire" in doc


def test_channel_vector_accepts_only_channel_broadcasts() -> None:
    """[C,1,1], [1,C,1,1] and scalars are per channel; spatial or higher-rank shapes are not."""
    assert channel_vector(np.arange(3.0).reshape(3, 1, 1), 3, 4).tolist() == [0.0, 1.0, 2.0]
    assert channel_vector(np.array(2.0), 3, 4).tolist() == [2.0, 2.0, 2.0]
    assert channel_vector(np.ones((1, 3, 1, 1)), 3, 4) is not None
    assert channel_vector(np.ones((1, 3, 2, 1)), 3, 4) is None
    assert channel_vector(np.ones((3,)), 3, 4) is None  # broadcasts along the width
    assert channel_vector(np.ones((1, 1, 3, 1, 1)), 3, 4) is None


def test_over_normalized_axes_refuses_leading_variation() -> None:
    """γ of [1,1,8] spreads over [8]; [2,1,8] varies along the batch and is refused."""
    assert over_normalized_axes(np.arange(8.0).reshape(1, 1, 8), 3, (8,)).shape == (8,)
    assert over_normalized_axes(np.array(3.0), 3, (2, 4)).tolist() == [[3.0] * 4] * 2
    assert over_normalized_axes(np.ones((2, 1, 8)), 3, (8,)) is None
    assert over_normalized_axes(np.ones((1, 1, 1, 8)), 3, (8,)) is None
