"""Helpers for tests and benchmarks of the plant models (no physics here)."""

from __future__ import annotations

import numpy as np

__all__ = ["QUIET_NIST4", "QUIET_EFB", "fringes_to_m", "dmd_eigs", "fit_damped_sine",
           "band_mean_psd"]

#: every noise source, drift and quantization off (NIST-4)
QUIET_NIST4 = {f"noise.{k}": False for k in (
    "ground", "interferometer", "psd", "current", "current_drift", "dac_quantization",
    "adc_quantization", "dvm", "temperature", "trajectory", "tilt", "ifo_nonlinearity")} | {
    "pressure.gauge_rel_noise": 0.0}
#: every noise source and quantization off (EFB)
QUIET_EFB = {f"noise.{k}": False for k in (
    "ground", "interferometer", "hv", "dvm", "bridge", "dac_quantization", "adc_quantization",
    "temperature", "tilt", "residual_gas", "surface_potential_drift", "ifo_flicker", "ifo_quantization",
    "thermal_drift")} | {"pressure.gauge_rel_noise": 0.0}


def fringes_to_m(fringes, phase_rad, wavelength_m):
    """Displacement (m) from fringe count + phase (one fringe = lambda/2)."""
    return (np.asarray(fringes, dtype=float) + np.asarray(phase_rad) / (2 * np.pi)) * wavelength_m / 2


def dmd_eigs(X: np.ndarray, dt: float) -> np.ndarray:
    """Continuous eigenvalues of the affine map fitted (least squares) to the snapshots of a
    noise-free ring-down, X[k+1] = A X[k] + b (b absorbs a constant force / offset
    equilibrium): lambda = log(mu) / dt for the eigenvalues mu of A. X: (n_samples, n_states)."""
    X0, X1 = X[:-1].T, X[1:].T
    s = np.std(X0, axis=1)
    s[s == 0] = 1.0
    Z0 = np.vstack([X0 / s[:, None], np.ones(X0.shape[1])])
    M = (X1 / s[:, None]) @ np.linalg.pinv(Z0)
    A = M[:, :-1]  # in scaled coordinates: same eigenvalues as the unscaled map
    mu = np.linalg.eigvals(A)
    return np.log(mu.astype(complex)) / dt


def fit_damped_sine(t: np.ndarray, y: np.ndarray, f0: float, zeta0: float = 0.01):
    """Least-squares fit y = A exp(-zeta w t) cos(w_d t + phi) + c; returns (f_n, zeta)."""
    from scipy.optimize import least_squares

    def model(p):
        wn, ze, a, ph, c = p
        wd = wn * np.sqrt(max(1 - ze * ze, 1e-12))
        return a * np.exp(-ze * wn * t) * np.cos(wd * t + ph) + c

    a0 = (np.max(y) - np.min(y)) / 2
    best = None
    for ph in np.linspace(-np.pi, np.pi, 8, endpoint=False):
        r = least_squares(lambda p: model(p) - y, [2 * np.pi * f0, zeta0, a0, ph, 0.0],
                          x_scale=[2 * np.pi * f0, max(zeta0, 1e-4), a0, 1.0, a0])
        if best is None or r.cost < best.cost:
            best = r
    assert best is not None  # the loop above ran eight times
    wn, ze = best.x[0], best.x[1]
    return wn / (2 * np.pi), ze


def band_mean_psd(f: np.ndarray, psd: np.ndarray, lo: float, hi: float) -> float:
    m = (f >= lo) & (f < hi)
    return float(np.mean(psd[m]))
