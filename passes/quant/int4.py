"""``quantize-int4``: block-wise 4-bit weight-only quantization of large MatMul weights (RTN, GPTQ).

Algebra: the weight ``W [K, N]`` is cut along ``K`` into blocks of ``block_size`` rows (the last
block padded with zeros); each block ``b`` of column ``n`` gets a scale ``s`` and a zero point
``z`` and stores codes ``q = clip(round(W / s) + z, 0, 15)``, so that::

    Y = A · W  ≈  A · Ŵ,    Ŵ[k, n] = (q[k, n] - z[b, n]) · s[b, n]

* symmetric (default): ``s = max|W_block| / 7``, ``z = 8`` (codes ``-7..7`` shifted), so
  ``|W - Ŵ| ≤ s / 2``;
* asymmetric: ``s = (max(W_block, 0) - min(W_block, 0)) / 15``, ``z = round(-min / s)``, so
  ``|W - Ŵ| ≤ s`` (``s / 2`` from rounding plus up to ``s / 2`` from the rounded zero point).

An all-zero block gets scale 1. The matrix product then differs from the float one by at most
``Σ_k |A[k]| · |W - Ŵ|[k, n]`` per output.

Computation: scales are float32 (``max|W_block| / 7`` divided in float32); ``round`` is the
exact quotient of the float32 weight and scale rounded half to even, for codes and zero points
alike (``_qparams.quantize_array``: float32 division, with the elements whose float32 quotient
lands on a half redone in float64). The weight is read in tiles of one block of rows by a range
of columns, and each emitted form (packed ``MatMulNBits`` bytes, ``[K, N]`` int4 codes) is
written tile by tile, so temporaries stay about 1 MiB whatever the size of the weight
(4096x11008 float32: about 1.3 MiB beyond the result, against 0.5 GiB of full-size copies
before). A block whose float32 scale underflows to 0 (a few subnormals) gets codes equal to its
zero point; they dequantize to 0. ``method=gptq`` keeps the same code format but
chooses the codes to minimise ``‖X W − X Ŵ‖`` on calibration activations ``X`` (see
``_lowp_gptq``); the per-weight bound above then no longer holds, the output error is smaller.

Emitted forms (``format``):

* ``matmulnbits``: ``com.microsoft::MatMulNBits(A, B, scales[, zero_points])`` with ``bits=4``,
  ``B`` uint8 ``[N, ceil(K / block_size), block_size / 2]`` (two codes per byte along ``K``,
  the lower ``k`` in the low nibble), ``scales`` ``[N · ceil(K / block_size)]`` in ``A``'s
  element type, ``zero_points`` (asymmetric only) uint8 ``[N · ceil(ceil(K / block_size) / 2)]``
  packed the same way (the kernel's default zero point is 8, so symmetric weights need none).
  onnxruntime's CPU and CUDA providers both run it; it needs ``block_size`` a power of two, at
  least 16. ``accuracy_level`` (-1: 4 on target ``cpu``, else 0) selects the CPU kernel's
  compute type: 0 multiplies in float32 (the output equals ``A · Ŵ`` to float rounding), 4
  quantizes ``A`` to int8 per block at run time (measured ~5x faster for a single row on an
  AVX2 CPU, at the cost of that activation rounding); the CUDA kernel ignores it.
* ``qdq``: ``DequantizeLinear(W_q int4 [K, N], scale [ceil(K / block_size), N][, zero_point],
  axis=0, block_size) → MatMul``, standard ONNX (blocked quantization needs opset 21). onnxruntime
  fuses it back into ``MatMulNBits`` when it optimizes the session.

Must not fire when:

* ``B`` is not a constant 2-D float initializer (a graph input can be overridden), has fewer than
  ``min_elements`` elements, or is also read by a node this pass does not quantize;
* ``A`` is not float32 (or float16 on target ``cuda``), or its rank is unknown or below 2 for
  ``matmulnbits``;
* ``format=qdq`` and the model's opset is below 21; the node's name matches ``exclude``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from graphopt.passes.quant._lowp_common import (
    CONTRIB_DOMAIN,
    add_weight,
    compile_exclude,
    parse_bool,
    positive_int,
    remove_if_unused,
    require_opset,
    transfer_outputs,
    weight_tensor,
    whole_weights,
)
from graphopt.passes.quant._qparams import QParams, quantize_array
from onnx import TensorProto

from graphopt import ir
from graphopt.errors import PipelineError
from graphopt.pipeline import Pass, PassContext, PassResult

__all__ = ["BlockQuantized", "QuantizeInt4", "block_params_int4", "dequantize_blockwise", "pack_blockwise_int4",
           "pack_nibbles", "qdq_codes_int4", "quantize_blockwise_int4"]

logger = logging.getLogger(__name__)

#: Blocked ``DequantizeLinear`` (``block_size`` attribute) and int4 types start at opset 21.
QDQ_OPSET = 21
#: IR version that introduced the int4/uint4 element types.
INT4_IR_VERSION = 10
FORMATS = ("matmulnbits", "qdq")
METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class BlockQuantized:
    """A ``[K, N]`` weight quantized in blocks along ``K``.

    Attributes:
        codes: uint8 ``[N, blocks, block_size]`` values 0..15 (``K`` padded to whole blocks).
        scales: ``[N, blocks]`` float32.
        zero_points: uint8 ``[N, blocks]`` values 0..15 (8 everywhere when symmetric).
        k: rows of the original weight.
        block_size: rows per block.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int
    block_size: int


