"""The effective degrees of stage 3's inexact layers (LRN, Sigmoid, TanH...): how a layer's
output and the gradients through it scale when its input is scaled, measured as secants on the
net's current activations. Stage 3's rate model (:mod:`caffe_utils.magic.solve`) takes them
where no exact scale rule passes a scale (:mod:`caffe_utils.magic.between`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from caffe_utils.magic.plan import ScalePlan
from caffe_utils.magic.within import image_moments


@dataclass
class DegreeProbe:
    """A degree layer's input ``x`` on the check batch, the direction ``u`` of its backward
    degree, and once measured its response at ``x`` (:func:`_response`): the secants of every
    step from ``x`` share it, so it is measured once while ``x`` holds."""
    x: np.ndarray
    u: np.ndarray
    at_x: Optional[Tuple[float, float]] = None


#: per degree layer, its :class:`DegreeProbe` on the check batch
DegreeInputs = Dict[str, DegreeProbe]
#: per input shape, the random direction u of a backward degree (drawn once, see :func:`_direction`)
Directions = Dict[Tuple[int, ...], np.ndarray]


def forward_estimating_degrees(net, layers: Sequence[str], factor: float = 1.25) -> Dict[str, float]:
    """Run ``net`` forward and return the effective degree of each layer in ``layers``.

    The degree ``d`` of layer f at the current activations x is the secant slope
    ``log(|f(factor x)|_c / |f(x)|_c) / log(factor)`` of its output's channel-centred norm
    (``d = 1`` for a homogeneous layer, ``1 - 2 beta`` for an LRN whose sum term dominates).
    Each listed layer runs twice more, on its scaled and then its real input, which works for
    in-place layers too; the blobs end as after a plain forward pass. Works on both engines.
    """
    return _secant_degrees(net, layers, lambda name, x: (np.float32(factor), factor))[0]


def step_degrees(net, plan: ScalePlan, rho: np.ndarray, degrees: Mapping[str, float], local: bool = False,
                 finish: bool = True, inputs: Optional[DegreeInputs] = None,
                 directions: Optional[Directions] = None) -> Tuple[Dict[str, float], Dict[str, float]]:
    """The effective degree of each of the plan's degree layers along the rescaling ``rho``
    (log scales over group ids): the secant slope from the current input x to the input
    ``R x`` the rescaling gives it (``R`` from :meth:`ScalePlan.input_factors`, through the
    upstream inexact layers at ``degrees``), ``log(|f(R x)|_c / |f(x)|_c) / log(|R x|_c /
    |x|_c)``. An LRN that a large step pushes from its linear regime into its saturating one
    passes that step with a degree far from its local one. A step too small to measure gets
    the local degree (factor 1.25), and so does every layer with ``local``. With the degrees,
    the backward degrees (see :func:`_secant_degrees`, also for ``inputs`` and
    ``directions``); with ``finish`` the blobs end as after a plain forward pass."""
    def step(name: str, x: np.ndarray):
        f = None if local else plan.input_factors(name, rho, degrees)
        if f is not None and f.size == int(np.prod(x.shape[1:])):
            f = f.reshape(x.shape[1:]).astype(np.float32)
            base = _centred_norm(x)
            gain = _centred_norm(x * f) / base if base > 0 else 1.0
            if gain > 0 and abs(math.log(gain)) >= 1e-3:
                return f, gain
        return np.float32(1.25), 1.25

    return _secant_degrees(net, plan.degree_layers, step, finish, inputs, directions)


def _secant_degrees(net, layers: Sequence[str], step, finish: bool = True, inputs: Optional[DegreeInputs] = None,
                    directions: Optional[Directions] = None) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Per layer of ``layers``, its degree ``d = log(|f(F x)|_c / |f(x)|_c) / log(gain)`` for
    ``(F, gain) = step(name, x)`` at its current input x, and its backward degree
    ``e = 1 + log(|J(F x) u| / |J(x) u|) / log(gain)`` for the layer's Jacobian J along a
    fixed random direction u (forward differences): how a gradient through it scales
    (``e = d`` for a homogeneous f). Both clipped to [-3, 3].

    ``inputs``, when given, keeps each layer's x and u (and its response at x): an empty one is
    filled by the forward pass, and a full one (from an earlier call at the same weights and net
    input) replaces that pass and the responses at x, so that only the listed layers run, at
    their stepped inputs; with ``finish`` the whole net then runs.
    ``directions``, when given, keeps the drawn u by shape across calls (whose ``inputs`` the
    caller empties at every rescaling)."""
    names = list(net.layer_names)
    index = {n: i for i, n in enumerate(names)}
    lps = {lp.name: lp for lp in net.net_param.layer}
    order = sorted(index[n] for n in layers if n in index)
    if any(len(lps[names[i]].bottom) != 1 for i in order):
        inputs = None  # a second bottom would be stale without the forward pass
    known = inputs is not None and bool(order) and all(names[i] in inputs for i in order)
    pos = 1 if net.net_param.layer[0].type == "Input" else 0
    degrees: Dict[str, float] = {}
    back: Dict[str, float] = {}
    for i in order:
        lp = lps[names[i]]
        if known:
            probe = inputs[names[i]]
        else:
            if i > pos:
                net.forward(start=names[pos], end=names[i - 1])
            x = np.array(net.blobs[lp.bottom[0]].data)
            probe = DegreeProbe(x, _direction(x.shape, directions))
            if inputs is not None:
                inputs[names[i]] = probe
        f, gain = step(names[i], probe.x)
        y2, j2 = _response(net, lp, names[i], probe.x * f, probe.u)
        if probe.at_x is None:  # a fresh probe: last, so that the blobs hold the real output
            probe.at_x = _response(net, lp, names[i], probe.x, probe.u)
        y1, j1 = probe.at_x
        degrees[names[i]] = _clip_degree(math.log(y2 / y1) / math.log(gain) if y1 > 0 and y2 > 0 else 1.0)
        e = 1.0 + math.log(j2 / j1) / math.log(gain) if j1 > 0 and j2 > 0 else degrees[names[i]]
        back[names[i]] = _clip_degree(e)
        pos = i + 1
    if finish and known:
        net.forward()
    elif finish and pos < len(names):
        net.forward(start=names[pos])
    return degrees, back


