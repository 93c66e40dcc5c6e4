"""Stage 3's model of a rescaling: how scaling groups of layers moves every layer's change rate.

Rescaling group g by ``exp(rho_g)`` divides its layers' change rates by ``exp(2 rho_g)``; the
rescaling of the groups that feed it, undone in its input columns, multiplies them by
``sqrt(sum_j a_j r_j^2 / sum_j b_j r_j^-2)``, with ``a_j``/``b_j`` the shares of gradient and
weight energy in input column j and ``r_j`` the scale of column j's producer (raised to the
effective degrees of the inexact layers between them). :func:`cumulative_log_scales` turns the
correction each group needs into the scales that give it, and :func:`reachable_target` finds
the one rate that the pinned groups reach as well.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from caffe_utils.magic.plan import ScalePlan
from caffe_utils.magic.scale_rules import UNSCALED


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
