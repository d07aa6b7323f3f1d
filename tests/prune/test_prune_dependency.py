"""Channel-dependency analysis: exact groups on small graphs, and blocked groups with reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _prune_builders import Builder, bert, concat_net, grouped_net, mobilenet, resnet
from graphopt.passes.prune.dependency import ChannelGroup, analyze_channels
from onnx import TensorProto, helper

from graphopt import ir


def _weights(model: onnx.ModelProto, op: str) -> list[str]:
    return [n.input[1] for n in model.graph.node if n.op_type == op]


def _group_with(groups: list[ChannelGroup], tensor: str, axis: int) -> ChannelGroup:
    found = [g for g in groups if any(s.value == tensor and s.axis == axis for s in g.slots)]
    assert len(found) == 1, (tensor, axis, found)
    return found[0]


def _weight_slots(group: ChannelGroup, weights: set[str]) -> set[tuple[str, int]]:
    return {(s.value, s.axis) for s in group.slots if s.value in weights}


def _classes(group: ChannelGroup, tensor: str, axis: int) -> list[int]:
    return next(s.classes.tolist() for s in group.slots if s.value == tensor and s.axis == axis)


def test_residual_blocks_share_one_group_and_internal_channels_have_their_own() -> None:
    proto = resnet(width=8, blocks=2)
    convs = _weights(proto, "Conv")
    fc = _weights(proto, "Gemm")[0]
    stem, b1c1, b1c2, b2c1, b2c2 = convs
    groups = analyze_channels(ir.load(proto)).groups
    weights = set(convs) | {fc}
    residual = _group_with(groups, stem, 0)
    assert _weight_slots(residual, weights) == {(stem, 0), (b1c1, 1), (b1c2, 0), (b2c1, 1), (b2c2, 0), (fc, 0)}
    assert residual.prunable and residual.num_classes == 8 and residual.kind == "channels"
    # each unit is one channel, the same index in every tensor of the group
    assert all(s.classes.tolist() == _classes(residual, stem, 0) for s in residual.slots)
    inner = _group_with(groups, b1c1, 0)
    assert _weight_slots(inner, weights) == {(b1c1, 0), (b1c2, 1)}
    assert inner.prunable
    logits = _group_with(groups, fc, 1)
    assert logits.blocked == ["reaches graph output 'y'"]
    assert len(groups) == 4


def test_depthwise_conv_ties_its_input_and_output_channels() -> None:
    proto = mobilenet(width=8, expand=2, blocks=1)
    stem, expand, depthwise, project, head = _weights(proto, "Conv")
    groups = analyze_channels(ir.load(proto)).groups
    weights = {stem, expand, depthwise, project, head}
    expanded = _group_with(groups, expand, 0)
    assert _weight_slots(expanded, weights) == {(expand, 0), (depthwise, 0), (project, 1)}
    assert expanded.num_classes == 16 and expanded.prunable
    residual = _group_with(groups, stem, 0)
    assert _weight_slots(residual, weights) == {(stem, 0), (expand, 1), (project, 0), (head, 1)}


def test_concat_on_the_channel_axis_maps_offsets() -> None:
    proto = concat_net()
    a, c, consumer = _weights(proto, "Conv")
    group = _group_with(analyze_channels(ir.load(proto)).groups, a, 0)
    assert _weight_slots(group, {a, c, consumer}) == {(a, 0), (c, 0), (consumer, 1)}
    assert group.num_classes == 10
    assert _classes(group, consumer, 1) == _classes(group, a, 0) + _classes(group, c, 0)


def test_grouped_conv_removes_whole_groups() -> None:
    proto = grouped_net()
    first, grouped, last = _weights(proto, "Conv")
    group = _group_with(analyze_channels(ir.load(proto)).groups, first, 0)
    assert _weight_slots(group, {first, grouped, last}) == {(first, 0), (grouped, 0), (last, 1)}
    assert group.num_classes == 4  # group=4: one unit per convolution group
    first_classes = _classes(group, first, 0)
    assert first_classes == [first_classes[0]] * 2 + [first_classes[2]] * 2 + [first_classes[4]] * 2 + \
        [first_classes[6]] * 2
    assert _classes(group, grouped, 0) == [k for k in first_classes[::2] for _ in range(3)]
    assert _classes(group, last, 1) == _classes(group, grouped, 0)


def test_matmul_columns_of_producer_rows_of_consumer() -> None:
    b = Builder(0)
    h = b.relu(b.linear("x", 6, 5, "fc1"))
    b.linear(h, 5, 3, "fc2")
    b.nodes.append(helper.make_node("Identity", [b.nodes[-1].output[0]], ["y"]))
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    w1, w2 = _weights(proto, "MatMul")
    bias1 = next(i.name for i in proto.graph.initializer if i.name.startswith("fc1_b"))
    groups = analyze_channels(ir.load(proto)).groups
    hidden = _group_with(groups, w1, 1)
    assert {(s.value, s.axis) for s in hidden.slots if s.constant} == {(w1, 1), (bias1, 0), (w2, 0)}
    assert hidden.prunable and hidden.num_classes == 5
    out = _group_with(groups, w2, 1)
    assert out.blocked == ["reaches graph output 'y'"]


def test_attention_heads_group_q_k_v_columns_and_output_rows() -> None:
    proto = bert(hidden=16, heads=4, ff=8, seq=3)
    q, k, v, o, ff1, ff2 = _weights(proto, "MatMul")[:2] + _weights(proto, "MatMul")[2:3] + \
        [w for w in _weights(proto, "MatMul") if "_o_" in w or "ff" in w]
    groups = analyze_channels(ir.load(proto)).groups
    heads = _group_with(groups, q, 1)
    assert heads.kind == "heads" and heads.prunable and heads.num_classes == 4
    assert _weight_slots(heads, {q, k, v, o, ff1, ff2}) == {(q, 1), (k, 1), (v, 1), (o, 0)}
    head_of_column = _classes(heads, q, 1)
    assert head_of_column == [c for c in head_of_column[::4] for _ in range(4)]  # 4 columns per head
    assert _classes(heads, k, 1) == _classes(heads, v, 1) == _classes(heads, o, 0) == head_of_column
    mlp = _group_with(groups, ff1, 1)
    assert mlp.kind == "channels" and mlp.prunable and _weight_slots(mlp, {ff1, ff2}) == {(ff1, 1), (ff2, 0)}
    hidden = _group_with(groups, o, 1)
    assert any("LayerNormalization" in r and "normalizes over the channel axis" in r for r in hidden.blocked)
    assert "comes from graph input 'x'" in hidden.blocked


def _conv_then(op_nodes: list[onnx.NodeProto], extra_inits: list[onnx.TensorProto] | None = None,
               out_shape: list[int] | None = None) -> onnx.ModelProto:
    b = Builder(0)
    h = b.conv("x", 3, 4)
    b.inits.extend(extra_inits or [])
    for node in op_nodes:
        node.input[0] = h if node.input[0] == "H" else node.input[0]
    b.nodes.extend(op_nodes)
    proto = helper.make_model(helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], b.inits),
        opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    return proto


@pytest.mark.parametrize("case,reason", [
    ("shape", "read by a shape computation (Shape"),
    ("lrn", "read by LRN 'lrn', which has no channel rule"),
    ("dynamic_reshape", "the shape of Reshape 'reshape' is computed at run time"),
    ("softmax", "Softmax 'softmax' normalizes over the channel axis"),
])
def test_blocked_groups_record_why(case: str, reason: str) -> None:
    if case == "shape":
        nodes = [helper.make_node("Shape", ["H"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=1)]
        proto = _conv_then(nodes, out_shape=[4])
    elif case == "lrn":
        proto = _conv_then([helper.make_node("LRN", ["H"], ["y"], size=3, name="lrn")], out_shape=[1, 4, 4, 4])
    elif case == "dynamic_reshape":
        # entry 1 (the channels) is computed from the input's shape: nothing constant to rewrite
        nodes = [helper.make_node("Shape", ["x"], ["xs"]),
                 helper.make_node("Slice", ["xs", "one", "two"], ["c"]),
                 helper.make_node("Add", ["c", "one"], ["channels"]),
                 helper.make_node("Concat", ["one", "channels", "tail"], ["shape"], axis=0),
                 helper.make_node("Reshape", ["H", "shape"], ["r"], name="reshape"),
                 helper.make_node("ReduceSum", ["r"], ["y"], keepdims=0)]
        consts = [onnx.numpy_helper.from_array(np.array([1], np.int64), "one"),
                  onnx.numpy_helper.from_array(np.array([2], np.int64), "two"),
                  onnx.numpy_helper.from_array(np.array([16], np.int64), "tail")]
        proto = _conv_then(nodes, consts, out_shape=[])
    else:
        nodes = [helper.make_node("Softmax", ["H"], ["y"], axis=1, name="softmax")]
        proto = _conv_then(nodes, out_shape=[1, 4, 4, 4])
    conv_w = _weights(proto, "Conv")[0]
    group = _group_with(analyze_channels(ir.load(proto)).groups, conv_w, 0)
    assert not group.prunable
    assert any(r.startswith(reason) for r in group.blocked), group.blocked


def test_analysis_does_not_change_the_model() -> None:
    proto = resnet(width=4, blocks=1)
    model = ir.load(proto)
    analyze_channels(model)
    assert ir.to_proto(model) == proto
    assert np.all([len(g.slots) > 0 for g in analyze_channels(model).groups])


@pytest.mark.parametrize("seed", range(5))
def test_vectorized_element_components_equal_a_plain_union_find(seed: int) -> None:
    """Element classes were found by a per-element Python union-find (VGG19 at --ratio 0.5: a
    minute); the vectorized components must give exactly the same partition of the elements."""
    from graphopt.passes.prune.dependency import _components

    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 400))
    ties = [rng.integers(0, count, size=(int(rng.integers(1, 60)), 2)) for _ in range(int(rng.integers(0, 8)))]
    parent = list(range(count))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in (pair for tie in ties for pair in tie.tolist()):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    expected = np.array([find(i) for i in range(count)])
    np.testing.assert_array_equal(_components(count, ties), expected)


def test_channel_analysis_never_reads_the_weights() -> None:
    """The analysis serialized every weight for shape inference (VGG19: 20 s of its minute)."""
    model = ir.load(resnet(width=32, blocks=1, stages=1, hw=4))
    read: list[str] = []
    for name, value in model.graph.initializers.items():
        array = value.const_value.numpy()
        if array.nbytes > 4096:
            value.const_value = ir.LazyTensor(lambda name=name, array=array: read.append(name) or array,
                                              value.const_value.dtype, array.shape)
    assert any(isinstance(v.const_value, ir.LazyTensor) for v in model.graph.initializers.values())
    analysis = analyze_channels(model)
    assert analysis.prunable() and read == []
