"""Evaluating a constant subgraph: onnxruntime first, the onnx reference evaluator as fallback.

onnxruntime computes exactly what the model would compute at run time, so its results are
preferred. It cannot run every operator for every element type, and its Python binding cannot
return some element types (bfloat16, int4, float8e5m2): those subgraphs go to
``onnx.reference.ReferenceEvaluator``. Every result is checked against the ONNX element type
it must have; onnxruntime hands float8e4m3fn back as raw ``uint8`` bits, which are
reinterpreted, never stored as ``uint8``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx

from graphopt import ir
from graphopt.runtime import make_session

__all__ = ["EvaluationFailed", "Evaluated", "evaluate"]

logger = logging.getLogger(__name__)

T = onnx.TensorProto
_ONE_BYTE_FLOATS = frozenset(getattr(T, name) for name in (
    "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0") if hasattr(T, name))


class EvaluationFailed(Exception):
    """Neither evaluator produced correctly typed results (the message says why)."""


@dataclass
class Evaluated:
    """One result: the array and its ONNX element type."""

    array: np.ndarray
    dtype: int


def _ort_dtype(type_string: str) -> Optional[int]:
    """``"tensor(float8e4m3fn)"`` -> ``TensorProto.FLOAT8E4M3FN`` (``None`` for non-tensors)."""
    if not type_string.startswith("tensor(") or not type_string.endswith(")"):
        return None
    name = type_string[len("tensor("):-1].upper()
    return getattr(T, name, None)


def as_onnx_dtype(array: Any, dtype: int) -> Optional[np.ndarray]:
    """``array`` holding elements of ONNX type ``dtype`` (``None`` when it cannot be that type)."""
    array = np.asarray(array)
    if dtype == T.STRING:
        if array.dtype.kind not in "OUS":
            return None
        return array.astype(object)
    try:
        want = np.dtype(ir.numpy_dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None
    if array.dtype == want:
        return array
    if dtype in _ONE_BYTE_FLOATS and array.dtype == np.uint8 and want.itemsize == 1:
        return array.view(want)  # onnxruntime returns float8 tensors as their raw bits
    return None


def _run_onnxruntime(proto: onnx.ModelProto) -> dict[str, Evaluated]:
    import onnxruntime

    session = make_session(proto, optimize=False, threads=1)
    outputs = session.get_outputs()
    quiet = onnxruntime.RunOptions()
    quiet.log_severity_level = 4  # a failing kernel is reported through the exception
    arrays = session.run([o.name for o in outputs], {}, quiet)
    results: dict[str, Evaluated] = {}
    for out, array in zip(outputs, arrays):
        dtype = _ort_dtype(out.type)
        converted = as_onnx_dtype(array, dtype) if dtype is not None else None
        if dtype is None or converted is None:
            raise EvaluationFailed(f"onnxruntime returned '{out.name}' as {np.asarray(array).dtype} "
                                   f"for {out.type}")
        results[out.name] = Evaluated(converted, dtype)
    return results


def _run_reference(proto: onnx.ModelProto, expected: dict[str, Optional[int]]) -> dict[str, Evaluated]:
    from onnx.reference import ReferenceEvaluator

    names = [o.name for o in proto.graph.output]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        arrays = ReferenceEvaluator(proto).run(names, {})
    results: dict[str, Evaluated] = {}
    for name, array in zip(names, arrays):
        if not isinstance(array, (np.ndarray, np.generic)):
            raise EvaluationFailed(f"the reference evaluator returned {type(array).__name__} for '{name}'")
        array = np.asarray(array)
        dtype = expected.get(name)
        if dtype is None:
            try:
                dtype = int(onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
            except (KeyError, TypeError, ValueError):
                raise EvaluationFailed(f"no ONNX type for the reference result of '{name}' "
                                       f"({array.dtype})") from None
        converted = as_onnx_dtype(array, dtype)
        if converted is None:
            raise EvaluationFailed(f"the reference evaluator returned '{name}' as {array.dtype}, "
                                   f"not {ir.dtype_name(dtype)}")
        results[name] = Evaluated(converted, dtype)
    return results


def evaluate(proto: onnx.ModelProto, expected: dict[str, Optional[int]], *,
             fallback: bool = True) -> dict[str, Evaluated]:
    """Run a model without inputs; results by output name, typed as ``expected`` says.

    ``expected`` maps output names to the ONNX element type each must have (``None``: any).
    With ``fallback`` the reference evaluator runs what onnxruntime cannot.

    Raises:
        EvaluationFailed: both evaluators failed or returned results of the wrong type.

    Example:
        >>> evaluate(proto, {"y": onnx.TensorProto.FLOAT})["y"].array  # doctest: +SKIP
        array([2., 4.], dtype=float32)
    """
    reasons = []
    runners = [("onnxruntime", lambda: _run_onnxruntime(proto))]
    if fallback:
        runners.append(("reference evaluator", lambda: _run_reference(proto, expected)))
    for name, runner in runners:
        try:
            results = runner()
        except Exception as exc:  # noqa: BLE001 - each evaluator raises its own exception types
            reasons.append(f"{name}: {_first_line(exc)}")
            continue
        wrong = [f"'{k}' is {ir.dtype_name(r.dtype)}, expected {ir.dtype_name(expected[k])}"
                 for k, r in results.items() if expected.get(k) is not None and expected[k] != r.dtype]
        if wrong:
            reasons.append(f"{name}: {'; '.join(wrong)}")
            continue
        return results
    raise EvaluationFailed("; ".join(reasons))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
