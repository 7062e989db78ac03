"""Analysis of Kibble-balance (NIST-4) and electrostatic-force-balance (EFB) measurements.

Pure functions of arrays (no bus, no recorder, no plans) that turn the readings of a run into
flux integrals, h and masses with a type A / type B uncertainty, after the procedures of the
seed papers (``/work/shared/seeds``):

* seed 001 (NIST-4, Haddad et al. 2016), section "Measurement procedure / analysis":
  velocity mode (Bl(z) from (DVM + PJVS voltage) / velocity, z mapped to [-1, 1], Chebyshev
  regression, master profile, refitted zero-order coefficient, up/down pairs), force mode
  (I = U / R, triples, current dependence eqs. 16-19), the triplet regression
  ``Bl(t) = l1 + l2 t + l3 t^2 + l4 s(t)`` and h/h90 - 1 (eqs. 13-15), the mass in the new SI
  (eq. 22), uncertainty budget Table III.
* seed 000 (EFB, Shaw et al. 2016): F = kappa V^2 with kappa = (dC/dz) / 2 (eq. 1), polarity
  reversal (eqs. 2-8), dC/dz from a 5th-order polynomial fit per gradient sweep with drift
  removal (section 4.1, figure 4), the weighing analysis of eq. (17), the hysteresis correction
  (section 4.2.1, Table 3), uncertainty budget Table 1.

Conventions: SI units everywhere, the unit is part of every name (``bl_t_m`` in T m,
``voltage_v`` in V, ``velocity_m_s`` in m/s, ``dcdz_f_m`` in F/m, ``force_n`` in N). Voltages,
currents and flux integrals of the NIST-4 are "numerical values in conventional units" (the
volt and ohm realized with K_J-90 and R_K-90, eq. 6) wherever the paper says so; the conversion
to the SI happens only in :func:`h_from_bl_ratio`, :func:`h_from_lambda4` and
:func:`mass_from_bl_ratio`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from numpy.polynomial import chebyshev as _cheb
from numpy.polynomial import polynomial as _poly

__all__ = [
    "H_J_S", "E_C", "K_J90_HZ_V", "R_K90_OHM", "H90_J_S", "K_J_HZ_V", "R_K_OHM",
    "ALPHA_NIST4_PER_A", "BETA_NIST4_PER_A2", "NIST4_TABLE_III_BUDGET", "EFB_TABLE_1_BUDGET_1MG",
    "EFB_TABLE_1_BUDGET_20MG",
    "VelocitySetResult", "ForceSetResult", "TripletResult", "CapacitanceGradientResult",
    "EfbMassResult", "UncertaintyResult",
    "velocity_from_positions", "velocity_mode_bl", "velocity_mode_bl_flux",
    "currents_from_voltage", "force_mode_bl",
    "bl_current_factor", "triplet_regression", "h_rel_from_lambda4", "h_from_lambda4",
    "h_from_bl_ratio", "mass_from_bl_ratio", "mass_eq22", "efb_bridge_readings",
    "capacitance_gradient", "efb_kappa_bracketing", "efb_force_n", "efb_masses_eq17", "efb_weighing",
    "efb_hysteresis_from_mimic", "efb_hysteresis_correction", "combine_uncertainty",
    "h_from_triplets", "small_sample_factor",
    "plot_bl_profile", "plot_bl_time", "plot_mass_determinations",
]

# --- constants ------------------------------------------------------------------------------
H_J_S = 6.62607015e-34
"""Planck constant, J s (exact in the SI since 2019)."""
E_C = 1.602176634e-19
"""Elementary charge, C (exact)."""
K_J90_HZ_V = 483597.9e9
"""Conventional Josephson constant K_J-90, Hz/V (seed 001, text before eq. 6)."""
R_K90_OHM = 25812.807
"""Conventional von Klitzing constant R_K-90, ohm (seed 001, text before eq. 6)."""
H90_J_S = 4.0 / (K_J90_HZ_V**2 * R_K90_OHM)
"""h90 = 4 / (K_J-90^2 R_K-90), J s (seed 001 eqs. 5, 6: K_J^2 R_K = 4 / h)."""
K_J_HZ_V = 2.0 * E_C / H_J_S
"""SI Josephson constant 2e/h, Hz/V."""
R_K_OHM = H_J_S / E_C**2
"""SI von Klitzing constant h/e^2, ohm."""

ALPHA_NIST4_PER_A = -2.351e-6 * 1e3
"""alpha of eq. (16), seed 001: -2.351(0.003) x 10^-6 mA^-1 = -2.351e-3 A^-1."""
BETA_NIST4_PER_A2 = 0.368e-9 * 1e6
"""beta of eq. (16), seed 001: 0.368(0.323) x 10^-9 mA^-2 = 0.368e-3 A^-2."""

NIST4_TABLE_III_BUDGET: dict[str, float] = {
    "magnetic_field": 15.4e-9,
    "electrical": 10.9e-9,
    "alignment": 6.5e-9,
    "mass_metrology": 6.3e-9,
    "mathematical": 5.0e-9,
    "balance_mechanics": 5.0e-9,
    "local_acceleration_g": 4.4e-9,
    "velocity": 1.7e-9,
}
"""Type B relative standard uncertainties (k = 1) of seed 001 Table III (the "statistical"
line, 24.9e-9, is type A and comes from the scatter)."""

EFB_TABLE_1_BUDGET_1MG: dict[str, float] = {
    "transfer_of_length": 1e-7,
    "transfer_of_voltage": 4.0e-6,
    "transfer_of_capacitance": 1.2e-7,
    "alignment_of_capacitor_cylinders": 1.2e-7,
    "corner_loading": 6.0e-7,
    "stray_capacitance": 8.2e-7,
    "hysteresis": 1.4e-6,
    "alignment_of_balance_travel": 7.3e-7,
    "temperature_dependence_of_dcdz": 4.4e-6,
}
"""Type B relative standard uncertainties (k = 1) of seed 000 Table 1, 1 mg artifact (type A
"weighing", 3.8e-6, comes from the scatter; combined 7.3e-6)."""

EFB_TABLE_1_BUDGET_20MG: dict[str, float] = dict(EFB_TABLE_1_BUDGET_1MG, hysteresis=2.2e-7)
"""Seed 000 Table 1, 20 mg artifact (type A 2.2e-6, combined 6.5e-6)."""


# --- helpers --------------------------------------------------------------------------------
def _as_list(x, n: int, name: str) -> list[np.ndarray]:
    """Per-sweep arrays: a sequence of n arrays, a 2-D array with n rows, or a scalar."""
    if np.isscalar(x):
        return [np.asarray(float(x))] * n
    if isinstance(x, np.ndarray) and x.ndim == 1 and x.size == n:
        # one value per sweep
        return [np.asarray(float(v)) for v in x]
    out = [np.asarray(v, dtype=float) for v in x]
    if len(out) != n:
        raise ValueError(f"{name}: expected {n} sweeps, got {len(out)}")
    return out


def _interp_strict(t_s: np.ndarray, tp_s: np.ndarray, fp: np.ndarray, name: str) -> np.ndarray:
    """Linear interpolation in time that refuses to extrapolate."""
    t_s = np.asarray(t_s, dtype=float)
    if np.any(t_s < tp_s[0]) or np.any(t_s > tp_s[-1]):
        raise ValueError(f"{name}: a time lies outside the bracketing readings "
                         f"[{tp_s[0]}, {tp_s[-1]}] s; linear interpolation needs brackets")
    return np.interp(t_s, tp_s, fp)


# --- NIST-4 velocity mode -------------------------------------------------------------------
def velocity_from_positions(time_s, z_m):
    """Numerical derivative of position (seed 001, "Measurement procedure": the velocity is
    calculated from two consecutive times and positions).

    Parameters
    ----------
    time_s : array_like, shape (n,)
        Times of the position readings, s.
    z_m : array_like, shape (n,)
        Positions of the optical centre, m.

    Returns
    -------
    t_mid_s, z_mid_m, velocity_m_s : ndarray, shape (n - 1,)
        Mid times (s), mid positions (m) and finite-difference velocities (m/s).
    """
    t = np.asarray(time_s, dtype=float)
    z = np.asarray(z_m, dtype=float)
    return 0.5 * (t[1:] + t[:-1]), 0.5 * (z[1:] + z[:-1]), np.diff(z) / np.diff(t)


@dataclass
class VelocitySetResult:
    """One velocity-mode set (seed 001, "Measurement procedure", velocity mode).

    Attributes (n_s sweeps, k = order + 1 Chebyshev coefficients):
    z_range_m (2,), z_weigh_m, order; direction (n_s,) 'up'/'down'; time_sweep_s (n_s,) mean
    sweep times; coef_sweep (n_s, k) per-sweep full Chebyshev fits (T m); master_coef (k,) the
    master profile (coefficients 1..order averaged over the sweeps, coefficient 0 set to 0);
    c0_sweep_t_m (n_s,) refitted zero-order coefficients with the master profile fixed;
    bl_sweep_t_m (n_s,) Bl at the weighing position per sweep (c0 + master(x_w));
    bl_pair_t_m, time_pair_s (n_s - 1,) successive up/down pairs averaged (30 sweeps give 29
    correlated values); bl_mean_t_m the mean of the pairs (the thermal voltage cancels exactly
    for alternating sweeps); u_bl_mean_t_m its type A standard uncertainty from the scatter of
    the non-overlapping pairs of per-sweep full-fit values at the weighing position (honest
    for white and for sweep-to-sweep noise); shape_w_t_m (n_s,) each sweep's own shape term at
    the weighing position (its coefficients 1..order at x_w less what the refit of the zero-order
    coefficient takes from them, with the set's mean refit): the master's is their mean, so
    their standard deviation of
    the mean is the master profile's type A uncertainty at x_w, an error common to every sweep
    that the scatter of the pairs does not show; z_m, bl_t_m, residual_t_m: per-sweep lists of
    the data and of the residuals from c0 + master profile.
    """

    z_range_m: tuple[float, float]
    z_weigh_m: float
    order: int
    direction: list[str]
    time_sweep_s: np.ndarray
    coef_sweep: np.ndarray
    master_coef: np.ndarray
    c0_sweep_t_m: np.ndarray
    bl_sweep_t_m: np.ndarray
    bl_pair_t_m: np.ndarray
    time_pair_s: np.ndarray
    bl_mean_t_m: float
    u_bl_mean_t_m: float
    shape_w_t_m: np.ndarray
    z_m: list[np.ndarray] = field(repr=False)
    bl_t_m: list[np.ndarray] = field(repr=False)
    residual_t_m: list[np.ndarray] = field(repr=False)

    def x_of(self, z_m):
        """Position mapped to [-1, 1] over ``z_range_m``."""
        lo, hi = self.z_range_m
        return (2.0 * np.asarray(z_m, dtype=float) - (lo + hi)) / (hi - lo)

    def profile_t_m(self, z_m, c0_t_m: float | None = None):
        """Master profile (T m) at positions z_m, with zero-order coefficient c0_t_m (default:
        mean refitted c0)."""
        c = self.master_coef.copy()
        c[0] = float(np.mean(self.c0_sweep_t_m)) if c0_t_m is None else c0_t_m
        return _cheb.chebval(self.x_of(z_m), c)


def velocity_mode_bl(z_m, voltage_dvm_v, velocity_m_s, direction, *, voltage_pjvs_v=0.0,
                     time_s=None, z_weigh_m: float = 0.0, order: int = 11,
                     z_range_m: tuple[float, float] | None = None,
                     master_coef=None) -> VelocitySetResult:
    """Flux integral of one velocity-mode set (seed 001, "Measurement procedure", velocity
    mode; figure 11 uses an 11th-order fit, hence the default order).

    Per point ``Bl = (U_DVM + U_PJVS) / v`` (v of the optical centre). For each sweep z is
    mapped to x in [-1, 1] over ``z_range_m`` (common to all sweeps, so that coefficients are
    comparable; default the overall min and max of z) and Bl(x) is regressed on Chebyshev
    polynomials of the first kind, degree ``order``. The master profile is the average of the
    coefficients 1..order over all sweeps (the zero-order coefficient is ignored for it); each
    sweep's zero-order coefficient is then refitted with the master profile fixed (a
    least-squares fit of a constant = the mean of Bl - master). Bl at the weighing position is
    c0 + master(x_w). Successive sweeps (one up, one down) are averaged in pairs, cancelling the
    thermal voltage (its contribution U_th / v changes sign with v).

    Parameters
    ----------
    z_m : sequence of n_s arrays (or 2-D array (n_s, n)), m
        Coil position (optical centre) of each reading of each sweep, already corrected to the
        weighing-position reference (the paper's suspension-stretch correction is the caller's).
    voltage_dvm_v, velocity_m_s : same shapes as ``z_m``, V and m/s
        DVM reading (conventional volts) and vertical velocity of the optical centre.
    direction : sequence of n_s str, 'up' or 'down'
        Sweep directions; successive sweeps must alternate (the paper starts with 'down').
    voltage_pjvs_v : scalar, per-sweep values or arrays shaped like ``z_m``, V
        PJVS voltage setting added to the DVM reading.
    time_s : per-sweep scalars or arrays shaped like ``z_m``, s, optional
        Reading times; the sweep time is their mean (default: the sweep index).
    z_weigh_m : float, m
        Weighing position.
    order : int
        Degree of the Chebyshev regression.
    z_range_m : (float, float), m, optional
        Interval mapped to [-1, 1].
    master_coef : array_like, shape (order + 1,), T m, optional
        A master profile computed over all velocity sets of the run (the paper's choice; pass
        ``result.master_coef`` of a call with every sweep of the run and the same
        ``z_range_m``); default: the average over the sweeps given here.

    Returns
    -------
    VelocitySetResult
    """
    n_s = len(direction)
    direction = _check_directions(direction)
    zs = _as_list(z_m, n_s, "z_m")
    us = _as_list(voltage_dvm_v, n_s, "voltage_dvm_v")
    vs = _as_list(velocity_m_s, n_s, "velocity_m_s")
    ps = _as_list(voltage_pjvs_v, n_s, "voltage_pjvs_v")
    ts = [np.asarray(float(k)) for k in range(n_s)] if time_s is None else _as_list(time_s, n_s, "time_s")
    bls = [(u + p) / v for u, p, v in zip(us, ps, vs)]
    if z_range_m is None:
        z_range_m = (float(min(z.min() for z in zs)), float(max(z.max() for z in zs)))
    lo, hi = map(float, z_range_m)
    if not hi > lo:
        raise ValueError("z_range_m must be an increasing interval")

    def x_of(z):
        return (2.0 * z - (lo + hi)) / (hi - lo)

    xs = [x_of(z) for z in zs]
    vander = [_cheb.chebvander(x, order) for x in xs]
    if len({x.shape for x in xs}) == 1:
        # all sweeps the same length: one batched QR least squares (Chebyshev basis on [-1, 1]
        # is well conditioned, no column scaling needed)
        vv = np.stack(vander)
        q, r = np.linalg.qr(vv)
        rhs = np.einsum("snk,sn->sk", q, np.stack(bls))
        coef = np.linalg.solve(r, rhs[..., None])[..., 0]
    else:
        coef = np.array([np.linalg.lstsq(v, b, rcond=None)[0] for v, b in zip(vander, bls)])

    def level(k: int, shape) -> float:
        # least-squares constant of Bl - shape over the sweep's points: their mean
        return float(np.mean(bls[k] - vander[k] @ shape))

    return _velocity_set(zs, bls, ts, direction, coef, level, (lo, hi), z_weigh_m, order,
                         master_coef)


def velocity_mode_bl_flux(time_s, z_m, voltage_dvm_v, direction, *, voltage_pjvs_v=0.0,
                          z_weigh_m: float = 0.0, order: int = 11,
                          z_range_m: tuple[float, float] | None = None,
                          master_coef=None) -> VelocitySetResult:
    """Flux integral of one velocity-mode set, regressed on the flux rather than on U / v.

    The same procedure as :func:`velocity_mode_bl` (Chebyshev profile of degree ``order``,
    master profile, refitted zero-order coefficients, pairs), but each sweep's profile comes
    from the induced flux ``Phi(z) = int U dt = int Bl dz`` (Faraday's law; exact whatever the
    velocity does): with an integrating DVM whose reading ``i`` averages U over the interval
    ``(t[i-1], t[i]]`` that ends at the position reading ``z[i]``,
    ``Phi_i = sum_{j=1..i} U_j (t_j - t_{j-1})``; Phi(x) is regressed on Chebyshev polynomials
    of degree ``order + 1`` and Bl = dPhi/dz. The refitted zero-order coefficient of a sweep is
    the slope of ``Phi - int master dz`` against z. Why: with U / v per point (v from two
    consecutive positions) the mean of a sweep telescopes to its two end positions, so the
    position noise sigma_z enters as sqrt(2) sigma_z / travel; the flux regression spreads it
    over all n readings (about sqrt(12 / n) sigma_z / travel for a straight profile), which for
    short sweeps is the larger part of the noise. The DVM noise enters both about equally.

    Parameters
    ----------
    time_s : sequence of n_s arrays, s
        Times of the readings of each sweep (position and end of the DVM's integration).
    z_m : sequence of n_s arrays, m
        Positions of the optical centre at those times (weighing-position reference).
    voltage_dvm_v : sequence of n_s arrays, V
        DVM readings (the first reading of each sweep is not used: its interval starts before
        the first position).
    direction, voltage_pjvs_v, z_weigh_m, order, z_range_m, master_coef
        As for :func:`velocity_mode_bl`.

    Returns
    -------
    VelocitySetResult
        As from :func:`velocity_mode_bl`; its per-point ``z_m``, ``bl_t_m`` and
        ``residual_t_m`` are U / v at the mid positions (for the plots), one fewer per sweep
        than the readings.
    """
    n_s = len(direction)
    direction = _check_directions(direction)
    ts = _as_list(time_s, n_s, "time_s")
    zr = _as_list(z_m, n_s, "z_m")
    us = _as_list(voltage_dvm_v, n_s, "voltage_dvm_v")
    ps = _as_list(voltage_pjvs_v, n_s, "voltage_pjvs_v")
    for k, (t, z, u) in enumerate(zip(ts, zr, us)):
        if not (t.shape == z.shape == u.shape) or t.size < order + 3:
            raise ValueError(f"sweep {k}: time_s, z_m and voltage_dvm_v need the same length, "
                             f"at least order + 3 = {order + 3}")
        if np.any(np.diff(t) <= 0):
            raise ValueError(f"sweep {k}: time_s must increase")
    uv = [np.broadcast_to(u + p, u.shape) for u, p in zip(us, ps)]
    flux = [np.concatenate([[0.0], np.cumsum(u[1:] * np.diff(t))]) for t, u in zip(ts, uv)]
    if z_range_m is None:
        z_range_m = (float(min(z.min() for z in zr)), float(max(z.max() for z in zr)))
    lo, hi = map(float, z_range_m)
    if not hi > lo:
        raise ValueError("z_range_m must be an increasing interval")
    half = 0.5 * (hi - lo)
    xs = [(2.0 * z - (lo + hi)) / (hi - lo) for z in zr]
    vander = [_cheb.chebvander(x, order + 1) for x in xs]
    coef = np.array([_cheb.chebder(np.linalg.lstsq(v, f, rcond=None)[0]) / half
                     for v, f in zip(vander, flux)])

    def level(k: int, shape) -> float:
        # slope of Phi - int shape dz against z (with a free constant)
        rest = flux[k] - vander[k] @ (_cheb.chebint(shape) * half)
        design = np.column_stack([np.ones_like(zr[k]), zr[k]])
        return float(np.linalg.lstsq(design, rest, rcond=None)[0][1])

    mids = [velocity_from_positions(t, z) for t, z in zip(ts, zr)]
    z_mid = [m[1] for m in mids]
    bl_pts = [u[1:] / m[2] for u, m in zip(uv, mids)]
    return _velocity_set(z_mid, bl_pts, ts, direction, coef, level, (lo, hi), z_weigh_m, order,
                         master_coef)


def _check_directions(direction) -> list[str]:
    if len(direction) < 2:
        raise ValueError("need at least two sweeps (one up/down pair)")
    direction = [str(d).lower() for d in direction]
    if any(d not in ("up", "down") for d in direction):
        raise ValueError("direction must be 'up' or 'down'")
    if any(a == b for a, b in zip(direction[:-1], direction[1:])):
        raise ValueError("successive sweeps must alternate direction (up/down pairs)")
    return direction


def _velocity_set(zs, bls, ts, direction, coef, level, z_range_m, z_weigh_m, order,
                  master_coef) -> VelocitySetResult:
    """The part of a velocity set common to both regressions, from the per-sweep Chebyshev
    coefficients ``coef`` (n_s, order + 1) and ``level(k, shape)``: the least-squares constant
    of sweep k's data once the profile with coefficients ``shape`` is taken out."""
    lo, hi = z_range_m
    x_w = (2.0 * float(z_weigh_m) - (lo + hi)) / (hi - lo)
    master = coef.mean(axis=0) if master_coef is None else np.array(master_coef, dtype=float)
    if master.shape != (order + 1,):
        raise ValueError(f"master_coef must have {order + 1} coefficients")
    master[0] = 0.0
    n_s = len(direction)
    c0 = np.array([level(k, master) for k in range(n_s)])
    m_w = float(_cheb.chebval(x_w, master))
    bl_sweep = c0 + m_w
    # the level is affine in the shape: level(k, S) = level(k, 0) - L_k . S; with the set's
    # mean functional L, each sweep's own shape term is S_k(x_w) - L . S_k
    basis = np.eye(order + 1)
    lin = np.zeros(order + 1)
    for k in range(n_s):
        flat = level(k, np.zeros(order + 1))
        lin += [flat - level(k, basis[j]) for j in range(order + 1)]
    lin /= n_s
    own = coef.copy()
    own[:, 0] = 0.0
    shape_w = _cheb.chebval(x_w, own.T) - own @ lin
    resid = [b - c - _cheb.chebval((2.0 * z - (lo + hi)) / (hi - lo), master)
             for z, b, c in zip(zs, bls, c0)]
    t_sweep = np.array([float(np.mean(t)) for t in ts])
    bl_pair = 0.5 * (bl_sweep[1:] + bl_sweep[:-1])
    t_pair = 0.5 * (t_sweep[1:] + t_sweep[:-1])
    # type A: non-overlapping pairs of per-sweep full-fit values at x_w (see the dataclass)
    full_w = _cheb.chebval(x_w, coef.T)
    n_p = n_s // 2
    pairs = 0.5 * (full_w[0:2 * n_p:2] + full_w[1:2 * n_p:2])
    u = float(np.std(pairs, ddof=1) / math.sqrt(n_p)) if n_p >= 2 else float("nan")
    return VelocitySetResult((lo, hi), float(z_weigh_m), int(order), direction, t_sweep, coef,
                             master, c0, bl_sweep, bl_pair, t_pair, float(np.mean(bl_pair)), u,
                             shape_w, list(zs), bls, resid)


# --- NIST-4 force mode ----------------------------------------------------------------------
def currents_from_voltage(voltage_v, resistance_ohm, voltage_pjvs_v=0.0):
    """Coil current I = U / R (seed 001, force mode: the PJVS voltage is added to the
    voltage readings across the standard resistor R, nominally 100 ohm).

    Parameters: voltage_v array_like (n,), V; resistance_ohm float, ohm; voltage_pjvs_v scalar or
    (n,), V. Returns ndarray (n,), A.
    """
    return (np.asarray(voltage_v, dtype=float) + np.asarray(voltage_pjvs_v, dtype=float)) / float(resistance_ohm)


def bl_current_factor(mean_current_a, delta_current_a, alpha_per_a=ALPHA_NIST4_PER_A,
                      beta_per_a2=BETA_NIST4_PER_A2):
    """``1 + 2 alpha Ibar + beta (3 Ibar^2 + dI^2)`` of seed 001 eq. (19), from
    ``Bl(I) = Bl(0) (1 + alpha I + beta I^2)`` (eq. 16); currents in A, alpha in 1/A, beta in
    1/A^2. ``m g = 2 Bl(0) dI * factor``."""
    ib = np.asarray(mean_current_a, dtype=float)
    di = np.asarray(delta_current_a, dtype=float)
    return 1.0 + 2.0 * alpha_per_a * ib + beta_per_a2 * (3.0 * ib**2 + di**2)


@dataclass
class ForceSetResult:
    """One force-mode set (seed 001, force mode; eqs. 16-19).

    time_s (n - 2,): time of the middle weighing of each triple; current_on_a, current_off_a
    (n - 2,): the mass-on / mass-off currents of each triple (the bracketing pair interpolated
    linearly in time to the middle reading); mean_current_a, delta_current_a: Ibar and dI of
    eq. (18) (dI = (I_on - I_off) / 2 in this module's sign convention, see
    :func:`force_mode_bl`); bl_t_m (n - 2,): Bl(0) per triple; bl_mean_t_m their mean;
    u_bl_mean_t_m its type A uncertainty, accounting for the overlap of the triples (adjacent
    triples share two readings, correlation ~2/3): the reading noise is estimated from the
    scatter of the triples with the known correlation structure, then propagated to the mean.
    """

    time_s: np.ndarray
    current_on_a: np.ndarray
    current_off_a: np.ndarray
    mean_current_a: np.ndarray
    delta_current_a: np.ndarray
    bl_t_m: np.ndarray
    bl_mean_t_m: float
    u_bl_mean_t_m: float


def force_mode_bl(time_s, current_a, mass_on, mass_kg: float, g_m_s2: float, *,
                  alpha_per_a: float = ALPHA_NIST4_PER_A, beta_per_a2: float = BETA_NIST4_PER_A2,
                  sign: int = +1) -> ForceSetResult:
    """Flux integral Bl(0) from the mass-on / mass-off weighings of one force set (seed 001,
    force mode and eqs. 16-19).

    Every three adjacent weighings (on-off-on or off-on-off) give one determination: the two
    outer readings are interpolated linearly in time to the time of the middle one, giving
    I_on and I_off at the same time; then eq. (19)
    ``m g = 2 Bl(0) dI (1 + 2 alpha Ibar + beta (3 Ibar^2 + dI^2))`` with eq. (18)
    ``Ibar = (I_on + I_off) / 2``. Sign convention: with ``sign=+1`` (default; the simulator's
    convention: z up, coil force +Bl I) ``m g = Bl(I_on) I_on - Bl(I_off) I_off`` and
    ``dI = (I_on - I_off) / 2``; ``sign=-1`` is the paper's printed eq. (17),
    ``m g = Bl(I_off) I_off - Bl(I_on) I_on``, ``dI = (I_off - I_on) / 2``. Eq. (19) follows
    exactly from eqs. (16)-(18), so the result is exact for Bl(I) of the form of eq. (16).

    Parameters
    ----------
    time_s : array_like, shape (n,), s
        Mid times of the n weighings (17 in the paper: 9 on, 8 off).
    current_a : array_like, shape (n,), A
        Averaged coil current of each weighing (:func:`currents_from_voltage`).
    mass_on : array_like of bool, shape (n,)
        True where the test mass is on; must alternate.
    mass_kg, g_m_s2 : float
        Test mass (kg) and local g (m/s^2) (tide, pressure, polar motion corrected).
    alpha_per_a, beta_per_a2 : float
        Current coefficients of eq. (16) in 1/A and 1/A^2 (defaults: seed 001's values).

    Returns
    -------
    ForceSetResult
    """
    t = np.asarray(time_s, dtype=float)
    i = np.asarray(current_a, dtype=float)
    on = np.asarray(mass_on, dtype=bool)
    n = t.size
    if n < 3 or i.size != n or on.size != n:
        raise ValueError("need at least three weighings with matching time, current, state")
    if np.any(on[1:] == on[:-1]):
        raise ValueError("mass_on must alternate (on-off-on-...)")
    if np.any(np.diff(t) <= 0):
        raise ValueError("time_s must increase")
    k = np.arange(1, n - 1)
    w = (t[k] - t[k - 1]) / (t[k + 1] - t[k - 1])          # interpolation weight of reading k+1
    outer = (1.0 - w) * i[k - 1] + w * i[k + 1]
    mid_on = on[k]
    i_on = np.where(mid_on, i[k], outer)
    i_off = np.where(mid_on, outer, i[k])
    ibar = 0.5 * (i_on + i_off)
    di = 0.5 * (i_on - i_off) * (1 if sign >= 0 else -1)
    fac = bl_current_factor(ibar, di, alpha_per_a, beta_per_a2)
    bl = mass_kg * g_m_s2 / (2.0 * di * fac)
    # type A with the overlap: d(Bl_k)/d(I_j) to first order, white reading noise sigma_I
    a = np.zeros((n - 2, n))
    s_on = np.where(mid_on, 1.0, -1.0) * (1 if sign >= 0 else -1)  # d(dI)/d(I_mid) * 2
    a[np.arange(n - 2), k] = 0.5 * s_on
    a[np.arange(n - 2), k - 1] = -0.5 * s_on * (1.0 - w)
    a[np.arange(n - 2), k + 1] = -0.5 * s_on * w
    jac = (-bl / di)[:, None] * a                           # dBl/dI (the factor's slope neglected)
    c0 = jac @ jac.T                                        # Cov(Bl) / sigma_I^2
    m = n - 2
    u = float("nan")
    if m >= 2:
        cen = np.eye(m) - 1.0 / m
        denom = float(np.trace(cen @ c0))
        s2 = float(np.sum((bl - bl.mean()) ** 2)) / denom
        u = math.sqrt(s2 * float(np.sum(c0)) / m**2)
    return ForceSetResult(t[k], i_on, i_off, ibar, di, bl, float(bl.mean()), u)


# --- triplet regression, h and the mass (seed 001 eqs. 13-15, 22) ----------------------------
@dataclass
class TripletResult:
    """Triplet regression ``Bl(t) = l1 + l2 (t - t_ref) + l3 (t - t_ref)^2 + l4 s(t)`` (seed 001,
    "Measurement procedure", eqs. 13-15).

    lam (4,): l1 (T m), l2 (T m/s), l3 (T m/s^2), l4 (T m); cov (4, 4) their covariance; t_ref_s
    the time origin (mean of the data times); bl_v_t_m the velocity-mode flux integral at the
    mean force-mode time, the {Bl_V} of eq. (15); h_rel = l4 / {Bl_V} = h/h90 - 1 (eq. 15) and
    u_h_rel its standard uncertainty from the regression; time_s, bl_t_m, is_force the data;
    residual_t_m the residuals; dof the degrees of freedom.
    """

    lam: np.ndarray
    cov: np.ndarray
    t_ref_s: float
    bl_v_t_m: float
    h_rel: float
    u_h_rel: float
    time_s: np.ndarray
    bl_t_m: np.ndarray
    is_force: np.ndarray
    residual_t_m: np.ndarray
    dof: int

    @property
    def h_j_s(self) -> float:
        """h = h90 (1 + l4 / {Bl_V}) (eqs. 13, 15), J s."""
        return H90_J_S * (1.0 + self.h_rel)

    def model_t_m(self, time_s, force: bool | np.ndarray = False):
        """The fitted Bl(t) (T m) at times time_s, for velocity (False) or force (True) mode."""
        dt = np.asarray(time_s, dtype=float) - self.t_ref_s
        return self.lam[0] + self.lam[1] * dt + self.lam[2] * dt**2 + self.lam[3] * np.asarray(force, dtype=float)


def triplet_regression(time_s, bl_t_m, is_force, *, u_bl_t_m=None,
                       absolute_sigma: bool = False) -> TripletResult:
    """Least-squares triplet regression (seed 001, "Measurement procedure": one triplet is the
    velocity set before, the force set and the velocity set after, e.g. 29 Bl_V + 15 Bl_F +
    29 Bl_V; ``Bl(t) = l1 + l2 t + l3 t^2 + l4 s(t)``, s = 0 in velocity and 1 in force mode).

    Parameters
    ----------
    time_s : array_like, shape (n,), s
    bl_t_m : array_like, shape (n,), T m
        Flux integrals in conventional units (Bl_V from :func:`velocity_mode_bl`, Bl_F from
        :func:`force_mode_bl`).
    is_force : array_like of bool, shape (n,)
        s(t).
    u_bl_t_m : array_like, shape (n,), T m, optional
        Standard uncertainties of the points; given, the fit is weighted (use it when the two
        modes have different noise: the paper's 37.4e-9 vs 9.8e-9). Without it the fit is the
        paper's unweighted one and cov = s^2 (X^T X)^-1 with s^2 = RSS / (n - 4).
    absolute_sigma : bool
        With weights, take them as absolute (cov = (X^T W X)^-1) instead of scaling by the
        reduced chi-square.

    Returns
    -------
    TripletResult
    """
    t = np.asarray(time_s, dtype=float)
    y = np.asarray(bl_t_m, dtype=float)
    s = np.asarray(is_force, dtype=bool)
    if not (t.size == y.size == s.size) or t.size < 5:
        raise ValueError("need >= 5 points with matching time, Bl, mode")
    if s.all() or not s.any():
        raise ValueError("need both velocity (s=0) and force (s=1) points")
    t_ref = float(t.mean())
    dt = t - t_ref
    x = np.column_stack([np.ones_like(dt), dt, dt**2, s.astype(float)])
    wt = np.ones_like(y) if u_bl_t_m is None else 1.0 / np.asarray(u_bl_t_m, dtype=float)
    # column scaling for conditioning
    scale = np.max(np.abs(x), axis=0)
    scale[scale == 0] = 1.0
    xs = x / scale * wt[:, None]
    q, r = np.linalg.qr(xs)
    beta_s = np.linalg.solve(r, q.T @ (y * wt))
    lam = beta_s / scale
    resid = y - x @ lam
    dof = t.size - 4
    rinv = np.linalg.inv(r)
    cov_s = rinv @ rinv.T
    if u_bl_t_m is None or not absolute_sigma:
        cov_s = cov_s * float(np.sum((resid * wt) ** 2)) / dof
    cov = cov_s / np.outer(scale, scale)
    t_f = float(np.mean(dt[s]))
    g = np.array([1.0, t_f, t_f**2])
    bl_v = float(g @ lam[:3])
    h_rel = float(lam[3] / bl_v)
    # gradient of l4 / BlV wrt lam
    grad = np.array([-h_rel / bl_v * g[0], -h_rel / bl_v * g[1], -h_rel / bl_v * g[2], 1.0 / bl_v])
    u_h = float(math.sqrt(grad @ cov @ grad))
    return TripletResult(lam, cov, t_ref, bl_v, h_rel, u_h, t, y, s, resid, dof)


def small_sample_factor(dof: int) -> float:
    """sqrt(nu / (nu - 2)): the factor from a standard deviation estimated with ``dof`` = nu
    degrees of freedom to the standard uncertainty of the quantity, the standard deviation of
    the scaled and shifted Student t it is known by (JCGM 101:2008, 6.4.9.4). 1.29 for 5
    degrees of freedom, 1.08 for 13, 1.01 for 100. Needs nu > 2 (with fewer the t has no
    finite variance): ValueError otherwise."""
    if dof <= 2:
        raise ValueError(f"a standard uncertainty needs more than 2 degrees of freedom, got {dof}")
    return math.sqrt(dof / (dof - 2.0))


def h_rel_from_lambda4(lambda4_t_m, bl_v_t_m):
    """h/h90 - 1 = {l4} / {Bl_V} (seed 001 eq. 15). Dimensionless."""
    return np.asarray(lambda4_t_m, dtype=float) / np.asarray(bl_v_t_m, dtype=float)


def h_from_lambda4(lambda4_t_m, bl_v_t_m):
    """h = h90 (1 + {l4} / {Bl_V}) (seed 001 eqs. 13-15), J s."""
    return H90_J_S * (1.0 + h_rel_from_lambda4(lambda4_t_m, bl_v_t_m))


def h_from_bl_ratio(bl_ratio):
    """h = h90 {Bl_F} / {Bl_V} (seed 001 eq. 13), J s.

    {Bl_F} = m g / I_90 with the known (calibrated) mass m and {Bl_V} = U_90 / v, both
    numerical values in conventional units (eq. 6). Derivation: U_SI = U_90 K_J90 / K_J,
    I_SI = I_90 K_J90 R_K90 / (K_J R_K), so m g v = U_SI I_SI = U_90 I_90 (h / h90).
    """
    return H90_J_S * np.asarray(bl_ratio, dtype=float)


def mass_from_bl_ratio(bl_ratio, mass_assumed_kg, h_j_s: float = H_J_S):
    """The mass in the new SI from a Kibble-balance measurement (seed 001 eq. 22 rewritten with
    the eq. 13 ratio), kg.

    If Bl_F was computed as ``mass_assumed_kg * g / I_90`` then
    ``{Bl_F} / {Bl_V} = (m_assumed / m) (h / h90)``, hence
    ``m = m_assumed (h / h90) / ({Bl_F} / {Bl_V})`` with the fixed h = 6.62607015e-34 J s.
    """
    return float(mass_assumed_kg) * (h_j_s / H90_J_S) / np.asarray(bl_ratio, dtype=float)


def mass_eq22(p, n, f_u_hz, g_m_s2, velocity_m_s, h_j_s: float = H_J_S):
    """``m = p n^2 f_U^2 h / (4 g v)`` (seed 001 eq. 22), kg: the idealized watt equation with the
    same Josephson voltage U = n f_U / K_J in both modes and R = R_K / p."""
    return p * n**2 * np.asarray(f_u_hz, dtype=float) ** 2 * h_j_s / (4.0 * g_m_s2 * np.asarray(velocity_m_s, dtype=float))


# --- EFB: capacitance gradient ----------------------------------------------------------------
@dataclass
class CapacitanceGradientResult:
    """One dC/dz determination (seed 000 section 4.1, figure 4).

    dcdz_sweep_f_m (n_s,): dC/dz at the weighing position per sweep; dcdz_f_m: their mean (the
    value of the measurement); u_dcdz_f_m: its standard uncertainty propagated through the
    (linear) drift removal and polynomial fits with the pooled residual variance;
    u_scatter_f_m: the standard deviation of the mean of the per-sweep values (a check);
    coef_sweep (n_s, order + 1): power-series coefficients in u = (z - z_weigh) / z_scale_m, F;
    drift_coef (drift_order,): drift polynomial in (t - t_ref_s) (F/s, F/s^2, ...);
    residual_f (n_s, n): residuals; sigma_f the pooled residual standard deviation, F.
    """

    dcdz_sweep_f_m: np.ndarray
    dcdz_f_m: float
    u_dcdz_f_m: float
    u_scatter_f_m: float
    coef_sweep: np.ndarray
    z_scale_m: float
    z_weigh_m: float
    drift_coef: np.ndarray
    t_ref_s: float
    residual_f: np.ndarray
    sigma_f: float

    @property
    def kappa_f_m(self) -> float:
        """kappa = (dC/dz) / 2 (seed 000 eq. 1), F/m."""
        return 0.5 * self.dcdz_f_m


def efb_bridge_readings(time_s, z_m, capacitance_f) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fresh capacitance-bridge readings in one window of DAQ frames: (t, z, C) of each.

    The bridge (seed 000: an Andeen-Hagerling 2500A) reads about once a second and the DAQ
    passes the held reading in every frame; a reading is fresh in the frame where the value
    changes, and that frame's interferometer position is where the link was when it was taken.
    The first frame of the window is not counted (its reading may predate the window), nor is
    a reading equal to the one before it (it cannot be told from the held value; it is merely
    left out). ``ValueError`` if the window holds no fresh reading."""
    t = np.asarray(time_s, dtype=float)
    z = np.asarray(z_m, dtype=float)
    c = np.asarray(capacitance_f, dtype=float)
    if not (t.shape == z.shape == c.shape) or t.ndim != 1:
        raise ValueError("time_s, z_m, capacitance_f must be 1-d arrays of the same length")
    fresh = np.flatnonzero(np.diff(c) != 0.0) + 1
    if fresh.size == 0:
        raise ValueError(f"no fresh bridge reading in the {t.size} frames from t = "
                         f"{t[0] if t.size else float('nan'):.3f} s (the window must span the bridge's period)")
    return t[fresh], z[fresh], c[fresh]


def capacitance_gradient(z_m, capacitance_f, time_s, *, z_weigh_m: float = 0.0, order: int = 5,
                         drift_order: int = 1) -> CapacitanceGradientResult:
    """dC/dz at the weighing position from one gradient measurement (seed 000, section 3.1:
    11 equidistant points within 2 mm, a capacitance reading at each; section 4.1: 5th-order
    polynomial per sweep, drift removal, the value of the measurement is the mean of the
    per-sweep gradients).

    Drift removal: the paper fits "a separate polynomial ... to the average capacitance of each
    position sweep as a function of time" and subtracts it from the data. Implemented as a
    joint least-squares fit of a common order-``order`` polynomial in z plus a drift polynomial
    of degree ``drift_order`` (no constant) in time to all sweeps; the drift polynomial is then
    subtracted from every reading at its own time. When every sweep visits the same positions
    this is the paper's sweep-average method; with jittered positions it stays unbiased. Then
    each sweep gets its own order-``order`` fit in z and dC/dz = a1 / z_scale. Within a single
    sweep time and position are collinear, so drift needs >= 2 sweeps at different times (with
    one sweep pass ``drift_order=0``).

    Parameters
    ----------
    z_m, capacitance_f, time_s : array_like, shape (n_s, n), m, F, s
        Positions (interferometer), capacitance readings and their times, one row per sweep.
    z_weigh_m : float, m
        Position at which dC/dz is evaluated (the null / weighing position).
    order, drift_order : int

    Returns
    -------
    CapacitanceGradientResult
    """
    z = np.atleast_2d(np.asarray(z_m, dtype=float))
    c = np.atleast_2d(np.asarray(capacitance_f, dtype=float))
    t = np.atleast_2d(np.asarray(time_s, dtype=float))
    if not (z.shape == c.shape == t.shape):
        raise ValueError("z_m, capacitance_f, time_s must have the same shape (n_s, n)")
    n_s, n = z.shape
    if n <= order + 1:
        raise ValueError(f"need more than {order + 1} points per sweep")
    if drift_order > 0 and n_s < 2:
        raise ValueError("drift removal needs >= 2 sweeps (pass drift_order=0 for one sweep)")
    zs = float(np.max(np.abs(z - z_weigh_m)))
    u = (z - z_weigh_m) / zs
    t_ref = float(t.mean())
    dt = t - t_ref
    t_scale = float(np.max(np.abs(dt))) or 1.0
    N = n_s * n
    cv = c.ravel()
    if drift_order > 0:
        vz = _poly.polyvander(u.ravel(), order)
        vt = _poly.polyvander(dt.ravel() / t_scale, drift_order)[:, 1:]
        x1 = np.hstack([vz, vt])
        pinv1 = np.linalg.pinv(x1)
        if np.linalg.matrix_rank(x1) < x1.shape[1]:
            raise ValueError("drift not identifiable from these sweeps (time collinear with z)")
        p_op = np.eye(N) - vt @ pinv1[order + 1:, :]        # drift-removal operator
        drift_s = pinv1[order + 1:, :] @ cv
        drift_coef = drift_s / t_scale ** np.arange(1, drift_order + 1)
    else:
        p_op = np.eye(N)
        drift_coef = np.zeros(0)
    r_op = np.zeros((n_s, N))                              # per-sweep a1 operator
    coef = np.zeros((n_s, order + 1))
    resid = np.zeros((n_s, n))
    cc = p_op @ cv
    for s in range(n_s):
        vs = _poly.polyvander(u[s], order)
        pinv = np.linalg.pinv(vs)
        sl = slice(s * n, (s + 1) * n)
        coef[s] = pinv @ cc[sl]
        resid[s] = cc[sl] - vs @ coef[s]
        r_op[s, sl] = pinv[1] / zs
    dcdz_sweep = coef[:, 1] / zs
    l_op = (r_op @ p_op).mean(axis=0)
    dof = N - n_s * (order + 1) - drift_order
    sigma = math.sqrt(float(np.sum(resid**2)) / dof) if dof > 0 else float("nan")
    u_dcdz = sigma * float(np.linalg.norm(l_op))
    u_sc = float(np.std(dcdz_sweep, ddof=1) / math.sqrt(n_s)) if n_s > 1 else float("nan")
    return CapacitanceGradientResult(dcdz_sweep, float(dcdz_sweep.mean()), u_dcdz, u_sc, coef, zs,
                                     float(z_weigh_m), drift_coef, t_ref, resid, sigma)


def efb_kappa_bracketing(dcdz_before_f_m, dcdz_after_f_m):
    """kappa = (dC/dz) / 2 (seed 000 eq. 1) with dC/dz the average of the gradient determinations
    before and after the weighing (seed 000 section 4.1), F/m."""
    return 0.25 * (np.asarray(dcdz_before_f_m, dtype=float) + np.asarray(dcdz_after_f_m, dtype=float))


# --- EFB: weighing ----------------------------------------------------------------------------
def efb_force_n(voltage_v, kappa_f_m):
    """F = kappa V^2 (seed 000 eq. 1) from the measured (DVM) voltage, N."""
    return np.asarray(kappa_f_m, dtype=float) * np.asarray(voltage_v, dtype=float) ** 2


def efb_masses_eq17(t_u_pos_s, f_u_pos_n, t_u_neg_s, f_u_neg_n, t_l_pos_s, f_l_pos_n,
                    t_l_neg_s, f_l_neg_n, g_m_s2: float):
    """Per-trial masses of seed 000 eq. (17), kg:

    ``m_p = [F_U-,p - F_U+(t_U-,p) - F_L+,p + F_U+(t_L+,p) - F_L-,p + F_U+(t_L-,p)] / 2g``

    F_U+(t) is the linear interpolation in time between consecutive unloaded positive-polarity
    forces (it removes the drift of the restoring force). With measured voltages
    V_m = +-V + V_S (eqs. 2-3) the surface-potential terms cancel: in a drift-free balance the
    sum is exactly 2 kappa (V_U^2 - V_L^2) = 2 m g (eqs. 4-8).

    Parameters
    ----------
    t_u_pos_s, f_u_pos_n : array_like, shape (n_u,), s and N
        Unloaded, positive polarity readings (increasing times; they must bracket every other
        time).
    t_u_neg_s, f_u_neg_n, t_l_pos_s, f_l_pos_n, t_l_neg_s, f_l_neg_n : array_like, shape (n_p,)
        Unloaded negative, loaded positive and loaded negative readings of the n_p trials.
    g_m_s2 : float

    Returns
    -------
    ndarray, shape (n_p,), kg
    """
    tu = np.asarray(t_u_pos_s, dtype=float)
    fu = np.asarray(f_u_pos_n, dtype=float)
    if np.any(np.diff(tu) <= 0):
        raise ValueError("t_u_pos_s must increase")
    fi = lambda tt, name: _interp_strict(tt, tu, fu, name)  # noqa: E731
    s = (np.asarray(f_u_neg_n, dtype=float) - fi(t_u_neg_s, "t_u_neg_s")
         - np.asarray(f_l_pos_n, dtype=float) + fi(t_l_pos_s, "t_l_pos_s")
         - np.asarray(f_l_neg_n, dtype=float) + fi(t_l_neg_s, "t_l_neg_s"))
    return s / (2.0 * g_m_s2)


@dataclass
class EfbMassResult:
    """EFB weighing result (seed 000 eq. 17, section 4.2.1, Table 3).

    mass_trial_kg (n_p,): eq. (17) per trial; mass_raw_kg their mean (before the hysteresis
    correction); hysteresis_kg the subtracted correction and u_hysteresis_kg its uncertainty
    (10 % of it, seed 000 section 4.2.1); mass_kg = mass_raw_kg - hysteresis_kg; u_a_kg the
    standard deviation of the mean of the trials (seed 000 section 4.2.3, figure 6).
    """

    mass_trial_kg: np.ndarray
    mass_raw_kg: float
    hysteresis_kg: float
    u_hysteresis_kg: float
    mass_kg: float
    u_a_kg: float
    kappa_f_m: np.ndarray


def efb_weighing(kappa_f_m, g_m_s2: float, t_u_pos_s, v_u_pos_v, t_u_neg_s, v_u_neg_v,
                 t_l_pos_s, v_l_pos_v, t_l_neg_s, v_l_neg_v, *, hysteresis_kg: float = 0.0,
                 hysteresis_rel_u: float = 0.10) -> EfbMassResult:
    """EFB mass from measured voltages: F = kappa V^2 (eq. 1), eq. (17) per trial, mean,
    hysteresis correction subtracted (Table 3).

    kappa_f_m (F/m): the bracketing average of :func:`efb_kappa_bracketing` (scalar; an array,
    e.g. the gradients before and after halved, is averaged). Voltages in V (measured, i.e.
    including the surface potential), times in s, shapes as :func:`efb_masses_eq17`; the
    hysteresis correction ``hysteresis_kg`` (from :func:`efb_hysteresis_from_mimic`) is
    subtracted with an uncertainty ``hysteresis_rel_u`` of it (seed 000: 10 %).
    """
    k = float(np.mean(kappa_f_m)) if np.ndim(kappa_f_m) else float(kappa_f_m)
    m = efb_masses_eq17(t_u_pos_s, efb_force_n(v_u_pos_v, k), t_u_neg_s, efb_force_n(v_u_neg_v, k),
                        t_l_pos_s, efb_force_n(v_l_pos_v, k), t_l_neg_s, efb_force_n(v_l_neg_v, k),
                        g_m_s2)
    raw = float(m.mean())
    u_a = float(np.std(m, ddof=1) / math.sqrt(m.size)) if m.size > 1 else float("nan")
    corr, u_h = efb_hysteresis_correction(hysteresis_kg, hysteresis_rel_u)
    return EfbMassResult(m, raw, corr, u_h, raw - corr, u_a, np.atleast_1d(np.asarray(kappa_f_m, float)))


def efb_hysteresis_from_mimic(force_before_n, force_after_n, g_m_s2: float) -> float:
    """Hysteresis of the balance expressed as a mass, kg (seed 000 section 4.2.1).

    The paper measures the hysteresis force directly by mimicking a mass placement with a short
    position excursion followed by a gain change at the operating voltage, without a mass. The
    protocol is only described in words; the simplest faithful version implemented here:
    the readings of the electrostatic force (N) before and after each mimicked exchange are
    given, and the hysteresis mass is ``mean(F_before - F_after) / g`` (a mimicked loading
    that leaves the flexures pushing up lowers the force needed afterwards, and the same
    transient in a real loading makes the mass read high by that amount).
    """
    d = np.asarray(force_before_n, dtype=float) - np.asarray(force_after_n, dtype=float)
    return float(np.mean(d) / g_m_s2)


def efb_hysteresis_correction(hysteresis_kg: float, rel_u: float = 0.10) -> tuple[float, float]:
    """The correction subtracted from the measured mass and its standard uncertainty, kg
    (seed 000 section 4.2.1 and Table 3: 13.9(1.4) ng for 1 mg; the uncertainty is 10 % of the
    measured hysteresis force because a 10x longer excursion changed it by ~10 %)."""
    return float(hysteresis_kg), abs(float(hysteresis_kg)) * float(rel_u)


# --- uncertainty ----------------------------------------------------------------------------
@dataclass
class UncertaintyResult:
    """A result with type A, type B and combined standard uncertainties (k = 1).

    value; u_a (type A, from the scatter), u_b (type B, from the budget), u_c = sqrt(u_a^2 +
    u_b^2), all in the unit of the value; u_a_rel, u_b_rel, u_c_rel relative to |value|;
    budget: name -> relative standard uncertainty (the type B lines); n the number of
    determinations; values the determinations.
    """

    value: float
    u_a: float
    u_b: float
    u_c: float
    u_a_rel: float
    u_b_rel: float
    u_c_rel: float
    budget: dict[str, float]
    n: int
    values: np.ndarray = field(repr=False)

    def table(self) -> str:
        """Budget table (relative, 1e-9), like seed 001 Table III / seed 000 Table 1."""
        rows = [f"{'statistical (type A)':<36s}{self.u_a_rel * 1e9:12.2f}"]
        rows += [f"{k:<36s}{v * 1e9:12.2f}" for k, v in sorted(self.budget.items(), key=lambda kv: -kv[1])]
        rows.append(f"{'total relative uncertainty':<36s}{self.u_c_rel * 1e9:12.2f}")
        return "source                              rel. u (1e-9)\n" + "\n".join(rows)


def combine_uncertainty(values, budget: Mapping[str, float] | None = None, *,
                        type_a: str = "sem", value: float | None = None,
                        u_a: float | None = None) -> UncertaintyResult:
    """Combine type A (scatter) and type B (budget) in quadrature (GUM; seed 001 Table III, seed
    000 Table 1).

    Parameters
    ----------
    values : array_like, shape (n,)
        Per-set determinations (e.g. one h per triplet, one mass per trial or per day).
    budget : mapping name -> relative standard uncertainty (k = 1), optional
        Type B lines (e.g. :data:`NIST4_TABLE_III_BUDGET`, :data:`EFB_TABLE_1_BUDGET_1MG`).
    type_a : 'sem' or 'std'
        Standard deviation of the mean (default) or the sample standard deviation (what seed
        001 quotes for its first campaign, Table III "statistical").
    value : float, optional
        The result (default: the mean of ``values``).
    u_a : float, optional
        Override the type A uncertainty (e.g. with a correlation-aware one).
    """
    v = np.atleast_1d(np.asarray(values, dtype=float))
    n = v.size
    val = float(v.mean()) if value is None else float(value)
    if u_a is None:
        if n < 2:
            ua = 0.0 if n == 1 and type_a == "none" else float("nan")
        else:
            sd = float(np.std(v, ddof=1))
            if type_a == "sem":
                ua = sd / math.sqrt(n)
            elif type_a == "std":
                ua = sd
            else:
                raise ValueError("type_a must be 'sem' or 'std'")
    else:
        ua = float(u_a)
    b = {str(k): float(x) for k, x in (budget or {}).items()}
    ub_rel = math.sqrt(sum(x * x for x in b.values()))
    ub = abs(val) * ub_rel
    uc = math.hypot(ua, ub)
    av = abs(val) if val != 0 else float("nan")
    return UncertaintyResult(val, ua, ub, uc, ua / av, ub_rel, uc / av, b, n, v)


def h_from_triplets(triplets: Sequence[TripletResult],
                    budget: Mapping[str, float] | None = None, *,
                    type_a: str = "sem") -> UncertaintyResult:
    """h (J s) of a campaign: one value per triplet regression (seed 001 figure 14), type A from
    their scatter, type B from ``budget`` (default :data:`NIST4_TABLE_III_BUDGET`).

    ``type_a='std'`` quotes the sample standard deviation as seed 001 does for its first
    campaign (Table III "statistical" 24.9e-9; the standard deviation of the mean was 2.3e-9).
    """
    b = NIST4_TABLE_III_BUDGET if budget is None else budget
    return combine_uncertainty([tr.h_j_s for tr in triplets], b, type_a=type_a)


# --- plots ----------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_bl_profile(result: VelocitySetResult, path) -> str:
    """Bl(z) of every sweep with the master profile (top) and the residuals (bottom), PNG
    (after seed 001 figure 11). Returns the path."""
    plt = _plt()
    fig, (a0, a1) = plt.subplots(2, 1, sharex=True, figsize=(7, 6), height_ratios=[2, 1])
    for z, b, r in zip(result.z_m, result.bl_t_m, result.residual_t_m):
        a0.plot(z * 1e3, b, ".", ms=2, alpha=0.4)
        a1.plot(z * 1e3, r * 1e9 / abs(result.bl_mean_t_m), ".", ms=2, alpha=0.4)
    zz = np.linspace(*result.z_range_m, 400)
    a0.plot(zz * 1e3, result.profile_t_m(zz), "k-", lw=1.5, label="master profile")
    a0.axvline(result.z_weigh_m * 1e3, color="r", lw=0.8, label="weighing position")
    a0.set_ylabel("Bl / (T m)")
    a0.legend(loc="best", fontsize=8)
    a1.set_ylabel("residual / 1e-9 (rel.)")
    a1.set_xlabel("z / mm")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_bl_time(result: TripletResult, path) -> str:
    """Bl over time, force (s = 1) vs velocity (s = 0) points, PNG (after seed 001 figure 12):
    top the data relative to {Bl_V} with the triplet regression, bottom the data minus the
    smooth part l1 + l2 t + l3 t^2, where the force points sit l4 above the velocity points.
    Returns the path."""
    plt = _plt()
    fig, (a0, a1) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    t0 = result.time_s.min()
    ref = result.bl_v_t_m
    f = result.is_force
    tm = (result.time_s - t0) / 60
    smooth = result.model_t_m(result.time_s, False)
    for ax, y in ((a0, result.bl_t_m / ref - 1), (a1, (result.bl_t_m - smooth) / ref)):
        ax.plot(tm[~f], y[~f] * 1e9, "r.", label="velocity mode")
        ax.plot(tm[f], y[f] * 1e9, "bs", ms=4, label="force mode")
    tt = np.linspace(result.time_s.min(), result.time_s.max(), 300)
    a0.plot((tt - t0) / 60, (result.model_t_m(tt, False) / ref - 1) * 1e9, "r-", lw=1)
    a0.plot((tt - t0) / 60, (result.model_t_m(tt, True) / ref - 1) * 1e9, "b-", lw=1)
    a1.axhline(0.0, color="r", lw=1)
    a1.axhline(result.lam[3] / ref * 1e9, color="b", lw=1)
    a0.set_ylabel("Bl / Bl_V - 1 / 1e-9")
    a1.set_ylabel("Bl - (l1 + l2 t + l3 t^2) / 1e-9 (rel.)")
    a1.set_xlabel("t / min")
    a0.set_title(f"h/h90 - 1 = {result.h_rel * 1e9:.1f}({result.u_h_rel * 1e9:.1f}) x 1e-9")
    a0.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_mass_determinations(result: UncertaintyResult, path, *, u_each=None, unit: str = "kg",
                             scale: float = 1.0, reference: float | None = None) -> str:
    """The determinations with error bars (u_each, default the sample standard deviation) and
    the result with its combined uncertainty band, PNG (after seed 001 figure 14 / seed 000
    figure 6). ``scale`` multiplies the values for display in ``unit``. Returns the path."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    v = result.values * scale
    e = (np.full(v.size, np.std(result.values, ddof=1) if v.size > 1 else 0.0) if u_each is None
         else np.broadcast_to(np.asarray(u_each, dtype=float), v.shape)) * scale
    ax.errorbar(np.arange(v.size), v, yerr=e, fmt="o", ms=4, capsize=2, label="determinations")
    ax.axhline(result.value * scale, color="k", lw=1, label="result")
    ax.axhspan((result.value - result.u_c) * scale, (result.value + result.u_c) * scale,
               color="k", alpha=0.15, label="u_c (k=1)")
    if reference is not None:
        ax.axhline(reference * scale, color="g", ls="--", lw=1, label="reference")
    ax.set_xlabel("determination")
    ax.set_ylabel(unit)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
