"""Test oracles: direct loop transcriptions of Caffe's CPU code, slow and plainly right.

They use nothing of the code under test. For the vision layers and im2col
(``tests/test_layers_vision.py``):

* :func:`naive_conv` / :func:`naive_conv_backward` / :func:`naive_deconv`: 7-loop convolution,
  its scatter-loop gradients, deconvolution by scattering (float64);
* :func:`naive_pool` / :func:`naive_pool_backward`: Caffe's PoolingLayer loops (MAX with mask, AVE);
* :func:`naive_lrn_across` / :func:`naive_lrn_within`: LRN's two regions;
* :func:`im2col_naive` / :func:`col2im_naive`: Caffe's ``im2col_cpu`` / ``col2im_cpu`` for one image.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import numpy as np


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_out(size, k, p, s, d):
    ext = d * (k - 1) + 1
    num = size + 2 * p - ext
    return (abs(num) // s) * (1 if num >= 0 else -1) + 1


def _conv_taps(x_shape, m_count, out_hw, k, p, s, d, group):
    """The 7 loops of a direct convolution: ``(n, m, r, q, ci, i, j, yy, xx)`` for every output
    ``(n, m, r, q)`` and kernel tap ``(c, i, j)`` that reads inside the input, as input channel
    ``ci`` at ``(yy, xx)``; ``(n, m, r, q, -1, ...)`` comes first for each output (its bias)."""
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = map(_pair, (k, p, s, d))
    N, C, H, W = x_shape
    oh, ow = out_hw
    cg, mg = C // group, m_count // group
    for n in range(N):
        for m in range(m_count):
            g = m // mg
            for r in range(oh):
                for q in range(ow):
                    yield n, m, r, q, -1, 0, 0, 0, 0
                    for c in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                yy, xx = r * sh - ph + i * dh, q * sw - pw + j * dw
                                if 0 <= yy < H and 0 <= xx < W:
                                    yield n, m, r, q, g * cg + c, i, j, yy, xx


def naive_conv(x, w, b, k, p, s, d, group):
    """Direct 7-loop convolution (float64)."""
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = map(_pair, (k, p, s, d))
    N, C, H, W = x.shape
    oh, ow = conv_out(H, kh, ph, sh, dh), conv_out(W, kw, pw, sw, dw)
    y = np.zeros((N, w.shape[0], oh, ow))
    for n, m, r, q, ci, i, j, yy, xx in _conv_taps(x.shape, w.shape[0], (oh, ow), k, p, s, d, group):
        if ci < 0:
            y[n, m, r, q] = 0.0 if b is None else float(b[m])
        else:
            y[n, m, r, q] += float(w[m, ci % (C // group), i, j]) * float(x[n, ci, yy, xx])
    return y


def naive_conv_backward(x, w, dy, k, p, s, d, group):
    """Scatter loops: (dx, dw, db) of the 7-loop convolution."""
    cg = x.shape[1] // group
    dx = np.zeros(x.shape)
    dwt = np.zeros(w.shape)
    for n, m, r, q, ci, i, j, yy, xx in _conv_taps(x.shape, w.shape[0], dy.shape[2:], k, p, s, d, group):
        if ci >= 0:
            gval = float(dy[n, m, r, q])
            dx[n, ci, yy, xx] += gval * float(w[m, ci % cg, i, j])
            dwt[m, ci % cg, i, j] += gval * float(x[n, ci, yy, xx])
    return dx, dwt, dy.sum(axis=(0, 2, 3))


def naive_deconv(x, w, b, k, p, s, d, group):
    """Deconvolution by scattering every input value through the kernel (float64)."""
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = map(_pair, (k, p, s, d))
    N, C, H, W = x.shape
    Mg = w.shape[1]
    M = Mg * group
    cg = C // group
    OH = sh * (H - 1) + dh * (kh - 1) + 1 - 2 * ph
    OW = sw * (W - 1) + dw * (kw - 1) + 1 - 2 * pw
    y = np.zeros((N, M, OH, OW))
    for n in range(N):
        for c in range(C):
            g = c // cg
            for r in range(H):
                for q in range(W):
                    v = float(x[n, c, r, q])
                    for m in range(Mg):
                        for i in range(kh):
                            for j in range(kw):
                                yy, xx = r * sh - ph + i * dh, q * sw - pw + j * dw
                                if 0 <= yy < OH and 0 <= xx < OW:
                                    y[n, g * Mg + m, yy, xx] += v * float(w[c, m, i, j])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def naive_pooled(size, k, p, s, ceil=True):
    num = size + 2 * p - k
    out = (int(np.ceil(num / s)) if ceil else int(np.floor(num / s))) + 1
    if p and (out - 1) * s >= size + p:
        out -= 1
    return out


def naive_pool(x, method, k, p, s, ceil=True):
    """Transcription of Caffe's PoolingLayer::Forward_cpu loops; returns (top, mask)."""
    (kh, kw), (ph, pw), (sh, sw) = map(_pair, (k, p, s))
    N, C, H, W = x.shape
    oh, ow = naive_pooled(H, kh, ph, sh, ceil), naive_pooled(W, kw, pw, sw, ceil)
    y = np.zeros((N, C, oh, ow))
    mask = -np.ones((N, C, oh, ow), np.int64)
    for n in range(N):
        for c in range(C):
            for r in range(oh):
                for q in range(ow):
                    hs, ws = r * sh - ph, q * sw - pw
                    if method == "MAX":
                        he, we = min(hs + kh, H), min(ws + kw, W)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best = -np.finfo(np.float32).max
                        for h in range(hs, he):
                            for w in range(ws, we):
                                if x[n, c, h, w] > best:
                                    best = x[n, c, h, w]
                                    mask[n, c, r, q] = h * W + w
                        y[n, c, r, q] = best
                    else:
                        he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
                        size = (he - hs) * (we - ws)
                        hs, ws = max(hs, 0), max(ws, 0)
                        he, we = min(he, H), min(we, W)
                        y[n, c, r, q] = x[n, c, hs:he, ws:we].astype(np.float64).sum() / size
    return y, mask


