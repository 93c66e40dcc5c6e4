"""Caffe's weight fillers (``FillerParameter``): constant, uniform, gaussian (with ``sparse``),
positive_unitball, xavier, msra, bilinear — the same distributions as Caffe's ``filler.hpp``.

Random streams differ from Caffe's (numpy's generator, not Boost's), so values match Caffe in
distribution, not bit for bit. ``fan_in = count / shape[0]``, ``fan_out = count / shape[1]`` as
in Caffe.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np

from caffe_utils.errors import PrototxtError


def _fans(shape: Sequence[int]) -> tuple:
    count = int(np.prod(shape)) if len(shape) else 1
    fan_in = count / shape[0] if len(shape) > 0 and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


_CHUNK = 1 << 20


def _draw(shape: tuple, draw: Callable[[int], np.ndarray], out: Optional[np.ndarray] = None) -> np.ndarray:
    """A float32 array of ``shape`` (``out`` when given) filled by ``draw(n)`` chunk by chunk,
    so a 100M-element blob needs no float64 temporary of its size. Consecutive draws continue
    numpy's stream, so the values equal one ``draw(count)``."""
    out = _target(shape, out)
    flat = out.reshape(-1)
    for i in range(0, flat.size, _CHUNK):
        j = min(i + _CHUNK, flat.size)
        flat[i:j] = draw(j - i)
    return out


def _target(shape: tuple, out: Optional[np.ndarray]) -> np.ndarray:
    """``out`` (checked to be a contiguous float32 array of ``shape``) or a new such array."""
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"fill's out must be a C-contiguous float32 array of shape {shape}, got "
                         f"{out.dtype} {out.shape}")
    return out


#: a blob of more values than this is drawn in parts of this size, each part by its own
#: generator (seeded from the caller's) and in threads: one core would take a few tenths of a
#: second on a large InnerProduct blob (CaffeNet's fc6: 38M values, VGG16's: 103M)
PART = 1 << 22


