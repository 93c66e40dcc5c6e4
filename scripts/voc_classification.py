#!/usr/bin/env python3
"""PASCAL VOC 2007 classification fine-tuning (the paper's §4, Tables 1-3), driven through real
Caffe's SGD solver from Python.

    python scripts/voc_classification.py VOCdevkit --net caffenet --init kmeans
                                         [--weights pretrained.caffemodel] [--no-between]
                                         [--iterations 80000] [--results results/voc2007.tsv]

Given a VOCdevkit folder (VOC2007/JPEGImages, Annotations, ImageSets/Main), it builds the
trainval and test lists and 20-class label vectors from the annotations; turns
models/<net>/deploy.prototxt into a training net whose last InnerProduct predicts the 20 classes
with a sigmoid cross-entropy loss; initializes it with magic-init (``--init``; or Caffe's fillers
from models/<net>/train_val.prototxt with ``--init caffe``; ``--weights`` starts from a
pretrained model, of which only the new classifier is initialized and then every layer is
rescaled); trains with SGD (lr 0.001 halved every 10,000 iterations, batch 10, momentum 0.9,
weight decay 5e-4, random 227/224 crops of 256x256 images with mirroring); evaluates with the
mean score of 10 random crops per test image and VOC 2007's 11-point interpolated AP per class
(difficult objects ignored, as VOCevalcls does); and appends a row to the results TSV.
``--reduced`` trains 2 iterations and tests with 2 crops (for CI's tiny dataset).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import caffe_utils  # noqa: E402,F401  (before numpy: it sets OpenBLAS's environment)
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from caffe_utils.images import Record, Transform

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
NETS = ("caffenet", "googlenet", "vgg16")


class VocError(Exception):
    """The VOCdevkit folder is missing something."""


def read_split(voc: Path, split: str) -> Tuple[List[Path], np.ndarray]:
    """Image paths and VOC classification ground truth (N, 20): 1 present, -1 absent, 0 only
    difficult (ignored in evaluation, as in VOC's own ground-truth files)."""
    ids_file = voc / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise VocError(f"{ids_file} is missing; point the script at a VOCdevkit folder (with VOC2007 inside)")
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise VocError(f"{ids_file} lists no images")
    gt = np.full((len(ids), len(CLASSES)), -1, np.int8)
    paths = []
    for i, image_id in enumerate(ids):
        ann = voc / "Annotations" / f"{image_id}.xml"
        try:
            root = ET.parse(ann).getroot()
        except (OSError, ET.ParseError) as exc:
            raise VocError(f"cannot read {ann}: {exc}") from exc
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in CLASSES:
                raise VocError(f"{ann}: unknown class '{name}'")
            c = CLASSES.index(name)
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            if not difficult:
                gt[i, c] = 1
            elif gt[i, c] != 1:
                gt[i, c] = 0
        paths.append(voc / "JPEGImages" / f"{image_id}.jpg")
    return paths, gt


def voc07_ap(scores: np.ndarray, gt: np.ndarray) -> float:
    """VOC 2007's 11-point interpolated average precision; ``gt`` 1/-1, 0 = ignored."""
    keep = gt != 0
    scores, gt = scores[keep], gt[keep]
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(gt[order] > 0)
    fp = np.cumsum(gt[order] < 0)
    npos = max(int((gt > 0).sum()), 1)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = prec[rec >= t]
        ap += (p.max() if p.size else 0.0) / 11.0
    return float(ap)


def _parser() -> argparse.ArgumentParser:
    """The command line: the VOCdevkit, the net and its initialization, the schedule, the results TSV."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("devkit", type=Path, help="VOCdevkit folder (or its VOC2007 subfolder)")
    ap.add_argument("--net", choices=NETS, default="caffenet")
    ap.add_argument("--init", default="kmeans",
                    help="caffe (train_val fillers), or a magic-init --init type (kmeans, gaussian, ...)")
    ap.add_argument("--no-between", action="store_true")
    ap.add_argument("--weights", type=Path, default=None, help="start from this pretrained caffemodel")
    ap.add_argument("--iterations", type=int, default=80000)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--crops", type=int, default=10, help="random crops per test image")
    ap.add_argument("--init-images", type=int, default=160)
    ap.add_argument("--gpu", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "voc2007.tsv")
    ap.add_argument("--reduced", action="store_true", help="2 iterations, 2 crops, 16 init images")
    return ap


def _train(solver: Any, recs: Sequence[Record], train_gt: np.ndarray, batch: int, iterations: int,
           transform: Transform, rng: np.random.RandomState) -> List[float]:
    """SGD on random crops of the trainval images in one random order, wrapping around; each iteration's loss."""
    from caffe_utils import images
    targets = (train_gt != -1).astype(np.float32)  # difficult-only objects count as present
    order = rng.permutation(len(recs))
    losses = []
    for it in range(iterations):
        idx = [order[(it * batch + k) % len(order)] for k in range(batch)]
        for k, i in enumerate(idx):
            img, pre = images.load_record(recs[i])
            solver.net.blobs["data"].data[k] = transform(img, pre, rng)
        solver.net.blobs["label"].data[...] = targets[idx]
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    return losses


def _test_scores(test_net: Any, classifier: str, test_paths: Sequence[Path], crops: int, batch: int,
                 chw: Tuple[int, int, int], transform: Transform, rng: np.random.RandomState) -> np.ndarray:
    """Each test image's 20 class scores: the classifier's sigmoid, averaged over ``crops`` random crops."""
    from caffe_utils import images
    scores = np.zeros((len(test_paths), len(CLASSES)), np.float64)
    data = np.zeros((batch,) + chw, np.float32)
    for i, path in enumerate(test_paths):
        img, pre = images.load_record(images.Record(path))
        total = np.zeros(len(CLASSES))
        for start in range(0, crops, batch):
            n = min(batch, crops - start)
            for k in range(n):
                data[k] = transform(img, pre, rng)
            test_net.blobs["data"].data[...] = data
            out = test_net.forward(end=classifier)[classifier]
            total += (0.5 * (1.0 + np.tanh(0.5 * out[:n].astype(np.float64)))).sum(axis=0)  # sigmoid
        scores[i] = total / crops
    return scores


def _fine_tune(args: argparse.Namespace, iterations: int, crops: int, n_init: int, train_paths: Sequence[Path],
               train_gt: np.ndarray, test_paths: Sequence[Path]) -> Tuple[np.ndarray, List[float], float, str]:
    """Initialize and fine-tune the net, then score the test images: (scores, losses, seconds, flatness)."""
    from caffe_utils import images
    from caffe_utils.engine.caffe_net import import_caffe
    from scripts.support import training
    caffe = import_caffe(args.gpu)
    caffe.set_random_seed(args.seed)
    text, classifier, (c, h, w) = training.training_net(args.net, args.batch, len(CLASSES), len(CLASSES),
                                                         "SigmoidCrossEntropyLoss")
    rng = np.random.RandomState(args.seed)
    transform = images.Transform(channels=c, crop_h=h, crop_w=w, resize=256, mirror=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_proto = tmp / "train.prototxt"
        train_proto.write_text(text)
        weights_file = tmp / "init.caffemodel"
        recs = [images.Record(p) for p in train_paths]
        flat = training.initial_caffemodel(train_proto, args.net, classifier, args.init, weights_file, recs,
                                           n_init, transform, rng, between=not args.no_between,
                                           weights=args.weights, seed=args.seed)
        solver_file = tmp / "solver.prototxt"
        solver_file.write_text(training.solver_text(train_proto, 0.001, 0.5, 10000, iterations, args.seed, args.gpu))
        solver = caffe.SGDSolver(str(solver_file))
        solver.net.copy_from(str(weights_file))
        losses = _train(solver, recs, train_gt, args.batch, iterations, transform, rng)
        train_s = time.perf_counter() - t0
        test_net = training.trained_test_net(caffe, train_proto, solver)
        scores = _test_scores(test_net, classifier, test_paths, crops, args.batch, (c, h, w), transform, rng)
    return scores, losses, train_s, flat


def _append_row(args: argparse.Namespace, iterations: int, mean_ap: float, aps: Sequence[float],
                losses: Sequence[float], train_s: float) -> None:
    """Append this run's row (settings, mAP, final loss, seconds, AP per class) to the results TSV."""
    from caffe_utils.pipeline import append_tsv_row
    row = [datetime.datetime.now().isoformat(timespec="seconds"), args.net, args.init,
           "no" if args.no_between else "yes", str(args.weights or "-"), str(iterations), f"{100 * mean_ap:.2f}",
           f"{losses[-1]:.4f}" if losses else "-", f"{train_s:.0f}"] + [f"{100 * a:.2f}" for a in aps]
    header = ["date", "net", "init", "between", "weights", "iterations", "mAP", "final loss", "seconds"] + list(CLASSES)
    append_tsv_row(args.results, header, row)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Fine-tune one net on VOC 2007, evaluate it and append its row; the exit status."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    from caffe_utils.errors import MagicInitError
    from caffe_utils.magic import INIT_TYPES

    iterations = 2 if args.reduced else args.iterations
    crops = 2 if args.reduced else args.crops
    n_init = 16 if args.reduced else args.init_images
    if args.init != "caffe" and args.init not in INIT_TYPES:
        print(f"voc_classification: unknown --init '{args.init}'; choose caffe or one of {', '.join(INIT_TYPES)}",
              file=sys.stderr)
        return 2
    voc = args.devkit / "VOC2007" if (args.devkit / "VOC2007").is_dir() else args.devkit
    try:
        train_paths, train_gt = read_split(voc, "trainval")
        test_paths, test_gt = read_split(voc, "test")
        scores, losses, train_s, flat = _fine_tune(args, iterations, crops, n_init, train_paths, train_gt,
                                                   test_paths)
        aps = [voc07_ap(scores[:, k], test_gt[:, k]) for k in range(len(CLASSES))]
        mean_ap = float(np.mean(aps))
    except (VocError, MagicInitError) as exc:
        print(f"voc_classification: {exc}", file=sys.stderr)
        return 1
    _append_row(args, iterations, mean_ap, aps, losses, train_s)
    print(f"{args.net} init {args.init}{' --no-between' if args.no_between else ''}: mAP {100 * mean_ap:.2f} % "
          f"after {iterations} iterations (change-rate flatness {flat}); "
          f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
