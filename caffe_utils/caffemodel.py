"""Caffe weights files in and out: caffemodel weights and binaryproto means.

* :func:`read_caffemodel` reads V1 (``layers``) and current (``layer``) weight files into
  ``{layer name: LayerWeights}`` without protobuf's per-element copies;
  :func:`copy_caffemodel_into` streams one straight into a net's parameter arrays (memory: the
  arrays and a small read window, not the file as well).
* :func:`match_weights` checks a weights file against a net (by layer name, shapes as Caffe's
  ``Blob::ShapeEquals`` allows, legacy 4-D shapes included).
* Blobs are read from packed ``data``, ``double_data`` or OpenCV's ``raw_data`` (FP16, FP32 or
  FP64, ``raw_data_type``), all into float32; a file may mix them (mixed FP16/FP32 models).
* :func:`write_caffemodel` (in :mod:`caffe_utils.caffemodel_writer`) writes a weights file that
  Caffe's ``Net.copy_from`` loads, atomically; float32 by default, FP16 on request.
* :func:`read_mean` / :func:`write_mean` read and write a ``.binaryproto`` mean.

Limits: N-d blobs are kept as they are; a single file must stay under protobuf's 2 GiB message
limit (Caffe's own limit).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from caffe_utils import wire
from caffe_utils.errors import ShapeMismatchError, WeightsError
from caffe_utils.protofiles import V1_TYPE_NAMES, PathLike, read_file
from caffe_utils.schema import caffe_pb2
# the writer lives in its own module; importable from here as before
from caffe_utils.caffemodel_writer import (BLOB_DTYPES, _layer_without_blobs, write_caffemodel,  # noqa: F401
                                           write_caffemodel_to)


@dataclass
class LayerWeights:
    """One layer's blobs as read from a weights file (arrays may be read-only views)."""
    name: str
    type: str
    blobs: List[np.ndarray] = field(default_factory=list)
    legacy_shape: List[bool] = field(default_factory=list)


