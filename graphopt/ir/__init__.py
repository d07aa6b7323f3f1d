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


def typed_stub(tensor: Tensor, name: str | None = None) -> _onnx.TensorProto:
    """A tensor proto with the name, element type and dims of ``tensor`` but no data.

    Marked as external data without a location, which :func:`stubs_to_inputs` recognizes; a
    ``tensor_writer`` for :func:`to_proto_with` returns it for the tensors an analysis only needs
    the type of.

    Example:
        >>> ir.typed_stub(ir.ArrayTensor(np.zeros((2, 3), np.float32), name="w")).dims  # doctest: +SKIP
        [2, 3]
    """
    stub = _onnx.TensorProto(name=tensor.name if name is None else name, data_type=tensor.dtype,
                             dims=list(tensor.shape))
    stub.data_location = _onnx.TensorProto.EXTERNAL
    return stub


def stubs_to_inputs(graph: _onnx.GraphProto) -> None:
    """Replace the :func:`typed_stub` initializers of ``graph`` by typed graph inputs, in place.

    onnx shape inference then reads their types without any data (it refuses an initializer
    whose external data has no location).
    """
    def is_stub(t: _onnx.TensorProto) -> bool:
        return t.data_location == _onnx.TensorProto.EXTERNAL and not t.external_data

    stubs = [t for t in graph.initializer if is_stub(t)]
    if not stubs:
        return
    kept = [t for t in graph.initializer if not is_stub(t)]
    declared = {i.name for i in graph.input}
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for t in stubs:
        if t.name not in declared:
            graph.input.append(_onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


__all__ = [
    "Attr", "AttrType", "Function", "Graph", "Model", "Node", "Use", "Value", "tensor_type_of",
    "load", "save", "to_proto", "to_proto_with", "typed_stub", "stubs_to_inputs", "canonical_order", "print_graph", "print_model",
    "ArrayTensor", "ExternalTensor", "LazyTensor", "ProtoTensor", "SparseTensor", "Tensor",
    "resolve_external_location", "Dim", "OtherType", "Shape", "TensorType", "ValueType",
    "dtype_name", "numpy_dtype", "find_problems", "verify",
]
