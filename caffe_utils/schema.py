"""Which ``caffe_pb2`` schema reads a file, and the one-line error when none does.

Two schemas can be in one process: pycaffe's own ``caffe.proto.caffe_pb2`` (package ``caffe``)
when pycaffe is importable, and the project's (``caffe_utils/proto``, package
``magic_init_caffe``), a superset of BVLC Caffe with the fork layers OpenCV reads (SSD, Faster
R-CNN, R-FCN, mobile forks; the field numbers and the clashes between forks are written down in
``caffe.proto``). They register different protobuf names, so both load side by side.

* :func:`caffe_pb2` is the preferred schema: pycaffe's when importable (so a custom Caffe fork
  keeps its extra fields), else the project's. New messages are made from it.
* :func:`schemas` lists the schemas to try in order, preferred first, the project's last. A
  reader parses with each in turn, so a file that pycaffe's schema cannot read (a field it lacks)
  is still read by the project's; :func:`pb2_of` then tells which schema a message belongs to, and
  code that builds messages next to it uses that one (protobuf cannot mix the two).

``MAGIC_INIT_SCHEMA=builtin`` makes the project's schema the only one, even with pycaffe present.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import List, Optional

from caffe_utils.errors import PrototxtError

_PB2: Optional[ModuleType] = None
_SOURCE = ""

#: the forks whose fields the project's schema has, for error messages
KNOWN_FORKS = "SSD, Faster R-CNN, R-FCN, OpenCV's and the mobile forks'"


def pycaffe_importable() -> bool:
    """True when ``import caffe`` works and gives a real pycaffe (with ``caffe.Net``)."""
    if os.environ.get("MAGIC_INIT_SCHEMA") == "builtin":
        return False
    try:
        import caffe  # noqa: F401
    except Exception:  # pycaffe missing or broken (bad .so): treat as absent
        return False
    return hasattr(caffe, "Net")


def builtin_pb2() -> ModuleType:
    """The project's own schema (always importable)."""
    from caffe_utils.proto import caffe_pb2 as pb2
    return pb2


def caffe_pb2() -> ModuleType:
    """The preferred ``caffe_pb2`` module (pycaffe's when importable, else the project's)."""
    global _PB2, _SOURCE
    if _PB2 is None:
        if pycaffe_importable():
            from caffe.proto import caffe_pb2 as pb2
            _SOURCE = "pycaffe"
        else:
            pb2 = builtin_pb2()
            _SOURCE = "builtin"
        _PB2 = pb2
    return _PB2


def schema_source() -> str:
    """``"pycaffe"`` or ``"builtin"``: where :func:`caffe_pb2` came from."""
    caffe_pb2()
    return _SOURCE


def schemas() -> List[ModuleType]:
    """The schemas a reader tries, in order: the preferred one, then the project's if different."""
    first, own = caffe_pb2(), builtin_pb2()
    return [first] if first is own else [first, own]


def pb2_of(message) -> ModuleType:
    """The schema module that ``message`` (any Caffe message) was made from."""
    own = builtin_pb2()
    if message.DESCRIPTOR.file is own.DESCRIPTOR:
        return own
    return caffe_pb2()


def is_builtin(message) -> bool:
    """True when ``message`` belongs to the project's schema rather than pycaffe's."""
    return message.DESCRIPTOR.file is builtin_pb2().DESCRIPTOR


def unknown_field_error(source: str, line: int, column: int, message_name: str, field: str) -> PrototxtError:
    """The one-line error for a field that no schema we know has."""
    where = f"{source}:{line}:{column}" if line else source
    return PrototxtError(
        f"{where}: {message_name} has no field named \"{field}\": it is not in BVLC Caffe or the "
        f"forks we read ({KNOWN_FORKS} fields); check its spelling, or remove it")
