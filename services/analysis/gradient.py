"""EFB capacitance gradient: dC/dz at the weighing position and kappa = (dC/dz) / 2.

Seed 000, section 3.1 (11 equidistant points within 2 mm, a capacitance-bridge reading at each)
and section 4.1 (a 5th-order polynomial per sweep, drift removal, the mean of the per-sweep
gradients; the determinations before and after a weighing averaged for it). Positions in m,
capacitances in F, dC/dz and kappa in F/m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import polynomial as _poly

__all__ = ["CapacitanceGradientResult", "efb_bridge_readings", "capacitance_gradient",
           "efb_kappa_bracketing"]


@dataclass
class CapacitanceGradientResult:
    """One dC/dz determination (seed 000 section 4.1, figure 4).

    dcdz_sweep_f_per_m (n_s,): dC/dz at the weighing position per sweep; dcdz_f_per_m: their mean (the
    value of the measurement); u_dcdz_f_per_m: its standard uncertainty propagated through the
    (linear) drift removal and polynomial fits with the pooled residual variance;
    coef_sweep (n_s, order + 1): power-series coefficients in u = (z - z_weigh) / z_scale_m, F;
    drift_coef (drift_order,): drift polynomial in (t - t_ref_s) (F/s, F/s^2, ...);
    residual_f (n_s, n): residuals; sigma_f the pooled residual standard deviation, F.
    """

    dcdz_sweep_f_per_m: np.ndarray
    dcdz_f_per_m: float
    u_dcdz_f_per_m: float
    coef_sweep: np.ndarray
    z_scale_m: float
    z_weigh_m: float
    drift_coef: np.ndarray
    t_ref_s: float
    residual_f: np.ndarray
    sigma_f: float


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
    return CapacitanceGradientResult(dcdz_sweep, float(dcdz_sweep.mean()), u_dcdz, coef, zs,
                                     float(z_weigh_m), drift_coef, t_ref, resid, sigma)


def efb_kappa_bracketing(dcdz_before_f_per_m, dcdz_after_f_per_m):
    """kappa = (dC/dz) / 2 (seed 000 eq. 1) with dC/dz the average of the gradient determinations
    before and after the weighing (seed 000 section 4.1), F/m."""
    return 0.25 * (np.asarray(dcdz_before_f_per_m, dtype=float) + np.asarray(dcdz_after_f_per_m, dtype=float))
