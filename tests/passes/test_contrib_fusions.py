"""The contrib fusions beyond their golden cases: targets, exporter forms, pipelines, load checks.

Goldens (``fixtures/contrib-*``) hold one case per rule and per must-not-fire reason. Here:

* every golden output loads and runs in onnxruntime's CPU provider with its optimizations on and
  off (contrib ops included);
* with ``--target cuda`` the rules fire exactly where the CUDA kernel table allows;
* encoder and decoder blocks written the way ``torch.onnx.export`` writes HF BERT and GPT-2
  (TorchScript exporter: Shape/Gather/Concat head splits, decomposed LayerNorm, Gemm-based
  Conv1D with Split, combined causal + padding masks) fuse end to end and keep their outputs.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir
from graphopt.passes.contrib.fused_conv import FUSED_CONV_RULES
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.rewrite import Rule, apply_rules, format_why_not, why_not
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model
from graphopt.testing import collect_cases, load_case

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
CONTRIB_CASES = [p for p in collect_cases(FIXTURES) if p.parent.name.startswith("contrib-")]
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
RTOL, ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """Built-in passes only."""
    return PassRegistry.default(plugins=False)


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


# -- golden outputs load everywhere ------------------------------------------------------------
def _session(model: onnx.ModelProto, optimize: bool) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("path", CONTRIB_CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fused_output_runs_on_cpu_at_every_level(path: Path, registry: PassRegistry) -> None:
    """Every golden output loads on the CPU provider and matches the input, optimizations on or off."""
    case = load_case(path)
    output = ir.to_proto(_rerun(case, registry))
    source = onnx.parser.parse_model(case.input_text)
    reference = make_session(source)
    feeds = random_inputs(reference, seed=case.seed, dims={"N": 3, "B": 2, "S": 3})
    expected = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds)))
    for optimize in (False, True):
        session = _session(output, optimize)
        actual = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        comparison = compare_outputs(expected, actual, rtol=case.rtol, atol=max(case.atol, 1e-5))
        assert comparison.ok, f"optimize={optimize}: {comparison.summary()}"
    contrib = [n for n in output.graph.node if n.domain == "com.microsoft"]
    if contrib:
        imports = {o.domain: o.version for o in output.opset_import}
        assert imports.get("com.microsoft") == 1
    if path.parent.name != "contrib-residual-sum":  # it writes the standard Sum, on purpose
        assert bool(contrib) == (not case.expect_unchanged)


def _rerun(case: Any, registry: PassRegistry, target: str = "cpu") -> ir.Model:
    model = ir.load(onnx.parser.parse_model(case.input_text))
    PassManager(case.pipeline, PassContext(target=target, registry=registry)).run(model)
    return model


# -- CUDA target -----------------------------------------------------------------------------------
#: Golden cases whose fusion the CUDA kernel table refuses (FusedConv takes only Relu on CUDA), and
#: contrib-residual-sum, which keeps the residual Add apart on the CPU target only.
CUDA_REFUSED = {"contrib-fused-conv/" + n for n in (
    "sigmoid", "tanh", "leaky_relu", "hard_sigmoid_defaults", "clip_bounds_as_inputs", "clip_max_only",
    "clip_opset6_attributes")} | {"contrib-residual-sum/post_norm_residual"}


@pytest.mark.parametrize("path", [p for p in CONTRIB_CASES if not load_case(p).expect_unchanged],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_cuda_target_fires_per_the_cuda_table(path: Path, registry: PassRegistry) -> None:
    """With target cuda every float32 fusion fires as on the CPU, except FusedConv activations other than Relu."""
    case = load_case(path)
    cpu = ir.print_model(_rerun(case, registry), canonical=True)
    cuda = ir.print_model(_rerun(case, registry, target="cuda"), canonical=True)
    name = f"{path.parent.name}/{path.stem}"
    if name in CUDA_REFUSED:
        assert "com.microsoft" not in cuda
        assert cuda == ir.print_model(ir.load(onnx.parser.parse_model(case.input_text)), canonical=True)
    else:
        assert cuda == cpu


def test_cuda_refusal_is_explained(registry: PassRegistry) -> None:
    """why-not names the target and the activation its FusedConv kernel lacks."""
    case = load_case(FIXTURES / "contrib-fused-conv" / "sigmoid.onnxtest")
    model = ir.load(onnx.parser.parse_model(case.input_text))
    PassManager("infer-shapes", PassContext(registry=registry)).run(model)
    rule = FUSED_CONV_RULES.get("fused-conv-sigmoid")
    assert rule is not None
    text = format_why_not(why_not(model, rule, PassContext(target="cuda")))
    assert "target 'cuda'" in text and "Sigmoid" in text
    assert apply_rules(model, [rule], PassContext(target="cuda")) == {}
    assert apply_rules(model, [rule], PassContext(target="cpu")) == {"fused-conv-sigmoid": 1}


@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider is not available")
def test_cuda_output_runs_on_cuda(registry: PassRegistry) -> None:
    case = load_case(FIXTURES / "contrib-fused-conv" / "relu.onnxtest")
    output = ir.to_proto(_rerun(case, registry, target="cuda"))
    source = onnx.parser.parse_model(case.input_text)
    feeds = random_inputs(make_session(source))
    expected = run_model(source, feeds)
    actual = run_model(output, feeds, target="cuda")
    assert compare_outputs(expected, actual, rtol=1e-3, atol=1e-4).ok


# -- exporter forms end to end ---------------------------------------------------------------------
class _Graph:
    """A tiny onnx.helper graph builder (unique names, constants as initializers)."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: Any) -> Any:
        names = [f"{op_type.lower()}_{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, *shape: int) -> str:
        return self.const(self.rng.standard_normal(shape) * 0.3)

    def dim(self, x: str, axis: int) -> str:
        gathered = self.op("Gather", self.op("Shape", x), self.const(axis, np.int64), axis=0)
        return self.op("Unsqueeze", gathered, self.const([0], np.int64))

    def layer_norm(self, x: str, hidden: int) -> str:
        mean = self.op("ReduceMean", x, axes=[-1])
        d = self.op("Sub", x, mean)
        var = self.op("ReduceMean", self.op("Pow", d, self.const(2.0)), axes=[-1])
        n = self.op("Div", d, self.op("Sqrt", self.op("Add", var, self.const(1e-5))))
        return self.op("Add", self.op("Mul", n, self.const(1 + self.rng.standard_normal(hidden) * 0.1)),
                       self.const(self.rng.standard_normal(hidden) * 0.1))

    def split_heads(self, x: str, heads: int, size: int, perm: list[int]) -> str:
        shape = self.op("Concat", self.dim(x, 0), self.dim(x, 1), self.const([heads], np.int64),
                        self.const([size], np.int64), axis=0)
        return self.op("Transpose", self.op("Reshape", x, shape), perm=perm)

    def merge_heads(self, context: str, hidden: int) -> str:
        t = self.op("Transpose", context, perm=[0, 2, 1, 3])
        shape = self.op("Concat", self.dim(t, 0), self.dim(t, 1), self.const([hidden], np.int64), axis=0)
        return self.op("Reshape", t, shape)

    def model(self, inputs: list[onnx.ValueInfoProto], output: str, hidden: int) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [output], ["out"]))
        graph = helper.make_graph(self.nodes, "g", inputs,
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", hidden])],
                                  self.inits)
        return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 14)])