def _fill_parts(gen: np.random.Generator, flat: np.ndarray,
                draw: Callable[[np.random.Generator, np.ndarray], None]) -> None:
    """Fill the float32 vector ``flat`` by ``draw(generator, part)``: in one call by ``gen`` up
    to ``PART`` values; past that part by part, part i by an SFC64 generator seeded with the i-th
    of ``gen``'s next integers, so the values depend on ``gen``'s state only, not on the threads."""
    if flat.size <= PART:
        draw(gen, flat)
        return
    from caffe_utils.layers.im2col import parallel  # here: the layers package imports this module
    count = -(-flat.size // PART)
    seeds = gen.integers(0, 2 ** 63, size=count, dtype=np.uint64)
    gens = [np.random.Generator(np.random.SFC64(int(s))) for s in seeds]

    def work(sl: slice) -> None:
        for i in range(sl.start, sl.stop):
            draw(gens[i], flat[i * PART:(i + 1) * PART])

    parallel(work, count, flat.size)


def gaussian32(shape: tuple, gen: np.random.Generator, mean: float, std: float,
               out: Optional[np.ndarray] = None) -> np.ndarray:
    """N(mean, std^2) drawn in float32 by ``gen`` straight into the array (no temporary; a
    large one in parts, see :func:`_fill_parts`)."""
    out = _target(shape, out)

    def draw(g: np.random.Generator, part: np.ndarray) -> None:
        g.standard_normal(dtype=np.float32, out=part)
        part *= np.float32(std)
        if mean:
            part += np.float32(mean)

    _fill_parts(gen, out.reshape(-1), draw)
    return out


def _uniform32(shape: tuple, gen: np.random.Generator, low: float, high: float,
               out: Optional[np.ndarray]) -> np.ndarray:
    """U[low, high) drawn in float32 by ``gen`` straight into the array (no temporary; a large
    one in parts, see :func:`_fill_parts`)."""
    out = _target(shape, out)

    def draw(g: np.random.Generator, part: np.ndarray) -> None:
        g.random(dtype=np.float32, out=part)
        part *= np.float32(high - low)
        part += np.float32(low)

    _fill_parts(gen, out.reshape(-1), draw)
    return out


Rng = Union[np.random.RandomState, np.random.Generator]


def fill(filler, shape: Sequence[int], rng: Rng, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Return a float32 array of ``shape`` drawn as Caffe's filler ``filler`` would; with
    ``out`` (a C-contiguous float32 array of ``shape``, e.g. a blob's data) fill it instead.

    With a ``np.random.Generator``, the Gaussian and uniform draws are made in float32 straight
    into the array; a RandomState draws float64 in chunks (its historical stream)."""
    shape = tuple(int(d) for d in shape)
    gen = rng if isinstance(rng, np.random.Generator) else None
    kind = filler.type
    if kind == "constant":
        return _put(np.full(shape, filler.value, np.float32), out)
    if kind == "uniform":
        if not (np.isfinite(filler.max - filler.min) and filler.min <= filler.max):
            raise PrototxtError(f"the uniform filler needs finite min <= max, got min {filler.min} and "
                                f"max {filler.max}; fix them")
        if gen is not None:
            return _uniform32(shape, gen, filler.min, filler.max, out)
        return _draw(shape, lambda n: rng.uniform(filler.min, filler.max, n), out)
    if 0 in shape:
        return _put(np.zeros(shape, np.float32), out)  # nothing to draw (the fan-in below would be 0)
    if kind == "gaussian":
        if filler.sparse >= 0 and len(shape) < 2:
            raise PrototxtError("the gaussian filler's 'sparse' option needs a blob with >= 2 axes")
        if gen is not None:
            out = gaussian32(shape, gen, filler.mean, filler.std, out)
        else:
            out = _draw(shape, lambda n: filler.mean + filler.std * rng.standard_normal(n), out)
        if filler.sparse >= 0:
            p = filler.sparse / float(shape[0])
            out *= _draw(shape, lambda n: rng.uniform(size=n) < p)
        return out
    if kind == "positive_unitball":
        unit = rng.uniform(0, 1, shape).astype(np.float32)
        flat = unit.reshape(shape[0], -1)
        flat /= flat.sum(axis=1, keepdims=True)
        return _put(unit, out)
    if kind in ("xavier", "msra"):
        return _fan_scaled(filler, shape, rng, out)
    if kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise PrototxtError("the bilinear filler needs a 4-D blob with square kernels")
        k = shape[3]
        f = np.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        x = np.arange(k)
        w1 = 1 - np.abs(x / f - c)
        return _put(np.broadcast_to(np.outer(w1, w1), shape).astype(np.float32), out)
    raise PrototxtError(f"unknown filler type '{kind}' (known: constant, uniform, gaussian, "
                        "positive_unitball, xavier, msra, bilinear)")


def _fan_scaled(filler, shape: tuple, rng: Rng, out: Optional[np.ndarray]) -> np.ndarray:
    """Xavier's U(-sqrt(3/n), sqrt(3/n)) or MSRA's N(0, 2/n), n the fan its variance_norm picks."""
    fan_in, fan_out = _fans(shape)
    norm = filler.variance_norm
    enum = filler.DESCRIPTOR.fields_by_name["variance_norm"].enum_type.values_by_name
    if norm == enum["AVERAGE"].number:
        n = (fan_in + fan_out) / 2.0
    elif norm == enum["FAN_OUT"].number:
        n = fan_out
    else:
        n = fan_in
    gen = rng if isinstance(rng, np.random.Generator) else None
    if filler.type == "xavier":
        scale = np.sqrt(3.0 / n)
        if gen is not None:
            return _uniform32(shape, gen, -scale, scale, out)
        return _draw(shape, lambda m: rng.uniform(-scale, scale, m), out)
    if gen is not None:
        return gaussian32(shape, gen, 0.0, np.sqrt(2.0 / n), out)
    return _draw(shape, lambda m: np.sqrt(2.0 / n) * rng.standard_normal(m), out)


def _put(values: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
    """``values`` (float32), or copied into ``out`` when given."""
    if out is None:
        return values if values.flags.c_contiguous else values.copy()
    _target(values.shape, out)[...] = values
    return out
