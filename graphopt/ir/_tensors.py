"""Lazy tensors: constants that cost nothing until their values are needed.

* :class:`ProtoTensor` wraps a ``TensorProto`` read from the model; it is written back unchanged
  (raw or typed storage alike) unless a pass replaces it.
* :class:`FileTensor` is a large weight stored inline in the model file; its bytes are read from
  the file only when needed and copied file to file when saved unchanged.
* :class:`ExternalTensor` points into an external data file. Its values are memory-mapped on
  demand; saving copies its bytes file to file in chunks, so a 3 GB model never sits in memory.
* :class:`ArrayTensor` holds a numpy array that a pass computed.
* :class:`LazyTensor` computes its array only when read or saved (e.g. a fused weight).

All of them answer ``dtype`` (an ONNX element type), ``shape``, ``nbytes`` and ``numpy()``.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import threading
import weakref
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.errors import ExternalDataError
from graphopt.ir._types import numpy_dtype

__all__ = ["Tensor", "ProtoTensor", "FileTensor", "SourceFile", "ExternalTensor", "ArrayTensor", "LazyTensor",
           "SparseTensor", "resolve_external_location"]

_CHUNK = 16 * 1024 * 1024

# Elements packed below one byte: their storage size is not itemsize * count.
_SUBBYTE_BITS = {onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4,
                 onnx.TensorProto.FLOAT4E2M1: 4}
for _name, _bits in (("UINT2", 2), ("INT2", 2)):
    if hasattr(onnx.TensorProto, _name):
        _SUBBYTE_BITS[getattr(onnx.TensorProto, _name)] = _bits


def storage_nbytes(dtype: int, shape: tuple[int, ...]) -> int:
    """Bytes that ``raw_data`` of a tensor with this dtype and shape occupies."""
    count = 1
    for d in shape:
        count *= int(d)
    bits = _SUBBYTE_BITS.get(dtype)
    if bits is not None:
        return (count * bits + 7) // 8
    if dtype == onnx.TensorProto.STRING:
        return 0
    return count * numpy_dtype(dtype).itemsize


def proto_storage_bytes(proto: onnx.TensorProto) -> Iterator[bytes]:
    """Yield the bytes ``raw_data`` holds for the proto's values, whatever field stores them.

    One encoding for every storage, so equal values give equal bytes (and digests): sub-byte
    types packed, strings as 8-byte little-endian length + bytes per element.
    """
    if proto.HasField("raw_data"):
        yield proto.raw_data
    elif proto.data_type == onnx.TensorProto.STRING:
        for s in proto.string_data:
            yield len(s).to_bytes(8, "little") + s
    else:
        array = numpy_helper.to_array(proto)
        if proto.data_type in _SUBBYTE_BITS:
            # Typed storage holds one element per int32; raw storage packs them.
            yield numpy_helper.from_array(array).raw_data
        else:
            yield np.ascontiguousarray(array).tobytes()


class Tensor:
    """A constant tensor. Subclasses decide where the bytes live."""

    __slots__ = ("name", "doc_string")

    def __init__(self, name: str = "", doc_string: str = "") -> None:
        self.name = name
        self.doc_string = doc_string

    dtype: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def nbytes(self) -> int:
        """Bytes the values take in storage (not counting protobuf framing)."""
        return storage_nbytes(self.dtype, self.shape)

    def numpy(self) -> np.ndarray:
        """Return the values as a numpy array (may be a read-only memory map)."""
        raise NotImplementedError

    def iter_bytes(self) -> Iterator[bytes]:
        """Yield the little-endian raw bytes in chunks, without holding them all at once."""
        yield from proto_storage_bytes(self.to_proto(with_data=True))

    def digest(self) -> str:
        """A content hash over dtype, shape and bytes (used by dedup and the canonical printer)."""
        h = hashlib.blake2b(digest_size=12)
        h.update(f"{self.dtype}:{tuple(self.shape)}:".encode())
        for chunk in self.iter_bytes():
            h.update(chunk)
        return h.hexdigest()

    def to_proto(self, *, with_data: bool = True) -> onnx.TensorProto:
        """Return a ``TensorProto`` named ``self.name``."""
        raise NotImplementedError

    def is_external(self) -> bool:
        """True when the bytes live in an external data file."""
        return False

    def __repr__(self) -> str:  # noqa: D105
        return f"{type(self).__name__}({self.name!r}, dtype={self.dtype}, shape={list(self.shape)})"


class ProtoTensor(Tensor):
    """A tensor read from a model, kept as its ``TensorProto`` and written back as is."""

    __slots__ = ("_proto", "_array")

    def __init__(self, proto: onnx.TensorProto) -> None:
        super().__init__(proto.name, proto.doc_string)
        self._proto = proto
        self._array: np.ndarray | None = None

    @property
    def dtype(self) -> int:  # type: ignore[override]
        """ONNX element type."""
        return self._proto.data_type

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """Static shape."""
        return tuple(self._proto.dims)

    #: Decoded arrays up to this size are kept: rule checks read the same small constants often.
    CACHE_BYTES = 1 << 20

    def numpy(self) -> np.ndarray:
        """Decode the proto with ``onnx.numpy_helper`` (ml_dtypes for float8/int4)."""
        cached = self._array
        if cached is not None:
            return cached
        array = numpy_helper.to_array(self._proto)
        if array.nbytes <= self.CACHE_BYTES:
            array.flags.writeable = False  # shared by every reader: nobody may change it in place
            self._array = array
        return array

    def iter_bytes(self) -> Iterator[bytes]:
        """Yield raw bytes; raw storage is yielded without decoding."""
        yield from proto_storage_bytes(self._proto)

    def to_proto(self, *, with_data: bool = True) -> onnx.TensorProto:
        """The original proto, renamed if the tensor was renamed."""
        if self._proto.name != self.name or self._proto.doc_string != self.doc_string:
            proto = onnx.TensorProto()
            proto.CopyFrom(self._proto)
            proto.name = self.name
            proto.doc_string = self.doc_string
            self._proto = proto
        return self._proto


class SourceFile:
    """A model file held open for the tensors that read from it.

    The descriptor stays valid when the path is replaced (``graphopt.ir.save`` writes a new file
    and renames it over the old one), so saving a model over its own file is safe. It is closed
    when the last tensor reading from it is gone. A file changed *in place* while its model is
    in use would change those tensors: replace files, never rewrite them.
    """

    __slots__ = ("fd", "path", "_seek_lock", "__weakref__")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        # Without os.pread (Windows) a read is a seek plus a read, which threads must not interleave.
        self._seek_lock = None if hasattr(os, "pread") else threading.Lock()
        weakref.finalize(self, os.close, self.fd)

    def _read_at(self, length: int, offset: int) -> bytes:
        if self._seek_lock is None:
            return os.pread(self.fd, length, offset)
        with self._seek_lock:
            os.lseek(self.fd, offset, os.SEEK_SET)
            return os.read(self.fd, length)

    def __copy__(self) -> SourceFile:
        return self  # the file is only read: copies of a model share it (and keep it open)

    def __deepcopy__(self, memo: dict) -> SourceFile:
        return self

    def __reduce__(self) -> tuple:
        return (SourceFile, (self.path,))  # another process opens the file again by its path

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        chunks: list[bytes] = []
        while length > 0:
            chunk = self._read_at(min(length, 1 << 30), offset)
            if not chunk:
                raise OSError(f"'{self.path}' ended early (was it changed while in use?)")
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def iter_chunks(self, offset: int, length: int) -> Iterator[bytes]:
        """The same bytes in chunks of at most 16 MB."""
        while length > 0:
            n = min(length, _CHUNK)
            yield self.read(offset, n)
            offset += n
            length -= n


#: Element types whose raw bytes are the numpy array as is (on a little-endian machine).
_PLAIN_DTYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
})


class FileTensor(Tensor):
    """A tensor stored inline in a model file whose ``raw_data`` stays in the file until needed.

    Loading a large model keeps only each weight's header (name, type, dims) in memory, so the
    resident set does not grow by the weights' size. ``numpy()`` reads the bytes; a save writes
    the tensor's record back byte for byte (copied file to file) while its name is unchanged.

    Example:
        >>> t = model.graph.initializers["w"].const_value  # doctest: +SKIP
        >>> type(t).__name__, t.shape                      # doctest: +SKIP
        ('FileTensor', (768, 768))
    """

    __slots__ = ("_header", "source", "data_offset", "data_length", "record_offset", "record_length",
                 "_array")

    #: Decoded arrays up to this size are kept (as :class:`ProtoTensor` does).
    CACHE_BYTES = ProtoTensor.CACHE_BYTES

    def __init__(self, header: onnx.TensorProto, source: SourceFile, data_offset: int, data_length: int,
                 record_offset: int, record_length: int) -> None:
        super().__init__(header.name, header.doc_string)
        self._header = header
        self.source = source
        self.data_offset = data_offset
        self.data_length = data_length
        self.record_offset = record_offset
        self.record_length = record_length
        self._array: np.ndarray | None = None

    @property
    def dtype(self) -> int:  # type: ignore[override]
        """ONNX element type."""
        return self._header.data_type

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """Static shape."""
        return tuple(self._header.dims)

    def unchanged(self) -> bool:
        """True while writing the tensor reproduces its record in the file (not renamed)."""
        return self.name == self._header.name and self.doc_string == self._header.doc_string

    def numpy(self) -> np.ndarray:
        """Read the bytes and decode them (read-only); ``onnx.numpy_helper`` for packed types."""
        cached = self._array
        if cached is not None:
            return cached
        dtype = self.dtype
        if dtype in _PLAIN_DTYPES and sys.byteorder == "little" and not self._header.HasField("segment"):
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
            if self.data_length > self.CACHE_BYTES:
                # A large weight is memory-mapped: a pass that samples or slices it reads only
                # the pages it touches, and the pages go when the array does.
                return self._mapped(np_dtype)
            data = self.source.read(self.data_offset, self.data_length)
            array = np.frombuffer(data, dtype=np_dtype).reshape(self.shape)
        else:
            array = numpy_helper.to_array(self.to_proto(with_data=True))
        if array.nbytes <= self.CACHE_BYTES:
            array.flags.writeable = False
            self._array = array
        return array

    def _mapped(self, np_dtype: np.dtype) -> np.ndarray:
        start = self.data_offset - self.data_offset % mmap.ALLOCATIONGRANULARITY
        view = mmap.mmap(self.source.fd, self.data_offset + self.data_length - start, access=mmap.ACCESS_READ,
                         offset=start)
        count = self.data_length // np.dtype(np_dtype).itemsize
        return np.frombuffer(view, dtype=np_dtype, count=count, offset=self.data_offset - start).reshape(self.shape)

    def iter_bytes(self) -> Iterator[bytes]:
        """The raw bytes in chunks, read from the file."""
        yield from self.source.iter_chunks(self.data_offset, self.data_length)

    def record(self) -> bytes:
        """The tensor's encoded ``TensorProto`` as the file holds it."""
        return self.source.read(self.record_offset, self.record_length)

    def to_proto(self, *, with_data: bool = True) -> onnx.TensorProto:
        """A ``TensorProto`` with the bytes inline (parsed from the file's record); without data,
        the header alone (every field but ``raw_data``)."""
        if not with_data:
            proto = onnx.TensorProto()
            proto.CopyFrom(self._header)
        else:
            proto = onnx.TensorProto.FromString(self.record())
        if not self.unchanged():
            proto.name = self.name
            proto.doc_string = self.doc_string
        return proto