def bert_torchscript(layers: int = 2, hidden: int = 8, heads: int = 2, ffn: int = 16) -> onnx.ModelProto:
    """HF BERT (eager attention) as the TorchScript exporter writes it at opset 14."""
    g = _Graph()
    size = hidden // heads
    h = g.layer_norm(g.op("Gather", g.weight(50, hidden), "input_ids"), hidden)
    mask = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2], np.int64)), to=TensorProto.FLOAT)
    mask = g.op("Mul", g.op("Sub", g.const(1.0), mask), g.const(-10000.0))
    for _ in range(layers):
        q, k, v = (g.op("Add", g.op("MatMul", h, g.weight(hidden, hidden)), g.weight(hidden)) for _ in range(3))
        scores = g.op("MatMul", g.split_heads(q, heads, size, [0, 2, 1, 3]), g.split_heads(k, heads, size, [0, 2, 3, 1]))
        probs = g.op("Softmax", g.op("Add", g.op("Div", scores, g.const(np.sqrt(size))), mask), axis=-1)
        context = g.op("MatMul", probs, g.split_heads(v, heads, size, [0, 2, 1, 3]))
        attention = g.op("Add", g.op("MatMul", g.merge_heads(context, hidden), g.weight(hidden, hidden)), g.weight(hidden))
        h = g.layer_norm(g.op("Add", attention, h), hidden)
        up = g.op("Add", g.op("MatMul", h, g.weight(hidden, ffn)), g.weight(ffn))
        erf = g.op("Erf", g.op("Div", up, g.const(1.4142135)))
        act = g.op("Mul", g.op("Mul", up, g.op("Add", erf, g.const(1.0))), g.const(0.5))
        down = g.op("Add", g.op("MatMul", act, g.weight(ffn, hidden)), g.weight(hidden))
        h = g.layer_norm(g.op("Add", down, h), hidden)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])
    attention_mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])
    return g.model([ids, attention_mask], h, hidden)


