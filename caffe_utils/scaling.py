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
``ScalePlan.inexact`` so the caller can measure the deviation. For the elementwise ones (and LRN)
the plan records which of them each undone channel passed (``via``): with their effective degrees
``d`` (``f(r x) ~ r^d f(x)`` near the current activations, see :func:`estimate_degrees`) a scale
``r`` arrives as ``r^(d1 d2 ...)`` and is undone as such, which keeps the function close and the
change rates moving as planned. Groups whose channels reach a net
output (or a Softmax/loss) unchanged are pinned: rescaling them would change the output.

Works on any engine net (numpy or pycaffe): it reads ``net_param``, blob shapes and params.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from caffe_utils.engine import set_data

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
    via: Optional[np.ndarray] = None  # per input channel/column: index into ScalePlan.paths


@dataclass
class ScalePlan:
    affine: List[str]
    group_of: Dict[str, int]
    consumers: List[Consumer] = field(default_factory=list)
    batchnorms: List[Tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)  # (layer, groups, via)
    biases: List[Tuple[str, int, np.ndarray, np.ndarray]] = field(default_factory=list)  # (layer, blob, groups, via)
    pinned: Set[int] = field(default_factory=set)
    inexact: List[str] = field(default_factory=list)
    paths: List[Tuple[str, ...]] = field(default_factory=lambda: [()])  # inexact layers passed, per via index

    @property
    def degree_layers(self) -> List[str]:
        """The inexact layers whose degree changes how a scale arrives somewhere, in net order."""
        seen = {name for path in self.paths for name in path}
        return [name for name in self.inexact if name in seen]

    def powers(self, via: Optional[np.ndarray], degrees: Optional[Mapping[str, float]]) -> Optional[np.ndarray]:
        """The exponent with which each channel of ``via`` receives its producer's scale."""
        if via is None or not degrees:
            return None
        per_path = np.array([float(np.prod([degrees.get(n, 1.0) for n in path])) for path in self.paths])
        return per_path[via]

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
    vias: Dict[str, np.ndarray] = {}  # per element: index into ``paths``
    paths: List[Tuple[str, ...]] = [()]
    path_index: Dict[Tuple[str, ...], int] = {(): 0}
    shapes = {name: tuple(net.blobs[name].data.shape) for name in net.blobs}
    consumers: List[Tuple[str, str, np.ndarray, np.ndarray]] = []
    batchnorms: List[Tuple[str, np.ndarray, np.ndarray]] = []
    biases: List[Tuple[str, int, np.ndarray, np.ndarray]] = []
    pinned_raw: List[np.ndarray] = []
    inexact: List[str] = []

    def fmap_of(blob: str) -> np.ndarray:
        if blob not in fmaps:
            shape = shapes[blob]
            fmaps[blob] = np.full(int(np.prod(shape[1:])) if len(shape) > 1 else 1, UNSCALED, np.int32)
        return fmaps[blob]

    def via_of(blob: str) -> np.ndarray:
        if blob not in vias:
            vias[blob] = np.zeros(fmap_of(blob).size, np.int32)
        return vias[blob]

    def fresh(blob: str, size: int) -> None:
        fmaps[blob] = np.full(size, UNSCALED, np.int32)
        vias[blob] = np.zeros(size, np.int32)

    def through(via: np.ndarray, layer: str) -> np.ndarray:
        out = via.copy()
        for v in np.unique(via).tolist():
            key = paths[v] + (layer,)
            if key not in path_index:
                path_index[key] = len(paths)
                paths.append(key)
            out[via == v] = path_index[key]
        return out

    def chan_via(via: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
        if len(shape) < 2:
            return via
        v = via.reshape(shape[1], -1)
        return v[:, 0].copy() if v.shape[1] else np.zeros(shape[1], np.int32)

    for lp in lps:
        t = lp.type
        bottoms = [fmap_of(b) for b in lp.bottom]
        bvias = [via_of(b) for b in lp.bottom]
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
                via = bvias[0] if t == "InnerProduct" else chan_via(bvias[0], shape)
                consumers.append((lp.name, t, groups.copy(), via.copy()))
            fmaps[lp.top[0]] = np.full(int(np.prod(tshapes[0][1:])), ids[lp.name], np.int32)
            vias[lp.top[0]] = np.zeros(fmaps[lp.top[0]].size, np.int32)
            continue
        if not scaled_in:
            for x, s in zip(lp.top, tshapes):
                fresh(x, int(np.prod(s[1:])) if len(s) > 1 else 1)
            continue
        if t in ELEMENTWISE_HOMOGENEOUS or t in ELEMENTWISE_INEXACT or t == "Power":
            degree_bearing = t in ELEMENTWISE_INEXACT or (
                t == "Power" and (lp.power_param.power != 1 or lp.power_param.shift != 0))
            if degree_bearing:
                inexact.append(lp.name)
            for x, s in zip(lp.top, tshapes):
                fm, via = bottoms[0], bvias[0]
                if fm.size != int(np.prod(s[1:])):
                    pinned_raw.append(fm)
                    fresh(x, int(np.prod(s[1:])))
                    continue
                fmaps[x] = fm.copy()
                vias[x] = through(via, lp.name) if degree_bearing else via.copy()
        elif t == "Pooling":
            chan = _per_channel(bottoms[0], bshapes[0])
            if chan is None:
                pinned_raw.append(bottoms[0])
                chan = np.full(bshapes[0][1], UNSCALED)
            fmaps[lp.top[0]] = _expand(chan, tshapes[0])
            vias[lp.top[0]] = _expand(chan_via(bvias[0], bshapes[0]), tshapes[0])
        elif t in ("Scale", "Bias"):
            fmaps[lp.top[0]] = bottoms[0].copy()
            vias[lp.top[0]] = bvias[0].copy()
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
                        biases.append((lp.name, 1 if t == "Scale" else 0, chan.copy(),
                                       chan_via(bvias[0], bshapes[0])))
        elif t == "BatchNorm":
            chan = _per_channel(bottoms[0], bshapes[0])
            if chan is None:
                pinned_raw.append(bottoms[0])
            else:
                global_stats = (lp.batch_norm_param.use_global_stats
                                if lp.batch_norm_param.HasField("use_global_stats") else net.phase == 1)
                if global_stats:
                    batchnorms.append((lp.name, chan.copy(), chan_via(bvias[0], bshapes[0])))
                else:
                    inexact.append(lp.name)  # batch statistics absorb the scale (up to eps)
            fresh(lp.top[0], int(np.prod(tshapes[0][1:])))
        elif t == "Concat":
            p = lp.concat_param
            ax = _axis(p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim,
                       len(bshapes[0]))
            if ax == 0:
                pinned_raw.extend(bottoms)
                fresh(lp.top[0], int(np.prod(tshapes[0][1:])))
            else:
                parts = [f.reshape(s[1:]) for f, s in zip(bottoms, bshapes)]
                fmaps[lp.top[0]] = np.concatenate(parts, axis=ax - 1).reshape(-1)
                vparts = [v.reshape(s[1:]) for v, s in zip(bvias, bshapes)]
                vias[lp.top[0]] = np.concatenate(vparts, axis=ax - 1).reshape(-1)
        elif t == "Slice":
            p = lp.slice_param
            ax = _axis(p.axis if p.HasField("axis") or not p.HasField("slice_dim") else p.slice_dim,
                       len(bshapes[0]))
            if ax == 0:
                pinned_raw.append(bottoms[0])
                for x, s in zip(lp.top, tshapes):
                    fresh(x, int(np.prod(s[1:])))
            else:
                full = bottoms[0].reshape(bshapes[0][1:])
                vfull = bvias[0].reshape(bshapes[0][1:])
                start = 0
                for x, s in zip(lp.top, tshapes):
                    n = s[ax]
                    idx = [slice(None)] * (len(s) - 1)
                    idx[ax - 1] = slice(start, start + n)
                    fmaps[x] = full[tuple(idx)].reshape(-1).copy()
                    vias[x] = vfull[tuple(idx)].reshape(-1).copy()
                    start += n
        elif t == "Crop":
            p = lp.crop_param
            ax = _axis(p.axis, len(bshapes[0]))
            full = bottoms[0].reshape(bshapes[0][1:])
            if ax == 0:
                pinned_raw.append(bottoms[0])
                fresh(lp.top[0], int(np.prod(tshapes[0][1:])))
            else:
                idx = [slice(None)] * (len(bshapes[0]) - 1)
                for d in range(ax, len(bshapes[0])):
                    off = p.offset[0] if len(p.offset) == 1 else (p.offset[d - ax] if len(p.offset) else 0)
                    idx[d - 1] = slice(off, off + tshapes[0][d])
                fmaps[lp.top[0]] = full[tuple(idx)].reshape(-1).copy()
                vias[lp.top[0]] = bvias[0].reshape(bshapes[0][1:])[tuple(idx)].reshape(-1).copy()
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
            elif any(not np.array_equal(v, bvias[0]) for v in bvias[1:]) and lp.name not in inexact:
                inexact.append(lp.name)  # summands that passed different inexact layers
            fmaps[lp.top[0]] = out
            vias[lp.top[0]] = bvias[0].copy()
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
        lookup = np.array([uf.find(i) for i in range(len(affine))] + [UNSCALED], np.int32)
        return lookup[groups]  # UNSCALED (-1) indexes the trailing UNSCALED entry

    group_of = {name: uf.find(ids[name]) for name in affine}
    return ScalePlan(
        affine=affine, group_of=group_of,
        consumers=[Consumer(n, t, root(g), v) for n, t, g, v in consumers],
        batchnorms=[(n, root(g), v) for n, g, v in batchnorms],
        biases=[(n, j, root(g), v) for n, j, g, v in biases],
        pinned=pinned, inexact=inexact, paths=paths)


def input_energies(layer_type: str, lp, w: np.ndarray) -> np.ndarray:
    """Sum of squares of ``w`` per input channel (convolutions) or input column (InnerProduct),
    in the order of :attr:`Consumer.groups` (float64 result, float32 products: no big copies)."""
    if layer_type == "Convolution":
        g = lp.convolution_param.group
        w3 = w.reshape(w.shape[0], w.shape[1], -1)
        per = np.einsum("ock,ock->oc", w3, w3).astype(np.float64)            # (out, C/g)
        return per.reshape(g, w.shape[0] // g, w.shape[1]).sum(axis=1).reshape(-1)
    if layer_type == "Deconvolution":
        w2 = w.reshape(w.shape[0], -1)
        return np.einsum("ij,ij->i", w2, w2).astype(np.float64)
    if lp.inner_product_param.transpose:
        return np.einsum("ij,ij->i", w, w).astype(np.float64)
    return np.einsum("ij,ij->j", w, w).astype(np.float64)


def cumulative_log_scales(plan: ScalePlan, own: Mapping[int, float],
                          energies: Optional[Mapping[str, Tuple[np.ndarray, np.ndarray]]] = None,
                          degrees: Optional[Mapping[str, float]] = None) -> Dict[int, float]:
    """Per-group log scales ``rho`` that give every group exactly its own correction ``own[g]``.

    Rescaling group g by ``exp(rho_g)`` divides its change rate by ``exp(2 rho_g)``, while the
    rescaling of the groups feeding it (undone in its input columns) multiplies the rate by
    ``sqrt(sum_j a_j r_j^2 / sum_j b_j r_j^-2)``, with ``a_j``/``b_j`` the shares of the
    gradient and weight energy in input column j (``energies[layer] = (grad, weight)`` per input
    column; uniform without it) and ``r_j`` the scale of column j's producer. Adding that
    inherited part to ``own[g]`` makes each layer move by its own correction alone, in one step
    for homogeneous nets, chains and DAGs alike. A column that reaches its consumer through
    inexact layers of effective ``degrees`` receives ``r_j`` raised to their product. Pinned
    groups are not scaled.
    """
    return _Propagation(plan, energies, degrees).run(own)[0]


def reachable_target(plan: ScalePlan, log_rates: Mapping[int, float],
                     energies: Optional[Mapping[str, Tuple[np.ndarray, np.ndarray]]] = None,
                     degrees: Optional[Mapping[str, float]] = None) -> Optional[float]:
    """The log change rate that every group can reach at once, given each group's log rate.

    Pinned groups cannot be scaled: their rates move only by what they inherit from the
    groups feeding them. The target t is where a full step (``own_g = (log C_g - t) / 2``)
    brings the pinned groups' rates to t as well (their mean log rate, when there are several).
    In a homogeneous chain that is the geometric mean of all rates; behind layers of degree
    below one it is lower. None when no group is pinned (any common rate is reachable then).
    """
    pinned = [g for g in plan.pinned if g in log_rates]
    free = [g for g in log_rates if g not in plan.pinned]
    if not pinned:
        return None
    prop = _Propagation(plan, energies, degrees)

    def excess(t: float) -> float:
        _, inh = prop.run({g: 0.5 * (log_rates[g] - t) for g in free})
        return float(np.mean([log_rates[g] + 2.0 * inh.get(g, 0.0) for g in pinned])) - t

    values = list(log_rates.values())
    lo, hi = min(values), max(values)  # excess(lo) >= 0 >= excess(hi)
    if hi - lo < 1e-12:
        return lo
    f_lo, f_hi = excess(lo), excess(hi)
    for _ in range(60):
        if f_lo <= 0:
            return lo
        if f_hi >= 0:
            return hi
        mid = hi - f_hi * (hi - lo) / (f_hi - f_lo)  # regula falsi, Illinois variant
        mid = min(max(mid, lo), hi)
        f_mid = excess(mid)
        if abs(f_mid) < 1e-9 or hi - lo < 1e-9:
            return mid
        if f_mid > 0:
            lo, f_lo = mid, f_mid
            f_hi *= 0.5
        else:
            hi, f_hi = mid, f_mid
            f_lo *= 0.5
    return 0.5 * (lo + hi)


class _Propagation:
    """The input columns of every group's members, with their energy shares and powers, ready
    to turn per-group own log scales into cumulative ones (see :func:`cumulative_log_scales`)."""

    def __init__(self, plan: ScalePlan, energies: Optional[Mapping[str, Tuple[np.ndarray, np.ndarray]]],
                 degrees: Optional[Mapping[str, float]]) -> None:
        self.plan = plan
        self.n = len(plan.affine)
        cols: Dict[str, List[np.ndarray]] = {}
        pows: Dict[str, List[np.ndarray]] = {}
        for c in plan.consumers:
            cols.setdefault(c.layer, []).append(c.groups)
            p = plan.powers(c.via, degrees)
            pows.setdefault(c.layer, []).append(np.ones(c.groups.size) if p is None else p)
        self.inputs: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        for m, parts in cols.items():
            g = np.concatenate(parts).astype(np.int64)
            g = np.where(g == UNSCALED, self.n, g)  # the last lookup slot holds 0 for unscaled
            if energies is not None and m in energies and energies[m][0].size == g.size:
                a, b = (np.asarray(e, np.float64) for e in energies[m])
                a = a / a.sum() if a.sum() > 0 else np.full(g.size, 1.0 / g.size)
                b = b / b.sum() if b.sum() > 0 else np.full(g.size, 1.0 / g.size)
            else:
                a = b = np.full(g.size, 1.0 / g.size)
            self.inputs[m] = (g, np.concatenate(pows[m]), a, b)

    def run(self, own: Mapping[int, float]) -> Tuple[Dict[int, float], Dict[int, float]]:
        """(rho, inherited) per group: the cumulative log scale and the inherited part of it
        (for pinned groups rho is 0 and ``2 * inherited`` is how far their log rate moves)."""
        lookup = np.zeros(self.n + 1)
        rho: Dict[int, float] = {}
        inherited: Dict[int, float] = {}
        for g, members in self.plan.groups.items():
            parts = []
            for m in members:
                if m not in self.inputs:
                    parts.append(0.0)
                    continue
                cols, powers, a, b = self.inputs[m]
                logr = lookup[cols] * powers
                parts.append(0.25 * (math.log(float(np.dot(a, np.exp(2 * logr))))
                                     - math.log(float(np.dot(b, np.exp(-2 * logr))))))
            inherited[g] = float(np.mean(parts))
            rho[g] = 0.0 if g in self.plan.pinned else float(own.get(g, 0.0)) + inherited[g]
            lookup[g] = rho[g]
        return rho, inherited


def _factors(groups: np.ndarray, scale: Mapping[int, float], powers: Optional[np.ndarray] = None) -> np.ndarray:
    lookup = np.ones(max([int(groups.max()) + 1 if groups.size else 0] + [g + 1 for g in scale]), np.float64)
    for g, r in scale.items():
        lookup[g] = r
    f = np.ones(groups.shape, np.float64)
    mask = groups != UNSCALED
    f[mask] = lookup[groups[mask]]
    return f if powers is None else f ** powers


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


def apply_scales(net, plan: ScalePlan, scale: Mapping[int, float],
                 degrees: Optional[Mapping[str, float]] = None) -> None:
    """Scale each group ``g`` by ``scale[g]`` and undo it downstream (see module docstring),
    as ``scale[g] ** d`` behind inexact layers of effective ``degrees`` ``d`` (default 1)."""
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
        f = _factors(c.groups, scale, plan.powers(c.via, degrees))
        scale_input_columns(c.layer_type, lps[c.layer], net.params[c.layer], 1.0 / f)
    for name, j, groups, via in plan.biases:
        b = net.params[name][j].data
        b *= _factors(groups, scale, plan.powers(via, degrees)).astype(np.float32).reshape(b.shape)
    for name, groups, via in plan.batchnorms:
        rescale_batchnorm(net.params[name], lps[name], _factors(groups, scale, plan.powers(via, degrees)))


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


def forward_estimating_degrees(net, layers: Sequence[str], factor: float = 1.25) -> Dict[str, float]:
    """Run ``net`` forward and return the effective degree of each layer in ``layers``.

    The degree ``d`` of layer f at the current activations x is the secant slope
    ``log(|f(factor x)|_c / |f(x)|_c) / log(factor)`` of its output's channel-centred norm
    (``d = 1`` for a homogeneous layer, ``1 - 2 beta`` for an LRN whose sum term dominates).
    Each listed layer runs twice more, on its scaled and then its real input, which works for
    in-place layers too; the blobs end as after a plain forward pass. Works on both engines.
    """
    names = list(net.layer_names)
    index = {n: i for i, n in enumerate(names)}
    lps = {lp.name: lp for lp in net.net_param.layer}
    todo = sorted((index[n] for n in layers if n in index))
    pos = 1 if net.net_param.layer[0].type == "Input" else 0
    degrees: Dict[str, float] = {}
    for i in todo:
        if i > pos:
            net.forward(start=names[pos], end=names[i - 1])
        lp = lps[names[i]]
        bottom, top = net.blobs[lp.bottom[0]], net.blobs[lp.top[0]]
        x = np.array(bottom.data)
        set_data(net, lp.bottom[0], x * np.float32(factor))
        net.forward(start=names[i], end=names[i])
        y2 = _centred_norm(top.data)
        set_data(net, lp.bottom[0], x)
        net.forward(start=names[i], end=names[i])
        y1 = _centred_norm(top.data)
        d = math.log(y2 / y1) / math.log(factor) if y1 > 0 and y2 > 0 else 1.0
        degrees[names[i]] = float(min(max(d, -3.0), 3.0)) if math.isfinite(d) else 1.0
        pos = i + 1
    if pos < len(names):
        net.forward(start=names[pos])
    return degrees


def _centred_norm(a: np.ndarray) -> float:
    x = np.asarray(a, np.float64)
    if x.ndim >= 2:
        x = x.reshape(x.shape[0], x.shape[1], -1)
        x = x - x.mean(axis=(0, 2), keepdims=True)
    return float(np.sqrt(np.sum(x * x)))
