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
the next convolutions up to 2x slower, and a CaffeNet initialization 1.15x slower (README,
"Benchmarks", 2026-12-07).
"""
import os as _os

__version__ = "0.1.0"

#: whether importing this package set ``OPENBLAS_THREAD_TIMEOUT`` (the environment had none);
#: the benchmarks then leave it out of the environment of an older tree's run
OPENBLAS_TIMEOUT_SET_HERE = "OPENBLAS_THREAD_TIMEOUT" not in _os.environ
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
