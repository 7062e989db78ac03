"""NIST-4 force mode: the flux integral Bl(0) from mass-on / mass-off weighings.

Seed 001, force mode and eqs. 16-19: the coil current I = U / R from the voltage across the
standard resistor, every three adjacent weighings one determination (the outer two
interpolated in time to the middle one), the current dependence of Bl (eq. 16) taken out with
eq. 19. Currents in A, Bl in T m, masses in kg, g in m/s^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ALPHA_NIST4_PER_A", "BETA_NIST4_PER_A2", "ForceSetResult", "currents_from_voltage",
           "bl_current_factor", "force_mode_bl"]

ALPHA_NIST4_PER_A = -2.351e-6 * 1e3
"""alpha of eq. (16), seed 001: -2.351(0.003) x 10^-6 mA^-1 = -2.351e-3 A^-1."""
BETA_NIST4_PER_A2 = 0.368e-9 * 1e6
"""beta of eq. (16), seed 001: 0.368(0.323) x 10^-9 mA^-2 = 0.368e-3 A^-2."""


def currents_from_voltage(voltage_v, resistance_ohm):
    """Coil current I = U / R (seed 001, force mode: the voltage across the standard resistor
    R, nominally 100 ohm, with the PJVS voltage added back as the daq publishes it).

    Parameters: voltage_v array_like (n,), V; resistance_ohm float, ohm. Returns ndarray (n,), A.
    """
    return np.asarray(voltage_v, dtype=float) / float(resistance_ohm)


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


def force_mode_bl(time_s, current_a, mass_on, mass_kg: float, g_m_per_s2: float, *,
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
    mass_kg, g_m_per_s2 : float
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
    bl = mass_kg * g_m_per_s2 / (2.0 * di * fac)
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
