"""Detection layers of the numpy engine: SSD's PriorBox and Faster R-CNN's ROIPooling.

* PriorBox (weiliu89/caffe, branch ssd): the default boxes of a feature map, which depend only
  on the shapes of its two bottoms (the feature map and the image), so the top's first axis is 1
  whatever the batch. Channel 0 holds ``(xmin, ymin, xmax, ymax)`` per position and prior
  (for each ``min_size``: the square of side ``min_size``, then the square of side
  ``sqrt(min_size * max_size)``, then one box per aspect ratio other than 1), channel 1 the
  variances. As in SSD the sizes are truncated to integers, centres are float32 and the box
  edges are computed in double before the float32 store. Forward only: nothing flows back.
  OpenCV's extensions (``width``/``height``/``offset_h``/``offset_w``) are refused.
* ROIPooling (rbgirshick/caffe-fast-rcnn): max pooling of each region of interest (second
  bottom, rows ``(batch index, x1, y1, x2, y2)`` in image coordinates) into ``pooled_h x
  pooled_w`` bins, with Caffe's float32 rounding (``round`` half away from zero, floor/ceil bin
  edges), empty bins giving 0 and the first maximum in scan order winning. Backward (the fork's
  GPU kernel; its CPU backward is not implemented) sends each output's gradient to its maximum;
  the rois get none.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from caffe_utils.layers.base import DTYPE, Blob, Layer, register
from caffe_utils.layers.forks import fork_param

FLT_MAX = float(np.finfo(np.float32).max)
_F = np.float32


def prior_aspect_ratios(ratios, flip: bool) -> List[float]:
    """SSD's aspect ratios: 1, then each new ratio (and its inverse with ``flip``)."""
    out = [1.0]
    for ar in ratios:
        ar = float(_F(ar))
        if any(abs(ar - a) < 1e-6 for a in out):
            continue
        out.append(ar)
        if flip:
            out.append(float(_F(1.0) / _F(ar)))
    return out


def _pick_pair(p, single: str, h: str, w: str, default: float, what: str) -> Tuple[float, float]:
    """(h, w) from ``<h>``/``<w>`` or ``<single>`` (not both), each positive; else the default."""
    if p.HasField(h) or p.HasField(w):
        if p.HasField(single):
            raise ValueError(f"Either {single} or {h}/{w} should be specified; not both.")
        vh, vw = float(getattr(p, h)), float(getattr(p, w))
    elif p.HasField(single):
        vh = vw = float(getattr(p, single))
    else:
        return default, default
    if vh <= 0 or vw <= 0:
        raise ValueError(f"{what} should be larger than 0.")
    return vh, vw


@register
class PriorBox(Layer):
    type = "PriorBox"
    num_bottom = 2
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = fork_param(self, "prior_box_param")
        fields = p.DESCRIPTOR.fields_by_name
        extra = [f for f in ("width", "height", "offset_h", "offset_w") if f in fields and len(getattr(p, f))]
        if extra:
            raise self.error(f"OpenCV's prior_box_param {', '.join(extra)} are not supported (SSD's PriorBox)")
        if not len(p.min_size) or min(p.min_size) <= 0:
            raise self.error("must provide min_size, each positive")
        self.min_sizes = [float(v) for v in p.min_size]
        self.max_sizes = [float(v) for v in p.max_size]
        if self.max_sizes and (len(self.max_sizes) != len(self.min_sizes)
                               or any(a <= b for a, b in zip(self.max_sizes, self.min_sizes))):
            raise self.error("max_size needs one value per min_size, each greater than it")
        self.ratios = prior_aspect_ratios(p.aspect_ratio, bool(p.flip))
        self.num_priors = len(self.ratios) * len(self.min_sizes) + len(self.max_sizes)
        var = [float(v) for v in p.variance] or [0.1]
        if len(var) not in (1, 4) or min(var) <= 0:
            raise self.error(f"variance must be 1 or 4 positive values, got {var}")
        self.variance, self.clip, self.offset = var, bool(p.clip), float(_F(p.offset))
        try:
            self.img = _pick_pair(p, "img_size", "img_h", "img_w", 0.0, "img_h/img_w")
            self.step = _pick_pair(p, "step", "step_h", "step_w", 0.0, "step_h/step_w")
        except ValueError as exc:
            raise self.error(str(exc)) from None

    def can_propagate(self, bottom_index: int) -> bool:
        return False

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4 or len(bottom[1].shape) != 4:
            raise self.error(f"needs two 4-axis bottoms, got {shape} and {bottom[1].shape}")
        top[0].reshape((1, 2, shape[2] * shape[3] * self.num_priors * 4))

    def _sizes(self) -> List[Tuple[float, float]]:
        """(width, height) of each prior at one position, in SSD's order (float32 values)."""
        out = []
        for s, ms in enumerate(self.min_sizes):
            m = int(ms)
            out.append((float(m), float(m)))
            if self.max_sizes:
                side = float(_F(np.sqrt(float(m * int(self.max_sizes[s])))))
                out.append((side, side))
            for ar in self.ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                r = _F(np.sqrt(_F(ar)))
                out.append((float(_F(m) * r), float(_F(m) / r)))
        return out

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        lh, lw = bottom[0].shape[2:]
        ih, iw = self.img if self.img[0] and self.img[1] else (float(bottom[1].shape[2]), float(bottom[1].shape[3]))
        if self.step[0] and self.step[1]:
            sh, sw = _F(self.step[0]), _F(self.step[1])
        else:
            sh, sw = _F(ih) / _F(lh), _F(iw) / _F(lw)
        cy = ((np.arange(lh, dtype=_F) + _F(self.offset)) * sh).astype(np.float64)
        cx = ((np.arange(lw, dtype=_F) + _F(self.offset)) * sw).astype(np.float64)
        sizes = np.array(self._sizes(), np.float64)                      # (P, 2)
        half_w, half_h = sizes[:, 0] / 2.0, sizes[:, 1] / 2.0
        boxes = np.empty((lh, lw, len(sizes), 4), np.float64)
        boxes[..., 0] = (cx[None, :, None] - half_w) / iw
        boxes[..., 1] = (cy[:, None, None] - half_h) / ih
        boxes[..., 2] = (cx[None, :, None] + half_w) / iw
        boxes[..., 3] = (cy[:, None, None] + half_h) / ih
        out = boxes.astype(_F).reshape(-1)
        if self.clip:
            out = np.minimum(np.maximum(out, _F(0)), _F(1))
        top[0].data[0, 0] = out
        top[0].data[0, 1] = np.resize(np.array(self.variance, _F), out.size)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        """Nothing flows back: the priors depend only on shapes."""


