"""Reading a model file's wire format around its large weights, so they stay on disk.

Parsing a model file the usual way reads the whole file into memory and then copies every
tensor's bytes into the parsed message: twice the file's size, for weights that most passes
never read. :func:`split_large_initializers` walks the protobuf wire format of the file instead
(memory-mapped, so only the pages it reads are touched): it finds the main graph's initializers
whose ``raw_data`` is large, and returns the model's bytes with those ``raw_data`` fields cut
out, plus where each cut field lies in the file. The caller parses the (small) rest and reads a
weight from the file only when it is needed (:class:`graphopt.ir._tensors.FileTensor`).

Anything unusual (a repeated ``graph`` field, a ``raw_data`` field given twice, group wire
types, a malformed length) makes the split decline (``None``): the caller then parses the
whole file as before, which reports real errors precisely.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Iterator, Union

__all__ = ["FileSlice", "encode_varint", "split_large_initializers"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9


#: A model file's bytes: memory-mapped, or in memory.
Buffer = Union[mmap.mmap, bytes]


class _Malformed(Exception):
    """The bytes are not what the split expects: parse the whole file instead."""


@dataclass(frozen=True)
class FileSlice:
    """Where a cut initializer lies in the file.

    Attributes:
        index: its position among the main graph's initializers.
        data_offset: file offset of its ``raw_data`` bytes.
        data_length: their length.
        record_offset: file offset of its encoded ``TensorProto`` (without the field key).
        record_length: the encoded ``TensorProto``'s length.
    """

    index: int
    data_offset: int
    data_length: int
    record_offset: int
    record_length: int


def _varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def encode_varint(n: int) -> bytes:
    """``n`` (non-negative) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _skip(buf: Buffer, pos: int, end: int, wire: int) -> int:
    """The position after a field's payload, the key already read."""
    if wire == _VARINT:
        return _varint(buf, pos, end)[1]
    if wire == _I64:
        pos += 8
    elif wire == _I32:
        pos += 4
    elif wire == _LEN:
        length, pos = _varint(buf, pos, end)
        pos += length
    else:
        raise _Malformed  # groups (deprecated) and invalid wire types
    if pos > end:
        raise _Malformed
    return pos


def _fields(buf: Buffer, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield ``(number, wire type, field start, payload start, payload end)`` for each field."""
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed
        if wire == _LEN:
            length, payload = _varint(buf, pos, end)
            pos = payload + length
            if pos > end:
                raise _Malformed
            yield number, wire, start, payload, pos
        else:
            pos = _skip(buf, pos, end, wire)
            yield number, wire, start, pos, pos
    if pos != end:
        raise _Malformed


def _raw_data_field(buf: Buffer, start: int, end: int, min_bytes: int) -> tuple[int, int, int] | None:
    """``(field start, payload start, payload end)`` of a tensor's only large ``raw_data`` field."""
    found: tuple[int, int, int] | None = None
    count = 0
    for number, wire, field_start, payload, field_end in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA:
            count += 1
            if wire == _LEN:
                found = (field_start, payload, field_end)
    if count != 1 or found is None or found[2] - found[1] < min_bytes:
        return None  # small, absent, or given twice (the last would win: keep it simple)
    return found


def split_large_initializers(buf: Buffer, min_bytes: int) -> tuple[bytes, list[FileSlice]] | None:
    """The model's bytes without the ``raw_data`` of main-graph initializers of ``min_bytes`` or more.

    Returns ``None`` when no initializer is that large or the file is not plainly encoded (see
    the module docstring); the caller then parses the file whole.

    Example:
        >>> with open("model.onnx", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        ...     rest, slices = split_large_initializers(m, 1 << 16)  # doctest: +SKIP
    """
    try:
        return _split(buf, min_bytes)
    except _Malformed:
        return None


def _split(buf: Buffer, min_bytes: int) -> tuple[bytes, list[FileSlice]] | None:
    size = len(buf)
    graph: tuple[int, int, int] | None = None
    for number, wire, start, payload, end in _fields(buf, 0, size):
        if number == _MODEL_GRAPH:
            if graph is not None or wire != _LEN:
                return None  # protobuf would merge repeated messages: not a plain file
            graph = (start, payload, end)
    if graph is None:
        return None
    g_start, g_payload, g_end = graph
    pieces: list[bytes] = []  # the new graph payload
    slices: list[FileSlice] = []
    copied = g_payload  # bytes before this offset are in ``pieces``
    index = 0
    for number, wire, start, payload, end in _fields(buf, g_payload, g_end):
        if number != _GRAPH_INITIALIZER or wire != _LEN:
            continue
        raw = _raw_data_field(buf, payload, end, min_bytes)
        if raw is not None:
            raw_start, raw_payload, raw_end = raw
            header_length = (end - payload) - (raw_end - raw_start)
            pieces.append(buf[copied:start])
            pieces.append(encode_varint(_GRAPH_INITIALIZER << 3 | _LEN) + encode_varint(header_length))
            pieces.append(buf[payload:raw_start])
            pieces.append(buf[raw_end:end])
            copied = end
            slices.append(FileSlice(index, raw_payload, raw_end - raw_payload, payload, end - payload))
        index += 1
    if not slices:
        return None
    pieces.append(buf[copied:g_end])
    graph_payload = b"".join(pieces)
    rest = b"".join((buf[:g_start], encode_varint(_MODEL_GRAPH << 3 | _LEN),
                     encode_varint(len(graph_payload)), graph_payload, buf[g_end:]))
    return rest, slices
