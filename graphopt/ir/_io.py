"""Loading and saving models: paths, bytes and protos; external data; atomic writes.

Saving never builds a protobuf message over 2 GB: large tensors go to an external data file,
copied in chunks from wherever they live (memory, or the input's own data file), and both files
are written under temporary names and renamed into place only when complete. A failed save
leaves no partial output behind.
"""

from __future__ import annotations

import gc
import mmap
import os
import tempfile
from contextlib import contextmanager
from math import prod
from typing import BinaryIO, Callable, Iterator, Union

import onnx
from google.protobuf.message import DecodeError

from graphopt.errors import EmitError, ModelLoadError
from graphopt.ir._core import Model
from graphopt.ir._serde import UndecodableNameError, encode_nodes, model_from_proto, model_to_proto
from graphopt.ir._tensors import ExternalTensor, FileTensor, ProtoTensor, SourceFile, Tensor, storage_nbytes
from graphopt.ir._wire import FileSlice, split_large_initializers
from graphopt.ir._wire import encode_varint as _varint

__all__ = ["load", "save", "to_proto", "ModelSource"]

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto, Model]

_PROTOBUF_LIMIT = 2**31 - 1
_READ_CHUNK = 16 * 1024 * 1024
#: Above this many bytes of initializers a model is saved with external data by default.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Main-graph initializers of at least this many raw bytes stay in the model file until read.
FILE_TENSOR_BYTES = 64 * 1024


def load(source: ModelSource, *, base_dir: str | None = None,
         progress: Callable[[int, int], None] | None = None,
         file_tensor_bytes: int | None = FILE_TENSOR_BYTES) -> Model:
    """Load a model into the IR from a path, serialized bytes or a ``ModelProto``.

    External data is not read: it is memory-mapped on demand. A ``ModelProto`` passed in is
    never modified, but the model reads its tensors, declared types and ``Constant`` values
    from it (on first use, and to write them back): leave it unchanged while the model is in
    use. Its nodes take a copy of their own, which loading from a path or bytes does without.
    ``progress``, if given, is called with (bytes read, file size) as a file is read.

    From a path, the main graph's initializers of ``file_tensor_bytes`` or more (64 KiB by
    default; ``None``: none) are not read: they stay in the file, which is kept open, until a
    pass reads them, and a save copies them file to file. Memory then holds the graph, not the
    weights. Replace the file (as ``save`` does) rather than rewrite it in place while the
    model is in use.

    Raises:
        ModelLoadError: the file is missing, unreadable, truncated or not an ONNX model, or its
            external data is missing or points outside the model's folder.

    Example:
        >>> model = load("model.onnx")  # doctest: +SKIP
        >>> len(model.graph)  # doctest: +SKIP
        42
    """
    if isinstance(source, Model):
        return source
    if isinstance(source, onnx.ModelProto):
        _check_looks_like_onnx(source, "the given ModelProto")
        return _from_proto(source, base_dir, "the given ModelProto", owned=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(source), "the given bytes")
        return _from_proto(proto, base_dir, "the given bytes", owned=True)
    path = os.fspath(source)
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(path))
    if file_tensor_bytes is not None:
        model = _load_leaving_weights(path, base_dir, file_tensor_bytes)
        if model is not None:
            if progress is not None:
                size = os.path.getsize(path)
                progress(size, size)
            return model
    try:
        with open(path, "rb") as f:
            data = _read(f, progress)
    except FileNotFoundError:
        raise ModelLoadError(f"model file '{path}' does not exist") from None
    except OSError as exc:  # the checks are made on failure only: small models load in a millisecond
        if os.path.isdir(path):
            raise ModelLoadError(f"'{path}' is a folder, not an ONNX model file") from None
        raise ModelLoadError(f"cannot read '{path}': {exc.strerror}") from None
    proto = _parse(data, f"'{path}'")
    del data
    return _from_proto(proto, base_dir, f"'{path}'", owned=True)


