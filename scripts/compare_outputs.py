#!/usr/bin/env python3
"""Outputs unchanged: a given commit and the working tree write byte-identical caffemodels.

    python scripts/compare_outputs.py REV [--images 32] [--seed 0] [--jobs caffenet-kmeans ...]
                                          [--photos all|skimage] [--keep DIR]

Checks out REV into a temporary detached ``git worktree`` (removed afterwards, also on an error
or Ctrl-C) and, for each job, runs ``magic_init.py`` of that tree and of the working tree (the
checkout this script lives in) one after the other on this machine, with identical arguments:
the numpy engine, a fixed ``--seed``, the same list of photos and ``-n``. Each run imports the
``caffe_utils`` of its own tree (checked before the jobs start). The two caffemodels are
compared byte for byte; on a mismatch the layers and blobs that differ are listed with their
largest absolute difference.

Both sides run here because stored hashes are not portable: BLAS kernels differ between CPUs,
so only a back-to-back run on one machine shows that a change left the outputs alone.

Prints one line per job (sha256 prefixes, identical or DIFFERENT, the two run times) and a
summary. Exit status: 0 when every pair is identical, 1 when one differs, 2 when a run or git
fails (with the tail of its stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import filecmp
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_IMAGES = 32
DEFAULT_SEED = 0
STDERR_TAIL = 2000


@dataclass(frozen=True)
class Job:
    """One initialization to run in both trees: a net and the options beyond the common ones."""
    name: str
    prototxt: Path
    options: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Inputs:
    """What every run gets alike: the image list, how many crops and the seed."""
    data: Path
    images: int
    seed: int


@dataclass
class Outcome:
    """The two outputs of one job and whether they are the same bytes."""
    job: Job
    digests: Tuple[str, str]
    seconds: Tuple[float, float]
    identical: bool
    differences: List[str] = field(default_factory=list)


class CompareError(Exception):
    """A run or a git command failed: the comparison cannot be made."""


def default_jobs(root: Path = ROOT) -> Dict[str, Job]:
    """The acceptance's five jobs: CaffeNet gaussian and kmeans, each with and without the
    between-layer stage, and GoogLeNet kmeans with both stages."""
    caffenet = root / "models" / "caffenet" / "deploy.prototxt"
    googlenet = root / "models" / "googlenet" / "deploy.prototxt"
    jobs = [Job(f"caffenet-{init}{suffix}", caffenet, ("-t", init) + extra)
            for init in ("gaussian", "kmeans")
            for suffix, extra in (("", ()), ("-nobetween", ("--no-between",)))]
    jobs.append(Job("googlenet-kmeans", googlenet, ("-t", "kmeans")))
    return {job.name: job for job in jobs}


def _datasets():
    """The project's dataset helpers (scripts/support, not installed with the tool)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from scripts.support import datasets
    return datasets


def photo_files(which: str) -> List[Path]:
    """The photos both trees read, as a fixed sorted list: those that scikit-image installs,
    plus (``all``) Debian's opencv-doc ones, fetched into the cache on first use."""
    ds = _datasets()
    try:
        photos = list(ds.skimage_photos())
        if which == "all":
            photos += ds.opencv_doc_photos()
    except (OSError, getattr(ds, "DataError", OSError)) as exc:
        raise CompareError(f"cannot list the photos ({which}): {exc}") from exc
    if not photos:
        raise CompareError("no photos found (is scikit-image installed?)")
    return sorted(Path(p).resolve() for p in photos)


def write_image_list(photos: Sequence[Path], path: Path) -> Path:
    """A Caffe image list (``path label`` lines) of ``photos``, so that both trees get the same
    files in the same order whatever their default data handling."""
    path.write_text("".join(f"{p} 0\n" for p in photos))
    return path


def tree_env(tree: Path) -> Dict[str, str]:
    """The environment for a run of ``tree``: its root first on PYTHONPATH, ahead of anything
    else, including an editable install of another checkout. Without the
    ``OPENBLAS_THREAD_TIMEOUT`` that this process's ``caffe_utils`` may have set (a user's
    stays), so that each tree's run has what its own package sets."""
    env = dict(os.environ)
    rest = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(tree) + (os.pathsep + rest if rest else "")
    env.setdefault("GLOG_minloglevel", "2")
    own = sys.modules.get("caffe_utils")  # not imported: it set nothing here
    return own.untouched_environ(env) if own is not None else env


