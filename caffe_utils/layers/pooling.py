"""Pooling layer of the numpy engine, with Caffe's CPU semantics (BVLC ``pooling_layer.cpp``).

MAX and AVE pooling with Caffe's output size rule (the last window must start inside the image
when there is padding), AVE's divisor counting padded positions (window clipped to the padded
image), MAX's first maximum in scan order (strict ``>`` from ``-FLT_MAX``) and the optional mask
top. The AVE helpers (:func:`pooled_size`, :func:`ave_pool_forward`, :func:`ave_pool_backward`)
are also the pieces of LRN's WITHIN_CHANNEL mode. Backward adds into bottom diffs (see
:mod:`.base`).

Limits (each raises a clear error): STOCHASTIC pooling is not implemented (Caffe's CPU build has
none either). Pooling reads ``round_mode`` (BVLC) or ``ceil_mode`` (forks such as the one pycaffe
may come from), whichever the net sets.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from caffe_utils.layers.base import DTYPE, Blob, Layer, register

FLT_MAX = float(np.finfo(np.float32).max)


def pooled_size(size: int, kernel: int, pad: int, stride: int, ceil_mode: bool = True) -> int:
    """Caffe's pooled output size, including the rule that with padding the last window
    must start inside the image (padding included on the left only)."""
    num = size + 2 * pad - kernel
    q = -((-num) // stride) if ceil_mode else num // stride
    out = q + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _window_slices(k: int, stride: int, out: int):
    return [slice(i, i + stride * (out - 1) + 1, stride) for i in range(k)]


def _pad_plane(x: np.ndarray, pad: Tuple[int, int], need: Tuple[int, int], value: float) -> np.ndarray:
    """``x`` (N, C, H, W) padded by ``pad`` before and up to ``need`` rows/cols in all."""
    (ph, pw), (nh, nw) = pad, need
    N, C, H, W = x.shape
    Hp, Wp = max(nh, ph + H), max(nw, pw + W)
    if ph == 0 and pw == 0 and Hp == H and Wp == W:
        return x
    out = np.full((N, C, Hp, Wp), value, x.dtype)
    out[:, :, ph:ph + H, pw:pw + W] = x
    return out


def ave_divisor(size: int, kernel: int, pad: int, stride: int, out: int) -> np.ndarray:
    """Caffe's per-window AVE divisor along one axis: window clipped to [-pad, size+pad)."""
    start = np.arange(out) * stride - pad
    end = np.minimum(start + kernel, size + pad)
    return (end - start).astype(np.int64)


def ave_pool_forward(x: np.ndarray, kernel, pad, stride, out) -> np.ndarray:
    """Caffe AVE pooling of (N, C, H, W): window sums (h then w order) / Caffe's pool_size."""
    (kh, kw), (ph, pw), (sh, sw), (oh, ow) = kernel, pad, stride, out
    N, C, H, W = x.shape
    xp = _pad_plane(x, (ph, pw), ((oh - 1) * sh + kh, (ow - 1) * sw + kw), 0.0)
    rows, cols = _window_slices(kh, sh, oh), _window_slices(kw, sw, ow)
    acc = np.zeros((N, C, oh, ow), DTYPE)
    for rs in rows:
        for cs in cols:
            acc += xp[:, :, rs, cs]
    div = (ave_divisor(H, kh, ph, sh, oh)[:, None] * ave_divisor(W, kw, pw, sw, ow)[None, :])
    acc /= div.astype(DTYPE)
    return acc


def ave_pool_backward(dy: np.ndarray, in_shape, kernel, pad, stride) -> np.ndarray:
    """Gradient of :func:`ave_pool_forward` w.r.t. its input (a new array)."""
    (kh, kw), (ph, pw), (sh, sw) = kernel, pad, stride
    N, C, H, W = in_shape
    oh, ow = dy.shape[2:]
    div = (ave_divisor(H, kh, ph, sh, oh)[:, None] * ave_divisor(W, kw, pw, sw, ow)[None, :])
    t = dy / div.astype(DTYPE)
    Hp, Wp = max((oh - 1) * sh + kh, ph + H), max((ow - 1) * sw + kw, pw + W)
    gp = np.zeros((N, C, Hp, Wp), DTYPE)
    for rs in _window_slices(kh, sh, oh):
        for cs in _window_slices(kw, sw, ow):
            gp[:, :, rs, cs] += t
    return gp[:, :, ph:ph + H, pw:pw + W]


