"""Long-reduction matrix products for the weight gradients of the numpy engine.

A convolution's weight gradient is ``dW = dY @ col.T``: a small output (filters x taps) summed
over every output position of the batch (hundreds of thousands). numpy's multi-threaded
OpenBLAS handles that shape badly (its threads synchronise once per block of the long axis, and
on a loaded machine each wait costs a time slice): measured here it ran several times slower
than the same product on one BLAS thread. :func:`matmul_nt_long` therefore splits the long axis
into one part per core, runs the parts in threads with OpenBLAS set to one thread each, and adds
the partial products.

OpenBLAS's thread count is set through its C API (``openblas_set_num_threads`` under the names
numpy's builds export), found among the libraries loaded from numpy's own folder; where there
is none (another BLAS, another OS), the product is one plain ``np.matmul``.

Products that run on OpenBLAS's own threads (plain ``np.matmul``) leave those threads spinning
for a while, which takes cores from the threads here; :mod:`caffe_utils` sets
``OPENBLAS_THREAD_TIMEOUT`` so that they sleep at once (see its docstring).
"""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import numpy as np

from caffe_utils.layers.im2col import _num_threads, parallel, scratch

#: below this many multiply-adds the product is one plain matmul
LONG_MIN = 1 << 24

_NAMES = ("scipy_openblas{}_num_threads64_", "scipy_openblas{}_num_threads",
          "openblas{}_num_threads64_", "openblas{}_num_threads")
_API: Optional[Tuple[object, object]] = None
_LOOKED = False


def _numpy_openblas() -> Optional[Tuple[object, object]]:
    """(set, get) thread-count functions of the OpenBLAS that numpy loaded, or None."""
    global _API, _LOOKED
    if _LOOKED:
        return _API
    _LOOKED = True
    root = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and ln.split()[-1].startswith(root)}
    except OSError:
        return None
    for path in sorted(p for p in paths if "numpy" in p):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _NAMES:
            setter, getter = getattr(lib, name.format("_set"), None), getattr(lib, name.format("_get"), None)
            if setter is not None and getter is not None:
                setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                _API = (setter, getter)
                return _API
    return None


@contextmanager
def one_blas_thread() -> Iterator[bool]:
    """Run the block with numpy's OpenBLAS on one thread (restored after); yields whether the
    thread count could be set."""
    api = _numpy_openblas()
    if api is None:
        yield False
        return
    setter, getter = api
    before = int(getter())
    setter(1)
    try:
        yield True
    finally:
        setter(before)


def matmul_nt_long(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = a @ b.T`` for ``a`` (M, K) and ``b`` (N, K) with a long K, in K-parts run in
    threads on one BLAS thread each (see the module's docstring). ``out``: (M, N) float32."""
    m, k = a.shape
    n = b.shape[0]
    parts = min(_num_threads(), max(1, k // 256))
    if parts <= 1 or m * n * k < LONG_MIN:
        return np.matmul(a, b.T, out=out)
    with one_blas_thread() as single:
        if not single:
            return np.matmul(a, b.T, out=out)
        partial = scratch("blas_parts", parts * m * n).reshape(parts, m, n)
        bounds = [round(i * k / parts) for i in range(parts + 1)]

        def work(sl: slice) -> None:
            for i in range(sl.start, sl.stop):
                np.matmul(a[:, bounds[i]:bounds[i + 1]], b[:, bounds[i]:bounds[i + 1]].T, out=partial[i])

        parallel(work, parts, 1 << 62)
        np.sum(partial, axis=0, out=out)
    return out


def matmul_cols(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = a @ b`` for 2-D ``a`` (M, K) and a wide ``b`` (K, N), in column parts run in
    threads on one BLAS thread each: the same work as OpenBLAS's own threads, without their
    per-block waits (see the module's docstring). ``out``: (M, N) float32."""
    m, k = a.shape
    n = b.shape[1]
    parts = min(_num_threads(), max(1, n // 256))
    if parts <= 1 or m * n * k < LONG_MIN:
        return np.matmul(a, b, out=out)
    with one_blas_thread() as single:
        if not single:
            return np.matmul(a, b, out=out)
        bounds = [round(i * n / parts) for i in range(parts + 1)]

        def work(sl: slice) -> None:
            for i in range(sl.start, sl.stop):
                np.matmul(a, b[:, bounds[i]:bounds[i + 1]], out=out[:, bounds[i]:bounds[i + 1]])

        parallel(work, parts, 1 << 62)
    return out


#: up to this many groups, a grouped product is one threaded product per group
FEW_GROUPS = 4


def matmul_groups(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[g] = a[g] @ b[g]`` for stacked (G, M, K) and (G, K, N): with few groups each is one
    :func:`matmul_cols`, with many one stacked ``np.matmul`` (a Python loop over many small
    groups would cost more than the products)."""
    if a.shape[0] > FEW_GROUPS:
        return np.matmul(a, b, out=out)
    for g in range(a.shape[0]):
        matmul_cols(a[g], b[g], out[g])
    return out
