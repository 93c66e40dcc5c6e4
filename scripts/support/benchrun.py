"""What ``scripts/bench_init.py`` and ``scripts/bench_engine.py`` share: the nets they know by
name, their worker processes, and ``--compare REV``'s temporary ``git worktree``.

Each job runs in a worker process (the benchmark script itself, with ``--worker``), so its peak
resident memory is its own and so the worker can import another tree's ``caffe_utils``: the
worker finds ``caffe_utils`` through ``PYTHONPATH``, with the tree under test first, and reports
the file it imported so a run that silently used the wrong tree is an error.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

ROOT = Path(__file__).resolve().parent.parent.parent

#: nets in the repository, by name
MODEL_NETS = {name: ROOT / "models" / name / "deploy.prototxt" for name in ("caffenet", "googlenet", "vgg16")}
#: the published sizes of the two corpus generators (tests/corpus.py) the benchmarks emit
GENERATED_NETS = {
    "resnet50": ("resnet50", dict(blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem=64, size=224,
                                  classes=1000)),
    "resnet101": ("resnet50", dict(blocks=(3, 4, 23, 3), widths=(64, 128, 256, 512), stem=64, size=224,
                                   classes=1000, name="ResNet-101")),
    "mobilenet_v1": ("mobilenet_v1", dict(width_div=1, pairs_512=5, size=224, classes=1000)),
}
NET_NAMES = tuple(MODEL_NETS) + tuple(GENERATED_NETS)


class WorkerFailed(RuntimeError):
    """A benchmark worker exited non-zero, printed no result, or imported the wrong tree."""


def _corpus():
    """tests/corpus.py as a module (it is not part of the installed package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("magic_init_bench_corpus", ROOT / "tests" / "corpus.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def resolve_net(net: str, folder: Path) -> Tuple[str, str]:
    """``(label, prototxt path)`` for a net name of :data:`NET_NAMES` or a prototxt path; the
    generated nets are written into ``folder``."""
    if net in MODEL_NETS:
        return net, str(MODEL_NETS[net])
    if net in GENERATED_NETS:
        func, sizes = GENERATED_NETS[net]
        path = Path(folder) / f"{net}.prototxt"
        path.write_text(getattr(_corpus(), func)(**sizes))
        return f"{net} (full size)", str(path)
    if not Path(net).is_file():
        raise SystemExit(f"--net {net}: neither a prototxt file nor one of {', '.join(NET_NAMES)}")
    return net, net


def worker_env(tree: Path) -> Dict[str, str]:
    """The environment of a worker that imports ``tree``'s ``caffe_utils``. It has no
    ``OPENBLAS_THREAD_TIMEOUT`` where this process's ``caffe_utils`` put one there (a user's
    stays): each tree's run then has what its own package sets, and an older tree runs as it
    ran before it set one."""
    import caffe_utils
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    return caffe_utils.untouched_environ(dict(os.environ, GLOG_minloglevel="2", PYTHONPATH=path))


def run_worker(script: str, tree: Path, args: List[str]) -> dict:
    """Run ``script --worker ...`` against ``tree``; its JSON result (the last line of its output).

    Raises :class:`WorkerFailed` with the worker's last error line when it fails, and when the
    ``caffe_utils`` it imported is not ``tree``'s."""
    res = subprocess.run([sys.executable, script] + args, capture_output=True, text=True, env=worker_env(tree))
    err = res.stderr.strip().splitlines()
    if res.returncode != 0:
        raise WorkerFailed(err[-1] if err else f"exit status {res.returncode}")
    lines = res.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise WorkerFailed(f"no result line in the worker's output ({exc})") from exc
    imported = Path(out.get("caffe_utils", "")).resolve()
    if Path(tree).resolve() not in imported.parents:
        raise WorkerFailed(f"the worker imported caffe_utils from {imported}, not from {tree}")
    return out


def run_or_compare(compare: bool, run: Callable[[], int], against: Callable[[], int]) -> int:
    """``run()``'s exit status, or with ``compare`` that of ``against()`` (the job on an older
    commit and then on this tree); a commit that has no worktree is one error line, status 1."""
    if not compare:
        return run()
    try:
        return against()
    except WorkerFailed as exc:  # no worktree at REV
        print(f"--compare: failed: {exc}", file=sys.stderr)
        return 1


def available_engines(choice: str) -> List[str]:
    """The engines ``choice`` (numpy, caffe or both) names, without pycaffe, with a printed line,
    when it is not importable."""
    from caffe_utils.schema import pycaffe_importable
    engines = ["numpy", "caffe"] if choice == "both" else [choice]
    if "caffe" in engines and not pycaffe_importable():
        print("caffe: skipped (pycaffe is not importable; scripts/install_caffe.sh builds it)")
        engines.remove("caffe")
    return engines


@contextmanager
def worktree_at(rev: str) -> Iterator[Path]:
    """A temporary detached ``git worktree`` of this repository at ``rev``, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="magic-init-compare-"))
    tree = folder / "tree"
    res = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
                         capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        msg = res.stderr.strip().splitlines()
        raise WorkerFailed(f"git worktree add {rev}: {msg[-1] if msg else res.returncode}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       capture_output=True, text=True)
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True, text=True)


def short_rev(rev: str) -> str:
    """``rev`` as a short commit id (``rev`` itself when git cannot resolve it)."""
    res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
    return res.stdout.strip() or rev
