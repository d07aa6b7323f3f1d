"""Unit tests of the cleanup passes for what golden files cannot show.

Counters, ``--bisect-limit``, value_info and sparse initializers (the text syntax prints
neither), training_info, lazily loaded weights, the preset pipelines. Every test that changes a
model also checks that onnxruntime gives the same outputs before and after.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.parser
import pytest

from graphopt import ir
from graphopt.errors import VerificationError
from graphopt.passes import PASSES, PIPELINES
from graphopt.passes.cleanup import DedupInitializers, EliminateDeadCode, EliminateIdentity, TopoSort
from graphopt.pipeline import Pass, PassContext, PassManager, PassRegistry, PassResult, parse_pipeline
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

FLOAT = onnx.TensorProto.FLOAT
HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def _parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text if text.lstrip().startswith("<") else HEAD + text)


def _same_numbers(source: onnx.ModelProto, model: ir.Model, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    """``model`` verifies, passes the checker and computes what ``source`` computes."""
    ir.verify(model)
    output = ir.to_proto(model)
    onnx.checker.check_model(output)
    feeds = random_inputs(make_session(source), seed=0, dims={"N": 3})
    comparison = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=rtol, atol=atol)
    assert comparison.ok, comparison.summary()


def _ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for n in graph]


# -- registration and presets ------------------------------------------------------------------
def test_builtin_passes_are_registered_with_levels() -> None:
    registry = PassRegistry.default(plugins=False)
    levels = {cls.name: cls.opt_level for cls in PASSES}
    assert {k: levels.get(k) for k in ("topo-sort", "eliminate-identity", "eliminate-dead-code",
                                        "dedup-initializers")} == {
        "topo-sort": 0, "eliminate-identity": 1, "eliminate-dead-code": 1, "dedup-initializers": 1}
    for name in levels:
        assert registry.get(name).name == name
    assert TopoSort.provides == frozenset({"topo-sorted"})


def _names(steps: list) -> list[str]:
    out: list[str] = []
    for step in steps:
        out.extend(_names(step.steps) if hasattr(step, "steps") else [step.name])
    return out


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_presets_parse_and_respect_opt_levels(level: int) -> None:
    registry = PassRegistry.default(plugins=False)
    steps = parse_pipeline(PIPELINES[f"O{level}"], registry)
    names = _names(steps)
    assert names, f"O{level} is empty"
    assert all(registry.get(n).opt_level <= level for n in names), names
    if level >= 2:
        assert any(hasattr(s, "steps") for s in steps), "O2/O3 use a fixpoint group"
    assert _names(parse_pipeline("cleanup", registry)) == [
        "eliminate-identity", "eliminate-dead-code", "dedup-initializers"]


_EVERYTHING = """
    g (float[N,3] x) => (float[N,3] y)
      <float[3] w1 = {1, 2, 3}, float[3] w2 = {1, 2, 3}, float[3] unused = {9, 9, 9}>
    {
      y = Sub(c, w2)
      c = Identity(b)
      b = Mul(a, w1)
      a = Identity(x)
      d = Identity(a)
      dead = Neg(d)
    }"""


def test_cleanup_passes_reach_a_fixpoint_together() -> None:
    source = _parse(_EVERYTHING)
    model = ir.load(source)
    pipeline = "topo-sort,fixpoint<max=8>(eliminate-identity,eliminate-dead-code),dedup-initializers"
    report = PassManager(pipeline, PassContext(registry=PassRegistry.default(plugins=False))).run(model)
    assert not report.warnings
    assert _ops(model.graph) == ["Mul", "Sub"]
    assert len(model.graph.initializers) == 1
    totals = report.totals()
    assert totals["topo-sort"]["counters"] == {"sorted-graphs": 1}
    assert totals["eliminate-identity"]["counters"]["removed-nodes"] == 3
    assert totals["eliminate-dead-code"]["counters"]["removed-nodes"] == 1
    assert totals["eliminate-dead-code"]["counters"]["removed-initializers"] == 1
    assert totals["eliminate-dead-code"]["runs"] == 2  # the second round changed nothing
    assert totals["dedup-initializers"]["counters"] == {"removed-initializers": 1, "saved-bytes": 12}
    _same_numbers(source, model)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_presets_clean_up_without_changing_numbers(level: int) -> None:
    source = _parse(_EVERYTHING)
    model = ir.load(source)
    report = PassManager(f"O{level}", PassContext(registry=PassRegistry.default(plugins=False))).run(model)
    assert not report.warnings
    assert _ops(model.graph) == ["Mul", "Sub"]
    assert len(model.graph.initializers) == 1
    _same_numbers(source, model)


# -- eliminate-dead-code -----------------------------------------------------------------------
def test_dead_code_counters_cover_every_kind() -> None:
    source = _parse("""
        <ir_version: 8, opset_import: ["" : 17, "local" : 1, "ai.onnx.ml" : 3]>
        g (float[2] x) => (float[2] y)
          <float[2] w = {1, 2}, float[2] unused = {3, 4}>
        {
          a = Mul(x, w)
          dead = local.F(a)
          dead2 = Neg(dead)
          y = Relu(x)
        }
        <domain: "local", opset_import: ["" : 17]>
        F (p) => (q) { q = Abs(p) }
        """)
    model = ir.load(source)
    result = EliminateDeadCode().run(model, PassContext())
    assert result.changed
    assert result.counters == {"removed-nodes": 3, "removed-initializers": 2, "removed-functions": 1,
                               "removed-opsets": 2, "removed-value-info": 0}
    assert _ops(model.graph) == ["Relu"]
    assert model.opset_imports == {"": 17}
    assert not model.functions and not model.graph.initializers
    _same_numbers(source, model)
    again = EliminateDeadCode().run(model, PassContext())
    assert not again.changed and not any(again.counters.values())


def test_dead_code_bisect_limit_applies_exactly_one_removal() -> None:
    source = _parse("""
        g (float[2] x) => (float[2] y) {
          a = Neg(x)
          b = Abs(a)
          c = Sigmoid(b)
          y = Relu(x)
        }""")
    model = ir.load(source)
    ctx = PassContext(bisect_limit=1)
    result = EliminateDeadCode().run(model, ctx)
    assert result.counters["removed-nodes"] == 1
    assert ctx.rewrites_applied == 1 and ctx.bisect_stopped
    assert _ops(model.graph) == ["Neg", "Abs", "Relu"]  # users go first: Sigmoid was removed
    _same_numbers(source, model)


def test_bisect_limit_stops_the_whole_pipeline() -> None:
    source = _parse("""
        g (float[2] x) => (float[2] y) {
          a = Identity(x)
          b = Identity(a)
          dead = Neg(x)
          y = Relu(b)
        }""")
    model = ir.load(source)
    ctx = PassContext(bisect_limit=2, registry=PassRegistry.default(plugins=False))
    PassManager("eliminate-identity,eliminate-dead-code", ctx).run(model)
    assert ctx.rewrites_applied == 2
    assert sorted(_ops(model.graph)) == ["Neg", "Relu"]  # both Identity nodes went, Neg stayed
    _same_numbers(source, model)


def _value_info(name: str, dims: list[int]) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, FLOAT, dims)


def test_stale_value_info_is_dropped_and_live_entries_stay() -> None:
    body = oh.make_graph(
        [oh.make_node("Neg", ["a"], ["t_out"])], "then_g", [], [_value_info("t_out", [2])],
        value_info=[_value_info("a", [2])])  # describes an outer value: kept
    other = oh.make_graph([oh.make_node("Abs", ["a"], ["e_out"])], "else_g", [], [_value_info("e_out", [2])],
                          value_info=[_value_info("nowhere", [2])])  # names nothing: dropped
    graph = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["a"]),
         oh.make_node("Neg", ["a"], ["dead"]),
         oh.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other)],
        "g", [_value_info("x", [2]), oh.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [_value_info("y", [2])],
        value_info=[_value_info("a", [2]), _value_info("dead", [2]), _value_info("ghost", [3]),
                    _value_info("a", [2])])
    source = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    model = ir.load(source)
    result = EliminateDeadCode().run(model, PassContext())
    assert result.counters["removed-nodes"] == 1
    # dead (producer removed), ghost (names nothing), the second "a" (repeated), nowhere.
    assert result.counters["removed-value-info"] == 4
    assert [v.name for v in model.graph.value_info] == ["a"]
    branches = {g.name: g for g in model.graph.nodes[-1].subgraphs()}
    then_g, else_g = branches["then_g"], branches["else_g"]
    assert [v.name for v in then_g.value_info] == ["a"]
    assert not else_g.value_info
    out = ir.to_proto(model)
    assert [v.name for v in out.graph.value_info] == ["a"]
    _same_numbers(source, model)


def test_unused_sparse_initializer_is_removed_and_used_one_kept() -> None:
    def sparse(name: str, values: list[float], indices: list[int]) -> onnx.SparseTensorProto:
        vals = oh.make_tensor(name, FLOAT, [len(values)], values)
        idx = oh.make_tensor(name + "_idx", onnx.TensorProto.INT64, [len(indices)], indices)
        return oh.make_sparse_tensor(vals, idx, [4])

    graph = oh.make_graph([oh.make_node("Add", ["x", "s_used"], ["y"])], "g", [_value_info("x", [4])],
                          [_value_info("y", [4])],
                          sparse_initializer=[sparse("s_used", [1.0, 2.0], [0, 3]),
                                              sparse("s_unused", [5.0], [1])])
    source = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    model = ir.load(source)
    result = EliminateDeadCode().run(model, PassContext())
    assert result.counters["removed-initializers"] == 1
    assert list(model.graph.sparse_initializers) == ["s_used"]
    assert [s.values.name for s in ir.to_proto(model).graph.sparse_initializer] == ["s_used"]
    _same_numbers(source, model)


def test_training_info_keeps_what_it_names() -> None:
    source = _parse("""
        g (float[2] x) => (float[2] y) <float[2] w = {1, 2}, float[2] lr = {0.5, 0.5}> {
          y = Relu(x)
          shadow = Neg(x)
          renamed = Identity(shadow)
        }""")
    algorithm = oh.make_graph([oh.make_node("Mul", ["w", "lr"], ["w_new"])], "train", [],
                              [_value_info("w_new", [2])])
    info = onnx.TrainingInfoProto()
    info.algorithm.CopyFrom(algorithm)
    info.update_binding.add(key="w", value="w_new")
    source.training_info.append(info)
    model = ir.load(source)
    EliminateDeadCode().run(model, PassContext())
    assert set(model.graph.initializers) == {"w", "lr"}
    assert _ops(model.graph) == ["Relu"]


def test_unknown_custom_ops_are_pure_but_zero_output_nodes_stay() -> None:
    model = ir.load(_parse("""
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[2] x) => (float[2] y) {
          unused = com.example.Mystery(x)
          y = Relu(x)
        }"""))
    effect = ir.Node("com.example", "Print", [model.graph.inputs[0]], num_outputs=0)
    model.graph.append(effect)
    result = EliminateDeadCode().run(model, PassContext())
    assert result.counters["removed-nodes"] == 1
    assert _ops(model.graph) == ["Relu", "Print"]
    assert "com.example" in model.opset_imports  # still used by Print


def test_function_level_unused_opset_imports_are_dropped() -> None:
    source = _parse("""
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x) => (float[2] y) { y = local.F(x) }
        <domain: "local", opset_import: ["" : 17, "com.example" : 1]>
        F (p) => (q) { q = Relu(p) }
        """)
    model = ir.load(source)
    result = EliminateDeadCode().run(model, PassContext())
    assert result.counters["removed-opsets"] == 1
    (fn,) = model.functions.values()
    assert fn.opset_imports == {"": 17}
    assert model.opset_imports == {"": 17, "local": 1}
    _same_numbers(source, model)


def test_dead_code_inside_nested_subgraphs_frees_outer_producers_in_one_run() -> None:
    source = _parse("""
        g (float[2] x, bool c) => (float[2] y) {
          a = Relu(x)
          b = Neg(a)
          y = If(c) <
            then_branch = t () => (float[2] t_out) {
              inner = If(c) <
                then_branch = tt () => (float[2] tt_out) { tt_dead = Abs(b)  tt_out = Sigmoid(x) },
                else_branch = te () => (float[2] te_out) { te_out = Sigmoid(x) }
              >
              t_out = Identity(inner)
            },
            else_branch = e () => (float[2] e_out) { e_out = Sigmoid(x) }
          >
        }""")
    model = ir.load(source)
    result = EliminateDeadCode().run(model, PassContext())
    assert result.counters["removed-nodes"] == 3  # Abs inside, then b and a outside
    assert _ops(model.graph) == ["If"]
    _same_numbers(source, model)


# -- eliminate-identity ------------------------------------------------------------------------
def test_identity_counters_and_output_rename_keep_declared_type() -> None:
    source = _parse("""
        g (float[N,4] x) => (float[N,4] y, float[N,4] x_copy) {
          a = Identity(x)
          t = Relu(a)
          y = Identity(t)
          x_copy = Identity(x)
        }""")
    model = ir.load(source)
    result = EliminateIdentity().run(model, PassContext())
    assert result.counters == {"removed-nodes": 2, "renamed-outputs": 1}
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert relu.inputs[0] is model.graph.inputs[0]
    assert relu.outputs[0].name == "y" and relu.outputs[0] is model.graph.outputs[0]
    assert relu.outputs[0].type == ir.TensorType(FLOAT, ["N", 4])
    assert _ops(model.graph) == ["Relu", "Identity"]  # x -> x_copy must stay
    _same_numbers(source, model)


def test_identity_bisect_limit() -> None:
    source = _parse("""
        g (float[2] x) => (float[2] y) { a = Identity(x)  b = Identity(a)  y = Relu(b) }""")
    model = ir.load(source)
    result = EliminateIdentity().run(model, PassContext(bisect_limit=1))
    assert result.counters["removed-nodes"] == 1
    assert _ops(model.graph) == ["Identity", "Relu"]
    _same_numbers(source, model)


def test_identity_in_custom_domain_is_not_touched() -> None:
    model = ir.load(_parse("""
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[2] x) => (float[2] y) { a = com.example.Identity(x)  y = Relu(a) }"""))
    assert not EliminateIdentity().run(model, PassContext()).changed


# -- dedup-initializers ------------------------------------------------------------------------
class _ForbiddenTensor(ir.LazyTensor):
    """A lazily computed weight that fails the test if anything reads its bytes."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        def fail() -> np.ndarray:
            raise AssertionError("a weight of unique dtype/shape was read")

        super().__init__(fail, FLOAT, shape)


