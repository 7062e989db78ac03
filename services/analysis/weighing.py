"""EFB weighing: the mass from the electrostatic forces, loaded and unloaded, in both polarities.

Seed 000, eq. (1) ``F = kappa V^2`` with the measured voltage, the polarity reversal that
cancels the surface potential (eqs. 2-8), and eq. (17): per trial the unloaded negative,
loaded positive and loaded negative forces against the unloaded positive ones interpolated in
time. Times in s, voltages in V, kappa in F/m, masses in kg.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kibble.services.analysis.uncertainty import std_of_mean

__all__ = ["EfbMassResult", "efb_masses_eq17", "efb_weighing"]


def _interp_strict(t_s: np.ndarray, tp_s: np.ndarray, fp: np.ndarray, name: str) -> np.ndarray:
    """Linear interpolation in time that refuses to extrapolate."""
    t_s = np.asarray(t_s, dtype=float)
    if np.any(t_s < tp_s[0]) or np.any(t_s > tp_s[-1]):
        raise ValueError(f"{name}: a time lies outside the bracketing readings "
                         f"[{tp_s[0]}, {tp_s[-1]}] s; linear interpolation needs brackets")
    return np.interp(t_s, tp_s, fp)


def efb_masses_eq17(t_u_pos_s, f_u_pos_n, t_u_neg_s, f_u_neg_n, t_l_pos_s, f_l_pos_n,
                    t_l_neg_s, f_l_neg_n, g_m_per_s2: float, *, sign: int = +1):
    """Per-trial masses of seed 000 eq. (17), kg:

    ``m_p = [F_U-,p - F_U+(t_U-,p) - F_L+,p + F_U+(t_L+,p) - F_L-,p + F_U+(t_L-,p)] / 2g``

    F_U+(t) is the linear interpolation in time between consecutive unloaded positive-polarity
    forces (it removes the drift of the restoring force). With measured voltages
    V_m = +-V + V_S (eqs. 2-3) the surface-potential terms cancel: in a drift-free balance the
    sum is exactly 2 kappa (V_U^2 - V_L^2) (eqs. 4-8). Sign convention: with ``sign=+1``
    (default; the simulator's convention) the loaded balance needs more force, m g = F_L - F_U
    as in eq. (8), and the bracket is negated; ``sign=-1`` is the printed eq. (17), written
    for a balance whose force is lower when loaded (seed 000 figure 5).

    Parameters
    ----------
    t_u_pos_s, f_u_pos_n : array_like, shape (n_u,), s and N
        Unloaded, positive polarity readings (increasing times; they must bracket every other
        time).
    t_u_neg_s, f_u_neg_n, t_l_pos_s, f_l_pos_n, t_l_neg_s, f_l_neg_n : array_like, shape (n_p,)
        Unloaded negative, loaded positive and loaded negative readings of the n_p trials.
    g_m_per_s2 : float
    sign : +1 or -1

    Returns
    -------
    ndarray, shape (n_p,), kg
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    tu = np.asarray(t_u_pos_s, dtype=float)
    fu = np.asarray(f_u_pos_n, dtype=float)
    if np.any(np.diff(tu) <= 0):
        raise ValueError("t_u_pos_s must increase")
    fi = lambda tt, name: _interp_strict(tt, tu, fu, name)  # noqa: E731
    s = (np.asarray(f_u_neg_n, dtype=float) - fi(t_u_neg_s, "t_u_neg_s")
         - np.asarray(f_l_pos_n, dtype=float) + fi(t_l_pos_s, "t_l_pos_s")
         - np.asarray(f_l_neg_n, dtype=float) + fi(t_l_neg_s, "t_l_neg_s"))
    printed = s / (2.0 * g_m_per_s2)
    return -printed if sign == 1 else printed


@dataclass
class EfbMassResult:
    """An EFB weighing (seed 000 eq. 17, section 4.2.3, figure 6), n_p trials.

    mass_trial_kg (n_p,): eq. (17) per trial with its kappa; mass_per_kappa_kg_m_per_f (n_p,):
    eq. (17) per unit kappa (with kappa = 1 F/m), kg m/F, the mass's sensitivity to the
    trial's kappa; kappa_trial_f_per_m (n_p,) the kappa of each trial; u_a_weighing_kg the
    standard deviation of the mean of the trials at the mean kappa (their scatter without the
    scatter of the kappas).
    """

    mass_trial_kg: np.ndarray
    mass_per_kappa_kg_m_per_f: np.ndarray
    kappa_trial_f_per_m: np.ndarray
    u_a_weighing_kg: float


def efb_weighing(kappa_f_per_m, g_m_per_s2: float, t_u_pos_s, v2_u_pos_v2, t_u_neg_s, v2_u_neg_v2,
                 t_l_pos_s, v2_l_pos_v2, t_l_neg_s, v2_l_neg_v2, *, sign: int = +1) -> EfbMassResult:
    """The masses of the trials of an EFB weighing: F = kappa V^2 (eq. 1) and eq. (17).

    Each reading is a window of DVM voltages (measured, i.e. including the surface potential);
    its force is kappa times the window's mean of V^2, not the square of its mean voltage: that
    would miss kappa var(V) = var(F) / 4F, which with a loop's frame-to-frame force noise (0.4 %
    RMS unloaded at 100 Hz in the simulator) under-reads the unloaded force by ~3e-6 and the
    loaded one by ~4e-7 and so reads the mass high by ~1e-6. Eq. (17) is linear in kappa: each
    trial's mass is its kappa times its mass per unit kappa.

    Parameters
    ----------
    kappa_f_per_m : float or array_like, shape (n_p,), F/m
        kappa of every trial, or of each (e.g. the bracketing averages of
        :func:`~kibble.services.analysis.gradient.efb_kappa_bracketing`).
    g_m_per_s2 : float
    t_u_pos_s, v2_u_pos_v2 : array_like, shape (n_u,), s and V^2
        Unloaded positive readings: times and windows' mean squared voltages (increasing times
        that bracket every other reading).
    t_u_neg_s, v2_u_neg_v2, t_l_pos_s, v2_l_pos_v2, t_l_neg_s, v2_l_neg_v2 : shape (n_p,)
        Unloaded negative, loaded positive and loaded negative readings of the n_p trials.
    sign : +1 or -1
        As for :func:`efb_masses_eq17`.

    Returns
    -------
    EfbMassResult
    """
    per_kappa = efb_masses_eq17(t_u_pos_s, v2_u_pos_v2, t_u_neg_s, v2_u_neg_v2, t_l_pos_s,
                                v2_l_pos_v2, t_l_neg_s, v2_l_neg_v2, g_m_per_s2, sign=sign)
    kappa = np.array(np.broadcast_to(np.asarray(kappa_f_per_m, dtype=float), per_kappa.shape))
    mass = kappa * per_kappa
    return EfbMassResult(mass, per_kappa, kappa, std_of_mean(kappa.mean() * per_kappa))
