"""Geometry of the coil suspension: damping-coil actuation matrix and its constrained
pseudo-inverse, interferometer fusion (Abbe weights), PSD beam translation (numpy at
configuration time), and a numba kernel that applies a matrix per frame with limits.

Conventions (those of the NIST-4 plant; z up, angles in the x-y plane from +x toward +y):

* a point at ``(x_k, y_k) = R (cos A_k, sin A_k)`` of the coil moves vertically by
  ``z + y_k theta_x - x_k theta_y``;
* damping set k at angle ``D_k``, radius ``R_d``: the vertical coil (current ``i_v``) pushes
  ``F_v = k_v i_v`` up, giving ``F_z = F_v``, ``tau_x = y_k F_v``, ``tau_y = -x_k F_v``; the
  horizontal coil pushes tangentially, ``F_h = k_h i_h`` along ``(-sin D_k, cos D_k)``, giving
  ``tau_z = R_d F_h``. Coil order: (set0 vertical, set0 horizontal, set1 v, set1 h, set2 v, set2 h);
* a retroreflector at angle ``B_k`` (radius ``R``) moves horizontally by
  ``(x - R sin B_k theta_z, y + R cos B_k theta_z)``; the beam it returns is translated by twice
  that, the PSD reads ``gain`` V per metre of beam translation; the optical-lever mirror
  deflects the beam by ``2 theta``, read at the lever arm ``L``: ``gain 2 L theta``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["FORCE_ROWS", "damping_force_matrix", "damping_pinv", "ifo_fusion_matrix",
           "ifo_displacement_m", "psd_matrix", "matrix_run"]

#: rows of the damping force matrix (generalized forces in N and N m)
FORCE_ROWS = ("F_x", "F_y", "tau_x", "tau_y", "F_z", "tau_z")


def damping_force_matrix(angles_rad, radius_m: float, kv_n_per_a: float,
                         kh_n_per_a: float) -> np.ndarray:
    """Actuation matrix ``B[6, 2 n_sets]``: coil currents (A, plant order) to the generalized
    forces ``FORCE_ROWS`` (N, N, N m, N m, N, N m). ``angles_rad[n_sets]`` set angles (rad),
    ``radius_m`` mount radius, ``kv_n_per_a``/``kh_n_per_a`` force per ampere (N/A)."""
    ang = np.asarray(angles_rad, dtype=float)
    B = np.zeros((6, 2 * ang.size))
    for k, d in enumerate(ang):
        c, s = math.cos(d), math.sin(d)
        B[:, 2 * k] = kv_n_per_a * np.array([0.0, 0.0, radius_m * s, -radius_m * c, 1.0, 0.0])
        B[:, 2 * k + 1] = kh_n_per_a * np.array([-s, c, 0.0, 0.0, 0.0, radius_m])
    return B


def damping_pinv(B: np.ndarray, weights=None, tol: float = 1e-9) -> np.ndarray:
    """Constrained pseudo-inverse ``D[n_coils, 4]``: the coil currents (A) of column j produce
    unit generalized force j of (F_x [N], F_y [N], tau_x [N m], tau_y [N m]) and exactly zero
    F_z and tau_z, with the least weighted current norm ``sum w_i i_i^2`` (``weights[n_coils]``,
    default 1). Raises ``ValueError`` if ``B D`` misses the target by more than ``tol`` (the
    geometry cannot produce pure motions)."""
    n = B.shape[1]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,) or np.any(w <= 0):
        raise ValueError("weights must be positive, one per coil")
    s = 1.0 / np.sqrt(w)
    Bs = B * s[None, :]
    target = np.vstack([np.eye(4), np.zeros((2, 4))])
    D = s[:, None] * (np.linalg.pinv(Bs) @ target)
    err = np.max(np.abs(B @ D - target))
    if err > tol:
        raise ValueError(f"geometry cannot produce pure x, y, theta_x, theta_y (residual {err:.3g})")
    return D


def ifo_fusion_matrix(angles_rad, radius_m: float, centre_x_m: float = 0.0,
                      centre_y_m: float = 0.0) -> np.ndarray:
    """Fusion ``F[3, n_ifo]``: interferometer displacements (m) to (z at the optical centre
    ``(centre_x_m, centre_y_m)`` [m], theta_x [rad], theta_y [rad]) by least squares over
    ``z_i = z + y_i theta_x - x_i theta_y``. Row 0 are the Abbe weights (they sum to 1)."""
    ang = np.asarray(angles_rad, dtype=float)
    G = np.column_stack([np.ones(ang.size), radius_m * np.sin(ang), -radius_m * np.cos(ang)])
    if np.linalg.matrix_rank(G) < 3:
        raise ValueError("interferometer geometry does not determine z, theta_x, theta_y")
    E = np.linalg.pinv(G)
    F = E.copy()
    F[0] = E[0] + centre_y_m * E[1] - centre_x_m * E[2]
    return F


def ifo_displacement_m(fringes, phase_rad, wavelength_m: float) -> np.ndarray:
    """Displacement (m) from fringe counts and phase (rad): ``(N + phase/2pi) lambda/2``."""
    cycles = np.asarray(fringes, dtype=float) + np.asarray(phase_rad, dtype=float) / (2 * math.pi)
    return cycles * (0.5 * wavelength_m)


def psd_matrix(retro_angles_rad, radius_m: float, gain_v_per_m: float,
               lever_arm_m: float) -> np.ndarray:
    """``S[5, 2 n_retro + 2]``: PSD voltages (V; order retro0 dx, retro0 dy, retro1 dx, ...,
    lever theta_x, lever theta_y) to (x [m], y [m], theta_x [rad], theta_y [rad], theta_z [rad]).
    x, y, theta_z from the beam translation of the retroreflectors (least squares), theta_x,
    theta_y from the optical lever."""
    ang = np.asarray(retro_angles_rad, dtype=float)
    n = ang.size
    G = np.zeros((2 * n, 3))
    for k, b in enumerate(ang):
        G[2 * k] = 2.0 * gain_v_per_m * np.array([1.0, 0.0, -radius_m * math.sin(b)])
        G[2 * k + 1] = 2.0 * gain_v_per_m * np.array([0.0, 1.0, radius_m * math.cos(b)])
    if np.linalg.matrix_rank(G) < 3:
        raise ValueError("retroreflector geometry does not determine x, y, theta_z")
    E = np.linalg.pinv(G)
    S = np.zeros((5, 2 * n + 2))
    S[[0, 1, 4], :2 * n] = E
    S[2, 2 * n] = S[3, 2 * n + 1] = 1.0 / (2.0 * gain_v_per_m * lever_arm_m)
    return S


@njit(cache=True, error_model="numpy")
def matrix_run(M, x, lo, hi, last, out):
    """Apply ``M[k, m]`` to each row of ``x[n, m]`` and clamp to ``[lo[k], hi[k]]``.

    ``out[n, k]`` results (units of M times units of x, e.g. A from N); a row of ``x`` with any
    non-finite value, or whose product is not finite, repeats the previous output (``last[k]``,
    updated in place, for the first row). Returns the number of held rows."""
    n_held = 0
    for i in range(x.shape[0]):
        ok = True
        for j in range(x.shape[1]):
            if not math.isfinite(x[i, j]):
                ok = False
        if ok:
            for r in range(M.shape[0]):
                acc = 0.0
                for j in range(x.shape[1]):
                    acc += M[r, j] * x[i, j]
                if not math.isfinite(acc):
                    ok = False
                out[i, r] = min(max(acc, lo[r]), hi[r])
        if ok:
            for r in range(M.shape[0]):
                last[r] = out[i, r]
        else:
            n_held += 1
            for r in range(M.shape[0]):
                out[i, r] = min(max(last[r], lo[r]), hi[r])
    return n_held
