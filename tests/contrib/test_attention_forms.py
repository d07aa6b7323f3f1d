"""contrib-attention runs only the ``mha`` rules of the forms a model holds, and shares its proofs.

The pass scans the Reshapes once for the op types along context, probabilities and scores
(``_forms_at``) and applies the normalizations plus the rules of those forms only. These tests
check that this changes nothing but the time: on every golden input the pass gives exactly
what the full rule set gives, a model with no attention compiles no ``mha`` rule, and a deep
residual stack (whose dim proofs walk back through every earlier layer, sharing one memo
across rewrites) fuses every layer and keeps its outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir
from graphopt.passes.contrib import attention
from graphopt.passes.contrib.attention import ContribAttention, attention_rules
from graphopt.pipeline import PassContext, PassManager
from graphopt.rewrite import apply_rules
from graphopt.runtime import compare_outputs, run_model
from graphopt.testing import collect_cases, load_case

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
ATTENTION_CASES = [p for p in collect_cases(FIXTURES) if p.parent.name == "contrib-attention"]
RTOL, ATOL = 1e-4, 1e-5


def _shaped(text: str) -> ir.Model:
    model = ir.load(onnx.parser.parse_model(text))
    PassManager("infer-shapes", PassContext(opt_level=3)).run(model)
    return model


@pytest.mark.parametrize("path", ATTENTION_CASES, ids=lambda p: p.stem)
def test_selected_rules_do_what_the_full_rule_set_does(path: Path) -> None:
    """On every golden input, the pass and the full 82-rule set give the same graph and counters."""
    case = load_case(path)
    full, selected = _shaped(case.input_text), _shaped(case.input_text)
    full_counts = apply_rules(full, attention_rules(), PassContext(opt_level=3))
    result = ContribAttention().run(selected, PassContext(opt_level=3))
    assert dict(result.counters) == dict(full_counts)
    assert ir.print_model(selected) == ir.print_model(full)


def test_forms_found_in_a_gpt2_golden() -> None:
    """The causal GPT-2 golden holds one form; the scan names it and nothing else."""
    case = load_case(FIXTURES / "contrib-attention" / "gpt2_causal_split.onnxtest")
    forms = attention._forms_in(_shaped(case.input_text))
    counts = ContribAttention().run(_shaped(case.input_text), PassContext(opt_level=3)).counters
    assert {attention._rule_name(*form) for form in forms} >= {name for name in counts if name.startswith("mha-")}
    assert len(forms) == 1


def test_no_attention_means_no_mha_rule_is_tried() -> None:
    """A model without attention: the scan finds no form, the pass changes nothing, leaves no memo."""
    model = _shaped("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[6,4] y) <int64[2] s = {6, 4}> {
            t = Transpose <perm: ints = [0, 2, 1]> (x)
            u = Transpose <perm: ints = [0, 2, 1]> (t)
            y = Reshape (u, s)
        }""")
    assert attention._forms_in(model) == set()
    result = ContribAttention().run(model, PassContext(opt_level=3))
    assert not result.changed
    assert attention._MEMO_KEY not in model.meta


# -- a deep residual stack ------------------------------------------------------------------------
def _residual_encoder(layers: int, hidden: int = 8, heads: int = 2) -> onnx.ModelProto:
    """Post-attention residual layers whose head splits read ``x.size(0)``, ``x.size(1)`` at run time."""
    rng = np.random.default_rng(0)
    size = hidden // heads
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = [0]

    def name(hint: str) -> str:
        count[0] += 1
        return f"{hint}{count[0]}"

    def const(array: np.ndarray) -> str:
        out = name("c")
        inits.append(numpy_helper.from_array(np.asarray(array), out))
        return out

    def op(op_type: str, *inputs: str, **attrs: object) -> str:
        out = name(op_type.lower())
        nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def dim(x: str, axis: int) -> str:
        return op("Unsqueeze", op("Gather", op("Shape", x), const(np.array(axis, np.int64)), axis=0),
                  const(np.array([0], np.int64)))

    def linear(x: str) -> str:
        w = const((rng.standard_normal((hidden, hidden)) * 0.3).astype(np.float32))
        return op("Add", op("MatMul", x, w), const((rng.standard_normal(hidden) * 0.1).astype(np.float32)))

    h = "x"
    for _ in range(layers):
        split_shape = op("Concat", dim(h, 0), dim(h, 1), const(np.array([heads, size], np.int64)), axis=0)
        q, k, v = (op("Reshape", linear(h), split_shape) for _ in range(3))
        scores = op("MatMul", op("Transpose", q, perm=[0, 2, 1, 3]), op("Transpose", k, perm=[0, 2, 3, 1]))
        scores = op("Add", op("Div", scores, const(np.array(np.sqrt(size), np.float32))), "mask")
        context = op("MatMul", op("Softmax", scores, axis=-1), op("Transpose", v, perm=[0, 2, 1, 3]))
        merge_shape = op("Concat", dim(h, 0), dim(h, 1), const(np.array([hidden], np.int64)), axis=0)
        merged = op("Reshape", op("Transpose", context, perm=[0, 2, 1, 3]), merge_shape)
        h = op("Add", linear(merged), h)
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", hidden]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 1, "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_deep_stack_fuses_every_layer_with_one_shared_memo() -> None:
    """Eight layers: every one fuses (the proofs reuse the memo across rewrites), numbers kept."""
    source = _residual_encoder(layers=8)
    model = ir.load(source)
    PassManager("infer-shapes,contrib-attention,eliminate-dead-code", PassContext(opt_level=3)).run(model)
    ir.verify(model)
    fused = ir.to_proto(model)
    assert sum(1 for n in fused.graph.node if n.op_type == "MultiHeadAttention") == 8
    assert not any(n.op_type == "Softmax" for n in fused.graph.node)
    assert attention._MEMO_KEY not in model.meta
    rng = np.random.default_rng(1)
    mask = np.zeros((2, 1, 1, 5), np.float32)
    mask[0, ..., 3:] = -10000.0
    feeds = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32), "mask": mask}
    comparison = compare_outputs(run_model(source, feeds), run_model(fused, feeds), rtol=RTOL, atol=ATOL)
    assert comparison.ok, comparison.summary()