@dataclass
class BlobRecord:
    """Where one BlobProto's values lie in a caffemodel, without the values themselves.

    ``floats`` / ``doubles`` are the byte spans of its packed ``data`` / ``double_data`` fields,
    ``loose`` the values of its non-packed ones (of either). The values are the packed floats in
    order followed by the loose values or, when there are neither, the packed doubles. (Caffe's
    ``Blob::FromProto`` prefers ``double_data`` when a blob has both; writers never give both.)
    ``raw`` are the spans of OpenCV's (NVIDIA Caffe's) ``raw_data`` field, values of type
    ``raw_type`` (:data:`wire.RAW_FLOAT16` for FP16 models); when present they are the values.
    """
    shape: Tuple[int, ...]
    legacy: bool
    floats: List[Tuple[int, int]] = field(default_factory=list)
    doubles: List[Tuple[int, int]] = field(default_factory=list)
    loose: List[float] = field(default_factory=list)
    raw: List[Tuple[int, int]] = field(default_factory=list)
    raw_type: int = wire.RAW_FLOAT

    @property
    def uses_raw(self) -> bool:
        return bool(self.raw)

    @property
    def uses_floats(self) -> bool:
        return not self.raw and bool(self.floats or self.loose)

    @property
    def count(self) -> int:
        if self.raw:
            size = np.dtype(wire.RAW_DTYPES[self.raw_type]).itemsize
            return sum((b - a) // size for a, b in self.raw)
        if self.uses_floats:
            return sum((b - a) // 4 for a, b in self.floats) + len(self.loose)
        return sum((b - a) // 8 for a, b in self.doubles)


@dataclass
class LayerRecord:
    """One layer of a caffemodel: its name, type and where its blobs lie."""
    name: str
    type: str
    blobs: List[BlobRecord] = field(default_factory=list)


Buffer = Union[memoryview, wire.FileBuffer]
_MAX_DIM = (1 << 31) - 1  # Caffe's Blob keeps its dimensions as int


def _read_binary(path: PathLike, what: str) -> bytes:
    data = read_file(path, what, WeightsError)
    if not data:
        raise WeightsError(f"{what} '{path}' is empty; re-download or re-save it")
    return data


def _scan_blob(buf: Buffer, span: Tuple[int, int]) -> BlobRecord:
    """The :class:`BlobRecord` of the BlobProto at ``span`` (reads no packed values)."""
    dims: Optional[List[int]] = None
    legacy = [0, 0, 0, 0]
    legacy_set = False
    raw_type: Optional[int] = None
    rec = BlobRecord((), False)
    for f, wt, v in wire.iter_fields(buf, *span):
        if f == 7 and wt == wire.LEN:
            dims = []
            for sf, swt, sv in wire.iter_fields(buf, *v):
                if sf == 1 and swt == wire.LEN:
                    dims.extend(wire.signed64(d) for d in wire.packed_varints(buf, sv))
                elif sf == 1 and swt == wire.VARINT:
                    dims.append(wire.signed64(sv))
        elif f in (1, 2, 3, 4) and wt == wire.VARINT:
            legacy[f - 1] = wire.signed64(v)
            legacy_set = True
        elif f == 5 and wt == wire.LEN:
            if (v[1] - v[0]) % 4:
                raise wire.WireFormatError("packed float field with a length that is not a multiple of 4")
            rec.floats.append(v)
        elif f == 5 and wt == wire.I32:
            rec.loose.append(wire.fixed32_to_float(v))
        elif f == 8 and wt == wire.LEN:
            if (v[1] - v[0]) % 8:
                raise wire.WireFormatError("packed double field with a length that is not a multiple of 8")
            rec.doubles.append(v)
        elif f == 8 and wt == wire.I64:
            rec.loose.append(wire.fixed64_to_double(v))
        elif f == 10 and wt == wire.VARINT:
            raw_type = v
        elif f == 12 and wt == wire.LEN:
            rec.raw.append(v)
    if rec.raw:
        rec.raw_type = _check_raw(rec.raw, raw_type)
    count = rec.count
    if dims is not None:
        rec.shape, rec.legacy = tuple(dims), False
    elif legacy_set:
        rec.shape, rec.legacy = tuple(legacy), True
    else:
        rec.shape, rec.legacy = (count,), False
    if any(d < 0 or d > _MAX_DIM for d in rec.shape):
        raise wire.WireFormatError(f"blob of shape {rec.shape} has a dimension outside 0..{_MAX_DIM} "
                                   "(Caffe's int)")
    if math.prod(rec.shape) != count:
        raise wire.WireFormatError(f"blob of shape {rec.shape} holds {count} values")
    return rec


def _check_raw(spans: List[Tuple[int, int]], raw_type: Optional[int]) -> int:
    """``raw_type`` when ``raw_data`` of that type at ``spans`` can be read into float32."""
    if raw_type is None:
        raise wire.WireFormatError("blob has raw_data but no raw_data_type")
    if raw_type not in wire.RAW_DTYPES:
        name = {3: "INT", 4: "UINT"}.get(raw_type, str(raw_type))
        raise wire.WireFormatError(f"blob's raw_data is of type {name}; only FLOAT16, FLOAT and DOUBLE "
                                   "weights can be read")
    size = np.dtype(wire.RAW_DTYPES[raw_type]).itemsize
    if any((b - a) % size for a, b in spans):
        raise wire.WireFormatError(f"raw_data with a length that is not a multiple of {size}")
    return raw_type


def _blob_values(buf: memoryview, rec: BlobRecord) -> np.ndarray:
    """The values of ``rec`` from the in-memory ``buf`` (a view of it when it is one packed field)."""
    if rec.uses_raw:
        data = np.concatenate([wire.raw_array(buf, s, rec.raw_type) for s in rec.raw]).astype(np.float32)
    elif rec.uses_floats:
        chunks = [wire.float_array(buf, s) for s in rec.floats]
        if rec.loose:
            chunks.append(np.asarray(rec.loose, dtype=np.float32))
        data = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    elif rec.doubles:
        data = np.concatenate([wire.double_array(buf, s) for s in rec.doubles]).astype(np.float32)
    else:
        data = np.zeros(0, np.float32)
    return data.reshape(rec.shape)


def _decode_blob(buf: memoryview, span: Tuple[int, int]) -> Tuple[np.ndarray, bool]:
    rec = _scan_blob(buf, span)
    return _blob_values(buf, rec), rec.legacy


def _scan_caffemodel(buf: Buffer, source: str) -> "OrderedDict[str, LayerRecord]":
    """``{layer name: LayerRecord}`` of the NetParameter in ``buf`` (V1, V0-in-V1 or current
    layers); raises :class:`wire.WireFormatError` for malformed bytes."""
    v1_enum = caffe_pb2().V1LayerParameter.DESCRIPTOR.fields_by_name["type"].enum_type
    out: "OrderedDict[str, LayerRecord]" = OrderedDict()
    for f, wt, v in wire.iter_fields(buf, 0, len(buf)):
        if wt != wire.LEN or f not in (2, 100):
            continue
        name, ltype, blobs = "", "", []
        if f == 100:  # LayerParameter: name 1, type 2, blobs 7
            for lf, lwt, lv in wire.iter_fields(buf, *v):
                if lwt != wire.LEN:
                    continue
                if lf == 1:
                    name = wire.decode_string(buf, lv)
                elif lf == 2:
                    ltype = wire.decode_string(buf, lv)
                elif lf == 7:
                    blobs.append(_scan_blob(buf, lv))
        else:  # V1LayerParameter: name 4, type 5 (enum), blobs 6, V0 layer 1
            for lf, lwt, lv in wire.iter_fields(buf, *v):
                if lf == 4 and lwt == wire.LEN:
                    name = wire.decode_string(buf, lv)
                elif lf == 5 and lwt == wire.VARINT:
                    ev = v1_enum.values_by_number.get(lv)
                    ltype = V1_TYPE_NAMES.get(ev.name, ev.name) if ev else str(lv)
                elif lf == 6 and lwt == wire.LEN:
                    blobs.append(_scan_blob(buf, lv))
                elif lf == 1 and lwt == wire.LEN:  # V0: name 1, type 2, blobs 50
                    for zf, zwt, zv in wire.iter_fields(buf, *lv):
                        if zwt != wire.LEN:
                            continue
                        if zf == 1 and not name:
                            name = wire.decode_string(buf, zv)
                        elif zf == 2 and not ltype:
                            ltype = wire.decode_string(buf, zv)
                        elif zf == 50:
                            blobs.append(_scan_blob(buf, zv))
        if name in out and out[name].blobs and blobs:
            raise WeightsError(f"{source}: layer '{name}' appears twice with weights; "
                               "the file is not a valid caffemodel")
        if name not in out or blobs:
            out[name] = LayerRecord(name, ltype, blobs)
    if not out:
        raise WeightsError(f"{source}: contains no layers; it is not a caffemodel (re-save it with Caffe)")
    return out


def _unreadable(source: str, exc: Exception, head: bytes) -> WeightsError:
    """The error for a file whose wire format is broken; ``head`` is its first bytes."""
    hint = ("it looks like a text prototxt; pass the .caffemodel"
            if head[:200].lstrip()[:1].isalpha() or head.lstrip()[:1] in (b"#", b"l", b"n")
            else "the file is truncated or not a caffemodel; re-download or re-save it")
    return WeightsError(f"{source}: not a readable caffemodel ({exc}); {hint}")


def parse_caffemodel_bytes(data: bytes, source: str = "<bytes>") -> "OrderedDict[str, LayerWeights]":
    """Parse the bytes of a caffemodel (NetParameter) into ``{layer name: LayerWeights}``
    (packed float blobs are read-only views of ``data``)."""
    buf = memoryview(data)
    try:
        records = _scan_caffemodel(buf, source)
        return OrderedDict((name, LayerWeights(name, r.type, [_blob_values(buf, b) for b in r.blobs],
                                               [b.legacy for b in r.blobs]))
                           for name, r in records.items())
    except wire.WireFormatError as exc:
        raise _unreadable(source, exc, bytes(buf[:4096])) from exc


_READ_CHUNK = 1 << 24  # bytes per read call (a read of over 2 GiB fails on some systems)


class CaffemodelFile:
    """An open caffemodel whose layer index is read and whose values are read on demand.

    Opening it walks the file's fields with small reads (:class:`wire.FileBuffer`) and keeps only
    :attr:`layers`, the ``{name: LayerRecord}`` index; :meth:`read_into` copies one blob's values
    straight from the file into a caller's array, so reading a model never holds the file in
    memory. Use it as a context manager. Malformed files raise :class:`WeightsError` naming the
    file.
    """

    def __init__(self, path: PathLike, what: str = "weights file") -> None:
        p = Path(path)
        self.source = str(path)
        if not p.exists():
            raise WeightsError(f"{what} '{p}' does not exist; check the path")
        if p.is_dir():
            raise WeightsError(f"{what} '{p}' is a directory; pass the file itself")
        try:
            self._fh = open(p, "rb", buffering=0)
        except OSError as exc:
            raise WeightsError(f"cannot read {what} '{p}': {exc.strerror}; check its permissions") from exc
        try:
            size = os.fstat(self._fh.fileno()).st_size
            if not size:
                raise WeightsError(f"{what} '{path}' is empty; re-download or re-save it")
            buf = wire.FileBuffer(self._fh, size)
            try:
                self.layers: "OrderedDict[str, LayerRecord]" = _scan_caffemodel(buf, self.source)
            except wire.WireFormatError as exc:
                raise _unreadable(self.source, exc, buf[0:4096]) from exc
        except OSError as exc:
            self._fh.close()
            raise WeightsError(f"cannot read {what} '{p}': {exc.strerror}; check its permissions") from exc
        except BaseException:
            self._fh.close()
            raise

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "CaffemodelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _readinto(self, start: int, out: memoryview) -> None:
        """Fill the byte buffer ``out`` with the file's bytes from offset ``start``."""
        self._fh.seek(start)
        done = 0
        while done < len(out):
            n = self._fh.readinto(out[done:done + _READ_CHUNK])
            if not n:
                raise WeightsError(f"{self.source}: not a readable caffemodel (the file ended early; it "
                                   "changed while being read); re-download or re-save it")
            done += n

    def read_into(self, rec: BlobRecord, out: np.ndarray) -> None:
        """Copy the values of ``rec`` into ``out`` (any float array with ``rec.count`` elements,
        whatever its shape): packed little-endian floats go straight from the file into a
        C-contiguous float32 ``out``; anything else passes through a small buffer."""
        if out.size != rec.count:
            raise ValueError(f"destination holds {out.size} values, the blob {rec.count}")
        if not rec.count:
            return
        direct = (out.dtype == np.dtype("<f4") and out.flags.c_contiguous and out.flags.writeable)
        flat = out.reshape(-1) if direct else np.empty(out.size, np.float32)
        try:
            if rec.uses_floats:
                pos = 0
                for a, b in rec.floats:
                    n = (b - a) // 4
                    self._readinto(a, memoryview(flat[pos:pos + n]).cast("B"))
                    pos += n
                flat[pos:] = rec.loose
            elif rec.uses_raw:
                self._convert_into(rec.raw, wire.RAW_DTYPES[rec.raw_type], flat)
            else:
                self._convert_into(rec.doubles, "<f8", flat)
        except OSError as exc:
            raise WeightsError(f"cannot read weights file '{self.source}': {exc.strerror}") from exc
        if not direct:
            out[...] = flat.reshape(out.shape)

    def _convert_into(self, spans: List[Tuple[int, int]], dtype: str, flat: np.ndarray) -> None:
        """Fill ``flat`` (float32) with the values of type ``dtype`` at the file's ``spans``,
        through a scratch buffer of at most :data:`_READ_CHUNK` bytes (FP16 and double blobs)."""
        itemsize = np.dtype(dtype).itemsize
        scratch = np.empty(max(1, min(flat.size, _READ_CHUNK // itemsize)), dtype)
        pos = 0
        for a, b in spans:
            for s in range(a, b, scratch.nbytes):
                n = min(scratch.size, (b - s) // itemsize)
                self._readinto(s, memoryview(scratch[:n]).cast("B"))
                flat[pos:pos + n] = scratch[:n]
                pos += n

    def read(self, rec: BlobRecord) -> np.ndarray:
        """The values of ``rec`` as a new float32 array of the blob's shape in the file."""
        out = np.empty(rec.shape, np.float32)
        self.read_into(rec, out)
        return out


def read_caffemodel(path: PathLike) -> "OrderedDict[str, LayerWeights]":
    """Read a binary caffemodel (V1 or current) into ``{layer name: LayerWeights}``.

    The file is read blob by blob into new arrays; to fill existing arrays (a net's parameters)
    without that copy, use :func:`copy_caffemodel_into`."""
    with CaffemodelFile(path) as cf:
        return OrderedDict((name, LayerWeights(name, r.type, [cf.read(b) for b in r.blobs],
                                               [b.legacy for b in r.blobs]))
                           for name, r in cf.layers.items())


def legacy_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """Caffe's ``Blob::LegacyShape``: the shape left-padded with 1s to 4 axes."""
    return (1,) * (4 - len(shape)) + tuple(shape)


def _shape_ok(expected: Sequence[int], shape: Sequence[int], is_legacy: bool) -> bool:
    if tuple(shape) == tuple(expected):
        return True
    return is_legacy and len(expected) <= 4 and legacy_shape(expected) == tuple(shape)


def shape_compatible(expected: Sequence[int], array: np.ndarray, is_legacy: bool) -> bool:
    """Caffe's ``Blob::ShapeEquals``: exact shape, or legacy 4-D equal after padding."""
    return _shape_ok(expected, array.shape, is_legacy)


def _check_layer(name: str, expected: Sequence[Sequence[int]], shapes: Sequence[Tuple[int, ...]],
                 legacy: Sequence[bool], source: str) -> None:
    """:class:`ShapeMismatchError` unless the file's blobs of layer ``name`` fit ``expected``."""
    if len(shapes) != len(expected):
        raise ShapeMismatchError(
            f"{source}: layer '{name}' has {len(shapes)} blobs in the weights file but the "
            f"prototxt needs {len(expected)}; check bias_term and that the files belong together")
    for i, (want, shape, leg) in enumerate(zip(expected, shapes, legacy)):
        if not _shape_ok(want, shape, leg):
            raise ShapeMismatchError(
                f"{source}: layer '{name}' blob {i} has shape {tuple(shape)} in the weights "
                f"file but {tuple(want)} in the prototxt; use the prototxt that matches these weights")


def match_weights(expected: Mapping[str, Sequence[Sequence[int]]],
                  weights: Mapping[str, LayerWeights], source: str = "weights"
                  ) -> "OrderedDict[str, List[np.ndarray]]":
    """Match file weights to a net's parameter shapes by layer name, as ``Net.copy_from`` does.

    ``expected`` maps each layer that has parameters to its blobs' shapes. Layers of the file that
    the net lacks (data, loss, Split layers of a training net) are ignored; net layers missing
    from the file are left out of the result. Returns float32 arrays reshaped to the net's shapes.
    """
    out: "OrderedDict[str, List[np.ndarray]]" = OrderedDict()
    for name, shapes in expected.items():
        lw = weights.get(name)
        if lw is None or not lw.blobs:
            continue
        _check_layer(name, shapes, [a.shape for a in lw.blobs], lw.legacy_shape, source)
        out[name] = [np.asarray(arr, dtype=np.float32).reshape(tuple(shape))
                     for shape, arr in zip(shapes, lw.blobs)]
    return out


def copy_caffemodel_into(path: PathLike, params: Mapping[str, Sequence[np.ndarray]]) -> Iterator[str]:
    """Fill ``params`` (layer name -> the layer's parameter arrays, e.g. a net's ``data``
    arrays) from the caffemodel ``path`` by layer name, as :func:`match_weights` matches them,
    reading each blob straight from the file into its array.

    A generator: every shape is checked before any array is written (a mismatch raises
    :class:`ShapeMismatchError` with the net unchanged); then it yields each layer's name once
    that layer's arrays hold the file's values. Peak memory is the arrays themselves plus a small
    read window, whatever the file's size.
    """
    with CaffemodelFile(path) as cf:
        todo = []
        for name, arrays in params.items():
            rec = cf.layers.get(name)
            if rec is None or not rec.blobs:
                continue
            _check_layer(name, [a.shape for a in arrays], [b.shape for b in rec.blobs],
                         [b.legacy for b in rec.blobs], str(path))
            todo.append((name, rec, arrays))
        for name, rec, arrays in todo:
            for b, arr in zip(rec.blobs, arrays):
                cf.read_into(b, arr)
            yield name


# ----------------------------------------------------------------------------- mean file

def read_mean(path: PathLike) -> np.ndarray:
    """Read a Caffe mean ``.binaryproto`` (a BlobProto) as a float32 (C, H, W) array."""
    data = _read_binary(path, "mean file")
    try:
        blobs = [_decode_blob(memoryview(data), (0, len(data)))]
    except wire.WireFormatError as exc:
        raise WeightsError(f"{path}: not a readable mean .binaryproto ({exc}); "
                           "create it with Caffe's compute_image_mean") from exc
    arr = np.array(blobs[0][0], dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.size == 0:
        raise WeightsError(f"{path}: mean blob has shape {arr.shape}, expected (1, C, H, W); "
                           "create it with Caffe's compute_image_mean")
    return arr


def write_mean(path: PathLike, mean: np.ndarray) -> None:
    """Write a (C, H, W) mean as a legacy 4-D BlobProto, as compute_image_mean does."""
    pb2 = caffe_pb2()
    arr = np.asarray(mean, dtype=np.float32)
    bp = pb2.BlobProto(num=1, channels=arr.shape[0], height=arr.shape[1], width=arr.shape[2])
    bp.MergeFromString(wire.len_prefix(5, arr.nbytes) + arr.astype("<f4").tobytes())
    Path(path).write_bytes(bp.SerializeToString())