def _tail(text: str) -> str:
    return text[-STDERR_TAIL:].rstrip()


def check_imports(tree: Path) -> Path:
    """Where a run in ``tree`` imports ``caffe_utils`` from; an error unless it is that tree,
    since otherwise both sides could silently run the same code."""
    res = subprocess.run([sys.executable, "-c", "import caffe_utils; print(caffe_utils.__file__)"],
                         cwd=tree, env=tree_env(tree), capture_output=True, text=True)
    if res.returncode != 0:
        raise CompareError(f"{tree}: cannot import caffe_utils:\n{_tail(res.stderr)}")
    found = Path(res.stdout.strip()).resolve()
    if tree.resolve() not in found.parents:
        raise CompareError(f"{tree}: caffe_utils is imported from {found}, not from this tree")
    return found


def magic_init_command(tree: Path, job: Job, inputs: Inputs, output: Path) -> List[str]:
    """The command line of ``tree``'s magic_init.py for ``job``; the same for both trees but for
    the script's path and the output file."""
    return [sys.executable, str(tree / "magic_init.py"), str(job.prototxt), "-o", str(output),
            "-d", str(inputs.data), "-n", str(inputs.images), "--engine", "numpy",
            "--seed", str(inputs.seed), "-q", *job.options]


def run_job(tree: Path, job: Job, inputs: Inputs, output: Path) -> float:
    """Run ``job`` with ``tree``'s code (cwd and PYTHONPATH in that tree) and return its time;
    a failure, or a run that writes nothing, raises with the tail of its stderr."""
    cmd = magic_init_command(tree, job, inputs, output)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=tree, env=tree_env(tree), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0 or not output.is_file():
        raise CompareError(f"{job.name} failed in {tree} (exit {res.returncode}):\n"
                           f"  {' '.join(cmd)}\n{_tail(res.stderr)}")
    return seconds


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _blob_difference(where: str, a, b) -> Optional[str]:
    """How two blobs differ (shape, or the largest absolute difference), or None if equal."""
    import numpy as np
    if a.shape != b.shape:
        return f"{where}: shape {a.shape} vs {b.shape}"
    if np.array_equal(a, b, equal_nan=True):
        return None
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return f"{where}: max abs difference {np.nanmax(diff):.3g} ({np.count_nonzero(diff)} of {diff.size} values)"


