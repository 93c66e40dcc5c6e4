"""Caffe's weight fillers (``FillerParameter``): constant, uniform, gaussian (with ``sparse``),
positive_unitball, xavier, msra, bilinear — the same distributions as Caffe's ``filler.hpp``.

Random streams differ from Caffe's (numpy's generator, not Boost's), so values match Caffe in
distribution, not bit for bit. ``fan_in = count / shape[0]``, ``fan_out = count / shape[1]`` as
in Caffe.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from caffe_utils.errors import PrototxtError


def _fans(shape: Sequence[int]) -> tuple:
    count = int(np.prod(shape)) if len(shape) else 1
    fan_in = count / shape[0] if len(shape) > 0 and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


_CHUNK = 1 << 20


def _draw(shape: tuple, draw: Callable[[int], np.ndarray]) -> np.ndarray:
    """A float32 array of ``shape`` filled by ``draw(n)`` chunk by chunk, so a 100M-element blob
    needs no float64 temporary of its size. Consecutive draws continue numpy's stream, so the
    values equal one ``draw(count)``."""
    out = np.empty(shape, np.float32)
    flat = out.reshape(-1)
    for i in range(0, flat.size, _CHUNK):
        j = min(i + _CHUNK, flat.size)
        flat[i:j] = draw(j - i)
    return out


def fill(filler, shape: Sequence[int], rng: np.random.RandomState) -> np.ndarray:
    """Return a float32 array of ``shape`` drawn as Caffe's filler ``filler`` would."""
    shape = tuple(int(d) for d in shape)
    kind = filler.type
    if kind == "constant":
        return np.full(shape, filler.value, np.float32)
    if kind == "uniform":
        if not (np.isfinite(filler.max - filler.min) and filler.min <= filler.max):
            raise PrototxtError(f"the uniform filler needs finite min <= max, got min {filler.min} and "
                                f"max {filler.max}; fix them")
        return _draw(shape, lambda n: rng.uniform(filler.min, filler.max, n))
    if 0 in shape:
        return np.zeros(shape, np.float32)  # nothing to draw (the fan-in below would be 0)
    if kind == "gaussian":
        if filler.sparse >= 0 and len(shape) < 2:
            raise PrototxtError("the gaussian filler's 'sparse' option needs a blob with >= 2 axes")
        out = _draw(shape, lambda n: filler.mean + filler.std * rng.standard_normal(n))
        if filler.sparse >= 0:
            p = filler.sparse / float(shape[0])
            out *= _draw(shape, lambda n: rng.uniform(size=n) < p)
        return out
    if kind == "positive_unitball":
        out = rng.uniform(0, 1, shape).astype(np.float32)
        flat = out.reshape(shape[0], -1)
        flat /= flat.sum(axis=1, keepdims=True)
        return out
    if kind in ("xavier", "msra"):
        fan_in, fan_out = _fans(shape)
        norm = filler.variance_norm
        enum = filler.DESCRIPTOR.fields_by_name["variance_norm"].enum_type.values_by_name
        if norm == enum["AVERAGE"].number:
            n = (fan_in + fan_out) / 2.0
        elif norm == enum["FAN_OUT"].number:
            n = fan_out
        else:
            n = fan_in
        if kind == "xavier":
            scale = np.sqrt(3.0 / n)
            return _draw(shape, lambda m: rng.uniform(-scale, scale, m))
        return _draw(shape, lambda m: np.sqrt(2.0 / n) * rng.standard_normal(m))
    if kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise PrototxtError("the bilinear filler needs a 4-D blob with square kernels")
        k = shape[3]
        f = np.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        x = np.arange(k)
        w1 = 1 - np.abs(x / f - c)
        return np.broadcast_to(np.outer(w1, w1), shape).astype(np.float32).copy()
    raise PrototxtError(f"unknown filler type '{kind}' (known: constant, uniform, gaussian, "
                        "positive_unitball, xavier, msra, bilinear)")
