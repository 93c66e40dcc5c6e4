"""Loss and evaluation layers of the numpy engine: SoftmaxWithLoss, SigmoidCrossEntropyLoss,
EuclideanLoss and Accuracy, with Caffe's exact semantics (normalisation modes, ignore_label,
label axis, Caffe's numerically stable sigmoid cross-entropy, Accuracy's tie order).

A loss layer's first top is a 0-axis blob with default loss weight 1; its backward scales the
gradient by that top's diff (the loss weight the net puts there), as Caffe does. Gradients never
flow to labels (SoftmaxWithLoss, SigmoidCrossEntropyLoss); EuclideanLoss propagates to both
bottoms, as in Caffe. Accuracy has no gradient.

Limits: SigmoidCrossEntropyLoss follows BVLC Caffe >= 1.0 (``loss_param`` normalization and
ignore_label; the default, BATCH_SIZE, equals older Caffe's division by the batch size). Label
values outside ``[0, classes)`` that are not ignored are an error (Caffe's behaviour is undefined).
"""
from __future__ import annotations

from typing import List

import numpy as np

from caffe_utils.errors import DataError
from caffe_utils.layers.base import DTYPE, Blob, Layer, register
from caffe_utils.layers.normalization import softmax
from caffe_utils.layers.structure import canonical_axis

_F = np.float32
_FLT_MIN = np.finfo(np.float32).tiny


def _count(shape, start: int = 0, end=None) -> int:
    return int(np.prod(shape[start:end], dtype=np.int64))


