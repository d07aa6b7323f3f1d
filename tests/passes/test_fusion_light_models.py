"""The fusion passes on real CNNs: the light model zoo shipped with onnx.

``onnx/backend/test/data/light/light_*.onnx`` keep every weight as ``ConstantOfShape`` of an
IR-3 initializer that is also a graph input: a caller may override it, so nothing may be
folded, and the first test checks that nothing is. The others prepare each model as an
exporter writes it today (seeded random initializers, IR 8, logits as output; see
``bench/fusion_latency.py``, which also times them), optimize it with
``fold-constants,fusions,eliminate-dead-code`` and compare with onnxruntime on the prepared
model, its optimizations off.

Tolerance: folding BatchNormalization into the weights changes float32 rounding in every
layer (about 50 in ShuffleNet); with random weights the logits reach 1e5, so the bound is
relative to the output range: |diff| <= 1e-4·|expected| + 1e-5·max|expected| (measured:
below 4e-7 of the range).
"""

from __future__ import annotations

import collections
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

ROOT = Path(__file__).resolve().parents[2]
LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
PIPELINE = "fold-constants,fusions,eliminate-dead-code"


def _load_bench() -> ModuleType:
    """``bench/fusion_latency.py``, which holds the model preparation the benchmark uses too."""
    spec = importlib.util.spec_from_file_location("fusion_latency", ROOT / "bench" / "fusion_latency.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark module (for ``prepare_light_model``)."""
    return _load_bench()


def _op_counts(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.node)


def _check_outputs(original: onnx.ModelProto, fused: onnx.ModelProto) -> float:
    session = make_session(original)
    feeds = random_inputs(session, seed=0)
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feeds)))
    actual = run_model(fused, feeds)
    scale = max(float(np.max(np.abs(v))) for v in expected.values())
    comparison = compare_outputs(expected, actual, rtol=1e-4, atol=1e-5 * scale, names=names)
    assert comparison.ok, comparison.summary()
    return max(float(np.max(np.abs(expected[n] - actual[n]))) for n in names) / scale


def test_overridable_ir3_weights_are_never_folded() -> None:
    """The shipped IR-3 ShuffleNet: its weights are graph inputs, so every BatchNormalization stays."""
    original = onnx.load(str(LIGHT / "light_shufflenet.onnx"))
    fused = graphopt.optimize(original, pipeline="fusions,eliminate-dead-code")
    assert len(fused.graph.node) == len(original.graph.node)
    assert _op_counts(fused)["BatchNormalization"] == _op_counts(original)["BatchNormalization"] == 49
    assert [i.name for i in fused.graph.input] == [i.name for i in original.graph.input]
    _check_outputs(original, fused)


# model -> (nodes before, nodes after, op counts after that show what happened)
EXPECTED = {
    # Conv + BN everywhere (also Conv → BN → Conv, without activation): every BN folds.
    "shufflenet": (202, 153, {"BatchNormalization": 0, "Conv": 49}),
    # Caffe2 form Conv → BN → Mul(Unsqueeze(γ)) → Add(Unsqueeze(β)): fold-constants makes the
    # per-channel constants visible, then BN, Mul and Add all fold into the Conv.
    "inception_v2": (508, 163, {"BatchNormalization": 0, "Mul": 0, "Add": 0, "Conv": 69}),
    # Pre-activation blocks: 59 BN after a Conv fold; 62 after Concat/pooling each take the
    # Caffe2 Mul/Add that follow them into their own scale and bias.
    "densenet121": (910, 367, {"BatchNormalization": 62, "Mul": 0, "Add": 0, "Conv": 121}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_light_model_fuses_and_keeps_its_outputs(name: str, bench: ModuleType) -> None:
    """Node counts drop as expected and the logits match onnxruntime on the prepared model."""
    before, after, ops = EXPECTED[name]
    original = bench.prepare_light_model(name)
    fused = graphopt.optimize(original, pipeline=PIPELINE)
    assert (len(original.graph.node), len(fused.graph.node)) == (before, after)
    counts = _op_counts(fused)
    assert {op: counts[op] for op in ops} == ops
    assert [i.name for i in fused.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in original.graph.output]
    assert _check_outputs(original, fused) < 1e-5
