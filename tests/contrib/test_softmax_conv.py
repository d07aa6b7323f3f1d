"""``fuse-softmax-conv-into-matmul``: a 1x1 Conv over a channel Softmax becomes a last-axis MatMul.

Goldens (``fixtures/fuse-softmax-conv-into-matmul``) hold the rewrites and every must-not-fire
reason. Here: the YOLOv8 DFL head as ultralytics exports it (dynamic batch and anchors, the
Reshape that follows), numbers at onnxruntime's optimization levels, the permutation algebra.
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
from graphopt.passes.contrib.softmax_conv import SOFTMAX_CONV_RULES, softmax_last_permutation
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.rewrite import apply_rules, format_why_not, why_not
from graphopt.runtime import compare_outputs, make_session
from graphopt.testing import assert_golden, collect_cases

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "fuse-softmax-conv-into-matmul"
CASES = collect_cases(FIXTURES)
#: Only the summation order of a 16-term dot product changes.
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """Built-in passes only."""
    return PassRegistry.default(plugins=False)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_golden(path: Path, registry: PassRegistry) -> None:
    """Structure equals the expected section; numbers equal the input's in onnxruntime."""
    assert_golden(path, registry=registry)


def test_fixtures_cover_the_refusals() -> None:
    names = {p.stem for p in CASES}
    assert {"dfl_head", "bias_kept", "softmax_opset11_kept", "softmax_other_axis_kept", "kernel_3x3_kept",
            "strided_kept", "grouped_kept", "weight_is_graph_input_kept",
            "softmax_output_read_elsewhere_kept"} <= names


@pytest.mark.parametrize(("perm", "axis", "expected"), [
    ((0, 2, 1, 3), 1, (0, 1, 3, 2)),
    ((0, 3, 1, 2), 1, (0, 1, 2, 3)),
    ((3, 2, 1, 0), 1, (3, 1, 0, 2)),
])
def test_softmax_axis_moves_last(perm: tuple[int, ...], axis: int, expected: tuple[int, ...]) -> None:
    assert softmax_last_permutation(perm, axis) == expected


def _dfl_head(bins: int = 16) -> onnx.ModelProto:
    """The DFL head as ultralytics exports it: box logits [N, 4·bins, A] in, distances [N, 4, A] out."""
    nodes = [
        oh.make_node("Shape", ["x"], ["shape"]),
        oh.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        oh.make_node("Gather", ["shape", "two"], ["a"], axis=0),
        oh.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        oh.make_node("Unsqueeze", ["a", "axes0"], ["a1"]),
        oh.make_node("Concat", ["n1", "four", "bins", "a1"], ["shape4"], axis=0),
        oh.make_node("Concat", ["n1", "four", "a1"], ["shape3"], axis=0),
        oh.make_node("Reshape", ["x", "shape4"], ["r"]),
        oh.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
        oh.make_node("Softmax", ["t"], ["s"], axis=1),
        oh.make_node("Conv", ["s", "w"], ["c"]),
        oh.make_node("Reshape", ["c", "shape3"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.arange(bins, dtype=np.float32).reshape(1, bins, 1, 1), "w"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(2, np.int64), "two"),
             numpy_helper.from_array(np.array([0], np.int64), "axes0"),
             numpy_helper.from_array(np.array([4], np.int64), "four"),
             numpy_helper.from_array(np.array([bins], np.int64), "bins")]
    graph = oh.make_graph(nodes, "dfl", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4 * bins, "A"])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "A"])], initializer=inits)
    return oh.make_model(graph, ir_version=8, opset_imports=[oh.make_opsetid("", 17)])


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool) -> dict[str, Any]:
    session = make_session(model, optimize=optimize)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_yolo_dfl_head_at_o3(target: str, registry: PassRegistry) -> None:
    """At -O3 the head keeps its outputs (2100 anchors, logits up to ±20) at both ORT levels."""
    source = _dfl_head()
    model = ir.load(source)
    PassManager("O3,fuse-softmax-conv-into-matmul,eliminate-dead-code",
                PassContext(target=target, registry=registry)).run(model)
    output = ir.to_proto(model)
    ops = [n.op_type for n in output.graph.node]
    assert "Conv" not in ops and ops.count("MatMul") == 1
    softmax = next(n for n in output.graph.node if n.op_type == "Softmax")
    assert softmax.attribute[0].i == 3
    rng = np.random.default_rng(0)
    feeds = {"x": (rng.standard_normal((2, 64, 2100)) * 7).astype(np.float32)}
    expected = _outputs(source, feeds, optimize=False)
    for optimize in (False, True):
        comparison = compare_outputs(expected, _outputs(output, feeds, optimize), rtol=RTOL, atol=ATOL)
        assert comparison.ok, f"optimize={optimize}: {comparison.summary()}"


def test_unknown_rank_is_left_alone_until_shapes_are_known(registry: PassRegistry) -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float x) => (float y) <float[1,16,1,1] w = {0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}> {
       t = Transpose <perm: ints = [0, 2, 1, 3]> (x)
       s = Softmax <axis: int = 1> (t)
       y = Conv (s, w)
    }
    """
    model = ir.load(onnx.parser.parse_model(text))
    model.graph.inputs[0].type = ir.TensorType(TensorProto.FLOAT, None)
    ctx = PassContext(registry=registry)
    PassManager("fuse-softmax-conv-into-matmul", ctx).run(model)
    assert [n.op_type for n in model.graph] == ["Transpose", "Softmax", "Conv"]
    rule = SOFTMAX_CONV_RULES.get("softmax-conv1x1-to-matmul")
    assert rule is not None
    assert "is not known to have rank 4" in format_why_not(why_not(model, rule, ctx))
    model.graph.inputs[0].type = ir.TensorType(TensorProto.FLOAT, ir.Shape([1, 4, 16, 3]))
    assert apply_rules(model, [rule], ctx) == {"softmax-conv1x1-to-matmul": 1}