def test_dedup_reads_only_weights_that_share_dtype_shape_and_size() -> None:
    source = _parse("""
        g (float[2,3] x) => (float[2,3] y) <float[3] w1 = {1, 2, 3}, float[3] w2 = {1, 2, 3}> {
          a = Add(x, w1)
          y = Mul(a, w2)
        }""")
    model = ir.load(source)
    big = model.graph.add_initializer("big", _ForbiddenTensor((1000, 3)))
    model.graph.append(ir.Node("", "Identity", [big]))  # read, so nothing else removes it
    result = DedupInitializers().run(model, PassContext())
    assert result.counters == {"removed-initializers": 1, "saved-bytes": 12}
    assert set(model.graph.initializers) == {"w1", "big"}
    assert [n.inputs[1].name for n in model.graph if n.op_type in ("Add", "Mul")] == ["w1", "w1"]


def test_dedup_keys_small_constants_by_their_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small plain constants merge by exact bytes, with no digest: -0.0 is not 0.0, a NaN equals itself."""
    def no_digest(self: ir.Tensor) -> str:
        raise AssertionError("a small constant was hashed")

    monkeypatch.setattr(ir.Tensor, "digest", no_digest)
    source = _parse("""
        g (float[2] x) => (float[2] y)
          <float[2] z1 = {0, 1}, float[2] z2 = {0, 1}, float[2] neg = {-0.0, 1}, float[2] n1 = {nan, 2},
           float[2] n2 = {nan, 2}>
        {
          a = Add(x, z1)
          b = Add(a, z2)
          c = Add(b, neg)
          d = Mul(c, n1)
          y = Sub(d, n2)
        }""")
    model = ir.load(source)
    computed = model.graph.add_initializer("computed", ir.ArrayTensor(np.array([0, 1], np.float32)))
    model.graph.append(ir.Node("", "Identity", [computed]))  # read, so it stays
    result = DedupInitializers().run(model, PassContext())
    assert result.counters == {"removed-initializers": 3, "saved-bytes": 24}
    assert set(model.graph.initializers) == {"z1", "neg", "n1"}
    assert [n.inputs[1].name for n in model.graph if n.op_type != "Identity"] == ["z1", "z1", "neg", "n1", "n1"]
    assert next(n for n in model.graph if n.op_type == "Identity").inputs[0].name == "z1"
    model.graph.remove(next(n for n in model.graph if n.op_type == "Identity"))
    _same_numbers(source, model)


def test_dedup_does_not_merge_distinct_bfloat16_arrays() -> None:
    # Regression: ArrayTensor bytes of dtypes numpy lacks came out empty, so all digests matched.
    graph = ir.Graph("g")
    x = graph.add_input("x", ir.TensorType(onnx.TensorProto.BFLOAT16, [2]))
    bf16 = onnx.TensorProto.BFLOAT16
    a = graph.add_initializer("a", ir.ArrayTensor(np.array([1, 2], np.float32), dtype=bf16))
    b = graph.add_initializer("b", ir.ArrayTensor(np.array([3, 4], np.float32), dtype=bf16))
    add = graph.append(ir.Node("", "Add", [x, a]))
    mul = graph.append(ir.Node("", "Mul", [add.outputs[0], b]))
    mul.outputs[0].name = "y"
    graph.outputs.append(mul.outputs[0])
    model = ir.Model(graph, ir_version=8, opset_imports={"": 17})
    assert not DedupInitializers().run(model, PassContext()).changed
    assert set(graph.initializers) == {"a", "b"}


def test_dedup_bisect_limit_and_training_names() -> None:
    source = _parse("""
        g (float[2] x) => (float[2] y) <float[2] w1 = {1, 2}, float[2] w2 = {1, 2}, float[2] w3 = {1, 2}> {
          a = Add(x, w1)
          b = Mul(a, w2)
          y = Sub(b, w3)
        }""")
    model = ir.load(source)
    result = DedupInitializers().run(model, PassContext(bisect_limit=1))
    assert result.counters["removed-initializers"] == 1
    assert set(model.graph.initializers) == {"w1", "w3"}
    _same_numbers(source, model)

    info = onnx.TrainingInfoProto()
    info.update_binding.add(key="w3", value="w3")
    source.training_info.append(info)
    model = ir.load(source)
    DedupInitializers().run(model, PassContext())
    assert set(model.graph.initializers) == {"w1", "w3"}


# -- topo-sort ---------------------------------------------------------------------------------
def test_topo_sort_reports_change_only_when_order_changes() -> None:
    source = _parse("g (float[2] x) => (float[2] y) { y = Neg(a)  a = Relu(x) }")
    model = ir.load(source)
    assert ir.find_problems(model)
    result = TopoSort().run(model, PassContext())
    assert result.changed and result.counters == {"sorted-graphs": 1}
    assert _ops(model.graph) == ["Relu", "Neg"]
    _same_numbers(source, model)
    assert not TopoSort().run(model, PassContext()).changed


def test_topo_sort_names_the_graph_with_a_cycle() -> None:
    model = ir.load(_parse("g (float[2] x) => (float[2] y) { a = Add(x, b)  b = Neg(a)  y = Relu(b) }"))
    with pytest.raises(VerificationError, match="cycle"):
        TopoSort().run(model, PassContext())


def test_dead_code_keeps_inferred_shapes_valid() -> None:
    """No infer-shapes rerun after dead code goes, and a rerun would find nothing new."""
    source = _parse("""
        g (float[N, 4] x) => (float[N, 2, 2] y)
          <float[4] w = {1, 2, 3, 4}, int64[3] unused = {-1, 2, 2}>
        {
          s = Shape(x)
          dead = Mul(x, w)
          dead2 = Reshape(dead, unused)
          n = Gather(s, zero)
          zero = Constant<value = int64[1] {0}>()
          two = Constant<value = int64[2] {2, 2}>()
          target = Concat<axis = 0>(n, two)
          y = Reshape(x, target)
        }
        """)
    model = ir.load(source)
    report = PassManager("topo-sort,infer-shapes,eliminate-dead-code,fold-constants",
                         PassContext(registry=PassRegistry.default(plugins=False))).run(model)
    assert [r.name for r in report.records] == ["topo-sort", "infer-shapes", "eliminate-dead-code", "fold-constants"]
    assert report.records[2].changed
    assert "Mul" not in _ops(model.graph) and "unused" not in model.graph.initializers
    typed = {v.name: v.type for n in model.graph for v in n.outputs}
    assert typed["target"] == ir.TensorType(onnx.TensorProto.INT64, [3])
    rerun = PassManager("infer-shapes", PassContext(registry=PassRegistry.default(plugins=False))).run(model)
    assert not rerun.changed
    assert {v.name: v.type for n in model.graph for v in n.outputs} == typed
    _same_numbers(source, model)


def test_pass_requiring_topo_sorted_gets_it_first() -> None:
    class NeedsOrder(Pass):
        name = "needs-order"
        requires = frozenset({"topo-sorted"})

        def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
            assert not ir.find_problems(model)
            return PassResult(False)

    registry = PassRegistry.default(plugins=False)
    registry.register(NeedsOrder)
    model = ir.load(_parse("g (float[2] x) => (float[2] y) { y = Neg(a)  a = Relu(x) }"))
    report = PassManager("needs-order", PassContext(registry=registry)).run(model)
    assert [r.name for r in report.records] == ["topo-sort", "needs-order"]
