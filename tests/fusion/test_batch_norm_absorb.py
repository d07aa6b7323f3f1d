"""``batch-norm-absorbs-*`` (``fuse-affine-chain``): per-channel Mul/Add after a BatchNormalization fold into it.

Goldens in ``fixtures/fuse-affine-chain`` show the Caffe2 form and a scalar Mul. Here: every
per-channel constant shape, chains, and each must-not-fire reason (checked with the why-not
tracer, so a case cannot pass for an unrelated reason). Numbers: onnxruntime on the original,
optimizations off, within rtol 1e-5 / atol 1e-6 (γ·a and β·a + b are rounded once to float32).
"""

from __future__ import annotations

from typing import Any

import onnx.parser
import pytest

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.rewrite import why_not
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

RTOL, ATOL = 1e-5, 1e-6
PARAMS = ("float[3] scale = {1.13, 1.4, 1.28}, float[3] bias = {-0.55, -0.4, 0.75}, "
          "float[3] mean = {-0.99, 0.64, 0.59}, float[3] var = {1.04, 0.75, 0.7}")


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """Built-in passes only."""
    return PassRegistry.default(plugins=False)


def _model(signature: str, constants: str, body: str, opset: int = 17) -> onnx.ModelProto:
    extra = f", {constants}" if constants else ""
    return onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g {signature} <{PARAMS}{extra}> {{ {body} }}
    """)


def _optimize(source: onnx.ModelProto, registry: PassRegistry) -> tuple[onnx.ModelProto, dict[str, int]]:
    model = ir.load(source)
    report = PassManager("infer-shapes,fuse-affine-chain,eliminate-dead-code",
                         PassContext(registry=registry)).run(model)
    return ir.to_proto(model), dict(report.totals()["fuse-affine-chain"]["counters"])


def _assert_same_numbers(source: onnx.ModelProto, output: onnx.ModelProto) -> None:
    session = make_session(source)
    feeds = random_inputs(session, seed=0, dims={"N": 2})
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    comparison = compare_outputs(expected, run_model(output, feeds), rtol=RTOL, atol=ATOL)
    assert comparison.ok, comparison.summary()


SIG4 = "(float[N,3,4,4] x) => (float[N,3,4,4] y)"


@pytest.mark.parametrize(("constants", "body"), [
    ("float[3,1,1] a = {-0.49, -0.11, 0.01}, float[3,1,1] b = {0.11, 0.99, 0.59}",
     "n = BatchNormalization(x, scale, bias, mean, var) m = Mul(n, a) y = Add(m, b)"),
    ("float[1,3,1,1] a = {-0.49, -0.11, 0.01}, float[1,3,1,1] b = {0.11, 0.99, 0.59}",
     "n = BatchNormalization(x, scale, bias, mean, var) m = Mul(a, n) y = Add(b, m)"),
    ("float[3,1,1] b = {0.11, 0.99, 0.59}", "n = BatchNormalization(x, scale, bias, mean, var) y = Add(n, b)"),
    ("float a = {2.5}", "n = BatchNormalization<epsilon=0.01>(x, scale, bias, mean, var) y = Mul(n, a)"),
    # Two Caffe2-style pairs in a row: both fold, one node is left.
    ("float[3,1,1] a = {-0.49, -0.11, 0.01}, float[3,1,1] b = {0.11, 0.99, 0.59}, float[1] c = {3.0}",
     "n = BatchNormalization(x, scale, bias, mean, var) m = Mul(n, a) k = Add(m, b) j = Mul(k, c) y = Add(j, b)"),
], ids=["c11", "1c11-swapped", "add-only", "scalar-mul-epsilon", "two-pairs"])
def test_per_channel_constants_fold_into_one_batch_norm(constants: str, body: str, registry: PassRegistry) -> None:
    source = _model(SIG4, constants, body)
    output, _ = _optimize(source, registry)
    assert [n.op_type for n in output.graph.node] == ["BatchNormalization"]
    bn = output.graph.node[0]
    original_bn = next(n for n in source.graph.node if n.op_type == "BatchNormalization")
    assert list(bn.attribute) == list(original_bn.attribute)
    assert bn.input[3:] == original_bn.input[3:]  # mean and variance are reused, not copied
    _assert_same_numbers(source, output)


def test_rank2_input_takes_a_vector_along_the_channels(registry: PassRegistry) -> None:
    source = _model("(float[N,3] x) => (float[N,3] y)", "float[3] a = {0.5, -2.0, 4.0}",
                    "n = BatchNormalization(x, scale, bias, mean, var) y = Mul(n, a)")
    output, totals = _optimize(source, registry)
    assert [n.op_type for n in output.graph.node] == ["BatchNormalization"]
    assert totals.get("batch-norm-absorbs-mul") == 1
    _assert_same_numbers(source, output)


def _reasons(source: onnx.ModelProto, rule_name: str, registry: PassRegistry) -> list[str]:
    model = ir.load(source)
    ctx = PassContext(registry=registry)
    PassManager("infer-shapes", ctx).run(model)
    rule = registry.get("fuse-affine-chain").rule_set().get(rule_name)
    assert rule is not None
    verdicts = why_not(model, rule, ctx)
    assert verdicts and not any(v.fires for v in verdicts)
    return [v.reason or "" for v in verdicts]


MUST_NOT_FIRE: dict[str, tuple[str, str, str, str, str]] = {
    # case: (signature, constants, body, rule, words of the reason)
    "mul_constant_is_graph_input": (
        "(float[N,3,4,4] x, float[3,1,1] a) => (float[N,3,4,4] y)", "",
        "n = BatchNormalization(x, scale, bias, mean, var) y = Mul(n, a)",
        "batch-norm-absorbs-mul", "'a' is a graph input"),
    "constant_not_finite": (
        SIG4, "float[3,1,1] a = {1.0, inf, 2.0}",
        "n = BatchNormalization(x, scale, bias, mean, var) y = Mul(n, a)",
        "batch-norm-absorbs-mul", "not a finite float constant"),
    "constant_varies_along_width": (
        SIG4, "float[4] a = {1.0, 2.0, 3.0, 4.0}",
        "n = BatchNormalization(x, scale, bias, mean, var) y = Mul(n, a)",
        "batch-norm-absorbs-mul", "is not per-channel"),
    "constant_widens_the_rank": (
        SIG4, "float[1,1,3,1,1] a = {1.0, 2.0, 3.0}",
        "n = BatchNormalization(x, scale, bias, mean, var) y = Mul(n, a)",
        "batch-norm-absorbs-mul", "is not per-channel"),
    "normalized_value_read_elsewhere": (
        "(float[N,3,4,4] x) => (float[N,3,4,4] y, float[N,3,4,4] r)", "float[3,1,1] a = {1.0, 2.0, 3.0}",
        "n = BatchNormalization(x, scale, bias, mean, var) y = Mul(n, a) r = Relu(n)",
        "batch-norm-absorbs-mul", "used outside the match by Relu"),
    "training_mode": (
        "(float[N,3,4,4] x) => (float[N,3,4,4] y)", "float[3,1,1] a = {1.0, 2.0, 3.0}",
        "n = BatchNormalization<training_mode=1>(x, scale, bias, mean, var) y = Mul(n, a)",
        "batch-norm-absorbs-mul", "training mode"),
    "folds_into_the_conv_before": (
        "(float[N,2,4,4] x) => (float[N,3,4,4] y)",
        "float[3,2,1,1] w = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6}, float[3,1,1] a = {1.0, 2.0, 3.0}",
        "c = Conv(x, w) n = BatchNormalization(c, scale, bias, mean, var) y = Mul(n, a)",
        "batch-norm-absorbs-mul", "rule 'conv-bn' folds it"),
}


@pytest.mark.parametrize("case", sorted(MUST_NOT_FIRE))
def test_must_not_fire(case: str, registry: PassRegistry) -> None:
    signature, constants, body, rule_name, words = MUST_NOT_FIRE[case]
    source = _model(signature, constants, body)
    reasons = _reasons(source, rule_name, registry)
    assert any(words in r for r in reasons), reasons
    output, totals = _optimize(source, registry)
    assert not any(count for name, count in totals.items() if name.startswith("batch-norm-absorbs")), totals
    if case != "training_mode":  # onnxruntime runs training-mode BatchNormalization only in training builds
        _assert_same_numbers(source, output)


def test_split_rule_leaves_per_channel_readers_to_the_absorbing_rules(registry: PassRegistry) -> None:
    source = _model(SIG4, "float[3,1,1] a = {1.0, 2.0, 3.0}",
                    "n = BatchNormalization(x, scale, bias, mean, var) y = Mul(n, a)")
    model: Any = ir.load(source)
    ctx = PassContext(registry=registry)
    PassManager("infer-shapes", ctx).run(model)
    rule = registry.get("fuse-affine-chain").rule_set().get("batch-norm-to-mul-add")
    assert rule is not None
    reasons = [v.reason or "" for v in why_not(model, rule, ctx)]
    assert any("folds into the BatchNormalization itself" in r for r in reasons), reasons
