"""Value types: tensor types with static, symbolic or unknown dims, and every other ONNX type.

Types are immutable. A tensor type keeps the ``TypeProto`` it was read from, so an unchanged type
is written back byte for byte (dim denotations, type denotations and all).
"""

from __future__ import annotations

from typing import Union

import numpy as np
import onnx

__all__ = ["Dim", "Shape", "TensorType", "OtherType", "ValueType", "dtype_name", "numpy_dtype"]

#: One dimension: a known size, a symbolic name, or ``None`` when nothing is known.
Dim = Union[int, str, None]


def dtype_name(elem_type: int) -> str:
    """Return the ONNX text name of an element type, e.g. ``1 -> "float"``.

    Example:
        >>> dtype_name(onnx.TensorProto.FLOAT)
        'float'
    """
    return _TEXT_NAMES.get(elem_type, f"dtype{elem_type}")


def numpy_dtype(elem_type: int) -> np.dtype:
    """Return the numpy dtype that holds one element of ``elem_type`` (ml_dtypes for float8/int4)."""
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


_TEXT_NAMES = {
    onnx.TensorProto.FLOAT: "float", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT16: "uint16", onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.STRING: "string", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.DOUBLE: "double",
    onnx.TensorProto.UINT32: "uint32", onnx.TensorProto.UINT64: "uint64",
    onnx.TensorProto.COMPLEX64: "complex64", onnx.TensorProto.COMPLEX128: "complex128",
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.FLOAT8E4M3FN: "float8e4m3fn",
    onnx.TensorProto.FLOAT8E4M3FNUZ: "float8e4m3fnuz", onnx.TensorProto.FLOAT8E5M2: "float8e5m2",
    onnx.TensorProto.FLOAT8E5M2FNUZ: "float8e5m2fnuz", onnx.TensorProto.UINT4: "uint4",
    onnx.TensorProto.INT4: "int4", onnx.TensorProto.FLOAT4E2M1: "float4e2m1",
}


class Shape:
    """An immutable tensor shape: a tuple of dims, each an int, a symbol name, or ``None``.

    Example:
        >>> s = Shape(("N", 3, 224, 224))
        >>> s.is_static(), s.rank
        (False, 4)
    """

    __slots__ = ("dims", "_proto")

    def __init__(self, dims: tuple[Dim, ...] | list[Dim],
                 _proto: onnx.TensorShapeProto | None = None) -> None:
        self.dims: tuple[Dim, ...] = tuple(dims)
        self._proto = _proto

    @property
    def rank(self) -> int:
        """Number of dimensions."""
        return len(self.dims)

    def is_static(self) -> bool:
        """True when every dim is a known integer."""
        return all(isinstance(d, int) for d in self.dims)

    def numel(self) -> int | None:
        """Element count when static, else ``None``."""
        if not self.is_static():
            return None
        n = 1
        for d in self.dims:
            n *= int(d)  # type: ignore[arg-type]
        return n

    def __iter__(self):  # noqa: D105
        return iter(self.dims)

    def __len__(self) -> int:  # noqa: D105
        return len(self.dims)

    def __getitem__(self, i):  # noqa: D105
        return self.dims[i]

    def __eq__(self, other: object) -> bool:  # noqa: D105
        if isinstance(other, Shape):
            return self.dims == other.dims
        if isinstance(other, (tuple, list)):
            return self.dims == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:  # noqa: D105
        return hash(self.dims)

    def __repr__(self) -> str:  # noqa: D105
        return f"Shape({list(self.dims)})"

    def to_proto(self) -> onnx.TensorShapeProto:
        """Return the shape as a ``TensorShapeProto`` (the original one when unchanged)."""
        if self._proto is not None:
            return self._proto
        proto = onnx.TensorShapeProto()
        for d in self.dims:
            dim = proto.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, str):
                dim.dim_param = d
        return proto

    @classmethod
    def from_proto(cls, proto: onnx.TensorShapeProto) -> Shape:
        """Read a ``TensorShapeProto``; dims with neither value nor param become ``None``."""
        dims: list[Dim] = []
        for d in proto.dim:
            value = d.dim_value
            if value:  # the common case, one read: a nonzero dim_value is necessarily the one set
                dims.append(value)
                continue
            which = d.WhichOneof("value")
            dims.append(value if which == "dim_value" else d.dim_param if which == "dim_param" else None)
        return cls(dims, proto)


