"""Vision layers of the numpy engine: Convolution (and the depthwise forks' names for it),
Deconvolution, InnerProduct.

Each follows Caffe's CPU implementation (BVLC ``*_layer.cpp``): parameter rules, shapes,
rounding, padding conventions and what backward computes. Convolutions run on many images at
once, by one of three kernels (:attr:`Convolution.path`):

* 1x1 kernels without padding and depthwise convolutions (one input channel per group) need no
  column matrix: :mod:`.conv_kernels` runs them as GEMMs on the input planes and as a direct
  stencil;
* everything else (and Deconvolution): :func:`~caffe_utils.layers.im2col.im2col_batch` builds
  one column matrix ``(C*kh*kw, n*outH*outW)`` for a chunk of ``n`` images (as many as fit in
  :data:`COL_BUDGET` elements) and all groups are one stacked float32 matrix product.

Large temporaries live in reusable scratch buffers (so the layers are not thread-safe).
Backward adds into bottom and parameter diffs, as the engine's protocol requires (Caffe
overwrites bottom diffs; the net zeroes them). :func:`conv_geometry` reads a
ConvolutionParameter's 2-D kernel, pad, stride and dilation the way Caffe does, for this module
and for the initialization.

Pooling is in :mod:`.pooling`, LRN in :mod:`.normalization`.

Limits (each raises a clear error): convolutions are 2-D with ``axis: 1`` only (no N-d, no
``force_nd_im2col``).
"""
from __future__ import annotations

import threading
from typing import List, Optional, Tuple

import numpy as np

from caffe_utils.layers.base import DTYPE, Blob, Layer, register
from caffe_utils.layers.blas import matmul_cols, matmul_groups, matmul_nt_long, one_blas_thread
from caffe_utils.layers.conv_kernels import (depthwise_backward, depthwise_forward, is_depthwise,
                                             is_pointwise, pointwise_backward, pointwise_forward)
from caffe_utils.layers.im2col import col2im_batch, conv_out_size, im2col_batch, parallel, scratch

#: largest column matrix (elements) a convolution builds at once; bigger batches go in chunks
COL_BUDGET = 1 << 24
_GEMM_CHUNK = 1 << 21  # elements of the temporary product in gemm_accumulate


