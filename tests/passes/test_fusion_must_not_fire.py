"""Every "must not fire" golden of the fusion passes is refused for the reason its name states.

A golden with ``# EXPECT-UNCHANGED`` passes whenever nothing changes, also when a rule is
refused for an unrelated reason (a typo in the case, a missing shape). Here the why-not
tracer runs the named rule on the case's input, after shape inference as in a pipeline, and
the reason it gives must contain the expected words.
"""

from __future__ import annotations

from pathlib import Path

import onnx.parser
import pytest

from graphopt import ir
from graphopt.pipeline import PassContext, PassManager, PassRegistry
from graphopt.rewrite import why_not
from graphopt.testing import collect_cases, load_case

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FUSION_FOLDERS = ("fuse-bn-into-conv", "fuse-bn-into-gemm", "fuse-mul-add-into-conv", "fuse-pad",
                  "fuse-matmul-add-into-gemm", "fuse-layer-norm", "fuse-rms-norm", "fuse-gelu",
                  "fuse-affine-chain")

#: case -> (rule, words its reason must contain); a rule of ``None``: no rule of the pass has a
#: candidate node at all.
REASONS: dict[str, tuple[str | None, str]] = {
    "fuse-bn-into-conv/conv_output_is_graph_output_kept": ("conv-bn", "intermediate 'c' is a graph output"),
    "fuse-bn-into-conv/conv_output_read_elsewhere_kept": ("conv-bn", "used outside the match by Relu"),
    "fuse-bn-into-conv/ir3_overridable_weight_kept": ("conv-bn", "'w' is a graph input"),
    "fuse-bn-into-conv/shared_weight_kept": ("conv-bn", "'w' is shared with 1 other use"),
    "fuse-bn-into-conv/statistics_graph_input_kept": ("conv-bn", "variance 'var' is not a constant"),
    "fuse-bn-into-conv/training_mode_kept": ("conv-bn", "training mode (training_mode=1)"),
    "fuse-bn-into-conv/weight_graph_input_kept": ("conv-bn", "'w' is a graph input"),
    "fuse-bn-into-gemm/gemm_c_graph_input_kept": ("gemm-bn", "Gemm's C 'b' is a graph input"),
    "fuse-bn-into-gemm/matmul_rank3_kept": ("matmul-bn", "has rank 3, expected 2"),
    "fuse-bn-into-gemm/matmul_unknown_rank_kept": ("matmul-bn", "has rank unknown"),
    "fuse-bn-into-gemm/shared_weight_kept": ("gemm-bn", "'w' is shared"),
    "fuse-mul-add-into-conv/conv_output_read_elsewhere_kept": ("conv-mul", "used outside the match by Relu"),
    "fuse-mul-add-into-conv/factor_graph_input_kept": ("conv-mul", "'s' is a graph input"),
    "fuse-mul-add-into-conv/higher_rank_constant_kept": ("conv-mul", "shape [1, 1, 3, 1, 1] does not hold one value"),
    "fuse-mul-add-into-conv/mul_graph_input_weight_kept": ("conv-mul", "the weight 'w' is a graph input"),
    "fuse-mul-add-into-conv/mul_shared_weight_kept": ("conv-mul", "'w' is shared"),
    "fuse-mul-add-into-conv/non_finite_factor_kept": ("conv-mul", "non-finite"),
    "fuse-mul-add-into-conv/spatial_constant_kept": ("conv-mul", "shape [1, 3, 2, 2] does not hold one value"),
    "fuse-mul-add-into-conv/width_vector_kept": ("conv-mul", "shape [3] does not hold one value per output channel"),
    "fuse-pad/auto_pad_kept": ("pad-conv", "auto_pad=SAME_UPPER"),
    "fuse-pad/average_pool_ceil_mode_kept": ("pad-average-pool", "ceil_mode=1"),
    "fuse-pad/average_pool_excluding_own_pads_kept": ("pad-average-pool", "pads of its own and count_include_pad=0"),
    "fuse-pad/channel_pad_kept": ("pad-conv", "pads the batch or channel axis"),
    "fuse-pad/max_pool_kept": (None, "MaxPool is the root of no rule"),
    "fuse-pad/negative_pad_kept": ("pad-conv", "negative pad"),
    "fuse-pad/nonzero_value_kept": ("pad-conv", "value is 1, not 0"),
    "fuse-pad/padded_value_read_elsewhere_kept": ("pad-conv", "intermediate 'p' is a graph output"),
    "fuse-pad/pads_graph_input_kept": ("pad-conv", "pads are not a constant"),
    "fuse-pad/reflect_mode_kept": ("pad-conv", "mode is 'reflect'"),
    "fuse-matmul-add-into-gemm/bias_rows_symbolic_kept": ("matmul-add-to-gemm", "needs 2 rows; the product has 'N'"),
    "fuse-matmul-add-into-gemm/bias_widens_kept": ("matmul-add-to-gemm", "more than 2 dims"),
    "fuse-matmul-add-into-gemm/integer_kept": ("matmul-add-to-gemm", "element type int32"),
    "fuse-matmul-add-into-gemm/product_is_graph_output_kept": ("matmul-add-to-gemm", "'p' is a graph output"),
    "fuse-matmul-add-into-gemm/rank3_kept": ("matmul-add-to-gemm", "has rank 3; Gemm needs rank 2"),
    "fuse-matmul-add-into-gemm/weight_graph_input_kept": ("matmul-add-to-gemm", "B 'w' is a graph input"),
    "fuse-layer-norm/different_axes_kept": ("layer-norm-pow-div", "reduce different axes"),
    "fuse-layer-norm/epsilon_graph_input_kept": ("layer-norm-pow-div", "epsilon 'eps' is not a non-negative"),
    "fuse-layer-norm/leading_axis_kept": ("layer-norm-pow-div", "not the trailing axes"),
    "fuse-layer-norm/mean_is_graph_output_kept": ("layer-norm-pow-div", "intermediate 'mean' is a graph output"),
    "fuse-layer-norm/opset16_kept": ("layer-norm-pow-div", "needs opset 17, the graph imports opset 16"),
    "fuse-layer-norm/symbolic_hidden_kept": ("layer-norm-pow-div", "normalized dims ['H']"),
    "fuse-rms-norm/opset22_kept": ("rms-norm-pow-reciprocal", "needs opset 23, the graph imports opset 22"),
    "fuse-gelu/erf_read_elsewhere_kept": ("gelu-erf-div-xp-half", "intermediate 'e' is a graph output"),
    "fuse-gelu/opset19_kept": ("gelu-erf-div-xp-half", "needs opset 20, the graph imports opset 19"),
    "fuse-gelu/root2_graph_input_kept": ("gelu-erf-div-xp-half", "divisor 'root2' is not a one-element constant"),
    "fuse-gelu/widening_constant_kept": ("gelu-erf-div-xp-half", "'half' is not a one-element constant of rank <="),
    "fuse-gelu/wrong_constant_kept": ("gelu-erf-div-xp-half", "'half' is 0.6, expected 0.5"),
    "fuse-affine-chain/batch_norm_after_foldable_conv_kept": ("batch-norm-to-mul-add", "rule 'conv-bn' folds it"),
    "fuse-affine-chain/growing_constant_kept": ("merge-mul-mul", "would store 12 elements"),
    "fuse-affine-chain/integer_kept": ("merge-mul-mul", "element type int32"),
    "fuse-affine-chain/intermediate_graph_output_kept": ("merge-mul-mul", "intermediate 'm' is a graph output"),
    "fuse-affine-chain/lone_batch_norm_kept": ("batch-norm-to-mul-add", "its reader is a Relu"),
    "fuse-affine-chain/training_mode_kept": ("batch-norm-to-mul-add", "training mode (training_mode=1)"),
    "fuse-affine-chain/unknown_rank_kept": ("batch-norm-to-mul-add", "rank of 'a' is unknown"),
}