def naive_pool_backward(x_shape, dy, method, k, p, s, mask=None):
    (kh, kw), (ph, pw), (sh, sw) = map(_pair, (k, p, s))
    N, C, H, W = x_shape
    dx = np.zeros(x_shape)
    for n in range(N):
        for c in range(C):
            for r in range(dy.shape[2]):
                for q in range(dy.shape[3]):
                    if method == "MAX":
                        idx = mask[n, c, r, q]
                        if idx >= 0:  # -1: no value beat -FLT_MAX, the gradient goes nowhere
                            dx[n, c, idx // W, idx % W] += dy[n, c, r, q]
                        continue
                    hs, ws = r * sh - ph, q * sw - pw
                    he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
                    size = (he - hs) * (we - ws)
                    hs, ws = max(hs, 0), max(ws, 0)
                    he, we = min(he, H), min(we, W)
                    dx[n, c, hs:he, ws:we] += dy[n, c, r, q] / size
    return dx


def naive_lrn_across(x, dy, size, alpha, beta, k):
    x = x.astype(np.float64)
    N, C, H, W = x.shape
    p = (size - 1) // 2
    scale = np.zeros(x.shape)
    for c in range(C):
        lo, hi = max(0, c - p), min(C, c + p + 1)
        scale[:, c] = k + alpha / size * (x[:, lo:hi] ** 2).sum(axis=1)
    y = x * scale ** -beta
    dx = np.zeros(x.shape)
    ratio = dy * y / scale
    for c in range(C):
        lo, hi = max(0, c - p), min(C, c + p + 1)
        dx[:, c] = dy[:, c] * scale[:, c] ** -beta - 2 * alpha * beta / size * x[:, c] * ratio[:, lo:hi].sum(axis=1)
    return y, dx


def naive_lrn_within(x, size, alpha, beta):
    """out = x * (1 + alpha * mean of x^2 over the size x size window, zero padded)^-beta."""
    x = x.astype(np.float64)
    N, C, H, W = x.shape
    p = (size - 1) // 2
    y = np.zeros(x.shape)
    for h in range(H):
        for w in range(W):
            win = x[:, :, max(0, h - p):h + p + 1, max(0, w - p):w + p + 1]
            s = (win ** 2).sum(axis=(2, 3)) / (size * size)
            y[:, :, h, w] = x[:, :, h, w] * (1 + alpha * s) ** -beta
    return y


def _taps(shape: Sequence[int], kernel, pad, stride, dilation) -> Iterator[Tuple[int, int, int, int, int]]:
    """Caffe's im2col loops over a (C, H, W) image: ``(row, column, c, y, x)`` of every entry of
    the column matrix that reads inside the image, in Caffe's order (entries in the padding
    read 0 and are not listed)."""
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = map(_pair, (kernel, pad, stride, dilation))
    C, H, W = shape
    oh, ow = conv_out(H, kh, ph, sh, dh), conv_out(W, kw, pw, sw, dw)
    for c in range(C):
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for r in range(oh):
                    y = r * sh - ph + i * dh
                    for s in range(ow):
                        xx = s * sw - pw + j * dw
                        if 0 <= y < H and 0 <= xx < W:
                            yield row, r * ow + s, c, y, xx


def im2col_naive(x: np.ndarray, kernel, pad=0, stride=1, dilation=1) -> np.ndarray:
    """Loop transcription of Caffe's ``im2col_cpu``: (C*kh*kw, outH*outW) from (C, H, W)."""
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = map(_pair, (kernel, pad, stride, dilation))
    C, H, W = x.shape
    col = np.zeros((C * kh * kw, conv_out(H, kh, ph, sh, dh) * conv_out(W, kw, pw, sw, dw)), x.dtype)
    for row, column, c, y, xx in _taps(x.shape, kernel, pad, stride, dilation):
        col[row, column] = x[c, y, xx]
    return col


def col2im_naive(col: np.ndarray, shape: Sequence[int], kernel, pad=0, stride=1,
                 dilation=1) -> np.ndarray:
    """Loop transcription of Caffe's ``col2im_cpu``: the (C, H, W) image ``shape`` to which every
    column entry is added back where it was read from."""
    img = np.zeros(tuple(shape), col.dtype)
    for row, column, c, y, xx in _taps(shape, kernel, pad, stride, dilation):
        img[c, y, xx] += col[row, column]
    return img


# ---------------------------------------------------------------------------------------------
# fork layers (tests/test_layers_forks.py): loops after each fork's CPU code
# ---------------------------------------------------------------------------------------------

def naive_shuffle_channel(x, group):
    """farmingyard/ShuffleNet: top channel ``j * group + i`` is bottom channel ``i * k + j``."""
    y = np.empty_like(x)
    k = x.shape[1] // group
    for i in range(group):
        for j in range(k):
            y[:, j * group + i] = x[:, i * k + j]
    return y


def naive_upsample(x, scale):
    """brocolli-caffe's Upsample loops (NCHW: both spatial axes; NCW: the last)."""
    if x.ndim == 3:
        n, c, w = x.shape
        y = np.empty((n, c, w * scale), x.dtype)
        for q in range(w * scale):
            y[:, :, q] = x[:, :, q // scale]
        return y
    n, c, h, w = x.shape
    y = np.empty((n, c, h * scale, w * scale), x.dtype)
    for r in range(h * scale):
        for q in range(w * scale):
            y[:, :, r, q] = x[:, :, r // scale, q // scale]
    return y


def naive_interp(x, out_h, out_w, pad_beg=0, pad_end=0):
    """PSPNet's caffe_cpu_interp2 (float32 arithmetic, aligned corners) after the crop."""
    f = np.float32
    x = x[:, :, -pad_beg:x.shape[2] + pad_end, -pad_beg:x.shape[3] + pad_end]
    h1, w1 = x.shape[2:]
    rh = f(h1 - 1) / f(out_h - 1) if out_h > 1 else f(0)
    rw = f(w1 - 1) / f(out_w - 1) if out_w > 1 else f(0)
    y = np.empty(x.shape[:2] + (out_h, out_w), f)
    for r in range(out_h):
        hr = f(rh * f(r))
        h = int(hr)
        hp = 1 if h < h1 - 1 else 0
        l1 = f(hr - f(h))
        l0 = f(1) - l1
        for q in range(out_w):
            wr = f(rw * f(q))
            w = int(wr)
            wp = 1 if w < w1 - 1 else 0
            m1 = f(wr - f(w))
            m0 = f(1) - m1
            y[:, :, r, q] = (l0 * (m0 * x[:, :, h, w] + m1 * x[:, :, h, w + wp])
                             + l1 * (m0 * x[:, :, h + hp, w] + m1 * x[:, :, h + hp, w + wp]))
    return y


def naive_normalize(x, scale, across, shared, eps):
    """SSD's NormalizeLayer::Forward_cpu, element by element (float64)."""
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    y = np.empty_like(flat)
    for i in range(n):
        if across:
            norm = np.sqrt(sum(v * v for v in flat[i].ravel()) + eps)
        for s in range(flat.shape[2]):
            if not across:
                norm = np.sqrt(sum(flat[i, ch, s] ** 2 for ch in range(c)) + eps)
            for ch in range(c):
                y[i, ch, s] = flat[i, ch, s] / norm * (scale[0] if shared else scale[ch])
    return y.reshape(x.shape)


def naive_prior_box(layer_hw, img_hw, min_sizes, max_sizes, ratios, clip, variance, step_hw, offset):
    """SSD's PriorBoxLayer::Forward_cpu loops; ``ratios`` already expanded (1 first)."""
    lh, lw = layer_hw
    ih, iw = img_hw
    sh, sw = step_hw if step_hw else (np.float32(ih) / np.float32(lh), np.float32(iw) / np.float32(lw))
    boxes = []
    for h in range(lh):
        for w in range(lw):
            cx = np.float32((w + np.float32(offset)) * np.float32(sw))
            cy = np.float32((h + np.float32(offset)) * np.float32(sh))
            for s, ms in enumerate(min_sizes):
                m = int(ms)
                sizes = [(m, m)]
                if max_sizes:
                    side = np.float32(np.sqrt(m * int(max_sizes[s])))
                    sizes.append((side, side))
                for ar in ratios:
                    if abs(ar - 1) < 1e-6:
                        continue
                    sizes.append((np.float32(m * np.sqrt(np.float32(ar))), np.float32(m / np.sqrt(np.float32(ar)))))
                for bw, bh in sizes:
                    boxes += [(cx - bw / 2.0) / iw, (cy - bh / 2.0) / ih, (cx + bw / 2.0) / iw, (cy + bh / 2.0) / ih]
    top = np.array(boxes, np.float32)
    if clip:
        top = np.clip(top, 0, 1)
    var = np.array([variance[k % len(variance)] for k in range(top.size)], np.float32)
    return np.stack([top, var])[None]


def _c_round(v: float) -> int:
    return int(np.sign(v) * np.floor(abs(v) + 0.5))


def naive_roi_pool(x, rois, pooled_h, pooled_w, scale):
    """caffe-fast-rcnn's ROIPoolingLayer::Forward_cpu loops; returns (top, argmax)."""
    f = np.float32
    n, c, height, width = x.shape
    top = np.zeros((len(rois), c, pooled_h, pooled_w), np.float32)
    arg = -np.ones(top.shape, np.int64)
    for r, roi in enumerate(np.asarray(rois, np.float32)):
        b = int(roi[0])
        sw, sh, ew, eh = (_c_round(float(f(v) * f(scale))) for v in roi[1:5])
        bh = f(max(eh - sh + 1, 1)) / f(pooled_h)
        bw = f(max(ew - sw + 1, 1)) / f(pooled_w)
        for ch in range(c):
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    hs = min(max(int(np.floor(f(ph) * bh)) + sh, 0), height)
                    he = min(max(int(np.ceil(f(ph + 1) * bh)) + sh, 0), height)
                    ws = min(max(int(np.floor(f(pw) * bw)) + sw, 0), width)
                    we = min(max(int(np.ceil(f(pw + 1) * bw)) + sw, 0), width)
                    if he <= hs or we <= ws:
                        continue
                    best = -np.finfo(np.float32).max
                    for h in range(hs, he):
                        for w in range(ws, we):
                            if x[b, ch, h, w] > best:
                                best = x[b, ch, h, w]
                                arg[r, ch, ph, pw] = h * width + w
                    top[r, ch, ph, pw] = best
    return top, arg


def naive_roi_pool_backward(x_shape, rois, dy, arg):
    """The fork's backward: each output's gradient goes to its maximum."""
    dx = np.zeros(x_shape)
    w = x_shape[3]
    for r, roi in enumerate(rois):
        b = int(roi[0])
        for ch in range(dy.shape[1]):
            for ph in range(dy.shape[2]):
                for pw in range(dy.shape[3]):
                    k = arg[r, ch, ph, pw]
                    if k >= 0:
                        dx[b, ch, k // w, k % w] += dy[r, ch, ph, pw]
    return dx