def describe_differences(a: Path, b: Path) -> List[str]:
    """Which layers and blobs of two caffemodels differ (read with the working tree's netio): a
    diagnostic for a byte mismatch, not the verdict itself."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from caffe_utils.netio import read_caffemodel
        left, right = read_caffemodel(a), read_caffemodel(b)
    except Exception as exc:  # a diagnostic only: say why it is missing
        return [f"cannot parse the caffemodels: {exc}"]
    out = [f"layer {n}: only in the {side} output"
           for side, names in (("first", left.keys() - right.keys()), ("second", right.keys() - left.keys()))
           for n in sorted(names)]
    for name in (n for n in left if n in right):
        la, lb = left[name].blobs, right[name].blobs
        if len(la) != len(lb):
            out.append(f"layer {name}: {len(la)} vs {len(lb)} blobs")
            continue
        out += [d for i, (x, y) in enumerate(zip(la, lb)) if (d := _blob_difference(f"{name}[{i}]", x, y))]
    return out or ["every blob is equal; the bytes differ elsewhere (layer order or other fields)"]


def compare_files(a: Path, b: Path) -> Tuple[Tuple[str, str], bool, List[str]]:
    """The sha256 of both files, whether they are byte-identical, and (if not) what differs."""
    same = filecmp.cmp(a, b, shallow=False)  # chunk by chunk: CaffeNet's are 233 MB
    return (sha256(a), sha256(b)), same, [] if same else describe_differences(a, b)


def compare_job(job: Job, trees: Tuple[Path, Path], inputs: Inputs, outdir: Path) -> Outcome:
    """Run ``job`` in both trees, one after the other, and compare the two caffemodels."""
    outdir = outdir.resolve()  # the runs' cwd is their tree
    outputs = (outdir / f"{job.name}.ref.caffemodel", outdir / f"{job.name}.work.caffemodel")
    for out in outputs:
        if out.exists():
            out.unlink()
    seconds = tuple(run_job(tree, job, inputs, out) for tree, out in zip(trees, outputs))
    digests, same, differences = compare_files(*outputs)
    return Outcome(job, digests, seconds, same, differences)


def format_outcome(o: Outcome) -> str:
    """One line per job: name, both sha256 prefixes, the verdict and both run times."""
    verdict = "identical" if o.identical else "DIFFERENT"
    line = (f"{o.job.name:<28s} ref {o.digests[0][:12]}  work {o.digests[1][:12]}  {verdict:<9s}  "
            f"ref {o.seconds[0]:6.1f} s  work {o.seconds[1]:6.1f} s")
    return "\n".join([line] + [f"    {d}" for d in o.differences])


def compare_all(jobs: Sequence[Job], trees: Tuple[Path, Path], inputs: Inputs, outdir: Path) -> int:
    """Compare every job, printing a line each and a summary; 0 when all pairs are identical,
    1 otherwise. A failing run raises :class:`CompareError`."""
    for tree in trees:
        check_imports(tree)
    t0 = time.perf_counter()
    outcomes = []
    for job in jobs:
        outcomes.append(compare_job(job, trees, inputs, outdir))
        print(format_outcome(outcomes[-1]), flush=True)
    same = sum(o.identical for o in outcomes)
    changed = f", {len(outcomes) - same} DIFFERENT" if same < len(outcomes) else ""
    print(f"summary: {same}/{len(outcomes)} pairs identical{changed}; {time.perf_counter() - t0:.0f} s", flush=True)
    return 0 if same == len(outcomes) else 1


def _git(*args: str, cwd: Path = ROOT) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CompareError(f"git {' '.join(args)} failed:\n{_tail(res.stderr)}")
    return res.stdout.strip()


@contextlib.contextmanager
def worktree(rev: str, parent: Path) -> Iterator[Path]:
    """A detached ``git worktree`` of ``rev`` under ``parent``, removed (``remove --force`` and
    ``prune``) however the block ends, so that no stale worktree is left registered."""
    path = parent / "rev"
    try:
        _git("worktree", "add", "--detach", "--quiet", str(path), rev)
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)


def describe_working_tree() -> str:
    """The working tree's HEAD, with ``+changes`` when it has uncommitted ones."""
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("+changes" if dirty else "")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    jobs = default_jobs()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the commit to compare the working tree with")
    ap.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="-n of every run")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="--seed of every run")
    ap.add_argument("--jobs", nargs="+", choices=list(jobs), default=list(jobs), metavar="JOB",
                    help=f"a subset of: {', '.join(jobs)}")
    ap.add_argument("--photos", choices=["all", "skimage"], default="all",
                    help="all: scikit-image's and Debian opencv-doc's photos; skimage: only the former")
    ap.add_argument("--keep", type=Path, default=None, help="keep the caffemodels in this folder")
    args = ap.parse_args(argv)
    if args.images < 16:
        # below the default --batch-size (16) newer commits shrink the batch, older ones do not
        ap.error("--images must be at least 16, the runs' --batch-size")
    return args


def run_comparison(args: argparse.Namespace, tmp: Path) -> int:
    """Set up the inputs and the worktree of ``args.rev`` under ``tmp`` and compare the jobs."""
    try:
        rev = _git("rev-parse", "--verify", "--quiet", f"{args.rev}^{{commit}}")
    except CompareError:
        raise CompareError(f"{args.rev!r} is not a commit of {ROOT}") from None
    photos = photo_files(args.photos)
    inputs = Inputs(write_image_list(photos, tmp / "images.txt"), args.images, args.seed)
    outdir = args.keep or tmp / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"ref: {args.rev} ({rev[:12]}); work: {ROOT} ({describe_working_tree()})")
    print(f"numpy engine, seed {args.seed}, -n {args.images} from {len(photos)} photos ({args.photos})")
    with worktree(rev, tmp) as ref_tree:
        return compare_all([default_jobs()[name] for name in args.jobs], (ref_tree, ROOT), inputs, outdir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="compare_outputs-"))
    try:
        return run_comparison(args, tmp)
    except CompareError as exc:
        print(f"compare_outputs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compare_outputs: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