def _load_leaving_weights(path: str, base_dir: str, min_bytes: int) -> Model | None:
    """Load ``path`` with its large main-graph weights left in the file (see ``FileTensor``).

    ``None`` when the file has no such weight or is not plainly encoded: the caller then reads
    it whole (and reports any error in it).
    """
    try:
        if os.path.getsize(path) < min_bytes:
            return None
        source = SourceFile(path)
    except OSError:
        return None  # missing, a folder, unreadable: the plain read says which
    try:
        with mmap.mmap(source.fd, 0, access=mmap.ACCESS_READ) as view:
            split = split_large_initializers(view, min_bytes)
    except (OSError, ValueError):
        return None
    if split is None:
        return None
    rest, slices = split
    try:
        proto = _parse(rest, f"'{path}'")
    except ModelLoadError:
        return None
    del rest

    def maker(piece: FileSlice) -> Callable[[onnx.TensorProto], Tensor]:
        def make(header: onnx.TensorProto) -> Tensor:
            if header.data_location == onnx.TensorProto.EXTERNAL or header.HasField("segment"):
                # Rare forms whose raw bytes mean something else: read the record whole.
                full = onnx.TensorProto.FromString(source.read(piece.record_offset, piece.record_length))
                return ExternalTensor(full, base_dir) if full.data_location == onnx.TensorProto.EXTERNAL \
                    else ProtoTensor(full)
            return FileTensor(header, source, piece.data_offset, piece.data_length, piece.record_offset,
                              piece.record_length)
        return make

    return _from_proto(proto, base_dir, f"'{path}'", owned=True,
                       main_tensors={piece.index: maker(piece) for piece in slices})


def _read(f: BinaryIO, progress: Callable[[int, int], None] | None) -> bytes:
    if progress is None:
        return f.read()
    size = os.fstat(f.fileno()).st_size
    chunks: list[bytes] = []
    done = 0
    while chunk := f.read(_READ_CHUNK):
        chunks.append(chunk)
        done += len(chunk)
        progress(done, size)
    return b"".join(chunks)


def _from_proto(proto: onnx.ModelProto, base_dir: str | None, what: str, *, owned: bool,
                main_tensors: dict[int, Callable[[onnx.TensorProto], Tensor]] | None = None) -> Model:
    # Building the IR allocates many objects and frees none: the cyclic collector's passes would
    # only rescan them (about half of the load time on graphs of thousands of nodes).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return model_from_proto(proto, base_dir, owned=owned, main_tensors=main_tensors)
    except (UnicodeDecodeError, UndecodableNameError):
        # proto2 strings are not checked when parsed: invalid UTF-8 comes back as bytes (the
        # reader checks every name), or raises when read. Either way the file is corrupt.
        raise ModelLoadError(f"{what} has a name or string field that is not valid UTF-8; "
                             "the file is corrupt") from None
    finally:
        if collecting:
            gc.enable()


# Signatures of files often mistaken for ONNX models: (offset, magic bytes, what the file is).
_OTHER_FORMATS = (
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"), (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"PK\x03\x04", "a zip archive (a PyTorch checkpoint or a zipped model?)"),
    (0, b"\x93NUMPY", "a numpy .npy file"), (0, b"\x1f\x8b", "a gzip file (decompress it first)"),
    (4, b"ORTM", "an onnxruntime .ort model (graphopt reads .onnx)"),
    (4, b"TFL3", "a TensorFlow Lite model"), (0, b"\x80\x02", "a Python pickle"),
    (0, b"GGUF", "a GGUF model"), (0, b"{", "a JSON or text file"), (0, b"<", "an XML or HTML file"),
)


def _sniff(data: bytes) -> str | None:
    for offset, magic, kind in _OTHER_FORMATS:
        if data[offset:offset + len(magic)] == magic:
            return kind
    if len(data) >= 8 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data):
        return "a safetensors file"
    return None


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{what} is empty, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        if "depth" in str(exc).lower() or "recursion" in str(exc).lower():
            raise ModelLoadError(
                f"{what} nests subgraphs deeper than protobuf reads (100 message levels, about 30 "
                "nested If/Loop bodies); onnx and onnxruntime cannot load it either: flatten "
                "the nested control flow") from None
        kind = _sniff(data)
        if kind is not None:
            raise ModelLoadError(f"{what} is {kind}, not an ONNX model") from None
        raise ModelLoadError(f"{what} is not a valid ONNX model (protobuf parse failed: {exc}); "
                             "the file may be truncated or of another format") from None
    try:
        _check_looks_like_onnx(proto, what)
    except ModelLoadError:
        kind = _sniff(data)
        if kind is not None:
            raise ModelLoadError(f"{what} is {kind}, not an ONNX model") from None
        raise
    return proto


def _check_looks_like_onnx(proto: onnx.ModelProto, what: str) -> None:
    # Random bytes sometimes parse as a protobuf with only unknown fields: demand the essentials.
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        missing = "ir_version" if proto.ir_version <= 0 else "graph"
        raise ModelLoadError(f"{what} is not an ONNX model (it has no {missing}); "
                             "is it truncated or another kind of file?")
    if not proto.opset_import and proto.ir_version >= 3:
        raise ModelLoadError(f"{what} has no opset_import; every ONNX model must import an opset")


