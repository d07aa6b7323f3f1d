"""``dedup-initializers`` tells large tensors apart by a sampled fingerprint before hashing them.

The fingerprint (first, middle and last 4 KiB) only decides which tensors are hashed; a merge
still needs equal digests and equal bytes. These tests build weights that agree exactly where the
fingerprint looks and differ elsewhere, and check that they are never merged, that true
duplicates are, and that only fingerprint-equal tensors are hashed at all.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import numpy_helper

from graphopt import ir
from graphopt.passes.cleanup import DedupInitializers
from graphopt.passes.cleanup import dedup as dedup_module
from graphopt.pipeline import PassContext
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

FLOAT = onnx.TensorProto.FLOAT
ROWS, COLS = 64, 96  # 24 KiB of float32: large enough to be fingerprinted (> 12 KiB)


def _model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``out_i = x @ w_i`` for each weight, so every weight is read."""
    nodes = [oh.make_node("MatMul", ["x", name], [f"out_{name}"]) for name in weights]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", FLOAT, ["N", ROWS])],
                          [oh.make_tensor_value_info(f"out_{name}", FLOAT, ["N", COLS]) for name in weights],
                          initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _same_numbers(source: onnx.ModelProto, model: ir.Model) -> None:
    output = ir.to_proto(model)
    onnx.checker.check_model(output)
    feeds = random_inputs(make_session(source), seed=0, dims={"N": 3})
    comparison = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=0, atol=0)
    assert comparison.ok, comparison.summary()


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    differs_outside_samples = base.copy()
    flat = differs_outside_samples.reshape(-1)
    flat[2048] += 1.0  # byte 8192: after the first 4 KiB, before the middle sample
    differs_in_last_element = base.copy()
    differs_in_last_element[-1, -1] += 1.0
    return {"a": base, "b": differs_outside_samples, "c": base.copy(), "d": differs_in_last_element,
            "e": differs_outside_samples.copy()}


def test_fingerprint_is_equal_where_bytes_differ_outside_the_samples() -> None:
    w = _weights()
    fingerprints = {k: dedup_module._fingerprint(ir.ArrayTensor(v)) for k, v in w.items()}
    assert fingerprints["a"] == fingerprints["b"] == fingerprints["c"] == fingerprints["e"]
    assert fingerprints["d"] != fingerprints["a"]
    small = ir.ArrayTensor(np.zeros(16, dtype=np.float32))
    assert dedup_module._fingerprint(small) is None


@pytest.mark.parametrize("from_file", [False, True])
def test_same_prefix_weights_that_differ_later_are_not_merged(tmp_path, from_file: bool) -> None:
    source = _model(_weights())
    if from_file:  # weights left in the file (memory-mapped), as the CLI loads them
        path = str(tmp_path / "m.onnx")
        onnx.save(source, path)
        model = ir.load(path, file_tensor_bytes=1024)
        assert type(model.graph.initializers["a"].const_value).__name__ == "FileTensor"
    else:
        model = ir.load(source)
    result = DedupInitializers().run(model, PassContext())
    assert result.counters == {"removed-initializers": 2, "saved-bytes": 2 * ROWS * COLS * 4}
    assert sorted(model.graph.initializers) == ["a", "b", "d"]  # c merged into a, e into b
    readers = {n.outputs[0].name: n.inputs[1].name for n in model.graph}
    assert readers == {"out_a": "a", "out_b": "b", "out_c": "a", "out_d": "d", "out_e": "b"}
    _same_numbers(source, model)


def test_only_fingerprint_equal_tensors_are_hashed(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    distinct = {f"w{i}": rng.standard_normal((ROWS, COLS)).astype(np.float32) for i in range(4)}
    distinct["copy"] = distinct["w2"].copy()
    source = _model(distinct)
    model = ir.load(source)
    hashed: list[str] = []
    original = ir.ArrayTensor.digest

    def counting_digest(self: ir.Tensor) -> str:
        hashed.append(self.name)
        return original(self)

    for cls in (ir.ProtoTensor, ir.ArrayTensor):
        monkeypatch.setattr(cls, "digest", counting_digest)
    result = DedupInitializers().run(model, PassContext())
    assert result.counters["removed-initializers"] == 1
    assert sorted(hashed) == ["copy", "w2"]  # the other three differ in their fingerprints
    assert "copy" not in model.graph.initializers
    _same_numbers(source, model)


def test_merge_order_does_not_depend_on_fingerprints() -> None:
    """Pairs come in initializer order, like a digest-only pass would give them."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    y = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    tiny = np.ones(4, dtype=np.float32)
    weights = {"y0": y, "x0": x, "y1": y.copy(), "x1": x.copy(), "x2": x.copy()}
    pairs = list(dedup_module._duplicates([ir.load(_model(weights)).graph.initializers[k] for k in weights]))
    assert [(k.name, d.name) for k, d in pairs] == [("y0", "y1"), ("x0", "x1"), ("x0", "x2")]
    assert dedup_module._fingerprint(ir.ArrayTensor(tiny)) is None
