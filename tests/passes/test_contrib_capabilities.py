"""The capability table of the contrib fusions: probed on the CPU, static (or probed) for CUDA."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from graphopt.errors import PipelineError
from graphopt.passes.contrib import capabilities as caps

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_table_is_probed_with_the_kernels_onnxruntime_has() -> None:
    table = caps.capabilities("cpu")
    assert table.source == "probed"
    assert table.provider == "CPUExecutionProvider"
    for op in ("FusedConv", "FusedMatMul", "Gelu", "BiasGelu", "FastGelu", "SkipLayerNormalization",
               "SkipSimplifiedLayerNormalization", "Attention", "MultiHeadAttention"):
        assert caps.provider_supports("cpu", op, dtype=TensorProto.FLOAT), op
        assert table.ops[(caps.CONTRIB_DOMAIN, op)].since_version == 1
    # BiasAdd has only a CUDA kernel; the probe must find that out, not assume it.
    assert not caps.provider_supports("cpu", "BiasAdd")
    assert not caps.provider_supports("cpu", "FusedMatMul", dtype=TensorProto.FLOAT16)
    assert not caps.provider_supports("cpu", "Relu", domain="")  # only contrib ops are in the table
    assert caps.fused_conv_activations("cpu") == frozenset(caps.FUSED_CONV_ACTIVATIONS)


def test_probe_reads_what_sessions_say() -> None:
    """A provider whose sessions refuse an op (here: everything but FusedMatMul) has only that op."""
    def runs(provider: str, model: bytes, feeds: dict) -> bool:
        proto = onnx.load_from_string(model)
        return proto.graph.node[0].op_type == "FusedMatMul"

    table = caps.probe_provider("cpu", runs=runs)
    assert table is not None
    assert set(op for _, op in table.ops) == {"FusedMatMul"}
    assert table.fused_conv_activations == frozenset()


def test_fused_conv_activations_are_probed_one_by_one() -> None:
    def runs(provider: str, model: bytes, feeds: dict) -> bool:
        node = onnx.load_from_string(model).graph.node[0]
        activation = next((a.s.decode() for a in node.attribute if a.name == "activation"), "")
        return node.op_type != "FusedConv" or activation in ("Relu", "Tanh")

    table = caps.probe_provider("cpu", runs=runs)
    assert table is not None and table.fused_conv_activations == frozenset({"Relu", "Tanh"})


@pytest.mark.skipif(HAS_CUDA, reason="with a CUDA provider the table is probed, not static")
def test_cuda_without_a_gpu_uses_the_static_table() -> None:
    table = caps.capabilities("cuda")
    assert table is caps.STATIC_CUDA_CAPABILITIES and table.source == "static"
    assert caps.provider_supports("cuda", "BiasAdd")
    assert caps.provider_supports("cuda", "SkipLayerNormalization", dtype=TensorProto.FLOAT16)
    assert caps.provider_supports("cuda", "FusedConv", dtype=TensorProto.FLOAT)
    assert not caps.provider_supports("cuda", "FusedConv", dtype=TensorProto.FLOAT16)
    assert caps.fused_conv_activations("cuda") == frozenset({"Relu"})


@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider is not available")
def test_cuda_probe_agrees_with_the_static_table() -> None:
    probed = caps.probe_provider("cuda")
    assert probed is not None and probed.source == "probed"
    for key, support in caps.STATIC_CUDA_CAPABILITIES.ops.items():
        assert key in probed.ops, key
        assert TensorProto.FLOAT in probed.ops[key].dtypes or support.dtypes == frozenset(), key
    assert "Relu" in probed.fused_conv_activations


def test_unknown_target_is_a_user_error() -> None:
    with pytest.raises(PipelineError, match="unknown target 'tpu'"):
        caps.provider_supports("tpu", "FusedConv")


def test_format_table_lists_every_probed_op() -> None:
    text = caps.format_table()
    for op in caps.PROBED_OPS:
        assert f"com.microsoft::{op} v1" in text
    assert "cpu (probed)" in text.splitlines()[0]
