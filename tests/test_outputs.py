"""caffe_utils.outputs: files appear completely or not at all, whatever signal comes when.

The signal tests fire SIGINT from another thread at random moments while files are created,
written and renamed, many times over, and then look for stray temporary files. A signal mask in
the main thread would not stop these (the kernel may hand the signal to any thread), which is
how an earlier version leaked a staged file about once in ten Ctrl-C's.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from caffe_utils.errors import OutputError
from caffe_utils.outputs import OutputSet, atomic_file, direct_file


def _names(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_file_writes_whole_file_or_leaves_the_old_one(tmp_path):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"old")
    with atomic_file(dest) as fh:
        fh.write(b"new")
        assert dest.read_bytes() == b"old"  # not yet
    assert dest.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_file(dest) as fh:
            fh.write(b"half")
            raise RuntimeError("failed mid-way")
    assert dest.read_bytes() == b"new" and _names(tmp_path) == ["a.bin"]


def test_atomic_file_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "m.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.txt").stat().st_mode & 0o777 == 0o640


def test_atomic_file_turns_os_errors_into_one_output_error(tmp_path):
    with pytest.raises(OutputError, match=r"cannot write '.*nowhere.*x\.bin'.*pick another"):
        with atomic_file(tmp_path / "nowhere" / "x.bin", fix="pick another") as fh:
            fh.write(b"x")
    with pytest.raises(OutputError, match=r"cannot write '.*nowhere.*x\.bin'.*pick another"):
        with direct_file(tmp_path / "nowhere" / "x.bin", fix="pick another") as fh:
            fh.write(b"x")


def test_direct_file_writes_the_path_itself(tmp_path):
    """For a staged path: the file is the given one, no temporary file next to it."""
    dest = tmp_path / "staged.part.json"
    with direct_file(dest, "w") as fh:
        fh.write("{}")
        assert _names(tmp_path) == ["staged.part.json"]
    assert dest.read_text() == "{}"


def test_output_set_commits_all_or_nothing(tmp_path):
    with OutputSet() as outs:
        a, b = outs.stage(tmp_path / "a.caffemodel"), outs.stage(tmp_path / "b.json")
        assert a.endswith(".caffemodel") and Path(a).parent == tmp_path
        Path(a).write_text("A")
        Path(b).write_text("B")
        assert _names(tmp_path) == sorted(Path(p).name for p in (a, b))
        outs.commit()
    assert outs.committed and _names(tmp_path) == ["a.caffemodel", "b.json"]
    with pytest.raises(KeyError):
        with OutputSet() as outs:
            Path(outs.stage(tmp_path / "c.caffemodel")).write_text("C")
            raise KeyError("before the commit")
    assert not outs.committed and _names(tmp_path) == ["a.caffemodel", "b.json"]


def _under_random_sigint(work, rounds: int) -> int:
    """Run ``work(i)`` ``rounds`` times while another thread sends SIGINT at random moments;
    the number of rounds that were interrupted. As from one Ctrl-C per run, only the first
    signal in a round raises; later ones, and those that land in this loop's bookkeeping, are
    ignored."""
    stop = threading.Event()
    armed = [False]
    rng = random.Random(0)

    def shooter() -> None:
        while not stop.is_set():
            time.sleep(rng.uniform(0.0, 0.002))
            os.kill(os.getpid(), signal.SIGINT)

    def on_sigint(signum, frame) -> None:
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    interrupted = 0
    thread = threading.Thread(target=shooter, daemon=True)
    thread.start()
    try:
        for i in range(rounds):
            armed[0] = True
            try:
                work(i)
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                armed[0] = False
    finally:
        stop.set()
        thread.join()
        time.sleep(0.05)  # a last signal on its way lands here, disarmed
        signal.signal(signal.SIGINT, previous)
    return interrupted


def test_sigint_at_any_moment_leaves_no_temporary_file(tmp_path):
    def staged(i: int) -> None:
        with OutputSet() as outs:
            p = outs.stage(tmp_path / f"s{i}.caffemodel")
            with direct_file(p) as fh:
                fh.write(b"x" * 4096)
            q = outs.stage(tmp_path / f"s{i}.json")
            Path(q).write_text("{}")
            outs.commit()

    def single(i: int) -> None:
        with atomic_file(tmp_path / f"a{i}.bin") as fh:
            fh.write(b"y" * 4096)

    rounds = 1500
    hit = _under_random_sigint(lambda i: (staged if i % 2 else single)(i), rounds)
    assert 0 < hit < rounds  # both outcomes happened
    names = _names(tmp_path)
    strays = [n for n in names if n.startswith(".")]
    assert strays == []
    # a staged pair appears together or not at all
    for i in range(1, rounds, 2):
        assert ((tmp_path / f"s{i}.caffemodel").exists()) == ((tmp_path / f"s{i}.json").exists()), i
