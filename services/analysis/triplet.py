"""The triplet regression, h and the mass (seed 001, "Measurement procedure", eqs. 13-15, 22).

One triplet is a velocity set, a force set and a velocity set; ``Bl(t) = l1 + l2 t + l3 t^2 +
l4 s(t)`` (s = 1 in force mode) is regressed on their Bl values and ``h = h_units (1 + l4 /
{Bl_V})`` (eqs. 13-15), with ``h_units`` the Planck constant the electrical units realize
(:mod:`~kibble.services.analysis.constants`: ``H_J_S`` in the SI, ``H90_J_S`` in the
conventional units of 1990). With the h fixed, the same ratio is the mass (eq. 22).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from kibble.services.analysis.constants import H_J_S
from kibble.services.analysis.uncertainty import (
    UncertaintyResult, combine_uncertainty, small_sample_factor, std_of_mean,
)

__all__ = ["TripletResult", "triplet_regression", "h_rel_from_lambda4", "h_from_lambda4",
           "mass_from_bl_ratio", "h_from_triplets"]


@dataclass
class TripletResult:
    """Triplet regression ``Bl(t) = l1 + l2 (t - t_ref) + l3 (t - t_ref)^2 + l4 s(t)`` (seed 001,
    "Measurement procedure", eqs. 13-15).

    lam (4,): l1 (T m), l2 (T m/s), l3 (T m/s^2), l4 (T m); cov (4, 4) their covariance; t_ref_s
    the time origin (mean of the data times); bl_v_t_m the velocity-mode flux integral at the
    mean force-mode time, the {Bl_V} of eq. (15); h_rel = l4 / {Bl_V} = h / h_units - 1 (eq. 15)
    and u_h_rel its standard uncertainty from the regression; time_s, bl_t_m, is_force the data;
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
        Flux integrals in the electrical units of the measurement (Bl_V of the velocity sets,
        Bl_F of the force sets).
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
    h_rel = float(h_rel_from_lambda4(lam[3], bl_v))
    # gradient of l4 / BlV wrt lam
    grad = np.array([-h_rel / bl_v * g[0], -h_rel / bl_v * g[1], -h_rel / bl_v * g[2], 1.0 / bl_v])
    u_h = float(math.sqrt(grad @ cov @ grad))
    return TripletResult(lam, cov, t_ref, bl_v, h_rel, u_h, t, y, s, resid, dof)


def h_rel_from_lambda4(lambda4_t_m, bl_v_t_m):
    """h / h_units - 1 = {l4} / {Bl_V} (seed 001 eq. 15). Dimensionless."""
    return np.asarray(lambda4_t_m, dtype=float) / np.asarray(bl_v_t_m, dtype=float)


def h_from_lambda4(lambda4_t_m, bl_v_t_m, h_units_j_s: float):
    """h = h_units (1 + {l4} / {Bl_V}) (seed 001 eqs. 13-15), J s; ``h_units_j_s`` the Planck
    constant the electrical units realize (``H_J_S`` in the SI, ``H90_J_S`` in the
    conventional units)."""
    return h_units_j_s * (1.0 + h_rel_from_lambda4(lambda4_t_m, bl_v_t_m))


def mass_from_bl_ratio(bl_ratio, mass_assumed_kg: float, h_units_j_s: float):
    """The mass in the new SI from a Kibble-balance measurement (seed 001 eq. 22 rewritten with
    the eq. 13 ratio), kg.

    If Bl_F was computed as ``mass_assumed_kg * g / I`` with I in units that realize
    ``h_units_j_s``, then ``{Bl_F} / {Bl_V} = (m_assumed / m) (h / h_units)``, hence
    ``m = m_assumed (h / h_units) / ({Bl_F} / {Bl_V})`` with the fixed h = 6.62607015e-34 J s.
    """
    return float(mass_assumed_kg) * (H_J_S / h_units_j_s) / np.asarray(bl_ratio, dtype=float)


def h_from_triplets(triplets: Sequence[TripletResult], u_master_rel: float, h_units_j_s: float,
                    budget: Mapping[str, float] | None = None) -> UncertaintyResult:
    """h (J s) of a run: one value per triplet regression (seed 001 figure 14,
    :func:`h_from_lambda4`), their mean with its type A and type B uncertainty.

    Type A: one triplet, the regression's uncertainty; several, the standard deviation of the
    mean of the per-triplet h (with two or three triplets, not less than what the regressions
    state for their mean); every standard deviation estimated from few values (the
    regression's reduced chi-square, the triplets) is widened to the standard deviation of its
    Student t (:func:`~kibble.services.analysis.uncertainty.small_sample_factor`, JCGM 101);
    either way combined in quadrature with ``u_master_rel``, the relative uncertainty of the
    master profile at the weighing position (an error common to every Bl_V of the run that no
    scatter shows). Type B from ``budget`` (e.g. ``NIST4_TABLE_III_BUDGET``; None: none).
    """
    h_each = np.array([h_from_lambda4(tr.lam[3], tr.bl_v_t_m, h_units_j_s) for tr in triplets])
    u_trip = np.array([tr.u_h_rel * small_sample_factor(tr.dof) for tr in triplets])
    if len(triplets) == 1:
        u_a = h_units_j_s * math.hypot(u_trip[0], u_master_rel)
    else:
        # the scatter of the triplets where there are enough of them to estimate it; with two
        # or three, not less than what the regressions state for their mean
        sem = std_of_mean(h_each)
        if h_each.size > 3:
            sem *= small_sample_factor(h_each.size - 1)
        else:
            sem = max(sem, h_units_j_s * float(np.sqrt(np.sum(u_trip**2))) / h_each.size)
        u_a = math.hypot(sem, h_units_j_s * u_master_rel)
    return combine_uncertainty(h_each, u_a, budget)
