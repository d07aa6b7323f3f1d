"""Output similarity (cosine, SQNR, top-1 agreement, max error) and user metrics."""

from __future__ import annotations

import math
import os
import textwrap

import numpy as np
import pytest

from graphopt.errors import GraphoptError
from graphopt.runtime import load_metric, output_similarity

RNG = np.random.default_rng(7)


def test_identical_outputs() -> None:
    ref = [RNG.standard_normal((4, 10)).astype(np.float32) for _ in range(3)]
    sim = output_similarity(ref, [r.copy() for r in ref])
    assert sim["cosine"] == pytest.approx(1.0) and sim["cosine_min"] == pytest.approx(1.0)
    assert sim["sqnr_db"] == math.inf and sim["max_abs"] == 0.0
    assert sim["top1_agreement"] == 1.0 and sim["pairs"] == 3


def test_noise_gives_the_expected_sqnr_and_cosine() -> None:
    ref = [RNG.standard_normal(100_000)]
    noisy = [ref[0] + 0.1 * RNG.standard_normal(100_000)]  # noise power 1/100 of the signal: 20 dB
    sim = output_similarity(ref, noisy)
    assert sim["sqnr_db"] == pytest.approx(20.0, abs=0.2)
    assert sim["cosine"] == pytest.approx(1 / math.sqrt(1.01), abs=1e-3)
    assert sim["max_abs"] == pytest.approx(float(np.max(np.abs(noisy[0] - ref[0]))))


def test_top1_agreement_counts_rows_whose_argmax_agrees() -> None:
    ref = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.4, 0.3, 0.3]], np.float32)
    cand = ref.copy()
    cand[3] = [0.3, 0.4, 0.3]  # one of four rows changes its class
    sim = output_similarity({"probs": ref}, {"probs": cand})
    assert sim["top1_agreement"] == 0.75
    ints = output_similarity([np.array([1, 2, 3])], [np.array([1, 2, 3])])
    assert ints["top1_agreement"] is None  # integer labels are not class scores


def test_mismatches_are_refused() -> None:
    with pytest.raises(GraphoptError, match="cannot compare 1 candidate arrays with 2"):
        output_similarity([np.zeros(2), np.zeros(2)], [np.zeros(2)])
    with pytest.raises(GraphoptError, match=r"candidate shape \[3\] differs from the reference \[2\]"):
        output_similarity([np.zeros(2)], [np.zeros(3)])


def test_load_metric(tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(tmp_path, "my_metric_mod.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent("""
            import numpy as np
            def accuracy(reference, candidate):
                return float(np.mean([np.argmax(r) == np.argmax(c) for r, c in zip(reference, candidate)]))
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    metric = load_metric("my_metric_mod:accuracy")
    assert metric([np.array([0, 1])], [np.array([1, 0])]) == 0.0
    assert load_metric(f"{path}:accuracy")([np.array([0, 1])], [np.array([0, 1])]) == 1.0
    with pytest.raises(GraphoptError, match="not MODULE:FUNCTION"):
        load_metric("no_colon")
    with pytest.raises(GraphoptError, match="has no attribute 'f1'"):
        load_metric("my_metric_mod:f1")
    with pytest.raises(GraphoptError, match="cannot import"):
        load_metric("missing_metric_module_xyz:f")
