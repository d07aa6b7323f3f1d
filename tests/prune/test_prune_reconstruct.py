"""Reconstruction on a classifier trained here on real data (scikit-learn's bundled digits)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _prune_builders import mlp

import graphopt
from graphopt.runtime import run_model

sklearn_datasets = pytest.importorskip("sklearn.datasets")
threadpoolctl = pytest.importorskip("threadpoolctl")


def _train(x: np.ndarray, y: np.ndarray, sizes: list[int], epochs: int = 250, lr: float = 0.01,
           seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A ReLU MLP trained full-batch with Adam on softmax cross-entropy (numpy only)."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, np.sqrt(2 / a), (a, b)) for a, b in itertools.pairwise(sizes)]
    biases = [np.zeros(b) for b in sizes[1:]]
    params = weights + biases
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    onehot = np.eye(sizes[-1])[y]
    for step in range(1, epochs + 1):
        acts = [x]
        for i, (w, b) in enumerate(zip(weights, biases)):
            z = acts[-1] @ w + b
            acts.append(np.maximum(z, 0) if i < len(weights) - 1 else z)
        p = np.exp(acts[-1] - acts[-1].max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / len(x)
        grads_w, grads_b = [None] * len(weights), [None] * len(weights)
        for i in reversed(range(len(weights))):
            grads_w[i] = acts[i].T @ grad + 1e-4 * weights[i]
            grads_b[i] = grad.sum(axis=0)
            if i:
                grad = (grad @ weights[i].T) * (acts[i] > 0)
        for j, (param, g) in enumerate(zip(params, grads_w + grads_b)):
            m1[j] = 0.9 * m1[j] + 0.1 * g
            m2[j] = 0.999 * m2[j] + 0.001 * g * g
            param -= lr * (m1[j] / (1 - 0.9 ** step)) / (np.sqrt(m2[j] / (1 - 0.999 ** step)) + 1e-8)
    return weights, biases


def test_reconstruction_recovers_accuracy_on_digits(tmp_path) -> None:
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1200], order[1200:]
    with threadpoolctl.threadpool_limits(1):  # BLAS threads on a busy 2-core machine thrash
        weights, biases = _train(x[train], y[train], [64, 64, 64, 10])
    model = mlp(weights, biases)

    def accuracy(proto) -> float:
        return float((run_model(proto, {"x": x[test]})["y"].argmax(axis=1) == y[test]).mean())

    base = accuracy(model)
    assert base > 0.93
    np.savez(tmp_path / "calib.npz", x=x[train])
    plain = graphopt.prune(model, ratio=0.25)
    rebuilt = graphopt.prune(model, ratio=0.25, calibration=str(tmp_path / "calib.npz"), reconstruct=True)
    shapes = [tuple(i.dims) for i in rebuilt.model.graph.initializer if len(i.dims) == 2]
    assert shapes == [(64, 48), (48, 48), (48, 10)]
    assert [r["error_after"] < r["error_before"] for r in rebuilt.report.refits] == [True, True]
    acc_plain, acc_rebuilt = accuracy(plain.model), accuracy(rebuilt.model)
    assert acc_rebuilt >= base - 0.01, (base, acc_rebuilt)
    assert acc_rebuilt > acc_plain, (acc_plain, acc_rebuilt)
