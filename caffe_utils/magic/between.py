"""Stage 3: between-layer scale adjustment (the paper's Algorithm 2).

With a fixed random Gaussian top gradient ``eta`` on a fixed batch, every affine layer's change
rate C_k = sqrt(|dW_k|^2 / |W_k|^2) is measured, and the layers are rescaled (undone downstream,
:mod:`caffe_utils.magic.plan`) until every rate is within ``tolerance`` of a common target or
``iterations`` rounds are done. The rounds:

* **calibration**: the fixed batch's rates differ from the expectation over images and gradients
  by a per-layer factor that rescaling does not change, so it is measured once over
  ``rate_images`` images with a fresh ``eta`` per batch and applies to every round;
* **target**: the rate that the pinned layers (the net's output layers, which cannot be
  rescaled) reach too, the geometric mean on homogeneous chains
  (:func:`propagation.reachable_target`);
* **step**: each group's own correction is ``damping/2 * log(C_g / target)``; the scale it
  inherits from the groups feeding it is added (:func:`propagation.cumulative_log_scales`), so
  every log rate moves the fraction ``damping`` of its way. LRN, Sigmoid, TanH... pass a scale r
  as r^d with an effective degree d measured each round (:func:`forward_estimating_degrees`);
* **check**: the net's outputs on the batch before and after must agree (up to the layers that
  cannot undo a scale exactly): the report's output deviation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from caffe_utils import layout, measure
from caffe_utils.magic import propagation
from caffe_utils.magic.context import InitContext
from caffe_utils.magic.plan import ScalePlan, apply_scales, build_plan

Energies = Dict[str, Tuple[np.ndarray, np.ndarray]]


@dataclass
class Rates:
    """One measurement on the fixed batch: change rates, their column CVs and the effective
    degrees of the plan's inexact layers."""
    rates: Dict[str, float]
    cvs: Dict[str, float]
    degrees: Dict[str, float]

    def calibrated(self, factors: Mapping[str, float]) -> "Rates":
        return Rates({n: r * factors[n] for n, r in self.rates.items()}, self.cvs, self.degrees)


def equalize(ctx: InitContext) -> None:
    """Measure the change rates and, unless ``--no-between``, equalize them; fill the report."""
    net, opts, report = ctx.net, ctx.opts, ctx.report
    plan = build_plan(net)
    report.inexact_layers = list(plan.inexact)
    report.pinned_layers = plan.pinned_layers
    report.unknown_scale_layers = list(plan.unknown)
    affine_lps = [lp for lp in net.net_param.layer if lp.type in layout.AFFINE_TYPES]
    with measure.param_diffs_only(net):
        batch = _fixed_batch(ctx)
        averaged = _averaged_rates(ctx, affine_lps)
        net.set_data(ctx.prepared.input_name, batch)
        out_rng = np.random.RandomState(opts.seed + 1)
        eta = {o: out_rng.standard_normal(net.blobs[o].data.shape).astype(np.float32) for o in net.outputs}
        first = measure_rates(net, affine_lps, eta, plan.degree_layers, with_cv=True)
        # measure_rates' forward pass left the outputs as the unscaled net computes them
        before = {o: np.array(net.blobs[o].data, np.float64) for o in net.outputs}
        kappa = _calibration_factors(first.rates, averaged)
        now = first.calibrated(kappa)
        for n, r in now.rates.items():
            ctx.layers[n].rate_before, ctx.layers[n].cv_before = r, now.cvs[n]
        report.flatness_before = measure.flatness(now.rates)
        if opts.between:
            now = _rounds(ctx, plan, affine_lps, eta, kappa, now)
        cvs = _column_cvs(net, affine_lps)
        for n, r in now.rates.items():
            ctx.layers[n].rate_after, ctx.layers[n].cv_after = r, cvs[n]
        report.flatness_after = measure.flatness(now.rates)
        _activation_stats(ctx, affine_lps)
        if opts.between:
            report.output_deviation = _output_deviation(net, before)
            report.function_preserved = report.output_deviation <= 1e-4


