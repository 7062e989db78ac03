"""The EFB pipeline: a run's ``weighing`` events (and ``gradient`` events) to the mass.

``efb_weighing`` measures +U, +L, +U, -U, -L, -U (unloaded, loaded, unloaded, in positive then
negative polarity); ``efb_gradient`` a dC/dz determination; ``efb_run`` determinations
bracketing weighings (seed 000 sections 3.1, 4.1). kappa is the measured dC/dz / 2 (or a given
calibration constant), g the gravimeter's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numpy as np

from kibble.services.analysis.documents import event_arrays, split_at
from kibble.services.analysis.gradient import (
    CapacitanceGradientResult, capacitance_gradient, efb_bridge_readings, efb_kappa_bracketing,
)
from kibble.services.analysis.uncertainty import UncertaintyResult, combine_uncertainty
from kibble.services.analysis.weighing import efb_weighing

__all__ = ["EfbAnalysis", "efb_gradients", "analyze_efb"]


@dataclass
class EfbAnalysis:
    """EFB weighings turned into a mass (k = 1 uncertainties).

    mass_kg, u_mass_kg (combined), u_a_kg (type A: u_a_weighing_kg, the trials' scatter, and
    u_a_dcdz_kg, the gradient determinations' uncertainty, in quadrature), u_b_kg (the budget,
    if given), u_mass_rel; mass_trial_kg the eq. (17) trials and kappa_trial_f_per_m the kappa each
    used (the bracketing average of the measured dC/dz / 2, or the given kappa), kappa_f_per_m
    their mean; dcdz_f_per_m, u_dcdz_f_per_m, t_dcdz_s: the gradient determinations (dC/dz at the
    weighing position, its type A uncertainty, mean time); surface_potential_v the estimate
    (V+ + V-) / 2 of the unloaded readings (a check: the polarity reversal cancels it); counts
    of weighings, trials, determinations. The analysis objects (the uncertainty, the gradient
    fits) are kept for the plots; :meth:`summary` leaves them out.
    """

    mass_kg: float
    u_mass_kg: float
    u_a_kg: float
    u_b_kg: float
    u_a_weighing_kg: float
    u_a_dcdz_kg: float
    u_mass_rel: float
    mass_trial_kg: list[float]
    kappa_f_per_m: float
    kappa_trial_f_per_m: list[float]
    dcdz_f_per_m: list[float]
    u_dcdz_f_per_m: list[float]
    t_dcdz_s: list[float]
    surface_potential_v: float
    n_weighings: int
    n_trials: int
    n_gradients: int
    uncertainty: UncertaintyResult = field(repr=False)
    gradients: list[CapacitanceGradientResult] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The figures, JSON-able: every number, count and per-trial or per-determination list."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("uncertainty", "gradients")}


def efb_gradients(events: list[dict], *,
                  order: int = 5) -> list[tuple[float, float, CapacitanceGradientResult]]:
    """The capacitance-gradient determinations in the ``gradient`` events of ``efb_gradient``
    plans: (first time s, last time s,
    :func:`~kibble.services.analysis.gradient.capacitance_gradient`) per determination, in
    time order.

    A determination starts at sweep 0, point 0. Each point is the mean time, interferometer
    position and capacitance of the fresh bridge readings in its window
    (:func:`~kibble.services.analysis.gradient.efb_bridge_readings`: the position at the
    instant of each reading); the sweeps' points go into the ``order``-th order fit with linear
    drift removal, evaluated at the weighing position the plan recorded (seed 000 section 4.1)."""
    out = []
    for det in split_at(events, lambda info: info["sweep"] == 0 and info["index"] == 0):
        sweeps: dict[int, list[tuple[float, float, float]]] = {}
        for e in det:
            d = event_arrays(e)
            t, z, c = efb_bridge_readings(d["sim_time_s"], d["coil_z_m"], d["capacitance_f"])
            sweeps.setdefault(int(e["info"]["sweep"]), []).append((t.mean(), z.mean(), c.mean()))
        if len({len(v) for v in sweeps.values()}) != 1:
            raise ValueError(f"a gradient determination's sweeps have different numbers of points: "
                             f"{[len(v) for v in sweeps.values()]}")
        pts = np.array(list(sweeps.values()), dtype=float)
        res = capacitance_gradient(pts[..., 1], pts[..., 2], pts[..., 0],
                                   z_weigh_m=float(det[0]["info"]["z_weigh_m"]), order=order)
        out.append((float(pts[..., 0].min()), float(pts[..., 0].max()), res))
    return out


def _bracketing(dets: list[tuple[float, float, CapacitanceGradientResult]],
                trials: list[dict]) -> list[tuple[int, int]]:
    """For each trial (its readings: key -> (time s, ...)), the indices of the determinations
    just before and just after it; ``ValueError`` for a trial without both."""
    out = []
    for p, r in enumerate(trials):
        t_first, t_last = min(w[0] for w in r.values()), max(w[0] for w in r.values())
        before = [j for j, d in enumerate(dets) if d[1] < t_first]
        after = [j for j, d in enumerate(dets) if d[0] > t_last]
        if not before or not after:
            raise ValueError(f"trial {p} (t = {t_first:.1f}..{t_last:.1f} s) is not bracketed "
                             "by gradient determinations")
        out.append((before[-1], after[0]))
    return out


def analyze_efb(weighings: list[dict], *, g_m_per_s2: float, kappa_f_per_m: float | None = None,
                gradients: list[dict] | None = None, budget: Mapping[str, float] | None = None,
                order: int = 5) -> EfbAnalysis:
    """The EFB analysis of the ``weighing`` events of consecutive ``efb_weighing`` runs, with
    dC/dz measured by the ``gradient`` events of ``efb_gradient`` determinations bracketing
    them (an ``efb_run``), or with a given ``kappa_f_per_m`` (a calibration constant; one of the
    two).

    Each run's window is a reading: its mean time and its mean squared DVM voltage
    (:func:`~kibble.services.analysis.weighing.efb_weighing` says why the mean of the squares).
    The unloaded positive readings of all runs, in time order, give F_U+(t) by linear
    interpolation (seed 000 eq. 17); trial p is run p's negative readings (-U as the mean of
    its two windows at their mean time, -L) with run p's +L, which the positive unloaded
    readings of run p and run p+1 bracket: n runs give n - 1 trials. The simulator's balance
    needs more force loaded than unloaded (eq. 8; ``sign=+1`` of
    :func:`~kibble.services.analysis.weighing.efb_masses_eq17`).

    kappa: trial p takes kappa_p = (dC/dz_before + dC/dz_after) / 4 of the determinations
    (:func:`efb_gradients`, ``order``-th order) just before and just after its weighings (seed
    000 section 4.1, :func:`~kibble.services.analysis.gradient.efb_kappa_bracketing`).

    Type A: eq. (17) is linear in kappa, m_p = kappa_p s_p. The weighing part is the standard
    deviation of the mean of kappa_bar s_p (the trials' scatter without the dC/dz noise); the
    dC/dz part carries each determination's type A uncertainty (``u_dcdz_f_per_m`` of the fit)
    into the mean mass, d mean(m) / d(dC/dz)_j = sum of s_p / (4 n) over the trials that
    determination j brackets; the two in quadrature. A given ``kappa_f_per_m`` has no uncertainty.
    Type B from ``budget``.
    """
    if (kappa_f_per_m is None) == (not gradients):
        raise ValueError("give either the gradient events (measured dC/dz) or kappa_f_per_m, not both or neither")
    runs = split_at(weighings, lambda info: info["polarity"] == "+" and info["index"] == 0)
    if len(runs) < 2:
        raise ValueError("need at least two efb_weighing runs (n runs give n - 1 trials)")
    rows = []
    for ev in runs:
        r = {}
        for e in ev:
            d = event_arrays(e)
            key = (e["info"]["polarity"], e["info"]["index"])
            r[key] = (float(d["sim_time_s"].mean()), float(np.mean(d["coil_voltage_v"] ** 2)),
                      float(d["coil_voltage_v"].mean()))
        if len(r) != 6:
            raise ValueError(f"an efb_weighing run has {len(r)} of its 6 weighings")
        rows.append(r)
    t_up = np.array([r["+", k][0] for r in rows for k in (0, 2)])
    v2_up = np.array([r["+", k][1] for r in rows for k in (0, 2)])
    trials = rows[:-1]
    n = len(trials)
    t_un = np.array([0.5 * (r["-", 0][0] + r["-", 2][0]) for r in trials])
    v2_un = np.array([0.5 * (r["-", 0][1] + r["-", 2][1]) for r in trials])
    t_lp = np.array([r["+", 1][0] for r in trials])
    v2_lp = np.array([r["+", 1][1] for r in trials])
    t_ln = np.array([r["-", 1][0] for r in trials])
    v2_ln = np.array([r["-", 1][1] for r in trials])
    dets = efb_gradients(gradients, order=order) if gradients else []
    dcdz = np.array([d[2].dcdz_f_per_m for d in dets])
    u_dcdz = np.array([d[2].u_dcdz_f_per_m for d in dets])
    bracket = _bracketing(dets, trials) if gradients else []
    if gradients:
        kappa = efb_kappa_bracketing(dcdz[[b for b, _ in bracket]], dcdz[[a for _, a in bracket]])
    else:
        assert kappa_f_per_m is not None  # checked above: the gradients or kappa_f_per_m
        kappa = float(kappa_f_per_m)
    w = efb_weighing(kappa, g_m_per_s2, t_up, v2_up, t_un, v2_un, t_lp, v2_lp, t_ln, v2_ln, sign=+1)
    # d mean(m) / d(dC/dz)_j: each trial's mass per unit kappa / 4n for both its determinations
    sens = np.zeros(len(dets))
    for p, (b, a) in enumerate(bracket):
        sens[[b, a]] += w.mass_per_kappa_kg_m_per_f[p] / (4.0 * n)
    u_kappa = float(np.sqrt(np.sum((sens * u_dcdz) ** 2)))
    unc = combine_uncertainty(w.mass_trial_kg, math.hypot(w.u_a_weighing_kg, u_kappa), budget)
    v_s = float(np.mean([0.5 * (r["+", 0][2] + r["-", 0][2]) for r in rows]))
    return EfbAnalysis(
        mass_kg=unc.value, u_mass_kg=unc.u_c, u_a_kg=unc.u_a, u_b_kg=unc.u_b,
        u_a_weighing_kg=w.u_a_weighing_kg, u_a_dcdz_kg=u_kappa, u_mass_rel=unc.u_c_rel,
        mass_trial_kg=w.mass_trial_kg.tolist(), kappa_f_per_m=float(w.kappa_trial_f_per_m.mean()),
        kappa_trial_f_per_m=w.kappa_trial_f_per_m.tolist(), dcdz_f_per_m=dcdz.tolist(),
        u_dcdz_f_per_m=u_dcdz.tolist(), t_dcdz_s=[0.5 * (d[0] + d[1]) for d in dets],
        surface_potential_v=v_s, n_weighings=len(weighings), n_trials=n, n_gradients=len(dets),
        uncertainty=unc, gradients=[d[2] for d in dets])