def gemm_accumulate(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``c += a @ b`` in place (2-D float32), like Caffe's accumulating gemm (beta = 1).

    The product goes through bounded reusable scratch buffers, a block of rows at a time, so
    no large temporary is allocated (and page-faulted) per call; the blocks go to threads with
    one BLAS thread each (InnerProduct's weight gradient, the one user, is a product of small
    inner dimension whose cost is writing ``c``). (scipy's ``sgemm`` could accumulate in place,
    but it links a second OpenBLAS whose threads fight numpy's.)
    """
    m, n = c.shape
    if c.size == 0:
        return
    rows = max(1, min(m, _GEMM_CHUNK // max(n, 1)))
    starts = list(range(0, m, rows))

    def work(part: slice) -> None:
        tmp = scratch(f"gemm-{threading.current_thread().name}", rows * n).reshape(rows, n)
        for r0 in starts[part]:
            r1 = min(m, r0 + rows)
            t = tmp[:r1 - r0]
            np.matmul(a[r0:r1], b, out=t)
            c[r0:r1] += t

    if len(starts) == 1:
        work(slice(0, 1))
        return
    with one_blas_thread():
        parallel(work, len(starts), c.size)


# --------------------------------------------------------------------------------------------
# Convolution and Deconvolution
# --------------------------------------------------------------------------------------------

Pair = Tuple[int, int]


def _has_hw(cp, hw_prefix: Optional[str]) -> bool:
    """Whether ``<hw_prefix>_h`` or ``<hw_prefix>_w`` is set (dilation has no such fields: None)."""
    return hw_prefix is not None and (cp.HasField(f"{hw_prefix}_h") or cp.HasField(f"{hw_prefix}_w"))


def conv_geometry(cp) -> Tuple[Pair, Pair, Pair, Pair]:
    """Caffe's 2-D geometry of a ConvolutionParameter: ``((kernel_h, kernel_w), (pad_h, pad_w),
    (stride_h, stride_w), (dilation_h, dilation_w))``.

    Each comes from ``<field>_h``/``<field>_w`` when either is set, else from the repeated field
    (one value for both axes, or one per axis), else the default: kernel 0, pad 0, stride 1,
    dilation 1. It does not validate (a field given both ways, more than two values, a zero
    kernel): :class:`Convolution` refuses those when it is set up, with Caffe's messages.
    """
    def pick(values, hw_prefix: Optional[str], default: int) -> Pair:
        if _has_hw(cp, hw_prefix):
            return (int(getattr(cp, f"{hw_prefix}_h")), int(getattr(cp, f"{hw_prefix}_w")))
        vals = [int(v) for v in values]
        if not vals:
            return (default, default)
        return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])

    return (pick(cp.kernel_size, "kernel", 0), pick(cp.pad, "pad", 0), pick(cp.stride, "stride", 1),
            pick(cp.dilation, None, 1))


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
        kernel, pad, stride, dilation = conv_geometry(cp)
        self._check_spatial(cp, cp.kernel_size, "kernel_size", "kernel", required=True)
        if min(kernel) <= 0:
            raise self.error("Filter dimensions must be nonzero.")
        self._check_spatial(cp, cp.stride, "stride", "stride")
        if min(stride) <= 0:
            raise self.error("Stride dimensions must be nonzero.")
        self._check_spatial(cp, cp.pad, "pad", "pad")
        self._check_spatial(cp, cp.dilation, "dilation", None)
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

    def _check_spatial(self, cp, values, name: str, hw_prefix: Optional[str], required: bool = False) -> None:
        """Caffe's rules for one geometry field (the values themselves come from
        :func:`conv_geometry`): ``<prefix>_h``/``_w`` or the repeated field, not both; the
        repeated field once or once per spatial axis (or not at all, unless ``required``)."""
        if _has_hw(cp, hw_prefix):
            if len(values):
                raise self.error(f"Either {name} or {hw_prefix}_h/w should be specified; not both.")
            return
        n = len(values)
        if n > 2 or (n == 0 and required):
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
        """Slices of the batch whose column matrix and GEMM output each fit in
        :data:`COL_BUDGET` elements (at least one image each). ``conv_out_shape``: shape of
        the convolution's output side (top for Convolution, bottom for Deconvolution)."""
        n = int(conv_out_shape[0])
        rows = max(self.conv_in * self.kernel[0] * self.kernel[1], self.conv_out)
        per_image = rows * int(conv_out_shape[2]) * int(conv_out_shape[3])
        step = max(1, COL_BUDGET // max(per_image, 1))
        step = -(-n // -(-n // step)) if n else step  # as many chunks, of even sizes
        return [slice(i, min(n, i + step)) for i in range(0, n, step)]

    def _im2col(self, x: np.ndarray) -> np.ndarray:
        (kh, kw) = self.kernel
        n, c = x.shape[:2]
        oh, ow = (conv_out_size(x.shape[2], kh, self.pad[0], self.stride[0], self.dilation[0]),
                  conv_out_size(x.shape[3], kw, self.pad[1], self.stride[1], self.dilation[1]))
        return im2col_batch(x, *self._conv_args(), out=scratch("col", c * kh * kw * n * oh * ow))

    def _gemm_forward(self, x: Optional[np.ndarray], col: Optional[np.ndarray] = None) -> np.ndarray:
        """Convolution of conv-input ``x`` (or of its columns ``col``): (conv_out, N*oh*ow).
        All groups in one call (:func:`~caffe_utils.layers.blas.matmul_groups`)."""
        G = self.group
        if col is None:
            col = self._im2col(x)
        w = self.blobs[0].data.reshape(G, self.conv_out // G, -1)
        out = scratch("out", self.conv_out * col.shape[1]).reshape(G, w.shape[1], col.shape[1])
        matmul_groups(w, col.reshape(G, w.shape[2], -1), out)
        return out.reshape(self.conv_out, -1)

    def _gemm_backward_data(self, y: np.ndarray, in_shape) -> np.ndarray:
        """Transpose convolution of rows ``y`` (conv_out, N*oh*ow): conv-input shaped view."""
        G = self.group
        w = self.blobs[0].data.reshape(G, self.conv_out // G, -1)
        mg, kg = w.shape[1], w.shape[2]
        col = scratch("col", G * kg * y.shape[1]).reshape(G, kg, y.shape[1])
        matmul_groups(w.transpose(0, 2, 1), y.reshape(G, mg, -1), col)
        n, c, h, wd = in_shape
        (ph, pw) = self.pad
        size = n * c * (h + 2 * ph + self.stride[0] + self.dilation[0] * self.kernel[0]) * \
            (wd + 2 * pw + self.stride[1] + self.dilation[1] * self.kernel[1])
        return col2im_batch(col, in_shape, *self._conv_args(), out=scratch("img", size))

    def _gemm_weight(self, col: np.ndarray, y: np.ndarray) -> None:
        """Add d(weights) for conv-input columns ``col`` and conv-output gradient rows ``y``
        (a long reduction per group: :func:`~caffe_utils.layers.blas.matmul_nt_long`)."""
        G = self.group
        wd = self.blobs[0].diff.reshape(G, self.conv_out // G, -1)
        mg, kg = wd.shape[1], wd.shape[2]
        t = scratch("gemm", wd.size).reshape(wd.shape)
        yg, cg = y.reshape(G, mg, -1), col.reshape(G, kg, -1)
        for g in range(G):
            matmul_nt_long(yg[g], cg[g], t[g])
        wd += t

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

    @property
    def path(self) -> str:
        """The kernel this layer runs: "depthwise" (a direct stencil, :mod:`.conv_kernels`),
        "pointwise" (1x1 without padding: GEMMs on the input planes) or "im2col"."""
        if is_depthwise(self.channels, self.group):
            return "depthwise"
        if is_pointwise(self.kernel, self.pad):
            return "pointwise"
        return "im2col"

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        w, path = self.blobs[0].data, self.path
        bias = self.blobs[1].data if self.bias_term else None
        for b, t in zip(bottom, top):
            if path == "depthwise":
                depthwise_forward(b.data, w, self._conv_args(), t.data, bias)
                continue
            for s in self._image_chunks(t.data.shape):
                if path == "pointwise":
                    pointwise_forward(b.data[s], w, self.group, self.stride, t.data[s], bias)
                    continue
                rows = self._from_rows(self._gemm_forward(b.data[s]), t.data[s].shape)
                if bias is None:
                    t.data[s] = rows
                else:
                    np.add(rows, bias[None, :, None, None], out=t.data[s])

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        w, dw, path = self.blobs[0].data, self.blobs[0].diff, self.path
        for i, (t, b) in enumerate(zip(top, bottom)):
            if self.bias_term:
                self.blobs[1].diff += t.diff.sum(axis=(0, 2, 3), dtype=DTYPE)
            dx = b.diff if propagate_down[i] else None
            if path == "depthwise":
                depthwise_backward(b.data, w, t.diff, self._conv_args(), dx, dw)
                continue
            for s in self._image_chunks(t.diff.shape):
                if path == "pointwise":
                    pointwise_backward(b.data[s], w, t.diff[s], self.group, self.stride,
                                       None if dx is None else dx[s], dw)
                    continue
                dy = self._to_rows(t.diff[s])
                self._gemm_weight(self._im2col(b.data[s]), dy)
                if dx is not None:
                    dx[s] += self._gemm_backward_data(dy, b.data[s].shape)


@register
class DepthwiseConvolution(Convolution):
    """yonghenglh6/DepthwiseConvolution: Caffe's Convolution under another name (its own kernel
    is GPU only; ``group`` is read from ``convolution_param`` as usual)."""

    type = "DepthwiseConvolution"


@register
class ConvolutionDepthwise(Convolution):
    """The MobileNet forks' ConvolutionDepthwise (``conv_dw_layer``): one ``kh x kw`` filter per
    channel, weights ``(C, 1, kh, kw)``, whatever ``group`` says. That is Convolution with
    ``group = num_output = C``; a ``num_output`` other than C (which the fork ignores, giving C
    outputs) is refused so that the net's declared shape is the computed one."""

    type = "ConvolutionDepthwise"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        super().setup(bottom, top)
        if self.num_output != self.channels:
            raise self.error(f"num_output ({self.num_output}) must equal the bottom's channels "
                             f"({self.channels}): the layer convolves each channel separately")
        self.group = self.channels
        self.blobs[0] = Blob((self.channels, 1) + self.kernel)


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
        if self.transpose:
            np.matmul(x, w, out=y)
        else:
            # (w @ x.T).T: OpenBLAS runs this orientation of the skinny product (a few images
            # against large weights) several times faster than x @ w.T
            yt = scratch("ip_out", y.size).reshape(self.N, -1)
            matmul_cols(w, x.T, yt)
            np.copyto(y, yt.T)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        dy = top[0].diff.reshape(-1, self.N)
        x = bottom[0].data.reshape(-1, self.K)
        if self.param_propagate_down(0):
            if self.transpose:
                gemm_accumulate(self.blobs[0].diff, x.T, dy)
            else:
                gemm_accumulate(self.blobs[0].diff, dy.T, x)
        if self.bias_term:
            self.blobs[1].diff += dy.sum(axis=0, dtype=DTYPE)
        if propagate_down[0]:
            w = self.blobs[0].data
            dx = bottom[0].diff.reshape(-1, self.K)
            t = scratch("ip_dx", dx.size).reshape(dx.shape)
            matmul_cols(dy, w.T if self.transpose else w, t)
            dx += t
