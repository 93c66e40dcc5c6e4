"""Finite-difference gradient checking for numpy-engine layers, after Caffe's
``test_gradient_check_util.hpp``: the objective is ``sum(top.data * top_weight)`` for a fixed
random ``top_weight``; every analytic bottom and parameter gradient element is compared with a
central difference. Elements within ``kink_range`` of a kink (``kink`` value of the layer's
input, e.g. 0 for ReLU) are skipped, as are elements whose two one-sided differences disagree
(a max-pooling switch flips inside the step).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

from google.protobuf import text_format

from caffe_utils.layers import create_layer
from caffe_utils.layers.base import Blob, Layer
from caffe_utils.schema import schemas

TEST = 1


def _objective(layer: Layer, bottom: List[Blob], top: List[Blob], weights: List[np.ndarray]) -> float:
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return float(sum(np.sum(t.data.astype(np.float64) * w) for t, w in zip(top, weights)))


def check_gradients(layer: Layer, bottom: List[Blob], top: List[Blob], *,
                    step: float = 1e-2, threshold: float = 1e-2, seed: int = 1701,
                    check_bottom: Optional[Sequence[int]] = None, check_params: bool = True,
                    kink: Optional[float] = None, kink_range: float = -1.0,
                    max_checks: int = 400) -> int:
    """Assert analytic gradients of ``layer`` match finite differences; return #elements checked.

    ``layer.setup`` must already have run. ``threshold`` is relative to
    ``max(|analytic|, |numeric|, 1)`` as in Caffe. At most ``max_checks`` elements per blob are
    checked (a fixed random subset) to keep the test fast.
    """
    rng = np.random.RandomState(seed)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    weights = [rng.standard_normal(t.shape).astype(np.float64) for t in top]

    def analytic():
        for b in bottom:
            b.diff[...] = 0
        for p in layer.blobs:
            p.diff[...] = 0
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        for t, w in zip(top, weights):
            t.diff[...] = w
        idx = range(len(bottom)) if check_bottom is None else check_bottom
        pd = [i in idx and layer.can_propagate(i) for i in range(len(bottom))]
        layer.backward(top, pd, bottom)
        return pd

    pd = analytic()
    targets = [(b, f"bottom[{i}]", True) for i, b in enumerate(bottom) if pd[i]]
    if check_params:
        targets += [(p, f"param[{j}]", False) for j, p in enumerate(layer.blobs)]
    checked = 0
    for blob, label, is_bottom in targets:
        grad = blob.diff.astype(np.float64).copy()
        flat = blob.data.reshape(-1)
        n = flat.size
        picks = np.arange(n) if n <= max_checks else rng.choice(n, max_checks, replace=False)
        for k in picks:
            x0 = float(flat[k])
            if kink is not None and is_bottom and abs(x0 - kink) <= kink_range:
                continue
            flat[k] = x0 + step
            f_plus = _objective(layer, bottom, top, weights)
            flat[k] = x0 - step
            f_minus = _objective(layer, bottom, top, weights)
            flat[k] = x0
            f0 = _objective(layer, bottom, top, weights)
            numeric = (f_plus - f_minus) / (2 * step)
            fwd, bwd = (f_plus - f0) / step, (f0 - f_minus) / step
            if abs(fwd - bwd) > 10 * threshold * max(abs(fwd), abs(bwd), 1.0) and kink_range >= 0:
                continue  # a kink (max switch, ReLU) lies inside the step
            a = grad.reshape(-1)[k]
            scale = max(abs(a), abs(numeric), 1.0)
            assert abs(a - numeric) <= threshold * scale, (
                f"{layer.type} '{layer.name}' {label}[{k}]: analytic {a:.6g} vs numeric {numeric:.6g}")
            checked += 1
    _objective(layer, bottom, top, weights)
    return checked


def make_blobs(shapes: Sequence[Sequence[int]], rng: np.random.RandomState,
               init: Callable[[np.random.RandomState, tuple], np.ndarray] = None) -> List[Blob]:
    """Blobs with Gaussian data (or ``init(rng, shape)``)."""
    out = []
    for s in shapes:
        b = Blob(s)
        b.data[...] = init(rng, tuple(s)) if init else rng.standard_normal(s)
        out.append(b)
    return out


def parse_layer(text: str):
    """LayerParameter text parsed by the first schema that reads it (the preferred one first:
    pycaffe's may lack a fork field that the project's has)."""
    for pb2 in schemas()[:-1]:
        try:
            return text_format.Parse(text, pb2.LayerParameter())
        except text_format.ParseError:
            continue
    return text_format.Parse(text, schemas()[-1].LayerParameter())


def make_layer(text: str, arrays, phase: int = TEST, ntop: int = 1, in_place: bool = False):
    """A set-up layer from LayerParameter text, with bottoms holding ``arrays``."""
    param = parse_layer(text)
    layer = create_layer(param, phase)
    bottom = []
    for a in arrays:
        b = Blob(a.shape)
        b.data[...] = a
        bottom.append(b)
    top = [bottom[0]] if in_place else [Blob() for _ in range(ntop)]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    return layer, bottom, top


def rand(shape, seed: int = 0) -> np.ndarray:
    """Float32 standard-normal data with a fixed seed."""
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)
