"""im2col / col2im for 2-D convolutions, with Caffe's column layout.

Caffe's ``im2col_cpu`` turns one image ``(C, H, W)`` into a matrix with one row per
``(channel, kernel_row, kernel_col)`` (channel-major) and one column per output position
``(out_row, out_col)``; positions that fall in the zero padding read 0. ``col2im`` is its
adjoint: it adds every column entry back into the image position it was read from.

Functions:

* :func:`im2col` / :func:`col2im`: one image, exactly Caffe's ``(C*kh*kw, outH*outW)`` layout;
  :func:`im2col` is also the public way to extract a layer input's patches;
* :func:`im2col_batch` / :func:`col2im_batch`: a batch ``(N, C, H, W)`` at once, columns laid
  out ``(C*kh*kw, N*outH*outW)`` (image-major within a row) so that a convolution of the whole
  batch is one matrix product per group.

The tests check them against direct loop transcriptions of Caffe's code (``tests/oracles.py``).

The vectorised versions loop over the ``kh*kw`` kernel offsets and copy (add) one strided
slice of the padded batch per offset. ``col2im`` adds the offsets in Caffe's order (kernel row,
then kernel column), so it reproduces Caffe's float32 sums exactly. The batch versions accept a
reusable output buffer (:func:`scratch`) and split the copies over a few threads.

Limits: 2-D only; the output size uses C's truncating division as Caffe does, and windows
reaching past the padded input read zeros (as in Caffe).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair) -> Tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // b
    return q if a >= 0 else -q


def conv_out_size(size: int, kernel: int, pad: int, stride: int, dilation: int) -> int:
    """Caffe's convolution output size ``(size + 2*pad - extent) / stride + 1`` (C division)."""
    extent = dilation * (kernel - 1) + 1
    return _cdiv(size + 2 * pad - extent, stride) + 1


def out_shape(hw: Tuple[int, int], kernel: IntPair, pad: IntPair, stride: IntPair,
              dilation: IntPair = 1) -> Tuple[int, int]:
    """``(outH, outW)`` of a convolution over an ``hw`` image."""
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = map(_pair, (kernel, pad, stride, dilation))
    return (conv_out_size(hw[0], kh, ph, sh, dh), conv_out_size(hw[1], kw, pw, sw, dw))


def _padded(x: np.ndarray, ph: int, pw: int, need_h: int, need_w: int) -> np.ndarray:
    """``x`` (..., H, W) zero-padded by ``ph``/``pw`` before and enough after to cover
    ``need_h``/``need_w`` rows/columns in total (at least ``ph``/``pw`` after)."""
    H, W = x.shape[-2:]
    after_h = max(ph, need_h - ph - H)
    after_w = max(pw, need_w - pw - W)
    if ph == 0 and pw == 0 and after_h == 0 and after_w == 0:
        return x
    out = np.zeros(x.shape[:-2] + (ph + H + after_h, pw + W + after_w), x.dtype)
    out[..., ph:ph + H, pw:pw + W] = x
    return out


# ---- scratch memory and threads -------------------------------------------------------------
#
# Column matrices are large (CaffeNet conv2 on 16 images: 112 MB). Fresh allocations of that
# size are page-faulted in on every call, which costs more than the copy itself, so callers may
# pass a reusable buffer (see :func:`scratch`). The copies are split over a few threads (numpy
# releases the GIL while copying); BLAS is not running at the same time.

_SCRATCH: Dict[str, np.ndarray] = {}
_POOL: Optional[ThreadPoolExecutor] = None
_PARALLEL_MIN = 1 << 20  # elements; below this, threads cost more than they save


def scratch(name: str, size: int, dtype=np.float32) -> np.ndarray:
    """A flat reusable buffer of at least ``size`` elements (contents undefined).

    One buffer per ``name`` for the whole process, grown on demand: a caller must be done with
    it before anyone asks for the same name again (the engine runs one layer at a time; not
    thread-safe).
    """
    buf = _SCRATCH.get(name)
    if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
        buf = np.empty(max(int(size), 1), dtype)
        _SCRATCH[name] = buf
    return buf[:size]


def release_scratch() -> None:
    """Free all scratch buffers."""
    _SCRATCH.clear()


