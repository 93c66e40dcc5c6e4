"""Scale rules: how each Caffe layer type passes a per-channel scale from its bottoms to its tops.

Stage 3 rescales affine layers and must know where each scaled channel goes. The plan builder
(:func:`caffe_utils.magic.plan.build_plan`) walks the net in order with a :class:`Trace`: every
blob has a *feature map* of scale groups (the affine layer whose scale each of its elements
carries, or ``UNSCALED``) and a *via* (which inexact layers the scale passed). A layer type's rule,
registered under its type string like the layers of :mod:`caffe_utils.layers`, sets its tops'
maps from its bottoms' and records what it does with a scale:

* homogeneous (ReLU, Pooling, Dropout, Upsample, Interp, ROIPooling, ...): the scale passes
  unchanged;
* inexact, with an effective degree (LRN, Sigmoid, TanH, ReLU6, ...): it passes as ``r^d``;
* LRN with its ``alpha`` rescaled along (the plan's ``lrn_alpha``): exact when one scale
  reaches all of its input, since ``alpha / r^2`` at input ``r x`` gives ``r`` times the output;
* channel maps (Concat, Slice, Crop, Flatten, Reshape, Permute, ShuffleChannel): channels move,
  scales with them;
* unions (Eltwise SUM/MAX): summed producers must share one scale;
* absorbing (BatchNorm with stored statistics): the scale stops there and is undone in it;
  Normalize absorbs a scale shared by all its channels without undoing anything;
* scale-free tops (PriorBox): the output depends only on shapes;
* biases (Scale, Bias): their bias is scaled along;
* pinned (losses, Softmax, ...): a scale that reaches them would change the output.

A type without a rule is pinned, and the plan names the layer (``ScalePlan.unknown``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

from caffe_utils.layers.forks import fork_message
from caffe_utils.layout import AFFINE_TYPES

UNSCALED = -1
ScaleRule = Callable[["Trace", object], None]
RULES: Dict[str, ScaleRule] = {}

TERMINAL = {"Softmax", "SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "EuclideanLoss", "Accuracy", "ArgMax",
            "Silence", "HingeLoss", "InfogainLoss", "MultinomialLogisticLoss", "ContrastiveLoss"}


def register(*types: str) -> Callable[[ScaleRule], ScaleRule]:
    """Register a scale rule under Caffe layer type strings."""
    def deco(rule: ScaleRule) -> ScaleRule:
        for t in types:
            RULES[t] = rule
        return rule
    return deco


def _size(shape: Tuple[int, ...]) -> int:
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def per_channel(fmap: np.ndarray, shape: Tuple[int, ...]):
    """Per-channel groups of a feature map, or None when a channel mixes groups."""
    if len(shape) < 2:
        return fmap
    chans = fmap.reshape(shape[1], -1)
    if chans.shape[1] and not np.all(chans == chans[:, :1]):
        return None
    return chans[:, 0] if chans.shape[1] else np.full(shape[1], UNSCALED)


def _expand(chan: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    inner = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return np.repeat(chan, inner)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: Dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class Trace:
    """The plan builder's state: feature maps and vias per blob, and what the rules recorded."""

    def __init__(self, net, lrn_alpha: bool = False) -> None:
        self.net = net
        #: LRN layers may have their alpha rescaled with their input (see :func:`lrn`)
        self.lrn_alpha = lrn_alpha
        self.lrn_groups: List[Tuple[str, int]] = []  # (LRN layer, the group scaling its input)
        self.affine = [lp.name for lp in net.net_param.layer if lp.type in AFFINE_TYPES]
        self.ids = {name: i for i, name in enumerate(self.affine)}
        self.uf = _UnionFind()
        for i in range(len(self.affine)):
            self.uf.find(i)
        self.shapes = {name: tuple(net.blobs[name].data.shape) for name in net.blobs}
        self.fmaps: Dict[str, np.ndarray] = {}
        self.vias: Dict[str, np.ndarray] = {}  # per element: index into ``paths``
        self.paths: List[Tuple[str, ...]] = [()]
        self._path_index: Dict[Tuple[str, ...], int] = {(): 0}
        self.consumers: List[Tuple[str, str, np.ndarray, np.ndarray]] = []
        self.batchnorms: List[Tuple[str, np.ndarray, np.ndarray]] = []
        self.biases: List[Tuple[str, int, np.ndarray, np.ndarray]] = []
        self.pinned_raw: List[np.ndarray] = []
        self.inexact: List[str] = []
        self.inexact_inputs: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}  # per element: groups, via
        self.unknown: List[str] = []
        # the layer being visited: its bottoms' maps, vias and shapes, and its tops' shapes
        self.bottoms: List[np.ndarray] = []
        self.bvias: List[np.ndarray] = []
        self.bshapes: List[Tuple[int, ...]] = []
        self.tshapes: List[Tuple[int, ...]] = []

    def visit(self, lp) -> None:
        """Apply ``lp``'s rule (a layer that no scale reaches just gets unscaled tops)."""
        self.bottoms = [self.fmap_of(b) for b in lp.bottom]
        self.bvias = [self.via_of(b) for b in lp.bottom]
        self.bshapes = [self.shapes[b] for b in lp.bottom]
        self.tshapes = [self.shapes[x] for x in lp.top]
        if lp.type not in AFFINE_TYPES and not any(np.any(f != UNSCALED) for f in self.bottoms):
            for x, s in zip(lp.top, self.tshapes):
                self.fresh(x, _size(s))
            return
        rule = RULES.get(lp.type)
        if rule is None:
            self.unknown.append(lp.name)
            rule = pinned
        rule(self, lp)

    def fmap_of(self, blob: str) -> np.ndarray:
        if blob not in self.fmaps:
            self.fmaps[blob] = np.full(_size(self.shapes[blob]), UNSCALED, np.int32)
        return self.fmaps[blob]

    def via_of(self, blob: str) -> np.ndarray:
        if blob not in self.vias:
            self.vias[blob] = np.zeros(self.fmap_of(blob).size, np.int32)
        return self.vias[blob]

    def fresh(self, blob: str, size: int) -> None:
        """``blob`` carries no scale (a layer's output that no scale passes into)."""
        self.fmaps[blob] = np.full(size, UNSCALED, np.int32)
        self.vias[blob] = np.zeros(size, np.int32)

    def set(self, blob: str, fmap: np.ndarray, via: np.ndarray) -> None:
        self.fmaps[blob] = fmap
        self.vias[blob] = via

    def through(self, via: np.ndarray, layer: str) -> np.ndarray:
        """``via`` after passing the inexact layer ``layer``."""
        out = via.copy()
        for v in np.unique(via).tolist():
            key = self.paths[v] + (layer,)
            if key not in self._path_index:
                self._path_index[key] = len(self.paths)
                self.paths.append(key)
            out[via == v] = self._path_index[key]
        return out

    @staticmethod
    def chan_via(via: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
        if len(shape) < 2:
            return via
        v = via.reshape(shape[1], -1)
        return v[:, 0].copy() if v.shape[1] else np.zeros(shape[1], np.int32)

    def pin(self, *fmaps: np.ndarray) -> None:
        """The groups in ``fmaps`` must not be rescaled."""
        self.pinned_raw.extend(fmaps)


@register(*AFFINE_TYPES)
def affine(tr: Trace, lp) -> None:
    """An affine layer undoes its bottom's scales in its input columns and starts its own group."""
    fm, shape = tr.bottoms[0], tr.bshapes[0]
    if lp.type == "InnerProduct":
        groups = fm
        if _axis(lp.inner_product_param.axis, len(shape)) != 1:
            if np.any(fm != UNSCALED):
                tr.pin(fm)
            groups = None
    else:
        groups = per_channel(fm, shape)
        if groups is None:
            tr.pin(fm)
    if groups is not None and np.any(groups != UNSCALED):
        via = tr.bvias[0] if lp.type == "InnerProduct" else tr.chan_via(tr.bvias[0], shape)
        tr.consumers.append((lp.name, lp.type, groups.copy(), via.copy()))
    size = _size(tr.tshapes[0])
    tr.set(lp.top[0], np.full(size, tr.ids[lp.name], np.int32), np.zeros(size, np.int32))


def _elementwise(tr: Trace, lp, inexact: bool) -> None:
    if inexact:
        tr.inexact.append(lp.name)
        tr.inexact_inputs[lp.name] = (tr.bottoms[0].copy(), tr.bvias[0].copy())
    for x, s in zip(lp.top, tr.tshapes):
        fm, via = tr.bottoms[0], tr.bvias[0]
        if fm.size != _size(s):
            tr.pin(fm)
            tr.fresh(x, _size(s))
            continue
        tr.set(x, fm.copy(), tr.through(via, lp.name) if inexact else via.copy())


@register("ReLU", "PReLU", "Dropout", "AbsVal", "Split", "Flatten", "Reshape")
def homogeneous(tr: Trace, lp) -> None:
    """``f(r x) = r f(x)`` elementwise (or a reshape of the same elements)."""
    _elementwise(tr, lp, inexact=False)


@register("Sigmoid", "TanH", "ELU", "BNLL", "Exp", "Log", "Threshold", "Clip", "Swish", "MVN", "ReLU6")
def inexact(tr: Trace, lp) -> None:
    """A scale passes as ``r^d``, with the effective degree ``d`` measured at the activations
    (ReLU6 too: homogeneous below its threshold, constant above it)."""
    _elementwise(tr, lp, inexact=True)


@register("LRN")
def lrn(tr: Trace, lp) -> None:
    """``x / (k + alpha/n sum x^2)^beta``: inexact, unless ``tr.lrn_alpha`` lets its alpha be
    scaled by ``1/r^2`` with the scale ``r`` of its input, which keeps it exact (a scale passes
    as for ReLU). That needs one scale on every element of its input (alpha is one number),
    passed through no inexact layer."""
    groups, via = tr.bottoms[0], tr.bvias[0]
    one = groups.size > 0 and groups[0] != UNSCALED and np.all(groups == groups[0]) and not np.any(via)
    if not (tr.lrn_alpha and one):
        _elementwise(tr, lp, inexact=True)
        return
    tr.lrn_groups.append((lp.name, int(groups[0])))
    _elementwise(tr, lp, inexact=False)


@register("Power")
def power(tr: Trace, lp) -> None:
    """``(shift + scale x)^power``: homogeneous of degree 1 only as the identity's multiple."""
    p = lp.power_param
    _elementwise(tr, lp, inexact=p.power != 1 or p.shift != 0)


@register("Pooling", "Upsample", "Interp", "ROIPooling")
def pooling(tr: Trace, lp) -> None:
    """Max and average pooling commute with a positive per-channel scale, and so do nearest and
    bilinear resizing (Upsample, Interp) and ROIPooling of its feature bottom (its rois, the
    second bottom, are coordinates: a scale reaching them would move the regions)."""
    if len(tr.bottoms) > 1:
        tr.pin(*tr.bottoms[1:])
    chan = per_channel(tr.bottoms[0], tr.bshapes[0])
    if chan is None:
        tr.pin(tr.bottoms[0])
        chan = np.full(tr.bshapes[0][1], UNSCALED)
    tshape = tr.tshapes[0]
    tr.set(lp.top[0], _expand(chan, tshape), _expand(tr.chan_via(tr.bvias[0], tr.bshapes[0]), tshape))


@register("Permute")
def permute(tr: Trace, lp) -> None:
    """The scales move with the elements while the batch axis stays first; else pinned."""
    shape = tr.bshapes[0]
    order = [int(o) for o in fork_message(lp, "permute_param").order]
    order += [i for i in range(len(shape)) if i not in order]
    if order[0] != 0:
        tr.pin(tr.bottoms[0])
        tr.fresh(lp.top[0], _size(tr.tshapes[0]))
        return
    axes = [o - 1 for o in order[1:]]
    tr.set(lp.top[0], tr.bottoms[0].reshape(shape[1:]).transpose(axes).reshape(-1).copy(),
           tr.bvias[0].reshape(shape[1:]).transpose(axes).reshape(-1).copy())


@register("ShuffleChannel")
def shuffle_channel(tr: Trace, lp) -> None:
    """Channels move (``i * k + j`` to ``j * group + i``), their scales with them."""
    shape, g = tr.bshapes[0], int(fork_message(lp, "shuffle_channel_param").group)

    def move(a: np.ndarray) -> np.ndarray:
        return a.reshape(g, shape[1] // g, -1).transpose(1, 0, 2).reshape(-1).copy()

    tr.set(lp.top[0], move(tr.bottoms[0]), move(tr.bvias[0]))


@register("Normalize")
def normalize(tr: Trace, lp) -> None:
    """L2 normalisation over channels (and space, with ``across_spatial``) absorbs one scale
    shared by all channels, exactly up to ``eps`` against the squared norm; different scales
    on different channels would change the output: pinned."""
    chan = per_channel(tr.bottoms[0], tr.bshapes[0])
    if chan is None or len(np.unique(chan)) > 1 or len(np.unique(tr.bvias[0])) > 1:
        tr.pin(tr.bottoms[0])
    tr.fresh(lp.top[0], _size(tr.tshapes[0]))


@register("PriorBox")
def prior_box(tr: Trace, lp) -> None:
    """The priors depend only on the bottoms' shapes: the top carries no scale, like data."""
    tr.fresh(lp.top[0], _size(tr.tshapes[0]))


@register("Scale", "Bias")
def scale_bias(tr: Trace, lp) -> None:
    """The scale passes; a learned bias must be scaled along (a second bottom is inexact)."""
    tr.set(lp.top[0], tr.bottoms[0].copy(), tr.bvias[0].copy())
    if len(lp.bottom) > 1:
        tr.inexact.append(lp.name)  # scale given by another blob
        return
    if not (lp.type == "Bias" or lp.scale_param.bias_term):
        return
    p = lp.scale_param if lp.type == "Scale" else lp.bias_param
    chan = per_channel(tr.bottoms[0], tr.bshapes[0]) if _axis(p.axis, len(tr.bshapes[0])) == 1 else None
    if chan is None:
        tr.pin(tr.bottoms[0])
    else:
        tr.biases.append((lp.name, 1 if lp.type == "Scale" else 0, chan.copy(),
                          tr.chan_via(tr.bvias[0], tr.bshapes[0])))


@register("BatchNorm")
def batchnorm(tr: Trace, lp) -> None:
    """Stored statistics absorb the scale exactly; batch statistics absorb it up to eps."""
    chan = per_channel(tr.bottoms[0], tr.bshapes[0])
    if chan is None:
        tr.pin(tr.bottoms[0])
    else:
        bp = lp.batch_norm_param
        global_stats = bp.use_global_stats if bp.HasField("use_global_stats") else tr.net.phase == 1
        if global_stats:
            tr.batchnorms.append((lp.name, chan.copy(), tr.chan_via(tr.bvias[0], tr.bshapes[0])))
        else:
            tr.inexact.append(lp.name)  # batch statistics absorb the scale (up to eps)
    tr.fresh(lp.top[0], _size(tr.tshapes[0]))


def _concat_axis(p, legacy: str, ndim: int) -> int:
    return _axis(p.axis if p.HasField("axis") or not p.HasField(legacy) else getattr(p, legacy), ndim)


@register("Concat")
def concat(tr: Trace, lp) -> None:
    """Channel ranges (or other axes' blocks) keep their scales."""
    ax = _concat_axis(lp.concat_param, "concat_dim", len(tr.bshapes[0]))
    if ax == 0:
        tr.pin(*tr.bottoms)
        tr.fresh(lp.top[0], _size(tr.tshapes[0]))
        return
    parts = [f.reshape(s[1:]) for f, s in zip(tr.bottoms, tr.bshapes)]
    vparts = [v.reshape(s[1:]) for v, s in zip(tr.bvias, tr.bshapes)]
    tr.set(lp.top[0], np.concatenate(parts, axis=ax - 1).reshape(-1),
           np.concatenate(vparts, axis=ax - 1).reshape(-1))


@register("Slice")
def slice_(tr: Trace, lp) -> None:
    """Each top gets its range of the bottom's scales."""
    ax = _concat_axis(lp.slice_param, "slice_dim", len(tr.bshapes[0]))
    if ax == 0:
        tr.pin(tr.bottoms[0])
        for x, s in zip(lp.top, tr.tshapes):
            tr.fresh(x, _size(s))
        return
    full = tr.bottoms[0].reshape(tr.bshapes[0][1:])
    vfull = tr.bvias[0].reshape(tr.bshapes[0][1:])
    start = 0
    for x, s in zip(lp.top, tr.tshapes):
        idx = [slice(None)] * (len(s) - 1)
        idx[ax - 1] = slice(start, start + s[ax])
        tr.set(x, full[tuple(idx)].reshape(-1).copy(), vfull[tuple(idx)].reshape(-1).copy())
        start += s[ax]


@register("Crop")
def crop(tr: Trace, lp) -> None:
    """The top gets the cropped window of the first bottom's scales."""
    p = lp.crop_param
    bshape, tshape = tr.bshapes[0], tr.tshapes[0]
    ax = _axis(p.axis, len(bshape))
    if ax == 0:
        tr.pin(tr.bottoms[0])
        tr.fresh(lp.top[0], _size(tshape))
        return
    idx = [slice(None)] * (len(bshape) - 1)
    for d in range(ax, len(bshape)):
        off = p.offset[0] if len(p.offset) == 1 else (p.offset[d - ax] if len(p.offset) else 0)
        idx[d - 1] = slice(off, off + tshape[d])
    tr.set(lp.top[0], tr.bottoms[0].reshape(bshape[1:])[tuple(idx)].reshape(-1).copy(),
           tr.bvias[0].reshape(bshape[1:])[tuple(idx)].reshape(-1).copy())


@register("Eltwise")
def eltwise(tr: Trace, lp) -> None:
    """SUM/MAX: summands' producers share one scale (union); PROD cannot pass a scale."""
    prod = lp.eltwise_param.operation == type(lp.eltwise_param).PROD
    stacked = np.stack(tr.bottoms)
    if prod:
        tr.inexact.append(lp.name)
    for k in range(1, len(tr.bottoms)):
        for a, b in np.unique(np.stack([stacked[0], stacked[k]], axis=1), axis=0).tolist():
            if a == b:
                continue
            if a == UNSCALED or b == UNSCALED:
                tr.pin(np.array([a, b]))
            elif not prod:
                tr.uf.union(a, b)
    if prod:
        tr.pin(*tr.bottoms)
    elif any(not np.array_equal(v, tr.bvias[0]) for v in tr.bvias[1:]) and lp.name not in tr.inexact:
        tr.inexact.append(lp.name)  # summands that passed different inexact layers
    tr.set(lp.top[0], stacked[0].copy(), tr.bvias[0].copy())


@register(*sorted(TERMINAL))
def pinned(tr: Trace, lp) -> None:
    """A scale reaching this layer would change the net's output: its producers stay as they are."""
    tr.pin(*tr.bottoms)
    for x in lp.top:
        tr.fmap_of(x)
