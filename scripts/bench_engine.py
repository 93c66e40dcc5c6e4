#!/usr/bin/env python3
"""Benchmark: forward + backward of a net in the numpy engine and in pycaffe (CPU).

    python scripts/bench_engine.py [--net caffenet|googlenet|vgg16|resnet50|resnet101|mobilenet_v1|FILE]
                                   [--batch 16] [--repeat 3] [--engine both|numpy|caffe]
                                   [--compare REV] [--layers]

``--net`` takes a prototxt or a name: the repository's CaffeNet, GoogLeNet and VGG16 deploy nets,
or ResNet-50 / MobileNet v1 at their published sizes (emitted by tests/corpus.py's generators).
Each engine runs in its own process (so peak memory is its own); the script prints the best
time of ``--repeat`` runs (after one warm-up), the peak resident memory, the ratio pycaffe time /
numpy time (> 1 means the numpy engine is faster), and each time as a multiple of the job's GEMM
floor: its GEMM FLOPs (see scripts/support/floor.py) at the sgemm rate measured in the same run.
Random Gaussian weights; BatchNorm layers get mean 0, variance 1.

``--compare REV`` runs the same job on a temporary ``git worktree`` of commit REV and then on this
tree, back to back, and prints the ratio new/old of each engine's best time. ``--layers`` also
prints the numpy engine's seconds per layer type and pass, forward and backward, timed around
each layer's call inside ``net.forward()`` and ``net.backward()`` (as ``caffe time`` does; a
profiler that samples only the main thread misses the layers' work in the thread pool).
Exits 1 when an engine fails (its last error line on stderr); skips pycaffe, saying so, when it
is not importable.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


def _fill(net, rng) -> None:
    """Gaussian weights, and BatchNorm statistics of a unit normal (so the job computes numbers)."""
    kinds = dict(zip(net.layer_names, net.layer_types))
    for name, blobs in net.params.items():
        if kinds.get(name) == "BatchNorm" and len(blobs) == 3:
            for b, value in zip(blobs, (0.0, 1.0, 1.0)):
                b.data[...] = value
            continue
        for b in blobs:
            b.data[...] = 0.01 * rng.standard_normal(b.data.shape)


def worker(engine: str, net_path: str, batch: int, repeat: int, layers: bool = False) -> dict:
    """Time ``repeat`` forward + backward passes (after one warm-up) of ``engine``, in this process.

    Imports only ``caffe_utils`` (found through PYTHONPATH), so that ``--compare`` can run it
    against another commit's tree."""
    import caffe_utils  # before numpy: it sets OpenBLAS's environment (see its docstring)
    import numpy as np
    from caffe_utils import netio
    from caffe_utils.engine import open_net
    param = netio.read_net(net_path)
    inp = [lp for lp in param.layer if lp.type == "Input"][0]
    shape = (batch,) + tuple(inp.input_param.shape[0].dim[1:])
    net = open_net(param, engine=engine, input_shapes={inp.top[0]: shape})
    rng = np.random.RandomState(0)
    _fill(net, rng)
    net.blobs[inp.top[0]].data[...] = rng.standard_normal(shape)
    outs = list(net.outputs)
    times = []
    for i in range(repeat + 1):
        if layers and i == 1 and hasattr(net, "layer_times"):  # the numpy engine of this tree or later
            net.layer_times = {}
        t0 = time.perf_counter()
        net.forward()
        for o in outs:
            net.blobs[o].diff[...] = 1.0
        net.backward()
        times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"engine": engine, "best_s": min(times[1:]), "times_s": times, "peak_rss_mb": peak_kb / 1024.0,
            "caffe_utils": str(Path(caffe_utils.__file__).resolve()),
            "layer_s": _per_type(net, getattr(net, "layer_times", None) or {}, repeat)}


def _per_type(net, layer_times: Dict, passes: int) -> Dict[str, List[float]]:
    """Seconds per pass of each layer type's forward and backward calls (``Net.layer_times``)."""
    kinds = dict(zip(net.layer_names, net.layer_types))
    out: Dict[str, List[float]] = {}
    for (name, kind), seconds in layer_times.items():
        out.setdefault(kinds[name], [0.0, 0.0])[kind == "backward"] += seconds / max(passes, 1)
    return out


def _layer_lines(r: dict, total: float) -> List[str]:
    """The ``--layers`` table of a job: per layer type its seconds per pass, largest first."""
    rows = sorted(r.get("layer_s", {}).items(), key=lambda kv: -sum(kv[1]))
    return [f"    {kind:20s} forward {f:.3f} s  backward {b:.3f} s  ({(f + b) / total:.0%} of the pass)"
            for kind, (f, b) in rows]


