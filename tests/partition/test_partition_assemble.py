"""Split heavy nodes whose Concat made a graph output: the slices go to the caller, who assembles them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import GraphoptError
from graphopt.runtime import Manifest, PartitionedSession, run_model


def lm_model(*, softmax_reads_logits: bool = False, seed: int = 5) -> onnx.ModelProto:
    """Three light layers (hidden state ``h2`` is an output too) and a head holding ~70% of the FLOPs."""
    rng = np.random.default_rng(seed)
    inits, nodes, current = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32) * 0.2, f"w{i}"))
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        current = f"h{i}"
    inits += [numpy_helper.from_array(rng.standard_normal((256, 32)).astype(np.float32), "head"),
              numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), "head_b")]
    nodes.append(helper.make_node("Gemm", [current, "head", "head_b"], ["logits"], transB=1))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 256]),
               helper.make_tensor_value_info("h2", TensorProto.FLOAT, ["N", 32])]
    if softmax_reads_logits:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 256]))
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _x(rows: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("assemble") / "parts"
    result = graphopt.partition(lm_model(), folder, stages=4, split_heavy=True, dims={"N": 4})
    return folder, result


def test_output_concat_is_dropped_and_recorded(parts: tuple[Path, Any]) -> None:
    folder, result = parts
    manifest = Manifest.load(folder)
    assert [t.name for t in manifest.outputs] == ["logits", "h2"]  # original names and order
    assert manifest.outputs[0].dtype == "float32"
    (recipe,) = manifest.assemble
    assert recipe["output"] == "logits" and recipe["op"] == "concat" and recipe["axis"] == -1
    assert len(recipe["parts"]) >= 2
    produced = [name for p in manifest.partitions for name in p.outputs]
    assert "logits" not in produced and set(recipe["parts"]) <= set(produced)
    ops = [n.op_type for p in manifest.partitions
           for n in onnx.load(str(manifest.partition_path(p))).graph.node]
    assert "Concat" not in ops and ops.count("Gemm") == len(recipe["parts"])
    heads = [p for p in manifest.partitions if any(name in recipe["parts"] for name in p.outputs)]
    assert len(heads) >= 2  # the column blocks run in several stages
    # The slices go to the caller, never between partitions; the stages still balance.
    sent = {t.tensor for t in manifest.transfers if t.source >= 0}
    assert not sent & set(recipe["parts"])
    assert result.plan.cut_bytes <= result.chain_cut_bytes
    assert manifest.meta["cut_bytes"] == result.plan.cut_bytes
    assert result.plan.balance_ratio() < 1.3
    whole = graphopt.partition(lm_model(), stages=4, plan_only=True, dims={"N": 4}).plan
    assert whole.balance_ratio() > 2.5


def test_assembled_run_is_bit_exact_locally(parts: tuple[Path, Any]) -> None:
    folder, _ = parts
    model = lm_model()
    feeds = {"x": _x()}
    expected = run_model(model, feeds)
    with PartitionedSession(folder) as session:
        assert session.output_names == ["logits", "h2"]
        actual = session.run(feeds)
        assert list(actual) == ["logits", "h2"]
        for name in expected:
            np.testing.assert_array_equal(actual[name], expected[name])
        only = session.run(feeds, outputs=["logits"])
        assert list(only) == ["logits"]
        np.testing.assert_array_equal(only["logits"], expected["logits"])
        hidden = session.run(feeds, outputs=["h2"])
        assert list(hidden) == ["h2"]
        np.testing.assert_array_equal(hidden["h2"], expected["h2"])
        many = list(session.run_many([{"x": _x(seed=s)} for s in (1, 2)], outputs=["h2", "logits"]))
        for s, got in zip((1, 2), many):
            want = run_model(model, {"x": _x(seed=s)})
            assert list(got) == ["h2", "logits"]
            np.testing.assert_array_equal(got["logits"], want["logits"])
    with PartitionedSession(folder, micro_batches=2) as session:
        np.testing.assert_array_equal(session.run(feeds)["logits"], expected["logits"])


def test_concat_read_by_a_node_stays_in_a_partition(tmp_path: Path) -> None:
    model = lm_model(softmax_reads_logits=True)
    result = graphopt.partition(model, tmp_path / "parts", stages=4, split_heavy=True, dims={"N": 4})
    manifest = result.manifest
    assert manifest is not None and manifest.assemble == []
    ops = [n.op_type for p in manifest.partitions
           for n in onnx.load(str(manifest.partition_path(p))).graph.node]
    assert "Concat" in ops
    feeds = {"x": _x()}
    expected = run_model(model, feeds)
    with PartitionedSession(tmp_path / "parts") as session:
        actual = session.run(feeds)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


def test_manifest_assemble_field_loads_validates_and_defaults(parts: tuple[Path, Any],
                                                                tmp_path: Path) -> None:
    folder, _ = parts
    data = json.loads((folder / "manifest.json").read_text())
    assert Manifest.from_dict(data).assemble == data["assemble"]
    old = {k: v for k, v in data.items() if k != "assemble"}  # a manifest written before the field
    assert Manifest.from_dict(old).assemble == []
    with pytest.raises(GraphoptError, match="no partition output for model outputs \\['logits'\\]"):
        Manifest.from_dict(old).validate(check_files=False)
    bad_op = dict(data, assemble=[dict(data["assemble"][0], op="sum")])
    with pytest.raises(GraphoptError, match="assemble entry .* is malformed"):
        Manifest.from_dict(bad_op).validate(check_files=False)
    unmade = dict(data, assemble=[dict(data["assemble"][0], parts=["nowhere"])])
    with pytest.raises(GraphoptError, match="from \\['nowhere'\\], which no partition produces"):
        Manifest.from_dict(unmade).validate(check_files=False)
    with pytest.raises(GraphoptError, match="malformed"):
        Manifest.from_dict(dict(data, assemble=[7]))
    Manifest.from_dict(data).save(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["assemble"] == data["assemble"]


@pytest.mark.slow  # starting a Ray runtime takes 20-60 s on a loaded 2-core machine
def test_assembled_run_is_bit_exact_on_ray(parts: tuple[Path, Any]) -> None:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")
    folder, _ = parts
    feeds = {"x": _x()}
    expected = run_model(lm_model(), feeds)
    ray.init(num_cpus=4, log_to_driver=False, include_dashboard=False)
    try:
        with PartitionedSession(folder, backend="ray") as session:
            actual = session.run(feeds)
            only = session.run(feeds, outputs=["logits"])
    finally:
        ray.shutdown()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])
    np.testing.assert_array_equal(only["logits"], expected["logits"])


def test_cli_plan_and_run_report_the_assembled_output(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from graphopt.cli import cli

    onnx.save(lm_model(), tmp_path / "lm.onnx")
    np.savez(tmp_path / "x.npz", x=_x())
    runner = CliRunner()
    plan = runner.invoke(cli, ["partition", str(tmp_path / "lm.onnx"), "--stages", "4", "--split-heavy",
                               "--dim", "N=4", "--plan-only"])
    assert plan.exit_code == 0, plan.output
    assert "output logits is assembled after the run" in plan.output
    assert not (tmp_path / "parts").exists()
    made = runner.invoke(cli, ["partition", str(tmp_path / "lm.onnx"), "-o", str(tmp_path / "parts"),
                               "--stages", "4", "--split-heavy", "--dim", "N=4"])
    assert made.exit_code == 0, made.output
    ran = runner.invoke(cli, ["run", str(tmp_path / "parts"), "--inputs", str(tmp_path / "x.npz"),
                              "--compare", str(tmp_path / "lm.onnx")], env={"COLUMNS": "200"})
    assert ran.exit_code == 0, ran.output
    assert "bit-exact" in ran.output and "logits" in ran.output
