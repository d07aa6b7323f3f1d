"""Structured pruning: slicing is exact (zero-importance units), options, validity, passes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from _prune_builders import (
    bert,
    channel_ops_net,
    concat_net,
    grouped_net,
    mobilenet,
    qdq_weight_net,
    resnet,
)
from graphopt.passes.prune.dependency import analyze_channels
from onnx import numpy_helper

import graphopt
from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import run_model


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs; symbolic dims are 3."""
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value or 3 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_model(model, feeds)


def _weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in inits}


def _plant_zeros(proto: onnx.ModelProto, ratio: float) -> tuple[onnx.ModelProto, int]:
    """Zero every weight slice (rank >= 2) of ``ratio`` of the units of each prunable group.

    Those units then have importance 0 and carry nothing to the outputs, so removing them must
    leave the outputs unchanged: the test of the slicing.
    """
    model = ir.load(proto)
    arrays = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    planted = 0
    for group in analyze_channels(model).prunable():
        count = int(np.floor(ratio * group.num_classes + 1e-9))
        chosen = np.random.default_rng(group.id).choice(group.num_classes, size=count, replace=False)
        planted += count
        for slot in group.slots:
            if slot.constant and arrays[slot.value].ndim >= 2:
                index = [slice(None)] * arrays[slot.value].ndim
                index[slot.axis] = np.isin(slot.classes, chosen)
                arrays[slot.value][tuple(index)] = 0
    out = onnx.ModelProto.FromString(proto.SerializeToString())
    for init in out.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    return out, planted


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "resnet": lambda: resnet(width=8, blocks=2, stages=2, hw=8),
    "mobilenet": lambda: mobilenet(width=8, expand=2, blocks=2, stages=2, hw=8),
    "bert": lambda: bert(hidden=32, heads=4, ff=48, layers=2, seq=5),
    "bert-zero-dims": lambda: bert(hidden=32, heads=4, ff=48, seq=5, zero_shape=True),
    "bert-dynamic": lambda: bert(hidden=32, heads=4, ff=48, layers=2, dynamic=True),
    "bert-fused-qkv": lambda: bert(hidden=32, heads=4, ff=48, seq=5, fused_qkv=True),
    "concat": concat_net,
    "grouped": grouped_net,
    "channel-ops": channel_ops_net,
    "qdq-weight": qdq_weight_net,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_removing_zero_importance_units_keeps_outputs(name: str) -> None:
    planted, count = _plant_zeros(MODELS[name](), 0.5)
    assert count > 0
    result = graphopt.prune(planted, ratio=0.5)
    assert result.report.to_dict()["summary"]["units_removed"] == count
    before, after = _weight_shapes(planted), _weight_shapes(result.model)
    assert any(after[k] != before[k] for k in after), "nothing was sliced"
    assert result.report.macs_after < result.report.macs_before
    feeds = _feeds(planted)
    expected, actual = _outputs(planted, feeds), _outputs(result.model, feeds)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_ratio_zero_is_bit_identical(name: str) -> None:
    proto = MODELS[name]()
    result = graphopt.prune(proto, ratio=0.0)
    assert result.report.macs_after == result.report.macs_before
    feeds = _feeds(proto)
    expected, actual = _outputs(proto, feeds), _outputs(result.model, feeds)
    for key in expected:
        assert np.array_equal(expected[key], actual[key])


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "bert"])
def test_pruned_model_is_valid_and_shape_correct(name: str) -> None:
    proto = MODELS[name]()
    result = graphopt.prune(proto, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(result.model, strict_mode=True)
    declared = {v.name: v for v in inferred.graph.value_info}
    outputs = run_model(result.model, _feeds(proto))
    assert [o.name for o in result.model.graph.output] == [o.name for o in proto.graph.output]
    for out in proto.graph.output:
        assert list(outputs[out.name].shape) == [d.dim_value for d in out.type.tensor_type.shape.dim]
    assert declared  # intermediate shapes are known
    assert result.report.mac_reduction > 1.5
    assert result.report.params_after < result.report.params_before


def test_heads_option_prunes_heads_and_rewrites_reshape_constants() -> None:
    proto = bert(hidden=32, heads=4, ff=48, seq=5)
    result = graphopt.prune(proto, ratio=0.0, heads=0.5)
    shapes = _weight_shapes(result.model)
    q_layer = next(k for k in shapes if k.startswith("l0_q"))
    ff1_layer = next(k for k in shapes if k.startswith("l0_ff1"))
    assert shapes[q_layer] == (32, 16)  # 2 heads of 8 columns left
    assert shapes[ff1_layer] == (32, 48)  # the MLP untouched at ratio 0
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    reshape_shapes = [inits[n.input[1]].tolist() for n in result.model.graph.node if n.op_type == "Reshape"]
    assert [1, 5, 2, 8] in reshape_shapes and [1, 5, 16] in reshape_shapes
    assert [1, 5, 4, 8] not in reshape_shapes
    groups = [g for g in result.report.groups if g["kind"] == "heads"]
    assert len(groups) == 1 and result.report.removed[groups[0]["id"]] == 2


def test_exclude_leaves_matching_groups_whole() -> None:
    proto = bert(hidden=32, heads=4, ff=48, seq=5)
    result = graphopt.prune(proto, ratio=0.5, exclude=r"ff1")
    shapes = _weight_shapes(result.model)
    assert shapes[next(k for k in shapes if k.startswith("l0_ff1"))] == (32, 48)
    assert shapes[next(k for k in shapes if k.startswith("l0_q"))] == (32, 16)
    assert any(reason.startswith("excluded") for reason in result.report.skipped.values())


def test_round_to_keeps_multiples() -> None:
    proto = resnet(width=24, blocks=1, hw=8)
    result = graphopt.prune(proto, ratio=0.4, round_to=8)
    for before, after in ((l["before"], l["after"]) for l in result.report.layers if l["op"] == "Conv"):
        assert after[0] % 8 == 0 and after[0] < before[0]
    plain = graphopt.prune(proto, ratio=0.4)
    assert {tuple(l["after"]) for l in plain.report.layers} != {tuple(l["after"]) for l in result.report.layers}


def test_target_macs_finds_the_ratio() -> None:
    proto = resnet(width=16, blocks=1, hw=8)
    result = graphopt.prune(proto, target_macs=0.5)
    report = result.report
    assert report.macs_after <= 0.5 * report.macs_before
    assert report.macs_after > 0.35 * report.macs_before  # not far past the target
    assert 0 < report.ratio < 0.5
    with pytest.raises(GraphoptError, match="target-macs"):
        graphopt.prune(proto, target_macs=1.5)


def test_criteria_pick_different_channels_and_bad_options_fail() -> None:
    proto = resnet(width=8, blocks=1, hw=8)
    l1 = graphopt.prune(proto, ratio=0.5, criterion="l1").model
    gamma = graphopt.prune(proto, ratio=0.5, criterion="bn-gamma").model
    assert [i.raw_data for i in l1.graph.initializer] != [i.raw_data for i in gamma.graph.initializer]
    for kwargs, match in (({"ratio": 1.0}, "ratio"), ({"ratio": 0.5, "criterion": "l3"}, "criterion"),
                          ({"ratio": 0.5, "round_to": 0}, "round-to"), ({"ratio": 0.5, "exclude": "("}, "regular")):
        with pytest.raises(GraphoptError, match=match):
            graphopt.prune(proto, **kwargs)


def test_prune_channels_pass_runs_in_a_pipeline() -> None:
    proto = resnet(width=8, blocks=1, hw=8)
    model = ir.load(proto)
    report = PassManager("prune-channels<ratio=0.5>,eliminate-dead-code", PassContext()).run(model)
    counters = report.records[0].counters
    assert report.records[0].changed and counters["units-removed"] > 0 and counters["blocked-groups"] == 1
    pruned = ir.to_proto(model)
    onnx.checker.check_model(pruned, full_check=True)
    assert run_model(pruned, _feeds(proto))["y"].shape == (1, 10)


def test_unstructured_stores_sparse_initializers() -> None:
    proto = resnet(width=16, blocks=1, hw=8)
    result = graphopt.prune(proto, unstructured=0.9)
    sparse = result.model.graph.sparse_initializer
    assert len(sparse) >= 3
    assert result.report.nonzero_params_after < 0.2 * result.report.params_before
    assert any("will not run faster" in note for note in result.report.notes)
    assert result.report.macs_after == result.report.macs_before
    out = run_model(result.model, _feeds(proto))["y"]
    assert out.shape == (1, 10) and np.isfinite(out).all()


def test_batch_norm_recalibration_uses_the_data() -> None:
    proto = resnet(width=8, blocks=1, hw=8)
    data = [_feeds(proto, seed) for seed in range(4)]
    result = graphopt.prune(proto, ratio=0.5, calibration=data, recalibrate_bn=True)
    assert result.report.batch_norms_recalibrated == 3  # stem + two in the block
    # the first BatchNormalization now normalizes its input on the data to mean 0
    first_bn = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization")
    probe = onnx.ModelProto.FromString(result.model.SerializeToString())
    probe.graph.output.append(onnx.ValueInfoProto(name=first_bn.input[0]))
    inputs = np.concatenate([run_model(probe, d)[first_bn.input[0]] for d in data])
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    np.testing.assert_allclose(inits[first_bn.input[3]], inputs.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_split_concat_slice_qdq_conv_transpose_and_flatten_are_rewritten() -> None:
    planted, _ = _plant_zeros(channel_ops_net(), 0.5)
    result = graphopt.prune(planted, ratio=0.5)
    model = result.model
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = {n.op_type: n for n in model.graph.node}
    split_sizes = inits[node["Split"].input[1]].tolist()
    assert sum(split_sizes) == 4 and min(split_sizes) >= 1
    starts, ends = inits[node["Slice"].input[1]].tolist(), inits[node["Slice"].input[2]].tolist()
    assert 0 <= starts[0] < ends[0] <= 4
    assert inits[node["ConvTranspose"].input[1]].shape[1] == 2  # 4 output channels -> 2
    assert inits[node["QuantizeLinear"].input[1]].shape == (4,)
    assert inits[node["Gemm"].input[1]].shape == (2 * 16, 5)  # rows go in blocks of 16 per channel
    feeds = _feeds(planted)
    expected, actual = _outputs(planted, feeds), _outputs(model, feeds)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, atol=1e-5)


def test_dead_branch_over_the_channel_axis_does_not_block_pruning() -> None:
    """A debug branch nobody reads (ReduceMean over channels) must not block the conv's group."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w1"], ["c1"], name="w1", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["c1"], ["r1"]),
        onnx.helper.make_node("ReduceMean", ["r1"], ["debug_mean"], axes=[1]),
        onnx.helper.make_node("Conv", ["r1", "w2"], ["y"], name="w2"),
    ]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], [w1, w2])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8

    result = graphopt.prune(model, ratio=0.5)

    shapes = _weight_shapes(result.model)
    assert shapes["w1"] == (4, 3, 3, 3) and shapes["w2"] == (4, 4, 1, 1)
    assert "ReduceMean" not in {n.op_type for n in result.model.graph.node}
    # The pruned model runs and keeps the output's shape (its values differ: it is a smaller model).
    out = _outputs(result.model, _feeds(result.model))
    assert next(iter(out.values())).shape == (1, 4, 8, 8)
