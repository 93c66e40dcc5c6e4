"""Stage 3's bookkeeping: where each affine layer's scale goes, and applying a rescaling.

Scaling affine layer k's weights and bias by ``r`` scales its output channels by ``r``. To keep
the net's function, the scale is undone where those channels arrive next: in the input columns
of each consuming affine layer, in BatchNorm layers with stored statistics (which absorb it), and
along in the biases of Scale/Bias layers on the way. Producers whose outputs are summed (Eltwise
SUM/MAX) form one group that shares one scale; groups whose channels reach a net output (or a
Softmax/loss) unchanged are pinned, since rescaling them would change the output.

How each layer type passes a per-channel scale on is its *scale rule*
(:mod:`caffe_utils.magic.scale_rules`); :func:`build_plan` runs the rules in net order.
Layers that are not positively homogeneous (LRN, Sigmoid, TanH, ...) let a scale pass but
cannot undo it exactly (LRN can, where its ``alpha`` may change too: ``ScalePlan.lrn_groups``):
they are listed in ``ScalePlan.inexact``, and the plan records which of
them each undone channel passed (``via``), so that with their effective degrees ``d``
(``f(r x) ~ r^d f(x)``) a scale ``r`` is undone as ``r^(d1 d2 ...)``.

Frozen layers (weights with ``lr_mult: 0``) are rescaled like any other, but their change rates
do not count: training never changes them.

Works on any engine net (numpy or pycaffe): it reads ``net_param``, blob shapes and params.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Set, Tuple

import numpy as np

from caffe_utils import layout
from caffe_utils.magic import scale_rules
from caffe_utils.magic.scale_rules import UNSCALED


@dataclass
class Consumer:
    """Input columns of an affine layer, with the group that scales each input channel/column."""
    layer: str
    layer_type: str
    groups: np.ndarray  # per input channel (conv/deconv) or per input column (InnerProduct)
    via: Optional[np.ndarray] = None  # per input channel/column: index into ScalePlan.paths


@dataclass
class ScalePlan:
    """Every affine layer's scale group, and every place a group's scale is undone or pinned."""
    affine: List[str]
    group_of: Dict[str, int]
    consumers: List[Consumer] = field(default_factory=list)
    batchnorms: List[Tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)  # (layer, groups, via)
    biases: List[Tuple[str, int, np.ndarray, np.ndarray]] = field(default_factory=list)  # (layer, blob, groups, via)
    pinned: Set[int] = field(default_factory=set)
    inexact: List[str] = field(default_factory=list)
    paths: List[Tuple[str, ...]] = field(default_factory=lambda: [()])  # inexact layers passed, per via index
    unknown: List[str] = field(default_factory=list)  # layers reached by a scale whose type has no rule
    frozen: List[str] = field(default_factory=list)  # affine layers whose weights do not learn (lr_mult 0)
    #: per inexact elementwise layer: the group and the via of each element of its input
    inexact_inputs: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: LRN layers whose alpha a rescaling scales by 1/r^2 (``build_plan(lrn_alpha=True)``), each
    #: with the group r is the scale of
    lrn_groups: List[Tuple[str, int]] = field(default_factory=list)

    @property
    def degree_layers(self) -> List[str]:
        """The inexact layers whose degree changes how a scale arrives somewhere, in net order."""
        seen = {name for path in self.paths for name in path}
        return [name for name in self.inexact if name in seen]

    @property
    def undone_at(self) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """Per place a scale is undone (a consumer's input columns, a BatchNorm's channels):
        the group of each channel and the inexact layers it passed on its way (``via``)."""
        return [(c.groups, c.via) for c in self.consumers] + [(g, v) for _, g, v in self.batchnorms]

    @property
    def inexact_groups(self) -> Set[int]:
        """The groups some of whose channels pass an inexact layer before their scale is undone:
        rescaling one of them changes what the net computes. Rescaling any other group changes
        no layer's input pattern, so the rate model is exact for it."""
        out: Set[int] = set()
        passed_any = np.array([bool(p) for p in self.paths])  # per via index: an inexact layer
        for groups, via in self.undone_at + [(g, v) for _, _, g, v in self.biases]:
            if via is not None:
                out.update(int(g) for g in np.unique(groups[passed_any[via]]) if g != UNSCALED)
        for groups, _ in self.inexact_inputs.values():
            out.update(int(g) for g in np.unique(groups) if g != UNSCALED)
        return out

    def powers(self, via: Optional[np.ndarray], degrees: Optional[Mapping[str, float]]) -> Optional[np.ndarray]:
        """The exponent with which each channel of ``via`` receives its producer's scale."""
        if via is None or not degrees:
            return None
        per_path = np.array([float(np.prod([degrees.get(n, 1.0) for n in path])) for path in self.paths])
        return per_path[via]

    def input_factors(self, layer: str, rho: np.ndarray, degrees: Mapping[str, float]) -> Optional[np.ndarray]:
        """Per element of inexact layer ``layer``'s input (one image): the factor its scale
        arrives with when the groups are scaled by ``exp(rho)`` (rho over group ids, its last
        slot 0 for the unscaled); None when the plan does not know the layer's input."""
        if layer not in self.inexact_inputs:
            return None
        groups, via = self.inexact_inputs[layer]
        g = np.where(groups == UNSCALED, len(rho) - 1, groups)
        return np.exp(rho[g] * self.powers(via, degrees)) if degrees else np.exp(rho[g])

    @property
    def groups(self) -> "OrderedDict[int, List[str]]":
        out: "OrderedDict[int, List[str]]" = OrderedDict()
        for name in self.affine:
            out.setdefault(self.group_of[name], []).append(name)
        return out

    @property
    def pinned_layers(self) -> List[str]:
        return [n for n in self.affine if self.group_of[n] in self.pinned]


