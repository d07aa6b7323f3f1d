"""Did onnxruntime fuse the QDQ units? Open the model, read the optimized graph back, count.

onnxruntime's graph transformers (at ``ORT_ENABLE_EXTENDED`` and above) replace each fusable
``DequantizeLinear → op → QuantizeLinear`` group by one integer kernel. What is left is:

* **boundary** conversions, which a quantized model needs: a ``QuantizeLinear`` feeding
  integer kernels (float → int at the entry of a quantized region) and a
  ``DequantizeLinear`` reading an integer kernel's output (int → float at its exit);
* **unfused** nodes, which only cost time: a ``QuantizeLinear`` read by a
  ``DequantizeLinear`` (a float round trip nothing consumed as integers), and a
  ``DequantizeLinear`` of a constant weight (the op it feeds runs in float).

The optimized model is written to a temporary folder (weights as external data, so models
over 2 GB work) and read back without its weights.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx

from graphopt.errors import GraphoptError
from graphopt.runtime._session import session_options

__all__ = ["INTEGER_KERNELS", "FusionReport", "check_fusion", "fusion_report"]

logger = logging.getLogger(__name__)

#: Ops that compute on integers: what fused QDQ units become.
INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QAttention",
    "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits", "DynamicQuantizeLSTM",
    "QEmbedLayerNormalization", "QOrderedMatMul", "NhwcQLinearConv", "QLinearConvTranspose",
})
#: Ops that pass integers through unchanged once onnxruntime dropped the DQ/Q around them.
_INTEGER_PASS_THROUGH = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                                   "Gather", "Slice", "Resize", "Identity", "Expand", "Split",
                                   "DepthToSpace", "SpaceToDepth", "NhwcMaxPool"})
_QUANTIZE = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
_DEQUANTIZE = frozenset({"DequantizeLinear"})


@dataclass
class FusionReport:
    """What onnxruntime's optimized graph holds.

    Attributes:
        fused: integer kernels by op type (``{"QLinearConv": 3, ...}``).
        unfused_quantize: QuantizeLinear nodes read by a DequantizeLinear (float round trips).
        unfused_dequantize: DequantizeLinear nodes that feed float ops from a round trip or a
            constant weight.
        boundary_quantize: QuantizeLinear nodes feeding integer kernels.
        boundary_dequantize: DequantizeLinear nodes after integer kernels.
        unfused_nodes: names of the unfused nodes (at most 50).
        ops: every op type of the optimized graph with its count.
    """

    fused: dict[str, int] = field(default_factory=dict)
    unfused_quantize: int = 0
    unfused_dequantize: int = 0
    boundary_quantize: int = 0
    boundary_dequantize: int = 0
    unfused_nodes: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def unfused(self) -> int:
        """Q and DQ nodes that stayed unfused."""
        return self.unfused_quantize + self.unfused_dequantize

    @property
    def fused_total(self) -> int:
        """Integer kernels in the optimized graph."""
        return sum(self.fused.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"fused": dict(self.fused), "fused_total": self.fused_total, "unfused": self.unfused,
                "unfused_quantize": self.unfused_quantize, "unfused_dequantize": self.unfused_dequantize,
                "boundary_quantize": self.boundary_quantize,
                "boundary_dequantize": self.boundary_dequantize,
                "unfused_nodes": list(self.unfused_nodes), "ops": dict(self.ops)}

    def summary(self) -> str:
        """One line: fused kernels and unfused Q/DQ."""
        kinds = ", ".join(f"{n} {op}" for op, n in sorted(self.fused.items())) or "none"
        return (f"{self.fused_total} integer kernel(s) ({kinds}); {self.unfused} Q/DQ node(s) unfused, "
                f"{self.boundary_quantize + self.boundary_dequantize} at float/int boundaries")


def check_fusion(model: str | os.PathLike | onnx.ModelProto, *, target: str = "cpu") -> FusionReport:
    """Let onnxruntime optimize ``model`` (a path or proto) and count fused and unfused Q/DQ.

    Raises:
        GraphoptError: onnxruntime refuses the model.

    Example:
        >>> report = check_fusion("model.int8.onnx")  # doctest: +SKIP
        >>> report.unfused, report.fused
        (0, {'QLinearConv': 2, 'QGemm': 1})
    """
    import onnxruntime as ort

    from graphopt.runtime._inputs import ort_error_text
    from graphopt.runtime._session import PROVIDERS

    with tempfile.TemporaryDirectory(prefix="graphopt-fusion-") as tmp:
        if isinstance(model, onnx.ModelProto):
            path = os.path.join(tmp, "input.onnx")
            onnx.save(model, path)
        else:
            path = os.fspath(model)
        optimized = os.path.join(tmp, "optimized.onnx")
        so = session_options(optimize=True)
        so.optimized_model_filepath = optimized
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    "optimized.data")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        providers = [PROVIDERS[target]] + (["CPUExecutionProvider"] if target != "cpu" else [])
        try:
            ort.InferenceSession(path, so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise GraphoptError(f"onnxruntime refuses the quantized model: {ort_error_text(exc)}") from None
        return fusion_report(optimized)


def fusion_report(optimized_path: str | os.PathLike) -> FusionReport:
    """Count fused and unfused Q/DQ in a graph onnxruntime already optimized and wrote.

    ``optimized_path`` is what a session made with ``SessionOptions.optimized_model_filepath``
    (e.g. :func:`graphopt.runtime.session_on_file` with ``optimized_model_path``) wrote, so a
    session opened to run the model also answers the fusion check.

    Example:
        >>> session = session_on_file("q.onnx", optimize=True, optimized_model_path="opt/q.onnx")  # doctest: +SKIP
        >>> fusion_report("opt/q.onnx").unfused  # doctest: +SKIP
        0
    """
    return _count(onnx.load(os.fspath(optimized_path), load_external_data=False).graph)


def _count(graph: onnx.GraphProto) -> FusionReport:
    report = FusionReport()
    producers: dict[str, onnx.NodeProto] = {}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        for inp in node.input:
            readers.setdefault(inp, []).append(node)
    constants = {t.name for t in graph.initializer}
    ops = Counter(node.op_type for node in graph.node)
    report.ops = dict(sorted(ops.items()))
    report.fused = {op: n for op, n in sorted(ops.items()) if op in INTEGER_KERNELS}

    def integer_reader(name: str, depth: int = 0) -> bool:
        for r in readers.get(name, []):
            if r.op_type in INTEGER_KERNELS:
                return True
            if r.op_type in _INTEGER_PASS_THROUGH and depth < 8 and integer_reader(r.output[0], depth + 1):
                return True
        return False

    for node in graph.node:
        label = node.name or f"{node.op_type}:{node.output[0]}"
        if node.op_type in _QUANTIZE:
            if any(r.op_type in _DEQUANTIZE for r in readers.get(node.output[0], [])):
                report.unfused_quantize += 1
                report.unfused_nodes.append(label)
            else:
                report.boundary_quantize += 1
        elif node.op_type in _DEQUANTIZE:
            source = node.input[0]
            producer = producers.get(source)
            while producer is not None and producer.op_type in _INTEGER_PASS_THROUGH:
                source = producer.input[0]
                producer = producers.get(source)
            if source in constants or (producer is not None and producer.op_type in _QUANTIZE):
                report.unfused_dequantize += 1
                report.unfused_nodes.append(label)
            else:
                report.boundary_dequantize += 1
    report.unfused_nodes = report.unfused_nodes[:50]
    if report.unfused:
        logger.info("fusion check: %s", report.summary())
    return report
