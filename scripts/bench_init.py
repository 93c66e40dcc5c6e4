#!/usr/bin/env python3
"""Benchmark: a whole initialization (default CaffeNet k-means from 160 images), with each stage's time.

    python scripts/bench_init.py [--net caffenet|googlenet|vgg16|resnet50|resnet101|mobilenet_v1|FILE]
                                 [--images 160] [--engine numpy|caffe|both] [--init kmeans]
                                 [--data FOLDER] [--iterations 10] [--damping 0.5]
                                 [--compare REV [--repeat 1] [--target RATIO]]

Photos default to the ones scikit-image installs (reused with different crops when there are
fewer than --images). Each engine's job runs in its own process; for each the script prints the
end-to-end time, each stage's time, the peak resident memory, the flatness of the
initialization batch before and after, and the time as a multiple of a GEMM floor: the GEMM
FLOPs of one forward and one backward of every image (see scripts/support/floor.py; the
initialization runs more passes than that one) at the sgemm rate measured in the same run; and as a
multiple of the initialization floor, the GEMM FLOPs no initialization of the job avoids: one forward
of every image (stage 2), stage 1's numerics for --init (k-means: covariance, whitening, the rounds'
dots) and the forward and backward of stage 3's calibration images. Where the run's tree
reports its measured passes, also as a multiple of the work floor: the initialization floor
plus the forward and backward of the images those passes ran again (this tree's and newer).
``--engine both`` adds the ratio pycaffe time / numpy time.

``--compare REV`` runs the same job on a temporary ``git worktree`` of commit REV and then on this
tree, back to back, and prints both times and the ratio new/old (``--target`` says whether the
ratio is at most RATIO, and what multiple of this tree's work floor that time would be);
``--repeat N`` runs the two trees N times in turns and compares each one's fastest run. Exits 1 when an engine fails; skips pycaffe, saying so, when it is not
importable.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


def _run_config(pipeline, args: argparse.Namespace, output: str) -> object:
    """The pipeline's RunConfig for this job, in the API of the tree the worker imported: since
    commit 284119e the sample and the options are sub-records, before that the fields were flat."""
    names = {f.name for f in fields(pipeline.RunConfig)}
    if "options" in names:
        from caffe_utils.magic import InitOptions
        options = InitOptions(init=args.init, iterations=args.iterations, damping=args.damping,
                              batch_size=args.batch_size)
        extra = {"output_prototxt": output + ".prototxt"} if args.lrn_alpha and "output_prototxt" in names else {}
        return pipeline.RunConfig(prototxt=args.net, output=output, engine=args.worker, options=options,
                                  sample=pipeline.SampleSpec(data=args.data, images=args.images), **extra)
    return pipeline.RunConfig(prototxt=args.net, output=output, data=args.data, images=args.images,
                              batch_size=args.batch_size, engine=args.worker, init=args.init,
                              iterations=args.iterations, damping=args.damping)


def worker(args: argparse.Namespace) -> dict:
    """Run the initialization of ``args`` on engine ``args.worker`` in this process.

    Imports only ``caffe_utils`` (found through PYTHONPATH), so that ``--compare`` can run it
    against another commit's tree."""
    import caffe_utils
    from caffe_utils import pipeline
    stages: Dict[str, List[float]] = {}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        stages.setdefault(stage, [now, now])[1] = now

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = pipeline.run(_run_config(pipeline, args, str(Path(tmp) / "out.caffemodel")), progress=progress)
        total = time.perf_counter() - t0
    order = sorted(stages.items(), key=lambda kv: kv[1][0])
    prev, split = t0, []
    for stage, (_, last) in order:
        split.append((stage, last - prev))
        prev = last
    split.append(("(the rest)", t0 + total - prev))
    return {"engine": res.engine, "total_s": total, "stages": split, "images_used": res.images_used,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "flatness": [res.report.flatness_before, res.report.flatness_after],
            "rounds": res.report.iterations, "passes": getattr(res.report, "passes", None),
            "pass_images": getattr(res.report, "pass_images", None),
            "caffe_utils": str(Path(caffe_utils.__file__).resolve())}


def _option_defaults() -> type:
    """The tool's defaults (the worker is always given every value, so another tree's defaults
    never change the job)."""
    from caffe_utils.magic import InitOptions
    return InitOptions


