"""Numba PID kernel for blocks of samples and several axes per call (functional core).

One call steps ``n`` samples of ``n_axes`` independent PID controllers. Everything the kernel
needs lives in three float64 arrays, so a service can snapshot and restore a controller by
copying them:

* ``par[n_axes, NPAR]``: parameters (columns ``KP`` .. ``U_MAN`` below), set by
  :func:`pid_params`; the kernel reads them every sample, so a service changes a gain by
  writing one element between calls (the change is applied bumplessly);
* ``st[n_axes, NST]``: state (columns ``XI`` .. ``N_HOLD``), created by :func:`pid_state`;
* ``io[n, n_axes, NIO]``: per-sample signals; the kernel reads the setpoint ``io[..., IO_R]``,
  the measurement ``io[..., IO_Y]`` and the feedforward ``io[..., IO_FF]`` and writes the
  output ``io[..., IO_U]`` (``IO_EXC`` is used by the filter module, see ``kibble.control.loop``).

Control law (sample period ``dt``, axis units: measurement ``y`` and setpoint ``r`` in the
measured unit, e.g. m; output ``u`` in the actuator unit, e.g. A)::

    p[k]  = kp (b r[k] - y[k])                                 setpoint weighting b
    xi[k] = xi[k-1] + ki dt (r[k] - y[k]) + kt dt (u[k-1]* - v[k-1]*)   backward-Euler integral
    yd[k] = (tf yd[k-1] + y[k] - y[k-1]) / (tf + dt)           derivative of y, first-order filter
    v[k]  = p[k] + xi[k] - kd yd[k] + ff[k]                    derivative on measurement only
    u[k]  = clamp(slew(v[k], u[k-1], slew dt), u_min, u_max)

(*) Anti-windup is **back-calculation**: after the output is limited (clamp or slew), the
integral moves by ``kt dt (u - v)`` toward the value that would have produced the limited
output. With a constant error ``e`` in saturation the excess ``s = v - u`` obeys
``s[k+1] = (1 - kt dt) s[k] + ki dt e`` and settles at ``ki e / kt`` (bounded windup); when the
error changes to ``e'`` of the opposite sign the output leaves the limit after
``n = 1 + ceil(log(-s* / (s1 - s*)) / log(1 - kt dt))`` samples, ``s* = ki e' / kt``,
``s1`` the excess at the first sample after the change (``n = 1`` whenever ``s1 <= 0``);
``kt = 1/dt`` gives full conditioning (``v = u`` after every limited sample, exit within one
sample). ``kt`` must satisfy ``0 <= kt dt <= 1``.

Linear transfer functions (no limit active), ``z`` the shift operator::

    U = [kp b + ki dt z/(z-1)] R - [kp + ki dt z/(z-1) + kd (z-1)/((tf+dt) z - tf)] Y + FF

(``kibble.control.design.pid_tfs`` builds them for python-control).

Modes (``par[:, MODE]``): ``MODE_AUTO`` runs the law; ``MODE_MANUAL`` drives the output toward
``par[:, U_MAN]`` at the slew limit; ``MODE_HOLD`` keeps the last output. In manual and hold
the integral tracks ``xi = u - p + kd yd - ff`` so the switch back to auto is bumpless. A change
of ``kp``, ``b`` or ``kd`` moves the integral by the change of the proportional and derivative
terms at the previous sample, so the output continues without a step (a ``ki`` change needs no
correction: the integral is kept in output units).

Non-finite input (setpoint, measurement or feedforward) holds the last output, keeps the state,
sets ``FLAG_HELD`` and counts in ``st[:, N_HOLD]``; an update whose new state would not be finite
(overflow from huge inputs) is treated the same way (``FLAG_OVERFLOW``). The output is always
finite and within ``[u_min, u_max]``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["KP", "KI", "KD", "TF_S", "B", "KT", "U_MIN", "U_MAX", "SLEW", "DT_S", "MODE",
           "U_MAN", "NPAR", "XI", "YD", "Y_PREV", "R_PREV", "U", "V", "KP_L", "KD_L",
           "B_L", "INIT", "FLAGS", "N_HOLD", "NST", "IO_R", "IO_Y", "IO_FF", "IO_EXC", "IO_U",
           "NIO", "MODE_HOLD", "MODE_MANUAL", "MODE_AUTO", "FLAG_HELD", "FLAG_CLAMPED",
           "FLAG_SLEW", "FLAG_OVERFLOW", "pid_params", "pid_state", "pid_reset", "pid_run",
           "pid_sample", "io_block"]

# ---- parameter columns -------------------------------------------------------------------------
KP, KI, KD, TF_S, B, KT, U_MIN, U_MAX, SLEW, DT_S, MODE, U_MAN = range(12)
NPAR = 12
# ---- state columns -----------------------------------------------------------------------------
XI, YD, Y_PREV, R_PREV, U, V, KP_L, KD_L, B_L, INIT, FLAGS, N_HOLD = range(12)
NST = 12
# ---- io columns (shared with the filter module and the composed loop) --------------------------
IO_R, IO_Y, IO_FF, IO_EXC, IO_U = range(5)
NIO = 5
# ---- modes and flags ---------------------------------------------------------------------------
MODE_HOLD, MODE_MANUAL, MODE_AUTO = 0.0, 1.0, 2.0
FLAG_HELD, FLAG_CLAMPED, FLAG_SLEW, FLAG_OVERFLOW = 1.0, 2.0, 4.0, 8.0


def pid_params(n_axes: int = 1, *, dt_s: float, kp: float = 0.0, ki_per_s: float = 0.0,
               kd_s: float = 0.0, tf_s: float = 0.0, b: float = 1.0, kt_per_s: float | None = None,
               u_min: float = -math.inf, u_max: float = math.inf, slew_per_s: float = math.inf,
               mode: float = MODE_AUTO, u_man: float = 0.0) -> np.ndarray:
    """Validated parameter array ``par[n_axes, NPAR]`` (same values on every axis).

    ``kp`` output per measured unit, ``ki_per_s`` output per (unit s), ``kd_s`` output s per
    unit, ``tf_s`` derivative filter time constant (s), ``b`` setpoint weight of the
    proportional term, ``kt_per_s`` back-calculation gain (1/s, default ``1/(2 dt)``),
    ``u_min``/``u_max`` output limits, ``slew_per_s`` output units per second (inf = none),
    ``mode`` one of ``MODE_*``, ``u_man`` manual output target. Raises ``ValueError``.
    """
    kt = 0.5 / dt_s if kt_per_s is None else kt_per_s
    vals = dict(kp=kp, ki_per_s=ki_per_s, kd_s=kd_s, tf_s=tf_s, b=b, kt_per_s=kt, u_man=u_man)
    for name, v in vals.items():
        if not math.isfinite(v):
            raise ValueError(f"pid {name} must be finite, got {v}")
    if not (math.isfinite(dt_s) and dt_s > 0):
        raise ValueError(f"pid dt_s must be > 0, got {dt_s}")
    if tf_s < 0:
        raise ValueError(f"pid tf_s must be >= 0, got {tf_s}")
    if not 0.0 <= kt * dt_s <= 1.0:
        raise ValueError(f"pid kt_per_s * dt_s must be in [0, 1], got {kt * dt_s}")
    if math.isnan(u_min) or math.isnan(u_max) or not u_min <= u_max:
        raise ValueError(f"pid limits must satisfy u_min <= u_max, got [{u_min}, {u_max}]")
    if math.isinf(u_min) and math.isinf(u_max) and u_min == u_max:
        raise ValueError("pid limits must not both be the same infinity")
    if not slew_per_s > 0:
        raise ValueError(f"pid slew_per_s must be > 0, got {slew_per_s}")
    if mode not in (MODE_HOLD, MODE_MANUAL, MODE_AUTO):
        raise ValueError(f"pid mode must be one of 0 (hold), 1 (manual), 2 (auto), got {mode}")
    par = np.empty((n_axes, NPAR))
    par[:, KP], par[:, KI], par[:, KD], par[:, TF_S], par[:, B] = kp, ki_per_s, kd_s, tf_s, b
    par[:, KT], par[:, U_MIN], par[:, U_MAX], par[:, SLEW] = kt, u_min, u_max, slew_per_s
    par[:, DT_S], par[:, MODE], par[:, U_MAN] = dt_s, mode, u_man
    return par


def pid_state(par: np.ndarray, u0: float = 0.0, y0: float = math.nan, r0: float = 0.0) -> np.ndarray:
    """New state array ``st[n_axes, NST]`` reset by :func:`pid_reset`."""
    st = np.zeros((par.shape[0], NST))
    pid_reset(par, st, u0=u0, y0=y0, r0=r0)
    return st


def pid_reset(par: np.ndarray, st: np.ndarray, axes=None, u0: float = 0.0, y0: float = math.nan,
              r0: float = 0.0) -> None:
    """Reset the state of ``axes`` (default all) in place: output ``u0``, derivative filter
    cleared, integral set so that the first output with ``y = y0``, ``r = r0``, ``ff = 0``
    continues from ``u0``. ``y0 = nan`` (default) takes the first measurement as the previous
    one (no derivative kick)."""
    idx = np.arange(st.shape[0]) if axes is None else np.atleast_1d(axes)
    for a in idx:
        st[a, :] = 0.0
        st[a, U] = st[a, V] = u0
        st[a, R_PREV] = r0
        st[a, KP_L], st[a, KD_L], st[a, B_L] = par[a, KP], par[a, KD], par[a, B]
        if math.isnan(y0):
            st[a, XI] = u0
        else:
            st[a, Y_PREV] = y0
            st[a, INIT] = 1.0
            st[a, XI] = u0 - par[a, KP] * (par[a, B] * r0 - y0)


def io_block(n: int, n_axes: int) -> np.ndarray:
    """Zeroed signal array ``io[n, n_axes, NIO]`` (columns ``IO_R``, ``IO_Y``, ``IO_FF``,
    ``IO_EXC``, ``IO_U``)."""
    return np.zeros((n, n_axes, NIO))


@njit(cache=True, error_model="numpy", inline="always")
def _clamp(v, lo, hi):
    """``v`` limited to ``[lo, hi]`` (floats, same unit)."""
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v


@njit(cache=True, error_model="numpy")
def pid_sample(par, st, a, r, y, ff):
    """Step axis ``a`` of the PID one sample and return the output (float).

    ``par[n_axes, NPAR]``, ``st[n_axes, NST]`` (updated in place); ``r`` setpoint and ``y``
    measurement in the measured unit (e.g. m), ``ff`` feedforward in output units (e.g. A).
    See the module docstring for the law, limits, modes and the non-finite policy."""
    lo = par[a, U_MIN]
    hi = par[a, U_MAX]
    u_prev = _clamp(st[a, U], lo, hi)
    if not (math.isfinite(r) and math.isfinite(y) and math.isfinite(ff)):
        st[a, FLAGS] = FLAG_HELD
        st[a, N_HOLD] += 1.0
        st[a, U] = u_prev
        return u_prev
    dt = par[a, DT_S]
    kp = par[a, KP]
    kd = par[a, KD]
    b = par[a, B]
    tf = par[a, TF_S]
    mode = par[a, MODE]
    xi = st[a, XI]
    yd = st[a, YD]
    if st[a, INIT] == 0.0:
        y_prev = y
        r_prev = r
    else:
        y_prev = st[a, Y_PREV]
        r_prev = st[a, R_PREV]
    # bumpless gain change: the integral absorbs the change of the P and D terms
    if kp != st[a, KP_L] or kd != st[a, KD_L] or b != st[a, B_L]:
        old = st[a, KP_L] * (st[a, B_L] * r_prev - y_prev) - st[a, KD_L] * yd
        new = kp * (b * r_prev - y_prev) - kd * yd
        xi += old - new
    yd = (tf * yd + (y - y_prev)) / (tf + dt)
    pd = kp * (b * r - y) - kd * yd
    if mode == MODE_AUTO:
        xi += par[a, KI] * dt * (r - y)
        v = pd + xi + ff
    elif mode == MODE_MANUAL:
        v = par[a, U_MAN]
    else:
        v = u_prev
    flags = 0.0
    step = par[a, SLEW] * dt
    u = v
    if u > u_prev + step:
        u = u_prev + step
        flags += FLAG_SLEW
    elif u < u_prev - step:
        u = u_prev - step
        flags += FLAG_SLEW
    if u < lo or u > hi:
        u = _clamp(u, lo, hi)
        flags += FLAG_CLAMPED
    if mode == MODE_AUTO:
        if u != v:
            xi += par[a, KT] * dt * (u - v)
    else:
        xi = u - pd - ff
    if not (math.isfinite(xi) and math.isfinite(yd) and math.isfinite(v) and math.isfinite(u)):
        st[a, FLAGS] = FLAG_OVERFLOW
        st[a, N_HOLD] += 1.0
        st[a, U] = u_prev
        return u_prev
    st[a, XI] = xi
    st[a, YD] = yd
    st[a, Y_PREV] = y
    st[a, R_PREV] = r
    st[a, U] = u
    st[a, V] = v
    st[a, KP_L] = kp
    st[a, KD_L] = kd
    st[a, B_L] = b
    st[a, INIT] = 1.0
    st[a, FLAGS] = flags
    return u


@njit(cache=True, error_model="numpy")
def pid_run(par, st, io):
    """Run ``n`` samples of ``n_axes`` PID controllers.

    ``par[n_axes, NPAR]`` parameters, ``st[n_axes, NST]`` state (updated in place),
    ``io[n, n_axes, NIO]``: reads setpoint ``IO_R`` and measurement ``IO_Y`` (measured unit,
    e.g. m) and feedforward ``IO_FF`` (output unit, e.g. A), writes the output ``IO_U``.
    A single-sample call from a service uses ``n = 1``."""
    n = io.shape[0]
    for a in range(io.shape[1]):
        for k in range(n):
            io[k, a, IO_U] = pid_sample(par, st, a, io[k, a, IO_R], io[k, a, IO_Y], io[k, a, IO_FF])
