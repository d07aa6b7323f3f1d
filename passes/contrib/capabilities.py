"""Which onnxruntime contrib ops (domain ``com.microsoft``) each execution provider runs.

The contrib fusions emit an op only where the chosen target's execution provider has a kernel
for it, so that the optimized model loads where it is meant to run. This module answers that
question with :func:`provider_supports`.

How the answer is found:

* **Probed** (the CPU provider, and the CUDA provider where ``onnxruntime-gpu`` and a GPU are
  present): for every op the fusions can emit, a tiny one-node model is built and an
  ``InferenceSession`` is created and run on that provider alone, with graph optimizations off
  (and, for CUDA, with the CPU fallback disabled, so a node that CUDA cannot take fails instead
  of silently running on the CPU). An op is supported for an element type when that session
  loads and runs. ``FusedConv`` is probed once per activation, because onnxruntime accepts the
  op but rejects unknown activations when the session is created.
* **Static** (CUDA without a GPU): the table :data:`STATIC_CUDA_CAPABILITIES`, transcribed from
  onnxruntime's CUDA contrib kernel registrations (``cuda_contrib_kernels.cc``) for the ops the
  fusions emit. The CUDA ``FusedConv`` kernel takes only ``Relu`` (cuDNN's fused
  convolution-bias-activation), with the optional ``Z`` input.

Results are probed once per process and target.

Example:
    >>> from onnx import TensorProto
    >>> provider_supports("cpu", "FusedMatMul")
    True
    >>> provider_supports("cpu", "BiasAdd")          # a CUDA-only kernel
    False
    >>> provider_supports("cuda", "FusedConv", dtype=TensorProto.FLOAT)
    True
    >>> sorted(fused_conv_activations("cuda"))
    ['Relu']
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx
import onnx.helper as oh
from onnx import TensorProto

from graphopt.errors import PipelineError
from graphopt.pipeline import TARGETS
from graphopt.runtime import PROVIDERS, session_options

__all__ = ["CONTRIB_DOMAIN", "CONTRIB_OPSET", "FUSED_CONV_ACTIVATIONS", "PROBED_OPS", "OpSupport",
           "ProviderCapabilities", "STATIC_CUDA_CAPABILITIES", "capabilities", "probe_provider",
           "provider_supports", "fused_conv_activations", "format_table"]

logger = logging.getLogger(__name__)

#: The domain of onnxruntime's contrib ops.
CONTRIB_DOMAIN = "com.microsoft"
#: The version of the ``com.microsoft`` opset every op below was introduced in (and is emitted at).
CONTRIB_OPSET = 1
#: The activations the CPU ``FusedConv`` kernel knows (MLAS activations), with their parameters.
FUSED_CONV_ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid")

_FLOAT = TensorProto.FLOAT
_FLOAT16 = TensorProto.FLOAT16
_DOUBLE = TensorProto.DOUBLE
_BFLOAT16 = TensorProto.BFLOAT16


@dataclass(frozen=True)
class OpSupport:
    """One op a provider runs: its domain, the contrib opset version, and the element types.

    Attributes:
        op_type: e.g. ``"FusedConv"``.
        domain: ``"com.microsoft"`` for contrib ops.
        since_version: the opset version of ``domain`` the kernel is registered for.
        dtypes: ``onnx.TensorProto`` element types with a kernel.
    """

    op_type: str
    domain: str
    since_version: int
    dtypes: frozenset[int]


@dataclass(frozen=True)
class ProviderCapabilities:
    """The contrib ops one execution provider runs.

    Attributes:
        target: graphopt's name of the target (``"cpu"``, ``"cuda"``).
        provider: onnxruntime's name of the execution provider.
        source: ``"probed"`` (sessions created on the provider) or ``"static"`` (the table).
        ops: ``(domain, op_type)`` -> :class:`OpSupport`.
        fused_conv_activations: the ``activation`` values ``FusedConv`` accepts.
    """

    target: str
    provider: str
    source: str
    ops: Mapping[tuple[str, str], OpSupport] = field(default_factory=dict)
    fused_conv_activations: frozenset[str] = frozenset()

    def supports(self, op_type: str, domain: str = CONTRIB_DOMAIN, dtype: int | None = None) -> bool:
        """True when ``domain::op_type`` has a kernel (for ``dtype`` when given)."""
        support = self.ops.get((domain, op_type))
        if support is None:
            return False
        return dtype is None or dtype in support.dtypes


def _static(op_type: str, *dtypes: int) -> tuple[tuple[str, str], OpSupport]:
    return (CONTRIB_DOMAIN, op_type), OpSupport(op_type, CONTRIB_DOMAIN, CONTRIB_OPSET, frozenset(dtypes))


#: The CUDA provider's kernels for the ops the fusions emit, from onnxruntime's
#: ``onnxruntime/contrib_ops/cuda/cuda_contrib_kernels.cc`` (used when CUDA cannot be probed).
STATIC_CUDA_CAPABILITIES = ProviderCapabilities(
    target="cuda",
    provider=PROVIDERS["cuda"],
    source="static",
    ops=dict([
        _static("FusedConv", _FLOAT),
        _static("FusedMatMul", _FLOAT, _DOUBLE, _FLOAT16, _BFLOAT16),
        _static("Gelu", _FLOAT, _DOUBLE, _FLOAT16, _BFLOAT16),
        _static("BiasGelu", _FLOAT, _DOUBLE, _FLOAT16, _BFLOAT16),
        _static("FastGelu", _FLOAT, _FLOAT16, _BFLOAT16),
        _static("SkipLayerNormalization", _FLOAT, _FLOAT16),
        _static("SkipSimplifiedLayerNormalization", _FLOAT, _FLOAT16),
        _static("Attention", _FLOAT, _FLOAT16),
        _static("MultiHeadAttention", _FLOAT, _FLOAT16),
        _static("BiasAdd", _FLOAT, _FLOAT16),
        _static("QuickGelu", _FLOAT, _DOUBLE, _FLOAT16),
    ]),
    fused_conv_activations=frozenset({"Relu"}),
)


# -- probe models ---------------------------------------------------------------------------------
def _random(shape: tuple[int, ...], dtype: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal(shape).astype(onnx.helper.tensor_dtype_to_np_dtype(dtype))


@dataclass(frozen=True)
class _Probe:
    """A one-node model exercising an op: input shapes (fed) and attributes."""

    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    attributes: Mapping[str, object] = field(default_factory=dict)


_HIDDEN = 4
_PROBES: dict[str, _Probe] = {
    "FusedConv": _Probe((("X", (1, 2, 3, 3)), ("W", (2, 2, 1, 1)), ("B", (2,))), {"activation": "Relu"}),
    "FusedMatMul": _Probe((("A", (2, 3)), ("B", (2, 3))), {"transB": 1, "alpha": 0.5}),
    "Gelu": _Probe((("X", (2, _HIDDEN)),)),
    "BiasGelu": _Probe((("A", (2, _HIDDEN)), ("B", (_HIDDEN,)))),
    "FastGelu": _Probe((("X", (2, _HIDDEN)), ("bias", (_HIDDEN,)))),
    "SkipLayerNormalization": _Probe((("input", (1, 2, _HIDDEN)), ("skip", (1, 2, _HIDDEN)),
                                      ("gamma", (_HIDDEN,)), ("beta", (_HIDDEN,))), {"epsilon": 1e-5}),
    "SkipSimplifiedLayerNormalization": _Probe((("input", (1, 2, _HIDDEN)), ("skip", (1, 2, _HIDDEN)),
                                                ("gamma", (_HIDDEN,))), {"epsilon": 1e-5}),
    "Attention": _Probe((("input", (1, 2, _HIDDEN)), ("weights", (_HIDDEN, 3 * _HIDDEN)),
                         ("bias", (3 * _HIDDEN,))), {"num_heads": 2}),
    "MultiHeadAttention": _Probe((("query", (1, 2, _HIDDEN)), ("key", (1, 2, _HIDDEN)),
                                  ("value", (1, 2, _HIDDEN))), {"num_heads": 2}),
    "BiasAdd": _Probe((("X", (1, 2, _HIDDEN)), ("bias", (_HIDDEN,)), ("skip", (1, 2, _HIDDEN)))),
    "QuickGelu": _Probe((("X", (2, _HIDDEN)),), {"alpha": 1.0}),
}
#: The ops probed on every provider: exactly those the contrib fusions can emit.
PROBED_OPS = tuple(_PROBES)

#: Extra attributes and inputs of FusedConv per activation (``activation_params``).
_ACTIVATION_PARAMS: dict[str, list[float]] = {"LeakyRelu": [0.01], "Clip": [-1.0, 1.0],
                                             "HardSigmoid": [0.2, 0.5]}


def _probe_model(op_type: str, dtype: int, attributes: Mapping[str, object] | None = None) -> tuple[bytes, dict]:
    probe = _PROBES[op_type]
    attrs = dict(probe.attributes)
    attrs.update(attributes or {})
    names = [name for name, _ in probe.inputs]
    inputs = [oh.make_tensor_value_info(name, dtype, list(shape)) for name, shape in probe.inputs]
    node = oh.make_node(op_type, names, ["Y"], domain=CONTRIB_DOMAIN, **attrs)
    graph = oh.make_graph([node], f"probe_{op_type}", inputs, [oh.make_tensor_value_info("Y", dtype, None)])
    model = oh.make_model(graph, ir_version=8, opset_imports=[oh.make_opsetid("", 17),
                                                             oh.make_opsetid(CONTRIB_DOMAIN, CONTRIB_OPSET)])
    feeds = {name: _random(shape, dtype) for name, shape in probe.inputs}
    return model.SerializeToString(), feeds


def _session_runs(provider: str, model: bytes, feeds: dict) -> bool:
    """True when a session of ``model`` on ``provider`` alone (no CPU fallback) loads and runs."""
    import onnxruntime as ort

    options = session_options(only_provider=provider, log_severity=4)
    try:
        session = ort.InferenceSession(model, options, providers=[provider])
        session.run(None, feeds)
    except Exception as exc:  # onnxruntime's errors share no base class: any failure means "no"
        logger.debug("probe on %s failed: %s", provider, " ".join(str(exc).split())[:200])
        return False
    return True


def _probe_dtypes(target: str) -> tuple[int, ...]:
    # The CPU kernels the fusions use are float32 (float16 models "load" on the CPU only because
    # onnxruntime wraps the node in Casts, which is slower, not a kernel); GPUs run float16 too.
    return (_FLOAT,) if target == "cpu" else (_FLOAT, _FLOAT16)


def probe_provider(target: str, runs: Callable[[str, bytes, dict], bool] = _session_runs) -> ProviderCapabilities | None:
    """Probe the provider of ``target`` with one tiny session per op; ``None`` if it is absent.

    Args:
        target: ``"cpu"`` or ``"cuda"``.
        runs: ``runs(provider, model_bytes, feeds) -> bool`` (tests replace it to stay fast).
    """
    import onnxruntime as ort

    provider = _provider(target)
    if provider not in ort.get_available_providers():
        return None
    ops: dict[tuple[str, str], OpSupport] = {}
    for op_type in PROBED_OPS:
        dtypes = frozenset(d for d in _probe_dtypes(target) if runs(provider, *_probe_model(op_type, d)))
        if dtypes:
            ops[(CONTRIB_DOMAIN, op_type)] = OpSupport(op_type, CONTRIB_DOMAIN, CONTRIB_OPSET, dtypes)
    activations: set[str] = set()
    if (CONTRIB_DOMAIN, "FusedConv") in ops:
        for activation in FUSED_CONV_ACTIVATIONS:
            attrs: dict[str, object] = {"activation": activation}
            if activation in _ACTIVATION_PARAMS:
                attrs["activation_params"] = _ACTIVATION_PARAMS[activation]
            if runs(provider, *_probe_model("FusedConv", _FLOAT, attrs)):
                activations.add(activation)
    logger.debug("probed %s: %s", provider, ", ".join(sorted(op for _, op in ops)))
    return ProviderCapabilities(target, provider, "probed", ops, frozenset(activations))


def _provider(target: str) -> str:
    if target not in TARGETS:
        raise PipelineError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    return PROVIDERS[target]


@functools.cache
def capabilities(target: str) -> ProviderCapabilities:
    """The contrib ops ``target`` runs: probed when its provider is present, else the static table.

    A target whose provider is absent and that has no static table supports nothing (so no
    contrib op is emitted for it).
    """
    probed = probe_provider(target)
    if probed is not None:
        return probed
    if target == "cuda":
        return STATIC_CUDA_CAPABILITIES
    return ProviderCapabilities(target, _provider(target), "static")


def provider_supports(target: str, op_type: str, domain: str = CONTRIB_DOMAIN, dtype: int | None = None) -> bool:
    """True when ``target``'s execution provider has a kernel for ``domain::op_type``.

    Args:
        target: ``"cpu"`` or ``"cuda"`` (``PassContext.target``).
        op_type: e.g. ``"SkipLayerNormalization"``.
        domain: the op's domain (contrib ops by default).
        dtype: an ``onnx.TensorProto`` element type the kernel must accept, or ``None`` for any.

    Example:
        >>> provider_supports("cpu", "SkipLayerNormalization", dtype=onnx.TensorProto.FLOAT)
        True
    """
    return capabilities(target).supports(op_type, domain, dtype)


def fused_conv_activations(target: str) -> frozenset[str]:
    """The ``activation`` values the target's ``FusedConv`` kernel accepts (empty without one)."""
    return capabilities(target).fused_conv_activations


def format_table(targets: tuple[str, ...] = TARGETS) -> str:
    """The capability table as aligned text: one row per op, one column per target.

    Example:
        >>> print(format_table())  # doctest: +SKIP
        op                                 cpu (probed)    cuda (static)
        com.microsoft::FusedConv v1        float           float
    """
    caps = [capabilities(t) for t in targets]
    header = ["op"] + [f"{c.target} ({c.source})" for c in caps]
    rows = [header]
    for op_type in PROBED_OPS:
        row = [f"{CONTRIB_DOMAIN}::{op_type} v{CONTRIB_OPSET}"]
        for cap in caps:
            support = cap.ops.get((CONTRIB_DOMAIN, op_type))
            row.append(",".join(sorted(onnx.helper.tensor_dtype_to_string(d).removeprefix("TensorProto.").lower()
                                       for d in support.dtypes)) if support else "-")
        rows.append(row)
    rows.append(["FusedConv activations"] + [",".join(sorted(c.fused_conv_activations)) or "-" for c in caps])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
