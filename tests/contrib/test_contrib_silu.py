"""``contrib-silu``: SiLU and quick-GELU products become ``com.microsoft::QuickGelu``.

Goldens (``fixtures/contrib-silu``) hold one case per rule and per must-not-fire reason. Here:

* every golden passes (structure, numbers, signature) and its output loads on the CPU provider
  with onnxruntime's optimizations on and off;
* the fused kernel is bit-identical to Sigmoid + Mul on onnxruntime's CPU provider, over the
  whole float range (infinities and NaN included);
* a YOLOv8 C2f block (Conv + SiLU, Split, residual bottlenecks, Concat) fuses every SiLU at
  ``-O3`` and keeps its outputs;
* the CUDA target fuses float16 too (its kernel table has it), the CPU target refuses with a
  reason ``why-not`` shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

from graphopt import ir
from graphopt.passes.contrib.silu import SILU_RULES
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.rewrite import apply_rules, format_why_not, why_not
from graphopt.runtime import compare_outputs, make_session, random_inputs
from graphopt.testing import assert_golden, collect_cases

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "contrib-silu"
CASES = collect_cases(FIXTURES)


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """Built-in passes only."""
    return PassRegistry.default(plugins=False)


def _run(model: onnx.ModelProto, pipeline: str, registry: PassRegistry, target: str = "cpu") -> onnx.ModelProto:
    graph = ir.load(model)
    PassManager(pipeline, PassContext(target=target, registry=registry)).run(graph)
    return ir.to_proto(graph)


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False) -> dict[str, Any]:
    session = make_session(model, optimize=optimize)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _quick_gelus(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type == "QuickGelu"]


def test_fixtures_cover_rules_and_refusals() -> None:
    names = {p.stem for p in CASES}
    assert {"silu", "silu_operands_swapped", "quick_gelu_scaled", "float16_kept", "other_operand_kept",
            "sigmoid_read_elsewhere_kept", "scale_is_graph_input_kept", "scale_widens_kept"} <= names


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_golden(path: Path, registry: PassRegistry) -> None:
    """Structure equals the expected section; numbers equal the input's in onnxruntime."""
    assert_golden(path, registry=registry)


def _silu_model(dtype: int = TensorProto.FLOAT, shape: tuple[int, ...] = (4, 1000)) -> onnx.ModelProto:
    nodes = [oh.make_node("Sigmoid", ["x"], ["s"]), oh.make_node("Mul", ["x", "s"], ["y"])]
    graph = oh.make_graph(nodes, "silu", [oh.make_tensor_value_info("x", dtype, list(shape))],
                          [oh.make_tensor_value_info("y", dtype, list(shape))])
    return oh.make_model(graph, ir_version=8, opset_imports=[oh.make_opsetid("", 17)])


def test_fused_kernel_is_bit_identical_on_cpu(registry: PassRegistry) -> None:
    """Tolerance 0: same MLAS logistic, same product, on normal, huge, tiny and special values."""
    source = _silu_model()
    fused = _run(source, "contrib-silu", registry)
    assert len(_quick_gelus(fused)) == 1 and len(fused.graph.node) == 1
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(1000) * 3, rng.standard_normal(1000) * 100,
                        rng.standard_normal(1000) * 1e-30,
                        np.linspace(-90, 90, 993), [np.inf, -np.inf, np.nan, 0.0, -0.0, 3e38, -3e38]])
    feeds = {"x": x.astype(np.float32).reshape(4, 1000)}
    expected = _outputs(source, feeds)["y"]
    for optimize in (False, True):
        actual = _outputs(fused, feeds, optimize=optimize)["y"]
        assert np.array_equal(expected, actual, equal_nan=True), f"optimize={optimize}"


def _c2f_block() -> onnx.ModelProto:
    """YOLOv8's C2f block as ultralytics exports it: Conv+SiLU, Split, 2 bottlenecks, Concat, Conv+SiLU."""
    rng = np.random.default_rng(1)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv_silu(name: str, x: str, cin: int, cout: int, k: int) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        pad = k // 2
        nodes.extend([oh.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.c"], kernel_shape=[k, k],
                                   pads=[pad] * 4),
                      oh.make_node("Sigmoid", [f"{name}.c"], [f"{name}.s"]),
                      oh.make_node("Mul", [f"{name}.c", f"{name}.s"], [f"{name}.y"])])
        return f"{name}.y"

    y = conv_silu("cv1", "x", 8, 16, 1)
    inits.append(numpy_helper.from_array(np.array([8, 8], np.int64), "split"))
    nodes.append(oh.make_node("Split", [y, "split"], ["s0", "s1"], axis=1))
    prev, parts = "s1", ["s0", "s1"]
    for i in range(2):
        h = conv_silu(f"m{i}.cv1", prev, 8, 8, 3)
        h = conv_silu(f"m{i}.cv2", h, 8, 8, 3)
        nodes.append(oh.make_node("Add", [prev, h], [f"m{i}.add"]))
        prev = f"m{i}.add"
        parts.append(prev)
    nodes.append(oh.make_node("Concat", parts, ["cat"], axis=1))
    out = conv_silu("cv2", "cat", 32, 16, 1)
    nodes.append(oh.make_node("Identity", [out], ["out"]))
    dims = ["batch", 8, "height", "width"]
    graph = oh.make_graph(nodes, "c2f", [oh.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [oh.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 16, "height", "width"])],
                          initializer=inits)
    return oh.make_model(graph, ir_version=8, opset_imports=[oh.make_opsetid("", 17)])


def test_yolo_c2f_block_fuses_every_silu_at_o3(registry: PassRegistry) -> None:
    source = _c2f_block()
    fused = _run(source, "O3,contrib-silu,eliminate-dead-code", registry)
    assert len(_quick_gelus(fused)) == 6
    assert all(n.attribute[0].name == "alpha" and n.attribute[0].f == 1.0 for n in _quick_gelus(fused))
    assert not [n for n in fused.graph.node if n.op_type in ("Sigmoid", "Mul")]
    assert [o.name for o in fused.graph.output] == ["out"]
    reference = make_session(source)
    feeds = random_inputs(reference, seed=0, dims={"batch": 2, "height": 7, "width": 9})
    expected = dict(zip(["out"], reference.run(None, feeds)))
    for optimize in (False, True):
        comparison = compare_outputs(expected, _outputs(fused, feeds, optimize=optimize), rtol=1e-5, atol=1e-5)
        assert comparison.ok, f"optimize={optimize}: {comparison.summary()}"


def test_float16_fuses_for_cuda_but_not_for_cpu(registry: PassRegistry) -> None:
    """The CUDA QuickGelu kernel takes float16; the CPU one does not, and why-not says so."""
    source = _silu_model(TensorProto.FLOAT16, (2, 6))
    assert _quick_gelus(_run(source, "contrib-silu", registry, target="cuda"))
    assert not _quick_gelus(_run(source, "contrib-silu", registry, target="cpu"))
    model = ir.load(source)
    rule = SILU_RULES.get("silu")
    assert rule is not None
    text = format_why_not(why_not(model, rule, PassContext(target="cpu")))
    assert "target 'cpu' has no com.microsoft::QuickGelu kernel for float16" in text
    assert apply_rules(model, [rule], PassContext(target="cpu")) == {}


def test_bisect_limit_stops_after_one_fusion(registry: PassRegistry) -> None:
    model = ir.load(_c2f_block())
    ctx = PassContext(registry=registry, bisect_limit=1)
    PassManager("infer-shapes,contrib-silu", ctx).run(model)
    assert sum(n.op_type == "QuickGelu" for n in model.graph) == 1