def quantize_blockwise_int4(weight: np.ndarray, block_size: int, symmetric: bool) -> BlockQuantized:
    """Round-to-nearest 4-bit quantization of ``weight [K, N]`` in blocks of ``block_size`` rows.

    Codes are ``clip(round(W / s) + z, 0, 15)`` with the exact quotient of the float32 weight
    and scale rounded half to even (see :func:`~graphopt.passes.quant._qparams.quantize_array`).
    The weight is read one tile (a block of rows by a range of columns) at a time, so
    temporaries stay about 1 MiB whatever the size of the weight.

    Example:
        >>> q = quantize_blockwise_int4(np.arange(64, dtype=np.float32).reshape(32, 2), 16, True)
        >>> q.codes.shape, q.scales.shape
        ((2, 2, 16), (2, 2))
    """
    k, n, blocks = _block_shape(weight, block_size)
    codes = np.empty((n, blocks, block_size), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    zeros = np.empty((n, blocks), np.uint8)
    for block, columns, tile in _tiles(weight, block_size):
        scale, zero = _tile_params(tile, symmetric)
        scales[columns, block], zeros[columns, block] = scale, zero
        codes[columns, block, :] = _tile_codes(tile, scale, zero, block_size).T
    return BlockQuantized(codes, scales, zeros, k, block_size)


def block_params_int4(weight: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``[N, blocks]`` scales and zero points :func:`quantize_blockwise_int4` uses.

    Symmetric: ``s = max|W_block| / 7`` in float32 and ``z = 8``; asymmetric:
    ``s = (max(W_block, 0) - min(W_block, 0)) / 15`` in float32 and ``z = round(-min / s)``
    (exact quotient, half to even). A block without a range gets ``s = 1``.

    Example:
        >>> s, z = block_params_int4(np.array([[1.0], [-3.5]], np.float32), 2, False)
        >>> s.tolist(), z.tolist()
        ([[0.30000001192092896]], [[12]])
    """
    _, n, blocks = _block_shape(weight, block_size)
    scales = np.empty((n, blocks), np.float32)
    zeros = np.empty((n, blocks), np.uint8)
    for block, columns, tile in _tiles(weight, block_size):
        scales[columns, block], zeros[columns, block] = _tile_params(tile, symmetric)
    return scales, zeros


def pack_blockwise_int4(weight: np.ndarray, block_size: int, symmetric: bool) -> np.ndarray:
    """``pack_nibbles(quantize_blockwise_int4(...).codes)`` without the unpacked codes.

    The result is ``MatMulNBits``' ``B``: uint8 ``[N, blocks, ceil(block_size / 2)]``, two
    codes per byte along ``K`` (the lower ``k`` in the low nibble), written tile by tile.

    Example:
        >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(32, 2)
        >>> np.array_equal(pack_blockwise_int4(w, 16, True), pack_nibbles(quantize_blockwise_int4(w, 16, True).codes))
        True
    """
    _, n, blocks = _block_shape(weight, block_size)
    half = -(-block_size // 2)
    packed = np.empty((n, blocks, half), np.uint8)
    for block, columns, tile in _tiles(weight, block_size):
        scale, zero = _tile_params(tile, symmetric)
        codes = _tile_codes(tile, scale, zero, 2 * half)
        if block_size % 2:
            codes[block_size] = 0  # pack_nibbles pads an odd block with a zero nibble
        high = np.left_shift(codes[1::2], 4)
        packed[columns, block, :] = np.bitwise_or(codes[0::2], high, out=high).T
    return packed


def qdq_codes_int4(weight: np.ndarray, block_size: int, symmetric: bool) -> np.ndarray:
    """The ``[K, N]`` codes of the blocked ``DequantizeLinear`` form, as ml_dtypes int4/uint4.

    Symmetric codes are ``q - 8`` (int4, zero point 0); asymmetric ones are ``q`` (uint4,
    with the zero points of :func:`block_params_int4`). Written tile by tile, in the
    weight's own layout (no transposed copy).

    Example:
        >>> w = np.array([[0.7], [-0.1], [0.35]], np.float32)
        >>> qdq_codes_int4(w, 2, True).astype(np.int8).ravel().tolist()
        [7, -1, 7]
    """
    k, n, _ = _block_shape(weight, block_size)
    dtype = _int4_dtype(symmetric)
    codes = np.empty((k, n), dtype)
    for block, columns, tile in _tiles(weight, block_size):
        scale, zero = _tile_params(tile, symmetric)
        tile_codes = _tile_codes(tile, scale, zero, tile.shape[0])
        if symmetric:
            tile_codes = np.subtract(tile_codes.view(np.int8), np.int8(8), out=tile_codes.view(np.int8))
        rows = slice(block * block_size, block * block_size + tile.shape[0])
        codes[rows, columns] = tile_codes.astype(dtype)
    return codes


#: Weight elements per tile (1 MiB of float32). ``quantize_array`` divides a tile into its own
#: smaller blocks; bigger tiles only save per-tile work (measured on 4096x11008: 64 Ki elements
#: 0.37 s, 256 Ki 0.28 s), at about 1 MiB of temporaries.
_TILE_ELEMENTS = 256 * 1024


def _block_shape(weight: np.ndarray, block_size: int) -> tuple[int, int, int]:
    """``(K, N, blocks)`` of a ``[K, N]`` weight cut into blocks of ``block_size`` rows."""
    shape = np.shape(weight)
    if len(shape) != 2:
        raise ValueError(f"block-wise int4 quantization takes a 2-D [K, N] weight, got shape {list(shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    k, n = (int(d) for d in shape)
    return k, n, -(-k // block_size)


def _tiles(weight: np.ndarray, block_size: int) -> Iterator[tuple[int, slice, np.ndarray]]:
    """``(block, columns, tile)`` over ``weight [K, N]``: one block of rows by a range of columns.

    The tile is the float32 ``weight[block rows, columns]`` (a view when the weight is float32;
    the last block may have fewer than ``block_size`` rows: its padding is never materialized).
    """
    w = np.asarray(weight)
    k, n, blocks = _block_shape(w, block_size)
    width = max(1, _TILE_ELEMENTS // block_size)
    for block in range(blocks):
        rows = slice(block * block_size, min(k, (block + 1) * block_size))
        for start in range(0, n, width):
            columns = slice(start, min(n, start + width))
            tile = w[rows, columns]
            yield block, columns, tile if tile.dtype == np.float32 else tile.astype(np.float32)


def _tile_params(tile: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scales (float32) and zero points (uint8) of the columns of one block tile.

    Padding rows are zeros: they change neither ``max|W|`` nor the range widened to 0, so
    they are left out.
    """
    high = tile.max(axis=0)
    low = tile.min(axis=0)
    if symmetric:
        absmax = np.maximum(high, np.negative(low))  # max |W| without an |W| temporary
        scale = np.where(absmax > 0, absmax / np.float32(7), np.float32(1)).astype(np.float32)
        return scale, np.full(scale.shape, 8, np.uint8)
    low = np.minimum(low, np.float32(0))
    high = np.maximum(high, np.float32(0))
    scale = np.where(high > low, (high - low) / np.float32(15), np.float32(1)).astype(np.float32)
    # The float64 quotient of two float32 values is a half exactly when the exact one is.
    zero = np.rint(np.negative(low, dtype=np.float64) / _divisor(scale))
    return scale, np.clip(zero, 0, 15).astype(np.uint8)


def _divisor(scale: np.ndarray) -> np.ndarray:
    """The scale codes are divided by: 1 where the float32 scale underflowed to 0.

    Such a block's values are a few subnormals: its codes become the zero point, and every
    code dequantizes to 0 through the stored scale 0 anyway.
    """
    return np.where(scale > 0, scale, np.float32(1)).astype(np.float32)


def _tile_codes(tile: np.ndarray, scale: np.ndarray, zero: np.ndarray, rows: int) -> np.ndarray:
    """uint8 codes ``[rows, columns]`` of a tile: ``clip(round(W / s) + z, 0, 15)``; rows past the tile are ``z``.

    ``quantize_array`` rounds the exact quotient half to even; its int8 saturation bounds
    contain ``[0, 15]``, so clipping again to ``[0, 15]`` equals clipping once.
    """
    params = QParams(_divisor(scale), zero.astype(np.int8), "int8", axis=1)
    codes = np.empty((rows, tile.shape[1]), np.int8)
    codes[:tile.shape[0]] = quantize_array(tile, params)
    np.clip(codes[:tile.shape[0]], 0, 15, out=codes[:tile.shape[0]])
    codes[tile.shape[0]:] = zero.astype(np.int8)
    return codes.view(np.uint8)


def dequantize_blockwise(q: BlockQuantized) -> np.ndarray:
    """The ``[K, N]`` float32 weight the codes stand for (the reference of the numeric checks)."""
    values = (q.codes.astype(np.float32) - q.zero_points[..., None].astype(np.float32)) * q.scales[..., None]
    n = values.shape[0]
    return values.reshape(n, -1)[:, :q.k].T.copy()


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values pairwise along the last axis, the first of each pair in the low nibble.

    An odd last axis is padded with a zero nibble.

    Example:
        >>> pack_nibbles(np.array([1, 2, 3], np.uint8)).tolist()
        [33, 3]
    """
    v = np.asarray(values, dtype=np.uint8)
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def _int4_dtype(signed: bool) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.int4 if signed else ml_dtypes.uint4)


@dataclass
class _Candidate:
    node: ir.Node
    a: ir.Value
    weight: ir.Value


class QuantizeInt4(Pass):
    """Quantize large 2-D MatMul weights to 4 bits in blocks (``MatMulNBits`` or int4 QDQ).

    Options: ``block_size`` (rows per block), ``format`` (``matmulnbits`` or ``qdq``),
    ``symmetric`` (scale only, or scale and zero point per block), ``min_elements`` (smaller
    weights stay float), ``method`` (``rtn``: round to nearest; ``gptq``: second-order rounding
    from calibration activations, main graph only), ``exclude`` (regex on node names),
    ``calibration`` (for ``gptq``: anything :func:`graphopt.runtime.open_calibration_data`
    takes, e.g. an ``.npz`` file, a folder or a list of feeds given through
    ``PassContext.options``), ``samples`` (at most this many calibration samples; 0: all),
    ``accuracy_level`` (MatMulNBits compute type: -1 auto, 0 float32, 4 int8 activations).

    Example:
        >>> from graphopt.pipeline import PassManager, PassContext
        >>> PassManager("quantize-int4<block-size=32>", PassContext()).run(model)  # doctest: +SKIP
    """

    name = "quantize-int4"
    opt_level = 3
    requires = frozenset({"shapes-inferred"})
    preserves = frozenset({"topo-sorted"})
    options: ClassVar[dict[str, Any]] = {"block_size": 32, "format": "matmulnbits", "symmetric": 1,
                                         "min_elements": 16384, "method": "rtn", "exclude": "",
                                         "calibration": "", "samples": 0, "accuracy_level": -1}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Quantize every eligible MatMul weight of every graph (a shared weight once)."""
        fmt = str(self.config["format"]).strip().lower()
        if fmt not in FORMATS:
            raise PipelineError(f"pass '{self.name}': format='{fmt}' is unknown; use one of {', '.join(FORMATS)}")
        method = str(self.config["method"]).strip().lower()
        if method not in METHODS:
            raise PipelineError(f"pass '{self.name}': method='{method}' is unknown; use rtn or gptq")
        calibration = self.config["calibration"]
        if method == "gptq" and (calibration is None or (isinstance(calibration, str) and not calibration)):
            raise PipelineError(f"pass '{self.name}': method=gptq needs calibration data; give the option "
                                "calibration (a .npz file, a folder, 'module:function', or feeds in "
                                "PassContext.options['quantize-int4']['calibration'])")
        samples = positive_int(self.config["samples"], "samples", self.name)
        block_size = positive_int(self.config["block_size"], "block_size", self.name, 2)
        if fmt == "matmulnbits" and (block_size < 16 or block_size & (block_size - 1)):
            raise PipelineError(f"pass '{self.name}': MatMulNBits needs block_size a power of two "
                                f"of at least 16, got {block_size}; use 16, 32, 64 or 128")
        symmetric = parse_bool(self.config["symmetric"], "symmetric", self.name)
        accuracy_level = positive_int(self.config["accuracy_level"], "accuracy_level", self.name, -1)
        if accuracy_level > 4:
            raise PipelineError(f"pass '{self.name}': accuracy_level={accuracy_level} is not one of -1 (auto), "
                                "0 (float32 compute), 1-3, 4 (int8 activations)")
        if accuracy_level == -1:
            accuracy_level = 4 if ctx.target == "cpu" else 0
        min_elements = positive_int(self.config["min_elements"], "min_elements", self.name)
        exclude = compile_exclude(str(self.config["exclude"]), self.name)
        counters = {"quantized-matmul": 0, "int4-bytes": 0, "float-bytes": 0}
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if fmt == "qdq" and opset < QDQ_OPSET:
            logger.info("%s: format=qdq needs opset %d (blocked DequantizeLinear), the model has %d; "
                        "nothing quantized (use format=matmulnbits)", self.name, QDQ_OPSET, opset)
            return PassResult(False, counters)
        dtypes = {TensorProto.FLOAT} if ctx.target == "cpu" else {TensorProto.FLOAT, TensorProto.FLOAT16}
        plans: list[tuple[ir.Graph, list[_Candidate], set[int]]] = []
        for graph in [model.graph, *model.graph.subgraphs()]:
            candidates = []
            for node in list(graph):
                reason = _reason(node, fmt, dtypes, exclude, min_elements)
                if reason is None:
                    continue
                if reason:
                    logger.debug("%s: MatMul '%s' kept float: %s", self.name, node.name, reason)
                    continue
                assert node.inputs[0] is not None and node.inputs[1] is not None
                candidates.append(_Candidate(node, node.inputs[0], node.inputs[1]))
            plans.append((graph, candidates, whole_weights([c.weight for c in candidates])))
        hessians = self._hessians(model, plans, calibration, samples, ctx.seed) if method == "gptq" else {}
        for graph, candidates, whole in plans:
            done: dict[tuple[int, int], list[ir.Value]] = {}
            for cand in candidates:
                if id(cand.weight) not in whole:
                    logger.debug("%s: weight '%s' is also read by other nodes; kept float", self.name,
                                 cand.weight.name)
                    continue
                if not ctx.allow_rewrite(f"quantize MatMul '{cand.node.name}' weight '{cand.weight.name}' to int4"):
                    break
                if fmt == "matmulnbits":
                    require_opset(model, CONTRIB_DOMAIN, 1)
                else:
                    model.ir_version = max(model.ir_version, INT4_IR_VERSION)
                key = (id(cand.weight), cand.a.dtype or TensorProto.FLOAT)
                if key not in done:
                    done[key] = self._weights(model, graph, cand, fmt, block_size, symmetric, counters,
                                              hessians.get(id(cand.weight)))
                self._emit(model, graph, cand, fmt, block_size, done[key], accuracy_level)
                counters["quantized-matmul"] += 1
            for cand in candidates:
                remove_if_unused(cand.weight)
        return self._result(model, counters, fmt)

    def _result(self, model: ir.Model, counters: dict[str, int], fmt: str) -> PassResult:
        changed = counters["quantized-matmul"] > 0
        if changed:
            logger.info("%s: %d MatMul weight(s) to 4 bits (%s): %d float bytes -> %d bytes", self.name,
                        counters["quantized-matmul"], fmt, counters["float-bytes"], counters["int4-bytes"])
        return PassResult(changed, counters)

    def _hessians(self, model: ir.Model, plans: list[tuple[ir.Graph, list[_Candidate], set[int]]], calibration: Any,
                  samples: int, seed: int) -> dict[int, np.ndarray]:
        """Per weight (by id): the sum of ``Xᵀ X`` over its readers' inputs (main graph only)."""
        from graphopt.passes.quant._lowp_gptq import collect_hessians

        readers = [c for graph, candidates, whole in plans if graph is model.graph
                   for c in candidates if id(c.weight) in whole]
        if not readers:
            return {}
        sums = collect_hessians(model, [c.a for c in readers], calibration, samples or None, seed)
        result: dict[int, np.ndarray] = {}
        for cand in readers:
            h, _ = sums[cand.a.name]
            result[id(cand.weight)] = result.get(id(cand.weight), 0) + h
        logger.info("%s: GPTQ Hessians from calibration data for %d weight(s)", self.name, len(result))
        return result

    def _weights(self, model: ir.Model, graph: ir.Graph, cand: _Candidate, fmt: str, block_size: int,
                 symmetric: bool, counters: dict[str, int], hessian: np.ndarray | None = None) -> list[ir.Value]:
        tensor = weight_tensor(cand.weight)
        assert tensor is not None
        k, n = tensor.shape
        blocks = -(-k // block_size)
        scale_dtype = cand.a.dtype or TensorProto.FLOAT
        scale_np = np.float16 if scale_dtype == TensorProto.FLOAT16 else np.float32
        name = cand.weight.name
        int4 = TensorProto.INT4 if symmetric else TensorProto.UINT4
        dtype = _int4_dtype(symmetric)
        if hessian is not None:
            from graphopt.passes.quant._lowp_gptq import gptq_quantize

            # GPTQ's result depends on the calibration data: computed once, here.
            solved = BlockQuantized(*gptq_quantize(tensor.numpy(), hessian, block_size, symmetric), k, block_size)

            def packed() -> np.ndarray:
                return pack_nibbles(solved.codes)

            def codes() -> np.ndarray:
                shifted = solved.codes.astype(np.int16) - (8 if symmetric else 0)
                return shifted.reshape(n, -1)[:, :k].T.astype(dtype)

            def params() -> tuple[np.ndarray, np.ndarray]:
                return solved.scales, solved.zero_points
        else:
            # Round to nearest, recomputed tile by tile on every read (nothing weight-sized is kept).
            def packed() -> np.ndarray:
                return pack_blockwise_int4(tensor.numpy(), block_size, symmetric)

            def codes() -> np.ndarray:
                return qdq_codes_int4(tensor.numpy(), block_size, symmetric)

            def params() -> tuple[np.ndarray, np.ndarray]:
                return block_params_int4(tensor.numpy(), block_size, symmetric)

        counters["float-bytes"] += tensor.nbytes
        if fmt == "matmulnbits":
            values = [add_weight(graph, model, f"{name}_int4", packed, TensorProto.UINT8,
                                 (n, blocks, block_size // 2)),
                      add_weight(graph, model, f"{name}_scales",
                                 lambda: params()[0].reshape(-1).astype(scale_np), scale_dtype, (n * blocks,))]
            counters["int4-bytes"] += n * blocks * block_size // 2
            if not symmetric:
                zp_bytes = n * (-(-blocks // 2))
                values.append(add_weight(graph, model, f"{name}_zero_points",
                                         lambda: pack_nibbles(params()[1]).reshape(-1),
                                         TensorProto.UINT8, (zp_bytes,)))
            return values
        values = [add_weight(graph, model, f"{name}_int4", codes, int4, (k, n)),
                  add_weight(graph, model, f"{name}_scales", lambda: params()[0].T.astype(scale_np),
                             scale_dtype, (blocks, n))]
        counters["int4-bytes"] += (k * n + 1) // 2
        if not symmetric:
            values.append(add_weight(graph, model, f"{name}_zero_points",
                                     lambda: params()[1].T.astype(dtype), int4, (blocks, n)))
        return values

    def _emit(self, model: ir.Model, graph: ir.Graph, cand: _Candidate, fmt: str, block_size: int,
              weights: list[ir.Value], accuracy_level: int) -> None:
        node = cand.node
        shape = weights[0].const_value.shape if isinstance(weights[0].const_value, ir.Tensor) else ()
        if fmt == "matmulnbits":
            tensor = weight_tensor(cand.weight)
            assert tensor is not None
            k, n = tensor.shape
            attributes = {"K": int(k), "N": int(n), "bits": 4, "block_size": block_size}
            if accuracy_level:
                attributes["accuracy_level"] = accuracy_level
            transfer_outputs(node, [cand.a, *weights], op_type="MatMulNBits", domain=CONTRIB_DOMAIN,
                             attributes=attributes)
            return
        k, n = shape
        base = node.name or node.outputs[0].name
        dequantized = ir.Value(model.unique_name(f"{cand.weight.name}_dequantized"),
                               ir.TensorType(weights[1].dtype or TensorProto.FLOAT, ir.Shape([k, n])))
        dq = ir.Node("", "DequantizeLinear", weights, attributes={"axis": 0, "block_size": block_size},
                     outputs=[dequantized], name=f"{base}_dequantize")
        graph.insert_before(node, dq)
        node.replace_input(1, dequantized)


def _reason(node: ir.Node, fmt: str, dtypes: set[int], exclude: object, min_elements: int) -> str | None:
    """None for a node that is no MatMul; "" for an eligible one; else why it is not."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    if exclude is not None and node.name and exclude.search(node.name):  # type: ignore[attr-defined]
        return "its name matches exclude"
    a, b = node.inputs[0], node.inputs[1]
    if a is None or a.dtype not in dtypes:
        return f"input A is not {' or '.join(ir.dtype_name(d) for d in sorted(dtypes))}"
    if fmt == "matmulnbits" and (a.shape is None or a.shape.rank < 2):
        return "the rank of input A is unknown or below 2"
    tensor = weight_tensor(b)
    if tensor is None:
        return "B is not a constant initializer"
    if tensor.dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16) or len(tensor.shape) != 2:
        return f"B is not a 2-D float weight (shape {list(tensor.shape)})"
    if tensor.dtype != a.dtype:
        return "A and B differ in element type"
    if tensor.shape[0] * tensor.shape[1] < min_elements:
        return f"B has {tensor.shape[0] * tensor.shape[1]} elements, fewer than min_elements={min_elements}"
    return ""
