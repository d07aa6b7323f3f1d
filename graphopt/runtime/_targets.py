"""What the target runtime accepts, and how a model is made to fit it before it is written.

onnx 1.23 stamps IR version 14 on new models while onnxruntime 1.31 loads at most IR 13 and
opset 26. Before writing, graphopt lowers the IR version to the newest the runtime accepts, as
long as the model uses nothing that needs a newer one (element types, opsets), and refuses with a
clear message otherwise.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import onnx

from graphopt.errors import EmitError
from graphopt.ir import Model, Tensor, TensorType

__all__ = ["RuntimeLimits", "runtime_limits", "required_ir_version", "fit_to_runtime"]

logger = logging.getLogger(__name__)

# The IR version that introduced each element type (from onnx.proto's version notes).
_DTYPE_MIN_IR = {
    onnx.TensorProto.FLOAT8E4M3FN: 9, onnx.TensorProto.FLOAT8E4M3FNUZ: 9,
    onnx.TensorProto.FLOAT8E5M2: 9, onnx.TensorProto.FLOAT8E5M2FNUZ: 9,
    onnx.TensorProto.UINT4: 10, onnx.TensorProto.INT4: 10, onnx.TensorProto.FLOAT4E2M1: 11,
}
for _name, _ir in (("FLOAT8E8M0", 12), ("UINT2", 13), ("INT2", 13), ("FLOAT6E2M3", 14), ("FLOAT6E3M2", 14)):
    if hasattr(onnx.TensorProto, _name):
        _DTYPE_MIN_IR[getattr(onnx.TensorProto, _name)] = _ir


@dataclass(frozen=True)
class RuntimeLimits:
    """The newest IR version and default-domain opset the installed onnxruntime loads."""

    max_ir_version: int
    max_opset: int


def _loads(ir_version: int, opset: int) -> bool:
    import onnxruntime as ort

    h = onnx.helper
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "probe",
                     [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=ir_version)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return True
    except Exception:  # onnxruntime raises its own exception types for refusals
        return False


@functools.lru_cache(maxsize=1)
def runtime_limits() -> RuntimeLimits:
    """Probe the installed onnxruntime once (a few tiny sessions) for its IR and opset limits."""
    newest_ir = onnx.IR_VERSION
    max_ir = next((ir for ir in range(newest_ir, 6, -1) if _loads(ir, 13)), 7)
    newest_opset = onnx.defs.onnx_opset_version()
    max_opset = next((op for op in range(newest_opset, 12, -1) if _loads(max_ir, op)), 13)
    limits = RuntimeLimits(max_ir, max_opset)
    logger.debug("onnxruntime accepts %s", limits)
    return limits


def required_ir_version(model: Model) -> int:
    """The lowest IR version that can express ``model`` (its opsets and element types)."""
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    need = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    if any(f.overload for f in model.functions.values()) or any(n.overload for n in model.all_nodes()):
        need = max(need, 10)
    for g in model.all_graphs():
        for v in list(g.initializers.values()) + list(g.inputs) + list(g.outputs) + list(g.value_info):
            dtype = v.const_value.dtype if isinstance(v.const_value, Tensor) else (
                v.type.dtype if isinstance(v.type, TensorType) else None)
            if dtype is not None:
                need = max(need, _DTYPE_MIN_IR.get(dtype, 3))
        for n in g:
            for a in n.attributes.values():
                if isinstance(a.value, Tensor):
                    need = max(need, _DTYPE_MIN_IR.get(a.value.dtype, 3))
                elif a.name == "to" and isinstance(a.value, int) and n.op_type in ("Cast", "CastLike"):
                    need = max(need, _DTYPE_MIN_IR.get(a.value, 3))
    return need


def fit_to_runtime(model: Model, limits: RuntimeLimits | None = None) -> list[str]:
    """Lower the model's IR version to what onnxruntime loads; return what was changed.

    Raises:
        EmitError: the model needs a newer IR version or opset than the runtime accepts.
    """
    limits = limits or runtime_limits()
    changes: list[str] = []
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is not None and opset > limits.max_opset:
        raise EmitError(
            f"the model uses opset {opset}, but the installed onnxruntime runs at most opset "
            f"{limits.max_opset}; convert it first (onnx.version_converter) or upgrade onnxruntime")
    if model.ir_version > limits.max_ir_version:
        need = required_ir_version(model)
        if need > limits.max_ir_version:
            raise EmitError(
                f"the model needs IR version {need} (for its element types or opsets), but the "
                f"installed onnxruntime loads at most IR {limits.max_ir_version}")
        changes.append(f"ir_version {model.ir_version} -> {limits.max_ir_version}")
        model.ir_version = limits.max_ir_version
    return changes
