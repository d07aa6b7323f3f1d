"""GPTQ for block-wise int4 weights: second-order rounding from calibration activations.

For a MatMul ``Y = X · W`` (``W [K, N]``), GPTQ quantizes the rows of ``W`` (the input
features) one at a time and spreads each row's rounding error over the rows not yet quantized,
weighted by the inverse of ``H = Xᵀ X`` (the Hessian of ``‖X W − X Ŵ‖²``). The inverse enters
through its upper Cholesky factor ``U`` (``H⁻¹ = Uᵀ U``): after quantizing row ``k`` with error
``e = (W[k] − Ŵ[k]) / U[k, k]``, every later row ``j`` becomes ``W[j] − U[k, j] · e``. Scales and
zero points of a block are taken from the (already updated) rows when the block starts, as in
the reference implementation with groups. ``H`` gets ``1 %`` of its mean diagonal added
(dampening) and inputs that never vary get a unit diagonal and a zero weight row.

The activations come from running the float model in onnxruntime on the calibration samples,
with the MatMul inputs added as outputs; ``H`` is accumulated sample by sample (memory ``K²``
per distinct input, independent of the number of samples).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.runtime import make_session, open_calibration_data

__all__ = ["collect_hessians", "gptq_quantize"]

logger = logging.getLogger(__name__)

#: Dampening added to the Hessian's diagonal, as a fraction of its mean.
DAMPENING = 0.01


def collect_hessians(model: ir.Model, values: list[ir.Value], calibration: Any, samples: int | None,
                     seed: int) -> dict[str, tuple[np.ndarray, int]]:
    """``Σ Xᵀ X`` and the row count of every value in ``values`` over the calibration samples.

    The model is written to a temporary folder (external data, so any size works) with the
    values added as graph outputs, and run once per sample.
    """
    names = sorted({v.name for v in values})
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        ir.save(model, path, external_data=True)
        proto = onnx.load(path, load_external_data=False)
        known = {o.name for o in proto.graph.output}
        proto.graph.output.extend(oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                  for n in names if n not in known)
        onnx.save(proto, path)
        source = open_calibration_data(calibration, model=proto, samples=samples, seed=seed)
        session = make_session(path)
        sums: dict[str, np.ndarray] = {}
        rows: dict[str, int] = {}
        for feeds in source:
            for name, array in zip(names, session.run(names, feeds), strict=True):
                x = np.asarray(array, dtype=np.float64)
                x = x.reshape(-1, x.shape[-1])
                sums[name] = sums.get(name, 0) + x.T @ x
                rows[name] = rows.get(name, 0) + x.shape[0]
    if not rows:
        raise GraphoptError("quantize-int4: the calibration data holds no sample; give at least one")
    return {n: (sums[n], rows[n]) for n in names}


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, block_size: int,
                  symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ codes ``[N, blocks, block_size]`` (0..15), scales and zero points ``[N, blocks]``.

    Example:
        >>> w = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
        >>> codes, scales, zeros = gptq_quantize(w, np.eye(32), 16, True)
        >>> codes.shape, scales.shape
        ((4, 2, 16), (4, 2))
    """
    from graphopt.passes.quant.int4 import block_params_int4

    w = np.array(weight, dtype=np.float64)
    k_dim, n_dim = w.shape
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k_dim)] += DAMPENING * float(np.mean(np.diag(h)))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H⁻¹ = Uᵀ U
    blocks = -(-k_dim // block_size)
    codes = np.zeros((n_dim, blocks, block_size), np.uint8)
    scales = np.zeros((n_dim, blocks), np.float32)
    zeros = np.zeros((n_dim, blocks), np.uint8)
    for b in range(blocks):
        k0, k1 = b * block_size, min(k_dim, (b + 1) * block_size)
        block_scale, block_zero = block_params_int4(w[k0:k1].astype(np.float32), block_size, symmetric)
        scale, zero = block_scale[:, 0], block_zero[:, 0]
        scales[:, b], zeros[:, b] = scale, zero
        codes[:, b, :] = zero[:, None]  # padding rows dequantize to 0
        errors = np.zeros((k1 - k0, n_dim))
        for k in range(k0, k1):
            row = w[k]
            q = np.clip(np.rint(row / scale) + zero, 0, 15)
            codes[:, b, k - k0] = q.astype(np.uint8)
            err = (row - (q - zero) * scale) / upper[k, k]
            w[k + 1:k1] -= np.outer(upper[k, k + 1:k1], err)
            errors[k - k0] = err
        w[k1:] -= upper[k0:k1, k1:].T @ errors
    return codes, scales, zeros