class ArrayTensor(Tensor):
    """A tensor computed by graphopt, held as a numpy array.

    Example:
        >>> t = ArrayTensor(np.ones((2, 2), np.float32), name="w")
        >>> t.dtype, t.shape
        (1, (2, 2))
    """

    __slots__ = ("_array", "_dtype")

    def __init__(self, array: np.ndarray, name: str = "", *, dtype: int | None = None,
                 doc_string: str = "") -> None:
        super().__init__(name, doc_string)
        self._array = np.asarray(array)
        self._dtype = dtype if dtype is not None else onnx.helper.np_dtype_to_tensor_dtype(self._array.dtype)

    @property
    def dtype(self) -> int:  # type: ignore[override]
        """ONNX element type."""
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """Static shape."""
        return tuple(int(d) for d in self._array.shape)

    def numpy(self) -> np.ndarray:
        """The held array."""
        return self._array

    def iter_bytes(self) -> Iterator[bytes]:
        """Yield the array's bytes."""
        yield from proto_storage_bytes(self.to_proto())

    def to_proto(self, *, with_data: bool = True) -> onnx.TensorProto:
        """Encode with ``onnx.numpy_helper.from_array`` (raw storage)."""
        proto = numpy_helper.from_array(self._array, self.name)
        if proto.data_type != self._dtype:
            proto = onnx.helper.make_tensor(self.name, self._dtype, self._array.shape,
                                            self._array.flatten().tolist())
        if self.doc_string:
            proto.doc_string = self.doc_string
        return proto


