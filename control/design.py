"""Design and verification helpers on python-control (configuration time, not real time).

* :func:`pid_tfs`, :func:`fm_tf`, :func:`kernel_tfs`: the discrete transfer functions equivalent
  to a configured kernel (``kibble.control.pid`` / ``filters`` / ``loop``) with no limit active;
* :func:`discretize_plant`, :func:`loop_gain`: the loop gain with an LTI plant (continuous:
  zero-order-hold discretized at the loop rate; discrete: must share the loop period) and a
  computation delay of whole samples;
* :func:`loop_analysis`: gain and phase margins, unity-gain (crossover) frequency, closed-loop
  -3 dB bandwidth, stability; :func:`closed_loop_step`: closed-loop step response;
* :func:`propose_pid`: PID gains for a target crossover frequency and phase margin.

Sign convention: the kernel computes ``u = C_r r + C_y y + ff`` with ``C_y`` negative at low
frequency (negative feedback); the plant maps ``u`` to ``y``; the loop gain is
``L = -C_y P z^-delay``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import control as ct
import numpy as np

from . import filters as F
from . import pid as P

__all__ = ["pid_tfs", "fm_tf", "kernel_tfs", "discretize_plant", "loop_gain", "loop_analysis",
           "closed_loop_step", "propose_pid", "LoopFigures"]


def _pid_basis(tf_s: float, dt: float):
    """The three discrete basis transfer functions (integral, derivative) of the kernel."""
    integ = ct.tf([dt, 0.0], [1.0, -1.0], dt)                 # dt z / (z - 1)
    deriv = ct.tf([1.0, -1.0], [tf_s + dt, -tf_s], dt)        # (z - 1) / ((tf + dt) z - tf)
    return integ, deriv


def pid_tfs(par_row) -> tuple[ct.TransferFunction, ct.TransferFunction]:
    """``(C_r, C_y)``: setpoint-to-output and measurement-to-output transfer functions of one
    axis of ``par[n_axes, NPAR]`` (row ``par_row``), discrete at ``dt = par_row[DT_S]``."""
    dt = float(par_row[P.DT_S])
    kp, ki, kd, b = (float(par_row[i]) for i in (P.KP, P.KI, P.KD, P.B))
    integ, deriv = _pid_basis(float(par_row[P.TF_S]), dt)
    c_r = ct.tf([kp * b], [1.0], dt) + ki * integ
    c_y = -(ct.tf([kp], [1.0], dt) + ki * integ + kd * deriv)
    return ct.minreal(c_r, verbose=False), ct.minreal(c_y, verbose=False)


def fm_tf(fm_par_row, fm_sos_row) -> ct.TransferFunction:
    """Filter module (one module: ``fm_par[m]``, ``fm_sos[m]``) input-to-output transfer
    function with the engaged stages and the target gain (ramps finished, no limit)."""
    dt = float(fm_par_row[F.DT])
    mask = int(fm_par_row[F.MASK])
    h = ct.tf([float(fm_par_row[F.GAIN])], [1.0], dt)
    for i, c in enumerate(np.asarray(fm_sos_row)):
        if (mask >> i) & 1:
            h = h * ct.tf([c[0], c[1], c[2]], [1.0, c[3], c[4]], dt)
    if fm_par_row[F.IN_ON] == 0.0 or fm_par_row[F.OUT_ON] == 0.0:
        h = ct.tf([0.0], [1.0], dt)
    return h


def kernel_tfs(pid_par_row, fm_par_row=None, fm_sos_row=None, delay_samples: int = 0):
    """``(C_r, C_y)`` of one axis of the composed loop kernel (``kibble.control.loop``):
    ``C_y = C_y,pid F`` with the filter module F on the measurement (identity without one),
    both times ``z^-delay_samples`` (a computation/transport delay of the controller; do not
    count it again in :func:`loop_gain`)."""
    c_r, c_y = pid_tfs(pid_par_row)
    if fm_par_row is not None:
        c_y = c_y * fm_tf(fm_par_row, fm_sos_row)
    if delay_samples < 0:
        raise ValueError("delay_samples must be >= 0")
    if delay_samples:
        d = ct.tf([1.0], [1.0] + [0.0] * delay_samples, c_y.dt)
        c_r, c_y = c_r * d, c_y * d
    return c_r, c_y


def discretize_plant(plant, dt_s: float, delay_samples: int = 0) -> ct.TransferFunction:
    """SISO plant as a discrete transfer function at ``dt_s`` times ``z^-delay_samples``:
    a continuous plant is zero-order-hold discretized; a discrete one must have ``dt == dt_s``."""
    sys = ct.tf(plant) if not isinstance(plant, ct.TransferFunction) else plant
    if sys.isctime():
        sys = ct.c2d(sys, dt_s, method="zoh")
    elif not math.isclose(float(sys.dt), dt_s, rel_tol=1e-12):
        raise ValueError(f"discrete plant period {sys.dt} s differs from the loop period {dt_s} s")
    if delay_samples < 0:
        raise ValueError("delay_samples must be >= 0")
    if delay_samples:
        sys = sys * ct.tf([1.0], [1.0] + [0.0] * delay_samples, dt_s)
    return sys


def loop_gain(plant, c_y: ct.TransferFunction, delay_samples: int = 0) -> ct.TransferFunction:
    """Loop gain ``L = -C_y P z^-delay`` (plant continuous or discrete, see
    :func:`discretize_plant`)."""
    return -c_y * discretize_plant(plant, float(c_y.dt), delay_samples)


@dataclass
class LoopFigures:
    """Figures of merit of a loop gain: gain margin (factor, inf if none), phase margin (deg),
    unity-gain crossover frequency (Hz), phase-crossover frequency (Hz), closed-loop -3 dB
    bandwidth of ``T = L / (1 + L)`` (Hz), closed-loop stability."""
    gain_margin: float
    phase_margin_deg: float
    crossover_hz: float
    phase_crossover_hz: float
    bandwidth_hz: float
    stable: bool


def _bandwidth_hz(T: ct.TransferFunction) -> float:
    dt = float(T.dt)
    f = np.logspace(-6, math.log10(0.5 / dt), 4000)
    mag = np.abs(T(np.exp(2j * np.pi * f * dt))) / abs(T(1.0))
    below = np.nonzero(mag < 1.0 / math.sqrt(2.0))[0]
    if below.size == 0:
        return 0.5 / dt
    i = below[0]
    if i == 0:
        return float(f[0])
    lo, hi = f[i - 1], f[i]
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        m = abs(T(np.exp(2j * np.pi * mid * dt))) / abs(T(1.0))
        lo, hi = (mid, hi) if m >= 1.0 / math.sqrt(2.0) else (lo, mid)
    return float(math.sqrt(lo * hi))


def loop_analysis(L: ct.TransferFunction) -> LoopFigures:
    """Margins, crossover, bandwidth and stability of a discrete loop gain ``L``."""
    with warnings.catch_warnings():   # python-control notes its expected fallback to 'frd'
        warnings.simplefilter("ignore", UserWarning)
        gm, pm, wpc, wgc = ct.margin(L)
    T = ct.feedback(L, 1)
    stable = bool(np.all(np.abs(ct.poles(T)) < 1.0))
    return LoopFigures(float(gm), float(pm), float(wgc) / (2 * math.pi), float(wpc) / (2 * math.pi),
                       _bandwidth_hz(T), stable)


def closed_loop_step(L: ct.TransferFunction, duration_s: float):
    """Closed-loop step response of ``T = L / (1 + L)``: ``(t_s[n], y[n])``."""
    T = ct.feedback(L, 1)
    t = np.arange(0.0, duration_s, float(L.dt))
    res = ct.step_response(T, T=t)
    return res.time, np.squeeze(res.outputs)


def propose_pid(plant, dt_s: float, crossover_hz: float, phase_margin_deg: float,
                delay_samples: int = 0, integral_ratio: float = 5.0,
                derivative_filter_ratio: float = 10.0, filter_tf: ct.TransferFunction | None = None):
    """PID gains for a loop crossover (unity-gain frequency, the loop bandwidth) ``crossover_hz``
    and phase margin ``phase_margin_deg``.

    Solves exactly, at ``z_c = exp(j w_c dt)`` with the kernel's own discrete basis, for
    ``L(z_c) = -exp(j PM)``: ``kp + ki T_i(z_c) + kd T_d(z_c) = -exp(j PM) / G(z_c)`` with
    ``G`` the discretized plant x delay x ``filter_tf`` (optional filter module), the integral
    zero at ``w_c / integral_ratio`` (``ki = kp w_c / integral_ratio``) and the derivative
    filter ``tf = 1 / (derivative_filter_ratio w_c)``. If that asks for ``kd < 0`` the
    derivative is dropped and ``kp``, ``ki`` are solved; if then ``ki < 0``, a PD is solved.
    Returns ``dict(kp, ki_per_s, kd_s, tf_s)`` (for :func:`kibble.control.pid.pid_params`).
    Raises ``ValueError`` if no PID with non-negative gains meets the target."""
    wc = 2 * math.pi * crossover_hz
    if not 0 < crossover_hz < 0.5 / dt_s or not 0 < phase_margin_deg < 90:
        raise ValueError("need 0 < crossover < Nyquist and 0 < phase margin < 90 deg")
    G = discretize_plant(plant, dt_s, delay_samples)
    if filter_tf is not None:
        G = G * filter_tf
    zc = np.exp(1j * wc * dt_s)
    target = -np.exp(1j * math.radians(phase_margin_deg)) / complex(G(zc))
    tf_s = 1.0 / (derivative_filter_ratio * wc)
    t_i = dt_s * zc / (zc - 1.0)
    t_d = (zc - 1.0) / ((tf_s + dt_s) * zc - tf_s)

    def solve(c1, c2):
        A = np.array([[c1.real, c2.real], [c1.imag, c2.imag]])
        return np.linalg.solve(A, np.array([target.real, target.imag]))

    kp, kd = solve(1.0 + wc / integral_ratio * t_i, t_d)
    ki = kp * wc / integral_ratio
    if kd < 0:
        kd = 0.0
        kp, ki = solve(1.0 + 0j, t_i)
        if ki < 0:
            ki = 0.0
            kp, kd = solve(1.0 + 0j, t_d)
    if kp < 0 or ki < 0 or kd < 0:
        raise ValueError("no PID with non-negative gains meets the crossover and phase margin")
    return dict(kp=float(kp), ki_per_s=float(ki), kd_s=float(kd), tf_s=float(tf_s))
