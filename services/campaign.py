"""Offline campaigns: a plan on the in-process closed loop, then the analysis, to h and a mass.

:func:`offline_nist4` runs a NIST-4 run (velocity set, then per force set: force set, velocity
set) on an :class:`~kibble.services.inprocess.InProcessStack` (the real daemons and the
simulated plant, no broker), collects the run documents of the :class:`~kibble.services.plans.
RunEngine` and turns them into h with :mod:`kibble.services.analysis`; :func:`offline_efb` does
the same for the EFB weighing and the 1 mg artifact. :func:`cli_measure_offline` is the
synchronous entry point of ``kibble measure --offline``; :func:`plots` writes the PNGs.

Units. The simulator works in SI electrical units: the DVM reads SI volts, the current is the
DVM voltage across the SI standard resistor, there is no PJVS / K_J-90 / R_K-90 scaling. A
perfect measurement therefore gives {Bl_F} / {Bl_V} = 1 with the true mass (not h/h90 as with
conventional units, seed 001 eq. 13), and the h it realizes is exactly the SI value
h_SI = 6.62607015e-34 J s. The figure is recovered from the measured voltages, velocities and
currents as

    h_measured = h_SI * Bl_F / Bl_V        (Bl_F computed with the true mass and g),

i.e. h_measured / h_SI - 1 = l4 / {Bl_V} of the triplet regression (seed 001 eq. 15 with h_SI
in place of h90); equivalently the mass the balance measures (eq. 22 with the fixed h) is

    m_measured = m_true * Bl_V / Bl_F = m_true / (1 + l4 / {Bl_V}).

Nothing in the result is taken from the simulator's truth except the mass and g that define
Bl_F (as a real campaign takes them from the mass calibration and the gravimeter); the EFB's
kappa = dC/dz / 2 is measured (gradient determinations bracketing the weighings).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from kibble.services import analysis as an
from kibble.services import plans as P
from kibble.services.inprocess import InProcessStack

__all__ = ["NistResult", "EfbResult", "offline_nist4", "offline_efb", "plots",
           "cli_measure_offline", "NIST4_TEST_VELOCITY", "NIST4_TEST_FORCE", "NIST4_TEST_SERVO",
           "EFB_TEST_GRADIENT", "efb_gradients",
           "analyze_nist4", "analyze_efb", "offline_summary", "H_SI_J_S", "TEMP_COEFF_NIST4_PER_K"]

H_SI_J_S = an.H_J_S
"""The SI Planck constant (exact), J s: what a perfect simulated measurement realizes."""

NIST4_TEST_VELOCITY: dict[str, Any] = {"sweeps": 10, "travel_m": 0.010}
"""A shortened velocity set (the paper: 30 sweeps over 80 mm)."""
NIST4_TEST_FORCE: dict[str, Any] = {"weighings": 9, "window_s": 5.0, "settle_s": 3.0}
"""A shortened force set (the paper: 17 weighings of 58 s, 170 s erases)."""
NIST4_TEST_SERVO: dict[str, Any] = {"erase_decay_s": 1.5, "erase_n_decay": 3.0, "erase_freq_hz": 1.0}
"""A short erase (4.5 s) for the shortened force set."""
EFB_TEST_GRADIENT: dict[str, Any] = {"settle_s": 2.0, "window_s": 3.0}
"""A shortened gradient determination: the paper's 11 points within 2 mm, 2 sweeps, 3 bridge
readings per point after 2 s of settling (default 10 after 5 s); ~460 s simulated."""


# =============================================================================== results


@dataclass
class NistResult:
    """One offline NIST-4 run turned into h (SI units throughout, k = 1 uncertainties).

    h_j_s, u_h_j_s: h and its stated standard uncertainty (combined: type A u_a_h_j_s from the
    scatter, type B u_b_h_j_s from the budget, if one was given); h_rel_err = h / h_SI - 1 and
    u_h_rel = u_h_j_s / h; mass_kg, u_mass_kg: the mass the balance measures with the fixed h
    (mass_true_kg the simulator's); bl_v_t_m, bl_f_t_m: velocity-mode Bl at the mean force-mode
    time (from the triplet regression) and Bl_F = Bl_V + l4; u_master_rel the relative type A
    uncertainty of the master profile at the weighing position (common to every Bl_V, included
    in u_a_h_j_s); counts of sweeps, weighings, Bl_V and Bl_F points, triplets. The analysis objects (velocity sets, force sets, triplets, the
    uncertainty) are kept for plots; they are left out of :meth:`summary`.
    """

    seed: int
    rate_hz: float
    h_j_s: float
    u_h_j_s: float
    u_a_h_j_s: float
    u_b_h_j_s: float
    h_rel_err: float
    u_h_rel: float
    mass_kg: float
    u_mass_kg: float
    mass_true_kg: float
    bl_v_t_m: float
    bl_f_t_m: float
    u_bl_f_t_m: float
    u_master_rel: float
    n_sweeps: int
    n_weighings: int
    n_bl_v: int
    n_bl_f: int
    n_triplets: int
    sim_s: float
    wall_s: float
    exit_status: str
    velocity_sets: list = field(default_factory=list, repr=False)
    force_sets: list = field(default_factory=list, repr=False)
    triplets: list = field(default_factory=list, repr=False)
    uncertainty: Any = field(default=None, repr=False)

    @property
    def z_score(self) -> float:
        """(h - h_SI) / u_h: the error in units of the stated uncertainty."""
        return (self.h_j_s - H_SI_J_S) / self.u_h_j_s

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items()
             if k not in ("velocity_sets", "force_sets", "triplets", "uncertainty")}
        d["z_score"] = self.z_score
        d["triplet_h_rel"] = [t.h_rel for t in self.triplets]
        d["triplet_u_h_rel"] = [t.u_h_rel for t in self.triplets]
        return d


@dataclass
class EfbResult:
    """One offline EFB campaign turned into a mass (k = 1 uncertainties).

    mass_kg, u_mass_kg (combined), u_a_kg (type A: u_a_weighing_kg, the trials' scatter, and
    u_a_dcdz_kg, the gradient determinations' uncertainty, in quadrature), u_b_kg (the budget,
    if given); mass_rel_err = mass / mass_true - 1, u_mass_rel; mass_trial_kg the eq. (17)
    trials and kappa_trial_f_m the kappa each used (the bracketing average of the measured
    dC/dz / 2), kappa_f_m their mean; dcdz_f_m, u_dcdz_f_m, t_dcdz_s: the gradient
    determinations (dC/dz at the weighing position, its type A uncertainty, mean time);
    kappa_true_f_m the plant's kappa at z = 0 (for comparison only, like mass_true_kg);
    surface_potential_v the estimate (V+ + V-) / 2 of the unloaded readings (a check: the
    polarity reversal cancels it). The analysis objects (uncertainty, gradient fits) are kept
    for plots and left out of :meth:`summary`.
    """

    seed: int
    rate_hz: float
    mass_kg: float
    u_mass_kg: float
    u_a_kg: float
    u_b_kg: float
    u_a_weighing_kg: float
    u_a_dcdz_kg: float
    mass_true_kg: float
    mass_rel_err: float
    u_mass_rel: float
    mass_trial_kg: list
    kappa_f_m: float
    kappa_trial_f_m: list
    kappa_true_f_m: float
    dcdz_f_m: list
    u_dcdz_f_m: list
    t_dcdz_s: list
    surface_potential_v: float
    n_weighings: int
    n_trials: int
    n_gradients: int
    sim_s: float
    wall_s: float
    exit_status: str
    uncertainty: Any = field(default=None, repr=False)
    gradients: list = field(default_factory=list, repr=False)

    @property
    def z_score(self) -> float:
        return (self.mass_kg - self.mass_true_kg) / self.u_mass_kg

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("uncertainty", "gradients")}
        d["z_score"] = self.z_score
        d["kappa_rel_err"] = self.kappa_f_m / self.kappa_true_f_m - 1.0
        return d


# =============================================================================== documents


class _Documents:
    """Collects the documents of one or more engine runs."""

    def __init__(self, progress: Callable[[str], None] | None = None) -> None:
        self.docs: list[tuple[str, dict]] = []
        self.streams: dict[str, str] = {}
        self.say = progress

    def __call__(self, name: str, doc: dict) -> None:
        self.docs.append((name, doc))
        if name == "descriptor":
            self.streams[doc["uid"]] = doc["name"]
        if self.say is not None:
            if name == "event":
                info = ", ".join(f"{k}={v}" for k, v in doc["info"].items())
                t = doc["data"]["sim_time_s"]
                self.say(f"  {self.streams.get(doc['descriptor'], '?')} {info} "
                         f"(t = {t[0]:.1f}..{t[-1]:.1f} s)")
            elif name == "start":
                self.say(f"  run {doc['plan_name']} {doc['plan_args']}")

    def events(self, stream: str) -> list[dict]:
        return [d for n, d in self.docs if n == "event" and self.streams.get(d["descriptor"]) == stream]


def _arrays(event: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=float) for k, v in event["data"].items()}


def _split_sets(events: list[dict]) -> list[list[dict]]:
    """Events grouped into sets: a new set starts where the plan's index restarts at 0."""
    sets: list[list[dict]] = []
    for e in events:
        if e["info"]["index"] == 0 or not sets:
            sets.append([])
        sets[-1].append(e)
    return sets


# =============================================================================== NIST-4


TEMP_COEFF_NIST4_PER_K = -352e-6
"""Relative temperature coefficient of the NIST-4 flux integral, 1/K (seed 001 figure 12:
Delta B_r / B_r / Delta T = -352e-6 /K of the Sm2Co17 magnet)."""


def _temp_factor(temp_k, t_ref_k: float, temp_coeff_per_k: float | None):
    """1 + tc (T - T_ref): Bl(T) / Bl(T_ref) (1 where there is no correction)."""
    if temp_coeff_per_k is None:
        return np.ones_like(np.asarray(temp_k, dtype=float))
    return 1.0 + temp_coeff_per_k * (np.asarray(temp_k, dtype=float) - t_ref_k)


def _sweep_points(event: dict, t_ref_k: float, temp_coeff_per_k: float | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, z, U) of one sweep's readings: the interferometer position at the weighing-position
    reference of the DAQ and the DVM reading, which integrates over the frame ending at that
    position reading (what :func:`~kibble.services.analysis.velocity_mode_bl_flux` needs). U
    is referred to the magnet temperature t_ref_k (divided by 1 + tc (T - T_ref), T the magnet
    thermometer of the same frame)."""
    d = _arrays(event)
    u = d["coil_voltage_v"] / _temp_factor(d["temperature_k"], t_ref_k, temp_coeff_per_k)
    return d["sim_time_s"], d["coil_z_m"], u


def analyze_nist4(sweeps: list[dict], weighings: list[dict], *, mass_kg: float, g_m_s2: float,
                  resistance_ohm: float = 100.0, alpha_per_a: float = an.ALPHA_NIST4_PER_A,
                  beta_per_a2: float = an.BETA_NIST4_PER_A2, z_weigh_m: float = 0.0,
                  order: int = 6, budget: Mapping[str, float] | None = None,
                  temp_coeff_per_k: float | None = TEMP_COEFF_NIST4_PER_K,
                  velocity_regression: str = "flux") -> dict[str, Any]:
    """The analysis of a NIST-4 run from its ``sweep`` and ``weighing`` events.

    * Velocity mode (:func:`~kibble.services.analysis.velocity_mode_bl_flux`): per sweep the
      flux int U dt (U = DVM + PJVS, SI volts) regressed on the interferometer position, so
      that Bl = dPhi/dz is a Chebyshev profile of degree ``order`` over one z range common to
      every sweep of the run (the paper regresses U / v point by point; with sweeps much
      shorter than its 80 mm, the position noise at the sweep ends that U / v puts into every
      sweep's mean dominates, the flux regression spreads it over the sweep; ``velocity_regression
      ="point"`` is the paper's U / v, :func:`~kibble.services.analysis.velocity_mode_bl`), the master profile
      averaged over every sweep of the run (the paper's choice), each sweep's c0 refitted, Bl at
      the weighing position per sweep. Up/down sweeps are averaged in non-overlapping pairs
      (sweeps 0+1, 2+3, ...), which cancels anything odd in the velocity (thermal voltage,
      the simulator's up/down difference of ~4e-8) and keeps the pairs independent, so that the
      regression's uncertainty is not understated by the overlap of the paper's 29 pairs.
    * Force mode (:func:`~kibble.services.analysis.force_mode_bl`): I = U_DVM / R of the
      standard resistor (the DVM, not the 18-bit current monitor), averaged per weighing;
      triples with the current dependence of seed 001 eqs. 16-19 (the plant's Bl(I) is exactly
      eq. 16 with the same alpha and beta, ``hil_sim/nist4.toml``).
    * Triplet regression per (velocity set, force set, velocity set), weighted with each
      point's type A uncertainty (velocity pairs: the pooled scatter of the pairs about their
      set's mean; force triples: the scatter of the triples) and scaled by the reduced
      chi-square; h = h_SI (1 + l4 / Bl_V) (SI units, see the module docstring).
    * Type A: one triplet, the regression's uncertainty; several, the standard deviation of the
      mean of the per-triplet h (``combine_uncertainty``; with two or three triplets not less
      than the regressions' own); every standard deviation estimated from few values (the
      regression's reduced chi-square, the sweeps' shape terms, the triplets) is widened to
      the standard deviation of its Student t (``analysis.small_sample_factor``, JCGM 101); either way combined in quadrature with
      the master profile's uncertainty at the weighing position (the standard deviation of the
      mean of the sweeps' own shape terms, ``VelocitySetResult.shape_w_t_m``), an error common
      to every Bl_V of the run that no scatter shows; type B from ``budget``.
    """
    if velocity_regression not in ("flux", "point"):
        raise ValueError(f"velocity_regression must be 'flux' or 'point', got {velocity_regression!r}")

    vsets = _split_sets(sweeps)
    fsets = _split_sets(weighings)
    if len(vsets) != len(fsets) + 1 or not fsets:
        raise ValueError(f"a run needs velocity sets bracketing every force set: got {len(vsets)} "
                         f"velocity and {len(fsets)} force sets")
    t_ref_k = float(np.mean([np.mean(_arrays(e)["temperature_k"]) for e in sweeps + weighings]))
    pts = [[_sweep_points(e, t_ref_k, temp_coeff_per_k) for e in s] for s in vsets]
    z_all = [p[1] for s in pts for p in s]
    z_range = (float(min(z.min() for z in z_all)), float(max(z.max() for z in z_all)))

    def vset(s, ev, master=None):
        dirs = [e["info"]["direction"] for e in ev]
        if velocity_regression == "flux":
            return an.velocity_mode_bl_flux([p[0] for p in s], [p[1] for p in s], [p[2] for p in s],
                                            dirs, z_weigh_m=z_weigh_m, order=order,
                                            z_range_m=z_range, master_coef=master)
        # U / v point by point, v from consecutive positions matched to the DVM reading of the
        # frame they bound
        mids = [an.velocity_from_positions(p[0], p[1]) for p in s]
        return an.velocity_mode_bl([m[1] for m in mids], [p[2][1:] for p in s], [m[2] for m in mids],
                                   dirs, time_s=[m[0] for m in mids], z_weigh_m=z_weigh_m,
                                   order=order, z_range_m=z_range, master_coef=master)

    first = [vset(s, ev) for s, ev in zip(pts, vsets)]
    master = np.concatenate([r.coef_sweep for r in first]).mean(axis=0)
    vres = [vset(s, ev, master) for s, ev in zip(pts, vsets)]
    # non-overlapping up/down pairs
    pair_t, pair_bl = [], []
    for r in vres:
        n_p = len(r.bl_sweep_t_m) // 2
        pair_bl.append(0.5 * (r.bl_sweep_t_m[0:2 * n_p:2] + r.bl_sweep_t_m[1:2 * n_p:2]))
        pair_t.append(0.5 * (r.time_sweep_s[0:2 * n_p:2] + r.time_sweep_s[1:2 * n_p:2]))
    dev = np.concatenate([b - b.mean() for b in pair_bl])
    dof_v = sum(b.size - 1 for b in pair_bl)
    u_v = float(np.sqrt(np.sum(dev**2) / dof_v)) if dof_v > 0 else float("nan")
    fres = []
    for ev in fsets:
        t = np.array([np.mean(_arrays(e)["sim_time_s"]) for e in ev])
        # the force Bl(T) I = Bl(T_ref) I (1 + tc (T - T_ref)): currents referred to T_ref
        i = np.array([np.mean(an.currents_from_voltage(_arrays(e)["coil_voltage_v"], resistance_ohm)
                              * _temp_factor(_arrays(e)["temperature_k"], t_ref_k, temp_coeff_per_k))
                      for e in ev])
        on = [bool(e["info"]["mass_on"]) for e in ev]
        fres.append(an.force_mode_bl(t, i, on, mass_kg, g_m_s2, alpha_per_a=alpha_per_a,
                                     beta_per_a2=beta_per_a2))
    triplets = []
    for k, fr in enumerate(fres):
        tv = np.concatenate([pair_t[k], pair_t[k + 1]])
        bv = np.concatenate([pair_bl[k], pair_bl[k + 1]])
        u_f = max(float(np.std(fr.bl_t_m, ddof=1)) if fr.bl_t_m.size > 1 else 0.0,
                  1e-3 * u_v)     # floor: a (near-)noise-free force set must not get infinite weight
        tt = np.concatenate([tv, fr.time_s])
        bb = np.concatenate([bv, fr.bl_t_m])
        ss = np.concatenate([np.zeros(tv.size, bool), np.ones(fr.time_s.size, bool)])
        uu = np.concatenate([np.full(tv.size, u_v), np.full(fr.time_s.size, u_f)])
        tr = an.triplet_regression(tt, bb, ss, u_bl_t_m=uu)
        triplets.append(tr)
    h_each = np.array([H_SI_J_S * (1.0 + tr.h_rel) for tr in triplets])
    # the master profile's error at the weighing position: common to every Bl_V of the run
    # (invisible in the scatter of the pairs and of the triplets), it shifts l4 in full
    # (each standard deviation estimated from few values is widened to the standard deviation
    # of its Student t, an.small_sample_factor)
    shape_w = np.concatenate([r.shape_w_t_m for r in vres])
    u_shape = (float(np.std(shape_w, ddof=1) / math.sqrt(shape_w.size))
               * an.small_sample_factor(shape_w.size - 1))
    u_shape_rel = u_shape / float(np.mean([tr.bl_v_t_m for tr in triplets]))
    u_trip = np.array([tr.u_h_rel * an.small_sample_factor(tr.dof) for tr in triplets])
    if len(triplets) == 1:
        u_a = H_SI_J_S * math.hypot(u_trip[0], u_shape_rel)
    else:
        # the scatter of the triplets where there are enough of them to estimate it; with two
        # or three, not less than what the regressions state for their mean
        sem = float(np.std(h_each, ddof=1) / math.sqrt(h_each.size))
        if h_each.size > 3:
            sem *= an.small_sample_factor(h_each.size - 1)
        else:
            sem = max(sem, H_SI_J_S * float(np.sqrt(np.sum(u_trip**2))) / h_each.size)
        u_a = math.hypot(sem, H_SI_J_S * u_shape_rel)
    unc = an.combine_uncertainty(h_each, budget, u_a=u_a)
    h_rel = unc.value / H_SI_J_S - 1.0
    bl_v = float(np.mean([tr.bl_v_t_m for tr in triplets]))
    return {"velocity_sets": vres, "force_sets": fres, "triplets": triplets, "uncertainty": unc,
            "h_j_s": unc.value, "u_h_j_s": unc.u_c, "u_a_h_j_s": unc.u_a, "u_b_h_j_s": unc.u_b,
            "h_rel_err": h_rel, "u_h_rel": unc.u_c / unc.value,
            "mass_kg": mass_kg / (1.0 + h_rel), "u_mass_kg": mass_kg * unc.u_c / unc.value,
            "bl_v_t_m": bl_v, "bl_f_t_m": bl_v * (1.0 + h_rel),
            "u_bl_f_t_m": float(np.sqrt(np.mean([f.u_bl_mean_t_m**2 for f in fres]))),
            "u_master_rel": u_shape_rel, "n_sweeps": len(sweeps), "n_weighings": len(weighings),
            "n_bl_v": int(sum(b.size for b in pair_bl)),
            "n_bl_f": int(sum(f.bl_t_m.size for f in fres)), "n_triplets": len(triplets)}


async def offline_nist4(seed: int, *, rate_hz: float = 200.0, velocity: Mapping[str, Any] | None = None,
                        force: Mapping[str, Any] | None = None, force_sets: int = 1,
                        budget: Mapping[str, float] | None = None,
                        servo: Mapping[str, Any] | None = None, order: int = 6,
                        plant_overrides: Mapping[str, Any] | None = None,
                        temp_coeff_per_k: float | None = TEMP_COEFF_NIST4_PER_K,
                        velocity_regression: str = "flux",
                        progress: Callable[[str], None] | None = None) -> NistResult:
    """Run a NIST-4 run offline (in process) and return h with its stated uncertainty.

    The run is the plan ``nist4_run(force_sets, velocity, force)``: velocity sets bracketing
    each force set.

    ``velocity`` / ``force``: arguments of the velocity and force sets (defaults: the papers'
    counts); ``servo``: servo parameters (e.g. :data:`NIST4_TEST_SERVO`, a short erase);
    ``budget``: type B lines (relative, k = 1), e.g. ``analysis.NIST4_TABLE_III_BUDGET``; None:
    type A only (the simulator has no type B effects to speak of). ``rate_hz``: frame rate of
    the closed loop; 200 Hz is the lowest where the NIST-4 loops stay well behaved (at 100 Hz
    the sweeps trip the current source's watchdog). ``velocity_regression``: ``"flux"`` (default)
    or the paper's ``"point"`` (see :func:`analyze_nist4`).
    """
    t0 = time.perf_counter()
    stack = InProcessStack("nist4", rate_hz=rate_hz, seed=seed, plant_overrides=plant_overrides,
                           params={"servo": dict(servo or {})})
    docs = _Documents(progress)
    stops = []
    try:
        await stack.start()
        engine = P.RunEngine(stack, emit=docs)
        stops.append(await engine.run("nist4_run", {"force_sets": force_sets,
                                                    "velocity": dict(velocity or {}),
                                                    "force": dict(force or {})}))
        p = stack.plant.params
        mass, g = float(p["main_side.test_mass_kg"]), float(p["sim.g_m_s2"])
        resistance = float(stack.services["daq"].settings.std_resistor_ohm)
    finally:
        stack.close()
    bad = [s for s in stops if s["exit_status"] != "success"]
    if bad:
        raise RuntimeError(f"run did not succeed: {bad[0]['exit_status']}: {bad[0]['reason']}")
    res = analyze_nist4(docs.events("sweep"), docs.events("weighing"), mass_kg=mass, g_m_s2=g,
                        resistance_ohm=resistance, budget=budget, order=order,
                        temp_coeff_per_k=temp_coeff_per_k, velocity_regression=velocity_regression)
    return NistResult(seed=seed, rate_hz=rate_hz, mass_true_kg=mass,
                      sim_s=float(sum(s["sim_s"] for s in stops)),
                      wall_s=time.perf_counter() - t0, exit_status="success", **res)


# =============================================================================== EFB


def efb_gradients(events: list[dict], *,
                  order: int = 5) -> list[tuple[float, float, an.CapacitanceGradientResult]]:
    """The capacitance-gradient determinations in the ``gradient`` events of ``efb_gradient``
    plans: (first time s, last time s, :func:`~kibble.services.analysis.capacitance_gradient`)
    per determination, in time order.

    A determination starts at sweep 0, point 0. Each point is the mean time, interferometer
    position and capacitance of the fresh bridge readings in its window
    (:func:`~kibble.services.analysis.efb_bridge_readings`: the position at the instant of each
    reading); the sweeps' points go into the ``order``-th order fit with linear drift removal,
    evaluated at the weighing position the plan recorded (seed 000 section 4.1)."""
    dets: list[list[dict]] = []
    for e in events:
        if (e["info"]["sweep"] == 0 and e["info"]["index"] == 0) or not dets:
            dets.append([])
        dets[-1].append(e)
    out = []
    for det in dets:
        sweeps: dict[int, list[tuple[float, float, float]]] = {}
        for e in det:
            d = _arrays(e)
            t, z, c = an.efb_bridge_readings(d["sim_time_s"], d["coil_z_m"], d["capacitance_f"])
            sweeps.setdefault(int(e["info"]["sweep"]), []).append((t.mean(), z.mean(), c.mean()))
        if len({len(v) for v in sweeps.values()}) != 1:
            raise ValueError(f"a gradient determination's sweeps have different numbers of points: "
                             f"{[len(v) for v in sweeps.values()]}")
        pts = np.array(list(sweeps.values()), dtype=float)
        res = an.capacitance_gradient(pts[..., 1], pts[..., 2], pts[..., 0],
                                      z_weigh_m=float(det[0]["info"]["z_weigh_m"]), order=order)
        out.append((float(pts[..., 0].min()), float(pts[..., 0].max()), res))
    return out


def analyze_efb(weighings: list[dict], *, g_m_s2: float, kappa_f_m: float | None = None,
                gradients: list[dict] | None = None, budget: Mapping[str, float] | None = None,
                order: int = 5) -> dict[str, Any]:
    """The EFB analysis of the ``weighing`` events of consecutive ``efb_weighing`` runs, with
    dC/dz measured by the ``gradient`` events of ``efb_gradient`` determinations bracketing
    them (an ``efb_run``), or with a given ``kappa_f_m`` (a calibration constant; one of the
    two).

    Each run measures +U, +L, +U, -U, -L, -U: per window the mean of the squared DVM voltage
    (measured, i.e. including the surface potential), so that kappa V^2 is the window's mean
    force; the square of the mean voltage would miss kappa var(V) = var(F) / 4F, which with the
    loop's frame-to-frame force noise (0.4 % RMS unloaded at 100 Hz) under-reads the unloaded
    force by ~3e-6 and the loaded one by ~4e-7 and so reads the mass high by ~1e-6. The
    unloaded positive forces of all runs, in time order, give F_U+(t) by linear interpolation
    (seed 000 eq. 17); trial p is run p's negative readings (-U as the mean of its two windows
    at their mean time, -L) with run p's +L, which the positive unloaded readings of run p and
    run p+1 bracket: n runs give n - 1 trials.

    kappa: trial p takes kappa_p = (dC/dz_before + dC/dz_after) / 4 of the determinations
    (:func:`efb_gradients`, ``order``-th order) just before and just after its weighings (seed
    000 section 4.1, ``analysis.efb_kappa_bracketing``).

    Type A: eq. (17) is linear in kappa, m_p = kappa_p s_p. The weighing part is the standard
    deviation of the mean of kappa_bar s_p (the trials' scatter without the dC/dz noise); the
    dC/dz part carries each determination's type A uncertainty (``u_dcdz_f_m`` of the fit)
    into the mean mass, d mean(m) / d(dC/dz)_j = sum of s_p / (4 n) over the trials that
    determination j brackets; the two in quadrature. A given ``kappa_f_m`` has no uncertainty.

    Sign: the simulator's EFB pulls the loaded balance up with more force than the unloaded one
    (F_L = F_U + m g, as in seed 000 eq. 8), while ``analysis.efb_masses_eq17`` follows the
    printed eq. (17), written for a balance whose force is lower when loaded (seed 000 figure
    5); with the simulator's data eq. (17) gives -m, so the mass is its negative.
    """
    if (kappa_f_m is None) == (not gradients):
        raise ValueError("give either the gradient events (measured dC/dz) or kappa_f_m, not both or neither")
    runs: list[list[dict]] = []
    for e in weighings:
        if (e["info"]["polarity"] == "+" and e["info"]["index"] == 0) or not runs:
            runs.append([])
        runs[-1].append(e)
    if len(runs) < 2:
        raise ValueError("need at least two efb_weighing runs (n runs give n - 1 trials)")
    rows = []
    for ev in runs:
        r = {}
        for e in ev:
            d = _arrays(e)
            key = (e["info"]["polarity"], e["info"]["index"])
            r[key] = (float(d["sim_time_s"].mean()), float(np.mean(d["coil_voltage_v"] ** 2)),
                      float(d["coil_voltage_v"].mean()))
        if len(r) != 6:
            raise ValueError(f"an efb_weighing run has {len(r)} of its 6 weighings")
        rows.append(r)
    t_up = np.array([r["+", k][0] for r in rows for k in (0, 2)])
    v2_up = np.array([r["+", k][1] for r in rows for k in (0, 2)])
    trials = rows[:-1]
    t_un = np.array([0.5 * (r["-", 0][0] + r["-", 2][0]) for r in trials])
    v2_un = np.array([0.5 * (r["-", 0][1] + r["-", 2][1]) for r in trials])
    t_lp = np.array([r["+", 1][0] for r in trials])
    v2_lp = np.array([r["+", 1][1] for r in trials])
    t_ln = np.array([r["-", 1][0] for r in trials])
    v2_ln = np.array([r["-", 1][1] for r in trials])
    # eq. (17) with kappa = 1 F/m: the mass per unit kappa of each trial, kg m/F
    s = -an.efb_masses_eq17(t_up, v2_up, t_un, v2_un, t_lp, v2_lp, t_ln, v2_ln, g_m_s2)
    n = s.size
    if gradients:
        dets = efb_gradients(gradients, order=order)
        dcdz = np.array([d[2].dcdz_f_m for d in dets])
        u_dcdz = np.array([d[2].u_dcdz_f_m for d in dets])
        t_first = [min(w[0] for w in r.values()) for r in trials]
        t_last = [max(w[0] for w in r.values()) for r in trials]
        sens = np.zeros(len(dets))
        kappa = np.zeros(n)
        for p in range(n):
            before = [j for j, d in enumerate(dets) if d[1] < t_first[p]]
            after = [j for j, d in enumerate(dets) if d[0] > t_last[p]]
            if not before or not after:
                raise ValueError(f"trial {p} (t = {t_first[p]:.1f}..{t_last[p]:.1f} s) is not bracketed "
                                 "by gradient determinations")
            b, a = before[-1], after[0]
            kappa[p] = an.efb_kappa_bracketing(dcdz[b], dcdz[a])
            sens[[b, a]] += s[p] / (4.0 * n)
        u_kappa = float(np.sqrt(np.sum((sens * u_dcdz) ** 2)))
        t_dcdz = [0.5 * (d[0] + d[1]) for d in dets]
        fits = [d[2] for d in dets]
    else:
        kappa = np.full(n, float(kappa_f_m))
        dcdz = u_dcdz = np.zeros(0)
        u_kappa, t_dcdz, fits = 0.0, [], []
    m = kappa * s
    u_weigh = float(np.std(kappa.mean() * s, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    unc = an.combine_uncertainty(m, budget, u_a=math.hypot(u_weigh, u_kappa))
    v_s = float(np.mean([0.5 * (r["+", 0][2] + r["-", 0][2]) for r in rows]))
    return {"mass_kg": unc.value, "u_mass_kg": unc.u_c, "u_a_kg": unc.u_a, "u_b_kg": unc.u_b,
            "u_a_weighing_kg": u_weigh, "u_a_dcdz_kg": u_kappa,
            "u_mass_rel": unc.u_c_rel, "mass_trial_kg": m.tolist(), "kappa_f_m": float(kappa.mean()),
            "kappa_trial_f_m": kappa.tolist(), "dcdz_f_m": dcdz.tolist(), "u_dcdz_f_m": u_dcdz.tolist(),
            "t_dcdz_s": t_dcdz, "surface_potential_v": v_s, "n_weighings": len(weighings),
            "n_trials": int(n), "n_gradients": len(t_dcdz), "uncertainty": unc, "gradients": fits}


async def offline_efb(seed: int, *, rate_hz: float = 200.0, runs: int = 6, settle_s: float = 10.0,
                      window_s: float = 20.0, gradient: Mapping[str, Any] | None = None,
                      gradient_every: int = 3, budget: Mapping[str, float] | None = None,
                      plant_overrides: Mapping[str, Any] | None = None,
                      progress: Callable[[str], None] | None = None) -> EfbResult:
    """Weigh the 1 mg artifact offline with the plan ``efb_run``: capacitance-gradient
    determinations (``efb_gradient`` with the arguments ``gradient``; default the paper's 11
    points within 2 mm) bracketing ``runs`` weighing runs (``efb_weighing``: unloaded, loaded,
    unloaded, positive then negative polarity, ``settle_s``, ``window_s``), one after every
    ``gradient_every`` runs and after the last; analysed with eq. (17) and the measured dC/dz
    (see :func:`analyze_efb`); the mass with its stated uncertainty (type A from the trials'
    scatter and the gradient determinations, type B from ``budget``, e.g.
    ``analysis.EFB_TABLE_1_BUDGET_1MG``; None: type A only). The plant's kappa at z = 0 (at the
    end) is reported beside the measured one, for comparison only.
    """
    t0 = time.perf_counter()
    stack = InProcessStack("efb", rate_hz=rate_hz, seed=seed, plant_overrides=plant_overrides)
    docs = _Documents(progress)
    try:
        await stack.start()
        engine = P.RunEngine(stack, emit=docs)
        stop = await engine.run("efb_run", {"runs": runs, "gradient_every": gradient_every,
                                            "gradient": dict(gradient or {}),
                                            "weighing": {"settle_s": settle_s, "window_s": window_s}})
        if stop["exit_status"] != "success":
            raise RuntimeError(f"efb_run did not succeed: {stop['exit_status']}: {stop['reason']}")
        kappa_true = float(stack.plant.kappa(0.0))
        p = stack.plant.params
        mass, g = float(p["masses.small_kg"]), float(p["sim.g_m_s2"])
    finally:
        stack.close()
    res = analyze_efb(docs.events("weighing"), gradients=docs.events("gradient"), g_m_s2=g, budget=budget)
    return EfbResult(seed=seed, rate_hz=rate_hz, mass_true_kg=mass, kappa_true_f_m=kappa_true,
                     mass_rel_err=res["mass_kg"] / mass - 1.0, sim_s=float(stop["sim_s"]),
                     wall_s=time.perf_counter() - t0, exit_status="success", **res)


# =============================================================================== plots, CLI


def plots(result: NistResult | EfbResult, directory) -> list[str]:
    """The analysis PNGs of a result into ``directory`` (created); the paths.

    NIST-4: the Bl profile of the first velocity set with residuals, Bl over time of every
    triplet (force vs velocity), the h determinations. EFB: the mass trials."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if isinstance(result, NistResult):
        paths.append(an.plot_bl_profile(result.velocity_sets[0], out / "nist4_bl_profile.png"))
        for k, tr in enumerate(result.triplets):
            paths.append(an.plot_bl_time(tr, out / f"nist4_bl_time_{k}.png"))
        unc = result.uncertainty
        paths.append(an.plot_mass_determinations(
            unc, out / "nist4_h.png", u_each=[t.u_h_rel * H_SI_J_S for t in result.triplets],
            unit="h / 1e-34 J s", scale=1e34, reference=H_SI_J_S))
    else:
        paths.append(an.plot_mass_determinations(result.uncertainty, out / "efb_mass.png",
                                                 unit="mass / mg", scale=1e6,
                                                 reference=result.mass_true_kg))
    return paths


def _coerce(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def cli_measure_offline(plan: str, params: dict, seed: int, json_out: str | None,
                        plots_dir: str | None) -> int:
    """``kibble measure --offline``: run ``nist4`` or ``efb`` in process, print progress and a
    summary (value, u, relative u, the deviation from h_SI or the true mass in units of u),
    optionally write the JSON summary and the plots. Exit status 0, or 1 if the deviation
    exceeds 3 u, 2 for a usage error.

    ``params`` (strings are parsed as JSON): NIST-4 ``rate_hz``, ``force_sets``, ``order``,
    ``velocity_regression`` (``flux`` or ``point``),
    ``velocity.<arg>``, ``force.<arg>``, ``servo.<param>``, ``budget`` (``table3`` or none);
    ``test=true`` starts from the shortened test plans. EFB (an ``efb_run``) ``rate_hz``,
    ``runs``, ``settle_s``, ``window_s`` (of the weighings), ``gradient_every``,
    ``gradient.<arg>`` (of ``efb_gradient``), ``budget`` (``table1`` or none); ``test=true``
    starts from the shortened gradient determination :data:`EFB_TEST_GRADIENT`.
    """
    params = {k: _coerce(v) for k, v in (params or {}).items()}
    say = lambda s: print(s, flush=True)  # noqa: E731
    try:
        if plan in ("nist4", "nist4_run"):
            kw: dict[str, Any] = {"velocity": {}, "force": {}, "servo": {}}
            if params.pop("test", False):
                kw = {"velocity": dict(NIST4_TEST_VELOCITY), "force": dict(NIST4_TEST_FORCE),
                      "servo": dict(NIST4_TEST_SERVO)}
            for k, v in params.items():
                head, _, tail = k.partition(".")
                if tail and head in ("velocity", "force", "servo"):
                    kw[head][tail] = v
                elif k == "budget":
                    kw["budget"] = an.NIST4_TABLE_III_BUDGET if str(v).lower() in ("table3", "table_iii") else None
                elif k in ("rate_hz", "force_sets", "order", "velocity_regression"):
                    kw[k] = v
                else:
                    raise ValueError(f"unknown parameter {k!r} for plan nist4")
            say(f"offline NIST-4 run, seed {seed}")
            res: NistResult | EfbResult = asyncio.run(offline_nist4(seed, progress=say, **kw))
            r = res
            say(f"h = {r.h_j_s:.12e} J s, u = {r.u_h_j_s:.2e} J s (rel. {r.u_h_rel:.2e}; "
                f"type A {r.u_a_h_j_s / r.h_j_s:.2e}, type B {r.u_b_h_j_s / r.h_j_s:.2e})")
            say(f"h / h_SI - 1 = {r.h_rel_err:+.2e} = {r.z_score:+.2f} u; mass {r.mass_kg:.12f} kg "
                f"(true {r.mass_true_kg:g} kg); Bl_V {r.bl_v_t_m:.6f} T m, Bl_F {r.bl_f_t_m:.6f} T m; "
                f"{r.n_sweeps} sweeps, {r.n_weighings} weighings, {r.n_triplets} triplet(s); "
                f"{r.sim_s:.0f} s simulated in {r.wall_s:.1f} s")
        elif plan in ("efb", "efb_weighing", "efb_run"):
            kw = {"gradient": dict(EFB_TEST_GRADIENT) if params.pop("test", False) else {}}
            for k, v in params.items():
                head, _, tail = k.partition(".")
                if tail and head == "gradient":
                    kw["gradient"][tail] = v
                elif k == "budget":
                    kw["budget"] = an.EFB_TABLE_1_BUDGET_1MG if str(v).lower() in ("table1", "table_1") else None
                elif k in ("rate_hz", "runs", "settle_s", "window_s", "gradient_every"):
                    kw[k] = v
                else:
                    raise ValueError(f"unknown parameter {k!r} for plan efb")
            say(f"offline EFB run (gradient determinations bracketing weighings of the 1 mg artifact), seed {seed}")
            res = asyncio.run(offline_efb(seed, progress=say, **kw))
            r = res
            say("dC/dz = " + ", ".join(f"{d * 1e9:.7f} nF/m (u rel. {u / d:.1e})"
                                       for d, u in zip(r.dcdz_f_m, r.u_dcdz_f_m))
                + f"; kappa / kappa_plant - 1 = {r.kappa_f_m / r.kappa_true_f_m - 1.0:+.2e}")
            say(f"m = {r.mass_kg * 1e6:.9f} mg, u = {r.u_mass_kg * 1e12:.3f} ng (rel. {r.u_mass_rel:.2e}; "
                f"type A of it from dC/dz {r.u_a_dcdz_kg / r.mass_kg:.1e})")
            say(f"m / m_true - 1 = {r.mass_rel_err:+.2e} = {r.z_score:+.2f} u; {r.n_trials} trials; "
                f"{r.sim_s:.0f} s simulated in {r.wall_s:.1f} s")
        else:
            raise ValueError(f"unknown offline plan {plan!r}; one of nist4, efb")
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    if json_out:
        Path(json_out).write_text(json.dumps(res.summary(), indent=2, default=float))
        say(f"summary written to {json_out}")
    if plots_dir:
        for path in plots(res, plots_dir):
            say(f"plot: {path}")
    return 0 if abs(res.z_score) <= 3.0 else 1


def offline_summary(kind: str, seed: int, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Synchronous :func:`offline_nist4` (``kind='nist4'``) or :func:`offline_efb` (``'efb'``)
    returning the JSON-able summary: a picklable unit of work for a process pool (the seeds of
    a campaign in parallel)."""
    fn = {"nist4": offline_nist4, "efb": offline_efb}[kind]
    return asyncio.run(fn(seed, **dict(kwargs or {}))).summary()
