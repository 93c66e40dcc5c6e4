"""Output files that appear completely or not at all: one file (:func:`atomic_file`) or several
together (:class:`OutputSet`, whose staged paths are written with :func:`direct_file`).

A run writes up to three files (the caffemodel, the JSON report, the plot). Each is first written
to a hidden temporary file next to its destination; only when all are complete does
:meth:`OutputSet.commit` rename them into place, with SIGINT, SIGTERM and SIGHUP held back for
those few renames. Any exception, Ctrl-C included, before the commit removes the temporary files,
so an interrupted or failed run (disk full, killed by a signal that Python sees) leaves neither a
partial file nor a stray temporary one; existing files at the destinations stay as they were.
The same signals are also held while a temporary file is created and registered for removal, so
a signal arriving between the two cannot orphan it.

Limits: SIGKILL and power loss cannot be handled; they may leave a ``.NAME.*.part`` temporary file
(never a partial file under the destination name). Renames are atomic only within one file system,
which holds because each temporary file lives in its destination's folder.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path
from typing import IO, Iterator, List, Tuple

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


def _write_failure(target: Path, exc: OSError, fix: str) -> OutputError:
    return OutputError(f"cannot write '{target}' ({exc.strerror or exc}); {fix}", reason=exc.strerror or str(exc))


@contextlib.contextmanager
def direct_file(path: "os.PathLike[str] | str", mode: str = "wb",
                fix: str = "free some space or choose another path") -> Iterator[IO]:
    """Open ``path`` itself for writing, flushed to disk when the block ends normally.

    For a path that :meth:`OutputSet.stage` returned: the set already writes to a temporary file
    and does the renaming and the cleanup. An OSError (disk full, no permission) becomes an
    :class:`OutputError` naming ``path`` and ending with ``fix``.
    """
    target = Path(path)
    try:
        fh = open(target, mode)
    except OSError as exc:
        raise _write_failure(target, exc, fix) from exc
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise _write_failure(target, exc, fix) from exc


@contextlib.contextmanager
def atomic_file(dest: "os.PathLike[str] | str", mode: str = "wb",
                fix: str = "free some space or choose another path") -> Iterator[IO]:
    """Open a file object for writing ``dest`` completely or not at all.

    The data go to a hidden temporary file next to ``dest``, which is flushed to disk and renamed
    onto ``dest`` when the block ends normally and removed when it ends with any exception
    (Ctrl-C included). An OSError (disk full, no permission) becomes an :class:`OutputError`
    naming ``dest`` and ending with ``fix``.
    A path from :meth:`OutputSet.stage` is such a temporary file already: write it with
    :func:`direct_file`.
    """
    target = Path(dest)
    hold = _SignalHold()  # a signal between creating the file and the try below would orphan it
    try:
        try:
            fd, tmp = temp_file_next_to(target)
        except OSError as exc:
            raise _write_failure(target, exc, fix) from exc
        try:
            with os.fdopen(fd, mode) as fh:
                hold.release()
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException as exc:
            with _SignalHold():
                _unlink_quietly(tmp)
            if isinstance(exc, OSError):
                raise _write_failure(target, exc, fix) from exc
            raise
    finally:
        hold.release()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class OutputSet:
    """Temporary paths for several outputs, renamed into place together by :meth:`commit`.

    Use as a context manager: leaving the block without a commit (an exception, an interrupt)
    removes every temporary file::

        with OutputSet() as outs:
            with direct_file(outs.stage("init.json"), "w") as fh:
                json.dump(report, fh)
            outs.commit()
    """

    def __init__(self) -> None:
        self._staged: List[Tuple[str, Path]] = []
        self.committed = False

    def stage(self, dest: "os.PathLike[str] | str") -> str:
        """A new temporary file next to ``dest`` (with ``dest``'s suffix) to write the output into."""
        target = Path(dest)
        parent = target.parent if str(target.parent) else Path(".")
        with _SignalHold():  # a signal between creating and registering would orphan the file
            try:
                fd, tmp = temp_file_next_to(target, f".part{target.suffix}")
            except OSError as exc:
                raise OutputError(f"cannot create a file in '{parent}' ({exc.strerror}); choose a writable "
                                  f"folder for '{target}'", reason=exc.strerror or str(exc)) from exc
            os.close(fd)
            self._staged.append((tmp, target))
        return tmp

    def commit(self) -> None:
        """Rename every staged file to its destination, with interrupting signals held back."""
        with _SignalHold():
            for tmp, dest in self._staged:
                try:
                    os.replace(tmp, dest)
                except OSError as exc:
                    raise OutputError(f"cannot write '{dest}' ({exc.strerror}); choose another path",
                                      reason=exc.strerror or str(exc)) from exc
            self._staged = []
            self.committed = True

    def discard(self) -> None:
        """Remove the temporary files not yet committed."""
        with _SignalHold():  # a second Ctrl-C must not cut the cleanup short
            for tmp, _ in self._staged:
                _unlink_quietly(tmp)
            self._staged = []

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


class _SignalHold:
    """Defer SIGINT, SIGTERM and SIGHUP while a few file operations must not be split.

    A signal mask would not do: the kernel hands a process-directed signal to any thread that
    does not block it (BLAS and OpenMP threads included), and Python then runs the handler in the
    main thread all the same. So the Python handlers are swapped for one that only records the
    signal; :meth:`release` puts the old handlers back and raises the first recorded signal again,
    which the old handler then treats as it would have (KeyboardInterrupt, the pipeline's
    Interrupted, the default action). Outside the main thread nothing is deferred.
    """

    def __init__(self) -> None:
        self._saved: dict = {}
        self._pending: List[int] = []
        try:
            for sig in sorted(_HELD_SIGNALS):
                old = signal.getsignal(sig)
                if old is None:  # installed outside Python: cannot be restored, leave it
                    continue
                signal.signal(sig, self._record)
                self._saved[sig] = old
        except ValueError:  # not the main thread
            self._restore()
        except BaseException:  # a signal came while the handlers were being swapped
            self._restore()
            raise

    def _restore(self) -> None:
        saved, self._saved = self._saved, {}
        for sig, old in saved.items():
            signal.signal(sig, old)

    def _record(self, signum: int, frame) -> None:
        self._pending.append(signum)

    def release(self) -> None:
        """Restore the handlers and deliver a signal that came meanwhile (idempotent)."""
        self._restore()
        pending, self._pending = self._pending, []
        if pending:
            signal.raise_signal(pending[0])

    def __enter__(self) -> "_SignalHold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