def _num_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def parallel(work: Callable[[slice], None], n: int, total: int) -> None:
    """Run ``work(slice)`` over a partition of ``range(n)``, in threads when ``total`` (the
    elements the work touches) is big. The parts must not write to the same memory."""
    global _POOL
    nt = min(_num_threads(), n)
    if nt <= 1 or total < _PARALLEL_MIN:
        work(slice(0, n))
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_num_threads(), thread_name_prefix="im2col")
    bounds = [round(k * n / nt) for k in range(nt + 1)]
    for f in [_POOL.submit(work, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]:
        f.result()


def tap_range(size: int, out: int, offset: int, stride: int) -> Tuple[slice, slice]:
    """One kernel tap along one axis: the output positions ``r`` (of ``out``) whose input
    ``r*stride + offset`` lies inside ``[0, size)``, and those inputs, as ``(out_slice,
    in_slice)`` (empty slices when there are none). Positions outside read zero (padding), so a
    kernel that clips its taps this way needs no padded copy of its input."""
    r0 = max(0, -(offset // stride))
    r1 = min(out, (size - 1 - offset) // stride + 1)
    if r1 <= r0:
        return slice(0, 0), slice(0, 0)
    i0 = r0 * stride + offset
    return slice(r0, r1), slice(i0, i0 + (r1 - r0 - 1) * stride + 1, stride)


def blocks(n: int, c: int, per_channel: int, budget: int) -> List[Tuple[slice, slice]]:
    """(images, channels) blocks of an (n, c, ...) array whose per-channel planes have
    ``per_channel`` elements, each of at most about ``budget`` elements (whole images together
    where they fit, else channel ranges of one image; at least one channel). Kernels that work
    block by block keep their temporaries small and in cache, and the blocks, being disjoint,
    can go to different threads (:func:`parallel`)."""
    per_image = c * per_channel
    if per_image <= budget:
        step = max(1, budget // max(per_image, 1))
        return [(slice(a, min(n, a + step)), slice(0, c)) for a in range(0, n, step)]
    cb = max(1, budget // max(per_channel, 1))
    return [(slice(a, a + 1), slice(b, min(c, b + cb))) for a in range(n) for b in range(0, c, cb)]


def channels_last(a: np.ndarray, fill: Optional[float] = None) -> np.ndarray:
    """A copy of block ``a`` (n, c, ...), or with ``fill`` an array of that value, whose memory
    has the channels (axis 1) innermost, viewed with ``a``'s axes: a kernel indexes it as it
    indexes ``a``, and numpy's ufuncs, which iterate in memory order, run their inner loops over
    its channels. For kernels whose window taps are strided slices of small planes, where a
    loop over a row would cover a few values."""
    order = (0,) + tuple(range(2, a.ndim)) + (1,)
    out = np.empty([a.shape[i] for i in order], a.dtype).transpose(tuple(np.argsort(order)))
    if fill is None:
        np.copyto(out, a)
    else:
        out[...] = fill
    return out


def channels_last_pays(taps: Sequence[Tuple[slice, slice]], out_hw: Tuple[int, int], channels: int,
                       below: int) -> bool:
    """Whether a window kernel of ``channels`` channels should work on its blocks copied with
    :func:`channels_last`: where some tap, given as its (output rows, output columns), misses
    part of the ``out_hw`` outputs (it reads padding or past the input's end there, so its
    slices of a block are strided in every axis and numpy's loops run a row of a few values at
    a time), and the output rows are shorter than the channel count and than ``below`` (on
    larger planes the copies cost more than they save)."""
    oh, ow = out_hw
    clipped = any(ro.stop - ro.start < oh or co.stop - co.start < ow for ro, co in taps)
    return clipped and ow < min(below, channels)


def _buffer(out: Optional[np.ndarray], size: int, dtype) -> np.ndarray:
    if out is None:
        return np.empty(size, dtype)
    if out.dtype != np.dtype(dtype) or out.size < size or not out.flags.c_contiguous:
        raise ValueError("out buffer too small, not contiguous or of the wrong dtype")
    return out.reshape(-1)[:size]


def im2col_batch(x: np.ndarray, kernel: IntPair, pad: IntPair = 0, stride: IntPair = 1,
                 dilation: IntPair = 1, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Columns of a batch ``x`` (N, C, H, W): array (C*kh*kw, N*outH*outW), dtype of x.

    ``out``: optional contiguous buffer (at least that many elements) to write into.
    """
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = map(_pair, (kernel, pad, stride, dilation))
    N, C, H, W = x.shape
    oh, ow = conv_out_size(H, kh, ph, sh, dh), conv_out_size(W, kw, pw, sw, dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"convolution output would be {oh}x{ow}")
    xp = _padded(x, ph, pw, (oh - 1) * sh + dh * (kh - 1) + 1, (ow - 1) * sw + dw * (kw - 1) + 1)
    col = _buffer(out, C * kh * kw * N * oh * ow, x.dtype).reshape(C, kh, kw, N, oh, ow)
    xt = xp.transpose(1, 0, 2, 3)  # (C, N, Hp, Wp) view
    rows = [slice(i * dh, i * dh + sh * (oh - 1) + 1, sh) for i in range(kh)]
    cols = [slice(j * dw, j * dw + sw * (ow - 1) + 1, sw) for j in range(kw)]
    by_image = N > 1

    def work(part: slice) -> None:
        for i in range(kh):
            for j in range(kw):
                if by_image:
                    col[:, i, j, part] = xt[:, part, rows[i], cols[j]]
                else:
                    col[part, i, j] = xt[part, :, rows[i], cols[j]]

    parallel(work, N if by_image else C, col.size)
    return col.reshape(C * kh * kw, N * oh * ow)


def col2im_batch(col: np.ndarray, shape: Sequence[int], kernel: IntPair, pad: IntPair = 0,
                 stride: IntPair = 1, dilation: IntPair = 1,
                 out: Optional[np.ndarray] = None) -> np.ndarray:
    """Adjoint of :func:`im2col_batch`: the (N, C, H, W) image for ``shape``.

    ``out``: optional contiguous scratch buffer for the padded image; the result is then a view
    into it.
    """
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = map(_pair, (kernel, pad, stride, dilation))
    N, C, H, W = (int(s) for s in shape)
    oh, ow = conv_out_size(H, kh, ph, sh, dh), conv_out_size(W, kw, pw, sw, dw)
    col = col.reshape(C, kh, kw, N, oh, ow)
    need_h = (oh - 1) * sh + dh * (kh - 1) + 1
    need_w = (ow - 1) * sw + dw * (kw - 1) + 1
    Hp = ph + H + max(ph, need_h - ph - H)
    Wp = pw + W + max(pw, need_w - pw - W)
    xp = _buffer(out, N * C * Hp * Wp, col.dtype).reshape(N, C, Hp, Wp)
    xt = xp.transpose(1, 0, 2, 3)
    rows = [slice(i * dh, i * dh + sh * (oh - 1) + 1, sh) for i in range(kh)]
    cols = [slice(j * dw, j * dw + sw * (ow - 1) + 1, sw) for j in range(kw)]
    by_image = N > 1

    def work(part: slice) -> None:
        if by_image:
            xp[part] = 0
        else:
            xp[:, part] = 0
        for i in range(kh):          # Caffe's order: kernel row, then kernel column
            for j in range(kw):
                if by_image:
                    xt[:, part, rows[i], cols[j]] += col[:, i, j, part]
                else:
                    xt[part, :, rows[i], cols[j]] += col[part, i, j]

    parallel(work, N if by_image else C, col.size)
    if Hp == H and Wp == W:
        return xp
    return xp[:, :, ph:ph + H, pw:pw + W]


def im2col(x: np.ndarray, kernel: IntPair, pad: IntPair = 0, stride: IntPair = 1,
           dilation: IntPair = 1) -> np.ndarray:
    """Caffe's ``im2col_cpu`` of one image ``x`` (C, H, W): array (C*kh*kw, outH*outW).

    Row ``(c*kh + i)*kw + j`` holds input channel ``c`` seen through kernel offset ``(i, j)``;
    column ``r*outW + s`` is output position ``(r, s)``. This is how other code extracts the
    patches a convolution layer sees.
    """
    return im2col_batch(np.asarray(x)[None], kernel, pad, stride, dilation)


def col2im(col: np.ndarray, shape: Sequence[int], kernel: IntPair, pad: IntPair = 0,
           stride: IntPair = 1, dilation: IntPair = 1) -> np.ndarray:
    """Caffe's ``col2im_cpu``: image (C, H, W) for ``shape`` from columns (C*kh*kw, outH*outW)."""
    C, H, W = shape
    return col2im_batch(col, (1, C, H, W), kernel, pad, stride, dilation)[0]
