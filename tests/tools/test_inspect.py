"""``graphopt inspect`` and the FLOP estimates behind it, checked against hand-computed figures."""

from __future__ import annotations

import json
import os

import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from graphopt import ir
from graphopt.analysis import estimate_flops
from graphopt.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "fixtures", "examples", "tiny_cnn.onnx")
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()

# MatMul [1,4]x[4,3]: 2*4*3 = 24 FLOPs; Add of the bias: 3; Conv 2->3 channels, 3x3 kernel, no
# padding, on [N,2,5,5] gives [N,3,3,3]: 2 * 27N outputs * (2*3*3) + 27N for the bias = 999N.
TINY = """
<ir_version: 8, opset_import: ["" : 17], producer_name: "handmade", producer_version: "1.0">
tiny (float[1, 4] a, float[N, 2, 5, 5] img) => (float[1, 3] y, float[N, 3, 3, 3] c)
<float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[3] b = {1, 2, 3},
 float[3, 2, 3, 3] k = {1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                        1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9},
 float[3] kb = {0.5, 0.5, 0.5}>
{
    m = MatMul(a, w)
    y = Add(m, b)
    c = Conv(img, k, kb)
}
"""


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _inspect_json(tmp_path, model_path: str, *extra: str) -> tuple[dict, str]:
    report = tmp_path / "inspect.json"
    code, out, err = _run("inspect", model_path, "--json", str(report), *extra)
    assert code == 0, err
    return json.loads(report.read_text()), out


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def test_tiny_model_all_sections_with_hand_computed_numbers(tmp_path):
    path = _save(onnx.parser.parse_model(TINY), tmp_path / "tiny.onnx")
    data, out = _inspect_json(tmp_path, path)
    for section in ("IR version 8", "opsets: ai.onnx 17", "producer: handmade 1.0", "inputs and outputs",
                    "[N,2,5,5]", "ops (3 nodes", "parameters: 72 in 4 initializer(s)",
                    "estimated FLOPs per inference: 1,026", "external data: none", "subgraphs: 0",
                    "model-local functions: 0", "runtime (cpu): onnxruntime loads the model"):
        assert section in out, section
    m = data["model"]
    assert m["ir_version"] == 8 and m["opset_imports"] == {"ai.onnx": 17}
    assert m["producer"] == "handmade" and m["producer_version"] == "1.0"
    assert m["file_bytes"] == os.path.getsize(path)
    assert data["inputs"] == [{"name": "a", "dtype": "float", "shape": [1, 4]},
                              {"name": "img", "dtype": "float", "shape": ["N", 2, 5, 5]}]
    assert data["outputs"][1] == {"name": "c", "dtype": "float", "shape": ["N", 3, 3, 3]}
    assert {(o["domain"], o["op"]): o["count"] for o in data["ops"]} == {
        ("ai.onnx", "MatMul"): 1, ("ai.onnx", "Add"): 1, ("ai.onnx", "Conv"): 1}
    params = data["parameters"]
    assert (params["tensors"], params["params"], params["bytes"]) == (4, 72, 288)
    by_op = {row["op"]: (row["tensors"], row["params"], row["bytes"]) for row in params["by_op"]}
    assert by_op == {"Conv": (2, 57, 228), "MatMul": (1, 12, 48), "Add": (1, 3, 12)}
    flops = data["flops"]
    assert flops["total"] == 24 + 3 + 999 and flops["dims"] == {"N": 1}
    assert flops["by_op"] == {"Conv": 999, "MatMul": 24, "Add": 3}
    assert flops["not_estimated"] == {}
    assert data["external_data"] == {"files": [], "tensors": 0, "bytes": 0}
    assert data["subgraphs"] == {"count": 0, "holders": []}
    assert data["functions"] == []
    rt = data["runtime"]
    assert rt["provider"] == "cpu" and rt["checked"] and rt["loads"]
    assert rt["unsupported"] == [] and rt["unknown_domains"] == []


def test_dim_binds_symbolic_sizes_in_flops(tmp_path):
    path = _save(onnx.parser.parse_model(TINY), tmp_path / "tiny.onnx")
    data, out = _inspect_json(tmp_path, path, "--dim", "N=2")
    assert data["flops"]["total"] == 24 + 3 + 2 * 999 and data["flops"]["dims"] == {"N": 2}
    assert "with N=2" in out
    code, _, err = _run("inspect", path, "--dim", "batch=2")
    assert code == 2 and "no symbolic input dim" in err


