"""Fusions into standard ONNX operators: fewer, larger nodes with the same outputs.

One module per family, each starting with the algebra that makes it legal and the cases where
it must not fire:

* ``fuse-bn-into-conv`` (:class:`FuseBnIntoConv`): Conv/ConvTranspose + BatchNormalization.
* ``fuse-bn-into-gemm`` (:class:`FuseBnIntoGemm`): Gemm/2-D MatMul + BatchNormalization.
* ``fuse-mul-add-into-conv`` (:class:`FuseMulAddIntoConv`): Conv + per-channel constant Mul/Add.
* ``fuse-pad`` (:class:`FusePad`): zero Pad into Conv / AveragePool pads.
* ``fuse-matmul-add-into-gemm`` (:class:`FuseMatMulAddIntoGemm`): 2-D MatMul + Add into Gemm.
* ``fuse-layer-norm`` (:class:`FuseLayerNorm`): decomposed layer norm into LayerNormalization (opset 17+).
* ``fuse-rms-norm`` (:class:`FuseRmsNorm`): decomposed RMS norm into RMSNormalization (opset 23+).
* ``fuse-gelu`` (:class:`FuseGelu`): erf and tanh Gelu forms into Gelu (opset 20+).
* ``fuse-affine-chain`` (:class:`FuseAffineChain`): chains of Mul/Add by constants into one
  pair, a BatchNormalization before such a chain included.

Every rule folds only constants no caller can override, never changes a tensor in place (a
folded weight is a new initializer), does not fold a Conv/Gemm weight that another node also
reads (the old and the folded copy would both be stored), and rewrites float, float16 and
double tensors only. onnxruntime contrib-op fusions are target-specific and live elsewhere.

Example:
    >>> import graphopt
    >>> optimized = graphopt.optimize("model.onnx", pipeline="fusions,eliminate-dead-code")  # doctest: +SKIP
"""

from __future__ import annotations

from graphopt.passes.fusion.affine_chain import FuseAffineChain
from graphopt.passes.fusion.conv_affine import FuseMulAddIntoConv
from graphopt.passes.fusion.conv_bn import FuseBnIntoConv
from graphopt.passes.fusion.gelu import FuseGelu
from graphopt.passes.fusion.layer_norm import FuseLayerNorm
from graphopt.passes.fusion.linear_bn import FuseBnIntoGemm
from graphopt.passes.fusion.matmul_add import FuseMatMulAddIntoGemm
from graphopt.passes.fusion.pad import FusePad
from graphopt.passes.fusion.rms_norm import FuseRmsNorm

__all__ = ["FuseAffineChain", "FuseBnIntoConv", "FuseBnIntoGemm", "FuseGelu", "FuseLayerNorm",
           "FuseMatMulAddIntoGemm", "FuseMulAddIntoConv", "FusePad", "FuseRmsNorm", "FUSION_PASSES"]

#: The fusion passes in the order the ``fusions`` pipeline group runs them: folds into a
#: producer before the rules that would otherwise take the node apart.
FUSION_PASSES = [FuseBnIntoConv, FuseBnIntoGemm, FuseMulAddIntoConv, FusePad, FuseMatMulAddIntoGemm,
                 FuseLayerNorm, FuseRmsNorm, FuseGelu, FuseAffineChain]
