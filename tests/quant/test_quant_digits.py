"""Real data: an MLP trained on scikit-learn's digits loses at most 0.5 accuracy points after int8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.runtime import run_model

sklearn = pytest.importorskip("sklearn")


def _train() -> tuple[object, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.3, random_state=0,
                                                        stratify=digits.target)
    from threadpoolctl import threadpool_limits

    # One BLAS thread and L-BFGS: training takes about a second even on a busy 2-core machine.
    with threadpool_limits(1):
        clf = MLPClassifier(hidden_layer_sizes=(64, 32), solver="lbfgs", max_iter=400, random_state=0)
        clf.fit(x_train, y_train)
    return clf, x_train, x_test, y_train, y_test


def _to_onnx(clf: object) -> onnx.ModelProto:
    """The trained MLP as MatMul + Add (+ Relu) layers with a symbolic batch."""
    nodes, inits = [], []
    current = "x"
    layers = list(zip(clf.coefs_, clf.intercepts_))
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"], name=f"dense{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"h{i}"], name=f"bias{i}")]
        current = f"h{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"], name=f"relu{i}"))
            current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["logits"]))
    graph = helper.make_graph(nodes, "digits_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_digits_mlp_accuracy_drop_at_most_half_a_point() -> None:
    clf, x_train, x_test, _, y_test = _train()
    proto = _to_onnx(clf)
    float_logits = run_model(proto, {"x": x_test})["logits"]
    # The conversion is exact: the ONNX graph predicts what scikit-learn predicts.
    assert (float_logits.argmax(1) == clf.predict(x_test)).all()
    float_acc = float((float_logits.argmax(1) == y_test).mean() * 100)
    assert float_acc > 90.0
    calibration = [{"x": x_train[i:i + 32]} for i in range(0, 32 * 12, 32)]
    out = graphopt.quantize(proto, calibration=calibration, check_speed=False)
    rep = out.report
    assert rep["fusion"]["unfused"] == 0
    assert rep["fusion"]["fused_total"] == 3  # every dense layer runs as an integer kernel
    assert {n.op_type for n in out.model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    quant_logits = run_model(out.model, {"x": x_test})["logits"]
    quant_acc = float((quant_logits.argmax(1) == y_test).mean() * 100)
    assert float_acc - quant_acc <= 0.5, (float_acc, quant_acc)
    assert rep["accuracy"]["top1_agreement"] >= 0.98
