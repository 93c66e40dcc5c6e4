"""A small, deterministic Faster R-CNN proposal layer for the tests, written against pycaffe's
Layer API only (so the numpy engine's shim runs it, and a Caffe with Python layers too).

It follows the published interface of py-faster-rcnn's ``rpn.proposal_layer.ProposalLayer``:
bottoms ``rpn_cls_prob_reshape`` (N, 2A, H, W) (background scores, then the A foreground
scores), ``rpn_bbox_pred`` (N, 4A, H, W) (dx, dy, dw, dh per anchor) and ``im_info`` (N, 3) or
(1, 3) (height, width, scale per image); ``param_str`` a dict body such as
``'feat_stride': 16`` (optional: ``'scales': [8, 16, 32]``, ``'rois_per_image': 300``). The
A = 9 anchors are Ren et al.'s: 3 aspect ratios x 3 scales (8, 16, 32 unless given) of a
16-pixel base box, centred on every feature-map cell. The deltas move the anchors, the boxes
are clipped to the image, and the ``rois_per_image`` (default 300, at most the anchor count)
best foreground scores of each image are kept, ties broken by anchor order; no NMS. Top 0 is
``rois`` (N x k, 5): batch index, x1, y1, x2, y2 in image pixels; an optional top 1 holds the
scores (N x k, 1). Like the original it passes no gradient.
"""
import ast

import numpy as np

import caffe

RATIOS = (0.5, 1.0, 2.0)
SCALES = (8.0, 16.0, 32.0)  # the paper's; param_str 'scales' may give others (small test images)
BASE = 16.0
#: the largest log-scale a delta may apply (a box at most 1000/16 times its anchor)
MAX_LOG_SCALE = float(np.log(1000.0 / 16.0))


def base_anchors(scales=SCALES) -> np.ndarray:
    """The (A, 4) anchors (x1, y1, x2, y2) around the base box's centre: for each aspect ratio
    h/w and each scale, a box of area (BASE * scale)^2."""
    centre = (BASE - 1.0) / 2.0
    boxes = []
    for ratio in RATIOS:
        for scale in scales:
            w = BASE * scale / np.sqrt(ratio)
            h = w * ratio
            boxes.append((centre - (w - 1) / 2, centre - (h - 1) / 2, centre + (w - 1) / 2, centre + (h - 1) / 2))
    return np.array(boxes, np.float64)


def shifted_anchors(height: int, width: int, stride: float, scales=SCALES) -> np.ndarray:
    """Every anchor at every cell of a (height, width) feature map, ordered (y, x, anchor)."""
    ys, xs = np.meshgrid(np.arange(height) * stride, np.arange(width) * stride, indexing="ij")
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
    return (shifts + base_anchors(scales)[None]).reshape(-1, 4)


def apply_deltas(anchors: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Anchors moved by (dx, dy, dw, dh): centre shifted by d * size, size scaled by exp(d)."""
    w = anchors[:, 2] - anchors[:, 0] + 1.0
    h = anchors[:, 3] - anchors[:, 1] + 1.0
    cx, cy = anchors[:, 0] + 0.5 * (w - 1), anchors[:, 1] + 0.5 * (h - 1)
    cx, cy = cx + deltas[:, 0] * w, cy + deltas[:, 1] * h
    w = w * np.exp(np.minimum(deltas[:, 2], MAX_LOG_SCALE))
    h = h * np.exp(np.minimum(deltas[:, 3], MAX_LOG_SCALE))
    return np.stack([cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1)], axis=1)


class ProposalLayer(caffe.Layer):
    """rois from anchors, RPN scores and deltas (see the module docstring)."""

    def setup(self, bottom, top):
        params = ast.literal_eval("{" + (self.param_str or "") + "}")
        self.stride = float(params.get("feat_stride", 16))
        self.per_image = int(params.get("rois_per_image", 300))
        self.scales = tuple(float(v) for v in params.get("scales", SCALES))
        self.anchors = len(RATIOS) * len(self.scales)
        if len(bottom) != 3 or len(top) not in (1, 2):
            raise Exception("ProposalLayer needs bottoms (scores, deltas, im_info) and tops rois [, scores]")

    def _count(self, bottom) -> int:
        _, _, h, w = bottom[0].data.shape
        return min(self.per_image, self.anchors * h * w)

    def reshape(self, bottom, top):
        n, c, h, w = bottom[0].data.shape
        if c != 2 * self.anchors or tuple(bottom[1].data.shape) != (n, 4 * self.anchors, h, w):
            raise Exception(f"ProposalLayer needs (N, {2 * self.anchors}, H, W) scores and "
                            f"(N, {4 * self.anchors}, H, W) deltas, got {bottom[0].data.shape}, {bottom[1].data.shape}")
        if bottom[2].data.shape[0] not in (1, n) or bottom[2].data.size != bottom[2].data.shape[0] * 3:
            raise Exception(f"ProposalLayer needs im_info (1, 3) or ({n}, 3), got {bottom[2].data.shape}")
        top[0].reshape(n * self._count(bottom), 5)
        if len(top) > 1:
            top[1].reshape(n * self._count(bottom), 1)

    def forward(self, bottom, top):
        n, _, h, w = bottom[0].data.shape
        k = self._count(bottom)
        anchors = shifted_anchors(h, w, self.stride, self.scales)
        info = bottom[2].data.reshape(-1, 3)
        for i in range(n):
            scores = bottom[0].data[i, self.anchors:].transpose(1, 2, 0).reshape(-1)
            deltas = bottom[1].data[i].reshape(self.anchors, 4, h, w).transpose(2, 3, 0, 1).reshape(-1, 4)
            boxes = apply_deltas(anchors, deltas.astype(np.float64))
            height, width = info[i if len(info) > 1 else 0, :2]
            boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, max(float(width) - 1, 0))
            boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, max(float(height) - 1, 0))
            best = np.argsort(-scores, kind="stable")[:k]
            top[0].data[i * k:(i + 1) * k, 0] = i
            top[0].data[i * k:(i + 1) * k, 1:] = boxes[best]
            if len(top) > 1:
                top[1].data[i * k:(i + 1) * k, 0] = scores[best]

    def backward(self, top, propagate_down, bottom):
        pass


class SingleImageProposalLayer(ProposalLayer):
    """:class:`ProposalLayer` refusing batches of several images, as py-faster-rcnn's does."""

    def reshape(self, bottom, top):
        assert bottom[0].data.shape[0] == 1, "Only single item batches are supported"
        super().reshape(bottom, top)
