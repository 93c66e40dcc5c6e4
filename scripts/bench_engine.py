#!/usr/bin/env python3
"""Benchmark: forward + backward of a net in the numpy engine and in pycaffe (CPU).

    python scripts/bench_engine.py [--net models/caffenet/deploy.prototxt] [--batch 16] [--repeat 3]

Each engine runs in its own process (so peak memory is its own); the script prints the best
time of ``--repeat`` runs (after one warm-up), the peak resident memory, and the ratio
pycaffe time / numpy time (> 1 means the numpy engine is faster). Random Gaussian weights.
Exits 1 when an engine fails (its last error line on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(engine: str, net_path: str, batch: int, repeat: int) -> dict:
    import numpy as np
    from caffe_utils import netio
    from caffe_utils.engine import open_net
    param = netio.read_net(net_path)
    inp = [lp for lp in param.layer if lp.type == "Input"][0]
    shape = (batch,) + tuple(inp.input_param.shape[0].dim[1:])
    net = open_net(param, engine=engine, input_shapes={inp.top[0]: shape})
    rng = np.random.RandomState(0)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = 0.01 * rng.standard_normal(b.data.shape)
    net.blobs[inp.top[0]].data[...] = rng.standard_normal(shape)
    outs = list(net.outputs)
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        net.forward()
        for o in outs:
            net.blobs[o].diff[...] = 1.0
        net.backward()
        times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"engine": engine, "best_s": min(times[1:]), "times_s": times, "peak_rss_mb": peak_kb / 1024.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default=str(ROOT / "models" / "caffenet" / "deploy.prototxt"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", choices=["numpy", "caffe"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.net, args.batch, args.repeat)))
        return 0
    results = {}
    failed = []
    sys.path.insert(0, str(ROOT))
    from caffe_utils.schema import pycaffe_importable
    for engine in ("numpy", "caffe"):
        if engine == "caffe" and not pycaffe_importable():
            print("caffe: skipped (pycaffe is not importable; scripts/install_caffe.sh builds it)")
            continue
        # the worker imports this checkout's caffe_utils, installed or not
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, GLOG_minloglevel="2", PYTHONPATH=path)
        res = subprocess.run([sys.executable, __file__, "--worker", engine, "--net", args.net,
                              "--batch", str(args.batch), "--repeat", str(args.repeat)],
                             capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(f"{engine}: failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}",
                  file=sys.stderr)
            failed.append(engine)
            continue
        results[engine] = json.loads(res.stdout.strip().splitlines()[-1])
        r = results[engine]
        print(f"{engine:6s} forward+backward, batch {args.batch}: best {r['best_s']:.3f} s "
              f"(runs: {', '.join(f'{t:.3f}' for t in r['times_s'][1:])}); peak RSS {r['peak_rss_mb']:.0f} MB")
    if len(results) == 2:
        ratio = results["caffe"]["best_s"] / results["numpy"]["best_s"]
        print(f"speed ratio pycaffe/numpy: {ratio:.2f} ({'numpy faster' if ratio >= 1 else 'pycaffe faster'})")
        print(f"memory ratio numpy/pycaffe: {results['numpy']['peak_rss_mb'] / results['caffe']['peak_rss_mb']:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