def _parser() -> argparse.ArgumentParser:
    """The command line (``--worker`` is the parent's call of a job's process)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="caffenet", help="a prototxt, or caffenet, googlenet, vgg16, resnet50, resnet101, "
                                                      "mobilenet_v1")
    defaults = _option_defaults()
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--engine", default="numpy", choices=["numpy", "caffe", "both"])
    ap.add_argument("--init", default=defaults.init)
    ap.add_argument("--data", default=None, help="a folder of photos (default: scikit-image's)")
    ap.add_argument("--iterations", type=int, default=defaults.iterations, help="between-layer rounds")
    ap.add_argument("--damping", type=float, default=defaults.damping, help="between-layer damping alpha")
    ap.add_argument("--lrn-alpha", action="store_true", help="rescale the LRN layers' alpha along "
                    "(magic_init.py --output-prototxt); a --compare tree without it runs without")
    ap.add_argument("--compare", metavar="REV", help="also run commit REV (a temporary git worktree), back to back")
    ap.add_argument("--repeat", type=int, default=1, help="with --compare: runs of each tree, in turns; the "
                                                            "fastest of each counts")
    ap.add_argument("--target", type=float, help="with --compare: the largest ratio new/old that meets the target")
    ap.add_argument("--worker", choices=["numpy", "caffe"], help=argparse.SUPPRESS)
    return ap


@dataclass
class Floors:
    """The job's GEMM floors in seconds by name (none when the net could not be counted), and
    the GEMM floor of one image's forward and backward at the same rate."""
    named: Dict[str, float] = field(default_factory=dict)
    image_pass: float = 0.0

    def work(self, r: dict) -> Optional[float]:
        """The GEMM floor of the work run ``r`` did: the initialization floor and the forward and
        backward of the images stage 3's measured passes ran again; None where the run's tree
        does not report its passes."""
        init = self.named.get("initialization floor")
        if not init or r.get("pass_images") is None:
            return None
        return init + r["passes"] * r["pass_images"] * self.image_pass


def _floor(path: str, args: argparse.Namespace) -> Floors:
    """Print the job's GEMM FLOPs and the sgemm rate, and the initialization's own floor."""
    from scripts.support import floor
    images = args.images
    floor_s = floor.report_floor(path, images, f"floor: one forward + one backward of the {images} images")
    if floor_s is None:
        return Floors()
    from caffe_utils.magic import InitOptions
    within, numerics, calibration = floor.init_flops(path, images, args.init, InitOptions(batch_size=args.batch_size))
    total = within + numerics + calibration
    # the GEMM floor is (1 + BACKWARD_FACTOR) * within FLOPs at the measured rate
    init_s = floor_s * total / ((1 + floor.BACKWARD_FACTOR) * within) if within else 0.0
    print(f"initialization floor: {total / 1e9:.4g} GFLOP: the forward of the {images} images (stage 2) "
          f"{within / 1e9:.4g}, stage 1's {args.init} numerics {numerics / 1e9:.4g}, stage 3's calibration "
          f"(forward + backward) {calibration / 1e9:.4g}; {init_s:.4g} s at that rate")
    return Floors({"GEMM floor": floor_s, "initialization floor": init_s}, floor_s / images)


def _job(engine: str, tree: Path, args: argparse.Namespace, path: str) -> dict:
    """The worker's result for ``engine`` on ``tree``'s caffe_utils (raises WorkerFailed)."""
    from scripts.support import benchrun
    argv = ["--worker", engine, "--net", path, "--images", str(args.images), "--batch-size", str(args.batch_size),
            "--init", args.init, "--data", args.data, "--iterations", str(args.iterations),
            "--damping", str(args.damping)] + (["--lrn-alpha"] if args.lrn_alpha else [])
    return benchrun.run_worker(__file__, tree, argv)


def _report(label: str, r: dict, floors: Floors) -> None:
    """Print one job's time, memory, floor multiples, flatness and stage times."""
    mult = "".join(f"; {r['total_s'] / s:.1f}x the {name}" for name, s in floors.named.items() if s)
    before, after = r["flatness"]
    print(f"{label}: end to end {r['total_s']:.2f} s; peak RSS {r['peak_rss_mb']:.0f} MB{mult}; flatness "
          f"{before:.3g} -> {after:.3g} in {r['rounds']} round(s); {r['images_used']} distinct photos")
    for stage, seconds in r["stages"]:
        print(f"    {stage:<16s} {seconds:7.2f} s")
    work = floors.work(r)
    if work:
        print(f"    work floor: {work:.3g} s, the initialization floor and {r['passes']} measured pass(es) of "
              f"{r['pass_images']} images; {r['total_s'] / work:.1f}x it")