def test_example_model_flops_and_unused_weight():
    data = _example_info()
    # Activations are [1,8,16,16] = 2048 values. conv1: 2*2048*(3*3*3); bn: 2 per value;
    # conv2, conv3: 2*2048*(8*3*3) each; two Adds, two Relus, Sigmoid, GlobalAveragePool and
    # ReduceMean: one per value; fc MatMul [1,8]x[8,10]: 2*8*10; fc Add: 10.
    expected = 2 * 2048 * 27 + 2 * 2048 + 2 * (2 * 2048 * 72) + 7 * 2048 + 160 + 10
    assert data["flops"]["total"] == expected
    unused = next(row for row in data["parameters"]["by_op"] if row["op"] == "(unused)")
    assert unused == {"op": "(unused)", "tensors": 1, "params": 64 * 64, "bytes": 64 * 64 * 4}


def _example_info() -> dict:
    from graphopt._cli_inspect import inspect_model

    return inspect_model(EXAMPLE, dims={"batch": 1})


def test_external_data_is_reported(tmp_path):
    path = str(tmp_path / "ext.onnx")
    ir.save(ir.load(onnx.parser.parse_model(TINY)), path, external_data=True, size_threshold=0)
    data, out = _inspect_json(tmp_path, path)
    ext = data["external_data"]
    assert ext["tensors"] == 4 and ext["bytes"] == 288
    [entry] = ext["files"]
    assert entry["file"] == "ext.onnx.data" and entry["tensors"] == 4 and entry["bytes"] == 288
    assert entry["file_bytes"] == os.path.getsize(path + ".data")
    assert data["model"]["file_bytes"] == os.path.getsize(path) + os.path.getsize(path + ".data")
    assert data["parameters"]["bytes"] == 288 and data["flops"]["total"] == 1026
    assert "external data: 4 tensor(s)" in out and "ext.onnx.data" in out


def test_unknown_domain_node_is_not_runnable(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17, "my.domain" : 1]>
    g (float[2, 4] x) => (float[2, 4] y) { t = Relu(x)  y = my.domain.Foo(t) }
    """
    model = onnx.parser.parse_model(text)
    model.graph.node[1].name = "custom"
    path = _save(model, tmp_path / "custom.onnx")
    data, out = _inspect_json(tmp_path, path)
    rt = data["runtime"]
    assert rt["loads"] is False and "my.domain" in rt["error"]
    assert rt["unsupported"] == [{"node": "custom", "op": "my.domain.Foo",
                                  "reason": "op not registered in onnxruntime"}]
    [unknown] = rt["unknown_domains"]
    assert unknown["node"] == "custom" and unknown["op"] == "my.domain.Foo"
    assert data["flops"]["not_estimated"] == {
        "my.domain.Foo": {"count": 1, "reason": "no FLOP formula for this op"}}
    assert data["flops"]["total"] == 8  # the Relu
    assert "cannot run" in out and "unknown to the runtime" in out and "my.domain.Foo" in out


def test_missing_cpu_kernel_names_the_node(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (int16[2, 4] x) => (int16[2, 4] y) { y = Relu(x) }
    """
    model = onnx.parser.parse_model(text)
    model.graph.node[0].name = "int_relu"
    data, _ = _inspect_json(tmp_path, _save(model, tmp_path / "m.onnx"))
    [bad] = data["runtime"]["unsupported"]
    assert bad["node"] == "int_relu" and bad["op"] == "Relu" and "no CPU kernel" in bad["reason"]
    assert data["runtime"]["unknown_domains"] == []


