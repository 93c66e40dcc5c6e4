"""Stage 3's model: every change rate as a closed-form function of the groups' scales, and its solve.

Scale every group g by ``s_g = exp(rho_g)`` and undo it downstream (:mod:`caffe_utils.magic.plan`).
Input channel (or column) j of affine layer k then carries ``s_c(j) ** p_j``, with ``c(j)`` its
producer's group and ``p_j`` the product of the effective degrees of the inexact layers it passed
(1 on homogeneous paths), while k's own output is scaled by ``s_k``. Per input channel, the
weight gradient's energy ``G_kj`` and the weights' energy ``E_kj`` move as

    G_kj -> G_kj (s_c(j)^p_j / s_k)^2,    E_kj -> E_kj (s_k / s_c(j)^p_j)^2,

so ``C_k^2 = sum_j G_kj / sum_j E_kj`` is known for every scale vector from one measurement of
``G`` and ``E``. On homogeneous paths (ReLU, max pooling, Eltwise, BatchNorm with stored
statistics, ...) this is exact; behind LRN, Sigmoid or TanH the degrees hold only near the
measured activations, which is what stage 3's measured passes correct.

:func:`solve` finds the log scales that bring every layer's log rate closest (least squares) to
one common target: the free groups' scales and the target are the unknowns; pinned groups (whose
output is the net's) keep scale 1 and move only by what their producers' scales do to them.
Without pinned groups every common rate is reachable, and the target stays the geometric mean of
the rates, which keeps the net's overall learning speed. Where not every rate can meet the
target (pinned heads at several depths of the net, as in SSD, over-determine the scales), the
fit is narrowed to the smallest spread of the log rates, which is the flatness the report shows.
Frozen layers (``lr_mult: 0``) are scaled but their rates do not count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from caffe_utils.magic.plan import ScalePlan
from caffe_utils.magic.scale_rules import UNSCALED


@dataclass
class Energies:
    """One measurement (or prediction) of stage 3's inputs: per affine layer, the gradient and
    weight energy of each input channel/column, and the effective degrees of the inexact
    layers the plan's scales pass."""
    grad: Dict[str, np.ndarray]
    weight: Dict[str, np.ndarray]
    degrees: Dict[str, float]
    #: per inexact layer, how a gradient through it scales (its degree where not measured)
    back_degrees: Dict[str, float] = field(default_factory=dict)

    def rates(self) -> Dict[str, float]:
        """The change rates ``sqrt(sum_j G_kj / sum_j E_kj)`` (nan where the weights are zero)."""
        out = {}
        for name, g in self.grad.items():
            w = float(self.weight[name].sum())
            out[name] = math.sqrt(float(g.sum()) / w) if w > 0 else float("nan")
        return out

    def column_cvs(self) -> Dict[str, float]:
        """Per layer, the coefficient of variation of the gradient energy across its input
        channels/columns (how unevenly the layer's inputs learn)."""
        return {name: float(g.std() / g.mean()) if g.size and g.mean() > 0 else float("nan")
                for name, g in self.grad.items()}


