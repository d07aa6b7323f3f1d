"""Passes that keep inferred shapes valid spare the pipeline an ``infer-shapes`` rerun.

``eliminate-identity`` and ``dedup-initializers`` declare ``shapes-inferred`` in ``preserves``:
after them, a pass that requires shapes runs on the types inferred before. These tests prove
that fewer ``infer-shapes`` runs happen and that the result is the very model (types and the
inferred-type notes included) that rerunning ``infer-shapes`` after every pass gives.
"""

from __future__ import annotations

import onnx
import onnx.parser

from graphopt import ir
from graphopt.passes.cleanup import DedupInitializers, EliminateIdentity
from graphopt.pipeline import PassContext, PassManager
from graphopt.runtime import compare_outputs, make_session, random_inputs, run_model

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y, float[N,4] z) <float[4] w1 = {1,2,3,4}, float[4] w2 = {1,2,3,4}, int64[2] s = {-1, 4}> {
    t = Identity(x)
    a = Add(t, w1)
    r = Reshape(a, s)
    u = Identity(r)
    y = Relu(u)
    b = Mul(t, w2)
    z = Sigmoid(b)
}
"""

#: eliminate-no-ops and merge-chains require shapes; the others preserve them.
PIPELINE = "topo-sort,infer-shapes,eliminate-identity,dedup-initializers,eliminate-no-ops,merge-chains"
#: The same with infer-shapes forced after every pass that changes the model.
FORCED = ("topo-sort,infer-shapes,eliminate-identity,infer-shapes,dedup-initializers,infer-shapes,"
          "eliminate-no-ops,merge-chains")


def _run(text: str) -> tuple[ir.Model, list[str]]:
    model = ir.load(onnx.parser.parse_model(MODEL))
    report = PassManager(text, PassContext()).run(model)
    return model, [f"{r.name}{'*' if r.changed else ''}" for r in report.records]


def _annotations(model: ir.Model) -> dict[str, tuple[str, str]]:
    """Every node output's type and the type inference noted for it."""
    return {v.name: (str(v.type), str(v.meta.get("inferred_type"))) for n in model.graph for v in n.outputs}


def test_shape_preserving_passes_declare_it() -> None:
    assert "shapes-inferred" in EliminateIdentity.preserves
    assert "shapes-inferred" in DedupInitializers.preserves


def test_infer_shapes_runs_once_and_gives_what_a_rerun_gives() -> None:
    model, ran = _run(PIPELINE)
    assert ran == ["topo-sort", "infer-shapes*", "eliminate-identity*", "dedup-initializers*", "eliminate-no-ops*",
                   "merge-chains"]
    forced, forced_ran = _run(FORCED)
    assert forced_ran.count("infer-shapes") + forced_ran.count("infer-shapes*") == 3
    assert ir.print_model(model) == ir.print_model(forced)
    assert _annotations(model) == _annotations(forced)
    assert [n.op_type for n in model.graph] == ["Add", "Relu", "Mul", "Sigmoid"]  # Reshape and Identities gone
    source = onnx.parser.parse_model(MODEL)
    output = ir.to_proto(model)
    onnx.checker.check_model(output)
    feeds = random_inputs(make_session(source), seed=0, dims={"N": 3})
    comparison = compare_outputs(run_model(source, feeds), run_model(output, feeds), rtol=0, atol=0)
    assert comparison.ok, comparison.summary()


def test_a_pass_that_does_not_preserve_shapes_still_triggers_a_rerun() -> None:
    """fold-constants changes the model without preserving shapes: infer-shapes runs again."""
    text = "topo-sort,infer-shapes,fold-constants,eliminate-no-ops"
    model = ir.load(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y) <float[4] w = {1,2,3,4}> {
            two = Add(w, w)
            y = Mul(x, two)
        }
    """))
    report = PassManager(text, PassContext()).run(model)
    names = [r.name for r in report.records]
    assert names == ["topo-sort", "infer-shapes", "fold-constants", "infer-shapes", "eliminate-no-ops"]