def test_subgraphs_and_functions_are_listed(tmp_path):
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then_body", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else_body", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    square = helper.make_function("local", "Square", ["v"], ["out"],
                                  [helper.make_node("Mul", ["v", "v"], ["out"])],
                                  [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("If", ["cond"], ["r"], then_branch=then_g, else_branch=else_g, name="branch"),
             helper.make_node("Square", ["r"], ["y"], domain="local", name="sq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("local", 1)],
                              functions=[square], ir_version=8)
    data, out = _inspect_json(tmp_path, _save(model, tmp_path / "flow.onnx"))
    subs = data["subgraphs"]
    assert subs["count"] == 2
    assert {(h["node"], h["op"], h["attribute"], h["graph"], h["nodes"]) for h in subs["holders"]} == {
        ("branch", "If", "then_branch", "then_body", 1), ("branch", "If", "else_branch", "else_body", 1)}
    assert data["functions"] == [{"function": "local::Square", "nodes": 1, "calls": 1}]
    # Nodes of both branches count in the histogram; the function's body does not.
    assert {o["op"]: o["count"] for o in data["ops"]} == {"If": 1, "Square": 1, "Relu": 1, "Neg": 1}
    not_estimated = data["flops"]["not_estimated"]
    assert not_estimated["If"]["reason"].startswith("control flow")
    assert not_estimated["local.Square"]["reason"] == "model-local function"
    # A model-local function in its own domain is runnable: onnxruntime inlines it.
    assert data["runtime"]["unknown_domains"] == [] and data["runtime"]["loads"] is True
    assert "subgraphs: 2" in out and "local::Square: 1 nodes, called 1 time(s)" in out


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_check_is_skipped_with_a_note(tmp_path):
    data, out = _inspect_json(tmp_path, EXAMPLE, "--provider", "cuda")
    rt = data["runtime"]
    assert rt["checked"] is False and rt["loads"] is None
    assert "CUDA execution provider is not available" in rt["note"]
    assert "runtime (cuda): not checked" in out


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_check_runs_where_available(tmp_path):
    data, _ = _inspect_json(tmp_path, EXAMPLE, "--provider", "cuda")
    assert data["runtime"]["checked"] is True and data["runtime"]["loads"] is True


def test_bad_model_path_exits_2(tmp_path):
    code, out, err = _run("inspect", str(tmp_path / "none.onnx"))
    assert code == 2 and out == "" and "none.onnx" in err and err.count("\n") == 1


# -- FLOP formulas, one op at a time ----------------------------------------------------------------

def _flops_of(text: str, **dims: int) -> int:
    report = estimate_flops(onnx.parser.parse_model(text), dims=dims)
    assert report.not_estimated() == {}, report.not_estimated()
    return report.total


@pytest.mark.parametrize("body, inputs, outputs, expected", [
    # Gemm with transA: A is [K=4, M=3], B [4, 5]: 2*3*5*4 + 15 for C.
    ("y = Gemm<transA = 1>(a, b, c)", "float[4, 3] a, float[4, 5] b, float[5] c", "float[3, 5] y", 135),
    # Batched MatMul [2,3,4] x [4,5]: 2 * 2*3*5 outputs * 4.
    ("y = MatMul(a, b)", "float[2, 3, 4] a, float[4, 5] b", "float[2, 3, 5] y", 240),
    # Einsum spelling the same product.
    ('y = Einsum<equation = "bij,bjk->bik">(a, b)', "float[2, 3, 4] a, float[2, 4, 5] b",
     "float[2, 3, 5] y", 240),
    # ConvTranspose: X [1,2,3,3], W [2,4,2,2]: 2 * 18 inputs * 16 weights each, + 64 bias.
    ("y = ConvTranspose(x, w, b)", "float[1, 2, 3, 3] x, float[2, 4, 2, 2] w, float[4] b",
     "float[1, 4, 4, 4] y", 2 * 18 * 16 + 64),
    # MaxPool 2x2, stride 1 on 4x4: 9 outputs * 4.
    ("y = MaxPool<kernel_shape = [2, 2]>(x)", "float[1, 1, 4, 4] x", "float[1, 1, 3, 3] y", 36),
    ("y = Softmax(x)", "float[2, 5] x", "float[2, 5] y", 50),
    ("y = LayerNormalization(x, s, b)", "float[2, 5] x, float[5] s, float[5] b", "float[2, 5] y", 70),
    ("y = ReduceMean<keepdims = 0>(x)", "float[3, 4] x", "float y", 12),
    ("y = Sum(a, b, c)", "float[3] a, float[3] b, float[3] c", "float[3] y", 6),
    ("y = Reshape(x, s)", "float[2, 6] x, int64[2] s", "float[3, 4] y", 0),
])
def test_flop_formulas(body, inputs, outputs, expected):
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g ({inputs}) => ({outputs}) {{ {body} }}
    """
    assert _flops_of(text) == expected


def test_flops_of_attention():
    # Q [1,2,3,4], K [1,2,5,4], V [1,2,5,6]: 30 scores; 2*30*4 + 2*30*6 + 5*30.
    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[1, 2, 3, 4] q, float[1, 2, 5, 4] k, float[1, 2, 5, 6] v) => (float[1, 2, 3, 6] y)
    { y = Attention(q, k, v) }
    """
    assert _flops_of(text) == 240 + 360 + 150


def test_unknown_shapes_are_listed_not_guessed():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, int64[2] shape) => (float[M, K] y)
    <float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}>
    { r = Reshape(x, shape)  y = MatMul(r, w) }
    """
    report = estimate_flops(onnx.parser.parse_model(text))
    assert report.not_estimated() == {"MatMul": {"count": 1, "reason": "shape unknown after shape inference"}}
    assert report.total == 0
