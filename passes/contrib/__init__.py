"""Target-aware fusions into onnxruntime contrib ops (domain ``com.microsoft``).

Each pass emits an op only where the target's execution provider has a kernel for it
(:func:`~graphopt.passes.contrib.capabilities.provider_supports`), so the optimized model loads
on the provider it is meant for; on another target the rules refuse with a reason that
``graphopt why-not`` shows. They run at ``-O3``, after the standard-ONNX fusions, whose
``LayerNormalization``, ``Gelu`` and ``RMSNormalization`` they consume.

=========================  ==========================================================  =====
pass                       emits                                                       -O3
=========================  ==========================================================  =====
contrib-attention          MultiHeadAttention (BERT- and GPT-2-style blocks)           yes
contrib-gelu               Gelu, BiasGelu, FastGelu                                    yes
contrib-skip-layer-norm    SkipLayerNormalization, SkipSimplifiedLayerNormalization    no
contrib-fused-conv         FusedConv (Conv + activation, + residual Add or Sum)        yes
contrib-fused-matmul       FusedMatMul (transposed inputs, scalar scale)               yes
contrib-residual-sum       Sum for the Add before a LayerNormalization (cpu only)      yes
contrib-silu               QuickGelu (x * Sigmoid(x), x * Sigmoid(a * x))              yes
fuse-softmax-conv-into-    Transpose, Softmax (last axis), MatMul: standard ops for    yes
matmul                     a 1x1 Conv over a channel Softmax (YOLO's DFL head)
=========================  ==========================================================  =====

``-O3`` includes only the passes measured not to slow onnxruntime's CPU provider down at
``ORT_ENABLE_ALL`` (``bench/contrib_latency.py``); onnxruntime 1.31's CPU
SkipLayerNormalization measured about 4x slower than Add + LayerNormalization, so
``contrib-skip-layer-norm`` runs only when named (``--enable contrib-skip-layer-norm``) and
``contrib-residual-sum`` keeps onnxruntime from fusing one at load time.

Example:
    >>> from graphopt.passes.contrib import CONTRIB_PASSES
    >>> [p.name for p in CONTRIB_PASSES][:2]
    ['contrib-attention', 'contrib-gelu']
"""

from __future__ import annotations

from graphopt.passes.contrib.attention import ContribAttention
from graphopt.passes.contrib.capabilities import fused_conv_activations, provider_supports
from graphopt.passes.contrib.fused_conv import ContribFusedConv
from graphopt.passes.contrib.fused_matmul import ContribFusedMatMul
from graphopt.passes.contrib.gelu import ContribGelu
from graphopt.passes.contrib.residual_sum import ContribResidualSum
from graphopt.passes.contrib.silu import ContribSiLU
from graphopt.passes.contrib.skip_layer_norm import ContribSkipLayerNorm
from graphopt.passes.contrib.softmax_conv import FuseSoftmaxConvIntoMatMul
from graphopt.pipeline import Pass

#: The contrib passes in pipeline order: attention first (its pattern contains MatMuls that
#: contrib-fused-matmul would otherwise take apart), Gelu before the skip normalizations (a fused
#: Gelu keeps the shape of its input, which the residual shape proof walks through).
CONTRIB_PASSES: list[type[Pass]] = [ContribAttention, ContribGelu, ContribSkipLayerNorm, ContribSiLU,
                                    ContribFusedConv, ContribFusedMatMul, FuseSoftmaxConvIntoMatMul,
                                    ContribResidualSum]

__all__ = ["CONTRIB_PASSES", "ContribAttention", "ContribFusedConv", "ContribFusedMatMul", "ContribGelu",
           "ContribResidualSum", "ContribSiLU", "ContribSkipLayerNorm", "FuseSoftmaxConvIntoMatMul",
           "fused_conv_activations", "provider_supports"]
