"""Exception classes for user-facing errors.

Every error a user can cause (bad file, bad option, unsupported layer...) is a subclass of
:class:`MagicInitError`; its message is one line that names the problem and the fix. The CLI
prints it without a traceback and exits non-zero. Anything else is a bug.
"""
from __future__ import annotations


class MagicInitError(Exception):
    """Base class for errors caused by user input; ``str(err)`` is the one-line message."""


class PrototxtError(MagicInitError):
    """A network definition could not be read or is not a valid Caffe net."""


class WeightsError(MagicInitError):
    """A caffemodel (or mean file) could not be read, or does not fit the net."""


class ShapeMismatchError(WeightsError):
    """A weight blob's shape differs from the one the prototxt implies."""


class UnsupportedLayerError(MagicInitError):
    """The numpy engine has no implementation for a layer type."""


class EngineError(MagicInitError):
    """The requested engine (pycaffe, GPU) is not available."""


class DataError(MagicInitError):
    """Input images or data sources are missing, unreadable or too few."""


class OutputError(MagicInitError):
    """The output file cannot be written; ``reason`` is the system's word for why (e.g.
    "Permission denied") when there is one, so a caller can phrase its own message."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason
