"""The partition cost model and planner: FLOPs, bytes, liveness, cut search, branches."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir
from graphopt.analysis import (chain_cut_bytes, find_branches, graph_cost, peak_activation_bytes,
                               plan_branches, plan_stages)
from graphopt.errors import GraphoptError


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def chain(widths: list[int], seed: int = 0) -> onnx.ModelProto:
    """``x[batch, widths[0]]`` through MatMul+Relu layers of the given widths."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        inits.append(numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"h{i}"])]
        current = f"h{i}"
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
                  [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", widths[-1]])], inits)


def towers(count: int = 3, width: int = 32, depth: int = 3) -> onnx.ModelProto:
    """A stem, ``count`` independent towers on its output, joined by a Sum."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "stem_w")]
    nodes = [helper.make_node("MatMul", ["x", "stem_w"], ["stem"])]
    ends = []
    for t in range(count):
        current = "stem"
        for d in range(depth):
            inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.2,
                                                 f"t{t}_w{d}"))
            nodes += [helper.make_node("MatMul", [current, f"t{t}_w{d}"], [f"t{t}_m{d}"]),
                      helper.make_node("Tanh", [f"t{t}_m{d}"], [f"t{t}_h{d}"])]
            current = f"t{t}_h{d}"
        ends.append(current)
    nodes.append(helper.make_node("Sum", ends, ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)


def test_cost_resolves_symbolic_dims_into_flops_and_bytes() -> None:
    cost = graph_cost(ir.load(chain([8, 16, 4])), dims={"batch": 5})
    assert cost.dims == {"batch": 5}
    assert cost.flops == [2 * 5 * 8 * 16, 5 * 16, 2 * 5 * 16 * 4, 5 * 4]
    assert cost.weight_bytes == {"w0": 8 * 16 * 4, "w1": 16 * 4 * 4}
    assert cost.value_bytes["x"] == 5 * 8 * 4 and cost.value_bytes["m0"] == 5 * 16 * 4
    assert cost.value_types["m0"] == (TensorProto.FLOAT, ("batch", 16))  # symbolic kept for emission
    assert cost.node_weights[0] == ("w0",) and cost.node_reads[2] == ("h0",)


def test_peak_activation_is_a_liveness_walk() -> None:
    cost = graph_cost(ir.load(chain([8, 16, 4])), dims={"batch": 1})
    x, m0, h0, m1, h1 = 32, 64, 64, 16, 16
    # x and m0 live together, then m0 and h0, then h0 and m1, then m1 and h1 (output kept)
    assert peak_activation_bytes(cost, range(4), keep=["h1"]) == max(x + m0, m0 + h0, h0 + m1, m1 + h1)
    # a run starting at node 2 holds its input h0 while m1 is produced
    assert peak_activation_bytes(cost, [2, 3], keep=["h1"]) == h0 + m1


def _best_bottleneck(flops: list[int], k: int) -> int:
    n = len(flops)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        worst = max(sum(flops[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("k", [2, 3, 4])
def test_stage_search_finds_the_optimal_bottleneck(k: int) -> None:
    cost = graph_cost(ir.load(chain([8, 64, 16, 48, 8, 32, 24])), dims={"batch": 2})
    plan = plan_stages(cost, k, tolerance=0.0)
    assert len(plan.partitions) == k
    assert plan.bottleneck_flops == _best_bottleneck(cost.flops, k)
    # contiguous runs of the topological order: every node once, stages read only earlier ones
    assert [i for p in plan.partitions for i in p.nodes] == list(range(len(cost)))
    assert all(d < i for i, p in enumerate(plan.partitions) for d in p.depends_on)


def test_cut_bytes_prefer_the_narrow_tensor_within_tolerance() -> None:
    # Equal FLOPs around two cut points; the one after the narrow layer sends fewer bytes.
    cost = graph_cost(ir.load(chain([64, 64, 4, 64, 64])), dims={"batch": 4})
    cut = cost.cut_bytes()
    plan = plan_stages(cost, 2, tolerance=0.5)
    position = plan.partitions[1].nodes[0]
    assert plan.cut_bytes == cut[position] == min(cut[1:-1])
    assert plan.cut_bytes == 4 * 4 * 4  # h1: [4, 4] floats


def test_memory_budget_gives_the_fewest_stages_that_fit() -> None:
    cost = graph_cost(ir.load(chain([64, 64, 64, 64, 64])), dims={"batch": 1})
    layer = 64 * 64 * 4
    plan = plan_stages(cost, memory_budget=2 * layer + 4096)
    assert len(plan.partitions) == 2
    assert all(p.weight_bytes + p.peak_activation_bytes <= 2 * layer + 4096 for p in plan.partitions)
    assert plan.strategy == "memory-budget"
    with pytest.raises(GraphoptError, match="over the memory budget"):
        plan_stages(cost, memory_budget=layer // 2)
    with pytest.raises(GraphoptError, match="cannot hold the model"):
        plan_stages(cost, 2, memory_budget=layer + 4096)


def test_bad_requests_are_clear_errors() -> None:
    cost = graph_cost(ir.load(chain([4, 4])))
    with pytest.raises(GraphoptError, match="at most 2"):
        plan_stages(cost, 3)
    with pytest.raises(GraphoptError, match="unknown balance"):
        plan_stages(cost, 1, balance="speed")
    with pytest.raises(GraphoptError, match="one device per stage"):
        plan_stages(cost, 2, devices=["cpu"])


@pytest.mark.parametrize("balance", ["memory", "latency"])
def test_other_balances_plan_valid_stages(balance: str) -> None:
    cost = graph_cost(ir.load(chain([64, 8, 64, 8, 64])), dims={"batch": 2})
    plan = plan_stages(cost, 2, balance=balance)
    assert [i for p in plan.partitions for i in p.nodes] == list(range(len(cost)))
    if balance == "memory":
        weights = [p.weight_bytes for p in plan.partitions]
        assert max(weights) <= cost.total_weight_bytes * 0.75


def test_shape_subgraphs_are_recomputable_and_cost_nothing_at_cuts() -> None:
    # mask = Cast(Reshape(...Shape(x)...)) feeds every layer: recomputed, never counted at a cut
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([1, -1], np.int64), "shape2")]
    nodes = [helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("ConstantOfShape", ["sx"], ["ones"], value=helper.make_tensor("v", 1, [1], [1.0])),
             helper.make_node("Mul", ["ones", "ones"], ["mask"])]
    current = "x"
    for i in range(4):
        inits.append(numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Mul", [f"m{i}", "mask"], [f"h{i}"])]
        current = f"h{i}"
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                   [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", 16])], inits)
    cost = graph_cost(ir.load(model), dims={"batch": 2})
    assert {"sx", "ones", "mask"} <= cost.recomputable
    assert not cost.recomputable & {"m0", "h0"}
    plan = plan_stages(cost, 2)
    assert plan.cut_bytes == 2 * 16 * 4  # only the hidden state
    assert chain_cut_bytes(cost, 2) == plan.cut_bytes


def test_branches_of_a_multi_tower_model() -> None:
    cost = graph_cost(ir.load(towers(count=3)), dims={"batch": 2})
    regions = find_branches(cost)
    assert len(regions) == 1 and len(regions[0]) == 3
    ops = [[cost.node_names[i] or cost.node_ops[i] for i in b] for b in regions[0]]
    assert all(len(b) == 6 for b in ops)  # 3 x (MatMul, Tanh) per tower
    plan = plan_branches(cost, devices=["cpu", "cuda:0"])
    assert [p.kind for p in plan.partitions] == ["stage", "branch", "branch", "branch", "stage"]
    _, *branches, tail = plan.partitions
    assert all(p.depends_on == [0] for p in branches)  # concurrent: each reads only the stem
    assert tail.depends_on == [1, 2, 3]
    # the k-th branch runs on the k-th device (round-robin), stages on the first
    assert [p.device for p in plan.partitions] == ["cpu", "cpu", "cuda:0", "cpu", "cpu"]


def test_a_plain_chain_has_no_branches() -> None:
    cost = graph_cost(ir.load(chain([8, 8, 8, 8])))
    assert find_branches(cost) == []
    with pytest.raises(GraphoptError, match="no two independent branches"):
        plan_branches(cost)


def test_predicted_throughput_is_limited_by_the_slowest_stage() -> None:
    cost = graph_cost(ir.load(chain([256, 256, 256, 256, 256])), dims={"batch": 64})
    one = plan_stages(cost, 1).predicted_throughput()
    four = plan_stages(cost, 4).predicted_throughput()
    assert four["runs_per_second"] > 2.5 * one["runs_per_second"]
    assert four["latency_seconds"] >= four["slowest_stage_seconds"]


def test_partition_stages_pass_annotates_without_changing_the_graph() -> None:
    from graphopt.pipeline import PassContext, PassManager, PassRegistry

    model = ir.load(chain([32, 32, 32, 32, 32]))
    before = ir.print_model(model)
    registry = PassRegistry.default()
    assert registry.has("partition-stages") and registry.has("split-tensor-parallel")
    report = PassManager("partition-stages<stages=2>", PassContext(registry=registry)).run(model)
    assert report.records[0].counters == {"stages": 2, "annotated": 8}
    assert [n.meta["partition"] for n in model.graph] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ir.print_model(model) == before
