"""Electrostatic actuators (numba kernels): EFB force to voltage, theta-z push-pull plates.

* EFB main capacitor: ``F = kappa (V - V_s)^2`` (kappa = dC/dz / 2 in F/m, ``V_s`` the surface
  potential, V). The force only attracts; a requested force is met with either polarity
  ``V = V_s + p sqrt(F / kappa)`` (``p = +1`` or ``-1``, reversed between weighings to cancel
  the surface potential as in seed 000).
* theta-z plates (NIST-4): plate k between electrodes a and b at gap ``d`` (area ``A``, radius
  ``R_p``); with ``V_a = V_bias + u``, ``V_b = V_bias - u`` the tangential force at the null is
  ``eps0 A / (2 d^2) [(V_bias + u)^2 - (V_bias - u)^2] = 2 eps0 A V_bias u / d^2``, exactly linear
  in ``u``; ``n`` equal plates 120 deg apart give ``tau_z = n R_p 2 eps0 A V_bias u / d^2`` and no
  net x, y force.
"""

from __future__ import annotations

import math

from numba import njit

__all__ = ["EPS0", "thetaz_gain_nm_per_v2", "efb_force_to_voltage", "thetaz_voltages"]

EPS0 = 8.8541878128e-12


def thetaz_gain_nm_per_v2(radius_m: float, gap_m: float, area_m2: float, n_plates: int = 3) -> float:
    """Torque per (bias volt x control volt), N m / V^2: ``n R_p 2 eps0 A / d^2``."""
    return n_plates * radius_m * 2.0 * EPS0 * area_m2 / (gap_m * gap_m)


@njit(cache=True, error_model="numpy")
def efb_force_to_voltage(force_n, kappa_f_per_m, v_surface_v, polarity, v_limit_v, v_hold_v, out_v):
    """Electrode voltage for a requested EFB force.

    ``force_n[n]`` (N), ``kappa_f_per_m`` (F/m), ``v_surface_v`` (V), ``polarity`` (+1 or -1),
    ``v_limit_v`` (V, |V| <= limit), ``v_hold_v`` (V, output held for a non-finite first
    sample), ``out_v[n]`` (V). A negative force (not realizable) gives ``V_s`` (zero force);
    a force beyond the limit is clamped; a non-finite request holds the previous output.
    Returns the number of samples that were limited or held."""
    n_flag = 0
    last = min(max(v_hold_v, -v_limit_v), v_limit_v)
    for k in range(force_n.shape[0]):
        f = force_n[k]
        if not math.isfinite(f):
            out_v[k] = last
            n_flag += 1
            continue
        if f < 0.0:
            f = 0.0
            n_flag += 1
        v = v_surface_v + polarity * math.sqrt(f / kappa_f_per_m)
        if v != v:
            v = last
            n_flag += 1
        if v > v_limit_v or v < -v_limit_v:
            v = min(max(v, -v_limit_v), v_limit_v)
            n_flag += 1
        out_v[k] = v
        last = v
    return n_flag


@njit(cache=True, error_model="numpy")
def thetaz_voltages(torque_nm, bias_v, gain_nm_per_v2, v_limit_v, u_hold_v, out_v):
    """Push-pull electrode voltages for a requested theta-z torque.

    ``torque_nm[n]`` (N m), ``bias_v`` (V), ``gain_nm_per_v2`` from
    :func:`thetaz_gain_nm_per_v2`, ``v_limit_v`` (V, every electrode within +-limit),
    ``u_hold_v`` (V, control voltage held for a non-finite first sample),
    ``out_v[n, 2]`` (V): electrode a = bias + u, electrode b = bias - u (the same on every
    plate). ``|u| <= v_limit - |bias|``; a non-finite request holds the previous ``u``.
    Returns the number of samples that were limited or held."""
    n_flag = 0
    umax = max(v_limit_v - abs(bias_v), 0.0)
    bias = min(max(bias_v, -v_limit_v), v_limit_v)
    last = min(max(u_hold_v, -umax), umax)
    # a subnormal bias can underflow gain * bias to 0: the plates then have no authority
    gain_v = gain_nm_per_v2 * bias if gain_nm_per_v2 > 0.0 else 0.0
    for k in range(torque_nm.shape[0]):
        t = torque_nm[k]
        if math.isfinite(t) and gain_v != 0.0:
            u = t / gain_v
            if u > umax or u < -umax:
                u = min(max(u, -umax), umax)
                n_flag += 1
        else:
            u = last
            n_flag += 1
        out_v[k, 0] = bias + u
        out_v[k, 1] = bias - u
        last = u
    return n_flag
