"""Which ``caffe_pb2`` module to use.

When pycaffe is importable its own ``caffe.proto.caffe_pb2`` is used, so that custom Caffe forks
keep their extra layer parameters. Otherwise the project's own schema (``caffe_utils/proto``,
field-compatible with BVLC Caffe) is used. Both cannot live in one process (they register the
same protobuf names), so the choice is made once, at first use. ``MAGIC_INIT_SCHEMA=builtin``
forces the project's schema (only useful in a process that never imports pycaffe).

Limit: a process that imported the built-in schema cannot import pycaffe afterwards.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

_PB2: Optional[ModuleType] = None
_SOURCE = ""


def pycaffe_importable() -> bool:
    """True when ``import caffe`` works and gives a real pycaffe (with ``caffe.Net``)."""
    if os.environ.get("MAGIC_INIT_SCHEMA") == "builtin":
        return False
    try:
        import caffe  # noqa: F401
    except Exception:  # pycaffe missing or broken (bad .so): treat as absent
        return False
    return hasattr(caffe, "Net")


def caffe_pb2() -> ModuleType:
    """The ``caffe_pb2`` module in use (pycaffe's when importable, else the project's)."""
    global _PB2, _SOURCE
    if _PB2 is None:
        if pycaffe_importable():
            from caffe.proto import caffe_pb2 as pb2
            _SOURCE = "pycaffe"
        else:
            from caffe_utils.proto import caffe_pb2 as pb2
            _SOURCE = "builtin"
        _PB2 = pb2
    return _PB2


def schema_source() -> str:
    """``"pycaffe"`` or ``"builtin"``: where :func:`caffe_pb2` came from."""
    caffe_pb2()
    return _SOURCE