class LossLayer(Layer):
    """Caffe's ``LossLayer``: two bottoms (data, label), a scalar loss top with weight 1."""

    num_bottom = 2

    def loss_weight_default(self, top_index: int) -> float:
        return 1.0 if top_index == 0 else 0.0

    def can_propagate(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def _mode(self) -> str:
        """The normalisation mode name (``normalize`` is the legacy bool)."""
        p = self.param.loss_param
        if not p.HasField("normalization") and p.HasField("normalize"):
            return "VALID" if p.normalize else "BATCH_SIZE"
        return p.DESCRIPTOR.fields_by_name["normalization"].enum_type.values_by_number[p.normalization].name

    @staticmethod
    def normalizer(mode: str, outer: int, inner: int, valid: int) -> np.float32:
        """Caffe's ``LossLayer::GetNormalizer`` (at least 1)."""
        if mode == "FULL":
            n = outer * inner
        elif mode == "VALID":
            n = outer * inner if valid == -1 else valid
        elif mode == "BATCH_SIZE":
            n = outer
        else:  # NONE
            n = 1
        return max(_F(1), _F(n))

    def _check_batch(self, bottom: List[Blob]) -> None:
        s0, s1 = bottom[0].shape, bottom[1].shape
        if not s0 or not s1 or s0[0] != s1[0]:
            raise self.error(f"data {s0} and label {s1} must have the same first dimension")

    def _ignore(self):
        p = self.param.loss_param
        return int(p.ignore_label) if p.HasField("ignore_label") else None

    @staticmethod
    def _weight(top: List[Blob]) -> np.float32:
        return _F(top[0].diff.reshape(-1)[0])


def _labels(layer: Layer, label: np.ndarray, classes: int, ignore) -> tuple:
    """Integer labels (truncated like ``static_cast<int>``) and the mask of counted ones."""
    lab = label.astype(np.int64)
    valid = np.ones(lab.shape, bool) if ignore is None else lab != ignore
    bad = valid & ((lab < 0) | (lab >= classes))
    if bad.any():
        v = int(lab[bad][0])
        raise DataError(f"layer '{layer.name}' ({layer.type}): label value {v} is outside [0, {classes})"
                        + ("" if ignore is None else f" and is not the ignore_label {ignore}"))
    return lab, valid


@register
class SoftmaxWithLoss(LossLayer):
    type = "SoftmaxWithLoss"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        if len(top) not in (1, 2):
            raise self.error(f"needs 1 or 2 tops (loss, and optionally the probabilities), has {len(top)}")
        self.mode = self._mode()
        self.ignore = self._ignore()

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        self._check_batch(bottom)
        shape = bottom[0].shape
        self.axis = canonical_axis(self, self.param.softmax_param.axis, len(shape))
        self.outer = _count(shape, 0, self.axis)
        self.inner = _count(shape, self.axis + 1)
        if self.outer * self.inner != bottom[1].count:
            raise self.error(f"number of labels ({bottom[1].count}) must match number of predictions "
                             f"({self.outer * self.inner}) for data {shape} with softmax axis {self.axis}")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape(shape)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        c = x.shape[self.axis]
        self.prob = prob = softmax(x, self.axis)
        lab, valid = _labels(self, bottom[1].data.reshape(self.outer, self.inner), c, self.ignore)
        self.lab, self.valid = lab, valid
        p3 = prob.reshape(self.outer, c, self.inner)
        picked = np.take_along_axis(p3, np.where(valid, lab, 0)[:, None, :], axis=1)[:, 0, :]
        logs = np.log(np.maximum(picked[valid], _F(_FLT_MIN)))
        loss = -np.sum(logs, dtype=DTYPE)
        self.count = int(valid.sum())
        norm = self.normalizer(self.mode, self.outer, self.inner, self.count)
        top[0].data[...] = _F(loss) / norm
        if len(top) > 1:
            top[1].data = prob  # Caffe: ShareData with prob_

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if len(propagate_down) > 1 and propagate_down[1]:
            raise RuntimeError(f"layer '{self.name}' (SoftmaxWithLoss) cannot backpropagate to label inputs")
        if not propagate_down[0]:
            return
        c = bottom[0].shape[self.axis]
        g = self.prob.reshape(self.outer, c, self.inner).copy()
        o, i = np.nonzero(self.valid)
        g[o, self.lab[o, i], i] -= _F(1)
        if not self.valid.all():
            g *= self.valid[:, None, :]
        norm = self.normalizer(self.mode, self.outer, self.inner, self.count)
        g *= self._weight(top) / norm
        bottom[0].diff += g.reshape(bottom[0].shape)


@register
class SigmoidCrossEntropyLoss(LossLayer):
    type = "SigmoidCrossEntropyLoss"
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.loss_param
        if p.HasField("normalization"):
            self.mode = self._mode()
        elif p.HasField("normalize"):
            self.mode = "VALID" if p.normalize else "BATCH_SIZE"
        else:
            self.mode = "BATCH_SIZE"
        self.ignore = self._ignore()

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        self._check_batch(bottom)
        if bottom[0].count != bottom[1].count:
            raise self.error(f"inputs must have the same count: {bottom[0].shape} vs {bottom[1].shape}")
        self.outer = bottom[0].shape[0]
        self.inner = bottom[0].count // self.outer if self.outer else 0
        top[0].reshape(())

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data.reshape(-1)
        t = bottom[1].data.reshape(-1)
        pos = (x >= 0).astype(DTYPE)
        with np.errstate(over="ignore"):
            self.sig = _F(1) / (_F(1) + np.exp(-x))
            terms = x * (t - pos) - np.log(_F(1) + np.exp(x - _F(2) * x * pos))
        if self.ignore is not None:
            self.valid = t.astype(np.int64) != self.ignore
            terms = terms[self.valid]
            self.count = int(self.valid.sum())
        else:
            self.valid = None
            self.count = x.size
        loss = -np.sum(terms, dtype=DTYPE)
        top[0].data[...] = _F(loss) / self.normalizer(self.mode, self.outer, self.inner, self.count)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if len(propagate_down) > 1 and propagate_down[1]:
            raise RuntimeError(f"layer '{self.name}' (SigmoidCrossEntropyLoss) cannot backpropagate to "
                               "label inputs")
        if not propagate_down[0]:
            return
        g = self.sig - bottom[1].data.reshape(-1)
        if self.valid is not None:
            g *= self.valid
        g *= self._weight(top) / self.normalizer(self.mode, self.outer, self.inner, self.count)
        bottom[0].diff += g.reshape(bottom[0].shape)


@register
class EuclideanLoss(LossLayer):
    """``sum((a - b)^2) / (2 N)``; propagates to both bottoms."""

    type = "EuclideanLoss"
    num_top = 1

    def can_propagate(self, bottom_index: int) -> bool:
        return True

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        self._check_batch(bottom)
        if _count(bottom[0].shape, 1) != _count(bottom[1].shape, 1):
            raise self.error(f"inputs must have the same dimension: {bottom[0].shape} vs {bottom[1].shape}")
        top[0].reshape(())

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        self.d = (bottom[0].data.reshape(-1) - bottom[1].data.reshape(-1))
        dot = _F(np.dot(self.d, self.d))
        top[0].data[...] = dot / _F(bottom[0].shape[0]) / _F(2)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        w = self._weight(top)
        for i, sign in ((0, _F(1)), (1, _F(-1))):
            if propagate_down[i]:
                alpha = sign * w / _F(bottom[i].shape[0])
                bottom[i].diff += (alpha * self.d).reshape(bottom[i].shape)


@register
class Accuracy(Layer):
    """Top-k accuracy (and per-class accuracy as optional second top); no gradient.

    As Caffe's ``partial_sort`` on (value, index) pairs with ``std::greater``, a score tied with
    the label's counts ahead of it when its class index is larger.
    """

    type = "Accuracy"
    num_bottom = 2

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        if len(top) not in (1, 2):
            raise self.error(f"needs 1 or 2 tops, has {len(top)}")
        p = self.param.accuracy_param
        self.top_k = int(p.top_k)
        self.ignore = int(p.ignore_label) if p.HasField("ignore_label") else None

    def can_propagate(self, bottom_index: int) -> bool:
        return False

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if bottom[1].count == 0 or self.top_k > bottom[0].count // bottom[1].count:
            raise self.error(f"top_k ({self.top_k}) must be at most the number of classes")
        self.axis = canonical_axis(self, self.param.accuracy_param.axis, len(shape))
        self.outer = _count(shape, 0, self.axis)
        self.inner = _count(shape, self.axis + 1)
        if self.outer * self.inner != bottom[1].count:
            raise self.error(f"number of labels ({bottom[1].count}) must match number of predictions "
                             f"({self.outer * self.inner}) for data {shape} with label axis {self.axis}")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((shape[self.axis],))

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        c = bottom[0].shape[self.axis]
        x = bottom[0].data.reshape(self.outer, c, self.inner)
        lab, valid = _labels(self, bottom[1].data.reshape(self.outer, self.inner), c, self.ignore)
        safe = np.where(valid, lab, 0)
        score = np.take_along_axis(x, safe[:, None, :], axis=1)  # (outer, 1, inner)
        ks = np.arange(c).reshape(1, c, 1)
        ahead = (x > score) | ((x == score) & (ks > safe[:, None, :]))
        hit = (ahead.sum(axis=1) < self.top_k) & valid
        count = int(valid.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            top[0].data[...] = _F(hit.sum()) / _F(count)
        if len(top) > 1:
            totals = np.bincount(lab[valid], minlength=c).astype(DTYPE)
            hits = np.bincount(lab[hit], minlength=c).astype(DTYPE)
            with np.errstate(invalid="ignore", divide="ignore"):
                top[1].data[...] = np.where(totals == 0, _F(0), hits / np.maximum(totals, _F(1)))

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        pass  # Caffe: NOT_IMPLEMENTED, and never asked (no gradient flows)
