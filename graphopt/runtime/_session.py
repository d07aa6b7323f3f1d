"""Running models in onnxruntime: sessions, seeded inputs, and output comparison.

Used by the numeric checks of golden tests, ``--verify-each=numeric`` and ``graphopt verify``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

__all__ = ["make_session", "session_options", "random_inputs", "run_model", "compare_outputs", "OutputDiff",
           "Comparison", "max_ir_version", "PROVIDERS"]

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

def max_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime accepts (probed once)."""
    from graphopt.runtime._targets import runtime_limits

    return runtime_limits().max_ir_version


def session_options(*, optimize: bool = False, threads: int = 1, only_provider: str | None = None,
                    log_severity: int = 3) -> Any:
    """onnxruntime ``SessionOptions``: all graph optimizations or none, ``threads`` intra-op
    threads, one inter-op thread, warnings silenced (graphopt reports what matters itself).

    ``only_provider`` (an execution provider name) forbids falling back to the CPU provider for
    nodes it cannot run, so a probe session fails instead of silently running elsewhere;
    ``log_severity`` 4 also silences the errors such an expected failure logs.

    Example:
        >>> so = session_options(optimize=True, threads=1)  # doctest: +SKIP
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = log_severity
    if only_provider is not None and only_provider != PROVIDERS["cpu"]:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return so


def make_session(model: onnx.ModelProto | bytes | str, *, target: str = "cpu",
                 optimize: bool = False, threads: int = 1) -> Any:
    """An ``InferenceSession`` on ``target`` with graph optimizations off unless ``optimize``."""
    import onnxruntime as ort

    so = session_options(optimize=optimize, threads=threads)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    providers = [PROVIDERS[target]] + (["CPUExecutionProvider"] if target != "cpu" else [])
    return ort.InferenceSession(data, so, providers=providers)


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}


def random_inputs(session: Any, *, seed: int = 0, dims: Mapping[str, int] | None = None,
                  default_dim: int = 2) -> dict[str, np.ndarray]:
    """Seeded inputs for every session input; symbolic dims from ``dims`` or ``default_dim``.

    Floats are standard normal, integers small non-negative (safe as indices), booleans random.
    """
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else dims.get(str(d), default_dim) for d in inp.shape]
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise ValueError(f"cannot generate input '{inp.name}' of type {inp.type}")
        if dtype is np.bool_:
            arr = np.asarray(rng.random(shape) > 0.5)  # a 0-d comparison gives a numpy scalar
        elif np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.str_:
            arr = np.array(rng.choice(["a", "b", "c"], size=shape), dtype=object)
        else:
            arr = rng.integers(0, 3, size=shape).astype(dtype)
        feeds[inp.name] = arr
    return feeds


def run_model(model: onnx.ModelProto | bytes, feeds: Mapping[str, np.ndarray], *,
              target: str = "cpu", optimize: bool = False) -> dict[str, Any]:
    """Run ``model`` once; returns outputs by name."""
    sess = make_session(model, target=target, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    outs = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, outs))


@dataclass
class OutputDiff:
    """How one output differs: max abs/rel error, cosine similarity, and pass/fail."""

    name: str
    max_abs: float
    max_rel: float
    cosine: float
    ok: bool
    reason: str = ""


@dataclass
class Comparison:
    """The comparison of two runs, output by output."""

    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every output matched."""
        return all(o.ok for o in self.outputs)

    def first_failure(self) -> OutputDiff | None:
        """The first mismatching output, if any."""
        return next((o for o in self.outputs if not o.ok), None)

    def summary(self) -> str:
        """One line per failing output (empty when all match)."""
        return "; ".join(f"{o.name}: {o.reason}" for o in self.outputs if not o.ok)


def compare_outputs(expected: Mapping[str, Any], actual: Mapping[str, Any], *, rtol: float = 1e-4,
                    atol: float = 1e-5, names: Sequence[str] | None = None) -> Comparison:
    """Compare two sets of outputs with ``|a - e| <= atol + rtol * |e|`` (NaN equals NaN)."""
    result = Comparison()
    for name in names or list(expected):
        e = expected.get(name)
        a = actual.get(name)
        if a is None:
            result.outputs.append(OutputDiff(name, float("inf"), float("inf"), 0.0, False, "missing"))
            continue
        result.outputs.append(_diff(name, e, a, rtol, atol))
    return result


def _diff(name: str, e: Any, a: Any, rtol: float, atol: float) -> OutputDiff:
    if isinstance(e, list) or isinstance(a, list):  # sequence outputs
        if not isinstance(e, list) or not isinstance(a, list) or len(e) != len(a):
            return OutputDiff(name, float("inf"), float("inf"), 0.0, False, "sequence length differs")
        parts = [_diff(name, x, y, rtol, atol) for x, y in zip(e, a)]
        bad = next((p for p in parts if not p.ok), None)
        return bad or OutputDiff(name, max([p.max_abs for p in parts] or [0.0]),
                                 max([p.max_rel for p in parts] or [0.0]), 1.0, True)
    if e is None or a is None:
        ok = e is None and a is None
        return OutputDiff(name, 0.0 if ok else float("inf"), 0.0, 1.0, ok, "" if ok else "one side is None")
    e = np.asarray(e)
    a = np.asarray(a)
    if e.shape != a.shape:
        return OutputDiff(name, float("inf"), float("inf"), 0.0, False, f"shape {a.shape} != {e.shape}")
    if e.dtype != a.dtype:
        return OutputDiff(name, float("inf"), float("inf"), 0.0, False, f"dtype {a.dtype} != {e.dtype}")
    if e.dtype.kind in "OUS":
        ok = bool(np.array_equal(e, a))
        return OutputDiff(name, 0.0 if ok else 1.0, 0.0, 1.0, ok, "" if ok else "strings differ")
    if e.size == 0:
        return OutputDiff(name, 0.0, 0.0, 1.0, True)
    ef = e.astype(np.float64)
    af = a.astype(np.float64)
    both_nan = np.isnan(ef) & np.isnan(af)
    same_inf = np.isinf(ef) & (ef == af)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(both_nan | same_inf, 0.0, np.abs(af - ef))
        err = np.where(np.isnan(err), np.inf, err)
        rel = err / np.maximum(np.abs(ef), 1e-12)
        bad = err > atol + rtol * np.abs(np.where(np.isfinite(ef), ef, 0.0))
        finite = np.isfinite(ef) & np.isfinite(af)
        num = float(np.sum(ef[finite] * af[finite]))
        den = float(np.linalg.norm(ef[finite]) * np.linalg.norm(af[finite]))
    cosine = num / den if den > 0 else 1.0
    ok = not bool(np.any(bad))
    max_abs = float(np.max(err))
    reason = "" if ok else f"max abs error {max_abs:.3g} exceeds atol={atol:g} + rtol={rtol:g}*|expected|"
    return OutputDiff(name, max_abs, float(np.max(rel)), cosine, ok, reason)
