"""Per-layer statistics of a net on images: change rates (paper §4.1) and activation statistics.

For every affine layer k (Convolution, InnerProduct, Deconvolution) this computes, over a set of
images passed through the net in batches, with a fresh random Gaussian gradient ``eta`` set on
every net output for each batch (the paper's random top gradient):

* the change rate ``C_k = sqrt(E_batch[|dW_k|^2] / |W_k|^2)``,
* the coefficient of variation of the change rate across W_k's input columns
  (``std_j / mean_j`` of ``E_batch[|dW_k[:, j]|^2] / |W_k|^2``, as the paper's per-column rate),
* the mean and std of the layer's output activations (before any in-place nonlinearity), and the
  coefficient of variation of the per-channel std.

Works on both engines (numpy and pycaffe): it only uses ``net.blobs``, ``net.params``,
``net.forward(start=, end=)``, ``net.backward()`` and ``net.clear_param_diffs()``. Rates are
relative: they depend on the batch size and the scale of ``eta`` in the same way for every layer,
so only their ratios (the flatness) carry meaning across layers.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from caffe_utils import layout
from caffe_utils.layout import AFFINE_TYPES


@dataclass
class LayerStats:
    """What :func:`measure` finds for one affine layer."""
    rate: float
    column_cv: float
    act_mean: float
    act_std: float
    channel_std_cv: float

    def to_dict(self) -> dict:
        return asdict(self)


_SQ_CHUNK = 1 << 14


def sq(a: np.ndarray) -> float:
    """Sum of squares without a float64 copy of ``a`` (a VGG16 fc6 would take 822 MB more):
    float32 sums of squares over rows of 16384 values, summed in float64. A float32 chunk sum is off
    by at most ~1e-7 * sqrt(16384) relative; the float64 sum of the chunks adds nothing to that."""
    flat = np.asarray(a).reshape(-1)
    if flat.dtype != np.float32:
        x = flat.astype(np.float64, copy=False)
        return float(np.dot(x, x))
    n = flat.shape[0]
    if n <= _SQ_CHUNK:
        return float(np.dot(flat, flat))
    whole = n - n % _SQ_CHUNK
    rows = flat[:whole].reshape(-1, _SQ_CHUNK)
    total = float(np.einsum("ij,ij->i", rows, rows).astype(np.float64).sum())
    if whole < n:
        tail = flat[whole:]
        total += float(np.dot(tail, tail))
    return total


def change_rate(grad_energy: float, weight_energy: float) -> float:
    """The paper's change rate ``sqrt(|dW|^2 / |W|^2)`` from the two sums of squares (nan for
    zero weights)."""
    return math.sqrt(grad_energy / weight_energy) if weight_energy > 0 else float("nan")


@contextmanager
def param_diffs_only(net) -> Iterator[None]:
    """Within the block, backward passes compute parameter diffs but skip the input blobs'
    diffs, which no change rate needs; the engine's setting is restored afterwards."""
    saved = net.input_diffs
    net.input_diffs = False
    try:
        yield
    finally:
        net.input_diffs = saved


