"""PartitionedSession on the Ray backend, on a two-node local cluster (skipped without Ray)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from partition_runtime_helpers import branch_model, mlp_model, write_partitions

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster

from graphopt.cli import cli
from graphopt.errors import GraphoptError
from graphopt.runtime import PartitionedSession, run_model

TWO_STAGES = [("stage0", "stage", ["x"], ["h1"]), ("stage1", "stage", ["h1"], ["y"])]
ON_TWO_NODES = {"stage0": {"num_cpus": 1, "node_a": 1}, "stage1": {"num_cpus": 1, "node_b": 1}}


def _x(rows: int = 8, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


@pytest.mark.slow  # starting a Ray runtime of its own takes 20-60 s on a loaded 2-core machine
def test_cli_on_its_own_ray_runtime_shuts_it_down(tmp_path: Path) -> None:
    # Runs before the cluster fixture exists: the command starts Ray and must stop it.
    from click.testing import CliRunner

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")
    model = mlp_model(layers=2)
    write_partitions(model, tmp_path / "parts", TWO_STAGES)
    import onnx

    onnx.save(model, tmp_path / "model.onnx")
    np.savez(tmp_path / "in.npz", x=_x())
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "parts"), "--inputs", str(tmp_path / "in.npz"),
                                      "--backend", "ray", "--compare", str(tmp_path / "model.onnx")])
    assert result.exit_code == 0, result.output
    assert "bit-exact" in result.output and "ray backend" in result.output
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1}})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory: pytest.TempPathFactory):
    model = mlp_model(layers=3)
    folder = tmp_path_factory.mktemp("ray") / "parts"
    write_partitions(model, folder, TWO_STAGES, resources=ON_TWO_NODES)
    return model, folder


def _wait_for_free_resources(expected: dict[str, float], seconds: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + seconds
    while True:
        available = ray.available_resources()
        if all(available.get(k, 0) >= v for k, v in expected.items()) or time.monotonic() > deadline:
            return available
        time.sleep(0.2)


def test_two_stages_on_two_nodes_are_bit_exact(cluster, two_stage, monkeypatch) -> None:
    """One session (actors are slow to start): placement, exact outputs, driver fetches, errors, close."""
    model, folder = two_stage
    from graphopt.runtime import Manifest

    manifest = Manifest.load(folder)
    manifest.inputs[0].shape = ["N", None]  # let a wrong width through to onnxruntime
    x = _x()
    fetched: list[int] = []
    real_get = ray.get

    def spy(refs, *args, **kwargs):
        fetched.append(len(refs) if isinstance(refs, list) else 1)
        return real_get(refs, *args, **kwargs)

    session = PartitionedSession(manifest, backend="ray", micro_batches=2)
    try:
        nodes = {name: where.split("Ray node ")[1].split(",")[0]
                 for name, where in session.placement().items()}
        monkeypatch.setattr(ray, "get", spy)
        y = session.run({"x": x})["y"]
        monkeypatch.setattr(ray, "get", real_get)
        many = list(session.run_many({"x": _x(seed=s)} for s in range(6)))
        with pytest.raises(GraphoptError, match="partition 'stage0' failed") as info:
            session.run({"x": _x(width=5)})
        assert "\n" not in str(info.value)
        np.testing.assert_array_equal(session.run({"x": x})["y"], y)  # still usable
        actors = list(session._backend._actors)
    finally:
        session.close()
    assert nodes["stage0"] != nodes["stage1"]  # node_a and node_b resources
    # One fetch of the one output per micro-batch; h1 went from actor to actor.
    assert fetched == [1, 1]
    np.testing.assert_array_equal(y, run_model(model, {"x": x})["y"])
    for s, out in enumerate(many):
        np.testing.assert_array_equal(out["y"], run_model(model, {"x": _x(seed=s)})["y"])
    # close() kills every actor and frees the resources; the cluster belongs to the caller.
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ready.remote(), timeout=20)
    available = _wait_for_free_resources({"node_a": 1, "node_b": 1})
    assert available.get("node_a") == 1 and available.get("node_b") == 1
    assert ray.is_initialized()


def test_cli_runs_on_the_given_ray_cluster(cluster, two_stage, tmp_path: Path) -> None:
    import onnx
    from click.testing import CliRunner

    model, folder = two_stage
    onnx.save(model, tmp_path / "model.onnx")
    np.savez(tmp_path / "in.npz", x=_x())
    result = CliRunner().invoke(cli, ["run", str(folder), "--inputs", str(tmp_path / "in.npz"), "--backend",
                                      "ray", "--ray-address", cluster.address, "--compare",
                                      str(tmp_path / "model.onnx")])
    assert result.exit_code == 0, result.output
    assert "bit-exact" in result.output and "ray backend" in result.output
    assert ray.is_initialized()  # the cluster belongs to the caller: left running


def test_branches_run_as_separate_actors(cluster, tmp_path: Path) -> None:
    model = branch_model(width=32, depth=2)
    write_partitions(model, tmp_path, [
        ("left", "branch", ["x"], ["left"]), ("right", "branch", ["x"], ["right"]),
        ("combine", "combine", ["left", "right"], ["y"])], strategy="branches")
    x = _x(rows=4, width=32)
    with PartitionedSession(tmp_path, backend="ray") as session:
        pids = {where.rsplit("pid ", 1)[1] for where in session.placement().values()}
        y = session.run({"x": x})["y"]
    assert len(pids) == 3
    np.testing.assert_array_equal(y, run_model(model, {"x": x})["y"])


@pytest.mark.parametrize("compiled", [False, True], ids=["chained-calls", "compiled-graph"])
def test_partition_with_two_outputs(cluster, tmp_path: Path, compiled: bool) -> None:
    model = branch_model(width=16, depth=1)
    write_partitions(model, tmp_path, [("both", "stage", ["x"], ["left", "right"]),
                                       ("combine", "stage", ["left", "right"], ["y"])])
    x = _x(rows=3)
    with PartitionedSession(tmp_path, backend="ray", ray_compiled=compiled) as session:
        assert session._backend.compiled is compiled
        y = session.run({"x": x})["y"]
    np.testing.assert_array_equal(y, run_model(model, {"x": x})["y"])


def test_unplaceable_partition_times_out_and_close_frees_resources(cluster, tmp_path: Path) -> None:
    write_partitions(mlp_model(layers=3), tmp_path, TWO_STAGES,
                     resources={"stage0": {"node_a": 1}, "stage1": {"accelerator_x": 1}})
    with pytest.raises(GraphoptError, match="partition 'stage1' got no Ray worker within 3 s: it "
                       "requests accelerator_x=1 but the cluster offers 0"):
        PartitionedSession(tmp_path, backend="ray", ray_timeout=3)
    available = _wait_for_free_resources({"node_a": 1, "node_b": 1})
    assert available.get("node_a") == 1 and available.get("node_b") == 1


def test_compiled_graph_on_two_nodes_is_bit_exact(cluster, two_stage, monkeypatch) -> None:
    model, folder = two_stage
    from graphopt.runtime import Manifest

    manifest = Manifest.load(folder)
    manifest.inputs[0].shape = ["N", None]  # let a wrong width through to onnxruntime
    fetched: list[int] = []
    real_get = ray.get
    x = _x()
    with PartitionedSession(manifest, backend="ray", ray_compiled=True, micro_batches=2) as session:
        assert session._backend.compiled
        nodes = {where.split("Ray node ")[1].split(",")[0] for where in session.placement().values()}

        def spy(refs, *args, **kwargs):
            fetched.append(len(refs) if isinstance(refs, list) else 1)
            return real_get(refs, *args, **kwargs)

        monkeypatch.setattr(ray, "get", spy)
        y = session.run({"x": x})["y"]
        monkeypatch.setattr(ray, "get", real_get)
        many = list(session.run_many({"x": _x(seed=s)} for s in range(5)))
        with pytest.raises(GraphoptError, match="'h1' is an intermediate tensor"):
            session.run({"x": x}, outputs=["h1"])
        with pytest.raises(GraphoptError, match="partition 'stage0' failed"):
            session.run({"x": _x(width=5)})
        np.testing.assert_array_equal(session.run({"x": x})["y"], y)  # still usable
    assert len(nodes) == 2 and fetched == [1, 1]
    np.testing.assert_array_equal(y, run_model(model, {"x": x})["y"])
    for s, out in enumerate(many):
        np.testing.assert_array_equal(out["y"], run_model(model, {"x": _x(seed=s)})["y"])
    available = _wait_for_free_resources({"node_a": 1, "node_b": 1})
    assert available.get("node_a") == 1 and available.get("node_b") == 1
