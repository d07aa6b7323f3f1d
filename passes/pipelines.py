"""Preset pipelines: ``O0``-``O3`` and the named groups they use.

Each preset is a pipeline string (see :func:`graphopt.pipeline.parse_pipeline`) built from the
named groups below, so a new family of passes is added by extending a group. ``graphopt passes
--pipeline -O2`` prints what a preset expands to.

Example:
    >>> PIPELINES["cleanup"]
    'eliminate-identity,eliminate-dead-code,dedup-initializers'
"""

from __future__ import annotations

__all__ = ["PIPELINES"]

#: Remove what does not contribute to the outputs; cheap and always safe.
CLEANUP = "eliminate-identity,eliminate-dead-code,dedup-initializers"

#: Passes that feed each other (one's removal exposes the other's work): run to a fixed point.
SIMPLIFY = ("eliminate-identity,inline-constant-if,eliminate-no-ops,merge-chains,fold-constants,"
            "eliminate-common-subexpressions,eliminate-dead-code")

#: Fusions into standard ONNX ops (any runtime), folds into a producer first.
FUSIONS = ("fuse-bn-into-conv,fuse-bn-into-gemm,fuse-mul-add-into-conv,fuse-pad,fuse-matmul-add-into-gemm,"
           "fuse-layer-norm,fuse-rms-norm,fuse-gelu,fuse-affine-chain")

#: Fusions into onnxruntime contrib ops, each only where the target has the kernel. Attention goes
#: first (contrib-fused-matmul would take its products apart); SiLU becomes QuickGelu before
#: contrib-fused-conv looks at what follows each Conv. contrib-skip-layer-norm is left out, and
#: contrib-residual-sum keeps onnxruntime from making one at load time: onnxruntime 1.31's CPU
#: SkipLayerNormalization measured about 4x slower than Add + LayerNormalization
#: (bench/contrib_latency.py residual); enable it by name where it pays.
CONTRIB = ("contrib-attention,eliminate-dead-code,contrib-gelu,contrib-silu,contrib-fused-conv,"
           "contrib-fused-matmul,fuse-softmax-conv-into-matmul,contrib-residual-sum")

PIPELINES: dict[str, str] = {
    "cleanup": CLEANUP,
    "simplify": SIMPLIFY,
    "fusions": FUSIONS,
    "contrib": CONTRIB,
    # O0 changes nothing a model computes; it only puts nodes in a valid order.
    "O0": "topo-sort",
    "O1": "topo-sort,cleanup",
    "O2": ("topo-sort,infer-shapes,fixpoint<max=8>(simplify,fusions),dedup-initializers,"
           "dedup-transposed-initializers,eliminate-dead-code"),
    "O3": ("topo-sort,infer-shapes,fixpoint<max=8>(simplify,fusions),dedup-initializers,"
           "dedup-transposed-initializers,contrib,eliminate-dead-code"),
}
