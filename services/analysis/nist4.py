"""The NIST-4 pipeline: a run's ``sweep`` and ``weighing`` events to h and the mass.

Units. The DAQ reads SI volts and the current is its voltage across the SI standard resistor
(the simulator's, and any lab's since 2019), so the electrical units realize the SI value of
h (:data:`H_UNITS_J_S`): a perfect measurement gives {Bl_F} / {Bl_V} = 1 with the true mass,
and the run realizes ``h = h_SI * Bl_F / Bl_V`` (seed 001 eq. 13 with h_SI in place of h90),
i.e. h / h_SI - 1 = l4 / {Bl_V} of the triplet regression (eq. 15); the mass the balance
measures with the fixed h is ``m_assumed * Bl_V / Bl_F`` (eq. 22). Bl_F is computed with the
mass and g the run is told (the mass calibration and the gravimeter).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numpy as np

from kibble.services.analysis.constants import H_J_S
from kibble.services.analysis.documents import event_arrays, split_at
from kibble.services.analysis.force import (
    ALPHA_NIST4_PER_A, BETA_NIST4_PER_A2, ForceSetResult, currents_from_voltage, force_mode_bl,
)
from kibble.services.analysis.triplet import (
    TripletResult, h_from_triplets, mass_from_bl_ratio, triplet_regression,
)
from kibble.services.analysis.uncertainty import UncertaintyResult
from kibble.services.analysis.velocity import (
    VelocitySetResult, master_profile_u_t_m, pair_scatter_t_m, velocity_from_positions,
    velocity_mode_bl, velocity_mode_bl_flux,
)

__all__ = ["H_UNITS_J_S", "TEMP_COEFF_NIST4_PER_K", "Nist4Analysis", "analyze_nist4"]

H_UNITS_J_S = H_J_S
"""The Planck constant the DAQ's electrical units realize, J s: the SI value."""

TEMP_COEFF_NIST4_PER_K = -352e-6
"""Relative temperature coefficient of the NIST-4 flux integral, 1/K (seed 001 figure 12:
Delta B_r / B_r / Delta T = -352e-6 /K of the Sm2Co17 magnet)."""


@dataclass
class Nist4Analysis:
    """A NIST-4 run turned into h and the mass (SI units, k = 1 uncertainties).

    h_j_s, u_h_j_s: h and its stated standard uncertainty (combined: type A u_a_h_j_s from the
    scatter, type B u_b_h_j_s from the budget, if one was given); h_rel_err = h / h_SI - 1 and
    u_h_rel = u_h_j_s / h; mass_kg, u_mass_kg: the mass the balance measures with the fixed h;
    bl_v_t_m, bl_f_t_m: velocity-mode Bl at the mean force-mode time (from the triplet
    regression) and Bl_F = Bl_V + l4; u_bl_f_t_m the force sets' type A uncertainty (RMS);
    u_master_rel the relative type A uncertainty of the master profile at the weighing
    position (common to every Bl_V, included in u_a_h_j_s); counts of sweeps, weighings, Bl_V
    and Bl_F points, triplets. The analysis objects (velocity sets, force sets, triplets, the
    uncertainty) are kept for the plots; :meth:`summary` leaves them out.
    """

    h_j_s: float
    u_h_j_s: float
    u_a_h_j_s: float
    u_b_h_j_s: float
    h_rel_err: float
    u_h_rel: float
    mass_kg: float
    u_mass_kg: float
    bl_v_t_m: float
    bl_f_t_m: float
    u_bl_f_t_m: float
    u_master_rel: float
    n_sweeps: int
    n_weighings: int
    n_bl_v: int
    n_bl_f: int
    n_triplets: int
    velocity_sets: list[VelocitySetResult] = field(repr=False)
    force_sets: list[ForceSetResult] = field(repr=False)
    triplets: list[TripletResult] = field(repr=False)
    uncertainty: UncertaintyResult = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The figures, JSON-able: every number and count, and each triplet's h / h_SI - 1
        with its regression's uncertainty."""
        objects = ("velocity_sets", "force_sets", "triplets", "uncertainty")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in objects}
        d["triplet_h_rel"] = [t.h_rel for t in self.triplets]
        d["triplet_u_h_rel"] = [t.u_h_rel for t in self.triplets]
        return d


def _temp_factor(temp_k, t_ref_k: float, temp_coeff_per_k: float | None):
    """1 + tc (T - T_ref): Bl(T) / Bl(T_ref) (1 where there is no correction)."""
    if temp_coeff_per_k is None:
        return np.ones_like(np.asarray(temp_k, dtype=float))
    return 1.0 + temp_coeff_per_k * (np.asarray(temp_k, dtype=float) - t_ref_k)