def build_plan(net, lrn_alpha: bool = False) -> ScalePlan:
    """Trace every affine layer's output channels to where their scale can be undone; with
    ``lrn_alpha``, LRN layers whose whole input one group scales undo it in their alpha."""
    trace = scale_rules.Trace(net, lrn_alpha)
    for lp in net.net_param.layer:
        trace.visit(lp)
    for name in net.outputs:
        if name in trace.fmaps:
            trace.pinned_raw.append(trace.fmaps[name])
    uf = trace.uf
    pinned = {uf.find(int(g)) for arr in trace.pinned_raw for g in np.unique(arr) if g != UNSCALED}
    lookup = np.array([uf.find(i) for i in range(len(trace.affine))] + [UNSCALED], np.int32)

    def root(groups: np.ndarray) -> np.ndarray:
        return lookup[groups]  # UNSCALED (-1) indexes the trailing UNSCALED entry

    return ScalePlan(
        affine=trace.affine, group_of={name: uf.find(trace.ids[name]) for name in trace.affine},
        consumers=[Consumer(n, t, root(g), v) for n, t, g, v in trace.consumers],
        batchnorms=[(n, root(g), v) for n, g, v in trace.batchnorms],
        biases=[(n, j, root(g), v) for n, j, g, v in trace.biases],
        pinned=pinned, inexact=trace.inexact, paths=trace.paths, unknown=trace.unknown,
        inexact_inputs={n: (root(g), v) for n, (g, v) in trace.inexact_inputs.items()},
        lrn_groups=[(n, int(lookup[g])) for n, g in trace.lrn_groups],
        frozen=[lp.name for lp in net.net_param.layer if lp.name in trace.ids and _frozen(lp)])


def _frozen(lp) -> bool:
    """The layer's weights do not learn (``param { lr_mult: 0 }``, e.g. FCN's bilinear
    upsampling): their change rate is zero in training, whatever stage 3 measures."""
    return bool(lp.param) and lp.param[0].lr_mult == 0


def _factors(groups: np.ndarray, scale: Mapping[int, float], powers: Optional[np.ndarray] = None) -> np.ndarray:
    lookup = np.ones(max([int(groups.max()) + 1 if groups.size else 0] + [g + 1 for g in scale]), np.float64)
    for g, r in scale.items():
        lookup[g] = r
    f = np.ones(groups.shape, np.float64)
    mask = groups != UNSCALED
    f[mask] = lookup[groups[mask]]
    return f if powers is None else f ** powers


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
            layout.scale_rows(lps[name], net.params[name], np.full(layout.num_output(lps[name]), r))
    for c in plan.consumers:
        f = _factors(c.groups, scale, plan.powers(c.via, degrees))
        layout.scale_columns(lps[c.layer], net.params[c.layer], 1.0 / f)
    for name, j, groups, via in plan.biases:
        b = net.params[name][j].data
        b *= _factors(groups, scale, plan.powers(via, degrees)).astype(np.float32).reshape(b.shape)
    for name, groups, via in plan.batchnorms:
        rescale_batchnorm(net.params[name], lps[name], _factors(groups, scale, plan.powers(via, degrees)))
    alphas = {name: float(lps[name].lrn_param.alpha) / scale[g] ** 2 for name, g in plan.lrn_groups if g in scale}
    if alphas:
        net.set_lrn_alphas(alphas)


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
