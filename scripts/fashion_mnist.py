#!/usr/bin/env python3
"""From-scratch training on Fashion-MNIST with real Caffe, from seven initializations.

    python scripts/fashion_mnist.py [--iterations 250] [--seeds 3] [--out docs/fashion_mnist]
                                    [--reduced]

Trains models/fashion (two conv-ReLU-pool-LRN blocks, FC with dropout) with Caffe's SGD
(models/fashion/solver.prototxt: lr 0.01, momentum 0.9, weight decay 5e-4, batch 64, driven
from Python through ``caffe.SGDSolver``) for a fixed number of iterations, on Debian's
``dataset-fashion-mnist`` (pixels scaled by 1/255), from:

* ``caffe-gaussian``: the hand-tuned Gaussian fillers of models/fashion/train_val.prototxt;
* ``xavier``, ``msra``: Caffe's fillers;
* ``ours-gaussian``, ``ours-kmeans``: magic-init (within- and between-layer) on 160 training
  images, and their ``--no-between`` ablations.

Every run of one seed sees the same mini-batches (same order) and the same dropout seed. Per
run it records the training loss (mean of the last 20 iterations at each checkpoint) and the
test accuracy on the 10,000 test images at the end. Writes ``<out>.md`` (table: mean ± std over
seeds), ``<out>.json`` (every run, every loss) and ``<out>.png`` (mean loss curves). ``--reduced``
(for CI): 2 initializations, 1 seed, 30 iterations, 1,000 test images.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import caffe_utils  # noqa: E402,F401  (before numpy: it sets OpenBLAS's environment)
import numpy as np  # noqa: E402

INITS = {
    "caffe-gaussian": None,
    "xavier": dict(init="xavier", within=False, between=False),
    "msra": dict(init="msra", within=False, between=False),
    "ours-gaussian": dict(init="gaussian"),
    "ours-kmeans": dict(init="kmeans"),
    "ours-gaussian --no-between": dict(init="gaussian", between=False),
    "ours-kmeans --no-between": dict(init="kmeans", between=False),
}
BATCH = 64
SMOOTH = 20


def _initial_weights(name, seed, train_x, tmp):
    """{layer: [arrays]} for initialization ``name`` (None: keep the solver's fillers)."""
    from caffe_utils import magic, netio
    from caffe_utils.engine import open_net
    kw = INITS[name]
    if kw is None:
        return None
    prepared = magic.prepare_net(netio.read_net(str(ROOT / "models" / "fashion" / "deploy.prototxt"), netio.TEST))
    net = open_net(prepared.net_param, None, netio.TEST, "caffe", None,
                   input_shapes={prepared.input_name: (16, 1, 28, 28)}, seed=seed)
    rng = np.random.RandomState(seed)
    sample = train_x[rng.choice(train_x.shape[0], 160, replace=False)]
    magic.initialize(net, prepared, sample, magic.InitOptions(batch_size=16, seed=seed, **kw))
    return {k: [np.array(b.data) for b in v] for k, v in net.params.items()}


def train_one(caffe, name, seed, data, iterations, checkpoints, n_test, tmp):
    train_x, train_y, test_x, test_y = data
    weights = _initial_weights(name, seed, train_x, tmp)
    solver_file = Path(tmp) / "solver.prototxt"
    text = (ROOT / "models" / "fashion" / "solver.prototxt").read_text()
    text = text.replace('net: "models/fashion/train_val.prototxt"',
                        f'net: "{ROOT / "models" / "fashion" / "train_val.prototxt"}"')
    solver_file.write_text(text + f"random_seed: {seed}\n")
    caffe.set_random_seed(seed)
    solver = caffe.SGDSolver(str(solver_file))
    if weights is not None:
        for layer, arrays in weights.items():
            for blob, arr in zip(solver.net.params[layer], arrays):
                blob.data[...] = arr
    order = np.random.RandomState(1000 + seed).permutation(train_x.shape[0])
    losses = []
    t0 = time.perf_counter()
    for it in range(iterations):
        idx = order[(it * BATCH) % len(order):(it * BATCH) % len(order) + BATCH]
        if len(idx) < BATCH:
            idx = np.concatenate([idx, order[:BATCH - len(idx)]])
        solver.net.blobs["data"].data[...] = train_x[idx]
        solver.net.blobs["label"].data[...] = train_y[idx]
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    train_s = time.perf_counter() - t0
    net = caffe.Net(str(ROOT / "models" / "fashion" / "train_val.prototxt"), caffe.TEST)  # no dropout
    for layer, blobs in solver.net.params.items():
        for dst, src in zip(net.params[layer], blobs):
            dst.data[...] = src.data
    correct = 0
    for start in range(0, n_test, BATCH):
        xb = test_x[start:start + BATCH]
        n = len(xb)
        if n < BATCH:
            xb = np.concatenate([xb, test_x[:BATCH - n]])
        net.blobs["data"].data[...] = xb
        net.blobs["label"].data[...] = 0
        out = net.forward(end="fc4")["fc4"]
        correct += int((out[:n].argmax(axis=1) == test_y[start:start + n]).sum())
    smoothed = {c: float(np.mean(losses[max(0, c - SMOOTH):c])) for c in checkpoints}
    return {"init": name, "seed": seed, "loss": losses, "loss_at": smoothed, "test_accuracy": correct / n_test,
            "train_seconds": train_s, "finite": bool(np.all(np.isfinite(losses)))}


def _parser() -> argparse.ArgumentParser:
    """The command line: the training length, the number of seeds and where the results go."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=250)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "fashion_mnist"))
    ap.add_argument("--reduced", action="store_true")
    return ap


def _scaled(raw: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) as the blobs take them: pixels scaled by 1/255."""
    scale = np.float32(1.0 / 255)
    return (raw["train_images"][:, None].astype(np.float32) * scale, raw["train_labels"].astype(np.float32),
            raw["test_images"][:, None].astype(np.float32) * scale, raw["test_labels"].astype(np.int64))


def _train_all(caffe: Any, inits: Sequence[str], seeds: int, data: Tuple[np.ndarray, ...], iterations: int,
               checkpoints: Sequence[int], n_test: int) -> Tuple[List[dict], float]:
    """Every initialization on every seed (same mini-batches per seed), progress on stderr; (runs, seconds)."""
    runs = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for name in inits:
                r = train_one(caffe, name, seed, data, iterations, checkpoints, n_test, tmp)
                runs.append(r)
                print(f"{name:28s} seed {seed}: loss {r['loss_at'][iterations]:.4f}, test accuracy "
                      f"{r['test_accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return runs, time.perf_counter() - t0


def _table(runs: Sequence[dict], inits: Sequence[str], iterations: int, seeds: int, n_test: int,
           checkpoints: Sequence[int], command: str, total: float) -> str:
    """The Markdown table: per initialization, the checkpoints' losses and test accuracy, mean ± std over seeds."""
    lines = [f"Fashion-MNIST, models/fashion, {iterations} SGD iterations of batch {BATCH} (lr 0.01, momentum 0.9), "
             f"{seeds} seed(s); training loss = mean of the {SMOOTH} iterations before; test accuracy on "
             f"{n_test} test images. Command: `{command}` ({total / 60:.1f} min on this machine).", "",
             "| initialization | " + " | ".join(f"loss @{c}" for c in checkpoints) + " | test accuracy |",
             "|---" * (len(checkpoints) + 2) + "|"]
    for name in inits:
        rs = [r for r in runs if r["init"] == name]
        cells = []
        for c in checkpoints:
            v = np.array([r["loss_at"][c] for r in rs])
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
        acc = np.array([r["test_accuracy"] for r in rs])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * acc.mean():.2f} ± {100 * acc.std():.2f} % |")
    return "\n".join(lines) + "\n"


def _plot(runs: Sequence[dict], inits: Sequence[str], iterations: int, out: Path) -> None:
    """Draw every initialization's mean loss curve to ``<out>.png`` (without matplotlib, only say so)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.2))
        k = max(1, min(SMOOTH, iterations // 10))
        for name in inits:
            curves = np.array([r["loss"] for r in runs if r["init"] == name])
            mean = curves.mean(axis=0)
            smooth = np.convolve(mean, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(k, iterations + 1), smooth, label=name)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"training loss (mean over seeds, moving average of {k})")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Fashion-MNIST from scratch, real Caffe SGD")
        fig.tight_layout()
        png_tmp = str(out.with_suffix(".part.png"))
        fig.savefig(png_tmp, dpi=110)
        os.replace(png_tmp, out.with_suffix(".png"))
        plt.close(fig)
    except ImportError:
        print("fashion_mnist: matplotlib is not installed; no loss-curve PNG (pip install matplotlib)",
              file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train every initialization on every seed and write the table, the JSON and the curves; the exit status."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    from scripts.support.datasets import fashion_mnist
    from caffe_utils.engine.caffe_net import import_caffe
    from caffe_utils.errors import MagicInitError
    from caffe_utils.pipeline import write_json_atomic
    try:
        caffe = import_caffe()
        raw = fashion_mnist()
    except MagicInitError as exc:
        print(f"fashion_mnist: {exc}", file=sys.stderr)
        return 1
    data = _scaled(raw)
    inits = ["caffe-gaussian", "ours-kmeans"] if args.reduced else list(INITS)
    iterations = 30 if args.reduced else args.iterations
    seeds = 1 if args.reduced else args.seeds
    n_test = 1000 if args.reduced else data[2].shape[0]
    checkpoints = sorted({c for c in (iterations // 10, iterations // 4, iterations // 2, iterations) if c > 0})
    runs, total = _train_all(caffe, inits, seeds, data, iterations, checkpoints, n_test)
    command = "python scripts/fashion_mnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    write_json_atomic(str(out.with_suffix(".json")), {"command": command, "iterations": iterations, "batch": BATCH,
                                                      "seeds": seeds, "test_images": n_test, "seconds": total,
                                                      "runs": runs})
    table = _table(runs, inits, iterations, seeds, n_test, checkpoints, command, total)
    tmp_md = out.with_suffix(".md.part")
    tmp_md.write_text(table)
    os.replace(tmp_md, out.with_suffix(".md"))
    print(table)
    _plot(runs, inits, iterations, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
