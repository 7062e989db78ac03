"""Noise models shared by the plants.

Ground vibration
----------------
Ground acceleration per axis is ``a = w_floor + y_ms`` where

* ``w_floor`` is white noise of one-sided amplitude spectral density ``floor_asd``
  (m s^-2 / sqrt(Hz)), drawn once per noise tick and held (zero-order) over the tick;
* ``y_ms`` is the secondary microseism peak: white noise of ASD ``peak_asd`` through the
  band-pass ``H(s) = 2 z w0 s / (s^2 + 2 z w0 s + w0^2)`` (``|H(j w0)| = 1``, ``z = 1/(2Q)``),
  discretized exactly (Van Loan) at the tick rate, so the samples have exactly the
  autocorrelation of the continuous process.

The one-sided PSD is ``floor_asd^2 + peak_asd^2 |H(j 2 pi f)|^2`` (:func:`ground_psd`). With the
default parameters it sits 1-15 dB above the Peterson (1993) new low-noise model (NLNM,
:func:`nlnm_accel_psd`) everywhere in 0.1-10 Hz; tests check both.

White sensor noise of ASD ``s`` sampled at rate ``fs`` has per-sample standard deviation
``s * sqrt(fs / 2)`` (:func:`white_std`), which keeps the one-sided PSD at ``s^2``.

Flicker (1/f) noise
-------------------
A sum of first-order (Ornstein-Uhlenbeck) processes of equal variance with log-spaced corner
frequencies, each discretized exactly (:func:`flicker_poles`, :func:`flicker_step`): one-sided
PSD ``A^2 / f`` inside the band (:func:`flicker_psd`), flat below it, 1/f^2 above. The NIST-4
published profile's ground tilt is one.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from scipy.linalg import expm

__all__ = ["NLNM_TABLE", "nlnm_accel_psd", "ground_filter", "ground_psd", "white_std",
           "ground_tick", "ground_block", "flicker_poles", "flicker_psd", "flicker_step",
           "flicker_block"]

# Peterson (1993), USGS OFR 93-322: NLNM acceleration PSD, P = A + B log10(T) dB re 1 (m/s^2)^2/Hz,
# (T_low, A, B) for T in [T_low, next T_low).
NLNM_TABLE = np.array([
    (0.10, -162.36, 5.64), (0.17, -166.70, 0.00), (0.40, -170.00, -8.30), (0.80, -166.40, 28.90),
    (1.24, -168.60, 52.48), (2.40, -159.98, 29.81), (4.30, -141.10, 0.00), (5.00, -71.36, -99.77),
    (6.00, -97.26, -66.49), (10.00, -132.18, -31.57), (12.00, -205.27, 36.16),
    (15.60, -37.65, -104.33), (21.90, -114.37, -47.10), (31.60, -160.58, -16.28),
    (45.00, -187.50, 0.00), (70.00, -216.47, 15.70), (101.00, -185.00, 0.00),
    (154.00, -168.34, -7.61), (328.00, -217.43, 11.90), (600.00, -258.28, 26.60),
    (10000.0, -346.88, 48.75), (100000.0, float("nan"), float("nan")),
])


def nlnm_accel_psd(f: np.ndarray | float) -> np.ndarray:
    """NLNM acceleration PSD in (m/s^2)^2/Hz at frequency f (Hz), valid 1e-5 .. 10 Hz."""
    f = np.atleast_1d(np.asarray(f, dtype=float))
    T = 1.0 / f
    out = np.full(T.shape, np.nan)
    for i in range(len(NLNM_TABLE) - 1):
        lo, A, B = NLNM_TABLE[i]
        hi = NLNM_TABLE[i + 1][0]
        m = (T >= lo) & (T < hi) if i < len(NLNM_TABLE) - 2 else (T >= lo) & (T <= hi)
        out[m] = 10.0 ** ((A + B * np.log10(T[m])) / 10.0)
    return out


def white_std(asd: float, fs: float) -> float:
    """Per-sample std of white noise with one-sided ASD ``asd`` sampled at ``fs``."""
    return asd * math.sqrt(fs / 2.0)


def ground_filter(peak_hz: float, peak_q: float, peak_asd: float, floor_asd: float, tick_s: float):
    """Exact discretization of the microseism filter: returns (Phi 2x2, L 2x2 lower-Cholesky of
    the process-noise covariance, c 2 output row, floor_std) for one tick of length ``tick_s``."""
    w0 = 2 * math.pi * peak_hz
    z = 1.0 / (2 * peak_q)
    A = np.array([[0.0, 1.0], [-w0 * w0, -2 * z * w0]])
    B = np.array([[0.0], [1.0]])
    q = peak_asd ** 2 / 2.0  # two-sided intensity of the driving white noise
    n = 2
    M = np.zeros((2 * n, 2 * n))
    M[:n, :n] = -A
    M[:n, n:] = B @ B.T * q
    M[n:, n:] = A.T
    E = expm(M * tick_s)
    Phi = E[n:, n:].T
    Qd = Phi @ E[:n, n:]
    Qd = 0.5 * (Qd + Qd.T)
    L = np.linalg.cholesky(Qd + 1e-300 * np.eye(2))
    c = np.array([0.0, 2 * z * w0])
    return Phi, L, c, white_std(floor_asd, 1.0 / tick_s)


def ground_psd(f: np.ndarray, peak_hz: float, peak_q: float, peak_asd: float, floor_asd: float) -> np.ndarray:
    """Model one-sided acceleration PSD (m/s^2)^2/Hz of :func:`ground_filter` noise."""
    w = 2 * np.pi * np.asarray(f, dtype=float)
    w0 = 2 * np.pi * peak_hz
    z = 1.0 / (2 * peak_q)
    H = (2j * z * w0 * w) / (w0 ** 2 - w ** 2 + 2j * z * w0 * w)
    return floor_asd ** 2 + peak_asd ** 2 * np.abs(H) ** 2


@njit(cache=True)
def ground_tick(gs, gphi, gL, gc, floor_std, n0, n1, n2):
    """Advance one axis' microseism state ``gs`` (2,) by one tick; return the acceleration.
    n0, n1: standard normals for the filter, n2: for the white floor."""
    w0 = gL[0, 0] * n0
    w1 = gL[1, 0] * n0 + gL[1, 1] * n1
    s0 = gphi[0, 0] * gs[0] + gphi[0, 1] * gs[1] + w0
    s1 = gphi[1, 0] * gs[0] + gphi[1, 1] * gs[1] + w1
    gs[0] = s0
    gs[1] = s1
    return gc[0] * s0 + gc[1] * s1 + floor_std * n2


@njit(cache=True)
def ground_block(gs, gphi, gL, gc, floor_std, normals):
    """Run :func:`ground_tick` over ``normals`` (n, 3); returns n accelerations (tests, plots)."""
    n = normals.shape[0]
    out = np.empty(n)
    for k in range(n):
        out[k] = ground_tick(gs, gphi, gL, gc, floor_std, normals[k, 0], normals[k, 1], normals[k, 2])
    return out


# ---------------------------------------------------------------------------- flicker (1/f)
def flicker_poles(f_lo_hz: float, f_hi_hz: float, per_decade: float, step_s: float,
                  asd_1hz: float) -> tuple[np.ndarray, np.ndarray]:
    """A 1/f (flicker) process as a sum of first-order (Ornstein-Uhlenbeck) processes with
    corner frequencies ``f_k`` spaced ``per_decade`` per decade from ``f_lo_hz`` to ``f_hi_hz``,
    each of the same variance, discretized exactly at ``step_s``: returns (a (n,), b (n,)) for
    ``s_k <- a_k s_k + b_k n_k`` (``n_k`` standard normals), the process being ``sum_k s_k``.

    Each pole's one-sided PSD is ``2 sigma^2 / (pi f_k) / (1 + (f / f_k)^2)``; a log-spaced
    sum with ratio ``q = 10^(1 / per_decade)`` is ``sigma^2 / (f ln q)`` inside the band (to a
    ripple of ~0.1 dB at two poles per decade), so ``sigma^2 = asd_1hz^2 ln q`` gives the
    one-sided PSD ``asd_1hz^2 / f`` (:func:`flicker_psd`): ``asd_1hz`` is the amplitude
    spectral density at 1 Hz, in the process's unit per sqrt(Hz). Below ``f_lo_hz`` the PSD
    levels off, above ``f_hi_hz`` it falls as 1/f^2."""
    if not (0.0 < f_lo_hz < f_hi_hz) or per_decade <= 0 or step_s <= 0 or asd_1hz < 0:
        raise ValueError("flicker_poles needs 0 < f_lo_hz < f_hi_hz, per_decade > 0, step_s > 0, "
                         f"asd_1hz >= 0; got {f_lo_hz}, {f_hi_hz}, {per_decade}, {step_s}, {asd_1hz}")
    n = int(math.floor(per_decade * math.log10(f_hi_hz / f_lo_hz) + 1e-9)) + 1
    f = f_lo_hz * 10.0 ** (np.arange(n) / per_decade)
    sigma2 = asd_1hz ** 2 * math.log(10.0) / per_decade
    a = np.exp(-2.0 * math.pi * f * step_s)
    b = np.sqrt(sigma2 * (1.0 - a * a))
    return a, b


def flicker_psd(f: np.ndarray, f_lo_hz: float, f_hi_hz: float, per_decade: float,
                asd_1hz: float) -> np.ndarray:
    """One-sided PSD of the continuous :func:`flicker_poles` process at ``f`` (Hz), in the
    process's unit squared per Hz (``asd_1hz^2 / f`` inside the band)."""
    n = int(math.floor(per_decade * math.log10(f_hi_hz / f_lo_hz) + 1e-9)) + 1
    fk = f_lo_hz * 10.0 ** (np.arange(n) / per_decade)
    sigma2 = asd_1hz ** 2 * math.log(10.0) / per_decade
    f = np.asarray(f, dtype=float)[..., None]
    return np.sum(2.0 * sigma2 / (math.pi * fk) / (1.0 + (f / fk) ** 2), axis=-1)


@njit(cache=True)
def flicker_step(s, a, b, normals):
    """Advance the pole states ``s`` (n,) by one step with ``normals`` (n,); return their sum."""
    acc = 0.0
    for k in range(s.shape[0]):
        s[k] = a[k] * s[k] + b[k] * normals[k]
        acc += s[k]
    return acc


@njit(cache=True)
def flicker_block(s, a, b, normals):
    """Run :func:`flicker_step` over ``normals`` (m, n); returns m samples (tests, plots)."""
    m = normals.shape[0]
    out = np.empty(m)
    for i in range(m):
        out[i] = flicker_step(s, a, b, normals[i])
    return out