class TensorType:
    """The type of a tensor value: element type and optional shape (``None`` = unknown rank).

    Example:
        >>> t = TensorType(onnx.TensorProto.FLOAT, Shape(["N", 4]))
        >>> str(t)
        'float[N,4]'
    """

    __slots__ = ("dtype", "_shape", "_proto")

    def __init__(self, dtype: int, shape: Shape | tuple | list | None = None,
                 _proto: onnx.TypeProto | None = None) -> None:
        self.dtype = int(dtype)
        if shape is not None and not isinstance(shape, Shape):
            shape = Shape(tuple(shape))
        self._shape: Shape | None | object = shape
        self._proto = _proto

    @classmethod
    def _from_tensor_type_proto(cls, proto: onnx.TypeProto, dtype: int) -> TensorType:
        """The type of ``proto`` (a ``tensor_type``); its shape is read when first asked for.

        Loading reads the type of every graph input, output and value_info entry; most are
        written back untouched, so decoding each dim up front would be wasted work.
        """
        t = cls.__new__(cls)
        t.dtype = dtype
        t._shape = _UNREAD
        t._proto = proto
        return t

    @property
    def shape(self) -> Shape | None:
        """The shape, or ``None`` when the rank is unknown."""
        shape = self._shape
        if shape is _UNREAD:
            assert self._proto is not None
            tt = self._proto.tensor_type
            shape = self._shape = Shape.from_proto(tt.shape) if tt.HasField("shape") else None
        return shape  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:  # noqa: D105
        return isinstance(other, TensorType) and self.dtype == other.dtype and self.shape == other.shape

    def __hash__(self) -> int:  # noqa: D105
        return hash((self.dtype, self.shape))

    def __str__(self) -> str:  # noqa: D105
        name = dtype_name(self.dtype)
        if self.shape is None:
            return name
        return name + "[" + ",".join("?" if d is None else str(d) for d in self.shape.dims) + "]"

    __repr__ = __str__

    def to_proto(self) -> onnx.TypeProto:
        """Return the type as a ``TypeProto`` (the original one when unchanged)."""
        if self._proto is not None:
            return self._proto
        proto = onnx.TypeProto()
        proto.tensor_type.elem_type = self.dtype
        if self.shape is not None:
            proto.tensor_type.shape.CopyFrom(self.shape.to_proto())
        return proto


class OtherType:
    """A non-tensor type (sequence, optional, map, sparse tensor, opaque), kept as its proto."""

    __slots__ = ("_proto",)

    def __init__(self, proto: onnx.TypeProto) -> None:
        self._proto = proto

    @property
    def kind(self) -> str:
        """The ``TypeProto`` oneof in use: ``sequence_type``, ``optional_type``, ``map_type``..."""
        return self._proto.WhichOneof("value") or "undefined"

    def __eq__(self, other: object) -> bool:  # noqa: D105
        return isinstance(other, OtherType) and self._proto == other._proto

    def __hash__(self) -> int:  # noqa: D105
        return hash(self._proto.SerializeToString(deterministic=True))

    def __str__(self) -> str:  # noqa: D105
        return self.kind

    __repr__ = __str__

    def to_proto(self) -> onnx.TypeProto:
        """Return the stored ``TypeProto``."""
        return self._proto


ValueType = Union[TensorType, OtherType]

#: ``TensorType._shape`` before the shape of a loaded type is decoded (``None`` means unknown rank).
_UNREAD = object()


def type_from_proto(proto: onnx.TypeProto) -> ValueType:
    """Turn a ``TypeProto`` into a :class:`TensorType` or :class:`OtherType`, keeping the proto."""
    if proto.WhichOneof("value") == "tensor_type":
        return TensorType._from_tensor_type_proto(proto, proto.tensor_type.elem_type)
    return OtherType(proto)