def to_proto(model: Model) -> onnx.ModelProto:
    """The model as one in-memory ``ModelProto`` with every tensor inline.

    Raises:
        EmitError: the result would exceed protobuf's 2 GB limit (save to a path instead).
    """
    total = _tensor_bytes(list(_tensors(model)))
    if total > _PROTOBUF_LIMIT:
        raise EmitError(f"the model holds {total / 1e9:.1f} GB of tensors, over protobuf's 2 GB "
                        "limit for one message; save it to a path (external data) instead")
    return _build_proto(model)


def _build_proto(model: Model, writer: Callable[[Tensor], onnx.TensorProto] | None = None) -> onnx.ModelProto:
    with _emit_errors():
        if writer is not None:
            return model_to_proto(model, writer)
        return model_to_proto(model)


@contextmanager
def _emit_errors() -> Iterator[None]:
    """Turn protobuf's errors while writing a model into :class:`EmitError`."""
    try:
        yield
    except UnicodeDecodeError:
        raise EmitError("the model has a name or string field that is not valid UTF-8 (was the "
                        "input corrupt?); fix the name and save again") from None
    except (DecodeError, RecursionError) as exc:
        if isinstance(exc, RecursionError) or "depth" in str(exc).lower():
            raise EmitError("the model nests subgraphs deeper than protobuf can store (100 message "
                            "levels, about 30 nested If/Loop bodies); onnx and onnxruntime could not "
                            "read it: flatten the nested control flow") from None
        raise


def _tensors(model: Model) -> Iterator[Tensor]:
    for g in model.all_graphs():
        for v in g.initializers.values():
            if isinstance(v.const_value, Tensor):
                yield v.const_value


def _tensor_bytes(tensors: list[Tensor]) -> int:
    """The tensors' ``nbytes`` added up.

    Models hold thousands of small tensors: for one read from the model, the count comes from
    its proto's dims and the bytes per element of its dtype (known after the first tensor of
    that dtype), skipping ``nbytes``' properties and tuples. Not ``ByteSize()``: protobuf
    encodes the whole tensor to answer it.
    """
    total = 0
    per_element: dict[int, int] = {}  # by dtype; 0 for types packed below a byte, and strings
    for t in tensors:
        if type(t) is not ProtoTensor:
            total += t.nbytes
            continue
        proto = t.to_proto()
        dtype = proto.data_type
        size = per_element.get(dtype)
        if size is None:
            size = storage_nbytes(dtype, (1,))
            if storage_nbytes(dtype, (2,)) != 2 * size or dtype == onnx.TensorProto.STRING:
                size = 0
            per_element[dtype] = size
        total += size * prod(proto.dims[:]) if size else t.nbytes  # [:]: a list, read at once
    return total