def gpt2_torchscript(layers: int = 2, hidden: int = 8, heads: int = 2) -> onnx.ModelProto:
    """HF GPT-2 (pre-norm, Conv1D as Reshape+Gemm+Reshape, one QKV Split, gelu_new, causal+padding mask)."""
    g = _Graph(1)
    size = hidden // heads

    def conv1d(x: str, fan_in: int, fan_out: int) -> str:
        flat = g.op("Reshape", x, g.const([-1, fan_in], np.int64))
        out = g.op("Gemm", flat, g.weight(fan_in, fan_out), g.weight(fan_out))
        shape = g.op("Concat", g.dim(x, 0), g.dim(x, 1), g.const([fan_out], np.int64), axis=0)
        return g.op("Reshape", out, shape)

    positions = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), g.op("Gather", g.op("Shape", "input_ids"),
                                                                          g.const(1, np.int64), axis=0),
                                       g.const(1, np.int64)), g.const([0], np.int64))
    x = g.op("Add", g.op("Gather", g.weight(50, hidden), "input_ids"), g.op("Gather", g.weight(16, hidden), positions))
    # The combined causal and padding mask of transformers >= 4.36: additive, [B, 1, S, S].
    rows = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), g.op("Gather", g.op("Shape", "input_ids"),
                                                                      g.const(1, np.int64), axis=0),
                                  g.const(1, np.int64)), g.const([1], np.int64))
    cols = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), g.op("Gather", g.op("Shape", "input_ids"),
                                                                      g.const(1, np.int64), axis=0),
                                  g.const(1, np.int64)), g.const([0], np.int64))
    causal = g.op("LessOrEqual", cols, rows)
    padding = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2], np.int64)), to=TensorProto.BOOL)
    allowed = g.op("And", causal, padding)
    mask = g.op("Where", allowed, g.const(0.0), g.const(np.finfo(np.float32).min))
    for _ in range(layers):
        qkv = conv1d(g.layer_norm(x, hidden), hidden, 3 * hidden)
        q, k, v = g.op("Split", qkv, g.const([hidden] * 3, np.int64), outputs=3, axis=2)
        scores = g.op("MatMul", g.split_heads(q, heads, size, [0, 2, 1, 3]), g.split_heads(k, heads, size, [0, 2, 3, 1]))
        probs = g.op("Softmax", g.op("Add", g.op("Mul", scores, g.const(1 / np.sqrt(size))), mask), axis=-1)
        context = g.op("MatMul", probs, g.split_heads(v, heads, size, [0, 2, 1, 3]))
        x = g.op("Add", conv1d(g.merge_heads(context, hidden), hidden, hidden), x)
        up = conv1d(g.layer_norm(x, hidden), hidden, 4 * hidden)
        cube = g.op("Mul", g.op("Pow", up, g.const(3.0)), g.const(0.044715))
        inner = g.op("Mul", g.op("Add", up, cube), g.const(np.sqrt(2 / np.pi)))
        act = g.op("Mul", g.op("Mul", up, g.const(0.5)), g.op("Add", g.op("Tanh", inner), g.const(1.0)))
        x = g.op("Add", x, conv1d(act, 4 * hidden, hidden))
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])
    attention_mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])
    return g.model([ids, attention_mask], g.layer_norm(x, hidden), hidden)


def _feeds(batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - 2:] = 0
    return {"input_ids": rng.integers(0, 16, (batch, seq)).astype(np.int64), "attention_mask": mask}


def _optimized(model: onnx.ModelProto, pipeline: str, registry: PassRegistry, target: str = "cpu") -> onnx.ModelProto:
    graph = ir.load(model)
    PassManager(pipeline, PassContext(opt_level=3, target=target, registry=registry)).run(graph)
    ir.verify(graph)
    return ir.to_proto(graph)


def _assert_same_outputs(source: onnx.ModelProto, output: onnx.ModelProto) -> None:
    feeds = _feeds()
    comparison = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=RTOL, atol=ATOL)
    assert comparison.ok, comparison.summary()


