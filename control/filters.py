"""Second-order sections designed from physical parameters, and a filter module in the style of
the LIGO front-end standard filter module (numba kernel, functional core).

Design (numpy, at configuration time): every stage is one second-order section
``[b0, b1, b2, a1, a2]`` (``a0 = 1``), ``H(z) = (b0 + b1 z^-1 + b2 z^-2) / (1 + a1 z^-1 + a2 z^-2)``,
discretized from its analog prototype with the bilinear (Tustin) transform, prewarped at the
frequency that matters (corner, notch centre, centre of the lead/lag), so that frequency maps
exactly onto the analog one at the loop rate.

Filter module, per module ``m`` (one per axis)::

    IN1 = x                                  input monitor
    IN2 = (x if input on else 0) + exc       excitation injection point, monitor
    s   = IN2 + offset                        offset ramped over ramp_s
    s   = stage_i(s) for each engaged stage   (a disengaged stage passes s and clears its history)
    o   = clamp(gain * s, -limit, limit)     gain ramped over ramp_s
    OUT = o if output on else 0; held at the last OUT while hold is on (the stages keep running)

Arrays: ``fm_par[n_mod, NFP]`` (columns ``IN_ON`` .. ``DT``), ``fm_sos[n_mod, n_stages, 5]``,
``fm_st[n_mod, NFS + 2 n_stages]`` (ramp state, monitors, flags, then two direct-form-II
transposed history values per stage). Changing ``fm_par[m, GAIN]`` or ``fm_par[m, OFFSET]``
starts a linear ramp from the present value that reaches the new value exactly after
``max(1, round(ramp_s / dt))`` samples. A non-finite input or excitation holds the output and
keeps the state (``FLAG_HELD``); a non-finite result (overflow) clears the stage histories
(history reset) and holds the output (``FLAG_OVERFLOW``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .pid import IO_EXC, IO_U, IO_Y

__all__ = ["IN_ON", "OUT_ON", "HOLD", "OFFSET", "GAIN", "RAMP_S", "LIMIT", "MASK", "DT",
           "NFP", "G", "OFS", "G_TGT", "G_STEP", "G_N", "O_TGT", "O_STEP", "O_N", "MON_IN1",
           "MON_IN2", "MON_OUT", "OUT", "FM_FLAGS", "FM_N_HOLD", "NFS", "FLAG_HELD",
           "FLAG_OVERFLOW", "bilinear_sos", "lowpass_sos", "highpass_sos", "notch_sos",
           "lead_lag_sos", "identity_sos", "fm_params", "fm_state", "fm_reset_history",
           "fm_sample", "fm_run", "sos_run"]

IN_ON, OUT_ON, HOLD, OFFSET, GAIN, RAMP_S, LIMIT, MASK, DT = range(9)
NFP = 9
G, OFS, G_TGT, G_STEP, G_N, O_TGT, O_STEP, O_N, MON_IN1, MON_IN2, MON_OUT, OUT, FM_FLAGS, FM_N_HOLD = range(14)
NFS = 14
FLAG_HELD, FLAG_OVERFLOW = 1.0, 8.0


# ================================================================================================
# design
# ================================================================================================
def bilinear_sos(num_s, den_s, fs_hz: float, f_prewarp_hz: float | None = None) -> np.ndarray:
    """Bilinear (Tustin) transform of an analog biquad ``(n2 s^2 + n1 s + n0) / (d2 s^2 + d1 s +
    d0)`` given as ``num_s = (n2, n1, n0)``, ``den_s = (d2, d1, d0)`` (descending powers of s, in
    rad/s units) at the sample rate ``fs_hz``, prewarped so that ``f_prewarp_hz`` maps exactly
    (None: plain ``s = 2 fs (z-1)/(z+1)``). Returns ``[b0, b1, b2, a1, a2]`` (shape (5,))."""
    if f_prewarp_hz is None:
        k = 2.0 * fs_hz
    else:
        if not 0.0 < f_prewarp_hz < 0.5 * fs_hz:
            raise ValueError(f"prewarp frequency {f_prewarp_hz} Hz must lie in (0, fs/2)")
        wp = 2.0 * math.pi * f_prewarp_hz
        k = wp / math.tan(wp / (2.0 * fs_hz))
    n2, n1, n0 = (float(v) for v in num_s)
    d2, d1, d0 = (float(v) for v in den_s)
    if n2 == 0.0 and d2 == 0.0:   # first order: one factor (1 + z^-1), no pole at z = -1
        if d1 * k + d0 == 0.0:
            raise ValueError("degenerate analog denominator")
        a0 = d1 * k + d0
        return np.array([(n1 * k + n0) / a0, (n0 - n1 * k) / a0, 0.0, (d0 - d1 * k) / a0, 0.0])
    kk = k * k
    b = np.array([n2 * kk + n1 * k + n0, 2.0 * (n0 - n2 * kk), n2 * kk - n1 * k + n0])
    a = np.array([d2 * kk + d1 * k + d0, 2.0 * (d0 - d2 * kk), d2 * kk - d1 * k + d0])
    if a[0] == 0.0:
        raise ValueError("degenerate analog denominator")
    return np.array([b[0] / a[0], b[1] / a[0], b[2] / a[0], a[1] / a[0], a[2] / a[0]])


def _check_f(f_hz: float, fs_hz: float, what: str) -> None:
    if not 0.0 < f_hz < 0.5 * fs_hz:
        raise ValueError(f"{what} {f_hz} Hz must lie in (0, fs/2 = {0.5 * fs_hz} Hz)")


def lowpass_sos(f_hz: float, q: float, fs_hz: float) -> np.ndarray:
    """Second-order low-pass ``w0^2 / (s^2 + w0/q s + w0^2)``, corner ``f_hz`` (Hz), quality
    factor ``q`` (0.7071 = Butterworth), unit DC gain; prewarped at the corner (gain ``q`` there)."""
    _check_f(f_hz, fs_hz, "low-pass corner")
    w0 = 2.0 * math.pi * f_hz
    return bilinear_sos((0.0, 0.0, w0 * w0), (1.0, w0 / q, w0 * w0), fs_hz, f_hz)


def highpass_sos(f_hz: float, q: float, fs_hz: float) -> np.ndarray:
    """Second-order high-pass ``s^2 / (s^2 + w0/q s + w0^2)``, corner ``f_hz`` (Hz), prewarped."""
    _check_f(f_hz, fs_hz, "high-pass corner")
    w0 = 2.0 * math.pi * f_hz
    return bilinear_sos((1.0, 0.0, 0.0), (1.0, w0 / q, w0 * w0), fs_hz, f_hz)


def notch_sos(f_hz: float, q: float, fs_hz: float, depth_db: float = math.inf) -> np.ndarray:
    """Notch for a resonance at ``f_hz`` (Hz): ``(s^2 + w0/qz s + w0^2) / (s^2 + w0/q s + w0^2)``
    with ``qz = q 10^(depth_db/20)`` (infinite depth: zeros on the axis), unit gain at DC and
    high frequency, prewarped at ``f_hz`` so the notch lands exactly on the resonance."""
    _check_f(f_hz, fs_hz, "notch frequency")
    w0 = 2.0 * math.pi * f_hz
    zeta_z = 0.0 if math.isinf(depth_db) else 1.0 / (q * 10.0 ** (depth_db / 20.0))
    return bilinear_sos((1.0, w0 * zeta_z, w0 * w0), (1.0, w0 / q, w0 * w0), fs_hz, f_hz)


def lead_lag_sos(f_zero_hz: float, f_pole_hz: float, fs_hz: float) -> np.ndarray:
    """First-order lead (``f_zero < f_pole``) or lag (``f_zero > f_pole``):
    ``(1 + s/wz) / (1 + s/wp)``, unit DC gain; prewarped at ``sqrt(f_zero f_pole)``, the frequency
    of maximum phase lead (lag). Returned as a section with ``b2 = a2 = 0``."""
    _check_f(f_zero_hz, fs_hz, "lead/lag zero")
    _check_f(f_pole_hz, fs_hz, "lead/lag pole")
    wz = 2.0 * math.pi * f_zero_hz
    wp = 2.0 * math.pi * f_pole_hz
    return bilinear_sos((0.0, 1.0 / wz, 1.0), (0.0, 1.0 / wp, 1.0), fs_hz,
                        math.sqrt(f_zero_hz * f_pole_hz))


def identity_sos() -> np.ndarray:
    """Pass-through section ``[1, 0, 0, 0, 0]``."""
    return np.array([1.0, 0.0, 0.0, 0.0, 0.0])


def fm_params(n_mod: int = 1, *, dt_s: float, gain: float = 1.0, offset: float = 0.0,
              ramp_s: float = 0.0, limit: float = math.inf, mask: int = 0, input_on: bool = True,
              output_on: bool = True, hold: bool = False) -> np.ndarray:
    """Validated filter-module parameters ``fm_par[n_mod, NFP]`` (same on every module).

    ``mask``: bit i engages stage i; ``ramp_s`` gain/offset ramp time (s); ``limit`` output
    limit (absolute, output units); ``dt_s`` loop period (s). Raises ``ValueError``."""
    for name, v in (("gain", gain), ("offset", offset), ("ramp_s", ramp_s)):
        if not math.isfinite(v):
            raise ValueError(f"filter module {name} must be finite, got {v}")
    if not (math.isfinite(dt_s) and dt_s > 0):
        raise ValueError(f"filter module dt_s must be > 0, got {dt_s}")
    if ramp_s < 0 or not limit >= 0 or not 0 <= mask < 2 ** 52:
        raise ValueError("filter module needs ramp_s >= 0, limit >= 0, 0 <= mask < 2^52")
    par = np.empty((n_mod, NFP))
    par[:, IN_ON], par[:, OUT_ON], par[:, HOLD] = float(input_on), float(output_on), float(hold)
    par[:, OFFSET], par[:, GAIN], par[:, RAMP_S], par[:, LIMIT] = offset, gain, ramp_s, limit
    par[:, MASK], par[:, DT] = float(mask), dt_s
    return par


def fm_state(fm_par: np.ndarray, n_stages: int) -> np.ndarray:
    """New state ``fm_st[n_mod, NFS + 2 n_stages]``: gain and offset start at their targets
    (no ramp), histories cleared."""
    st = np.zeros((fm_par.shape[0], NFS + 2 * n_stages))
    st[:, G] = st[:, G_TGT] = fm_par[:, GAIN]
    st[:, OFS] = st[:, O_TGT] = fm_par[:, OFFSET]
    return st


def fm_reset_history(fm_st: np.ndarray, modules=None) -> None:
    """Clear the stage histories of ``modules`` (default all) in place (history reset)."""
    idx = slice(None) if modules is None else np.atleast_1d(modules)
    fm_st[idx, NFS:] = 0.0


# ================================================================================================
# kernels
# ================================================================================================
@njit(cache=True, error_model="numpy", inline="always")
def _ramp(st, m, cur, tgt, step, nleft, target, n_ramp):
    """Advance one ramped quantity (gain or offset) of module m by one sample; returns value."""
    if target != st[m, tgt]:
        st[m, tgt] = target
        st[m, nleft] = n_ramp
        st[m, step] = (target - st[m, cur]) / n_ramp
    if st[m, nleft] > 0.0:
        st[m, nleft] -= 1.0
        if st[m, nleft] <= 0.0:
            st[m, cur] = st[m, tgt]
        else:
            st[m, cur] += st[m, step]
    return st[m, cur]


@njit(cache=True, error_model="numpy")
def fm_sample(fm_par, fm_sos, fm_st, m, x, exc):
    """Step filter module ``m`` one sample with input ``x`` and excitation ``exc`` (input
    units) and return its output (output units = input units x gain x stage gains).

    ``fm_par[n_mod, NFP]``, ``fm_sos[n_mod, n_stages, 5]``, ``fm_st[n_mod, NFS + 2 n_stages]``
    (updated in place). See the module docstring for the signal path."""
    out_prev = fm_st[m, OUT]
    if not (math.isfinite(x) and math.isfinite(exc)):
        fm_st[m, FM_FLAGS] = FLAG_HELD
        fm_st[m, FM_N_HOLD] += 1.0
        return out_prev
    dt = fm_par[m, DT]
    n_ramp = max(1.0, math.floor(fm_par[m, RAMP_S] / dt + 0.5))
    gain = _ramp(fm_st, m, G, G_TGT, G_STEP, G_N, fm_par[m, GAIN], n_ramp)
    offset = _ramp(fm_st, m, OFS, O_TGT, O_STEP, O_N, fm_par[m, OFFSET], n_ramp)
    in2 = exc
    if fm_par[m, IN_ON] != 0.0:
        in2 += x
    s = in2 + offset
    ok = math.isfinite(s)
    mask = np.int64(fm_par[m, MASK])
    for i in range(fm_sos.shape[1]):
        j = NFS + 2 * i
        if (mask >> i) & 1:
            c = fm_sos[m, i]
            y = c[0] * s + fm_st[m, j]
            fm_st[m, j] = c[1] * s - c[3] * y + fm_st[m, j + 1]
            fm_st[m, j + 1] = c[2] * s - c[4] * y
            ok = ok and math.isfinite(fm_st[m, j]) and math.isfinite(fm_st[m, j + 1])
            s = y
        else:
            fm_st[m, j] = 0.0
            fm_st[m, j + 1] = 0.0
    o = gain * s
    if not (ok and math.isfinite(o)):
        for j in range(NFS, fm_st.shape[1]):
            fm_st[m, j] = 0.0
        fm_st[m, FM_FLAGS] = FLAG_OVERFLOW
        fm_st[m, FM_N_HOLD] += 1.0
        return out_prev
    fm_st[m, MON_IN1] = x
    fm_st[m, MON_IN2] = in2
    lim = fm_par[m, LIMIT]
    if o > lim:
        o = lim
    elif o < -lim:
        o = -lim
    if fm_par[m, OUT_ON] == 0.0:
        o = 0.0
    if fm_par[m, HOLD] != 0.0:
        o = out_prev
    fm_st[m, MON_OUT] = o
    fm_st[m, OUT] = o
    fm_st[m, FM_FLAGS] = 0.0
    return o


@njit(cache=True, error_model="numpy")
def fm_run(fm_par, fm_sos, fm_st, io):
    """Run ``n`` samples of ``n_mod`` filter modules standalone.

    ``io[n, n_mod, NIO]`` (layout of ``kibble.control.pid``): reads the input ``io[..., IO_Y]``
    and the excitation ``io[..., IO_EXC]``, writes the output ``io[..., IO_U]``. Other arrays as
    in :func:`fm_sample`."""
    for m in range(io.shape[1]):
        for k in range(io.shape[0]):
            io[k, m, IO_U] = fm_sample(fm_par, fm_sos, fm_st, m, io[k, m, IO_Y], io[k, m, IO_EXC])


@njit(cache=True, error_model="numpy")
def sos_run(sos, zi, x, y):
    """Plain cascade of second-order sections (direct form II transposed) over a block.

    ``sos[n_stages, 5]`` rows ``[b0, b1, b2, a1, a2]``, ``zi[n_stages, 2]`` history (updated in
    place), ``x[n]`` input, ``y[n]`` output (same unit as x times the section gains)."""
    for k in range(x.shape[0]):
        s = x[k]
        for i in range(sos.shape[0]):
            c = sos[i]
            o = c[0] * s + zi[i, 0]
            zi[i, 0] = c[1] * s - c[3] * o + zi[i, 1]
            zi[i, 1] = c[2] * s - c[4] * o
            s = o
        y[k] = s
