"""NIST-4 velocity mode: the flux integral Bl(z) of a set of up/down sweeps.

Seed 001, "Measurement procedure", velocity mode: per sweep Bl(z) regressed on Chebyshev
polynomials of z mapped to [-1, 1] (figure 11: 11th order), a master profile averaged over the
sweeps of the run, each sweep's zero-order coefficient refitted with the master fixed, Bl at the
weighing position per sweep, up/down sweeps averaged in pairs (the thermal voltage, odd in the
velocity, cancels). The voltage U is the DVM reading with the PJVS voltage added back, as the
daq publishes it (``coil_voltage_v``); positions are the optical centre's, from the weighing
position (m); Bl in T m.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from numpy.polynomial import chebyshev as _cheb

from kibble.services.analysis.uncertainty import small_sample_factor, std_of_mean

__all__ = ["VelocitySetResult", "velocity_from_positions", "velocity_mode_bl",
           "velocity_mode_bl_flux", "pair_scatter_t_m", "master_profile_u_t_m"]


def _as_list(x, n: int, name: str) -> list[np.ndarray]:
    """Per-sweep arrays: a sequence of n arrays, a 2-D array with n rows, or a scalar."""
    if np.isscalar(x):
        return [np.asarray(x, dtype=float)] * n
    if isinstance(x, np.ndarray) and x.ndim == 1 and x.size == n:
        # one value per sweep
        return [np.asarray(float(v)) for v in x]
    out = [np.asarray(v, dtype=float) for v in x]
    if len(out) != n:
        raise ValueError(f"{name}: expected {n} sweeps, got {len(out)}")
    return out


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
    t_mid_s, z_mid_m, velocity_m_per_s : ndarray, shape (n - 1,)
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
    bl_pair_t_m, time_pair_s (n_s // 2,) the up/down sweeps averaged in non-overlapping pairs
    (sweeps 0+1, 2+3, ...: the paper averages every successive pair, 30 sweeps giving 29
    values, but those overlap, and a regression that takes them as independent understates
    its uncertainty); bl_mean_t_m the mean of the pairs (the thermal voltage cancels exactly
    for alternating sweeps); u_bl_mean_t_m its type A standard uncertainty from the scatter of
    the pairs of per-sweep full-fit values at the weighing position (honest for white and for
    sweep-to-sweep noise); shape_w_t_m (n_s,) each sweep's own shape term at the weighing
    position (its coefficients 1..order at x_w less what the refit of the zero-order
    coefficient takes from them, with the set's mean refit): the master's is their mean, so
    their standard deviation of the mean is the master profile's type A uncertainty at x_w, an
    error common to every sweep that the scatter of the pairs does not show
    (:func:`master_profile_u_t_m`); z_m, bl_t_m, residual_t_m: per-sweep lists of the data and
    of the residuals from c0 + master profile.
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

    def profile_t_m(self, z_m):
        """The master profile with the mean refitted zero-order coefficient at positions z_m
        (m), T m."""
        c = self.master_coef.copy()
        c[0] = float(np.mean(self.c0_sweep_t_m))
        return _cheb.chebval(self.x_of(z_m), c)


def velocity_mode_bl(z_m, voltage_v, velocity_m_per_s, direction, *, time_s=None,
                     z_weigh_m: float = 0.0, order: int = 11,
                     z_range_m: tuple[float, float] | None = None,
                     master_coef=None) -> VelocitySetResult:
    """Flux integral of one velocity-mode set, point by point (seed 001, "Measurement
    procedure", velocity mode; figure 11 uses an 11th-order fit, hence the default order).

    Per point ``Bl = U / v`` (v of the optical centre). For each sweep z is mapped to x in
    [-1, 1] over ``z_range_m`` (common to all sweeps, so that coefficients are comparable;
    default the overall min and max of z) and Bl(x) is regressed on Chebyshev polynomials of
    the first kind, degree ``order``. The master profile is the average of the coefficients
    1..order over all sweeps (the zero-order coefficient is ignored for it); each sweep's
    zero-order coefficient is then refitted with the master profile fixed (a least-squares fit
    of a constant = the mean of Bl - master). Bl at the weighing position is c0 + master(x_w).
    Up and down sweeps are averaged in pairs, cancelling the thermal voltage (its contribution
    U_th / v changes sign with v).

    Parameters
    ----------
    z_m : sequence of n_s arrays (or 2-D array (n_s, n)), m
        Coil position (optical centre) of each reading of each sweep, already corrected to the
        weighing-position reference (the paper's suspension-stretch correction is the caller's).
    voltage_v, velocity_m_per_s : same shapes as ``z_m``, V and m/s
        Induced voltage (DVM reading with the PJVS voltage added back) and vertical velocity
        of the optical centre.
    direction : sequence of n_s str, 'up' or 'down'
        Sweep directions; successive sweeps must alternate (the paper starts with 'down').
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
        the mean of the ``coef_sweep`` of every set of the run, fitted over the same
        ``z_range_m``); default: the average over the sweeps given here.

    Returns
    -------
    VelocitySetResult
    """
    n_s = len(direction)
    direction = _check_directions(direction)
    zs = _as_list(z_m, n_s, "z_m")
    us = _as_list(voltage_v, n_s, "voltage_v")
    vs = _as_list(velocity_m_per_s, n_s, "velocity_m_per_s")
    ts = [np.asarray(float(k)) for k in range(n_s)] if time_s is None else _as_list(time_s, n_s, "time_s")
    bls = [u / v for u, v in zip(us, vs)]
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


def velocity_mode_bl_flux(time_s, z_m, voltage_v, direction, *, z_weigh_m: float = 0.0,
                          order: int = 11, z_range_m: tuple[float, float] | None = None,
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
    voltage_v : sequence of n_s arrays, V
        Induced voltage readings (DVM with the PJVS voltage added back; the first reading of
        each sweep is not used: its interval starts before the first position).
    direction, z_weigh_m, order, z_range_m, master_coef
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
    us = _as_list(voltage_v, n_s, "voltage_v")
    for k, (t, z, u) in enumerate(zip(ts, zr, us)):
        if not (t.shape == z.shape == u.shape) or t.size < order + 3:
            raise ValueError(f"sweep {k}: time_s, z_m and voltage_v need the same length, "
                             f"at least order + 3 = {order + 3}")
        if np.any(np.diff(t) <= 0):
            raise ValueError(f"sweep {k}: time_s must increase")
    flux = [np.concatenate([[0.0], np.cumsum(u[1:] * np.diff(t))]) for t, u in zip(ts, us)]
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
    bl_pts = [u[1:] / m[2] for u, m in zip(us, mids)]
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
    n_p = n_s // 2
    bl_pair = 0.5 * (bl_sweep[0:2 * n_p:2] + bl_sweep[1:2 * n_p:2])
    t_pair = 0.5 * (t_sweep[0:2 * n_p:2] + t_sweep[1:2 * n_p:2])
    # type A: the same pairs of per-sweep full-fit values at x_w (see the dataclass)
    full_w = _cheb.chebval(x_w, coef.T)
    u = std_of_mean(0.5 * (full_w[0:2 * n_p:2] + full_w[1:2 * n_p:2]))
    return VelocitySetResult((lo, hi), float(z_weigh_m), int(order), direction, t_sweep, coef,
                             master, c0, bl_sweep, bl_pair, t_pair, float(np.mean(bl_pair)), u,
                             shape_w, list(zs), bls, resid)


def pair_scatter_t_m(velocity_sets: Sequence[VelocitySetResult]) -> float:
    """The standard deviation of one pair's Bl (``bl_pair_t_m``) about its set's mean, pooled
    over ``velocity_sets``, T m: the type A uncertainty of each velocity-mode point of a
    triplet regression. nan without a degree of freedom."""
    dev = np.concatenate([r.bl_pair_t_m - r.bl_pair_t_m.mean() for r in velocity_sets])
    dof = sum(r.bl_pair_t_m.size - 1 for r in velocity_sets)
    return float(np.sqrt(np.sum(dev**2) / dof)) if dof > 0 else float("nan")


def master_profile_u_t_m(velocity_sets: Sequence[VelocitySetResult]) -> float:
    """The type A uncertainty of the master profile at the weighing position, T m: the
    standard deviation of the mean of every sweep's own shape term there (``shape_w_t_m`` of
    ``velocity_sets``, which share one master profile), widened to its Student t
    (:func:`~kibble.services.analysis.uncertainty.small_sample_factor`). An error common to
    every Bl_V of the run, which no scatter of pairs or triplets shows."""
    shape_w = np.concatenate([r.shape_w_t_m for r in velocity_sets])
    return std_of_mean(shape_w) * small_sample_factor(shape_w.size - 1)
