"""Stage 1's sample of a convolution's input patches, drawn the same way whatever the batching.

The rule: image ``i`` of the sample (its index in the sample, not in a batch) gives the
convolution at net position ``L`` the first ``p`` output positions of a random permutation of
all of its ``oh*ow`` positions, drawn by a PCG64 generator seeded with ``(seed, L, i)``. Neither
the batch size, the order the batches run in, nor how many checkpoints fit in memory changes
which patches an image gives; a smaller ``p`` (a lower memory limit, more images) takes a prefix
of the same permutation, so its patches are a subset of those of a larger ``p``.

Patches are gathered straight from the (padded) image at the chosen positions, in im2col's row
order (channel, kernel row, kernel column), rather than from a full im2col of the image.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

IntPair = Tuple[int, int]


def image_rng(seed: int, layer: int, image: int, stream: int = 1) -> np.random.Generator:
    """The generator of one image's patch positions for the layer at net position ``layer``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), stream, int(layer), int(image)])))


def patch_positions(seed: int, layer: int, image: int, total: int, count: int) -> np.ndarray:
    """``count`` distinct output positions (of ``total``, row-major) of image ``image``: the
    first ``count`` of its permutation (see the module's rule)."""
    return image_rng(seed, layer, image).permutation(total)[:count]


def gather_patches(x: np.ndarray, positions: np.ndarray, kernel: IntPair, pad: IntPair, stride: IntPair,
                   dilation: IntPair, out_w: int) -> np.ndarray:
    """The patches (len(positions), C*kh*kw) of image ``x`` (C, H, W) at the row-major output
    positions ``positions`` of a convolution ``out_w`` outputs wide; the rows of an im2col's
    columns at those positions."""
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = kernel, pad, stride, dilation
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    r, c = np.divmod(positions, out_w)
    rows = r[:, None] * sh + np.arange(kh) * dh          # (p, kh)
    cols = c[:, None] * sw + np.arange(kw) * dw          # (p, kw)
    g = xp[:, rows[:, :, None], cols[:, None, :]]        # (C, p, kh, kw)
    return np.ascontiguousarray(g.transpose(1, 0, 2, 3)).reshape(len(positions), -1)


def per_image_count(n_images: int, positions: int, cap: int) -> int:
    """Patches taken from each image so that ``n_images`` give about ``cap`` in all (at most
    every position)."""
    return int(min(-(-min(n_images * positions, cap) // n_images), positions))

