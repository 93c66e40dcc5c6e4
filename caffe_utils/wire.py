"""Minimal protobuf wire-format reader/writer for Caffe's large messages.

Parsing a 500 MB caffemodel through protobuf's Python API costs several copies of the file;
this module walks the wire format directly, either in memory (a ``memoryview``, where packed
float blobs become numpy views of the bytes) or in a file through :class:`FileBuffer`, which
reads only the bytes the walk looks at (field keys, lengths, names, shapes) and lets the caller
copy a blob's packed floats straight from the file into their destination. Blobs are written
from numpy buffers without per-element conversion: :func:`blob_header` gives the bytes before
the raw floats, so a writer can put the array's own buffer after it. It knows only what Caffe's
NetParameter/LayerParameter/BlobProto need; all other fields are skipped.

Every bounds problem raises :class:`WireFormatError`, never IndexError.
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator, Optional, Tuple, Union, overload

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
    """A varint as protobuf's int64 reads it: truncated to 64 bits, two's complement."""
    v &= (1 << 64) - 1
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


#: BlobProto.raw_data_type values (NVIDIA Caffe's enum Type, as OpenCV reads it)
RAW_DOUBLE, RAW_FLOAT, RAW_FLOAT16 = 0, 1, 2
RAW_DTYPES = {RAW_DOUBLE: "<f8", RAW_FLOAT: "<f4", RAW_FLOAT16: "<f2"}


def blob_header(shape: Tuple[int, ...], nbytes: int, raw_type: Optional[int] = None) -> bytes:
    """The bytes of a Caffe BlobProto that precede its ``nbytes`` of little-endian values:
    ``shape`` (field 7), then the key and length of packed float ``data`` (field 5) or, with
    ``raw_type`` (e.g. :data:`RAW_FLOAT16`), ``raw_data_type`` (10) and the key and length of
    ``raw_data`` (12), OpenCV's storage for FP16 blobs."""
    dims = b"".join(encode_varint(int(d)) for d in shape)
    shape_msg = (len_prefix(1, len(dims)) + dims) if dims else b""
    head = len_prefix(7, len(shape_msg)) + shape_msg
    if raw_type is None:
        return head + len_prefix(5, nbytes)
    return head + encode_key(10, VARINT) + encode_varint(raw_type) + len_prefix(12, nbytes)


def blob_array(array: np.ndarray) -> np.ndarray:
    """``array`` as the C-contiguous little-endian float32 array a blob stores (no copy when it
    already is one)."""
    if array is None:
        raise TypeError("blob data is None")
    arr = np.asarray(array, dtype="<f4")  # (np.ascontiguousarray would turn a 0-axis blob into (1,))
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def encode_blob(array: np.ndarray) -> bytes:
    """Serialize ``array`` as a Caffe BlobProto: ``shape`` (field 7) and packed float ``data`` (5).

    This builds the whole message in memory; writers of large blobs use :func:`blob_header` and
    the array's buffer instead."""
    arr = blob_array(array)
    return blob_header(arr.shape, arr.nbytes) + arr.tobytes()


def float_array(buf: memoryview, span: Tuple[int, int]) -> np.ndarray:
    n = span[1] - span[0]
    if n % 4:
        raise WireFormatError("packed float field with a length that is not a multiple of 4")
    return np.frombuffer(buf, dtype="<f4", count=n // 4, offset=span[0])


def raw_array(buf: memoryview, span: Tuple[int, int], raw_type: int) -> np.ndarray:
    """The ``raw_data`` bytes at ``span`` as a numpy view of ``raw_type``'s little-endian values."""
    dtype = np.dtype(RAW_DTYPES[raw_type])
    n = span[1] - span[0]
    if n % dtype.itemsize:
        raise WireFormatError(f"raw_data of {n} bytes is not a whole number of {dtype.itemsize}-byte values")
    return np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize, offset=span[0])


def double_array(buf: memoryview, span: Tuple[int, int]) -> np.ndarray:
    n = span[1] - span[0]
    if n % 8:
        raise WireFormatError("packed double field with a length that is not a multiple of 8")
    return np.frombuffer(buf, dtype="<f8", count=n // 8, offset=span[0])


def fixed32_to_float(v: int) -> float:
    return struct.unpack("<f", v.to_bytes(4, "little"))[0]


def fixed64_to_double(v: int) -> float:
    return struct.unpack("<d", v.to_bytes(8, "little"))[0]


class FileBuffer:
    """A read-only, byte-indexable view of an open binary file for the walking functions above.

    ``buf[i]`` is the byte at offset ``i`` and ``buf[a:b]`` the bytes of that range, read on
    demand through a small window (``window`` bytes, read at the offset asked for), so walking the
    fields of a message reads only its keys, lengths and the small fields looked at; the payload
    of a skipped length-delimited field is never read. Offsets outside ``[0, len(buf))`` raise
    :class:`WireFormatError`; a file that shrinks while being read raises it too.
    """

    def __init__(self, fh: BinaryIO, size: int, window: int = 1 << 16) -> None:
        self._fh = fh
        self._size = int(size)
        self._window = int(window)
        self._start = 0
        self._data = b""

    def __len__(self) -> int:
        return self._size

    def _read(self, start: int, n: int) -> bytes:
        self._fh.seek(start)
        data = self._fh.read(n)
        if len(data) != n:
            raise WireFormatError("truncated file (it changed while being read)")
        return data

    def _fill(self, start: int) -> None:
        self._data = self._read(start, min(self._window, self._size - start))
        self._start = start

    @overload
    def __getitem__(self, key: int) -> int: ...

    @overload
    def __getitem__(self, key: slice) -> bytes: ...

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self._size)
            if step != 1:
                raise ValueError("FileBuffer slices must be contiguous")
            if stop <= start:
                return b""
            off = start - self._start
            if 0 <= off and stop - self._start <= len(self._data):
                return self._data[off:stop - self._start]
            if stop - start > self._window:
                return self._read(start, stop - start)
            self._fill(start)
            return self._data[:stop - start]
        if not 0 <= key < self._size:
            raise WireFormatError(f"offset {key} outside the file's {self._size} bytes")
        off = key - self._start
        if not 0 <= off < len(self._data):
            self._fill(key)
            off = 0
        return self._data[off]