def c_round(x: np.ndarray) -> np.ndarray:
    """C's ``round`` (half away from zero) of float32 values, as int64."""
    x = np.asarray(x, np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def roi_bins(roi: np.ndarray, scale: float, pooled: Tuple[int, int], size: Tuple[int, int]):
    """Caffe's bin edges of one roi row: ``(hstart, hend, wstart, wend)`` int arrays (ph / pw)."""
    x1, y1, x2, y2 = c_round(np.asarray(roi[1:5], _F) * _F(scale))
    out = []
    for (start, end, n, limit) in ((y1, y2, pooled[0], size[0]), (x1, x2, pooled[1], size[1])):
        extent = max(int(end - start + 1), 1)
        bin_size = _F(extent) / _F(n)
        p = np.arange(n, dtype=_F)
        lo = np.floor(p * bin_size).astype(np.int64)
        hi = np.ceil((p + _F(1)) * bin_size).astype(np.int64)
        out += [np.clip(lo + start, 0, limit), np.clip(hi + start, 0, limit)]
    return out[0], out[1], out[2], out[3]


@register
class ROIPooling(Layer):
    type = "ROIPooling"
    num_bottom = 2
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = fork_param(self, "roi_pooling_param")
        if p.pooled_h <= 0 or p.pooled_w <= 0:
            raise self.error("pooled_h and pooled_w must be > 0")
        self.pooled = (int(p.pooled_h), int(p.pooled_w))
        self.scale = float(_F(p.spatial_scale))

    def can_propagate(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape, rshape = bottom[0].shape, bottom[1].shape
        if len(shape) != 4 or len(rshape) < 2 or int(np.prod(rshape[1:])) != 5:
            raise self.error(f"needs (N, C, H, W) features and (R, 5) rois, got {shape} and {rshape}")
        top[0].reshape((rshape[0], shape[1]) + self.pooled)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        n, c, h, w = x.shape
        rois = bottom[1].data.reshape(-1, 5)
        y = top[0].data
        arg = np.full(y.shape, -1, np.int64)
        for r, roi in enumerate(rois):
            b = int(roi[0])
            if not 0 <= b < n:
                raise self.error(f"roi {r} has batch index {roi[0]}, outside [0, {n})")
            hs, he, ws, we = roi_bins(roi, self.scale, self.pooled, (h, w))
            for i in range(self.pooled[0]):
                for j in range(self.pooled[1]):
                    y[r, :, i, j], arg[r, :, i, j] = self._bin_max(x[b], hs[i], he[i], ws[j], we[j], w)
        self._arg = arg

    @staticmethod
    def _bin_max(plane: np.ndarray, h0: int, h1: int, w0: int, w1: int, width: int):
        """Max over one bin of every channel and its index ``h * width + w`` (first in scan
        order, strictly above -FLT_MAX); an empty bin gives 0 and -1."""
        c = plane.shape[0]
        if h1 <= h0 or w1 <= w0:
            return np.zeros(c, DTYPE), np.full(c, -1, np.int64)
        win = plane[:, h0:h1, w0:w1].reshape(c, -1)
        k = win.argmax(axis=1)
        best = win[np.arange(c), k]
        idx = (h0 + k // (w1 - w0)) * width + w0 + k % (w1 - w0)
        none = ~(best > -FLT_MAX)
        return np.where(none, DTYPE(-FLT_MAX), best), np.where(none, -1, idx)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        n, c, h, w = bottom[0].shape
        arg = getattr(self, "_arg", None)
        if arg is None:
            raise self.error("backward called before forward")
        batch = bottom[1].data.reshape(-1, 5)[:, 0].astype(np.int64)
        plane = (batch[:, None] * c + np.arange(c)[None, :]) * (h * w)      # (R, C)
        flat = arg + plane[:, :, None, None]
        ok = arg >= 0
        g = np.bincount(flat[ok], weights=top[0].diff[ok], minlength=n * c * h * w)
        bottom[0].diff += g.reshape(bottom[0].shape).astype(DTYPE)