def valid_rows(rows: int, valid: int, batch: int) -> int:
    """How many of a blob's ``rows`` (its first axis) belong to the first ``valid`` images of a
    ``batch``: a blob with k rows per image (Faster R-CNN's R = k x N rois and what follows
    them) has ``k * valid``; a blob whose first axis is not the batch (PriorBox's 1) has all."""
    return valid * (rows // batch) if rows % batch == 0 else rows


def channel_stats(top: np.ndarray, valid: Optional[int]):
    """Per-channel sum, sum of squares and count over the first ``valid`` items of ``top`` (all
    for None), accumulated in float64 one item at a time (no float64 copy of the whole blob)."""
    x = top[:valid]
    if x.ndim == 2:
        x = np.asarray(x, np.float64)
        return x.sum(0), np.einsum("ij,ij->j", x, x), x.shape[0]
    x = x.reshape(x.shape[0], x.shape[1], -1)
    s, q = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for item in x:
        a = np.asarray(item, np.float64)
        s += a.sum(1)
        q += np.einsum("ij,ij->i", a, a)
    return s, q, x.shape[0] * x.shape[2]


#: fewer batches than this give no usable spread: :func:`log_rate_errors` calls the error unknown
MIN_ERROR_BATCHES = 4


def log_rate_errors(per_batch: Mapping[str, Sequence[float]],
                    min_batches: int = MIN_ERROR_BATCHES) -> Dict[str, float]:
    """Per layer, the standard error of the log of its change rate over several batches, each
    under its own top gradient: how far the sample's rate may lie from the rate on other images
    of its kind. ``per_batch`` holds each batch's gradient energy per image; the rate is the
    square root of their mean over the weights' energy, which the batches share, so its log
    has the standard error ``std(g) / (2 mean(g) sqrt(B))`` (the delta method); nan where fewer
    than ``min_batches`` batches, or no energy, tell."""
    out = {}
    for name, values in per_batch.items():
        g = np.asarray(values, np.float64)
        mean = float(g.mean()) if g.size else 0.0
        ok = g.size >= max(min_batches, 2) and mean > 0 and math.isfinite(mean)
        out[name] = float(g.std(ddof=1) / (2 * mean * math.sqrt(g.size))) if ok else float("nan")
    return out


def flatness(rates: Dict[str, float]) -> float:
    """``max_k C_k / min_k C_k`` over the finite positive rates (nan when there are none)."""
    v = [x for x in rates.values() if x > 0 and math.isfinite(x)]
    return max(v) / min(v) if v else float("nan")


def affine_layers(net) -> List:
    """The affine layers' LayerParameters, in net order."""
    return [lp for lp in net.net_param.layer if lp.type in AFFINE_TYPES]


class _Sums:
    """Running sums over the measured images: per layer, the gradient energy of every input
    column and the output's per-channel moments."""

    def __init__(self, lps) -> None:
        self.lps = lps
        self.grad2 = {lp.name: 0.0 for lp in lps}
        self.col2: Dict[str, Optional[np.ndarray]] = {lp.name: None for lp in lps}
        self.acts = {lp.name: [None, None, 0] for lp in lps}
        self.counted = 0

    def add_activations(self, lp, top: np.ndarray, valid: Optional[int]) -> None:
        s, q, c = channel_stats(top, valid)
        a = self.acts[lp.name]
        a[0] = s if a[0] is None else a[0] + s
        a[1] = q if a[1] is None else a[1] + q
        a[2] += c

    def add_gradients(self, net, valid: int) -> None:
        self.counted += valid
        for lp in self.lps:
            cols = layout.column_energies(layout.input_columns(lp, net.params[lp.name][0].diff))
            self.grad2[lp.name] += float(cols.sum())
            prev = self.col2[lp.name]
            self.col2[lp.name] = cols if prev is None else prev + cols

    def stats(self, net, lp, bs: int) -> LayerStats:
        w2 = sq(net.params[lp.name][0].data)
        rate = change_rate(self.grad2[lp.name] * bs / self.counted, w2)
        cols = self.col2[lp.name]
        cv = float(cols.std() / cols.mean()) if cols is not None and cols.mean() > 0 else float("nan")
        act_mean, act_std, channel_std_cv = self.activations(lp)
        return LayerStats(rate=rate, column_cv=cv, act_mean=act_mean, act_std=act_std, channel_std_cv=channel_std_cv)

    def activations(self, lp) -> Tuple[float, float, float]:
        """The output's mean, mean channel std and the channels' std CV."""
        s, q, c = self.acts[lp.name]
        mean = s / c
        std = np.sqrt(np.maximum(q / c - mean * mean, 0))
        return (float(mean.mean()), float(std.mean()),
                float(std.std() / std.mean()) if std.mean() > 0 else float("nan"))


def activation_stats(net, lps) -> Dict[str, Tuple[float, float, float]]:
    """Per layer of ``lps``: its output's mean, mean channel std and the channels' std CV on the
    net's current input batch, read right after the layer runs (before an in-place
    nonlinearity overwrites it); one forward pass in all."""
    sums = _Sums(lps)
    _forward_reading(net, lps, sums, None)
    return {lp.name: sums.activations(lp) for lp in lps}


def padded_batch(images: np.ndarray, start: int, bs: int) -> np.ndarray:
    """Images ``start..start+bs``; a short last batch is filled up by repeating images."""
    batch = images[start:start + bs]
    valid, n = batch.shape[0], int(images.shape[0])
    if valid < bs:
        batch = np.concatenate([batch] + [images[:bs]] * int(math.ceil((bs - valid) / min(n, bs))))[:bs]
    return batch


def _forward_reading(net, lps, sums: _Sums, valid: Optional[int], batch: int = 0) -> None:
    """A forward pass that reads every layer of ``lps``'s output right after the layer runs
    (over the rows of the first ``valid`` images of the ``batch``; all for None)."""
    names = list(net.layer_names)
    index = {n: i for i, n in enumerate(names)}
    pos = 1 if net.net_param.layer[0].type == "Input" else 0
    for lp in lps:
        idx = index[lp.name]
        if idx >= pos:
            net.forward(start=names[pos], end=names[idx])
            pos = idx + 1
        top = net.blobs[lp.top[0]].data
        sums.add_activations(lp, top, None if valid is None else valid_rows(top.shape[0], valid, batch))
    if pos < len(names):
        net.forward(start=names[pos])


def measure(net, input_name: str, images: np.ndarray, seed: int = 0,
            layers: Optional[Sequence[str]] = None) -> "OrderedDict[str, LayerStats]":
    """Statistics of every affine layer (or of ``layers``) of ``net`` on ``images``.

    ``images`` (N, C, H, W) are fed in batches of the net's input batch size B. The last batch
    is filled up by repeating images that get a zero top gradient and stay out of the activation
    statistics, so every image counts once; ``E_batch`` is the mean over images times B.
    ``seed`` draws the top gradients.
    """
    lps = [lp for lp in affine_layers(net) if layers is None or lp.name in layers]
    bs = int(net.blobs[input_name].data.shape[0])
    sums = _Sums(lps)
    for valid in gradient_batches(net, input_name, images, seed,
                                  forward=lambda valid: _forward_reading(net, lps, sums, valid, bs)):
        sums.add_gradients(net, valid)
    return OrderedDict((lp.name, sums.stats(net, lp, bs)) for lp in lps)


def gradient_batches(net, input_name: str, images: np.ndarray, seed: int,
                     forward: Optional[Callable[[int], None]] = None) -> Iterator[int]:
    """Run ``images`` through ``net`` in batches of its input batch size, each forward (by
    ``forward(valid)`` when given) and backward under a fresh random Gaussian top gradient drawn
    from ``seed``; yields after each backward the number of real images in the batch (a short
    last batch is filled up with repeated images whose top gradient is zero). Parameter diffs
    only; the same ``seed`` and images give the same gradients."""
    bs = int(net.blobs[input_name].data.shape[0])
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("measuring change rates needs at least one image")
    rng = np.random.RandomState(seed)
    with param_diffs_only(net):
        for start in range(0, n, bs):
            valid = min(bs, n - start)
            net.set_data(input_name, padded_batch(images, start, bs))
            if forward is None:
                net.forward()
            else:
                forward(valid)
            for o in net.outputs:
                eta = rng.standard_normal(net.blobs[o].diff.shape).astype(np.float32)
                eta[valid_rows(eta.shape[0], valid, bs):] = 0
                net.blobs[o].diff[...] = eta
            net.clear_param_diffs()
            net.backward()
            yield valid


def rates_of(stats: "OrderedDict[str, LayerStats]") -> Dict[str, float]:
    """Just the change rates of :func:`measure`'s result."""
    return {k: v.rate for k, v in stats.items()}