def _fixed_batch(ctx: InitContext) -> np.ndarray:
    """The images of the rounds: --batch-size of them, or fewer when the blobs' data and diffs
    would not fit in --mem-limit (the calibration keeps the rates' estimate from depending on
    it); the net's input is reshaped to match."""
    net, opts, name = ctx.net, ctx.opts, ctx.prepared.input_name
    size = between_batch(net, opts.batch_size, opts.mem_limit)
    if size < net.blobs[name].data.shape[0]:
        net.blobs[name].reshape(size, *net.blobs[name].data.shape[1:])
        net.reshape()
    batch = ctx.sample[:size]
    if batch.shape[0] < size:
        batch = np.concatenate([batch] * int(math.ceil(size / batch.shape[0])))[:size]
    return batch


def between_batch(net, batch_size: int, mem_limit: int) -> int:
    """How many images stage 3's batch holds: ``batch_size``, or fewer when the blobs' data and
    diffs would not fit in ``mem_limit`` bytes."""
    per_image = sum(2 * 4 * int(np.prod(b.data.shape[1:])) for b in net.blobs.values())
    return int(max(1, min(batch_size, mem_limit // max(per_image, 1))))


def _averaged_rates(ctx: InitContext, affine_lps) -> Optional[Dict[str, float]]:
    """The change rates over up to ``rate_images`` images with a fresh top gradient per batch
    (None when the sample is no larger than one batch).

    The rounds re-measure on one batch under one fixed gradient (cheap and deterministic),
    whose rates differ from this expectation by a per-layer factor (conv1's rate depends much
    on the images) that rescaling does not change. Measured before the fixed batch, so that
    the diffs the first round reads (the columns' gradient energies) are the fixed batch's."""
    opts, sample = ctx.opts, ctx.sample
    n_cal = min(int(sample.shape[0]), max(opts.rate_images, opts.batch_size))
    if n_cal <= opts.batch_size:
        return None
    return measure.rates_of(measure.measure(ctx.net, ctx.prepared.input_name, sample[:n_cal], seed=opts.seed + 2,
                                            layers=[lp.name for lp in affine_lps]))


def _calibration_factors(rates: Mapping[str, float], averaged: Optional[Mapping[str, float]]) -> Dict[str, float]:
    """Per layer, averaged rate / fixed-batch rate (1 where either is unusable)."""
    if averaged is None:
        return {n: 1.0 for n in rates}
    return {n: (averaged[n] / r if r > 0 and math.isfinite(r) and averaged[n] > 0 else 1.0)
            for n, r in rates.items()}


def measure_rates(net, affine_lps, eta: Mapping[str, np.ndarray], degree_layers: Sequence[str],
                  with_cv: bool = False) -> Rates:
    """Change rates under the fixed top gradient ``eta`` (and the columns' rate variation with
    ``with_cv``), and the effective degrees of ``degree_layers``."""
    degrees = forward_estimating_degrees(net, degree_layers)
    for name, e in eta.items():
        net.blobs[name].diff[...] = e
    net.clear_param_diffs()
    net.backward()
    rates = {}
    for lp in affine_lps:
        w = net.params[lp.name][0]
        rates[lp.name] = measure.change_rate(measure.sq(w.diff), measure.sq(w.data))
    return Rates(rates, _column_cvs(net, affine_lps) if with_cv else {}, degrees)


def _column_cvs(net, affine_lps) -> Dict[str, float]:
    """Coefficient of variation of the change rate across each layer's input columns, from
    the parameter diffs of the last measurement."""
    cvs = {}
    for lp in affine_lps:
        col = layout.column_energies(layout.input_columns(lp, net.params[lp.name][0].diff))
        cvs[lp.name] = float(col.std() / col.mean()) if col.mean() > 0 else float("nan")
    return cvs


def _rounds(ctx: InitContext, plan: ScalePlan, affine_lps, eta: Mapping[str, np.ndarray],
            kappa: Mapping[str, float], now: Rates) -> Rates:
    """Rescale until every rate is within ``tolerance`` of the target, at most ``iterations``
    times; the last measurement."""
    net, opts, report = ctx.net, ctx.opts, ctx.report
    lps = {lp.name: lp for lp in net.net_param.layer}
    it = 0
    for it in range(1, opts.iterations + 1):
        ctx.tick("between-layer", it - 1, opts.iterations)
        energies = _energies(net, plan, lps)
        target = _target(plan, now.rates, now.degrees, energies)
        if _within(now.rates, target, opts.tolerance):
            report.converged = True
            it -= 1
            break
        own = {}
        for g, members in plan.groups.items():
            cg = _geomean([now.rates[m] for m in members])
            if g not in plan.pinned and math.isfinite(cg) and cg > 0:
                own[g] = (opts.damping / 2.0) * math.log(cg / target)
        rho = propagation.cumulative_log_scales(plan, own, energies, now.degrees)
        apply_scales(net, plan, {g: math.exp(r) for g, r in rho.items()}, now.degrees)
        now = measure_rates(net, affine_lps, eta, plan.degree_layers).calibrated(kappa)
        report.flatness_rounds.append(measure.flatness(now.rates))
    else:
        target = _target(plan, now.rates, now.degrees, _energies(net, plan, lps))
        report.converged = _within(now.rates, target, opts.tolerance)
    ctx.tick("between-layer", opts.iterations, opts.iterations)
    report.iterations = it
    return now


def _within(rates: Mapping[str, float], target: float, tolerance: float) -> bool:
    return all(abs(r / target - 1) <= tolerance for r in rates.values() if math.isfinite(r) and r > 0)


def _geomean(values: Sequence[float]) -> float:
    v = [x for x in values if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def _target(plan: ScalePlan, rates: Mapping[str, float], degrees: Mapping[str, float], energies: Energies) -> float:
    """The common change rate to aim for: the one that the pinned layers (whose output is the
    net's output) reach too (see :func:`propagation.reachable_target`); without pinned layers
    the geometric mean of all rates, which keeps the overall learning speed."""
    log_rates = {}
    for g, members in plan.groups.items():
        cg = _geomean([rates[m] for m in members])
        if math.isfinite(cg) and cg > 0:
            log_rates[g] = math.log(cg)
    t = propagation.reachable_target(plan, log_rates, energies, degrees) if log_rates else None
    return math.exp(t) if t is not None else _geomean(rates.values())


def _energies(net, plan: ScalePlan, lps) -> Energies:
    """Per consumer: the gradient and weight energy of each input column (last backward pass)."""
    return {c.layer: (layout.input_energies(lps[c.layer], net.params[c.layer][0].diff),
                      layout.input_energies(lps[c.layer], net.params[c.layer][0].data))
            for c in plan.consumers}


def _activation_stats(ctx: InitContext, affine_lps) -> None:
    """Every affine layer's output statistics on the batch (:func:`measure.activation_stats`)."""
    for name, (mean, std, cv) in measure.activation_stats(ctx.net, affine_lps).items():
        rep = ctx.layers[name]
        rep.act_mean, rep.act_std, rep.channel_std_cv = mean, std, cv


def _output_deviation(net, before: Mapping[str, np.ndarray]) -> float:
    """The largest change of any net output on the batch, relative to that output's largest
    magnitude: stage 3 must not change what the net computes (up to layers that cannot undo a
    scale exactly)."""
    dev = 0.0
    for o in net.outputs:
        ref = before[o]
        diff = float(np.max(np.abs(np.asarray(net.blobs[o].data, np.float64) - ref))) if ref.size else 0.0
        dev = max(dev, diff / max(float(np.max(np.abs(ref))), 1e-12))
    return dev


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
        net.set_data(lp.bottom[0], x * np.float32(factor))
        net.forward(start=names[i], end=names[i])
        y2 = _centred_norm(top.data)
        net.set_data(lp.bottom[0], x)
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
