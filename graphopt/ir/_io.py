"""Loading and saving models: paths, bytes and protos; external data; atomic writes.

Saving never builds a protobuf message over 2 GB: large tensors go to an external data file,
copied in chunks from wherever they live (memory, or the input's own data file), and both files
are written under temporary names and renamed into place only when complete. A failed save
leaves no partial output behind.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Union

import onnx
from google.protobuf.message import DecodeError

from graphopt.errors import EmitError, ModelLoadError
from graphopt.ir._core import Model
from graphopt.ir._serde import model_from_proto, model_to_proto
from graphopt.ir._tensors import Tensor

__all__ = ["load", "save", "to_proto", "ModelSource"]

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto, Model]

_PROTOBUF_LIMIT = 2**31 - 1
#: Above this many bytes of initializers a model is saved with external data by default.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load(source: ModelSource, *, base_dir: str | None = None) -> Model:
    """Load a model into the IR from a path, serialized bytes or a ``ModelProto``.

    External data is not read: it is memory-mapped on demand. A ``ModelProto`` passed in is
    never modified.

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
        return model_from_proto(source, base_dir)
    if isinstance(source, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(source), "the given bytes")
        return model_from_proto(proto, base_dir)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ModelLoadError(f"model file '{path}' does not exist")
    if os.path.isdir(path):
        raise ModelLoadError(f"'{path}' is a folder, not an ONNX model file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ModelLoadError(f"cannot read '{path}': {exc.strerror}") from None
    proto = _parse(data, f"'{path}'")
    del data
    return model_from_proto(proto, base_dir if base_dir is not None else os.path.dirname(os.path.abspath(path)))


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{what} is empty, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{what} is not a valid ONNX model (protobuf parse failed: {exc}); "
                             "the file may be truncated or of another format") from None
    _check_looks_like_onnx(proto, what)
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
    total = sum(t.nbytes for t in _tensors(model))
    if total > _PROTOBUF_LIMIT:
        raise EmitError(f"the model holds {total / 1e9:.1f} GB of tensors, over protobuf's 2 GB "
                        "limit for one message; save it to a path (external data) instead")
    return model_to_proto(model)


def _tensors(model: Model):
    for g in model.all_graphs():
        for v in g.initializers.values():
            if isinstance(v.const_value, Tensor):
                yield v.const_value


def save(model: Model, path: str | os.PathLike, *, external_data: bool | None = None,
         location: str | None = None, size_threshold: int = 1024) -> None:
    """Write ``model`` to ``path`` atomically.

    Args:
        model: the IR model.
        path: the output ``.onnx`` file.
        external_data: store large initializers in a separate file. ``None`` (default) does so
            when the input model used external data or the tensors exceed ~1.8 GB.
        location: the data file's name, relative to the model's folder
            (default ``<file name>.data``).
        size_threshold: tensors smaller than this many bytes stay inline.

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
    if external_data is None:
        external_data = any(t.is_external() for t in tensors) or \
            sum(t.nbytes for t in tensors) > EXTERNAL_DATA_THRESHOLD
    cleanup: list[str] = []
    try:
        if external_data:
            location = location or os.path.basename(path) + ".data"
            if os.path.isabs(location) or ".." in location.replace("\\", "/").split("/"):
                raise EmitError(f"external data location '{location}' must be a plain file name")
            data_tmp = _temp_in(out_dir, location)
            cleanup.append(data_tmp)
            with open(data_tmp, "wb") as data_file:
                writer = _ExternalWriter(data_file, location, size_threshold)
                proto = model_to_proto(model, writer)
            _write_proto(proto, path, out_dir, cleanup)
            os.replace(data_tmp, os.path.join(out_dir, location))
            cleanup.remove(data_tmp)
        else:
            total = sum(t.nbytes for t in tensors)
            if total > _PROTOBUF_LIMIT:
                raise EmitError(f"the model holds {total / 1e9:.1f} GB of tensors; protobuf cannot "
                                "store over 2 GB in one file: save with external_data=True")
            proto = model_to_proto(model)
            _write_proto(proto, path, out_dir, cleanup)
    except OSError as exc:
        raise EmitError(f"cannot write '{path}': {exc.strerror or exc}") from None
    finally:
        for tmp in cleanup:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _temp_in(folder: str, name: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(name)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _write_proto(proto: onnx.ModelProto, path: str, out_dir: str, cleanup: list[str]) -> None:
    data = proto.SerializeToString()
    tmp = _temp_in(out_dir, path)
    cleanup.append(tmp)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    cleanup.remove(tmp)


class _ExternalWriter:
    """Streams tensors at or above the threshold into the data file; returns reference protos."""

    def __init__(self, f: BinaryIO, location: str, threshold: int) -> None:
        self.f = f
        self.location = location
        self.threshold = threshold
        self.offset = 0

    def __call__(self, tensor: Tensor) -> onnx.TensorProto:
        if tensor.nbytes < self.threshold or tensor.dtype == onnx.TensorProto.STRING:
            return tensor.to_proto(with_data=True)
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
        return proto
