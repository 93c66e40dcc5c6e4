"""Stage 3: between-layer scale adjustment (the paper's Algorithm 2), as a solve.

With a random Gaussian top gradient ``eta``, every affine layer's change rate
C_k = sqrt(E|dW_k|^2 / |W_k|^2) is equalized by rescaling layers and undoing the scale
downstream (:mod:`caffe_utils.magic.plan`), so that the net computes what it did. The steps:

* **calibration**: one pass over up to ``rate_images`` images, with a fresh ``eta`` per batch,
  measures every layer's gradient and weight energy per input channel
  (:class:`~caffe_utils.magic.solve.Energies`), and the effective degrees of the inexact layers;
* **solve**: under a rescaling those energies are closed-form functions of the scales
  (:class:`~caffe_utils.magic.solve.RateModel`), so the scales that bring every rate to one
  target are solved for without running the net (:func:`~caffe_utils.magic.solve.solve`);
  ``damping`` is the fraction of the solution applied per round;
* **correcting passes**: the model is exact on homogeneous paths, so a net without inexact
  layers needs no more passes. Behind LRN, Sigmoid, TanH... the model takes each inexact
  layer's degree and backward degree along the step itself
  (:func:`~caffe_utils.magic.degrees.step_degrees`), but rescaling a group whose channels pass
  such a layer (:attr:`~caffe_utils.magic.plan.ScalePlan.inexact_groups`) changes what the
  net computes, not just its scale. So each later round measures the calibration's first
  ``CHECK_IMAGES`` images again (same images and ``eta``) and takes their energies as the
  new estimate, and learns what the model got wrong as a linear correction of the log rates
  in the step (Broyden's update), at most ``iterations`` times;
* **polish**: the other groups' rescalings keep every layer's input pattern, so from each
  measured state the model solves them exactly with the inexact groups held
  (:func:`_polish`). A measured state is judged by the flatness its polish reaches, and the
  rounds stop once that is within ``tolerance`` of a common rate, or within its standard
  error where that is larger (the sample cannot tell such rates apart, and more passes would
  only fit them to its images): the calibration's, or where larger the spread of the
  measuring pass's own batches (:func:`_wider_errors`). A round whose polish is no flatter
  than the best state's is undone and also ends them (see :func:`_rounds`). The best state's
  polish is then applied without another pass;
* **LRN alphas**: with ``InitOptions.lrn_alpha`` an LRN under one scale takes it in its alpha
  (:func:`~caffe_utils.magic.scale_rules.lrn`) and needs no degree; the report lists the new
  alphas (``lrn_alphas``);
* **check**: the net's outputs on one batch before and after must agree (up to the layers that
  cannot undo a scale exactly): the report's output deviation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Dict, List, Mapping, Optional, Tuple

import numpy as np

from caffe_utils import layout, measure
from caffe_utils.magic.context import InitContext, param_diffs_off
from caffe_utils.magic.degrees import DegreeInputs, Directions, step_degrees
from caffe_utils.magic.plan import ScalePlan, apply_scales, build_plan
from caffe_utils.magic.report import RoundReport
from caffe_utils.magic.solve import Energies, RateModel, solve

#: per round, no group's log scale moves further than this behind inexact layers (a factor of
#: 1000): a safeguard for degrees measured far from where a step lands
INEXACT_MAX_STEP = math.log(1000.0)

#: how many of the calibration images (rounded up to whole batches) each correcting pass
#: measures again behind inexact layers: one batch alone corrects GoogLeNet's LRN-dependent
#: energies too noisily to converge (README, "How the between-layer stage converges")
CHECK_IMAGES = 32

def equalize(ctx: InitContext) -> None:
    """Measure the change rates and, unless ``--no-between``, equalize them; fill the report."""
    net, opts, report = ctx.net, ctx.opts, ctx.report
    plan = build_plan(net, opts.lrn_alpha)
    alphas = _lrn_alphas(net, plan)
    report.inexact_layers = list(plan.inexact)
    report.pinned_layers = plan.pinned_layers
    report.unknown_scale_layers = list(plan.unknown)
    report.frozen_layers = list(plan.frozen)
    passes = _Passes(ctx, plan)
    report.calibration_images = int(passes.images.shape[0])
    report.pass_images = int(passes.check_images.shape[0])
    with measure.param_diffs_only(net), passes.weight_diffs_off():
        now, before = passes.calibrate()
        _record(ctx, now, "before")
        for name, e in passes.errors.items():
            ctx.layers[name].rate_error = e
        report.flatness_before = measure.flatness(_trained(plan, now.rates()))
        if opts.between:
            now = _rounds(ctx, plan, passes, now)
        _record(ctx, now, "after")
        report.flatness_after = measure.flatness(_trained(plan, now.rates()))
        net.set_data(passes.input_name, passes.check_batch)
        _activation_stats(ctx, passes.lps)
        if opts.between:
            report.output_deviation = _output_deviation(net, before)
            report.function_preserved = report.output_deviation <= 1e-4
    report.lrn_alphas = {n: a for n, a in _lrn_alphas(net, plan).items() if a != alphas[n]}


def _lrn_alphas(net, plan: ScalePlan) -> Dict[str, float]:
    """The alpha of each LRN layer whose alpha a rescaling changes."""
    lps = {lp.name: lp for lp in net.net_param.layer}
    return {name: float(lps[name].lrn_param.alpha) for name, _ in plan.lrn_groups}


class _Passes:
    """Stage 3's measurements on the calibration images (see the module docstring); the net's
    input is reshaped to a batch whose data and diffs fit in ``mem_limit``."""

    def __init__(self, ctx: InitContext, plan: ScalePlan) -> None:
        net, opts, sample = ctx.net, ctx.opts, ctx.sample
        self.net, self.plan, self.input_name = net, plan, ctx.prepared.input_name
        self.lps = [lp for lp in net.net_param.layer if lp.type in layout.AFFINE_TYPES]
        size = between_batch(net, opts.batch_size, opts.mem_limit)
        if size < net.blobs[self.input_name].data.shape[0]:
            net.blobs[self.input_name].reshape(size, *net.blobs[self.input_name].data.shape[1:])
            net.reshape()
        self.batch = size
        self.images = sample[:min(int(sample.shape[0]), max(opts.rate_images, size))]
        self.check_batch = measure.padded_batch(self.images, 0, size)
        checked = min(int(self.images.shape[0]), -(-CHECK_IMAGES // size) * size)  # whole batches
        self.check_images = self.images[:checked]
        self.seed = opts.seed + 2
        self.measured = 0
        self.gram = _gram_layers(net, self.lps)
        self.errors: Dict[str, float] = {}
        #: the degree layers' inputs on the check batch at the net's current scales
        self.inputs: DegreeInputs = {}
        #: the random directions of the backward degrees, drawn once for the whole stage
        self.directions: Directions = {}

    def rescale(self, scale: Mapping[int, float], degrees: Mapping[str, float]) -> None:
        """Scale the plan's groups by ``scale`` (undone downstream, through the inexact layers
        at ``degrees``); the degree layers' inputs are then measured again."""
        apply_scales(self.net, self.plan, scale, degrees)
        self.inputs = {}

    def calibrate(self) -> Tuple[Energies, Dict[str, np.ndarray]]:
        """The energies over all calibration images, and the net's outputs on the check batch
        (the calibration's first batch), which the rescaled net must reproduce. Sets
        ``errors``, the standard errors of the calibration's log rates
        (:func:`~caffe_utils.measure.log_rate_errors`)."""
        degrees, back, resume = self._degrees()
        outputs: Dict[str, np.ndarray] = {}
        per_batch: Dict[str, List[float]] = {}
        full = self._gradients(self.images, resume, outputs, per_batch)
        self.errors = measure.log_rate_errors(per_batch)
        return Energies(full, self.weights(), degrees, back), outputs

    def correct(self) -> Tuple[Energies, Dict[str, float]]:
        """Measure the checked images again: their energies are the new estimate. Also the
        standard errors the rounds stop within at that state (:func:`_wider_errors`): the
        calibration's, or where larger the spread of this pass's own batches.

        Not the calibration's energies scaled by measured / predicted on the checked images:
        behind LRN layers that a rescaling pushed into saturation (GoogLeNet's conv1 output
        then has a std near 300), a change of an inexact group's scale by 0.1% changes the
        deeper activations by a few percent and each image's gradient energies as if it were
        another image, so such a ratio carries the noise of both samples into the estimate
        (README, "How the between-layer stage converges")."""
        self.measured += 1
        degrees, back, resume = self._degrees()
        per_batch: Dict[str, List[float]] = {}
        grad = self._gradients(self.check_images, resume, per_batch=per_batch)
        own = measure.log_rate_errors(per_batch, min_batches=2)
        return Energies(grad, self.weights(), degrees, back), _wider_errors(self.errors, own)

    def weights(self) -> Dict[str, np.ndarray]:
        """Every affine layer's weight energy per input channel/column, read from the net."""
        return {lp.name: layout.input_energies(lp, self.net.params[lp.name][0].data) for lp in self.lps}

    def step_degrees(self, rho: np.ndarray, degrees: Mapping[str, float]) -> Tuple[Dict[str, float], Dict[str, float]]:
        """The degree layers' degrees and backward degrees along the rescaling ``rho``, on the
        check batch."""
        self.net.set_data(self.input_name, self.check_batch)
        return step_degrees(self.net, self.plan, rho, degrees, finish=False, inputs=self.inputs,
                            directions=self.directions)

    def _degrees(self) -> Tuple[Dict[str, float], Dict[str, float], Optional[str]]:
        """The local degrees and backward degrees, on the check batch; and when they ran the
        check batch forward through the degree layers (their inputs were not kept), the layer
        a forward pass of the check batch goes on from (else None)."""
        if not self.plan.degree_layers:
            return {}, {}, None
        fresh = not self.inputs
        self.net.set_data(self.input_name, self.check_batch)
        degrees, back = step_degrees(self.net, self.plan, np.zeros(0), {}, local=True, finish=False,
                                     inputs=self.inputs, directions=self.directions)
        names = list(self.net.layer_names)
        last = max(names.index(n) for n in self.plan.degree_layers)
        return degrees, back, names[last + 1] if fresh and last + 1 < len(names) else None

    def _gradients(self, images: np.ndarray, resume: Optional[str] = None,
                   outputs: Optional[Dict[str, np.ndarray]] = None,
                   per_batch: Optional[Dict[str, List[float]]] = None) -> Dict[str, np.ndarray]:
        """``E_batch`` of each layer's gradient energy per input channel over ``images`` (the
        same top gradients for the same images). With ``resume``, the first batch, the check
        batch, has run through the layers before that one; an empty ``outputs`` gets the net's
        outputs on that batch; ``per_batch`` gets each batch's total gradient energy per
        image, per layer."""
        sums: Dict[str, np.ndarray] = {}
        counted = 0
        pending = [resume] if resume is not None else []

        def forward(valid: int) -> None:
            if pending:
                self.net.forward(start=pending.pop())
            else:
                self.net.forward()
            if outputs is not None and not outputs:
                outputs.update((o, np.array(self.net.blobs[o].data, np.float64)) for o in self.net.outputs)

        for valid in measure.gradient_batches(self.net, self.input_name, images, self.seed, forward):
            counted += valid
            for lp in self.lps:
                e = self._energies(lp)
                sums[lp.name] = e if lp.name not in sums else sums[lp.name] + e
                if per_batch is not None:
                    per_batch.setdefault(lp.name, []).append(float(e.sum()) / valid)
        return {n: e * (self.batch / counted) for n, e in sums.items()}

    def _energies(self, lp) -> np.ndarray:
        """Layer ``lp``'s gradient energy per input channel after a backward: from its weight
        diff, or for the :func:`_gram_layers` from its bottom data and top diff."""
        if lp.name not in self.gram:
            return layout.input_energies(lp, self.net.params[lp.name][0].diff)
        dy = self.net.blobs[lp.top[0]].diff
        rows = dy.size // int(lp.inner_product_param.num_output)
        x = self.net.blobs[lp.bottom[0]].data
        return layout.inner_product_gradient_energies(x.reshape(rows, -1), dy.reshape(rows, -1))

    def weight_diffs_off(self) -> ContextManager[None]:
        """Within the block the :func:`_gram_layers` compute no weight diff."""
        return param_diffs_off((layer, 0) for layer in self.gram.values())


