"""Minimal protobuf wire-format reader/writer for Caffe's large messages.

Parsing a 500 MB caffemodel through protobuf's Python API costs several copies of the file;
this module walks the wire format directly and exposes packed float blobs as numpy views of the
file's bytes, and writes blobs from numpy buffers without per-element conversion. It knows only
what Caffe's NetParameter/LayerParameter/BlobProto need; all other fields are skipped.

Every bounds problem raises :class:`WireFormatError`, never IndexError.
"""
from __future__ import annotations

import struct
from typing import Iterator, Tuple, Union

import numpy as np

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class WireFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(buf: memoryview, pos: int, end: int) -> Tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireFormatError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireFormatError("varint too long")


FieldValue = Union[int, Tuple[int, int]]


def iter_fields(buf: memoryview, start: int, end: int) -> Iterator[Tuple[int, int, FieldValue]]:
    """Yield ``(field_number, wire_type, value)`` for each field in ``buf[start:end]``.

    ``value`` is an int for VARINT/I32/I64 and a ``(start, stop)`` span for LEN fields.
    """
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        field, wtype = key >> 3, key & 7
        if field == 0:
            raise WireFormatError("field number 0")
        if wtype == VARINT:
            value, pos = read_varint(buf, pos, end)
            yield field, wtype, value
        elif wtype == LEN:
            length, pos = read_varint(buf, pos, end)
            if pos + length > end:
                raise WireFormatError("truncated length-delimited field")
            yield field, wtype, (pos, pos + length)
            pos += length
        elif wtype == I32:
            if pos + 4 > end:
                raise WireFormatError("truncated fixed32")
            yield field, wtype, int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        elif wtype == I64:
            if pos + 8 > end:
                raise WireFormatError("truncated fixed64")
            yield field, wtype, int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        else:
            raise WireFormatError(f"unsupported wire type {wtype}")


def decode_string(buf: memoryview, span: Tuple[int, int]) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError("invalid UTF-8 in a string field") from exc


def packed_varints(buf: memoryview, span: Tuple[int, int]) -> list:
    out = []
    pos, end = span
    while pos < end:
        v, pos = read_varint(buf, pos, end)
        out.append(v)
    return out


def signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_key(field: int, wtype: int) -> bytes:
    return encode_varint((field << 3) | wtype)


def len_prefix(field: int, length: int) -> bytes:
    return encode_key(field, LEN) + encode_varint(length)


def encode_blob(array: np.ndarray) -> bytes:
    """Serialize ``array`` as a Caffe BlobProto: ``shape`` (field 7) and packed float ``data`` (5)."""
    if array is None:
        raise TypeError("blob data is None")
    arr = np.ascontiguousarray(array, dtype="<f4")
    dims = b"".join(encode_varint(int(d)) for d in arr.shape)
    shape_msg = (len_prefix(1, len(dims)) + dims) if dims else b""
    raw = arr.tobytes()
    return len_prefix(7, len(shape_msg)) + shape_msg + len_prefix(5, len(raw)) + raw


def float_array(buf: memoryview, span: Tuple[int, int]) -> np.ndarray:
    n = span[1] - span[0]
    if n % 4:
        raise WireFormatError("packed float field with a length that is not a multiple of 4")
    return np.frombuffer(buf, dtype="<f4", count=n // 4, offset=span[0])


def double_array(buf: memoryview, span: Tuple[int, int]) -> np.ndarray:
    n = span[1] - span[0]
    if n % 8:
        raise WireFormatError("packed double field with a length that is not a multiple of 8")
    return np.frombuffer(buf, dtype="<f8", count=n // 8, offset=span[0])


def fixed32_to_float(v: int) -> float:
    return struct.unpack("<f", v.to_bytes(4, "little"))[0]


def fixed64_to_double(v: int) -> float:
    return struct.unpack("<d", v.to_bytes(8, "little"))[0]