@pytest.fixture(scope="module")
def registry() -> PassRegistry:
    """The built-in passes only."""
    return PassRegistry.default(plugins=False)


def _unchanged_cases() -> list[str]:
    names = []
    for folder in FUSION_FOLDERS:
        for path in collect_cases(FIXTURES / folder):
            if load_case(path).expect_unchanged:
                names.append(f"{folder}/{path.stem}")
    return names


def test_every_must_not_fire_case_has_a_reason() -> None:
    """No EXPECT-UNCHANGED case of a fusion pass goes without a checked reason, and none is stale."""
    cases = _unchanged_cases()
    assert len(cases) >= 40
    assert sorted(cases) == sorted(REASONS)


@pytest.mark.parametrize("case_name", sorted(REASONS))
def test_refused_for_the_stated_reason(case_name: str, registry: PassRegistry) -> None:
    """The named rule does not fire anywhere in the case, and says why in the expected words."""
    rule_name, words = REASONS[case_name]
    folder = case_name.split("/")[0]
    case = load_case(FIXTURES / f"{case_name}.onnxtest")
    model = ir.load(onnx.parser.parse_model(case.input_text))
    ctx = PassContext(registry=registry)
    PassManager("infer-shapes", ctx).run(model)
    rules = registry.get(folder).rule_set()
    if rule_name is None:
        assert all(why_not(model, r, ctx) == [] for r in rules), words
        return
    rule = rules.get(rule_name)
    assert rule is not None, f"pass '{folder}' has no rule '{rule_name}'"
    verdicts = why_not(model, rule, ctx)
    assert verdicts, f"{case_name}: no candidate node for '{rule_name}'"
    assert not any(v.fires for v in verdicts), [str(v) for v in verdicts]
    reasons = [v.reason or "" for v in verdicts]
    assert any(words in r for r in reasons), reasons