def _run_engines(args: argparse.Namespace, engines: Sequence[str], path: str,
                 floors: Floors) -> int:
    """Each engine on this tree, then the pycaffe/numpy ratio; exit 1 when any engine fails."""
    from scripts.support.benchrun import WorkerFailed
    results: Dict[str, dict] = {}
    failed = 0
    for engine in engines:
        try:
            results[engine] = _job(engine, ROOT, args, path)
        except WorkerFailed as exc:
            print(f"{engine}: failed: {exc}", file=sys.stderr)
            failed += 1
            continue
        _report(engine, results[engine], floors)
    if len(results) == 2:
        ratio = results["caffe"]["total_s"] / results["numpy"]["total_s"]
        print(f"speed ratio pycaffe/numpy: {ratio:.2f} ({'numpy faster' if ratio >= 1 else 'pycaffe faster'})")
    return 1 if failed else 0


def _alternate(engine: str, trees: Dict[str, Path], args: argparse.Namespace, path: str) -> Dict[str, dict]:
    """Each tree's fastest of ``args.repeat`` runs of the job, the trees taking turns (so load that
    comes and goes on a shared machine falls on both alike); raises WorkerFailed naming the tree."""
    from scripts.support.benchrun import WorkerFailed
    best: Dict[str, dict] = {}
    runs: Dict[str, List[float]] = {where: [] for where in trees}
    for _ in range(args.repeat):
        for where, tree in trees.items():
            try:
                r = _job(engine, tree, args, path)
            except WorkerFailed as exc:
                raise WorkerFailed(f"{where}: failed: {exc}") from exc
            runs[where].append(r["total_s"])
            if args.repeat > 1:
                print(f"{engine} {where}, run {len(runs[where])} of {args.repeat}: {r['total_s']:.2f} s", flush=True)
            if where not in best or r["total_s"] < best[where]["total_s"]:
                best[where] = r
    for where, r in best.items():
        r["runs_s"] = runs[where]
    return best


def _compare(args: argparse.Namespace, engines: Sequence[str], path: str,
             floors: Floors) -> int:
    """Each engine on commit ``args.compare`` and on this tree, in turns; exit 1 when any run fails."""
    from scripts.support import benchrun
    rev = benchrun.short_rev(args.compare)
    failed = 0
    with benchrun.worktree_at(args.compare) as old_tree:
        for engine in engines:
            try:
                best = _alternate(engine, {f"at {rev}": old_tree, "on this tree": ROOT}, args, path)
            except benchrun.WorkerFailed as exc:
                print(f"{engine} {exc}", file=sys.stderr)
                failed += 1
                continue
            for where, r in best.items():
                _report(f"{engine} {where}", r, floors)
                if len(r["runs_s"]) > 1:
                    print(f"    (fastest of runs: {', '.join(f'{t:.2f}' for t in r['runs_s'])} s)")
            ratio = best["on this tree"]["total_s"] / best[f"at {rev}"]["total_s"]
            met = ""
            if args.target is not None:
                met = f" (target {args.target:g}: {'met' if ratio <= args.target else 'not met'})"
            print(f"{engine} ratio new/old: {ratio:.2f}{met}")
            _target_against_work(args.target, best[f"at {rev}"], best["on this tree"], floors)
    return 1 if failed else 0


def _target_against_work(target: Optional[float], old: dict, new: dict, floors: Floors) -> None:
    """Print the time ``target`` x ``old`` asks of this tree as a multiple of the GEMM floor of
    the work this tree's run did: below 1, no engine could reach it without doing less work."""
    work = floors.work(new)
    if target is None or not work:
        return
    asked = target * old["total_s"]
    print(f"target {target:g}: {asked:.2f} s, {asked / work:.2f}x the work floor of this tree's run ({work:.3g} s)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark (or, with ``--worker``, one job); the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--worker" not in argv and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the parent imports this checkout; a worker, PYTHONPATH's tree
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from scripts.support import benchrun, floor
    from scripts.support.datasets import skimage_photos
    args.data = args.data or str(skimage_photos()[0].parent)
    with tempfile.TemporaryDirectory() as tmp:
        label, path = benchrun.resolve_net(args.net, Path(tmp))
        print(f"net: {label}; init: {args.init}; images: {args.images}; batch size {args.batch_size}; "
              f"{args.iterations} between-layer round(s), damping {args.damping:g}")
        floors = _floor(path, args)
        engines = benchrun.available_engines(args.engine)
        status = benchrun.run_or_compare(bool(args.compare), lambda: _run_engines(args, engines, path, floors),
                                         lambda: _compare(args, engines, path, floors))
    if floors.named:
        floor.report_rate_again()
    return status


if __name__ == "__main__":
    sys.exit(main())
