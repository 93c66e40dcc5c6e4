"""Function-preserving rescaling of affine layers (the between-layer stage's bookkeeping).

Scaling affine layer k's weights and bias by ``r`` scales its output channels by ``r``. To keep
the net's function, the scale is undone where those channels arrive next:

* in each consuming affine layer (Convolution, InnerProduct, Deconvolution), exactly the input
  columns that layer k's channels reach, traced through ReLU/PReLU, Pooling, Dropout, Split,
  Concat/Slice (channel ranges), Flatten/Reshape (column blocks), Crop, Scale/Bias (whose bias
  is scaled along) and AbsVal;
* in BatchNorm layers that use stored statistics: the stored mean and variance are rescaled so
  that the normalised output is unchanged (exactly, eps included), and the scale stops there;
* producers whose outputs are summed (Eltwise SUM/MAX) form one group that shares one scale.

Layers that are not positively homogeneous (LRN, Sigmoid, TanH, ELU, BNLL, Power with power != 1
or a shift, Eltwise PROD...) let the scale pass but cannot undo it exactly: they are listed in
``ScalePlan.inexact`` so the caller can measure the deviation. Groups whose channels reach a net
output (or a Softmax/loss) unchanged are pinned: rescaling them would change the output.

Works on any engine net (numpy or pycaffe): it reads ``net_param``, blob shapes and params.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Set, Tuple

import numpy as np

AFFINE_TYPES = ("Convolution", "InnerProduct", "Deconvolution")
ELEMENTWISE_HOMOGENEOUS = {"ReLU", "PReLU", "Dropout", "AbsVal", "Split", "Flatten", "Reshape"}
ELEMENTWISE_INEXACT = {"Sigmoid", "TanH", "ELU", "BNLL", "Exp", "Log", "Threshold", "Clip", "Swish", "LRN", "MVN"}
TERMINAL = {"Softmax", "SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "EuclideanLoss", "Accuracy", "ArgMax",
            "Silence", "HingeLoss", "InfogainLoss", "MultinomialLogisticLoss", "ContrastiveLoss"}

UNSCALED = -1


@dataclass
class Consumer:
    """Input columns of an affine layer, with the group that scales each input channel/column."""
    layer: str
    layer_type: str
    groups: np.ndarray  # per input channel (conv/deconv) or per input column (InnerProduct)


@dataclass
class ScalePlan:
    affine: List[str]
    group_of: Dict[str, int]
    consumers: List[Consumer] = field(default_factory=list)
    batchnorms: List[Tuple[str, np.ndarray]] = field(default_factory=list)
    biases: List[Tuple[str, int, np.ndarray]] = field(default_factory=list)  # (layer, blob index, groups)
    pinned: Set[int] = field(default_factory=set)
    inexact: List[str] = field(default_factory=list)

    @property
    def groups(self) -> "OrderedDict[int, List[str]]":
        out: "OrderedDict[int, List[str]]" = OrderedDict()
        for name in self.affine:
            out.setdefault(self.group_of[name], []).append(name)
        return out


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


def _per_channel(fmap: np.ndarray, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
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


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def build_plan(net) -> ScalePlan:
    """Trace every affine layer's output channels to where their scale can be undone."""
    lps = list(net.net_param.layer)
    affine = [lp.name for lp in lps if lp.type in AFFINE_TYPES]
    ids = {name: i for i, name in enumerate(affine)}
    uf = _UnionFind()
    for i in range(len(affine)):
        uf.find(i)
    fmaps: Dict[str, np.ndarray] = {}
    shapes = {name: tuple(net.blobs[name].data.shape) for name in net.blobs}
    consumers: List[Tuple[str, str, np.ndarray]] = []
    batchnorms: List[Tuple[str, np.ndarray]] = []
    biases: List[Tuple[str, int, np.ndarray]] = []
    pinned_raw: List[np.ndarray] = []
    inexact: List[str] = []

    def fmap_of(blob: str) -> np.ndarray:
        if blob not in fmaps:
            shape = shapes[blob]
            fmaps[blob] = np.full(int(np.prod(shape[1:])) if len(shape) > 1 else 1, UNSCALED, np.int64)
        return fmaps[blob]

    for lp in lps:
        t = lp.type
        bottoms = [fmap_of(b) for b in lp.bottom]
        bshapes = [shapes[b] for b in lp.bottom]
        tshapes = [shapes[x] for x in lp.top]
        scaled_in = any(np.any(f != UNSCALED) for f in bottoms)
        if t in AFFINE_TYPES:
            fm, shape = bottoms[0], bshapes[0]
            if t == "InnerProduct":
                ax = _axis(lp.inner_product_param.axis, len(shape))
                if ax != 1:
                    if scaled_in:
                        pinned_raw.append(fm)
                    groups = None
                else:
                    groups = fm
            else:
                groups = _per_channel(fm, shape)
                if groups is None:
                    pinned_raw.append(fm)
            if groups is not None and np.any(groups != UNSCALED):
                consumers.append((lp.name, t, groups.copy()))
            fmaps[lp.top[0]] = np.full(int(np.prod(tshapes[0][1:])), ids[lp.name], np.int64)
            continue
        if not scaled_in:
            for x in lp.top:
                fmap_of(x)
            continue
        if t in ELEMENTWISE_HOMOGENEOUS or t in ELEMENTWISE_INEXACT or t == "Power":
            if t in ELEMENTWISE_INEXACT or (t == "Power" and (lp.power_param.power != 1 or lp.power_param.shift != 0)):
                inexact.append(lp.name)
            for x, s in zip(lp.top, tshapes):
                fm = bottoms[0]
                if fm.size != int(np.prod(s[1:])):
                    pinned_raw.append(fm)
                    fm = np.full(int(np.prod(s[1:])), UNSCALED, np.int64)
                fmaps[x] = fm.copy()
        elif t == "Pooling":
            chan = _per_channel(bottoms[0], bshapes[0])
            if chan is None:
                pinned_raw.append(bottoms[0])
                chan = np.full(bshapes[0][1], UNSCALED)
            fmaps[lp.top[0]] = _expand(chan, tshapes[0])
        elif t in ("Scale", "Bias"):
            fmaps[lp.top[0]] = bottoms[0].copy()
            if len(lp.bottom) > 1:
                inexact.append(lp.name)  # scale given by another blob
            else:
                has_bias = t == "Bias" or lp.scale_param.bias_term
                if has_bias:
                    p = lp.scale_param if t == "Scale" else lp.bias_param
                    ax = _axis(p.axis, len(bshapes[0]))
                    chan = _per_channel(bottoms[0], bshapes[0]) if ax == 1 else None
                    if chan is None:
                        pinned_raw.append(bottoms[0])
                    else:
                        biases.append((lp.name, 1 if t == "Scale" else 0, chan.copy()))
        elif t == "BatchNorm":
            chan = _per_channel(bottoms[0], bshapes[0])
            if chan is None:
                pinned_raw.append(bottoms[0])
            else:
                global_stats = (lp.batch_norm_param.use_global_stats
                                if lp.batch_norm_param.HasField("use_global_stats") else net.phase == 1)
                if global_stats:
                    batchnorms.append((lp.name, chan.copy()))
                else:
                    inexact.append(lp.name)  # batch statistics absorb the scale (up to eps)
            fmaps[lp.top[0]] = np.full(int(np.prod(tshapes[0][1:])), UNSCALED, np.int64)
        elif t == "Concat":
            p = lp.concat_param
            ax = _axis(p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim,
                       len(bshapes[0]))
            if ax == 0:
                pinned_raw.extend(bottoms)
                fmaps[lp.top[0]] = np.full(int(np.prod(tshapes[0][1:])), UNSCALED, np.int64)
            else:
                parts = [f.reshape(s[1:]) for f, s in zip(bottoms, bshapes)]
                fmaps[lp.top[0]] = np.concatenate(parts, axis=ax - 1).reshape(-1)
        elif t == "Slice":
            p = lp.slice_param
            ax = _axis(p.axis if p.HasField("axis") or not p.HasField("slice_dim") else p.slice_dim,
                       len(bshapes[0]))
            if ax == 0:
                pinned_raw.append(bottoms[0])
                for x, s in zip(lp.top, tshapes):
                    fmaps[x] = np.full(int(np.prod(s[1:])), UNSCALED, np.int64)
            else:
                full = bottoms[0].reshape(bshapes[0][1:])
                start = 0
                for x, s in zip(lp.top, tshapes):
                    n = s[ax]
                    idx = [slice(None)] * (len(s) - 1)
                    idx[ax - 1] = slice(start, start + n)
                    fmaps[x] = full[tuple(idx)].reshape(-1).copy()
                    start += n
        elif t == "Crop":
            p = lp.crop_param
            ax = _axis(p.axis, len(bshapes[0]))
            full = bottoms[0].reshape(bshapes[0][1:])
            if ax == 0:
                pinned_raw.append(bottoms[0])
                fmaps[lp.top[0]] = np.full(int(np.prod(tshapes[0][1:])), UNSCALED, np.int64)
            else:
                idx = [slice(None)] * (len(bshapes[0]) - 1)
                for d in range(ax, len(bshapes[0])):
                    off = p.offset[0] if len(p.offset) == 1 else (p.offset[d - ax] if len(p.offset) else 0)
                    idx[d - 1] = slice(off, off + tshapes[0][d])
                fmaps[lp.top[0]] = full[tuple(idx)].reshape(-1).copy()
        elif t == "Eltwise":
            op = lp.eltwise_param.operation
            prod = op == type(lp.eltwise_param).PROD
            stacked = np.stack(bottoms)
            out = stacked[0].copy()
            if prod:
                inexact.append(lp.name)
            for k in range(1, len(bottoms)):
                for a, b in np.unique(np.stack([stacked[0], stacked[k]], axis=1), axis=0).tolist():
                    if a == b:
                        continue
                    if a == UNSCALED or b == UNSCALED:
                        pinned_raw.append(np.array([a, b]))
                    elif not prod:
                        uf.union(a, b)
            if prod:
                for f in bottoms:
                    pinned_raw.append(f)
            fmaps[lp.top[0]] = out
        elif t in TERMINAL:
            pinned_raw.extend(bottoms)
            for x in lp.top:
                fmap_of(x)
        else:
            # unknown to the plan: do not rescale anything that reaches it
            pinned_raw.extend(bottoms)
            for x in lp.top:
                fmap_of(x)
    for name in net.outputs:
        if name in fmaps:
            pinned_raw.append(fmaps[name])
    pinned = {uf.find(int(g)) for arr in pinned_raw for g in np.unique(arr) if g != UNSCALED}

    def root(groups: np.ndarray) -> np.ndarray:
        lookup = np.array([uf.find(i) for i in range(len(affine))] + [UNSCALED], np.int64)
        return lookup[groups]  # UNSCALED (-1) indexes the trailing UNSCALED entry

    group_of = {name: uf.find(ids[name]) for name in affine}
    return ScalePlan(
        affine=affine, group_of=group_of,
        consumers=[Consumer(n, t, root(g)) for n, t, g in consumers],
        batchnorms=[(n, root(g)) for n, g in batchnorms],
        biases=[(n, j, root(g)) for n, j, g in biases],
        pinned=pinned, inexact=inexact)