def _gram_layers(net, lps) -> Dict[str, object]:
    """The InnerProduct layers (numpy engine, unshared weights) whose weight-gradient energies
    stage 3 takes from the Gram matrix of their gradient rows
    (:func:`~caffe_utils.layout.inner_product_gradient_energies`) instead of forming the
    gradient: where the rows are few against the weights' sides, that skips writing, zeroing
    and reading a diff as large as the weights (CaffeNet's fc6-fc8: 234 MB per batch)."""
    layers = getattr(net, "layers", [])
    names = list(net.layer_names) if layers else []
    out = {}
    for lp in lps:
        if lp.type != "InnerProduct" or any(p.name for p in lp.param) or lp.name not in names:
            continue
        layer = layers[names.index(lp.name)]
        w = net.params[lp.name][0].data
        rows = net.blobs[lp.top[0]].data.size // int(lp.inner_product_param.num_output)
        if hasattr(layer, "set_param_propagate_down") and 4 * rows <= min(w.shape):
            out[lp.name] = layer
    return out


def between_batch(net, batch_size: int, mem_limit: int) -> int:
    """How many images stage 3's batch holds: ``batch_size``, or fewer when the blobs' data and
    diffs would not fit in ``mem_limit`` bytes."""
    per_image = sum(2 * 4 * int(np.prod(b.data.shape[1:])) for b in net.blobs.values())
    return int(max(1, min(batch_size, mem_limit // max(per_image, 1))))


def _rounds(ctx: InitContext, plan: ScalePlan, passes: _Passes, now: Energies) -> Energies:
    """Solve, rescale and (behind inexact layers) correct by a measured pass, until every rate
    is within ``tolerance`` of a common one (after a measured round: or within its standard
    error at the best state, :func:`_flat`, :meth:`_Passes.correct`), at most ``iterations``
    rounds; the last energies.
    Behind inexact layers each measured state is judged by its :func:`_polish`, and a round
    can land flatter than predicted or not: a round that does not beat the best state so far
    is undone and ends the rounds. Behind saturated LRN layers such a round means the passes
    have reached the noise of their images: each further one draws new noise rather than
    coming closer (README, "The pass's own spread"). The best state's polish is applied
    last."""
    opts, report = ctx.opts, ctx.report
    exact = not plan.degree_layers
    correction = None
    best = _Best(plan, now, None if exact else _polish(plan, now), None if exact else passes.errors)
    for it in range(1, opts.iterations + 1):
        ctx.tick("between-layer", it - 1, opts.iterations)
        if _flat(best.judged(), opts.tolerance, best.errors if it > 1 else None):  # errors spare later rounds
            report.converged = True
            break
        rates = _trained(plan, now.rates())
        rho, model = _step(plan, passes, now, opts.damping, correction)
        predicted, aimed = _predict(plan, model, rho)
        if not _gains(aimed, rates) and correction is not None:
            correction = None  # what the last rounds learnt leaves no way down: solve without it
            rho, model = _step(plan, passes, now, opts.damping, correction)
            predicted, aimed = _predict(plan, model, rho)
        if not _gains(aimed, rates):
            break  # the model's optimum: no rescaling flattens the rates further
        scale = _scales(plan, rho)
        passes.rescale(scale, model.energies.degrees)
        report.iterations = it
        polish, errors = None, None
        if exact:
            now = predicted
            report.rounds.append(RoundReport(aimed))
        else:
            now, errors = passes.correct()
            correction = _broyden(model, rho, predicted, now)
            polish = _polish(plan, now)
            report.rounds.append(RoundReport(aimed, _trained(plan, now.rates()), polish.flatness))
        report.flatness_rounds.append(measure.flatness(_trained(plan, now.rates())))
        if not best.offer(now, polish, errors):
            _undo(passes.rescale, scale, model.energies.degrees)
            now = best.now
            break  # no flatter than the best state: the best state stands
    ctx.tick("between-layer", opts.iterations, opts.iterations)
    now = best.finish(passes)
    report.converged = report.converged or _flat(_trained(plan, now.rates()), opts.tolerance,
                                                 best.errors if report.iterations else None)
    report.passes = passes.measured
    return now


@dataclass
class _Polish:
    """What the groups for which the rate model is exact can still do from a measured state
    (:func:`_polish`): their log scales, the energies they lead to and those energies'
    flatness."""
    rho: np.ndarray
    energies: Energies
    flatness: float


def _polish(plan: ScalePlan, energies: Energies) -> _Polish:
    """The solve from ``energies`` with the inexact groups
    (:attr:`~caffe_utils.magic.plan.ScalePlan.inexact_groups`) held at their scales. Rescaling
    only the other groups changes no layer's input pattern, so the model predicts its rates
    exactly and applying it needs no measured pass. Behind GoogLeNet's saturated LRN layers a
    measured state's own rates carry the noise of a pass's few images in every layer, and
    the polish leaves that noise only in the layers next to the held groups."""
    model = RateModel(plan, energies)
    rho = solve(model, hold=plan.inexact_groups)
    predicted = model.predict(rho)
    return _Polish(rho, predicted, measure.flatness(_trained(plan, predicted.rates())))


def _scales(plan: ScalePlan, rho: np.ndarray) -> Dict[int, float]:
    """The scale factor of every group that log scales ``rho`` move."""
    return {g: math.exp(rho[g]) for g in plan.groups if rho[g] != 0.0}


def _predict(plan: ScalePlan, model: RateModel, rho: np.ndarray) -> Tuple[Energies, Dict[str, float]]:
    """The energies ``model`` predicts at ``rho``, and the learning layers' rates it predicts
    there with the correction the measured rounds taught it (what its solve aimed at)."""
    predicted = model.predict(rho)
    if model.correction is None:
        return predicted, _trained(plan, predicted.rates())
    logs, _ = model.log_rates(rho)
    return predicted, _trained(plan, {name: math.exp(v) if math.isfinite(v) else float("nan")
                                      for (name, *_), v in zip(model.layers, logs)})


def _gains(predicted: Mapping[str, float], rates: Mapping[str, float]) -> bool:
    """The ``predicted`` rates are flatter than ``rates``."""
    return measure.flatness(predicted) < measure.flatness(rates) * (1 - 1e-6)


class _Best:
    """The best state stage 3's rounds reached (the flattest, or behind inexact layers the
    one whose polish is flattest)."""

    def __init__(self, plan: ScalePlan, now: Energies, polish: Optional[_Polish],
                 errors: Optional[Dict[str, float]]) -> None:
        self.plan, self.now, self.polish = plan, now, polish
        #: the standard errors of the best state's log rates (None on exact nets: no stop within them)
        self.errors = errors
        self.flatness = self._score(now, polish)

    def _score(self, now: Energies, polish: Optional[_Polish]) -> float:
        return polish.flatness if polish is not None else measure.flatness(_trained(self.plan, now.rates()))

    def judged(self) -> Dict[str, float]:
        """The learning layers' rates the best state is judged by: its polish's, if any."""
        return _trained(self.plan, (self.polish.energies if self.polish is not None else self.now).rates())

    def offer(self, now: Energies, polish: Optional[_Polish], errors: Optional[Dict[str, float]]) -> bool:
        """Keep ``now`` (with its ``polish`` and standard ``errors``) if it beats the best so
        far; whether it did."""
        flatness = self._score(now, polish)
        if not flatness < self.flatness:
            return False
        self.now, self.polish, self.flatness, self.errors = now, polish, flatness, errors
        return True

    def finish(self, passes: _Passes) -> Energies:
        """Apply the best state's polish (the net is at the best state); the energies then."""
        if self.polish is None:
            return self.now
        passes.rescale(_scales(self.plan, self.polish.rho), self.now.degrees)
        self.now, self.polish = self.polish.energies, None
        return self.now


def _undo(rescale: Callable[[Dict[int, float], Dict[str, float]], None], scale: Mapping[int, float],
          degrees: Mapping[str, float]) -> None:
    """Undo a round's rescaling ``scale`` by ``rescale(scale, degrees)``, at the degrees it was
    applied with (the net then computes again what it did before the round, up to float32)."""
    rescale({g: 1.0 / r for g, r in scale.items()}, degrees)


def _broyden(model: RateModel, rho: np.ndarray, predicted: Energies, measured: Energies) -> np.ndarray:
    """The model's linear correction after a measured round (Broyden's update): whatever the
    model got wrong about the step ``rho`` is taken as linear in the step."""
    order = [name for name, *_ in model.layers]
    pred, meas = predicted.rates(), measured.rates()
    err = np.array([math.log(meas[n] / pred[n]) if meas[n] > 0 and pred[n] > 0 else 0.0 for n in order])
    err = np.where(np.isfinite(err), err, 0.0)
    base = np.zeros((len(order), rho.size)) if model.correction is None else model.correction
    err = err - base @ rho  # the corrected model's own error at the step
    norm = float(rho @ rho)
    return base + np.outer(err, rho) / norm if norm > 0 else base


def _step(plan: ScalePlan, passes: _Passes, now: Energies, damping: float,
          correction: Optional[np.ndarray] = None) -> Tuple[np.ndarray, RateModel]:
    """A round's log scales (the fraction ``damping`` of the solve's) and the model they were
    solved on. Behind inexact layers the model takes their degrees along the step itself
    (:func:`~caffe_utils.magic.degrees.step_degrees`), re-solved until those settle (at most 3
    times), and no group's log scale moves further than ``INEXACT_MAX_STEP``."""
    exact = not plan.degree_layers
    model = RateModel(plan, now, correction)
    rho = solve(model, max_step=None if exact else INEXACT_MAX_STEP) * damping
    for _ in range(0 if exact else 3):
        deg, back = passes.step_degrees(rho, model.energies.degrees)
        if all(abs(d - model.energies.degrees.get(n, 1.0)) < 1e-3 for n, d in deg.items()):
            break
        model = RateModel(plan, replace(now, degrees=deg, back_degrees=back), correction)
        rho = solve(model, max_step=INEXACT_MAX_STEP) * damping
    return rho, model


def _trained(plan: ScalePlan, rates: Mapping[str, float]) -> Dict[str, float]:
    """The rates of the layers that learn (frozen ones, lr_mult 0, never change)."""
    return {n: r for n, r in rates.items() if n not in plan.frozen}


def _flat(rates: Mapping[str, float], tolerance: float, errors: Optional[Mapping[str, float]] = None) -> bool:
    """Every finite rate is within ``tolerance`` of one common rate; with ``errors``, the
    standard errors of the log rates, each rate may instead be within its standard error of it
    where that is larger: the sample cannot tell such rates apart."""
    if not errors:
        return measure.flatness(rates) <= (1 + tolerance) / (1 - tolerance)
    half = 0.5 * math.log((1 + tolerance) / (1 - tolerance))
    bands = []
    for name, r in rates.items():
        if r > 0 and math.isfinite(r):
            e = errors.get(name, float("nan"))
            bands.append((math.log(r), max(half, e) if math.isfinite(e) else half))
    return bool(bands) and max(lo - w for lo, w in bands) <= min(lo + w for lo, w in bands)


def _wider_errors(calibration: Mapping[str, float], own: Mapping[str, float]) -> Dict[str, float]:
    """Per layer, the larger known standard error of the calibration's (``MIN_ERROR_BATCHES``
    batches, at the first state) and a measured pass's ``own`` (its few batches, at the state it
    measured). Behind saturated LRN layers a rescaling can make a layer's rate vary from image
    to image much more than at the first state: GoogLeNet's conv1 rate has a standard error of
    0.03-0.07 in log over the calibration's batches, and up to 0.4 over a later pass's two
    (README, "The pass's own spread"). Two batches tell that spread only roughly, so it can
    widen a band but not narrow one."""
    out = {}
    for name in set(calibration) | set(own):
        known = [e for e in (calibration.get(name, math.nan), own.get(name, math.nan)) if math.isfinite(e)]
        out[name] = max(known) if known else math.nan
    return out


def _record(ctx: InitContext, energies: Energies, when: str) -> None:
    cvs = energies.column_cvs()
    for name, r in energies.rates().items():
        setattr(ctx.layers[name], f"rate_{when}", r)
        setattr(ctx.layers[name], f"cv_{when}", cvs[name])


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
