"""Writing partitions: each stage is a model of its own, and a run of them equals the whole model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir
from graphopt.runtime import Manifest, make_session, max_ir_version, run_model


def run_partitions(folder: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A sequential executor: partitions in manifest order, each fed from graph inputs and earlier ones."""
    manifest = Manifest.load(folder)
    env = dict(feeds)
    for part in manifest.partitions:
        session = make_session(str(manifest.partition_path(part)))
        declared = [i.name for i in session.get_inputs()]
        assert sorted(declared) == sorted(part.inputs)
        env.update(zip(part.outputs, session.run(part.outputs, {k: env[k] for k in part.inputs})))
    for recipe in manifest.assemble:  # outputs the caller joins from partition outputs
        env[recipe["output"]] = np.concatenate([env[p] for p in recipe["parts"]], axis=recipe["axis"])
    return {t.name: env[t.name] for t in manifest.outputs}


def encoder(layers: int = 4, hidden: int = 32, seed: int = 0) -> onnx.ModelProto:
    """Transformer-like layers over ``x[batch, seq, hidden]``; a mask computed from ``Shape(x)``
    (a small shape subgraph) is read by every layer; a large embedding-like constant is read twice."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([0.5], np.float32), "half")]
    nodes = [helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Gather", ["sx", "one"], ["seq"], axis=0),
             helper.make_node("Range", ["zero", "seq", "one"], ["pos"]),
             helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["posf", "half"], ["mask"])]
    inits += [numpy_helper.from_array(np.array(1, np.int64), "one"),
              numpy_helper.from_array(np.array(0, np.int64), "zero")]
    current = "x"
    for i in range(layers):
        for name, shape in ((f"w1_{i}", (hidden, 2 * hidden)), (f"w2_{i}", (2 * hidden, hidden))):
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name))
        inits.append(numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), f"g_{i}"))
        nodes += [helper.make_node("MatMul", [current, f"w1_{i}"], [f"a{i}"]),
                  helper.make_node("Erf", [f"a{i}"], [f"e{i}"]),
                  helper.make_node("MatMul", [f"e{i}", f"w2_{i}"], [f"b{i}"]),
                  helper.make_node("Transpose", [f"b{i}"], [f"bt{i}"], perm=[0, 2, 1]),
                  helper.make_node("Add", [f"bt{i}", "mask"], [f"bm{i}"]),
                  helper.make_node("Transpose", [f"bm{i}"], [f"c{i}"], perm=[0, 2, 1]),
                  helper.make_node("Add", [f"c{i}", current], [f"r{i}"]),
                  helper.make_node("LayerNormalization", [f"r{i}", f"g_{i}"], [f"h{i}"], axis=-1)]
        current = f"h{i}"
    nodes.append(helper.make_node("ReduceMean", [current], ["pooled"], axes=[1], keepdims=0))
    graph = helper.make_graph(
        nodes, "encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", "seq", hidden]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


FEEDS = {"x": np.random.default_rng(7).standard_normal((2, 6, 32)).astype(np.float32)}


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_stage_split_is_bit_exact(tmp_path: Path, stages: int) -> None:
    model = encoder()
    result = graphopt.partition(model, tmp_path / "parts", stages=stages, dims={"batch": 2, "seq": 6})
    manifest = result.manifest
    assert manifest is not None and len(manifest.partitions) == stages
    assert sorted(os.listdir(tmp_path / "parts")) == sorted(
        ["manifest.json"] + [f"stage{k}.onnx" for k in range(stages)])
    expected = run_model(model, FEEDS)
    got = run_partitions(tmp_path / "parts", FEEDS)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)  # bit-exact on CPU
    # the manifest reads back, lists a topological order, and depends only on earlier stages
    loaded = Manifest.load(tmp_path / "parts")
    assert [p.name for p in loaded.partitions] == [f"stage{k}" for k in range(stages)]
    assert all(d < p.id for p in loaded.partitions for d in p.depends_on)


def test_small_shape_subgraph_is_duplicated_not_sent(tmp_path: Path) -> None:
    result = graphopt.partition(encoder(), tmp_path / "parts", stages=3, dims={"batch": 2, "seq": 6})
    manifest = result.manifest
    sent = {t.tensor for t in manifest.transfers if t.source >= 0}
    assert not sent & {"mask", "posf", "pos", "seq", "sx"}
    # every stage after the first recomputes the mask from its own Shape of a local value or x
    for part in manifest.partitions[1:]:
        model = onnx.load(str(manifest.partition_path(part)))
        produced = {o for n in model.graph.node for o in n.output}
        assert "mask" in produced
        assert manifest.meta["cloned_nodes"][part.name] >= 4
    assert manifest.meta["cut_bytes"] == result.plan.cut_bytes
    # two stages of two layers each: only the hidden state crosses, one [2, 6, 32] float tensor
    two = graphopt.partition(encoder(), tmp_path / "two", stages=2, dims={"batch": 2, "seq": 6}).manifest
    assert [(t.tensor, t.bytes) for t in two.transfers if t.source >= 0] == [("h1", 2 * 6 * 32 * 4)]
    assert two.meta["cut_bytes"] == two.meta["chain_cut_bytes"] == 2 * 6 * 32 * 4


def test_partition_models_keep_types_and_fit_the_runtime(tmp_path: Path) -> None:
    model = encoder()
    model.ir_version = 11
    result = graphopt.partition(model, tmp_path / "parts", stages=2)
    manifest = result.manifest
    second = onnx.load(str(manifest.partition_path(manifest.partitions[1])))
    onnx.checker.check_model(second, full_check=True)
    assert second.ir_version <= max_ir_version()
    received = {i.name: i for i in second.graph.input}
    hidden = next(name for name in received if name != "x")
    dims = [d.dim_param or d.dim_value for d in received[hidden].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", 32]  # symbolic dims preserved across the cut
    assert {t.name for t in manifest.inputs} == {"x"}
    assert [t.dtype for t in manifest.outputs] == ["float32", "float32"]
    # weights live with the stage that reads them, none twice across stages here
    first = onnx.load(str(manifest.partition_path(manifest.partitions[0])))
    names = [{t.name for t in m.graph.initializer if t.name.startswith("w")} for m in (first, second)]
    assert names[0] and names[1] and not names[0] & names[1]
    # only the small constants of the recomputed mask (half, one, zero: 20 bytes) are stored twice
    assert sum(p.weight_bytes for p in manifest.partitions) == result.plan.total_weight_bytes + 4 + 8 + 8


def test_input_model_is_not_modified(tmp_path: Path) -> None:
    model = encoder()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    proto_before = model.SerializeToString()
    graphopt.partition(str(path), tmp_path / "a", stages=2)
    graphopt.partition(model, tmp_path / "b", stages=2)
    graphopt.partition(ir.load(model), tmp_path / "c", stages=2)
    assert path.read_bytes() == before and model.SerializeToString() == proto_before


def test_branches_run_concurrently_and_match(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    inits, nodes, ends = [], [], []
    for t in range(3):
        current = "x"
        for d in range(2):
            inits.append(numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"t{t}w{d}"))
            nodes += [helper.make_node("MatMul", [current, f"t{t}w{d}"], [f"t{t}m{d}"]),
                      helper.make_node("Tanh", [f"t{t}m{d}"], [f"t{t}h{d}"])]
            current = f"t{t}h{d}"
        # each tower reshapes by a shape computed from the input (a shape subgraph inside it)
        nodes += [helper.make_node("Shape", ["x"], [f"t{t}s"]),
                  helper.make_node("Reshape", [current, f"t{t}s"], [f"t{t}r"])]
        ends.append(f"t{t}r")
    nodes.append(helper.make_node("Concat", ends, ["y"], axis=1))
    graph = helper.make_graph(nodes, "towers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = graphopt.partition(model, tmp_path / "parts", branches=True, devices="cpu")
    kinds = [p.kind for p in result.manifest.partitions]
    assert kinds == ["branch", "branch", "branch", "stage"]
    assert all(p.depends_on == [] and p.inputs == ["x"] for p in result.manifest.partitions[:3])
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    np.testing.assert_array_equal(run_partitions(tmp_path / "parts", feeds)["y"], run_model(model, feeds)["y"])


def test_partitioned_session_runs_the_written_folder(tmp_path: Path) -> None:
    from graphopt.runtime import PartitionedSession

    model = encoder()
    graphopt.partition(model, tmp_path / "parts", stages=3)
    with PartitionedSession(tmp_path / "parts") as session:
        got = session.run(FEEDS)
    for name, value in run_model(model, FEEDS).items():
        np.testing.assert_array_equal(got[name], value)


def test_output_folder_is_never_partial(tmp_path: Path) -> None:
    from graphopt.errors import GraphoptError

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(GraphoptError, match="already exists"):
        graphopt.partition(encoder(), tmp_path / "taken", stages=2)
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]
    with pytest.raises(GraphoptError, match="at most"):
        graphopt.partition(encoder(layers=1), tmp_path / "new", stages=500)
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    graphopt.partition(encoder(), tmp_path / "taken", stages=2, overwrite=True)
    assert "keep.txt" not in os.listdir(tmp_path / "taken")
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_split_heavy_balances_a_dominant_node_bit_exactly(tmp_path: Path) -> None:
    # three light layers and a head that alone holds ~70% of the FLOPs (like GPT-2's LM head)
    rng = np.random.default_rng(5)
    inits, nodes, current = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32) * 0.2, f"w{i}"))
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        current = f"h{i}"
    inits += [numpy_helper.from_array(rng.standard_normal((256, 32)).astype(np.float32), "head"),
              numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), "head_b")]
    nodes.append(helper.make_node("Gemm", [current, "head", "head_b"], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 256])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    whole = graphopt.partition(model, stages=4, plan_only=True).plan
    assert whole.balance_ratio() > 2.5  # the head alone is far over an even share
    result = graphopt.partition(model, tmp_path / "parts", stages=4, split_heavy=True)
    assert result.plan.balance_ratio() < 1.3
    heads = [p for p in result.manifest.partitions
             if any(n.op_type == "Gemm" for n in onnx.load(str(result.manifest.partition_path(p))).graph.node)]
    assert len(heads) >= 2  # the head's column blocks run in several stages
    feeds = {"x": rng.standard_normal((4, 32)).astype(np.float32)}
    np.testing.assert_array_equal(run_partitions(tmp_path / "parts", feeds)["logits"],
                                  run_model(model, feeds)["logits"])


def _chain_model(nodes: list, outputs: list, inits: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              outputs, initializer=inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("stages", [2, 3])
def test_initializer_named_as_graph_output_is_emitted(tmp_path: Path, stages: int) -> None:
    """No partition produced an output that is an initializer: the manifest was refused."""
    const = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4), "c")
    model = _chain_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
                          helper.make_node("Exp", ["b"], ["y"])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                          helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])], [const])
    graphopt.partition(model, tmp_path / "parts", stages=stages)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    expected, actual = run_model(model, feeds), run_partitions(tmp_path / "parts", feeds)
    assert list(actual) == ["y", "c"]
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


def test_sequence_value_crossing_a_cut_keeps_its_type(tmp_path: Path) -> None:
    """A sequence crossing partitions has no tensor element type: emission failed with 'unknown'."""
    model = _chain_model([helper.make_node("Relu", ["x"], ["a"]),
                          helper.make_node("SequenceConstruct", ["a", "a"], ["s"]),
                          helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=0),
                          helper.make_node("Exp", ["y"], ["z"])],
                         [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["M", 4])])
    graphopt.partition(model, tmp_path / "parts", stages=4)
    manifest = Manifest.load(tmp_path / "parts")
    assert any("s" in part.inputs for part in manifest.partitions)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run_partitions(tmp_path / "parts", feeds)["z"], run_model(model, feeds)["z"])