def input_energies(layer_type: str, lp, w: np.ndarray) -> np.ndarray:
    """Sum of squares of ``w`` per input channel (convolutions) or input column (InnerProduct),
    in the order of :attr:`Consumer.groups`."""
    w = w.astype(np.float64)
    if layer_type == "Convolution":
        g = lp.convolution_param.group
        per = (w * w).reshape(w.shape[0], w.shape[1], -1).sum(axis=2)          # (out, C/g)
        return per.reshape(g, w.shape[0] // g, w.shape[1]).sum(axis=1).reshape(-1)
    if layer_type == "Deconvolution":
        return (w * w).reshape(w.shape[0], -1).sum(axis=1)
    if lp.inner_product_param.transpose:
        return (w * w).sum(axis=1)
    return (w * w).sum(axis=0)


def cumulative_log_scales(plan: ScalePlan, own: Mapping[int, float],
                          energies: Optional[Mapping[str, Tuple[np.ndarray, np.ndarray]]] = None
                          ) -> Dict[int, float]:
    """Per-group log scales ``rho`` that give every group exactly its own correction ``own[g]``.

    Rescaling group g by ``exp(rho_g)`` divides its change rate by ``exp(2 rho_g)``, while the
    rescaling of the groups feeding it (undone in its input columns) multiplies the rate by
    ``sqrt(sum_j a_j r_j^2 / sum_j b_j r_j^-2)``, with ``a_j``/``b_j`` the shares of the
    gradient and weight energy in input column j (``energies[layer] = (grad, weight)`` per input
    column; uniform without it) and ``r_j`` the scale of column j's producer. Adding that
    inherited part to ``own[g]`` makes each layer move by its own correction alone, in one step
    for homogeneous nets, chains and DAGs alike. Pinned groups are not scaled.
    """
    inputs: Dict[str, List[np.ndarray]] = {}
    for c in plan.consumers:
        inputs.setdefault(c.layer, []).append(c.groups)
    rho: Dict[int, float] = {}
    for g, members in plan.groups.items():
        if g in plan.pinned:
            rho[g] = 0.0
            continue
        inherited = []
        for m in members:
            if m not in inputs:
                inherited.append(0.0)
                continue
            cols = np.concatenate(inputs[m])
            logr = np.array([rho.get(int(x), 0.0) if x != UNSCALED else 0.0 for x in cols])
            if energies is not None and m in energies and energies[m][0].size == cols.size:
                a, b = energies[m]
                a = a / a.sum() if a.sum() > 0 else np.full(cols.size, 1.0 / cols.size)
                b = b / b.sum() if b.sum() > 0 else np.full(cols.size, 1.0 / cols.size)
            else:
                a = b = np.full(cols.size, 1.0 / cols.size)
            inherited.append(0.25 * (math.log(float(np.sum(a * np.exp(2 * logr))))
                                     - math.log(float(np.sum(b * np.exp(-2 * logr))))))
        rho[g] = float(own.get(g, 0.0)) + float(np.mean(inherited))
    return rho


def _factors(groups: np.ndarray, scale: Mapping[int, float]) -> np.ndarray:
    lookup = np.ones(max([int(groups.max()) + 1 if groups.size else 0] + [g + 1 for g in scale]), np.float64)
    for g, r in scale.items():
        lookup[g] = r
    f = np.ones(groups.shape, np.float64)
    mask = groups != UNSCALED
    f[mask] = lookup[groups[mask]]
    return f


def scale_output_channels(layer_type: str, lp, blobs, factors: np.ndarray) -> None:
    """Multiply affine layer output channel i (weights and bias) by ``factors[i]``."""
    w = blobs[0].data
    f = factors.astype(np.float32)
    if layer_type == "Deconvolution":
        g = lp.convolution_param.group
        cin, opg = w.shape[0], w.shape[1]
        w[...] = (w.reshape(g, cin // g, opg, -1) * f.reshape(g, 1, opg, 1)).reshape(w.shape)
    elif layer_type == "InnerProduct" and lp.inner_product_param.transpose:
        w *= f.reshape(1, -1)
    else:
        w *= f.reshape((-1,) + (1,) * (w.ndim - 1))
    if len(blobs) > 1:
        blobs[1].data[...] *= f.reshape(blobs[1].data.shape)


def scale_input_columns(layer_type: str, lp, blobs, factors: np.ndarray) -> None:
    """Multiply the weights that read input channel/column j by ``factors[j]``."""
    w = blobs[0].data
    f = factors.astype(np.float32)
    if layer_type == "Convolution":
        g = lp.convolution_param.group
        out, cpg = w.shape[0], w.shape[1]
        w[...] = (w.reshape(g, out // g, cpg, -1) * f.reshape(g, 1, cpg, 1)).reshape(w.shape)
    elif layer_type == "Deconvolution":
        w *= f.reshape((-1,) + (1,) * (w.ndim - 1))
    elif lp.inner_product_param.transpose:
        w *= f.reshape(-1, 1)
    else:
        w *= f.reshape(1, -1)


def apply_scales(net, plan: ScalePlan, scale: Mapping[int, float]) -> None:
    """Scale each group ``g`` by ``scale[g]`` and undo it downstream (see module docstring)."""
    scale = {g: float(r) for g, r in scale.items() if r != 1.0}
    if not scale:
        return
    lps = {lp.name: lp for lp in net.net_param.layer}
    for name in plan.affine:
        r = scale.get(plan.group_of[name])
        if r is not None:
            blobs = net.params[name]
            n_out = _num_output(lps[name], blobs)
            scale_output_channels(lps[name].type, lps[name], blobs, np.full(n_out, r))
    for c in plan.consumers:
        scale_input_columns(c.layer_type, lps[c.layer], net.params[c.layer], 1.0 / _factors(c.groups, scale))
    for name, j, groups in plan.biases:
        b = net.params[name][j].data
        b *= _factors(groups, scale).astype(np.float32).reshape(b.shape)
    for name, groups in plan.batchnorms:
        rescale_batchnorm(net.params[name], lps[name], _factors(groups, scale))


def _num_output(lp, blobs) -> int:
    if lp.type == "InnerProduct":
        return lp.inner_product_param.num_output
    return lp.convolution_param.num_output


def rescale_batchnorm(blobs, lp, r: np.ndarray) -> None:
    """Make a stored-statistics BatchNorm give the same output for inputs scaled by ``r``."""
    eps = np.float64(lp.batch_norm_param.eps)
    sf = float(blobs[2].data.reshape(-1)[0])
    factor = 0.0 if sf == 0 else 1.0 / sf
    mean = blobs[0].data.astype(np.float64) * factor
    var = blobs[1].data.astype(np.float64) * factor
    new_mean = mean * r
    new_var = r * r * (var + eps) - eps
    blobs[0].data[...] = new_mean.astype(np.float32)
    blobs[1].data[...] = new_var.astype(np.float32)
    blobs[2].data[...] = 1.0
