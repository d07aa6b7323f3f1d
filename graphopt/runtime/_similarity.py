"""How close a quantized model's outputs stay to the float model's: cosine, SQNR, top-1, max error.

Also loads user metrics given as ``module:function`` (the accuracy budget of ``graphopt
quantize`` can be measured with one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.runtime._calib_data import load_callable

__all__ = ["load_metric", "output_similarity"]


def _as_list(arrays: Sequence[Any] | Mapping[str, Any]) -> list[np.ndarray]:
    if isinstance(arrays, Mapping):
        return [np.asarray(a) for a in arrays.values()]
    return [np.asarray(a) for a in arrays]


def output_similarity(reference: Sequence[np.ndarray] | Mapping[str, np.ndarray],
                      candidate: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Compare candidate outputs with reference outputs, pair by pair.

    Args:
        reference: arrays of the reference (float) model, e.g. one per held-out sample and
            output; a dict is read in its order.
        candidate: the arrays of the model under test, in the same order and shapes.

    Returns:
        A dict with ``cosine`` (mean over pairs of the cosine similarity of the flattened
        arrays), ``cosine_min``, ``sqnr_db`` (signal-to-quantization-noise ratio over all pairs;
        ``inf`` when identical), ``max_abs``, ``top1_agreement`` (the share of rows whose
        argmax over the last axis agrees, for float arrays whose last axis has at least 2
        entries; ``None`` otherwise) and ``pairs``.

    Raises:
        GraphoptError: different numbers of arrays, or a pair of different shapes.

    Example:
        >>> a = [np.array([[1.0, 2.0, 3.0]])]
        >>> output_similarity(a, [np.array([[1.0, 2.0, 2.9]])])["top1_agreement"]
        1.0
    """
    ref, cand = _as_list(reference), _as_list(candidate)
    if len(ref) != len(cand):
        raise GraphoptError(f"cannot compare {len(cand)} candidate arrays with {len(ref)} reference arrays")
    if not ref:
        raise GraphoptError("no outputs to compare")
    cosines: list[float] = []
    signal = noise = 0.0
    max_abs = 0.0
    agree = rows = 0
    for i, (r, c) in enumerate(zip(ref, cand)):
        if r.shape != c.shape:
            raise GraphoptError(f"output {i}: candidate shape {list(c.shape)} differs from the "
                                f"reference {list(r.shape)}")
        if r.dtype.kind not in "fiub" or c.dtype.kind not in "fiub":
            raise GraphoptError(f"output {i}: cannot compare {r.dtype} values numerically")
        rf = r.astype(np.float64).reshape(-1)
        cf = c.astype(np.float64).reshape(-1)
        finite = np.isfinite(rf) & np.isfinite(cf)
        rf, cf = rf[finite], cf[finite]
        if rf.size == 0:
            continue
        diff = cf - rf
        signal += float(rf @ rf)
        noise += float(diff @ diff)
        max_abs = max(max_abs, float(np.max(np.abs(diff))))
        norm = float(np.linalg.norm(rf) * np.linalg.norm(cf))
        if norm > 0:
            cosines.append(float(rf @ cf) / norm)
        else:
            cosines.append(1.0 if not np.any(rf) and not np.any(cf) else 0.0)
        if r.dtype.kind == "f" and r.ndim >= 1 and r.shape[-1] >= 2:
            r2 = r.reshape(-1, r.shape[-1])
            c2 = c.reshape(-1, c.shape[-1])
            agree += int(np.sum(np.argmax(r2, axis=-1) == np.argmax(c2, axis=-1)))
            rows += r2.shape[0]
    if noise == 0:
        sqnr = math.inf
    elif signal == 0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    return {
        "cosine": float(np.mean(cosines)) if cosines else 1.0,
        "cosine_min": float(np.min(cosines)) if cosines else 1.0,
        "sqnr_db": sqnr,
        "max_abs": max_abs,
        "top1_agreement": agree / rows if rows else None,
        "pairs": len(ref),
    }


def load_metric(spec: str) -> Callable[..., Any]:
    """Import a user metric given as ``module:function`` or ``path/to/file.py:function``.

    The metric is called by the accuracy check as ``metric(reference_outputs, candidate_outputs)``
    and returns a number (higher is better).

    Raises:
        GraphoptError: the module cannot be imported, or the function is missing or not callable.

    Example:
        >>> metric = load_metric("mymetrics:f1_score")  # doctest: +SKIP
    """
    return load_callable(spec, what="metric")