class RateModel:
    """The log change rates of the plan's affine layers as a function of the per-group log
    scales ``rho`` (an array over group ids), around the measurement ``energies``."""

    def __init__(self, plan: ScalePlan, energies: Energies, correction: Optional[np.ndarray] = None) -> None:
        self.plan, self.energies = plan, energies
        #: a linear correction of the log rates (layers x group slots), learnt from measured rounds
        self.correction = correction
        self.n = len(plan.affine)
        columns: Dict[str, List[np.ndarray]] = {}
        powers: Dict[str, List[np.ndarray]] = {}
        for c in plan.consumers:
            columns.setdefault(c.layer, []).append(c.groups)
            p = plan.powers(c.via, energies.degrees)
            powers.setdefault(c.layer, []).append(np.ones(c.groups.size) if p is None else p)
        self.layers: List[Tuple[str, int, np.ndarray, np.ndarray]] = []  # (name, group, columns' groups, powers)
        for name in plan.affine:
            size = energies.grad[name].size
            g = np.concatenate(columns[name]).astype(np.int64) if name in columns else np.full(size, UNSCALED)
            p = np.concatenate(powers[name]) if name in powers else np.ones(size)
            if g.size != size:  # the plan could not map this layer's inputs: they stay unscaled
                g, p = np.full(size, UNSCALED), np.ones(size)
            self.layers.append((name, plan.group_of[name], np.where(g == UNSCALED, self.n, g), p))
        self.own = _own_powers(plan, energies)
        frozen = set(plan.frozen)
        #: the layers whose rates count: frozen ones (lr_mult 0) never change in training
        self.counted = np.array([name not in frozen for name in plan.affine])

    def scaled(self, rho: np.ndarray) -> Iterator[Tuple[int, str, np.ndarray, np.ndarray]]:
        """Per layer: its index, name and the gradient and weight energies of its input
        channels at ``rho``: ``G (s_c^p / s_k^q)^2`` and ``E (s_k / s_c^p)^2`` (rho's last slot
        is 0: the unscaled inputs; ``q`` is 1 unless the layer's output passes inexact layers
        whose gradients scale unlike their outputs, see :func:`_own_powers`)."""
        for i, (name, g, cols, p) in enumerate(self.layers):
            arrive = p * rho[cols]
            yield (i, name, self.energies.grad[name] * np.exp(2 * (arrive - self.own[g] * rho[g])),
                   self.energies.weight[name] * np.exp(2 * (rho[g] - arrive)))

    def predict(self, rho: np.ndarray) -> Energies:
        """The energies after scaling the groups by ``exp(rho)``."""
        grad, weight = {}, {}
        for _, name, a, b in self.scaled(rho):
            grad[name], weight[name] = a, b
        return replace(self.energies, grad=grad, weight=weight)

    def log_rates(self, rho: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The log rates at ``rho`` and their Jacobian (layers x group slots)."""
        logs = np.full(len(self.layers), np.nan)
        jac = np.zeros((len(self.layers), self.n + 1))
        for i, name, a, b in self.scaled(rho):
            _, g, cols, p = self.layers[i]
            sa, sb = float(a.sum()), float(b.sum())
            if not (sa > 0 and sb > 0 and math.isfinite(sa) and math.isfinite(sb)):
                continue
            logs[i] = 0.5 * (math.log(sa) - math.log(sb))
            # d/d rho of 0.5 log sum a - 0.5 log sum b: the producers' part, then the own scale's
            # (each share sums to 1)
            jac[i] = np.bincount(cols, weights=p * (a / sa + b / sb), minlength=self.n + 1)
            jac[i, g] -= self.own[g] + 1.0
        if self.correction is not None:
            logs, jac = logs + self.correction @ rho, jac + self.correction
        jac[:, self.n] = 0.0
        return logs, jac


def _own_powers(plan: ScalePlan, energies: Energies) -> np.ndarray:
    """Per group id: the power ``q`` with which the group's own scale s divides the gradient
    of its layers' weights, ``s^-q``. On a homogeneous path ``q = 1``. When the group's output
    reaches every place it is undone through the same inexact layers L_1..L_m of degrees d_i
    and backward degrees e_i, the gradient comes back scaled by
    ``s^(sum_i P_(i-1) (e_i - 1) - P_m)`` with ``P_i = d_1 ... d_i``, so
    ``q = P_m - sum_i P_(i-1) (e_i - 1)`` (1 again where ``e_i = d_i``)."""
    vias: Dict[int, set] = {}
    for groups, via in plan.undone_at:
        if via is None:
            via = np.zeros(groups.size, np.int64)
        for g, v in zip(groups.tolist(), via.tolist()):
            vias.setdefault(g, set()).add(v)
    own = np.ones(len(plan.affine) + 1)
    for g, paths in vias.items():
        if g == UNSCALED or len(paths) != 1:
            continue
        prefix, q = 1.0, 0.0
        for layer in plan.paths[next(iter(paths))]:
            d = energies.degrees.get(layer, 1.0)
            q -= prefix * (energies.back_degrees.get(layer, d) - 1.0)
            prefix *= d
        own[g] = prefix + q
    return own


def solve(model: RateModel, max_step: Optional[float] = None, hold: AbstractSet[int] = frozenset()) -> np.ndarray:
    """The log scales (over group ids; pinned groups 0) that flatten the model's change rates
    as far as the plan allows: a least-squares fit of every counted log rate to one common
    target (:func:`_least_squares`), then, where the rates cannot all meet (pinned layers at
    several depths, tied groups), a narrowing of their spread, the log flatness, by sequential
    linear programs (:func:`_narrow`). ``max_step`` bounds every ``|rho_g|`` (a trust region
    for models that hold only near the measurement); the groups in ``hold`` keep scale 1, as
    pinned ones do."""
    plan = model.plan
    free = [g for g in plan.groups if g not in plan.pinned and g not in hold]
    rho = np.zeros(model.n + 1)
    logs, _ = model.log_rates(rho)
    ok = np.isfinite(logs) & model.counted
    if not ok.any() or not free:
        return rho
    fixed = plan.pinned or any(g in hold for g in plan.groups)
    rho = _least_squares(model, rho, free, ok, None if fixed else float(np.mean(logs[ok])), max_step)
    return _narrow(model, rho, free, ok, max_step)


def _clip(rho: np.ndarray, free: List[int], max_step: Optional[float]) -> np.ndarray:
    if max_step is not None:
        rho[free] = np.clip(rho[free], -max_step, max_step)
    return rho


def _least_squares(model: RateModel, rho: np.ndarray, free: List[int], ok: np.ndarray,
                   fixed_t: Optional[float], max_step: Optional[float], iterations: int = 100) -> np.ndarray:
    """Gauss-Newton on ``sum_k (log C_k - t)^2`` over the free groups' log scales and ``t``
    (``t = fixed_t`` where given: without pinned groups every common rate is reachable, and
    the geometric mean keeps the net's learning speed), with minimum-norm steps (groups the
    rates do not determine stay put) and backtracking."""
    logs, jac = model.log_rates(rho)
    t = float(np.mean(logs[ok])) if fixed_t is None else fixed_t
    res = logs[ok] - t
    obj = float(res @ res)
    for _ in range(iterations):
        a = jac[ok][:, free]
        if fixed_t is None:
            a = np.hstack([a, -np.ones((a.shape[0], 1))])
        step = np.linalg.lstsq(a, -res, rcond=1e-10)[0]
        alpha = 1.0
        while alpha > 1e-6:
            new = rho.copy()
            new[free] += alpha * step[:len(free)]
            new = _clip(new, free, max_step)
            nt = t + alpha * step[-1] if fixed_t is None else t
            n_logs, n_jac = model.log_rates(new)
            n_res = n_logs[ok] - nt
            n_obj = float(n_res @ n_res)
            if np.isfinite(n_obj) and n_obj < obj:
                break
            alpha *= 0.5
        else:
            break
        gain = obj - n_obj
        rho, t, obj, res, jac = new, nt, n_obj, n_res, n_jac
        if gain <= 1e-14 * max(1.0, obj) or obj < 1e-20:
            break
    return rho


def _narrow(model: RateModel, rho: np.ndarray, free: List[int], ok: np.ndarray,
            max_step: Optional[float], iterations: int = 50) -> np.ndarray:
    """Lower ``max_k log C_k - min_k log C_k`` from ``rho``: each step solves the linear
    program of the model linearized at the current scales within a trust region, and is kept
    when the model's own spread shrinks (the region halves otherwise)."""
    from scipy.optimize import linprog

    logs, jac = model.log_rates(rho)
    spread = float(np.ptp(logs[ok]))
    region = 1.0
    m = len(free)
    cost = np.r_[np.zeros(m), 1.0, -1.0]  # variables: the steps, the band's top u and bottom l
    for _ in range(iterations):
        if spread < 1e-9 or region < 1e-6:
            break
        a = jac[ok][:, free]
        k = a.shape[0]
        a_ub = np.block([[a, -np.ones((k, 1)), np.zeros((k, 1))], [-a, np.zeros((k, 1)), np.ones((k, 1))]])
        b_ub = np.r_[-logs[ok], logs[ok]]
        lo, hi = -region * np.ones(m), region * np.ones(m)
        if max_step is not None:
            lo, hi = np.maximum(lo, -max_step - rho[free]), np.minimum(hi, max_step - rho[free])
        bounds = list(zip(lo, hi)) + [(None, None), (None, None)]
        lp = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
        if lp.status != 0 or lp.fun >= spread - 1e-12:
            break
        new = rho.copy()
        new[free] += lp.x[:m]
        n_logs, n_jac = model.log_rates(new)
        n_spread = float(np.ptp(n_logs[ok])) if np.all(np.isfinite(n_logs[ok])) else math.inf
        if n_spread < spread - 1e-12:
            rho, logs, jac, spread = new, n_logs, n_jac, n_spread
        else:
            region *= 0.5
    return rho
