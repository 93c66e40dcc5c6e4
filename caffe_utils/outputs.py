"""Output files that appear together, completely, or not at all.

A run writes up to three files (the caffemodel, the JSON report, the plot). Each is first written
to a hidden temporary file next to its destination; only when all are complete does
:meth:`OutputSet.commit` rename them into place, with SIGINT, SIGTERM and SIGHUP held back for
those few renames. Any exception, Ctrl-C included, before the commit removes the temporary files,
so an interrupted or failed run (disk full, killed by a signal that Python sees) leaves neither a
partial file nor a stray temporary one; existing files at the destinations stay as they were.

Limits: SIGKILL and power loss cannot be handled; they may leave a ``.NAME.*.part`` temporary file
(never a partial file under the destination name). Renames are atomic only within one file system,
which holds because each temporary file lives in its destination's folder.
"""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from caffe_utils.errors import OutputError

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def temp_file_next_to(dest: "os.PathLike[str] | str", suffix: str = ".part") -> Tuple[int, str]:
    """``(fd, path)`` of a new hidden file in ``dest``'s folder, for writing ``dest`` atomically.

    Its mode follows the umask (0666 & ~umask) like a file Caffe or ``open()`` creates, not
    ``mkstemp``'s 0600, since it becomes the output file. Raises OSError as mkstemp does."""
    target = Path(dest)
    parent = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=str(parent))
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.fchmod(fd, 0o666 & ~mask)
    except OSError:
        pass
    return fd, tmp


class OutputSet:
    """Temporary paths for several outputs, renamed into place together by :meth:`commit`.

    Use as a context manager: leaving the block without a commit (an exception, an interrupt)
    removes every temporary file::

        with OutputSet() as outs:
            write_caffemodel(outs.stage("init.caffemodel"), ...)
            outs.commit()
    """

    def __init__(self) -> None:
        self._staged: List[Tuple[str, Path]] = []
        self.committed = False

    def stage(self, dest: "os.PathLike[str] | str") -> str:
        """A new temporary file next to ``dest`` (with ``dest``'s suffix) to write the output into."""
        target = Path(dest)
        parent = target.parent if str(target.parent) else Path(".")
        try:
            fd, tmp = temp_file_next_to(target, f".part{target.suffix}")
        except OSError as exc:
            raise OutputError(f"cannot create a file in '{parent}' ({exc.strerror}); choose a writable "
                              f"folder for '{target}'") from exc
        os.close(fd)
        self._staged.append((tmp, target))
        return tmp

    def commit(self) -> None:
        """Rename every staged file to its destination, with interrupting signals held back."""
        held = _block_signals()
        try:
            for tmp, dest in self._staged:
                try:
                    os.replace(tmp, dest)
                except OSError as exc:
                    raise OutputError(f"cannot write '{dest}' ({exc.strerror}); choose another path") from exc
            self._staged = []
            self.committed = True
        finally:
            _unblock_signals(held)

    def discard(self) -> None:
        """Remove the temporary files not yet committed."""
        for tmp, _ in self._staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._staged = []

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def _block_signals() -> Optional[set]:
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    except (AttributeError, OSError, ValueError):  # platforms without pthread_sigmask
        return None


def _unblock_signals(previous: Optional[set]) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