def _parser() -> argparse.ArgumentParser:
    """The command line (``--worker`` is the parent's call of a job's process)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="caffenet", help="a prototxt, or caffenet, googlenet, vgg16, resnet50, resnet101, "
                                                      "mobilenet_v1")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--engine", default="both", choices=["both", "numpy", "caffe"])
    ap.add_argument("--compare", metavar="REV", help="also run commit REV (a temporary git worktree), back to back")
    ap.add_argument("--layers", action="store_true",
                    help="also print the numpy engine's seconds per layer type (like caffe time)")
    ap.add_argument("--worker", choices=["numpy", "caffe"], help=argparse.SUPPRESS)
    return ap


def _floor(path: str, batch: int) -> Optional[float]:
    """Print the job's GEMM FLOPs and the sgemm rate; the floor in seconds (None: not counted)."""
    from scripts.support import floor
    return floor.report_floor(path, batch, f"job: one forward + one backward of {batch} image(s)")


def _job(engine: str, tree: Path, args: argparse.Namespace, path: str) -> dict:
    """The worker's result for ``engine`` on ``tree``'s caffe_utils (raises WorkerFailed)."""
    from scripts.support import benchrun
    extra = ["--layers"] if args.layers else []
    return benchrun.run_worker(__file__, tree, ["--worker", engine, "--net", path, "--batch", str(args.batch),
                                                "--repeat", str(args.repeat)] + extra)


def _times(r: dict, floor_s: Optional[float]) -> str:
    """One job's best time, its runs, peak RSS and floor multiple, as one line's text."""
    runs = ", ".join(f"{t:.3f}" for t in r["times_s"][1:])
    mult = f"; {r['best_s'] / floor_s:.2f}x the GEMM floor" if floor_s else ""
    return f"best {r['best_s']:.3f} s (runs: {runs}); peak RSS {r['peak_rss_mb']:.0f} MB{mult}"


def _run_engines(args: argparse.Namespace, engines: Sequence[str], path: str,
                 floor_s: Optional[float]) -> int:
    """Each engine on this tree, then the pycaffe/numpy ratio; exit 1 when any engine fails."""
    from scripts.support.benchrun import WorkerFailed
    results: Dict[str, dict] = {}
    failed = []
    for engine in engines:
        try:
            results[engine] = r = _job(engine, ROOT, args, path)
        except WorkerFailed as exc:
            print(f"{engine}: failed: {exc}", file=sys.stderr)
            failed.append(engine)
            continue
        print(f"{engine:6s} forward+backward, batch {args.batch}: {_times(r, floor_s)}")
        if args.layers:
            mean_s = sum(r["times_s"][1:]) / len(r["times_s"][1:])
            lines = _layer_lines(r, mean_s) or [f"    ({engine}: no per-layer times; only the numpy engine keeps them)"]
            print("\n".join(lines))
    if len(results) == 2:
        ratio = results["caffe"]["best_s"] / results["numpy"]["best_s"]
        print(f"speed ratio pycaffe/numpy: {ratio:.2f} ({'numpy faster' if ratio >= 1 else 'pycaffe faster'})")
        print(f"memory ratio numpy/pycaffe: {results['numpy']['peak_rss_mb'] / results['caffe']['peak_rss_mb']:.2f}")
    return 1 if failed else 0


def _compare(args: argparse.Namespace, engines: Sequence[str], path: str,
             floor_s: Optional[float]) -> int:
    """Each engine on commit ``args.compare`` and then on this tree; exit 1 when any run fails."""
    from scripts.support import benchrun
    rev = benchrun.short_rev(args.compare)
    failed = 0
    with benchrun.worktree_at(args.compare) as old_tree:
        for engine in engines:
            try:
                where = f"at {rev}"
                old = _job(engine, old_tree, args, path)
                where = "on this tree"
                new = _job(engine, ROOT, args, path)
            except benchrun.WorkerFailed as exc:
                print(f"{engine} {where}: failed: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"{engine:6s} at {rev}: {_times(old, floor_s)}")
            print(f"{engine:6s} on this tree: {_times(new, floor_s)}")
            print(f"{engine:6s} ratio new/old: {new['best_s'] / old['best_s']:.2f}")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark (or, with ``--worker``, one job); the exit status."""
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.net, args.batch, args.repeat, args.layers)))
        return 0
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from scripts.support import benchrun, floor
    with tempfile.TemporaryDirectory() as tmp:
        label, path = benchrun.resolve_net(args.net, Path(tmp))
        print(f"net: {label}; batch {args.batch}; repeat {args.repeat}")
        floor_s = _floor(path, args.batch)
        engines = benchrun.available_engines(args.engine)
        status = benchrun.run_or_compare(bool(args.compare), lambda: _run_engines(args, engines, path, floor_s),
                                         lambda: _compare(args, engines, path, floor_s))
    if floor_s is not None:
        floor.report_rate_again()
    return status


if __name__ == "__main__":
    sys.exit(main())
