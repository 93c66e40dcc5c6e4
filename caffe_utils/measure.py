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
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from caffe_utils.engine import set_data
from caffe_utils.scaling import AFFINE_TYPES


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


def weight_columns(lp, w: np.ndarray) -> np.ndarray:
    """The weight matrix of affine layer ``lp`` with its input columns on axis 1."""
    if lp.type == "InnerProduct" and lp.inner_product_param.transpose:
        return w.T
    if lp.type == "Deconvolution":
        return w.reshape(w.shape[0], -1).T
    return w.reshape(w.shape[0], -1)


_SQ_CHUNK = 1 << 14


def sq(a: np.ndarray) -> float:
    """Sum of squares without a float64 copy of ``a`` (a VGG16 fc6 would take 822 MB more):
    float32 sums of squares over rows of 16384 values, summed in float64. A float32 chunk sum is off
    by at most ~1e-7 * sqrt(16384) relative; the float64 sum of the chunks adds nothing to that.
    2.6 times faster here than einsum's float64 casting loop (CaffeNet fc6: 16 ms against 43 ms)."""
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


def column_energies(w: np.ndarray) -> np.ndarray:
    """Sum of squares of each column of the 2-D ``w``, in float64 (summed in float32 by einsum's
    vector loop: 2.5 times faster than summing in float64, off by ~1e-7 relative)."""
    return np.einsum("ij,ij->j", w, w).astype(np.float64)


def channel_stats(top: np.ndarray, valid: int):
    """Per-channel sum, sum of squares and count over the first ``valid`` items of ``top``."""
    x = np.asarray(top[:valid], np.float64)
    if x.ndim == 2:
        return x.sum(0), (x * x).sum(0), x.shape[0]
    x = x.reshape(x.shape[0], x.shape[1], -1)
    return x.sum((0, 2)), (x * x).sum((0, 2)), x.shape[0] * x.shape[2]


def flatness(rates: Dict[str, float]) -> float:
    """``max_k C_k / min_k C_k`` over the finite positive rates (nan when there are none)."""
    v = [x for x in rates.values() if x > 0 and math.isfinite(x)]
    return max(v) / min(v) if v else float("nan")


def affine_layers(net) -> List:
    """The affine layers' LayerParameters, in net order."""
    return [lp for lp in net.net_param.layer if lp.type in AFFINE_TYPES]


def measure(net, input_name: str, images: np.ndarray, seed: int = 0,
            layers: Optional[Sequence[str]] = None) -> "OrderedDict[str, LayerStats]":
    """Statistics of every affine layer (or of ``layers``) of ``net`` on ``images``.

    ``images`` (N, C, H, W) are fed in batches of the net's input batch size B. The last batch
    is filled up by repeating images that get a zero top gradient and stay out of the activation
    statistics, so every image counts once; ``E_batch`` is the mean over images times B.
    ``seed`` draws the top gradients.
    """
    lps = [lp for lp in affine_layers(net) if layers is None or lp.name in layers]
    names = list(net.layer_names)
    index = {n: i for i, n in enumerate(names)}
    bs = int(net.blobs[input_name].data.shape[0])
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("measure() needs at least one image")
    rng = np.random.RandomState(seed)
    grad2 = {lp.name: 0.0 for lp in lps}
    col2 = {lp.name: None for lp in lps}
    acts = {lp.name: [None, None, 0] for lp in lps}
    counted = 0
    had_input_diffs = getattr(net, "input_diffs", None)
    if had_input_diffs is not None:
        net.input_diffs = False
    try:
        for start in range(0, n, bs):
            batch = images[start:start + bs]
            valid = batch.shape[0]
            if valid < bs:
                batch = np.concatenate([batch] + [images[:bs]] * int(math.ceil((bs - valid) / min(n, bs))))[:bs]
            set_data(net, input_name, batch)
            pos = 1 if net.net_param.layer[0].type == "Input" else 0
            for lp in lps:
                idx = index[lp.name]
                if idx >= pos:
                    net.forward(start=names[pos], end=names[idx])
                    pos = idx + 1
                top = net.blobs[lp.top[0]].data
                s, q, c = channel_stats(top, valid)
                a = acts[lp.name]
                a[0] = s if a[0] is None else a[0] + s
                a[1] = q if a[1] is None else a[1] + q
                a[2] += c
            if pos < len(names):
                net.forward(start=names[pos])
            for o in net.outputs:
                eta = rng.standard_normal(net.blobs[o].diff.shape).astype(np.float32)
                eta[valid:] = 0
                net.blobs[o].diff[...] = eta
            net.clear_param_diffs()
            net.backward()
            counted += valid
            for lp in lps:
                d = weight_columns(lp, net.params[lp.name][0].diff)
                cols = column_energies(d)
                grad2[lp.name] += float(cols.sum())
                col2[lp.name] = cols if col2[lp.name] is None else col2[lp.name] + cols
    finally:
        if had_input_diffs is not None:
            net.input_diffs = had_input_diffs
    out: "OrderedDict[str, LayerStats]" = OrderedDict()
    for lp in lps:
        w2 = sq(net.params[lp.name][0].data)
        g2 = grad2[lp.name] * bs / counted
        rate = math.sqrt(g2 / w2) if w2 > 0 else float("nan")
        cols = col2[lp.name]
        cv = float(cols.std() / cols.mean()) if cols is not None and cols.mean() > 0 else float("nan")
        s, q, c = acts[lp.name]
        mean = s / c
        std = np.sqrt(np.maximum(q / c - mean * mean, 0))
        out[lp.name] = LayerStats(rate=rate, column_cv=cv, act_mean=float(mean.mean()), act_std=float(std.mean()),
                                  channel_std_cv=float(std.std() / std.mean()) if std.mean() > 0 else float("nan"))
    return out


def rates_of(stats: "OrderedDict[str, LayerStats]") -> Dict[str, float]:
    """Just the change rates of :func:`measure`'s result."""
    return {k: v.rate for k, v in stats.items()}

