#!/usr/bin/env python3
"""The paper's Figure 1 on CaffeNet: change rates per layer for five initializations.

    python scripts/figure1.py [--out docs/figure1_caffenet.png] [--images 160] [--engine auto]
                              [--reduced]

Initializes models/caffenet with (1) the hand-tuned Gaussian fillers of its train_val.prototxt,
(2) plain Gaussian sigma = 0.01, (3) k-means with within-layer normalization but no
between-layer stage, (4) ours with Gaussian weights and (5) ours with k-means, from random crops
of every other photo of Debian's opencv-doc and scikit-image; then measures every model's change
rates and their within-layer variation on crops of the other photos (same images and top
gradients for all) and draws Figure 1 (a) and (b). Prints the table and writes the PNG and a
JSON next to it. ``--reduced`` (for CI) uses 16 images and 2 between-layer rounds.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from caffe_utils.pipeline import ModelStats

DEPLOY = ROOT / "models" / "caffenet" / "deploy.prototxt"
TRAIN_VAL = ROOT / "models" / "caffenet" / "train_val.prototxt"


def _parser() -> argparse.ArgumentParser:
    """The command line: the PNG, how many images, the engine and the seed."""
    from caffe_utils import magic
    from caffe_utils.pipeline import SampleSpec
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "figure1_caffenet.png"))
    ap.add_argument("--images", type=int, default=SampleSpec.images)
    ap.add_argument("--engine", default="auto", choices=["auto", "numpy", "caffe"])
    ap.add_argument("--seed", type=int, default=magic.InitOptions.seed)
    ap.add_argument("--reduced", action="store_true", help="16 images, 2 rounds: a quick end-to-end check")
    return ap


def _caffe_fillers(out: Path, seed: int) -> None:
    """Write CaffeNet with Caffe's hand-tuned fillers, drawn by the numpy engine from train_val's filler specs."""
    from caffe_utils import magic, netio
    from caffe_utils.engine.numpy_net import Net
    filled = Net(magic.prepare_net(netio.read_net(str(TRAIN_VAL), netio.TEST)).net_param, seed=seed)
    netio.write_caffemodel(out, netio.read_net(str(DEPLOY), netio.TEST),
                           {k: [b.data for b in v] for k, v in filled.params.items()})


def _initialize(tmp: Path, init_list: Path, n: int, rounds: int, args: argparse.Namespace,
                t0: float) -> Dict[str, Path]:
    """The five initializations' caffemodels in ``tmp``, by label, in the figure's order."""
    from caffe_utils import magic
    from caffe_utils.pipeline import RunConfig, SampleSpec, run
    models = {"Caffe fillers": tmp / "caffe_fillers.caffemodel"}
    _caffe_fillers(models["Caffe fillers"], args.seed)
    runs = {"Gaussian 0.01": dict(init="gaussian", within=False, between=False),
            "k-means, no between": dict(init="kmeans", between=False),
            "ours (Gaussian)": dict(init="gaussian"),
            "ours (k-means)": dict(init="kmeans")}
    for label, kw in runs.items():
        out = tmp / (label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + ".caffemodel")
        run(RunConfig(prototxt=str(DEPLOY), output=str(out),
                      sample=SampleSpec(data=str(init_list), images=n),
                      options=magic.InitOptions(seed=args.seed, iterations=rounds, **kw), engine=args.engine))
        models[label] = out
        print(f"initialized: {label} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return models


def _report(stats: Sequence[ModelStats], n: int, used: int, engine: str, t0: float, args: argparse.Namespace,
            command: str) -> None:
    """Print the table, then draw Figure 1 (a) and (b) to ``args.out`` and write the JSON next to it."""
    from caffe_utils.pipeline import format_measurement, write_json_atomic
    from caffe_utils.plots import plot_rates
    print(format_measurement(stats))
    print(f"\nengine: {engine}; {n} held-out crops of {used} photos; {time.perf_counter() - t0:.0f} s")
    out = Path(args.out)
    plot_rates([(m.weights, {k: s.rate for k, s in m.layers.items()},
                 {k: s.column_cv for k, s in m.layers.items()}) for m in stats], str(out),
               title=f"CaffeNet, {n} held-out photos ({engine})")
    write_json_atomic(str(out.with_suffix(".json")), {
        "command": command, "engine": engine, "images": n, "models": [m.to_dict() for m in stats]})
    print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Initialize CaffeNet five ways, measure them on held-out photos and draw Figure 1; the exit status."""
    from scripts.support.datasets import held_out_split
    from caffe_utils.errors import MagicInitError
    from caffe_utils.pipeline import MeasureConfig, SampleSpec, measure_models

    args = _parser().parse_args(argv)
    n = 16 if args.reduced else args.images
    rounds = 2 if args.reduced else 10
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            lists = held_out_split(tmp)
            t0 = time.perf_counter()
            models = _initialize(tmp, lists["init"], n, rounds, args, t0)
            stats, used, engine = measure_models(MeasureConfig(
                prototxt=str(DEPLOY), weights=[str(p) for p in models.values()],
                sample=SampleSpec(data=str(lists["held_out"]), images=n), engine=args.engine, seed=args.seed + 1))
        for m, label in zip(stats, models):
            m.weights = label
        _report(stats, n, used, engine, t0, args,
                "python scripts/figure1.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    except MagicInitError as exc:
        print(f"figure1: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
