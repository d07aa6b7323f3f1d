"""PartitionedSession on the local backend: exact outputs, DAG scheduling, pipelining, errors."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from partition_runtime_helpers import (
    branch_model,
    mlp_model,
    sharded_linear_model,
    write_partitions,
)

import graphopt
from graphopt.errors import GraphoptError
from graphopt.runtime import (
    Manifest,
    PartitionedSession,
    PartitionSpec,
    TensorSpec,
    run_model,
)
from graphopt.runtime._partitioned import _build_plan, _LocalScheduler, _Request

THREE_STAGES = [("stage0", "stage", ["x"], ["h0"]), ("stage1", "stage", ["h0"], ["h1"]),
                ("stage2", "stage", ["h1"], ["y"])]


def _x(rows: int = 8, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


@pytest.fixture(scope="module")
def mlp_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, Path]:
    model = mlp_model(layers=3)
    folder = tmp_path_factory.mktemp("mlp") / "parts"
    write_partitions(model, folder, THREE_STAGES)
    return model, folder


def _with_extra_output(model: onnx.ModelProto, name: str, width: int = 16) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width]))
    return model


@pytest.mark.parametrize("cuts", [["h0"], ["h0", "h1"]], ids=["2-stages", "3-stages"])
def test_stage_split_outputs_are_bit_exact(tmp_path: Path, cuts: list[str]) -> None:
    model = mlp_model(layers=3)
    bounds = ["x", *cuts, "y"]
    parts = [(f"stage{i}", "stage", [a], [b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    manifest = write_partitions(model, tmp_path, parts)
    # The partitions hold exactly the original nodes, each once.
    ops = sorted(n.op_type for p in manifest.partitions
                 for n in onnx.load(str(manifest.partition_path(p))).graph.node)
    assert ops == sorted(n.op_type for n in model.graph.node)
    x = _x()
    with PartitionedSession(tmp_path) as session:
        outputs = session.run({"x": x})
    assert list(outputs) == ["y"]
    np.testing.assert_array_equal(outputs["y"], run_model(model, {"x": x})["y"], strict=True)


def test_intermediates_are_dropped_after_their_last_consumer(tmp_path: Path) -> None:
    model = _with_extra_output(mlp_model(layers=3), "h0")  # h0: model output and stage1 input
    write_partitions(model, tmp_path, THREE_STAGES)
    x = _x()
    with PartitionedSession(tmp_path, trace=True) as session:
        outputs = session.run({"x": x})
    expected = run_model(model, {"x": x})
    assert list(outputs) == ["y", "h0"]
    for name in ("y", "h0"):
        np.testing.assert_array_equal(outputs[name], expected[name])
    live = {event.partition: event.live for event in session.trace}
    assert set(live["stage0"]) == {"h0"}  # the graph input x is gone once stage0 read it
    assert set(live["stage1"]) == {"h0", "h1"}  # h0 kept: it is a requested output
    assert set(live["stage2"]) == {"h0", "y"}  # h1 dropped after stage2, its only consumer


def test_branches_and_combine_are_bit_exact_on_their_own_threads(tmp_path: Path) -> None:
    model = branch_model(width=64, depth=3)
    manifest = write_partitions(model, tmp_path, [
        ("left", "branch", ["x"], ["left"]), ("right", "branch", ["x"], ["right"]),
        ("combine", "combine", ["left", "right"], ["y"])], strategy="branches")
    assert manifest.partitions[2].depends_on == [0, 1]
    x = _x(rows=16, width=64)
    with PartitionedSession(tmp_path, trace=True) as session:
        outputs = [session.run({"x": x}) for _ in range(3)]
        events = list(session.trace)
    expected = run_model(model, {"x": x})["y"]
    for out in outputs:
        np.testing.assert_array_equal(out["y"], expected)
    # Whether the branches overlap in time depends on the machine's load; that they can is
    # shown deterministically by test_scheduler_runs_ready_branches_concurrently.
    for request in range(3):
        by_name = {e.partition: e for e in events if e.request == request}
        left, right, combine = by_name["left"], by_name["right"], by_name["combine"]
        assert combine.start >= max(left.end, right.end)
        assert left.thread != right.thread


def _memory_manifest(parts: list[PartitionSpec], inputs: list[str], outputs: list[str]) -> Manifest:
    manifest = Manifest(partitions=parts, inputs=[TensorSpec(n, "float32") for n in inputs],
                        outputs=[TensorSpec(n, "float32") for n in outputs])
    manifest.validate(check_files=False)
    return manifest


def _wait(request: _Request) -> _Request:
    assert request.done.wait(20), "request never finished"
    return request


def test_scheduler_runs_ready_branches_concurrently() -> None:
    # Each branch waits at a barrier for the other: this only passes if both run at once.
    manifest = _memory_manifest([
        PartitionSpec(0, "a", "a.onnx", "branch", ["x"], ["a"]),
        PartitionSpec(1, "b", "b.onnx", "branch", ["x"], ["b"]),
        PartitionSpec(2, "sum", "sum.onnx", "combine", ["a", "b"], ["y"], depends_on=[0, 1])],
        ["x"], ["y"])
    barrier = threading.Barrier(2, timeout=10)

    def branch(scale: float):
        def runner(args):
            barrier.wait()
            return [args[0] * scale]
        return runner

    runners = [branch(2.0), branch(3.0), lambda args: [args[0] + args[1]]]
    plan = _build_plan(manifest, ["y"])
    assert plan.sources == (0, 1) and plan.waiting[2] == 2 and plan.uses["x"] == 2
    scheduler = _LocalScheduler(runners, manifest.partitions, queue_size=2, trace=None)
    try:
        request = _Request(0, plan, {"x": np.ones(3)})
        scheduler.submit(request)
        _wait(request)
    finally:
        scheduler.close()
    assert request.error is None
    np.testing.assert_array_equal(request.tensors["y"], np.full(3, 5.0))


def test_scheduler_pipelines_consecutive_requests_across_stages() -> None:
    # Stage 0 of request 1 must run while stage 1 still works on request 0.
    manifest = _memory_manifest([
        PartitionSpec(0, "s0", "s0.onnx", "stage", ["x"], ["h"]),
        PartitionSpec(1, "s1", "s1.onnx", "stage", ["h"], ["y"], depends_on=[0])], ["x"], ["y"])
    barrier = threading.Barrier(2, timeout=10)
    calls = {"s0": 0, "s1": 0}

    def stage(name: str, meet_on_call: int):
        def runner(args):
            calls[name] += 1
            if calls[name] == meet_on_call:
                barrier.wait()
            return [args[0] + 1]
        return runner

    scheduler = _LocalScheduler([stage("s0", 2), stage("s1", 1)], manifest.partitions,
                                queue_size=1, trace=None)
    plan = _build_plan(manifest, ["y"])
    try:
        requests = [_Request(i, plan, {"x": np.full(2, float(i))}) for i in range(3)]
        for request in requests:
            scheduler.submit(request)
        for request in requests:
            _wait(request)
    finally:
        scheduler.close()
    assert [r.error for r in requests] == [None] * 3
    assert [float(r.tensors["y"][0]) for r in requests] == [2.0, 3.0, 4.0]


def test_tensor_parallel_shards_match_unsplit_within_tolerance(tmp_path: Path) -> None:
    whole, sharded = sharded_linear_model(width=32, out=24, shards=2)
    write_partitions(sharded, tmp_path, [
        ("shard0", "shard", ["x"], ["p0"]), ("shard1", "shard", ["x"], ["p1"]),
        ("combine", "combine", ["p0", "p1"], ["y"])], strategy="tensor-parallel")
    x = _x(rows=6, width=32)
    with PartitionedSession(tmp_path) as session:
        y = session.run({"x": x})["y"]
    # Same nodes as the sharded graph: bit-exact; against the single MatMul: float rounding.
    np.testing.assert_array_equal(y, run_model(sharded, {"x": x})["y"])
    np.testing.assert_allclose(y, run_model(whole, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_micro_batches_equal_the_whole_batch(mlp_parts) -> None:
    model, folder = mlp_parts
    x = _x(rows=10)
    with PartitionedSession(folder, micro_batches=3, trace=True) as session:
        y = session.run({"x": x})["y"]
        events = list(session.trace)
    np.testing.assert_array_equal(y, run_model(model, {"x": x})["y"])
    assert sorted({(e.request, e.partition) for e in events}) == [
        (r, s) for r in range(3) for s in ("stage0", "stage1", "stage2")]


def test_micro_batches_refuse_what_cannot_be_split(tmp_path: Path, mlp_parts) -> None:
    _, folder = mlp_parts
    with PartitionedSession(folder, micro_batches=4) as session:
        with pytest.raises(GraphoptError, match="at least 4 on axis 0"):
            session.run({"x": _x(rows=2)})
    reduce = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], "sum",
                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    model = helper.make_model(reduce, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    write_partitions(model, tmp_path, [("all", "stage", ["x"], ["y"])])
    with pytest.raises(GraphoptError, match="ReduceSum .* reduces over every axis"):
        PartitionedSession(tmp_path, micro_batches=2)


def _two_stage_parts(folder: Path, nodes: list, width: int = 4) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    graphopt.partition(model, folder, stages=2)
    return model


@pytest.mark.parametrize("mixing", [
    helper.make_node("Softmax", ["a"], ["s"], axis=0),
    helper.make_node("ReduceMean", ["a"], ["s"], axes=[0], keepdims=1),
    helper.make_node("Transpose", ["a"], ["s"], perm=[1, 0]),
], ids=["softmax-axis0", "reduce-axis0", "transpose"])
def test_micro_batches_refused_when_a_node_mixes_rows(tmp_path: Path, mixing) -> None:
    """Outputs of the right shape but computed across rows were joined silently."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), mixing, helper.make_node("Add", ["s", "a"], ["y"])]
    model = _two_stage_parts(tmp_path / "parts", nodes)
    with pytest.raises(GraphoptError, match="micro-batches would change the outputs"):
        PartitionedSession(tmp_path / "parts", micro_batches=2)
    x = _x(rows=4, width=4)
    with PartitionedSession(tmp_path / "parts") as session:
        np.testing.assert_array_equal(session.run({"x": x})["y"], run_model(model, {"x": x})["y"])


