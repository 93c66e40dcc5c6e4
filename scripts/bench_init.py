#!/usr/bin/env python3
"""Benchmark: the whole CaffeNet k-means initialization, with the time of each stage.

    python scripts/bench_init.py [--net models/caffenet/deploy.prototxt] [--images 160]
                                 [--engine numpy] [--init kmeans] [--data FOLDER]
                                 [--iterations 10] [--damping 0.5]

Photos default to the ones scikit-image installs (reused with different crops when there are
fewer than --images). Prints the end-to-end time, each stage's time, the peak resident memory
and the ratio to the 15 s target for this 2-core kind of machine.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_S = 15.0


def main() -> int:
    from scripts.support.datasets import skimage_photos
    from caffe_utils.magic import InitOptions
    from caffe_utils.pipeline import RunConfig, SampleSpec, run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default=str(ROOT / "models" / "caffenet" / "deploy.prototxt"))
    ap.add_argument("--images", type=int, default=SampleSpec.images)
    ap.add_argument("--batch-size", type=int, default=InitOptions.batch_size)
    ap.add_argument("--engine", default="numpy", choices=["numpy", "caffe", "auto"])
    ap.add_argument("--init", default=InitOptions.init)
    ap.add_argument("--data", default=None)
    ap.add_argument("--iterations", type=int, default=InitOptions.iterations, help="between-layer rounds")
    ap.add_argument("--damping", type=float, default=InitOptions.damping, help="between-layer damping alpha")
    args = ap.parse_args()
    data = args.data or str(skimage_photos()[0].parent)
    stages = {}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        first, _ = stages.get(stage, (now, now))
        stages[stage] = (first, now)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        options = InitOptions(init=args.init, iterations=args.iterations, damping=args.damping,
                              batch_size=args.batch_size)
        res = run(RunConfig(prototxt=args.net, output=str(Path(tmp) / "out.caffemodel"),
                            sample=SampleSpec(data=data, images=args.images), options=options, engine=args.engine),
                  progress=progress)
        total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"net: {args.net}; engine: {res.engine}; init: {args.init}; images: {args.images} "
          f"({res.images_used} distinct photos)")
    order = sorted(stages.items(), key=lambda kv: kv[1][0])
    prev = t0
    for stage, (first, last) in order:
        print(f"  {stage:<16s} {last - prev:7.2f} s")
        prev = last
    print(f"  {'(the rest)':<16s} {t0 + total - prev:7.2f} s")
    print(f"end to end: {total:.2f} s; peak RSS {peak:.0f} MB; flatness {res.report.flatness_before:.3g} -> "
          f"{res.report.flatness_after:.3g} in {res.report.iterations} round(s) of damping {args.damping:g}")
    print(f"ratio to the {TARGET_S:.0f} s target: {total / TARGET_S:.2f} ({'met' if total <= TARGET_S else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
