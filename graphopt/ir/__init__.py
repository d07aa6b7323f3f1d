"""graphopt's intermediate representation of ONNX models.

Plain classes with use-def chains (:class:`Value`, :class:`Node`, :class:`Graph`,
:class:`Function`, :class:`Model`), lazy tensors, lossless load/save, a canonical printer and a
verifier. Passes import everything they need from here.

Example:
    >>> from graphopt import ir
    >>> model = ir.load("model.onnx")          # doctest: +SKIP
    >>> for node in model.graph:               # doctest: +SKIP
    ...     if node.op_type == "Identity":
    ...         node.outputs[0].replace_all_uses_with(node.inputs[0])
    >>> ir.save(model, "out.onnx")             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable as _Callable

import onnx as _onnx

from graphopt.ir._attrs import Attr, AttrType
from graphopt.ir._core import Function, Graph, Model, Node, Use, Value, tensor_type_of
from graphopt.ir._io import load, save, to_proto
from graphopt.ir._printer import canonical_order, print_graph, print_model
from graphopt.ir._tensors import (ArrayTensor, ExternalTensor, LazyTensor, ProtoTensor, SparseTensor,
                                  Tensor, resolve_external_location)
from graphopt.ir._types import Dim, OtherType, Shape, TensorType, ValueType, dtype_name, numpy_dtype
from graphopt.ir._verifier import find_problems, verify


def to_proto_with(model: Model, tensor_writer: _Callable[[Tensor], _onnx.TensorProto]) -> _onnx.ModelProto:
    """The model as a ``ModelProto`` whose tensors are written by ``tensor_writer``.

    For analyses that need the graph but not the weight bytes: the writer can return typed stubs
    (name, dtype, dims, no data) for large tensors, so a model with gigabytes of weights costs no
    more to convert than its graph. Node order equals the IR's.

    Example:
        >>> stub = lambda t: onnx.TensorProto(name=t.name, data_type=t.dtype, dims=list(t.shape))
        >>> skeleton = ir.to_proto_with(model, stub)  # doctest: +SKIP
    """
    from graphopt.ir._io import _build_proto

    return _build_proto(model, tensor_writer)


__all__ = [
    "Attr", "AttrType", "Function", "Graph", "Model", "Node", "Use", "Value", "tensor_type_of",
    "load", "save", "to_proto", "to_proto_with", "canonical_order", "print_graph", "print_model",
    "ArrayTensor", "ExternalTensor", "LazyTensor", "ProtoTensor", "SparseTensor", "Tensor",
    "resolve_external_location", "Dim", "OtherType", "Shape", "TensorType", "ValueType",
    "dtype_name", "numpy_dtype", "find_problems", "verify",
]