def test_bert_torchscript_form_fuses_at_o3(registry: PassRegistry) -> None:
    source = bert_torchscript()
    output = _optimized(source, "O3", registry)
    ops = _ops(output)
    assert ops["com.microsoft::MultiHeadAttention"] == 2
    assert ops["com.microsoft::BiasGelu"] == 2
    assert ops["Softmax"] == 0 and ops["Erf"] == 0 and ops["Transpose"] == 0
    assert ops["com.microsoft::SkipLayerNormalization"] == 0  # not in -O3: measured slower on the CPU
    _assert_same_outputs(source, output)


def test_bert_skip_layer_norm_when_enabled(registry: PassRegistry) -> None:
    """The residual LayerNorms (not the embedding one) fuse, with the dense bias moved in."""
    source = bert_torchscript()
    output = _optimized(source, "O3,contrib-skip-layer-norm,eliminate-dead-code", registry)
    skip = [n for n in output.graph.node if n.op_type == "SkipLayerNormalization"]
    assert len(skip) == 4
    assert all(len(n.input) == 5 for n in skip)  # input, skip, gamma, beta, bias
    assert _ops(output)["ReduceMean"] == 2  # only the embedding LayerNorm stays decomposed
    _assert_same_outputs(source, output)


def test_gpt2_torchscript_form_fuses_causal_attention(registry: PassRegistry) -> None:
    source = gpt2_torchscript()
    output = _optimized(source, "O3", registry)
    ops = _ops(output)
    assert ops["com.microsoft::MultiHeadAttention"] == 2
    assert ops["com.microsoft::FastGelu"] == 2
    assert ops["Softmax"] == 0
    _assert_same_outputs(source, output)


def test_gpt2_pre_norm_sums_come_from_the_fused_op(registry: PassRegistry) -> None:
    """Pre-norm: each residual sum feeds the next LayerNorm and the next residual Add."""
    source = gpt2_torchscript()
    output = _optimized(source, "O3,contrib-skip-layer-norm,eliminate-dead-code", registry)
    skip = [n for n in output.graph.node if n.op_type == "SkipLayerNormalization"]
    assert len(skip) == 4  # ln_2 and ln_1 of the next layer, and ln_f; the first ln_1 reads wte + wpe
    shared = [n for n in skip if len(n.output) == 4 and n.output[3]]
    assert len(shared) == 3
    _assert_same_outputs(source, output)


def test_o3_runs_the_measured_contrib_passes_only(registry: PassRegistry) -> None:
    o3 = registry.pipeline("O3")
    expanded = ",".join(step.name for step in _flatten(o3, registry))
    for name in ("contrib-attention", "contrib-gelu", "contrib-fused-conv", "contrib-fused-matmul",
                 "dedup-transposed-initializers"):
        assert name in expanded
    assert "contrib-skip-layer-norm" not in expanded
    o2 = ",".join(step.name for step in _flatten(registry.pipeline("O2"), registry))
    assert "contrib-" not in o2 and "dedup-transposed-initializers" in o2


def _flatten(text: str, registry: PassRegistry) -> list[Any]:
    from graphopt.pipeline import parse_pipeline

    steps, out = list(parse_pipeline(text, registry)), []
    while steps:
        step = steps.pop(0)
        if hasattr(step, "steps"):
            steps[:0] = list(step.steps)
        else:
            out.append(step)
    return out


def test_bisect_limit_stops_after_one_fusion(registry: PassRegistry) -> None:
    source = bert_torchscript()
    graph = ir.load(source)
    PassManager("infer-shapes", PassContext(registry=registry)).run(graph)
    ctx = PassContext(registry=registry, bisect_limit=1)
    PassManager("contrib-gelu", ctx).run(graph)
    assert sum(n.op_type in ("Gelu", "BiasGelu") for n in graph.graph) == 1


def test_dead_shape_readers_do_not_block_a_match() -> None:
    """An intermediate read only by nodes that die with the match (a Shape chain computing the
    matched Reshape's target) does not make the match unsafe."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,6] x) => (float[2,6] y) {
        t = Relu(x)
        s = Shape(t)
        r = Reshape(t, s)
        y = Neg(r)
    }"""
    model = ir.load(onnx.parser.parse_model(text))
    rule = Rule("neg-reshape-relu", lambda op, x, shape: op.Neg(op.Reshape(op.Relu(x), shape)),
                lambda op, x: op.Neg(op.Relu(x)))
    assert apply_rules(model, [rule], PassContext()) == {"neg-reshape-relu": 1}
    ir.verify(model)
    feeds = {"x": np.arange(-6, 6, dtype=np.float32).reshape(2, 6)}
    out = run_model(ir.to_proto(model), feeds)["y"]
    np.testing.assert_array_equal(out, -np.maximum(feeds["x"], 0))
