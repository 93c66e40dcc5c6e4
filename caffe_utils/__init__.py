"""magic-init's library: Caffe model files, two engines (pycaffe and a numpy engine), and the
data-dependent initialization of Krähenbühl et al. (ICLR 2016).

Import submodules directly (``caffe_utils.netio``, ``caffe_utils.engine`` ...); importing this
package does not import pycaffe.

Importing it sets ``OPENBLAS_THREAD_TIMEOUT=4`` in the environment unless it is set already, so
that OpenBLAS's idle threads sleep at once instead of spinning. It takes effect only for the
OpenBLAS libraries loaded after it (numpy's, when this package is imported before numpy, and
pycaffe's). The numpy engine splits its large products over threads of its own, each running
OpenBLAS on one thread (:mod:`caffe_utils.layers.blas`). After any product that OpenBLAS ran
on several threads (an InnerProduct layer, k-means), OpenBLAS's idle threads kept spinning,
and for tens of milliseconds they took a core from the engine's threads. On 2 cores that made
the next convolutions up to 2x slower, and a CaffeNet initialization about 1.2x slower
(README, "Benchmarks", 2026-12-07). :func:`untouched_environ` gives a child process the
environment as it was before.
"""
import os as _os
from typing import Dict as _Dict
from typing import Mapping as _Mapping

__version__ = "0.1.0"

#: whether importing this package set ``OPENBLAS_THREAD_TIMEOUT`` (the environment had none)
OPENBLAS_TIMEOUT_SET_HERE = "OPENBLAS_THREAD_TIMEOUT" not in _os.environ
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def untouched_environ(env: _Mapping[str, str]) -> _Dict[str, str]:
    """A copy of ``env`` without what importing this package put in the environment (the
    ``OPENBLAS_THREAD_TIMEOUT`` it set; a user's stays): for a child process that should run as
    if this package had not been imported, such as an older tree's run in the benchmarks and
    in ``scripts/compare_outputs.py``."""
    out = dict(env)
    if OPENBLAS_TIMEOUT_SET_HERE:
        out.pop("OPENBLAS_THREAD_TIMEOUT", None)
    return out