def test_micro_batches_follow_a_reshape_that_keeps_the_batch(tmp_path: Path) -> None:
    shape = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Slice", ["sh", "zero", "one"], ["n1"]),
             helper.make_node("Concat", ["n1", "dims"], ["target"], axis=0)]
    nodes = [helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.INT64, [1], [0])),
             helper.make_node("Constant", [], ["one"], value=helper.make_tensor("o", TensorProto.INT64, [1], [1])),
             helper.make_node("Constant", [], ["dims"], value=helper.make_tensor("d", TensorProto.INT64, [2], [2, 2])),
             *shape, helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Softmax", ["r"], ["s"], axis=-1),
             helper.make_node("Reshape", ["s", "sh"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    model = _two_stage_parts(tmp_path / "parts", nodes)
    x = _x(rows=6, width=4)
    with PartitionedSession(tmp_path / "parts", micro_batches=3) as session:
        np.testing.assert_array_equal(session.run({"x": x})["y"], run_model(model, {"x": x})["y"])


def test_run_many_pipelines_requests_and_keeps_their_order(mlp_parts) -> None:
    model, folder = mlp_parts
    batches = [_x(rows=3, seed=s) for s in range(12)]
    with PartitionedSession(folder, max_in_flight=4, queue_size=1) as session:
        results = list(session.run_many({"x": b} for b in batches))
    assert len(results) == len(batches)
    for batch, result in zip(batches, results):
        np.testing.assert_array_equal(result["y"], run_model(model, {"x": batch})["y"])


def test_asking_for_some_outputs_runs_only_their_partitions(tmp_path: Path) -> None:
    model = _with_extra_output(mlp_model(layers=3), "h0")
    write_partitions(model, tmp_path, THREE_STAGES)
    x = _x()
    with PartitionedSession(tmp_path, trace=True) as session:
        outputs = session.run({"x": x}, outputs=["h0"])
        assert [e.partition for e in session.trace] == ["stage0"]
        with pytest.raises(GraphoptError, match="'nope' is not a tensor"):
            session.run({"x": x}, outputs=["nope"])
    np.testing.assert_array_equal(outputs["h0"], run_model(model, {"x": x})["h0"])


def test_feeds_are_checked_against_the_manifest(mlp_parts) -> None:
    _, folder = mlp_parts
    with PartitionedSession(folder) as session:
        assert session.input_names == ["x"] and session.output_names == ["y"]
        with pytest.raises(GraphoptError, match="input 'x' is missing"):
            session.run({})
        with pytest.raises(GraphoptError, match="'z' is not an input"):
            session.run({"x": _x(), "z": _x()})
        with pytest.raises(GraphoptError, match="is float64 but the model expects float32"):
            session.run({"x": _x().astype(np.float64)})
        with pytest.raises(GraphoptError, match="size 5 on axis 1"):
            session.run({"x": _x(width=5)})


def test_a_failing_partition_is_named_and_the_session_stays_usable(tmp_path: Path) -> None:
    model = mlp_model(layers=3)
    manifest = write_partitions(model, tmp_path, THREE_STAGES)
    manifest.inputs[0].shape = ["N", None]  # let a wrong width through to onnxruntime
    with PartitionedSession(manifest) as session:
        with pytest.raises(GraphoptError, match="partition 'stage0' failed"):
            session.run({"x": _x(width=5)})
        x = _x()
        np.testing.assert_array_equal(session.run({"x": x})["y"], run_model(model, {"x": x})["y"])


def test_bad_configuration_gives_clear_errors(mlp_parts, tmp_path: Path) -> None:
    _, folder = mlp_parts
    with pytest.raises(GraphoptError, match="unknown backend 'dask'"):
        PartitionedSession(folder, backend="dask")
    with pytest.raises(GraphoptError, match="unknown partition device 'tpu:0'"):
        PartitionedSession(folder, devices={"stage1": "tpu:0"})
    with pytest.raises(GraphoptError, match="names partition 'stage9'"):
        PartitionedSession(folder, devices={"stage9": "cpu"})
    with pytest.raises(GraphoptError, match="micro_batches must be at least 1"):
        PartitionedSession(folder, micro_batches=0)
    with pytest.raises(GraphoptError, match="no partition manifest"):
        PartitionedSession(tmp_path / "missing")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has the CUDA provider")
def test_cuda_partition_without_cuda_provider_is_refused(mlp_parts) -> None:
    _, folder = mlp_parts
    with pytest.raises(GraphoptError, match="CUDA execution provider is not available"):
        PartitionedSession(folder, devices={"stage1": "cuda:0"})


def test_partition_file_that_disagrees_with_its_manifest_is_refused(tmp_path: Path) -> None:
    manifest = write_partitions(mlp_model(layers=3), tmp_path, THREE_STAGES)
    manifest.partitions[1].file = "stage2.onnx"  # reads h1, but the manifest says h0
    with pytest.raises(GraphoptError, match="reads 'h1', which its manifest entry does not list"):
        PartitionedSession(manifest)


def test_close_stops_the_workers(mlp_parts) -> None:
    _, folder = mlp_parts
    session = PartitionedSession(folder)
    names = {f"graphopt-partition-stage{i}" for i in range(3)}
    assert names <= {t.name for t in threading.enumerate()}
    assert set(session.placement()) == {"stage0", "stage1", "stage2"}
    session.close()
    session.close()  # idempotent
    assert not names & {t.name for t in threading.enumerate() if t.is_alive()}
    with pytest.raises(GraphoptError, match="session is closed"):
        session.run({"x": _x()})


def test_a_session_dropped_without_close_stops_its_workers(mlp_parts) -> None:
    import gc

    _, folder = mlp_parts
    session = PartitionedSession(folder)
    session.run({"x": _x()})
    del session
    gc.collect()
    alive = {t.name for t in threading.enumerate() if t.is_alive()}
    assert not {f"graphopt-partition-stage{i}" for i in range(3)} & alive


@pytest.mark.cuda
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with the CUDA provider")
def test_cuda_partition_matches_cpu(mlp_parts) -> None:
    model, folder = mlp_parts
    x = _x()
    with PartitionedSession(folder, devices={"stage1": "cuda:0"}) as session:
        assert session.placement()["stage1"].startswith("cuda:0")
        y = session.run({"x": x})["y"]
    np.testing.assert_allclose(y, run_model(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_ray_backend_without_ray_says_how_to_install_it(mlp_parts, monkeypatch) -> None:
    _, folder = mlp_parts
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(GraphoptError, match=r'needs Ray; install it with pip install "graphopt\[ray\]"'):
        PartitionedSession(folder, backend="ray")


@pytest.mark.parametrize("options, exact", [
    ({"stages": 2}, True), ({"stages": 3}, True), ({"tensor_parallel": 2}, False)],
    ids=["2-stages", "3-stages", "tensor-parallel-2"])
def test_folders_written_by_graphopt_partition_run_like_the_original(
        tmp_path: Path, options: dict, exact: bool) -> None:
    import graphopt

    model = mlp_model(layers=4)
    onnx.save(model, tmp_path / "model.onnx")
    result = graphopt.partition(str(tmp_path / "model.onnx"), str(tmp_path / "parts"),
                                dims={"N": 4}, **options)
    assert len(result.manifest.partitions) >= 2
    x = _x(rows=4)
    with PartitionedSession(tmp_path / "parts") as session:
        y = session.run({"x": x})["y"]
    expected = run_model(model, {"x": x})["y"]
    if exact:
        np.testing.assert_array_equal(y, expected)
    else:
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_branches_found_by_graphopt_partition_run_concurrently(tmp_path: Path) -> None:
    import graphopt

    model = branch_model(width=64, depth=3)
    onnx.save(model, tmp_path / "model.onnx")
    result = graphopt.partition(str(tmp_path / "model.onnx"), str(tmp_path / "parts"),
                                branches=True, dims={"N": 8})
    kinds = [p.kind for p in result.manifest.partitions]
    assert kinds.count("branch") >= 2
    x = _x(rows=8, width=64)
    with PartitionedSession(tmp_path / "parts", trace=True) as session:
        y = session.run({"x": x})["y"]
        threads = {e.thread for e in session.trace}
    np.testing.assert_array_equal(y, run_model(model, {"x": x})["y"])
    assert len(threads) == len(result.manifest.partitions)


def test_micro_batches_accept_shape_entries_other_than_the_batch(tmp_path: Path) -> None:
    """Shape(x)[1] (a sequence length) is the same in every micro-batch; Shape(x)[0] is not."""
    def nodes(index: int) -> list:
        return [helper.make_node("Constant", [], ["i"], value=helper.make_tensor("i", TensorProto.INT64, [], [index])),
                helper.make_node("Shape", ["x"], ["sh"]), helper.make_node("Gather", ["sh", "i"], ["n"]),
                helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
                helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["a", "nf"], ["y"])]

    model = _two_stage_parts(tmp_path / "seq", nodes(1))
    x = _x(rows=6, width=4)
    with PartitionedSession(tmp_path / "seq", micro_batches=3) as session:
        np.testing.assert_array_equal(session.run({"x": x})["y"], run_model(model, {"x": x})["y"])
    _two_stage_parts(tmp_path / "batch", nodes(0))
    with pytest.raises(GraphoptError, match="computes with the batch size"):
        PartitionedSession(tmp_path / "batch", micro_batches=3)