def _sweep_points(event: dict, t_ref_k: float, temp_coeff_per_k: float | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, z, U) of one sweep's readings: the interferometer position at the weighing-position
    reference of the DAQ and the DVM reading, which integrates over the frame ending at that
    position reading (what :func:`~kibble.services.analysis.velocity.velocity_mode_bl_flux`
    needs). U is referred to the magnet temperature t_ref_k (divided by 1 + tc (T - T_ref), T
    the magnet thermometer of the same frame)."""
    d = event_arrays(event)
    u = d["coil_voltage_v"] / _temp_factor(d["temperature_k"], t_ref_k, temp_coeff_per_k)
    return d["sim_time_s"], d["coil_z_m"], u


def _starts_a_set(info: Mapping[str, Any]) -> bool:
    """A set starts where the plan's index restarts at 0."""
    return info["index"] == 0


def analyze_nist4(sweeps: list[dict], weighings: list[dict], *, mass_kg: float, g_m_per_s2: float,
                  resistance_ohm: float = 100.0, alpha_per_a: float = ALPHA_NIST4_PER_A,
                  beta_per_a2: float = BETA_NIST4_PER_A2, z_weigh_m: float = 0.0,
                  order: int = 6, budget: Mapping[str, float] | None = None,
                  temp_coeff_per_k: float | None = TEMP_COEFF_NIST4_PER_K,
                  velocity_regression: str = "flux") -> Nist4Analysis:
    """The analysis of a NIST-4 run from its ``sweep`` and ``weighing`` events.

    * Velocity mode (:func:`~kibble.services.analysis.velocity.velocity_mode_bl_flux`): per
      sweep the flux int U dt (SI volts) regressed on the interferometer position, so that
      Bl = dPhi/dz is a Chebyshev profile of degree ``order`` over one z range common to every
      sweep of the run (the paper regresses U / v point by point; with sweeps much shorter
      than its 80 mm, the position noise at the sweep ends that U / v puts into every sweep's
      mean dominates, the flux regression spreads it over the sweep; ``velocity_regression=
      "point"`` is the paper's U / v, :func:`~kibble.services.analysis.velocity.
      velocity_mode_bl`), the master profile averaged over every sweep of the run (the
      paper's choice), each sweep's c0 refitted, Bl at the weighing position per sweep, the
      up/down sweeps averaged in non-overlapping pairs, which cancels anything odd in the
      velocity (thermal voltage, the simulator's up/down difference of ~4e-8). The voltage is
      referred to the run's mean magnet temperature with ``temp_coeff_per_k`` (None: no
      correction).
    * Force mode (:func:`~kibble.services.analysis.force.force_mode_bl`): I = U_DVM / R of the
      standard resistor (the DVM, not the 18-bit current monitor), referred to the same
      temperature and averaged per weighing; triples with the current dependence of seed 001
      eqs. 16-19 (the plant's Bl(I) is exactly eq. 16 with the same alpha and beta,
      ``hil_sim/nist4.toml``).
    * Triplet regression per (velocity set, force set, velocity set), weighted with each
      point's type A uncertainty (velocity pairs: the pooled scatter of the pairs about their
      set's mean, :func:`~kibble.services.analysis.velocity.pair_scatter_t_m`; force triples:
      the scatter of the triples) and scaled by the reduced chi-square.
    * h with its uncertainty from the triplets and the master profile's uncertainty at the
      weighing position (:func:`~kibble.services.analysis.triplet.h_from_triplets`,
      :func:`~kibble.services.analysis.velocity.master_profile_u_t_m`); type B from
      ``budget``; the mass with the fixed h
      (:func:`~kibble.services.analysis.triplet.mass_from_bl_ratio`).
    """
    if velocity_regression not in ("flux", "point"):
        raise ValueError(f"velocity_regression must be 'flux' or 'point', got {velocity_regression!r}")
    vsets = split_at(sweeps, _starts_a_set)
    fsets = split_at(weighings, _starts_a_set)
    if len(vsets) != len(fsets) + 1 or not fsets:
        raise ValueError(f"a run needs velocity sets bracketing every force set: got {len(vsets)} "
                         f"velocity and {len(fsets)} force sets")
    t_ref_k = float(np.mean([np.mean(event_arrays(e)["temperature_k"]) for e in sweeps + weighings]))
    pts = [[_sweep_points(e, t_ref_k, temp_coeff_per_k) for e in s] for s in vsets]
    z_all = [p[1] for s in pts for p in s]
    z_range = (float(min(z.min() for z in z_all)), float(max(z.max() for z in z_all)))

    def vset(s, ev, master=None):
        dirs = [e["info"]["direction"] for e in ev]
        if velocity_regression == "flux":
            return velocity_mode_bl_flux([p[0] for p in s], [p[1] for p in s], [p[2] for p in s],
                                         dirs, z_weigh_m=z_weigh_m, order=order,
                                         z_range_m=z_range, master_coef=master)
        # U / v point by point, v from consecutive positions matched to the DVM reading of the
        # frame they bound
        mids = [velocity_from_positions(p[0], p[1]) for p in s]
        return velocity_mode_bl([m[1] for m in mids], [p[2][1:] for p in s], [m[2] for m in mids],
                                dirs, time_s=[m[0] for m in mids], z_weigh_m=z_weigh_m,
                                order=order, z_range_m=z_range, master_coef=master)

    first = [vset(s, ev) for s, ev in zip(pts, vsets)]
    master = np.concatenate([r.coef_sweep for r in first]).mean(axis=0)
    vres = [vset(s, ev, master) for s, ev in zip(pts, vsets)]
    u_v = pair_scatter_t_m(vres)
    fres = []
    for ev in fsets:
        t = np.array([np.mean(event_arrays(e)["sim_time_s"]) for e in ev])
        # the force Bl(T) I = Bl(T_ref) I (1 + tc (T - T_ref)): currents referred to T_ref
        i = np.array([np.mean(currents_from_voltage(event_arrays(e)["coil_voltage_v"], resistance_ohm)
                              * _temp_factor(event_arrays(e)["temperature_k"], t_ref_k, temp_coeff_per_k))
                      for e in ev])
        on = [bool(e["info"]["mass_on"]) for e in ev]
        fres.append(force_mode_bl(t, i, on, mass_kg, g_m_per_s2, alpha_per_a=alpha_per_a,
                                  beta_per_a2=beta_per_a2))
    triplets = []
    for k, fr in enumerate(fres):
        tv = np.concatenate([vres[k].time_pair_s, vres[k + 1].time_pair_s])
        bv = np.concatenate([vres[k].bl_pair_t_m, vres[k + 1].bl_pair_t_m])
        u_f = max(float(np.std(fr.bl_t_m, ddof=1)) if fr.bl_t_m.size > 1 else 0.0,
                  1e-3 * u_v)     # floor: a (near-)noise-free force set must not get infinite weight
        tt = np.concatenate([tv, fr.time_s])
        bb = np.concatenate([bv, fr.bl_t_m])
        ss = np.concatenate([np.zeros(tv.size, bool), np.ones(fr.time_s.size, bool)])
        uu = np.concatenate([np.full(tv.size, u_v), np.full(fr.time_s.size, u_f)])
        triplets.append(triplet_regression(tt, bb, ss, u_bl_t_m=uu))
    bl_v = float(np.mean([tr.bl_v_t_m for tr in triplets]))
    u_master_rel = master_profile_u_t_m(vres) / bl_v
    unc = h_from_triplets(triplets, u_master_rel, H_UNITS_J_S, budget)
    bl_ratio = unc.value / H_UNITS_J_S          # {Bl_F} / {Bl_V} of the run (eq. 13)
    return Nist4Analysis(
        h_j_s=unc.value, u_h_j_s=unc.u_c, u_a_h_j_s=unc.u_a, u_b_h_j_s=unc.u_b,
        h_rel_err=bl_ratio - 1.0, u_h_rel=unc.u_c / unc.value,
        mass_kg=float(mass_from_bl_ratio(bl_ratio, mass_kg, H_UNITS_J_S)),
        u_mass_kg=mass_kg * unc.u_c / unc.value, bl_v_t_m=bl_v, bl_f_t_m=bl_v * bl_ratio,
        u_bl_f_t_m=float(np.sqrt(np.mean([f.u_bl_mean_t_m**2 for f in fres]))),
        u_master_rel=u_master_rel, n_sweeps=len(sweeps), n_weighings=len(weighings),
        n_bl_v=int(sum(r.bl_pair_t_m.size for r in vres)),
        n_bl_f=int(sum(f.bl_t_m.size for f in fres)), n_triplets=len(triplets),
        velocity_sets=vres, force_sets=fres, triplets=triplets, uncertainty=unc)
