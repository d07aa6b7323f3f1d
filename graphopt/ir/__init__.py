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

from graphopt.ir._attrs import Attr, AttrType
from graphopt.ir._core import Function, Graph, Model, Node, Use, Value, tensor_type_of
from graphopt.ir._io import load, save, to_proto
from graphopt.ir._printer import canonical_order, print_graph, print_model
from graphopt.ir._tensors import (ArrayTensor, ExternalTensor, LazyTensor, ProtoTensor, SparseTensor,
                                  Tensor, resolve_external_location)
from graphopt.ir._types import Dim, OtherType, Shape, TensorType, ValueType, dtype_name, numpy_dtype
from graphopt.ir._verifier import find_problems, verify

__all__ = [
    "Attr", "AttrType", "Function", "Graph", "Model", "Node", "Use", "Value", "tensor_type_of",
    "load", "save", "to_proto", "canonical_order", "print_graph", "print_model",
    "ArrayTensor", "ExternalTensor", "LazyTensor", "ProtoTensor", "SparseTensor", "Tensor",
    "resolve_external_location", "Dim", "OtherType", "Shape", "TensorType", "ValueType",
    "dtype_name", "numpy_dtype", "find_problems", "verify",
]