@register
class Pooling(Layer):
    type = "Pooling"
    num_bottom = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        pp = self.param.pooling_param
        method = pp.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[pp.pool].name
        if method == "STOCHASTIC":
            raise self.error("STOCHASTIC pooling is not supported by the numpy engine")
        if method not in ("MAX", "AVE"):
            raise self.error(f"unknown pooling method {method}")
        self.method = method
        if not 1 <= len(top) <= (2 if method == "MAX" else 1):
            raise self.error(f"{method} pooling takes 1 top{' (or 2 with the mask)' if method == 'MAX' else ''}, "
                             f"got {len(top)}")
        self.global_pooling = bool(pp.global_pooling)
        if self.global_pooling:
            if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
                raise self.error("With Global_pooling: true Filter size cannot specified")
        else:
            has_hw = pp.HasField("kernel_h") and pp.HasField("kernel_w")
            if pp.HasField("kernel_size") == has_hw:
                raise self.error("Filter size is kernel_size OR kernel_h and kernel_w; not both")
        if not ((not pp.HasField("pad") and pp.HasField("pad_h") and pp.HasField("pad_w"))
                or (not pp.HasField("pad_h") and not pp.HasField("pad_w"))):
            raise self.error("pad is pad OR pad_h and pad_w are required.")
        if not ((not pp.HasField("stride") and pp.HasField("stride_h") and pp.HasField("stride_w"))
                or (not pp.HasField("stride_h") and not pp.HasField("stride_w"))):
            raise self.error("Stride is stride OR stride_h and stride_w are required.")
        if self.global_pooling:
            kernel = tuple(bottom[0].shape[2:4]) if len(bottom[0].shape) == 4 else (1, 1)
        elif pp.HasField("kernel_size"):
            kernel = (int(pp.kernel_size),) * 2
        else:
            kernel = (int(pp.kernel_h), int(pp.kernel_w))
        if min(kernel) <= 0:
            raise self.error("Filter dimensions cannot be zero.")
        pad = (int(pp.pad_h), int(pp.pad_w)) if pp.HasField("pad_h") else (int(pp.pad),) * 2
        stride = ((int(pp.stride_h), int(pp.stride_w)) if pp.HasField("stride_h")
                  else (int(pp.stride),) * 2)
        if min(stride) <= 0:
            raise self.error("stride must be positive")
        if self.global_pooling and (pad != (0, 0) or stride != (1, 1)):
            raise self.error("With Global_pooling: true; only pad = 0 and stride = 1")
        if (pad[0] or pad[1]) and (pad[0] >= kernel[0] or pad[1] >= kernel[1]):
            raise self.error(f"pad {pad} must be smaller than the kernel {kernel}")
        self.kernel, self.pad, self.stride = kernel, pad, stride
        self.ceil_mode = self._ceil_mode(pp)
        self._code: Optional[np.ndarray] = None

    @staticmethod
    def _ceil_mode(pp) -> bool:
        """Ceil rounding unless the net sets BVLC's ``round_mode: FLOOR`` or a fork's
        ``ceil_mode: false`` (the project's schema has both; the one set counts)."""
        fields = pp.DESCRIPTOR.fields_by_name
        if "round_mode" in fields and pp.HasField("round_mode"):
            return fields["round_mode"].enum_type.values_by_number[pp.round_mode].name == "CEIL"
        if "ceil_mode" in fields:
            return bool(pp.ceil_mode)
        return True

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"Input must have 4 axes, corresponding to (num, channels, height, width); "
                             f"got {shape}")
        if self.global_pooling:
            self.kernel = (int(shape[2]), int(shape[3]))
        oh = pooled_size(shape[2], self.kernel[0], self.pad[0], self.stride[0], self.ceil_mode)
        ow = pooled_size(shape[3], self.kernel[1], self.pad[1], self.stride[1], self.ceil_mode)
        if oh <= 0 or ow <= 0:
            raise self.error(f"output would be {oh}x{ow} for a {shape[2]}x{shape[3]} input")
        self.out = (oh, ow)
        for t in top:
            t.reshape((shape[0], shape[1], oh, ow))

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        if self.method == "AVE":
            top[0].data[...] = ave_pool_forward(x, self.kernel, self.pad, self.stride, self.out)
            return
        best, code = self._max_forward(x)
        top[0].data[...] = best
        self._code = code
        if len(top) > 1:
            top[1].data[...] = self._flat_index(code, x.shape[3])

    def _is_global(self, shape) -> bool:
        return (self.out == (1, 1) and self.pad == (0, 0)
                and self.kernel == (int(shape[2]), int(shape[3])))

    def _max_forward(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Caffe MAX pooling: values and, per output, the window offset ``i*kw + j`` of the
        first maximum in h-then-w scan order (Caffe's strict ``>`` from -FLT_MAX; -1 if none)."""
        (kh, kw), (ph, pw), (sh, sw), (oh, ow) = self.kernel, self.pad, self.stride, self.out
        N, C, H, W = x.shape
        K = kh * kw
        ctype = np.int8 if K <= 127 else (np.int16 if K <= 32767 else np.int32)
        if self._is_global(x.shape):
            flat = x.reshape(N, C, H * W)
            code = flat.argmax(axis=2)
            best = np.take_along_axis(flat, code[..., None], axis=2)[..., 0]
            none = ~(best > -FLT_MAX)
            code[none] = -1
            best = np.where(none, DTYPE(-FLT_MAX), best)
            return best.reshape(N, C, 1, 1).astype(DTYPE), code.reshape(N, C, 1, 1).astype(ctype)
        xp = _pad_plane(x, (ph, pw), ((oh - 1) * sh + kh, (ow - 1) * sw + kw), -np.inf)
        best = np.full((N, C, oh, ow), -FLT_MAX, DTYPE)
        code = np.full((N, C, oh, ow), -1, ctype)
        gt = np.empty((N, C, oh, ow), bool)
        tmp = np.empty((N, C, oh, ow), ctype)
        gt_int = gt.view(np.int8)
        for i, rs in enumerate(_window_slices(kh, sh, oh)):
            for j, cs in enumerate(_window_slices(kw, sw, ow)):
                v = xp[:, :, rs, cs]
                np.greater(v, best, out=gt)
                np.maximum(best, v, out=best)
                # offsets only grow, so "set code to kk where v > best" is a maximum
                np.multiply(gt_int, ctype(i * kw + j), out=tmp, casting="unsafe")
                np.maximum(code, tmp, out=code)
        return best, code

    def _flat_index(self, code: np.ndarray, width: int) -> np.ndarray:
        """Caffe's mask: index ``h*W + w`` of the maximum in its channel plane (-1 if none)."""
        (kh, kw), (ph, pw), (sh, sw), (oh, ow) = self.kernel, self.pad, self.stride, self.out
        c = code.astype(np.int64)
        r = np.arange(oh)[:, None] * sh - ph + c // kw
        q = np.arange(ow)[None, :] * sw - pw + c % kw
        return np.where(c < 0, -1, r * width + q)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy = top[0].diff
        shape = bottom[0].diff.shape
        if self.method == "AVE":
            bottom[0].diff += ave_pool_backward(dy, shape, self.kernel, self.pad, self.stride)
            return
        N, C, H, W = shape
        if len(top) > 1:   # as Caffe: route through the mask top
            idx = top[1].data.astype(np.int64)
            valid = idx >= 0
            plane = H * W
            offs = (np.arange(N * C, dtype=np.int64) * plane).reshape(N, C, 1, 1)
            g = np.bincount((idx + offs)[valid], weights=dy[valid], minlength=N * C * plane)
            bottom[0].diff += g.reshape(shape).astype(DTYPE)
            return
        code = getattr(self, "_code", None)
        if code is None:
            raise self.error("backward called before forward")
        (kh, kw), (ph, pw), (sh, sw), (oh, ow) = self.kernel, self.pad, self.stride, self.out
        if self._is_global(shape):
            c = code.reshape(N, C).astype(np.int64)
            g = np.zeros((N, C, H * W), DTYPE)
            ok = c >= 0
            n_idx, c_idx = np.nonzero(ok)
            g[n_idx, c_idx, c[ok]] = dy.reshape(N, C)[ok]
            bottom[0].diff += g.reshape(shape)
            return
        Hp, Wp = max((oh - 1) * sh + kh, ph + H), max((ow - 1) * sw + kw, pw + W)
        gp = np.zeros((N, C, Hp, Wp), DTYPE)
        eq = np.empty(code.shape, bool)
        tmp = np.empty(code.shape, DTYPE)
        for i, rs in enumerate(_window_slices(kh, sh, oh)):
            for j, cs in enumerate(_window_slices(kw, sw, ow)):
                np.equal(code, i * kw + j, out=eq)
                np.multiply(dy, eq, out=tmp)
                gp[:, :, rs, cs] += tmp
        bottom[0].diff += gp[:, :, ph:ph + H, pw:pw + W]
