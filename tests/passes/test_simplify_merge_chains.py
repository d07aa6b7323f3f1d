"""``merge-chains``: composed perms and axes checked against numpy, the widening table, the guards."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt import ir
from graphopt.passes.simplify.merge_chains import is_exact_widening
from graphopt.pipeline import PassContext, PassManager, PassRegistry, PipelineReport
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

MERGE = "merge-chains"
T = onnx.TensorProto

#: numpy dtypes of the element types the widening table speaks of.
NUMPY_TYPES = {
    T.BOOL: np.dtype(np.bool_), T.UINT8: np.dtype(np.uint8), T.INT8: np.dtype(np.int8),
    T.UINT16: np.dtype(np.uint16), T.INT16: np.dtype(np.int16), T.UINT32: np.dtype(np.uint32),
    T.INT32: np.dtype(np.int32), T.UINT64: np.dtype(np.uint64), T.INT64: np.dtype(np.int64),
    T.FLOAT16: np.dtype(np.float16), T.BFLOAT16: np.dtype(ml_dtypes.bfloat16), T.FLOAT: np.dtype(np.float32),
    T.DOUBLE: np.dtype(np.float64),
}


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """The built-in passes."""
    return PassRegistry.default(plugins=False)


def _optimize(text: str, registry: PassRegistry, pipeline: str = MERGE) -> tuple[onnx.ModelProto, ir.Model,
                                                                                 PipelineReport]:
    source = onnx.parser.parse_model(text)
    onnx.checker.check_model(source)
    model = ir.load(source)
    report = PassManager(pipeline, PassContext(registry=registry)).run(model)
    return source, model, report


def _assert_same_outputs(source: onnx.ModelProto, model: ir.Model) -> None:
    output = ir.to_proto(model)
    onnx.checker.check_model(output, full_check=True)
    feeds = random_inputs(make_session(source), seed=0)
    result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=0, atol=0)
    assert result.ok, result.summary()


def _counters(report: PipelineReport) -> dict[str, int]:
    return report.totals()[MERGE]["counters"]


def _samples(dtype: np.dtype) -> np.ndarray:
    """Extremes, small integers, fractions and specials of a dtype."""
    if dtype == np.bool_:
        return np.array([False, True])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, -1 if info.min < 0 else 2, info.max - 1, info.min + 1, 127, 255]
        return np.array([v for v in values if info.min <= v <= info.max], dtype=dtype)
    finfo = ml_dtypes.finfo(dtype)
    values = [finfo.max, finfo.min, finfo.tiny, finfo.eps, finfo.smallest_subnormal, 0.1, -2.5, 1 / 3, 65504.0,
              np.inf, -np.inf, -0.0]
    with np.errstate(over="ignore"):
        return np.array(values, dtype=np.float64).astype(dtype)


def test_widening_table_is_exact_on_extremes() -> None:
    """Every pair the table calls exact round-trips extremes and specials bit for bit (numpy casts)."""
    pairs = [(s, m) for s, m in itertools.product(NUMPY_TYPES, NUMPY_TYPES) if is_exact_widening(s, m)]
    assert len(pairs) > 40
    for source, middle in pairs:
        values = _samples(NUMPY_TYPES[source])
        back = values.astype(NUMPY_TYPES[middle]).astype(NUMPY_TYPES[source])
        assert back.tobytes() == values.tobytes(), (ir.dtype_name(source), ir.dtype_name(middle))


def test_widening_table_refuses_lossy_pairs() -> None:
    """The pairs the brief names as truncating or rounding are refused; strings and float8 never merge."""
    assert not is_exact_widening(T.FLOAT, T.INT32)
    assert not is_exact_widening(T.INT32, T.FLOAT)
    assert not is_exact_widening(T.INT64, T.DOUBLE)
    assert not is_exact_widening(T.FLOAT16, T.BFLOAT16)
    assert not is_exact_widening(T.FLOAT, T.STRING)
    assert not is_exact_widening(T.FLOAT8E4M3FN, T.FLOAT)
    assert is_exact_widening(T.FLOAT, T.DOUBLE)


@settings(max_examples=12, deadline=None)
@given(st.integers(min_value=1, max_value=4).flatmap(
    lambda r: st.tuples(st.permutations(range(r)), st.permutations(range(r)))))
def test_transpose_pairs_compose_like_numpy(registry: PassRegistry, perms: tuple[list[int], list[int]]) -> None:
    """Any two perms: one Transpose (or none) remains, and onnxruntime computes the same tensor."""
    first, second = perms
    rank = len(first)
    dims = ",".join(str(d) for d in (2, 3, 4, 5)[:rank])
    final = np.empty((2, 3, 4, 5)[:rank]).transpose(first).transpose(second).shape
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{dims}] x) => (float[{",".join(map(str, final))}] y) {{
      a = Transpose<perm = {list(first)}>(x)
      y = Transpose<perm = {list(second)}>(a)
    }}"""
    source, model, report = _optimize(text, registry)
    assert _counters(report) == {"merge-transpose-transpose": 1}
    nodes = model.graph.nodes
    composed = tuple(first[i] for i in second)
    if composed == tuple(range(rank)):
        assert [n.op_type for n in nodes] == ["Identity"]  # x (a graph input) keeps its name
    else:
        assert [n.op_type for n in nodes] == ["Transpose"] and nodes[0].attr("perm") == composed
    _assert_same_outputs(source, model)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_unsqueeze_pairs_compose_like_numpy(registry: PassRegistry, data: st.DataObject) -> None:
    """Two Unsqueezes (opset 13, mixed-sign axes) merge into the axes numpy's expand_dims agrees with."""
    rank = data.draw(st.integers(min_value=0, max_value=3))
    first_count = data.draw(st.integers(min_value=1, max_value=2))
    middle_rank = rank + first_count
    first = data.draw(st.lists(st.integers(-middle_rank, middle_rank - 1), min_size=first_count,
                               max_size=first_count, unique_by=lambda a: a % middle_rank))
    second_count = data.draw(st.integers(min_value=1, max_value=2))
    final_rank = middle_rank + second_count
    second = data.draw(st.lists(st.integers(-final_rank, final_rank - 1), min_size=second_count,
                                max_size=second_count, unique_by=lambda a: a % final_rank))
    shape = (2, 3, 4)[:rank]
    expected = np.expand_dims(np.expand_dims(np.empty(shape), first), second).shape
    x_type = f"float[{','.join(map(str, shape))}]" if shape else "float"
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g ({x_type} x) => (float[{",".join(map(str, expected))}] y) {{
      a1 = Constant<value = int64[{len(first)}] {{{", ".join(map(str, first))}}}>()
      a = Unsqueeze(x, a1)
      a2 = Constant<value = int64[{len(second)}] {{{", ".join(map(str, second))}}}>()
      y = Unsqueeze(a, a2)
    }}"""
    _, model, report = _optimize(text, registry)
    assert _counters(report) == {"merge-unsqueeze-unsqueeze": 1}
    merged = [n for n in model.graph if n.op_type == "Unsqueeze"]
    assert len(merged) == 1 and merged[0].inputs[0] is model.graph.inputs[0]
    axes = merged[0].inputs[1].const_value.numpy().tolist()
    assert np.expand_dims(np.empty(shape), axes).shape == expected


def test_shared_or_output_intermediates_stay(registry: PassRegistry) -> None:
    """The middle node read elsewhere, or a graph output, keeps every chain rule from firing."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y, float[3,2] m, double[2,3] c, float[2,3] z) {
      m = Transpose<perm = [1, 0]>(x)
      y = Transpose<perm = [1, 0]>(m)
      c = Cast<to = 11>(x)
      z = Cast<to = 1>(c)
    }"""
    _, model, report = _optimize(text, registry)
    assert _counters(report) == {}
    assert [n.op_type for n in model.graph] == ["Transpose", "Transpose", "Cast", "Cast"]


def test_reshape_chain_counters_and_numbers(registry: PassRegistry) -> None:
    """Reshape after Reshape, Flatten, Squeeze, Unsqueeze: each merge is counted; values agree."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3,4] x) => (float[4,6] y) {
      s1 = Constant<value = int64[2] {6, 4}>()
      a = Reshape(x, s1)
      ax = Constant<value = int64[1] {0}>()
      b = Unsqueeze(a, ax)
      c = Squeeze(b, ax)
      d = Flatten<axis = 1>(c)
      s2 = Constant<value = int64[2] {4, -1}>()
      y = Reshape(d, s2)
    }"""
    source, model, report = _optimize(text, registry, pipeline=f"{MERGE},eliminate-dead-code")
    counters = _counters(report)
    assert sum(counters.values()) >= 1
    assert [n.op_type for n in model.graph if n.op_type != "Constant"] == ["Reshape"]
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[0] is model.graph.inputs[0]
    _assert_same_outputs(source, model)


def test_merged_cast_keeps_numbers_on_extremes(registry: PassRegistry) -> None:
    """int16 -> float -> int64 becomes int16 -> int64, exact on the extremes of int16."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (int16[9] x) => (int64[9] y) {
      a = Cast<to = 1>(x)
      y = Cast<to = 7>(a)
    }"""
    source, model, report = _optimize(text, registry)
    assert _counters(report) == {"merge-cast-cast": 1}
    assert [(n.op_type, n.attr("to")) for n in model.graph] == [("Cast", T.INT64)]
    feeds = {"x": np.array([-32768, 32767, 0, 1, -1, 12345, -23456, 2, 3], dtype=np.int16)}
    expected = run_model(source, feeds)
    actual = run_model(ir.to_proto(model), feeds)
    np.testing.assert_array_equal(expected["y"], actual["y"])



@settings(max_examples=40, deadline=None)
@given(st.data())
def test_unit_dim_moves_match_numpy(registry: PassRegistry, data: st.DataObject) -> None:
    """Squeeze of unit dims then Unsqueeze elsewhere becomes one Reshape (or a Transpose where two
    unknown dims move) computing what numpy's squeeze/expand_dims compute, symbolic dims included."""
    rank = data.draw(st.integers(min_value=2, max_value=4))
    units = data.draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=2, unique=True))
    sizes = [1 if i in units else 2 + i for i in range(rank)]
    others = [i for i in range(rank) if i not in units]
    symbolic = data.draw(st.lists(st.sampled_from(others), max_size=2, unique=True)) if others else []
    dims = [f"d{i}" if i in symbolic else str(s) for i, s in enumerate(sizes)]
    squeezed = [a - rank if data.draw(st.booleans()) else a for a in units]
    inserted = data.draw(st.lists(st.integers(-rank, rank - 1), min_size=len(units), max_size=len(units),
                                  unique_by=lambda a: a % rank))
    expected = np.expand_dims(np.squeeze(np.empty(sizes), tuple(units)), tuple(inserted)).shape
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{",".join(dims)}] x) => (float y) {{
      a1 = Constant<value = int64[{len(squeezed)}] {{{", ".join(map(str, squeezed))}}}>()
      s = Squeeze(x, a1)
      a2 = Constant<value = int64[{len(inserted)}] {{{", ".join(map(str, inserted))}}}>()
      y = Unsqueeze(s, a2)
    }}"""
    source = onnx.parser.parse_model(text)
    source.graph.output[0].type.tensor_type.ClearField("shape")  # inference decides
    model = ir.load(source)
    report = PassManager("infer-shapes," + MERGE, PassContext(registry=registry)).run(model)
    counters = report.totals()[MERGE]["counters"]
    if sorted(a % rank for a in squeezed) == sorted(a % rank for a in inserted):
        assert counters.get("cancel-squeeze-unsqueeze") == 1
    else:
        assert counters.get("squeeze-unsqueeze-to-reshape") == 1
        assert [n.op_type for n in model.graph if n.op_type != "Constant"] in (["Reshape"], ["Transpose"])
    output = ir.to_proto(model)
    feeds = {"x": np.random.default_rng(0).standard_normal(sizes).astype(np.float32)}
    result = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=0, atol=0)
    assert result.ok, result.summary()
    assert next(iter(run_model(output, feeds).values())).shape == expected
