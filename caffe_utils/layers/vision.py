"""Vision layers of the numpy engine: Convolution, Deconvolution, InnerProduct, Pooling, LRN.

Each follows Caffe's CPU implementation (BVLC ``*_layer.cpp``): parameter rules, shapes,
rounding, padding conventions and what backward computes. Convolutions run on many images at
once: :func:`~caffe_utils.layers.im2col.im2col_batch` builds one column matrix
``(C*kh*kw, n*outH*outW)`` for a chunk of ``n`` images (as many as fit in :data:`COL_BUDGET`
elements) and each group is one float32 matrix product; large temporaries live in reusable
scratch buffers (so the layers are not thread-safe). Backward adds into bottom and parameter
diffs, as the engine's protocol requires (Caffe overwrites bottom diffs; the net zeroes them).

Limits (each raises a clear error): convolutions are 2-D with ``axis: 1`` only (no N-d, no
``force_nd_im2col``); STOCHASTIC pooling is not implemented (Caffe's CPU build has none either).
Pooling reads ``round_mode`` (BVLC) or ``ceil_mode`` (forks such as the one pycaffe may come
from), whichever the schema in use has.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from caffe_utils.layers.base import DTYPE, Blob, Layer, register
from caffe_utils.layers.im2col import col2im_batch, conv_out_size, im2col_batch, scratch

FLT_MAX = float(np.finfo(np.float32).max)

#: largest column matrix (elements) a convolution builds at once; bigger batches go in chunks
COL_BUDGET = 1 << 25
_GEMM_CHUNK = 1 << 22  # elements of the temporary product in gemm_accumulate


def gemm_accumulate(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``c += a @ b`` in place (2-D float32), like Caffe's accumulating gemm (beta = 1).

    The product goes through a bounded reusable scratch buffer, a block of rows at a time, so
    no large temporary is allocated (and page-faulted) per call. (scipy's ``sgemm`` could
    accumulate in place, but it links a second OpenBLAS whose threads fight numpy's.)
    """
    m, n = c.shape
    if c.size == 0:
        return
    rows = max(1, min(m, _GEMM_CHUNK // max(n, 1)))
    tmp = scratch("gemm", rows * n).reshape(rows, n)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        t = tmp[:r1 - r0]
        np.matmul(a[r0:r1], b, out=t)
        c[r0:r1] += t


# --------------------------------------------------------------------------------------------
# Convolution and Deconvolution
# --------------------------------------------------------------------------------------------

class _BaseConvolution(Layer):
    """Caffe's BaseConvolutionLayer: parameter parsing, weights, batched GEMM helpers."""

    #: Deconvolution swaps the roles of input and output channels ("reverse dimensions")
    reverse = False

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        cp = self.param.convolution_param
        if len(bottom) < 1 or len(bottom) != len(top):
            raise self.error(f"needs as many tops as bottoms (at least one); has {len(bottom)} "
                             f"bottom(s) and {len(top)} top(s)")
        shape = bottom[0].shape
        axis = cp.axis if cp.axis >= 0 else cp.axis + len(shape)
        if len(shape) != 4 or axis != 1:
            raise self.error(f"only 2-D convolution of (N, C, H, W) blobs with axis 1 is supported "
                             f"(bottom shape {shape}, axis {cp.axis})")
        if cp.force_nd_im2col:
            raise self.error("force_nd_im2col is not supported (2-D im2col only)")
        # kernel
        if cp.HasField("kernel_h") or cp.HasField("kernel_w"):
            if len(cp.kernel_size):
                raise self.error("Either kernel_size or kernel_h/w should be specified; not both.")
            kernel = (int(cp.kernel_h), int(cp.kernel_w))
        else:
            kernel = self._spatial(cp.kernel_size, "kernel_size", None)
        if min(kernel) <= 0:
            raise self.error("Filter dimensions must be nonzero.")
        # stride
        if cp.HasField("stride_h") or cp.HasField("stride_w"):
            if len(cp.stride):
                raise self.error("Either stride or stride_h/w should be specified; not both.")
            stride = (int(cp.stride_h), int(cp.stride_w))
        else:
            stride = self._spatial(cp.stride, "stride", 1)
        if min(stride) <= 0:
            raise self.error("Stride dimensions must be nonzero.")
        # pad
        if cp.HasField("pad_h") or cp.HasField("pad_w"):
            if len(cp.pad):
                raise self.error("Either pad or pad_h/w should be specified; not both.")
            pad = (int(cp.pad_h), int(cp.pad_w))
        else:
            pad = self._spatial(cp.pad, "pad", 0)
        dilation = self._spatial(cp.dilation, "dilation", 1)
        if min(dilation) <= 0:
            raise self.error("Dilation dimensions must be nonzero.")
        self.kernel, self.stride, self.pad, self.dilation = kernel, stride, pad, dilation

        self.channels = int(shape[1])
        self.num_output = int(cp.num_output)
        self.group = int(cp.group)
        if self.num_output <= 0:
            raise self.error("num_output must be positive")
        if self.group <= 0 or self.channels % self.group:
            raise self.error(f"channels ({self.channels}) must be a multiple of group ({self.group})")
        if self.num_output % self.group:
            raise self.error("Number of output should be multiples of group.")
        if self.reverse:
            self.conv_out, self.conv_in = self.channels, self.num_output
        else:
            self.conv_out, self.conv_in = self.num_output, self.channels
        self.bias_term = bool(cp.bias_term)
        self.blobs = [Blob((self.conv_out, self.conv_in // self.group) + kernel)]
        if self.bias_term:
            self.blobs.append(Blob((self.num_output,)))

    def _spatial(self, values, name: str, default: Optional[int]) -> Tuple[int, int]:
        n = len(values)
        if n == 0 and default is not None:
            return (default, default)
        if n == 1:
            return (int(values[0]), int(values[0]))
        if n == 2:
            return (int(values[0]), int(values[1]))
        raise self.error(f"{name} must be specified once, or once per spatial dimension "
                         f"({name} specified {n} times; 2 spatial dims).")

    def _conv_args(self):
        return self.kernel, self.pad, self.stride, self.dilation

    def _output_hw(self, h: int, w: int) -> Tuple[int, int]:
        raise NotImplementedError

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"bottom num_axes may not change (now {shape})")
        if shape[1] != self.channels:
            raise self.error(f"Input size incompatible with convolution kernel: bottom has "
                             f"{shape[1]} channels, the layer was set up for {self.channels}")
        for b in bottom[1:]:
            if b.shape != shape:
                raise self.error(f"All inputs must have the same shape ({b.shape} vs {shape}).")
        oh, ow = self._output_hw(shape[2], shape[3])
        if oh <= 0 or ow <= 0:
            raise self.error(f"output would be {oh}x{ow} for a {shape[2]}x{shape[3]} input "
                             f"(kernel {self.kernel}, pad {self.pad}, stride {self.stride}, "
                             f"dilation {self.dilation})")
        for t in top:
            t.reshape((shape[0], self.num_output, oh, ow))

    # --- batched GEMM pieces. "conv input" is (N, conv_in, H, W), "conv output" rows are
    # (conv_out, N*oh*ow); big temporaries live in im2col's scratch buffers ("col", "out",
    # "rows", "img"), each used by one step at a time.

    def _image_chunks(self, conv_out_shape) -> List[slice]:
        """Slices of the batch whose column matrix fits in :data:`COL_BUDGET` elements
        (at least one image each). ``conv_out_shape``: shape of the convolution's output side
        (top for Convolution, bottom for Deconvolution)."""
        n = int(conv_out_shape[0])
        per_image = self.conv_in * self.kernel[0] * self.kernel[1] * \
            int(conv_out_shape[2]) * int(conv_out_shape[3])
        step = max(1, COL_BUDGET // max(per_image, 1))
        return [slice(i, min(n, i + step)) for i in range(0, n, step)]

    def _im2col(self, x: np.ndarray) -> np.ndarray:
        (kh, kw) = self.kernel
        n, c = x.shape[:2]
        oh, ow = (conv_out_size(x.shape[2], kh, self.pad[0], self.stride[0], self.dilation[0]),
                  conv_out_size(x.shape[3], kw, self.pad[1], self.stride[1], self.dilation[1]))
        return im2col_batch(x, *self._conv_args(), out=scratch("col", c * kh * kw * n * oh * ow))

    def _gemm_forward(self, x: Optional[np.ndarray], col: Optional[np.ndarray] = None) -> np.ndarray:
        """Convolution of conv-input ``x`` (or of its columns ``col``): (conv_out, N*oh*ow)."""
        G = self.group
        if col is None:
            col = self._im2col(x)
        w = self.blobs[0].data.reshape(G, self.conv_out // G, -1)
        mg, kg = w.shape[1], w.shape[2]
        out = scratch("out", self.conv_out * col.shape[1]).reshape(self.conv_out, col.shape[1])
        for g in range(G):
            np.matmul(w[g], col[g * kg:(g + 1) * kg], out=out[g * mg:(g + 1) * mg])
        return out

    def _gemm_backward_data(self, y: np.ndarray, in_shape) -> np.ndarray:
        """Transpose convolution of rows ``y`` (conv_out, N*oh*ow): conv-input shaped view."""
        G = self.group
        w = self.blobs[0].data.reshape(G, self.conv_out // G, -1)
        mg, kg = w.shape[1], w.shape[2]
        col = scratch("col", G * kg * y.shape[1]).reshape(G * kg, y.shape[1])
        for g in range(G):
            np.matmul(w[g].T, y[g * mg:(g + 1) * mg], out=col[g * kg:(g + 1) * kg])
        n, c, h, wd = in_shape
        (ph, pw) = self.pad
        size = n * c * (h + 2 * ph + self.stride[0] + self.dilation[0] * self.kernel[0]) * \
            (wd + 2 * pw + self.stride[1] + self.dilation[1] * self.kernel[1])
        return col2im_batch(col, in_shape, *self._conv_args(), out=scratch("img", size))

    def _gemm_weight(self, col: np.ndarray, y: np.ndarray) -> None:
        """Add d(weights) for conv-input columns ``col`` and conv-output gradient rows ``y``."""
        G = self.group
        wd = self.blobs[0].diff.reshape(G, self.conv_out // G, -1)
        mg, kg = wd.shape[1], wd.shape[2]
        for g in range(G):
            gemm_accumulate(wd[g], y[g * mg:(g + 1) * mg], col[g * kg:(g + 1) * kg].T)

    @staticmethod
    def _to_rows(a: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> contiguous (C, N*H*W) in the "rows" scratch buffer."""
        n, c = a.shape[:2]
        r = scratch("rows", a.size).reshape(c, n, -1)
        np.copyto(r, a.reshape(n, c, -1).transpose(1, 0, 2))
        return r.reshape(c, -1)

    @staticmethod
    def _from_rows(r: np.ndarray, shape) -> np.ndarray:
        """(C, N*H*W) -> (N, C, H, W) view."""
        n, c, h, w = shape
        return r.reshape(c, n, h, w).transpose(1, 0, 2, 3)


@register
class Convolution(_BaseConvolution):
    type = "Convolution"

    def _output_hw(self, h: int, w: int) -> Tuple[int, int]:
        (kh, kw), (ph, pw), (sh, sw), (dh, dw) = self._conv_args()
        return conv_out_size(h, kh, ph, sh, dh), conv_out_size(w, kw, pw, sw, dw)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        for b, t in zip(bottom, top):
            for s in self._image_chunks(t.data.shape):
                y = t.data[s]
                y[...] = self._from_rows(self._gemm_forward(b.data[s]), y.shape)
            if self.bias_term:
                t.data += self.blobs[1].data[None, :, None, None]

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        for i, (t, b) in enumerate(zip(top, bottom)):
            if self.bias_term:
                self.blobs[1].diff += t.diff.sum(axis=(0, 2, 3), dtype=DTYPE)
            for s in self._image_chunks(t.diff.shape):
                dy = self._to_rows(t.diff[s])
                self._gemm_weight(self._im2col(b.data[s]), dy)
                if propagate_down[i]:
                    b.diff[s] += self._gemm_backward_data(dy, b.data[s].shape)


@register
class Deconvolution(_BaseConvolution):
    type = "Deconvolution"
    reverse = True

    def _output_hw(self, h: int, w: int) -> Tuple[int, int]:
        (kh, kw), (ph, pw), (sh, sw), (dh, dw) = self._conv_args()
        return (sh * (h - 1) + dh * (kh - 1) + 1 - 2 * ph,
                sw * (w - 1) + dw * (kw - 1) + 1 - 2 * pw)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        for b, t in zip(bottom, top):
            for s in self._image_chunks(b.data.shape):
                y = t.data[s]
                y[...] = self._gemm_backward_data(self._to_rows(b.data[s]), y.shape)
            if self.bias_term:
                t.data += self.blobs[1].data[None, :, None, None]

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        for i, (t, b) in enumerate(zip(top, bottom)):
            if self.bias_term:
                self.blobs[1].diff += t.diff.sum(axis=(0, 2, 3), dtype=DTYPE)
            for s in self._image_chunks(b.data.shape):
                # the underlying convolution maps top (its input) to bottom (its output)
                col = self._im2col(t.diff[s])
                self._gemm_weight(col, self._to_rows(b.data[s]))
                if propagate_down[i]:
                    x = b.diff[s]
                    x += self._from_rows(self._gemm_forward(None, col), x.shape)


# --------------------------------------------------------------------------------------------
# InnerProduct
# --------------------------------------------------------------------------------------------

@register
class InnerProduct(Layer):
    type = "InnerProduct"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        ip = self.param.inner_product_param
        shape = bottom[0].shape
        self.axis = self._axis(shape)
        self.N = int(ip.num_output)
        if self.N <= 0:
            raise self.error("num_output must be positive")
        self.K = int(np.prod(shape[self.axis:], dtype=np.int64))
        self.bias_term = bool(ip.bias_term)
        self.transpose = bool(ip.transpose)
        self.blobs = [Blob((self.K, self.N) if self.transpose else (self.N, self.K))]
        if self.bias_term:
            self.blobs.append(Blob((self.N,)))

    def _axis(self, shape) -> int:
        a = int(self.param.inner_product_param.axis)
        n = len(shape)
        if not -n <= a < n:
            raise self.error(f"axis {a} out of range for a {n}-axis bottom {shape}")
        return a + n if a < 0 else a

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        axis = self._axis(shape)
        k = int(np.prod(shape[axis:], dtype=np.int64))
        if k != self.K:
            raise self.error(f"Input size incompatible with inner product parameters: bottom "
                             f"{shape} flattens to {k} from axis {axis}, weights expect {self.K}")
        self.axis = axis
        top[0].reshape(tuple(shape[:axis]) + (self.N,))

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data.reshape(-1, self.K)
        w = self.blobs[0].data
        y = top[0].data.reshape(-1, self.N)
        np.matmul(x, w if self.transpose else w.T, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        dy = top[0].diff.reshape(-1, self.N)
        x = bottom[0].data.reshape(-1, self.K)
        if self.transpose:
            gemm_accumulate(self.blobs[0].diff, x.T, dy)
        else:
            gemm_accumulate(self.blobs[0].diff, dy.T, x)
        if self.bias_term:
            self.blobs[1].diff += dy.sum(axis=0, dtype=DTYPE)
        if propagate_down[0]:
            w = self.blobs[0].data
            gemm_accumulate(bottom[0].diff.reshape(-1, self.K), dy, w.T if self.transpose else w)


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------

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
        fields = pp.DESCRIPTOR.fields_by_name
        if "round_mode" in fields:
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


# --------------------------------------------------------------------------------------------
# LRN
# --------------------------------------------------------------------------------------------

@register
class LRN(Layer):
    type = "LRN"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        lp = self.param.lrn_param
        self.size = int(lp.local_size)
        if self.size % 2 != 1:
            raise self.error("LRN only supports odd values for local_size")
        self.pre_pad = (self.size - 1) // 2
        self.alpha = float(lp.alpha)
        self.beta = float(lp.beta)
        self.k = float(lp.k)
        region = lp.DESCRIPTOR.fields_by_name["norm_region"].enum_type.values_by_number[lp.norm_region].name
        if region not in ("ACROSS_CHANNELS", "WITHIN_CHANNEL"):
            raise self.error(f"unknown norm_region {region}")
        self.within = region == "WITHIN_CHANNEL"
        self._cache: Optional[tuple] = None

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"Input must have 4 axes, corresponding to (num, channels, height, width); "
                             f"got {shape}")
        top[0].reshape(shape)

    # ---- ACROSS_CHANNELS: scale_c = k + alpha/size * sum_{|c'-c|<=pre_pad} x_c'^2
    def _channel_window_sum(self, a: np.ndarray, first: np.ndarray, tail_first: bool = False) -> np.ndarray:
        """Caffe's running window sum over channels: out[:, 0] = first + sum a[:, 0..pre_pad],
        then out[:, c] = out[:, c-1] + a[:, c+pre_pad] - a[:, c-pre_pad-1] (zero outside;
        the forward pass adds the head first, the backward pass subtracts the tail first)."""
        C = a.shape[1]
        p = self.pre_pad
        out = np.empty_like(a)
        cur = first.copy()
        for c in range(min(p + 1, C)):
            cur += a[:, c]
        out[:, 0] = cur
        for c in range(1, C):
            head, tail = c + p, c - p - 1
            if tail_first and tail >= 0:
                cur -= a[:, tail]
            if head < C:
                cur += a[:, head]
            if not tail_first and tail >= 0:
                cur -= a[:, tail]
            out[:, c] = cur
        return out

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        if self.within:
            self._within_forward(x, top[0])
            return
        N, C, H, W = x.shape
        sq = x * x
        sq *= DTYPE(self.alpha / self.size)
        scale = self._channel_window_sum(sq, np.full((N, H, W), self.k, DTYPE))
        top[0].data[...] = np.power(scale, DTYPE(-self.beta)) * x
        self._cache = (scale,)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        if self._cache is None:
            raise self.error("backward called before forward")
        if self.within:
            self._within_backward(top[0], bottom[0])
            return
        (scale,) = self._cache
        x = bottom[0].data
        dy, y = top[0].diff, top[0].data
        N, C, H, W = x.shape
        ratio = dy * y / scale
        accum = self._channel_window_sum(ratio, np.zeros((N, H, W), DTYPE), tail_first=True)
        g = dy * np.power(scale, DTYPE(-self.beta))
        g -= DTYPE(2.0 * self.alpha * self.beta / self.size) * x * accum
        bottom[0].diff += g

    # ---- WITHIN_CHANNEL: Caffe composes split, power(2), AVE pool(size, pad pre_pad),
    # power(shift 1, scale alpha, power -beta) and an eltwise product; k is not used.
    def _pool_args(self):
        s, p = self.size, self.pre_pad
        return (s, s), (p, p), (1, 1)

    def _within_forward(self, x: np.ndarray, top: Blob) -> None:
        N, C, H, W = x.shape
        kernel, pad, stride = self._pool_args()
        out = (pooled_size(H, kernel[0], pad[0], 1), pooled_size(W, kernel[1], pad[1], 1))
        pooled = ave_pool_forward(x * x, kernel, pad, stride, out)
        base = pooled * DTYPE(self.alpha) + DTYPE(1.0)
        power = np.power(base, DTYPE(-self.beta))
        top.data[...] = x * power
        self._cache = (pooled, base, power)

    def _within_backward(self, top: Blob, bottom: Blob) -> None:
        pooled, base, power = self._cache
        x = bottom.data
        dy = top.diff
        diff_scale = DTYPE(-self.beta * self.alpha)
        d_power = dy * x                        # product layer, w.r.t. the power output
        if diff_scale == 0:
            d_pooled = np.zeros_like(pooled)
        elif -self.beta == 1.0:
            d_pooled = d_power * diff_scale
        else:                                   # Caffe: diff_scale * y / (shift + scale * x)
            d_pooled = (power / base) * diff_scale * d_power
        d_sq = ave_pool_backward(d_pooled, x.shape, *self._pool_args())
        g = dy * power                          # product layer, w.r.t. the input
        g += DTYPE(2.0) * x * d_sq              # square layer
        bottom.diff += g


def conv_geometry(cp) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """Caffe's 2-D kernel, pad, stride, dilation from a ConvolutionParameter."""
    def pick(rep, h_field, w_field, default):
        if cp.HasField(h_field) or cp.HasField(w_field):
            return (getattr(cp, h_field), getattr(cp, w_field))
        vals = list(rep)
        if not vals:
            return (default, default)
        return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])
    kernel = pick(cp.kernel_size, "kernel_h", "kernel_w", 0)
    pad = pick(cp.pad, "pad_h", "pad_w", 0)
    stride = pick(cp.stride, "stride_h", "stride_w", 1)
    dil = list(cp.dilation)
    dilation = (1, 1) if not dil else ((dil[0], dil[0]) if len(dil) == 1 else (dil[0], dil[1]))
    return kernel, pad, stride, dilation
