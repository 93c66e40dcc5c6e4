#!/usr/bin/env python3
"""ImageNet-style training from scratch (the paper's §4.5), driven through real Caffe's solver.

    python scripts/imagenet_train.py --net caffenet --train-lmdb train_lmdb --val-lmdb val_lmdb
                                     --init-list train.txt --root IMAGES [--init kmeans]
                                     [--iterations 320000] [--results results/imagenet.tsv]

Reads LMDBs of Caffe ``Datum`` records (raw or encoded, as convert_imageset writes them) in key
order, wrapping around, like Caffe's Data layer, and feeds models/<net>/deploy.prototxt plus a
softmax loss (random crops and mirroring, mean values 104,117,123); initializes the net with
magic-init from images of the Caffe image list ``--init-list`` (``path label`` lines relative to
``--root``) with the last layer set to zero (``--zero-classifier``, as the paper does for
from-scratch training), or uses Caffe's fillers of train_val.prototxt with ``--init caffe``;
trains with SGD (lr 0.01, x0.1 every 100,000 iterations, momentum 0.9, weight decay 5e-4,
batch 256); then measures top-1 and top-5 accuracy on the whole validation LMDB (centre crops)
and appends a row to the results TSV. ``--reduced`` trains 2 iterations with batch 4 (for CI).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import caffe_utils  # noqa: E402,F401  (before numpy: it sets OpenBLAS's environment)
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from caffe_utils.images import Transform
    from scripts.support.training import LmdbStream

NETS = ("caffenet", "googlenet", "vgg16")


def _parser() -> argparse.ArgumentParser:
    """The command line: the LMDBs, the initialization's image list, the net, the schedule, the results TSV."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", choices=NETS, default="caffenet")
    ap.add_argument("--train-lmdb", type=Path, required=True)
    ap.add_argument("--val-lmdb", type=Path, required=True)
    ap.add_argument("--init-list", type=Path, required=True, help="Caffe image list for the initialization")
    ap.add_argument("--root", type=Path, default=None, help="folder the image list's paths are relative to")
    ap.add_argument("--init", default="kmeans", help="caffe (train_val fillers) or a magic-init --init type")
    ap.add_argument("--no-between", action="store_true")
    ap.add_argument("--iterations", type=int, default=320000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--init-images", type=int, default=160)
    ap.add_argument("--gpu", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "imagenet.tsv")
    ap.add_argument("--reduced", action="store_true", help="2 iterations, batch 4, 8 init images")
    return ap


def _train(solver: Any, train_db: LmdbStream, batch: int, iterations: int, transform: Transform,
           rng: np.random.RandomState) -> List[float]:
    """SGD on random crops of the training LMDB's images, in key order; every iteration's loss."""
    losses = []
    for _ in range(iterations):
        for k in range(batch):
            img, label, pre = train_db.next()
            solver.net.blobs["data"].data[k] = transform(img, pre, rng)
            solver.net.blobs["label"].data[k] = label
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    return losses


def _validate(test: Any, classifier: str, val_db: LmdbStream, batch: int, centre: Transform,
              rng: np.random.RandomState) -> Tuple[int, int, int]:
    """(top-1 hits, top-5 hits, images) over one pass of the validation LMDB, on centre crops."""
    top1 = top5 = seen = 0
    while seen < val_db.size:
        n = min(batch, val_db.size - seen)
        labels = np.zeros(n, np.int64)
        for k in range(n):
            img, labels[k], pre = val_db.next()
            test.blobs["data"].data[k] = centre(img, pre, rng)
        out = test.forward(end=classifier)[classifier][:n]
        ranked = np.argsort(-out, axis=1)
        top1 += int((ranked[:, 0] == labels).sum())
        top5 += int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
        seen += n
    return top1, top5, seen


def _train_and_validate(args: argparse.Namespace, iterations: int, batch: int, n_init: int, train_db: LmdbStream,
                        val_db: LmdbStream) -> Tuple[Tuple[int, int, int], List[float], float, str]:
    """Initialize, train and validate the net: ((top-1, top-5, images), losses, seconds, change-rate flatness)."""
    from caffe_utils import images
    from caffe_utils.engine.caffe_net import import_caffe
    from scripts.support import training
    caffe = import_caffe(args.gpu)
    caffe.set_random_seed(args.seed)
    text, classifier, (c, h, w) = training.training_net(args.net, batch, None, None, "SoftmaxWithLoss")
    rng = np.random.RandomState(args.seed)
    train_tf = images.Transform(c, h, w, resize=256, mirror=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proto = tmp / "train.prototxt"
        proto.write_text(text)
        weights = tmp / "init.caffemodel"
        recs = images.list_source(args.init_list, args.root) if args.init != "caffe" else []
        flat = training.initial_caffemodel(proto, args.net, classifier, args.init, weights, recs, n_init,
                                           images.Transform(c, h, w), rng, between=not args.no_between,
                                           zero_classifier=True, seed=args.seed)
        solver_file = tmp / "solver.prototxt"
        solver_file.write_text(training.solver_text(proto, 0.01, 0.1, 100000, iterations, args.seed, args.gpu))
        solver = caffe.SGDSolver(str(solver_file))
        solver.net.copy_from(str(weights))
        losses = _train(solver, train_db, batch, iterations, train_tf, rng)
        train_s = time.perf_counter() - t0
        test = training.trained_test_net(caffe, proto, solver)
        centre = images.Transform(c, h, w, resize=256, centre=True)
        hits = _validate(test, classifier, val_db, batch, centre, rng)
    return hits, losses, train_s, flat


def _append_row(args: argparse.Namespace, iterations: int, top1: int, top5: int, seen: int, losses: Sequence[float],
                train_s: float) -> None:
    """Append this run's row (settings, top-1 and top-5 accuracy, final loss, seconds) to the results TSV."""
    from caffe_utils.pipeline import append_tsv_row
    header = ["date", "net", "init", "between", "iterations", "top-1", "top-5", "final loss", "seconds"]
    row = [datetime.datetime.now().isoformat(timespec="seconds"), args.net, args.init,
           "no" if args.no_between else "yes", str(iterations), f"{100 * top1 / seen:.2f}", f"{100 * top5 / seen:.2f}",
           f"{losses[-1]:.4f}" if losses else "-", f"{train_s:.0f}"]
    append_tsv_row(args.results, header, row)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train one net from scratch, validate it and append its row; the exit status."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    from caffe_utils.errors import MagicInitError
    from caffe_utils.magic import INIT_TYPES
    from scripts.support import training

    iterations, batch = (2, 4) if args.reduced else (args.iterations, args.batch)
    n_init = 8 if args.reduced else args.init_images
    if args.init != "caffe" and args.init not in INIT_TYPES:
        print(f"imagenet_train: unknown --init '{args.init}'; choose caffe or one of {', '.join(INIT_TYPES)}",
              file=sys.stderr)
        return 2
    try:
        train_db, val_db = training.LmdbStream(args.train_lmdb), training.LmdbStream(args.val_lmdb)
        (top1, top5, seen), losses, train_s, flat = _train_and_validate(args, iterations, batch, n_init, train_db,
                                                                        val_db)
        train_db.close()
        val_db.close()
    except MagicInitError as exc:
        print(f"imagenet_train: {exc}", file=sys.stderr)
        return 1
    _append_row(args, iterations, top1, top5, seen, losses, train_s)
    print(f"{args.net} init {args.init}: top-1 {100 * top1 / seen:.2f} %, top-5 {100 * top5 / seen:.2f} % on {seen} "
          f"validation images after {iterations} iterations (change-rate flatness {flat}); appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
