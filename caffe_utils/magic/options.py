"""The initialization's options: one source for every default the CLIs and scripts show."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

INIT_TYPES = ("gaussian", "pca", "zca", "kmeans", "rand", "xavier", "msra", "orthogonal")
DATA_DRIVEN = ("pca", "zca", "kmeans", "rand")


@dataclass
class InitOptions:
    """What :func:`caffe_utils.magic.initialize` does.

    ``init`` picks stage 1's weights; ``within``/``between`` switch stages 2 and 3; ``beta`` is
    every output channel's mean after stage 2; ``iterations``, ``damping`` and ``tolerance``
    bound stage 3's rounds (each one a solve, corrected by a measured pass behind inexact
    layers), the fraction of the solved rescaling each round applies and its stop (after a
    measured round, a rate within its standard error over the ``rate_images`` calibration
    images' batches, or where larger over the measuring pass's own, counts as within
    ``tolerance``); the change rates are measured over
    ``rate_images`` images. ``mem_limit`` bytes bound the cached activations and patches.
    With ``lrn_alpha`` stage 3 may scale an LRN layer's ``alpha`` by ``1/r^2`` where it
    scales its input by ``r``, which keeps the layer exact: the net then
    computes what it did only with the new alphas (the report's ``lrn_alphas``), which is why
    the CLI turns it on with ``--output-prototxt`` alone."""
    init: str = "kmeans"
    within: bool = True
    between: bool = True
    beta: float = 0.1
    iterations: int = 10
    damping: float = 1.0
    tolerance: float = 0.01
    rate_images: int = 64
    zero_classifier: bool = False
    reinit: Sequence[str] = ()
    reinit_all: bool = False
    lrn_alpha: bool = False
    batch_size: int = 16
    mem_limit: int = 1 << 30
    seed: int = 0