def _response(net, lp, name: str, x: np.ndarray, u: np.ndarray) -> Tuple[float, float]:
    """Layer ``lp``'s output's centred norm at input ``x``, and the norm of its derivative
    along the unit-variance direction ``u`` (a forward difference of relative size 1e-3); the
    layer's top holds ``f(x)`` afterwards."""
    h = np.float32(1e-3 * math.sqrt(_sum_squares(x) / max(x.size, 1)) or 1e-3)
    top = net.blobs[lp.top[0]]
    shifted = x + h * u
    net.set_data(lp.bottom[0], shifted)
    net.forward(start=name, end=name)
    shifted[...] = top.data
    net.set_data(lp.bottom[0], x)
    net.forward(start=name, end=name)
    # f(x + hu) - f(x) in float32 is exact where the two are within a factor 2 of each other
    diff = np.subtract(shifted, top.data, out=shifted)
    return _centred_norm(top.data), math.sqrt(_sum_squares(diff)) / float(h)


def _direction(shape: Tuple[int, ...], directions: Optional[Directions] = None) -> np.ndarray:
    """The fixed random direction (float32) of a backward degree at an input of ``shape``: the
    same for every probe, so the degrees of two rounds differ by the net only; taken from
    ``directions`` when drawn before, and kept there."""
    if directions is not None and shape in directions:
        return directions[shape]
    u = np.random.RandomState(0).standard_normal(shape).astype(np.float32)
    if directions is not None:
        directions[shape] = u
    return u


def _clip_degree(d: float) -> float:
    return float(min(max(d, -3.0), 3.0)) if math.isfinite(d) else 1.0


def _sum_squares(a: np.ndarray) -> float:
    """The sum of squares of float32 ``a``, accumulated in float64 an image at a time."""
    x = np.asarray(a)
    if x.ndim < 2:
        return float(np.sum(np.square(x, dtype=np.float64)))
    return float(image_moments(x, x.shape[0])[1].sum())


def _centred_norm(a: np.ndarray) -> float:
    """The norm of ``a`` (N, C, ...) with each channel's mean over images and positions taken
    out: from float64 sums per channel, an image at a time (no float64 copy of ``a``)."""
    x = np.asarray(a)
    if x.ndim < 2:
        return math.sqrt(_sum_squares(x))
    s1, s2, count = image_moments(x, x.shape[0])
    return math.sqrt(max(float(np.sum(s2 - s1 * s1 / max(count, 1))), 0.0))
