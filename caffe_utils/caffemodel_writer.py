"""Caffe weights files out: :func:`write_caffemodel`, float32 (what every Caffe loads) or FP16.

Split from :mod:`caffe_utils.caffemodel` (the reader), which re-exports it. A blob is written
straight from its array's buffer after the few bytes :func:`wire.blob_header` gives, so writing
a large model costs no copy of it (FP16 output costs one half-size copy per blob).
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Mapping, Sequence, Tuple

import numpy as np

from caffe_utils import wire
from caffe_utils.errors import OutputError
from caffe_utils.outputs import atomic_file
from caffe_utils.protofiles import PathLike


def _layer_without_blobs(layer) -> bytes:
    if not len(layer.blobs):
        return layer.SerializeToString()
    stripped = layer.__class__()
    stripped.CopyFrom(layer)
    stripped.ClearField("blobs")
    return stripped.SerializeToString()


BLOB_DTYPES = ("float32", "float16")
_FP16_MAX = float(np.finfo(np.float16).max)


def _stored(name: str, i: int, array: np.ndarray, blob_dtype: str) -> Tuple[np.ndarray, bytes]:
    """The array a blob is written from and the BlobProto bytes before its values."""
    a = wire.blob_array(array)
    if blob_dtype == "float32":
        return a, wire.blob_header(a.shape, a.nbytes)
    finite = a[np.isfinite(a)]
    if finite.size and float(np.abs(finite).max()) > _FP16_MAX:
        raise OutputError(f"layer '{name}' blob {i} has values beyond float16's range (±{_FP16_MAX:g}); "
                          "write float32 weights (the default) instead")
    h = np.ascontiguousarray(a, dtype="<f2")
    return h, wire.blob_header(h.shape, h.nbytes, wire.RAW_FLOAT16)


def write_caffemodel(path: PathLike, net, params: Mapping[str, Sequence[np.ndarray]],
                     blob_dtype: str = "float32") -> None:
    """Write a caffemodel (see :func:`write_caffemodel_to`) to ``path`` completely or not at all:
    through a temporary file next to it that is renamed into place, so an interrupted run never
    leaves a partial file."""
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if dest.is_dir():
        raise OutputError(f"output '{dest}' is a directory; give a file name such as {dest}/init.caffemodel")
    if not parent.is_dir():
        raise OutputError(f"output directory '{parent}' does not exist; create it or choose another -o path")
    _check(net, params, blob_dtype)  # before a temporary file is made
    with atomic_file(dest, "wb", fix="free space or choose a writable -o path") as fh:
        _write(fh, net, params, blob_dtype)


def _check(net, params: Mapping[str, Sequence[np.ndarray]], blob_dtype: str) -> None:
    if blob_dtype not in BLOB_DTYPES:
        raise ValueError(f"blob_dtype must be one of {BLOB_DTYPES}, not {blob_dtype!r}")
    known = {l.name for l in net.layer}
    missing = [n for n in params if n not in known]
    if missing:
        raise ValueError(f"parameters given for layers not in the net: {missing}")


def write_caffemodel_to(fh: BinaryIO, net, params: Mapping[str, Sequence[np.ndarray]],
                        blob_dtype: str = "float32") -> None:
    """Write a caffemodel into the open binary file ``fh``: every layer of ``net`` (a
    NetParameter) with its blobs from ``params``.

    The file is what Caffe's ``Net::ToProto`` writes (full layer definitions plus blobs), so
    ``caffe.Net(prototxt, path, phase)``, ``Net.copy_from`` and OpenCV's ``readNetFromCaffe``
    load it. Each blob's floats are written from the array's own buffer (no copy for
    C-contiguous float32 arrays). ``blob_dtype="float16"`` stores the blobs as OpenCV's FP16
    ``raw_data`` instead: half the size, loaded by OpenCV (and by this reader) but not by BVLC
    Caffe, and values beyond float16's range are an :class:`OutputError`.
    """
    _check(net, params, blob_dtype)
    _write(fh, net, params, blob_dtype)


def _write(fh: BinaryIO, net, params: Mapping[str, Sequence[np.ndarray]], blob_dtype: str) -> None:
    if net.name:
        name = net.name.encode("utf-8")
        fh.write(wire.len_prefix(1, len(name)) + name)
    for layer in net.layer:
        head = _layer_without_blobs(layer)
        stored = [_stored(layer.name, i, a, blob_dtype) for i, a in enumerate(params.get(layer.name, ()))]
        sizes = [len(h) + a.nbytes for a, h in stored]
        body_len = len(head) + sum(len(wire.len_prefix(7, n)) + n for n in sizes)
        fh.write(wire.len_prefix(100, body_len))
        fh.write(head)
        for (a, h), n in zip(stored, sizes):
            fh.write(wire.len_prefix(7, n) + h)
            fh.write(memoryview(a.reshape(-1)).cast("B"))