class LazyTensor(Tensor):
    """A tensor whose array is computed on first read, then cached.

    With ``cache=False`` the array is computed again on every read and never kept: saving a
    model whose converted weights are all lazy then holds one converted tensor at a time.
    """

    __slots__ = ("_fn", "_dtype", "_shape", "_cache", "_keep")

    def __init__(self, fn: Callable[[], np.ndarray], dtype: int, shape: tuple[int, ...],
                 name: str = "", *, cache: bool = True) -> None:
        super().__init__(name)
        self._fn = fn
        self._dtype = dtype
        self._shape = tuple(shape)
        self._cache: np.ndarray | None = None
        self._keep = cache

    @property
    def dtype(self) -> int:  # type: ignore[override]
        """ONNX element type."""
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """Static shape."""
        return self._shape

    def numpy(self) -> np.ndarray:
        """Compute (once, unless built with ``cache=False``) and return the array."""
        if self._cache is not None:
            return self._cache
        array = np.asarray(self._fn())
        if self._keep:
            self._cache = array
        return array

    def iter_bytes(self) -> Iterator[bytes]:
        """Yield the computed bytes."""
        yield from proto_storage_bytes(self.to_proto())

    def to_proto(self, *, with_data: bool = True) -> onnx.TensorProto:
        """Compute and encode."""
        return ArrayTensor(self.numpy(), self.name, dtype=self._dtype).to_proto()