def save(model: Model, path: str | os.PathLike, *, external_data: bool | None = None,
         location: str | None = None, size_threshold: int = 1024,
         progress: Callable[[int, int], None] | None = None) -> None:
    """Write ``model`` to ``path`` atomically.

    Args:
        model: the IR model.
        path: the output ``.onnx`` file.
        external_data: store large initializers in a separate file. ``None`` (default) does so
            when the input model used external data or the tensors exceed ~1.8 GB.
        location: the data file's name, relative to the model's folder
            (default ``<file name>.data``).
        size_threshold: tensors smaller than this many bytes stay inline.
        progress: called with (bytes written, bytes to write) as tensors are written.

    Raises:
        EmitError: the output cannot be written (folder missing, no permission, > 2 GB inline).

    Example:
        >>> save(model, "out.onnx")  # doctest: +SKIP
    """
    path = os.fspath(path)
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise EmitError(f"cannot write '{path}': folder '{out_dir}' does not exist")
    tensors = list(_tensors(model))
    total = _tensor_bytes(tensors)
    if external_data is None:
        external_data = total > EXTERNAL_DATA_THRESHOLD or any(t.is_external() for t in tensors)
    cleanup: list[str] = []
    try:
        if external_data:
            location = location or os.path.basename(path) + ".data"
            if os.path.isabs(location) or ".." in location.replace("\\", "/").split("/"):
                raise EmitError(f"external data location '{location}' must be a plain file name")
            data_tmp, data_file = _open_temp(out_dir, location)
            cleanup.append(data_tmp)
            with data_file:
                writer = _ExternalWriter(data_file, location, size_threshold, progress, total)
                proto = _build_proto(model, writer)
            _write_proto(proto, path, out_dir, cleanup)
            data_path = os.path.join(out_dir, location)
            replaced = os.path.realpath(data_path)
            os.replace(data_tmp, data_path)
            cleanup.remove(data_tmp)
            _repoint_overwritten(model, replaced, writer.written, out_dir)
        else:
            if total > _PROTOBUF_LIMIT:
                raise EmitError(f"the model holds {total / 1e9:.1f} GB of tensors; protobuf cannot "
                                "store over 2 GB in one file: save with external_data=True")
            _write_inline(model, path, out_dir, cleanup)
            if progress is not None:
                progress(total, total)
    except OSError as exc:
        raise EmitError(f"cannot write '{path}': {exc.strerror or exc}") from None
    finally:
        for tmp in cleanup:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _open_temp(folder: str, name: str) -> tuple[str, BinaryIO]:
    """A new temporary file in ``folder``, open for writing, named after ``name``.

    Outputs are written under such a name and renamed into place once complete, so no reader
    ever sees a partial file under the output's name. They are not fsynced: like ``onnx.save``,
    a save does not promise durability across a power loss (which would cost a disk flush of
    milliseconds per file); the rename alone makes the file appear whole or not at all.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(name)}.", suffix=".tmp", dir=folder)
    # mkstemp creates the file readable by its owner only; give it the mode a plain open() would.
    os.fchmod(fd, 0o666 & ~_umask())
    return tmp, os.fdopen(fd, "wb")


def _umask() -> int:
    """The process umask (reading it means setting it; it is restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _field_key(message: type, field: str) -> bytes:
    """The wire key of a length-delimited field: ``(number << 3) | 2``."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


_GRAPH_KEY = _field_key(onnx.ModelProto, "graph")
_INITIALIZER_KEY = _field_key(onnx.GraphProto, "initializer")
_NODE_KEY = _field_key(onnx.GraphProto, "node")


class _FieldPrefixes(dict):
    """``key + varint(size)`` by size, each computed once (many payloads share a size)."""

    def __init__(self, key: bytes) -> None:
        super().__init__()
        self.key = key

    def __missing__(self, size: int) -> bytes:
        prefix = self[size] = self.key + _varint(size)
        return prefix


def _framed(key: bytes, payloads: list[bytes]) -> list[bytes]:
    """``[key + length, payload, ...]``: each payload as one length-delimited field ``key``."""
    out = [b""] * (2 * len(payloads))
    # map() over C functions: no Python frame per payload (models have thousands of nodes).
    out[0::2] = map(_FieldPrefixes(key).__getitem__, map(len, payloads))
    out[1::2] = payloads
    return out


def _write_inline(model: Model, path: str, out_dir: str, cleanup: list[str]) -> None:
    """Write ``model`` with every tensor inline, encoding main-graph nodes and initializers one by one.

    ``SerializeToString`` on a whole model grows one buffer to the model's size (copying as it
    doubles) and then copies it into a bytes object, after ``to_proto`` has already copied every
    tensor and node into the new message. Here the model is serialized without the main graph's
    nodes and initializers; each node and each initializer (the proto read from the file, when
    unchanged) is encoded on its own and framed as a ``GraphProto.node`` or
    ``GraphProto.initializer`` field inside the graph record. Fields come in another order on
    the wire than ``SerializeToString`` puts them; the file parses to the same ``ModelProto``.
    """
    with _emit_errors():
        proto = model_to_proto(model, main_initializers=False, main_nodes=False)
        nodes = _framed(_NODE_KEY, encode_nodes(model.graph))
        graph_rest = proto.graph.SerializeToString()
        proto.ClearField("graph")
        head = proto.SerializeToString()
    # Each initializer is a piece: encoded bytes, or a record copied from the input file. Large
    # encodings are not kept between sizing and writing (they are made again), so the save
    # never holds a second copy of the weights.
    pieces: list[bytes | FileTensor | Tensor] = []
    sizes: list[int] = []
    for v in model.graph.initializers.values():
        tensor = v.const_value
        if not isinstance(tensor, Tensor):
            continue
        tensor.name = v.name
        if isinstance(tensor, FileTensor) and tensor.unchanged():
            pieces.append(tensor)
            sizes.append(tensor.record_length)
            continue
        encoded = tensor.to_proto(with_data=True).SerializeToString()
        sizes.append(len(encoded))
        pieces.append(encoded if len(encoded) <= _KEEP_ENCODED else tensor)
    prefixes = _FieldPrefixes(_INITIALIZER_KEY)
    graph_size = sum(map(len, nodes)) + len(graph_rest) + sum(sizes) + sum(len(prefixes[n]) for n in sizes)
    tmp, f = _open_temp(out_dir, path)
    cleanup.append(tmp)
    with f:
        f.write(head)
        f.write(_GRAPH_KEY + _varint(graph_size))
        f.write(b"".join(nodes))
        f.write(graph_rest)
        del nodes, graph_rest
        batch: list[bytes] = []
        for piece, size in zip(pieces, sizes):
            batch.append(prefixes[size])
            if isinstance(piece, bytes):
                batch.append(piece)
            elif isinstance(piece, FileTensor) and piece.unchanged():
                f.writelines(batch)
                batch = []
                _copy_range(piece.source, piece.record_offset, size, f)
            else:
                encoded = piece.to_proto(with_data=True).SerializeToString()
                if len(encoded) != size:
                    raise EmitError(f"tensor '{piece.name}' encoded to {len(encoded)} bytes, then to {size}")
                batch.append(encoded)
                f.writelines(batch)
                batch = []
        f.writelines(batch)
    os.replace(tmp, path)
    cleanup.remove(tmp)


#: Encoded initializers up to this size are kept from sizing to writing; larger ones are made twice.
_KEEP_ENCODED = 1 << 20


def _copy_range(source: SourceFile, offset: int, length: int, f: BinaryIO) -> None:
    """Append ``length`` bytes of ``source`` at ``offset`` to ``f``, in the kernel where it can."""
    f.flush()
    out = f.fileno()
    copy = getattr(os, "copy_file_range", None)
    try:
        while copy is not None and length > 0:
            n = copy(source.fd, out, length, offset)
            if n <= 0:
                break
            offset += n
            length -= n
    except OSError:
        pass  # not supported between these files: copy through memory below
    for chunk in source.iter_chunks(offset, length):
        f.write(chunk)
    f.seek(0, os.SEEK_END)


def _write_proto(proto: onnx.ModelProto, path: str, out_dir: str, cleanup: list[str]) -> None:
    data = proto.SerializeToString()
    tmp, f = _open_temp(out_dir, path)
    cleanup.append(tmp)
    with f:
        f.write(data)
    os.replace(tmp, path)
    cleanup.remove(tmp)


def _repoint_overwritten(model: Model, replaced: str, written: dict[int, onnx.TensorProto],
                         out_dir: str) -> None:
    """Tensors that read the data file a save just replaced read the new file instead.

    Saving over the model's own data file moves tensors to new offsets; without this, the
    in-memory model would read the new file at the old offsets.
    """
    for g in model.all_graphs():
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, ExternalTensor) and t.path == replaced and id(t) in written:
                proto = written[id(t)]
                v.const_value = (ExternalTensor(proto, out_dir)
                                 if proto.data_location == onnx.TensorProto.EXTERNAL else ProtoTensor(proto))


class _ExternalWriter:
    """Streams tensors at or above the threshold into the data file; returns reference protos."""

    def __init__(self, f: BinaryIO, location: str, threshold: int,
                 progress: Callable[[int, int], None] | None = None, total: int = 0) -> None:
        self.f = f
        self.location = location
        self.threshold = threshold
        self.offset = 0
        self.progress = progress
        self.total = total
        self.done = 0  # tensor bytes handled so far, inline or not (for progress)
        self.written: dict[int, onnx.TensorProto] = {}  # id(tensor) -> proto written for it

    def _advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    def __call__(self, tensor: Tensor) -> onnx.TensorProto:
        if tensor.nbytes < self.threshold or tensor.dtype == onnx.TensorProto.STRING:
            inline = self.written[id(tensor)] = tensor.to_proto(with_data=True)
            self._advance(tensor.nbytes)
            return inline
        # Page alignment lets onnxruntime memory-map large weights.
        align = 4096 if tensor.nbytes >= 65536 else 64
        pad = (-self.offset) % align
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for chunk in tensor.iter_bytes():
            self.f.write(chunk)
            self.offset += len(chunk)
            self._advance(len(chunk))
        if self.offset - start != tensor.nbytes:
            # A wrong byte count would shift every later tensor: fail rather than corrupt.
            raise EmitError(f"tensor '{tensor.name}' produced {self.offset - start} bytes, expected "
                            f"{tensor.nbytes} for dtype {tensor.dtype} and shape {list(tensor.shape)}")
        proto = onnx.TensorProto()
        proto.name = tensor.name
        proto.data_type = tensor.dtype
        proto.dims.extend(tensor.shape)
        if tensor.doc_string:
            proto.doc_string = tensor.doc_string
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(start)),
                           ("length", str(self.offset - start))):
            entry = proto.external_data.add()
            entry.key = key
            entry.value = value
        self.written[id(tensor)] = proto
        return proto