def resolve_external_location(base_dir: str, location: str, tensor_name: str) -> str:
    """Return the real path of an external data file, refusing any that leaves ``base_dir``.

    Locations come from the model file and are untrusted: absolute paths, ``..`` components and
    symlinks that resolve outside the model's folder are refused with :class:`ExternalDataError`.
    """
    if not location:
        raise ExternalDataError(f"tensor '{tensor_name}' has external data with an empty location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise ExternalDataError(
            f"tensor '{tensor_name}': external data location '{location}' is an absolute path; "
            "graphopt only reads external data inside the model's folder")
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        raise ExternalDataError(
            f"tensor '{tensor_name}': external data location '{location}' climbs out of the "
            "model's folder with '..'; move the data file next to the model")
    base_real = os.path.realpath(base_dir)
    full = os.path.realpath(os.path.join(base_real, location))
    if os.path.commonpath([base_real, full]) != base_real:
        raise ExternalDataError(
            f"tensor '{tensor_name}': external data location '{location}' resolves to '{full}', "
            "outside the model's folder (a symlink?); copy the data next to the model")
    return full


class ExternalTensor(Tensor):
    """A tensor whose bytes live in an external data file, read only when needed.

    ``numpy()`` memory-maps the file region; :meth:`iter_bytes` reads it in 16 MB chunks with
    plain file reads, so copying or hashing a huge weight does not grow the resident set.
    """

    __slots__ = ("_proto", "path", "offset", "length")

    def __init__(self, proto: onnx.TensorProto, base_dir: str) -> None:
        super().__init__(proto.name, proto.doc_string)
        self._proto = proto
        info = {e.key: e.value for e in proto.external_data}
        self.path = resolve_external_location(base_dir, info.get("location", ""), proto.name)
        expected = storage_nbytes(proto.data_type, tuple(proto.dims))
        try:
            self.offset = int(info.get("offset", "0"))
            self.length = int(info["length"]) if "length" in info else expected
        except ValueError as exc:
            raise ExternalDataError(f"tensor '{proto.name}': bad external data offset/length ({exc})") from None
        if self.offset < 0 or self.length < 0:
            raise ExternalDataError(f"tensor '{proto.name}': negative external data offset or length")
        if not os.path.isfile(self.path):
            raise ExternalDataError(
                f"tensor '{proto.name}': external data file '{info.get('location')}' is missing "
                f"(looked in {os.path.dirname(self.path)})")
        size = os.path.getsize(self.path)
        if self.offset + self.length > size:
            raise ExternalDataError(
                f"tensor '{proto.name}': external data file '{info.get('location')}' is too short "
                f"({size} bytes, needs {self.offset + self.length})")
        if proto.data_type != onnx.TensorProto.STRING and self.length != expected:
            raise ExternalDataError(
                f"tensor '{proto.name}': external data length {self.length} does not match its "
                f"shape {list(proto.dims)} ({expected} bytes)")

    @property
    def dtype(self) -> int:  # type: ignore[override]
        """ONNX element type."""
        return self._proto.data_type

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """Static shape."""
        return tuple(self._proto.dims)

    def is_external(self) -> bool:
        """Always true."""
        return True

    def numpy(self) -> np.ndarray:
        """A read-only memory map of the region (decoded through onnx for sub-byte types)."""
        if self.dtype in _SUBBYTE_BITS or self.dtype == onnx.TensorProto.STRING:
            return numpy_helper.to_array(self.to_proto(with_data=True))
        if self.length == 0:
            return np.zeros(self.shape, dtype=numpy_dtype(self.dtype))
        arr = np.memmap(self.path, dtype=numpy_dtype(self.dtype), mode="r", offset=self.offset,
                        shape=self.shape)
        return arr

    def iter_bytes(self) -> Iterator[bytes]:
        """Read the region in chunks."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise ExternalDataError(f"tensor '{self.name}': external data ended early")
                left -= len(chunk)
                yield chunk

    def to_proto(self, *, with_data: bool = True) -> onnx.TensorProto:
        """With data: a proto holding the bytes inline; without: the external reference proto."""
        if not with_data:
            if self._proto.name != self.name:
                proto = onnx.TensorProto()
                proto.CopyFrom(self._proto)
                proto.name = self.name
                return proto
            return self._proto
        proto = onnx.TensorProto()
        proto.CopyFrom(self._proto)
        del proto.external_data[:]
        proto.ClearField("data_location")  # inline, as a proto that never had external data
        proto.name = self.name
        proto.raw_data = b"".join(self.iter_bytes())
        return proto


class SparseTensor:
    """A sparse initializer, kept as its ``SparseTensorProto``."""

    __slots__ = ("_proto",)

    def __init__(self, proto: onnx.SparseTensorProto) -> None:
        self._proto = proto

    @property
    def dtype(self) -> int:
        """Element type of the values."""
        return self._proto.values.data_type

    @property
    def shape(self) -> tuple[int, ...]:
        """Dense shape."""
        return tuple(self._proto.dims)

    @property
    def nbytes(self) -> int:
        """Bytes of values plus indices."""
        return len(self._proto.values.raw_data) + len(self._proto.indices.raw_data)

    def numpy(self) -> np.ndarray:
        """The dense array."""
        values = numpy_helper.to_array(self._proto.values).reshape(-1)
        indices = numpy_helper.to_array(self._proto.indices)
        dense = np.zeros(int(np.prod(self.shape)), dtype=values.dtype)
        if indices.ndim == 2:
            indices = np.ravel_multi_index(indices.T, self.shape)
        dense[indices.reshape(-1)] = values
        return dense.reshape(self.shape)

    def to_proto(self, name: str) -> onnx.SparseTensorProto:
        """The stored proto, with the values renamed to ``name`` if needed."""
        if self._proto.values.name != name:
            proto = onnx.SparseTensorProto()
            proto.CopyFrom(self._proto)
            proto.values.name = name
            self._proto = proto
        return self._proto
